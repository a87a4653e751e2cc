"""The schema of params.yaml, assembled from the config dataclasses that live next to the code they configure:

  collect   moe_prefetch.collect.config.CollectParams
  shard     moe_prefetch.sharding.ShardParams
  windows   moe_prefetch.windows.config.WindowsParams
  train     moe_prefetch.training.TrainParams (shared keys + one section per registered predictor architecture)
  evaluate  moe_prefetch.evaluation.config.EvaluateParams

Each stage loads only its own section's class (so that editing one section's schema re-runs only that stage, and
the `validate` stage); this module is for code that wants any section by name: tests, notebooks, and
`validate_all`, which the `validate` stage runs first to check the whole file at once. Loading a section rejects an unknown key, a wrong type or an
out-of-range value with a one-line error naming the key (e.g. `windows.horizon: must be > 0, got 0`). Checks that
need data (a context longer than the model has MoE layers) run where the data is first read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_prefetch.config import PARAMS_FILE, SECTIONS, as_dict, parse, read_params

__all__ = ["SECTIONS", "as_dict", "load_section", "parse_section", "schema", "validate_all"]


def schema(name: str) -> type:
    """The config dataclass of params section `name`."""
    if name == "collect":
        from moe_prefetch.collect.config import CollectParams as section
    elif name == "shard":
        from moe_prefetch.sharding import ShardParams as section
    elif name == "windows":
        from moe_prefetch.windows.config import WindowsParams as section
    elif name == "train":
        from moe_prefetch.training import TrainParams as section
    elif name == "evaluate":
        from moe_prefetch.evaluation.config import EvaluateParams as section
    else:
        raise KeyError(f"{name!r} is not a params section; sections: {', '.join(SECTIONS)}")
    return section


def parse_section(name: str, raw: Any) -> Any:
    """Build and validate one section from its raw YAML mapping."""
    return parse(schema(name), raw, name)


def load_section(name: str, path: Path = PARAMS_FILE) -> Any:
    """Read params.yaml, reject unknown top-level sections, return the validated section `name`."""
    return parse_section(name, read_params(path).get(name))


def validate_all(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Every section of params.yaml, validated: section name -> config."""
    raw = read_params(path)
    return {name: parse_section(name, raw.get(name)) for name in SECTIONS}
