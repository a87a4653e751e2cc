"""Information bounds on how well a discrete context X can predict a discrete target Y (K classes).

Directions matter:
  * Fano gives an UPPER bound on the top-1 accuracy of ANY predictor of Y from X.
  * 2^-H(Y|X) is a LOWER bound on the Bayes accuracy E_x max_y p(y|x) (min-entropy <= Shannon
    entropy, then Jensen). It is NOT an upper bound on anything.
All entropies are in bits and estimated from counts, so they inherit the estimators' bias:
the plug-in H(Y|X) is biased low when contexts have few samples (making Fano looser-high and
2^-H optimistic); Miller-Madow removes the first-order part of that bias.
"""

from __future__ import annotations

import math

import numpy as np

FANO_TOLERANCE = 1e-9


def binary_entropy_bits(p: float) -> float:
    """h(p) = -p log2 p - (1-p) log2 (1-p), with 0 log 0 = 0."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def fano_entropy_bits(accuracy: float, num_classes: int) -> float:
    """Right side of Fano: the most conditional entropy a predictor with this accuracy allows."""
    error = 1.0 - accuracy
    return binary_entropy_bits(error) + error * math.log2(num_classes - 1)


def fano_top1_upper_bound(h_bits: float, num_classes: int) -> float:
    """Largest accuracy a in [1/K, 1] with Fano's h(1-a) + (1-a) log2(K-1) >= h_bits.

    An UPPER bound on any predictor's top-1 accuracy when H(Y|X) = h_bits. The right side
    decreases monotonically in a on [1/K, 1] (from log2 K to 0), so bisection finds the root;
    the upper end of the final bracket is returned so the value stays a valid upper bound.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == 1 or h_bits <= 0.0:
        return 1.0
    chance = 1.0 / num_classes
    if h_bits >= math.log2(num_classes):
        return chance
    low, high = chance, 1.0  # invariant: fano(low) >= h_bits > fano(high)
    while high - low > FANO_TOLERANCE:
        middle = 0.5 * (low + high)
        if fano_entropy_bits(middle, num_classes) >= h_bits:
            low = middle
        else:
            high = middle
    return high


def _check_codes(context_codes: np.ndarray, target_codes: np.ndarray, num_classes: int) -> None:
    """Raise ValueError on mismatched, empty or out-of-range code arrays."""
    if context_codes.ndim != 1 or context_codes.shape != target_codes.shape:
        raise ValueError(f"context {context_codes.shape} and target {target_codes.shape} must be equal 1-D shapes")
    if context_codes.size == 0:
        raise ValueError("need at least one sample")
    if num_classes < 1 or target_codes.min() < 0 or target_codes.max() >= num_classes:
        raise ValueError(f"target codes must lie in [0, {num_classes - 1}] with num_classes >= 1")


def _sum_n_log2_n(counts: np.ndarray) -> float:
    """sum of c * log2(c) over positive counts."""
    counts = counts.astype(np.float64)
    return float(np.sum(counts * np.log2(counts)))


def conditional_entropy_bounds(
    context_codes: np.ndarray, target_codes: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Entropy estimates of H(Y|X) and the accuracy bounds they imply, from N paired codes.

    Returns:
      h_plugin_bits: plug-in H(Y|X) from the empirical joint counts.
      h_miller_madow_bits: plug-in + (nonzero cells - contexts) / (2 N ln 2).
      fano_top1_upper_bound: Fano UPPER bound on any predictor's accuracy, using the
        Miller-Madow H (the less biased estimate; it can still err in either direction).
      fano_top1_upper_bound_plugin: the same with plug-in H. Guaranteed >= empirical_bayes_top1,
        since the lookup's in-sample accuracy obeys Fano under the empirical distribution.
      bayes_top1_lower_bound: 2^-H_plugin, a LOWER bound on the Bayes accuracy (guaranteed
        <= empirical_bayes_top1 in sample).
      empirical_bayes_top1: sum over contexts of the max class count / N, the accuracy of a
        lookup table fit on these same samples: an optimistic ceiling for this context.
      contexts, samples, samples_per_context_mean, samples_per_context_median,
      singleton_context_share (share of samples whose context occurs exactly once).
    """
    context_codes = np.asarray(context_codes, dtype=np.int64)
    target_codes = np.asarray(target_codes, dtype=np.int64)
    _check_codes(context_codes, target_codes, num_classes)
    samples = context_codes.size
    _, context_index, context_counts = np.unique(context_codes, return_inverse=True, return_counts=True)
    cell_ids = context_index.astype(np.int64) * num_classes + target_codes  # (N,) one id per (x, y)
    unique_cells, cell_counts = np.unique(cell_ids, return_counts=True)
    # H(Y|X) = H(X,Y) - H(X) = (sum_x n_x log n_x - sum_xy n_xy log n_xy) / N; clip float round-off.
    h_plugin = max(0.0, (_sum_n_log2_n(context_counts) - _sum_n_log2_n(cell_counts)) / samples)
    h_miller_madow = h_plugin + (unique_cells.size - context_counts.size) / (2.0 * samples * math.log(2.0))
    # Cells come out sorted by id, so each context's cells are contiguous: reduceat takes its max.
    cell_context = unique_cells // num_classes  # (C,)
    context_starts = np.flatnonzero(np.r_[True, cell_context[1:] != cell_context[:-1]])
    max_class_counts = np.maximum.reduceat(cell_counts, context_starts)  # (contexts,)
    return {
        "h_plugin_bits": h_plugin,
        "h_miller_madow_bits": h_miller_madow,
        "fano_top1_upper_bound": fano_top1_upper_bound(h_miller_madow, num_classes),
        "fano_top1_upper_bound_plugin": fano_top1_upper_bound(h_plugin, num_classes),
        "bayes_top1_lower_bound": 2.0 ** -h_plugin,
        "empirical_bayes_top1": float(max_class_counts.sum() / samples),
        "contexts": float(context_counts.size),
        "samples": float(samples),
        "samples_per_context_mean": float(context_counts.mean()),
        "samples_per_context_median": float(np.median(context_counts)),
        "singleton_context_share": float(context_counts[context_counts == 1].sum() / samples),
    }
