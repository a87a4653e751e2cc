"""Hand-computed replays of the expert-cache prefetch simulator."""

from __future__ import annotations


import numpy as np
import pytest


from moe_prefetch.evaluation.cache import (  # noqa: E402
    CacheConfig,
    CostModel,
    oracle_prefetch,
    oracle_share,
    simulate,
    speedup,
)

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


def test_demand_load_queues_behind_prefetch_on_the_link() -> None:
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


def test_lru_and_lfu_differ() -> None:
    # Capacity 2, sequence 0 0 0 1 2 0. LRU: 2 evicts 0 (least recent) -> last 0 misses: 4 misses.
    # LFU: 2 evicts 1 (1 use vs 3) -> last 0 hits: 3 misses.
    routed = _routed([[[0]], [[0]], [[0]], [[1]], [[2]], [[0]]])
    lru = simulate(routed, None, CacheConfig(capacity=2, policy="lru"), COST, horizon=1)
    lfu = simulate(routed, None, CacheConfig(capacity=2, policy="lfu"), COST, horizon=1)
    assert (lru["hits"], lru["misses"]) == (2.0, 4.0)
    assert (lfu["hits"], lfu["misses"]) == (3.0, 3.0)


def test_lfu_breaks_count_ties_by_recency() -> None:
    # Capacity 2, sequence 0 1 0 1 2 1 0: at 2, experts 0 and 1 have 2 uses each; 0 is older -> evicted.
    # Then 1 hits and 0 misses: hits = 3 (evicting 1 instead would give 2).
    routed = _routed([[[0]], [[1]], [[0]], [[1]], [[2]], [[1]], [[0]]])
    result = simulate(routed, None, CacheConfig(capacity=2, policy="lfu"), COST, horizon=1)
    assert (result["hits"], result["misses"]) == (3.0, 4.0)


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


def test_oracle_share_and_speedup() -> None:
    assert oracle_share(10.0, 9.0, 8.0) == pytest.approx(0.5)
    assert oracle_share(10.0, 9.0, 10.0) == 0.0  # the oracle gains nothing
    assert oracle_share(10.0, 9.0, float("nan")) == 0.0
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


def test_twenty_thousand_steps_count_every_use() -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 64, size=(20_000, 8))
    routed = np.stack([first, (first + rng.integers(1, 64, size=first.shape)) % 64], axis=-1)
    result = simulate(routed, oracle_prefetch(routed, 1, 2), CacheConfig(16, policy="lfu"), COST, horizon=1)
    assert result["hits"] + result["misses"] == 20_000 * 8 * 2
