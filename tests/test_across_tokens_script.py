"""scripts/run_across_tokens.py: the experiments it runs (windows.across_tokens at h = 1 and h = L), the summary it
writes next to the default run, and the README section `across-tokens` it renders, on fake evaluate metrics."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import run_across_tokens  # noqa: E402
from test_hidden_state import scorer  # noqa: E402


def fake_metrics(horizon: int, layers: range, across: bool) -> dict:
    """evaluate metrics: lookup best on top-1, token on recall@k; per layer, token ahead of the predictor at the
    first layer only."""
    profiles = {"pcie": {"predictor_speedup_vs_on_demand": 0.95, "predictor_evict_speedup_vs_on_demand": 0.96,
                         "predictor_gated_speedup_vs_on_demand": 1.0, "ideal_speedup_vs_on_demand": 1.4},
                "cpu": {"predictor_speedup_vs_on_demand": 1.45, "predictor_evict_speedup_vs_on_demand": 1.46,
                        "predictor_gated_speedup_vs_on_demand": 1.46, "ideal_speedup_vs_on_demand": 17.5}}
    return {
        "test_windows": 1000 * len(layers),
        "data": {"horizon": horizon, "context_length": 3, **({"across_tokens": True} if across else {})},
        "bootstrap": {"documents": 15, "resamples": 1000},
        "predictor": {"arch_parameters": 500, **scorer(0.66, 0.70)},
        "baselines": {"random": scorer(0.9, 0.9), "lookup": scorer(0.60, 0.55), "token": scorer(0.58, 0.65)},
        "predictor_minus_best_baseline_top1": {"best_baseline": "lookup", "difference": 0.06, "ci95": [0.01, 0.08]},
        "per_layer": {f"layer_{t}": {"predictor": 0.7, "random": 0.99, "lookup": 0.6, "token": 0.8 if t == layers[0] else 0.5}
                      for t in reversed(layers)},
        "cache_by_profile": profiles,
    }


def test_commands_turn_across_tokens_on_with_each_variants_overrides():
    assert run_across_tokens.command("across-h1") == ["dvc", "exp", "run", "--temp", "-n", "across-h1", "-S",
                                                      "windows.across_tokens=true"]
    assert run_across_tokens.command("across-h8")[-2:] == ["-S", "windows.horizon=8"]


def test_summary_and_section_put_every_run_next_to_the_default():
    default = run_across_tokens.run_summary(fake_metrics(1, range(3, 8), False), None, None)
    across = run_across_tokens.run_summary(fake_metrics(1, range(0, 8), True), run_across_tokens.command("across-h1"), 330.0)
    assert "command" not in default and across["experiment"] == "across-h1" and across["across_tokens"] is True
    # random is no baseline to beat; the best is chosen per metric and per layer
    assert (across["best_baseline"]["top1"]["name"], across["best_baseline"]["recall_at_k"]["name"]) == ("lookup", "token")
    assert [row["layer"] for row in across["per_layer"]] == list(range(8))
    assert across["per_layer"][0] == {"layer": 0, "predictor": 0.7, "best_baseline": "token", "best_baseline_top1": 0.8}
    assert across["cache_by_profile"]["cpu"] == {"predictor": 1.45, "predictor_evict": 1.46, "predictor_gated": 1.46, "ideal": 17.5}
    section = run_across_tokens.across_tokens_section({"default": default, "variants": {"across-h1": across}})
    lines = section.splitlines()
    assert next(line for line in lines if line.startswith("| `across-h1` | 1 |")) == (
        "| `across-h1` | 1 | 0..7 | 66.0% [64.0, 67.0] | lookup 60.0% [58.0, 61.0] | +6.0 [+1.0, +8.0] | 70.0% [67.0, 72.0] | "
        "token 65.0% [62.0, 67.0] | 8,000 | 5.5 |")
    assert "| `default (across_tokens off)` | - | - | - | 70.0 / 80.0 | 70.0 / 60.0 |" in section
    assert "| `across-h1` | predictor_gated | 1.000x | 1.460x |" in section and "| every run | ideal | 1.400x | 17.500x |" in section


def test_no_run_summarises_the_finished_experiments_with_the_given_wall_times(tmp_path, monkeypatch):
    summary_file, default_file = tmp_path / "across_tokens.json", tmp_path / "evaluate.json"
    default_file.write_text(json.dumps(fake_metrics(1, range(3, 8), False)))
    monkeypatch.setattr(run_across_tokens, "SUMMARY", summary_file)
    monkeypatch.setattr(run_across_tokens, "DEFAULT", default_file)
    monkeypatch.setattr(run_across_tokens, "experiment_metrics",
                        lambda name: fake_metrics(int(name.split("-h")[1]), range(0, 8), True))
    monkeypatch.setattr(run_across_tokens, "timed_run", lambda run: pytest.fail("--no-run ran an experiment"))

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["run_across_tokens.py", "--no-run", *args])
        run_across_tokens.main()
        return json.loads(summary_file.read_text())

    first = main("--only", "across-h8", "--wall-seconds", "across-h8=312")
    assert list(first["variants"]) == ["across-h8"] and first["variants"]["across-h8"]["wall_seconds"] == 312.0
    both = main("--only", "across-h1")
    assert list(both["variants"]) == ["across-h1", "across-h8"] and both["variants"]["across-h8"]["wall_seconds"] == 312.0
    with pytest.raises(SystemExit):
        main("--only", "across-h1", "--wall-seconds", "across-h8=10")
