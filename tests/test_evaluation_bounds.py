"""Checks of the conditional-entropy estimates and the accuracy bounds they imply."""

from __future__ import annotations

import math

import numpy as np
import pytest


from moe_prefetch.evaluation.bounds import (  # noqa: E402
    CrossEntropyAccumulator,
    best_scorer_bound,
    binary_entropy_bits,
    conditional_entropy_bounds,
    cross_entropy_bound,
    fano_top1_upper_bound,
    plugin_entropy_by_size,
)


def test_deterministic_target_has_zero_entropy_and_perfect_bounds() -> None:
    context = np.array([0, 1, 2, 0, 1, 2, 5])
    bounds = conditional_entropy_bounds(context, (context * 3) % 4, num_classes=4)
    assert bounds["h_plugin_bits"] == pytest.approx(0.0, abs=1e-12)
    assert bounds["fano_top1_upper_bound_plugin"] == 1.0
    assert bounds["empirical_bayes_top1"] == 1.0
    assert "bayes_top1_lower_bound" not in bounds  # 2^-H_plugin: biased high, no bound
    # Miller-Madow adds (cells - contexts) / (2 N ln 2) = 0 when every context has one class.
    assert bounds["h_miller_madow_bits"] == pytest.approx(0.0, abs=1e-12)
    assert bounds["fano_top1_upper_bound"] == 1.0


def test_independent_uniform_target_reaches_chance() -> None:
    rng = np.random.default_rng(0)
    context = rng.integers(0, 10, size=200_000)
    target = rng.integers(0, 4, size=200_000)
    bounds = conditional_entropy_bounds(context, target, num_classes=4)
    assert bounds["h_plugin_bits"] == pytest.approx(2.0, abs=2e-3)
    assert bounds["h_miller_madow_bits"] == pytest.approx(2.0, abs=1e-3)
    assert bounds["fano_top1_upper_bound"] == pytest.approx(0.25, abs=0.01)
    assert bounds["fano_top1_upper_bound_plugin"] == pytest.approx(0.25, abs=0.01)


def test_two_context_example_by_hand() -> None:
    # x = 0: y = 0, 0, 0, 1 -> H = h(1/4) = 2 - 0.75 log2 3;  x = 1: y = 1, 2 -> H = 1.  N = 6, K = 3.
    context = np.array([0, 0, 0, 0, 1, 1])
    target = np.array([0, 0, 0, 1, 1, 2])
    bounds = conditional_entropy_bounds(context, target, num_classes=3)
    h_plugin = 4 / 6 * (2 - 0.75 * math.log2(3)) + 2 / 6 * 1.0  # = 5/3 - 0.5 log2 3 ≈ 0.874185
    assert bounds["h_plugin_bits"] == pytest.approx(h_plugin)
    # 4 nonzero cells, 2 contexts: + 2 / (2 * 6 * ln 2) = 1 / (6 ln 2) ≈ 0.240449
    assert bounds["h_miller_madow_bits"] == pytest.approx(h_plugin + 1 / (6 * math.log(2)))
    assert bounds["empirical_bayes_top1"] == pytest.approx((3 + 1) / 6)
    assert bounds["contexts"] == 2.0 and bounds["samples"] == 6.0
    assert bounds["samples_per_context_mean"] == 3.0 and bounds["samples_per_context_median"] == 3.0
    assert bounds["singleton_context_share"] == 0.0
    # The Fano answer a sits on the boundary: h(1-a) + (1-a) log2(K-1) = H.
    accuracy = bounds["fano_top1_upper_bound_plugin"]
    assert 1 / 3 < accuracy < 1.0
    assert binary_entropy_bits(1 - accuracy) + (1 - accuracy) * math.log2(2) == pytest.approx(h_plugin, abs=1e-7)


def test_fano_is_tight_for_two_classes() -> None:
    # K = 2: Fano reads H <= h(1 - a), so H = h(1/4) gives exactly a = 3/4, the lookup's accuracy.
    bounds = conditional_entropy_bounds(np.zeros(4, dtype=np.int64), np.array([0, 0, 0, 1]), num_classes=2)
    assert bounds["fano_top1_upper_bound_plugin"] == pytest.approx(0.75, abs=1e-8)
    assert bounds["empirical_bayes_top1"] == 0.75


