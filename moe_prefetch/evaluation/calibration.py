"""Calibrated probabilities of use from a scorer's scores, for the expert-cache replay's gate and predicted
eviction: P(the target layer uses expert e | the scorer gave e score s), fit on held-out (val) windows.

The fit is histogram binning made isotonic: the (window, expert) scores are cut into `bins` equal-count bins
(quantile edges), each bin's rate of use is its used pairs over its pairs, and adjacent bins whose rates decrease
are pooled (pool adjacent violators) so that a higher score never maps to a lower probability. A score maps to
its bin's rate; scores outside the fitted range map to the first or last bin's. `used_mask` builds the targets
from windows' target experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """A monotone step map from scores to P(used): bin i covers scores below edges[i] (the last bin, the rest)."""

    edges: np.ndarray  # (bins - 1,) upper score edges of every bin but the last
    rates: np.ndarray  # (bins,) P(used) of each bin, non-decreasing

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """P(used) for each score (any shape)."""
        return self.rates[np.searchsorted(self.edges, scores, side="right")]


def used_mask(target_experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, E) bool: the experts each window's target layer uses (target_experts (N, k), -1 = none)."""
    used = np.zeros((len(target_experts), num_experts), dtype=bool)
    rows, slots = np.nonzero(target_experts >= 0)
    used[rows, target_experts[rows, slots]] = True
    return used


def fit_calibration(scores: np.ndarray, used: np.ndarray, bins: int = 20) -> Calibration:
    """Fit the isotonic histogram map of `scores` (N, E) against `used` (N, E) bool (module docstring)."""
    scores, used = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(used, dtype=bool).ravel()
    if scores.shape != used.shape or not scores.size:
        raise ValueError(f"need scores and used of one non-empty shape, got {scores.shape} and {used.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    # Edges are scores themselves (inverted CDF), so every bin but the first holds its lower edge; a repeated
    # quantile collapses to one edge, and an empty first bin (ties at the minimum) merges into the next.
    edges = np.unique(np.quantile(scores, np.arange(1, bins) / bins, method="inverted_cdf"))
    if edges.size and not (scores < edges[0]).any():
        edges = edges[1:]
    index = np.searchsorted(edges, scores, side="right")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(np.float64)
    hits = np.bincount(index, weights=used, minlength=len(edges) + 1)
    # Pool adjacent violators over the bins: blocks of (hits, count), merged while a block's rate exceeds the next.
    blocks: list[list[float]] = []  # [hits, count, bins merged]
    for bin_hits, bin_count in zip(hits, counts):
        blocks.append([bin_hits, bin_count, 1])
        while len(blocks) > 1 and _rate(blocks[-2]) > _rate(blocks[-1]):
            last = blocks.pop()
            blocks[-1] = [blocks[-1][0] + last[0], blocks[-1][1] + last[1], blocks[-1][2] + last[2]]
    rates = np.concatenate([np.full(int(merged), _rate([h, c, merged])) for h, c, merged in blocks])
    return Calibration(edges, rates)


def _rate(block: list[float]) -> float:
    """A block's rate of use (every bin holds at least one score)."""
    return block[0] / block[1]
