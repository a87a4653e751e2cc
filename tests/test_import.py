"""collect.import: external routing records (JSON Lines, CSV, Parquet) become the traces collect would write.

Good input: the three formats give identical shards, experts best-first, incomplete tokens dropped and counted,
and the result runs through windows, train and evaluate. Malformed input: one line naming file, line (or Parquet
row) and field, exit 1, nothing written.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY, assert_error, tiny_params
from moe_prefetch import traces
from moe_prefetch.collect.collector import collect
from moe_prefetch.params import parse_section
from moe_prefetch.sharding import write_shards
from test_collect_errors import assert_fails_cleanly

LAYERS = [1, 3, 5, 6]
FIELDS = ["sequence_id", "position", "layer", "experts", "weights", "domain", "document_id", "token_id"]


def good_records(sequences: int = 10, tokens: int = 6) -> list[dict]:
    """Routing of 8 experts top-2 at LAYERS; odd sequences set a domain, sequence 0 a document_id; one incomplete token."""
    rng = np.random.default_rng(0)
    records = []
    for s in range(sequences):
        for position in range(tokens):
            for layer in reversed(LAYERS):  # any order: the import sorts
                record = {"sequence_id": f"seq{s}", "position": position, "layer": layer,
                          "experts": rng.choice(8, 2, replace=False).tolist(), "weights": rng.random(2).round(4).tolist(),
                          "token_id": 100 + position}
                if s % 2:
                    record["domain"] = "odd"
                if s == 0:
                    record["document_id"] = "doc-zero"
                records.append(record)
    last = records[-1]
    records += [{**last, "position": tokens, "layer": layer} for layer in LAYERS[:2]]  # misses two layers: dropped
    return records


def write_records(path, records: list[dict]):
    fields = [f for f in FIELDS if any(f in r for r in records)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":  # experts as a quoted JSON list, weights space-separated, missing optionals empty
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for r in records:
                writer.writerow({**r, "experts": json.dumps(r.get("experts")), "weights": " ".join(map(repr, r.get("weights", [])))})
    else:  # missing optionals are nulls
        pq.write_table(pa.table({f: [r.get(f) for r in records] for f in fields}), path)
    return path


def import_params(glob: str, **overrides):
    return parse_section("collect", {**TINY["collect"], "import": glob, **overrides})


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """format -> (trace dir, manifest, shard table)"""
    root = tmp_path_factory.mktemp("import")
    out = {}
    for suffix in ("jsonl", "csv", "parquet"):
        source = write_records(root / f"records.{suffix}", good_records())
        collect(import_params(str(source)), root / suffix, inputs=root)
        (root / f"{suffix}-shards").mkdir()
        manifest = write_shards(root / suffix, root / f"{suffix}-shards", tiny_params("shard"))
        out[suffix] = (root / suffix, manifest, pa.concat_tables(pq.read_table(root / f"{suffix}-shards" / e["file"]) for e in manifest.shards))
    return out


def test_three_formats_give_identical_shards(imported):
    _, manifest, table = imported["jsonl"]
    for suffix in ("csv", "parquet"):
        assert imported[suffix][2].equals(table)
        assert [e["sha256"] for e in imported[suffix][1].shards] == [e["sha256"] for e in manifest.shards]
    assert (manifest.family, manifest.moe_layers, manifest.layer_stacks) == ("imported", LAYERS, ["decoder"] * 4)
    assert (manifest.num_experts, manifest.top_k, manifest.shared_experts) == (8, 2, 0)  # num_experts inferred
    assert manifest.collect["incomplete_tokens"] == 1 and manifest.rows == 60 and manifest.domains == ["imported", "odd"]
    assert len(list(imported["jsonl"][0].glob("chunk-*.parquet"))) == manifest.collect["chunks"] == 3  # 4 sequences per chunk


def test_imported_rows_hold_the_records_best_first(imported):
    _, manifest, table = imported["jsonl"]
    expected = {(r["sequence_id"], r["position"], r["layer"]): r for r in good_records()}
    experts = traces.column_to_numpy(table["experts"], (4, 2))
    weights = traces.column_to_numpy(table["weights"], (4, 2))
    assert (weights[..., 0] >= weights[..., 1]).all()
    for row, (sequence, position) in enumerate(zip(table["sequence_id"].to_pylist(), table["position"].to_pylist())):
        for index, layer in enumerate(LAYERS):
            record = expected[(sequence, position, layer)]
            assert sorted(zip(experts[row, index], weights[row, index])) == sorted(zip(record["experts"], np.float32(record["weights"])))
    assert table["sequence_id"].to_pylist() == [f"seq{s}" for s in range(10) for _ in range(6)]  # first-appearance order
    documents = dict(zip(table["sequence_id"].to_pylist(), table["document_id"].to_pylist()))
    assert documents["seq0"] == "doc-zero" and documents["seq1"] == "seq1"
    assert set(table["token_id"].to_pylist()) == set(range(100, 106)) and not any(table["generated"].to_pylist())


def test_imported_traces_run_through_windows_train_evaluate(imported, tmp_path):
    from moe_prefetch.evaluation.evaluate import evaluate
    from moe_prefetch.training import train
    from moe_prefetch.windows.build import build_windows

    shards = imported["jsonl"][0].parent / "jsonl-shards"
    for name in ("windows", "plots"):
        (tmp_path / name).mkdir()
    build_windows(shards, tmp_path / "windows", tiny_params("windows"))
    train(tiny_params("train", arch="lookup"), tmp_path / "windows", tmp_path / "predictor", tmp_path / "live")
    metrics = evaluate(tiny_params("evaluate", max_horizon=2), tmp_path / "windows", shards, tmp_path / "predictor", tmp_path / "plots")
    assert metrics


def test_split_domains_are_the_recorded_domains(imported, tmp_path):
    """summary.json names each split's domains from the records' `domain` (default `imported`), not from a prefix
    of the document id (which defaults to the sequence id: seq0, seq1, ...)."""
    from moe_prefetch.windows.build import build_windows

    summary = build_windows(imported["jsonl"][0].parent / "jsonl-shards", tmp_path, tiny_params("windows"))
    for name, split in summary["splits"].items():
        assert split["domains"] == sorted(set(pq.read_table(tmp_path / f"{name}.parquet")["domain"].to_pylist())), name
    assert set().union(*(split["domains"] for split in summary["splits"].values())) == {"imported", "odd"}


@pytest.mark.parametrize("pattern", ["records/*.jsonl", "*.jsonl", "inputs/../records/*.jsonl", "{tmp}/records/r.jsonl"])
def test_an_import_outside_inputs_is_one_line_and_writes_nothing(pattern, tmp_path, monkeypatch, run_main):
    """collect reads files below inputs/ only (the directory dvc.yaml lists as collect's dependency)."""
    pattern = pattern.format(tmp=tmp_path)
    (tmp_path / "records").mkdir()
    write_records(tmp_path / "records" / "r.jsonl", good_records(2, 2))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"collect": {"import": pattern}}))
    monkeypatch.chdir(tmp_path)
    assert_fails_cleanly(run_main, tmp_path, [f"error: collect.import: {pattern!r} is outside inputs/", "only below inputs/"])


