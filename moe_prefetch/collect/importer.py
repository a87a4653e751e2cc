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
is built under a temporary name and renamed at the end).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_prefetch import traces
from moe_prefetch.collect.chunks import (
    ChunkSequence,
    chunk_table,
    run_summary,
    write_chunk,
)
from moe_prefetch.collect.config import CollectParams
from moe_prefetch.errors import PipelineError
from moe_prefetch.files import atomic_path

REQUIRED = ("sequence_id", "position", "layer", "experts", "weights")
OPTIONAL = ("domain", "document_id", "token_id", "generated")
FORMATS = (".jsonl", ".csv", ".parquet")


class FieldError(Exception):
    """A malformed field of one record: (field, problem); the reader adds file and line."""


def _jsonl(path: str):
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.strip())
            except json.JSONDecodeError as err:
                raise PipelineError(f"collect.import: {path}: line {number}: bad JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise PipelineError(f"collect.import: {path}: line {number}: a record must be a JSON object, got {type(record).__name__}")
            yield number, record


def _csv_value(name: str, text: str):
    text = text.strip()
    if name in ("experts", "weights"):
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise FieldError(name, f"{text!r} is not a JSON list") from None
        try:
            return [(int if name == "experts" else float)(v) for v in re.split(r"[;\s]+", text) if v]
        except ValueError:
            raise FieldError(name, f"{text!r} is not a list of numbers") from None
    if name in ("position", "layer", "token_id"):
        try:
            return int(text)
        except ValueError:
            raise FieldError(name, f"{text!r} is not an integer") from None
    if name == "generated":
        if text.lower() not in ("true", "false", "1", "0"):
            raise FieldError(name, f"{text!r} is not a boolean (true/false/1/0)")
        return text.lower() in ("true", "1")
    return text


def _csv(path: str):
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in REQUIRED if name not in (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"collect.import: {path}: line 1: field {missing[0]!r}: missing column in the header")
        for raw in reader:
            record = {}
            for name, text in raw.items():
                if name in REQUIRED + OPTIONAL and text is not None and text.strip():
                    try:
                        record[name] = _csv_value(name, text)
                    except FieldError as err:
                        raise PipelineError(f"collect.import: {path}: line {reader.line_num}: field {err.args[0]!r}: {err.args[1]}") from None
            yield reader.line_num, record


def _parquet(path: str):
    try:
        handle = pq.ParquetFile(path)
        row = 0
        for batch in handle.iter_batches(batch_size=65536):
            for record in batch.to_pylist():
                yield row, {k: v for k, v in record.items() if v is not None}
                row += 1
    except (pa.ArrowInvalid, OSError) as err:
        raise PipelineError(f"collect.import: {path}: unreadable Parquet ({str(err).splitlines()[0]})") from None


def _where(path: str, number: int) -> str:
    return f"{path}: {'row' if path.endswith('.parquet') else 'line'} {number}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Records:
    """Validated records as columns, plus where each came from (file index, line or row)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.top_k = 0
        self.first_index = 0  # the record that set top_k
        self.columns: dict[str, list] = {name: [] for name in REQUIRED + OPTIONAL + ("file", "number")}
        self.files: list[str] = []
        self.max_id = -1

    def where(self, index: int) -> str:
        return _where(self.files[self.columns["file"][index]], self.columns["number"][index])

    def add(self, file_index: int, number: int, record: dict) -> None:
        for name in REQUIRED:
            if name not in record:
                raise FieldError(name, "missing")
        sequence_id = record["sequence_id"]
        if not (isinstance(sequence_id, str) and sequence_id or _is_int(sequence_id)):
            raise FieldError("sequence_id", f"expected a non-empty string or an integer, got {sequence_id!r}")
        for name in ("position", "layer"):
            if not _is_int(record[name]) or record[name] < 0:
                raise FieldError(name, f"expected an integer >= 0, got {record[name]!r}")
        experts, weights = record["experts"], record["weights"]
        if not isinstance(experts, list) or not experts or not all(_is_int(e) for e in experts):
            raise FieldError("experts", f"expected a non-empty list of integer expert ids, got {experts!r}")
        if not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise FieldError("weights", f"expected a list of numbers, got {weights!r}")
        if len(weights) != len(experts):
            raise FieldError("weights", f"{len(weights)} weights for {len(experts)} experts (the lists must have the same length)")
        if not self.top_k:
            self.top_k, self.first_index = len(experts), len(self.columns["position"])
        elif len(experts) != self.top_k:
            raise FieldError("experts", f"{len(experts)} experts, but k={self.top_k} in the first record ({self.where(self.first_index)}); k must not vary")
        limit = self.num_experts or 2**15  # ids are stored as int16
        for expert, weight in zip(experts, weights):
            if not -1 <= expert < limit:
                raise FieldError("experts", f"expert id {expert} out of range [0, {limit}) (collect.num_experts={self.num_experts}; -1 = dropped)")
            if not math.isfinite(weight):
                raise FieldError("weights", f"weight {weight!r} is not finite")
            if expert == -1 and weight != 0:
                raise FieldError("weights", f"a dropped slot (expert -1) must weigh 0, got {weight!r}")
        kept = [e for e in experts if e != -1]
        if len(set(kept)) != len(kept):
            raise FieldError("experts", f"an expert is listed twice in {experts!r}")
        for name, check, what in (("domain", lambda v: isinstance(v, str) and v, "a non-empty string"),
                                  ("document_id", lambda v: isinstance(v, str) and v, "a non-empty string"),
                                  ("token_id", _is_int, "an integer"), ("generated", lambda v: isinstance(v, bool), "a boolean")):
            if name in record and not check(record[name]):
                raise FieldError(name, f"expected {what}, got {record[name]!r}")
        self.max_id = max(self.max_id, *experts)
        sequence_id = str(sequence_id)
        values = {**record, "sequence_id": sequence_id, "file": file_index, "number": number}
        defaults = {"domain": "imported", "document_id": sequence_id, "token_id": -1, "generated": False}
        for name, column in self.columns.items():
            column.append(values.get(name, defaults.get(name)))

    def read(self, path: str) -> None:
        self.files.append(path)
        reader = {".jsonl": _jsonl, ".csv": _csv, ".parquet": _parquet}[Path(path).suffix]
        try:
            for number, record in reader(path):
                try:
                    self.add(len(self.files) - 1, number, record)
                except FieldError as err:
                    raise PipelineError(f"collect.import: {_where(path, number)}: field {err.args[0]!r}: {err.args[1]}") from None
        except UnicodeDecodeError as err:
            raise PipelineError(f"collect.import: {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _codes(values: list) -> tuple[np.ndarray, list]:
    """Integer codes in order of first appearance, and the distinct values."""
    index: dict = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(index)


def _check_same(records: Records, name: str, group: np.ndarray, order: np.ndarray, owner: str) -> None:
    """Every record of a group (a token or a sequence; `order` sorts the records by group) gives the same `name`."""
    values, _ = _codes(records.columns[name])
    groups, values = group[order], values[order]
    starts = np.r_[True, groups[1:] != groups[:-1]]
    head = np.maximum.accumulate(np.where(starts, np.arange(len(groups)), 0))  # sorted index of each group's first record
    bad = np.flatnonzero(values != values[head])
    if len(bad):
        worst = bad[np.argmin(order[bad])]
        index, earlier = int(order[worst]), int(order[head[worst]])
        raise PipelineError(
            f"collect.import: {records.where(index)}: field {name!r}: {records.columns[name][index]!r} differs from "
            f"{records.columns[name][earlier]!r} given for the same {owner} at {records.where(earlier)}"
        )


def load_records(params: CollectParams) -> tuple[Records, list[str]]:
    paths = sorted(glob.glob(params.import_glob, recursive=True))
    if not paths:
        raise PipelineError(f"collect.import: no file matches {params.import_glob!r}")
    unknown = [p for p in paths if Path(p).suffix not in FORMATS]
    if unknown:
        raise PipelineError(f"collect.import: {unknown[0]}: unsupported format; accepted: {', '.join(FORMATS)}")
    records = Records(params.num_experts)
    for path in paths:
        records.read(path)
    if not records.columns["position"]:
        raise PipelineError(f"collect.import: the files matching {params.import_glob!r} hold no record")
    return records, paths


def import_traces(params: CollectParams, out: Path) -> None:
    """Validate every record, then write chunk files + meta.json into `out` (replaced only on success)."""
    records, paths = load_records(params)
    cols = records.columns
    sequence, sequence_ids = _codes(cols["sequence_id"])
    position, layer = np.asarray(cols["position"], dtype=np.int64), np.asarray(cols["layer"], dtype=np.int64)
    order = np.lexsort((layer, position, sequence))  # stable: a duplicate follows the record it repeats
    key = np.stack([sequence, position, layer], axis=1)[order]
    repeats = np.flatnonzero((key[1:] == key[:-1]).all(axis=1)) + 1
    if len(repeats):
        at = repeats[np.argmin(order[repeats])]
        raise PipelineError(
            f"collect.import: {records.where(int(order[at]))}: field 'layer': duplicate (sequence_id, position, layer) = "
            f"({sequence_ids[key[at, 0]]!r}, {key[at, 1]}, {key[at, 2]}); first given at {records.where(int(order[at - 1]))}"
        )
    new_token = np.r_[True, (key[1:, :2] != key[:-1, :2]).any(axis=1)]
    token = np.empty(len(order), dtype=np.int64)
    token[order] = np.cumsum(new_token) - 1
    _check_same(records, "token_id", token, order, "token")
    _check_same(records, "generated", token, order, "token")
    by_sequence = np.argsort(sequence, kind="stable")
    _check_same(records, "domain", sequence, by_sequence, "sequence")
    _check_same(records, "document_id", sequence, by_sequence, "sequence")

    layers = sorted(set(cols["layer"]))
    sizes = np.bincount(token)
    complete = sizes == len(layers)
    kept = order[complete[token[order]]]  # sorted by (sequence, position, layer), complete tokens only
    if not len(kept):
        raise PipelineError(f"collect.import: no token has routing for all {len(layers)} layers {layers}; nothing to import")
    L, k = len(layers), records.top_k
    experts, weights = traces.best_first(np.asarray(cols["experts"], dtype=np.int16)[kept], np.asarray(cols["weights"], dtype=np.float32)[kept])
    heads = kept[::L]  # one record per token
    token_sequence = sequence[heads]
    bounds = np.flatnonzero(np.r_[True, token_sequence[1:] != token_sequence[:-1], True])
    sequences, rows = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        first = int(heads[start])
        sequences.append(ChunkSequence(sequence_ids[token_sequence[start]], cols["document_id"][first], cols["domain"][first]))
        rows.append({
            "position": position[heads[start:end]].astype(np.int32),
            "token_id": np.asarray([cols["token_id"][i] for i in heads[start:end]], dtype=np.int32),
            "generated": np.asarray([cols["generated"][i] for i in heads[start:end]], dtype=bool),
            "experts": experts[start * L : end * L].reshape(-1, L, k),
            "weights": weights[start * L : end * L].reshape(-1, L, k),
        })
    num_experts = params.num_experts or records.max_id + 1
    if num_experts == 0:
        raise PipelineError("collect.import: every expert slot is -1 (dropped); set collect.num_experts")
    step = params.sequences_per_chunk
    chunks = range(0, len(sequences), step)
    meta = traces.TraceMeta(
        model=f"imported:{params.import_glob}",
        family="imported",
        moe_layers=layers,
        layer_stacks=["decoder"] * L,
        num_experts=num_experts,
        top_k=k,
        shared_experts=0,
        capture=traces.Capture(),
        collect={
            **run_summary(params, sequences, len(chunks)),
            "imported_files": [{"file": path, "sha256": traces.sha256_file(Path(path))} for path in paths],
            "records": len(order),
            "tokens": len(heads),
            "incomplete_tokens": int((~complete).sum()),
        },
    )
    schema = traces.schema(meta.geometry)
    with atomic_path(out) as temp:
        temp.mkdir()
        for start in chunks:
            write_chunk(temp / f"chunk-{start // step:05d}.parquet", chunk_table(sequences[start : start + step], rows[start : start + step], schema))
        meta.write(temp)
    print(f"import: {len(heads)} tokens of {len(sequences)} sequences from {len(paths)} files -> {out} "
          f"({int((~complete).sum())} incomplete tokens dropped)")
