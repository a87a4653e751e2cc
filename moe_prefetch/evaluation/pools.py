"""One pool of the expert-cache replay (moe_prefetch/evaluation/cache.py, whose module docstring specifies the rules):
its resident keys, cache and staging slots, the eviction policy's state and the prefetch bookkeeping."""

from __future__ import annotations

from collections.abc import Container

from moe_prefetch.evaluation.policies import EvictionPolicy, PoolScores


class Pool:
    """One cache pool: resident keys (cache and staging), the policy's eviction state (cache keys only), the
    staging slots, and prefetch bookkeeping."""

    def __init__(self, capacity: int, policy: EvictionPolicy, staging_slots: int = 0,
                 scores: PoolScores | None = None) -> None:
        self.capacity = capacity  # cache slots (the staging slots are apart)
        self.policy = policy
        self.staging_slots = staging_slots
        self.scores = scores  # the issued predictions as this pool keys them, or None
        self.resident: set[int] = set()  # every key held, cached or staged
        # Keys in the cache slots. Only an insertion into a free slot changes it: an eviction always makes room for
        # the key that replaces it.
        self.cached = 0
        self.staged: dict[int, None] = {}  # staged keys, oldest first
        self.queued: set[int] = set()  # keys with a prefetch queued, not started
        self.unused_prefetch: set[int] = set()  # prefetched keys not used yet
        self.arrival_ms: dict[int, float] = {}  # prefetched keys not used yet -> time their transfer ends
        self.wasted = 0  # prefetched keys evicted before their first use

    def insert(self, key: int, tick: int, protected: Container[int], is_use: bool) -> bool:
        """Insert a non-resident key into the cache, evicting by policy outside `protected`; False if nothing can
        go."""
        if not self._cache(key, tick, protected, is_use):
            return False
        self.resident.add(key)
        return True

    def _cache(self, key: int, tick: int, protected: Container[int], is_use: bool) -> bool:
        """Give `key` a cache slot: a free one, else the policy's victim's outside `protected`; False if nothing can
        go."""
        if self.cached < self.capacity:
            self.cached += 1
            self.policy.on_insert(key, tick, is_use)
            return True
        victim = self.policy.replace(protected, key, tick, is_use)
        if victim is None:
            return False
        self._leave(victim)
        return True

    def stage(self, key: int, protected: Container[int]) -> bool:
        """Put a prefetched key into a staging slot, evicting the oldest staged key outside `protected`; False if
        every staged key is protected."""
        if len(self.staged) >= self.staging_slots:
            victim = next((staged for staged in self.staged if staged not in protected), None)
            if victim is None:
                return False
            del self.staged[victim]
            self._leave(victim)
        self.staged[key] = None
        self.resident.add(key)
        return True

    def promote(self, key: int, tick: int, protected: Container[int]) -> None:
        """A staged key is used: move it into the cache (evicting by policy outside `protected`); it stays staged
        if nothing can go."""
        del self.staged[key]
        if not self._cache(key, tick, protected, True):
            self.staged[key] = None

    def _leave(self, key: int) -> None:
        """A key leaves the pool (evicted from the cache or the staging slots): wasted if it was prefetched and
        never used."""
        self.resident.remove(key)
        if key in self.unused_prefetch:
            self.unused_prefetch.discard(key)
            self.wasted += 1
        self.arrival_ms.pop(key, None)
