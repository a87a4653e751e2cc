"""The predictor interface every architecture implements, and checkpoint save/load.

Interface: `fit(train, val, params, log)` learns from windows; `score(windows)` returns expert scores
(N, E) (higher = more likely; evaluation ranks them) and a confidence (N,) in [0, 1] that the top-ranked
expert is the target's highest-weight expert (or None); `save(dir)` / `load(dir)` round-trip through
safetensors with the params, architecture name, parameter count and training time inside.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from stages.errors import PipelineError
from stages.window_data import WindowSet

WEIGHTS_NAME = "predictor.safetensors"


class Predictor:
    """Base class. Subclasses set `arch`, implement fit/score and expose their arrays via state()/load_state()."""

    arch = "base"

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
    from stages.predictors import ARCHITECTURES

    cls = ARCHITECTURES.get(metadata["arch"])
    if cls is None:
        raise PipelineError(f"{path}: unknown architecture {metadata['arch']!r}")
    predictor = cls(metadata["geometry"], metadata["params"])
    predictor.load_state(arrays)
    return predictor
