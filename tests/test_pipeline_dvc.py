"""End to end through DVC on a copy of the working tree: `dvc repro`, a clean `dvc status`, byte-identical outputs
after `dvc repro --force`, and an experiment with other windows params that changes the metrics.

The slow test of the suite (~1-2 min on 2 cores: five stages, three times); it runs by default. Marked `slow` so
`pytest -m "not slow"` can skip it while iterating.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, subprocess_env, write_params

pytestmark = pytest.mark.slow

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def run(repo: Path, *command: str, timeout: float = 300) -> str:
    env = {**subprocess_env(), **GIT_IDENTITY, "PYTHONPATH": str(repo)}  # the stages of the copy, not of ROOT
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def lock_outputs(repo: Path) -> dict[str, str]:
    """output path -> md5 of every stage output recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The files git sees in the working tree (tracked + untracked, not ignored), committed in a fresh repo, with
    the TINY params (the model path stays relative, as in params.yaml)."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    write_params(repo)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "snapshot")
    return repo


def test_repro_status_determinism_and_experiment(repo):
    run(repo, "dvc", "repro")
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert {"predictor", "baselines", "bounds", "test_windows"} <= set(metrics)
    assert {"random", "frequency", "lookup", "previous_token"} <= set(metrics["baselines"])
    assert {"top1", "top3", "top5", "top10", "recall_at_k"} <= set(metrics["predictor"])
    assert json.loads(run(repo, "dvc", "status", "--json")) == {}
    assert not [p.name for p in (repo / "data").iterdir() if p.name.startswith(".")]  # no temp dirs left

    first = lock_outputs(repo)
    assert {"data/traces", "data/shards", "data/windows", "data/predictor", "metrics/evaluate.json", "plots"} <= set(first)
    run(repo, "dvc", "repro", "--force")
    assert lock_outputs(repo) == first  # every output byte-identical on a forced re-run

    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "tiny run")
    run(repo, "dvc", "exp", "run", "-S", "windows.horizon=2", "-S", "windows.context_length=2")
    assert yaml.safe_load((repo / "params.yaml").read_text())["windows"]["horizon"] == 2
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "--json"))["metrics/evaluate.json"]
    changed = {key for key, value in diff.items() if value.get("diff")}
    assert "predictor.top1" in changed and "test_windows" in changed
    experiments = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    assert json.dumps(experiments).count('"horizon": 2') >= 1


def test_queued_experiments_run_from_committed_files(repo):
    """`dvc exp run --queue` + `dvc queue start -j 2`: each runs in its own temporary workspace, which holds only what
    Git and DVC track, so this fails if a stage needs an untracked file."""
    run(repo, "git", "checkout", "-q", "--", "params.yaml")  # the workspace as committed
    for arch in ("frequency", "lookup"):
        run(repo, "dvc", "exp", "run", "--queue", "-S", f"train.arch={arch}")
    run(repo, "dvc", "queue", "start", "-j", "2")
    started = time.time()
    while time.time() - started < 240:
        status = run(repo, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    status = run(repo, "dvc", "queue", "status")
    assert "Failed" not in status, status
    assert status.count("Success") >= 2, status
    shown = json.dumps(json.loads(run(repo, "dvc", "exp", "show", "--json")))
    assert '"arch": "frequency"' in shown and '"arch": "lookup"' in shown
