"""collect.import's readers: routing records (JSON Lines, CSV, Parquet) as validated column batches of bounded size.

Two ways to read a file, yielding the same batches for good input:

- fast: Arrow's readers on bounded pieces (pyarrow.json.read_json per 8 MB of lines, ParquetFile.iter_batches) with every check vectorised
  per batch of BATCH_RECORDS records. It knows no line numbers, so on anything it cannot accept (a parse error,
  a check failing, an integer sequence_id in JSON Lines) it raises Inexact and the import restarts exactly.
- exact: one record at a time in Python (json, csv), the only path for CSV, and the one that names file, line
  (Parquet: 0-based row) and field of the first malformed record.

A batch is a dict of numpy arrays, one entry per record (module docstring of importer.py for the fields):
sequence / domain / document (int64 codes into ImportState's first-appearance dictionaries), position, layer,
token_id (int64), generated (bool), experts (n, k) int16, weights (n, k) float32, file (index into
ImportState.files), number (line or row; -1 on the fast path) and index (position in the whole input).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from moe_prefetch.errors import PipelineError

REQUIRED = ("sequence_id", "position", "layer", "experts", "weights")
OPTIONAL = ("domain", "document_id", "token_id", "generated")
FORMATS = (".jsonl", ".csv", ".parquet")
BATCH_RECORDS = 1 << 16  # records per batch: memory per batch is about 100 bytes x this
ID_LIMIT = 2**15  # expert ids are stored as int16
JSON_SCHEMA = pa.schema([("sequence_id", pa.string()), ("position", pa.int64()), ("layer", pa.int64()),
                         ("experts", pa.list_(pa.int64())), ("weights", pa.list_(pa.float64())), ("domain", pa.string()),
                         ("document_id", pa.string()), ("token_id", pa.int64()), ("generated", pa.bool_())])


class FieldError(Exception):
    """A malformed field of one record: (field, problem); the reader adds file and line."""


class Inexact(Exception):
    """The fast path met something only the exact path can accept or name; the import restarts exactly."""


def where(path: str, number: int) -> str:
    return f"{path}: {'row' if path.endswith('.parquet') else 'line'} {number}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ImportState:
    """What the import learns across files: k, the largest id, the layers, and the dictionaries that code
    sequence, domain and document ids in order of first appearance (one entry per sequence, not per record)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.top_k = 0
        self.first_where = ""  # the record that set top_k
        self.max_id = -1
        self.layers: set[int] = set()
        self.files: list[str] = []
        self.records = 0
        self.codes: dict[str, dict[str, int]] = {"sequence": {}, "domain": {}, "document": {}}
        self.listed: dict[str, list[str]] = {name: [] for name in self.codes}  # the same values, indexed by code

    def values(self, name: str) -> list[str]:
        """The distinct values of code dictionary `name`, indexed by code (kept as they come: not rebuilt per call)."""
        return self.listed[name]

    def code(self, name: str, values: list[str]) -> np.ndarray:
        """The codes of `values` in dictionary `name`; unseen values get the next codes, in order."""
        codes, listed = self.codes[name], self.listed[name]
        out = np.empty(len(values), dtype=np.int64)
        for position, value in enumerate(values):
            code = codes.get(value)
            if code is None:
                code = codes[value] = len(listed)
                listed.append(value)
            out[position] = code
        return out

    def code_array(self, name: str, column: pa.Array) -> np.ndarray:
        """code() of a string column, looking up each distinct value once (Arrow's encoding keeps first-appearance order)."""
        encoded = pc.dictionary_encode(column)
        return self.code(name, encoded.dictionary.to_pylist())[encoded.indices.to_numpy(zero_copy_only=False)]

    def limit(self) -> int:
        return self.num_experts or ID_LIMIT

    def finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Account a validated batch (ids, layers, record indices) and return it."""
        n = len(batch["position"])
        batch["index"] = np.arange(self.records, self.records + n, dtype=np.int64)
        self.records += n
        self.max_id = max(self.max_id, int(batch["experts"].max()))
        self.layers.update(np.unique(batch["layer"]).tolist())
        return batch


# -- exact: one record at a time ---------------------------------------------------------------------------------
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
    row = 0
    for batch in parquet_batches(path):
        for record in batch.to_pylist():
            yield row, {k: v for k, v in record.items() if v is not None}
            row += 1


def parquet_batches(path: str):
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_RECORDS)
    except (pa.ArrowInvalid, OSError) as err:
        raise PipelineError(f"collect.import: {path}: unreadable Parquet ({str(err).splitlines()[0]})") from None


def checked_record(state: ImportState, record: dict, where_now: str) -> tuple:
    """(sequence_id, position, layer, experts, weights, domain, document_id, token_id, generated) of a valid record,
    defaults filled in; FieldError names the first bad field."""
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
    if not state.top_k:
        state.top_k, state.first_where = len(experts), where_now
    elif len(experts) != state.top_k:
        raise FieldError("experts", f"{len(experts)} experts, but k={state.top_k} in the first record ({state.first_where}); k must not vary")
    limit = state.limit()
    for expert, weight in zip(experts, weights):
        if not -1 <= expert < limit:
            raise FieldError("experts", f"expert id {expert} out of range [0, {limit}) (collect.num_experts={state.num_experts}; -1 = dropped)")
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
    sequence_id = str(sequence_id)
    return (sequence_id, record["position"], record["layer"], experts, weights, record.get("domain", "imported"),
            record.get("document_id", sequence_id), record.get("token_id", -1), record.get("generated", False))


def _exact_batch(state: ImportState, file_index: int, numbers: list[int], records: list[tuple]) -> dict[str, np.ndarray]:
    sequence, position, layer, experts, weights, domain, document, token_id, generated = zip(*records)
    return state.finish({
        "sequence": state.code("sequence", sequence), "domain": state.code("domain", domain), "document": state.code("document", document),
        "position": np.asarray(position, dtype=np.int64), "layer": np.asarray(layer, dtype=np.int64),
        "token_id": np.asarray(token_id, dtype=np.int64), "generated": np.asarray(generated, dtype=bool),
        "experts": np.asarray(experts, dtype=np.int16), "weights": np.asarray(weights, dtype=np.float32),
        "file": np.full(len(records), file_index, dtype=np.int32), "number": np.asarray(numbers, dtype=np.int64),
    })


def exact_batches(state: ImportState, path: str):
    """Batches of `path` read one record at a time; a malformed record is a one-line PipelineError."""
    state.files.append(path)
    file_index = len(state.files) - 1
    reader = {".jsonl": _jsonl, ".csv": _csv, ".parquet": _parquet}[Path(path).suffix]
    numbers, records = [], []
    try:
        for number, record in reader(path):
            try:
                records.append(checked_record(state, record, where(path, number)))
            except FieldError as err:
                raise PipelineError(f"collect.import: {where(path, number)}: field {err.args[0]!r}: {err.args[1]}") from None
            numbers.append(number)
            if len(records) == BATCH_RECORDS:
                yield _exact_batch(state, file_index, numbers, records)
                numbers, records = [], []
    except UnicodeDecodeError as err:
        raise PipelineError(f"collect.import: {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if records:
        yield _exact_batch(state, file_index, numbers, records)


# -- fast: Arrow batches, checks vectorised ----------------------------------------------------------------------
def _require(condition) -> None:
    if not condition:
        raise Inexact


def _strings(column: pa.Array, default: pa.Array | str | None) -> pa.Array:
    """A string column with nulls = `default` (none allowed without one), checked non-empty; integers become their digits."""
    if pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
    _require(pa.types.is_string(column.type) or pa.types.is_large_string(column.type))
    if column.null_count:
        _require(default is not None)
        column = pc.fill_null(column, default) if isinstance(default, str) else pc.if_else(pc.is_null(column), default, column)
    _require(not pc.any(pc.equal(pc.utf8_length(column), 0)).as_py())
    return column


def _integers(column: pa.Array | None, minimum: int | None = None, default: int | None = None) -> np.ndarray:
    """An integer column as int64, nulls = `default` (none allowed without one), every value >= `minimum` if given."""
    _require(column is not None and pa.types.is_integer(column.type))
    if column.null_count:
        _require(default is not None)
        column = pc.fill_null(column, default)
    values = column.to_numpy(zero_copy_only=False).astype(np.int64)
    _require(minimum is None or not len(values) or values.min() >= minimum)
    return values


def _lists(column: pa.Array | None, k: int, kind) -> np.ndarray:
    """(n, k) values of a list column whose every list has k non-null values of `kind` (is_integer / is_floating)."""
    _require(column is not None and column.null_count == 0 and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)))
    _require(pc.all(pc.equal(pc.list_value_length(column), k)).as_py() is not False)
    values = pc.list_flatten(column)
    _require(values.null_count == 0 and (kind(values.type) or pa.types.is_integer(values.type)))
    return values.to_numpy(zero_copy_only=False).reshape(len(column), k)


def _arrow_batch(state: ImportState, file_index: int, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """The checks of checked_record(), vectorised over `batch`; Inexact wherever a record would fail one."""
    columns = {name: batch.column(name) if name in batch.schema.names else None for name in REQUIRED + OPTIONAL}
    n = batch.num_rows
    _require(columns["sequence_id"] is not None and columns["sequence_id"].null_count == 0)
    if not state.top_k:  # the first record sets k (its list must be valid, checked below with the rest)
        lengths = pc.list_value_length(columns["experts"]) if columns["experts"] is not None else None
        _require(lengths is not None and lengths[0].is_valid and lengths[0].as_py() > 0)
        state.top_k = lengths[0].as_py()  # no first_where: a k that varies restarts exactly, which names both records
    k = state.top_k
    experts = _lists(columns["experts"], k, pa.types.is_integer).astype(np.int64)
    weights = _lists(columns["weights"], k, pa.types.is_floating).astype(np.float64)
    _require(experts.min() >= -1 and experts.max() < state.limit() and np.isfinite(weights).all())
    _require(not ((experts == -1) & (weights != 0)).any())
    ordered = np.sort(experts, axis=1)
    _require(not ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != -1)).any())
    sequence_ids = _strings(columns["sequence_id"], None)  # (n,) string
    generated = columns["generated"]
    if generated is not None:
        _require(pa.types.is_boolean(generated.type))
        generated = pc.fill_null(generated, False).to_numpy(zero_copy_only=False)
    documents = columns["document_id"]
    return state.finish({
        "sequence": state.code_array("sequence", sequence_ids),
        "domain": state.code_array("domain", _strings(columns["domain"], "imported")) if columns["domain"] is not None
        else np.full(n, state.code("domain", ["imported"])[0]),
        "document": state.code_array("document", sequence_ids if documents is None else _strings(documents, sequence_ids)),
        "position": _integers(columns["position"], minimum=0), "layer": _integers(columns["layer"], minimum=0),
        "token_id": np.full(n, -1, dtype=np.int64) if columns["token_id"] is None else _integers(columns["token_id"], default=-1),
        "generated": np.zeros(n, dtype=bool) if generated is None else generated,
        "experts": experts.astype(np.int16), "weights": weights.astype(np.float32),
        "file": np.full(n, file_index, dtype=np.int32), "number": np.full(n, -1, dtype=np.int64),
    })


JSON_PIECE_BYTES = 8 << 20  # JSON Lines parsed per read_json call


def _json_batches(path: str):
    """Record batches of a JSON Lines file, parsed JSON_PIECE_BYTES (cut at a line end) at a time. Not
    pyarrow.json.open_json: its reader runs far ahead of a slower consumer (430 MB allocated at 10^7 records here)."""
    options = pa_json.ParseOptions(explicit_schema=JSON_SCHEMA, unexpected_field_behavior="ignore")
    with open(path, "rb") as handle:
        rest = b""  # the start of a line the last block cut
        while True:
            block = handle.read(JSON_PIECE_BYTES)
            data = rest + block
            cut = len(data) if not block else data.rfind(b"\n") + 1  # 0: no line end yet, read on
            piece, rest = data[:cut], data[cut:]
            if piece.strip():
                yield from pa_json.read_json(pa.py_buffer(piece if piece.endswith(b"\n") else piece + b"\n"),
                                             parse_options=options).to_batches()
            if not block:
                return


def fast_batches(state: ImportState, path: str):
    """Batches of a JSON Lines or Parquet file through Arrow's streaming readers; Inexact for CSV or any doubt."""
    suffix = Path(path).suffix
    _require(suffix in (".jsonl", ".parquet"))
    state.files.append(path)
    file_index = len(state.files) - 1
    try:
        batches = parquet_batches(path) if suffix == ".parquet" else _json_batches(path)
        for batch in batches:
            for start in range(0, batch.num_rows, BATCH_RECORDS):
                piece = batch.slice(start, BATCH_RECORDS)
                if piece.num_rows:
                    yield _arrow_batch(state, file_index, piece)
    except (pa.ArrowInvalid, pa.ArrowTypeError, PipelineError):
        raise Inexact from None
