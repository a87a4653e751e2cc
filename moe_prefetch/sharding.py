"""Stage shard: merge the collector's trace chunks into Parquet shards of `shard.rows_per_shard` rows and a
manifest (model geometry, schema version, row count and sha256 per shard). Validates every row on the way:
expert ids in range, finite weights, consistent schema. Streams: at most one chunk plus one shard in memory.

    python -m stages.shard --traces data/traces --out data/shards
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moe_prefetch import traces
from moe_prefetch.config import doc, positive
from moe_prefetch.errors import PipelineError


@dataclass
class ShardParams:
    """The `shard` section of params.yaml."""

    rows_per_shard: int = doc("Token rows per Parquet shard.", 100_000)

    def validate(self) -> None:
        positive("shard", self, "rows_per_shard")


def validate_chunk(path: Path, table: pa.Table, meta: traces.TraceMeta) -> None:
    """The schema meta.json implies, expert ids within [-1, num_experts) (-1 = dropped token), finite weights."""
    geometry = meta.geometry
    expected = traces.schema(geometry)
    if not table.schema.equals(expected):
        got = {f.name: str(f.type) for f in table.schema}
        diff = [f"{f.name}: {got.get(f.name, 'missing')} (expected {f.type})" for f in expected if got.get(f.name) != str(f.type)]
        diff += [f"{name}: unexpected column" for name in got if name not in expected.names]
        raise PipelineError(f"{path}: schema differs from meta.json ({'; '.join(diff)}); re-run dvc repro -f collect")
    traces.check_routing(path, traces.read_column(table, "experts", geometry), traces.read_column(table, "weights", geometry),
                         meta.num_experts)


def iter_chunks(trace_dir: Path, meta: traces.TraceMeta):
    paths = sorted(trace_dir.glob("chunk-*.parquet"))
    expected = meta.collect["chunks"]
    if len(paths) != expected:
        raise PipelineError(f"{trace_dir}: {len(paths)} chunk files, meta.json expects {expected}; re-run dvc repro collect")
    for path in paths:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise PipelineError(f"{path}: unreadable Parquet chunk ({err}); delete it and re-run dvc repro collect") from None
        validate_chunk(path, table, meta)
        yield table


def write_shard_files(tables: Iterable[pa.Table], out_dir: Path, rows_per_shard: int) -> list[dict]:
    """Re-cut a stream of token tables into out_dir/shard-NNNNN.parquet of `rows_per_shard` rows (the last one
    shorter); return their manifest entries. Holds at most one input table plus one shard."""
    entries: list[dict] = []
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush(table: pa.Table) -> None:
        name = f"shard-{len(entries):05d}.parquet"
        pq.write_table(table, out_dir / name, row_group_size=min(65536, rows_per_shard))
        entries.append({"file": name, "rows": table.num_rows, "sha256": traces.sha256_file(out_dir / name)})

    for table in tables:
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= rows_per_shard:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, rows_per_shard))
            rest = merged.slice(rows_per_shard)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        flush(pa.concat_tables(pending))
    return entries


def write_shards(trace_dir: Path, out_dir: Path, params: ShardParams) -> traces.Manifest:
    """Re-chunk the traces into shards; return the manifest (also written as out_dir/manifest.json)."""
    meta = traces.TraceMeta.read(trace_dir)
    entries = write_shard_files(iter_chunks(trace_dir, meta), out_dir, params.rows_per_shard)
    if not entries:
        raise PipelineError(f"{trace_dir}: the traces hold no token rows")
    manifest = meta.manifest(entries)
    manifest.write(out_dir / traces.MANIFEST_NAME)
    return manifest
