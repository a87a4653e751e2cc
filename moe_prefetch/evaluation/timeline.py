"""The discrete-event timeline of the expert-cache replay: the links and their prefetch queue, and the per-layer
steps over the pools (pools.py). moe_prefetch/evaluation/cache.py's module docstring is the specification of every
rule implemented here; simulate() there builds a `Replay` and drives it step by step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_prefetch.evaluation.policies import FutureUses, IssuedScores
from moe_prefetch.evaluation.pools import Pool


class Prefetch:
    """One prefetch on the link: queued at `issue_ms` for position `target` (step * L + layer), then in flight from
    start_ms to end_ms (set when it starts)."""

    __slots__ = ("pool", "key", "target", "issue_ms", "listed", "start_ms", "end_ms")

    def __init__(self, pool: Pool, key: int, target: int, issue_ms: float, listed: dict[int, None]) -> None:
        self.pool = pool
        self.key = key
        self.target = target
        self.issue_ms = issue_ms
        self.listed = listed  # the keys issued with it (it may not evict them)
        # start_ms and end_ms (float) are set when it starts.


@dataclass
class Counters:
    on_time_hits: int = 0
    late_hits: int = 0
    late_wait_ms: float = 0.0
    prefetched: int = 0
    prefetch_hits: int = 0
    cancelled: int = 0
    dropped: int = 0
    preempted: int = 0
    gated_out: int = 0
    predictor_ms: float = 0.0
    compute_ms: float = 0.0
    cpu_experts: int = 0
    misses_by_layer: list[int] = field(default_factory=list)


@dataclass
class Timing:
    """The replay's costs in milliseconds and the switches of its rules (cache.py's CostModel, resolved)."""

    transfer_ms: float
    chunk_ms: float
    compute_ms: float
    overlap: bool
    predictor_ms: float
    links: int = 1
    expert_compute_share: float = 0.0
    experts_per_token: int = 1
    cpu_expert_ms: float | None = None  # None: misses are transferred; else computed on the CPU
    staging: bool = False  # prefetches land in the staging slots
    width: int = 0  # the most distinct experts a layer runs (routed's width)


class Replay:
    """Clock, links and counters of one replay; run_step applies steps 1-5 of cache.py's module docstring to each
    layer of a step. Keys are pool keys throughout (an expert id in a per-layer pool, layer * stride + expert in a
    shared one; -1 = none). A prefetch issued at position p targets p + ahead; layer l issues if issuing[l] and the
    target is at most last_target."""

    def __init__(self, pools: list[Pool], shared: bool, timing: Timing, future: FutureUses,
                 issued: IssuedScores | None, ahead: int, issuing: list[bool], last_target: int) -> None:
        self.pools, self.shared = pools, shared
        self.ahead, self.issuing, self.last_target = ahead, issuing, last_target
        self.target_pools = [pools[(layer + ahead) % len(pools)] for layer in range(len(pools))]  # where each issues
        self.transfer_ms, self.chunk_ms = timing.transfer_ms, timing.chunk_ms
        self.compute_ms, self.overlap, self.predictor_ms = timing.compute_ms, timing.overlap, timing.predictor_ms
        self.cpu_expert_ms, self.staging = timing.cpu_expert_ms, timing.staging
        # Layers computing layer_compute_ms whatever they run need no per-layer sum (cache.py takes the product).
        self.counted = timing.expert_compute_share > 0.0 or timing.cpu_expert_ms is not None
        # 5. a layer's GPU compute by the distinct experts it runs (0 .. width), each computed once.
        share, k = timing.expert_compute_share, timing.experts_per_token
        self.scaled_ms = [self.compute_ms * ((1.0 - share) + share * distinct / k) for distinct in range(timing.width + 1)]
        # A miss costs the layer its transfer (demand load) or its CPU time: what a prefetch hit saves.
        self.miss_ms = timing.transfer_ms if timing.cpu_expert_ms is None else timing.cpu_expert_ms
        self.future, self.issued = future, issued
        self.clock = 0.0
        self.links = range(timing.links)
        self.single_link = timing.links == 1
        self.link_free = [0.0] * timing.links  # when each link finishes its transfer in flight (or demand loads)
        self.in_flight: list[Prefetch | None] = [None] * timing.links  # each link's last prefetch started
        # Prefetches not started, in issue order, hence in target order (each targets its issue position + ahead).
        self.queue: list[Prefetch] = []
        self.running: dict[int, None] = {}  # keys of the layer computing now (its pool protects them)
        self.running_pool: Pool | None = None  # the pool of the layer computing now
        self.tick = 0  # event counter handed to the eviction policy (recency)
        self.counts = Counters(misses_by_layer=[0] * len(pools))

    def run_step(self, position: int, keys_rows: list[list[int]], listed_rows: list[list[int]] | None,
                 probs_rows: list[list[float]] | None) -> None:
        """Run the layers of one step, the first at `position` (step * L): layer l uses the keys of keys_rows[l]
        and, where it issues, queues listed_rows[l] (keys of its target's pool; None: no prefetch plan), each gated
        by its probability in probs_rows[l] when given. The replay's hot loop: what a step does not change is read
        once, and the clock is a local (the helpers are handed the time they need)."""
        pools, counts, future, issued, issuing = self.pools, self.counts, self.future, self.issued, self.issuing
        target_pools = self.target_pools
        ahead, last_target, overlap, predictor_ms = self.ahead, self.last_target, self.overlap, self.predictor_ms
        cpu_ms, counted, compute_ms, scaled_ms = self.cpu_expert_ms, self.counted, self.compute_ms, self.scaled_ms
        clock, queue = self.clock, self.queue
        for layer, keys_row in enumerate(keys_rows):
            # A dict keeps first-seen order and doubles as the protected set (O(1) membership).
            keys = dict.fromkeys(keys_row)
            keys.pop(-1, None)
            pool = pools[layer]
            if queue:
                self._start_prefetches(clock)
                if queue and queue[0].target == position:
                    self._withdraw(pool, position, keys)
            future.now += 1
            # 1. Uses: hits first, so a miss cannot evict a hit of this same step.
            now = ready = clock
            missing = []
            on_time = late_on_cpu = 0
            resident, staged, unused_prefetch, arrival_ms = pool.resident, pool.staged, pool.unused_prefetch, pool.arrival_ms
            on_use, tick = pool.policy.on_use, self.tick
            for key in keys:
                if key not in resident:
                    missing.append(key)
                    continue
                tick += 1
                if staged and key in staged:
                    pool.promote(key, tick, keys)
                else:
                    on_use(key, tick)
                if key in unused_prefetch:
                    unused_prefetch.discard(key)
                    counts.prefetch_hits += 1
                arrival = arrival_ms.pop(key, None)  # None: not a prefetch in flight, here already
                if arrival is None or arrival <= now:
                    on_time += 1
                elif cpu_ms is not None and arrival - now > cpu_ms:
                    # Sooner on the CPU than waiting: computed there (a miss); its transfer still lands.
                    arrival_ms[key] = arrival
                    late_on_cpu += 1
                else:
                    counts.late_hits += 1
                    counts.late_wait_ms += arrival - now
                    if arrival > ready:
                        ready = arrival
            self.tick = tick
            counts.on_time_hits += on_time
            # 2. Misses: demand-loaded, or computed on the CPU where they are (nothing moves, nothing is cached).
            on_cpu = late_on_cpu
            if missing:
                if cpu_ms is not None:
                    on_cpu += len(missing)
                else:
                    loaded = self._demand_load(pool, keys, missing, now)
                    if loaded > ready:
                        ready = loaded
            if missing or on_cpu:
                counts.misses_by_layer[layer] += len(missing) + late_on_cpu
                counts.cpu_experts += on_cpu
            clock = ready
            self.running, self.running_pool = keys, pool
            if issued is not None:
                issued.visible = position  # this layer's prediction step has passed
            target = position + ahead
            if issuing[layer] and target <= last_target:
                if predictor_ms:
                    clock += predictor_ms  # 3. the predictor runs on the compute stream
                    counts.predictor_ms += predictor_ms
                self._issue(target_pools[layer], target, listed_rows[layer],
                            None if probs_rows is None else probs_rows[layer],
                            clock if overlap else clock + compute_ms)  # 4. prefetch
            if not counted:  # 5. compute
                clock += compute_ms
            elif on_cpu:
                clock += self._beside_cpu(len(keys), on_cpu)
            else:
                resident_ms = scaled_ms[len(keys)]
                counts.compute_ms += resident_ms
                clock += resident_ms
            if not overlap:
                self._start_prefetches(math.inf)
                clock = max(clock, *self.link_free)
            position += 1
        self.clock = clock

    def _beside_cpu(self, distinct: int, on_cpu: int) -> float:
        """5. the compute of a layer whose CPU computes `on_cpu` of its `distinct` experts: the GPU's share in
        parallel with the CPU's (sums the all-resident GPU compute in counts.compute_ms)."""
        self.counts.compute_ms += self.scaled_ms[distinct]
        return max(self.scaled_ms[distinct - on_cpu], on_cpu * self.cpu_expert_ms)

    def _free_link(self) -> int:
        """Of several links, the one that frees up first (the lowest index among ties)."""
        return min(self.links, key=self.link_free.__getitem__)

    def _start_prefetches(self, now: float) -> None:
        """Start, in issue order, every queued prefetch a link can begin before `now` (a demand load at `now` goes
        first)."""
        queue, link_free, counts = self.queue, self.link_free, self.counts
        while queue:
            prefetch = queue[0]
            link = 0 if self.single_link else self._free_link()
            free, issue_ms = link_free[link], prefetch.issue_ms
            start = issue_ms if issue_ms > free else free
            if start >= now:
                return
            del queue[0]
            pool, key = prefetch.pool, prefetch.key
            pool.queued.discard(key)
            if key in pool.resident:  # demand-loaded meanwhile (shared pool): nothing to move
                counts.cancelled += 1
                continue
            # The running layer's experts are being read: a prefetch into their pool (shared, or the same layer a
            # lead of L or more targets) may not evict them.
            guard = prefetch.listed | self.running if pool is self.running_pool else prefetch.listed
            if not self._place(pool, key, guard):
                counts.dropped += 1
                continue
            end = start + self.transfer_ms
            prefetch.start_ms, prefetch.end_ms = start, end
            pool.arrival_ms[key] = end
            pool.unused_prefetch.add(key)
            link_free[link] = end
            self.in_flight[link] = prefetch
            counts.prefetched += 1

    def _place(self, pool: Pool, key: int, guard: dict[int, None]) -> bool:
        """Take a slot for a starting prefetch: a staging slot, or a cache slot whose victim the scores do not
        predict to be used with a higher probability than `key`."""
        if self.staging:
            return pool.stage(key, guard)
        scores = pool.scores
        if scores is not None:
            own = scores.score(key)
            likelier = {other: None for other in pool.resident if other not in pool.staged
                        and scores.score(other) > own}  # NaN compares False: an unknown score guards nothing
            guard = guard | likelier
        self.tick += 1
        return pool.insert(key, self.tick, guard, False)

    def _withdraw(self, pool: Pool, position: int, keys: dict[int, None]) -> None:
        """Cancellation: withdraw every queued prefetch for `position`, the head of the queue (a routed one becomes a
        miss, the others are cancelled)."""
        queue = self.queue
        while queue and queue[0].target == position:
            prefetch = queue.pop(0)
            pool.queued.discard(prefetch.key)
            self.counts.cancelled += prefetch.key not in keys

    def _demand_load(self, pool: Pool, keys: dict[int, None], missing: list[int], now: float) -> float:
        """Load `missing` at `now` ahead of every queued prefetch, each on the link that can start it first
        (pre-empting a prefetch in flight at a chunk boundary when it is not needed now); returns when the last one
        arrives."""
        transfer_ms = self.transfer_ms
        if self.single_link:
            loads = ((0, self._demand_start(0, now, keys), len(missing)),)
        else:
            loads = self._spread(len(missing), now, keys)
        last = now
        protected = keys
        for link, start, count in loads:
            in_flight = self.in_flight[link]
            if in_flight is not None and in_flight.end_ms > now and in_flight.pool is pool:
                protected = protected | {in_flight.key: None}
            if not count:
                continue
            end = start + count * transfer_ms
            last = end if end > last else last
            self.link_free[link] = end
            # A link is free no earlier than its prefetch's end, so a start before that end is a pre-emption.
            if in_flight is not None and in_flight.end_ms > start:
                in_flight.end_ms = end + (in_flight.end_ms - start)  # the rest of the prefetch after the demand loads
                in_flight.pool.arrival_ms[in_flight.key] = self.link_free[link] = in_flight.end_ms
                self.counts.preempted += 1
        tick = self.tick
        for key in missing:
            tick += 1
            pool.insert(key, tick, protected, True)
        self.tick = tick
        return last

    def _spread(self, misses: int, now: float, keys: dict[int, None]) -> list[tuple[int, float, int]]:
        """(link, start, count) of each link: greedily, each miss on the link that is free first."""
        starts = [self._demand_start(link, now, keys) for link in self.links]
        loads, free = [0] * len(starts), list(starts)
        for _ in range(misses):
            link = min(self.links, key=free.__getitem__)
            loads[link] += 1
            free[link] += self.transfer_ms
        return list(zip(self.links, starts, loads))

    def _demand_start(self, link: int, now: float, keys: dict[int, None]) -> float:
        """When a demand load at `now` can start on `link`: after its transfer in flight, or at that prefetch's next
        chunk boundary when it can be pre-empted (chunk_ms > 0) and is not needed now."""
        free = self.link_free[link]
        start = free if free > now else now
        in_flight = self.in_flight[link]
        if in_flight is not None and in_flight.end_ms > now and self.chunk_ms > 0 and in_flight.key not in keys:
            chunks_done = math.ceil((now - in_flight.start_ms) / self.chunk_ms - 1e-9)
            start = max(now, min(in_flight.end_ms, in_flight.start_ms + chunks_done * self.chunk_ms))
        return start

    def _issue(self, pool: Pool, target: int, listed_row: list[int], probs_row: list[float] | None,
               issue_ms: float) -> None:
        """4. queue for position `target` the listed keys its pool neither holds nor has queued (those the gate lets
        through, when probs_row is given)."""
        listed = dict.fromkeys(listed_row)
        listed.pop(-1, None)
        probability = None
        if probs_row is not None:
            probability = {}
            for key, p in zip(listed_row, probs_row):
                if key >= 0:
                    probability.setdefault(key, p)
        resident, queued, queue = pool.resident, pool.queued, self.queue
        for key in listed:
            if key in resident or key in queued:
                continue
            if probability is not None and not self._worth_it(pool, key, probability[key], listed, issue_ms):
                self.counts.gated_out += 1
                continue
            queued.add(key)
            queue.append(Prefetch(pool, key, target, issue_ms, listed))

    def _worth_it(self, pool: Pool, key: int, p: float, listed: dict[int, None], issue_ms: float) -> bool:
        """The per-expert gate (cache.py's docstring, rule G): p * saving > (1 - p) * cost at issue time."""
        if not p > 0.0:  # NaN (no probability) or 0: never worth a transfer
            return False
        backlog = sum(max(0.0, free - issue_ms) for free in self.link_free) + len(self.queue) * self.transfer_ms
        arrival = issue_ms + backlog / len(self.link_free) + self.transfer_ms
        lateness = max(0.0, arrival - (issue_ms + self.ahead * self.compute_ms))
        saving = max(0.0, self.miss_ms - lateness)
        demand_delay = self.chunk_ms if self.chunk_ms > 0 else self.transfer_ms
        return p * saving > (1.0 - p) * (demand_delay + self._eviction_loss(pool, listed))

    def _eviction_loss(self, pool: Pool, listed: dict[int, None]) -> float:
        """What the slot the prefetch takes loses: the victim's (the policy's pick now, or the oldest staged key)
        probability of use x a miss's cost; an unknown probability counts as 1, a free slot as 0."""
        if self.staging:
            if len(pool.staged) < pool.staging_slots:
                return 0.0
            victim = next((staged for staged in pool.staged if staged not in listed), None)
        else:
            if pool.cached < pool.capacity:
                return 0.0
            victim = pool.policy.victim(listed | self.running if self.shared else listed)
        if victim is None:
            return 0.0  # nothing can go: the prefetch will be dropped and moves nothing
        used = math.nan if pool.scores is None else pool.scores.score(victim)
        return (1.0 if math.isnan(used) else used) * self.miss_ms
