"""Stage evaluate: score the trained predictor and the baselines on the test split.

Writes `<metrics>` (nested dict of numbers, `[lo, hi]` intervals and the best baseline's name: `dvc metrics diff`
compares every numeric leaf) and plot data + PNGs into `<plots>`. The baselines that could embarrass the predictor
(BASELINES, moe_prefetch/evaluation/baselines.py) are all scored by the same code on the same windows as the
predictor. With evaluate.max_horizon > 0 the baselines but random are also scored at horizons
1..min(max_horizon, MoE layers - context length) on windows rebuilt from the shards (same document split), next to
the predictor at the horizon it was trained for (`per_horizon`).
Every scorer's top1 and recall_at_k carry a document-level bootstrap 95% interval (`top1_ci95`, `recall_at_k_ci95`),
and `predictor_minus_best_baseline_top1` holds the paired interval of the headline difference
(moe_prefetch/evaluation/intervals.py says what is resampled). `bounds` bounds the Bayes top-1 for the lookup's context
from below (the best test top-1 and the largest 2^-cross-entropy of the scorers reading only that context) and above
(Fano), with the plug-in H(top-1 | context) on nested train subsets (moe_prefetch/evaluation/bounds.py says what holds).

    python -m stages.evaluate --windows data/windows --shards data/shards --predictor data/predictor \
        --metrics metrics/evaluate.json --plots plots
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from moe_prefetch.config import parse
from moe_prefetch.evaluation.baselines import BASELINES, baseline_scorers
from moe_prefetch.evaluation.bounds import (
    CrossEntropyAccumulator,
    best_scorer_bound,
    conditional_entropy_bounds,
    cross_entropy_bound,
    plugin_entropy_by_size,
)
from moe_prefetch.evaluation.config import EvaluateParams
from moe_prefetch.evaluation.intervals import bootstrap_report
from moe_prefetch.evaluation.metrics import CalibrationAccumulator, RankingAccumulator
from moe_prefetch.evaluation.plots import write_cache_plots, write_plots
from moe_prefetch.evaluation.replay import PREFETCH_STRATEGIES
from moe_prefetch.evaluation.sweeps import REPLAY_PROCESSES, start_cache_report
from moe_prefetch.predictors import load_predictor
from moe_prefetch.predictors.tables import context_keys
from moe_prefetch.progress import Progress
from moe_prefetch.traces import read_routing
from moe_prefetch.windows.build import window_documents, windows_in_memory
from moe_prefetch.windows.config import WindowsParams
from moe_prefetch.windows.data import (
    WindowSet,
    read_summary,
    read_windows,
    windows_from_table,
)


def rank_all(scorers: dict, windows: WindowSet, params: EvaluateParams, summary: dict,
             calibration: CalibrationAccumulator | None = None, documents: np.ndarray | None = None,
             cross_entropy: dict[str, CrossEntropyAccumulator] | None = None) -> dict[str, RankingAccumulator]:
    """Score `windows` batch by batch with every scorer; accumulators overall and per layer, domain, (when
    recorded) prompt (0) vs generated (1) token and (when `documents`, the (N,) document code of every window,
    is given) document. `calibration` collects the predictor's confidence, `cross_entropy` the top-1 target's
    cross-entropy under the scores of each scorer it names."""
    accumulators = {name: RankingAccumulator(params.top_m, summary["num_experts"], summary["top_k"]) for name in scorers}
    progress = Progress(len(windows), f"evaluate: scoring h={summary['horizon']}", unit="windows")
    for start in range(0, len(windows), params.score_batch_size):
        rows = np.arange(start, min(start + params.score_batch_size, len(windows)))
        batch = windows.subset(rows)
        groups = {"layer": batch.target_layer.astype(np.int64), "domain": batch.domain_index}
        if windows.generated is not None:
            groups["generated"] = batch.generated.astype(np.int64)
        if documents is not None:
            groups["document"] = documents[rows]
        for name, scorer in scorers.items():
            scores, confidence = scorer(batch)
            accumulators[name].update(scores, batch.target_experts, groups)
            if cross_entropy is not None and name in cross_entropy:
                cross_entropy[name].update(scores, batch.target_experts[:, 0])
            if name == "predictor" and calibration is not None and confidence is not None:
                has_target = batch.target_experts[:, 0] >= 0
                correct = scores.argmax(axis=1) == batch.target_experts[:, 0]
                calibration.update(np.clip(confidence[has_target], 0, 1), correct[has_target])
        progress.update(len(batch))
    progress.close()
    return accumulators


HORIZON_METRICS = ("top1", "recall_at_k", "recall_at_2k")


def per_horizon(params: EvaluateParams, shard_dir: Path, summary: dict, results: dict[str, dict]) -> dict:
    """h -> strategy -> top1/recall@k/recall@2k for h = 1..max_horizon: baselines (but the seeded random one) refit
    on each horizon's train windows and tuned on its val windows (rebuilt from the shards, same document split),
    the predictor at the horizon it was trained for. At that horizon the rows are the stage's own `results` (scorer
    -> metrics on its test windows): the same fits on the same windows, so they are not fit again."""
    windows_params = parse(WindowsParams, summary["params"], "windows")
    by_horizon = {}
    for h in range(1, params.max_horizon + 1):
        if h == summary["horizon"]:  # the stage's own windows
            row = {name: {m: result[m] for m in HORIZON_METRICS} for name, result in results.items() if name != "random"}
            by_horizon[f"h{h}"] = {"test_windows": summary["splits"]["test"]["windows"], **row}
            continue
        at_h = dataclasses.replace(windows_params, horizon=h, token_context=0, token_horizon=0)
        summary_h = {**summary, "horizon": h, "token_context": 0, "token_horizon": 0}
        tables = windows_in_memory(shard_dir, at_h, ("train", "val", "test"))
        train_h, val_h, test_h = (windows_from_table(tables[split], summary_h) for split in ("train", "val", "test"))
        accumulators = rank_all(baseline_scorers(train_h, summary_h, val=val_h), test_h, params, summary_h)
        row = {name: {m: acc.result()[m] for m in HORIZON_METRICS} for name, acc in accumulators.items()}
        by_horizon[f"h{h}"] = {"test_windows": len(test_h), **row}
    return by_horizon


def clean(value):
    """JSON-safe numbers: NaN (no qualifying rows) and infinity (an infinite cross-entropy) become None, which DVC
    shows as missing, never as a number."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    return value


