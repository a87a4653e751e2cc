"""Expert-cache prefetch simulator: replays routed experts step by step, MoE layer by layer, on a discrete-event
timeline with one compute stream and one transfer link.

Inputs: routed (T, L, w) int, the experts used per step and layer (-1 = none; w is any width, e.g. a batch passes
the union of its tokens' experts padded with -1; repeats count once), and prefetch (T, L, m) int or None:
prefetch[t, l] lists experts predicted for layer l + horizon, best first, issued when layer l runs at step t
(entries whose target layer is >= L are ignored).

Caches: one pool per layer of `capacity` experts (per_layer) or one pool of `capacity` (layer, expert) pairs.
Prefetched experts go into the same pools; all pools start empty. Eviction follows the policy (policies.py); a
victim is never a protected key, and if every resident key is protected, none is evicted.

The link moves one expert at a time, taking transfer_ms each. Demand loads have priority over prefetches:
  - A prefetch is queued when issued and starts only when the link is free and no demand load is waiting, in
    issue order (a queued prefetch therefore never delays a demand load; a started one may, see pre-emption).
    Its target pool's slot is taken (by eviction) when it starts, not when it is issued.
  - Pre-emption (chunk_bytes > 0): a demand load arriving while a prefetch is in flight waits only until the
    prefetch's next chunk boundary; the prefetch resumes after the demand loads. chunk_bytes = 0: it waits for the
    whole transfer.
  - Cancellation: when layer l runs, every prefetch for layer l still queued is withdrawn. A withdrawn expert that
    layer l routes is demand-loaded (a miss); the others are `cancelled` and move no bytes.
When layer l of step t starts at clock c:
  1. Uses: each routed expert already resident is a hit: on time if its transfer has ended by c, else late, and
     the layer waits for its arrival (late_wait_ms). Hits update the policy first, so a miss cannot evict them.
  2. Misses: demand-loaded at c, after the in-flight transfer (or its chunk), never overlapped with compute
     (stall), then inserted. A demand load never evicts an expert routed at this same (t, l), nor the expert in
     flight; if nothing else can go, the expert is used without being cached.
  3. Prediction: when the strategy has a predictor cost (predictor_ms), it runs on the compute stream once the
     layer's experts are ready, delaying this layer's compute; the prefetch is issued when it ends.
  4. Prefetch: the experts listed at (t, l) that the target pool neither holds nor has queued are queued. When one
     starts, it may not evict an expert listed with it, nor (shared pool) one routed at the layer then running;
     one that finds no evictable slot is `dropped` (no bytes). Listed experts already resident keep their state.
     overlap_prefetch = false: prefetches are issued after compute and the step waits until they have all arrived.
  5. Compute: layer_compute_ms.
Counters: on-time and late hits, misses (demand loads), prefetches started, cancelled, dropped and pre-empted;
step_ms (T,): the time each step adds to the clock.
Prefetched experts evicted before their first use, or never used by the end, are wasted (their bytes moved).
time_ms ends when the last layer finishes computing; stall_ms = time_ms - compute time (predictor time included).
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field

import numpy as np

from moe_prefetch.evaluation.policies import EVICTION_POLICIES, EvictionPolicy, FutureUses, PoolFuture

__all__ = ["EVICTION_POLICIES", "CacheConfig", "CostModel", "ideal_time_ms", "ideal_share", "oracle_prefetch",
           "simulate", "speedup"]


@dataclass
class CostModel:
    """Transfer and compute costs: expert size, link bandwidth (GB/s = 1e9 B/s), compute per layer, and the
    pre-emption granularity of a prefetch in flight (0 = none)."""

    expert_bytes: float
    bandwidth_gbps: float
    layer_compute_ms: float
    overlap_prefetch: bool = True
    chunk_bytes: float = 0.0

    def __post_init__(self) -> None:
        if self.expert_bytes < 0 or self.bandwidth_gbps <= 0 or self.layer_compute_ms < 0 or self.chunk_bytes < 0:
            raise ValueError(
                f"need expert_bytes >= 0, bandwidth_gbps > 0, layer_compute_ms >= 0, chunk_bytes >= 0; got "
                f"{self.expert_bytes}, {self.bandwidth_gbps}, {self.layer_compute_ms}, {self.chunk_bytes}"
            )

    @property
    def transfer_ms(self) -> float:
        """Milliseconds to move one expert over the link."""
        return self.expert_bytes / (self.bandwidth_gbps * 1e9) * 1e3

    @property
    def chunk_ms(self) -> float:
        """Milliseconds to move one pre-emption chunk (0 = a prefetch in flight cannot be pre-empted)."""
        return min(self.chunk_bytes, self.expert_bytes) / (self.bandwidth_gbps * 1e9) * 1e3


@dataclass
class CacheConfig:
    """Experts held (per layer if per_layer, else in total), the eviction policy (a name in EVICTION_POLICIES) and
    the seed of the seeded policies."""

    capacity: int
    per_layer: bool = True
    policy: str = "lru"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, np.integer)) or self.capacity < 1:
            raise ValueError(f"cache capacity must be an int >= 1, got {self.capacity!r}")
        if self.policy not in EVICTION_POLICIES:
            raise ValueError(f"cache policy {self.policy!r} is not one of {EVICTION_POLICIES.names()}")


class _Pool:
    """One cache pool: resident keys, the policy's eviction state, and prefetch bookkeeping."""

    def __init__(self, capacity: int, policy: EvictionPolicy) -> None:
        self.capacity = capacity
        self.policy = policy
        self.resident: set[int] = set()
        self.queued: set[int] = set()  # keys with a prefetch queued, not started
        self.unused_prefetch: set[int] = set()  # prefetched keys not used yet
        self.arrival_ms: dict[int, float] = {}  # prefetched keys not used yet -> time their transfer ends
        self.wasted = 0  # prefetched keys evicted before their first use

    def insert(self, key: int, tick: int, protected: Container[int], is_use: bool) -> bool:
        """Insert a non-resident key, evicting by policy outside `protected`; False if nothing can go."""
        if len(self.resident) >= self.capacity:
            victim = self.policy.victim(protected)
            if victim is None:
                return False
            self._evict(victim)
        self.resident.add(key)
        self.policy.on_insert(key, tick, is_use)
        return True

    def _evict(self, key: int) -> None:
        """Remove a key, counting it as wasted if it was prefetched and never used."""
        self.resident.remove(key)
        self.policy.on_evict(key)
        if key in self.unused_prefetch:
            self.unused_prefetch.discard(key)
            self.wasted += 1
        self.arrival_ms.pop(key, None)


