"""The trace/shard schema in one place: the registered columns, the trace metadata and manifest, readers into numpy.

One row per recorded token. Every column is declared once in TRACE_COLUMNS (its Arrow value type, its shape per
token in the trace geometry's sizes, the capture setting that turns it on, its meaning); `schema()`, the collect
and import writers, the shard stage's validation and `read_routing` all work from that registry, so a new capture
column is one registration (plus the code that records it). Routing columns are nested fixed-size lists, outer =
MoE layers (in model order), inner = the k routed experts best-first by gate weight. Sizes: L MoE layers, k routed
experts per token, E experts per layer, D stored hidden-state width, H look-ahead depth. An optional column exists
only when the `capture` entry of meta.json turns it on (the setting in parentheses; tests/test_traces.py checks
that this table lists exactly the registered columns):

| column            | Arrow type                                                  | meaning                                         |
|-------------------|-------------------------------------------------------------|-------------------------------------------------|
| sequence_id       | string                                                      | `<domain>/<document index>/<chunk index>`       |
| document_id       | string                                                      | `<domain>/<document name>`; splits group by it  |
| domain            | string                                                      | the source the text came from                   |
| position          | int32                                                       | token position in the sequence (0-based)        |
| token_id          | int32                                                       | tokenizer id of the token                       |
| generated         | bool                                                        | produced by generation (not part of the prompt) |
| experts           | fixed_size_list<fixed_size_list<int16, k>, L>               | routed experts; -1 = dropped (no expert)        |
| weights           | fixed_size_list<fixed_size_list<float32, k>, L>             | their gate weights as dispatched; 0 if dropped  |
| router_probs      | fixed_size_list<fixed_size_list<float16, E>, L>             | optional (router_probs): full router distribution |
| hidden_states     | fixed_size_list<fixed_size_list<float16, D>, L>             | optional (hidden_dim): hidden state entering each MoE layer |
| lookahead_experts | fixed_size_list<fixed_size_list<fixed_size_list<int16, k>, H>, L> | optional (lookahead): top-k of MoE layer l+h's router on layer l's input, h = 1..H (-1 past the last layer) |

`<traces>/meta.json` (TraceMeta, written by collect and collect.import) and `<shards>/manifest.json` (Manifest,
written by the shard stage) describe a trace set; both follow schema version SCHEMA_VERSION. Only the manifest
stores it (`schema_version`): meta.json's bytes are recorded in dvc.lock, so its layout is versioned here, in code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_prefetch.errors import PipelineError
from moe_prefetch.files import write_json
from moe_prefetch.registry import Registry

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
META_NAME = "meta.json"  # the collector's model geometry + provenance, written last into the trace directory


# -- geometry --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capture:
    """What a trace records beyond expert ids and gate weights: the `capture` entry of meta.json and the manifest."""

    router_probs: bool = False
    hidden_dim: int = 0  # D: width of the stored hidden states (projected, or the model's); 0 = not captured
    hidden_projection_seed: int | None = None  # seed of the fixed random projection to hidden_dim; None = none
    lookahead: int = 0  # H: stale-gate look-ahead depth; 0 = not captured

    @staticmethod
    def of(raw: dict, where: Path | str) -> Capture:
        """A `capture` mapping read from `where`; unknown keys are a one-line error."""
        try:
            return Capture(**raw)
        except TypeError as err:
            raise PipelineError(f"{where}: capture: {err}") from None


@dataclass(frozen=True)
class TraceGeometry:
    """The sizes a trace's columns are shaped by: the model's routing (L, k, E) and what was captured (D, H)."""

    num_layers: int  # L: recorded MoE layers
    top_k: int  # k
    num_experts: int  # E
    capture: Capture = Capture()

    def size(self, dim: str) -> int:
        """The size a TraceColumn dimension letter stands for."""
        return {"L": self.num_layers, "k": self.top_k, "E": self.num_experts, "D": self.capture.hidden_dim,
                "H": self.capture.lookahead}[dim]


# -- the columns -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceColumn:
    """One column of the trace/shard schema."""

    value_type: pa.DataType  # of the innermost values
    dims: tuple[str, ...]  # per-token shape, outermost first, as TraceGeometry.size letters; () = one value per token
    meaning: str
    capture: str | None = None  # the Capture field that turns the column on (present when truthy); None = always

    def present(self, capture: Capture) -> bool:
        return self.capture is None or bool(getattr(capture, self.capture))

    def shape(self, geometry: TraceGeometry) -> tuple[int, ...]:
        return tuple(geometry.size(dim) for dim in self.dims)

    def arrow_type(self, geometry: TraceGeometry) -> pa.DataType:
        return nested_type(self.value_type, *self.shape(geometry))


TRACE_COLUMNS: Registry[TraceColumn] = Registry("trace column")  # in schema (column) order
TRACE_COLUMNS.add("sequence_id", TraceColumn(pa.string(), (), "`<domain>/<document index>/<chunk index>`"))
TRACE_COLUMNS.add("document_id", TraceColumn(pa.string(), (), "`<domain>/<document name>`; splits group by it"))
TRACE_COLUMNS.add("domain", TraceColumn(pa.string(), (), "the source the text came from"))
TRACE_COLUMNS.add("position", TraceColumn(pa.int32(), (), "token position in the sequence (0-based)"))
TRACE_COLUMNS.add("token_id", TraceColumn(pa.int32(), (), "tokenizer id of the token"))
TRACE_COLUMNS.add("generated", TraceColumn(pa.bool_(), (), "produced by generation (not part of the prompt)"))
TRACE_COLUMNS.add("experts", TraceColumn(pa.int16(), ("L", "k"), "routed experts; -1 = dropped (no expert)"))
TRACE_COLUMNS.add("weights", TraceColumn(pa.float32(), ("L", "k"), "their gate weights as dispatched; 0 if dropped"))
TRACE_COLUMNS.add("router_probs", TraceColumn(pa.float16(), ("L", "E"), "full router distribution", "router_probs"))
TRACE_COLUMNS.add("hidden_states", TraceColumn(pa.float16(), ("L", "D"), "hidden state entering each MoE layer", "hidden_dim"))
TRACE_COLUMNS.add("lookahead_experts", TraceColumn(
    pa.int16(), ("L", "H", "k"), "top-k of MoE layer l+h's router on layer l's input, h = 1..H (-1 past the last layer)",
    "lookahead"))
ID_COLUMNS = tuple(name for name, column in TRACE_COLUMNS.items() if not column.dims)  # one value per token
ROUTING_COLUMNS = tuple(name for name, column in TRACE_COLUMNS.items() if column.dims)  # per MoE layer


def nested_type(value_type: pa.DataType, *sizes: int) -> pa.DataType:
    """fixed_size_list nesting, innermost size last: nested_type(int16, L, k) -> list<list<int16, k>, L>."""
    out = value_type
    for size in reversed(sizes):
        out = pa.list_(out, size)
    return out


def schema(geometry: TraceGeometry) -> pa.Schema:
    """The Arrow schema of a trace chunk or shard of this geometry: the registered columns its capture turns on."""
    return pa.schema([pa.field(name, column.arrow_type(geometry)) for name, column in TRACE_COLUMNS.items()
                      if column.present(geometry.capture)])


def nested_array(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A (N, d1, d2, ...) numpy array as a column of nested fixed-size lists."""
    out = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    for size in reversed(values.shape[1:]):
        out = pa.FixedSizeListArray.from_arrays(out, size)
    return out


