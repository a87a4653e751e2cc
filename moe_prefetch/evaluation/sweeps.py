"""The expert-cache replay's report (`cache_report`): the configured cache, every cost profile at it, capacity and
decode batch-size sweeps for every profile, the transfer/compute regime sweep and its break-even precision, each a
replay of moe_prefetch/evaluation/replay.py (`simulate_strategies`) or breakeven.py on the same replayed windows.

Run time: a configuration is replayed once however many sweeps name it (the key is every replay-relevant
CacheParams field with the profile's numbers resolved, so the configured cache, its point in the capacity and
batch sweeps and its profile's row are one replay). With processes > 1 the distinct replays run in a pool of
forked workers started by `start_cache_report`, so the evaluate stage scores its windows while they run; every
scorer first ranks the replay windows in this process, so the workers only replay. Each replay's result depends
on its inputs alone, so the report is the same for any number of processes."""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable

import numpy as np

from moe_prefetch.evaluation.breakeven import BreakEven
from moe_prefetch.evaluation.config import COST_OVERRIDES, COST_PROFILES, CacheParams
from moe_prefetch.evaluation.fallback import FallbackInputs, fallback_plan
from moe_prefetch.evaluation.intervals import resample_weights
from moe_prefetch.evaluation.replay import (
    PREFETCH_STRATEGIES,
    DecodeSteps,
    ReplayInputs,
    TokenRouting,
    replay_windows,
    simulate_strategies,
)
from moe_prefetch.progress import Progress
from moe_prefetch.windows.data import WindowSet

REPLAY_PROCESSES = 2  # the evaluate stage's budget is 2 cores
# The per-profile capacity and batch sweeps replay these (when the run has them): the baseline, what eviction alone
# buys, each learned strategy family's best form, the prefetch ceilings (and the ideal floor); the configured
# profile's sweeps and every profile's row at the configured cache replay every strategy.
PANEL_STRATEGIES = ("on_demand", "belady", "predictor", "predictor_gated", "predictor_expert_gated", "predictor_evict",
                    "oracle_belady", "oracle_belady_next_token")
