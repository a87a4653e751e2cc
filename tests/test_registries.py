"""Every registered predictor architecture is wired into the pipeline: its params.yaml section holds exactly its
config dataclass's defaults (the dataclass defaults are the pipeline defaults), every config field has a
docstring, and the README's predictor table has a row for it. The other params sections are checked against
their dataclasses' defaults the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from moe_prefetch.params import schema
from moe_prefetch.predictors import ARCHITECTURES
from moe_prefetch.training import TrainLoopParams

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
CONFIGURED = [arch for arch, cls in ARCHITECTURES.items() if cls.config is not None]


def as_yaml(config) -> dict:
    """A config dataclass instance as params.yaml spells it: YAML keys, nested sections as mappings."""
    return {f.metadata.get("key", f.name): as_yaml(value) if dataclasses.is_dataclass(value := getattr(config, f.name)) else value
            for f in dataclasses.fields(config)}


def docstrings(config, prefix: str) -> Iterator[tuple[str, str]]:
    """(key, docstring) of every field of a config dataclass instance, nested sections' fields included."""
    for f in dataclasses.fields(config):
        key = f"{prefix}.{f.metadata.get('key', f.name)}"
        yield key, f.metadata.get("doc", "")
        if dataclasses.is_dataclass(value := getattr(config, f.name)):
            yield from docstrings(value, key)


@pytest.mark.parametrize("arch", CONFIGURED)
def test_params_yaml_arch_section_equals_the_config_defaults(arch) -> None:
    expected = as_yaml(ARCHITECTURES[arch].config())
    assert arch in PARAMS["train"], f"params.yaml: add section train.{arch}: {expected}"
    assert PARAMS["train"][arch] == expected


def test_params_yaml_shared_train_keys_equal_the_loop_defaults() -> None:
    shared = {key: value for key, value in PARAMS["train"].items() if key not in CONFIGURED}
    assert shared == as_yaml(TrainLoopParams())


@pytest.mark.parametrize("section", ["collect", "shard", "windows"])
def test_params_yaml_section_equals_the_schema_defaults(section) -> None:
    assert PARAMS[section] == as_yaml(schema(section)())


def test_params_yaml_evaluate_section_equals_the_schema_defaults() -> None:
    assert PARAMS["evaluate"] == as_yaml(schema("evaluate")())


@pytest.mark.parametrize("prefix, config", [("train", TrainLoopParams)] + [(f"train.{a}", ARCHITECTURES[a].config) for a in CONFIGURED])
def test_every_config_field_has_a_docstring(prefix, config) -> None:
    undocumented = [key for key, text in docstrings(config(), prefix) if not text.strip()]
    assert not undocumented, f"fields without a doc(...) text: {undocumented}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_readme_predictor_table_has_a_row(arch) -> None:
    section = (ROOT / "README.md").read_text().split("\n## Predictors\n", 1)[1].split("\n## ", 1)[0]
    assert any(line.startswith(f"| `{arch}`") for line in section.splitlines()), f"README.md ## Predictors: no row for {arch}"
