"""How many bytes a recorded token takes, and how many sequences a trace chunk may hold within collect.max_chunk_bytes.

A chunk's rows stay in host memory until the chunk is written (it is the unit of resume): at real width that is
the memory that matters. A Mixtral-8x7B token with full-width hidden states is 32 MoE layers x 4096 float16 = 262 KB,
so 256 sequences of 128 tokens would be 8.6 GB; collect.max_chunk_bytes caps it by shrinking the chunk.
"""

from __future__ import annotations

import math

import pyarrow as pa

from moe_prefetch import traces
from moe_prefetch.collect.config import CollectParams
from moe_prefetch.errors import PipelineError


def token_bytes(geometry: traces.TraceGeometry) -> int:
    """Bytes of one token's fixed-width columns as recorded (experts, weights, captures, position, token id, flag);
    the three id strings per row are not counted (tens of bytes, and shared by a sequence's rows in Parquet)."""
    total = 0
    for _, column in traces.TRACE_COLUMNS.items():
        if column.present(geometry.capture) and not pa.types.is_string(column.value_type):
            total += math.prod(column.shape(geometry)) * -(-column.value_type.bit_width // 8)  # a bool takes a byte in numpy
    return total


def tokens_per_sequence(params: CollectParams) -> int:
    """The most tokens one planned sequence can record: its prompt, plus max_new_tokens in generate mode."""
    return params.seq_len + (params.max_new_tokens if params.mode == "generate" else 0)


def chunk_sequences(params: CollectParams, bytes_per_token: int) -> int:
    """Sequences per chunk: collect.sequences_per_chunk, lowered to the largest multiple of collect.batch_size whose
    rows (at most tokens_per_sequence() tokens each) fit in collect.max_chunk_bytes."""
    sequence_bytes = tokens_per_sequence(params) * bytes_per_token
    fitting = params.max_chunk_bytes // sequence_bytes // params.batch_size * params.batch_size
    if fitting == 0:
        raise PipelineError(
            f"collect.max_chunk_bytes: {params.max_chunk_bytes} is less than one batch of rows ({params.batch_size} sequences x "
            f"{tokens_per_sequence(params)} tokens x {bytes_per_token} bytes = {params.batch_size * sequence_bytes}); "
            "raise it, or lower collect.batch_size or the captures")
    return min(params.sequences_per_chunk, fitting)