@dataclass
class _Prefetch:
    """One prefetch on the link: queued at `issue_ms` for layer `target`, then in flight from start_ms to end_ms."""

    pool: _Pool
    key: int
    target: int
    issue_ms: float
    listed: dict[int, None]  # the keys issued with it (it may not evict them)
    start_ms: float = math.nan
    end_ms: float = math.nan


@dataclass
class _Counters:
    on_time_hits: int = 0
    late_hits: int = 0
    late_wait_ms: float = 0.0
    prefetched: int = 0
    prefetch_hits: int = 0
    cancelled: int = 0
    dropped: int = 0
    preempted: int = 0
    predictor_ms: float = 0.0
    misses_by_layer: list[int] = field(default_factory=list)


def _check_inputs(routed: np.ndarray, prefetch: np.ndarray | None, horizon: int) -> None:
    """Raise ValueError on bad shapes, ids below -1 or a horizon below 1."""
    if routed.ndim != 3:
        raise ValueError(f"routed must be (T, L, k), got shape {routed.shape}")
    if routed.size and routed.min() < -1:
        raise ValueError("routed expert ids must be >= -1")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if prefetch is not None:
        if prefetch.ndim != 3 or prefetch.shape[:2] != routed.shape[:2]:
            raise ValueError(f"prefetch shape {prefetch.shape} must be (T, L, m) with (T, L) = {routed.shape[:2]}")
        if prefetch.size and prefetch.min() < -1:
            raise ValueError("prefetch expert ids must be >= -1")


