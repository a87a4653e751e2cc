"""What the predictions buy an expert cache: replay test sequences through the simulator in
moe_prefetch/evaluation/cache.py with each prefetch strategy, the same cache for all.

Every MoE layer is replayed, with each token's routing read from the shards (`token_routing`); a predictor
scores the target layers c-1+h .. L-1 only, so the learned strategies prefetch layers h .. c-2+h by the rule of
evaluate.cache.fallback (fallback.py) and layers 0 .. h-1 not at all (the oracle prefetches layers h.. from layer
l-h). With windows.across_tokens the predictor scores every layer, and the last h layers of a step issue for the
next step's first layers (simulate's int lead; the oracles then reach across steps too), so no fallback is used.
Without the shards' routing (unit tests) only the target layers are replayed. A step is one decode step of `decode_batch_size` sequences:
the experts it needs at a layer are the union over its tokens. The strategies (PREFETCH_STRATEGIES, in the order
of the metrics) each plan what to prefetch, when layer l runs, for layer l+h from what they need: the replayed
windows, the scorers, the routed steps. A strategy is left out when the run lacks its input. Each uses the
configured eviction policy unless it names its own: `belady` and `oracle_belady` are the ceilings (offline optimal
eviction without and with perfect prefetch). `predictor` is charged evaluate.cache.predictor_ms per prefetching
layer on the compute stream; the tables (lookup) are charged nothing. Speedups are over on_demand (no prefetch,
configured policy); `ideal` is the floor max(compute, Belady's demand loads x transfer time) that no strategy can
beat with this cache (cache.ideal_time_ms), and share_of_ideal is the share of its saving a strategy achieves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moe_prefetch.evaluation.cache import (
    CacheConfig,
    CostModel,
    ideal_share,
    ideal_time_ms,
    oracle_prefetch,
    simulate,
    speedup,
    stream_ahead,
)
from moe_prefetch.evaluation.config import CacheParams
from moe_prefetch.evaluation.intervals import percentile_interval, pooled_ratios
from moe_prefetch.evaluation.replay_probabilities import predictor_gate, predictor_scores
from moe_prefetch.registry import Registry
from moe_prefetch.windows.data import WindowSet


def replay_windows(test: WindowSet, num_target_layers: int, max_tokens: int) -> WindowSet:
    """The windows of the first whole test sequences holding at most `max_tokens` tokens (at least one sequence)."""
    token_rows = np.arange(0, len(test), num_target_layers)  # first window of each token
    sequence = test.sequence_index[token_rows]
    ends = np.r_[np.flatnonzero(sequence[1:] != sequence[:-1]) + 1, len(token_rows)]  # token index after each sequence
    fitting = ends[ends <= max_tokens]
    cut = fitting[-1] if len(fitting) else ends[0]
    return test.subset(np.arange(cut * num_target_layers))


def top_m(scores: np.ndarray, m: int) -> np.ndarray:
    """(N, m) expert ids of the m highest scores, best first (ties to the lower id)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :m]


def batched_steps(per_token: np.ndarray, sequence: np.ndarray, batch_size: int, fill: float = -1) -> np.ndarray:
    """(tokens, T, w) per-token arrays -> (steps, T, batch_size * w): groups of `batch_size` consecutive
    sequences decode together; step p holds position p of every member (`fill` where a member has ended)."""
    starts = np.flatnonzero(np.r_[True, sequence[1:] != sequence[:-1]])
    ends = np.r_[starts[1:], len(sequence)]
    steps = []
    for group in range(0, len(starts), batch_size):
        members = list(zip(starts[group : group + batch_size], ends[group : group + batch_size]))
        length = max(end - start for start, end in members)
        dtype = np.int64 if per_token.dtype.kind in "iu" else per_token.dtype  # ids as int64, scores as they are
        block = np.full((length, per_token.shape[1], batch_size, per_token.shape[2]), fill, dtype=dtype)
        for slot, (start, end) in enumerate(members):
            block[: end - start, :, slot] = per_token[start:end]
        steps.append(block.reshape(length, per_token.shape[1], -1))
    return np.concatenate(steps)