def test_fano_edge_values() -> None:
    assert fano_top1_upper_bound(0.0, 8) == 1.0
    assert fano_top1_upper_bound(3.0, 8) == 0.125  # H = log2 K: chance
    assert fano_top1_upper_bound(5.0, 8) == 0.125  # a Miller-Madow H above log2 K clips to chance
    assert fano_top1_upper_bound(1.0, 2) == pytest.approx(0.5, abs=1e-8)
    assert fano_top1_upper_bound(0.7, 1) == 1.0


def test_context_statistics() -> None:
    bounds = conditional_entropy_bounds(np.array([7, 3, 3, 9, 3]), np.array([0, 1, 1, 0, 0]), num_classes=2)
    assert bounds["contexts"] == 3.0
    assert bounds["samples_per_context_median"] == 1.0
    assert bounds["samples_per_context_mean"] == pytest.approx(5 / 3)
    assert bounds["singleton_context_share"] == pytest.approx(2 / 5)  # contexts 7 and 9 occur once


@pytest.mark.parametrize("seed", range(5))
def test_guaranteed_orderings_on_random_data(seed: int) -> None:
    # Guaranteed in-sample: the lookup's accuracy obeys Fano under the empirical distribution
    # (so fano_plugin >= empirical), and E_x max_y p(y|x) >= E_x 2^-H(Y|x) >= 2^-H(Y|X) (min-entropy
    # <= Shannon, then Jensen) for the empirical distribution. Miller-Madow only raises H, so its Fano
    # bound is never higher.
    rng = np.random.default_rng(seed)
    context = rng.integers(0, 50, size=300)
    target = (context + rng.integers(0, 3, size=300) * rng.integers(0, 2, size=300)) % 6
    bounds = conditional_entropy_bounds(context, target, num_classes=6)
    assert bounds["fano_top1_upper_bound_plugin"] >= bounds["empirical_bayes_top1"] - 1e-12
    assert 2.0 ** -bounds["h_plugin_bits"] <= bounds["empirical_bayes_top1"] + 1e-12
    assert bounds["fano_top1_upper_bound"] <= bounds["fano_top1_upper_bound_plugin"]
    assert bounds["h_miller_madow_bits"] >= bounds["h_plugin_bits"]


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="shapes"):
        conditional_entropy_bounds(np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int64), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        conditional_entropy_bounds(np.zeros(2, dtype=np.int64), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="at least one"):
        conditional_entropy_bounds(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 2)


def test_half_probability_on_the_true_class_is_one_bit() -> None:
    # q(y) = 1/2 on every window (scores unnormalised: the accumulator divides by the row sum) -> CE = 1 bit -> 0.5.
    accumulator = CrossEntropyAccumulator()
    accumulator.update(np.array([[2.0, 1.0, 1.0], [0.5, 0.5, 0.0]]), np.array([0, 1]))
    accumulator.update(np.array([[0.0, 0.0, 3.0]]), np.array([-1]))  # no top-1 target: skipped
    result = accumulator.result()
    assert result["cross_entropy_bits"] == pytest.approx(1.0)
    assert result["top1_lower_bound"] == pytest.approx(0.5)
    assert result["windows"] == 2.0 and result["zero_probability_windows"] == 0.0


def test_cross_entropy_by_hand_over_batches() -> None:
    # q(y) = 1/4 then 1/8 then 1 -> CE = (2 + 3 + 0) / 3 bits, 2^-CE = 2^(-5/3).
    accumulator = CrossEntropyAccumulator()
    accumulator.update(np.array([[1.0, 3.0], [1.0, 7.0]]), np.array([0, 0]))
    accumulator.update(np.array([[0.0, 5.0]]), np.array([1]))
    assert accumulator.result()["cross_entropy_bits"] == pytest.approx(5 / 3)
    assert accumulator.result()["top1_lower_bound"] == pytest.approx(2 ** (-5 / 3))


def test_zero_probability_on_the_true_class_gives_infinite_cross_entropy_and_bound_zero() -> None:
    accumulator = CrossEntropyAccumulator()
    accumulator.update(np.array([[1.0, 1.0], [1.0, 0.0]]), np.array([0, 1]))
    result = accumulator.result()
    assert result["cross_entropy_bits"] == math.inf
    assert result["top1_lower_bound"] == 0.0
    assert result["zero_probability_windows"] == 1.0


