"""Every supported MoE family: what the recorder records equals what each experts module actually received.

Tiny random models are built from each family's config class and run on a right-padded batch exactly as
stages/collect.py does (adapter.forward_inputs + RoutingRecorder). Independently of the adapter, a forward
pre-hook on every experts module captures the (expert ids, weights) it was called with; all tokens (padding
included) must match, experts as sets and weights per expert, in float32 and bfloat16.
"""

from __future__ import annotations

import copy
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
from experts_received import ExpertsCalls, assert_same_routing

VOCAB = 64
ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside VOCAB (some families default to ids beyond it)
# Above prompt + generation in tests/test_collect_generate.py (15 tokens): a shorter window makes generate mode decode
# one sequence at a time, whose weights equal the batched forward's only up to rounding (gpt_oss covers that path).
WIDE_WINDOW = 16


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


def _sigmoid_group(config_class, **extra):
    """A DeepSeek-V3-style router family (glm4_moe, deepseek_v32, dots1): dense layer 0, then two MoE layers."""
    return lambda: config_class(**ATTN, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, **extra)


def _deepseek_v32():
    return _sigmoid_group(transformers.DeepseekV32Config, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                          qk_rope_head_dim=8, v_head_dim=8, head_dim=8, index_topk=16, index_head_dim=8, index_n_heads=2)()


def _dbrx():
    return transformers.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
                                   attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),
                                   ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))


def _llama4_text():
    return transformers.Llama4TextConfig(**ATTN, head_dim=8, num_hidden_layers=3, intermediate_size=16,
                                         intermediate_size_mlp=24, num_local_experts=4, num_experts_per_tok=1,
                                         interleave_moe_layer_step=1, moe_layers=[0, 2], no_rope_layers=[1, 1, 1],
                                         attention_chunk_size=64)


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
    "glm4_moe": (_sigmoid_group(transformers.Glm4MoeConfig, head_dim=8), "Glm4MoeForCausalLM", [1, 2], 2),
    "deepseek_v32": (_deepseek_v32, "DeepseekV32ForCausalLM", [1, 2], 2),
    "dots1": (_sigmoid_group(transformers.Dots1Config, head_dim=8), "Dots1ForCausalLM", [1, 2], 2),
    "ernie4_5_moe": (lambda: transformers.Ernie4_5_MoeConfig(**ATTN, num_hidden_layers=3, intermediate_size=48,
                                                             moe_intermediate_size=16, moe_num_experts=6, moe_k=2,
                                                             moe_num_shared_experts=1, moe_layer_start_index=1,
                                                             moe_layer_interval=1), "Ernie4_5_MoeForCausalLM", [1, 2], 2),
    "minimax": (lambda: transformers.MiniMaxConfig(**ATTN, head_dim=8, num_hidden_layers=2, intermediate_size=16,
                                                   num_local_experts=4, num_experts_per_tok=2, block_size=4,
                                                   layer_types=["linear_attention", "full_attention"]),
                "MiniMaxForCausalLM", [0, 1], 2),
    "minimax_m2": (lambda: transformers.MiniMaxM2Config(**ATTN, head_dim=8, num_hidden_layers=2, intermediate_size=16,
                                                        num_local_experts=6, num_experts_per_tok=2, **TOKENS),
                   "MiniMaxM2ForCausalLM", [0, 1], 2),
    # per-layer top-k: layer 0 dispatches 1 expert, layer 1 three; the recorder pads layer 0 with expert -1
    "hunyuan_v1_moe": (lambda: transformers.HunYuanMoEV1Config(**ATTN, head_dim=8, num_hidden_layers=2, intermediate_size=16,
                                                               num_experts=6, moe_topk=[1, 3]), "HunYuanMoEV1ForCausalLM", [0, 1], 3),
    "granitemoeshared": (lambda: transformers.GraniteMoeSharedConfig(**ATTN, num_hidden_layers=2, intermediate_size=16,
                                                                     num_local_experts=4, num_experts_per_tok=2,
                                                                     shared_intermediate_size=32),
                         "GraniteMoeSharedForCausalLM", [0, 1], 2),
    "flex_olmo": (lambda: transformers.FlexOlmoConfig(**ATTN, num_hidden_layers=2, intermediate_size=16, num_experts=5,
                                                      num_experts_per_tok=2, **TOKENS), "FlexOlmoForCausalLM", [0, 1], 2),
    "cohere2_moe": (lambda: transformers.Cohere2MoeConfig(**ATTN, head_dim=8, num_hidden_layers=2, intermediate_size=16,
                                                          num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                                                          layer_types=["sliding_attention", "full_attention"],
                                                          mlp_layer_types=["sparse", "sparse"], sliding_window=4, **TOKENS),
                    "Cohere2MoeForCausalLM", [0, 1], 2),
    "dbrx": (_dbrx, "DbrxForCausalLM", [0, 1], 2),
    "solar_open": (lambda: transformers.SolarOpenConfig(
        **ATTN, head_dim=8, num_hidden_layers=2, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5, **TOKENS,
    ), "SolarOpenForCausalLM", [0, 1], 2),
    "afmoe": (lambda: transformers.AfmoeConfig(
        **ATTN, head_dim=8, num_hidden_layers=3, num_dense_layers=1, intermediate_size=48, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=2, num_shared_experts=1, route_scale=2.0, sliding_window=WIDE_WINDOW, **TOKENS,
    ), "AfmoeForCausalLM", [1, 2], 2),
    "glm4_moe_lite": (lambda: transformers.Glm4MoeLiteConfig(
        **ATTN, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.8, kv_lora_rank=16,
        q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"], **TOKENS,
    ), "Glm4MoeLiteForCausalLM", [1, 2], 2),
    "exaone_moe": (lambda: transformers.ExaoneMoeConfig(
        **ATTN, head_dim=8, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        sliding_window=WIDE_WINDOW, mlp_layer_types=["dense", "sparse", "sparse"], **TOKENS,
    ), "ExaoneMoeForCausalLM", [1, 2], 2),
    "llama4_text": (_llama4_text, "Llama4ForCausalLM", [0, 2], 1),
    # encoder blocks 1, 3 and decoder block 1 are sparse; expert_capacity 2 of 4 experts on 8-token rows forces drops
    "switch_transformers": (lambda: transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_heads=4, num_layers=4, num_decoder_layers=2,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=2,
        router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0,
    ), "SwitchTransformersForConditionalGeneration", [("encoder", 1), ("encoder", 3), ("decoder", 1)], 1),
}
LENGTHS = [8, 5, 3]  # right padding, as collect pads


