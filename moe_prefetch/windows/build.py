"""Stage windows: (context -> target) samples from the shards, split by whole documents or by domain.

Vectorised per shard (no per-token Python loop) and streamed: one shard in memory at a time, each shard's
windows appended to the split files as a row group. Every chunk of a document lands in the same split, so no
text seen in training is tested on; the stage checks this and records it in summary.json.

    python -m stages.windows --shards data/shards --out data/windows
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_prefetch import traces
from moe_prefetch.config import as_dict
from moe_prefetch.errors import PipelineError
from moe_prefetch.files import write_json
from moe_prefetch.progress import Progress
from moe_prefetch.windows.config import WindowsParams
from moe_prefetch.windows.data import (
    ROW_GROUP_WINDOWS,
    SPLITS,
    SUMMARY_NAME,
    WindowSet,
    context_layer_offsets,
    first_target_layer,
)


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


@dataclass
class TokenRows:
    """Consecutive token rows (ordered by sequence, then position): what neighbouring-token lookups index."""

    sequence: np.ndarray  # (n,) int64 run code: equal for adjacent rows of one sequence, consistent across shards
    position: np.ndarray  # (n,) int32
    experts: np.ndarray  # (n, L, k) int16
    weights: np.ndarray  # (n, L, k) float32
    token_id: np.ndarray  # (n,) int32
    last_sequence_id: str | None = None  # id of the last row, so the next shard continues its run code

    @staticmethod
    def of(table: pa.Table, manifest: traces.Manifest, before: TokenRows | None = None) -> TokenRows:
        """Rows of `table`; run codes continue those of `before` (the rows just before it), if given."""
        ids = table["sequence_id"].combine_chunks()
        n = len(ids)
        change = np.ones(n, dtype=bool)  # a new sequence starts at this row
        if n > 1:  # Arrow compares the strings without building Python objects
            change[1:] = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        previous = int(before.sequence[-1]) if before is not None and len(before) else -1
        if n and before is not None and before.last_sequence_id == ids[0].as_py():
            change[0] = False
        return TokenRows(
            previous + np.cumsum(change),
            table["position"].to_numpy(),
            traces.read_column(table, "experts", manifest.geometry),
            traces.read_column(table, "weights", manifest.geometry),
            table["token_id"].to_numpy(),
            ids[n - 1].as_py() if n else (before.last_sequence_id if before is not None else None),
        )

    def __len__(self) -> int:
        return len(self.position)

    def __getitem__(self, rows: slice) -> TokenRows:
        return TokenRows(self.sequence[rows], self.position[rows], self.experts[rows], self.weights[rows],
                         self.token_id[rows], self.last_sequence_id)

    @staticmethod
    def concat(parts: list[TokenRows]) -> TokenRows:
        arrays = (np.concatenate([getattr(p, f) for p in parts]) for f in ("sequence", "position", "experts", "weights", "token_id"))
        return TokenRows(*arrays, next((p.last_sequence_id for p in reversed(parts) if len(p)), None))


def neighbours(rows: TokenRows, start: int, stop: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows start..stop-1 and each offset d, the row holding the same sequence's token at position + d:
    (n, D) row indices (clipped into range; meaningless where missing) and (n, D) whether that token exists."""
    base = np.arange(start, stop)
    index = base[:, None] + offsets[None, :]  # (n, D)
    inside = (index >= 0) & (index < len(rows))
    index = index.clip(0, max(len(rows) - 1, 0))
    same_sequence = rows.sequence[index] == rows.sequence[base][:, None]
    exists = inside & same_sequence & (rows.position[index] == rows.position[base][:, None] + offsets[None, :])
    return index, exists


def following_rows(shard_dir: Path, entries: list[dict], count: int) -> pa.Table | None:
    """The first `count` token rows of the shards in `entries` (the next-token look-ups past a shard's end),
    read batch by batch so that only those rows are decoded."""
    if count <= 0:
        return None
    batches, need = [], count
    for entry in entries:
        handle = pq.ParquetFile(shard_dir / entry["file"])
        for batch in handle.iter_batches(batch_size=need, columns=["sequence_id", "position", "token_id", "experts", "weights"]):
            batches.append(batch.slice(0, need))
            need -= batches[-1].num_rows
            if need <= 0:
                return pa.Table.from_batches(batches)
    return pa.Table.from_batches(batches) if batches else None


