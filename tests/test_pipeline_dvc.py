"""End to end through DVC on a copy of the working tree: `dvc repro`, a clean `dvc status`, byte-identical outputs
after `dvc repro --force`, and an experiment with other windows params that changes the metrics.

The slow test of the suite (~1-2 min on 2 cores: every stage, three times); it runs by default. Marked `slow` so
`pytest -m "not slow"` can skip it while iterating.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import copy_repo, lock_outputs, repo_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The working tree with the TINY params, committed in a fresh repo (conftest.copy_repo)."""
    return copy_repo(tmp_path_factory.mktemp("dvc") / "repo")


def test_repro_status_determinism_and_experiment(repo):
    repo_run(repo, "dvc", "repro")
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert {"predictor", "baselines", "bounds", "test_windows"} <= set(metrics)
    assert {"random", "frequency", "lookup", "previous_token"} <= set(metrics["baselines"])
    assert {"top1", "top3", "top5", "top10", "recall_at_k"} <= set(metrics["predictor"])
    assert json.loads(repo_run(repo, "dvc", "status", "--json")) == {}
    assert not [p.name for p in (repo / "data").iterdir() if p.name.startswith(".")]  # no temp dirs left

    first = lock_outputs(repo)
    assert {"data/traces", "data/shards", "data/windows", "data/predictor", "metrics/evaluate.json", "plots"} <= set(first)
    repo_run(repo, "dvc", "repro", "--force")
    assert lock_outputs(repo) == first  # every output byte-identical on a forced re-run

    repo_run(repo, "git", "add", "-A")
    repo_run(repo, "git", "commit", "-q", "-m", "tiny run")
    repo_run(repo, "dvc", "exp", "run", "-S", "windows.horizon=2", "-S", "windows.context_length=2")
    assert yaml.safe_load((repo / "params.yaml").read_text())["windows"]["horizon"] == 2
    diff = json.loads(repo_run(repo, "dvc", "metrics", "diff", "--json"))["metrics/evaluate.json"]
    changed = {key for key, value in diff.items() if value.get("diff")}
    assert "predictor.top1" in changed and "test_windows" in changed
    experiments = json.loads(repo_run(repo, "dvc", "exp", "show", "--json"))
    assert json.dumps(experiments).count('"horizon": 2') >= 1
    # the README's readable comparison: the headline columns only, one row per experiment
    table = repo_run(repo, "dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", "Experiment|^headline\\.").splitlines()
    header = table[0].split(",")
    assert header[0] == "Experiment" and {"headline.predictor_top1", "headline.best_baseline_top1",
                                          "headline.cache_predictor_speedup"} <= set(header), header
    assert len(header) == 1 + len(json.loads((repo / "metrics" / "headline.json").read_text())["headline"]), header


def test_queued_experiments_run_from_committed_files(repo):
    """`dvc exp run --queue` + `dvc queue start -j 2`: each runs in its own temporary workspace, which holds only what
    Git and DVC track, so this fails if a stage needs an untracked file."""
    repo_run(repo, "git", "checkout", "-q", "--", "params.yaml")  # the workspace as committed
    for arch in ("frequency", "lookup"):
        repo_run(repo, "dvc", "exp", "run", "--queue", "-S", f"train.arch={arch}")
    repo_run(repo, "dvc", "queue", "start", "-j", "2")
    started = time.time()
    while time.time() - started < 240:
        status = repo_run(repo, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    status = repo_run(repo, "dvc", "queue", "status")
    assert "Failed" not in status, status
    assert status.count("Success") >= 2, status
    shown = json.dumps(json.loads(repo_run(repo, "dvc", "exp", "show", "--json")))
    assert '"arch": "frequency"' in shown and '"arch": "lookup"' in shown
