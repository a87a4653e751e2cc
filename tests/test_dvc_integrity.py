"""What DVC sees and what it keeps, through real `dvc repro` in a copy of the repo (conftest.copy_repo), on routing
imported from inputs/ (4 MoE layers: seconds per stage):

- the files collect reads are DVC dependencies: editing the import file under inputs/ re-runs collect, a glob
  outside inputs/ is a one-line error, and `dvc status` is clean after every successful `dvc repro`;
- a bad param fails in the first stage, validate, before DVC deletes any output: data/, dvclive/, metrics/ and
  plots/ stay byte-identical, and validate's marker never makes another stage re-run;
- imported traces get their recorded domains in the windows summary, and evaluate.max_horizon caps at the
  horizons a 4-layer model has.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import (
    copy_repo,
    lock_outputs,
    repo_process,
    repo_run,
    tree_digest,
    write_params,
)
from test_import import good_records, write_records

pytestmark = pytest.mark.slow

IMPORT = {"collect": {"import": "inputs/routing/*.jsonl", "num_experts": 8}}
OUTPUTS = ("data", "dvclive", "metrics", "plots")


def records_file(repo: Path) -> Path:
    return repo / "inputs" / "routing" / "r.jsonl"


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def status(repo: Path) -> set[str]:
    """The stages `dvc status` reports."""
    return set(json.loads(repo_run(repo, "dvc", "status", "--json")))


def failed_repro(repo: Path) -> tuple[str, str]:
    """`dvc repro` that must fail: (the one `error:` line the stage printed, dvc's stderr)."""
    result = repo_process(repo, "dvc", "repro")
    assert result.returncode != 0, result.stdout[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0], result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, str]:
    """A repo copy importing 30 sequences from inputs/routing/r.jsonl, after a successful `dvc repro`: (repo, its stdout)."""
    repo = copy_repo(tmp_path_factory.mktemp("integrity") / "repo", IMPORT)
    records_file(repo).parent.mkdir()
    write_records(records_file(repo), good_records(sequences=30))
    return repo, repo_run(repo, "dvc", "repro")


def test_an_imported_repro_is_clean_with_recorded_domains_and_capped_horizons(repo):
    repo, stdout = repo
    assert status(repo) == set()
    summary = json.loads((repo / "data" / "windows" / "summary.json").read_text())
    assert summary["domains"] == ["imported", "odd"]
    assert all(set(split["domains"]) <= {"imported", "odd"} for split in summary["splits"].values())
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert sorted(metrics["per_horizon"]) == ["h1", "h2"]  # max_horizon 3, but 4 layers - context 2 leave h <= 2
    assert "note: evaluate.max_horizon 3 capped to 2" in stdout


def test_a_bad_param_fails_in_validate_and_keeps_every_output(repo):
    repo, _ = repo
    before = {name: tree_digest(repo / name) for name in OUTPUTS}
    set_param(repo, "evaluate", "top_m", [0])
    error, stderr = failed_repro(repo)
    assert error.startswith("error: evaluate.top_m:") and "[0]" in error
    assert "'validate'" in stderr  # dvc names the stage that failed
    assert {name: tree_digest(repo / name) for name in OUTPUTS} == before
    write_params(repo, IMPORT)
    assert status(repo) == set()  # nothing to redo: no output was lost

    set_param(repo, "evaluate", "seed", 1)  # a valid change re-runs validate, whose marker does not change
    assert status(repo) == {"validate", "evaluate"}
    repo_run(repo, "dvc", "repro", "validate")
    assert status(repo) == {"evaluate"}
    write_params(repo, IMPORT)
    repo_run(repo, "dvc", "repro", "validate")
    assert status(repo) == set()


def test_an_input_outside_inputs_is_a_one_line_error(repo):
    repo, _ = repo
    traces = tree_digest(repo / "data" / "traces")
    set_param(repo, "collect", "import", "routing/*.jsonl")
    error, stderr = failed_repro(repo)
    assert error.startswith("error: collect.import: 'routing/*.jsonl' is outside inputs/") and "'collect'" in stderr
    assert tree_digest(repo / "data" / "traces") == traces
    write_params(repo, IMPORT)
    assert "Running stage 'collect'" not in repo_run(repo, "dvc", "repro")  # validate only: it had passed the bad glob
    assert status(repo) == set()


def test_editing_an_input_file_reruns_collect(repo):
    repo, _ = repo
    traces = lock_outputs(repo)["data/traces"]
    records = good_records(sequences=30)
    records[0]["weights"] = [0.9, 0.1]
    write_records(records_file(repo), records)
    assert status(repo) == {"collect"}
    assert "Running stage 'collect'" in repo_run(repo, "dvc", "repro")
    assert lock_outputs(repo)["data/traces"] != traces
    assert status(repo) == set()