class _Replay:
    """Clock, link and counters of one replay; run_layer applies steps 1-5 of the module docstring."""

    def __init__(self, pools: list[_Pool], offsets: list[int], shared: bool, cost: CostModel, predictor_ms: float,
                 future: FutureUses) -> None:
        self.pools, self.offsets, self.shared = pools, offsets, shared
        self.transfer_ms, self.chunk_ms = cost.transfer_ms, cost.chunk_ms
        self.compute_ms, self.overlap, self.predictor_ms = cost.layer_compute_ms, cost.overlap_prefetch, predictor_ms
        self.future = future
        self.clock = 0.0
        self.link_free = 0.0  # when the link finishes the transfer in flight (or the last demand load)
        self.in_flight: _Prefetch | None = None  # the last prefetch started (in flight while its end_ms > clock)
        self.queue: list[_Prefetch] = []  # prefetches not started, in issue order
        self.running: dict[int, None] = {}  # keys of the layer computing now (a shared pool protects them)
        self.tick = 0  # event counter handed to the eviction policy (recency)
        self.counts = _Counters(misses_by_layer=[0] * len(pools))

    def run_layer(self, layer: int, routed_row: list[int], target: int | None, prefetch_row: list[int]) -> None:
        """Run one layer of one step; queue prefetch_row for layer `target` unless target is None."""
        offset = self.offsets[layer]
        # A dict keeps first-seen order and doubles as the protected set (O(1) membership).
        keys = dict.fromkeys(e + offset for e in routed_row if e >= 0)
        self._start_prefetches(self.clock)
        self._use(self.pools[layer], layer, keys)
        self.running = keys
        if target is not None:
            if self.predictor_ms:
                self.clock += self.predictor_ms  # 3. the predictor runs on the compute stream
                self.counts.predictor_ms += self.predictor_ms
            issue_ms = self.clock if self.overlap else self.clock + self.compute_ms
            self._issue(target, prefetch_row, issue_ms)
        self.clock += self.compute_ms  # 5. compute
        if not self.overlap:
            self._start_prefetches(math.inf)
            self.clock = max(self.clock, self.link_free)

    def _start_prefetches(self, now: float) -> None:
        """Start, in issue order, every queued prefetch the link can begin before `now` (a demand load at `now`
        goes first)."""
        while self.queue:
            prefetch = self.queue[0]
            start = max(self.link_free, prefetch.issue_ms)
            if start >= now:
                return
            self.queue.pop(0)
            pool = prefetch.pool
            pool.queued.discard(prefetch.key)
            if prefetch.key in pool.resident:  # demand-loaded meanwhile (shared pool): nothing to move
                self.counts.cancelled += 1
                continue
            guard = prefetch.listed | self.running if self.shared else prefetch.listed
            self.tick += 1
            if not pool.insert(prefetch.key, self.tick, guard, is_use=False):
                self.counts.dropped += 1
                continue
            prefetch.start_ms, prefetch.end_ms = start, start + self.transfer_ms
            pool.arrival_ms[prefetch.key] = prefetch.end_ms
            pool.unused_prefetch.add(prefetch.key)
            self.link_free = prefetch.end_ms
            self.in_flight = prefetch
            self.counts.prefetched += 1

    def _use(self, pool: _Pool, layer: int, keys: dict[int, None]) -> None:
        """Withdraw this layer's queued prefetches, then 1. hits (waiting for late ones), 2. demand loads."""
        counts, now = self.counts, self.clock
        withdrawn = [prefetch for prefetch in self.queue if prefetch.target == layer]
        if withdrawn:
            self.queue = [prefetch for prefetch in self.queue if prefetch.target != layer]
            for prefetch in withdrawn:
                pool.queued.discard(prefetch.key)
                counts.cancelled += prefetch.key not in keys  # a routed one becomes a demand load below
        self.future.now += 1
        ready = now
        missing = []
        for key in keys:  # hits first, so a miss cannot evict a hit of this same step
            if key not in pool.resident:
                missing.append(key)
                continue
            self.tick += 1
            pool.policy.on_use(key, self.tick)
            if key in pool.unused_prefetch:
                pool.unused_prefetch.discard(key)
                counts.prefetch_hits += 1
            arrival = pool.arrival_ms.pop(key, now)
            if arrival > now:
                counts.late_hits += 1
                counts.late_wait_ms += arrival - now
                ready = max(ready, arrival)
            else:
                counts.on_time_hits += 1
        if missing:
            ready = max(ready, self._demand_load(pool, layer, keys, missing, now))
        self.clock = ready

    def _demand_load(self, pool: _Pool, layer: int, keys: dict[int, None], missing: list[int], now: float) -> float:
        """Load `missing` at `now` ahead of every queued prefetch (pre-empting the one in flight at a chunk boundary
        when it is not needed now); returns when the last one arrives."""
        start = max(now, self.link_free)
        in_flight = self.in_flight if self.in_flight is not None and self.in_flight.end_ms > now else None
        preempt = in_flight is not None and self.chunk_ms > 0 and in_flight.key not in keys
        if preempt:
            chunks_done = math.ceil((now - in_flight.start_ms) / self.chunk_ms - 1e-9)
            start = max(now, min(in_flight.end_ms, in_flight.start_ms + chunks_done * self.chunk_ms))
        end = start + len(missing) * self.transfer_ms
        self.link_free = end
        if preempt and in_flight.end_ms > start:
            in_flight.end_ms = end + (in_flight.end_ms - start)  # the rest of the prefetch after the demand loads
            in_flight.pool.arrival_ms[in_flight.key] = self.link_free = in_flight.end_ms
            self.counts.preempted += 1
        self.counts.misses_by_layer[layer] += len(missing)
        protected = keys if in_flight is None or in_flight.pool is not pool else keys | {in_flight.key: None}
        for key in missing:
            self.tick += 1
            pool.insert(key, self.tick, protected, is_use=True)
        return end

    def _issue(self, target: int, prefetch_row: list[int], issue_ms: float) -> None:
        """4. queue the listed experts the target pool neither holds nor has queued."""
        pool, offset = self.pools[target], self.offsets[target]
        listed = dict.fromkeys(e + offset for e in prefetch_row if e >= 0)
        for key in listed:
            if key not in pool.resident and key not in pool.queued:
                pool.queued.add(key)
                self.queue.append(_Prefetch(pool, key, target, issue_ms, listed))


