"""The stale-gate look-ahead of every supported family equals a hand-run of the later router.

The residual stream entering MoE layer l is captured from the model structure (not from the adapter), put through
layer l+h's own MoE-input norm and router the way its MoE block calls them, and compared, best-first, with the
recorded look-ahead (tiny random models of tests/test_routing_families.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moe_prefetch.collect.config import CaptureParams
from test_routing_families import CASES, LENGTHS, build, run

POST_NORM = {"flex_olmo"}  # the MoE block reads the residual stream itself
PARALLEL = {"cohere2_moe"}  # attention and MoE read the same input_layernorm output


def moe_block_of(model: nn.Module, family: str, stack: str, index: int) -> nn.Module:
    """The MoE block of a layer, found from the model structure (not from the adapter)."""
    if family == "switch_transformers":
        return getattr(model, stack).block[index].layer[-1].mlp
    if family == "dbrx":
        return model.transformer.blocks[index].ffn
    layer = model.model.layers[index]
    return next(getattr(layer, name) for name in ("block_sparse_moe", "feed_forward", "mlp") if hasattr(layer, name))


def residual_site_of(model: nn.Module, family: str, stack: str, index: int) -> tuple[nn.Module, nn.Module]:
    """(module whose input is the residual stream, the map from it to the MoE input) of an MoE layer."""
    if family == "switch_transformers":
        norm = getattr(model, stack).block[index].layer[-1].layer_norm
    elif family == "dbrx":
        norm = model.transformer.blocks[index].norm_attn_norm.norm_2
    elif family in POST_NORM:
        return moe_block_of(model, family, stack, index), nn.Identity()
    else:
        layer = model.model.layers[index]
        norm = layer.input_layernorm if family in PARALLEL else layer.pre_mlp_layernorm if family == "afmoe" \
            else layer.post_attention_layernorm
    return norm, norm


def hand_route(model: nn.Module, family: str, key: tuple[str, int], normed: torch.Tensor, top_k: int):
    """(weights (T, k), experts (T, k)) that the MoE block at `key` would dispatch for input `normed` (T, D), computed
    by calling its router the way the block's forward does."""
    block = moe_block_of(model, family, *key)
    if family == "dbrx":
        return block.route_tokens_to_experts(block.router(normed))
    if family == "llama4_text":
        scores, logits = block.router(normed)
        chosen = torch.topk(logits, top_k, dim=-1).indices
        return scores.gather(-1, chosen), chosen
    router = block.router if hasattr(block, "router") else block.gate
    if family == "minimax_m2":
        _, weights, chosen = router(normed, block.e_score_correction_bias)
    elif family == "afmoe":  # its router reads (B, S, D)
        _, weights, chosen = router(normed[None], block.expert_bias)
    else:
        _, weights, chosen = router(normed)
    return weights, chosen


@pytest.mark.parametrize("family", sorted(CASES))
def test_lookahead(family):
    model = build(family)
    _, plain, _ = run(model, CaptureParams(), experts_hooks=False)
    residuals = {}
    _, _, expected_layers, top_k = CASES[family]
    keys = [k if isinstance(k, tuple) else ("decoder", k) for k in expected_layers]
    handles = [residual_site_of(model, family, *key)[0].register_forward_pre_hook(
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
                normed = residual_site_of(model, family, *later)[1](residuals[(stack, index)])
                if family == "switch_transformers":  # routes whole sequences (capacity is per sequence)
                    mask = moe_block_of(model, family, *later).router(normed)[0].reshape(B * S, -1)
                    want = [set(torch.nonzero(row).flatten().tolist()) or {-1} for row in mask]
                else:  # the model routes a flattened (T, D) input; best-first by its weights, ties to the lower id
                    weights, chosen = hand_route(model, family, later, normed.reshape(B * S, -1), top_k)
                    # (PhiMoE's ties keep the router's selection order, which sorted() keeps when the key is the weight alone)
                    tie_break = (lambda p: -p[0]) if family == "phimoe" else (lambda p: (-p[0], p[1]))
                    order = [sorted(zip(row_w, row_e), key=tie_break) for row_w, row_e in zip(weights.tolist(), chosen.tolist())]
                    order = [row + [(0.0, -1)] * (top_k - len(row)) for row in order]  # a narrower later layer pads with -1
                    assert got.reshape(B * S, top_k).tolist() == [[e for _, e in row] for row in order], f"{family} {stack}/{index} h={h} order"
                    want = [set(row.tolist()) | ({-1} if len(row) < top_k else set()) for row in chosen]
            assert [set(row) for row in got.reshape(B * S, top_k).tolist()] == want, f"{family} {stack}/{index} h={h}"
