"""Typed, validated configuration: the machinery every component's config dataclass uses.

A component (a stage, a predictor architecture, a cache policy) declares its own config as a dataclass next to
its code, one `doc(...)` field per key with its docstring and default, and a `validate()` raising PipelineError
with a one-line message that names the key (`windows.horizon: must be >= 1, got 0`). `build()` turns a raw YAML
mapping into that dataclass (unknown keys, wrong types and values outside a Literal are one-line errors);
`load_section()` reads one section of params.yaml. The dataclass defaults are the pipeline defaults: params.yaml
holds the same values, and tests/test_registries.py checks that the two agree.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_prefetch.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
SECTIONS = ("collect", "shard", "windows", "train", "evaluate")  # params.yaml's top-level keys, one per stage


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, key: str | None = None):
    """A config field with its docstring (shown in errors and README tables). `key`: the YAML key when it is not
    a valid Python name (collect's `import`)."""
    metadata = {"doc": text, **({"key": key} if key else {})}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def positive(prefix: str, config: Any, *names: str) -> None:
    """Each named field is > 0."""
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise PipelineError(f"{prefix}.{name}: must be > 0, got {value}")


def non_negative(prefix: str, config: Any, *names: str) -> None:
    """Each named field is >= 0."""
    for name in names:
        value = getattr(config, name)
        if value < 0:
            raise PipelineError(f"{prefix}.{name}: must be >= 0, got {value}")


def positive_int_list(prefix: str, config: Any, *names: str) -> None:
    """Each named field is a non-empty list of integers >= 1."""
    for name in names:
        value = getattr(config, name)
        if not value or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
            raise PipelineError(f"{prefix}.{name}: must be a non-empty list of integers >= 1, got {value}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise PipelineError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if isinstance(tp, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                try:
                    return _coerce(value, option, key)
                except PipelineError:
                    pass
        raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise PipelineError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def yaml_keys(cls: type) -> dict[str, str]:
    """YAML key -> field name of a config dataclass."""
    return {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls)}


def build(cls: type, raw: Any, prefix: str) -> Any:
    """The config dataclass `cls` from a raw YAML mapping (missing keys take their defaults); not validated."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{prefix}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = yaml_keys(cls)
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PipelineError(f"{prefix}.{unknown[0]}: unknown key; accepted: {', '.join(sorted(names))}")
    return cls(**{names[key]: _coerce(value, hints[names[key]], f"{prefix}.{key}") for key, value in raw.items()})


def parse(cls: type, raw: Any, prefix: str) -> Any:
    """build() then validate()."""
    config = build(cls, raw, prefix)
    config.validate()
    return config


def read_params(path: Path = PARAMS_FILE) -> dict:
    """params.yaml as a dict; a missing file, bad YAML or an unknown top-level section is a one-line error."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run from the project root") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise PipelineError(f"{unknown[0]}: unknown params section; accepted: {', '.join(SECTIONS)}")
    return raw


def load_section(name: str, cls: type, path: Path = PARAMS_FILE) -> Any:
    """The validated section `name` of params.yaml as a `cls`."""
    return parse(cls, read_params(path).get(name), name)


def as_dict(config: Any) -> dict:
    """The config as plain data (saved inside checkpoints and manifests)."""
    return dataclasses.asdict(config)


def check_network(prefix: str, config: Any, sizes: tuple[str, ...] = (), lists: tuple[str, ...] = ()) -> None:
    """A network config: positive sizes, non-empty lists of positive integers, dropout in [0, 1)."""
    positive(prefix, config, *sizes)
    positive_int_list(prefix, config, *lists)
    if not 0 <= getattr(config, "dropout", 0) < 1:
        raise PipelineError(f"{prefix}.dropout: must be in [0, 1), got {config.dropout}")
