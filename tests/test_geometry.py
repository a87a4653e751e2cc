"""The second embedded checkpoint, models/tiny-moe-64x6 (64 routed experts, top-6: DeepSeek-V2-Lite's routing
geometry): it loads, routes exactly 6 distinct experts of 64 per token at every MoE layer, and every stage of the
pipeline runs on its routing with the default stage params (`-S collect.model=models/tiny-moe-64x6` and nothing
else), the cache replay included (its default capacity, 4, is below top-6)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, single_thread, tiny_params
from moe_prefetch.collect.collector import collect
from moe_prefetch.evaluation.evaluate import evaluate
from moe_prefetch.sharding import write_shards
from moe_prefetch.training import train
from moe_prefetch.windows.build import build_windows

sys.path.insert(0, str(ROOT / "scripts"))
import run_geometry  # noqa: E402

MODEL_64 = "models/tiny-moe-64x6"
EXPERTS, TOP_K, LAYERS = 64, 6, 8
COLLECT = {"model": MODEL_64, "sources": ["python-docs"], "num_sequences": 8, "seq_len": 24, "min_tokens": 8, "chunks_per_document": 1,
           "batch_size": 4, "sequences_per_chunk": 8}
TOKEN_MLP = {"arch": "token_mlp", "epochs": 1, "batch_size": 64, "max_train_windows": 0,
             "token_mlp": {"embedding_dim": 8, "hidden": [32], "dropout": 0.0, "token_embedding_dim": 8}}
EVALUATE = {"bootstrap_resamples": 20, "max_horizon": 2, "entropy_train_sizes": [50],
            "cache": {"max_tokens": 60, "capacity_sweep": [2, 8], "decode_batch_sweep": [1, 2], "regime_sweep": [1, 4]}}


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """collect on 8 sequences (one per document) of the 64x6 model (one torch thread): (trace dir, every chunk row as one table)."""
    out = tmp_path_factory.mktemp("geometry") / "traces"
    with single_thread():
        collect(tiny_params("collect", **COLLECT), out)
    return out, pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("chunk-*.parquet")))


def test_settings_and_report_record_a_64x6_router_that_did_not_collapse():
    settings = json.loads((ROOT / MODEL_64 / "training_settings.json").read_text())
    assert (settings["routed_experts"], settings["experts_per_token"], settings["num_layers"]) == (EXPERTS, TOP_K, LAYERS)
    report = json.loads((ROOT / MODEL_64 / "report.json").read_text())
    for domain in settings["domains"]:
        routing = report[domain]["routing"]
        # A collapsed router concentrates on a few experts: entropy near log2(k) = 2.6 bits; uniform load is 6 bits.
        assert min(routing["per_layer_load_entropy_bits"]) > math.log2(EXPERTS) - 0.5, routing["per_layer_load_entropy_bits"]
        assert routing["max_share_over_fair_worst"] < 4, routing["max_share_over_fair_worst"]
        assert all(len(shares) == EXPERTS and min(shares) > 0 for shares in routing["per_layer_load_share"])


def test_collect_routes_exactly_6_distinct_of_64_experts_per_token_per_layer(routed):
    trace_dir, table = routed
    meta = json.loads((trace_dir / "meta.json").read_text())
    assert (meta["num_experts"], meta["top_k"], len(meta["moe_layers"])) == (EXPERTS, TOP_K, LAYERS)
    experts = np.asarray(table.column("experts").to_pylist())  # (N, L, k)
    weights = np.asarray(table.column("weights").to_pylist())  # (N, L, k)
    assert experts.shape == (table.num_rows, LAYERS, TOP_K) and table.num_rows > 6 * 8
    assert experts.min() >= 0 and experts.max() < EXPERTS  # no dropped slot (-1), no id past 63
    assert all(len(set(row)) == TOP_K for row in experts.reshape(-1, TOP_K))
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-4)  # norm_topk_prob: each token's 6 gates sum to 1
    assert (np.diff(weights, axis=-1) <= 1e-7).all()  # best-first
    assert len(np.unique(experts)) > EXPERTS // 2  # a handful of tokens already spread over most experts


@pytest.fixture(scope="module")
def evaluated(routed, tmp_path_factory):
    """shard -> windows -> train (token_mlp, one epoch) -> evaluate on the collected 64x6 routing, with the default
    cache params: (windows summary, evaluate metrics)."""
    trace_dir, _ = routed
    root = tmp_path_factory.mktemp("geometry-stages")
    shards, windows, plots = (root / name for name in ("shards", "windows", "plots"))
    for directory in (shards, windows, plots):
        directory.mkdir()
    with single_thread():
        write_shards(trace_dir, shards, tiny_params("shard"))
        summary = build_windows(shards, windows, tiny_params("windows", split={"by": "sequence", "fractions": [0.5, 0.25, 0.25]}))
        train(tiny_params("train", **TOKEN_MLP), windows, root / "predictor", root / "live")
        metrics = evaluate(tiny_params("evaluate", **EVALUATE), windows, shards, root / "predictor", plots)
    return summary, metrics


def test_windows_train_and_evaluate_run_on_64x6_routing_with_default_cache_params(evaluated):
    summary, metrics = evaluated
    assert (summary["num_experts"], summary["top_k"]) == (EXPERTS, TOP_K)
    assert (metrics["data"]["num_experts"], metrics["data"]["top_k"]) == (EXPERTS, TOP_K)
    for name in ("cooccurrence", "lookup_interpolated", "token", "frequency", "random"):
        low, high = metrics["baselines"][name]["top1_ci95"]
        assert 0 <= low <= metrics["baselines"][name]["top1"] <= high <= 1
        assert 0 <= metrics["baselines"][name]["recall_at_k"] <= 1
    # Chance: the true top-1 is one of 64 experts; a random ranking's top-10 holds it 10/64 of the time.
    assert metrics["baselines"]["random"]["top10"] < 0.4
    cache = metrics["cache"]
    assert cache["config"]["capacity"] == 4
    for strategy in ("on_demand", "belady", "predictor", "ideal"):
        assert cache[strategy]["speedup_vs_on_demand"] > 0
    # The ideal (every expert resident in time) is at least as fast as anything that can miss.
    assert cache["ideal"]["speedup_vs_on_demand"] >= max(cache[s]["speedup_vs_on_demand"] for s in ("belady", "predictor")) - 1e-9


def test_geometry_summary_renders_the_predictors_lead_over_each_baseline(evaluated):
    """The summary run_geometry writes, rendered next to a default run (here: the same metrics twice)."""
    _, metrics = evaluated
    summary = json.loads(json.dumps(run_geometry.summary_of(metrics, wall_seconds=90.0)))  # as written to disk
    assert summary["baselines"]["cooccurrence"]["top1_ci95"] == metrics["baselines"]["cooccurrence"]["top1_ci95"]
    section = run_geometry.geometry_section(summary, metrics)
    lead = {name: (metrics["predictor"]["top1"] - b["top1"], metrics["predictor"]["recall_at_k"] - b["recall_at_k"])
            for name, b in metrics["baselines"].items()}
    for name in ("cooccurrence", "lookup_interpolated", "frequency"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith(f"| {100 * lead[name][0]:+.1f} / {100 * lead[name][1]:+.1f} |"), row
    assert "1.5 min of wall time" in section and f"{EXPERTS} experts, top-{TOP_K}" in section
