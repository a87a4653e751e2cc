"""Hybrid-recurrent (Qwen3-Next, Qwen3.5-MoE, Jamba, GraniteMoeHybrid, Kimi-Linear) and multimodal (Qwen3-VL-MoE,
Qwen3-Omni-MoE, Llama 4) families: the routing collect records is what each experts module received.

Tiny random models of each family run through collect's batch entry points (`forward_rows`, `generate_rows`) on a
right-padded batch. Independently of the adapter, a forward pre-hook on every experts module captures the
(expert ids, weights) it was called with; sets and per-expert weights must match, in float32 and bfloat16.
Recurrent families must decode a padded batch exactly as each sequence alone (pad steps never reach the
recurrent state), and the look-ahead must equal a hand-run of the later norm and router found from the model's
own structure.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from torch import nn

from conftest import MODEL, spread_routers, tiny_params
from moe_prefetch import traces
from moe_prefetch.collect.collector import collect
from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.collect.generation import eos_token_ids, forward_rows, generate_rows
from moe_prefetch.collect.models import load_model
from moe_prefetch.routing import FAMILIES, adapter_for
from moe_prefetch.routing.hybrid_families import HYBRID_ADAPTERS
from moe_prefetch.routing.recorder import RoutingRecorder
from test_collect import one_thread  # noqa: F401  (autouse fixture: one torch thread)
from experts_received import ExpertsCalls, assert_same_routing
from test_routing_families import _llama4_text

VOCAB = 64
ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
LINEAR_ATTN = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                   linear_num_value_heads=4)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}  # 4 = head_dim / 2
LLAMA4_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16, patch_size=8,
                     vision_output_dim=16, projector_input_dim=16, projector_output_dim=32)
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=4, num_position_embeddings=16)


def _qwen3_5_text() -> dict:
    return dict(**ATTN, **LINEAR_ATTN, head_dim=8, num_hidden_layers=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                num_experts=8, num_experts_per_tok=3, layer_types=["linear_attention", "full_attention"], rope_parameters=MROPE)


def _qwen3_omni_speech() -> dict:
    """Tiny talker and code2wav configs: the speech-output half of Qwen3-Omni-MoE, which a text collection skips."""
    small = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                 vocab_size=32)
    talker_text = dict(small, moe_intermediate_size=8, num_experts=2, num_experts_per_tok=1, shared_expert_intermediate_size=8,
                       rope_parameters={**MROPE, "interleaved": True})
    return dict(talker_config=dict(text_config=talker_text, code_predictor_config=dict(small, num_code_groups=2), num_code_groups=2,
                                   thinker_hidden_size=ATTN["hidden_size"], spatial_merge_size=2),
                code2wav_config=dict(small, codebook_size=16, num_quantizers=2, decoder_dim=16, upsample_rates=(2,), upsampling_ratios=(2,)))


def _qwen3_omni_thinker() -> dict:
    text = dict(**ATTN, head_dim=8, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                num_experts_per_tok=2, norm_topk_prob=False, rope_parameters={**MROPE, "interleaved": True})
    audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16, d_model=16, output_dim=32,
                 downsample_hidden_size=8)
    return dict(text_config=text, vision_config=VISION, audio_config=audio, vision_start_token_id=VOCAB - 4)


# family -> (config builder, model class, true indices of the MoE layers, top_k, shared_experts)
CASES = {
    # layer 2 dense (mlp_only_layers); linear and full attention alternate
    "qwen3_next": (lambda: transformers.Qwen3NextConfig(
        **ATTN, **LINEAR_ATTN, head_dim=8, num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]), "Qwen3NextForCausalLM", [0, 1, 3], 2, 2),
    "qwen3_5_moe": (lambda: transformers.Qwen3_5MoeConfig(text_config=_qwen3_5_text(), vision_config=VISION),
                    "Qwen3_5MoeForConditionalGeneration", [0, 1], 3, 2),
    "qwen3_5_moe_text": (lambda: transformers.Qwen3_5MoeTextConfig(**_qwen3_5_text()), "Qwen3_5MoeForCausalLM", [0, 1], 3, 2),
    "qwen3_vl_moe": (lambda: transformers.Qwen3VLMoeConfig(
        text_config=dict(**ATTN, head_dim=8, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                         num_experts_per_tok=2, mlp_only_layers=[1], rope_parameters=MROPE), vision_config=VISION),
        "Qwen3VLMoeForConditionalGeneration", [0, 2], 2, 0),
    # tests/test_routing_families.py's llama4_text decoder (layer 1 dense) inside the multimodal wrapper; casting it to
    # bfloat16 drops the vision rotary table's imaginary part (a torch warning): text-only runs never read it
    "llama4": (lambda: transformers.Llama4Config(text_config=_llama4_text().to_dict(), vision_config=LLAMA4_VISION),
               "Llama4ForConditionalGeneration", [0, 2], 1, 0),
    # the talker (speech output) is off, as a text collection loads it
    "qwen3_omni_moe": (lambda: transformers.Qwen3OmniMoeConfig(thinker_config=_qwen3_omni_thinker(), enable_audio_output=False),
                       "Qwen3OmniMoeForConditionalGeneration", [0, 1], 2, 0),
    "qwen3_omni_moe_thinker": (lambda: transformers.Qwen3OmniMoeThinkerConfig(**_qwen3_omni_thinker()),
                               "Qwen3OmniMoeThinkerForConditionalGeneration", [0, 1], 2, 0),
    # attention at layers 0, 2, Mamba at 1, 3; experts at the odd layers
    "jamba": (lambda: transformers.JambaConfig(
        **ATTN, num_hidden_layers=4, intermediate_size=32, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=4), "JambaForCausalLM", [1, 3], 2, 0),
    # Mamba-2 chunks of 4 tokens (the 8-token rows span two); Granite's multipliers away from 1
    "granitemoehybrid": (lambda: transformers.GraniteMoeHybridConfig(
        **ATTN, num_hidden_layers=3, intermediate_size=16, shared_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8, mamba_d_head=16,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4, embedding_multiplier=2.0, residual_multiplier=0.5),
        "GraniteMoeHybridForCausalLM", [0, 1, 2], 2, 2),
    # MLA needs as many kv heads as heads; layer 0 dense; 2 groups of 4 experts, top-1 group
    "kimi_linear": (lambda: transformers.KimiLinearConfig(
        **{**ATTN, "num_key_value_heads": 4}, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_shared_experts=1,
        num_local_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.0, kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["linear_attention", "full_attention", "linear_attention"], linear_head_dim=8, linear_num_heads=4,
        linear_conv_kernel_dim=4, pad_token_id=None, bos_token_id=None, eos_token_id=None), "KimiLinearForCausalLM", [1, 2], 2, 1),
}
RECURRENT = {"qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "jamba", "granitemoehybrid", "kimi_linear"}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
PROMPT_LENGTHS = [9, 4, 6]  # right-padded to 9, as collect pads a batch
NEW_TOKENS = 3


def text_decoder(model: nn.Module, family: str) -> nn.Module:
    """The module holding the decoder layers, spelled out per family (independently of the adapter)."""
    if family in ("qwen3_5_moe", "qwen3_vl_moe"):
        return model.model.language_model
    if family == "qwen3_omni_moe":
        return model.thinker.model.language_model
    if family == "qwen3_omni_moe_thinker":
        return model.model.language_model
    if family == "llama4":
        return model.language_model.model
    return model.model


def norm_and_router(model: nn.Module, family: str, index: int) -> tuple[nn.Module, nn.Module]:
    """(the norm in front of layer `index`'s MoE block, its router), from the modeling code's attribute names."""
    layer = text_decoder(model, family).layers[index]
    if family == "jamba":
        return layer.pre_ff_layernorm, layer.feed_forward.router
    if family == "granitemoehybrid":
        return layer.post_attention_layernorm, layer.block_sparse_moe.router
    if family == "llama4":
        return layer.post_attention_layernorm, layer.feed_forward.router
    return layer.post_attention_layernorm, layer.mlp.gate


def router_choice(router: nn.Module, family: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k), experts (T, k)) the router picks for tokens (T, D), from its own output: Llama 4's router
    returns (scores (T, E), 0 off the top-k; logits (T, E)), the others (logits, weights, experts)."""
    if family == "llama4":
        scores, logits = router(tokens)
        chosen = torch.topk(logits, router.top_k, dim=-1).indices
        return scores.gather(-1, chosen), chosen
    _, weights, chosen = router(tokens)
    return weights, chosen


_MODELS: dict[str, nn.Module] = {}


def build(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    if family not in _MODELS:
        make_config, class_name, _, _, _ = CASES[family]
        torch.manual_seed(0)
        _MODELS[family] = spread_routers(getattr(transformers, class_name)(make_config()).eval())
    model = _MODELS[family]
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def recorded(model: nn.Module, capture: CaptureParams, mode: str, token_lists: list[list[int]]):
    """(adapter, row dicts, ExpertsCalls) of collect's batch entry point for `mode` on `token_lists`."""
    adapter = adapter_for(model)
    recorder = RoutingRecorder(adapter, capture, projection_seed=0)
    calls = ExpertsCalls(model)
    try:
        if mode == "forward":
            rows = forward_rows(model, adapter, recorder, token_lists, 0, "cpu")
        else:
            rows = generate_rows(model, adapter, recorder, token_lists, 0, "cpu", NEW_TOKENS, eos_ids=set())
    finally:
        recorder.remove()
        calls.remove()
    return adapter, rows, calls


def test_every_hybrid_family_has_a_case():
    assert set(CASES) == {adapter.family for adapter in HYBRID_ADAPTERS}
    assert set(CASES) <= set(FAMILIES)
    assert {family for family in CASES if FAMILIES[family].recurrent} == RECURRENT


@DTYPES
@pytest.mark.parametrize("family", sorted(CASES))
def test_forward_routing_is_what_the_experts_received(family, dtype):
    model = build(family, dtype)
    _, _, expected_layers, top_k, shared = CASES[family]
    token_lists = prompts()
    capture = CaptureParams(router_probs=True, hidden_states=True, hidden_dim=4)  # projected from the text decoder's width
    adapter, rows, calls = recorded(model, capture, "forward", token_lists)
    keys = [("decoder", index) for index in expected_layers]
    assert adapter.family == family and [(layer.stack, layer.layer_index) for layer in adapter.layers] == keys
    assert sorted(calls.calls) == keys, "an experts module ran that the adapter does not know, or vice versa"
    assert adapter.top_k == top_k and adapter.shared_experts == shared
    assert adapter.num_experts == rows[0]["router_probs"].shape[-1]
    width = max(PROMPT_LENGTHS)
    for position, key in enumerate(keys):
        (received,) = calls.calls[key]  # one call over the padded batch (B * W tokens)
        for row, ids in enumerate(token_lists):
            assert rows[row]["experts"].shape == (len(ids), len(keys), top_k)
            assert rows[row]["hidden_states"].shape == (len(ids), len(keys), 4)
            assert_same_routing(rows[row]["experts"][:, position], rows[row]["weights"][:, position],
                                received[row * width : row * width + len(ids)], f"{family}/{dtype}/{key}/row {row}")
    chosen = {tuple(sorted(e)) for r in rows for e in r["experts"].reshape(-1, top_k).tolist()}
    assert len(chosen) > 2, "degenerate routing: the test would not notice a wrong mapping"
    for row, ids in enumerate(token_lists):  # the right padding after a sequence never reaches its tokens' routing
        _, (alone,), _ = recorded(model, CaptureParams(), "forward", [ids])
        assert np.array_equal(alone["experts"], rows[row]["experts"]), f"{family}/{dtype} row {row}: padding changed the routing"
        np.testing.assert_allclose(alone["weights"], rows[row]["weights"], rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


@DTYPES
@pytest.mark.parametrize("family", sorted(CASES))
def test_generate_routing_is_what_the_experts_received(family, dtype):
    """One prompt: the prefill's tokens, then each decode step's single token, are what the experts modules got;
    a padded batch of prompts routes every token as that prompt alone."""
    model = build(family, dtype)
    token_lists = prompts()
    alone = []
    for ids in token_lists:
        adapter, (rows,), calls = recorded(model, CaptureParams(), "generate", [ids])
        assert rows["generated"].tolist() == [False] * len(ids) + [True] * NEW_TOKENS
        for position, layer in enumerate(adapter.layers):
            prefill, *steps = calls.calls[(layer.stack, layer.layer_index)]
            assert len(prefill) == len(ids) and [len(step) for step in steps] == [1] * NEW_TOKENS
            assert_same_routing(rows["experts"][:, position], rows["weights"][:, position], prefill + [s[0] for s in steps],
                                f"{family}/{dtype}/layer {layer.layer_index}")
        alone.append(rows)
    if dtype == torch.float32:  # decoding with the cache (conv and recurrent states, KV) routes as one forward over it all
        _, full, _ = recorded(model, CaptureParams(), "forward", [rows["token_id"].tolist() for rows in alone])
        for row, (single, plain) in enumerate(zip(alone, full)):
            assert np.array_equal(np.sort(single["experts"], -1), np.sort(plain["experts"], -1)), f"{family} row {row}"
    _, batched, _ = recorded(model, CaptureParams(), "generate", token_lists)
    for row, (single, together) in enumerate(zip(alone, batched)):
        assert np.array_equal(single["token_id"], together["token_id"]), f"{family} row {row}: a different continuation"
        assert np.array_equal(single["experts"], together["experts"]), f"{family} row {row}: routing changed by batching"
        if family in RECURRENT:  # decoded one sequence at a time: the same arithmetic
            assert np.array_equal(single["weights"], together["weights"])
        else:  # batched attention: the same routing up to the float rounding of a wider matmul
            np.testing.assert_allclose(single["weights"], together["weights"], rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("family", ["qwen3_next", "jamba"])
def test_batched_decode_of_a_recurrent_model_would_leak_pad_steps(family):
    """Why recurrent families decode per sequence: decoding the right-padded batch together (the attention families'
    path) feeds the short prompts' pad steps through the recurrent state, and their decoded routing changes."""
    model = build(family)
    token_lists = prompts()
    adapter = adapter_for(model)
    adapter.recurrent = False  # this instance only: take the batched path
    recorder = RoutingRecorder(adapter, CaptureParams(), projection_seed=0)
    try:
        leaky = generate_rows(model, adapter, recorder, token_lists, 0, "cpu", NEW_TOKENS, eos_ids=set())
        alone = [generate_rows(model, adapter, recorder, [ids], 0, "cpu", NEW_TOKENS, eos_ids=set())[0] for ids in token_lists]
    finally:
        recorder.remove()
    longest = int(np.argmax(PROMPT_LENGTHS))  # no padding in its row: batched or not, the same state
    assert np.array_equal(leaky[longest]["experts"], alone[longest]["experts"])
    shorter = [row for row in range(len(token_lists)) if row != longest]
    assert any(not np.array_equal(leaky[row]["weights"], alone[row]["weights"]) for row in shorter)


@pytest.mark.parametrize("family", sorted(CASES))
def test_lookahead_is_the_later_router_on_the_earlier_residual(family):
    model = build(family)
    _, _, expected_layers, top_k, _ = CASES[family]
    residuals = {}
    handles = [norm_and_router(model, family, index)[0].register_forward_pre_hook(
        lambda _m, args, index=index: residuals.__setitem__(index, args[0])) for index in expected_layers]
    token_lists = prompts()
    try:
        _, plain, _ = recorded(model, CaptureParams(), "forward", token_lists)
        _, ahead, _ = recorded(model, CaptureParams(lookahead=2), "forward", token_lists)
    finally:
        for handle in handles:
            handle.remove()
    width = max(PROMPT_LENGTHS)
    for row, ids in enumerate(token_lists):
        assert np.array_equal(plain[row]["experts"], ahead[row]["experts"]), "look-ahead disturbed the recorded routing"
        assert ahead[row]["lookahead_experts"].shape == (len(ids), len(expected_layers), 2, top_k)
    for position, index in enumerate(expected_layers):
        for h in (1, 2):
            got = np.concatenate([r["lookahead_experts"][:, position, h - 1] for r in ahead])  # (real tokens, k)
            if position + h >= len(expected_layers):
                assert (got == -1).all(), f"{family} layer {index} h={h}: past the last MoE layer"
                continue
            norm, router = norm_and_router(model, family, expected_layers[position + h])
            with torch.no_grad():
                weights, chosen = router_choice(router, family, norm(residuals[index]).reshape(-1, residuals[index].shape[-1]))
            real = [row * width + t for row, ids in enumerate(token_lists) for t in range(len(ids))]
            # best-first by the router's weights, ties to the lower expert id
            want = [[e for _, e in sorted(zip(weights[t].tolist(), chosen[t].tolist()), key=lambda p: (-p[0], p[1]))] for t in real]
            assert got.tolist() == want, f"{family} layer {index} h={h}"


def test_collect_loads_a_multimodal_checkpoint_with_its_text_decoder(tmp_path):
    """load_model picks the Auto class of a multimodal checkpoint (Qwen3-VL-MoE is no causal LM) and routes as the
    saved model; Qwen3-Omni-MoE loads without its speech talker, which a text collection never runs."""
    model = build("qwen3_vl_moe")
    model.save_pretrained(tmp_path / "vl")
    loaded = load_model(str(tmp_path / "vl"), "float32", "cpu")
    assert type(loaded) is type(model)
    token_lists = prompts()
    _, want, _ = recorded(model, CaptureParams(), "forward", token_lists)
    _, got, _ = recorded(loaded, CaptureParams(), "forward", token_lists)
    for row in range(len(token_lists)):
        assert np.array_equal(got[row]["experts"], want[row]["experts"]) and np.array_equal(got[row]["weights"], want[row]["weights"])

    torch.manual_seed(0)
    config = transformers.Qwen3OmniMoeConfig(thinker_config=_qwen3_omni_thinker(), **_qwen3_omni_speech(), enable_audio_output=True)
    speaking = transformers.Qwen3OmniMoeForConditionalGeneration(config)
    assert hasattr(speaking, "talker")
    speaking.save_pretrained(tmp_path / "omni")
    loaded = load_model(str(tmp_path / "omni"), "float32", "cpu")
    assert not hasattr(loaded, "talker") and not hasattr(loaded, "code2wav")
    assert [layer.layer_index for layer in adapter_for(loaded).layers] == CASES["qwen3_omni_moe"][2]


def test_collect_loads_a_llama4_checkpoint_as_its_text_decoder(tmp_path):
    """load_model builds a multimodal Llama 4 checkpoint as the text-only Llama4ForCausalLM (llama4_text, the first
    Auto class that maps its config), whose routing is that of the saved wrapper's text decoder."""
    model = build("llama4")
    model.save_pretrained(tmp_path / "llama4")
    loaded = load_model(str(tmp_path / "llama4"), "float32", "cpu")
    assert type(loaded) is transformers.Llama4ForCausalLM and adapter_for(loaded).family == "llama4_text"
    token_lists = prompts()
    _, want, _ = recorded(model, CaptureParams(), "generate", token_lists)
    _, got, _ = recorded(loaded, CaptureParams(), "generate", token_lists)
    for row in range(len(token_lists)):
        assert np.array_equal(got[row]["token_id"], want[row]["token_id"])
        assert np.array_equal(got[row]["experts"], want[row]["experts"]) and np.array_equal(got[row]["weights"], want[row]["weights"])


def test_collect_generate_of_a_recurrent_model_routes_each_sequence_as_alone(tmp_path):
    """The collect stage end to end on a saved tiny Jamba (tiny-moe's tokenizer, batches of 2): every sequence's
    prompt and decoded rows are what generating that sequence alone records."""
    torch.manual_seed(0)
    config = CASES["jamba"][0]()
    config.vocab_size = 2048  # tiny-moe's tokenizer
    model = spread_routers(transformers.JambaForCausalLM(config).eval())
    checkpoint = tmp_path / "jamba"
    model.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / name, checkpoint / name)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    words = "the routing of every token at every layer is recorded as the experts module receives it".split()
    (inputs / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(words[:n])}) + "\n" for n in (2, 4, 7, 10)))
    # batches of 2 documents of different lengths: right padding behind the shorter one of each
    params = tiny_params("collect", model=str(checkpoint), sources=[{"name": "docs", "path": str(inputs / "docs.jsonl")}],
                         num_sequences=4, seq_len=32, min_tokens=3, chunks_per_document=1, batch_size=2, sequences_per_chunk=4,
                         mode="generate", max_new_tokens=NEW_TOKENS)
    collect(params, tmp_path / "traces", inputs=inputs)
    meta = traces.TraceMeta.read(tmp_path / "traces")
    assert meta.family == "jamba" and meta.moe_layers == CASES["jamba"][2]
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "traces").glob("chunk-*.parquet")))
    prompt_lengths = pc.value_counts(table.filter(pc.invert(table["generated"]))["sequence_id"]).field("counts").to_pylist()
    assert len(set(prompt_lengths)) == 4 and pc.sum(table["generated"]).as_py() > 0
    model = load_model(str(checkpoint), "float32", "cpu")  # as collect loaded it
    adapter = adapter_for(model)
    recorder = RoutingRecorder(adapter, CaptureParams(), projection_seed=0)
    try:
        for sequence_id in pc.unique(table["sequence_id"]).to_pylist():
            rows = table.filter(pc.equal(table["sequence_id"], sequence_id))
            prompt = rows.filter(pc.invert(rows["generated"]))["token_id"].to_pylist()
            (alone,) = generate_rows(model, adapter, recorder, [prompt], 1, "cpu", NEW_TOKENS, eos_token_ids(model))
            assert rows["token_id"].to_pylist() == alone["token_id"].tolist()
            experts = traces.column_to_numpy(rows["experts"], (len(meta.moe_layers), meta.top_k))
            weights = traces.column_to_numpy(rows["weights"], (len(meta.moe_layers), meta.top_k))
            assert np.array_equal(experts, alone["experts"]), f"{sequence_id}: batched collection changed the routing"
            assert np.array_equal(weights, alone["weights"]), f"{sequence_id}: batched collection changed the gate weights"
    finally:
        recorder.remove()
