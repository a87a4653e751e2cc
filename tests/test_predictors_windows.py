"""The windows stage's optional predictor inputs (temporal context/horizon, hidden state), checked against a
per-token reference on hand-made shards whose sequences cross shard boundaries; defaults add nothing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_prefetch import traces
from moe_prefetch.errors import PipelineError
from moe_prefetch.params import parse_section
from moe_prefetch.windows.data import SPLITS, read_summary, read_windows
from moe_prefetch.windows.build import build_windows

L, K, E, D = 6, 2, 8, 4
LENGTHS = [7, 5, 6]  # tokens per sequence
SHARD_ROWS = [8, 3, 7]  # the middle shard is shorter than the look-back and look-ahead: both must span shards
BASE_COLUMNS = ["sequence_id", "domain", "position", "target_layer", "context_experts", "target_experts",
                "target_weights", "prev_token_experts"]


def write_shards(directory, hidden_dim: int = 0) -> dict:
    """Shards of len(LENGTHS) one-sequence documents; returns the token arrays for the reference."""
    rng = np.random.default_rng(0)
    n = sum(LENGTHS)
    tokens = {
        "sequence_id": np.repeat([f"d/{i}/0" for i in range(len(LENGTHS))], LENGTHS),
        "position": np.concatenate([np.arange(m) for m in LENGTHS]).astype(np.int32),
        "experts": rng.integers(0, E, (n, L, K)).astype(np.int16),
        "weights": rng.random((n, L, K)).astype(np.float32),
        "hidden_states": rng.normal(size=(n, L, max(hidden_dim, 1))).astype(np.float16),
    }
    schema = traces.schema(traces.TraceGeometry(L, K, E, traces.Capture(hidden_dim=hidden_dim)))
    entries, start = [], 0
    for number, rows in enumerate(SHARD_ROWS):
        part = slice(start, start + rows)
        data = {
            "sequence_id": tokens["sequence_id"][part], "document_id": tokens["sequence_id"][part],
            "domain": np.repeat("d", rows), "position": tokens["position"][part],
            "token_id": np.arange(start, start + rows, dtype=np.int32), "generated": np.zeros(rows, bool),
        }
        columns = {name: pa.array(values, type=schema.field(name).type) for name, values in data.items()}
        columns["experts"] = traces.nested_array(tokens["experts"][part], pa.int16())
        columns["weights"] = traces.nested_array(tokens["weights"][part], pa.float32())
        if hidden_dim:
            columns["hidden_states"] = traces.nested_array(tokens["hidden_states"][part], pa.float16())
        name = f"shard-{number:05d}.parquet"
        pq.write_table(pa.table(columns, schema=schema), directory / name)
        entries.append({"file": name, "rows": rows, "sha256": traces.sha256_file(directory / name)})
        start += rows
    traces.Manifest(
        model="synthetic", family="none", moe_layers=list(range(L)), layer_stacks=["decoder"] * L, num_experts=E,
        top_k=K, shared_experts=0, domains=["d"], shards=entries,
        capture={"router_probs": False, "hidden_dim": hidden_dim, "lookahead": 0}, collect={}, rows=n,
    ).write(directory / traces.MANIFEST_NAME)
    return tokens


def build(tmp_path, windows: dict, hidden_dim: int = 0):
    shards, out = tmp_path / "shards", tmp_path / "windows"
    shards.mkdir()
    out.mkdir()
    tokens = write_shards(shards, hidden_dim)
    params = parse_section("windows", {"split": {"fractions": [0.34, 0.33, 0.33]}, **windows})
    build_windows(shards, out, params)
    return tokens, out


def test_optional_extents_off_add_no_column_and_no_summary_key(tmp_path) -> None:
    _, out = build(tmp_path, {"context_length": 2, "token_ids": False, "context_weights": False})
    for split in SPLITS:
        assert pq.read_schema(out / f"{split}.parquet").names == BASE_COLUMNS
    summary = read_summary(out)
    optional = {"token_context", "token_horizon", "hidden_dim", "token_ids", "context_weights"}
    assert not optional & (set(summary) | set(summary["params"]))


def test_defaults_add_only_the_token_id_and_context_weights_columns(tmp_path) -> None:
    _, out = build(tmp_path, {"context_length": 2})
    for split in SPLITS:
        assert pq.read_schema(out / f"{split}.parquet").names == [*BASE_COLUMNS, "context_weights", "token_id"]
    params = read_summary(out)["params"]
    assert params["token_ids"] is True and params["context_weights"] is True


@pytest.mark.parametrize("horizon", [1, 2])
def test_temporal_and_hidden_columns_match_a_per_token_reference(tmp_path, horizon) -> None:
    T, H, c = 2, 4, 2
    tokens, out = build(tmp_path, {"context_length": c, "horizon": horizon, "token_context": T, "token_horizon": H}, D)
    row_of = {(s, int(p)): i for i, (s, p) in enumerate(zip(tokens["sequence_id"], tokens["position"]))}
    checked = 0
    for split in SPLITS:
        w = read_windows(out, split)
        for n in range(len(w)):
            i = row_of[(w.sequence_ids[w.sequence_index[n]], int(w.position[n]))]
            sequence, position, t = tokens["sequence_id"][i], int(tokens["position"][i]), int(w.target_layer[n])
            layers = list(range(t - horizon - c + 1, t - horizon + 1)) + [t]
            for tau in range(T):  # token i - T + tau, oldest first
                j = row_of.get((sequence, position - T + tau))
                expected = tokens["experts"][j][layers] if j is not None else np.full((c + 1, K), -1)
                np.testing.assert_array_equal(w.token_context_experts[n, tau], expected)
            for ahead in range(H):  # token i + 1 + ahead
                j = row_of.get((sequence, position + 1 + ahead))
                np.testing.assert_array_equal(w.next_token_experts[n, ahead], tokens["experts"][j, t] if j is not None else [-1] * K)
                np.testing.assert_array_equal(w.next_token_weights[n, ahead], tokens["weights"][j, t] if j is not None else [0] * K)
            np.testing.assert_array_equal(w.hidden_state[n], tokens["hidden_states"][i, t - horizon])
            previous = row_of.get((sequence, position - 1))
            np.testing.assert_array_equal(w.prev_token_experts[n], tokens["experts"][previous, t] if previous is not None else [-1] * K)
            checked += 1
    assert checked == sum(LENGTHS) * (L - c + 1 - horizon)


@pytest.mark.parametrize("context_length, horizon", [(3, 1), (2, 6), (8, 2)])
def test_across_tokens_windows_read_the_decode_stream_across_token_and_shard_boundaries(tmp_path, context_length, horizon) -> None:
    """Every layer is a target; context slot j of target t is stream position p - h - c + 1 + j (p = i * L + t), in
    an earlier token where that is below 0, -1 before the sequence start; token_id is the id at p - h."""
    c, h = context_length, horizon
    tokens, out = build(tmp_path, {"context_length": c, "horizon": h, "across_tokens": True, "context_weights": True})
    row_of = {(s, int(p)): i for i, (s, p) in enumerate(zip(tokens["sequence_id"], tokens["position"]))}
    summary = read_summary(out)
    assert summary["target_layers"] == list(range(L)) and summary["across_tokens"] is True

    def at(sequence, position, offset):  # the routing row and layer of stream offset `offset` from token `position`'s layer 0
        back, layer = divmod(offset, L)
        return row_of.get((sequence, position + back)), layer

    checked = 0
    for split in SPLITS:
        w = read_windows(out, split)
        for n in range(len(w)):
            sequence, position, t = w.sequence_ids[w.sequence_index[n]], int(w.position[n]), int(w.target_layer[n])
            i = row_of[(sequence, position)]
            np.testing.assert_array_equal(w.target_experts[n], tokens["experts"][i, t])
            for j in range(c):
                row, layer = at(sequence, position, t - h - c + 1 + j)
                np.testing.assert_array_equal(w.context_experts[n, j], tokens["experts"][row, layer] if row is not None else [-1] * K)
                np.testing.assert_array_equal(w.context_weights[n, j], tokens["weights"][row, layer] if row is not None else [0] * K)
            issuing, _ = at(sequence, position, t - h)
            assert w.token_id[n] == (issuing if issuing is not None else -1)  # the shards' token_id is the row index
            checked += 1
    assert checked == sum(LENGTHS) * L


@pytest.mark.parametrize("windows, hidden_dim, fragment", [
    ({"horizon": L + 1}, 0, f"windows.horizon: {L + 1} with windows.across_tokens exceeds the model's {L} MoE layers"),
    ({"token_context": 1}, 0, "windows.token_context: 1 with windows.across_tokens is not supported"),
    ({}, D, "windows.across_tokens: true is not supported with hidden states"),
])
def test_across_tokens_rejects_what_it_cannot_build(tmp_path, windows, hidden_dim, fragment) -> None:
    with pytest.raises(PipelineError, match=fragment):
        build(tmp_path, {"context_length": 2, "across_tokens": True, **windows}, hidden_dim)
    assert not list((tmp_path / "windows").iterdir())  # nothing half-written
