"""The windows file format (one Parquet file per split) and its reader into numpy (`WindowSet`).

A window is one (token i, target MoE layer t) pair. With context length c, horizon h, and the optional
temporal extents T = windows.token_context and H = windows.token_horizon (both 0 by default):

    context  = routed experts of MoE layers t-h-c+1 .. t-h of token i         (c layers x k experts)
    target   = routed experts of MoE layer t of token i, with their gate weights
    T > 0:  token_context_experts = tokens i-T .. i-1 (oldest first), each at the c context layers and at t
    H > 0:  next_token_experts/weights = tokens i+1 .. i+H, each at the target layer t only
    hidden_state (when the shards carry hidden states) = the hidden state of token i entering layer t-h

Tokens are neighbours only within one sequence at consecutive positions; a neighbour that does not exist
(before the sequence start, after its end) has -1 experts and 0 weights. The target is always token i's
own layer t: H adds the next tokens' routing as extra targets (the `hybrid` temporal head), it does not shift
the target. Example with c = 3, h = 2, T = 2, H = 2 (P = token context, C = context, X = target, N = next):

                 token i-2   token i-1 | token i  | token i+1  token i+2
    layer t          P           P     |    X     |     N          N     <- target layer
    layer t-1        .           .     |    .     |     .          .     <- between context and target (h = 2)
    layer t-2        P           P     |    C     |                      <- hidden_state: token i entering t-h
    layer t-3        P           P     |    C     |
    layer t-4        P           P     |    C     |
                 <---- token_context -----  i  ----- token_horizon ---->
                 (previous tokens: already    (next tokens: the same layer's
                  fully routed at decode)      experts, later in decode)

| column                | type                             | meaning                                                  |
|-----------------------|----------------------------------|----------------------------------------------------------|
| sequence_id           | string                           | sequence the token belongs to                            |
| domain                | string                           | its source                                               |
| position              | int32                            | token position                                           |
| target_layer          | int16                            | t, as an index into the manifest's MoE layers            |
| context_experts       | fixed_size_list<int16, c*k>      | context, layer-major (oldest layer first), best-first    |
| context_weights       | fixed_size_list<float32, c*k>    | optional (windows.context_weights): their gate weights   |
| target_experts        | fixed_size_list<int16, k>        | target routed set, best-first (-1 = dropped)             |
| target_weights        | fixed_size_list<float32, k>      | their gate weights                                       |
| prev_token_experts    | fixed_size_list<int16, k>        | layer t's experts of the previous token (-1 at position 0)|
| stale_gate_experts    | fixed_size_list<int16, k>        | optional: layer t's router applied at layer t-h          |
| token_id              | int32                            | optional (windows.token_ids): tokenizer id of token i    |
| token_context_experts | fixed_size_list<int16, T*(c+1)*k>| optional (T > 0): token-major (i-T first), then layers t-h-c+1 .. t-h, t; best-first |
| next_token_experts    | fixed_size_list<int16, H*k>      | optional (H > 0): layer t's experts of tokens i+1 .. i+H, token-major |
| next_token_weights    | fixed_size_list<float32, H*k>    | optional (H > 0): their gate weights (0 where no token)  |
| hidden_state          | fixed_size_list<float16, D>      | optional (shards with hidden states): token i entering layer t-h |
| generated             | bool                             | optional (traces with generated tokens): token i was generated, not prompt |

With windows.across_tokens the layers are positions of the decode stream p = token * L + layer and a window
exists for every target layer t = 0 .. L-1: its context is the c positions ending h before p, reaching into the
previous tokens' last layers (the layer of a context slot is then its position mod L; -1 experts, 0 weights before
the sequence start), token_id is the id of the token at the issuing position p - h (token i-1 for t < h: token i's id
is sampled only after token i-1's last layer), and stale_gate_experts is -1 for t < h (no router of token i ran
on token i-1's state). The horizon may reach L: the next token's same layer, a forward pass ahead. Example with
L = 4, c = 3, h = 1, target t = 1 of token i (summary.json key across_tokens: true):

                 token i-1 | token i
    layer 3          C     |
    layer 2          C     |
    layer 1                |    X     <- target
    layer 0                |    C     <- issuing position (token_id = token i's)

The optional columns (and summary.json keys token_context, token_horizon, hidden_dim, params.token_ids,
params.context_weights) exist only when non-empty (token_id: when windows.token_ids is on, the default since stop 19;
context_weights: when windows.context_weights is on), so windows written with them off are byte-identical to those
written before they existed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_prefetch.errors import PipelineError
from moe_prefetch.traces import dictionary_codes

SPLITS = ("train", "val", "test")
SUMMARY_NAME = "summary.json"
ROW_GROUP_WINDOWS = 65536  # windows per Parquet row group: the unit a streamed read loads


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
    context_weights: np.ndarray | None = None  # (N, c, k) float32: gate weights of context_experts (windows.context_weights)
    token_id: np.ndarray | None = None  # (N,) int32: tokenizer id of token i (windows.token_ids)
    generated: np.ndarray | None = None  # (N,) bool: the token was generated (present when any token was)
    token_context_experts: np.ndarray | None = None  # (N, T, c+1, k) int16: tokens i-T..i-1 x (context layers, t)
    next_token_experts: np.ndarray | None = None  # (N, H, k) int16: layer t of tokens i+1..i+H
    next_token_weights: np.ndarray | None = None  # (N, H, k) float32
    hidden_state: np.ndarray | None = None  # (N, D) float16: token i entering layer t-h

    def __len__(self) -> int:
        return len(self.target_layer)

    def subset(self, rows: np.ndarray) -> WindowSet:
        """The windows at `rows` (an index or boolean array), sharing the lookup lists."""
        fields = {}
        for name, value in self.__dict__.items():
            fields[name] = value[rows] if isinstance(value, np.ndarray) else value
        return WindowSet(**fields)


def geometry_of(summary: dict) -> dict:
    """The routing geometry a predictor is built for (stored inside its checkpoint), from a windows summary
    (across_tokens only when on, so that other checkpoints are unchanged)."""
    geometry = {name: summary[name] for name in ("num_experts", "top_k", "num_layers", "context_length", "horizon")}
    return {**geometry, **({"across_tokens": True} if summary.get("across_tokens") else {})}


def first_target_layer(context_length: int, horizon: int, across_tokens: bool = False) -> int:
    """The lowest target MoE layer: c-1+h, the first whose context lies in its own token; 0 across tokens (every layer,
    the context reaching into the previous tokens)."""
    return 0 if across_tokens else context_length - 1 + horizon


def target_layers(geometry: dict) -> list[int]:
    """The MoE layers a predictor of `geometry` (geometry_of) scores."""
    first = first_target_layer(int(geometry["context_length"]), int(geometry["horizon"]), bool(geometry.get("across_tokens")))
    return list(range(first, int(geometry["num_layers"])))


def context_layer_offsets(context_length: int, horizon: int) -> list[int]:
    """Offsets from the target MoE layer t to its context layers, oldest first: context layer j (0 <= j < c)
    is t - h - c + 1 + j, the c layers ending h layers below t. For c = 3, h = 2: [-4, -3, -2].

        layer t       X   target
        layer t-1     .   (h - 1 layers between the context and the target)
        layer t-2     C   j = 2   offset -h
        layer t-3     C   j = 1   offset -h - 1
        layer t-4     C   j = 0   offset -h - c + 1
    """
    return [j - horizon - context_length + 1 for j in range(context_length)]


def read_summary(directory: Path) -> dict:
    path = directory / SUMMARY_NAME
    if not path.exists():
        raise PipelineError(f"{path}: missing; run the windows stage (dvc repro windows)")
    return json.loads(path.read_text())


def _fixed(column: pa.ChunkedArray, *shape: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), *shape)


def _optional(table: pa.Table, name: str, *shape: int) -> np.ndarray | None:
    return _fixed(table[name], *shape) if name in table.column_names else None


def _split_file(directory: Path, split: str) -> pq.ParquetFile:
    path = directory / f"{split}.parquet"
    if not path.exists():
        raise PipelineError(f"{path}: missing; re-run the windows stage (dvc repro -f windows)")
    handle = pq.ParquetFile(path)
    if handle.metadata.num_rows == 0:
        raise PipelineError(f"{path}: the {split} split has no windows; check windows.split (fractions, test_domain)")
    return handle


def read_windows(directory: Path, split: str) -> WindowSet:
    """Read one split; a missing or empty split is a one-line error."""
    summary = read_summary(directory)
    return windows_from_table(_split_file(directory, split).read(), summary)


class WindowStream:
    """One split read from disk a few row groups at a time, for training on splits larger than memory."""

    def __init__(self, directory: Path, split: str, buffer_windows: int):
        self.summary = read_summary(directory)
        self.file = _split_file(directory, split)
        self.buffer_windows = buffer_windows

    def __len__(self) -> int:
        return self.file.metadata.num_rows

    def head(self) -> WindowSet:
        """The first row group: enough to read the column widths off (data_geometry)."""
        return windows_from_table(self.file.read_row_group(0), self.summary)

    def shuffled_batches(self, batch_size: int, generator: np.random.Generator) -> Iterator[WindowSet]:
        """One epoch: row groups in a random order, read until >= buffer_windows rows are loaded, those rows
        shuffled and cut into full batches; the remainder joins the next buffer, so an epoch has
        ceil(len / batch_size) batches, the last one possibly short."""
        groups = generator.permutation(self.file.num_row_groups)
        leftover, buffer, loaded = None, [], 0
        for index, group in enumerate(groups):
            buffer.append(int(group))
            loaded += self.file.metadata.row_group(int(group)).num_rows
            last = index == len(groups) - 1
            if loaded < self.buffer_windows and not last:
                continue
            table = self.file.read_row_groups(buffer)
            if leftover is not None:
                table = pa.concat_tables([leftover, table])
            order = generator.permutation(table.num_rows)
            full = table.num_rows if last else table.num_rows // batch_size * batch_size
            windows = windows_from_table(table.take(pa.array(order[:full])), self.summary)
            for begin in range(0, full, batch_size):
                yield windows.subset(np.arange(begin, min(begin + batch_size, full)))
            leftover = table.take(pa.array(order[full:]))
            buffer, loaded = [], 0


def windows_from_table(table: pa.Table, summary: dict) -> WindowSet:
    """A windows table (the schema above) as numpy arrays; `summary` gives the sizes (c, k and the optional T, H, D)."""
    c, k = summary["context_length"], summary["top_k"]
    T, H, D = (summary.get(name, 0) for name in ("token_context", "token_horizon", "hidden_dim"))
    domain_index, domains = dictionary_codes(table["domain"])
    sequence_index, sequence_ids = dictionary_codes(table["sequence_id"])
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
        stale_gate_experts=_optional(table, "stale_gate_experts", k),
        context_weights=_optional(table, "context_weights", c, k),
        token_id=table["token_id"].to_numpy() if "token_id" in table.column_names else None,
        token_context_experts=_optional(table, "token_context_experts", T, c + 1, k),
        next_token_experts=_optional(table, "next_token_experts", H, k),
        next_token_weights=_optional(table, "next_token_weights", H, k),
        hidden_state=_optional(table, "hidden_state", D),
        generated=table["generated"].to_numpy(zero_copy_only=False) if "generated" in table.column_names else None,
    )
