"""collect.import: routing recorded elsewhere (another engine, another tracer) turned into this pipeline's traces.

Input: the files matched by the glob, sorted, each JSON Lines (.jsonl), CSV (.csv, header row) or Parquet
(.parquet); one record per (sequence, token, MoE layer):

| field       | required | type                         | meaning                                                  |
|-------------|----------|------------------------------|----------------------------------------------------------|
| sequence_id | yes      | string (or integer)          | the sequence the token belongs to                        |
| position    | yes      | integer >= 0                 | token position in the sequence                           |
| layer       | yes      | integer >= 0                 | true index of the MoE layer                              |
| experts     | yes      | list of k expert ids         | routed experts (any order; -1 = dropped, weight 0)       |
| weights     | yes      | list of k numbers            | their gate weights                                       |
| domain      | no       | string, default "imported"   | one per sequence                                         |
| document_id | no       | string, default sequence_id  | one per sequence (windows splits by document)            |
| token_id    | no       | integer, default -1          | one per token                                            |
| generated   | no       | boolean, default false       | one per token                                            |

In CSV a list is a JSON list ("[3, 7]", quoted) or ids separated by spaces or semicolons; an empty cell is a
missing value. Other fields (columns) are ignored. k must be the same in every record; ids must be < collect.num_experts (0 = inferred as the
largest id + 1). Experts are stored best-first by weight (ties: lower id first), as collect stores them.

Output: the chunk files + meta.json that collect writes (family "imported", moe_layers = the sorted distinct
layers, one "decoder" stack, no shared experts), so shard, windows, train and evaluate run unchanged. Sequences
keep the order of their first record, tokens are sorted by position. A token missing some layer is dropped and
counted (meta.json collect.incomplete_tokens, carried into the shard manifest). Any malformed record stops the
import with one line naming file, line (Parquet: 0-based row) and field; nothing is written (the output directory
is built under a temporary name and renamed at the end). In JSON Lines, as in Parquet and CSV, a null optional
field is a missing one (its default).

Memory is bounded whatever the number of records (10^8 is a day of a serving engine's routing log): records
stream through in batches (moe_prefetch/collect/import_records.py: Arrow's streaming readers, checks vectorised)
and are spilled to disk grouped by SPILL_SEQUENCES consecutive sequences (in order of first appearance); the
second pass sorts and checks one group at a time and writes chunks as they fill. What is held: one batch, one
group's records, one chunk's rows, and one entry per distinct sequence / document / domain.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pyarrow as pa

from moe_prefetch import traces
from moe_prefetch.collect.chunks import (
    ChunkSequence,
    chunk_table,
    run_summary,
    write_chunk,
)
from moe_prefetch.collect.config import CollectParams
from moe_prefetch.collect.import_records import (
    FORMATS,
    ImportState,
    Inexact,
    exact_batches,
    fast_batches,
    where,
)
from moe_prefetch.errors import PipelineError
from moe_prefetch.files import atomic_path

SPILL_SEQUENCES = 32  # sequences per spill group: the second pass holds one group's records at a time
FLAT = ("sequence", "position", "layer", "token_id", "generated", "domain", "document", "file", "number", "index")


class Spill:
    """Validated batches on disk under `root`, one directory per group of SPILL_SEQUENCES sequence codes, each
    group's records in input order (part files in batch order, a batch's records stably grouped)."""

    def __init__(self, root: Path, top_k: int):
        self.root = root
        self.top_k = top_k
        self.parts = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        group = batch["sequence"] // SPILL_SEQUENCES
        order = np.argsort(group, kind="stable")
        bounds = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1], True])
        for start, end in zip(bounds[:-1], bounds[1:]):
            rows = order[start:end]
            table = pa.table({**{name: batch[name][rows] for name in FLAT},
                              **{name: pa.FixedSizeListArray.from_arrays(batch[name][rows].ravel(), self.top_k) for name in ("experts", "weights")}})
            path = self.root / f"{int(group[rows[0]]):09d}" / f"{self.parts:09d}.arrow"
            path.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        self.parts += 1

    def groups(self):
        """Each group's records as one batch, groups in sequence order."""
        for directory in sorted(self.root.iterdir()) if self.root.exists() else []:
            table = pa.concat_tables(pa.ipc.open_file(str(path)).read_all() for path in sorted(directory.iterdir()))
            batch = {name: table.column(name).to_numpy() for name in FLAT}
            for name in ("experts", "weights"):
                batch[name] = table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, self.top_k)
            yield batch