def column_to_numpy(column: pa.ChunkedArray | pa.Array, shape_tail: tuple[int, ...]) -> np.ndarray:
    """Inverse of nested_array: a nested fixed-size list column as a (N, *shape_tail) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column
    for _ in shape_tail:
        flat = flat.flatten()
    return flat.to_numpy(zero_copy_only=False).reshape(len(column), *shape_tail)


def column_array(name: str, values: np.ndarray) -> pa.Array:
    """Registered column `name` from a (N, *shape) numpy array (the shape its dims give)."""
    return nested_array(values, TRACE_COLUMNS[name].value_type)


def read_column(table: pa.Table, name: str, geometry: TraceGeometry) -> np.ndarray:
    """Registered column `name` of a trace table as a (N, *shape) numpy array."""
    return column_to_numpy(table[name], TRACE_COLUMNS[name].shape(geometry))


def dictionary_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """(N,) int64 codes into the distinct values, and those values in order of first appearance."""
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


def best_first(experts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (expert, weight) pairs (rows = first axis, k along the second) by weight, descending; equal
    weights keep the lower expert id first. The order every trace stores. This is the one numpy implementation
    (collect.import uses it); moe_prefetch.routing.base.best_first, the torch one collect uses, must agree
    (tests/test_traces.py compares them)."""
    by_id = np.argsort(experts, axis=1, kind="stable")
    experts, weights = np.take_along_axis(experts, by_id, 1), np.take_along_axis(weights, by_id, 1)
    order = np.argsort(-weights, axis=1, kind="stable")
    return np.take_along_axis(experts, order, 1), np.take_along_axis(weights, order, 1)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- metadata --------------------------------------------------------------------------------------------------
