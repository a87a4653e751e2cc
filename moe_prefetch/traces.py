"""The trace/shard schema in one place: column names and types, the manifest, readers into numpy.

One row per recorded token. Routing columns are nested fixed-size lists, outer = MoE layers (in model order),
inner = the k routed experts best-first by gate weight:

| column            | Arrow type                                   | meaning                                        |
|-------------------|----------------------------------------------|------------------------------------------------|
| sequence_id       | string                                       | `<domain>/<document index>/<chunk index>`       |
| document_id       | string                                       | `<domain>/<document name>`; splits group by it  |
| domain            | string                                       | the source the text came from                   |
| position          | int32                                        | token position in the sequence (0-based)        |
| token_id          | int32                                        | tokenizer id of the token                       |
| generated         | bool                                         | produced by generation (not part of the prompt) |
| experts           | fixed_size_list<fixed_size_list<int16, k>, L>| routed experts; -1 = dropped (no expert)        |
| weights           | fixed_size_list<fixed_size_list<float32, k>, L>| their gate weights as dispatched; 0 if dropped |
| router_probs      | fixed_size_list<fixed_size_list<float16, E>, L>| optional: full router distribution           |
| hidden_states     | fixed_size_list<fixed_size_list<float16, D>, L>| optional: hidden state entering each MoE layer|
| lookahead_experts | fixed_size_list<fixed_size_list<fixed_size_list<int16, k>, H>, L> | optional: top-k of MoE layer l+h's router on layer l's input (-1 past the last layer) |
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_prefetch.errors import PipelineError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
META_NAME = "meta.json"  # the collector's model geometry + provenance, written last into the trace directory
ID_COLUMNS = ("sequence_id", "document_id", "domain", "position", "token_id", "generated")


def nested_type(value_type: pa.DataType, *sizes: int) -> pa.DataType:
    """fixed_size_list nesting, innermost size last: nested_type(int16, L, k) -> list<list<int16, k>, L>."""
    out = value_type
    for size in reversed(sizes):
        out = pa.list_(out, size)
    return out


def schema(num_layers: int, top_k: int, num_experts: int, hidden_dim: int = 0, lookahead: int = 0, router_probs: bool = False) -> pa.Schema:
    fields = [
        pa.field("sequence_id", pa.string()),
        pa.field("document_id", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("generated", pa.bool_()),
        pa.field("experts", nested_type(pa.int16(), num_layers, top_k)),
        pa.field("weights", nested_type(pa.float32(), num_layers, top_k)),
    ]
    if router_probs:
        fields.append(pa.field("router_probs", nested_type(pa.float16(), num_layers, num_experts)))
    if hidden_dim:
        fields.append(pa.field("hidden_states", nested_type(pa.float16(), num_layers, hidden_dim)))
    if lookahead:
        fields.append(pa.field("lookahead_experts", nested_type(pa.int16(), num_layers, lookahead, top_k)))
    return pa.schema(fields)


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    """What data/shards/manifest.json holds: the model's routing geometry and every shard's checksum."""

    model: str
    family: str
    moe_layers: list[int]  # true model layer index of each recorded MoE layer, in order
    layer_stacks: list[str]  # "decoder" (or "encoder" for encoder-decoder models) per recorded MoE layer
    num_experts: int
    top_k: int
    shared_experts: int
    domains: list[str]
    shards: list[dict]  # {"file", "rows", "sha256"}
    capture: dict
    collect: dict  # collect params and provenance (python version of built-in text, sequences per domain)
    rows: int = 0
    schema_version: int = SCHEMA_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @staticmethod
    def read(directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        if not path.exists():
            raise PipelineError(f"{path}: missing; run the shard stage (dvc repro shard)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PipelineError(f"{path}: schema_version {version!r} is not supported; this code reads version {SCHEMA_VERSION}")
        try:
            return Manifest(**raw)
        except TypeError as err:
            raise PipelineError(f"{path}: malformed manifest ({err})") from None


@dataclass
class RoutingTable:
    """Routing of N tokens as numpy arrays, ordered by sequence then position."""

    experts: np.ndarray  # (N, L, k) int16, best-first, -1 = none
    weights: np.ndarray  # (N, L, k) float32
    sequence_index: np.ndarray  # (N,) int64, index into `sequence_ids`
    document_index: np.ndarray  # (N,) int64, index into `document_ids`
    domain_index: np.ndarray  # (N,) int64, index into `domains`
    position: np.ndarray  # (N,) int32
    generated: np.ndarray  # (N,) bool
    sequence_ids: list[str]
    document_ids: list[str]
    domains: list[str]
    lookahead_experts: np.ndarray | None = None  # (N, L, H, k) int16, when captured
    hidden_states: np.ndarray | None = None  # (N, L, D) float16, when captured


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


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
        shape = (manifest.num_layers, manifest.top_k)
        check_routing(path, column_to_numpy(table["experts"], shape), column_to_numpy(table["weights"], shape), manifest.num_experts)
    return table


def read_routing(directory: Path, manifest: Manifest, shards: list[dict] | None = None, with_hidden: bool = False) -> RoutingTable:
    """Read (a subset of) the shards into a RoutingTable, verifying checksums and value ranges."""
    entries = manifest.shards if shards is None else shards
    columns = list(ID_COLUMNS) + ["experts", "weights"]
    if manifest.capture.get("lookahead"):
        columns.append("lookahead_experts")
    if with_hidden:
        columns.append("hidden_states")
    table = pa.concat_tables([read_shard(directory, entry, manifest, columns) for entry in entries])
    L, k = manifest.num_layers, manifest.top_k
    experts = column_to_numpy(table["experts"], (L, k))
    weights = column_to_numpy(table["weights"], (L, k))
    sequence_index, sequence_ids = _codes(table["sequence_id"])
    document_index, document_ids = _codes(table["document_id"])
    domain_index, domains = _codes(table["domain"])
    lookahead = None
    if "lookahead_experts" in table.column_names:
        lookahead = column_to_numpy(table["lookahead_experts"], (L, manifest.capture["lookahead"], k))
    hidden = None
    if with_hidden:
        hidden = column_to_numpy(table["hidden_states"], (L, manifest.capture["hidden_dim"]))
    return RoutingTable(
        experts=experts,
        weights=weights,
        sequence_index=sequence_index,
        document_index=document_index,
        domain_index=domain_index,
        position=table["position"].to_numpy(),
        generated=table["generated"].to_numpy(zero_copy_only=False),
        sequence_ids=sequence_ids,
        document_ids=document_ids,
        domains=domains,
        lookahead_experts=lookahead,
        hidden_states=hidden,
    )
