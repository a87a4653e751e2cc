"""The replay's report (moe_prefetch/evaluation/sweeps.py): configurations replayed once, the same report from a
process pool, capacity as a fraction of a pool's experts, per-profile sweeps, and the fallback prefetch of the layers
no predictor scores (moe_prefetch/evaluation/fallback.py), by hand on tiny traces."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import assert_error
from test_evaluation_cache import REPLAY, REPLAY_SCORERS, _windows

from moe_prefetch.evaluation import replay as replay_module
from moe_prefetch.evaluation.config import COST_PROFILES, CacheParams
from moe_prefetch.evaluation.fallback import FallbackInputs, fallback_plan
from moe_prefetch.evaluation.replay import PREFETCH_STRATEGIES, DecodeSteps, ReplayInputs, simulate_strategies
from moe_prefetch.evaluation.sweeps import cache_report
from moe_prefetch.params import parse_section

# REPLAY: 2 tokens of one sequence, target layers 1 and 2 (c = 1, h = 1), E = 4.
SUMMARY = {"target_layers": [1, 2], "num_experts": 4, "horizon": 1, "context_length": 1, "num_layers": 3}


def _params(**changes) -> CacheParams:
    small = dict(capacity=1, capacity_sweep=[1, 2], decode_batch_sweep=[1, 2], regime_sweep=[1.0, 8.0])
    return dataclasses.replace(parse_section("evaluate", None).cache, **{**small, **changes})


def _counted(monkeypatch) -> list[int]:
    """Count the simulator's replays."""
    calls, simulate = [], replay_module.simulate

    def counting(*args, **kwargs):
        calls.append(1)
        return simulate(*args, **kwargs)

    monkeypatch.setattr(replay_module, "simulate", counting)
    return calls


def _json(report: dict) -> str:
    return json.dumps(report, sort_keys=True, default=lambda array: array.tolist())


def test_a_configuration_named_by_several_sweeps_is_replayed_once(monkeypatch):
    calls = _counted(monkeypatch)
    once = cache_report(REPLAY, REPLAY_SCORERS, _params(capacity_sweep=[2], profile_sweep_tokens=0), SUMMARY, val=REPLAY)
    replays_once = len(calls)
    calls.clear()
    # The configured capacity 1 in the capacity sweep too: a row, no replay (the batch sweep and the configured
    # profile's row name it already).
    repeated = cache_report(REPLAY, REPLAY_SCORERS, _params(capacity_sweep=[1, 2], profile_sweep_tokens=0), SUMMARY,
                            val=REPLAY)
    assert len(calls) == replays_once
    main_row = {f"{name}_{key}": value[key] for name, value in repeated["cache"].items() if name != "config"
                for key in ("hit_rate", "speedup_vs_on_demand") if key in value}
    assert {key: repeated["by_capacity"][0][key] for key in main_row} == main_row
    assert repeated["by_capacity"][1] == once["by_capacity"][0]


def test_a_gate_at_depth_zero_or_m_and_coinciding_plans_cost_no_test_replay(monkeypatch):
    # m = 1: the predictor's gate keeps depth 1 = the predictor itself, the lookup's depth 0 = on-demand; the oracle's
    # plan equals the always-right predictor's. Test replays: on_demand, belady, predictor, lookup, stale_gate,
    # oracle_belady; val replays: no prefetch, predictor and lookup at depth 1.
    calls = _counted(monkeypatch)
    params = _params(expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=2.0)
    val = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2)
    inputs = ReplayInputs(REPLAY, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, val=val)
    result = simulate_strategies(inputs, params, capacity=1, batch_size=1)
    assert (result["predictor_gated"]["prefetch_depth"], result["lookup_gated"]["prefetch_depth"]) == (1, 0)
    assert result["oracle"]["time_per_token_ms"] == result["predictor"]["time_per_token_ms"]
    distinct_plans = len(PREFETCH_STRATEGIES) - 3  # gated twins and the oracle share a replay
    assert len(calls) == distinct_plans + 3


