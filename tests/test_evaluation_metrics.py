"""Hand-computed checks of the streaming ranking and calibration metrics."""

from __future__ import annotations


import numpy as np
import pytest


from moe_prefetch.evaluation.metrics import CalibrationAccumulator, RankingAccumulator, rank_positions  # noqa: E402

# E = 4, k = 2. Predicted rankings (stable on -score, ties to the lower id):
#   row 0: [1, 2, 3, 0]   targets [1, 2]   top1 hit; top-2 {1,2} == routed -> recall 1, exact, overlap
#   row 1: [0, 1, 3, 2]   targets [1, 3]   (0 and 1 tie -> 0 first) expert 1 at rank 1: top1 miss, top2 hit;
#                                          top-2 {0,1} ∩ {1,3} = {1} -> recall 0.5; top-4 -> recall_2k 1
#   row 2: [0, 1, 2, 3]   targets [-1, 3]  no top-1 target (excluded from top-m); recall 0, recall_2k 1,
#                                          not a full set (excluded from exact), no overlap
#   row 3: any            targets [-1, -1] excluded from everything
#   row 4: [0, 3, 1, 2]   targets [2, 1]   expert 2 at rank 3: misses top1..3; recall 0, recall_2k 1, no overlap
SCORES = np.array([
    [0.1, 0.4, 0.3, 0.2],
    [0.5, 0.5, 0.0, 0.1],
    [0.0, 0.0, 0.0, 0.0],
    [0.3, 0.2, 0.1, 0.0],
    [0.9, 0.0, 0.0, 0.8],
])
TARGETS = np.array([[1, 2], [1, 3], [-1, 3], [-1, -1], [2, 1]])
EXPECTED = {
    "top1": 1 / 3, "top2": 2 / 3, "top3": 2 / 3, "top8": 1.0,  # rows 0, 1, 4; m = 8 clips to E = 4
    "recall_at_k": 1.5 / 4, "recall_at_2k": 1.0,  # rows 0, 1, 2, 4
    "exact_set": 1 / 3,  # rows 0, 1, 4
    "any_overlap": 0.5, "windows": 4.0,
}


def _assert_metrics(result: dict[str, float], expected: dict[str, float]) -> None:
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value), name


def test_rank_positions_breaks_ties_by_lower_expert_id() -> None:
    positions = rank_positions(np.array([[0.5, 0.5, 0.0, 0.1]]))
    assert positions.tolist() == [[0, 1, 3, 2]]
    # Wide rows, where an unstable sort would reorder ties: three score levels over 60 experts.
    scores = np.array([[1.0, 0.0, 2.0] * 20])  # (1, 60)
    ranking = np.argsort(rank_positions(scores)[0])
    expected = list(range(2, 60, 3)) + list(range(0, 60, 3)) + list(range(1, 60, 3))
    assert ranking.tolist() == expected


def test_ranking_metrics_on_hand_computed_rows() -> None:
    accumulator = RankingAccumulator(topk=[1, 2, 3, 8], num_experts=4, k=2)
    accumulator.update(SCORES, TARGETS)
    _assert_metrics(accumulator.result(), EXPECTED)


def test_streaming_in_batches_matches_one_batch() -> None:
    accumulator = RankingAccumulator(topk=[1, 2, 3, 8], num_experts=4, k=2)
    accumulator.update(SCORES[:2], TARGETS[:2])
    accumulator.update(SCORES[2:], TARGETS[2:])
    _assert_metrics(accumulator.result(), EXPECTED)


def test_group_breakdown() -> None:
    accumulator = RankingAccumulator(topk=[1, 2], num_experts=4, k=2)
    layer = np.array([0, 0, 1, 1, 1])
    accumulator.update(SCORES[:3], TARGETS[:3], groups={"layer": layer[:3]})
    accumulator.update(SCORES[3:], TARGETS[3:], groups={"layer": layer[3:]})
    by_layer = accumulator.result_by_group("layer")
    assert sorted(by_layer) == [0, 1]
    _assert_metrics(by_layer[0], {
        "top1": 0.5, "top2": 1.0, "recall_at_k": 0.75, "recall_at_2k": 1.0,
        "exact_set": 0.5, "any_overlap": 1.0, "windows": 2.0,
    })
    _assert_metrics(by_layer[1], {
        "top1": 0.0, "top2": 0.0, "recall_at_k": 0.0, "recall_at_2k": 1.0,  # top-m only row 4
        "exact_set": 0.0, "any_overlap": 0.0, "windows": 2.0,
    })
    with pytest.raises(ValueError, match="domain"):
        accumulator.result_by_group("domain")


