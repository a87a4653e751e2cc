"""params.yaml validation: every bad value stops the run with one line naming the key (and what is accepted).

Static checks go through moe_prefetch.params; checks that need data (layers, domains) through the windows stage.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import TINY, assert_error, merged, run_cli, tiny_params, write_params
from moe_prefetch.params import load_section, parse_section
from moe_prefetch.windows.build import build_windows


def parse(section: str, **overrides):
    return lambda: parse_section(section, merged(TINY[section] if section != "collect" else {}, overrides))


@pytest.mark.parametrize(
    ("section", "overrides", "fragments"),
    [
        # unknown keys, at the top of a section and nested
        ("collect", {"seq_lenght": 32}, ["collect.seq_lenght", "unknown key", "seq_len"]),
        ("windows", {"split": {"foo": 1}}, ["windows.split.foo", "unknown key", "fractions"]),
        ("train", {"speculation_transformer": {"width": 8}}, ["train.speculation_transformer.width", "d_model"]),
        # wrong types
        ("collect", {"seq_len": "abc"}, ["collect.seq_len", "expected int", "'abc'"]),
        ("train", {"lr": "fast"}, ["train.lr", "expected float", "'fast'"]),
        ("shard", {"rows_per_shard": True}, ["shard.rows_per_shard", "expected int", "bool"]),
        ("windows", {"horizon": 1.5}, ["windows.horizon", "expected int"]),
        ("collect", {"dtype": "int8"}, ["collect.dtype", "'float32'"]),
        ("windows", {"split": {"by": "random"}}, ["windows.split.by", "'sequence'", "'domain'"]),
        ("windows", {"split": "sequence"}, ["windows.split", "expected a mapping"]),
        # ranges
        ("windows", {"horizon": 0}, ["windows.horizon", ">", "0"]),
        ("windows", {"context_length": 0}, ["windows.context_length", "got 0"]),
        ("windows", {"context_length": -2}, ["windows.context_length", "got -2"]),
        ("shard", {"rows_per_shard": 0}, ["shard.rows_per_shard"]),
        ("train", {"max_train_windows": -1}, ["train.max_train_windows", ">= 0"]),
        ("train", {"speculation_transformer": {"d_model": 10, "heads": 3}}, ["train.speculation_transformer.d_model", "heads"]),
        # split fractions
        ("windows", {"split": {"fractions": [0.5, 0.2, 0.2]}}, ["windows.split.fractions", "sum to 1"]),
        ("windows", {"split": {"fractions": [0.5, 0.5]}}, ["windows.split.fractions", "3"]),
        ("windows", {"split": {"fractions": [1.2, -0.1, -0.1]}}, ["windows.split.fractions", "non-negative"]),
        ("windows", {"split": {"by": "domain", "fractions": [0.8, 0.2]}}, ["windows.split.test_domain", "domain"]),
        ("windows", {"split": {"by": "domain", "test_domain": "python-docs"}}, ["windows.split.fractions", "2"]),
        # choices
        ("train", {"arch": "no_such_arch"}, ["train.arch", "'no_such_arch'", "frequency", "lookup", "speculation_transformer"]),
        ("train", {"device": "tpu"}, ["train.device", "cpu"]),
        ("train", {"stream_buffer": -1}, ["train.stream_buffer", ">= 0"]),
        ("train", {"stream_buffer": 1000, "max_train_windows": 10}, ["train.stream_buffer", "max_train_windows 0"]),
        ("train", {"stream_buffer": 1000, "max_train_windows": 0, "arch": "lookup"}, ["train.stream_buffer", "neural archs only"]),
        ("train", {"hidden_mlp": {"routing_embedding_dim": -1}}, ["train.hidden_mlp.routing_embedding_dim", ">= 0"]),
        ("evaluate", {"top_m": [0, 1]}, ["evaluate.top_m", ">= 1"]),
        ("evaluate", {"top_m": []}, ["evaluate.top_m"]),
        ("evaluate", {"top_m": [1, "3"]}, ["evaluate.top_m"]),
        ("evaluate", {"top_m": [True]}, ["evaluate.top_m"]),
        ("evaluate", {"top_m": 5}, ["evaluate.top_m", "expected list"]),
        ("evaluate", {"top_m": [3, 5]}, ["evaluate.top_m", "must include 1"]),
        ("evaluate", {"max_horizon": -1}, ["evaluate.max_horizon", ">= 0"]),
        ("evaluate", {"entropy_train_sizes": [25000, 0]}, ["evaluate.entropy_train_sizes", ">= 1", "[25000, 0]"]),
        ("collect", {"device": "gpu"}, ["collect.device", "'gpu'", "cuda:N"]),
        ("collect", {"batch_size": 4, "sequences_per_chunk": 10}, ["collect.sequences_per_chunk", "multiple", "collect.batch_size"]),
        ("collect", {"min_tokens": 64, "seq_len": 32}, ["collect.min_tokens", "collect.seq_len"]),
        ("collect", {"sources": []}, ["collect.sources"]),
        ("collect", {"capture": {"lookahead": -1}}, ["collect.capture.lookahead"]),
    ],
)
def test_bad_value_names_the_key(section, overrides, fragments):
    assert_error(parse(section, **overrides), *fragments)


def test_tiny_and_default_params_are_valid():
    for section in TINY:
        tiny_params(section)
        parse_section(section, None)  # an empty section takes every default


def test_unknown_top_level_section(tmp_path):
    path = write_params(tmp_path, {"evalute": {"top_m": [1]}})
    assert_error(lambda: load_section("shard", path), "evalute", "unknown params section", "evaluate")


def test_missing_and_malformed_params_file(tmp_path):
    assert_error(lambda: load_section("shard", tmp_path / "params.yaml"), "params.yaml", "not found")
    (tmp_path / "params.yaml").write_text("shard: [unclosed\n")
    assert_error(lambda: load_section("shard", tmp_path / "params.yaml"), "params.yaml", "not valid YAML")


def test_cli_prints_one_line_and_exits_1(tmp_path):
    write_params(tmp_path, {"windows": {"horizon": 0}})
    result = run_cli("windows", "--shards", "missing", "--out", "out", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: windows.horizon: ") and lines[0].endswith("got 0"), lines
    assert not (tmp_path / "out").exists()


def test_unknown_key_through_the_cli_names_the_file_key(tmp_path):
    raw = merged(TINY, {"windows": {"split": {"foo": 1}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli("windows", "--shards", "missing", "--out", "out", cwd=tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: windows.split.foo: unknown key")


# Checks that need the data: they run in the windows stage, on the real tiny shards.

@pytest.mark.parametrize(("context_length", "horizon"), [(8, 1), (6, 3), (1, 8)])
def test_context_plus_horizon_beyond_moe_layers(tiny, tmp_path, context_length, horizon):
    params = tiny_params("windows", context_length=context_length, horizon=horizon)
    assert_error(lambda: build_windows(tiny.shards, tmp_path, params),
                 "windows.context_length", "windows.horizon", f"{tiny.manifest.num_layers} MoE layers")
    assert list(tmp_path.iterdir()) == []


def test_context_plus_horizon_equal_to_layers_gives_one_target_layer(tiny, tmp_path):
    L = tiny.manifest.num_layers
    summary = build_windows(tiny.shards, tmp_path, tiny_params("windows", context_length=L - 1, horizon=1))
    assert summary["target_layers"] == [L - 1]


def test_test_domain_must_be_a_collected_domain(tiny, tmp_path):
    params = tiny_params("windows", split={"by": "domain", "test_domain": "wikipedia", "fractions": [0.8, 0.2]})
    assert_error(lambda: build_windows(tiny.shards, tmp_path, params),
                 "windows.split.test_domain", "'wikipedia'", "python-docs", "python-stdlib")


def test_a_split_without_documents_is_named(tiny, tmp_path):
    params = tiny_params("windows", split={"fractions": [1.0, 0.0, 0.0]})
    assert_error(lambda: build_windows(tiny.shards, tmp_path, params), "windows.split", "val split got no document")


def test_top_m_beyond_num_experts_is_clipped(tiny, tmp_path):
    """Decision: evaluate.top_m may exceed the number of experts E; m is clipped to E, so top-m is 1.0 (every expert
    is predicted). top_k > E cannot come from params: k and E are read from the model (no collect/import knob)."""
    from moe_prefetch.evaluation.evaluate import evaluate

    E = tiny.manifest.num_experts
    metrics = evaluate(tiny_params("evaluate", top_m=[1, E, E + 4]), tiny.windows, tiny.shards, tiny.lookup, tmp_path)
    for result in [metrics["predictor"], *metrics["baselines"].values()]:
        assert result[f"top{E}"] == result[f"top{E + 4}"] == 1.0