def test_generated_tokens_get_their_own_evaluation(tmp_path):
    """Records marked `generated` flow into the windows and evaluate reports prompt and generated tokens apart."""
    from moe_prefetch.evaluation.evaluate import evaluate
    from moe_prefetch.training import train
    from moe_prefetch.windows.build import build_windows

    records = [{**r, "generated": r["position"] >= 3} for r in good_records(sequences=30, tokens=6)]
    collect(import_params(str(write_records(tmp_path / "r.jsonl", records))), tmp_path / "traces", inputs=tmp_path)
    for name in ("shards", "windows", "plots"):
        (tmp_path / name).mkdir()
    write_shards(tmp_path / "traces", tmp_path / "shards", tiny_params("shard"))
    summary = build_windows(tmp_path / "shards", tmp_path / "windows", tiny_params("windows"))
    test = pq.read_table(tmp_path / "windows" / "test.parquet")
    assert test["generated"].to_pylist() == [p >= 3 for p in test["position"].to_pylist()]
    train(tiny_params("train", arch="lookup"), tmp_path / "windows", tmp_path / "predictor", tmp_path / "live")
    metrics = evaluate(tiny_params("evaluate", max_horizon=0), tmp_path / "windows", tmp_path / "shards", tmp_path / "predictor",
                       tmp_path / "plots")
    kinds = metrics["per_token_kind"]
    generated_windows = sum(test["generated"].to_pylist())
    assert kinds["generated"]["predictor"]["windows"] == generated_windows > 0
    assert kinds["prompt"]["predictor"]["windows"] + generated_windows == summary["splits"]["test"]["windows"]


def test_import_key_and_num_experts():
    assert import_params("a/*.jsonl").import_glob == "a/*.jsonl"
    assert parse_section("collect", {}).import_glob is None
    assert_error(lambda: parse_section("collect", {"import_glob": "x"}), "collect.import_glob", "unknown key", "import")
    assert_error(lambda: import_params("x", num_experts=-1), "collect.num_experts")


def test_given_num_experts_is_kept(tmp_path):
    source = write_records(tmp_path / "r.jsonl", good_records(sequences=2, tokens=2))
    collect(import_params(str(source), num_experts=64), tmp_path / "traces", inputs=tmp_path)
    assert json.loads((tmp_path / "traces" / "meta.json").read_text())["num_experts"] == 64


def replace(index: int, **changes):
    """good_records() with record `index` changed (a value None removes the field)."""
    def make():
        records = good_records(sequences=2, tokens=2)
        records[index] = {k: v for k, v in {**records[index], **changes}.items() if v is not None}
        return records
    return make


