"""Every registered architecture learns a synthetic layer-to-layer mapping it should, round-trips through its
checkpoint, is deterministic for a seed, and (the neural ones) stops on a non-finite loss with a one-line error.
The tests are parametrised over ARCHITECTURES and build each architecture's windows from what it declares
(`requires`), so registering an architecture (and giving it an entry in SMALL) is what covers it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import single_thread

from moe_prefetch.errors import PipelineError
from moe_prefetch.params import as_dict, parse_section
from moe_prefetch.predictors import ARCHITECTURES, Predictor, load_predictor
from moe_prefetch.predictors.hybrid import HybridPredictor
from moe_prefetch.predictors.layers import FlatContext
from moe_prefetch.predictors.neural import NeuralPredictor
from moe_prefetch.windows.data import WindowSet

GEOMETRY = {"num_experts": 16, "top_k": 2, "num_layers": 8, "context_length": 3, "horizon": 1}
NEXT_TOKENS = 2
SMALL = {  # per architecture with a section: train.<arch> overrides that learn the pattern in seconds ({}: defaults do)
    "ensemble": {},
    "hidden_mlp": {"dropout": 0.0},
    "mlp": {},
    "token_mlp": {"embedding_dim": 16, "token_embedding_dim": 16, "hidden": [256]},
    "hybrid": {"temporal_tokens": NEXT_TOKENS},  # the temporal head too
    "layer_specific": {},
    "lstm": {},
    "multiscale": {},
    "speculation_transformer": {"d_model": 32, "heads": 2, "ff": 64, "layers": 1, "dropout": 0.0},
    "lookup": {"max_context": 1},  # the pattern depends on the last layer only; longer keys would rarely repeat
}
FIT = {  # (train windows, train overrides) where the default 3000 windows at lr 0.02 do not learn the pattern
    "lookup": (12000, {}),  # a table must have seen each of its 1200 keys
    "hidden_mlp": (6000, {"lr": 0.03}),  # 16 hidden codes x 5 target layers need more examples
    # 16 experts x 8 token ids x 5 target layers, read off a weighted sum (the default weighted_set encoding): 10 epochs
    "token_mlp": (12000, {"epochs": 10, "patience": 10}),
}


def synthetic(n: int, seed: int, requires: tuple[str, ...] = ("context_experts",), hidden_dim: int = 16,
              per_sequence: int = 20) -> WindowSet:
    """Windows carrying the optional input columns in `requires` and None for the others (so that reading an
    undeclared column fails). The target's top-1 is (s + t) mod E, with s read off the most specific required
    input: the expert one-hot-encoded in the hidden state (hidden_state), else the last context layer's best
    expert (context_experts), else 0 (the target layer alone), plus the token id when token_id is required; the
    second routed expert is top-1 + 1. The next
    tokens' top-1 at the target layer is (top-1 + 2j) mod E for j = 1..NEXT_TOKENS."""
    E, k, c, L = (GEOMETRY[key] for key in ("num_experts", "top_k", "context_length", "num_layers"))
    rng = np.random.default_rng(seed)
    first = rng.integers(0, E, (n, c))
    context = np.stack([first, (first + rng.integers(1, E, (n, c))) % E], axis=2).astype(np.int16)  # (n, c, k)
    target_layer = rng.integers(c - 1 + GEOMETRY["horizon"], L, n)
    latent = rng.integers(0, E, n)
    hidden = (rng.normal(0, 0.3, (n, hidden_dim)) + 2.0 * np.eye(E, hidden_dim)[latent]).astype(np.float16)
    signal = latent if "hidden_state" in requires else context[:, -1, 0] if "context_experts" in requires else 0
    token_id = rng.integers(0, 8, n).astype(np.int32)  # with token_id required, the target depends on it too
    top1 = (signal + target_layer + (token_id if "token_id" in requires else 0)) % E  # (n,)
    upcoming = (top1[:, None] + 2 * np.arange(1, NEXT_TOKENS + 1)[None, :]) % E  # (n, H)

    def routed(best: np.ndarray) -> np.ndarray:
        return np.stack([best, (best + 1) % E], axis=-1).astype(np.int16)  # (..., k)

    optional = {
        "context_experts": context, "hidden_state": hidden, "next_token_experts": routed(upcoming),
        "next_token_weights": np.tile(np.float32([0.7, 0.3]), (n, NEXT_TOKENS, 1)), "token_id": token_id,
        "context_weights": best_first_weights(rng.uniform(0.65, 0.9, (n, c))),  # (n, c, k), slot 0 the heavier
    }
    assert set(requires) <= set(optional), f"synthetic() cannot make {sorted(set(requires) - set(optional))} yet"
    sequences = np.arange(n) // per_sequence
    return WindowSet(
        target_layer=target_layer.astype(np.int16), target_experts=routed(top1),
        target_weights=np.tile(np.float32([0.7, 0.3]), (n, 1)), prev_token_experts=np.full((n, k), -1, np.int16),
        position=(np.arange(n) % per_sequence).astype(np.int32), domain_index=np.zeros(n, np.int64),
        sequence_index=sequences, domains=["synthetic"], sequence_ids=[f"{seed}/{i}" for i in range(sequences[-1] + 1)],
        **{name: column if name in requires else None for name, column in optional.items()},
    )


