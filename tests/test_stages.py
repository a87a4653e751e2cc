"""The stages on the tiny real trace set: shard bookkeeping, windows against a per-token Python oracle, no
leakage between splits, checkpoints and the metrics file."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from conftest import read_shard_tables, single_thread, tiny_params
from moe_prefetch import traces
from moe_prefetch.predictors import load_predictor
from moe_prefetch.predictors.base import WEIGHTS_NAME
from moe_prefetch.windows.data import SPLITS, context_layer_offsets, read_summary, read_windows
from moe_prefetch.windows.build import build_windows

RANKING_KEYS = {"top1", "top3", "top5", "top10", "recall_at_k"}
BASELINES = {"random", "frequency", "lookup", "previous_token"}


# --- shard ---------------------------------------------------------------------------------------------------

def test_shard_manifest_matches_traces(tiny):
    manifest = tiny.manifest
    trace_rows = sum(pq.read_metadata(p).num_rows for p in tiny.traces.glob("chunk-*.parquet"))
    assert manifest.rows == trace_rows == sum(entry["rows"] for entry in manifest.shards)
    assert manifest.schema_version == traces.SCHEMA_VERSION
    assert (manifest.num_layers, manifest.num_experts, manifest.top_k) == (8, 16, 2)
    assert manifest.domains == ["python-docs", "python-stdlib"]
    rows_per_shard = tiny_params("shard").rows_per_shard
    assert [entry["rows"] for entry in manifest.shards[:-1]] == [rows_per_shard] * (len(manifest.shards) - 1)
    assert 0 < manifest.shards[-1]["rows"] <= rows_per_shard
    for entry in manifest.shards:
        path = tiny.shards / entry["file"]
        assert traces.sha256_file(path) == entry["sha256"]
        assert pq.read_metadata(path).num_rows == entry["rows"]
    assert traces.Manifest.read(tiny.shards) == manifest


def test_shards_keep_trace_rows_in_order(tiny):
    chunks = [pq.read_table(p) for p in sorted(tiny.traces.glob("chunk-*.parquet"))]
    shards = read_shard_tables(tiny.shards)
    for name in ("sequence_id", "position", "experts", "weights"):
        assert sum((c[name].to_pylist() for c in chunks), []) == shards[name].to_pylist()


# --- windows: the oracle -------------------------------------------------------------------------------------

def oracle_windows(tiny, context_length: int, horizon: int, split_of_document: dict) -> dict[str, list[tuple]]:
    """Every window, per split, by a plain loop over the shard rows (the definition in moe_prefetch/windows/data.py)."""
    rows = read_shard_tables(tiny.shards).to_pylist()
    L = tiny.manifest.num_layers
    none = [-1] * tiny.manifest.top_k
    out = defaultdict(list)
    for i, row in enumerate(rows):
        before = rows[i - 1] if i else None
        has_previous = before is not None and before["sequence_id"] == row["sequence_id"] and before["position"] == row["position"] - 1
        for t in range(context_length - 1 + horizon, L):
            context = [e for layer in range(t - horizon - context_length + 1, t - horizon + 1) for e in row["experts"][layer]]
            out[split_of_document[row["document_id"]]].append((
                row["sequence_id"], row["domain"], row["position"], t, context, row["experts"][t], row["weights"][t],
                before["experts"][t] if has_previous else none,
            ))
    return out


WINDOW_COLUMNS = ("sequence_id", "domain", "position", "target_layer", "context_experts", "target_experts",
                  "target_weights", "prev_token_experts")


def read_split(directory, split) -> list[tuple]:
    table = pq.read_table(directory / f"{split}.parquet", columns=list(WINDOW_COLUMNS))
    return list(zip(*(table[name].to_pylist() for name in WINDOW_COLUMNS)))


def document_splits(tiny, windows_dir) -> dict[str, set[str]]:
    """document_id -> the splits its sequences' windows landed in (from the parquet columns + the shards)."""
    shards = read_shard_tables(tiny.shards)
    document_of = dict(zip(shards["sequence_id"].to_pylist(), shards["document_id"].to_pylist()))
    found = defaultdict(set)
    for split in SPLITS:
        for sequence in set(pq.read_table(windows_dir / f"{split}.parquet", columns=["sequence_id"])["sequence_id"].to_pylist()):
            found[document_of[sequence]].add(split)
    return found