def by_summed_score(plan: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(steps, L, w) expert ids (-1 = none) with their (steps, L, w) scores -> each row's distinct experts ordered by
    their scores summed over the row (ties: first listed first), -1 after them."""
    ordered = np.full_like(plan, -1)
    for step, layer in zip(*np.nonzero((plan >= 0).any(axis=2))):
        row, weight = plan[step, layer], scores[step, layer]
        experts, first, codes = np.unique(row[row >= 0], return_index=True, return_inverse=True)
        total = np.bincount(codes, weights=weight[row >= 0], minlength=len(experts))
        order = np.lexsort((first, -total))  # the highest sum first, then the earliest listed
        ordered[step, layer, : len(experts)] = experts[order]
    return ordered


class ReplayInputs:
    """What strategies plan from, for one replay: its windows, the scorers (name -> function(windows) -> (scores,
    confidence)), m experts per prefetch, the horizon, and the same for the val windows the gated strategies tune
    on (None: no gated strategy). Each scorer ranks the windows once, on first use."""

    def __init__(self, windows: WindowSet, scorers: dict[str, Callable], m: int, horizon: int, num_target_layers: int,
                 val: ReplayInputs | None = None, documents: np.ndarray | None = None,
                 document_weights: np.ndarray | None = None, token_routing: np.ndarray | None = None,
                 fallback: np.ndarray | None = None, across_tokens: bool = False, across_steps: bool = True):
        self.windows, self.scorers, self.m, self.horizon = windows, scorers, m, horizon
        # windows.across_tokens: the windows score every MoE layer, the last h layers of a step issuing for the next
        # step's first layers (simulate's int lead) unless across_steps is off; needs token_routing.
        self.across_tokens = across_tokens
        self.across_steps = across_tokens and across_steps
        self.num_target_layers, self.val = num_target_layers, val
        self.token_routing = token_routing  # (tokens, L, k) every MoE layer's experts; None: replay target layers only
        # (tokens, c-1, m) what the learned strategies prefetch when layers 0..c-2 run, for layers h..c-2+h, which
        # no predictor scores (moe_prefetch/evaluation/fallback.py); None: nothing. Needs token_routing.
        self.fallback = fallback
        # Speedup intervals (decode batch 1): (tokens,) document code of each replayed token, (B, D) bootstrap draws.
        self.documents, self.document_weights = documents, document_weights
        self.tokens = len(windows) // num_target_layers
        self.routed_layers = num_target_layers if token_routing is None else token_routing.shape[1]  # layers replayed
        self._predicted: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def predicted(self, scorer: str) -> np.ndarray:
        """(N, m) experts with `scorer`'s m highest scores per window, best first."""
        if scorer not in self._predicted:
            scores = self.scorers[scorer](self.windows)[0]  # (N, E)
            experts = top_m(scores, self.m)  # (N, m)
            self._predicted[scorer] = experts, np.take_along_axis(scores, experts, axis=1)
        return self._predicted[scorer][0]

    def predicted_scores(self, scorer: str) -> np.ndarray:
        """(N, m) `scorer`'s scores of the experts predicted() lists, in the same order."""
        self.predicted(scorer)
        return self._predicted[scorer][1]


class DecodeSteps:
    """The replay decoded `batch_size` sequences at a time: `routed` (steps, layers, batch_size * k) experts. The
    layers are every MoE layer when the inputs carry the tokens' full routing (`ReplayInputs.token_routing`),
    else the target layers only."""

    def __init__(self, inputs: ReplayInputs, batch_size: int):
        self.inputs, self.batch_size = inputs, batch_size
        self.sequence = inputs.windows.sequence_index[::inputs.num_target_layers]
        if inputs.token_routing is not None:
            per_token = inputs.token_routing  # (tokens, L, k)
        else:
            per_token = inputs.windows.target_experts.reshape(inputs.tokens, inputs.num_target_layers, -1)
        self.routed = batched_steps(per_token, self.sequence, batch_size)

    def issue(self, experts: np.ndarray, with_fallback: bool = False, scores: np.ndarray | None = None) -> np.ndarray:
        """Per-window experts (N, m) for each window's target layer -> the prefetch plan (steps, layers,
        batch_size * m): prefetch[t, l] lists the experts for layer l + h. `with_fallback`: layers 0..c-2 issue the
        inputs' fallback (cut to the same m), when it has one. `scores` (N, m), the predicted probabilities of
        `experts`: a batch's list is then ordered by each expert's probability summed over the batch's members (the
        order is the link's priority; the fallback's entries, unscored, keep their order after the scored ones)."""
        plan = self._issued(experts, with_fallback)
        if scores is None or self.batch_size == 1:
            return plan
        return by_summed_score(plan, self._issued(scores.astype(np.float64), with_fallback=False, fill=0.0))

    def _issued(self, experts: np.ndarray, with_fallback: bool, fill: float = -1) -> np.ndarray:
        """issue()'s layout of any per-window (N, m) array, `fill` where nothing is issued."""
        T, h = self.inputs.num_target_layers, self.inputs.horizon
        per_token = experts.reshape(self.inputs.tokens, T, -1)  # (tokens, T, m)
        if self.inputs.across_tokens:
            # Stream position p = token * L + l issues the prediction for p + h: layer l + h of the same token, or
            # for l >= L-h the next token's layer l + h - L, when that token is in the same sequence.
            issued = stream_ahead(per_token, h, fill)  # (tokens, L, m)
            last = np.r_[self.sequence[1:] != self.sequence[:-1], True] | (not self.inputs.across_steps)
            issued[last, T - h :] = fill  # a sequence's last token (every token when the steps do not issue across)
        elif self.inputs.token_routing is not None:
            # Target layer c-1+h+i is predicted when its last context layer c-1+i runs; layers before c-1 (no full
            # context yet) issue the fallback or nothing, and layers after L-1-h nothing.
            c = self.fallback_layers + 1
            issued = np.full((self.inputs.tokens, self.routed.shape[1], per_token.shape[2]), fill, dtype=per_token.dtype)
            issued[:, c - 1 : c - 1 + T] = per_token
            if with_fallback and self.inputs.fallback is not None:
                issued[:, : c - 1] = self.inputs.fallback[:, :, : per_token.shape[2]]  # (tokens, c-1, m)
        else:  # target layers only: shift the per-target-layer predictions back by h
            issued = np.full_like(per_token, fill)
            issued[:, : T - h] = per_token[:, h:]
        return batched_steps(issued, self.sequence, self.batch_size, fill)

    @property
    def fallback_layers(self) -> int:
        """c - 1: the layers that run before a predictor has a full context (0 when only target layers replay)."""
        full_context_only = self.inputs.token_routing is not None and not self.inputs.across_tokens
        return self.inputs.windows.context_experts.shape[1] - 1 if full_context_only else 0

    def fallback_prefetches(self, plan: np.ndarray | None) -> int:
        """Distinct experts `plan` lists at layers 0..c-2 summed over steps: the fallback's layer-prefetches."""
        if plan is None or not self.fallback_layers:
            return 0
        rows = np.sort(plan[:, : self.fallback_layers], axis=-1)  # (steps, c-1, w)
        first = np.ones(rows.shape[:-1] + (1,), dtype=bool)
        return int(((rows >= 0) & np.concatenate([first, rows[..., 1:] != rows[..., :-1]], axis=-1)).sum())


class TokenRouting:
    """Every MoE layer's experts of any windows' tokens, looked up by (sequence, position) in `routing`
    (moe_prefetch.traces.RoutingTable of the shards); the index is built once for all lookups."""

    def __init__(self, routing, num_target_layers: int):
        self.routing, self.num_target_layers = routing, num_target_layers
        sequences = (routing.sequence_ids[s] for s in routing.sequence_index)
        self.row_of = {(sequence, int(position)): row for row, (sequence, position) in enumerate(zip(sequences, routing.position))}

    def rows(self, windows: WindowSet) -> np.ndarray:
        """(tokens,) the routing rows of `windows`' tokens (token-major, num_target_layers windows per token)."""
        first = np.arange(0, len(windows), self.num_target_layers)
        rows = [self.row_of[(windows.sequence_ids[s], int(p))] for s, p in zip(windows.sequence_index[first], windows.position[first])]
        return np.asarray(rows, dtype=np.int64)

    def of(self, windows: WindowSet) -> np.ndarray:
        """(tokens, L, k) for `windows`."""
        return self.routing.experts[self.rows(windows)].astype(np.int64)


@dataclass(frozen=True)
class PrefetchStrategy:
    """A registered prefetch strategy: `plan(inputs, steps, depth)` -> prefetch (steps, T, m') or None (no
    prefetch), when `available`; `depth` is how many of a scorer's ranked experts to prefetch (m unless gated)."""

    doc: str  # one line: what it prefetches
    plan: Callable[[ReplayInputs, DecodeSteps, int], np.ndarray | None]
    available: Callable[[ReplayInputs], bool] = lambda inputs: True
    policy: str | None = None  # its own eviction policy; None = evaluate.cache.policy
    charged: bool = False  # pays evaluate.cache.predictor_ms per prefetching layer
    gated: bool = False  # depth tuned on the val replay of the same cache and costs (0 = no prefetch)
    learned: bool = False  # prefetches from a scorer's windows: layers 0..c-2 issue evaluate.cache.fallback
    # simulate()'s extra keyword arguments (lead, use_scores, prefetch_probs) from (inputs, steps, plan); None = none
    replay_args: Callable[[ReplayInputs, DecodeSteps, np.ndarray | None], dict] | None = None


def _scored(scorer: str, doc: str, charged: bool = False, gated: bool = False) -> PrefetchStrategy:
    """The strategy prefetching `scorer`'s top-depth (available when the run has that scorer, and val windows when
    gated)."""
    return PrefetchStrategy(
        doc, lambda inputs, steps, depth: steps.issue(inputs.predicted(scorer)[:, :depth], with_fallback=True,
                                                      scores=inputs.predicted_scores(scorer)[:, :depth]) if depth else None,
        lambda inputs: scorer in inputs.scorers and (not gated or inputs.val is not None), charged=charged, gated=gated,
        learned=True)


def _perfect(inputs: ReplayInputs, steps: DecodeSteps, depth: int) -> np.ndarray:
    """The experts layer l+h will really use, every one of them (across tokens: into the next step too)."""
    return oracle_prefetch(steps.routed, inputs.horizon, steps.routed.shape[2], wrap=inputs.across_steps)


def _no_prefetch(inputs: ReplayInputs, steps: DecodeSteps, depth: int) -> None:
    return None


PREFETCH_STRATEGIES: Registry[PrefetchStrategy] = Registry("prefetch strategy")
PREFETCH_STRATEGIES.add("on_demand", PrefetchStrategy("No prefetch: the cache alone.", _no_prefetch))
PREFETCH_STRATEGIES.add("belady", PrefetchStrategy(
    "No prefetch, Belady (offline optimal) eviction: what better eviction alone can buy.", _no_prefetch, policy="belady"))
PREFETCH_STRATEGIES.add("predictor", _scored("predictor", "The trained predictor's top-m for layer l+h.", charged=True))
PREFETCH_STRATEGIES.add("predictor_gated", _scored(
    "predictor", "The predictor's top-d, d in 0..m the fastest on the val replay of the same cache and costs (0 = no prefetch).",
    charged=True, gated=True))
PREFETCH_STRATEGIES.add("lookup", _scored("lookup", "The same from the lookup baseline."))
PREFETCH_STRATEGIES.add("lookup_gated", _scored("lookup", "The lookup's top-d, d tuned on val like predictor_gated.",
                                                gated=True))
PREFETCH_STRATEGIES.add("stale_gate", PrefetchStrategy(
    "Layer l+h's router applied at layer l (when captured).",
    lambda inputs, steps, depth: steps.issue(inputs.windows.stale_gate_experts.astype(np.int64)[:, : inputs.m]),
    lambda inputs: inputs.windows.stale_gate_experts is not None,
))
PREFETCH_STRATEGIES.add("oracle", PrefetchStrategy("The experts layer l+h will really use (perfect knowledge).", _perfect))
PREFETCH_STRATEGIES.add("oracle_belady", PrefetchStrategy(
    "Perfect prefetch with lead h and Belady eviction: the ceiling of prefetching h layers ahead.", _perfect,
    policy="belady"))


def _perfect_lead(lead: int | None) -> PrefetchStrategy:
    """Perfect prefetch `lead` layers ahead across steps (None: a step's L layers, the next token's same layer), with
    Belady eviction."""
    ahead = "the next token's same layer (lead L)" if lead is None else f"{lead} layer{'s' if lead > 1 else ''} ahead"
    return PrefetchStrategy(
        f"Perfect prefetch of the experts {ahead}, into later steps too, with Belady eviction: a lead ceiling.",
        lambda inputs, steps, depth: oracle_prefetch(steps.routed, lead or steps.routed.shape[1], steps.routed.shape[2],
                                                     wrap=True),
        policy="belady", replay_args=lambda inputs, steps, plan: {"lead": lead or steps.routed.shape[1]})


for _lead in (1, 2, 4):
    PREFETCH_STRATEGIES.add(f"oracle_belady_lead{_lead}", _perfect_lead(_lead))
PREFETCH_STRATEGIES.add("oracle_belady_next_token", _perfect_lead(None))


def _needs_val(inputs: ReplayInputs) -> bool:
    """The predictor's calibrated strategies need its scorer and the val windows to fit the calibration on."""
    return "predictor" in inputs.scorers and inputs.val is not None


PREFETCH_STRATEGIES.add("predicted_eviction", PrefetchStrategy(
    "No prefetch (an empty plan, so the predictor is charged as when it prefetches), `predicted` eviction by the "
    "predictor's calibrated scores: what predicted eviction alone buys.",
    lambda inputs, steps, depth: np.full((*steps.routed.shape[:2], 1), -1, dtype=np.int64), _needs_val,
    policy="predicted", charged=True, replay_args=predictor_scores))
PREFETCH_STRATEGIES.add("predictor_evict", dataclasses.replace(
    _scored("predictor", "The predictor's top-m, and `predicted` eviction by its calibrated scores.", charged=True),
    policy="predicted", available=_needs_val, replay_args=predictor_scores))
PREFETCH_STRATEGIES.add("predictor_expert_gated", dataclasses.replace(
    _scored("predictor", "The predictor's top-d, each expert queued only when the gate's expected saving beats its "
                         "cost (calibrated P(used)); d tuned on val like predictor_gated.", charged=True, gated=True),
    replay_args=predictor_gate))


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off: a replay allocates millions of short-lived acyclic objects, and the
    collector's passes over the evaluate stage's large heap took about half of the replay's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Simulations:
    """simulate() of one set of decode steps under one cost model, each distinct call run once: strategies whose
    plans coincide (a gated strategy at depth 0 is on-demand, at depth m its ungated twin) share one replay. The
    key is every argument simulate() takes (the plan by its bytes); with no plan nothing is issued, so the
    predictor never runs and its cost is no part of the key."""

    def __init__(self, steps: DecodeSteps, cost: CostModel, horizon: int):
        self.steps, self.cost, self.horizon = steps, cost, horizon
        self.experts_per_token = steps.routed.shape[2] // steps.batch_size  # k of the batch compute scaling
        self._done: dict[tuple, dict] = {}

    def run(self, plan: np.ndarray | None, cache: CacheConfig, predictor_ms: float = 0.0, extra: dict | None = None) -> dict:
        """simulate() with `extra` keyword arguments (a strategy's replay_args: lead, use_scores, prefetch_probs)."""
        extra = extra or {}
        extra_key = tuple((name, _array_key(value) if isinstance(value, np.ndarray) else value)
                          for name, value in sorted(extra.items()))
        key = (_array_key(plan), dataclasses.astuple(cache), predictor_ms if plan is not None else 0.0, extra_key)
        if key not in self._done:
            with _gc_paused():
                self._done[key] = simulate(self.steps.routed, plan, cache, self.cost, self.horizon, predictor_ms,
                                           experts_per_token=self.experts_per_token, **extra)
        return self._done[key]


def _array_key(array: np.ndarray | None) -> tuple | None:
    """An array by its shape, dtype and a digest of its bytes (None stays None)."""
    if array is None:
        return None
    contiguous = np.ascontiguousarray(array)
    return contiguous.shape, contiguous.dtype.str, hashlib.blake2b(contiguous.tobytes(), digest_size=16).digest()


def _cache_config(params: CacheParams, capacity: int, strategy: PrefetchStrategy) -> CacheConfig:
    """The configured cache of `capacity` with the strategy's own policy if it names one."""
    return CacheConfig(capacity=capacity, per_layer=params.per_layer, policy=strategy.policy or params.policy,
                       seed=params.seed, prefetch_into=params.prefetch_into, staging_slots=params.staging_slots)


def _extra(strategy: PrefetchStrategy, inputs: ReplayInputs, steps: DecodeSteps, plan: np.ndarray | None) -> dict:
    """The strategy's extra simulate() arguments for this plan (none unless it has replay_args); across tokens a
    plan's lead is the horizon as an int, so the last h layers of a step issue into the next step (across_steps)."""
    extra = strategy.replay_args(inputs, steps, plan) if strategy.replay_args else {}
    if inputs.across_steps and plan is not None:
        extra.setdefault("lead", inputs.horizon)
    return extra


def _tuned_depth(strategy: PrefetchStrategy, val: ReplayInputs, runs: Simulations, params: CacheParams,
                 cache: CacheConfig) -> int:
    """The prefetch depth d in 1..m with the shortest val replay (ties to the smaller d) if it beats no prefetch by
    at least evaluate.cache.gate_margin of its time, else 0: the gate, fit where the test split is not seen, with a
    margin because a small val gain need not carry over. `runs` replay the val windows' decode steps (shared by
    every gated strategy, so d = 0 runs once)."""
    no_prefetch_ms = runs.run(None, cache)["time_ms"]
    charge = params.predictor_ms if strategy.charged else 0.0
    plans = {depth: strategy.plan(val, runs.steps, depth) for depth in range(1, val.m + 1)}
    times = {depth: runs.run(plan, cache, charge, _extra(strategy, val, runs.steps, plan))["time_ms"]
             for depth, plan in plans.items()}
    best = min(times, key=lambda depth: (times[depth], depth))
    return best if times[best] <= (1.0 - params.gate_margin) * no_prefetch_ms else 0


def _speedup_intervals(inputs: ReplayInputs, results: dict[str, dict]) -> dict[str, list[float]]:
    """strategy -> document-bootstrap 95% interval of its speedup over on_demand: per resample, on-demand's summed
    time over the drawn documents / the strategy's (paired; one step = one token at decode batch 1). A document's
    time is what its tokens add to the clock, cache state carried over from the document before it included."""
    codes = inputs.documents
    on_demand = np.bincount(codes, weights=results["on_demand"]["step_ms"], minlength=inputs.document_weights.shape[1])
    return {name: percentile_interval(pooled_ratios(on_demand, np.bincount(codes, weights=result["step_ms"],
                                                                           minlength=len(on_demand)),
                                                    inputs.document_weights))
            for name, result in results.items()}


def simulate_strategies(inputs: ReplayInputs, params: CacheParams, capacity: int, batch_size: int,
                        strategies: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Run every available strategy (of `strategies`, when given; on_demand and belady always, the speedups' base
    and the ideal's) through the same cache of `capacity`, decoding `batch_size` sequences at a time; then the ideal
    floor. A learned strategy's `fallback_prefetches` counts what its fallback layers listed."""
    steps = DecodeSteps(inputs, batch_size)
    cost = params.cost_model()
    runs = Simulations(steps, cost, inputs.horizon)
    val_runs = None
    results, depths, fallbacks = {}, {}, {}
    for name, strategy in PREFETCH_STRATEGIES.items():
        if strategy.available(inputs) and (strategies is None or name in strategies or name in ("on_demand", "belady")):
            cache = _cache_config(params, capacity, strategy)
            depth = inputs.m
            if strategy.gated:
                val_runs = val_runs or Simulations(DecodeSteps(inputs.val, batch_size), cost, inputs.horizon)
                depth = depths[name] = _tuned_depth(strategy, inputs.val, val_runs, params, cache)
            plan = strategy.plan(inputs, steps, depth)
            if strategy.learned:
                fallbacks[name] = steps.fallback_prefetches(plan)
            results[name] = runs.run(plan, cache, params.predictor_ms if strategy.charged else 0.0,
                                     _extra(strategy, inputs, steps, plan))
    base, ideal = results["on_demand"]["time_ms"], ideal_time_ms(results["belady"], cost)
    intervals = _speedup_intervals(inputs, results) if batch_size == 1 and inputs.documents is not None else {}
    summary = {}
    for name, result in results.items():
        summary[name] = {
            "hit_rate": result["hit_rate"],
            "late_hit_rate": result["late_hit_rate"],
            "late_wait_ms": result["late_wait_ms"],
            "bytes_moved": result["bytes_moved"],
            "wasted_prefetch_bytes": result["wasted_prefetch_bytes"],
            "cancelled_prefetches": result["cancelled"],
            "stall_ms": result["stall_ms"],
            "stall_per_token_ms": result["stall_ms"] / inputs.tokens,
            "time_per_token_ms": result["time_ms"] / inputs.tokens,
            "speedup_vs_on_demand": speedup(base, result["time_ms"]),
            **({"speedup_ci95": intervals[name]} if name in intervals else {}),
            "share_of_ideal": ideal_share(base, result["time_ms"], ideal),
            **({"prefetch_depth": depths[name]} if name in depths else {}),
            **({"fallback_prefetches": fallbacks[name]} if name in fallbacks else {}),
        }
    summary["ideal"] = {"time_per_token_ms": ideal / inputs.tokens, "speedup_vs_on_demand": speedup(base, ideal),
                        "share_of_ideal": 1.0}
    return summary