def _check_same(state: ImportState, records: dict, name: str, value_of, group: np.ndarray, order: np.ndarray, owner: str,
                exact: bool) -> None:
    """Every record of a group (a token or a sequence; `order` sorts the records by group) gives the same `name`
    (records[key] compared; value_of(index) is the value as given)."""
    key = {"domain": "domain", "document_id": "document"}.get(name, name)
    groups, values = group[order], records[key][order]
    starts = np.r_[True, groups[1:] != groups[:-1]]
    head = np.maximum.accumulate(np.where(starts, np.arange(len(groups)), 0))  # sorted index of each group's first record
    bad = np.flatnonzero(values != values[head])
    if len(bad):
        if not exact:
            raise Inexact
        worst = bad[np.argmin(order[bad])]
        index, earlier = int(order[worst]), int(order[head[worst]])
        raise PipelineError(
            f"collect.import: {_where(state, records, index)}: field {name!r}: {value_of(index)!r} differs from "
            f"{value_of(earlier)!r} given for the same {owner} at {_where(state, records, earlier)}"
        )


def _where(state: ImportState, records: dict, index: int) -> str:
    return where(state.files[records["file"][index]], int(records["number"][index]))


def group_rows(state: ImportState, records: dict, num_layers: int, exact: bool) -> tuple[list[ChunkSequence], list[dict], int]:
    """The sequences of one spill group with their row dicts (complete tokens in position order, experts
    best-first), and how many tokens missed some of the `num_layers` layers."""
    sequence, position, layer = records["sequence"], records["position"], records["layer"]
    order = np.lexsort((layer, position, sequence))  # stable: a duplicate follows the record it repeats
    key = np.stack([sequence, position, layer], axis=1)[order]  # (n, 3)
    repeats = np.flatnonzero((key[1:] == key[:-1]).all(axis=1)) + 1
    if len(repeats):
        if not exact:
            raise Inexact
        at = repeats[np.argmin(order[repeats])]
        raise PipelineError(
            f"collect.import: {_where(state, records, int(order[at]))}: field 'layer': duplicate (sequence_id, position, layer) = "
            f"({state.values('sequence')[key[at, 0]]!r}, {key[at, 1]}, {key[at, 2]}); first given at {_where(state, records, int(order[at - 1]))}"
        )
    new_token = np.r_[True, (key[1:, :2] != key[:-1, :2]).any(axis=1)]
    token = np.empty(len(order), dtype=np.int64)
    token[order] = np.cumsum(new_token) - 1
    _check_same(state, records, "token_id", lambda i: int(records["token_id"][i]), token, order, "token", exact)
    _check_same(state, records, "generated", lambda i: bool(records["generated"][i]), token, order, "token", exact)
    by_sequence = np.argsort(sequence, kind="stable")
    for name, code in (("domain", "domain"), ("document_id", "document")):
        _check_same(state, records, name, lambda i, code=code: state.values(code)[records[code][i]], sequence, by_sequence, "sequence", exact)

    sizes = np.bincount(token)
    complete = sizes == num_layers
    kept = order[complete[token[order]]]  # sorted by (sequence, position, layer), complete tokens only
    experts, weights = traces.best_first(records["experts"][kept], records["weights"][kept])
    heads = kept[::num_layers]  # one record per token
    token_sequence = sequence[heads]
    bounds = np.flatnonzero(np.r_[True, token_sequence[1:] != token_sequence[:-1], True]) if len(heads) else np.zeros(1, dtype=np.int64)
    sequence_ids, documents, domains = state.values("sequence"), state.values("document"), state.values("domain")
    sequences, rows = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        first = int(heads[start])
        sequences.append(ChunkSequence(sequence_ids[token_sequence[start]], documents[records["document"][first]],
                                       domains[records["domain"][first]]))
        tokens = heads[start:end]
        rows.append({
            "position": position[tokens].astype(np.int32),
            "token_id": records["token_id"][tokens].astype(np.int32),
            "generated": records["generated"][tokens].astype(bool),
            "experts": experts[start * num_layers : end * num_layers].reshape(-1, num_layers, state.top_k),
            "weights": weights[start * num_layers : end * num_layers].reshape(-1, num_layers, state.top_k),
        })
    return sequences, rows, int((~complete).sum())


