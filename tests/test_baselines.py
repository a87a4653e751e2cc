"""The count-table baselines beyond lookup (moe_prefetch/evaluation/table_baselines.py) on hand-built windows whose
right answer is worked out by hand: top1_table, cooccurrence, lookup_interpolated, token and token_context."""

from __future__ import annotations

import numpy as np
import pytest

from moe_prefetch.evaluation.baselines import baseline_scorers
from moe_prefetch.evaluation.table_baselines import COOCCURRENCE_ALPHA, interpolation_weights
from moe_prefetch.windows.data import WindowSet


def windows(context: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None, layer: np.ndarray | None = None,
            token: np.ndarray | None = None) -> WindowSet:
    """Windows of one sequence from context experts (N, c, k), target experts (N, k) and optionally target layers
    and token ids (N,); weights default to 1/k, the target layer to 1."""
    target = np.asarray(target, dtype=np.int16)
    n, k = target.shape
    return WindowSet(
        context_experts=np.asarray(context, dtype=np.int16), target_layer=np.asarray(np.ones(n) if layer is None else layer, dtype=np.int16),
        target_experts=target,
        target_weights=np.full((n, k), 1 / k, dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32),
        prev_token_experts=np.zeros((n, k), dtype=np.int16), position=np.arange(n, dtype=np.int32),
        domain_index=np.zeros(n, dtype=np.int64), sequence_index=np.zeros(n, dtype=np.int64), domains=["d"], sequence_ids=["s"],
        token_id=None if token is None else np.asarray(token, dtype=np.int32),
    )


def summary(num_experts: int, top_k: int, context_length: int, num_layers: int = 3) -> dict:
    return {"num_experts": num_experts, "top_k": top_k, "num_layers": num_layers, "context_length": context_length, "horizon": 1}


def scorer(name: str, train: WindowSet, geometry: dict, val: WindowSet | None = None):
    return baseline_scorers(train, geometry, val=val)[name]


# --- top1_table ----------------------------------------------------------------------------------------------

# E = 5, k = 2, c = 2. Context (0, 0) -> target (2, 1) three times, (1, 3) twice, gate weights (0.6, 0.4): expert 2
# is the most frequent top-1 (3 vs 2) though expert 1 has more gate mass (3 * 0.4 + 2 * 0.6 = 2.4 vs 1.8).
# Context (4, 1) -> (3, 0) once: layer 1's top-1 counts are then 2: 3, 1: 2, 3: 1.
TOP1_TRAIN = windows(
    context=[[[0, 0], [0, 0]]] * 5 + [[[4, 4], [1, 1]]],
    target=[[2, 1]] * 3 + [[1, 3]] * 2 + [[3, 0]],
    weights=[[0.6, 0.4]] * 6,
)


def test_top1_table_picks_the_most_frequent_top1_where_lookup_picks_the_most_gate_mass() -> None:
    test = windows(context=[[[0, 0], [0, 0]]], target=[[2, 1]])
    top1_scores, _ = scorer("top1_table", TOP1_TRAIN, summary(5, 2, 2))(test)
    lookup_scores, _ = scorer("lookup", TOP1_TRAIN, summary(5, 2, 2))(test)
    assert top1_scores.shape == (1, 5) and top1_scores.dtype == np.float32
    assert int(top1_scores.argmax()) == 2 and int(lookup_scores.argmax()) == 1


def test_top1_table_backs_off_to_the_most_recent_layer_then_to_top1_frequency() -> None:
    # Row 0: context (3, 1) was never seen, its most recent layer (1) was, once, with top-1 3.
    # Row 1: nothing matches (the most recent layer's 2 was never seen): layer 1's most frequent top-1, 2.
    test = windows(context=[[[3, 3], [1, 1]], [[3, 3], [2, 2]]], target=[[3, 0], [2, 1]])
    scores, _ = scorer("top1_table", TOP1_TRAIN, summary(5, 2, 2))(test)
    assert scores.argmax(axis=1).tolist() == [3, 2]
    assert np.argsort(-scores[1])[:3].tolist() == [2, 1, 3]  # the unmatched row ranks by top-1 counts 3, 2, 1


# --- cooccurrence --------------------------------------------------------------------------------------------

