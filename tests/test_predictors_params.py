"""train.* validation: one-line PipelineErrors naming the key, and params.yaml documents every architecture."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from moe_prefetch.errors import PipelineError
from moe_prefetch.params import as_dict, parse_section
from moe_prefetch.predictors import ARCHITECTURES
from moe_prefetch.training import TrainParams

GEOMETRY = {"num_experts": 16, "top_k": 2, "num_layers": 8, "context_length": 3, "horizon": 1}
PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.mark.parametrize("raw, message", [
    ({"arch": "mystery"}, r"^train.arch: unknown architecture 'mystery'; accepted: .*hybrid"),
    ({"mlp": {"hidden": []}}, r"^train.mlp.hidden: must be a non-empty list of integers >= 1, got \[\]"),
    ({"mlp": {"hidden": [64, 0]}}, r"^train.mlp.hidden: must be a non-empty list"),
    ({"mlp": {"embedding_dim": 0}}, r"^train.mlp.embedding_dim: must be > 0, got 0"),
    ({"mlp": {"dropout": 1.0}}, r"^train.mlp.dropout: must be in \[0, 1\), got 1.0"),
    ({"lstm": {"hidden_size": -4}}, r"^train.lstm.hidden_size: must be > 0"),
    ({"layer_specific": {"hidden": "wide"}}, r"^train.layer_specific.hidden: expected list"),
    ({"multiscale": {"scales": [1, 0]}}, r"^train.multiscale.scales: must be a non-empty list"),
    ({"hybrid": {"temporal_tokens": -1}}, r"^train.hybrid.temporal_tokens: must be >= 0, got -1"),
    ({"hidden_mlp": {"layer_dim": 0}}, r"^train.hidden_mlp.layer_dim: must be > 0"),
    ({"ensemble": {"members": ["lookup", "nope"]}}, r"^train.ensemble.members: 'nope' cannot be a member; accepted: "),
    ({"ensemble": {"members": ["mlp", "ensemble"]}}, r"^train.ensemble.members: 'ensemble' cannot be a member"),
    ({"ensemble": {"members": ["mlp", "mlp"]}}, r"^train.ensemble.members: lists an architecture twice"),
    ({"ensemble": {"members": ["mlp"]}}, r"^train.ensemble.members: must list at least 2 architectures"),
    ({"ensemble": {"holdout_fraction": 1.0}}, r"^train.ensemble.holdout_fraction: must be in \(0, 1\)"),
    ({"mlp": {"width": 3}}, r"^train.mlp.width: unknown key; accepted: context_encoding, dropout, embedding_dim, hidden, transitions, transitions_lr_scale"),
])
def test_bad_train_params_are_one_line_errors(raw, message) -> None:
    with pytest.raises(PipelineError, match=message) as error:
        parse_section("train", raw)
    assert "\n" not in str(error.value)


def test_a_scale_longer_than_the_context_fails_at_construction() -> None:
    params = as_dict(parse_section("train", {"arch": "multiscale", "multiscale": {"scales": [1, 4]}}))
    with pytest.raises(PipelineError, match=r"^train.multiscale.scales: \[1, 4\] has a scale longer than windows.context_length \(3\)"):
        ARCHITECTURES["multiscale"](GEOMETRY, params)


@pytest.mark.parametrize("key", ["token_context", "token_horizon"])
def test_negative_temporal_extents_are_rejected(key) -> None:
    with pytest.raises(PipelineError, match=rf"^windows.{key}: must be >= 0, got -1"):
        parse_section("windows", {key: -1})


def test_params_yaml_has_a_commented_section_per_architecture() -> None:
    raw = yaml.safe_load(PARAMS_YAML.read_text())["train"]
    parse_section("train", raw)
    sections = {f.name for f in dataclasses.fields(TrainParams) if f.default_factory is not dataclasses.MISSING}  # per-arch
    assert sections <= set(raw), f"params.yaml train lacks {sorted(sections - set(raw))}"
    lines = PARAMS_YAML.read_text().split("\ntrain:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    uncommented = [line for line in lines if ":" in line and not line.rstrip().endswith(":") and "#" not in line]
    assert not uncommented, f"train keys without a comment: {uncommented}"
    for arch in ARCHITECTURES:  # every architecture builds at its params.yaml defaults (hidden_mlp's module waits for the data)
        ARCHITECTURES[arch](GEOMETRY, as_dict(parse_section("train", {**raw, "arch": arch})))
