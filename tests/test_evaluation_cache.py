"""Hand-computed replays of the expert-cache prefetch simulator, and hand-worked cases for every registered
eviction policy, baseline, prefetch strategy and cost profile (a component registered without its case fails
the coverage tests)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
from conftest import assert_error

from moe_prefetch.evaluation.baselines import BASELINES, baseline_scorers
from moe_prefetch.evaluation.cache import (
    EVICTION_POLICIES,
    CacheConfig,
    CostModel,
    oracle_prefetch,
    ideal_share,
    ideal_time_ms,
    simulate,
    speedup,
)
from moe_prefetch.evaluation.config import COST_PROFILES
from moe_prefetch.evaluation.intervals import resample_weights
from moe_prefetch.evaluation.policies import FutureUses, PoolFuture
from moe_prefetch.evaluation.replay import (
    PREFETCH_STRATEGIES,
    DecodeSteps,
    ReplayInputs,
    simulate_strategies,
)
from moe_prefetch.params import parse_section
from moe_prefetch.windows.data import WindowSet

# 1 MB experts over 1 GB/s -> 1 ms per transfer; 2 ms compute per layer.
COST = CostModel(expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=2.0, overlap_prefetch=True)
# T = 3 steps, L = 3 layers, k = 1, experts 0..3.
ROUTED = np.array([
    [[0], [1], [2]],
    [[0], [3], [2]],
    [[1], [3], [2]],
])


def _routed(rows: list) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def test_on_demand_replay_by_hand() -> None:
    # Capacity 1 per layer, LRU.
    #   layer 0: t0 miss(0)  t1 hit(0)   t2 miss(1)
    #   layer 1: t0 miss(1)  t1 miss(3)  t2 hit(3)
    #   layer 2: t0 miss(2)  t1 hit(2)   t2 hit(2)
    # 5 misses x 1 ms stall + 9 layers x 2 ms compute = 23 ms.
    result = simulate(ROUTED, None, CacheConfig(capacity=1), COST, horizon=1)
    assert (result["hits"], result["misses"]) == (4.0, 5.0)
    assert result["misses_by_layer"] == [2, 2, 1]
    assert result["hit_rate"] == pytest.approx(4 / 9)
    assert result["bytes_moved"] == 5e6 and result["wasted_prefetch_bytes"] == 0.0
    assert result["stall_ms"] == pytest.approx(5.0)
    assert result["time_ms"] == pytest.approx(23.0)
    assert result["time_per_step_ms"] == pytest.approx(23.0 / 3)


def test_oracle_prefetch_overlapped_by_hand() -> None:
    # Clock (ms), capacity 1 per layer, horizon 1:
    #   t0 L0: miss 0 -> 1; prefetch {1} for L1 issued at 1, arrives 2; compute -> 3
    #   t0 L1: hit 1 (arrived); prefetch {2} at 3, arrives 4; compute -> 5
    #   t0 L2: hit 2; compute -> 7
    #   t1 L0: hit 0; prefetch {3} evicts 1 (already used: not wasted), arrives 8; compute -> 9
    #   t1 L1: hit 3; prefetch {2} already resident; compute -> 11;  t1 L2: hit -> 13
    #   t2 L0: miss 1 -> 14; prefetch {3} resident; compute -> 16;  L1 hit -> 18;  L2 hit -> 20
    prefetch = oracle_prefetch(ROUTED, horizon=1, m=1)
    result = simulate(ROUTED, prefetch, CacheConfig(capacity=1), COST, horizon=1)
    assert (result["hits"], result["misses"]) == (7.0, 2.0)
    assert result["misses_by_layer"] == [2, 0, 0]
    assert (result["prefetched"], result["prefetch_hits"]) == (3.0, 3.0)
    assert result["bytes_moved"] == 5e6 and result["wasted_prefetch_bytes"] == 0.0
    assert result["stall_ms"] == pytest.approx(2.0)
    assert result["time_ms"] == pytest.approx(20.0)


def test_oracle_prefetch_without_overlap_pays_every_transfer() -> None:
    # Same loads as above (2 demand + 3 prefetch), each now adds 1 ms: 18 + 5 = 23 ms.
    serial = CostModel(expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=2.0, overlap_prefetch=False)
    result = simulate(ROUTED, oracle_prefetch(ROUTED, 1, 1), CacheConfig(capacity=1), serial, horizon=1)
    assert result["hit_rate"] == pytest.approx(7 / 9)
    assert result["stall_ms"] == pytest.approx(5.0)
    assert result["time_ms"] == pytest.approx(23.0)


def test_slow_prefetch_stalls_beyond_overlapped_compute() -> None:
    # 3 ms transfers, 2 ms compute. L0: miss -> 3; prefetch {1} issued at 3 arrives 6; compute -> 5;
    # L1: hit but waits until 6 (1 ms stall = 3 - 1 * 2); compute -> 8. On demand: 3 + 2 + 3 + 2 = 10.
    slow = CostModel(expert_bytes=3e6, bandwidth_gbps=1.0, layer_compute_ms=2.0)
    routed = _routed([[[0], [1]]])
    with_prefetch = simulate(routed, oracle_prefetch(routed, 1, 1), CacheConfig(1), slow, horizon=1)
    on_demand = simulate(routed, None, CacheConfig(1), slow, horizon=1)
    assert with_prefetch["time_ms"] == pytest.approx(8.0)
    assert with_prefetch["stall_ms"] == pytest.approx(4.0)
    assert on_demand["time_ms"] == pytest.approx(10.0)
    assert speedup(on_demand["time_ms"], with_prefetch["time_ms"]) == pytest.approx(1.25)


def test_demand_load_waits_for_the_prefetch_in_flight_without_pre_emption() -> None:
    # Horizon 2, 3 ms transfers. L0: miss -> 3; prefetch {2} for L2 runs 3..6; compute -> 5;
    # L1: miss must wait for the link (free at 6) -> 9; compute -> 11; L2: hit (arrived 6) -> 13.
    slow = CostModel(expert_bytes=3e6, bandwidth_gbps=1.0, layer_compute_ms=2.0)
    routed = _routed([[[0], [1], [2]]])
    result = simulate(routed, oracle_prefetch(routed, 2, 1), CacheConfig(1), slow, horizon=2)
    assert result["misses_by_layer"] == [1, 1, 0]
    assert result["time_ms"] == pytest.approx(13.0)


@pytest.mark.parametrize("horizon", [1, 2])
def test_oracle_with_room_for_every_expert_hits_all_layers_from_horizon(horizon: int) -> None:
    rng = np.random.default_rng(horizon)
    first = rng.integers(0, 8, size=(40, 4))
    second = (first + rng.integers(1, 8, size=(40, 4))) % 8  # distinct from `first`
    routed = np.stack([first, second], axis=-1)  # (T, L, 2)
    prefetch = oracle_prefetch(routed, horizon, m=2)
    result = simulate(routed, prefetch, CacheConfig(capacity=8), COST, horizon=horizon)
    distinct_per_layer = [len(np.unique(routed[:, layer])) for layer in range(4)]
    # Layers below the horizon are never prefetched: each expert misses once, on first use.
    assert result["misses_by_layer"] == distinct_per_layer[:horizon] + [0] * (4 - horizon)
    assert result["wasted_prefetch_bytes"] == 0.0


# Capacity 2, one layer, no prefetch: the expert routed at each step.
REUSED_FIRST = [0, 0, 0, 1, 2, 0]
ALTERNATING = [0, 1, 0, 1, 2, 1, 0]
# Capacity 2, two layers, horizon 1. Layer 1 routes 1 at t0 and t2 (none at t1); layer 0 prefetches 2 (t1), 3 (t2).
ZERO_USE_ROUTED = [[[0], [1]], [[0], [-1]], [[0], [1]]]
ZERO_USE_PREFETCH = [[[-1], [-1]], [[2], [-1]], [[3], [-1]]]


def _random_case() -> dict:
    """REUSED_FIRST under `random` (seed 0): at expert 2 the resident keys are [0, 1] (oldest first) and the
    seeded draw picks the victim; evicting 0 makes the last 0 miss."""
    victim = random.Random(0).choice([0, 1])
    return {"hits": 2.0, "misses": 4.0} if victim == 0 else {"hits": 3.0, "misses": 3.0}


# policy -> hand-worked replays (routed, prefetch, expected results); every registered policy needs its own.
POLICY_CASES = {
    "lru": [
        # 2 evicts 0 (least recent) -> the last 0 misses: 4 misses.
        ([[[e]] for e in REUSED_FIRST], None, {"hits": 2.0, "misses": 4.0}),
        # 2 evicts 0 (1 was used more recently) -> 1 hits, 0 misses.
        ([[[e]] for e in ALTERNATING], None, {"hits": 3.0, "misses": 4.0}),
        # Prefetching 3 evicts 1 (older than the unused prefetch 2), so layer 1's second 1 misses; 2 and 3 are wasted.
        (ZERO_USE_ROUTED, ZERO_USE_PREFETCH, {"hits": 2.0, "misses": 3.0, "wasted_prefetch_bytes": 2e6}),
    ],
    "lfu": [
        # 2 evicts 1 (1 use vs 3) -> the last 0 hits: 3 misses.
        ([[[e]] for e in REUSED_FIRST], None, {"hits": 3.0, "misses": 3.0}),
        # At 2, experts 0 and 1 have 2 uses each; 0 is older -> evicted. Then 1 hits and 0 misses: hits = 3
        # (evicting 1 instead would give 2).
        ([[[e]] for e in ALTERNATING], None, {"hits": 3.0, "misses": 4.0}),
        # Prefetching 3 evicts the prefetch 2 (zero uses vs one), so layer 1's second 1 hits; 2 and 3 are wasted.
        (ZERO_USE_ROUTED, ZERO_USE_PREFETCH, {"hits": 3.0, "misses": 2.0, "wasted_prefetch_bytes": 2e6}),
    ],
    "random": [([[[e]] for e in REUSED_FIRST], None, _random_case())],
    # Without scores `predicted` is LRU (test_predicted_eviction_by_hand gives it scores).
    "predicted": [([[[e]] for e in REUSED_FIRST], None, {"hits": 2.0, "misses": 4.0})],
    "belady": [
        # 2 evicts 1 (never used again; 0 is used at the end) -> the last 0 hits: 3 misses.
        ([[[e]] for e in REUSED_FIRST], None, {"hits": 3.0, "misses": 3.0}),
        # At 2, 1 is next used before 0 -> 0 goes; 1 hits, 0 misses: 3 hits, the optimum (evicting 1 also gives 3).
        ([[[e]] for e in ALTERNATING], None, {"hits": 3.0, "misses": 4.0}),
        # Prefetching 3 evicts the prefetch 2 (never used) rather than 1 (used next): like LFU, 2 and 3 are wasted.
        (ZERO_USE_ROUTED, ZERO_USE_PREFETCH, {"hits": 3.0, "misses": 2.0, "wasted_prefetch_bytes": 2e6}),
    ],
}


def test_every_eviction_policy_has_hand_worked_cases() -> None:
    assert set(POLICY_CASES) == set(EVICTION_POLICIES)


@pytest.mark.parametrize(("policy", "routed", "prefetch", "expected"), [
    pytest.param(policy, routed, prefetch, expected, id=f"{policy}-{index}")
    for policy, cases in POLICY_CASES.items() for index, (routed, prefetch, expected) in enumerate(cases)
])
def test_eviction_policy_by_hand(policy: str, routed: list, prefetch: list | None, expected: dict) -> None:
    plan = None if prefetch is None else _routed(prefetch)
    result = simulate(_routed(routed), plan, CacheConfig(capacity=2, policy=policy), COST, horizon=1)
    assert {key: result[key] for key in expected} == expected


@pytest.mark.parametrize("policy", list(EVICTION_POLICIES))
def test_eviction_policy_never_picks_a_protected_key(policy: str) -> None:
    state = EVICTION_POLICIES[policy](2, PoolFuture(FutureUses(np.array([[[5, 7]]]), [0]), 0))
    assert state.victim(set()) is None  # nothing resident
    state.on_insert(5, tick=1, is_use=True)
    state.on_insert(7, tick=2, is_use=False)
    assert state.victim({5, 7}) is None
    assert state.victim({5}) == 7
    state.on_evict(7)
    assert state.victim({5}) is None
    assert state.victim(set()) == 5


def _fewest_misses(trace: list[int], capacity: int) -> int:
    """Exhaustive search over every eviction choice of one pool (demand loading): the minimum number of misses."""
    best = {frozenset(): 0}  # resident set -> fewest misses reaching it
    for expert in trace:
        after: dict[frozenset, int] = {}
        for resident, misses in best.items():
            if expert in resident:
                options, cost = [resident], 0
            elif len(resident) < capacity:
                options, cost = [resident | {expert}], 1
            else:
                options, cost = [(resident - {victim}) | {expert} for victim in resident], 1
            for option in options:
                after[option] = min(after.get(option, misses + cost), misses + cost)
        best = after
    return min(best.values())


@pytest.mark.parametrize("seed", range(6))
def test_belady_misses_the_fewest_of_all_eviction_choices(seed: int) -> None:
    trace = np.random.default_rng(seed).integers(0, 5, size=14).tolist()
    routed = _routed([[[e]] for e in trace])
    misses = {policy: simulate(routed, None, CacheConfig(capacity=2, policy=policy), COST, horizon=1)["misses"]
              for policy in EVICTION_POLICIES}
    assert misses["belady"] == _fewest_misses(trace, 2)
    assert misses["belady"] == min(misses.values())


def test_belady_reads_uses_across_layers_of_a_shared_pool() -> None:
    # One pool of 2 for both layers; keys are (layer, expert). Layer 1 uses its expert 0 every other step while layer
    # 0 cycles through 3 experts: LRU evicts (1, 0) between its uses, Belady keeps it (its next use is the nearest).
    routed = _routed([[[e], [0 if step % 2 == 0 else -1]] for step, e in enumerate([1, 2, 3, 1, 2, 3])])
    results = {policy: simulate(routed, None, CacheConfig(capacity=2, per_layer=False, policy=policy), COST, horizon=1)
               for policy in ("lru", "belady")}
    assert results["belady"]["misses_by_layer"][1] == 1
    assert results["lru"]["misses"] > results["belady"]["misses"]


def test_belady_per_layer_pools_read_their_own_layers_uses() -> None:
    # Layer 0 routes REUSED_FIRST, layer 1 routes expert 1 at every step. At layer 0's expert 2, its pool's 1 is never
    # used again *in layer 0* (layer 1's uses of id 1 belong to another pool): Belady evicts 1 and the last 0 hits.
    routed = _routed([[[e], [1]] for e in REUSED_FIRST])
    result = simulate(routed, None, CacheConfig(capacity=2, policy="belady"), COST, horizon=1)
    assert result["misses_by_layer"] == [3, 1]


def test_future_uses_next_use() -> None:
    future = FutureUses(_routed([[[0, -1], [0, 1]], [[1, -1], [-1, -1]]]), [0, 10])  # layer 1 keys are offset by 10
    assert future.positions == {0: [0], 1: [2], 10: [1], 11: [1]}
    future.now = 0
    assert (future.next_use(0), future.next_use(10), future.next_use(1), future.next_use(7)) == (np.inf, 1, 2, np.inf)


def test_queued_prefetch_yields_to_a_demand_load() -> None:
    # 3 ms transfers, 2 ms compute, horizon 2, room for everything. L0 prefetches [5, 6] for L2 (both wrong).
    #   L0: miss 0 at 0..3; issue [5, 6] at 3; compute -> 5. The link starts 5 at 3 (ends 6); 6 waits in the queue.
    #   L1 at 5: miss 1 waits for 5 in flight (no pre-emption) -> 6..9; compute -> 11. Then 6 starts at 9 (ends 12).
    #   L2 at 11: miss 2 waits for 6 -> 12..15; compute -> 17.
    # FIFO (a demand load behind every queued prefetch) would give 19.
    slow = CostModel(expert_bytes=3e6, bandwidth_gbps=1.0, layer_compute_ms=2.0)
    routed = _routed([[[0], [1], [2]]])
    prefetch = _routed([[[5, 6], [-1, -1], [-1, -1]]])
    result = simulate(routed, prefetch, CacheConfig(4), slow, horizon=2)
    assert result["time_ms"] == pytest.approx(17.0)
    assert (result["prefetched"], result["cancelled"], result["misses"]) == (2.0, 0.0, 3.0)
    assert result["wasted_prefetch_bytes"] == 6e6


def test_demand_load_pre_empts_the_prefetch_in_flight_at_a_chunk_boundary() -> None:
    # As above with 1 ms chunks. L1 at 5: 5 is in flight 3..6 with 2 chunks done -> demand 1 at 5..8, then the rest
    # of 5 at 8..9; compute -> 10. 6 starts at 9. L2 at 10: 6 has 1 chunk done -> demand 2 at 10..13, the rest of 6
    # at 13..15; compute -> 15.
    chunked = CostModel(expert_bytes=3e6, bandwidth_gbps=1.0, layer_compute_ms=2.0, chunk_bytes=1e6)
    routed = _routed([[[0], [1], [2]]])
    prefetch = _routed([[[5, 6], [-1, -1], [-1, -1]]])
    result = simulate(routed, prefetch, CacheConfig(4), chunked, horizon=2)
    assert result["time_ms"] == pytest.approx(15.0)
    assert (result["preempted"], result["prefetched"]) == (2.0, 2.0)


def test_prefetch_still_queued_when_its_layer_runs_is_cancelled_or_promoted() -> None:
    # 3 ms transfers, 2 ms compute, horizon 1. L0: miss 0 at 0..3; issue [1, 5] for L1 at 3; compute -> 5.
    # L1 at 5: 1 is in flight (3..6), 5 still queued.
    slow = CostModel(expert_bytes=3e6, bandwidth_gbps=1.0, layer_compute_ms=2.0)
    prefetch = _routed([[[1, 5], [-1, -1]]])
    # L1 routes 1: a late hit (waits 1 ms) -> compute 6..8; 5 is cancelled and moves no bytes.
    result = simulate(_routed([[[0], [1]]]), prefetch, CacheConfig(4), slow, horizon=1)
    assert result["time_ms"] == pytest.approx(8.0)
    assert (result["late_hits"], result["on_time_hits"], result["late_wait_ms"]) == (1.0, 0.0, pytest.approx(1.0))
    assert (result["cancelled"], result["prefetched"], result["bytes_moved"]) == (1.0, 1.0, 6e6)
    assert (result["hit_rate"], result["late_hit_rate"]) == (0.0, 0.5)
    # L1 routes 1 and 5: 5 is promoted to a demand load after 1 arrives (6..9) -> compute 9..11.
    result = simulate(_routed([[[0, -1], [1, 5]]]), prefetch, CacheConfig(4), slow, horizon=1)
    assert result["time_ms"] == pytest.approx(11.0)
    assert (result["cancelled"], result["misses"], result["late_hits"]) == (0.0, 2.0, 1.0)


def test_per_layer_prefetch_may_evict_the_running_layers_expert_ids_in_another_pool() -> None:
    # Capacity 1 per layer. Layer 1's pool holds expert 0 after step 0; at step 1 layer 0 runs expert 0 and prefetches
    # 1 for layer 1. Expert 0 of layer 1 is not the running layer's expert 0: the prefetch evicts it and layer 1 hits.
    routed = _routed([[[0], [0]], [[0], [1]]])
    prefetch = _routed([[[-1], [-1]], [[1], [-1]]])
    result = simulate(routed, prefetch, CacheConfig(capacity=1), COST, horizon=1)
    assert result["prefetched"] == 1.0
    assert result["misses_by_layer"] == [1, 1]


def test_shared_pool_prefetch_never_evicts_the_running_layers_experts() -> None:
    # One pool of 1: layer 0's expert 0 is running when the prefetch of 1 for layer 1 would start, so it is dropped.
    routed = _routed([[[0], [1]]])
    result = simulate(routed, _routed([[[1], [-1]]]), CacheConfig(capacity=1, per_layer=False), COST, horizon=1)
    assert (result["prefetched"], result["dropped"], result["misses"]) == (0.0, 1.0, 2.0)


def test_predictor_time_is_charged_on_the_compute_stream() -> None:
    # 1 ms transfers, 2 ms compute. L0: miss 0 at 0..1; the predictor runs 1..1+p; prefetch 1 arrives 2+p; compute
    # to 3+p; L1 hits on time -> 5+p. On demand: 1 + 2 + 1 + 2 = 6, so a 1.5 ms predictor makes prefetch slower.
    routed = _routed([[[0], [1]]])
    prefetch = oracle_prefetch(routed, 1, 1)
    for predictor_ms, time_ms in ((0.0, 5.0), (0.5, 5.5), (1.5, 6.5)):
        result = simulate(routed, prefetch, CacheConfig(1), COST, horizon=1, predictor_ms=predictor_ms)
        assert (result["time_ms"], result["predictor_ms"]) == (pytest.approx(time_ms), predictor_ms)
    assert simulate(routed, None, CacheConfig(1), COST, horizon=1, predictor_ms=1.5)["time_ms"] == pytest.approx(6.0)


def test_ideal_is_a_floor_under_every_strategy() -> None:
    rng = np.random.default_rng(3)
    first = rng.integers(0, 8, size=(60, 4))
    routed = np.stack([first, (first + rng.integers(1, 8, size=first.shape)) % 8], axis=-1)  # (T, L, 2)
    for cost in (COST, CostModel(3e6, 1.0, 0.5, chunk_bytes=1e6), CostModel(1e5, 1.0, 2.0)):
        belady = simulate(routed, None, CacheConfig(3, policy="belady"), cost, horizon=1)
        floor = ideal_time_ms(belady, cost)
        assert floor == max(belady["compute_ms"], belady["misses"] * cost.transfer_ms)
        for policy, prefetch in itertools.product(EVICTION_POLICIES, (None, oracle_prefetch(routed, 1, 2))):
            assert simulate(routed, prefetch, CacheConfig(3, policy=policy), cost, horizon=1)["time_ms"] >= floor - 1e-9


def test_evicted_unused_prefetch_is_wasted() -> None:
    # t0 L0 prefetches 3 for L1; L1 routes 1, whose demand load evicts the unused 3.
    routed = _routed([[[0], [1]], [[0], [1]]])
    prefetch = np.full((2, 2, 1), -1)
    prefetch[0, 0, 0] = 3
    result = simulate(routed, prefetch, CacheConfig(capacity=1), COST, horizon=1)
    assert result["wasted_prefetch_bytes"] == 1e6
    assert result["bytes_moved"] == 3e6  # 2 demand + 1 prefetch
    assert result["prefetch_hits"] == 0.0


def test_prefetch_never_used_by_the_end_is_wasted() -> None:
    routed = _routed([[[0], [1]]])
    prefetch = _routed([[[3], [-1]]])
    result = simulate(routed, prefetch, CacheConfig(capacity=2), COST, horizon=1)
    assert result["wasted_prefetch_bytes"] == 1e6
    assert result["misses"] == 2.0


def test_prefetch_beyond_capacity_is_dropped() -> None:
    # Capacity 1: the batch [1, 2] loads 1; 2 may not evict 1 from its own batch, so it is dropped.
    routed = _routed([[[0], [1]]])
    prefetch = _routed([[[1, 2], [-1, -1]]])
    result = simulate(routed, prefetch, CacheConfig(capacity=1), COST, horizon=1)
    assert result["prefetched"] == 1.0
    assert result["misses_by_layer"] == [1, 0]


def test_routed_set_wider_than_capacity_streams_the_overflow() -> None:
    # Capacity 1, both steps route {0, 1}: 1 may not evict 0 (routed now), so it is used uncached.
    routed = _routed([[[0, 1]], [[0, 1]]])
    result = simulate(routed, None, CacheConfig(capacity=1), COST, horizon=1)
    assert (result["hits"], result["misses"]) == (1.0, 3.0)


def test_shared_pool_holds_layer_expert_pairs() -> None:
    # Expert 0 in layer 0 and in layer 1 are two entries: a total of 1 thrashes, 2 holds both.
    routed = _routed([[[0], [0]], [[0], [0]]])
    tight = simulate(routed, None, CacheConfig(capacity=1, per_layer=False), COST, horizon=1)
    roomy = simulate(routed, None, CacheConfig(capacity=2, per_layer=False), COST, horizon=1)
    assert tight["misses"] == 4.0 and roomy["misses"] == 2.0


def test_oracle_prefetch_layout() -> None:
    routed = _routed([[[0, 1], [2, -1], [3, 0]]])
    assert oracle_prefetch(routed, 1, 3).tolist() == [[[2, -1, -1], [3, 0, -1], [-1, -1, -1]]]
    assert oracle_prefetch(routed, 2, 1).tolist() == [[[3], [-1], [-1]]]


def test_ideal_share_and_speedup() -> None:
    assert ideal_share(10.0, 9.0, 8.0) == pytest.approx(0.5)
    assert ideal_share(10.0, 9.0, 10.0) == 0.0  # the oracle gains nothing
    assert ideal_share(10.0, 9.0, float("nan")) == 0.0
    assert speedup(10.0, 8.0) == pytest.approx(1.25)


def test_validation() -> None:
    with pytest.raises(ValueError, match="capacity"):
        CacheConfig(capacity=0)
    with pytest.raises(ValueError, match="'fifo'"):
        CacheConfig(capacity=2, policy="fifo")
    with pytest.raises(ValueError, match="bandwidth"):
        CostModel(expert_bytes=1.0, bandwidth_gbps=0.0, layer_compute_ms=1.0)
    with pytest.raises(ValueError, match="horizon"):
        simulate(ROUTED, None, CacheConfig(1), COST, horizon=0)
    with pytest.raises(ValueError, match="prefetch shape"):
        simulate(ROUTED, np.zeros((3, 2, 1), dtype=np.int64), CacheConfig(1), COST, horizon=1)


def test_cache_params_name_the_key_and_the_accepted_values() -> None:
    assert_error(lambda: parse_section("evaluate", {"cache": {"policy": "fifo"}}),
                 "evaluate.cache.policy", "'fifo'", ", ".join(sorted(EVICTION_POLICIES)))
    assert_error(lambda: parse_section("evaluate", {"cache": {"profile": "h100"}}),
                 "evaluate.cache.profile", "'h100'", ", ".join(sorted(COST_PROFILES)))
    assert_error(lambda: parse_section("evaluate", {"cache": {"bandwidth_gbps": 0}}), "evaluate.cache.bandwidth_gbps", "> 0")
    assert_error(lambda: parse_section("evaluate", {"cache": {"layer_compute_ms": -1}}), "evaluate.cache.layer_compute_ms", ">= 0")
    # The renamed keys: the old names are unknown and the error lists the new ones.
    assert_error(lambda: parse_section("evaluate", {"topk": [1]}), "evaluate.topk", "unknown key", "top_m")
    assert_error(lambda: parse_section("evaluate", {"batch_size": 8}), "evaluate.batch_size", "score_batch_size")
    assert_error(lambda: parse_section("evaluate", {"cache": {"batch_sweep": [1]}}), "evaluate.cache.batch_sweep",
                 "decode_batch_sweep")


# --- cost profiles -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(COST_PROFILES))
def test_every_cost_profile_resolves_to_positive_numbers(name: str) -> None:
    profile = COST_PROFILES[name]
    cost = parse_section("evaluate", {"cache": {"profile": name}}).cache.cost_model()
    numbers = (cost.expert_bytes, cost.bandwidth_gbps, cost.layer_compute_ms)
    assert numbers == (profile.expert_bytes, profile.bandwidth_gbps, profile.layer_compute_ms)
    assert min(numbers) > 0 and profile.derivation
    assert cost.transfer_ms == pytest.approx(profile.expert_bytes / (profile.bandwidth_gbps * 1e9) * 1e3)


def test_default_profile_and_overrides() -> None:
    cache = parse_section("evaluate", None).cache
    assert (cache.profile, cache.expert_bytes, cache.bandwidth_gbps, cache.layer_compute_ms) == (
        "mixtral-8x7b-bf16-pcie4", None, None, None)
    cost = cache.cost_model()
    assert (cost.expert_bytes, cost.bandwidth_gbps, cost.layer_compute_ms) == (352_321_536.0, 25.0, 0.4)
    assert round(cost.transfer_ms, 6) == 14.092861  # metrics/evaluate.json's cache.config.transfer_ms_per_expert
    overridden = parse_section("evaluate", {"cache": {"bandwidth_gbps": 50}}).cache.cost_model()
    assert (overridden.expert_bytes, overridden.bandwidth_gbps, overridden.layer_compute_ms) == (352_321_536.0, 50.0, 0.4)


# --- baselines -----------------------------------------------------------------------------------------------

def _windows(context: list[int], target: list[int], previous: list[int], stale: list[int], sequence: list[int],
             layer: list[int]) -> WindowSet:
    """Windows with k = 1, context length 1: one expert per column and row."""
    n = len(context)

    def column(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.int16).reshape(n, 1)

    return WindowSet(
        context_experts=column(context)[:, None], target_layer=np.array(layer, dtype=np.int16),
        target_experts=column(target), target_weights=np.ones((n, 1), dtype=np.float32),
        prev_token_experts=column(previous), position=np.arange(n, dtype=np.int32), domain_index=np.zeros(n, dtype=np.int64),
        sequence_index=np.array(sequence, dtype=np.int64), domains=["d"], sequence_ids=sorted({f"s{i}" for i in sequence}),
        stale_gate_experts=column(stale),
    )


# E = 4, one target layer (1). Train: context 0 -> 1 once, context 2 -> 3 twice.
BASELINE_SUMMARY = {"num_experts": 4, "top_k": 1, "num_layers": 2, "context_length": 1, "horizon": 1}
# Token ids: 9 -> 1 once, 5 -> 3 twice.
BASELINE_TRAIN = dataclasses.replace(_windows([0, 2, 2], [1, 3, 3], [0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1]),
                                     token_id=np.array([9, 5, 5], dtype=np.int32))
# context 0, previous token's expert 2, stale gate 0, token 9
BASELINE_TEST = dataclasses.replace(_windows([0], [1], [2], [0], [0], [1]), token_id=np.array([9], dtype=np.int32))
BASELINE_VAL = BASELINE_TRAIN  # in-sample: the interpolation trusts the context table
# baseline -> its top-1 on BASELINE_TEST; every registered baseline needs its own.
BASELINE_TOP1 = {
    "random": int(np.random.default_rng(0).random((1, 4)).argmax()),  # the first draw of the seeded rng
    "frequency": 3,  # most gate mass at layer 1 in train
    "lookup": 1,  # context 0 was followed by 1
    "previous_token": 2,
    "stale_gate": 0,
    "top1_table": 1,  # context 0's only top-1 was 1
    "cooccurrence": 1,  # P(1 | 0 at the context layer) = (1 + alpha) / (1 + 4 alpha), every other (alpha) / (1 + 4 alpha)
    "lookup_interpolated": 1,  # weight ~1 on the context table: 1 + ~0 beats 3's ~0 * 2/3
    "token": 1,  # token 9 was followed by 1
    "token_context": 1,  # token 9 with last context layer (0) was followed by 1
}


def test_every_baseline_has_a_hand_worked_top1() -> None:
    assert set(BASELINE_TOP1) == set(BASELINES)


@pytest.mark.parametrize("name", list(BASELINE_TOP1))
def test_baseline_top1_by_hand(name: str) -> None:
    scores, _ = baseline_scorers(BASELINE_TRAIN, BASELINE_SUMMARY, np.random.default_rng(0), BASELINE_VAL)[name](BASELINE_TEST)
    assert scores.shape == (1, 4) and int(scores.argmax()) == BASELINE_TOP1[name]


def test_baselines_in_registration_order_without_the_missing_inputs() -> None:
    assert list(baseline_scorers(BASELINE_TRAIN, BASELINE_SUMMARY, np.random.default_rng(0), BASELINE_VAL)) == list(BASELINES)
    uncaptured = dataclasses.replace(BASELINE_TRAIN, stale_gate_experts=None, token_id=None)
    assert list(baseline_scorers(uncaptured, BASELINE_SUMMARY)) == ["frequency", "lookup", "previous_token", "top1_table", "cooccurrence"]


# --- prefetch strategies -------------------------------------------------------------------------------------

# Two tokens of one sequence x target layers 1, 2 (horizon 1), k = m = 1, token-major like the test windows.
# Routed: token 0 -> (0, 1), token 1 -> (2, 3). The predictor scorer knows the target, the lookup one is off by one.
REPLAY = _windows([0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 0, 0], [3, 0, 1, 1], [0, 0, 0, 0], [1, 2, 1, 2])
REPLAY_SCORERS = {
    "predictor": lambda w: (np.eye(4, dtype=np.float32)[w.target_experts[:, 0]], None),
    "lookup": lambda w: (np.eye(4, dtype=np.float32)[(w.target_experts[:, 0] + 1) % 4], None),
}
# strategy -> its plan: prefetch[t, l] lists experts for layer l + 1 (none for the last layer); every registered
# strategy needs its own.
STRATEGY_PLANS = {
    "on_demand": None,
    "predictor": [[[1], [-1]], [[3], [-1]]],
    "lookup": [[[2], [-1]], [[0], [-1]]],
    "stale_gate": [[[0], [-1]], [[1], [-1]]],  # the stale gate of each token's layer-2 window
    "oracle": [[[1], [-1]], [[3], [-1]]],
    "belady": None,
    "oracle_belady": [[[1], [-1]], [[3], [-1]]],
    "predictor_gated": [[[1], [-1]], [[3], [-1]]],  # at depth m; the depth itself is tuned on val (below)
    "lookup_gated": [[[2], [-1]], [[0], [-1]]],
    # Lead ceilings: position p = t * 2 + l prefetches position p + lead's experts, into the next step too.
    "oracle_belady_lead1": [[[1], [2]], [[3], [-1]]],
    "oracle_belady_lead2": [[[2], [3]], [[-1], [-1]]],
    "oracle_belady_lead4": [[[-1], [-1]], [[-1], [-1]]],  # 4 positions ahead: past the last step
    "oracle_belady_next_token": [[[2], [3]], [[-1], [-1]]],  # lead L = 2
    "predicted_eviction": [[[-1], [-1]], [[-1], [-1]]],  # nothing prefetched; the predictor's scores evict
    "predictor_evict": [[[1], [-1]], [[3], [-1]]],
    "predictor_expert_gated": [[[1], [-1]], [[3], [-1]]],  # at depth m; each expert then passes the gate or not
}


def test_every_prefetch_strategy_has_a_hand_worked_plan() -> None:
    assert set(STRATEGY_PLANS) == set(PREFETCH_STRATEGIES)


@pytest.mark.parametrize("name", list(STRATEGY_PLANS))
def test_prefetch_strategy_plan_by_hand(name: str) -> None:
    inputs = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2)
    steps = DecodeSteps(inputs, batch_size=1)
    assert steps.routed.tolist() == [[[0], [1]], [[2], [3]]]
    plan = PREFETCH_STRATEGIES[name].plan(inputs, steps, inputs.m)
    assert (None if plan is None else plan.tolist()) == STRATEGY_PLANS[name]


def test_every_moe_layer_is_replayed_with_the_tokens_full_routing() -> None:
    # REPLAY has c = 1, h = 1, target layers 1 and 2: with the full routing, layer 0 is replayed too, and the
    # prediction for target layer 1 + i is issued when layer i runs (the last layer issues nothing).
    routing = np.array([[[0], [0], [1]], [[0], [2], [3]]])  # (tokens, L, k)
    inputs = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, token_routing=routing)
    steps = DecodeSteps(inputs, batch_size=1)
    assert steps.routed.tolist() == routing.tolist()
    assert PREFETCH_STRATEGIES["predictor"].plan(inputs, steps, 1).tolist() == [[[0], [1], [-1]], [[2], [3], [-1]]]
    assert PREFETCH_STRATEGIES["lookup"].plan(inputs, steps, 1).tolist() == [[[1], [2], [-1]], [[3], [0], [-1]]]
    assert PREFETCH_STRATEGIES["oracle"].plan(inputs, steps, 1).tolist() == oracle_prefetch(routing, 1, 1).tolist()
    params = parse_section("evaluate", None).cache
    assert simulate_strategies(inputs, params, capacity=1, batch_size=1)["oracle"]["hit_rate"] > 0


def test_strategies_in_registration_order_without_the_missing_inputs() -> None:
    params = parse_section("evaluate", None).cache
    inputs = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2)
    with_val = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, val=inputs)
    assert list(simulate_strategies(with_val, params, capacity=1, batch_size=1)) == [*PREFETCH_STRATEGIES, "ideal"]
    assert "predictor_gated" not in simulate_strategies(inputs, params, capacity=1, batch_size=1)  # no val windows
    uncaptured = ReplayInputs(dataclasses.replace(REPLAY, stale_gate_experts=None), {}, m=1, horizon=1, num_target_layers=2)
    assert list(simulate_strategies(uncaptured, params, capacity=1, batch_size=1)) == [
        "on_demand", "belady", "oracle", "oracle_belady", "oracle_belady_lead1", "oracle_belady_lead2",
        "oracle_belady_lead4", "oracle_belady_next_token", "ideal"]


def test_gated_strategies_keep_the_depth_that_is_fastest_on_val() -> None:
    # 1 ms transfers, 2 ms compute: the predictor (always right) hides every transfer, so its gate keeps depth 1; the
    # lookup is always wrong, so prefetching only adds traffic and its gate keeps depth 0 = on-demand exactly.
    params = dataclasses.replace(parse_section("evaluate", None).cache, expert_bytes=1e6, bandwidth_gbps=1.0,
                                 layer_compute_ms=2.0)
    val = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2)
    inputs = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, val=val)
    result = simulate_strategies(inputs, params, capacity=1, batch_size=1)
    assert (result["predictor_gated"]["prefetch_depth"], result["lookup_gated"]["prefetch_depth"]) == (1, 0)
    # The per-expert gate passes the always-right predictor's experts (calibrated P(used) = 1 on val).
    assert result["predictor_expert_gated"]["prefetch_depth"] == 1
    assert result["predictor_expert_gated"]["time_per_token_ms"] == result["predictor"]["time_per_token_ms"]
    assert result["predictor_gated"]["time_per_token_ms"] == result["predictor"]["time_per_token_ms"]
    assert result["predictor_gated"]["speedup_vs_on_demand"] > 1.0
    assert result["lookup_gated"]["time_per_token_ms"] == result["on_demand"]["time_per_token_ms"]
    assert result["lookup"]["time_per_token_ms"] >= result["on_demand"]["time_per_token_ms"]
    # A predictor that costs more than it saves is gated off too.
    costly = simulate_strategies(inputs, dataclasses.replace(params, predictor_ms=5.0), capacity=1, batch_size=1)
    assert costly["predictor_gated"]["prefetch_depth"] == 0 and costly["predictor"]["speedup_vs_on_demand"] < 1.0


def test_predictor_probabilities_are_calibrated_on_val_and_aligned_with_the_plan() -> None:
    # On val (= REPLAY) the one-hot predictor's score 1 is always used and 0 never: calibrated P(used) is the score.
    # Replayed layer 0 is never predicted (h = 1, target layers only): NaN; layer 1 holds each token's target.
    val = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2)
    inputs = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, val=val)
    steps = DecodeSteps(inputs, batch_size=1)
    strategy = PREFETCH_STRATEGIES["predictor_expert_gated"]
    args = strategy.replay_args(inputs, steps, strategy.plan(inputs, steps, 1))
    use = args["use_scores"]  # (steps, L, E)
    assert np.isnan(use[:, 0]).all() and use[:, 1].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    assert np.array_equal(args["prefetch_probs"], [[[1.0], [np.nan]], [[1.0], [np.nan]]], equal_nan=True)
    assert PREFETCH_STRATEGIES["predictor_evict"].replay_args(inputs, steps, None)["use_scores"] is use


def test_speedup_intervals_resample_whole_documents() -> None:
    # Two tokens of one document: every resample is that document, so each interval is its point estimate.
    params = parse_section("evaluate", None).cache
    inputs = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, documents=np.zeros(2, dtype=np.int64),
                          document_weights=resample_weights(1, 20, seed=0))
    result = simulate_strategies(inputs, params, capacity=1, batch_size=1)
    for name in PREFETCH_STRATEGIES:
        if name in result:
            assert result[name]["speedup_ci95"] == [pytest.approx(result[name]["speedup_vs_on_demand"])] * 2
    assert "speedup_ci95" not in result["ideal"]
    assert "speedup_ci95" not in simulate_strategies(inputs, params, capacity=1, batch_size=2)["predictor"]  # steps mix documents


def test_step_times_add_up_to_the_clock() -> None:
    result = simulate(ROUTED, oracle_prefetch(ROUTED, 1, 1), CacheConfig(capacity=1), COST, horizon=1)
    assert result["step_ms"].tolist() == pytest.approx([7.0, 6.0, 7.0]) and result["step_ms"].sum() == result["time_ms"]


def test_twenty_thousand_steps_count_every_use() -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 64, size=(20_000, 8))
    routed = np.stack([first, (first + rng.integers(1, 64, size=first.shape)) % 64], axis=-1)
    result = simulate(routed, oracle_prefetch(routed, 1, 2), CacheConfig(16, policy="lfu"), COST, horizon=1)
    assert result["hits"] + result["misses"] == 20_000 * 8 * 2


def test_across_tokens_the_last_layers_of_a_step_prefetch_the_next_steps_first_layers() -> None:
    # windows.across_tokens, L = 2, c = h = 1: every layer is a target. Sequence 0 routes (0, 1), (2, 3), sequence 1
    # routes (1, 0). Position p = token * 2 + layer issues for p + 1: a step's last layer for the next token's layer
    # 0 (not across sequences), so only each sequence's first layer 0 is left to the cache.
    routing = np.array([[[0], [1]], [[2], [3]], [[1], [0]]])  # (tokens, L, k)
    flat = routing.reshape(-1).tolist()
    windows = _windows([-1, 0, 1, 2, -1, 1], flat, [-1, -1, 0, 1, -1, -1], [-1, 0, -1, 0, -1, 0], [0, 0, 0, 0, 1, 1],
                       [0, 1, 0, 1, 0, 1])
    inputs = ReplayInputs(windows, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, token_routing=routing,
                          across_tokens=True)
    steps = DecodeSteps(inputs, batch_size=1)
    assert PREFETCH_STRATEGIES["predictor"].plan(inputs, steps, 1).tolist() == [[[1], [2]], [[3], [-1]], [[0], [-1]]]
    params = dataclasses.replace(parse_section("evaluate", None).cache, expert_bytes=1e6, bandwidth_gbps=1.0,
                                 layer_compute_ms=2.0)  # transfers (1 ms) hide under a layer's compute (2 ms)
    result = simulate_strategies(inputs, params, capacity=1, batch_size=1)
    assert result["on_demand"]["hit_rate"] == 0.0  # every layer's pool sees a new expert at each step
    assert result["predictor"]["hit_rate"] == pytest.approx(4 / 6) and result["predictor"]["late_hit_rate"] == 0.0
    # The same plan with the lead kept within the step (as without across_tokens) loses the next token's layer 0.
    within = simulate(steps.routed, PREFETCH_STRATEGIES["predictor"].plan(inputs, steps, 1), CacheConfig(capacity=1),
                      params.cost_model(), 1)
    assert within["hit_rate"] == pytest.approx(3 / 6)
    # evaluate.cache.across_steps false: the steps' last layers issue nothing, as without across_tokens.
    kept = ReplayInputs(windows, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, token_routing=routing,
                        across_tokens=True, across_steps=False)
    kept_steps = DecodeSteps(kept, batch_size=1)
    assert PREFETCH_STRATEGIES["predictor"].plan(kept, kept_steps, 1).tolist() == [[[1], [-1]], [[3], [-1]], [[0], [-1]]]
    assert PREFETCH_STRATEGIES["oracle"].plan(kept, kept_steps, 1).tolist() == oracle_prefetch(routing, 1, 1).tolist()
    assert simulate_strategies(kept, params, capacity=1, batch_size=1)["predictor"]["hit_rate"] == pytest.approx(3 / 6)