def matched_paths(params: CollectParams) -> list[str]:
    paths = sorted(glob.glob(params.import_glob, recursive=True))
    if not paths:
        raise PipelineError(f"collect.import: no file matches {params.import_glob!r}")
    unknown = [p for p in paths if Path(p).suffix not in FORMATS]
    if unknown:
        raise PipelineError(f"collect.import: {unknown[0]}: unsupported format; accepted: {', '.join(FORMATS)}")
    return paths


def import_traces(params: CollectParams, out: Path) -> None:
    """Validate every record, then write chunk files + meta.json into `out` (replaced only on success): through
    Arrow's fast readers, or, if they cannot take (or name a problem in) the input, one record at a time."""
    paths = matched_paths(params)
    try:
        _import(params, out, paths, exact=False)
    except Inexact:
        _import(params, out, paths, exact=True)


def _import(params: CollectParams, out: Path, paths: list[str], exact: bool) -> None:
    state = ImportState(params.num_experts)
    batches = exact_batches if exact else fast_batches
    with atomic_path(out) as temp:
        spill = None
        for path in paths:
            for batch in batches(state, path):
                spill = spill or Spill(temp.parent / "spill", state.top_k)
                spill.add(batch)
        if not state.records:
            raise PipelineError(f"collect.import: the files matching {params.import_glob!r} hold no record")
        num_experts = params.num_experts or state.max_id + 1
        if num_experts == 0:
            raise PipelineError("collect.import: every expert slot is -1 (dropped); set collect.num_experts")
        layers = sorted(state.layers)
        L, step = len(layers), params.sequences_per_chunk
        schema = traces.schema(traces.TraceGeometry(L, state.top_k, num_experts, traces.Capture()))
        temp.mkdir()
        written: list[ChunkSequence] = []  # every sequence, for the summary (one entry per sequence)
        pending: tuple[list[ChunkSequence], list[dict]] = ([], [])  # sequences not yet in a chunk
        tokens = incomplete = 0

        def write(count: int) -> None:
            sequences, rows = pending[0][:count], pending[1][:count]
            write_chunk(temp / f"chunk-{len(written) // step:05d}.parquet", chunk_table(sequences, rows, schema))
            written.extend(sequences)
            del pending[0][:count], pending[1][:count]

        for records in spill.groups():
            sequences, rows, dropped = group_rows(state, records, L, exact)
            pending[0].extend(sequences)
            pending[1].extend(rows)
            tokens += sum(len(r["position"]) for r in rows)
            incomplete += dropped
            while len(pending[0]) >= step:
                write(step)
        if pending[0]:
            write(len(pending[0]))
        if not written:
            raise PipelineError(f"collect.import: no token has routing for all {L} layers {layers}; nothing to import")
        traces.TraceMeta(
            model=f"imported:{params.import_glob}",
            family="imported",
            moe_layers=layers,
            layer_stacks=["decoder"] * L,
            num_experts=num_experts,
            top_k=state.top_k,
            shared_experts=0,
            capture=traces.Capture(),
            collect={
                **run_summary(params, written, -(-len(written) // step)),
                "imported_files": [{"file": path, "sha256": traces.sha256_file(Path(path))} for path in paths],
                "records": state.records,
                "tokens": tokens,
                "incomplete_tokens": incomplete,
            },
        ).write(temp)
    print(f"import: {tokens} tokens of {len(written)} sequences from {len(paths)} files -> {out} "
          f"({incomplete} incomplete tokens dropped)")