def test_cooccurrence_scores_a_deterministic_mapping_first_on_unseen_contexts() -> None:
    """E = 8, k = 1, c = 2, two target layers: the target is (most recent context expert + layer) mod 8, the oldest
    context layer is noise (experts 0..3 in train, 4..7 in test, so train never saw a test window's full context)."""
    rng = np.random.default_rng(0)

    def mapped(noise: np.ndarray, recent: np.ndarray, layer: np.ndarray) -> WindowSet:
        return windows(np.stack([noise, recent], axis=1)[:, :, None], ((recent + layer) % 8)[:, None], layer=layer)

    train = mapped(rng.integers(0, 4, 200), rng.integers(0, 8, 200), rng.integers(1, 3, 200))
    test = mapped(rng.integers(4, 8, 16), np.arange(16) % 8, np.repeat([1, 2], 8))
    scores, _ = scorer("cooccurrence", train, summary(8, 1, 2))(test)
    assert scores.argmax(axis=1).tolist() == test.target_experts[:, 0].tolist()


def test_cooccurrence_is_the_smoothed_conditional_summed_over_context_layers() -> None:
    """One train window, E = 4, c = 2, k = 1: context (0, 2) -> target 1 with weight 1. For a test window with
    context (0, 3): layer j = 0 saw expert 0, so P(e' | 0) = (1[e' = 1] + a) / (1 + 4a); layer j = 1 never saw 3,
    so P(e' | 3) = a / 4a = 1/4 for every e'."""
    train = windows(context=[[[0], [2]]], target=[[1]], weights=[[1.0]])
    test = windows(context=[[[0], [3]]], target=[[1]])
    scores, _ = scorer("cooccurrence", train, summary(4, 1, 2))(test)
    a = COOCCURRENCE_ALPHA
    by_hand = (np.array([0, 1, 0, 0]) + a) / (1 + 4 * a) + 0.25
    np.testing.assert_allclose(scores[0], by_hand, atol=2e-3)  # + TIE_BREAK * frequency (1 at expert 1, 1e-3)
    assert int(scores.argmax()) == 1


# --- lookup_interpolated -------------------------------------------------------------------------------------

def test_interpolation_weights_em_by_hand() -> None:
    """Two components, three observations: component 1 always gives probability 1, component 0 gives 0.5: the
    log-likelihood sum log(0.5 w0 + w1) grows with w1, so EM drives all weight to component 1."""
    likelihoods = np.array([[0.5, 1.0]] * 3)
    assert interpolation_weights(likelihoods, np.ones(3)) == pytest.approx([0.0, 1.0], abs=1e-3)
    # Component 0 alone explains observation 2 and 1 alone observation 1: the optimum splits the weight evenly.
    assert interpolation_weights(np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones(2)) == pytest.approx([0.5, 0.5], abs=1e-6)