BAD = {
    "bad JSON": ("jsonl", None, ["r.jsonl: line 3:", "bad JSON"]),
    "missing field": ("jsonl", replace(1, weights=None), ["r.jsonl: line 2:", "field 'weights'", "missing"]),
    "expert out of range": ("csv", replace(2, experts=[9, 1]), ["r.csv: line 4:", "field 'experts'", "expert id 9", "[0, 8)"]),
    "lengths differ": ("parquet", replace(1, weights=[0.5, 0.3, 0.2]), ["r.parquet: row 1:", "field 'weights'", "same length"]),
    "inconsistent k": ("jsonl", replace(1, experts=[1, 2, 3], weights=[0.5, 0.3, 0.2]), ["r.jsonl: line 2:", "field 'experts'", "k=2"]),
    "duplicate": ("csv", replace(1, layer=LAYERS[-1]), ["r.csv: line 3:", "field 'layer'", "duplicate", "r.csv: line 2"]),
    "missing column": ("csv", lambda: [{k: v for k, v in r.items() if k != "layer"} for r in good_records(2, 2)], ["r.csv: line 1:", "field 'layer'"]),
    "domain differs": ("jsonl", replace(3, domain="other"), ["r.jsonl: line 4:", "field 'domain'", "'other'", "same sequence"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_record_is_named_and_nothing_is_written(case, tmp_path, monkeypatch, run_main):
    suffix, make, fragments = BAD[case]
    path = tmp_path / "inputs" / f"r.{suffix}"
    path.parent.mkdir()
    if make is None:  # bad JSON on line 3
        lines = write_records(path, good_records(2, 2)).read_text().splitlines()
        path.write_text("\n".join(lines[:2] + ['{"sequence_id": "seq0", "position": 2,'] + lines[2:]) + "\n")
    else:
        write_records(path, make())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"collect": {"import": "inputs/*", "num_experts": 8}}))
    monkeypatch.chdir(tmp_path)
    line = assert_fails_cleanly(run_main, tmp_path, ["error: collect.import: inputs/", *fragments])
    assert "\n" not in line


def test_imported_routing_replays_every_layer_under_every_policy_and_the_capacity_sweep(imported, tmp_path):
    """The replay of imported routing (#13): every MoE layer, the capacity sweep given as fractions of the 8 experts,
    the frequency fallback and every eviction policy; Belady's hit rate is at least on-demand's at every capacity and
    equal once the cache holds every expert (nothing is ever evicted), and the ideal is a floor."""
    import dataclasses

    from moe_prefetch.evaluation.baselines import baseline_scorers
    from moe_prefetch.evaluation.cache import EVICTION_POLICIES
    from moe_prefetch.evaluation.sweeps import cache_report
    from moe_prefetch.predictors import load_predictor
    from moe_prefetch.traces import read_routing
    from moe_prefetch.training import train
    from moe_prefetch.windows.build import build_windows
    from moe_prefetch.windows.data import read_summary, read_windows

    shards = imported["jsonl"][0].parent / "jsonl-shards"
    (tmp_path / "windows").mkdir()
    build_windows(shards, tmp_path / "windows", tiny_params("windows"))
    train(tiny_params("train", arch="lookup"), tmp_path / "windows", tmp_path / "predictor", tmp_path / "live")
    summary = read_summary(tmp_path / "windows")
    train_windows, val, test = (read_windows(tmp_path / "windows", split) for split in ("train", "val", "test"))
    scorers = {"predictor": load_predictor(tmp_path / "predictor").score,
               **baseline_scorers(train_windows, summary, np.random.default_rng(0), val)}
    routing = read_routing(shards)
    for number, policy in enumerate(EVICTION_POLICIES):
        rule = ("frequency", "token")[number % 2]  # each fallback rule that reads the shards' train routing
        params = dataclasses.replace(tiny_params("evaluate").cache, policy=policy, capacity_sweep=[0.125, 0.25, 0.5, 1.0],
                                     capacity_sweep_unit="fraction", fallback=rule, profile_sweep_tokens=0)
        report = cache_report(test, scorers, params, summary, val, routing=routing, train=train_windows)
        cache = report["cache"]
        assert cache["config"]["replayed_layers"] == len(LAYERS) and cache["config"]["fallback"] == rule
        assert [row["capacity"] for row in report["by_capacity"]] == [1, 2, 4, 8], policy
        for row in report["by_capacity"]:
            assert row["belady_hit_rate"] >= row["on_demand_hit_rate"] - 1e-12, (policy, row["capacity"])
        assert report["by_capacity"][-1]["belady_hit_rate"] == pytest.approx(report["by_capacity"][-1]["on_demand_hit_rate"])
        strategies = [name for name in cache if name not in ("config", "ideal")]
        assert all(cache["ideal"]["time_per_token_ms"] <= cache[name]["time_per_token_ms"] + 1e-9 for name in strategies)
