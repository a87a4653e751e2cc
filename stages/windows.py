"""Stage windows: (context -> target) samples from the shards, split by whole documents or by domain.

Vectorised per shard (no per-token Python loop) and streamed: one shard in memory at a time, each shard's
windows appended to the split files as a row group. Every chunk of a document lands in the same split, so no
text seen in training is tested on; the stage checks this and records it in summary.json.

    python -m stages.windows --shards data/shards --out data/windows
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages import traces
from stages.common import atomic_path, run_stage, write_json
from stages.errors import PipelineError
from stages.params import WindowsParams, as_dict, load_section
from stages.window_data import SPLITS, SUMMARY_NAME


def assign_splits(document_ids: list[str], domains_of: dict[str, str], params: WindowsParams, known_domains: list[str]) -> dict[str, str]:
    """document_id -> split name. Documents are shuffled with the split seed, then cut by the fractions."""
    split = params.split
    documents = sorted(document_ids)
    rng = np.random.default_rng(split.seed)
    assignment = {}
    if split.by == "domain":
        if split.test_domain not in known_domains:
            raise PipelineError(f"windows.split.test_domain: {split.test_domain!r} is not a collected domain; accepted: {', '.join(known_domains)}")
        for doc in documents:
            if domains_of[doc] == split.test_domain:
                assignment[doc] = "test"
        rest = [d for d in documents if d not in assignment]
        names, fractions = ("train", "val"), split.fractions
    else:
        rest, names, fractions = documents, SPLITS, split.fractions
    order = [rest[i] for i in rng.permutation(len(rest))]
    bounds = np.round(np.cumsum(fractions) * len(order)).astype(int)
    start = 0
    for name, end in zip(names, bounds):
        for doc in order[start:end]:
            assignment[doc] = name
        start = end
    for name in SPLITS:
        if name not in assignment.values():
            raise PipelineError(
                f"windows.split: the {name} split got no document ({len(documents)} documents; by={split.by}, "
                f"fractions={split.fractions}); collect more sequences or change the fractions"
            )
    return assignment


def previous_token_experts(experts: np.ndarray, sequence: np.ndarray, position: np.ndarray, carry: tuple | None) -> np.ndarray:
    """(n, L, k): the previous token's experts (same sequence, position - 1), -1 where there is none.
    `carry` = (sequence id, position, experts (L, k)) of the last row of the previous shard."""
    previous = np.full_like(experts, -1)
    previous[1:] = experts[:-1]
    valid = np.zeros(len(experts), dtype=bool)
    valid[1:] = (sequence[1:] == sequence[:-1]) & (position[1:] == position[:-1] + 1)
    if carry is not None and len(experts):
        valid[0] = carry[0] == sequence[0] and carry[1] + 1 == position[0]
        previous[0] = carry[2]
    previous[~valid] = -1
    return previous


def shard_windows(table: pa.Table, manifest: traces.Manifest, params: WindowsParams, carry: tuple | None):
    """All windows of one shard as a pyarrow Table (token-major, then target layer), plus the new carry."""
    L, k = manifest.num_layers, manifest.top_k
    c, h = params.context_length, params.horizon
    n = table.num_rows
    experts = traces.column_to_numpy(table["experts"], (L, k))  # (n, L, k)
    weights = traces.column_to_numpy(table["weights"], (L, k))
    sequence = np.asarray(table["sequence_id"].to_pylist(), dtype=object)
    position = table["position"].to_numpy()
    previous = previous_token_experts(experts, sequence, position, carry)
    targets = np.arange(c - 1 + h, L)  # target MoE layers that have a full context
    T = len(targets)
    # context[i, j] = experts[i, t_j - h - c + 1 : t_j - h + 1]
    context_layers = targets[:, None] - h - c + 1 + np.arange(c)[None, :]  # (T, c)
    context = experts[:, context_layers, :]  # (n, T, c, k)
    columns = {
        "sequence_id": pa.array(np.repeat(sequence, T), type=pa.string()),
        "domain": pa.array(np.repeat(np.asarray(table["domain"].to_pylist(), dtype=object), T), type=pa.string()),
        "position": pa.array(np.repeat(position, T), type=pa.int32()),
        "target_layer": pa.array(np.tile(targets, n).astype(np.int16), type=pa.int16()),
        "context_experts": traces.nested_array(context.reshape(n * T, c * k), pa.int16()),
        "target_experts": traces.nested_array(experts[:, targets].reshape(n * T, k), pa.int16()),
        "target_weights": traces.nested_array(weights[:, targets].reshape(n * T, k), pa.float32()),
        "prev_token_experts": traces.nested_array(previous[:, targets].reshape(n * T, k), pa.int16()),
    }
    lookahead = manifest.capture.get("lookahead") or 0
    if lookahead >= h:
        stale = traces.column_to_numpy(table["lookahead_experts"], (L, lookahead, k))  # (n, L, H, k)
        columns["stale_gate_experts"] = traces.nested_array(stale[:, targets - h, h - 1].reshape(n * T, k), pa.int16())
    new_carry = (sequence[-1], int(position[-1]), experts[-1]) if n else carry
    return pa.table(columns), new_carry


def build_windows(shard_dir: Path, out_dir: Path, params: WindowsParams) -> dict:
    """Write {train,val,test}.parquet and summary.json into out_dir; return the summary."""
    manifest = traces.Manifest.read(shard_dir)
    L = manifest.num_layers
    if params.context_length + params.horizon > L:
        raise PipelineError(
            f"windows.context_length + windows.horizon: {params.context_length} + {params.horizon} exceeds the model's "
            f"{L} MoE layers; need context_length + horizon <= {L}"
        )
    meta_columns = []
    for entry in manifest.shards:
        meta_columns.append(pq.read_table(traces.verify_shard(shard_dir, entry), columns=["document_id", "domain"]))
    docs = pa.concat_tables(meta_columns)
    domains_of = dict(zip(docs["document_id"].to_pylist(), docs["domain"].to_pylist()))
    assignment = assign_splits(list(domains_of), domains_of, params, manifest.domains)

    writers: dict[str, pq.ParquetWriter] = {}
    counts = {name: {"windows": 0, "tokens": 0, "sequences": set(), "documents": set()} for name in SPLITS}
    carry = None
    try:
        for entry in manifest.shards:
            table = pq.read_table(shard_dir / entry["file"])
            split_of_row = np.array([assignment[d] for d in table["document_id"].to_pylist()])
            windows, carry = shard_windows(table, manifest, params, carry)
            per_token = windows.num_rows // max(table.num_rows, 1)
            for name in SPLITS:
                rows = np.flatnonzero(split_of_row == name)
                if not len(rows):
                    continue
                window_rows = (rows[:, None] * per_token + np.arange(per_token)[None, :]).reshape(-1)
                part = windows.take(pa.array(window_rows))
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out_dir / f"{name}.parquet", part.schema)
                writers[name].write_table(part)
                counts[name]["windows"] += part.num_rows
                counts[name]["tokens"] += len(rows)
                counts[name]["sequences"].update(table["sequence_id"].take(pa.array(rows)).to_pylist())
                counts[name]["documents"].update(table["document_id"].take(pa.array(rows)).to_pylist())
    finally:
        for writer in writers.values():
            writer.close()
    overlap = (counts["train"]["documents"] | counts["val"]["documents"]) & counts["test"]["documents"]
    if overlap or counts["train"]["documents"] & counts["val"]["documents"]:
        raise PipelineError(f"windows: document {sorted(overlap)[:1]} is in two splits; this is a bug, please report it")
    summary = {
        "context_length": params.context_length,
        "horizon": params.horizon,
        "num_layers": L,
        "num_experts": manifest.num_experts,
        "top_k": manifest.top_k,
        "target_layers": list(range(params.context_length - 1 + params.horizon, L)),
        "domains": manifest.domains,
        "has_stale_gate": (manifest.capture.get("lookahead") or 0) >= params.horizon,
        "params": as_dict(params),
        "leakage_check": "passed: no document in more than one split",
        "splits": {
            name: {
                "windows": c["windows"],
                "tokens": c["tokens"],
                "sequences": len(c["sequences"]),
                "documents": len(c["documents"]),
                "domains": sorted({d.split("/", 1)[0] for d in c["documents"]}),
            }
            for name, c in counts.items()
        },
    }
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="Build (context -> target) windows from routing shards.")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_section("windows", args.params)
    with atomic_path(args.out) as temp:
        temp.mkdir()
        summary = build_windows(args.shards, temp, params)
    sizes = ", ".join(f"{name} {s['windows']} ({s['documents']} docs)" for name, s in summary["splits"].items())
    print(f"windows: {sizes}")


if __name__ == "__main__":
    run_stage(main)