@pytest.mark.parametrize(("context_length", "horizon"), [(2, 1), (3, 2), (1, 7)])
def test_windows_equal_the_per_token_loop(tiny, tmp_path, context_length, horizon):
    windows_dir = tiny.windows
    if (context_length, horizon) != (2, 1):
        windows_dir = tmp_path
        build_windows(tiny.shards, windows_dir, tiny_params("windows", context_length=context_length, horizon=horizon))
    split_of = {doc: splits.pop() for doc, splits in document_splits(tiny, windows_dir).items()}
    expected = oracle_windows(tiny, context_length, horizon, split_of)
    summary = json.loads((windows_dir / "summary.json").read_text())
    targets = tiny.manifest.num_layers - context_length - horizon + 1
    assert summary["target_layers"] == list(range(context_length + horizon - 1, tiny.manifest.num_layers))
    for split in SPLITS:
        got = read_split(windows_dir, split)
        assert got == expected[split], split  # same windows, same order, exact values (float32 weights included)
        assert len(got) == summary["splits"][split]["tokens"] * targets == summary["splits"][split]["windows"]
    assert sum(len(v) for v in expected.values()) == tiny.manifest.rows * targets


def test_previous_token_column_spans_shard_boundaries(tiny):
    """The tiny shards cut sequences in the middle (200 rows vs 32-token sequences): the oracle test above covers
    those rows; here check that such rows exist and carry a real previous token."""
    shards = read_shard_tables(tiny.shards)
    starts = np.cumsum([0] + [e["rows"] for e in tiny.manifest.shards[:-1]])[1:]
    positions = shards["position"].to_numpy()
    assert any(positions[s] > 0 for s in starts)
    windows = [row for split in SPLITS for row in read_split(tiny.windows, split)]
    assert all((prev == [-1, -1]) == (position == 0) for _, _, position, _, _, _, _, prev in windows)


def test_no_document_in_two_splits(tiny):
    found = document_splits(tiny, tiny.windows)
    shards = read_shard_tables(tiny.shards)
    assert set(found) == set(shards["document_id"].to_pylist())  # every document landed somewhere
    assert all(len(splits) == 1 for splits in found.values()), {d: s for d, s in found.items() if len(s) > 1}
    per_split = {split: sum(split in s for s in found.values()) for split in SPLITS}
    assert per_split == {split: tiny.summary["splits"][split]["documents"] for split in SPLITS}
    n = len(found)  # cut of the shuffled documents at round(cumsum(fractions) * n)
    bounds = np.round(np.cumsum([0.6, 0.2, 0.2]) * n).astype(int)
    assert list(per_split.values()) == [bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1]]


def test_domain_split_holds_out_exactly_the_test_domain(tiny, tmp_path):
    params = tiny_params("windows", split={"by": "domain", "test_domain": "python-docs", "fractions": [0.75, 0.25]})
    summary = build_windows(tiny.shards, tmp_path, params)
    shards = read_shard_tables(tiny.shards)
    docs_of_domain = defaultdict(set)
    for doc, domain in zip(shards["document_id"].to_pylist(), shards["domain"].to_pylist()):
        docs_of_domain[domain].add(doc)
    found = document_splits(tiny, tmp_path)
    assert {d for d, s in found.items() if "test" in s} == docs_of_domain["python-docs"]
    assert all(len(s) == 1 for s in found.values())
    for split in SPLITS:
        domains = set(pq.read_table(tmp_path / f"{split}.parquet", columns=["domain"])["domain"].to_pylist())
        assert domains == ({"python-docs"} if split == "test" else {"python-stdlib"})
        assert summary["splits"][split]["domains"] == sorted(domains)


def test_windows_are_deterministic(tiny, tmp_path):
    build_windows(tiny.shards, tmp_path, tiny_params("windows"))
    for name in [*(f"{s}.parquet" for s in SPLITS), "summary.json"]:
        assert traces.sha256_file(tmp_path / name) == traces.sha256_file(tiny.windows / name), name


