"""Expert-cache prefetch simulator: replays routed experts step by step, MoE layer by layer, on a discrete-event
timeline with one compute stream and `links` transfer links (the timeline lives in timeline.py).

Inputs: routed (T, L, w) int, the experts used per step and layer (-1 = none; w is any width, e.g. a batch passes
the union of its tokens' experts padded with -1; repeats count once), and prefetch (T, L, m) int or None:
prefetch[t, l] lists experts, best first, issued when layer l runs at step t, for the target position
t * L + l + lead. lead = None (the default) targets layer l + horizon of the same step, and entries whose target
layer is >= L are ignored; an int lead (>= 1) may pass L: the target is then layer (l + lead) % L of step
t + (l + lead) // L (lead = L: the next token's same layer), and targets past the last step are ignored. Optional,
for the predictor-guided rules: use_scores (T, L, E) float, use_scores[t, l, e] = the scorer's P(layer l of step t
uses e) (NaN = none), issued with the prediction of that target, at position t * L + l - lead' (lead' = lead, or
horizon); prefetch_probs (T, L, m) float, the P(used) of each entry of prefetch (NaN = none).

Caches: one pool per layer of `capacity` experts (per_layer) or one pool of `capacity` (layer, expert) pairs; all
pools start empty. prefetch_into = cache: prefetched experts go into the same pools. prefetch_into = staging (and
a prefetch plan given): each pool gives min(staging_slots, capacity - 1) of its slots to a staging buffer that only
prefetches enter (a full one drops its oldest staged expert not listed with the new one); a staged expert is a
hit like a cached one and, when used, is promoted into the cache (evicting by policy; it stays staged if nothing
can go). A replay without prefetch keeps every slot in the cache. Eviction follows the policy (policies.py); a
victim is never a protected key, and if every resident key is protected, none is evicted.
Scores (use_scores given): the policies, the prefetch guard and the gate see, for layer l, the scores of the
latest step whose issue position has passed (the prediction step of that position, see 3), never a later one;
before any is issued, none (NaN). `predicted` eviction evicts the lowest such score (policies.py).

The links move one expert at a time each, taking transfer_ms; an expert goes on the link that frees up first
(the lowest index among ties). Demand loads have priority over prefetches:
  - A prefetch is queued when issued and starts only when a link is free and no demand load is waiting, in
    issue order (a queued prefetch therefore never delays a demand load; a started one may, see pre-emption).
    Its slot (cache or staging) is taken (by eviction) when it starts, not when it is issued.
  - Pre-emption (chunk_bytes > 0): a demand load arriving while a prefetch is in flight on its link waits only
    until the prefetch's next chunk boundary; the prefetch resumes after the demand loads. chunk_bytes = 0: it
    waits for the whole transfer.
  - Cancellation: when the target position runs, every prefetch for it still queued is withdrawn. A withdrawn
    expert that the layer routes is a miss; the others are `cancelled` and move no bytes.
When layer l of step t starts at clock c:
  1. Uses: each routed expert already resident (cached or staged) is a hit: on time if its transfer has ended by
     c, else late, and the layer waits for its arrival (late_wait_ms). Hits update the policy first, so a miss
     cannot evict them.
  2. Misses: miss_path = transfer: demand-loaded at c, after the in-flight transfer (or its chunk) of the link
     each takes, never overlapped with compute (stall), then inserted. A demand load never evicts an expert
     routed at this same (t, l), nor an expert in flight; if nothing else can go, the expert is used without
     being cached. miss_path = cpu (Fiddler-style): each missing expert is computed on the CPU, cpu_expert_ms
     each one after another, in parallel with the GPU's compute of the layer (see 5); nothing moves (the
     activations crossing the link are negligible) and nothing is cached. On that path a resident expert still
     in flight whose arrival is more than cpu_expert_ms after c is computed on the CPU too (a miss; its transfer
     still lands) instead of waited for.
  3. Prediction: when the strategy has a predictor cost (predictor_ms), it runs on the compute stream once the
     layer's experts are ready, delaying this layer's compute; the prefetch is issued when it ends. The scores
     issued at this position become visible here (after this layer's misses).
  4. Prefetch: the experts listed at (t, l) that the target pool neither holds nor has queued are queued (with
     prefetch_probs, only those the gate G passes). When one starts, it may not evict an expert listed with it,
     nor one routed at the layer then running if that layer shares its pool (a shared pool, or a lead reaching the
     same layer of a later step), nor (prefetch_into = cache with use_scores) a cached
     expert whose score is higher than its own (an unknown score guards nothing); one that finds no evictable
     slot is `dropped` (no bytes). Listed experts already resident keep their state. overlap_prefetch = false:
     prefetches are issued after compute and the step waits until they have all arrived.
  5. Compute: layer_compute_ms x ((1 - s) + s x distinct / k), distinct = the distinct experts the layer runs,
     s = expert_compute_share (the share of a batch-1 layer's compute that reads its k experts' weights), k =
     experts_per_token (routed experts per token); s = 0: layer_compute_ms whatever the batch. With misses on
     the CPU: max(the same with only the resident experts, misses x cpu_expert_ms).
Gate G (prefetch_probs given), for a listed expert with P(used) p, at issue time i with lead h (layers):
  queued iff p x saving > (1 - p) x cost, where
  saving = max(0, miss - lateness): miss = transfer_ms (cpu_expert_ms on the CPU path) is what a hit avoids;
    lateness = max(0, arrival - (i + h x layer_compute_ms)), arrival = i + backlog / links + transfer_ms, backlog =
    the links' remaining busy time after i plus transfer_ms per prefetch queued ahead;
  cost = the wait it can impose on a demand load (chunk_ms, or transfer_ms without pre-emption) + the eviction
    loss: the victim's (the policy's pick now; staging: the oldest staged) score x miss, an unknown score counting
    as 1 and a free slot as 0. p = NaN or 0: never queued (`gated_out`).
Counters: on-time and late hits, misses (demand loads or CPU experts), prefetches started, cancelled, dropped,
gated out and pre-empted; step_ms (T,): the time each step adds to the clock.
Prefetched experts evicted before their first use, or never used by the end, are wasted (their bytes moved).
time_ms ends when the last layer finishes computing; compute_ms sums step 5 with every expert resident;
stall_ms = time_ms - compute_ms (predictor time and CPU time beyond the GPU's included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe_prefetch.evaluation.policies import EVICTION_POLICIES, FutureUses, IssuedScores, PoolFuture, PoolScores
from moe_prefetch.evaluation.pools import Pool
from moe_prefetch.evaluation.timeline import Replay, Timing

__all__ = ["EVICTION_POLICIES", "MISS_PATHS", "PREFETCH_TARGETS", "CacheConfig", "CostModel", "ideal_time_ms",
           "ideal_share", "oracle_prefetch", "simulate", "speedup"]

MISS_PATHS = ("transfer", "cpu")  # where a missing expert is computed: moved to the GPU, or computed on the CPU
PREFETCH_TARGETS = ("cache", "staging")  # where prefetched experts land


@dataclass
class CostModel:
    """Transfer and compute costs: expert size, link bandwidth (GB/s = 1e9 B/s) and parallel links, compute per
    layer and the share of it that reads the experts' weights (batch compute scaling), the pre-emption granularity
    of a prefetch in flight (0 = none), and where a missing expert is computed (MISS_PATHS; `cpu`: cpu_expert_ms
    each)."""

    expert_bytes: float
    bandwidth_gbps: float
    layer_compute_ms: float
    overlap_prefetch: bool = True
    chunk_bytes: float = 0.0
    links: int = 1
    expert_compute_share: float = 0.0
    miss_path: str = "transfer"
    cpu_expert_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.expert_bytes < 0 or self.bandwidth_gbps <= 0 or self.layer_compute_ms < 0 or self.chunk_bytes < 0:
            raise ValueError(
                f"need expert_bytes >= 0, bandwidth_gbps > 0, layer_compute_ms >= 0, chunk_bytes >= 0; got "
                f"{self.expert_bytes}, {self.bandwidth_gbps}, {self.layer_compute_ms}, {self.chunk_bytes}"
            )
        if isinstance(self.links, bool) or not isinstance(self.links, (int, np.integer)) or self.links < 1:
            raise ValueError(f"links must be an int >= 1, got {self.links!r}")
        if not 0.0 <= self.expert_compute_share <= 1.0:
            raise ValueError(f"expert_compute_share must be in [0, 1], got {self.expert_compute_share}")
        if self.miss_path not in MISS_PATHS:
            raise ValueError(f"miss_path {self.miss_path!r} is not one of {', '.join(MISS_PATHS)}")
        if self.cpu_expert_ms < 0 or (self.miss_path == "cpu" and self.cpu_expert_ms <= 0):
            raise ValueError(f"cpu_expert_ms must be > 0 on the cpu miss path (>= 0 otherwise), got {self.cpu_expert_ms}")

    @property
    def transfer_ms(self) -> float:
        """Milliseconds to move one expert over a link."""
        return self.expert_bytes / (self.bandwidth_gbps * 1e9) * 1e3

    @property
    def chunk_ms(self) -> float:
        """Milliseconds to move one pre-emption chunk (0 = a prefetch in flight cannot be pre-empted)."""
        return min(self.chunk_bytes, self.expert_bytes) / (self.bandwidth_gbps * 1e9) * 1e3


@dataclass
class CacheConfig:
    """Experts held (per layer if per_layer, else in total), the eviction policy (a name in EVICTION_POLICIES), the
    seed of the seeded policies, and where prefetches land (PREFETCH_TARGETS; `staging`: staging_slots of the
    capacity, per pool, hold only prefetches)."""

    capacity: int
    per_layer: bool = True
    policy: str = "lru"
    seed: int = 0
    prefetch_into: str = "cache"
    staging_slots: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, np.integer)) or self.capacity < 1:
            raise ValueError(f"cache capacity must be an int >= 1, got {self.capacity!r}")
        if self.policy not in EVICTION_POLICIES:
            raise ValueError(f"cache policy {self.policy!r} is not one of {EVICTION_POLICIES.names()}")
        if self.prefetch_into not in PREFETCH_TARGETS:
            raise ValueError(f"prefetch_into {self.prefetch_into!r} is not one of {', '.join(PREFETCH_TARGETS)}")
        if self.prefetch_into == "staging" and (isinstance(self.staging_slots, bool) or self.staging_slots < 1):
            raise ValueError(f"staging_slots must be an int >= 1 when prefetching into staging, got {self.staging_slots!r}")

    def staging(self, prefetching: bool) -> int:
        """Staging slots per pool: min(staging_slots, capacity - 1) when prefetches land in staging, else 0."""
        return min(self.staging_slots, self.capacity - 1) if prefetching and self.prefetch_into == "staging" else 0


def _check_inputs(routed: np.ndarray, prefetch: np.ndarray | None, horizon: int, lead: int | None,
                  use_scores: np.ndarray | None, prefetch_probs: np.ndarray | None) -> None:
    """Raise ValueError on bad shapes, ids below -1 or a horizon or lead below 1."""
    if routed.ndim != 3:
        raise ValueError(f"routed must be (T, L, k), got shape {routed.shape}")
    if routed.size and routed.min() < -1:
        raise ValueError("routed expert ids must be >= -1")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if lead is not None and lead < 1:
        raise ValueError(f"lead must be >= 1 (or None), got {lead}")
    if prefetch is not None:
        if prefetch.ndim != 3 or prefetch.shape[:2] != routed.shape[:2]:
            raise ValueError(f"prefetch shape {prefetch.shape} must be (T, L, m) with (T, L) = {routed.shape[:2]}")
        if prefetch.size and prefetch.min() < -1:
            raise ValueError("prefetch expert ids must be >= -1")
    if use_scores is not None and (use_scores.ndim != 3 or use_scores.shape[:2] != routed.shape[:2]):
        raise ValueError(f"use_scores shape {use_scores.shape} must be (T, L, E) with (T, L) = {routed.shape[:2]}")
    if prefetch_probs is not None and (prefetch is None or prefetch_probs.shape != prefetch.shape):
        raise ValueError(f"prefetch_probs shape {prefetch_probs.shape} must equal the prefetch plan's "
                         f"{None if prefetch is None else prefetch.shape}")


def simulate(routed: np.ndarray, prefetch: np.ndarray | None, cache: CacheConfig, cost: CostModel, horizon: int,
             predictor_ms: float = 0.0, *, lead: int | None = None, use_scores: np.ndarray | None = None,
             prefetch_probs: np.ndarray | None = None, experts_per_token: int | None = None) -> dict[str, float | list[int]]:
    """Replay `routed` with optional `prefetch` through the cache; see the module docstring for rules.
    `predictor_ms`: the predictor's time on the compute stream per layer that issues a prefetch; `lead`: the
    prefetch's lead in layers, possibly into later steps (None: horizon, within the step); `use_scores` (T, L, E)
    and `prefetch_probs` (T, L, m): the predictor's probabilities for the predicted eviction, the prefetch guard and
    the gate; `experts_per_token`: k of the batch compute scaling (None: routed's width)."""
    routed = np.asarray(routed, dtype=np.int64)
    prefetch = None if prefetch is None else np.asarray(prefetch, dtype=np.int64)
    use_scores = None if use_scores is None else np.asarray(use_scores, dtype=np.float64)
    prefetch_probs = None if prefetch_probs is None else np.asarray(prefetch_probs, dtype=np.float64)
    _check_inputs(routed, prefetch, horizon, lead, use_scores, prefetch_probs)
    if predictor_ms < 0:
        raise ValueError(f"predictor_ms must be >= 0, got {predictor_ms}")
    steps, layers, width = routed.shape
    k = width if experts_per_token is None else experts_per_token
    if k < 1:
        raise ValueError(f"experts_per_token must be >= 1, got {k}")
    # (layer, expert) as layer * stride + expert: the keys of a shared pool, and of the future uses in both modes.
    stride = 1 + max(int(routed.max(initial=-1)), -1 if prefetch is None else int(prefetch.max(initial=-1)))
    layer_keys = [layer * stride for layer in range(layers)]
    offsets = np.zeros(layers, dtype=np.int64) if cache.per_layer else np.asarray(layer_keys, dtype=np.int64)
    future = FutureUses(routed, layer_keys)
    ahead = horizon if lead is None else lead  # a prefetch targets the position `ahead` after the one issuing it
    issued = None if use_scores is None else IssuedScores(use_scores, ahead)
    policy = EVICTION_POLICIES[cache.policy]
    staging = cache.staging(prefetch is not None)
    distinct = []
    for pool in range(layers if cache.per_layer else 1):
        scores = None if issued is None else PoolScores(issued, pool if cache.per_layer else None, stride)
        pool_future = PoolFuture(future, layer_keys[pool] if cache.per_layer else 0)
        state = policy(cache.capacity - staging, pool_future, cache.seed + pool, scores)
        distinct.append(Pool(cache.capacity - staging, state, staging, scores))
    pools = distinct if cache.per_layer else distinct * layers
    timing = Timing(cost.transfer_ms, cost.chunk_ms, cost.layer_compute_ms, cost.overlap_prefetch, predictor_ms,
                    cost.links, cost.expert_compute_share, k, cost.cpu_expert_ms if cost.miss_path == "cpu" else None,
                    staging > 0, width)
    # Python lists of pool keys (-1 = none): per-element numpy indexing would dominate the loop. A listed expert is
    # keyed in its target layer's pool, (layer + ahead) % L.
    key_rows = _pool_keys(routed, offsets)
    listed_rows = probs_rows = None
    if prefetch is not None:
        listed_rows = _pool_keys(prefetch, np.roll(offsets, -ahead))
        probs_rows = prefetch_probs.tolist() if prefetch_probs is not None else None
    # The layers that issue: every one with an int lead (until the targets pass the last step), else those whose
    # target layer l + horizon exists.
    issuing = [prefetch is not None and (lead is not None or layer + horizon < layers) for layer in range(layers)]
    replay = Replay(pools, not cache.per_layer, timing, future, issued, ahead, issuing, steps * layers - 1)
    step_end_ms = []
    for step, keys_rows in enumerate(key_rows):
        replay.run_step(step * layers, keys_rows, None if listed_rows is None else listed_rows[step],
                        None if probs_rows is None else probs_rows[step])
        step_end_ms.append(replay.clock)
    return {**_summary(replay, distinct, steps, cost), "step_ms": np.diff(np.array(step_end_ms, dtype=np.float64), prepend=0.0)}


def _pool_keys(experts: np.ndarray, offsets: np.ndarray) -> list[list[list[int]]]:
    """(T, L, w) expert ids (-1 = none) as nested lists of pool keys: the id + offsets[l] (-1 stays -1)."""
    if not offsets.any():  # per-layer pools: the keys are the ids
        return experts.tolist()
    return np.where(experts >= 0, experts + offsets[:, None], -1).tolist()


def _summary(replay: Replay, distinct_pools: list[Pool], steps: int, cost: CostModel) -> dict[str, float | list[int]]:
    """Assemble the result dict from the replay's counters."""
    counts = replay.counts
    # Prefetches still unused when the replay ends were never used: they are wasted too.
    wasted = sum(pool.wasted + len(pool.unused_prefetch) for pool in distinct_pools)
    misses = sum(counts.misses_by_layer)
    loaded = misses - counts.cpu_experts  # demand loads (CPU experts move nothing)
    hits = counts.on_time_hits + counts.late_hits
    uses = hits + misses
    # Without batch scaling or the CPU path every layer computes layer_compute_ms: the product, as before, not a sum.
    compute_total = counts.compute_ms if replay.counted else (
        steps * len(counts.misses_by_layer) * cost.layer_compute_ms)
    clock = replay.clock
    return {
        "hit_rate": counts.on_time_hits / uses if uses else math.nan,
        "late_hit_rate": counts.late_hits / uses if uses else math.nan,
        "hits": float(hits),
        "on_time_hits": float(counts.on_time_hits),
        "late_hits": float(counts.late_hits),
        "late_wait_ms": counts.late_wait_ms,
        "misses": float(misses),
        "misses_by_layer": counts.misses_by_layer,
        "cpu_experts": float(counts.cpu_experts),
        "prefetched": float(counts.prefetched),
        "prefetch_hits": float(counts.prefetch_hits),
        "cancelled": float(counts.cancelled),
        "dropped": float(counts.dropped),
        "gated_out": float(counts.gated_out),
        "preempted": float(counts.preempted),
        "bytes_moved": (loaded + counts.prefetched) * cost.expert_bytes,
        "demand_bytes": loaded * cost.expert_bytes,
        "prefetch_bytes": counts.prefetched * cost.expert_bytes,
        "wasted_prefetch_bytes": wasted * cost.expert_bytes,
        "predictor_ms": counts.predictor_ms,
        "stall_ms": max(0.0, clock - compute_total),
        "compute_ms": compute_total,
        "time_ms": clock,
        "time_per_step_ms": clock / steps if steps else math.nan,
    }


def ideal_time_ms(belady_demand: dict, cost: CostModel) -> float:
    """The floor no strategy can beat with this cache: max(compute, Belady's demand loads x transfer time / links).
    Belady's MIN needs the fewest loads of any policy, prefetching or not, and they share the links; compute cannot
    shrink. On the cpu miss path nothing need move: the floor is the compute with every expert resident (a floor
    while an expert computes slower on the CPU than on the GPU, cpu_expert_ms >= layer_compute_ms x s / k)."""
    if cost.miss_path == "cpu":
        return belady_demand["compute_ms"]
    return max(belady_demand["compute_ms"], belady_demand["misses"] * cost.transfer_ms / cost.links)


def stream_ahead(values: np.ndarray, ahead: int, fill) -> np.ndarray:
    """(T, L, ...) -> the same shape holding, at [t, l], the values of stream position t * L + l + ahead (later rows
    included: what simulate's int lead targets), `fill` past the last position."""
    flat = values.reshape(values.shape[0] * values.shape[1], *values.shape[2:])
    shifted = np.full_like(flat, fill)
    shifted[: max(len(flat) - ahead, 0)] = flat[ahead:]
    return shifted.reshape(values.shape)


def oracle_prefetch(routed: np.ndarray, horizon: int, m: int, wrap: bool = False) -> np.ndarray:
    """Perfect-knowledge prefetch (T, L, m): prefetch[t, l] = routed[t, l + horizon] cut/padded with -1 to m; with
    `wrap`, the experts of position t * L + l + horizon (later steps included, as simulate's `lead`)."""
    routed = np.asarray(routed, dtype=np.int64)
    if routed.ndim != 3 or horizon < 1 or m < 1:
        raise ValueError(f"need routed (T, L, k), horizon >= 1, m >= 1; got {routed.shape}, {horizon}, {m}")
    steps, layers, width = routed.shape
    prefetch = np.full((steps, layers, m), -1, dtype=np.int64)  # (T, L, m)
    kept = min(m, width)  # routed is best-first, so a short prefetch keeps the highest-weight experts
    if wrap:
        prefetch[:, :, :kept] = stream_ahead(routed[:, :, :kept], horizon, -1)
    elif horizon < layers:
        prefetch[:, : layers - horizon, :kept] = routed[:, horizon:, :kept]
    return prefetch


def speedup(baseline_time: float, time: float) -> float:
    """How many times faster `time` is than `baseline_time` (> 1 = faster)."""
    if time <= 0:
        raise ValueError(f"time must be > 0, got {time}")
    return baseline_time / time


def ideal_share(on_demand: float, strategy: float, ideal: float) -> float:
    """Share of the ideal's time saving the strategy achieves: (t_demand - t_strategy) / (t_demand - t_ideal).

    Returns 0.0 when the ideal saves no time (gain <= 0 or not finite): there is nothing to share. Negative when the
    strategy is slower than on-demand; at most 1 when `ideal` is the floor (ideal_time_ms).
    """
    gain = on_demand - ideal
    if not math.isfinite(gain) or gain <= 0.0:
        return 0.0
    return (on_demand - strategy) / gain