def test_the_report_is_the_same_from_a_pool_of_processes():
    params = _params(profile_sweep_tokens=1000)
    serial = cache_report(REPLAY, REPLAY_SCORERS, params, SUMMARY, val=REPLAY, processes=1)
    pooled = cache_report(REPLAY, REPLAY_SCORERS, params, SUMMARY, val=REPLAY, processes=2)
    assert _json(serial) == _json(pooled)


def test_every_profile_is_swept_and_the_configured_one_matches_its_full_sweep():
    report = cache_report(REPLAY, REPLAY_SCORERS, _params(profile_sweep_tokens=1000), SUMMARY, val=REPLAY)
    assert list(report["by_profile_capacity"]) == list(report["by_profile_batch"]) == list(COST_PROFILES)
    configured = _params().profile
    # Both replays hold all 2 tokens here, so the per-profile sweep of the configured profile is its full sweep, cut
    # to the strategies it replays.
    for swept, full in ((report["by_profile_capacity"][configured], report["by_capacity"]),
                        (report["by_profile_batch"][configured], report["by_batch"])):
        assert swept == [{key: row[key] for key in swept_row} for row, swept_row in zip(full, swept)]
        assert len(swept) == len(full) and all(set(a) < set(b) for a, b in zip(swept, full))
    assert [row["capacity"] for row in report["by_capacity"]] == [1, 2]
    assert [row["capacity_fraction"] for row in report["by_capacity"]] == [0.25, 0.5]
    off = cache_report(REPLAY, REPLAY_SCORERS, _params(profile_sweep_tokens=0), SUMMARY, val=REPLAY)
    assert off["by_profile_capacity"] == {} and off["cache"]["config"]["profile_sweep_tokens"] == 0


def test_capacity_as_a_fraction_of_the_pools_experts():
    params = _params(capacity_fraction=0.5, capacity_sweep=[0.1, 0.125, 0.5, 0.01], capacity_sweep_unit="fraction")
    assert params.cache_experts(4) == 2 and params.cache_experts(16) == 8
    assert _params(capacity_fraction=0.01).cache_experts(16) == 1  # at least one expert
    assert params.capacity_sweep_experts(16) == [2, 8, 1]  # round(1.6) = round(2.0) = 2 once; 0.16 -> 1
    report = cache_report(REPLAY, REPLAY_SCORERS, params, SUMMARY, val=REPLAY)
    assert (report["cache"]["config"]["capacity"], report["cache"]["config"]["capacity_fraction"]) == (2, 0.5)
    shared = cache_report(REPLAY, REPLAY_SCORERS, dataclasses.replace(params, per_layer=False), SUMMARY)
    assert shared["cache"]["config"]["capacity"] == 4  # one pool of 2 target layers x 4 experts


@pytest.mark.parametrize("changes, fragments", [
    ({"capacity_fraction": 1.5}, ("evaluate.cache.capacity_fraction", "1.5", "(0, 1]")),
    ({"capacity_sweep_unit": "percent"}, ("evaluate.cache.capacity_sweep_unit", "percent", "experts, fraction")),
    ({"capacity_sweep_unit": "fraction", "capacity_sweep": [2]}, ("evaluate.cache.capacity_sweep", "[2]", "(0, 1]")),
    ({"capacity_sweep": [0.5]}, ("evaluate.cache.capacity_sweep", "integers >= 1")),
    ({"fallback": "stale"}, ("evaluate.cache.fallback", "stale", "frequency, none, stale_gate, token")),
    ({"profile_sweep_tokens": -1}, ("evaluate.cache.profile_sweep_tokens", "-1")),
])
def test_bad_sizes_and_fallbacks_are_one_line_errors(changes, fragments):
    assert_error(_params(**changes).validate, *fragments)