def breakdown(accumulators: dict[str, RankingAccumulator], group: str) -> dict[int, dict[str, dict]]:
    """group code -> strategy -> metrics, for every code of breakdown `group` (ascending)."""
    by_strategy = {name: acc.result_by_group(group) for name, acc in accumulators.items()}
    return {code: {name: results[code] for name, results in by_strategy.items()} for code in by_strategy["predictor"]}


def with_intervals(result: dict, intervals: dict) -> dict:
    """`result` with each `<metric>_ci95` of `intervals` right after its `<metric>`."""
    merged = {}
    for key, value in result.items():
        merged[key] = value
        if f"{key}_ci95" in intervals:
            merged[f"{key}_ci95"] = intervals[f"{key}_ci95"]
    return merged


LOOKUP_CONTEXT_COLUMNS = frozenset({"context_experts"})  # with the target layer: the context the bounds are for


def lookup_context_codes(windows: WindowSet) -> tuple[np.ndarray, np.ndarray]:
    """(M,) a code per distinct lookup context (target layer + all context layers' experts) and (M,) the top-1
    target expert, of the M windows that have a top-1 target."""
    subset = windows.subset(windows.target_experts[:, 0] >= 0)
    _, codes = np.unique(context_keys(subset, subset.context_experts.shape[1]), return_inverse=True)
    return codes, subset.target_experts[:, 0].astype(np.int64)


