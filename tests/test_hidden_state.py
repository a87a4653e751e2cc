"""scripts/run_hidden_state.py: the experiments it runs (hidden_mlp vs the stale gate at h = 1..4), the summary it
writes from their metrics, and the README section `hidden-state` it renders, on fake evaluate metrics."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import run_hidden_state  # noqa: E402


def scorer(top1: float, recall: float) -> dict:
    return {"top1": top1, "top1_ci95": [top1 - 0.02, top1 + 0.01], "top5": 0.9, "recall_at_k": recall,
            "recall_at_k_ci95": [recall - 0.03, recall + 0.02]}


def fake_metrics(horizon: int, best: str = "stale_gate") -> dict:
    """evaluate metrics of a hidden_mlp run at `horizon`: lookup best on top-1 among the routing baselines, token on
    recall@k; the paired difference is against `best` (evaluate's best baseline on top-1)."""
    baselines = {"random": scorer(0.06, 0.12), "frequency": scorer(0.10, 0.40), "lookup": scorer(0.55, 0.60),
                 "token": scorer(0.50, 0.65), "stale_gate": scorer(0.60, 0.58)}
    return {
        "test_windows": 40000, "data": {"horizon": horizon, "context_length": 3},
        "bootstrap": {"documents": 15, "resamples": 1000},
        "predictor": {"arch_parameters": 13000, **scorer(0.65, 0.70)},
        "baselines": baselines,
        "predictor_minus_best_baseline_top1": {"best_baseline": best, "difference": 0.65 - baselines[best]["top1"],
                                               "ci95": [0.01, 0.08]},
    }


def test_command_runs_hidden_mlp_with_the_stale_gate_captured_and_a_quick_evaluate():
    run = run_hidden_state.command(3)
    assert run[:6] == ["dvc", "exp", "run", "--temp", "-n", "hidden-h3"]
    overrides = [run[i + 1] for i, arg in enumerate(run) if arg == "-S"]
    assert overrides == ["collect.capture.hidden_states=true", "collect.capture.lookahead=4", "train.arch=hidden_mlp",
                         "windows.horizon=3", "evaluate.cache.profile_sweep_tokens=0", "evaluate.cache.regime_sweep=[1]",
                         "evaluate.max_horizon=0"]
    assert run_hidden_state.command(2, ("train.hidden_mlp.dropout=0.2",), "hidden-sg-h")[-2:] == ["-S", "train.hidden_mlp.dropout=0.2"]
    assert "hidden-sg-h2" in run_hidden_state.command(2, prefix="hidden-sg-h")


def test_summary_keeps_the_paired_interval_only_when_it_is_against_the_stale_gate():
    runs = {1: (fake_metrics(1), run_hidden_state.command(1), 300.0),
            2: (fake_metrics(2, best="lookup"), run_hidden_state.command(2), None)}
    summary = json.loads(json.dumps(run_hidden_state.summary_of(runs)))  # as written to disk
    one, two = summary["horizons"]["1"], summary["horizons"]["2"]
    assert one["experiment"] == "hidden-h1" and one["wall_seconds"] == 300.0 and two["wall_seconds"] is None
    assert one["hidden_mlp"]["top1_ci95"] == [0.63, 0.66] and one["stale_gate"]["recall_at_k"] == 0.58
    # the best routing baseline excludes the stale gate (it reads the hidden state) and random, per metric
    assert one["best_routing_baseline_top1"]["name"] == "lookup"
    assert one["best_routing_baseline_recall_at_k"]["name"] == "token"
    assert one["hidden_mlp_minus_stale_gate_top1"] == one["predictor_minus_best_baseline_top1"]
    assert two["hidden_mlp_minus_stale_gate_top1"] is None  # evaluate paired the predictor with lookup, not the stale gate
    assert two["predictor_minus_best_baseline_top1"]["best_baseline"] == "lookup"


def test_section_renders_each_horizon_with_intervals_and_says_where_no_paired_interval_exists():
    runs = {1: (fake_metrics(1), run_hidden_state.command(1), 300.0),
            2: (fake_metrics(2, best="lookup"), run_hidden_state.command(2), None)}
    section = run_hidden_state.hidden_state_section({"variants": {"hidden-h": run_hidden_state.summary_of(runs)}})
    row1 = next(line for line in section.splitlines() if line.startswith("| 1 |"))
    assert row1 == ("| 1 | 65.0% [63.0, 66.0] | 60.0% [58.0, 61.0] | lookup 55.0% [53.0, 56.0] | 70.0% [67.0, 72.0] | "
                    "58.0% [55.0, 60.0] | token 65.0% [62.0, 67.0] | +5.0 [+1.0, +8.0] | stale_gate +5.0 [+1.0, +8.0] | "
                    "40,000 / 15 | 5.0 |")
    row2 = next(line for line in section.splitlines() if line.startswith("| 2 |"))
    assert "| - | lookup +10.0 [+1.0, +8.0] |" in row2 and row2.endswith("| - |")
    assert "At h = 2 the stale gate is not the best baseline on top-1" in section
    assert "windows.horizon=<h>" in section and "hidden-h<h>" in section


def test_bad_metrics_are_errors():
    no_stale = fake_metrics(1)
    del no_stale["baselines"]["stale_gate"]
    with pytest.raises(ValueError, match="no stale_gate baseline"):
        run_hidden_state.summary_of({1: (no_stale, run_hidden_state.command(1), None)})
    with pytest.raises(ValueError, match="windows.horizon=2"):
        run_hidden_state.summary_of({1: (fake_metrics(2), run_hidden_state.command(1), None)})
    with pytest.raises(ValueError, match="no experiments"):
        run_hidden_state.summary_of({})
    with pytest.raises(ValueError, match="no variants"):
        run_hidden_state.hidden_state_section({"variants": {}})


def test_no_run_summarises_finished_experiments_and_keeps_other_variants(tmp_path, monkeypatch):
    summary_file = tmp_path / "hidden_state.json"
    monkeypatch.setattr(run_hidden_state, "experiment_metrics", lambda name: fake_metrics(int(name[-1])))
    monkeypatch.setattr(run_hidden_state, "timed_run", lambda run: pytest.fail("--no-run ran an experiment"))

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["run_hidden_state.py", "--no-run", "--summary", str(summary_file), *args])
        run_hidden_state.main()
        return json.loads(summary_file.read_text())

    first = main("--horizons", "1", "2", "--wall-seconds", "2=420")
    assert list(first["variants"]["hidden-h"]["horizons"]) == ["1", "2"]
    assert first["variants"]["hidden-h"]["horizons"]["2"]["wall_seconds"] == 420.0
    both = main("--prefix", "hidden-sg-h", "--horizons", "3", "--set", "train.hidden_mlp.dropout=0.2")
    assert list(both["variants"]) == ["hidden-h", "hidden-sg-h"]
    assert both["variants"]["hidden-h"] == first["variants"]["hidden-h"]
    assert both["variants"]["hidden-sg-h"]["horizons"]["3"]["command"].endswith("-S train.hidden_mlp.dropout=0.2")
    again = main("--horizons", "1")  # the same commands: the recorded wall times are kept
    assert again["variants"]["hidden-h"]["horizons"]["2"]["wall_seconds"] == 420.0
    with pytest.raises(SystemExit):
        main("--horizons", "1", "--wall-seconds", "4=10")


def test_experiment_metrics_reads_the_file_of_the_experiments_commit_with_its_intervals(monkeypatch):
    """`dvc exp show --json` drops list-valued metrics (every _ci95); the summary reads the committed file instead.
    Here the 'experiment' is this repository's HEAD, whose metrics/evaluate.json is the default run's."""
    import experiments
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    shown = {"done": {"rev": head, "data": {"metrics": {"metrics/evaluate.json": {"data": {"test_windows": 1}}}}},
             "failed": {"rev": head, "data": {"metrics": {}}}}
    monkeypatch.setattr(experiments.update_readme, "experiment_revs", lambda: shown)
    monkeypatch.chdir(ROOT)
    committed = json.loads(subprocess.run(["git", "show", "HEAD:metrics/evaluate.json"], cwd=ROOT, capture_output=True,
                                          text=True, check=True).stdout)
    assert experiments.experiment_metrics("done") == committed and "top1_ci95" in committed["predictor"]
    for name in ("failed", "absent"):
        with pytest.raises(SystemExit, match=f"no finished experiment named {name}"):
            experiments.experiment_metrics(name)