def test_scores_that_are_no_distribution_give_no_cross_entropy() -> None:
    negative, all_zero, unfed = CrossEntropyAccumulator(), CrossEntropyAccumulator(), CrossEntropyAccumulator()
    negative.update(np.array([[2.0, -1.0]]), np.array([0]))
    all_zero.update(np.array([[0.0, 0.0]]), np.array([0]))
    assert negative.result() is None and all_zero.result() is None and unfed.result() is None


def test_cross_entropy_bound_picks_the_lowest_cross_entropy() -> None:
    good, bad, infinite = CrossEntropyAccumulator(), CrossEntropyAccumulator(), CrossEntropyAccumulator()
    good.update(np.array([[1.0, 1.0]]), np.array([0]))  # 1 bit
    bad.update(np.array([[1.0, 3.0]]), np.array([0]))  # 2 bits
    infinite.update(np.array([[0.0, 1.0]]), np.array([0]))
    by_model = {"bad": bad.result(), "infinite": infinite.result(), "good": good.result(), "not_probabilistic": None}
    assert cross_entropy_bound(by_model) == {"value": pytest.approx(0.5), "model": "good", "cross_entropy_bits": pytest.approx(1.0)}
    assert cross_entropy_bound({"infinite": infinite.result()})["value"] == 0.0
    with pytest.raises(ValueError, match="distribution"):
        cross_entropy_bound({"not_probabilistic": None})


def test_best_scorer_bound_picks_the_max() -> None:
    assert best_scorer_bound({"lookup": 0.41, "predictor": 0.47, "random": 0.06}) == {"value": 0.47, "scorer": "predictor"}
    assert best_scorer_bound({"a": 0.3, "b": math.nan, "c": 0.3}) == {"value": 0.3, "scorer": "a"}  # nan skipped, first tie
    with pytest.raises(ValueError, match="at least one"):
        best_scorer_bound({"b": math.nan})


def test_entropy_of_a_deterministic_mapping_is_zero_at_every_size() -> None:
    context = np.arange(1000) % 37
    by_size = plugin_entropy_by_size(context, context % 5, num_classes=5, sizes=[10, 100, 5000], seed=0)
    assert list(by_size) == [10, 100, 1000]  # 5000 >= N is skipped, N itself always added
    for h in by_size.values():
        assert h["h_plugin_bits"] == pytest.approx(0.0, abs=1e-12)
        assert h["h_miller_madow_bits"] == pytest.approx(0.0, abs=1e-12)


def test_plugin_entropy_of_uniform_noise_rises_towards_log2_classes() -> None:
    # Y uniform on 8 classes independent of X (500 contexts): true H = 3 bits. With ~n / 500 samples per context
    # the plug-in H is far below 3 at small n and climbs to it as n grows; Miller-Madow sits closer at every size.
    rng = np.random.default_rng(1)
    context, target = rng.integers(0, 500, size=400_000), rng.integers(0, 8, size=400_000)
    by_size = plugin_entropy_by_size(context, target, num_classes=8, sizes=[1000, 4000, 20_000, 100_000], seed=3)
    plugin = [h["h_plugin_bits"] for h in by_size.values()]
    assert list(by_size) == [1000, 4000, 20_000, 100_000, 400_000]
    assert all(later > earlier for earlier, later in zip(plugin, plugin[1:]))
    assert plugin[0] < 1.5  # ~2 samples per context: at most 1 bit or so each
    assert 2.99 < plugin[-1] < 3.0
    assert all(abs(h["h_miller_madow_bits"] - 3) < abs(h["h_plugin_bits"] - 3) for h in by_size.values())


def test_entropy_by_size_is_seeded_and_nested() -> None:
    rng = np.random.default_rng(2)
    context, target = rng.integers(0, 20, size=300), rng.integers(0, 3, size=300)
    first = plugin_entropy_by_size(context, target, 3, [50, 150], seed=7)
    assert first == plugin_entropy_by_size(context, target, 3, [50, 150], seed=7)
    order = np.random.default_rng(7).permutation(300)[:50]  # the subset of size 50 is the permutation's prefix
    assert first[50]["h_plugin_bits"] == pytest.approx(conditional_entropy_bounds(context[order], target[order], 3)["h_plugin_bits"])
    with pytest.raises(ValueError, match=r"sizes must be integers >= 1, got \[0\]"):
        plugin_entropy_by_size(context, target, 3, [0], seed=7)