# Train routing: 3 tokens x 3 layers, k = 1.
TRAIN_EXPERTS = np.array([[[0], [2], [1]], [[1], [2], [1]], [[1], [3], [0]]])


def test_frequency_fallback_lists_each_layers_most_frequent_train_experts():
    # c = 2, h = 1: layer 0 issues for layer 1, whose train experts are 2, 2, 3 -> [2, 3] (then ties to the lower id).
    plan = fallback_plan("frequency", FallbackInputs(2, TRAIN_EXPERTS, None, context_length=2, horizon=1, m=2))
    assert plan.tolist() == [[[2, 3]], [[2, 3]]]
    # c = 3: layer 1 issues for layer 2 too (train experts 1, 1, 0 -> [1, 0]).
    plan = fallback_plan("frequency", FallbackInputs(1, TRAIN_EXPERTS, None, context_length=3, horizon=1, m=2))
    assert plan.tolist() == [[[2, 3], [1, 0]]]
    assert fallback_plan("none", FallbackInputs(2, TRAIN_EXPERTS, None, 2, 1, 2)) is None
    assert fallback_plan("frequency", FallbackInputs(2, TRAIN_EXPERTS, None, 1, 1, 2)) is None  # c = 1: no such layer


def test_stale_gate_fallback_reads_the_look_ahead_capture_or_says_it_is_missing():
    lookahead = np.array([[[[3, 1]], [[0, 2]], [[1, 1]]]])  # (1 token, L = 3, H = 1, k = 2)
    plan = fallback_plan("stale_gate", FallbackInputs(1, TRAIN_EXPERTS, lookahead, context_length=3, horizon=1, m=1))
    assert plan.tolist() == [[[3], [0]]]  # layer 0's look-ahead for layer 1, layer 1's for layer 2
    assert_error(lambda: fallback_plan("stale_gate", FallbackInputs(1, TRAIN_EXPERTS, None, 3, 1, 1)),
                 "evaluate.cache.fallback", "stale_gate", "lookahead 0", "none, frequency")


def test_token_fallback_lists_the_experts_routed_after_the_same_token_id():
    # Train token ids 7, 7, 4 (TRAIN_EXPERTS' rows). c = 3, h = 1: layer 0 issues for layer 1, layer 1 for layer 2.
    # Token 7 routed 2, 2 at layer 1 and 1, 1 at layer 2; token 4 routed 3 and 0. Token 9 was never seen: the
    # frequency rule's lists (layer 1: 2, 3; layer 2: 1, 0). m = 2: the second slot is the frequency back-off.
    inputs = FallbackInputs(3, TRAIN_EXPERTS, None, context_length=3, horizon=1, m=2, token_ids=np.array([4, 7, 9]),
                            train_token_ids=np.array([7, 7, 4]))
    assert fallback_plan("token", inputs).tolist() == [[[3, 2], [0, 1]], [[2, 3], [1, 0]], [[2, 3], [1, 0]]]
    assert_error(lambda: fallback_plan("token", FallbackInputs(1, TRAIN_EXPERTS, None, 3, 1, 1)),
                 "evaluate.cache.fallback", "token", "token ids", "none, frequency")