class StreamGather:
    """Rows of the decode stream (token, layer), flat position p = token * L + layer: for rows start..stop-1 and
    (G, c) stream offsets from each row's layer 0, which row and layer hold each position, and whether that token
    exists (same sequence). Offsets below 0 reach into earlier tokens (windows.across_tokens)."""

    def __init__(self, rows: TokenRows, start: int, stop: int, offsets: np.ndarray, num_layers: int):
        token_offset, self.layer = np.divmod(offsets, num_layers)  # (G, c) each
        distinct = np.unique(token_offset)  # (D,) <= 0
        index, exists = neighbours(rows, start, stop, distinct)  # (n, D)
        which = np.searchsorted(distinct, token_offset)  # (G, c) into distinct
        self.row, self.exists = index[:, which], exists[:, which]  # (n, G, c)

    def take(self, per_layer: np.ndarray, missing: float) -> np.ndarray:
        """(rows, L, k) values -> (n, G, c, k) at the gathered positions, `missing` where no token is."""
        return np.where(self.exists[..., None], per_layer[self.row, self.layer[None]], missing)

    def take_token(self, per_token: np.ndarray, missing: int) -> np.ndarray:
        """(rows,) values of a token -> (n, G, c) of the token at each gathered position."""
        return np.where(self.exists, per_token[self.row], missing)


