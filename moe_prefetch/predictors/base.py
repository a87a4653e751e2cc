"""The predictor interface every architecture implements, the architecture registry, and checkpoint save/load.

Interface: `fit(train, val, log)` learns from windows (`log(row)` receives per-epoch metrics); `score(windows)`
returns expert scores (N, E) (higher = more likely; evaluation ranks them) and a confidence (N,) in [0, 1] that
the top-ranked expert is the target's highest-weight expert (or None); `save(dir)` / `load_predictor(dir)`
round-trip through safetensors with the architecture name, routing geometry, train params and parameter count
inside (no wall-clock time: `dvc repro --force` reproduces the file byte for byte).

An architecture is one module that defines a Predictor subclass decorated with `@register_arch`, with its
`train.<arch>` params section as a config dataclass in `config` (None: no section) and the window columns it
reads in `requires`; moe_prefetch/predictors/__init__.py imports the module so that the class is registered.
The tests are parametrised over the registry: tests/test_predictors.py trains every architecture on synthetic
windows that carry only the columns it requires, and tests/test_registries.py checks its params.yaml section
(equal to the config's defaults), its field docstrings and its row in the README's predictor table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from moe_prefetch.errors import PipelineError
from moe_prefetch.registry import Registry
from moe_prefetch.windows.data import WindowSet

WEIGHTS_NAME = "predictor.safetensors"


class Predictor:
    """Base class. Subclasses set `arch` (and `config`, `requires`, `streams` where they differ), implement
    fit/score and expose their arrays via state()/load_state()."""

    arch = "base"
    config: type | None = None  # the dataclass of this architecture's train.<arch> params section
    streams = False  # fit() accepts a WindowStream (train.stream_buffer), not only an in-memory WindowSet
    # WindowSet columns fit() reads (score() the same or fewer) besides the target layer, the targets and the
    # sequence bookkeeping, e.g. "context_experts", "hidden_state"; a property where the params section decides
    requires: tuple[str, ...] = ()

    def __init__(self, geometry: dict, params: dict):
        self.geometry = geometry  # num_experts, top_k, num_layers, context_length, horizon
        self.params = params  # the train params section (as plain data) that made this predictor

    @property
    def num_experts(self) -> int:
        return int(self.geometry["num_experts"])

    def fit(self, train: WindowSet, val: WindowSet, log: Callable[[dict], None]) -> None:
        raise NotImplementedError

    def data_geometry(self, train: WindowSet) -> dict:
        """Geometry entries read from the training windows (saved in the checkpoint, so load rebuilds the same
        model); raise PipelineError when the windows lack an input this architecture needs. Cheap: an ensemble
        asks every member before training any."""
        return {}

    def score(self, windows: WindowSet) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def parameter_count(self) -> int:
        return int(sum(a.size for a in self.state().values()))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {
            "arch": self.arch,
            "geometry": self.geometry,
            "params": self.params,
            "parameter_count": self.parameter_count(),
        }
        save_file(self.state(), str(directory / WEIGHTS_NAME), metadata={"predictor": json.dumps(metadata)})


def load_predictor(directory: Path) -> Predictor:
    """Rebuild a saved predictor of any registered architecture."""
    from safetensors import safe_open

    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise PipelineError(f"{path}: missing; run the train stage (dvc repro train)")
    try:
        with safe_open(str(path), "np") as handle:
            metadata = json.loads(handle.metadata()["predictor"])
        arrays = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise PipelineError(f"{path}: unreadable predictor checkpoint ({err})") from None
    from moe_prefetch.predictors import (
        ARCHITECTURES,  # imports every architecture module
    )

    if metadata["arch"] not in ARCHITECTURES:
        raise PipelineError(f"{path}: unknown architecture {metadata['arch']!r}; accepted: {', '.join(sorted(ARCHITECTURES))}")
    predictor = ARCHITECTURES[metadata["arch"]](metadata["geometry"], metadata["params"])
    predictor.load_state(arrays)
    return predictor


ARCHITECTURES: Registry[type[Predictor]] = Registry("architecture")


def register_arch(cls: type[Predictor]) -> type[Predictor]:
    """Class decorator: register a Predictor subclass under its `arch` name (the value of train.arch)."""
    return ARCHITECTURES.register(cls.arch)(cls)