def test_token_ids_add_each_windows_token_id_and_only_the_summary_key(tiny, tmp_path):
    """windows.token_ids (the default): every window carries its token's tokenizer id from the shards; turned off,
    the windows lose that column and the summary key, nothing else."""
    on, off = tmp_path / "on", tmp_path / "off"
    on.mkdir(), off.mkdir()
    summary = build_windows(tiny.shards, on, tiny_params("windows"))
    summary_off = build_windows(tiny.shards, off, tiny_params("windows", token_ids=False))
    shards = read_shard_tables(tiny.shards)
    token_of = dict(zip(zip(shards["sequence_id"].to_pylist(), shards["position"].to_pylist()), shards["token_id"].to_pylist()))
    for split in SPLITS:
        table = pq.read_table(on / f"{split}.parquet")
        tokens = zip(table["sequence_id"].to_pylist(), table["position"].to_pylist())
        assert table["token_id"].to_pylist() == [token_of[token] for token in tokens]
        assert table.drop_columns(["token_id"]).equals(pq.read_table(off / f"{split}.parquet"))
    assert read_windows(on, "test").token_id.tolist() == pq.read_table(on / "test.parquet")["token_id"].to_pylist()
    assert summary["params"]["token_ids"] is True and "token_ids" not in summary_off["params"]


def test_context_weights_add_the_context_layers_gate_weights_and_only_the_summary_key(tiny, tmp_path):
    """windows.context_weights (on by default): each window's context_weights are the shards' gate weights of its
    context layers, slot for slot with context_experts; turned off, the windows are the default's without that
    column and without its summary key."""
    summary = read_summary(tiny.windows)
    routing, windows = traces.read_routing(tiny.shards), read_windows(tiny.windows, "test")
    row_of = {(routing.sequence_ids[s], int(p)): row for row, (s, p) in enumerate(zip(routing.sequence_index, routing.position))}
    rows = np.array([row_of[(windows.sequence_ids[s], int(p))] for s, p in zip(windows.sequence_index, windows.position)])
    layers = windows.target_layer[:, None].astype(np.int64) + np.array(context_layer_offsets(summary["context_length"], summary["horizon"]))  # (N, c)
    np.testing.assert_array_equal(windows.context_weights, routing.weights[rows[:, None], layers])
    np.testing.assert_array_equal(windows.context_experts, routing.experts[rows[:, None], layers])
    off = build_windows(tiny.shards, tmp_path, tiny_params("windows", context_weights=False))
    for split in SPLITS:
        with_weights = pq.read_table(tiny.windows / f"{split}.parquet")
        assert with_weights.drop_columns(["context_weights"]).equals(pq.read_table(tmp_path / f"{split}.parquet"))
    assert summary["params"]["context_weights"] is True and "context_weights" not in off["params"]


# --- train ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["predictor", "lookup"])
def test_checkpoint_metadata(tiny, which):
    directory = getattr(tiny, which)
    with safe_open(str(directory / WEIGHTS_NAME), "np") as handle:
        metadata = json.loads(handle.metadata()["predictor"])
    arch = "speculation_transformer" if which == "predictor" else "lookup"
    assert metadata["arch"] == arch
    assert metadata["params"]["arch"] == arch and metadata["params"]["seed"] == 0
    assert metadata["geometry"] == {"num_experts": 16, "top_k": 2, "num_layers": 8, "context_length": 2, "horizon": 1}
    predictor = load_predictor(directory)
    assert metadata["parameter_count"] == predictor.parameter_count() > 0
    if which == "predictor":
        assert tiny.train_result["parameters"] == metadata["parameter_count"]
        assert tiny.train_result["epochs"] == 1
        # the train split's size (the neural fit subsamples it to train.max_train_windows = 2000 internally)
        assert tiny.train_result["train_windows"] == tiny.summary["splits"]["train"]["windows"]


def test_dvclive_logs(tiny):
    metrics = json.loads((tiny.live / "metrics.json").read_text())
    assert {"train_loss", "val_loss", "val_top1", "parameters", "epochs"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("train_loss", "val_loss"))
    assert (tiny.live / "plots" / "metrics" / "val_loss.tsv").read_text().splitlines()[0] == "step\tval_loss"


# --- evaluate ------------------------------------------------------------------------------------------------

