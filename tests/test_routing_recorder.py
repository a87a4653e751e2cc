"""RoutingRecorder beyond the per-family routing checks of test_routing_families.py: one-line errors when the
adapter does not match the model's forward, and recording a model that accelerate dispatched with disk offload."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate import dispatch_model
from conftest import assert_error
from test_routing_families import batch, build, run

from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.routing import adapter_for
from moe_prefetch.routing.recorder import RoutingRecorder


def test_a_router_the_forward_never_calls_is_a_one_line_error():
    model = copy.deepcopy(build("mixtral"))
    unhooked = copy.deepcopy(model.model.layers[1].mlp.gate)
    recorder = RoutingRecorder(adapter_for(model), CaptureParams(), projection_seed=0)
    model.model.layers[1].mlp.gate = unhooked  # the forward calls a router the adapter did not find (custom modeling code)
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert_error(lambda: recorder.take(*ids.shape), "collect.model: no routing recorded for MoE decoder layer 1 in a forward pass",
                 "mixtral adapter")


def test_a_router_called_twice_in_one_forward_is_a_one_line_error():
    model = build("qwen3_moe")  # MoE layers 1 and 3 (decoder_sparse_step 2)
    recorder = RoutingRecorder(adapter_for(model), CaptureParams(), projection_seed=0)
    ids, mask = batch()

    def forward_calling_each_router_twice():
        with torch.no_grad():
            for _ in range(2):  # as a model that routes every token twice would, within one recorded forward
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    try:
        assert_error(forward_calling_each_router_twice, "collect.model: the router of MoE decoder layer 1 ran twice in one forward pass",
                     "qwen3_moe adapter")
    finally:
        recorder.remove()


def test_lookahead_without_a_pre_moe_norm_is_a_one_line_error():
    adapter = adapter_for(build("olmoe"))
    adapter.layers[1].pre_norm = None  # a family whose MoE input norm the adapter cannot find
    assert_error(lambda: RoutingRecorder(adapter, CaptureParams(lookahead=2), projection_seed=0),
                 "collect.capture.lookahead: 2", "olmoe decoder layer 1 has none", "use lookahead 0")
    run(build("olmoe"), CaptureParams())  # the failed recorder left no hook behind (one would see its router run twice)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_a_model_dispatched_with_disk_offload_records_as_on_one_device(family, tmp_path):
    """Every decoder layer but the first offloaded to disk (accelerate keeps their weights on `meta` and loads them per call), the
    rest on the CPU: every recorded array, the look-ahead included, equals the undispatched model's."""
    model = copy.deepcopy(build(family))
    capture = CaptureParams(router_probs=True, hidden_states=True, lookahead=1)
    _, plain, _ = run(model, capture, experts_hooks=False)
    device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
    device_map |= {f"model.layers.{index}": "disk" if index else "cpu" for index in range(len(model.model.layers))}
    device_map["lm_head"] = "cpu"
    dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=tmp_path)
    assert model.model.layers[1].post_attention_layernorm.weight.device.type == "meta"  # the offloaded norm look-ahead calls
    _, dispatched, _ = run(model, capture, experts_hooks=False)
    assert sorted(dispatched) == sorted(plain) == ["experts", "hidden_states", "lookahead_experts", "router_probs", "weights"]
    for name, values in plain.items():
        assert np.array_equal(dispatched[name], values), name