def test_learned_strategies_issue_the_fallback_at_the_layers_before_their_context():
    # c = 2, h = 1, L = 4: predictions for layers 2 and 3 are issued at layers 1 and 2; layer 0 issues the fallback
    # for layer 1. The always-right predictor lists each token's targets (0, 1) and (2, 3).
    windows = dataclasses.replace(REPLAY, context_experts=np.zeros((4, 2, 1), dtype=np.int16))
    routing = np.array([[[0], [3], [0], [1]], [[1], [0], [2], [3]]])  # (tokens, L, k)
    fallback = np.array([[[3]], [[0]]])  # (tokens, c-1, m)
    inputs = ReplayInputs(windows, REPLAY_SCORERS, m=1, horizon=1, num_target_layers=2, token_routing=routing,
                          fallback=fallback)
    steps = DecodeSteps(inputs, batch_size=1)
    plan = PREFETCH_STRATEGIES["predictor"].plan(inputs, steps, 1)
    assert plan.tolist() == [[[3], [0], [1], [-1]], [[0], [2], [3], [-1]]]
    assert PREFETCH_STRATEGIES["oracle"].plan(inputs, steps, 1)[:, 0].tolist() == [[3], [0]]  # not a fallback: its own
    assert steps.fallback_prefetches(plan) == 2
    assert DecodeSteps(inputs, batch_size=2).fallback_prefetches(PREFETCH_STRATEGIES["predictor"].plan(
        inputs, DecodeSteps(inputs, batch_size=2), 1)) == 2  # one sequence: the second member is empty padding
    fast = _params(expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=2.0)  # 1 ms transfers under 2 ms layers
    result = simulate_strategies(inputs, fast, capacity=1, batch_size=1)
    assert result["predictor"]["fallback_prefetches"] == 2 and "fallback_prefetches" not in result["oracle"]
    # The fallback is right about layer 1 here, so it turns both layer-1 misses into on-time hits.
    without = simulate_strategies(ReplayInputs(windows, REPLAY_SCORERS, 1, 1, 2, token_routing=routing), fast, 1, 1)
    assert result["predictor"]["hit_rate"] == pytest.approx(without["predictor"]["hit_rate"] + 2 / 8)
    assert without["predictor"]["fallback_prefetches"] == 0


def test_synthetic_prefetcher_lists_the_routed_expert_with_probability_q():
    from moe_prefetch.evaluation.breakeven import synthetic_plan

    rng = np.random.default_rng(1)
    routed = np.stack([rng.permutation(8)[:2] for _ in range(2000 * 3)]).reshape(2000, 3, 2)  # (T, L, k), E = 8
    right = synthetic_plan(routed, 1, 2, 8, 1.0, seed=0)
    assert right[:, :2].tolist() == routed[:, 1:].tolist() and (right[:, 2] == -1).all()
    wrong = synthetic_plan(routed, 1, 2, 8, 0.0, seed=0)[:, :2]  # never an expert layer l + 1 routes
    assert not (wrong[..., :, None] == routed[:, 1:, None, :]).any() and ((wrong >= 0) & (wrong < 8)).all()
    half = synthetic_plan(routed, 1, 2, 8, 0.5, seed=0)[:, :2]
    assert (half == routed[:, 1:]).mean() == pytest.approx(0.5, abs=0.02)
    assert np.all((half == routed[:, 1:]) | (half == wrong))  # the same draws for every q


def test_break_even_is_where_the_speedup_crosses_one():
    from moe_prefetch.evaluation.breakeven import crossing, plan_precision

    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    assert crossing(grid, [0.8, 0.9, 0.95, 1.05, 1.2]) == pytest.approx(0.625)  # 0.5 + 0.05 / 0.1 x 0.25
    assert crossing(grid, [1.0, 1.1, 1.2, 1.3, 1.4]) == 0.0
    assert crossing(grid, [0.5, 0.6, 0.7, 0.8, 0.9]) is None
    routed = np.array([[[0], [1], [2]]])  # (T = 1, L = 3, k = 1)
    assert plan_precision(np.array([[[1], [3], [-1]]]), routed, 1) == 0.5  # layer 1 right, layer 2 wrong
    report = cache_report(REPLAY, REPLAY_SCORERS, _params(profile_sweep_tokens=1000, prefetch_m=1), SUMMARY, val=REPLAY)
    for row in report["by_regime"]:
        assert row["predictor_precision"] == 1.0 and row["lookup_precision"] == 0.0  # always right, always wrong
        assert row["breakeven_precision"] is None or 0.0 <= row["breakeven_precision"] <= 1.0


