"""What collecting a real model's routing costs: disk, host RAM, GPU memory and time, computed from the model's
geometry and the collect params. The README section "Pointing it at a real model on a GPU" is this module's table
(scripts/update_readme.py), so the figures follow the code (footprint.token_bytes, the chunk bound) and the params.

The models' numbers are from their public configs and model cards (MODELS cites each). Hardware assumptions are
named constants below: an NVIDIA A100-SXM4-80GB, bfloat16 weights, and a model FLOPs utilisation typical of
prefill-style batched forwards. Estimates, not measurements: no GPU was available where this was written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moe_prefetch import traces
from moe_prefetch.collect.config import CaptureParams, CollectParams
from moe_prefetch.collect.footprint import chunk_sequences, token_bytes, tokens_per_sequence

GPU_NAME = "A100-SXM4-80GB"
GPU_MEMORY_BYTES = 80e9
GPU_USABLE = 0.9  # share of GPU memory device_map="auto" fills with weights (the rest: CUDA context, activations)
GPU_BF16_FLOPS = 312e12  # dense bfloat16 tensor-core peak (NVIDIA A100 datasheet)
GPU_HBM_BYTES_PER_S = 2.039e12  # HBM2e bandwidth (NVIDIA A100 datasheet)
MFU = 0.35  # achieved share of peak in a batched forward of 128-token sequences (an assumption, not measured)
PCIE_BYTES_PER_S = 25e9  # effective host-to-GPU copy rate of PCIe 4.0 x16, for CPU-offloaded weights
WEIGHT_BYTES = 2  # bfloat16 checkpoint and weights
PROCESS_BYTES = 3e9  # host RSS of the Python process with torch, transformers and a CUDA context (an assumption)
CHUNK_COPIES = 3  # a chunk's rows, their concatenation and the Arrow table exist together while it is written
RICH_CAPTURE = CaptureParams(router_probs=True, hidden_states=True, hidden_dim=256, lookahead=3)


@dataclass(frozen=True)
class ModelGeometry:
    """The numbers of one MoE model that set the cost of collecting its routing."""

    name: str  # hub id
    moe_layers: int  # layers with a routed MoE block
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    total_params: float  # all parameters (the checkpoint's size in weights)
    active_params: float  # parameters used per token (the forward's FLOPs: 2 per parameter)
    gated: bool  # the hub asks for accepting the license before download (a token is needed)
    source: str


MODELS = (
    ModelGeometry("mistralai/Mixtral-8x7B-v0.1", 32, 8, 2, 4096, 46.7e9, 12.9e9, True,
                  "config.json (num_hidden_layers 32, num_local_experts 8, num_experts_per_tok 2, hidden_size 4096); "
                  "46.7B total / 12.9B active parameters: mistral.ai/news/mixtral-of-experts"),
    ModelGeometry("Qwen/Qwen3-30B-A3B", 48, 128, 8, 2048, 30.5e9, 3.3e9, False,
                  "config.json (num_hidden_layers 48, decoder_sparse_step 1, num_experts 128, num_experts_per_tok 8, "
                  "hidden_size 2048); 30.5B total / 3.3B activated: model card"),
    ModelGeometry("deepseek-ai/DeepSeek-V2-Lite", 26, 64, 6, 2048, 15.7e9, 2.4e9, False,
                  "config.json (num_hidden_layers 27, first_k_dense_replace 1: 26 MoE layers; n_routed_experts 64, "
                  "num_experts_per_tok 6, 2 shared experts, hidden_size 2048); 15.7B total / 2.4B active: model card"),
)


@dataclass(frozen=True)
class Estimate:
    """The cost of one collect run (collect params) of one model with one capture."""

    token_bytes: int  # recorded bytes per token (fixed-width columns)
    tokens: int  # at most: sequences x tokens per sequence
    trace_bytes: float  # data/traces, uncompressed upper bound (Parquet compresses the weights somewhat)
    checkpoint_bytes: float  # the download in the Hugging Face cache
    gpu_bytes: float  # weights, plus the routing the recorder keeps on the device for one batch
    gpus: int  # A100-80GB GPUs for device_map="auto" to hold every weight
    host_bytes: float  # the process, plus one chunk of rows CHUNK_COPIES times
    seconds: float  # the forwards' time: a GPU's, also over several (device_map="auto" runs the layers one after another)


def run_tokens(params: CollectParams) -> int:
    """The most tokens a run records: every source's num_sequences sequences at their longest."""
    return params.num_sequences * len(params.sources) * tokens_per_sequence(params)