SIGMOID_ROUTERS = {"deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "exaone_moe", "dots1", "minimax_m2", "llama4_text",
                   "solar_open", "afmoe"}


def test_every_family_has_a_case():
    hybrid = {adapter.family for adapter in HYBRID_ADAPTERS}  # their cases: tests/test_hybrid_families.py
    assert set(CASES) == set(FAMILIES) - hybrid


_MODELS: dict[str, nn.Module] = {}


def spread_block_routing(model: nn.Module) -> nn.Module:
    """What `spread_routers` does, for the routers it does not match: Hunyuan's `Gate` (its Linear is `wg`) and a
    score-correction bias held by the MoE block rather than the router (MiniMax-M2, AFMoE)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("Gate") and isinstance(getattr(module, "wg", None), nn.Linear):
                module.wg.weight.normal_(0.0, 1.0)
            for name in ("e_score_correction_bias", "expert_bias"):  # AFMoE's block holds `expert_bias`
                bias = getattr(module, name, None)
                if isinstance(bias, torch.Tensor) and not type(module).__name__.endswith("Router"):
                    bias.uniform_(-0.3, 0.3)
    return model


def build(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    if family not in _MODELS:
        make_config, class_name, _, _ = CASES[family]
        torch.manual_seed(0)
        _MODELS[family] = spread_block_routing(spread_routers(getattr(transformers, class_name)(make_config()).eval()))
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


def run(model: nn.Module, capture: CaptureParams, experts_hooks: bool = True):
    """One forward exactly as collect does; returns (adapter, recorded arrays, {(stack, layer): per-token routing})."""
    adapter = adapter_for(model)
    recorder = RoutingRecorder(adapter, capture, projection_seed=0)
    calls = ExpertsCalls(model) if experts_hooks else None
    ids, mask = batch()
    try:
        with torch.no_grad():
            model(**adapter.forward_inputs(ids, mask))
        arrays = recorder.take(*ids.shape)
    finally:
        recorder.remove()
        if calls is not None:
            calls.remove()
    received = {}
    for key, routings in (calls.calls.items() if calls is not None else ()):
        (received[key],) = routings  # one forward: one call per experts module
    return adapter, arrays, received


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
    if family not in SIGMOID_ROUTERS:  # sigmoid scores do not sum to 1
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


def test_hunyuan_per_layer_expert_counts_are_a_one_line_error():
    model = copy.deepcopy(build("hunyuan_v1_moe"))
    model.model.layers[1].mlp.gate.num_experts = 4  # as a per-layer `num_experts` list would build it
    with pytest.raises(PipelineError, match=r"per-layer expert counts \[4, 6\]") as err:
        adapter_for(model).num_experts
    assert "\n" not in str(err.value)


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
