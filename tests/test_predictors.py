"""Every architecture learns a synthetic layer-to-layer mapping it should, round-trips through its checkpoint,
is deterministic for a seed, and stops on a non-finite loss with a one-line error."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import single_thread

from moe_prefetch.errors import PipelineError
from moe_prefetch.params import as_dict, parse_section
from moe_prefetch.predictors import ARCHITECTURES, load_predictor
from moe_prefetch.predictors.hybrid import HybridPredictor
from moe_prefetch.predictors.neural import NeuralPredictor
from moe_prefetch.windows.data import WindowSet

GEOMETRY = {"num_experts": 16, "top_k": 2, "num_layers": 8, "context_length": 3, "horizon": 1}
NEXT_TOKENS = 2
LEARNED = ["mlp", "lstm", "layer_specific", "multiscale", "hybrid", "hidden_mlp", "lookup", "ensemble", "speculation_transformer"]
SMALL = {  # sizes that learn the synthetic pattern in a few seconds
    "lookup": {"max_context": 1},  # the pattern depends on the last layer only; longer keys would rarely repeat
    "speculation_transformer": {"d_model": 32, "heads": 2, "ff": 64, "layers": 1, "dropout": 0.0},
    "hybrid": {"temporal_tokens": NEXT_TOKENS},
    "hidden_mlp": {"dropout": 0.0},
}


def synthetic(n: int, seed: int, source: str = "context", hidden_dim: int = 16, per_sequence: int = 20) -> WindowSet:
    """Windows whose target top-1 is (last context layer's best expert + t) mod E, or, with source "hidden",
    (the expert one-hot-encoded in the hidden state + t) mod E; the second routed expert is top-1 + 1. The
    next tokens' top-1 at the target layer is (top-1 + 2j) mod E for j = 1..NEXT_TOKENS."""
    E, k, c, L = (GEOMETRY[key] for key in ("num_experts", "top_k", "context_length", "num_layers"))
    rng = np.random.default_rng(seed)
    first = rng.integers(0, E, (n, c))
    context = np.stack([first, (first + rng.integers(1, E, (n, c))) % E], axis=2).astype(np.int16)  # (n, c, k)
    target_layer = rng.integers(c - 1 + GEOMETRY["horizon"], L, n)
    latent = rng.integers(0, E, n)
    hidden = (rng.normal(0, 0.3, (n, hidden_dim)) + 2.0 * np.eye(E, hidden_dim)[latent]).astype(np.float16)
    top1 = ((latent if source == "hidden" else context[:, -1, 0]) + target_layer) % E  # (n,)
    upcoming = (top1[:, None] + 2 * np.arange(1, NEXT_TOKENS + 1)[None, :]) % E  # (n, H)

    def routed(best: np.ndarray) -> np.ndarray:
        return np.stack([best, (best + 1) % E], axis=-1).astype(np.int16)  # (..., k)

    sequences = np.arange(n) // per_sequence
    return WindowSet(
        context_experts=context, target_layer=target_layer.astype(np.int16), target_experts=routed(top1),
        target_weights=np.tile(np.float32([0.7, 0.3]), (n, 1)), prev_token_experts=np.full((n, k), -1, np.int16),
        position=(np.arange(n) % per_sequence).astype(np.int32), domain_index=np.zeros(n, np.int64),
        sequence_index=sequences, domains=["synthetic"], sequence_ids=[f"{seed}/{i}" for i in range(sequences[-1] + 1)],
        hidden_state=hidden if source == "hidden" else None, next_token_experts=routed(upcoming),
        next_token_weights=np.tile(np.float32([0.7, 0.3]), (n, NEXT_TOKENS, 1)),
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():  # tiny batches run faster on one thread, and the machine is shared
        yield


def train_params(arch: str, **overrides) -> dict:
    raw = {"arch": arch, "epochs": 5, "batch_size": 100, "lr": 0.02, "patience": 5, "seed": 0, **SMALL, **overrides}
    return as_dict(parse_section("train", raw))


def make(arch: str, **overrides):
    return ARCHITECTURES[arch](dict(GEOMETRY), train_params(arch, **overrides))


def source_of(arch: str) -> str:
    return "hidden" if arch == "hidden_mlp" else "context"


def top1(predictor, windows: WindowSet) -> float:
    scores, _ = predictor.score(windows)
    return float((scores.argmax(axis=1) == windows.target_experts[:, 0]).mean())


@pytest.fixture(scope="module")
def fitted() -> dict:
    """arch -> (predictor fitted on synthetic windows, its log rows); built lazily, once per module."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            # 16 hidden codes x 5 target layers need more examples; a table must have seen each of its 1200 keys
            size = {"hidden_mlp": 6000, "lookup": 12000}.get(arch, 3000)
            predictor, rows = make(arch, **({"lr": 0.03} if arch == "hidden_mlp" else {})), []
            predictor.fit(synthetic(size, 0, source_of(arch)), synthetic(500, 1, source_of(arch)), rows.append)
            cache[arch] = predictor, rows
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", LEARNED)
def test_learns_the_synthetic_mapping(arch, fitted) -> None:
    predictor, _ = fitted(arch)
    assert top1(predictor, synthetic(1000, 2, source_of(arch))) >= 0.95


def test_hybrid_temporal_head_learns_the_next_tokens(fitted) -> None:
    predictor, rows = fitted("hybrid")
    reported = rows[-1]  # the temporal row is logged after the last epoch
    assert reported["temporal_top1"] >= 0.95 and set(reported) >= {"temporal_top1_next1", "temporal_top1_next2"}
    held_out = synthetic(1000, 2)
    predicted = predictor.temporal_scores(held_out).argmax(axis=2)  # (N, H)
    assert (predicted == held_out.next_token_experts[:, :, 0]).mean() >= 0.95


@pytest.mark.parametrize("arch", LEARNED + ["frequency"])
def test_save_load_round_trip_gives_identical_scores(arch, fitted, tmp_path) -> None:
    if arch == "frequency":
        predictor = make(arch)
        predictor.fit(synthetic(500, 0), synthetic(100, 1), lambda row: None)
    else:
        predictor, _ = fitted(arch)
    predictor.save(tmp_path)
    loaded = load_predictor(tmp_path)
    windows = synthetic(300, 3, source_of(arch))
    (before, conf_before), (after, conf_after) = predictor.score(windows), loaded.score(windows)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(conf_before, conf_after)
    assert loaded.parameter_count() == predictor.parameter_count()


@pytest.mark.parametrize("arch", [a for a in LEARNED if a != "lookup"])
def test_same_seed_gives_identical_scores(arch) -> None:
    scores = []
    for _ in range(2):
        predictor = make(arch, epochs=1, **({"hidden_mlp": {"dropout": 0.2}} if arch == "hidden_mlp" else {}))
        predictor.fit(synthetic(400, 0, source_of(arch)), synthetic(100, 1, source_of(arch)), lambda row: None)
        scores.append(predictor.score(synthetic(200, 2, source_of(arch)))[0])
    np.testing.assert_array_equal(scores[0], scores[1])


@pytest.mark.parametrize("arch", [a for a, cls in ARCHITECTURES.items() if issubclass(cls, NeuralPredictor)])
def test_non_finite_loss_names_epoch_and_step(arch) -> None:
    predictor = make(arch)
    train = synthetic(300, 0, source_of(arch))
    if predictor.module is None:  # hidden_mlp builds its module once it knows the data's hidden width
        predictor.geometry = {**predictor.geometry, **predictor.data_geometry(train)}
        predictor.module = predictor._build()
    with torch.no_grad():
        for parameter in predictor.module.parameters():
            parameter.fill_(math.nan)
    with pytest.raises(PipelineError, match=r"non-finite loss .* at epoch 1, step 1; lower train.lr"):
        predictor.fit(train, train, lambda row: None)


def test_multiscale_stays_finite_at_a_high_learning_rate() -> None:
    predictor = make("multiscale", lr=1.0, epochs=3, weight_decay=0.0)  # the prior research's version went NaN here
    predictor.fit(synthetic(2000, 0), synthetic(200, 1), lambda row: None)  # raises PipelineError if not finite
    scores, confidence = predictor.score(synthetic(200, 2))
    assert np.isfinite(scores).all() and np.isfinite(confidence).all()


def test_hidden_plus_routing_reads_the_routing_context_too(tmp_path) -> None:
    """Targets set by the routing context, hidden states pure noise: the hidden-only model stays near chance,
    hidden+routing (routing_embedding_dim > 0) learns the mapping."""
    def noisy_hidden(windows: WindowSet, seed: int) -> WindowSet:
        noise = np.random.default_rng(seed).normal(0, 1, (len(windows), 16)).astype(np.float16)
        return dataclasses.replace(windows, hidden_state=noise)

    train, val = noisy_hidden(synthetic(3000, 0), 0), noisy_hidden(synthetic(500, 1), 1)
    accuracy = {}
    for routing_dim in (0, 8):
        predictor = make("hidden_mlp", lr=0.03, hidden_mlp={"dropout": 0.0, "routing_embedding_dim": routing_dim})
        predictor.fit(train, val, lambda row: None)
        accuracy[routing_dim] = top1(predictor, noisy_hidden(synthetic(500, 2), 2))
        predictor.save(tmp_path / str(routing_dim))
        np.testing.assert_array_equal(load_predictor(tmp_path / str(routing_dim)).score(val)[0], predictor.score(val)[0])
    assert accuracy[0] < 0.25 and accuracy[8] > 0.9, accuracy


def test_hidden_mlp_without_hidden_states_is_a_one_line_error() -> None:
    with pytest.raises(PipelineError, match=r"^train.arch: hidden_mlp needs hidden states; set collect.capture.hidden_states"):
        make("hidden_mlp").fit(synthetic(100, 0), synthetic(50, 1), lambda row: None)


def test_ensemble_checks_every_member_before_training_any() -> None:
    rows: list = []
    with pytest.raises(PipelineError, match=r"^train.arch: hidden_mlp needs hidden states"):
        make("ensemble", ensemble={"members": ["mlp", "hidden_mlp"]}).fit(synthetic(200, 0), synthetic(50, 1), rows.append)
    assert rows == []


def test_hybrid_needs_the_token_horizon_it_predicts() -> None:
    windows = synthetic(100, 0)
    windows.next_token_experts = windows.next_token_weights = None
    with pytest.raises(PipelineError, match=r"^train.hybrid.temporal_tokens: 2 needs windows.token_horizon >= 2; the windows carry 0"):
        make("hybrid").fit(windows, windows, lambda row: None)
    plain = make("hybrid", hybrid={"temporal_tokens": 0})
    assert isinstance(plain, HybridPredictor) and len(plain.module(plain.batch(windows, np.arange(4), torch.device("cpu")))) == 2


def test_ensemble_members_are_saved_under_prefixes(fitted, tmp_path) -> None:
    predictor, rows = fitted("ensemble")
    keys = set(predictor.state())
    assert "mix_logits" in keys and any(k.startswith("member0.lookup.") for k in keys) and any(k.startswith("member1.mlp.") for k in keys)
    assert any(key.startswith("mlp/") for row in rows for key in row) and "ensemble_weight/mlp" in rows[-1]
