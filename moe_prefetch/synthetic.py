"""Synthetic trace sets for tests and benchmarks: random routing written as the shard stage writes it.

Documents alternate between two domains. A document is 1..chunks_per_document sequences of seq_len tokens (drawn
per document) whose last one has min_tokens..seq_len tokens, as a document's end does in collect's plan;
chunks_per_document = 1 with min_tokens = seq_len gives one full sequence per document. Every token routes to k
distinct experts per MoE layer, best-first, with gate weights sorted descending and summing to 1. The routing is
learnable: with probability FOLLOW a token's top-1 expert at MoE layer l is a fixed per-layer permutation of its
top-1 at layer l - 1 (else uniform), so earlier layers predict later ones. With `chain` (a
moe_prefetch.synthetic_chain.SetChain) the routing is that chain's instead, whose Bayes-optimal prediction is known
exactly. The trace chunks are built by collect's chunk_table and cut into shards by the shard stage's writer, so the files are in the pipeline's own format.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from moe_prefetch import traces
from moe_prefetch.collect.chunks import ChunkSequence, chunk_table
from moe_prefetch.sharding import write_shard_files
from moe_prefetch.synthetic_chain import SetChain

DOMAINS = ("alpha", "beta")
FOLLOW = 0.6  # chance that a token's top-1 expert follows from the previous layer's
STALE_GATE_HIT = 0.7  # chance that the synthetic stale gate's top-k at (l, h) is the token's true set at layer l + h


def plan(num_tokens: int, seq_len: int, chunks_per_document: int, min_tokens: int,
         rng: np.random.Generator) -> tuple[list[ChunkSequence], list[int]]:
    """Sequences and their lengths: whole documents until they hold >= num_tokens tokens."""
    sequences, lengths, total, document = [], [], 0, 0
    while total < num_tokens:
        domain = DOMAINS[document % len(DOMAINS)]
        chunks = int(rng.integers(1, chunks_per_document + 1))
        for chunk in range(chunks):
            sequences.append(ChunkSequence(f"{domain}/{document}/{chunk}", f"{domain}/doc{document:05d}", domain))
            lengths.append(seq_len if chunk < chunks - 1 else int(rng.integers(min_tokens, seq_len + 1)))
            total += lengths[-1]
        document += 1
    return sequences, lengths


def routing(num_tokens: int, layer_maps: np.ndarray, top_k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """experts (N, L, k) int16 and weights (N, L, k) float32 of N tokens; layer_maps (L, E): the per-layer
    permutations a followed top-1 expert goes through."""
    num_layers, num_experts = layer_maps.shape
    top1 = np.empty((num_tokens, num_layers), dtype=np.int64)
    top1[:, 0] = rng.integers(num_experts, size=num_tokens)
    for layer in range(1, num_layers):
        follows = rng.random(num_tokens) < FOLLOW
        top1[:, layer] = np.where(follows, layer_maps[layer][top1[:, layer - 1]], rng.integers(num_experts, size=num_tokens))
    # the other k-1 experts: increasing offsets from top-1 that sum to < E, so all k are distinct
    offsets = np.cumsum(rng.integers(1, num_experts // top_k + 1, (num_tokens, num_layers, top_k - 1)), axis=2)
    experts = np.concatenate([top1[..., None], (top1[..., None] + offsets) % num_experts], axis=2).astype(np.int16)
    weights = -np.sort(-rng.dirichlet(np.ones(top_k), size=(num_tokens, num_layers)), axis=-1)
    return experts, weights.astype(np.float32)


def stale_gates(experts: np.ndarray, lookahead: int, rng: np.random.Generator) -> np.ndarray:
    """(N, L, H, k) int16 synthetic look-ahead of the routing `experts` (N, L, k): at (l, h) the true set of layer
    l + h with probability STALE_GATE_HIT, else the set another random token routed to there; -1 past the last layer."""
    n, num_layers, k = experts.shape
    stale = np.full((n, num_layers, lookahead, k), -1, dtype=np.int16)
    for h in range(1, lookahead + 1):
        ahead = experts[:, h:]  # (N, L - h, k): layer l + h of every l that has one
        hits = rng.random((n, num_layers - h)) < STALE_GATE_HIT
        other_token = np.where(hits, np.arange(n)[:, None], rng.integers(n, size=(n, num_layers - h)))  # (N, L - h)
        stale[:, : num_layers - h, h - 1] = ahead[other_token, np.arange(num_layers - h)[None, :]]
    return stale


def chunk_tables(sequences: list[ChunkSequence], lengths: list[int], geometry: traces.TraceGeometry, sequences_per_chunk: int,
                 rng: np.random.Generator, chain: SetChain | None = None) -> Iterator[pa.Table]:
    """Trace chunks of `sequences_per_chunk` sequences each, generated one at a time (memory: one chunk); the
    routing is `chain`'s when given, else routing()'s with random per-layer maps."""
    if chain is None:
        layer_maps = np.stack([rng.permutation(geometry.num_experts) for _ in range(geometry.num_layers)])
    table_schema = traces.schema(geometry)
    for start in range(0, len(sequences), sequences_per_chunk):
        counts = lengths[start : start + sequences_per_chunk]
        if chain is None:
            experts, weights = routing(sum(counts), layer_maps, geometry.top_k, rng)
        else:
            experts, weights = chain.sample(sum(counts), rng)
        columns = {"experts": experts, "weights": weights}
        if geometry.capture.lookahead:
            columns["lookahead_experts"] = stale_gates(experts, geometry.capture.lookahead, rng)
        if geometry.capture.hidden_dim:
            shape = (sum(counts), geometry.num_layers, geometry.capture.hidden_dim)
            columns["hidden_states"] = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        bounds = np.cumsum([0, *counts])
        rows = [{"position": np.arange(n, dtype=np.int32), "token_id": rng.integers(2, 2048, n).astype(np.int32),
                 "generated": np.zeros(n, dtype=bool), **{name: values[a:b] for name, values in columns.items()}}
                for n, a, b in zip(counts, bounds[:-1], bounds[1:])]
        yield chunk_table(sequences[start : start + sequences_per_chunk], rows, table_schema)


def write_synthetic_shards(directory: Path, num_tokens: int, rows_per_shard: int = 100_000, seed: int = 0, num_layers: int = 8,
                           top_k: int = 2, num_experts: int = 16, hidden_dim: int = 0, seq_len: int = 128,
                           chunks_per_document: int = 8, min_tokens: int = 16, sequences_per_chunk: int = 256,
                           chain: SetChain | None = None, lookahead: int = 0) -> traces.Manifest:
    """Shards + manifest of >= num_tokens synthetic tokens in `directory` (created). The defaults are tiny-moe's
    geometry and collect's default sequence plan; hidden_dim > 0 adds random float16 hidden states, lookahead > 0 a
    stale gate's top-k at h = 1..lookahead (stale_gates). With `chain`
    the routing is the chain's, and its geometry replaces num_layers, top_k and num_experts."""
    if chain is not None:
        num_layers, top_k, num_experts = chain.num_layers, chain.top_k, chain.num_experts
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..num_experts ({num_experts}), got {top_k}")
    if not 1 <= min_tokens <= seq_len:
        raise ValueError(f"min_tokens must be in 1..seq_len ({seq_len}), got {min_tokens}")
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    capture = traces.Capture(hidden_dim=hidden_dim, lookahead=lookahead)
    sequences, lengths = plan(num_tokens, seq_len, chunks_per_document, min_tokens, rng)
    tables = chunk_tables(sequences, lengths, traces.TraceGeometry(num_layers, top_k, num_experts, capture), sequences_per_chunk, rng,
                          chain)
    meta = traces.TraceMeta(
        model="synthetic", family="synthetic", moe_layers=list(range(num_layers)), layer_stacks=["decoder"] * num_layers,
        num_experts=num_experts, top_k=top_k, shared_experts=0, capture=capture,
        collect={"synthetic": {"seed": seed, "seq_len": seq_len, "chunks_per_document": chunks_per_document, "min_tokens": min_tokens,
                               **({"routing": chain.describe()} if chain is not None else {})},
                 "sequences": len(sequences), "domains": list(dict.fromkeys(s.domain for s in sequences)),
                 "chunks": -(-len(sequences) // sequences_per_chunk)},
    )
    manifest = meta.manifest(write_shard_files(tables, directory, rows_per_shard))
    manifest.write(directory / traces.MANIFEST_NAME)
    return manifest