def shard_windows(table: pa.Table, manifest: traces.Manifest, params: WindowsParams, carry: TokenRows | None,
                  following: pa.Table | None = None):
    """All windows of one shard as a pyarrow Table (token-major, then target layer), plus the new carry.
    `carry` = the last token rows before this shard, `following` = the first rows after it (token context and
    next-token columns of the shard's edge tokens look there)."""
    geometry = manifest.geometry
    L, k = geometry.num_layers, geometry.top_k
    c, h, T, H = params.context_length, params.horizon, params.token_context, params.token_horizon
    n = table.num_rows
    current = TokenRows.of(table, manifest, carry)
    experts, weights = current.experts, current.weights  # (n, L, k)
    before = carry if carry is not None else current[:0]
    after = [TokenRows.of(following, manifest, current)] if following is not None else []
    rows = TokenRows.concat([before, current, *after])
    start, stop = len(before), len(before) + n
    first = first_target_layer(c, h, params.across_tokens)  # targets are first .. L-1
    targets = np.arange(first, L)
    G = len(targets)
    # Gathers along the layer axis use slices and np.take: numpy's x[:, index] returns a transposed result
    # here, and the copy into row-major order cost more than the rest of the function.
    index, exists = neighbours(rows, start, stop, np.array([-1]))
    previous = np.where(exists[:, 0, None, None], rows.experts[index[:, 0], first:], -1)  # (n, G, k)
    # context[i, j] = experts[i, t_j - h - c + 1 : t_j - h + 1]
    context_layers = targets[:, None] + context_layer_offsets(c, h)  # (G, c)
    if params.across_tokens:
        stream = StreamGather(rows, start, stop, context_layers, L)
        context, context_weights = stream.take(rows.experts, -1), stream.take(rows.weights, 0)  # (n, G, c, k)
        issue = StreamGather(rows, start, stop, targets[:, None] - h, L)  # the position the prediction is issued at
        token_ids = issue.take_token(rows.token_id, -1)[:, :, 0]  # (n, G): the newest id known there
    else:
        context = np.take(experts, context_layers, axis=1)  # (n, G, c, k)
        context_weights = np.take(weights, context_layers, axis=1) if params.context_weights else None
        token_ids = np.repeat(current.token_id[:, None], G, axis=1)
    columns = {
        "sequence_id": table["sequence_id"].take(np.repeat(np.arange(n), G)),
        "domain": table["domain"].take(np.repeat(np.arange(n), G)),
        "position": pa.array(np.repeat(current.position, G), type=pa.int32()),
        "target_layer": pa.array(np.tile(targets, n).astype(np.int16), type=pa.int16()),
        "context_experts": traces.nested_array(context.reshape(n * G, c * k), pa.int16()),
        "target_experts": traces.nested_array(experts[:, first:].reshape(n * G, k), pa.int16()),
        "target_weights": traces.nested_array(weights[:, first:].reshape(n * G, k), pa.float32()),
        "prev_token_experts": traces.nested_array(previous.reshape(n * G, k), pa.int16()),
    }
    if params.context_weights:
        columns["context_weights"] = traces.nested_array(context_weights.reshape(n * G, c * k), pa.float32())
    if params.token_ids:
        columns["token_id"] = pa.array(token_ids.reshape(-1), type=pa.int32())
    if geometry.capture.lookahead >= h:
        stale = traces.read_column(table, "lookahead_experts", geometry)  # (n, L, H, k)
        # layer t's router on layer t-h's input; none captured for a target in the token after the issuing one
        issued_here = stale[:, max(first - h, 0) : L - h, h - 1]  # (n, targets h..L-1, k)
        gate = np.concatenate([np.full((n, G - issued_here.shape[1], k), -1, dtype=stale.dtype), issued_here], axis=1)
        columns["stale_gate_experts"] = traces.nested_array(gate.reshape(n * G, k), pa.int16())
    if T:
        index, exists = neighbours(rows, start, stop, np.arange(-T, 0))  # (n, T), oldest token first
        layers = np.concatenate([context_layers, targets[:, None]], axis=1)  # (G, c+1): context layers, then t
        past = rows.experts[index[:, None, :, None], layers[None, :, None, :]]  # (n, G, T, c+1, k)
        past = np.where(exists[:, None, :, None, None], past, -1)
        columns["token_context_experts"] = traces.nested_array(past.reshape(n * G, T * (c + 1) * k), pa.int16())
    if H:
        index, exists = neighbours(rows, start, stop, np.arange(1, H + 1))  # (n, H)
        cell = (index[:, None, :], targets[None, :, None])  # -> (n, G, H, k): layer t of tokens i+1..i+H
        mask = exists[:, None, :, None]
        upcoming = np.where(mask, rows.experts[cell], -1).reshape(n * G, H * k)
        columns["next_token_experts"] = traces.nested_array(upcoming, pa.int16())
        columns["next_token_weights"] = traces.nested_array(np.where(mask, rows.weights[cell], 0).reshape(n * G, H * k), pa.float32())
    hidden_dim = geometry.capture.hidden_dim
    if hidden_dim:
        hidden = traces.read_column(table, "hidden_states", geometry)  # (n, L, D) float16
        columns["hidden_state"] = traces.nested_array(hidden[:, first - h : L - h].reshape(n * G, hidden_dim), pa.float16())
    keep = max(T, 1, -(int(context_layers.min()) // L))  # rows the next shard's look-backs need (tokens back)
    new_carry = TokenRows.concat([before[-keep:], current[-keep:]])[-keep:]
    return pa.table(columns), new_carry


def temporal_extents(params: WindowsParams, manifest: traces.Manifest) -> dict:
    """summary.json keys the reader needs for the optional columns; absent when 0 (default output unchanged)."""
    extents = {"token_context": params.token_context, "token_horizon": params.token_horizon,
               "hidden_dim": manifest.geometry.capture.hidden_dim}
    return {name: value for name, value in extents.items() if value}


def summary_params(params: WindowsParams) -> dict:
    """The windows params as recorded in summary.json; zero temporal extents and token_ids / context_weights / across_tokens off are left out so
    that default windows stay byte-identical to those written before the keys existed."""
    recorded = as_dict(params)
    for name in ("token_context", "token_horizon", "token_ids", "context_weights", "across_tokens"):
        if not recorded[name]:
            del recorded[name]
    return recorded


def document_splits(shard_dir: Path, manifest: traces.Manifest, params: WindowsParams) -> tuple[dict[str, str], dict[str, str], bool]:
    """document_id -> split name, document_id -> domain, and whether any token was generated (windows then carry
    `generated`)."""
    domains_of: dict[str, str] = {}
    has_generated = False
    for entry in manifest.shards:  # distinct (document, domain) pairs, one shard at a time: memory ~ documents
        docs = traces.read_shard(shard_dir, entry, manifest, columns=["document_id", "domain", "generated"])
        pairs = docs.group_by(["document_id", "domain"]).aggregate([])
        domains_of.update(zip(pairs["document_id"].to_pylist(), pairs["domain"].to_pylist()))
        has_generated = has_generated or bool(pc.any(docs["generated"]).as_py())
    return assign_splits(list(domains_of), domains_of, params, manifest.domains), domains_of, has_generated


def window_documents(routing: traces.RoutingTable, windows: WindowSet) -> np.ndarray:
    """(N,) int64 code of each window's document (its rank among the sorted ids of the windows' documents), from the
    routing of the shards the windows were built from (traces.read_routing): windows carry only their sequence, the
    shards map a sequence to its document (a `<domain>/<document>/<chunk>` sequence id is not guaranteed,
    collect.import takes any)."""
    pairs = np.unique(np.stack([routing.sequence_index, routing.document_index], axis=1), axis=0)  # distinct pairs
    document_of = {routing.sequence_ids[s]: routing.document_ids[d] for s, d in pairs}
    missing = [sequence for sequence in windows.sequence_ids if sequence not in document_of]
    if missing:
        raise PipelineError(f"windows: sequence {missing[0]!r} is not in the shards; re-run the windows stage")
    document_ids = sorted({document_of[sequence] for sequence in windows.sequence_ids})
    code_of = {document: code for code, document in enumerate(document_ids)}
    sequence_codes = np.array([code_of[document_of[sequence]] for sequence in windows.sequence_ids], dtype=np.int64)
    return sequence_codes[windows.sequence_index]


def check_geometry(params: WindowsParams, manifest: traces.Manifest) -> None:
    """A context plus horizon must fit in the model's MoE layers (across tokens: the horizon at most L, so that the
    previous token's target layer has run when the prediction is issued; no hidden-state capture)."""
    L = manifest.num_layers
    if params.across_tokens:
        if params.horizon > L:
            raise PipelineError(f"windows.horizon: {params.horizon} with windows.across_tokens exceeds the model's {L} MoE "
                                f"layers; accepted: 1..{L} (L = the next token's same layer)")
        if manifest.geometry.capture.hidden_dim:
            raise PipelineError("windows.across_tokens: true is not supported with hidden states in the shards "
                                "(collect.capture.hidden_states: true); accepted: across_tokens false, or no hidden states")
        return
    if params.context_length + params.horizon > L:
        raise PipelineError(
            f"windows.horizon: windows.context_length + horizon = {params.context_length} + {params.horizon} exceeds the "
            f"model's {L} MoE layers; need context_length + horizon <= {L}"
        )


def split_windows(shard_dir: Path, manifest: traces.Manifest, params: WindowsParams, assignment: dict[str, str],
                  has_generated: bool, splits: tuple[str, ...] = SPLITS):
    """Yield (split name, windows table, shard table, shard rows in that split) shard by shard, for `splits`."""
    L = manifest.num_layers
    per_token = L - first_target_layer(params.context_length, params.horizon, params.across_tokens)  # windows per token
    carry = None
    progress = Progress(manifest.rows, f"windows h={params.horizon}", unit="tokens")
    for number, entry in enumerate(manifest.shards):
        table = traces.read_shard(shard_dir, entry, manifest)  # checksum, readable, ids in range, finite weights
        progress.update(table.num_rows)
        document_index, document_ids = traces.dictionary_codes(table["document_id"])
        split_of_row = np.array([SPLITS.index(assignment[d]) for d in document_ids])[document_index]
        following = following_rows(shard_dir, manifest.shards[number + 1 :], params.token_horizon)
        windows, carry = shard_windows(table, manifest, params, carry, following)
        if has_generated:
            windows = windows.append_column("generated", table["generated"].take(np.repeat(np.arange(table.num_rows), per_token)))
        for name in splits:
            rows = np.flatnonzero(split_of_row == SPLITS.index(name))
            if len(rows):
                window_rows = (rows[:, None] * per_token + np.arange(per_token)[None, :]).reshape(-1)
                yield name, windows.take(pa.array(window_rows)), table, rows
    progress.close()


def windows_in_memory(shard_dir: Path, params: WindowsParams, splits: tuple[str, ...]) -> dict[str, pa.Table]:
    """The windows of `splits` as in-memory tables, split exactly as the stage splits them (for evaluating
    baselines at other horizons than the stage's)."""
    manifest = traces.Manifest.read(shard_dir)
    check_geometry(params, manifest)
    assignment, _, has_generated = document_splits(shard_dir, manifest, params)
    parts: dict[str, list[pa.Table]] = {name: [] for name in splits}
    for name, part, _, _ in split_windows(shard_dir, manifest, params, assignment, has_generated, splits):
        parts[name].append(part)
    return {name: pa.concat_tables(tables) for name, tables in parts.items() if tables}


def build_windows(shard_dir: Path, out_dir: Path, params: WindowsParams) -> dict:
    """Write {train,val,test}.parquet and summary.json into out_dir; return the summary."""
    manifest = traces.Manifest.read(shard_dir)
    L = manifest.num_layers
    check_geometry(params, manifest)
    assignment, domains_of, has_generated = document_splits(shard_dir, manifest, params)
    writers: dict[str, pq.ParquetWriter] = {}
    counts = {name: {"windows": 0, "tokens": 0, "sequences": set(), "documents": set()} for name in SPLITS}
    try:
        for name, part, table, rows in split_windows(shard_dir, manifest, params, assignment, has_generated):
            if name not in writers:
                writers[name] = pq.ParquetWriter(out_dir / f"{name}.parquet", part.schema)
            writers[name].write_table(part, row_group_size=ROW_GROUP_WINDOWS)
            counts[name]["windows"] += part.num_rows
            counts[name]["tokens"] += len(rows)
            for column, key in (("sequence_id", "sequences"), ("document_id", "documents")):
                counts[name][key].update(pc.unique(table[column].take(rows)).to_pylist())
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
        "target_layers": list(range(first_target_layer(params.context_length, params.horizon, params.across_tokens), L)),
        **({"across_tokens": True} if params.across_tokens else {}),
        "domains": manifest.domains,
        "has_stale_gate": manifest.geometry.capture.lookahead >= params.horizon,
        **temporal_extents(params, manifest),
        "params": summary_params(params),
        "leakage_check": "passed: no document in more than one split",
        "splits": {
            name: {
                "windows": c["windows"],
                "tokens": c["tokens"],
                "sequences": len(c["sequences"]),
                "documents": len(c["documents"]),
                "domains": sorted({domains_of[d] for d in c["documents"]}),
            }
            for name, c in counts.items()
        },
    }
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary
