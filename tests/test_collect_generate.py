"""Generate mode on every decoder-only family (tiny random models of tests/test_routing_families.py).

For a right-padded batch of prompts of different lengths: the prompt rows equal forward mode's, and the routing
recorded one decode step at a time equals that of one plain forward over prompt + generated tokens. (gpt_oss's
sliding window is shorter than prompt + generation here, so it decodes one sequence at a time: its prompt weights
match the batched forward up to float rounding.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_prefetch.errors import PipelineError
from moe_prefetch.collect.generation import check_generate, forward_rows, generate_rows
from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.routing import adapter_for
from moe_prefetch.routing.recorder import RoutingRecorder
from test_collect import one_thread  # noqa: F401  (autouse fixture: one torch thread)
from test_routing_families import CASES, build

DECODER_ONLY = [family for family in CASES if family != "switch_transformers"]


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, 64, (n,), generator=generator).tolist() for n in (9, 5, 7)]


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decode_routing_equals_a_plain_forward(family, prompts):
    model = build(family)
    adapter = adapter_for(model)
    recorder = RoutingRecorder(adapter, CaptureParams(lookahead=1), projection_seed=0)
    try:
        generated = generate_rows(model, adapter, recorder, prompts, 0, "cpu", 6, eos_ids=set())
        forward = forward_rows(model, adapter, recorder, prompts, 0, "cpu")
        full = forward_rows(model, adapter, recorder, [rows["token_id"].tolist() for rows in generated], 0, "cpu")
    finally:
        recorder.remove()
    for prompt, gen, fwd, ref in zip(prompts, generated, forward, full):
        n = len(prompt)
        assert len(gen["position"]) == n + 6 and gen["generated"].tolist() == [False] * n + [True] * 6
        assert gen["position"].tolist() == list(range(n + 6))
        assert np.array_equal(gen["experts"][:n], fwd["experts"]) and np.array_equal(gen["lookahead_experts"][:n], fwd["lookahead_experts"])
        assert np.allclose(gen["weights"][:n], fwd["weights"], rtol=1e-5, atol=1e-6)
        if family != "gpt_oss":
            assert np.array_equal(gen["weights"][:n], fwd["weights"])
        assert np.array_equal(np.sort(gen["experts"], -1), np.sort(ref["experts"], -1))


def test_generate_mode_rejects_encoder_decoder():
    with pytest.raises(PipelineError, match="decoder-only"):
        check_generate(adapter_for(build("switch_transformers")))
