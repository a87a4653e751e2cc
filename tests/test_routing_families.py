"""Every supported MoE family: what the recorder records equals what each experts module actually received.

Tiny random models are built from each family's config class and run on a right-padded batch exactly as
stages/collect.py does (adapter.forward_inputs + RoutingRecorder). Independently of the adapter, a forward
pre-hook on every experts module captures the (expert ids, weights) it was called with; all tokens (padding
included) must match, experts as sets and weights per expert, in float32 and bfloat16.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from moe_prefetch.errors import PipelineError
from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.routing import FAMILIES, adapter_for
from moe_prefetch.routing.hybrid_families import HYBRID_ADAPTERS
from moe_prefetch.routing.recorder import RoutingRecorder
from conftest import spread_routers

VOCAB = 64
ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)


def _deepseek_v2():
    return transformers.DeepseekV2Config(
        **ATTN, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=2.0, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
    )


def _deepseek_v3():
    return transformers.DeepseekV3Config(
        **ATTN, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
    )


# family -> (config builder, model class name, expected (stack, true layer index) of the MoE layers, top_k)
CASES = {
    "mixtral": (lambda: transformers.MixtralConfig(**ATTN, num_hidden_layers=2, intermediate_size=32, num_local_experts=4,
                                                   num_experts_per_tok=2), "MixtralForCausalLM", [0, 1], 2),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(**ATTN, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=4,
                                                      mlp_only_layers=[1]), "Qwen2MoeForCausalLM", [0, 2], 4),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(**ATTN, head_dim=8, num_hidden_layers=4, intermediate_size=48,
                                                      moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                                                      decoder_sparse_step=2, norm_topk_prob=True), "Qwen3MoeForCausalLM", [1, 3], 2),
    "olmoe": (lambda: transformers.OlmoeConfig(**ATTN, num_hidden_layers=2, intermediate_size=16, num_experts=8,
                                               num_experts_per_tok=2), "OlmoeForCausalLM", [0, 1], 2),
    "deepseek_v2": (_deepseek_v2, "DeepseekV2ForCausalLM", [1, 2], 3),
    "deepseek_v3": (_deepseek_v3, "DeepseekV3ForCausalLM", [1, 2], 2),
    "gpt_oss": (lambda: transformers.GptOssConfig(**ATTN, head_dim=8, num_hidden_layers=2, intermediate_size=16, num_local_experts=4,
                                                  num_experts_per_tok=2, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"]), "GptOssForCausalLM", [0, 1], 2),
    "granitemoe": (lambda: transformers.GraniteMoeConfig(**ATTN, num_hidden_layers=2, intermediate_size=16, num_local_experts=4,
                                                         num_experts_per_tok=2), "GraniteMoeForCausalLM", [0, 1], 2),
    "phimoe": (lambda: transformers.PhimoeConfig(**ATTN, num_hidden_layers=2, intermediate_size=16, num_local_experts=4,
                                                 num_experts_per_tok=2), "PhimoeForCausalLM", [0, 1], 2),
    # encoder blocks 1, 3 and decoder block 1 are sparse; expert_capacity 2 of 4 experts on 8-token rows forces drops
    "switch_transformers": (lambda: transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_heads=4, num_layers=4, num_decoder_layers=2,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=2,
        router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0,
    ), "SwitchTransformersForConditionalGeneration", [("encoder", 1), ("encoder", 3), ("decoder", 1)], 1),
}
LENGTHS = [8, 5, 3]  # right padding, as collect pads


def test_every_family_has_a_case():
    hybrid = {adapter.family for adapter in HYBRID_ADAPTERS}  # their cases: tests/test_hybrid_families.py
    assert set(CASES) == set(FAMILIES) - hybrid


_MODELS: dict[str, nn.Module] = {}


def build(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    if family not in _MODELS:
        make_config, class_name, _, _ = CASES[family]
        torch.manual_seed(0)
        _MODELS[family] = spread_routers(getattr(transformers, class_name)(make_config()).eval())
    model = _MODELS[family]
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


def where(name: str) -> tuple[str, int]:
    """(stack, layer index) from a module path such as model.layers.2.mlp.experts or encoder.block.3.layer.1.mlp.experts."""
    found = re.search(r"(?:(encoder|decoder)\.block|layers)\.(\d+)\.", name)
    return found.group(1) or "decoder", int(found.group(2))


def received_routing(args: tuple, kwargs: dict) -> list[dict[int, float]]:
    """Per token {expert: weight} as the experts module received it (standard (hidden, ids, weights) call, or
    Switch's (hidden, one-hot dispatch mask (T, 1, E), weights (T, 1)))."""
    values = list(args) + list(kwargs.values())
    _, ids, weights = values[:3]
    weights = weights.float()
    if ids.dim() == 3:  # Switch: every expert whose mask bit is set runs on the token, scaled by weights[t]
        return [{int(e): float(weights[t, 0]) for e in torch.nonzero(ids[t, 0]).flatten()} for t in range(ids.shape[0])]
    return [{int(e): float(w) for e, w in zip(ids[t], weights[t])} for t in range(ids.shape[0])]


def run(model: nn.Module, capture: CaptureParams, experts_hooks: bool = True):
    """One forward exactly as collect does; returns (adapter, recorded arrays, {(stack, layer): per-token routing})."""
    adapter = adapter_for(model)
    recorder = RoutingRecorder(adapter, capture, projection_seed=0)
    received: dict[tuple[str, int], list] = {}
    handles = []
    if experts_hooks:
        for name, module in model.named_modules():
            if type(module).__name__.endswith("Experts"):
                def hook(_module, args, kwargs, key=where(name)):
                    assert key not in received
                    received[key] = received_routing(args, kwargs)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    ids, mask = batch()
    try:
        with torch.no_grad():
            model(**adapter.forward_inputs(ids, mask))
        arrays = recorder.take(*ids.shape)
    finally:
        recorder.remove()
        for handle in handles:
            handle.remove()
    return adapter, arrays, received


def assert_same_routing(recorded_experts: np.ndarray, recorded_weights: np.ndarray, received: list[dict[int, float]], label: str):
    assert recorded_experts.shape[0] == len(received)
    for t, truth in enumerate(received):
        ids, weights = recorded_experts[t].tolist(), recorded_weights[t]
        assert all(w == 0 for e, w in zip(ids, weights) if e == -1), f"{label} token {t}: a no-expert slot has weight"
        recorded = {e: float(w) for e, w in zip(ids, weights) if e != -1}
        assert set(recorded) == set(truth), f"{label} token {t}: recorded experts {ids}, experts module got {sorted(truth)}"
        for expert, weight in truth.items():
            np.testing.assert_allclose(recorded[expert], weight, rtol=1e-5, atol=0, err_msg=f"{label} token {t} expert {expert}")
        assert list(weights) == sorted(weights, reverse=True), f"{label} token {t}: not best-first"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_recorded_routing_is_what_the_experts_received(family, dtype):
    model = build(family, dtype)
    _, _, expected_layers, top_k = CASES[family]
    adapter, arrays, received = run(model, CaptureParams(router_probs=True))
    assert adapter.family == family
    keys = [(layer.stack, layer.layer_index) for layer in adapter.layers]
    assert keys == [k if isinstance(k, tuple) else ("decoder", k) for k in expected_layers]
    assert sorted(received) == sorted(keys), "an experts module ran that the adapter does not know, or vice versa"
    assert adapter.top_k == top_k and arrays["experts"].shape[-1] == top_k
    assert adapter.num_experts == arrays["router_probs"].shape[-1]
    B, S = len(LENGTHS), max(LENGTHS)
    assert arrays["experts"].shape == (B, S, len(keys), top_k)
    if family != "deepseek_v3":  # sigmoid scores do not sum to 1
        np.testing.assert_allclose(arrays["router_probs"].astype(np.float32).sum(-1), 1.0, atol=2e-2)
    for position, key in enumerate(keys):
        experts = arrays["experts"][:, :, position].reshape(B * S, top_k)
        weights = arrays["weights"][:, :, position].reshape(B * S, top_k)
        assert_same_routing(experts, weights, received[key], f"{family}/{dtype}/{key}")
    chosen = {tuple(sorted(row)) for row in arrays["experts"].reshape(-1, top_k).tolist()}
    assert len(chosen) > 2, "degenerate routing: the test would not notice a wrong mapping"


def test_family_specific_geometry():
    assert adapter_for(build("qwen2_moe")).shared_experts == 4  # 64 / 16: Qwen1.5-MoE counts 5632 / 1408 = 4
    gate = build("qwen2_moe").model.layers[0].mlp
    assert adapter_for(build("qwen2_moe")).layers[0].router is gate.gate is not gate.shared_expert_gate
    assert adapter_for(build("deepseek_v2")).shared_experts == 1
    assert adapter_for(build("deepseek_v3")).shared_experts == 1
    assert adapter_for(build("mixtral")).shared_experts == 0
    assert adapter_for(build("switch_transformers")).num_experts == 4


def test_switch_capacity_drops_are_recorded_as_no_expert():
    _, arrays, received = run(build("switch_transformers"), CaptureParams())
    experts, weights = arrays["experts"], arrays["weights"]
    dropped = experts == -1
    assert dropped.any(), "expert_capacity=2 should drop tokens"
    assert (weights[dropped] == 0).all() and (weights[~dropped] > 0).all()
    # drops happen in the real (non-padding) part too, in both stacks
    mask = batch()[1].numpy().astype(bool)
    assert dropped[:, :, 0][mask].any() and dropped[:, :, 2][mask].any()
    assert sum(len(token) == 0 for token in received[("decoder", 1)]) == int(dropped[:, :, 2].sum())


def test_switch_decoder_reads_the_same_text_shifted_right():
    model = build("switch_transformers")
    ids, mask = batch()
    inputs = adapter_for(model).forward_inputs(ids, mask)
    assert inputs["decoder_input_ids"].shape == ids.shape
    assert (inputs["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, :-1])
    assert torch.equal(inputs["decoder_attention_mask"], mask)


def pre_norm_of(model: nn.Module, family: str, stack: str, index: int) -> nn.Module:
    """The norm in front of an MoE block, found from the model structure (not from the adapter)."""
    if family == "switch_transformers":
        return getattr(model, stack).block[index].layer[-1].layer_norm
    return model.model.layers[index].post_attention_layernorm


def router_of(model: nn.Module, family: str, stack: str, index: int) -> nn.Module:
    if family == "switch_transformers":
        return getattr(model, stack).block[index].layer[-1].mlp.router
    layer = model.model.layers[index]
    block = layer.block_sparse_moe if family == "granitemoe" else layer.mlp
    return block.router if family in ("gpt_oss", "granitemoe", "phimoe") else block.gate


@pytest.mark.parametrize("family", sorted(CASES))
def test_lookahead(family):
    model = build(family)
    _, plain, _ = run(model, CaptureParams(), experts_hooks=False)
    residuals = {}
    _, _, expected_layers, top_k = CASES[family]
    keys = [k if isinstance(k, tuple) else ("decoder", k) for k in expected_layers]
    handles = [pre_norm_of(model, family, *key).register_forward_pre_hook(
        lambda _m, args, key=key: residuals.__setitem__(key, args[0])) for key in keys]
    try:
        adapter, ahead, _ = run(model, CaptureParams(lookahead=2), experts_hooks=False)
    finally:
        for handle in handles:
            handle.remove()
    # look-ahead never disturbs what is recorded
    assert np.array_equal(plain["experts"], ahead["experts"]) and np.array_equal(plain["weights"], ahead["weights"])
    look = ahead["lookahead_experts"]  # (B, S, L, H, k)
    B, S = len(LENGTHS), max(LENGTHS)
    assert look.shape == (B, S, len(keys), 2, top_k)
    for position, (stack, index) in enumerate(keys):
        same_stack_later = [k for k in keys[position + 1 :] if k[0] == stack]
        for h in (1, 2):
            got = look[:, :, position, h - 1]
            if h > len(same_stack_later):  # past the last MoE layer of this stack: undefined
                assert (got == -1).all(), f"{family} {stack}/{index} h={h}"
                continue
            later = same_stack_later[h - 1]
            with torch.no_grad():
                normed = pre_norm_of(model, family, *later)(residuals[(stack, index)])
                if family == "switch_transformers":  # routes whole sequences (capacity is per sequence)
                    mask = router_of(model, family, *later)(normed)[0].reshape(B * S, -1)
                    want = [set(torch.nonzero(row).flatten().tolist()) or {-1} for row in mask]
                else:  # the model routes a flattened (T, D) input; best-first by its weights, ties to the lower id
                    _, weights, chosen = router_of(model, family, *later)(normed.reshape(B * S, -1))
                    order = [sorted(zip(row_w, row_e), key=lambda p: (-p[0], p[1])) for row_w, row_e in zip(weights.tolist(), chosen.tolist())]
                    assert got.reshape(B * S, top_k).tolist() == [[e for _, e in row] for row in order], f"{family} {stack}/{index} h={h} order"
                    want = [set(row.tolist()) for row in chosen]
            assert [set(row) for row in got.reshape(B * S, top_k).tolist()] == want, f"{family} {stack}/{index} h={h}"


def test_dense_model_has_no_moe_layer():
    config = transformers.Qwen2MoeConfig(**ATTN, num_hidden_layers=2, intermediate_size=16, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                         mlp_only_layers=[0, 1])
    with pytest.raises(PipelineError, match="has no MoE layer") as err:
        adapter_for(transformers.Qwen2MoeForCausalLM(config))
    assert "\n" not in str(err.value)


def test_unsupported_family_names_the_supported_ones():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ATTN, num_hidden_layers=1, intermediate_size=16))
    with pytest.raises(PipelineError, match="'llama' is not supported") as err:
        adapter_for(llama)
    message = str(err.value)
    assert "\n" not in message and all(family in message for family in FAMILIES)
    with pytest.raises(PipelineError, match="'jetmoe' is not supported"):
        adapter_for(SimpleNamespace(config=SimpleNamespace(model_type="jetmoe")))


def test_switch_encoder_only_model_records_the_encoder():
    encoder = transformers.SwitchTransformersEncoderModel(CASES["switch_transformers"][0]()).eval()
    adapter, arrays, received = run(encoder, CaptureParams())
    assert [(layer.stack, layer.layer_index) for layer in adapter.layers] == [("encoder", 1), ("encoder", 3)]
    assert "decoder_input_ids" not in adapter.forward_inputs(*batch())
    for position, key in enumerate(sorted(received, key=lambda k: k[1])):
        assert_same_routing(arrays["experts"][:, :, position].reshape(-1, 1), arrays["weights"][:, :, position].reshape(-1, 1),
                            received[key], f"switch encoder-only {key}")


def test_missing_top_k_is_a_one_line_error():
    config = _deepseek_v2()
    config.num_experts_per_tok = None  # DeepseekV2Config's default
    with pytest.raises(PipelineError, match="top-k is not set"):
        adapter_for(transformers.DeepseekV2ForCausalLM(config))