def best_first_weights(top: np.ndarray) -> np.ndarray:
    """(..., 2) float32 gate weights [w, 1 - w] for the top weights w >= 0.5: the routed order, heavier slot first."""
    return np.stack([top, 1.0 - top], axis=-1).astype(np.float32)


def windows_for(predictor: Predictor, n: int, seed: int) -> WindowSet:
    return synthetic(n, seed, predictor.requires)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():  # tiny batches run faster on one thread, and the machine is shared
        yield


def train_params(arch: str, **overrides) -> dict:
    raw = {"arch": arch, "epochs": 5, "batch_size": 100, "lr": 0.02, "patience": 5, "seed": 0, **SMALL, **overrides}
    return as_dict(parse_section("train", raw))


def make(arch: str, **overrides):
    return ARCHITECTURES[arch](dict(GEOMETRY), train_params(arch, **overrides))


def top1(predictor, windows: WindowSet) -> float:
    scores, _ = predictor.score(windows)
    return float((scores.argmax(axis=1) == windows.target_experts[:, 0]).mean())


def test_every_architecture_with_a_section_has_test_sizes() -> None:
    sectioned = {arch for arch, cls in ARCHITECTURES.items() if cls.config is not None}
    assert set(SMALL) == sectioned, f"SMALL: add {sorted(sectioned - set(SMALL))}, drop {sorted(set(SMALL) - sectioned)}"