def simulate(routed: np.ndarray, prefetch: np.ndarray | None, cache: CacheConfig, cost: CostModel, horizon: int,
             predictor_ms: float = 0.0) -> dict[str, float | list[int]]:
    """Replay `routed` with optional `prefetch` through the cache; see the module docstring for rules.
    `predictor_ms`: the predictor's time on the compute stream per layer that issues a prefetch."""
    routed = np.asarray(routed, dtype=np.int64)
    prefetch = None if prefetch is None else np.asarray(prefetch, dtype=np.int64)
    _check_inputs(routed, prefetch, horizon)
    if predictor_ms < 0:
        raise ValueError(f"predictor_ms must be >= 0, got {predictor_ms}")
    steps, layers, _ = routed.shape
    # (layer, expert) as layer * stride + expert: the keys of a shared pool, and of the future uses in both modes.
    stride = 1 + max(int(routed.max(initial=-1)), -1 if prefetch is None else int(prefetch.max(initial=-1)))
    layer_keys = [layer * stride for layer in range(layers)]
    offsets = [0] * layers if cache.per_layer else layer_keys
    future = FutureUses(routed, layer_keys)
    policy = EVICTION_POLICIES[cache.policy]
    distinct = [_Pool(cache.capacity, policy(cache.capacity, PoolFuture(future, layer_keys[pool] if cache.per_layer else 0),
                                             cache.seed + pool))
                for pool in range(layers if cache.per_layer else 1)]
    pools = distinct if cache.per_layer else distinct * layers
    replay = _Replay(pools, offsets, not cache.per_layer, cost, predictor_ms, future)
    routed_rows = routed.tolist()  # Python lists: per-element numpy indexing would dominate the loop
    prefetch_rows = prefetch.tolist() if prefetch is not None else None
    no_prefetch: list[int] = []
    step_end_ms = np.zeros(steps)
    for step in range(steps):
        for layer in range(layers):
            target = layer + horizon if prefetch_rows is not None and layer + horizon < layers else None
            prefetch_row = prefetch_rows[step][layer] if target is not None else no_prefetch
            replay.run_layer(layer, routed_rows[step][layer], target, prefetch_row)
        step_end_ms[step] = replay.clock
    return {**_summary(replay, distinct, steps, cost), "step_ms": np.diff(step_end_ms, prepend=0.0)}


