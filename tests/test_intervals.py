"""Document-level bootstrap intervals: hand-computed resample statistics and the evaluate stage's interval keys."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_error, read_shard_tables, tiny_params
from moe_prefetch.evaluation.intervals import (
    bootstrap_report,
    difference_interval,
    percentile_interval,
    pooled_ratios,
    resample_weights,
)
from moe_prefetch.evaluation.metrics import RankingAccumulator
from moe_prefetch.traces import read_routing
from moe_prefetch.windows.build import window_documents
from moe_prefetch.windows.data import read_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import update_readme  # noqa: E402


def ratio_interval(hits, counts, resamples=1000, seed=0) -> list[float]:
    weights = resample_weights(len(hits), resamples, seed)
    return percentile_interval(pooled_ratios(np.array(hits), np.array(counts), weights))


def test_resample_weights_draw_every_resample_from_all_documents():
    weights = resample_weights(5, 200, seed=3)
    assert weights.shape == (200, 5) and (weights.sum(axis=1) == 5).all() and weights.min() >= 0
    assert np.array_equal(weights, resample_weights(5, 200, seed=3))
    assert not np.array_equal(weights, resample_weights(5, 200, seed=4))
    assert (weights == 0).any()  # with replacement: some document is left out of some resample


def test_one_document_gives_a_zero_width_interval_at_the_point_estimate():
    assert ratio_interval([3.0], [4.0]) == [0.75, 0.75]


def test_two_documents_at_0_and_1_span_the_unit_interval():
    hits, counts = [0.0, 5.0], [5.0, 5.0]
    assert sum(hits) / sum(counts) == 0.5  # the point estimate over all windows
    # A resample draws both documents as (0, 0), (0, 1), (1, 0) or (1, 1): statistic 0 and 1 each with chance 1/4,
    # so the 2.5th and 97.5th percentiles of 1000 resamples are 0 and 1.
    assert ratio_interval(hits, counts) == [0.0, 1.0]


def test_the_statistic_is_the_pooled_ratio_not_the_mean_of_document_ratios():
    hits, counts = np.array([1.0, 0.0]), np.array([1.0, 3.0])  # document ratios 1 and 0
    weights = np.array([[2, 0], [1, 1], [0, 2]])
    # (1, 1): (1 + 0) / (1 + 3) = 0.25; the mean of the document ratios would be 0.5.
    assert pooled_ratios(hits, counts, weights).tolist() == [1.0, 0.25, 0.0]


def test_resamples_without_a_qualifying_window_are_left_out():
    hits, counts = np.array([0.0, 2.0]), np.array([0.0, 4.0])  # document 0 has no window counted for the metric
    statistics = pooled_ratios(hits, counts, np.array([[2, 0], [1, 1], [0, 2]]))
    assert np.isnan(statistics[0]) and statistics[1:].tolist() == [0.5, 0.5]
    assert percentile_interval(statistics) == [0.5, 0.5]
    assert all(np.isnan(percentile_interval(np.array([np.nan, np.nan]))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intervals_contain_the_point_estimate_and_repeat_with_the_seed(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(20, 200, size=15).astype(float)
    hits = np.floor(counts * rng.uniform(0.3, 0.8, size=15))
    lo, hi = ratio_interval(hits, counts, seed=seed)
    assert lo <= hits.sum() / counts.sum() <= hi and lo < hi
    assert ratio_interval(hits, counts, seed=seed) == [lo, hi]


def test_bad_bootstrap_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="resamples must be >= 1, got 0"):
        resample_weights(3, 0, seed=0)
    with pytest.raises(ValueError, match="need at least 1 document, got 0"):
        resample_weights(0, 10, seed=0)
    with pytest.raises(ValueError, match=r"must both be \(2,\)"):
        pooled_ratios(np.zeros(3), np.zeros(3), np.ones((4, 2)))
    assert_error(lambda: tiny_params("evaluate", bootstrap_resamples=0), "evaluate.bootstrap_resamples", "> 0", "got 0")


# E = 2, k = 1, four windows in documents [0, 0, 1, 1], all with target expert 0.
# "good" ranks expert 0 first on windows 0, 1, 2 (top-1 3/4); "bad" only on window 2 (top-1 1/4).
DOCUMENTS = np.array([0, 0, 1, 1])
TARGETS = np.zeros((4, 1), dtype=np.int64)
GOOD = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
BAD = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])


def accumulator(scores: np.ndarray) -> RankingAccumulator:
    result = RankingAccumulator([1], num_experts=2, k=1)
    result.update(scores, TARGETS, {"document": DOCUMENTS})
    return result


def test_group_totals_are_the_per_document_sums_and_counts():
    codes, sums, counts = accumulator(GOOD).group_totals("document")
    top1 = accumulator(GOOD).names.index("top1")
    assert codes.tolist() == [0, 1] and sums[:, top1].tolist() == [2.0, 1.0] and counts[:, top1].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="unknown group breakdown 'sequence'"):
        accumulator(GOOD).group_totals("sequence")


def test_paired_difference_resamples_the_same_documents():
    good, bad = accumulator(GOOD), accumulator(BAD)
    # Per document, good - bad on top-1 is 2/2 - 0/2 = 1 (document 0) and 1/2 - 1/2 = 0 (document 1); both have
    # 2 windows, so a resample's difference is (number of draws of document 0) / 2: 0, 0.5 or 1.
    weights = np.array([[2, 0], [1, 1], [0, 2]])
    assert difference_interval(good, good, "top1", weights) == [0.0, 0.0]
    assert difference_interval(good, bad, "top1", weights) == pytest.approx([0.025, 0.975])  # linear quantiles of [0, 0.5, 1]
    report = bootstrap_report({"predictor": bad, "good": good, "same": accumulator(BAD)}, resamples=1000, seed=0)
    difference = report["predictor_minus_best_baseline_top1"]
    assert difference["best_baseline"] == "good" and difference["difference"] == pytest.approx(0.25 - 0.75)
    assert difference["ci95"] == [-1.0, 0.0]  # statistic -1 and 0 each with chance 1/4
    assert report["documents"] == 2 and report["resamples"] == 1000
    assert report["per_scorer"]["predictor"] == report["per_scorer"]["same"]


def test_scorers_fed_different_documents_are_refused():
    other = RankingAccumulator([1], num_experts=2, k=1)
    other.update(GOOD, TARGETS, {"document": np.array([0, 0, 0, 2])})
    with pytest.raises(ValueError, match="fed different documents"):
        bootstrap_report({"predictor": accumulator(GOOD), "other": other}, resamples=10, seed=0)


def test_window_documents_follow_the_shards(tiny):
    test = read_windows(tiny.windows, "test")
    routing = read_routing(tiny.shards)
    codes = window_documents(routing, test)
    shards = read_shard_tables(tiny.shards)
    document_of = dict(zip(shards["sequence_id"].to_pylist(), shards["document_id"].to_pylist()))
    documents = sorted({document_of[sequence] for sequence in test.sequence_ids})
    assert len(documents) == tiny.summary["splits"]["test"]["documents"] > 1
    assert [documents[code] for code in codes] == [document_of[test.sequence_ids[s]] for s in test.sequence_index]
    renamed = dataclasses.replace(test, sequence_ids=["no/such/sequence", *test.sequence_ids[1:]])
    assert_error(lambda: window_documents(routing, renamed), "sequence 'no/such/sequence' is not in the shards")


def test_evaluate_writes_an_interval_around_every_scorer_top1(tiny):
    from moe_prefetch.evaluation.evaluate import headline

    metrics = tiny.metrics
    assert metrics["bootstrap"] == {"documents": tiny.summary["splits"]["test"]["documents"], "resamples": 1000}
    for name, result in [("predictor", metrics["predictor"]), *metrics["baselines"].items()]:
        for metric in ("top1", "recall_at_k"):
            lo, hi = result[f"{metric}_ci95"]
            assert 0 <= lo <= result[metric] <= hi <= 1, (name, metric)
        keys = list(result)
        assert keys[keys.index("top1") + 1] == "top1_ci95", name
    difference = metrics["predictor_minus_best_baseline_top1"]
    best = max(metrics["baselines"], key=lambda name: metrics["baselines"][name]["top1"])
    assert difference["best_baseline"] == best
    assert difference["difference"] == pytest.approx(metrics["predictor"]["top1"] - metrics["baselines"][best]["top1"], abs=2e-6)
    lo, hi = difference["ci95"]
    assert lo <= difference["difference"] <= hi
    numbers = headline(metrics)["headline"]
    assert [numbers["predictor_minus_best_baseline_top1_ci95_low"], numbers["predictor_minus_best_baseline_top1_ci95_high"]] == [lo, hi]


def test_readme_results_table_shows_the_intervals(tiny):
    section = update_readme.results_section(tiny.metrics)
    predictor = tiny.metrics["predictor"]
    lo, hi = predictor["top1_ci95"]
    row = next(line for line in section.splitlines() if line.startswith("| predictor |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == f"{100 * predictor['top1']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert cells[2] == f"{100 * predictor['top3']:.1f}%"  # top-3 has no interval
    assert cells[5].startswith(f"{100 * predictor['recall_at_k']:.1f}% [")
    assert "Predictor minus the best baseline" in section
    without = {**tiny.metrics, "predictor": {k: v for k, v in predictor.items() if not k.endswith("_ci95")}}
    del without["predictor_minus_best_baseline_top1"]
    section = update_readme.results_section(without)
    assert f"| predictor | {100 * predictor['top1']:.1f}% |" in section and "Predictor minus" not in section