def test_a_batch_prefetches_by_the_members_summed_probability():
    """by_summed_score by hand: expert 5, listed by both members (0.3 + 0.3), goes before expert 2 (0.5 once), which
    goes before 7 (0.4); a repeat is listed once; an empty row stays empty."""
    plan = np.array([[[2, 5, 5, 7], [-1, -1, -1, -1]]])  # (steps 1, layers 2, 2 members x m 2)
    scores = np.array([[[0.5, 0.3, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(replay_module.by_summed_score(plan, scores), [[[5, 2, 7, -1], [-1, -1, -1, -1]]])


def test_decode_steps_order_a_batch_plan_by_summed_score_and_leave_batch_one_alone():
    # two sequences of two tokens x target layers 1, 2; random scores, so the members' lists interleave
    two = _windows([0] * 8, [0, 1, 2, 3, 1, 2, 3, 0], [0] * 8, [0] * 8, [0, 0, 0, 0, 1, 1, 1, 1], [1, 2] * 4)
    random_scores = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    inputs = ReplayInputs(two, {"predictor": lambda w: (random_scores[: len(w)], None)}, m=2, horizon=1, num_target_layers=2)
    experts, scores = inputs.predicted("predictor"), inputs.predicted_scores("predictor")
    single = DecodeSteps(inputs, 1)
    np.testing.assert_array_equal(single.issue(experts, scores=scores), single.issue(experts))
    batch = DecodeSteps(inputs, 2)
    plain, ranked = batch.issue(experts), batch.issue(experts, scores=scores)
    summed = batch._issued(scores, with_fallback=False, fill=0.0)
    np.testing.assert_array_equal(ranked, replay_module.by_summed_score(plain, summed))
    assert not np.array_equal(ranked, plain)  # the random scores do reorder some batch's list
    for row_plain, row_ranked in zip(plain.reshape(-1, plain.shape[2]), ranked.reshape(-1, ranked.shape[2])):
        assert set(row_plain[row_plain >= 0]) == set(row_ranked[row_ranked >= 0])  # the same experts, reordered


def test_the_regime_sweep_replays_the_per_profile_sweeps_tokens():
    # Two sequences of 2 tokens; the sweeps take the first one (2 tokens). The regime rows are then those of a run on
    # that sequence alone, while the configured cache replays both.
    both = _windows([0] * 8, [0, 1, 2, 3, 1, 0, 3, 2], [0] * 8, [3, 0, 1, 1, 0, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1],
                    [1, 2] * 4)
    first = both.subset(np.arange(4))
    swept = cache_report(both, REPLAY_SCORERS, _params(profile_sweep_tokens=2), SUMMARY, val=both)
    alone = cache_report(first, REPLAY_SCORERS, _params(profile_sweep_tokens=0), SUMMARY, val=first)
    assert swept["cache"]["config"]["replayed_tokens"] == 4 and swept["cache"]["config"]["profile_sweep_tokens"] == 2
    assert _json(swept["by_regime"]) == _json(alone["by_regime"])
    assert _json(swept["cache"]) != _json(alone["cache"])


def test_the_per_profile_sweeps_replay_the_panel_strategies_and_the_configured_cache_every_one():
    from moe_prefetch.evaluation.sweeps import PANEL_STRATEGIES

    report = cache_report(REPLAY, REPLAY_SCORERS, _params(profile_sweep_tokens=1000), SUMMARY, val=REPLAY)
    swept = {key.rsplit("_speedup_vs_on_demand", 1)[0] for rows in report["by_profile_capacity"].values()
             for row in rows for key in row if key.endswith("_speedup_vs_on_demand")}
    assert swept == set(PANEL_STRATEGIES) | {"ideal"}
    assert {"lookup", "oracle", "lookup_gated"} <= set(report["cache"]) and "lookup_speedup_vs_on_demand" in report["by_capacity"][0]