SWEEP_FIELDS = ("capacity_sweep", "capacity_sweep_unit", "decode_batch_sweep", "regime_sweep")  # no part of a replay


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One replay: the cache size in experts, the decode batch size, the params it runs under and which replay
    inputs (a key of the `inputs` Replays holds)."""

    capacity: int
    batch_size: int
    params: CacheParams
    inputs: str = "test"
    strategies: tuple[str, ...] | None = None  # the strategies replayed (None: every one)

    def key(self) -> tuple:
        """Equal for configurations whose replays are identical: the profile resolved into its numbers, the sweep
        lists and the size fields (replaced by `capacity`) left out."""
        costs = dataclasses.replace(self.params.costs(), derivation="")
        blank = {name: None for name in COST_OVERRIDES} | {name: None for name in SWEEP_FIELDS}
        params = dataclasses.replace(self.params, profile="", capacity=0, capacity_fraction=None, decode_batch_size=0, **blank)
        return self.inputs, self.capacity, self.batch_size, repr(costs), repr(params), self.strategies

    def replay(self, inputs: dict[str, ReplayInputs]) -> dict[str, dict]:
        return simulate_strategies(inputs[self.inputs], self.params, self.capacity, self.batch_size, self.strategies)


_WORKER_INPUTS: dict[str, ReplayInputs] = {}  # the replay inputs a forked worker inherits


def _replay_in_worker(configuration: Configuration) -> dict[str, dict]:
    return configuration.replay(_WORKER_INPUTS)


def _rank_before_fork(inputs: dict[str, ReplayInputs]) -> None:
    """Every scorer a strategy reads ranks its replay windows (test and val) here, once (ReplayInputs keeps them), so
    that no forked worker runs a scorer (the predictor's thread pools do not survive a fork)."""
    for replay_inputs in inputs.values():
        for windows in (replay_inputs, replay_inputs.val):
            if windows is not None:
                steps = DecodeSteps(windows, 1)
                for _, strategy in PREFETCH_STRATEGIES.items():
                    if strategy.available(replay_inputs):
                        plan = strategy.plan(windows, steps, windows.m)
                        if strategy.replay_args:  # the calibrated probabilities read the scorer too
                            strategy.replay_args(windows, steps, plan)


class Replays:
    """Each job's replay (a Configuration's simulate_strategies, a BreakEven's grid), each distinct one once. With
    processes > 1 they start here in a pool of forked workers and `results()` collects them, so the caller can
    work meanwhile; else `results()` replays them in this process."""

    def __init__(self, inputs: dict[str, ReplayInputs], jobs: list, processes: int):
        global _WORKER_INPUTS
        self.inputs, self.jobs = inputs, jobs
        distinct: dict[tuple, object] = {}
        for job in jobs:
            distinct.setdefault(job.key(), job)
        # Longest first (a replay's time grows with its tokens), so that no worker is left with a long one at the end.
        self.distinct = sorted(distinct.values(), key=lambda job: -inputs[job.inputs].tokens)
        self._pool = self._pending = None
        if processes > 1 and len(self.distinct) > 1:
            _rank_before_fork(inputs)
            _WORKER_INPUTS = inputs  # each worker forks now, with these inputs
            self._pool = multiprocessing.get_context("fork").Pool(min(processes, len(self.distinct)))
            _WORKER_INPUTS = {}
            self._pending = self._pool.imap(_replay_in_worker, self.distinct)

    def results(self) -> list[dict]:
        """Each job's result, in the jobs' order."""
        progress = Progress(len(self.distinct), "evaluate: cache replay", unit="replays")
        done = {}
        if self._pending is None:
            for job in self.distinct:
                done[job.key()] = job.replay(self.inputs)
                progress.update(1)
        else:
            try:
                for job, result in zip(self.distinct, self._pending):
                    done[job.key()] = result
                    progress.update(1)
            finally:
                self._pool.close()
                self._pool.join()
        progress.close()
        return [done[job.key()] for job in self.jobs]


def profile_params(params: CacheParams, name: str) -> CacheParams:
    """`params` under cost profile `name`; the configured profile keeps its overrides, another profile its own numbers."""
    if name == params.profile:
        return params
    return dataclasses.replace(params, profile=name, **{field: None for field in COST_OVERRIDES})


def _fallbacks(params: CacheParams, summary: dict, routing, lookup: TokenRouting | None, train: WindowSet | None,
               windows: list[WindowSet], m: int) -> list[np.ndarray | None]:
    """Each of `windows`' fallback prefetch (tokens, c-1, m) under evaluate.cache.fallback; None without the full
    routing (only target layers replay: there are no fallback layers)."""
    if lookup is None or params.fallback == "none" or summary.get("across_tokens"):  # across tokens: every layer scored
        return [None] * len(windows)
    if train is None:
        raise ValueError("the fallback needs the train windows")
    train_rows = lookup.rows(train)
    train_experts = routing.experts[train_rows].astype(np.int64)  # (train tokens, L, k)
    plans = []
    for split in windows:
        rows = lookup.rows(split)
        lookahead = None if routing.lookahead_experts is None else routing.lookahead_experts[rows]
        plans.append(fallback_plan(params.fallback, FallbackInputs(len(rows), train_experts, lookahead,
                                                                  summary["context_length"], summary["horizon"], m,
                                                                  routing.token_id[rows], routing.token_id[train_rows])))
    return plans


def _replay_inputs(test: WindowSet, val: WindowSet | None, scorers: dict[str, Callable], params: CacheParams,
                   summary: dict, max_tokens: int, documents: np.ndarray | None, bootstrap: tuple[int, int], routing,
                   train: WindowSet | None) -> ReplayInputs:
    """The replay of the first whole test sequences of at most `max_tokens` tokens (val likewise, for the gates)."""
    T = len(summary["target_layers"])
    replay = replay_windows(test, T, max_tokens)
    m = min(params.prefetch_m, summary["num_experts"])
    lookup = TokenRouting(routing, T) if routing is not None else None
    full = (lambda windows: None) if lookup is None else lookup.of
    across = bool(summary.get("across_tokens")) and lookup is not None
    val_replay = None if val is None else replay_windows(val, T, max_tokens)
    test_fallback, val_fallback = _fallbacks(params, summary, routing, lookup, train, [replay, replay if val_replay is None else val_replay], m)
    val_inputs = None
    if val_replay is not None:
        val_inputs = ReplayInputs(val_replay, scorers, m, summary["horizon"], T, token_routing=full(val_replay),
                                  fallback=val_fallback, across_tokens=across, across_steps=params.across_steps)
    token_documents = weights = None
    if documents is not None and bootstrap[0]:  # (resamples, seed): the replayed documents, recoded 0..D-1
        _, token_documents = np.unique(documents[: len(replay) : T], return_inverse=True)
        weights = resample_weights(int(token_documents.max()) + 1, *bootstrap)
    return ReplayInputs(replay, scorers, m, summary["horizon"], T, val_inputs, token_documents, weights, full(replay),
                        test_fallback, across, params.across_steps)


def start_cache_report(test: WindowSet, scorers: dict[str, Callable], params: CacheParams, summary: dict,
                       val: WindowSet | None = None, documents: np.ndarray | None = None,
                       bootstrap: tuple[int, int] = (0, 0), routing=None, train: WindowSet | None = None,
                       processes: int = 1) -> Callable[[], dict]:
    """Start cache_report's replays (in a pool when processes > 1) and return the function that waits for them and
    returns the report."""
    inputs = {"test": _replay_inputs(test, val, scorers, params, summary, params.max_tokens, documents, bootstrap,
                                     routing, train)}
    if params.profile_sweep_tokens:
        inputs["sweep"] = _replay_inputs(test, val, scorers, params, summary, params.profile_sweep_tokens, None, (0, 0),
                                         routing, train)
        if inputs["sweep"].tokens == inputs["test"].tokens:  # the same replay: its configurations are the test's
            del inputs["sweep"]
    sweep = ("sweep" if "sweep" in inputs else "test") if params.profile_sweep_tokens else None  # inputs of the sweeps
    layers = inputs["test"].routed_layers
    pool_experts = summary["num_experts"] * (1 if params.per_layer else layers)
    capacity, capacities = params.cache_experts(pool_experts), params.capacity_sweep_experts(pool_experts)
    batch = params.decode_batch_size

    configurations = {"main": [Configuration(capacity, batch, params)],
                      "capacity": [Configuration(size, batch, params) for size in capacities],
                      "batch": [Configuration(capacity, size, params) for size in params.decode_batch_sweep]}
    for name in COST_PROFILES:
        at_profile = profile_params(params, name)
        configurations[f"profile/{name}"] = [Configuration(capacity, batch, at_profile)]
        if sweep:
            configurations[f"capacity/{name}"] = [Configuration(size, batch, at_profile, sweep, PANEL_STRATEGIES)
                                                  for size in capacities]
            configurations[f"batch/{name}"] = [Configuration(capacity, size, at_profile, sweep, PANEL_STRATEGIES)
                                               for size in params.decode_batch_sweep]
    costs = params.costs()
    for ratio in params.regime_sweep:  # the profile's bandwidth and compute, expert bytes scaled to the ratio
        regime = dataclasses.replace(params, expert_bytes=ratio * costs.layer_compute_ms * costs.bandwidth_gbps * 1e6)
        configurations[f"regime/{ratio}"] = [Configuration(capacity, batch, regime, sweep or "test")]
        configurations[f"breakeven/{ratio}"] = [BreakEven(capacity, regime, summary["num_experts"],
                                                          sweep or "test")]
    replays = Replays(inputs, [configuration for group in configurations.values() for configuration in group], processes)
    return lambda: _report(params, summary, routing, inputs, configurations, replays.results(), pool_experts, capacities,
                           sweep)


def cache_report(test: WindowSet, scorers: dict[str, Callable], params: CacheParams, summary: dict,
                 val: WindowSet | None = None, documents: np.ndarray | None = None, bootstrap: tuple[int, int] = (0, 0),
                 routing=None, train: WindowSet | None = None, processes: int = 1) -> dict:
    """The simulator summary at the configured cache (`cache`), every cost profile's speedups at that cache
    (`by_profile`), the rows of the capacity and decode batch-size sweeps of the configured profile (`by_capacity`,
    `by_batch`) and of every profile on the first evaluate.cache.profile_sweep_tokens tokens (`by_profile_capacity`,
    `by_profile_batch`: profile -> rows), and of the regime sweep on the same tokens (`by_regime`: transfer time per
    expert = ratio x layer compute time, the profile's compute, with the break-even prefetch precision of
    moe_prefetch/evaluation/breakeven.py). `routing` (the shards' RoutingTable): replay every
    MoE layer, the fallback fit on `train`."""
    return start_cache_report(test, scorers, params, summary, val, documents, bootstrap, routing, train, processes)()


def _report(params: CacheParams, summary: dict, routing, inputs: dict[str, ReplayInputs], configurations: dict[str, list],
            results: list[dict], pool_experts: int, capacities: list[int], sweep: str | None) -> dict:
    """cache_report's dict from the replays of `configurations` (group -> jobs), `results` in their order; `sweep`
    names the inputs of the per-profile sweeps (None: none)."""
    results = iter(results)
    replayed = {group: [next(results) for _ in members] for group, members in configurations.items()}
    capacity, batch = configurations["main"][0].capacity, params.decode_batch_size
    layers = inputs["test"].routed_layers

    def capacity_rows(group: str) -> list[dict]:
        return [{"capacity": size, "capacity_fraction": size / pool_experts, **flat_row(result)}
                for size, result in zip(capacities, replayed[group])]

    def batch_rows(group: str) -> list[dict]:
        return [{"batch_size": size, **flat_row(result)} for size, result in zip(params.decode_batch_sweep, replayed[group])]

    by_profile = {}
    for name in COST_PROFILES:
        cost = profile_params(params, name).cost_model()
        by_profile[name] = {"transfer_over_compute": cost.transfer_ms / cost.layer_compute_ms,
                            **flat_row(replayed[f"profile/{name}"][0], ("speedup_vs_on_demand",))}
    by_regime = [{"transfer_over_compute": ratio, **flat_row(replayed[f"regime/{ratio}"][0], ("speedup_vs_on_demand",)),
                  **replayed[f"breakeven/{ratio}"][0]} for ratio in params.regime_sweep]
    weights = inputs["test"].document_weights
    config = {"replayed_tokens": inputs["test"].tokens, "replayed_layers": layers,
              "capacity": capacity, "capacity_fraction": capacity / pool_experts,
              "prefetch_m": inputs["test"].m, "batch_size": batch, "profile": params.profile,
              "transfer_ms_per_expert": params.cost_model().transfer_ms,
              "fallback": params.fallback, "fallback_layers": summary["context_length"] - 1 if routing is not None else 0,
              "profile_sweep_tokens": inputs[sweep].tokens if sweep else 0,
              "interval_documents": 0 if weights is None else weights.shape[1]}
    sweeps = [name for name in COST_PROFILES if sweep]
    return {"cache": {"config": config, **replayed["main"][0]}, "by_profile": by_profile,
            "by_capacity": capacity_rows("capacity"), "by_batch": batch_rows("batch"), "by_regime": by_regime,
            "by_profile_capacity": {name: capacity_rows(f"capacity/{name}") for name in sweeps},
            "by_profile_batch": {name: batch_rows(f"batch/{name}") for name in sweeps}}


def flat_row(result: dict[str, dict], keys: tuple[str, ...] = ("hit_rate", "speedup_vs_on_demand")) -> dict[str, float]:
    """One sweep row: each strategy's `keys` (the ideal has only a speedup)."""
    return {f"{name}_{key}": value[key] for name, value in result.items() for key in keys if key in value}
