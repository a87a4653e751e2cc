"""Checks of the conditional-entropy estimates and the accuracy bounds they imply."""

from __future__ import annotations

import math

import numpy as np
import pytest


from moe_prefetch.evaluation.bounds import (  # noqa: E402
    binary_entropy_bits,
    conditional_entropy_bounds,
    fano_top1_upper_bound,
)


def test_deterministic_target_has_zero_entropy_and_perfect_bounds() -> None:
    context = np.array([0, 1, 2, 0, 1, 2, 5])
    bounds = conditional_entropy_bounds(context, (context * 3) % 4, num_classes=4)
    assert bounds["h_plugin_bits"] == pytest.approx(0.0, abs=1e-12)
    assert bounds["fano_top1_upper_bound_plugin"] == 1.0
    assert bounds["empirical_bayes_top1"] == 1.0
    assert bounds["bayes_top1_lower_bound"] == pytest.approx(1.0)
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
    assert bounds["bayes_top1_lower_bound"] == pytest.approx(0.25, abs=0.01)


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
    assert bounds["bayes_top1_lower_bound"] == pytest.approx(2 ** (-5 / 3) * math.sqrt(3))
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
    # <= Shannon, then Jensen). Miller-Madow only raises H, so its Fano bound is never higher.
    rng = np.random.default_rng(seed)
    context = rng.integers(0, 50, size=300)
    target = (context + rng.integers(0, 3, size=300) * rng.integers(0, 2, size=300)) % 6
    bounds = conditional_entropy_bounds(context, target, num_classes=6)
    assert bounds["fano_top1_upper_bound_plugin"] >= bounds["empirical_bayes_top1"] - 1e-12
    assert bounds["bayes_top1_lower_bound"] <= bounds["empirical_bayes_top1"] + 1e-12
    assert bounds["fano_top1_upper_bound"] <= bounds["fano_top1_upper_bound_plugin"]
    assert bounds["h_miller_madow_bits"] >= bounds["h_plugin_bits"]


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="shapes"):
        conditional_entropy_bounds(np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int64), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        conditional_entropy_bounds(np.zeros(2, dtype=np.int64), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="at least one"):
        conditional_entropy_bounds(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 2)