@pytest.fixture(scope="module")
def fitted() -> dict:
    """arch -> (predictor fitted on synthetic windows, its log rows); built lazily, once per module."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            size, overrides = FIT.get(arch, (3000, {}))
            predictor, rows = make(arch, **overrides), []
            predictor.fit(windows_for(predictor, size, 0), windows_for(predictor, 500, 1), rows.append)
            cache[arch] = predictor, rows
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_learns_the_synthetic_mapping(arch, fitted) -> None:
    predictor, _ = fitted(arch)
    assert top1(predictor, windows_for(predictor, 1000, 2)) >= 0.95


def test_hybrid_temporal_head_learns_the_next_tokens(fitted) -> None:
    predictor, rows = fitted("hybrid")
    reported = rows[-1]  # the temporal row is logged after the last epoch
    assert reported["temporal_top1"] >= 0.95 and set(reported) >= {"temporal_top1_next1", "temporal_top1_next2"}
    held_out = windows_for(predictor, 1000, 2)
    predicted = predictor.temporal_scores(held_out).argmax(axis=2)  # (N, H)
    assert (predicted == held_out.next_token_experts[:, :, 0]).mean() >= 0.95


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_save_load_round_trip_gives_identical_scores(arch, fitted, tmp_path) -> None:
    predictor, _ = fitted(arch)
    predictor.save(tmp_path)
    loaded = load_predictor(tmp_path)
    windows = windows_for(predictor, 300, 3)
    (before, conf_before), (after, conf_after) = predictor.score(windows), loaded.score(windows)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(conf_before, conf_after)
    assert loaded.parameter_count() == predictor.parameter_count()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_same_seed_gives_identical_scores(arch) -> None:
    # dropout on wherever a section has it: its masks must come from the seed too
    dropout = {name: {**section, "dropout": 0.2} for name, section in SMALL.items()
               if "dropout" in {f.name for f in dataclasses.fields(ARCHITECTURES[name].config)}}
    scores = []
    for _ in range(2):
        predictor = make(arch, epochs=1, **dropout)
        predictor.fit(windows_for(predictor, 400, 0), windows_for(predictor, 100, 1), lambda row: None)
        scores.append(predictor.score(windows_for(predictor, 200, 2))[0])
    np.testing.assert_array_equal(scores[0], scores[1])


@pytest.mark.parametrize("arch", [a for a, cls in ARCHITECTURES.items() if issubclass(cls, NeuralPredictor)])
def test_non_finite_loss_names_epoch_and_step(arch) -> None:
    predictor = make(arch)
    train = windows_for(predictor, 300, 0)
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


def fits_and_round_trips(arch: str, section: dict, tmp_path, **train) -> Predictor:
    """`arch` with `section` over its SMALL sizes (and `train` overrides) learns the synthetic mapping (top-1 >= 0.95)
    and scores the same after save/load."""
    size, overrides = FIT.get(arch, (3000, {}))
    predictor = make(arch, **{**overrides, **train}, **{arch: {**SMALL[arch], **section}})
    predictor.fit(windows_for(predictor, size, 0), windows_for(predictor, 500, 1), lambda row: None)
    held_out = windows_for(predictor, 1000, 2)
    assert top1(predictor, held_out) >= 0.95
    predictor.save(tmp_path)
    np.testing.assert_array_equal(load_predictor(tmp_path).score(held_out)[0], predictor.score(held_out)[0])
    return predictor


@pytest.mark.parametrize("arch", ["mlp", "token_mlp", "layer_specific", "hybrid"])
@pytest.mark.parametrize("encoding", ["weighted_set", "both"])
def test_weighted_set_context_encodings_learn_and_round_trip(arch, encoding, tmp_path) -> None:
    # reading the heavier expert off a weighted sum, then the modular mapping with the token id, takes token_mlp longer
    epochs = {"epochs": 10, "patience": 10} if arch == "token_mlp" else {}
    predictor = fits_and_round_trips(arch, {"context_encoding": encoding}, tmp_path, **epochs)
    assert predictor.requires[:2] == ("context_experts", "context_weights")
    assert [module.encoding for module in predictor.module.modules() if isinstance(module, FlatContext)] == [encoding]


def test_transition_table_sums_each_routed_experts_scaled_row_by_hand() -> None:
    """ExpertTransitions: logits = sum over context layers j and slots s of slot_scale[t, j, s] * T[t, j, e_js];
    a slot with no expert (index E) adds nothing, and the table starts at zero."""
    from moe_prefetch.predictors.layers import ExpertTransitions

    E, L, c, k = 3, 4, 2, 2
    transitions = ExpertTransitions(E, L, c, k)
    assert not transitions.table.weight.any()
    with torch.no_grad():
        transitions.table.weight.copy_(torch.arange(L * c * (E + 1) * E, dtype=torch.float32).reshape(-1, E))
        transitions.slot_scale.copy_(torch.tensor([0.5, 2.0]).expand(L, c, k))
    context = torch.tensor([[[0, 2], [1, E]]])  # layer j=0 routed 0 then 2, layer j=1 routed 1 and nothing
    target = torch.tensor([3])
    row = lambda j, e: (3 * c + j) * (E + 1) + e  # noqa: E731 - the table's row of (t=3, j, e)
    weight = transitions.table.weight
    expected = 0.5 * weight[row(0, 0)] + 2.0 * weight[row(0, 2)] + 0.5 * weight[row(1, 1)]
    torch.testing.assert_close(transitions(context, target)[0], expected)


def test_the_transition_table_trains_at_its_own_learning_rate() -> None:
    predictor = make("mlp", mlp={"transitions": True, "transitions_lr_scale": 15.0})
    network, table = predictor.parameter_groups(0.002)
    assert network["lr"] == 0.002 and table["lr"] == pytest.approx(0.03)
    assert {id(p) for p in table["params"]} == {id(p) for p in predictor.module.transitions.parameters()}
    assert len(network["params"]) + len(table["params"]) == len(list(predictor.module.parameters()))
    assert [group["lr"] for group in make("mlp").parameter_groups(0.002)] == [0.002]  # no table: one group


@pytest.mark.parametrize("arch", ["mlp", "layer_specific", "hybrid"])  # token_mlp has its table by default
def test_transitions_learn_and_round_trip(arch, tmp_path) -> None:
    assert fits_and_round_trips(arch, {"transitions": True}, tmp_path).module.transitions is not None


def test_weighted_set_ignores_slot_order_inside_a_layer_and_reads_the_weights() -> None:
    """Swapping a context layer's two slots together with their weights leaves weighted_set's scores unchanged
    (a set), not the slots encoding's; changing only the weights changes weighted_set's scores."""
    def swapped(windows: WindowSet) -> WindowSet:
        return dataclasses.replace(windows, context_experts=windows.context_experts[:, :, ::-1].copy(),
                                   context_weights=windows.context_weights[:, :, ::-1].copy())

    windows = synthetic(64, 0, ("context_experts", "context_weights"))
    scores = {}
    for encoding in ("weighted_set", "slots"):
        predictor = make("mlp", mlp={"context_encoding": encoding})
        scores[encoding] = predictor.score(windows)[0], predictor.score(swapped(windows))[0]
    np.testing.assert_allclose(*scores["weighted_set"], rtol=1e-5, atol=1e-7)
    assert np.abs(scores["slots"][0] - scores["slots"][1]).max() > 1e-4
    reweighted = dataclasses.replace(windows, context_weights=np.ascontiguousarray(windows.context_weights[:, :, ::-1]))
    assert np.abs(make("mlp", mlp={"context_encoding": "weighted_set"}).score(reweighted)[0] - scores["weighted_set"][0]).max() > 1e-4


def test_weighted_set_without_context_weights_and_an_unknown_encoding_are_one_line_errors() -> None:
    predictor = make("token_mlp", token_mlp={**SMALL["token_mlp"], "context_encoding": "weighted_set"})
    with pytest.raises(PipelineError, match=r"^context_weights: token_mlp with context_encoding weighted_set reads .*windows.context_weights: true"):
        predictor.fit(synthetic(100, 0, ("context_experts", "token_id")), synthetic(50, 1, ("context_experts", "token_id")), lambda row: None)
    with pytest.raises(PipelineError, match=r"^train.mlp.context_encoding: 'sets' is not one of 'slots' or 'weighted_set' or 'both'"):
        make("mlp", mlp={"context_encoding": "sets"})


def test_hidden_mlp_without_hidden_states_is_a_one_line_error() -> None:
    with pytest.raises(PipelineError, match=r"^train.arch: hidden_mlp needs hidden states; set collect.capture.hidden_states"):
        make("hidden_mlp").fit(synthetic(100, 0), synthetic(50, 1), lambda row: None)


def test_ensemble_checks_every_member_before_training_any() -> None:
    rows: list = []
    with pytest.raises(PipelineError, match=r"^train.arch: hidden_mlp needs hidden states"):
        make("ensemble", ensemble={"members": ["mlp", "hidden_mlp"]}).fit(synthetic(200, 0), synthetic(50, 1), rows.append)
    assert rows == []


def test_hybrid_needs_the_token_horizon_it_predicts() -> None:
    windows = synthetic(100, 0)  # no next_token columns
    with pytest.raises(PipelineError, match=r"^train.hybrid.temporal_tokens: 2 needs windows.token_horizon >= 2; the windows carry 0"):
        make("hybrid").fit(windows, windows, lambda row: None)
    plain = make("hybrid", hybrid={"temporal_tokens": 0})
    assert isinstance(plain, HybridPredictor) and len(plain.module(plain.batch(windows, np.arange(4), torch.device("cpu")))) == 2


def test_ensemble_members_are_saved_under_prefixes(fitted, tmp_path) -> None:
    predictor, rows = fitted("ensemble")
    keys = set(predictor.state())
    assert "mix_logits" in keys and any(k.startswith("member0.lookup.") for k in keys) and any(k.startswith("member1.mlp.") for k in keys)
    assert any(key.startswith("mlp/") for row in rows for key in row) and "ensemble_weight/mlp" in rows[-1]


def test_hidden_mlp_with_the_stale_gate_input_learns_to_correct_it(tmp_path) -> None:
    """Hidden states pure noise, the stale gate's top-k a consistent shift of the target's routed set (top-1 + 3):
    hidden_mlp alone stays near chance, with stale_gate_input it learns the correction, and scores the same after
    save/load."""
    E = GEOMETRY["num_experts"]

    def with_stale_gate(windows: WindowSet, seed: int) -> WindowSet:
        noise = np.random.default_rng(seed).normal(0, 1, (len(windows), 16)).astype(np.float16)
        return dataclasses.replace(windows, hidden_state=noise, stale_gate_experts=((windows.target_experts + 3) % E).astype(np.int16))

    train, val, test = (with_stale_gate(synthetic(n, seed), seed) for n, seed in ((3000, 0), (500, 1), (500, 2)))
    accuracy = {}
    for stale in (False, True):
        predictor = make("hidden_mlp", lr=0.03, hidden_mlp={"dropout": 0.0, "stale_gate_input": stale})
        assert ("stale_gate_experts" in predictor.requires) is stale
        predictor.fit(train, val, lambda row: None)
        accuracy[stale] = top1(predictor, test)
        predictor.save(tmp_path / str(stale))
        np.testing.assert_array_equal(load_predictor(tmp_path / str(stale)).score(test)[0], predictor.score(test)[0])
    assert accuracy[False] < 0.25 and accuracy[True] > 0.9, accuracy


def test_hidden_mlp_stale_gate_input_without_the_column_is_a_one_line_error() -> None:
    windows = synthetic(200, 0, ("context_experts", "hidden_state"))
    with pytest.raises(PipelineError, match=r"^train.hidden_mlp.stale_gate_input: these windows carry no stale_gate_experts; set "
                                            r"collect.capture.lookahead >= windows.horizon[^\n]*$"):
        make("hidden_mlp", hidden_mlp={"stale_gate_input": True}).fit(windows, windows, lambda row: None)


def test_weighted_set_loads_a_checkpoint_with_one_table_per_context_layer() -> None:
    """FlatContext keeps the c context layers' set tables as one (c*(E+1), d) table; a state dict written before
    (set_experts.<j>.weight, one table per layer) loads into it and scores the same."""
    E, L, c, k, d = 5, 6, 3, 2, 4
    torch.manual_seed(0)
    module = FlatContext(E, L, d, "weighted_set", c)
    state = module.state_dict()
    blocks = state.pop("set_experts.weight").split(E + 1)
    old = {**state, **{f"set_experts.{j}.weight": block.clone() for j, block in enumerate(blocks)}}
    loaded = FlatContext(E, L, d, "weighted_set", c)
    loaded.load_state_dict(old)
    context = torch.randint(0, E + 1, (7, c, k))
    target, weights = torch.randint(0, L, (7,)), torch.rand(7, c, k)
    torch.testing.assert_close(loaded(context, target, weights), module(context, target, weights), rtol=0, atol=0)
    assert not loaded(torch.full((1, c, k), E), target[:1], torch.ones(1, c, k))[:, : c * d].any()  # no expert: zero
