"""The stale gate baseline is scored wherever the windows carry it: in `baselines` and at every horizon of
`per_horizon` up to the captured look-ahead, on synthetic shards with a stale gate (moe_prefetch/synthetic.py)."""

from __future__ import annotations

import dataclasses

import pytest

from moe_prefetch.evaluation.baselines import baseline_scorers
from moe_prefetch.evaluation.evaluate import HORIZON_METRICS, per_horizon, rank_all
from moe_prefetch.params import parse_section
from moe_prefetch.synthetic import STALE_GATE_HIT, write_synthetic_shards
from moe_prefetch.windows.build import build_windows
from moe_prefetch.windows.data import read_summary, read_windows


def test_stale_gate_is_scored_in_baselines_and_per_horizon_up_to_the_lookahead(tmp_path) -> None:
    shards, windows_dir = tmp_path / "shards", tmp_path / "windows"
    write_synthetic_shards(shards, 3000, chunks_per_document=1, lookahead=2)  # tiny-moe's geometry: 8 MoE layers
    windows_dir.mkdir()
    build_windows(shards, windows_dir, parse_section("windows", {}))  # c = 3, h = 1
    summary = read_summary(windows_dir)
    train, val, test = (read_windows(windows_dir, split) for split in ("train", "val", "test"))
    assert summary["has_stale_gate"] and "stale_gate" in baseline_scorers(train, summary, val=val)
    params = dataclasses.replace(parse_section("evaluate", {}), max_horizon=3)
    # h = 1 is the stage's own horizon: its rows are the stage's results, as the evaluate stage passes them.
    own = rank_all(baseline_scorers(train, summary, val=val), test, params, summary)
    results = {"predictor": dict.fromkeys(HORIZON_METRICS, 0.5), **{name: acc.result() for name, acc in own.items()}}
    by_horizon = per_horizon(params, shards, summary, results)
    assert by_horizon["h1"]["predictor"]["top1"] == 0.5 and by_horizon["h1"]["test_windows"] == len(test)
    assert "stale_gate" in by_horizon["h1"] and "stale_gate" in by_horizon["h2"]
    assert "stale_gate" not in by_horizon["h3"]  # h = 3 > lookahead 2: not captured
    for h in ("h1", "h2"):  # the synthetic stale gate is the true set in STALE_GATE_HIT of the windows, else a guess
        assert by_horizon[h]["stale_gate"]["top1"] == pytest.approx(STALE_GATE_HIT, abs=0.1)
        assert by_horizon[h]["stale_gate"]["top1"] > by_horizon[h]["lookup"]["top1"]