def test_cache_summary_is_the_main_tables_on_demand_belady_fastest_predictor_strategy_and_ideal(tiny):
    cache, summary = tiny.metrics["cache"], tiny.metrics["cache_summary"]
    charged = ("predictor", "predictor_gated", "predicted_eviction", "predictor_evict", "predictor_expert_gated")
    best = max((name for name in charged if name in cache), key=lambda name: cache[name]["speedup_vs_on_demand"])
    assert summary["best_predictor_strategy"] == best and summary["profile"] == cache["config"]["profile"]
    for label, name in (("on_demand", "on_demand"), ("belady", "belady"), ("best_predictor", best), ("ideal", "ideal")):
        assert summary[f"{label}_time_per_token_ms"] == cache[name]["time_per_token_ms"]
        assert summary[f"{label}_speedup"] == cache[name]["speedup_vs_on_demand"]


def test_cache_ceilings_hold_on_the_tiny_run(tiny):
    # Belady's on-time hit rate >= LRU's at every capacity (no prefetch either way); the ideal is a floor under every
    # strategy, in the main table and in every cost profile and regime.
    for row in json.loads((tiny.plots / "cache_by_capacity.json").read_text()):
        assert row["belady_hit_rate"] >= row["on_demand_hit_rate"] - 1e-12
    cache = tiny.metrics["cache"]
    assert cache["config"]["replayed_layers"] == tiny.metrics["data"]["num_layers"]  # every MoE layer, not only targets
    strategies = [name for name in cache if name not in ("config", "ideal")]
    assert all(cache["ideal"]["time_per_token_ms"] <= cache[name]["time_per_token_ms"] + 1e-9 for name in strategies)
    rows = [*tiny.metrics["cache_by_profile"].values(), *tiny.metrics["cache_by_regime"].values()]
    assert len(rows) > 1
    for row in rows:
        speedups = {key: value for key, value in row.items() if key.endswith("_speedup_vs_on_demand")}
        assert speedups["ideal_speedup_vs_on_demand"] == max(speedups.values())
    assert (tiny.plots / "cache_speedup_by_regime.png").stat().st_size > 0
    for name in strategies:  # decode batch 1: every strategy's speedup carries its document-bootstrap interval
        low, high = cache[name]["speedup_ci95"]
        assert low - 1e-9 <= cache[name]["speedup_vs_on_demand"] <= high + 1e-9
    # The gates (every strategy registered gated=True): never more than 1% slower than on-demand LRU, in any profile
    # or regime.
    from moe_prefetch.evaluation.replay import PREFETCH_STRATEGIES

    gated = [name for name, strategy in PREFETCH_STRATEGIES.items() if strategy.gated]
    assert {"predictor_gated", "lookup_gated", "predictor_expert_gated"} <= set(gated)
    for row in [cache, *tiny.metrics["cache_by_profile"].values(), *tiny.metrics["cache_by_regime"].values()]:
        for name in gated:
            speedup = row[name]["speedup_vs_on_demand"] if name in row else row[f"{name}_speedup_vs_on_demand"]
            assert speedup >= 0.99, (name, speedup)


def test_metrics_have_predictor_and_baselines(tiny):
    metrics = tiny.metrics
    assert metrics["test_windows"] == tiny.summary["splits"]["test"]["windows"]
    assert RANKING_KEYS <= set(metrics["predictor"])
    assert BASELINES <= set(metrics["baselines"])
    # Metrics keys come from the registries, in registration order (the tiny collect captures no look-ahead, the
    # tiny windows carry no token ids).
    from moe_prefetch.evaluation.baselines import BASELINES as REGISTERED_BASELINES
    from moe_prefetch.evaluation.replay import PREFETCH_STRATEGIES

    assert list(metrics["baselines"]) == [name for name in REGISTERED_BASELINES if name != "stale_gate"]
    assert list(metrics["cache"]) == ["config", *(name for name in PREFETCH_STRATEGIES if name != "stale_gate"), "ideal"]
    for result in [metrics["predictor"], *metrics["baselines"].values()]:
        assert RANKING_KEYS <= set(result)
        tops = [result[f"top{m}"] for m in (1, 3, 5, 10)]
        assert all(0 <= value <= 1 for value in tops) and tops == sorted(tops)
    json.dumps(metrics, allow_nan=False)  # NaN never reaches the metrics file
    for name in ("per_layer_top1.json", "top_m.json", "calibration.json", "per_layer_top1.png", "top_m.png"):
        assert (tiny.plots / name).stat().st_size > 0


