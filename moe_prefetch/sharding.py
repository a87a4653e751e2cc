"""Stage shard: merge the collector's trace chunks into Parquet shards of `shard.rows_per_shard` rows and a
manifest (model geometry, schema version, row count and sha256 per shard). Validates every row on the way:
expert ids in range, finite weights, consistent schema. Streams: at most one chunk plus one shard in memory.

    python -m stages.shard --traces data/traces --out data/shards
"""

from __future__ import annotations

import json
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


def read_meta(trace_dir: Path) -> dict:
    path = trace_dir / traces.META_NAME  # not imported from stages.collect: that pulls in torch + transformers
    if not path.exists():
        raise PipelineError(f"{path}: missing; the collect stage did not finish (re-run dvc repro collect)")
    return json.loads(path.read_text())


def validate_chunk(path: Path, table: pa.Table, meta: dict) -> None:
    """The schema meta.json implies, expert ids within [-1, num_experts) (-1 = dropped token), finite weights."""
    shape = (len(meta["moe_layers"]), meta["top_k"])
    capture = meta["capture"]
    expected = traces.schema(*shape, meta["num_experts"], capture["hidden_dim"], capture["lookahead"], capture["router_probs"])
    if not table.schema.equals(expected):
        got = {f.name: str(f.type) for f in table.schema}
        diff = [f"{f.name}: {got.get(f.name, 'missing')} (expected {f.type})" for f in expected if got.get(f.name) != str(f.type)]
        diff += [f"{name}: unexpected column" for name in got if name not in expected.names]
        raise PipelineError(f"{path}: schema differs from meta.json ({'; '.join(diff)}); re-run dvc repro -f collect")
    traces.check_routing(path, traces.column_to_numpy(table["experts"], shape), traces.column_to_numpy(table["weights"], shape),
                         meta["num_experts"])


def iter_chunks(trace_dir: Path, meta: dict):
    paths = sorted(trace_dir.glob("chunk-*.parquet"))
    expected = meta["collect"]["chunks"]
    if len(paths) != expected:
        raise PipelineError(f"{trace_dir}: {len(paths)} chunk files, meta.json expects {expected}; re-run dvc repro collect")
    for path in paths:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise PipelineError(f"{path}: unreadable Parquet chunk ({err}); delete it and re-run dvc repro collect") from None
        validate_chunk(path, table, meta)
        yield table


def write_shards(trace_dir: Path, out_dir: Path, params: ShardParams) -> traces.Manifest:
    """Re-chunk the traces into shards; return the manifest (also written as out_dir/manifest.json)."""
    meta = read_meta(trace_dir)
    entries: list[dict] = []
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush(table: pa.Table) -> None:
        name = f"shard-{len(entries):05d}.parquet"
        pq.write_table(table, out_dir / name, row_group_size=min(65536, params.rows_per_shard))
        entries.append({"file": name, "rows": table.num_rows, "sha256": traces.sha256_file(out_dir / name)})

    for table in iter_chunks(trace_dir, meta):
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= params.rows_per_shard:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, params.rows_per_shard))
            rest = merged.slice(params.rows_per_shard)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        flush(pa.concat_tables(pending))
    if not entries:
        raise PipelineError(f"{trace_dir}: the traces hold no token rows")
    manifest = traces.Manifest(
        model=meta["model"],
        family=meta["family"],
        moe_layers=meta["moe_layers"],
        layer_stacks=meta["layer_stacks"],
        num_experts=meta["num_experts"],
        top_k=meta["top_k"],
        shared_experts=meta["shared_experts"],
        domains=meta["collect"]["domains"],
        shards=entries,
        capture=meta["capture"],
        collect=meta["collect"],
        rows=sum(e["rows"] for e in entries),
    )
    manifest.write(out_dir / traces.MANIFEST_NAME)
    return manifest