def test_group_names_must_not_change_between_batches() -> None:
    accumulator = RankingAccumulator(topk=[1], num_experts=4, k=2)
    accumulator.update(SCORES[:2], TARGETS[:2], groups={"layer": np.array([0, 1])})
    with pytest.raises(ValueError, match="group names"):
        accumulator.update(SCORES[2:], TARGETS[2:])


def test_empty_accumulator_gives_nan_rates() -> None:
    result = RankingAccumulator(topk=[1], num_experts=4, k=2).result()
    assert np.isnan(result["top1"]) and result["windows"] == 0.0


@pytest.mark.parametrize(
    "targets, message",
    [(np.array([[1, 1]]), "repeats"), (np.array([[4, 0]]), r"\[-1, 3\]"), (np.array([[1]]), "shape")],
)
def test_bad_targets_are_rejected(targets: np.ndarray, message: str) -> None:
    accumulator = RankingAccumulator(topk=[1], num_experts=4, k=2)
    with pytest.raises(ValueError, match=message):
        accumulator.update(np.zeros((1, 4)), targets)


def test_calibration_on_hand_computed_rows() -> None:
    accumulator = CalibrationAccumulator(bins=10)
    accumulator.update(np.array([0.95, 0.95]), np.array([True, False]))
    accumulator.update(np.array([0.15, 0.55]), np.array([False, True]))
    result = accumulator.result()
    # bins: [0.9,1] conf .95 acc .5 n=2; [0.1,0.2) conf .15 acc 0 n=1; [0.5,0.6) conf .55 acc 1 n=1
    # ece = (2 * .45 + .15 + .45) / 4 = .375
    assert result["ece"] == pytest.approx(0.375)
    # brier = (.05^2 + .95^2 + .15^2 + .45^2) / 4 = 1.13 / 4
    assert result["brier"] == pytest.approx(0.2825)
    assert result["accuracy"] == pytest.approx(0.5) and result["count"] == 4.0
    reliability = accumulator.reliability()
    assert [(row["bin_lower"], row["count"]) for row in reliability] == [(0.1, 1.0), (0.5, 1.0), (0.9, 2.0)]
    assert reliability[2]["accuracy"] == pytest.approx(0.5)
    assert reliability[2]["mean_confidence"] == pytest.approx(0.95)
    assert reliability[2]["bin_upper"] == pytest.approx(1.0)


def test_coverage_curve_keeps_most_confident_rows() -> None:
    accumulator = CalibrationAccumulator()
    accumulator.update(np.array([0.95, 0.95, 0.15, 0.55]), np.array([True, False, False, True]))
    curve = accumulator.coverage_curve([0.25, 0.5, 0.75, 1.0])
    # 0.25 -> row 0 only (stable tie-break keeps the earlier 0.95); 0.5 -> both 0.95 rows; 0.75 adds 0.55
    assert [row["accuracy"] for row in curve] == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert [row["threshold"] for row in curve] == pytest.approx([0.95, 0.95, 0.55, 0.15])
    with pytest.raises(ValueError, match="coverage"):
        accumulator.coverage_curve([0.0])


def test_perfect_calibration_and_edge_confidences() -> None:
    accumulator = CalibrationAccumulator(bins=4)
    accumulator.update(np.array([0.75] * 4 + [1.0, 0.0]), np.array([True, True, True, False, True, False]))
    # 0.75 and 1.0 share the last bin [0.75, 1]: conf (3 + 1) / 5 = .8, acc 4/5 -> gap 0; 0.0 -> bin 0, gap 0
    assert accumulator.result()["ece"] == pytest.approx(0.0)
    assert [row["count"] for row in accumulator.reliability()] == [1.0, 5.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        accumulator.update(np.array([1.5]), np.array([True]))