def test_per_horizon_equals_a_windows_run_at_that_horizon(tiny, tmp_path):
    """per_horizon scores the baselines at h = 1..max_horizon in one run: at the stage's own horizon they are the
    headline baselines, at another horizon they equal what a windows run at that horizon gives (same split)."""
    from moe_prefetch.evaluation.baselines import baseline_scorers
    from moe_prefetch.evaluation.evaluate import rank_all

    per_horizon, params = tiny.metrics["per_horizon"], tiny_params("evaluate")
    assert sorted(per_horizon) == [f"h{h}" for h in range(1, params.max_horizon + 1)]
    assert tiny.summary["horizon"] == 1 and "predictor" in per_horizon["h1"] and "predictor" not in per_horizon["h2"]
    for name in ("predictor", "lookup", "frequency", "previous_token"):
        source = tiny.metrics["predictor"] if name == "predictor" else tiny.metrics["baselines"][name]
        assert per_horizon["h1"][name] == {m: source[m] for m in ("top1", "recall_at_k", "recall_at_2k")}, name
    summary = build_windows(tiny.shards, tmp_path, tiny_params("windows", horizon=2))
    train_set, test_set = read_windows(tmp_path, "train"), read_windows(tmp_path, "test")
    accumulators = rank_all(baseline_scorers(train_set, summary), test_set, params, summary)
    assert per_horizon["h2"]["test_windows"] == summary["splits"]["test"]["windows"] < tiny.metrics["test_windows"]
    for name, acc in accumulators.items():
        assert per_horizon["h2"][name] == pytest.approx({m: acc.result()[m] for m in ("top1", "recall_at_k", "recall_at_2k")}, abs=1e-6), name
    rows = json.loads((tiny.plots / "per_horizon.json").read_text())
    assert [row["horizon"] for row in rows] == [1, 2, 3] and (tiny.plots / "per_horizon.png").stat().st_size > 0


def test_max_horizon_beyond_the_layers_is_capped_with_a_note(tiny, tmp_path, capsys):
    """evaluate.max_horizon is an upper bound: a model with L MoE layers has horizons 1..L - context_length."""
    from moe_prefetch.evaluation.evaluate import evaluate

    L, c = tiny.manifest.num_layers, tiny.summary["context_length"]
    (tmp_path / "plots").mkdir()
    metrics = evaluate(tiny_params("evaluate", max_horizon=L - c + 1), tiny.windows, tiny.shards, tiny.lookup, tmp_path / "plots")
    assert f"note: evaluate.max_horizon {L - c + 1} capped to {L - c}" in capsys.readouterr().out
    assert sorted(metrics["per_horizon"], key=lambda h: int(h[1:])) == [f"h{h}" for h in range(1, L - c + 1)]
    rows = json.loads((tmp_path / "plots" / "per_horizon.json").read_text())
    assert sorted({row["horizon"] for row in rows}) == list(range(1, L - c + 1))


