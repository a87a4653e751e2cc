"""The trace schema (moe_prefetch/traces.py): the column registry against its docstring table and what collect
writes, the metadata files byte for byte, the public reader read_routing, best-first order, synthetic shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    assert_error,
    copy_dir,
    single_thread,
    synthetic_shards,
    tiny_params,
)

from moe_prefetch import traces
from moe_prefetch.traces import TRACE_COLUMNS, read_routing
from moe_prefetch.windows.data import read_windows

ALL_CAPTURES = {"router_probs": True, "hidden_states": True, "hidden_dim": 8, "lookahead": 2}  # every capture on


def documented_columns() -> list[tuple[str, str, str]]:
    """(column, Arrow type, meaning) of each row of the table in traces.py's docstring."""
    rows = [line for line in traces.__doc__.splitlines() if line.startswith("|")][2:]  # after header and rule
    return [tuple(cell.strip() for cell in row.strip("|").split("|")) for row in rows]


def described(name: str, column: traces.TraceColumn) -> tuple[str, str, str]:
    """How the docstring table shows a registered column."""
    arrow = {"float": "float32", "halffloat": "float16"}.get(str(column.value_type), str(column.value_type))
    for dim in reversed(column.dims):
        arrow = f"fixed_size_list<{arrow}, {dim}>"
    meaning = f"optional ({column.capture}): {column.meaning}" if column.capture else column.meaning
    return name, arrow, meaning


def chunk_columns(trace_dir) -> set[tuple[str, ...]]:
    return {tuple(pq.read_schema(path).names) for path in sorted(trace_dir.glob("chunk-*.parquet"))}


def test_docstring_table_lists_exactly_the_registered_columns():
    assert documented_columns() == [described(name, column) for name, column in TRACE_COLUMNS.items()]


def test_schema_holds_the_columns_the_capture_turns_on():
    capture = traces.Capture(router_probs=True, hidden_dim=5, lookahead=3)
    everything = traces.schema(traces.TraceGeometry(4, 2, 8, capture))
    assert everything.names == TRACE_COLUMNS.names()
    assert everything.field("lookahead_experts").type == traces.nested_type(pa.int16(), 4, 3, 2)
    assert everything.field("hidden_states").type == traces.nested_type(pa.float16(), 4, 5)
    plain = traces.schema(traces.TraceGeometry(4, 2, 8))
    assert plain.names == [name for name, column in TRACE_COLUMNS.items() if column.capture is None]
    assert set(traces.ID_COLUMNS) | set(traces.ROUTING_COLUMNS) == set(TRACE_COLUMNS.names())


def test_collect_writes_every_registered_column_it_captures(tiny, tmp_path):
    """The default columns in the session run; every column in a run with every capture on (tiny-moe, 2 sequences)."""
    meta = traces.TraceMeta.read(tiny.traces)
    assert chunk_columns(tiny.traces) == {tuple(traces.schema(meta.geometry).names)}
    assert set(next(iter(chunk_columns(tiny.traces)))) == {n for n, c in TRACE_COLUMNS.items() if c.capture is None}

    from moe_prefetch.collect.collector import collect
    from moe_prefetch.sharding import write_shards

    params = tiny_params("collect", sources=["python-docs"], num_sequences=2, seq_len=16, min_tokens=8, batch_size=2,
                         sequences_per_chunk=2, capture=ALL_CAPTURES)
    with single_thread():
        collect(params, tmp_path / "traces")
    assert chunk_columns(tmp_path / "traces") == {tuple(TRACE_COLUMNS.names())}
    (tmp_path / "shards").mkdir()
    manifest = write_shards(tmp_path / "traces", tmp_path / "shards", tiny_params("shard"))
    routing = read_routing(tmp_path / "shards", with_hidden=True)
    geometry = manifest.geometry
    for name in traces.ROUTING_COLUMNS:
        assert getattr(routing, name).shape == (manifest.rows, *TRACE_COLUMNS[name].shape(geometry)), name


def test_metadata_files_round_trip_byte_for_byte(tiny, tmp_path):
    """TraceMeta and the Manifest it makes write what collect and the shard stage wrote (dvc.lock pins the bytes)."""
    meta = traces.TraceMeta.read(tiny.traces)
    meta.write(tmp_path)
    assert (tmp_path / traces.META_NAME).read_bytes() == (tiny.traces / traces.META_NAME).read_bytes()
    meta.manifest(tiny.manifest.shards).write(tmp_path / traces.MANIFEST_NAME)
    assert (tmp_path / traces.MANIFEST_NAME).read_bytes() == (tiny.shards / traces.MANIFEST_NAME).read_bytes()
    assert meta.geometry == tiny.manifest.geometry


@pytest.mark.parametrize("content, fragments", [
    (None, ["meta.json: missing"]),
    ("{not json", ["meta.json: not valid JSON"]),
    ("[1, 2]", ["meta.json: expected a JSON object"]),
    ('{"model": "m"}', ["meta.json: malformed meta.json", "re-run dvc repro -f collect"]),
])
def test_unreadable_meta_is_a_one_line_error(tmp_path, content, fragments):
    if content is not None:
        (tmp_path / traces.META_NAME).write_text(content)
    assert_error(lambda: traces.TraceMeta.read(tmp_path), *fragments)


