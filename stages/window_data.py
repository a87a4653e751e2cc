"""The windows file format (one Parquet file per split) and its reader into numpy (`WindowSet`).

A window is one (token, target MoE layer t) pair. With context length c and horizon h:

    context  = routed experts of MoE layers t-h-c+1 .. t-h of this token   (c layers x k experts)
    target   = routed experts of MoE layer t of this token, with their gate weights

| column              | type                          | meaning                                                   |
|---------------------|-------------------------------|-----------------------------------------------------------|
| sequence_id         | string                        | sequence the token belongs to                             |
| domain              | string                        | its source                                                |
| position            | int32                         | token position                                            |
| target_layer        | int16                         | t, as an index into the manifest's MoE layers             |
| context_experts     | fixed_size_list<int16, c*k>   | context, layer-major (oldest layer first), best-first     |
| target_experts      | fixed_size_list<int16, k>     | target routed set, best-first (-1 = dropped)              |
| target_weights      | fixed_size_list<float32, k>   | their gate weights                                        |
| prev_token_experts  | fixed_size_list<int16, k>     | layer t's experts of the previous token (-1 at position 0)|
| stale_gate_experts  | fixed_size_list<int16, k>     | optional: layer t's router applied at layer t-h           |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.errors import PipelineError

SPLITS = ("train", "val", "test")
SUMMARY_NAME = "summary.json"


@dataclass
class WindowSet:
    """All windows of one split as numpy arrays (N windows)."""

    context_experts: np.ndarray  # (N, c, k) int16
    target_layer: np.ndarray  # (N,) int16
    target_experts: np.ndarray  # (N, k) int16
    target_weights: np.ndarray  # (N, k) float32
    prev_token_experts: np.ndarray  # (N, k) int16
    position: np.ndarray  # (N,) int32
    domain_index: np.ndarray  # (N,) int64 into `domains`
    sequence_index: np.ndarray  # (N,) int64 into `sequence_ids`
    domains: list[str]
    sequence_ids: list[str]
    stale_gate_experts: np.ndarray | None = None  # (N, k) int16

    def __len__(self) -> int:
        return len(self.target_layer)

    def subset(self, rows: np.ndarray) -> WindowSet:
        """The windows at `rows` (an index or boolean array), sharing the lookup lists."""
        fields = {}
        for name, value in self.__dict__.items():
            fields[name] = value[rows] if isinstance(value, np.ndarray) else value
        return WindowSet(**fields)


def read_summary(directory: Path) -> dict:
    path = directory / SUMMARY_NAME
    if not path.exists():
        raise PipelineError(f"{path}: missing; run the windows stage (dvc repro windows)")
    return json.loads(path.read_text())


def _fixed(column: pa.ChunkedArray, *shape: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), *shape)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


def read_windows(directory: Path, split: str) -> WindowSet:
    """Read one split; a missing or empty split is a one-line error."""
    summary = read_summary(directory)
    path = directory / f"{split}.parquet"
    if not path.exists():
        raise PipelineError(f"{path}: missing; re-run the windows stage (dvc repro -f windows)")
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise PipelineError(f"{path}: the {split} split has no windows; check windows.split (fractions, test_domain)")
    c, k = summary["context_length"], summary["top_k"]
    domain_index, domains = _codes(table["domain"])
    sequence_index, sequence_ids = _codes(table["sequence_id"])
    return WindowSet(
        context_experts=_fixed(table["context_experts"], c, k),
        target_layer=table["target_layer"].to_numpy(),
        target_experts=_fixed(table["target_experts"], k),
        target_weights=_fixed(table["target_weights"], k),
        prev_token_experts=_fixed(table["prev_token_experts"], k),
        position=table["position"].to_numpy(),
        domain_index=domain_index,
        sequence_index=sequence_index,
        domains=domains,
        sequence_ids=sequence_ids,
        stale_gate_experts=_fixed(table["stale_gate_experts"], k) if "stale_gate_experts" in table.column_names else None,
    )