def lookup_bounds(test: WindowSet, train: WindowSet, num_experts: int, train_sizes: list[int], seed: int) -> dict:
    """Entropy estimates and Fano bounds on top-1 for the lookup's context on test, and the plug-in and
    Miller-Madow H on nested random subsets of train (`train_sizes`, then all of train; keys are window counts)."""
    by_size = plugin_entropy_by_size(*lookup_context_codes(train), num_experts, train_sizes, seed)
    return {
        **conditional_entropy_bounds(*lookup_context_codes(test), num_experts),
        "plugin_entropy_by_train_size": {str(n): h["h_plugin_bits"] for n, h in by_size.items()},
        "miller_madow_entropy_by_train_size": {str(n): h["h_miller_madow_bits"] for n, h in by_size.items()},
    }


def bayes_lower_bounds(results: dict[str, dict], cross_entropy: dict[str, CrossEntropyAccumulator]) -> dict:
    """Lower bounds on the Bayes top-1 for the lookup's context, from the scorers that read only that context (the
    keys of `cross_entropy`): the best one's test top-1 (with its interval), the largest 2^-CE, every CE in bits."""
    best = best_scorer_bound({name: results[name]["top1"] for name in cross_entropy})
    by_model = {name: accumulator.result() for name, accumulator in cross_entropy.items()}
    return {
        "bayes_top1_lower_bound_best_scorer": {**best, "top1_ci95": results[best["scorer"]]["top1_ci95"]},
        "bayes_top1_lower_bound_cross_entropy": cross_entropy_bound(by_model),
        "cross_entropy_bits": {name: result["cross_entropy_bits"] for name, result in by_model.items() if result is not None},
    }


def headline(metrics: dict) -> dict:
    """The handful of numbers `dvc exp show` and `dvc metrics diff` should show first (metrics/headline.json):
    the predictor's top-1 and recall@k, the best baseline's on each (the strongest of every registered baseline),
    and the cache replay's speedups over on-demand loading (the predictor's prefetch, the oracle's, Belady eviction
    alone, the ideal floor) and the predictor's share of the ideal's saving; the document-bootstrap 95% interval
    of predictor minus best baseline on top-1 as two numbers (`_ci95_low`, `_ci95_high`: DVC diffs numbers). Nested
    under one `headline` key, so that DVC names the columns `headline.<name>` and `--keep '^headline'` selects them."""
    predictor, baselines, cache = metrics["predictor"], metrics["baselines"], metrics["cache"]
    difference = metrics["predictor_minus_best_baseline_top1"]
    best = {m: max(result[m] for result in baselines.values()) for m in ("top1", "recall_at_k")}
    return {"headline": {
        "predictor_top1": predictor["top1"],
        "predictor_recall_at_k": predictor["recall_at_k"],
        "best_baseline_top1": best["top1"],
        "best_baseline_recall_at_k": best["recall_at_k"],
        "predictor_minus_best_baseline_top1": round(predictor["top1"] - best["top1"], 6),
        "predictor_minus_best_baseline_top1_ci95_low": difference["ci95"][0],
        "predictor_minus_best_baseline_top1_ci95_high": difference["ci95"][1],
        "cache_predictor_speedup": cache["predictor"]["speedup_vs_on_demand"],
        "cache_oracle_speedup": cache["oracle"]["speedup_vs_on_demand"],
        "cache_belady_speedup": cache["belady"]["speedup_vs_on_demand"],
        "cache_ideal_speedup": cache["ideal"]["speedup_vs_on_demand"],
        "cache_predictor_share_of_ideal": cache["predictor"]["share_of_ideal"],
    }}


def cache_summary(cache: dict) -> dict:
    """The replay at the configured cache in a few numbers for `dvc metrics diff`: time per token and speedup over
    on-demand of on-demand LRU, Belady eviction alone, the fastest strategy driven by the trained predictor (the ones
    charged its inference time) and the ideal floor, with the cost profile's name."""
    predictor_driven = [name for name, strategy in PREFETCH_STRATEGIES.items() if strategy.charged and name in cache]
    best = max(predictor_driven, key=lambda name: cache[name]["speedup_vs_on_demand"])
    summary = {"profile": cache["config"]["profile"], "best_predictor_strategy": best}
    for label, name in (("on_demand", "on_demand"), ("belady", "belady"), ("best_predictor", best), ("ideal", "ideal")):
        summary[f"{label}_time_per_token_ms"] = cache[name]["time_per_token_ms"]
        summary[f"{label}_speedup"] = cache[name]["speedup_vs_on_demand"]
    return summary