def estimate(model: ModelGeometry, params: CollectParams) -> Estimate:
    """Disk, memory and time of collecting `model`'s routing with `params` (module docstring for the assumptions)."""
    capture = traces.Capture(router_probs=params.capture.router_probs,
                             hidden_dim=(params.capture.hidden_dim or model.hidden_size) if params.capture.hidden_states else 0,
                             lookahead=params.capture.lookahead)
    per_token = token_bytes(traces.TraceGeometry(model.moe_layers, model.top_k, model.num_experts, capture))
    tokens = run_tokens(params)
    batch_tokens = params.batch_size * tokens_per_sequence(params)
    # until take(): per MoE layer the router's float32 logits, the stored hidden state, the pre-norm residual (look-ahead)
    recorder_bytes = batch_tokens * model.moe_layers * (4 * model.num_experts + 2 * capture.hidden_dim
                                                        + (2 * model.hidden_size if capture.lookahead else 0))
    weights = model.total_params * WEIGHT_BYTES
    gpus = math.ceil((weights + recorder_bytes) / (GPU_MEMORY_BYTES * GPU_USABLE))
    chunk_rows = chunk_sequences(params, per_token) * tokens_per_sequence(params) * per_token
    compute = 2 * model.active_params * batch_tokens / (GPU_BF16_FLOPS * MFU)
    weight_reads = weights / GPU_HBM_BYTES_PER_S  # a batch of thousands of tokens reaches every expert
    batches = math.ceil(tokens / batch_tokens)
    return Estimate(per_token, tokens, tokens * per_token, weights, weights + recorder_bytes, gpus,
                    PROCESS_BYTES + CHUNK_COPIES * chunk_rows, batches * max(compute, weight_reads))


def offload_seconds_per_batch(model: ModelGeometry, gpu_bytes: float) -> float:
    """Extra time per batch when the weights that do not fit `gpu_bytes` of GPU memory are offloaded to CPU RAM:
    accelerate copies them to the GPU on every forward."""
    return max(0.0, model.total_params * WEIGHT_BYTES - gpu_bytes * GPU_USABLE) / PCIE_BYTES_PER_S


def capture_label(capture: CaptureParams) -> str:
    """How the table names a capture: routing, plus each optional capture it turns on."""
    parts = ["routing"]
    if capture.router_probs:
        parts.append("probs")
    if capture.hidden_states:
        parts.append(f"hidden {capture.hidden_dim or 'full width'}")
    if capture.lookahead:
        parts.append(f"lookahead {capture.lookahead}")
    return " + ".join(parts)


def _size(value: float) -> str:
    return f"{value / 1e9:,.1f} GB" if value >= 1e9 else f"{value / 1e6:,.0f} MB"


def readme_table(params: CollectParams) -> str:
    """The README's estimate table for MODELS at `params`, routing only and with RICH_CAPTURE."""
    rows = ["| model | capture | bytes/token | traces | checkpoint | GPU memory | A100-80GB | host RAM | time | "
            "+ per batch on one 80 GB GPU, rest CPU-offloaded |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for capture in [params.capture] + ([RICH_CAPTURE] if params.capture != RICH_CAPTURE else []):  # the params', then a rich one
            label = capture_label(capture)
            cost = estimate(model, replace(params, capture=capture))
            offload = offload_seconds_per_batch(model, GPU_MEMORY_BYTES)
            rows.append(f"| {model.name}{' (gated)' if model.gated else ''} | {label} | {cost.token_bytes:,} | {_size(cost.trace_bytes)} | "
                        f"{_size(cost.checkpoint_bytes)} | {_size(cost.gpu_bytes)} | {cost.gpus} | {_size(cost.host_bytes)} | "
                        f"{cost.seconds / 60:,.1f} min | {f'{offload:.1f} s' if offload else 'fits'} |")
    tokens = run_tokens(params)
    sources = "; ".join(f"{m.name}: {m.source}" for m in MODELS)
    return "\n".join([
        f"Estimated by `moe_prefetch/gpu_estimates.py` for params.yaml's `collect` section ({params.num_sequences} sequences x "
        f"{len(params.sources)} sources x {tokens_per_sequence(params)} tokens = at most {tokens:,} tokens, batch {params.batch_size}; "
        "every figure but the checkpoint scales linearly with tokens), bfloat16, on an "
        f"{GPU_NAME} ({GPU_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 at an assumed {MFU:.0%} utilisation, "
        f"{GPU_HBM_BYTES_PER_S / 1e12:.2f} TB/s HBM; a batch takes the longer of 2 x active parameters x its tokens in FLOPs "
        f"and one read of every weight). Traces: the uncompressed fixed-width columns (the shard stage writes them once more). "
        f"GPU memory: the weights plus the routing the recorder keeps for one batch; A100-80GB: GPUs `device_map=\"auto\"` "
        f"needs at {GPU_USABLE:.0%} filled. Host RAM: {PROCESS_BYTES / 1e9:.0f} GB of process (assumed) plus one chunk of rows "
        f"{CHUNK_COPIES} times (bounded by `collect.max_chunk_bytes`). Offloaded: the weights beyond one GPU cross PCIe 4.0 "
        f"(~{PCIE_BYTES_PER_S / 1e9:.0f} GB/s) on every batch.",
        "",
        *rows,
        "",
        f"Geometry sources (Hugging Face `config.json` and model cards): {sources}.",
    ])