def context_driven(rng: np.random.Generator, n: int, informative: bool) -> WindowSet:
    """E = 8, k = 1, c = 2: the oldest context layer is noise; the target is the most recent context expert
    (informative) or drawn from a skewed distribution independent of the context."""
    noise, recent = rng.integers(0, 8, n), rng.integers(0, 8, n)
    skewed = rng.choice(8, n, p=[0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    return windows(np.stack([noise, recent], axis=1)[:, :, None], (recent if informative else skewed)[:, None])


def test_lookup_interpolated_weights_the_informative_context_length() -> None:
    rng = np.random.default_rng(1)
    train, val, test = (context_driven(rng, n, informative=True) for n in (60, 400, 200))
    score = scorer("lookup_interpolated", train, summary(8, 1, 2), val)
    weights = score.__self__.weights  # (c + 1, c + 1): row m mixes P_0..P_m for windows whose longest seen context is m
    # m = 1 (only the most recent layer's context seen in train): nearly all weight on P_1, which is exact.
    assert weights[1, 1] > 0.9
    # m = 2: P_1 and P_2 are both exact on a context train saw, the frequency P_0 gets almost nothing.
    assert weights[2, 0] < 0.1
    scores, _ = score(test)
    assert (scores.argmax(axis=1) == test.target_experts[:, 0]).mean() > 0.95


def test_lookup_interpolated_weights_the_frequency_when_the_context_is_noise() -> None:
    rng = np.random.default_rng(2)
    train, val = (context_driven(rng, n, informative=False) for n in (200, 2000))
    weights = scorer("lookup_interpolated", train, summary(8, 1, 2), val).__self__.weights
    # Contexts carry no information: their tables (25 and ~3 train windows per context) are noisy estimates
    # of the frequency, so the frequency P_0 holds the largest weight whatever the longest seen context.
    for m in (1, 2):
        assert weights[m, 0] == weights[m, : m + 1].max()
    assert np.allclose(weights.sum(axis=1), 1)


def test_lookup_interpolated_needs_the_val_windows() -> None:
    assert "lookup_interpolated" not in baseline_scorers(TOP1_TRAIN, summary(5, 2, 2))
    assert "lookup_interpolated" in baseline_scorers(TOP1_TRAIN, summary(5, 2, 2), val=TOP1_TRAIN)


# --- token ---------------------------------------------------------------------------------------------------

def test_token_keys_on_target_layer_and_token_then_falls_back_to_frequency() -> None:
    """E = 4, k = 1. Layer 1: token 7 -> 2 twice, token 8 -> 3 once; layer 2: token 7 -> 0 once. Frequency at layer
    1 is 2 (2 of 3); so token 8 at layer 1 scores 3 first, token 7 at layer 2 scores 0 first, and the unseen
    token 9 at layer 1 ranks by frequency: 2, then 3."""
    train = windows(context=[[[0]]] * 4, target=[[2], [2], [3], [0]], layer=[1, 1, 1, 2], token=[7, 7, 8, 7])
    test = windows(context=[[[0]]] * 3, target=[[3], [0], [2]], layer=[1, 2, 1], token=[8, 7, 9])
    scores, _ = scorer("token", train, summary(4, 1, 1))(test)
    assert scores.argmax(axis=1).tolist() == [3, 0, 2]
    assert np.argsort(-scores[2])[:2].tolist() == [2, 3]
    assert "token" not in baseline_scorers(windows(context=[[[0]]], target=[[2]]), summary(4, 1, 1))


# --- token_context -------------------------------------------------------------------------------------------

# E = 4, k = 2, c = 1, gate weights (0.6, 0.4) unless noted. Layer 1, token 7: last context layer (0, 1) -> (2, 3)
# twice, (0, 2) -> (3, 1), (1, 0) -> (1, 0), (1, 3) -> (2, 1); token 8: (0, 1) -> (0, 3) with weights (0.7, 0.3).
# Layer 2, token 5: (2, 3) -> (1, 0). Gate mass at layer 1 by key:
#   token 7, set (0, 1):  2: 1.2, 3: 0.8                        -> 2
#   token 7, top-1 0:     3: 0.8 + 0.6 = 1.4, 2: 1.2, 1: 0.4     -> 3 (the set's answer differs)
#   token 7 alone:        2: 1.2 + 0.6 = 1.8, 3: 1.4, 1: 0.4 + 0.6 + 0.4 = 1.4, 0: 0.4   -> 2
#   token 8, set (0, 1):  0: 0.7, 3: 0.3                         -> 0 (the token matters)
#   layer 1 frequency:    2: 1.8, 3: 1.7, 1: 1.4, 0: 1.1         -> 2, 3, 1, 0
TOKEN_CONTEXT_TRAIN = windows(
    context=[[[0, 1]], [[0, 1]], [[0, 2]], [[1, 0]], [[1, 3]], [[0, 1]], [[2, 3]]],
    target=[[2, 3], [2, 3], [3, 1], [1, 0], [2, 1], [0, 3], [1, 0]],
    weights=[[0.6, 0.4]] * 5 + [[0.7, 0.3], [0.6, 0.4]],
    layer=[1, 1, 1, 1, 1, 1, 2], token=[7, 7, 7, 7, 7, 8, 5],
)


def test_token_context_backs_off_from_the_set_to_its_top1_to_the_token_to_the_layer_frequency() -> None:
    test = windows(
        context=[[[0, 1]], [[0, 3]], [[3, 0]], [[0, 1]], [[0, 1]], [[0, 1]]],
        target=[[2, 3]] * 6, layer=[1, 1, 1, 1, 1, 2], token=[7, 7, 7, 8, 9, 7],
    )
    scores, _ = scorer("token_context", TOKEN_CONTEXT_TRAIN, summary(4, 2, 1))(test)
    # seen set; unseen set, seen top-1; unseen top-1 (3), seen token; token 8's set; unseen token 9: layer 1's
    # frequency; token 7 at layer 2, which train saw only with token 5: layer 2's frequency (1, then 0)
    assert scores.argmax(axis=1).tolist() == [2, 3, 2, 0, 2, 1]
    assert np.argsort(-scores[1], kind="stable")[:3].tolist() == [3, 2, 1]
    assert np.argsort(-scores[4], kind="stable").tolist() == [2, 3, 1, 0]
    assert np.argsort(-scores[5], kind="stable")[:2].tolist() == [1, 0]
    # token 7, top-1 0: masses (0, 0.4, 1.2, 1.4) of 3.0, + TIE_BREAK (1e-3) x layer 1's frequency (1.1, 1.4, 1.8, 1.7) / 6
    by_hand = np.array([0.0, 0.4, 1.2, 1.4]) / 3.0 + 1e-3 * np.array([1.1, 1.4, 1.8, 1.7]) / 6.0
    np.testing.assert_allclose(scores[1], by_hand, rtol=1e-6)


def test_token_context_needs_the_token_ids() -> None:
    assert "token_context" not in baseline_scorers(windows(context=[[[0, 1]]], target=[[2, 3]]), summary(4, 2, 1))
