"""Document-level percentile-bootstrap 95% intervals for the ranking metrics of the evaluate stage.

What is resampled: whole test documents (every window of every chunk of one source document), with replacement.
Each of B resamples draws D documents uniformly with replacement from the D test documents; a document drawn
twice counts twice. One set of draws (seeded) serves every scorer and every metric, so the scorers are resampled
pairwise and the interval of a difference between two scorers is that of the paired differences.

The statistic of a resample is the pooled ratio sum(hits) / sum(counts) over the drawn documents, i.e. the metric
recomputed on the windows of the resampled documents (a document with many windows weighs more), NOT the mean of
per-document ratios. `hits` and `counts` are a RankingAccumulator's per-document sums and counts (for recall@k the
"hits" are the summed per-window recalls). The interval is the 2.5th and 97.5th percentile of the B statistics
(numpy's linear interpolation); resamples whose drawn documents hold no qualifying window (sum(counts) = 0) are
left out of that metric's percentiles.
"""

from __future__ import annotations

import numpy as np

from moe_prefetch.evaluation.metrics import RankingAccumulator

LEVEL = 0.95
INTERVAL_METRICS = ("top1", "recall_at_k")  # the metrics that get a `<metric>_ci95` key
QUANTILES = ((1 - LEVEL) / 2, (1 + LEVEL) / 2)


def resample_weights(num_documents: int, resamples: int, seed: int) -> np.ndarray:
    """(B, D) int: how often each of the D documents is drawn in each of the B resamples (each row sums to D)."""
    if num_documents < 1:
        raise ValueError(f"bootstrap: need at least 1 document, got {num_documents}")
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, got {resamples}")
    draws = np.random.default_rng(seed).integers(0, num_documents, size=(resamples, num_documents))  # (B, D)
    flat = (np.arange(resamples)[:, None] * num_documents + draws).reshape(-1)
    return np.bincount(flat, minlength=resamples * num_documents).reshape(resamples, num_documents)


def pooled_ratios(hits: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) statistic of every resample: sum(hits) / sum(counts) over its drawn documents; nan where the
    counts sum to 0. `hits`, `counts` (D,) per document, `weights` (B, D) from resample_weights."""
    hits, counts = np.asarray(hits, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if hits.shape != counts.shape or hits.shape != weights.shape[1:]:
        raise ValueError(f"bootstrap: hits {hits.shape} and counts {counts.shape} must both be ({weights.shape[1]},)")
    totals = weights @ counts  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, (weights @ hits) / totals, np.nan)


def percentile_interval(statistics: np.ndarray) -> list[float]:
    """[lo, hi]: the 2.5th and 97.5th percentile of the non-nan `statistics`; [nan, nan] when none is left."""
    finite = statistics[~np.isnan(statistics)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    return [float(q) for q in np.quantile(finite, QUANTILES)]


def document_totals(accumulator: RankingAccumulator, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (hits, counts) of `metric`, each (D,), documents in ascending code order."""
    _, sums, counts = accumulator.group_totals("document")
    column = accumulator.names.index(metric)
    return sums[:, column], counts[:, column]


def scorer_intervals(accumulators: dict[str, RankingAccumulator], weights: np.ndarray) -> dict[str, dict[str, list[float]]]:
    """scorer -> {"<metric>_ci95": [lo, hi]} for every metric of INTERVAL_METRICS."""
    return {
        name: {f"{metric}_ci95": percentile_interval(pooled_ratios(*document_totals(acc, metric), weights))
               for metric in INTERVAL_METRICS}
        for name, acc in accumulators.items()
    }


def difference_interval(first: RankingAccumulator, second: RankingAccumulator, metric: str, weights: np.ndarray) -> list[float]:
    """[lo, hi] of first's minus second's `metric`, both pooled over the same resampled documents (paired)."""
    statistics = pooled_ratios(*document_totals(first, metric), weights) - pooled_ratios(*document_totals(second, metric), weights)
    return percentile_interval(statistics)


def bootstrap_report(accumulators: dict[str, RankingAccumulator], resamples: int, seed: int) -> dict:
    """The intervals of every scorer (`per_scorer`) and the paired interval of predictor minus the best baseline
    on top-1 (`predictor_minus_best_baseline_top1`; the best baseline is the one with the highest point top-1 over
    all test windows, the first registered on a tie, as in the headline), from accumulators that were fed the
    group "document"."""
    codes = [acc.group_totals("document")[0] for acc in accumulators.values()]
    if any(not np.array_equal(codes[0], other) for other in codes[1:]):
        raise ValueError("bootstrap: the scorers were fed different documents")
    weights = resample_weights(len(codes[0]), resamples, seed)
    results = {name: acc.result() for name, acc in accumulators.items()}
    best = max((name for name in accumulators if name != "predictor"), key=lambda name: results[name]["top1"])
    return {
        "per_scorer": scorer_intervals(accumulators, weights),
        "predictor_minus_best_baseline_top1": {
            "best_baseline": best,
            "difference": results["predictor"]["top1"] - results[best]["top1"],
            "ci95": difference_interval(accumulators["predictor"], accumulators[best], "top1", weights),
        },
        "documents": len(codes[0]),
        "resamples": resamples,
    }
