"""Hand-computed replays of the expert-cache mechanisms added for issue #13, one test (or two) per mechanism:
predicted eviction and what it may see of the scores, staging, the score guard, the per-expert gate and its
calibration, lead into later steps, batch compute scaling, several links and the CPU miss path
(moe_prefetch/evaluation/cache.py's docstring states each rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_error

from moe_prefetch.evaluation.cache import CacheConfig, CostModel, ideal_time_ms, oracle_prefetch, simulate
from moe_prefetch.evaluation.calibration import fit_calibration, used_mask
from moe_prefetch.evaluation.policies import IssuedScores
from moe_prefetch.params import parse_section

# 1 MB experts over 1 GB/s -> 1 ms per transfer; 2 ms compute per layer.
COST = CostModel(expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=2.0)
NAN = math.nan


def _routed(rows: list) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


# --- predicted eviction ----------------------------------------------------------------------------------------

def test_issued_scores_are_seen_from_their_issue_position_on() -> None:
    # L = 3, lead 1: scores of (t, l) are issued at position 3t + l - 1. Step t's row is 10 t + l (expert 0).
    scores = np.array([[[10.0 * t + l] for l in range(3)] for t in range(2)])  # (T, L, E = 1)
    issued = IssuedScores(scores, lead=1)
    seen = {}
    for visible in (-1, 0, 1, 2, 4, 5):
        issued.visible = visible
        seen[visible] = [issued.score(layer, 0) for layer in range(3)]
    # Before the replay only layer 0 of step 0 (issued at -1, before it starts) is out; layer 2 of step 0 at 1.
    assert np.array_equal(seen[-1], [0.0, NAN, NAN], equal_nan=True)
    assert np.array_equal(seen[0], [0.0, 1.0, NAN], equal_nan=True)
    assert seen[1] == [0.0, 1.0, 2.0]
    assert seen[2] == [10.0, 1.0, 2.0]  # step 1's layer 0 issued at 2; layer 1 still shows step 0's (stale)
    assert seen[4] == [10.0, 11.0, 12.0]
    assert seen[5] == [10.0, 11.0, 12.0]  # no step 2: the last step's scores stay
    assert math.isnan(issued.score(0, 3))  # an expert the scorer does not know


def test_predicted_eviction_by_hand() -> None:
    # One layer (lead 1 = L: step t's scores are issued when step t-1 runs), capacity 2, experts 0, 1, 2, 0.
    # At step 2 expert 2 must evict 0 or 1; LRU evicts 0 and the last 0 misses (4 misses).
    routed = _routed([[[0]], [[1]], [[2]], [[0]]])
    cache = CacheConfig(capacity=2, policy="predicted")

    def misses(step2: list[float], step3: list[float]) -> float:
        scores = np.array([[[NAN] * 3], [[NAN] * 3], [step2], [step3]])  # (T, 1, E)
        return simulate(routed, None, cache, COST, horizon=1, use_scores=scores)["misses"]

    assert misses([0.9, 0.1, 0.5], [NAN] * 3) == 3.0  # 1 is least likely: evicted, the last 0 hits
    # Step 3's scores (0 likely) are issued only when step 2 has run: the load of 2 sees step 2's, which favour 1.
    assert misses([0.1, 0.9, 0.5], [0.9, 0.1, 0.5]) == 4.0
    assert misses([0.5, 0.5, 0.5], [NAN] * 3) == 4.0  # a tie: the least recent (0) goes, as LRU
    assert misses([0.9, NAN, 0.5], [NAN] * 3) == 4.0  # an unknown score: LRU
    assert simulate(routed, None, CacheConfig(2), COST, horizon=1)["misses"] == 4.0


# --- where prefetches land -------------------------------------------------------------------------------------

# Two layers; layer 0 prefetches [7, 8] (both wrong) for layer 1 at steps 0 and 1; layer 1 routes 5 at both.
WRONG_ROUTED = [[[0], [5]], [[0], [5]]]
WRONG_PREFETCH = [[[7, 8], [-1, -1]], [[7, 8], [-1, -1]]]


def test_staging_keeps_wrong_prefetches_out_of_the_cache() -> None:
    # cache mode, capacity 2: t0 loads 7, 8; 5's miss evicts 7 -> (8, 5). t1 re-lists [7, 8]: 7 may not evict the
    # listed 8, so it evicts 5 and layer 1 misses again (2 misses in layer 1).
    routed, plan = _routed(WRONG_ROUTED), _routed(WRONG_PREFETCH)
    cached = simulate(routed, plan, CacheConfig(2), COST, horizon=1)
    assert cached["misses_by_layer"] == [1, 2]
    # staging, 1 slot (cache 1 + staging 1): t0 stages 7; 8 finds the slot held by the listed 7 and is dropped;
    # 5 goes into the cache. t1: 7 is staged already, 8 is dropped again; 5 hits.
    staged = simulate(routed, plan, CacheConfig(2, prefetch_into="staging", staging_slots=1), COST, horizon=1)
    assert staged["misses_by_layer"] == [1, 1]
    assert (staged["prefetched"], staged["dropped"]) == (1.0, 2.0)
    # Without a prefetch plan every slot is the cache's: on-demand is the same either way.
    on_demand = simulate(routed, None, CacheConfig(1, prefetch_into="staging", staging_slots=1), COST, horizon=1)
    assert on_demand["misses"] == simulate(routed, None, CacheConfig(1), COST, horizon=1)["misses"]


def test_a_used_staged_expert_is_promoted_into_the_cache() -> None:
    # Capacity 2 = cache 1 + staging 1. Layer 1 routes 5, 6, 5, 6; layer 0 prefetches 6 at step 1 only.
    # t0: 5 misses into the cache. t1: 6 is staged, hit on time and promoted (evicting 5): the staging slot is
    # free again. t2: 5 misses (evicts 6). t3: 6 misses. Layer 1: 3 misses, 1 prefetch hit.
    routed = _routed([[[0], [5]], [[0], [6]], [[0], [5]], [[0], [6]]])
    plan = _routed([[[-1], [-1]], [[6], [-1]], [[-1], [-1]], [[-1], [-1]]])
    result = simulate(routed, plan, CacheConfig(2, prefetch_into="staging", staging_slots=1), COST, horizon=1)
    assert result["misses_by_layer"] == [1, 3]
    assert (result["prefetch_hits"], result["on_time_hits"], result["wasted_prefetch_bytes"]) == (1.0, 4.0, 0.0)


def test_a_prefetch_may_not_evict_an_expert_predicted_likelier() -> None:
    # Capacity 1 per layer. Layer 1 holds 5 after step 0; at step 1 layer 0 prefetches 7 for layer 1 (issued with
    # step 1's layer-1 scores at position 2). 5's score 0.9 > 7's 0.2: 7 is dropped and 5 hits. Reversed, 7 evicts 5.
    routed = _routed([[[0], [5]], [[0], [5]]])
    plan = _routed([[[-1], [-1]], [[7], [-1]]])

    def replay(score_5: float, score_7: float) -> dict:
        scores = np.full((2, 2, 8), NAN)
        scores[1, 1, 5], scores[1, 1, 7] = score_5, score_7
        return simulate(routed, plan, CacheConfig(1), COST, horizon=1, use_scores=scores)

    guarded = replay(0.9, 0.2)
    assert (guarded["dropped"], guarded["misses_by_layer"]) == (1.0, [1, 1])
    unguarded = replay(0.2, 0.9)
    assert (unguarded["prefetched"], unguarded["misses_by_layer"]) == (1.0, [1, 2])


# --- the per-expert gate -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("transfer_bytes", "chunk_bytes", "p", "queued"), [
    # 1 ms transfer, 2 ms compute: on time (lateness 0), saving 1; cost = 1 ms (no pre-emption): p > 0.5.
    (1e6, 0.0, 0.6, True), (1e6, 0.0, 0.4, False),
    # 0.25 ms chunks: cost 0.25, so p > 0.2.
    (1e6, 2.5e5, 0.4, True), (1e6, 2.5e5, 0.15, False),
    # 3 ms transfer arrives 1 ms after layer 1 starts: saving 3 - 1 = 2, cost 3: p > 0.6.
    (3e6, 0.0, 0.65, True), (3e6, 0.0, 0.55, False),
    (1e6, 0.0, NAN, False),  # no probability: never queued
])
def test_gate_queues_an_expert_when_its_expected_saving_beats_its_cost(transfer_bytes: float, chunk_bytes: float,
                                                                       p: float, queued: bool) -> None:
    cost = CostModel(transfer_bytes, 1.0, 2.0, chunk_bytes=chunk_bytes)
    routed = _routed([[[0], [1]]])
    result = simulate(routed, _routed([[[1], [-1]]]), CacheConfig(2), cost, horizon=1,
                      prefetch_probs=np.array([[[p], [NAN]]]))
    assert (result["prefetched"], result["gated_out"]) == ((1.0, 0.0) if queued else (0.0, 1.0))


def test_gate_charges_the_victims_probability_of_use() -> None:
    # Capacity 1: layer 1 holds 5 (from step 0) when step 1 lists 7 with p = 0.6 (saving 1, demand delay 1).
    # Victim 5 with P(used) 0.6 costs 0.6 more: 0.6 > 0.4 x 1.6 = 0.64 fails; with P(used) 0.2, 0.6 > 0.48 passes.
    routed = _routed([[[0], [5]], [[0], [7]]])
    plan = _routed([[[-1], [-1]], [[7], [-1]]])
    probs = np.array([[[NAN], [NAN]], [[0.6], [NAN]]])
    for victim_score, queued in ((0.6, False), (0.2, True)):
        scores = np.full((2, 2, 8), NAN)
        scores[1, 1, 5], scores[1, 1, 7] = victim_score, 0.6
        result = simulate(routed, plan, CacheConfig(1), COST, horizon=1, use_scores=scores, prefetch_probs=probs)
        assert result["prefetched"] == float(queued)
    # Without scores the victim counts as certain to be used: 0.6 > 0.4 x 2 fails.
    assert simulate(routed, plan, CacheConfig(1), COST, horizon=1, prefetch_probs=probs)["gated_out"] == 1.0


def test_calibration_bins_scores_into_non_decreasing_rates() -> None:
    # 3 equal-count bins of 6 scores: {0.1} 0/1, {0.2, 0.3} 1/2, {0.8, 0.9, 0.95} 2/3.
    calibration = fit_calibration(np.array([[0.1, 0.2, 0.3, 0.8, 0.9, 0.95]]), np.array([[0, 1, 0, 0, 1, 1]]), bins=3)
    assert calibration.edges.tolist() == [0.2, 0.8]
    assert calibration(np.array([-1.0, 0.25, 0.85, 2.0])).tolist() == pytest.approx([0.0, 0.5, 2 / 3, 2 / 3])
    # A decreasing pair of bins is pooled: {0.1, 0.2} 2/2 then {0.3, 0.4} 0/2 -> both 2/4.
    pooled = fit_calibration(np.array([[0.1, 0.2, 0.3, 0.4]]), np.array([[1, 1, 0, 0]]), bins=2)
    assert pooled(np.array([0.1, 0.4])).tolist() == [0.5, 0.5]
    assert used_mask(np.array([[2, -1], [0, 1]]), 3).tolist() == [[False, False, True], [True, True, False]]


# --- lead beyond one layer, into the next token ----------------------------------------------------------------

def test_lead_targets_later_steps() -> None:
    # L = 2, capacity 2, lead 2 (the next token's same layer): position p prefetches p + 2's expert.
    #   t0 L0 @0: 0 misses 0..1; 2 issued for t1 L0 at 1, moves 1..2; compute -> 3.
    #   t0 L1 @3: 1 misses 3..4; 3 issued for t1 L1 at 4, moves 4..5; compute -> 6.
    #   t1 L0 @6: 2 hits on time -> 8.   t1 L1 @8: 3 hits -> 10.
    routed = _routed([[[0], [1]], [[2], [3]]])
    plan = oracle_prefetch(routed, 2, 1, wrap=True)
    assert plan.tolist() == [[[2], [3]], [[-1], [-1]]]
    result = simulate(routed, plan, CacheConfig(2), COST, horizon=1, lead=2)
    assert (result["time_ms"], result["misses"], result["on_time_hits"]) == (pytest.approx(10.0), 2.0, 2.0)
    # Within the step (lead None, horizon 2 = L) every target is past the last layer: on-demand, 4 + 8 = 12.
    assert simulate(routed, plan, CacheConfig(2), COST, horizon=2)["time_ms"] == pytest.approx(12.0)


def test_next_token_prefetch_never_evicts_the_running_layers_experts() -> None:
    # Capacity 1, lead L = 1 (one layer): step 0's expert 0 is running when 1 (for step 1) would start in the same
    # pool, so 1 is dropped and misses at step 1.
    routed = _routed([[[0]], [[1]]])
    result = simulate(routed, oracle_prefetch(routed, 1, 1, wrap=True), CacheConfig(1), COST, horizon=1, lead=1)
    assert (result["dropped"], result["misses"]) == (1.0, 2.0)


# --- batch compute, links, the CPU path ------------------------------------------------------------------------

def test_compute_grows_with_the_distinct_experts_of_a_step() -> None:
    # No transfer time (0-byte experts), k = 2, s = 0.5: 4 distinct experts compute 2 x (0.5 + 0.5 x 4/2) = 3 ms,
    # one expert 2 x (0.5 + 0.5 x 1/2) = 1.5 ms.
    scaled = CostModel(0.0, 1.0, 2.0, expert_compute_share=0.5)
    routed = _routed([[[0, 1, 2, 3]], [[0, -1, -1, -1]]])
    result = simulate(routed, None, CacheConfig(4), scaled, horizon=1, experts_per_token=2)
    assert result["step_ms"].tolist() == pytest.approx([3.0, 1.5])
    assert result["compute_ms"] == pytest.approx(4.5) and result["stall_ms"] == pytest.approx(0.0)
    assert simulate(routed, None, CacheConfig(4), COST, horizon=1)["compute_ms"] == pytest.approx(4.0)  # s = 0


def test_several_links_move_experts_in_parallel() -> None:
    # Two misses at once: one link 0..1, 1..2 then compute -> 4; two links 0..1 each -> 3.
    routed = _routed([[[0, 1]]])
    one, two = (simulate(routed, None, CacheConfig(2), CostModel(1e6, 1.0, 2.0, links=links), horizon=1)
                for links in (1, 2))
    assert (one["time_ms"], two["time_ms"]) == (pytest.approx(4.0), pytest.approx(3.0))
    # A demand load takes the free link while a prefetch is in flight on the other (3 ms transfers, horizon 2):
    # L0 miss 0..3, prefetch 2 moves 3..6; L1 at 5 loads 1 on the free link 5..8 -> 10; L2 hits -> 12 (13 with one).
    slow = [CostModel(3e6, 1.0, 2.0, links=links) for links in (1, 2)]
    routed = _routed([[[0], [1], [2]]])
    times = [simulate(routed, oracle_prefetch(routed, 2, 1), CacheConfig(1), cost, horizon=2)["time_ms"] for cost in slow]
    assert times == [pytest.approx(13.0), pytest.approx(12.0)]
    belady = simulate(_routed([[[0, 1]]]), None, CacheConfig(2, policy="belady"), CostModel(1e6, 1.0, 0.0, links=2), 1)
    assert ideal_time_ms(belady, CostModel(1e6, 1.0, 0.0, links=2)) == pytest.approx(1.0)  # 2 loads / 2 links


def test_cpu_path_computes_missing_experts_beside_the_gpu() -> None:
    # CPU experts take 3 ms, GPU layers 2 ms. On demand: each layer waits for its one CPU expert: 3 + 3 = 6.
    # With 1 prefetched for layer 1 (moves 0..1 while layer 0 computes): 3 + 2 = 5. Nothing is demand-loaded.
    cpu = CostModel(1e6, 1.0, 2.0, miss_path="cpu", cpu_expert_ms=3.0)
    routed = _routed([[[0], [1]]])
    on_demand = simulate(routed, None, CacheConfig(1), cpu, horizon=1)
    assert (on_demand["time_ms"], on_demand["cpu_experts"], on_demand["bytes_moved"]) == (pytest.approx(6.0), 2.0, 0.0)
    assert on_demand["compute_ms"] == pytest.approx(4.0) and on_demand["stall_ms"] == pytest.approx(2.0)
    prefetched = simulate(routed, oracle_prefetch(routed, 1, 1), CacheConfig(1), cpu, horizon=1)
    assert (prefetched["time_ms"], prefetched["on_time_hits"], prefetched["bytes_moved"]) == (pytest.approx(5.0), 1.0, 1e6)
    assert ideal_time_ms(on_demand, cpu) == pytest.approx(4.0)  # nothing need move: the floor is the compute
    # A prefetch arriving more than cpu_expert_ms late is computed on the CPU instead. Layer 0 issues 1 at 0 (no
    # demand load) and runs until max(2, 3) = 3. A 5 ms transfer lands at 5: a 2 ms wait < 3 ms on the CPU, so
    # layer 1 waits: 5 + 2 = 7. A 7 ms transfer lands at 7 (a 4 ms wait): the CPU computes it, 3 + max(2, 3) = 6,
    # and it counts as a miss.
    plan = _routed([[[1], [-1]]])
    for transfer_bytes, time_ms, late_hits in ((5e6, 7.0, 1.0), (7e6, 6.0, 0.0)):
        slow = CostModel(transfer_bytes, 1.0, 2.0, miss_path="cpu", cpu_expert_ms=3.0)
        result = simulate(_routed([[[0], [1]]]), plan, CacheConfig(1), slow, horizon=1)
        assert (result["time_ms"], result["late_hits"], result["misses"]) == (pytest.approx(time_ms), late_hits, 2 - late_hits)
    # Two CPU experts and s = 0.5, k = 1 (the GPU still computes the rest): max(2 x 0.5, 2 x 3) = 6.
    halved = CostModel(1e6, 1.0, 2.0, expert_compute_share=0.5, miss_path="cpu", cpu_expert_ms=3.0)
    assert simulate(_routed([[[0, 1]]]), None, CacheConfig(2), halved, 1, experts_per_token=1)["time_ms"] == pytest.approx(6.0)


def test_new_cache_params_name_the_key_and_the_accepted_values() -> None:
    assert_error(lambda: parse_section("evaluate", {"cache": {"prefetch_into": "hbm"}}), "evaluate.cache.prefetch_into",
                 "'hbm'", "cache, staging")
    assert_error(lambda: parse_section("evaluate", {"cache": {"miss_path": "disk"}}), "evaluate.cache.miss_path",
                 "'disk'", "transfer, cpu")
    assert_error(lambda: parse_section("evaluate", {"cache": {"miss_path": "cpu", "cpu_expert_ms": 0.0}}),
                 "evaluate.cache.cpu_expert_ms", "> 0")
    assert_error(lambda: parse_section("evaluate", {"cache": {"links": 0}}), "evaluate.cache.links", "> 0")
    assert_error(lambda: parse_section("evaluate", {"cache": {"expert_compute_share": 1.5}}),
                 "evaluate.cache.expert_compute_share", "[0, 1]")
    cpu = parse_section("evaluate", {"cache": {"profile": "mixtral-8x7b-bf16-cpu"}}).cache.cost_model()
    assert (cpu.miss_path, cpu.cpu_expert_ms, cpu.expert_compute_share) == ("cpu", 3.5, 0.89)
