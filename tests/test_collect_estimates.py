"""The README's cost estimates for real models: bytes per token from the trace schema, and disk, GPU memory, host
RAM and time from a model's geometry and the collect params, checked against hand computations."""

from __future__ import annotations

import pytest
from conftest import tiny_params

from moe_prefetch import gpu_estimates as estimates
from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.gpu_estimates import RICH_CAPTURE, ModelGeometry, estimate

MIXTRAL = next(m for m in estimates.MODELS if m.name == "mistralai/Mixtral-8x7B-v0.1")


def test_mixtral_bytes_per_token_by_hand():
    # 32 MoE layers x top-2: int16 ids 128 + float32 weights 256, position 4, token id 4, flag 1
    params = tiny_params("collect", sources=["python-docs"], capture={})
    assert estimate(MIXTRAL, params).token_bytes == 32 * 2 * 2 + 32 * 2 * 4 + 9 == 393
    # + float16 probs 32 x 8, float16 hidden states 32 x 256, int16 look-ahead 32 x 3 x 2
    rich = tiny_params("collect", sources=["python-docs"], capture=vars(RICH_CAPTURE))
    assert estimate(MIXTRAL, rich).token_bytes == 393 + 32 * 8 * 2 + 32 * 256 * 2 + 32 * 3 * 2 * 2 == 17_673


def test_a_small_model_by_hand(monkeypatch):
    monkeypatch.setattr(estimates, "MFU", 0.5)
    model = ModelGeometry("x/y", moe_layers=2, num_experts=4, top_k=1, hidden_size=8, total_params=100e9, active_params=10e9,
                          gated=False, source="-")
    params = tiny_params("collect", sources=["a", "b"], num_sequences=10, seq_len=32, batch_size=4, sequences_per_chunk=8,
                         capture=vars(CaptureParams(hidden_states=True, hidden_dim=0)))
    cost = estimate(model, params)
    assert cost.token_bytes == 2 * 1 * 2 + 2 * 1 * 4 + 2 * 8 * 2 + 9 == 53  # hidden_dim 0: the model's full width, 8
    assert cost.tokens == 10 * 2 * 32 and cost.trace_bytes == 640 * 53
    recorder = 4 * 32 * 2 * (4 * 4 + 2 * 8)  # a batch's tokens x layers x (float32 logits + float16 hidden state)
    assert cost.gpu_bytes == 200e9 + recorder and cost.gpus == 3  # 200 GB of bf16 weights over 72 GB per GPU
    assert cost.host_bytes == estimates.PROCESS_BYTES + 3 * 8 * 32 * 53  # one chunk of 8 sequences, three copies
    compute = 2 * 10e9 * 128 / (312e12 * 0.5)  # 16 ms per batch of 128 tokens
    weight_reads = 200e9 / 2.039e12  # 98 ms: reading every weight once dominates at this batch
    assert compute < weight_reads and cost.seconds == pytest.approx(5 * weight_reads)  # 640 tokens in batches of 4 x 32


def test_offload_copies_what_one_gpu_cannot_hold():
    assert estimates.offload_seconds_per_batch(MIXTRAL, 80e9) == pytest.approx((46.7e9 * 2 - 72e9) / 25e9)
    assert estimates.offload_seconds_per_batch(MIXTRAL, 200e9) == 0


def test_the_readme_table_has_a_row_per_model_and_capture():
    table = estimates.readme_table(tiny_params("collect", capture={}))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[1] for row in rows] == ["routing", "routing + probs + hidden 256 + lookahead 3"] * 3
    assert "| mistralai/Mixtral-8x7B-v0.1 (gated) | routing | 393 |" in table