def test_unknown_capture_key_is_a_one_line_error(tiny, tmp_path):
    raw = json.loads((tiny.traces / traces.META_NAME).read_text())
    raw["capture"]["colour"] = True
    (tmp_path / traces.META_NAME).write_text(json.dumps(raw))
    assert_error(lambda: traces.TraceMeta.read(tmp_path), "meta.json: capture:", "colour")


def test_read_routing_gives_the_shards_as_arrays(tiny):
    routing = read_routing(tiny.shards)
    n, L, k = tiny.manifest.rows, tiny.manifest.num_layers, tiny.manifest.top_k
    assert routing.experts.shape == (n, L, k) and routing.experts.dtype == np.int16
    assert routing.weights.shape == (n, L, k) and routing.weights.dtype == np.float32
    for name in ("sequence_index", "document_index", "domain_index", "position", "token_id", "generated"):
        assert getattr(routing, name).shape == (n,), name
    assert routing.router_probs is None and routing.hidden_states is None and routing.lookahead_experts is None
    assert sorted(routing.domains) == sorted(tiny.manifest.domains)
    row_of = {(routing.sequence_ids[s], int(p)): row for row, (s, p) in enumerate(zip(routing.sequence_index, routing.position))}
    test = read_windows(tiny.windows, "test")
    for window in range(0, len(test), max(1, len(test) // 50)):  # a window's target is its token's routing at layer t
        row = row_of[(test.sequence_ids[test.sequence_index[window]], int(test.position[window]))]
        assert (routing.experts[row, test.target_layer[window]] == test.target_experts[window]).all()
        assert (routing.weights[row, test.target_layer[window]] == test.target_weights[window]).all()


def test_read_routing_rejects_a_bad_checksum(tiny, tmp_path):
    shard_dir = copy_dir(tiny.shards, tmp_path / "shards")
    manifest = traces.Manifest.read(shard_dir)
    manifest.shards[1]["sha256"] = "0" * 64
    manifest.write(shard_dir / traces.MANIFEST_NAME)
    assert_error(lambda: read_routing(shard_dir), "shard-00001.parquet", "sha256 does not match the manifest")


def test_routing_table_has_a_field_per_routing_column():
    fields = traces.RoutingTable.__dataclass_fields__
    assert set(traces.ROUTING_COLUMNS) <= set(fields), "a registered routing column needs a RoutingTable field"


def test_numpy_and_torch_best_first_agree_on_ties():
    import torch

    from moe_prefetch.routing.base import best_first as torch_best_first

    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(16)[:4] for _ in range(2000)]).astype(np.int16)
    experts[::7, -1] = -1  # dropped slots (weight 0) tie with other zero weights
    weights = rng.choice(np.array([0.0, 0.25, 0.5], dtype=np.float32), size=experts.shape)
    weights[experts == -1] = 0
    ids, gates = traces.best_first(experts, weights)
    torch_ids, torch_gates = torch_best_first(torch.from_numpy(experts), torch.from_numpy(weights))
    assert (torch_ids.numpy() == ids).all() and (torch_gates.numpy() == gates).all()
    assert (np.diff(gates, axis=1) <= 0).all()  # by weight, descending
    assert (np.diff(ids, axis=1)[np.diff(gates, axis=1) == 0] > 0).all()  # equal weights: lower id first
    assert (np.sort(ids, axis=1) == np.sort(experts, axis=1)).all()


def test_synthetic_shards_are_valid_routing_of_two_domains(tmp_path):
    manifest = synthetic_shards(tmp_path / "a", documents=30, seq_len=40, rows_per_shard=500, seed=3, num_layers=5, top_k=3,
                                num_experts=12)
    assert manifest.rows == 1200 and [e["rows"] for e in manifest.shards] == [500, 500, 200]
    assert (manifest.num_layers, manifest.top_k, manifest.num_experts, manifest.domains) == (5, 3, 12, ["alpha", "beta"])
    routing = read_routing(tmp_path / "a")  # checksums, schema and value ranges as the pipeline reads them
    experts, weights = routing.experts, routing.weights
    assert ((experts >= 0) & (experts < 12)).all()
    assert (np.sort(experts, axis=2)[..., 1:] != np.sort(experts, axis=2)[..., :-1]).all()  # distinct per token and layer
    assert (np.diff(weights, axis=2) <= 0).all() and np.allclose(weights.sum(axis=2), 1, atol=1e-5)
    assert len(routing.document_ids) == 30 and (np.bincount(routing.sequence_index) == 40).all()
    again = synthetic_shards(tmp_path / "b", documents=30, seq_len=40, rows_per_shard=500, seed=3, num_layers=5, top_k=3,
                             num_experts=12)
    assert [e["sha256"] for e in again.shards] == [e["sha256"] for e in manifest.shards]  # deterministic given the seed
