"""Bounds on how well a discrete context X can predict a discrete target Y (K classes), in bits.

What each statement is worth:
  * LOWER bounds on the Bayes accuracy E_x max_y p(y|x) that hold for the true distribution (up to the sampling
    error of a held-out estimate): the held-out top-1 of any classifier that reads X only (the Bayes rule is the
    best such classifier), and 2^-CE for any model q(y|x) with held-out cross-entropy CE = E[-log2 q(Y|X)]:
    E_x max_y p(y|x) >= E_x 2^-H(Y|x) >= 2^-H(Y|X) >= 2^-CE (min-entropy <= Shannon entropy, Jensen, Gibbs).
  * Fano gives an UPPER bound on the top-1 of ANY predictor of Y from X, decreasing in H(Y|X). H is estimated
    from counts: the plug-in H(Y|X) is biased low (E H_plugin <= H by concavity, far below it while contexts
    have few samples), so Fano from the plug-in errs high, i.e. loose; it is guaranteed only for the empirical
    distribution it was computed on, not for the population (a sample's H_plugin can land above the true H).
    Miller-Madow removes the first-order part of the bias and can err either way.
  * 2^-H_plugin is NOT reported: with H biased low it is biased high, so it is no lower bound at all.
`plugin_entropy_by_size` shows how far the plug-in H is from converged: recomputed on growing nested subsets.
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
      fano_top1_upper_bound_plugin: the same with plug-in H: valid for the empirical distribution of these
        samples (so >= empirical_bayes_top1), loose for the population (the plug-in H is biased low).
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
        "empirical_bayes_top1": float(max_class_counts.sum() / samples),
        "contexts": float(context_counts.size),
        "samples": float(samples),
        "samples_per_context_mean": float(context_counts.mean()),
        "samples_per_context_median": float(np.median(context_counts)),
        "singleton_context_share": float(context_counts[context_counts == 1].sum() / samples),
    }


def plugin_entropy_by_size(context_codes: np.ndarray, target_codes: np.ndarray, num_classes: int, sizes: list[int],
                           seed: int) -> dict[int, dict[str, float]]:
    """n -> {h_plugin_bits, h_miller_madow_bits} of H(Y|X) on the first n samples of one seeded random permutation
    (so the subsets are nested), for every n of `sizes` below the N samples given, then for all N. A plug-in H
    still rising at N has not converged: in expectation it is below the true H at every size."""
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes must be integers >= 1, got {sizes}")
    context_codes, target_codes = np.asarray(context_codes), np.asarray(target_codes)
    _check_codes(context_codes, target_codes, num_classes)
    order = np.random.default_rng(seed).permutation(context_codes.size)
    by_size = {}
    for n in sorted({n for n in sizes if n < context_codes.size} | {context_codes.size}):
        bounds = conditional_entropy_bounds(context_codes[order[:n]], target_codes[order[:n]], num_classes)
        by_size[n] = {key: bounds[key] for key in ("h_plugin_bits", "h_miller_madow_bits")}
    return by_size


class CrossEntropyAccumulator:
    """Held-out cross-entropy in bits of each window's top-1 target expert under a scorer's scores read as a
    distribution: q = scores / row sum, nothing added (a scorer that smooths, e.g. with a prior, does so in its
    own scores). Fed batch by batch; windows without a top-1 target (-1) are skipped."""

    def __init__(self) -> None:
        self.bits_sum = 0.0  # sum of -log2 q(y) over windows with q(y) > 0
        self.windows = 0
        self.zero_probability_windows = 0  # q(y) = 0: the cross-entropy is infinite
        self.not_a_distribution = False  # some score < 0 or a row sums to 0

    def update(self, scores: np.ndarray, top1_targets: np.ndarray) -> None:
        """`scores` (n, E), `top1_targets` (n,) expert ids, -1 = none."""
        has_target = top1_targets >= 0
        scores = np.asarray(scores, dtype=np.float64)[has_target]  # (m, E)
        targets = top1_targets[has_target].astype(np.int64)  # (m,)
        totals = scores.sum(axis=1)  # (m,)
        if (scores < 0).any() or (totals <= 0).any():
            self.not_a_distribution = True
            return
        probabilities = scores[np.arange(len(targets)), targets] / totals  # (m,)
        positive = probabilities > 0
        self.bits_sum += float(-np.log2(probabilities[positive]).sum())
        self.zero_probability_windows += int((~positive).sum())
        self.windows += len(targets)

    def result(self) -> dict[str, float] | None:
        """{cross_entropy_bits (inf when some q(y) = 0), top1_lower_bound = 2^-CE (0 then), windows,
        zero_probability_windows}; None when the scores were no distribution or no window had a target."""
        if self.not_a_distribution or self.windows == 0:
            return None
        bits = math.inf if self.zero_probability_windows else self.bits_sum / self.windows
        return {"cross_entropy_bits": bits, "top1_lower_bound": 2.0 ** -bits, "windows": float(self.windows),
                "zero_probability_windows": float(self.zero_probability_windows)}


def best_scorer_bound(top1_by_scorer: dict[str, float]) -> dict:
    """{value, scorer}: the highest held-out top-1 (nan entries ignored, the first listed on a tie), a lower bound
    on the Bayes top-1 for the context when every listed scorer reads only that context."""
    finite = {name: top1 for name, top1 in top1_by_scorer.items() if not math.isnan(top1)}
    if not finite:
        raise ValueError(f"need at least one scorer with a top-1, got {top1_by_scorer}")
    best = max(finite, key=finite.get)
    return {"value": finite[best], "scorer": best}


def cross_entropy_bound(cross_entropy_by_model: dict[str, dict]) -> dict:
    """{value, model, cross_entropy_bits}: the largest 2^-CE over the models' CrossEntropyAccumulator results
    (None results ignored, the first listed on a tie)."""
    results = {name: result for name, result in cross_entropy_by_model.items() if result is not None}
    if not results:
        raise ValueError(f"need at least one model whose scores are a distribution, got {sorted(cross_entropy_by_model)}")
    best = max(results, key=lambda name: results[name]["top1_lower_bound"])
    return {"value": results[best]["top1_lower_bound"], "model": best,
            "cross_entropy_bits": results[best]["cross_entropy_bits"]}