def _summary(replay: _Replay, distinct_pools: list[_Pool], steps: int, cost: CostModel) -> dict[str, float | list[int]]:
    """Assemble the result dict from the replay's counters."""
    counts = replay.counts
    # Prefetches still unused when the replay ends were never used: they are wasted too.
    wasted = sum(pool.wasted + len(pool.unused_prefetch) for pool in distinct_pools)
    misses = sum(counts.misses_by_layer)
    hits = counts.on_time_hits + counts.late_hits
    uses = hits + misses
    compute_total = steps * len(counts.misses_by_layer) * cost.layer_compute_ms
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
        "prefetched": float(counts.prefetched),
        "prefetch_hits": float(counts.prefetch_hits),
        "cancelled": float(counts.cancelled),
        "dropped": float(counts.dropped),
        "preempted": float(counts.preempted),
        "bytes_moved": (misses + counts.prefetched) * cost.expert_bytes,
        "demand_bytes": misses * cost.expert_bytes,
        "prefetch_bytes": counts.prefetched * cost.expert_bytes,
        "wasted_prefetch_bytes": wasted * cost.expert_bytes,
        "predictor_ms": counts.predictor_ms,
        "stall_ms": max(0.0, clock - compute_total),
        "compute_ms": compute_total,
        "time_ms": clock,
        "time_per_step_ms": clock / steps if steps else math.nan,
    }


def ideal_time_ms(belady_demand: dict, cost: CostModel) -> float:
    """The floor no strategy can beat with this cache: max(compute, Belady's demand loads x transfer time). Belady's
    MIN needs the fewest loads of any policy, prefetching or not, and they share one link; compute cannot shrink."""
    return max(belady_demand["compute_ms"], belady_demand["misses"] * cost.transfer_ms)


def oracle_prefetch(routed: np.ndarray, horizon: int, m: int) -> np.ndarray:
    """Perfect-knowledge prefetch (T, L, m): prefetch[t, l] = routed[t, l + horizon] cut/padded with -1 to m."""
    routed = np.asarray(routed, dtype=np.int64)
    if routed.ndim != 3 or horizon < 1 or m < 1:
        raise ValueError(f"need routed (T, L, k), horizon >= 1, m >= 1; got {routed.shape}, {horizon}, {m}")
    steps, layers, width = routed.shape
    prefetch = np.full((steps, layers, m), -1, dtype=np.int64)  # (T, L, m)
    kept = min(m, width)  # routed is best-first, so a short prefetch keeps the highest-weight experts
    if horizon < layers:
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
