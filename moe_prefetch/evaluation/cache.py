"""Expert-cache prefetch simulator: replays routed experts step by step, MoE layer by layer.

Inputs: routed (T, L, w) int, the experts used per step and layer (-1 = none; w is any width,
e.g. a batch passes the union of its tokens' experts padded with -1; repeats count once), and
prefetch (T, L, m) int or None: prefetch[t, l] lists experts predicted for layer l + horizon,
issued when layer l runs at step t (entries whose target layer is >= L are ignored).

Caches: one pool per layer of `capacity` experts (per_layer) or one pool of `capacity`
(layer, expert) pairs. Prefetched experts go INTO the same pools; all pools start empty.
Eviction policies (EVICTION_POLICIES; CacheConfig.policy and evaluate.cache.policy accept exactly
these names) keep only the eviction state of a pool, told of every insertion, use and eviction:
  lru  evicts the least recently used (inserted or hit)
  lfu  evicts the fewest uses since insertion (counts reset on eviction; a demand load counts as
       one use, a prefetch as zero), ties to the least recently used
A victim is never a protected key (see 2. and 3.); if every resident key is protected, none is.

One transfer link moves experts one after another at bandwidth_gbps (1e9 bytes/s).
When layer l of step t runs at clock c:
  1. Hits first: every routed expert already in the pool is a hit (updates recency/frequency).
     A hit on a prefetch still in flight waits for its arrival (that wait is stall).
  2. Misses: demand-loaded after any queued transfer, never overlapped (stall), then
     inserted. A demand load never evicts an expert routed at this same (t, l); if nothing
     else can go, the expert is used without being cached.
  3. Prefetch: the experts listed at (t, l) that the target pool lacks are loaded and
     inserted. It never evicts an expert it lists itself nor one routed at the running
     (t, l); experts that find no evictable slot are dropped (not loaded, not counted).
     Listed experts already resident cost nothing and keep their policy state.
     overlap_prefetch: issued when compute starts, so it overlaps the compute of layers
     l..l+h-1 (and queues behind earlier transfers); stall arises only when a needed expert or a
     demand load must wait for it. On an otherwise idle link that is max(0, transfer - h * compute).
     Without overlap the transfer runs after compute, adding its full time.
  4. Compute: layer_compute_ms.
Prefetched experts evicted before their first use, or never used by the end, are wasted.
time_ms ends when the last layer finishes computing; stall_ms = time_ms - compute time.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

import numpy as np

from moe_prefetch.registry import Registry


@dataclass
class CostModel:
    """Transfer and compute costs: expert size, link bandwidth (GB/s = 1e9 B/s), compute per layer."""

    expert_bytes: float
    bandwidth_gbps: float
    layer_compute_ms: float
    overlap_prefetch: bool = True

    def __post_init__(self) -> None:
        if self.expert_bytes < 0 or self.bandwidth_gbps <= 0 or self.layer_compute_ms < 0:
            raise ValueError(
                f"need expert_bytes >= 0, bandwidth_gbps > 0, layer_compute_ms >= 0; got {self.expert_bytes}, "
                f"{self.bandwidth_gbps}, {self.layer_compute_ms}"
            )

    @property
    def transfer_ms(self) -> float:
        """Milliseconds to move one expert over the link."""
        return self.expert_bytes / (self.bandwidth_gbps * 1e9) * 1e3


class EvictionPolicy:
    """The eviction state of one pool of at most `capacity` resident keys. The pool tells it of every insertion,
    use and eviction (`tick`: the replay's event counter, increasing) and asks it for the next victim."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def on_insert(self, key: int, tick: int, is_use: bool) -> None:
        """`key` became resident; `is_use`: by a demand load (True) or a prefetch (False)."""
        raise NotImplementedError

    def on_use(self, key: int, tick: int) -> None:
        """A resident `key` was hit."""
        raise NotImplementedError

    def victim(self, protected: Container[int]) -> int | None:
        """The resident key to evict next outside `protected` (the pool evicts it before asking again), or None if
        every resident key is protected."""
        raise NotImplementedError

    def on_evict(self, key: int) -> None:
        """`key` left the pool."""
        raise NotImplementedError


EVICTION_POLICIES: Registry[type[EvictionPolicy]] = Registry("cache policy")


@EVICTION_POLICIES.register("lru")
class LRUPolicy(EvictionPolicy):
    """Least recently inserted or used first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def on_insert(self, key: int, tick: int, is_use: bool) -> None:
        self.order[key] = None

    def on_use(self, key: int, tick: int) -> None:
        self.order.move_to_end(key)

    def victim(self, protected: Container[int]) -> int | None:
        return next((key for key in self.order if key not in protected), None)  # O(|protected|) skips

    def on_evict(self, key: int) -> None:
        del self.order[key]


@EVICTION_POLICIES.register("lfu")
class LFUPolicy(EvictionPolicy):
    """Fewest uses since insertion first (a prefetch inserts with zero uses), ties to the least recent."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.uses: dict[int, int] = {}  # uses since insertion, per resident key
        self.last_tick: dict[int, int] = {}  # tick of last use or insertion (tie-break)
        self.heap: list[tuple[int, int, int]] = []  # (uses, last_tick, key), stale entries skipped lazily

    def on_insert(self, key: int, tick: int, is_use: bool) -> None:
        self.uses[key] = 1 if is_use else 0
        self.last_tick[key] = tick
        self._push(key)

    def on_use(self, key: int, tick: int) -> None:
        self.uses[key] += 1
        self.last_tick[key] = tick
        self._push(key)

    def _push(self, key: int) -> None:
        """Push the key's current state; rebuild the heap when stale entries pile up."""
        heapq.heappush(self.heap, (self.uses[key], self.last_tick[key], key))
        if len(self.heap) > 4 * self.capacity + 64:
            self.heap = [(self.uses[k], self.last_tick[k], k) for k in self.uses]
            heapq.heapify(self.heap)

    def victim(self, protected: Container[int]) -> int | None:
        held = []
        victim = None
        while self.heap:
            entry = heapq.heappop(self.heap)
            uses, last_tick, key = entry
            if key not in self.uses or self.uses[key] != uses or self.last_tick[key] != last_tick:
                continue  # stale: the key was used again or evicted since this entry was pushed
            if key in protected:
                held.append(entry)
                continue
            victim = key
            break
        for entry in held:
            heapq.heappush(self.heap, entry)
        return victim

    def on_evict(self, key: int) -> None:
        del self.uses[key], self.last_tick[key]


@dataclass
class CacheConfig:
    """Experts held (per layer if per_layer, else in total) and the eviction policy (a name in EVICTION_POLICIES)."""

    capacity: int
    per_layer: bool = True
    policy: str = "lru"

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
        self.unused_prefetch: set[int] = set()  # prefetched keys not used yet
        self.arrival_ms: dict[int, float] = {}  # prefetched keys -> time their transfer ends
        self.wasted = 0  # prefetched keys evicted before their first use

    def touch(self, key: int, tick: int) -> None:
        """Record a use of a resident key."""
        self.policy.on_use(key, tick)

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
    """Clock, link and counters of one replay; run_layer applies steps 1-4 of the module docstring."""

    def __init__(self, pools: list[_Pool], offsets: list[int], cost: CostModel) -> None:
        self.pools = pools
        self.offsets = offsets  # per layer: added to expert ids so a shared pool keeps layers apart
        self.transfer_ms = cost.transfer_ms
        self.compute_ms = cost.layer_compute_ms
        self.overlap = cost.overlap_prefetch
        self.clock = 0.0
        self.link_free = 0.0  # when the transfer link finishes everything queued on it
        self.tick = 0  # event counter handed to the eviction policy (LFU's recency tie-break)
        self.hits = self.prefetched = self.prefetch_hits = 0
        self.misses_by_layer = [0] * len(pools)

    def run_layer(self, layer: int, routed_row: list[int], target: int | None, prefetch_row: list[int]) -> None:
        """Run one layer of one step; prefetch prefetch_row into layer `target` unless target is None."""
        offset = self.offsets[layer]
        # A dict keeps first-seen order and doubles as the protected set (O(1) membership).
        keys = dict.fromkeys(e + offset for e in routed_row if e >= 0)
        self._use(self.pools[layer], layer, keys)
        if target is not None:
            self._prefetch(target, prefetch_row, keys)
        self.clock += self.compute_ms  # 4. compute
        if not self.overlap:
            self.clock = max(self.clock, self.link_free)

    def _use(self, pool: _Pool, layer: int, keys: dict[int, None]) -> None:
        """1. hits (waiting for in-flight prefetches), then 2. demand loads of the misses."""
        ready = self.clock
        missing = []
        for key in keys:  # hits first, so a miss cannot evict a hit of this same step
            if key in pool.resident:
                self.hits += 1
                self.tick += 1
                pool.touch(key, self.tick)
                if key in pool.unused_prefetch:
                    pool.unused_prefetch.discard(key)
                    self.prefetch_hits += 1
                ready = max(ready, pool.arrival_ms.pop(key, ready))
            else:
                missing.append(key)
        self.clock = ready
        if missing:  # demand loads queue behind earlier transfers and never overlap compute
            self.clock = max(self.clock, self.link_free) + len(missing) * self.transfer_ms
            self.link_free = self.clock
            self.misses_by_layer[layer] += len(missing)
            for key in missing:
                self.tick += 1
                pool.insert(key, self.tick, keys, is_use=True)

    def _prefetch(self, target: int, prefetch_row: list[int], running: dict[int, None]) -> None:
        """3. load the listed experts the target layer's pool lacks, queued on the link."""
        pool, offset = self.pools[target], self.offsets[target]
        listed = dict.fromkeys(e + offset for e in prefetch_row if e >= 0)
        guard = running | listed
        # Overlapped transfers start with this layer's compute; serial ones after it.
        start = max(self.clock if self.overlap else self.clock + self.compute_ms, self.link_free)
        loaded = 0
        for key in listed:
            if key in pool.resident:
                continue
            self.tick += 1
            if pool.insert(key, self.tick, guard, is_use=False):
                loaded += 1
                pool.arrival_ms[key] = start + loaded * self.transfer_ms
                pool.unused_prefetch.add(key)
        if loaded:
            self.prefetched += loaded
            self.link_free = start + loaded * self.transfer_ms


def simulate(
    routed: np.ndarray, prefetch: np.ndarray | None, cache: CacheConfig, cost: CostModel, horizon: int
) -> dict[str, float | list[int]]:
    """Replay `routed` with optional `prefetch` through the cache; see the module docstring for rules."""
    routed = np.asarray(routed, dtype=np.int64)
    prefetch = None if prefetch is None else np.asarray(prefetch, dtype=np.int64)
    _check_inputs(routed, prefetch, horizon)
    steps, layers, _ = routed.shape
    policy = EVICTION_POLICIES[cache.policy]
    if cache.per_layer:
        pools, offsets = [_Pool(cache.capacity, policy(cache.capacity)) for _ in range(layers)], [0] * layers
    else:
        # One pool keys experts as layer * stride + expert so layers never collide.
        stride = 1 + max(int(routed.max(initial=-1)), -1 if prefetch is None else int(prefetch.max(initial=-1)))
        pools, offsets = [_Pool(cache.capacity, policy(cache.capacity))] * layers, [layer * stride for layer in range(layers)]
    replay = _Replay(pools, offsets, cost)
    routed_rows = routed.tolist()  # Python lists: per-element numpy indexing would dominate the loop
    prefetch_rows = prefetch.tolist() if prefetch is not None else None
    no_prefetch: list[int] = []
    for step in range(steps):
        for layer in range(layers):
            target = layer + horizon if prefetch_rows is not None and layer + horizon < layers else None
            prefetch_row = prefetch_rows[step][layer] if target is not None else no_prefetch
            replay.run_layer(layer, routed_rows[step][layer], target, prefetch_row)
    return _summary(replay, pools if cache.per_layer else pools[:1], steps, cost)


def _summary(replay: _Replay, distinct_pools: list[_Pool], steps: int, cost: CostModel) -> dict[str, float | list[int]]:
    """Assemble the result dict from the replay's counters."""
    # Prefetches still unused when the replay ends were never used: they are wasted too.
    wasted = sum(pool.wasted + len(pool.unused_prefetch) for pool in distinct_pools)
    misses = sum(replay.misses_by_layer)
    uses = replay.hits + misses
    compute_total = steps * len(replay.misses_by_layer) * cost.layer_compute_ms
    clock = replay.clock
    return {
        "hit_rate": replay.hits / uses if uses else math.nan,
        "hits": float(replay.hits),
        "misses": float(misses),
        "misses_by_layer": replay.misses_by_layer,
        "prefetched": float(replay.prefetched),
        "prefetch_hits": float(replay.prefetch_hits),
        "bytes_moved": (misses + replay.prefetched) * cost.expert_bytes,
        "demand_bytes": misses * cost.expert_bytes,
        "prefetch_bytes": replay.prefetched * cost.expert_bytes,
        "wasted_prefetch_bytes": wasted * cost.expert_bytes,
        "stall_ms": max(0.0, clock - compute_total),
        "compute_ms": compute_total,
        "time_ms": clock,
        "time_per_step_ms": clock / steps if steps else math.nan,
    }


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


def oracle_share(on_demand: float, strategy: float, oracle: float) -> float:
    """Share of the oracle's time saving the strategy achieves: (t_demand - t_strategy) / (t_demand - t_oracle).

    Returns 0.0 when the oracle saves no time (gain <= 0 or not finite): there is nothing to share.
    Can be negative (strategy slower than on-demand) or above 1 (beats the horizon-limited oracle).
    """
    gain = on_demand - oracle
    if not math.isfinite(gain) or gain <= 0.0:
        return 0.0
    return (on_demand - strategy) / gain