def test_bounds_only_where_guaranteed(tiny):
    """What holds by construction, on TEST, for the context X = (target layer, full routing context):
      * Fano with the PLUG-IN H(Y|X) is >= the empirical Bayes top-1 (Fano holds for the empirical joint);
      * any scorer that is a deterministic function of X has test top-1 <= empirical Bayes top-1 (it picks one
        class per context; the empirical Bayes rule picks the most frequent one): lookup and frequency qualify,
        and so the best-scorer lower bound, taken over scorers reading only X, is one of theirs or below it;
      * 2^-CE <= 2^-H_plugin <= empirical Bayes top-1 for the CE of any distribution on test (Gibbs in sample).
    NOT asserted: Fano vs a model's top-1 with the Miller-Madow H (an estimate that can err either way), and
    anything about previous_token, whose scores depend on more than X."""
    bounds, baselines = tiny.metrics["bounds"], tiny.metrics["baselines"]
    bayes = bounds["empirical_bayes_top1"]
    assert bounds["fano_top1_upper_bound_plugin"] >= bayes - 1e-6
    for name in ("lookup", "frequency"):
        assert baselines[name]["top1"] <= bayes + 1e-6, name
    best = bounds["bayes_top1_lower_bound_best_scorer"]
    assert best["scorer"] != "previous_token" and "previous_token" not in bounds["cross_entropy_bits"]
    top1 = {"predictor": tiny.metrics["predictor"]["top1"], **{name: result["top1"] for name, result in baselines.items()}}
    assert best["value"] == max(top1[name] for name in bounds["cross_entropy_bits"])
    entropy = bounds["bayes_top1_lower_bound_cross_entropy"]
    assert entropy["cross_entropy_bits"] == min(bits for bits in bounds["cross_entropy_bits"].values() if bits is not None)
    assert entropy["cross_entropy_bits"] >= bounds["h_plugin_bits"] - 1e-6
    assert entropy["value"] <= 2 ** -bounds["h_plugin_bits"] <= bayes + 1e-6
    assert "bayes_top1_lower_bound" not in bounds
    sizes = [int(n) for n in bounds["plugin_entropy_by_train_size"]]
    assert sizes[-1] == tiny.metrics["data"]["train_windows"] and sizes == sorted(sizes)
    assert bounds["samples"] == tiny.metrics["test_windows"]


def test_random_baseline_is_near_chance(tiny):
    E, n = tiny.manifest.num_experts, tiny.metrics["test_windows"]
    for m in (1, 3, 5, 10):
        p = min(m, E) / E
        assert abs(tiny.metrics["baselines"]["random"][f"top{m}"] - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, m


def test_headline_holds_the_numbers_to_compare_first(tiny):
    from moe_prefetch.evaluation.evaluate import headline

    numbers = headline(tiny.metrics)["headline"]
    baselines = tiny.metrics["baselines"]
    assert numbers["predictor_top1"] == tiny.metrics["predictor"]["top1"]
    assert numbers["best_baseline_top1"] == max(b["top1"] for b in baselines.values())
    assert numbers["best_baseline_recall_at_k"] == max(b["recall_at_k"] for b in baselines.values())
    assert numbers["cache_oracle_speedup"] == tiny.metrics["cache"]["oracle"]["speedup_vs_on_demand"]
    assert all(isinstance(value, float) for value in numbers.values())  # DVC diffs numbers only


def test_across_tokens_predicts_every_layer_and_the_replay_needs_no_fallback(tiny, tmp_path):
    """windows.across_tokens end to end through the stage functions: the predictor scores every MoE layer, its
    per-layer accuracy covers layer 0, the learned strategies list no fallback prefetches, and the ceilings hold."""
    from moe_prefetch.evaluation.evaluate import evaluate
    from moe_prefetch.training import train

    paths = {name: tmp_path / name for name in ("windows", "predictor", "live", "plots")}
    for name in ("windows", "plots"):
        paths[name].mkdir()
    L = tiny.manifest.num_layers
    with single_thread():
        summary = build_windows(tiny.shards, paths["windows"], tiny_params("windows", across_tokens=True))
        train(tiny_params("train"), paths["windows"], paths["predictor"], paths["live"])
        metrics = evaluate(tiny_params("evaluate", max_horizon=0), paths["windows"], tiny.shards, paths["predictor"], paths["plots"])
    assert summary["target_layers"] == list(range(L))
    assert metrics["test_windows"] == summary["splits"]["test"]["tokens"] * L
    layers = {row["layer"] for row in json.loads((paths["plots"] / "per_layer_top1.json").read_text())}
    assert layers == set(range(L))
    cache = metrics["cache"]
    assert cache["predictor"]["fallback_prefetches"] == 0
    # The perfect prefetch now reaches the next token's first layer too: more hits, on time or late (a lead of one
    # layer hides little of a PCIe transfer), than within a step, on the same tokens.
    def hits(strategy: dict) -> float:
        return strategy["hit_rate"] + strategy["late_hit_rate"]

    assert hits(cache["oracle_belady"]) > hits(tiny.metrics["cache"]["oracle_belady"])
    strategies = [name for name in cache if name not in ("config", "ideal")]
    assert all(cache["ideal"]["time_per_token_ms"] <= cache[name]["time_per_token_ms"] + 1e-9 for name in strategies)
