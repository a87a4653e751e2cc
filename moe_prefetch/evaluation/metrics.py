"""Streaming ranking and calibration metrics for expert-routing predictions.

Conventions: N rows (windows), E experts, k experts routed per token.
`target_experts` (N, k) int is best-first by gate weight; -1 means "no expert" and is ignored.
`scores` (N, E) float, higher = more likely; the predicted ranking is a stable argsort of
-scores, so ties go to the lower expert id and results are deterministic.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

NO_EXPERT = -1
DEFAULT_COVERAGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def rank_positions(scores: np.ndarray) -> np.ndarray:
    """Position of every expert in the predicted ranking (0 = best), ties to the lower id. (n, E)."""
    ranking = np.argsort(-scores, axis=1, kind="stable")  # (n, E) expert ids best-first
    positions = np.empty_like(ranking)
    rows = np.arange(scores.shape[0])[:, None]  # (n, 1)
    positions[rows, ranking] = np.arange(scores.shape[1])[None, :]
    return positions


def _check_targets(target_experts: np.ndarray, num_experts: int, k: int, rows: int) -> None:
    """Raise ValueError on a target array of the wrong shape, out-of-range ids or repeated experts."""
    if target_experts.shape != (rows, k):
        raise ValueError(f"target_experts shape {target_experts.shape} != expected {(rows, k)}")
    if target_experts.size and (target_experts.min() < NO_EXPERT or target_experts.max() >= num_experts):
        raise ValueError(f"target_experts must lie in [-1, {num_experts - 1}]")
    ordered = np.sort(target_experts, axis=1)  # (n, k)
    # A top-k router never routes a token twice to one expert; a repeat means a broken trace.
    repeats = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != NO_EXPERT)
    if repeats.any():
        raise ValueError(f"target_experts row {int(np.argmax(repeats.any(axis=1)))} repeats an expert")


class RankingAccumulator:
    """Accumulates top-m accuracy and set metrics over streamed batches, overall and per group.

    Metrics (rates in [0, 1]; nan when no row qualifies):
      top{m}: the highest-weight target expert is within the predicted top-m (m clipped to E);
              rows whose column 0 is -1 are excluded.
      recall_at_k / recall_at_2k: mean over rows of |predicted top-k (top-2k) ∩ routed| / |routed|.
      exact_set: predicted top-k == routed set, over rows with all k targets present.
      any_overlap: predicted top-k meets the routed set.
      windows: rows with at least one routed expert (the rows the recall metrics average over).
    """

    def __init__(self, topk: Sequence[int], num_experts: int, k: int) -> None:
        if num_experts < 1 or not 1 <= k <= num_experts:
            raise ValueError(f"need num_experts >= 1 and 1 <= k <= num_experts, got E={num_experts}, k={k}")
        if not topk or min(topk) < 1:
            raise ValueError(f"topk must be a non-empty list of positive ints, got {list(topk)}")
        self.topk = list(dict.fromkeys(int(m) for m in topk))  # dedupe, keep order
        self.num_experts = num_experts
        self.k = k
        self.names = [f"top{m}" for m in self.topk] + ["recall_at_k", "recall_at_2k", "exact_set", "any_overlap"]
        self._sums = np.zeros(len(self.names))  # (M,) summed per-row values
        self._counts = np.zeros(len(self.names))  # (M,) rows counted per metric
        self._group_names: tuple[str, ...] | None = None
        self._groups: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def _row_metrics(self, scores: np.ndarray, target_experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row metric values and 'row counts for this metric' mask, both (n, M)."""
        n, num_experts = scores.shape
        positions = rank_positions(scores)  # (n, E)
        routed = target_experts != NO_EXPERT  # (n, k)
        routed_count = routed.sum(axis=1)  # (n,)
        safe_targets = np.where(routed, target_experts, 0)  # (n, k) index-safe; masked below
        target_positions = np.take_along_axis(positions, safe_targets, axis=1)  # (n, k)
        has_top1 = routed[:, 0]  # (n,)
        top1_position = target_positions[:, 0]  # (n,)
        in_topk = ((target_positions < self.k) & routed).sum(axis=1)  # (n,)
        in_top2k = ((target_positions < min(2 * self.k, num_experts)) & routed).sum(axis=1)  # (n,)
        denominator = np.maximum(routed_count, 1)  # (n,) avoids 0/0 on rows that are masked out anyway
        any_routed = routed_count > 0  # (n,)
        full_set = routed_count == self.k  # (n,)
        values = [top1_position < min(m, num_experts) for m in self.topk]
        values += [in_topk / denominator, in_top2k / denominator, in_topk == self.k, in_topk > 0]
        masks = [has_top1] * len(self.topk) + [any_routed, any_routed, full_set, any_routed]
        mask = np.stack(masks, axis=1)  # (n, M)
        return np.stack(values, axis=1).astype(np.float64) * mask, mask.astype(np.float64)

    def update(
        self, scores: np.ndarray, target_experts: np.ndarray, groups: dict[str, np.ndarray] | None = None
    ) -> None:
        """Add a batch: scores (n, E), target_experts (n, k), optional group codes name -> (n,) int."""
        scores = np.asarray(scores, dtype=np.float64)
        target_experts = np.asarray(target_experts, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[1] != self.num_experts:
            raise ValueError(f"scores shape {scores.shape} != expected (n, {self.num_experts})")
        _check_targets(target_experts, self.num_experts, self.k, scores.shape[0])
        groups = groups or {}
        names = tuple(sorted(groups))
        # Fixing the breakdown names on the first batch keeps per-group totals comparable to overall ones.
        if self._group_names is None:
            self._group_names = names
        elif names != self._group_names:
            raise ValueError(f"group names {list(names)} differ from earlier batches {list(self._group_names)}")
        values, mask = self._row_metrics(scores, target_experts)  # (n, M) each
        self._sums += values.sum(axis=0)
        self._counts += mask.sum(axis=0)
        for name, codes in groups.items():
            self._add_group(name, np.asarray(codes, dtype=np.int64), values, mask)

    def _add_group(self, name: str, codes: np.ndarray, values: np.ndarray, mask: np.ndarray) -> None:
        """Add per-row values into the per-code totals of breakdown `name`."""
        if codes.shape != (values.shape[0],):
            raise ValueError(f"group '{name}' codes shape {codes.shape} != expected ({values.shape[0]},)")
        unique_codes, inverse = np.unique(codes, return_inverse=True)
        group_sums = np.zeros((len(unique_codes), values.shape[1]))  # (G, M)
        group_counts = np.zeros_like(group_sums)  # (G, M)
        np.add.at(group_sums, inverse, values)
        np.add.at(group_counts, inverse, mask)
        per_code = self._groups.setdefault(name, {})
        for index, code in enumerate(unique_codes.tolist()):
            old_sums, old_counts = per_code.get(code, (0.0, 0.0))
            per_code[code] = (group_sums[index] + old_sums, group_counts[index] + old_counts)

    def _format(self, sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
        """Turn summed values and counts into the metrics dict (nan where nothing was counted)."""
        result = {
            name: float(total / count) if count > 0 else math.nan
            for name, total, count in zip(self.names, sums.tolist(), counts.tolist())
        }
        result["windows"] = float(counts[self.names.index("recall_at_k")])
        return result

    def result(self) -> dict[str, float]:
        """Metrics over every row seen so far."""
        return self._format(self._sums, self._counts)

    def _group(self, name: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        if name not in self._groups:
            raise ValueError(f"unknown group breakdown '{name}', known: {sorted(self._groups)}")
        return self._groups[name]

    def result_by_group(self, name: str) -> dict[int, dict[str, float]]:
        """Metrics per group code of breakdown `name`, codes ascending."""
        per_code = self._group(name)
        return {code: self._format(*per_code[code]) for code in sorted(per_code)}

    def group_totals(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The raw totals of breakdown `name`: codes (G,) ascending, summed values (G, M) and counts (G, M), the
        columns in the order of `names` (what a bootstrap over groups resamples)."""
        per_code = self._group(name)
        codes = sorted(per_code)
        sums = np.array([per_code[code][0] for code in codes]).reshape(len(codes), len(self.names))
        counts = np.array([per_code[code][1] for code in codes]).reshape(len(codes), len(self.names))
        return np.array(codes, dtype=np.int64), sums, counts


class CalibrationAccumulator:
    """Calibration of a confidence score against a correct/incorrect outcome, over streamed batches.

    Bins are equal-width on [0, 1]: bin i holds [i/bins, (i+1)/bins), the last bin also holds 1.0.
    Keeps every (confidence, correct) pair in memory (float64 + bool, 9 bytes a row).
    """

    def __init__(self, bins: int = 10) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self._confidence: list[np.ndarray] = []
        self._correct: list[np.ndarray] = []

    def update(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Add a batch: confidence (n,) in [0, 1], correct (n,) bool."""
        confidence = np.asarray(confidence, dtype=np.float64)
        correct = np.asarray(correct, dtype=bool)
        if confidence.ndim != 1 or correct.shape != confidence.shape:
            raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} must be equal 1-D shapes")
        if not np.all((confidence >= 0.0) & (confidence <= 1.0)):
            raise ValueError("confidence must lie in [0, 1] (nan is not allowed)")
        self._confidence.append(confidence)
        self._correct.append(correct)

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All confidences (N,) and outcomes (N,) seen so far, concatenated once and cached."""
        if len(self._confidence) != 1:
            self._confidence = [np.concatenate(self._confidence) if self._confidence else np.zeros(0)]
            self._correct = [np.concatenate(self._correct) if self._correct else np.zeros(0, dtype=bool)]
        return self._confidence[0], self._correct[0]

    def _bin_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-bin count, summed confidence and summed correct, each (bins,)."""
        confidence, correct = self._pairs()
        bin_index = np.minimum((confidence * self.bins).astype(np.int64), self.bins - 1)  # (N,)
        counts = np.bincount(bin_index, minlength=self.bins).astype(np.float64)
        confidence_sums = np.bincount(bin_index, weights=confidence, minlength=self.bins)
        correct_sums = np.bincount(bin_index, weights=correct.astype(np.float64), minlength=self.bins)
        return counts, confidence_sums, correct_sums

    def result(self) -> dict[str, float]:
        """ece (bin-count-weighted |accuracy - confidence|), brier, accuracy, mean_confidence, count."""
        confidence, correct = self._pairs()
        if confidence.size == 0:
            return {"ece": math.nan, "brier": math.nan, "accuracy": math.nan, "mean_confidence": math.nan, "count": 0.0}
        counts, confidence_sums, correct_sums = self._bin_stats()
        gaps = np.abs(correct_sums - confidence_sums)  # (bins,) = count * |accuracy - mean confidence|
        return {
            "ece": float(gaps.sum() / confidence.size),
            "brier": float(np.mean((confidence - correct) ** 2)),
            "accuracy": float(correct.mean()),
            "mean_confidence": float(confidence.mean()),
            "count": float(confidence.size),
        }

    def reliability(self) -> list[dict[str, float]]:
        """One dict per non-empty bin: bin_lower, bin_upper, mean_confidence, accuracy, count."""
        counts, confidence_sums, correct_sums = self._bin_stats()
        return [
            {
                "bin_lower": index / self.bins,
                "bin_upper": (index + 1) / self.bins,
                "mean_confidence": float(confidence_sums[index] / counts[index]),
                "accuracy": float(correct_sums[index] / counts[index]),
                "count": float(counts[index]),
            }
            for index in np.flatnonzero(counts).tolist()
        ]

    def coverage_curve(self, coverages: Sequence[float] = DEFAULT_COVERAGES) -> list[dict[str, float]]:
        """Accuracy of the most-confident fraction of rows, per coverage level in (0, 1].

        Keeps exactly ceil(coverage * N) rows; among equal confidences the earlier row is kept
        (stable sort), so the curve is deterministic. threshold = confidence of the last kept row.
        """
        confidence, correct = self._pairs()
        order = np.argsort(-confidence, kind="stable")  # (N,) most confident first
        cumulative_correct = np.cumsum(correct[order])  # (N,)
        curve = []
        for coverage in coverages:
            if not 0.0 < coverage <= 1.0:
                raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
            # The epsilon stops 0.3 * 10 = 3.0000000000000004 from rounding up to 4 rows.
            kept = min(confidence.size, max(1, math.ceil(coverage * confidence.size - 1e-9)))
            if confidence.size == 0:
                curve.append({"coverage": float(coverage), "accuracy": math.nan, "threshold": math.nan})
                continue
            curve.append({
                "coverage": float(coverage),
                "accuracy": float(cumulative_correct[kept - 1] / kept),
                "threshold": float(confidence[order[kept - 1]]),
            })
        return curve
