"""Two routing defects of issue #14, each with a test that failed before its fix: PhiMoE's slot order where
sparsemixer's weights tie (defect 4), and GPT-OSS with MXFP4 kernels, whose MLP never calls router.forward (defect 5).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from moe_prefetch.collect.config import CaptureParams
from experts_received import assert_same_routing
from test_routing_families import build, run

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_phimoe_slot_zero_is_the_routers_argmax(dtype):
    """sparsemixer picks the argmax first and its two multipliers often tie at 1.0: where they tie, slot 0 must be
    the argmax (breaking the tie by expert id made it so about half the time)."""
    model = build("phimoe", dtype)
    logits = {}
    handles = [layer.mlp.router.register_forward_hook(lambda _m, _a, out, i=i: logits.__setitem__(i, out[0]))
               for i, layer in enumerate(model.model.layers)]
    try:
        _, arrays, _ = run(model, CaptureParams(), experts_hooks=False)
    finally:
        for handle in handles:
            handle.remove()
    ties = 0
    for position in range(len(model.model.layers)):
        argmax = logits[position].float().argmax(-1).reshape(arrays["experts"].shape[:2]).numpy()  # (B, S)
        weights = arrays["weights"][:, :, position]  # (B, S, 2)
        tied = weights[..., 0] == weights[..., 1]  # elsewhere best-first by weight decides (tested above)
        assert np.array_equal(arrays["experts"][:, :, position, 0][tied], argmax[tied]), f"layer {position}: slot 0 is not the argmax"
        ties += int(tied.sum())
    assert ties > 8, "few tied weights: the test would not notice ties broken by expert id"


class _KernelExperts(nn.Module):
    """Stands in for Mxfp4GptOssExperts: `forward_routed` gets the triton routing kernel's output (here the ids and
    weights the fake kernel chose) and runs the model's own experts on it; `received` keeps what it got."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.dense = experts
        self.received: list[list[dict[int, float]]] = []

    def forward_routed(self, hidden, routing_data, gather_idx, scatter_idx):
        ids, weights = routing_data
        self.received.append([{int(e): float(w) for e, w in zip(ids[t], weights[t].float())} for t in range(ids.shape[0])])
        return self.dense(hidden, ids, weights)


def _fake_triton_routing(logits, top_k):
    """The triton kernel's routing rule: top-k on the logits, softmax over the k."""
    top, ids = torch.topk(logits, top_k, dim=-1)
    return (ids, torch.softmax(top.float(), dim=-1).to(logits.dtype)), None, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpt_oss_with_mxfp4_kernels_is_recorded_from_the_kernel_path(dtype, monkeypatch):
    """transformers' Mxfp4GptOssMLP never calls router.forward (it routes with a triton kernel, absent here and
    simulated): collection must still record what the experts received, and the look-ahead still works."""
    from transformers.integrations import mxfp4

    monkeypatch.setattr(mxfp4, "triton_kernels_hub", SimpleNamespace(routing=SimpleNamespace(routing=_fake_triton_routing)), raising=False)
    model = copy.deepcopy(build("gpt_oss", dtype))
    for layer in model.model.layers:
        layer.mlp = mxfp4.Mxfp4GptOssMLP(layer.mlp.router, _KernelExperts(layer.mlp.experts))
    adapter, arrays, _ = run(model, CaptureParams(router_probs=True, lookahead=1), experts_hooks=False)
    _, reference, _ = run(build("gpt_oss", dtype), CaptureParams(router_probs=True, lookahead=1), experts_hooks=False)
    for position, layer in enumerate(model.model.layers):
        (received,) = layer.mlp.experts.received
        experts = arrays["experts"][:, :, position].reshape(-1, 2)
        assert_same_routing(experts, arrays["weights"][:, :, position].reshape(-1, 2), received, f"mxfp4 layer {position}")
    # the kernel path routes as the plain model does
    assert np.array_equal(arrays["experts"], reference["experts"])
    assert np.array_equal(arrays["lookahead_experts"], reference["lookahead_experts"])
    np.testing.assert_allclose(arrays["router_probs"].astype(np.float32), reference["router_probs"].astype(np.float32), atol=1e-3)
