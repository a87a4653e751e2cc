"""Generate mode on every decoder-only family (tiny random models of tests/test_routing_families.py).

For a right-padded batch of prompts of different lengths: the prompt rows equal forward mode's, and the routing
recorded one decode step at a time equals that of one plain forward over prompt + generated tokens. (gpt_oss's
sliding window is shorter than prompt + generation here, so it decodes one sequence at a time: its prompt weights
match the batched forward up to float rounding.) In float32 and bfloat16, every recorded token -- the prefill's,
then each decode step's -- is what the experts modules received in that call (a forward pre-hook on each).
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
from experts_received import ExpertsCalls, assert_same_routing
from test_routing_families import CASES, build

DECODER_ONLY = [family for family in CASES if family != "switch_transformers"]
# sliding window (4) shorter than prompt + generation: generate_rows decodes these one sequence at a time
ONE_AT_A_TIME = {"gpt_oss", "cohere2_moe"}
NEW_TOKENS = 4


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
        # ONE_AT_A_TIME families prefill each prompt alone while the forward batches all three: another GEMM shape,
        # so their weights may differ by an ulp on some CPUs (the allclose above); the others must match exactly
        if family not in ONE_AT_A_TIME:
            assert np.array_equal(gen["weights"][:n], fwd["weights"])
        assert np.array_equal(np.sort(gen["experts"], -1), np.sort(ref["experts"], -1))


def received_per_row(calls: list[list[dict]], lengths: list[int], one_at_a_time: bool) -> list[list[dict]]:
    """Per sequence, the routing its prompt tokens then its decoded tokens got, from one experts module's calls in
    order: a padded prefill over B * W tokens then NEW_TOKENS steps of B tokens, or (one at a time) per sequence its
    prefill then NEW_TOKENS single-token steps. Checks that the calls are exactly those."""
    if one_at_a_time:
        assert len(calls) == len(lengths) * (1 + NEW_TOKENS)
        per_sequence = [calls[i * (1 + NEW_TOKENS) : (i + 1) * (1 + NEW_TOKENS)] for i in range(len(lengths))]
        assert [[len(call) for call in sequence] for sequence in per_sequence] == [[n] + [1] * NEW_TOKENS for n in lengths]
        return [prefill + [step[0] for step in steps] for prefill, *steps in per_sequence]
    width = max(lengths)
    prefill, *steps = calls
    assert [len(call) for call in calls] == [len(lengths) * width] + [len(lengths)] * NEW_TOKENS
    return [prefill[row * width : row * width + n] + [step[row] for step in steps] for row, n in enumerate(lengths)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", DECODER_ONLY)
def test_generate_routing_is_what_the_experts_received(family, dtype, prompts):
    model = build(family, dtype)
    adapter = adapter_for(model)
    recorder = RoutingRecorder(adapter, CaptureParams(), projection_seed=0)
    calls = ExpertsCalls(model)
    try:
        generated = generate_rows(model, adapter, recorder, prompts, 0, "cpu", NEW_TOKENS, eos_ids=set())
    finally:
        recorder.remove()
        calls.remove()
    keys = [(layer.stack, layer.layer_index) for layer in adapter.layers]
    assert sorted(calls.calls) == sorted(keys), "an experts module ran that the adapter does not know, or vice versa"
    lengths = [len(prompt) for prompt in prompts]
    for position, key in enumerate(keys):
        received = received_per_row(calls.calls[key], lengths, family in ONE_AT_A_TIME)
        for row, rows in enumerate(generated):
            assert rows["generated"].tolist() == [False] * lengths[row] + [True] * NEW_TOKENS
            assert_same_routing(rows["experts"][:, position], rows["weights"][:, position], received[row],
                                f"{family}/{dtype}/{key}/row {row}")
    decoded = {tuple(sorted(e)) for rows in generated for e in rows["experts"][rows["generated"]].reshape(-1, adapter.top_k).tolist()}
    assert len(decoded) > 2, "degenerate decode routing: the test would not notice a wrong mapping"


def test_generate_mode_rejects_encoder_decoder():
    with pytest.raises(PipelineError, match="decoder-only"):
        check_generate(adapter_for(build("switch_transformers")))