def evaluate(params: EvaluateParams, windows_dir: Path, shard_dir: Path, predictor_dir: Path, plots_dir: Path) -> dict:
    summary = read_summary(windows_dir)
    c, L = summary["context_length"], summary["num_layers"]
    if c + params.max_horizon > L:  # an upper bound: the horizons this model has
        print(f"note: evaluate.max_horizon {params.max_horizon} capped to {L - c}: the model has {L} MoE layers and "
              f"windows.context_length is {c}, so per_horizon scores h = 1..{L - c}")
        params = dataclasses.replace(params, max_horizon=L - c)
    predictor = load_predictor(predictor_dir)
    train, val, test = (read_windows(windows_dir, split) for split in ("train", "val", "test"))
    scorers = {"predictor": predictor.score, **baseline_scorers(train, summary, np.random.default_rng(params.seed), val)}
    columns_read = {"predictor": predictor.requires, **{name: BASELINES[name].requires for name in scorers if name != "predictor"}}
    cross_entropy = {name: CrossEntropyAccumulator() for name in scorers if set(columns_read[name]) <= LOOKUP_CONTEXT_COLUMNS}
    E, k = summary["num_experts"], summary["top_k"]
    calibration = CalibrationAccumulator(bins=10)
    routing = read_routing(shard_dir)  # the shards once: documents of the windows here, full routing for the replay
    documents = window_documents(routing, test)
    # The replay's workers run while this process scores the windows below.
    cache_report = start_cache_report(test, scorers, params.cache, summary, val, documents,
                                      (params.bootstrap_resamples, params.seed), routing, train, REPLAY_PROCESSES)
    accumulators = rank_all(scorers, test, params, summary, calibration, documents, cross_entropy)
    intervals = bootstrap_report(accumulators, params.bootstrap_resamples, params.seed)
    results = {name: with_intervals(acc.result(), intervals["per_scorer"][name]) for name, acc in accumulators.items()}
    metrics = {
        "test_windows": len(test),
        "data": {
            "context_length": summary["context_length"], "horizon": summary["horizon"],
            "num_experts": E, "top_k": k, "num_layers": summary["num_layers"],
            **{f"{split}_{key}": counts[key] for split, counts in summary["splits"].items() for key in ("windows", "documents")},
        },
        "predictor": {**results["predictor"], "arch_parameters": predictor.parameter_count()},
        "baselines": {name: r for name, r in results.items() if name != "predictor"},
        "predictor_minus_best_baseline_top1": intervals["predictor_minus_best_baseline_top1"],
        "bootstrap": {"documents": intervals["documents"], "resamples": intervals["resamples"]},
        "bounds": {**lookup_bounds(test, train, E, params.entropy_train_sizes, params.seed),
                   "predictor_top1": results["predictor"]["top1"], **bayes_lower_bounds(results, cross_entropy)},
        "calibration": calibration.result(),
        "per_domain": {test.domains[code]: by_strategy for code, by_strategy in breakdown(accumulators, "domain").items()},
        "per_layer": {
            f"layer_{code}": {name: result["top1"] for name, result in by_strategy.items()}
            for code, by_strategy in breakdown(accumulators, "layer").items()
        },
    }
    if test.generated is not None:
        by_kind = breakdown(accumulators, "generated")
        metrics["per_token_kind"] = {kind: by_kind[code] for code, kind in ((0, "prompt"), (1, "generated")) if code in by_kind}
    if params.max_horizon:
        metrics["per_horizon"] = per_horizon(params, shard_dir, summary, results)
    write_plots(plots_dir, metrics, calibration, params.top_m, accumulators)  # while the replay's workers finish
    report = cache_report()
    metrics["cache"], metrics["cache_by_profile"] = report["cache"], report["by_profile"]
    metrics["cache_summary"] = cache_summary(report["cache"])
    metrics["cache_by_regime"] = {f"{row['transfer_over_compute']:g}": row for row in report["by_regime"]}
    write_cache_plots(plots_dir, report)
    return clean(metrics)
