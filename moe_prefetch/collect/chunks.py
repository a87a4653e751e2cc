"""Trace chunk files, the unit collect (and collect.import) writes and resumes by: one Parquet table of token rows
(schema in moe_prefetch/traces.py), written atomically, and the `collect` entry of meta.json both writers share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_prefetch import traces
from moe_prefetch.collect.config import CollectParams
from moe_prefetch.config import as_dict
from moe_prefetch.files import atomic_path


@dataclass
class ChunkSequence:
    """What the rows of one sequence share in a chunk."""

    sequence_id: str
    document_id: str
    domain: str


def chunk_table(sequences: list[ChunkSequence], rows: list[dict], schema: pa.Schema) -> pa.Table:
    """One table from per-sequence row dicts (moe_prefetch/collect/generation.py: position, token_id, generated and
    a (tokens, ...) array per routing column of `schema`), one dict per sequence."""
    counts = [len(r["position"]) for r in rows]
    columns = {
        "sequence_id": np.repeat([s.sequence_id for s in sequences], counts),
        "document_id": np.repeat([s.document_id for s in sequences], counts),
        "domain": np.repeat([s.domain for s in sequences], counts),
        **{name: np.concatenate([r[name] for r in rows]) for name in ("position", "token_id", "generated")},
    }
    data = {name: pa.array(values, type=schema.field(name).type) for name, values in columns.items()}
    for name in traces.ROUTING_COLUMNS:
        if name in schema.names:
            data[name] = traces.column_array(name, np.concatenate([r[name] for r in rows]))
    return pa.table(data, schema=schema)


def write_chunk(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as temp:
        pq.write_table(table, temp)


def run_summary(params: CollectParams, sequences: list[ChunkSequence], chunks: int) -> dict:
    """The part of meta.json's `collect` entry that collect and import share."""
    per_domain: dict[str, int] = {}
    for seq in sequences:
        per_domain[seq.domain] = per_domain.get(seq.domain, 0) + 1
    return {"params": as_dict(params), "sequences": len(sequences), "sequences_per_domain": per_domain,
            "domains": list(per_domain), "chunks": chunks}