def _read_json_object(path: Path, missing: str) -> dict:
    """A JSON object file; missing, invalid or not an object is a one-line error (`missing` says how to make it)."""
    if not path.exists():
        raise PipelineError(f"{path}: missing; {missing}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


@dataclass
class ModelRouting:
    """The model a trace comes from and its routing geometry: the first fields of meta.json and manifest.json."""

    model: str
    family: str
    moe_layers: list[int]  # true model layer index of each recorded MoE layer, in order
    layer_stacks: list[str]  # "decoder" (or "encoder" for encoder-decoder models) per recorded MoE layer
    num_experts: int
    top_k: int
    shared_experts: int


@dataclass
class TraceMeta(ModelRouting):
    """What <traces>/meta.json holds: the model's routing geometry, what was captured and how it was collected.
    Written by collect (moe_prefetch/collect/collector.py) and collect.import; the shard stage carries it into the
    manifest. Serialised as these fields in this order (json, indent 2): the bytes are pinned by dvc.lock."""

    capture: Capture
    collect: dict  # params and provenance; the shard stage reads "chunks" and "domains"

    @property
    def geometry(self) -> TraceGeometry:
        return TraceGeometry(len(self.moe_layers), self.top_k, self.num_experts, self.capture)

    def write(self, directory: Path) -> None:
        write_json(directory / META_NAME, asdict(self))

    @staticmethod
    def read(directory: Path) -> TraceMeta:
        path = directory / META_NAME
        raw = _read_json_object(path, "the collect stage did not finish (re-run dvc repro collect)")
        try:
            return TraceMeta(**{**raw, "capture": Capture.of(raw.get("capture", {}), path)})
        except TypeError as err:
            raise PipelineError(f"{path}: malformed meta.json ({err}); re-run dvc repro -f collect") from None

    def manifest(self, shards: list[dict]) -> Manifest:
        """The manifest of these traces cut into `shards` ({"file", "rows", "sha256"} each)."""
        return Manifest(
            **{f.name: getattr(self, f.name) for f in fields(ModelRouting)}, domains=self.collect["domains"], shards=shards, capture=asdict(self.capture), collect=self.collect,
            rows=sum(entry["rows"] for entry in shards),
        )


@dataclass
class Manifest(ModelRouting):
    """What data/shards/manifest.json holds: the model's routing geometry and every shard's checksum."""

    domains: list[str]
    shards: list[dict]  # {"file", "rows", "sha256"}
    capture: dict  # Capture's fields
    collect: dict  # collect params and provenance (python version of built-in text, sequences per domain)
    rows: int = 0
    schema_version: int = SCHEMA_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def geometry(self) -> TraceGeometry:
        return TraceGeometry(self.num_layers, self.top_k, self.num_experts, Capture.of(self.capture, MANIFEST_NAME))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @staticmethod
    def read(directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        raw = _read_json_object(path, "run the shard stage (dvc repro shard)")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PipelineError(f"{path}: schema_version {version!r} is not supported; this code reads version {SCHEMA_VERSION}")
        try:
            return Manifest(**raw)
        except TypeError as err:
            raise PipelineError(f"{path}: malformed manifest ({err})") from None


# -- reading shards --------------------------------------------------------------------------------------------
def check_routing(where: Path, experts: np.ndarray, weights: np.ndarray, num_experts: int) -> None:
    """Expert ids (N, L, k) within [-1, num_experts) (-1 = dropped token) and finite gate weights, else a one-line
    error naming the first bad row and MoE layer."""
    bad = (experts < -1) | (experts >= num_experts)
    if bad.any():
        row, layer, slot = np.argwhere(bad)[0]
        raise PipelineError(f"{where}: row {row}, MoE layer {layer}: expert id {experts[row, layer, slot]} out of range [0, {num_experts})")
    finite = np.isfinite(weights)
    if not finite.all():
        row, layer, _ = np.argwhere(~finite)[0]
        raise PipelineError(f"{where}: row {row}, MoE layer {layer}: gate weight is NaN or infinite")


def verify_shard(directory: Path, entry: dict) -> Path:
    """Check that a shard listed in the manifest exists and matches its checksum."""
    path = directory / entry["file"]
    if not path.exists():
        raise PipelineError(f"{path}: listed in the manifest but missing; re-run the shard stage (dvc repro -f shard)")
    if sha256_file(path) != entry["sha256"]:
        raise PipelineError(f"{path}: sha256 does not match the manifest (truncated or modified); re-run dvc repro -f shard")
    return path


def read_shard(directory: Path, entry: dict, manifest: Manifest, columns: list[str] | None = None) -> pa.Table:
    """One shard listed in the manifest: checksum verified, Parquet errors and bad routing values (when the
    experts/weights columns are read) turned into one-line errors."""
    path = verify_shard(directory, entry)
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise PipelineError(f"{path}: unreadable Parquet ({err})") from None
    if "experts" in table.column_names and "weights" in table.column_names:
        geometry = manifest.geometry
        check_routing(path, read_column(table, "experts", geometry), read_column(table, "weights", geometry), manifest.num_experts)
    return table


@dataclass
class RoutingTable:
    """Routing of N tokens as numpy arrays, ordered by sequence then position; one field per registered column
    (the string columns as codes into their distinct values)."""

    sequence_index: np.ndarray  # (N,) int64, index into `sequence_ids`
    document_index: np.ndarray  # (N,) int64, index into `document_ids`
    domain_index: np.ndarray  # (N,) int64, index into `domains`
    position: np.ndarray  # (N,) int32
    token_id: np.ndarray  # (N,) int32
    generated: np.ndarray  # (N,) bool
    sequence_ids: list[str]
    document_ids: list[str]
    domains: list[str]
    experts: np.ndarray  # (N, L, k) int16, best-first, -1 = none
    weights: np.ndarray  # (N, L, k) float32
    router_probs: np.ndarray | None = None  # (N, L, E) float16, when captured
    hidden_states: np.ndarray | None = None  # (N, L, D) float16, when captured and asked for
    lookahead_experts: np.ndarray | None = None  # (N, L, H, k) int16, when captured


def read_routing(directory: Path, manifest: Manifest | None = None, shards: list[dict] | None = None,
                 with_hidden: bool = False) -> RoutingTable:
    """The shards in `directory` (or the listed subset) as numpy arrays, checksums and value ranges verified:
    every captured column, hidden states (L x D values per token, the bulk of a shard) only with `with_hidden`.

        from moe_prefetch.traces import read_routing
        routing = read_routing(Path("data/shards"))   # routing.experts[i, l]: token i's experts at MoE layer l
    """
    manifest = Manifest.read(Path(directory)) if manifest is None else manifest
    geometry = manifest.geometry
    routing = [name for name in ROUTING_COLUMNS if TRACE_COLUMNS[name].present(geometry.capture)
               and (with_hidden or name != "hidden_states")]
    entries = manifest.shards if shards is None else shards
    table = pa.concat_tables([read_shard(Path(directory), entry, manifest, list(ID_COLUMNS) + routing) for entry in entries])
    sequence_index, sequence_ids = dictionary_codes(table["sequence_id"])
    document_index, document_ids = dictionary_codes(table["document_id"])
    domain_index, domains = dictionary_codes(table["domain"])
    return RoutingTable(
        sequence_index=sequence_index,
        document_index=document_index,
        domain_index=domain_index,
        position=table["position"].to_numpy(),
        token_id=table["token_id"].to_numpy(),
        generated=table["generated"].to_numpy(zero_copy_only=False),
        sequence_ids=sequence_ids,
        document_ids=document_ids,
        domains=domains,
        **{name: read_column(table, name, geometry) for name in routing},
    )
