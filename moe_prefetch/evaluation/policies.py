"""Eviction policies of the expert-cache replay (EVICTION_POLICIES; CacheConfig.policy and evaluate.cache.policy
accept exactly these names). A policy keeps only the eviction state of one pool, told of every insertion, use and
eviction, and asked for the next victim outside a protected set:

  lru     evicts the least recently used (inserted or hit)
  lfu     evicts the fewest uses since insertion (counts reset on eviction; a demand load counts as one use, a
          prefetch as zero), ties to the least recently used
  random  evicts a resident key drawn uniformly with the replay's seeded generator
  belady  evicts the key whose next use lies farthest in the future (never used again first; ties to the lower key):
          Belady's MIN, optimal for demand loading, so it is the ceiling of any online policy. It reads the future
          from `FutureUses`, built from the replayed trace itself.
  predicted  evicts the key with the lowest predicted probability of use at its layer's next run (`PoolScores`:
          the latest scores issued for that layer, see `IssuedScores`); when any candidate's score is unknown (NaN,
          or no scores issued yet for its layer), or among equal scores, the least recently used goes. Without
          scores (simulate's use_scores = None) it is LRU.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Container, Sequence

import numpy as np

from moe_prefetch.registry import Registry


class FutureUses:
    """When every key is used: key -> sorted positions step * L + layer, and the position the replay is at (`now`)."""

    def __init__(self, routed: np.ndarray, offsets: Sequence[int]) -> None:
        layers, width = routed.shape[1:]
        flat = routed.reshape(-1)
        used = np.flatnonzero(flat >= 0)  # row-major: positions come out sorted
        positions = used // width if width else used  # step * L + layer
        keys = flat[used] + np.asarray(offsets, dtype=np.int64)[positions % layers]
        # A stable sort keeps each key's positions in order; on keys as narrow as they fit, numpy's radix sort.
        order = np.argsort(keys.astype(np.min_scalar_type(int(keys.max(initial=0)))), kind="stable")
        keys, positions = keys[order], positions[order].tolist()
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]).tolist() if keys.size else []
        self.positions = {key: positions[start:end]
                          for key, start, end in zip(keys[starts].tolist(), starts, starts[1:] + [len(positions)])}
        self.now = -1

    def next_use(self, key: int) -> float:
        """The first position after `now` at which `key` is used (inf if never again)."""
        return next_after(self.positions.get(key, ()), self.now)


def next_after(uses: list[int], now: int) -> float:
    """The first of the sorted positions `uses` after `now` (inf if none)."""
    index = bisect.bisect_right(uses, now)
    return uses[index] if index < len(uses) else math.inf


class PoolFuture:
    """The future uses as one pool keys them: `positions` maps its keys (key + `offset` in `future`: a per-layer
    pool holds bare expert ids, so pool l reads layer l's uses only) to their sorted positions."""

    def __init__(self, future: FutureUses, offset: int) -> None:
        self.future, self.offset = future, offset
        # Keys below offset belong to earlier layers; those of later layers land at stride and above, ids this pool
        # never holds.
        self.positions = {key - offset: uses for key, uses in future.positions.items() if key >= offset}

    @property
    def now(self) -> int:
        """The position the replay is at."""
        return self.future.now


class IssuedScores:
    """The scorer's probabilities of use, revealed as the replay issues them. `scores` (steps, L, E) float:
    scores[t, l, e] = P(layer l of step t uses e), issued at position t * L + l - lead (lead = the prefetch's lead in
    layers), i.e. when that layer runs and after its prediction step (a demand load at that same position does not
    see it yet). `visible` is the last position whose prediction step has passed (-1 before the replay; positions
    below 0 are issued before it starts). For layer l the policy sees the scores of the latest step whose issue
    position is <= visible; NaN where none is issued yet or the scorer gives none."""

    def __init__(self, scores: np.ndarray, lead: int) -> None:
        self.steps, self.layers, self.experts = scores.shape
        self.rows = np.asarray(scores, dtype=np.float64).reshape(self.steps * self.layers, self.experts).tolist()
        self.lead = lead
        self.visible = -1

    def score(self, layer: int, expert: int) -> float:
        """The latest issued P(use) of `expert` at `layer` (NaN if none is issued yet or the expert is out of range)."""
        step = (self.visible - layer + self.lead) // self.layers
        if step >= self.steps:
            step = self.steps - 1
        if step < 0 or expert >= self.experts:
            return math.nan
        return self.rows[step * self.layers + layer][expert]


class PoolScores:
    """The issued scores as one pool keys them: a per-layer pool (`layer` given) holds bare expert ids, a shared pool
    holds layer * stride + expert."""

    def __init__(self, issued: IssuedScores, layer: int | None, stride: int) -> None:
        self.issued, self.layer, self.stride = issued, layer, stride
        if layer is not None:  # the key is the expert id: the issued score at this layer, without a call of our own
            self.score = functools.partial(issued.score, layer)

    def score(self, key: int) -> float:
        return self.issued.score(key // self.stride, key % self.stride)


class EvictionPolicy:
    """The eviction state of one pool of at most `capacity` resident keys. The pool tells it of every insertion,
    use and eviction (`tick`: the replay's event counter, increasing) and asks it for the next victim. `future` (the
    trace's uses), `seed` and `scores` (the issued predictions, or None) are given to every policy; only the offline,
    the seeded and the predicted ones read them."""

    def __init__(self, capacity: int, future: PoolFuture | None = None, seed: int = 0,
                 scores: PoolScores | None = None) -> None:
        self.capacity = capacity

    def on_insert(self, key: int, tick: int, is_use: bool) -> None:
        """`key` became resident; `is_use`: by a demand load (True) or a prefetch (False)."""
        raise NotImplementedError

    def on_use(self, key: int, tick: int) -> None:
        """A resident `key` was hit."""
        raise NotImplementedError

    def victim(self, protected: Container[int]) -> int | None:
        """The resident key to evict next outside `protected`, or None if every resident key is protected. A query:
        the pool evicts it next (on_evict) or keeps it (the prefetch gate only asks)."""
        raise NotImplementedError

    def on_evict(self, key: int) -> None:
        """`key` left the pool."""
        raise NotImplementedError

    def replace(self, protected: Container[int], key: int, tick: int, is_use: bool) -> int | None:
        """The pool is full: evict the victim outside `protected` and insert `key` in its place; returns the victim,
        or None (nothing changes) if every resident key is protected."""
        victim = self.victim(protected)
        if victim is not None:
            self.on_evict(victim)
            self.on_insert(key, tick, is_use)
        return victim


EVICTION_POLICIES: Registry[type[EvictionPolicy]] = Registry("cache policy")


class _ResidentOrder(EvictionPolicy):
    """Keeps the resident keys in an ordered dict (oldest insertion or use first) for the policies that scan it."""

    def __init__(self, capacity: int, future: PoolFuture | None = None, seed: int = 0,
                 scores: PoolScores | None = None) -> None:
        super().__init__(capacity)
        self.order: OrderedDict[int, None] = OrderedDict()

    def on_insert(self, key: int, tick: int, is_use: bool) -> None:
        self.order[key] = None

    def on_use(self, key: int, tick: int) -> None:
        self.order.move_to_end(key)

    def on_evict(self, key: int) -> None:
        del self.order[key]

    def candidates(self, protected: Container[int]) -> list[int]:
        return [key for key in self.order if key not in protected]

    def replace(self, protected: Container[int], key: int, tick: int, is_use: bool) -> int | None:
        victim = self.victim(protected)  # on_evict() and on_insert() of the order, without their calls
        if victim is not None:
            del self.order[victim]
            self.order[key] = None
        return victim


@EVICTION_POLICIES.register("lru")
class LRUPolicy(_ResidentOrder):
    """Least recently inserted or used first."""

    def victim(self, protected: Container[int]) -> int | None:
        for key in self.order:  # O(|protected|) skips
            if key not in protected:
                return key
        return None

    def replace(self, protected: Container[int], key: int, tick: int, is_use: bool) -> int | None:
        order = self.order  # victim(), on_evict() and on_insert() in one call: the replay's commonest step
        for victim in order:
            if victim not in protected:
                del order[victim]
                order[key] = None
                return victim
        return None


@EVICTION_POLICIES.register("lfu")
class LFUPolicy(EvictionPolicy):
    """Fewest uses since insertion first (a prefetch inserts with zero uses), ties to the least recent."""

    def __init__(self, capacity: int, future: PoolFuture | None = None, seed: int = 0,
                 scores: PoolScores | None = None) -> None:
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
            held.append(entry)  # a query: the pool evicts the victim next (on_evict), or keeps it (the gate asked)
            break
        for entry in held:
            heapq.heappush(self.heap, entry)
        return victim

    def on_evict(self, key: int) -> None:
        del self.uses[key], self.last_tick[key]


@EVICTION_POLICIES.register("random")
class RandomPolicy(_ResidentOrder):
    """A resident key drawn uniformly (seeded): the policy any other must beat."""

    def __init__(self, capacity: int, future: PoolFuture | None = None, seed: int = 0,
                 scores: PoolScores | None = None) -> None:
        super().__init__(capacity)
        self.rng = random.Random(seed)

    def victim(self, protected: Container[int]) -> int | None:
        candidates = self.candidates(protected)
        return self.rng.choice(candidates) if candidates else None


@EVICTION_POLICIES.register("belady")
class BeladyPolicy(_ResidentOrder):
    """The key used again farthest in the future (offline optimal for demand loading; needs the future trace)."""

    def __init__(self, capacity: int, future: PoolFuture | None = None, seed: int = 0,
                 scores: PoolScores | None = None) -> None:
        super().__init__(capacity)
        if future is None:
            raise ValueError("the belady policy needs the future uses of the replayed trace")
        self.future = future

    def victim(self, protected: Container[int]) -> int | None:
        positions, now = self.future.positions, self.future.now
        victim, farthest = None, -math.inf
        for key in self.order:
            if key not in protected:
                use = next_after(positions.get(key, ()), now)
                if use > farthest or (use == farthest and key < victim):  # the farthest next use, then the lower key
                    victim, farthest = key, use
        return victim


@EVICTION_POLICIES.register("predicted")
class PredictedPolicy(_ResidentOrder):
    """The key least likely to be used at its layer's next run by the latest issued scores; LRU among equal scores,
    and LRU outright when a candidate's score is unknown or there are no scores."""

    def __init__(self, capacity: int, future: PoolFuture | None = None, seed: int = 0,
                 scores: PoolScores | None = None) -> None:
        super().__init__(capacity)
        self.scores = scores

    def victim(self, protected: Container[int]) -> int | None:
        if self.scores is None:
            return LRUPolicy.victim(self, protected)
        score = self.scores.score
        least_recent = victim = lowest = None
        for key in self.order:  # least recent first, so a strict < keeps the least recent among equal scores
            if key in protected:
                continue
            if least_recent is None:
                least_recent = key
            key_score = score(key)
            if math.isnan(key_score):
                return least_recent
            if lowest is None or key_score < lowest:
                victim, lowest = key, key_score
        return victim
