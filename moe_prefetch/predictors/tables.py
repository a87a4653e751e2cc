"""Count-table predictors: `frequency` (per target layer) and `lookup` (per target layer and routing context,
backing off to shorter contexts, then to frequency). Both score an expert by the gate-weight mass it received
in matching training windows, so the highest-weight target expert counts most. Fully vectorised numpy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moe_prefetch.config import doc, positive
from moe_prefetch.predictors.base import Predictor, register_arch
from moe_prefetch.windows.data import WindowSet

TIE_BREAK = 1e-3  # weight of the frequency prior inside lookup scores: orders experts a context never saw


def target_mass(windows: WindowSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened (window row, expert, gate weight) triples of every routed target slot (-1 slots dropped)."""
    rows = np.repeat(np.arange(len(windows)), windows.target_experts.shape[1])
    experts = windows.target_experts.reshape(-1).astype(np.int64)
    weights = windows.target_weights.reshape(-1).astype(np.float64)
    keep = experts >= 0
    return rows[keep], experts[keep], weights[keep]


def normalise(scores: np.ndarray) -> np.ndarray:
    total = scores.sum(axis=1, keepdims=True)
    return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def layer_distribution(windows: WindowSet, slots: tuple[np.ndarray, np.ndarray, np.ndarray], num_layers: int,
                       num_experts: int) -> np.ndarray:
    """(L, E) per target layer, the normalised weight of each expert over the (window row, expert, weight) `slots`."""
    rows, experts, weights = slots
    counts = np.zeros((num_layers, num_experts))
    np.add.at(counts, (windows.target_layer[rows].astype(np.int64), experts), weights)
    return normalise(counts)


@dataclass
class LookupParams:
    max_context: int = doc("Longest context (in layers; capped at windows.context_length) the table keys on; shorter ones are back-offs.", 3)

    def validate(self) -> None:
        positive("train.lookup", self, "max_context")


@register_arch
class FrequencyPredictor(Predictor):
    """Ranks experts by how much gate weight they received at the target layer in training."""

    arch = "frequency"

    def fit(self, train: WindowSet, val: WindowSet, log: Callable[[dict], None]) -> None:
        self.layer_mass = layer_distribution(train, target_mass(train), self.geometry["num_layers"], self.num_experts)

    def score(self, windows: WindowSet) -> tuple[np.ndarray, np.ndarray]:
        scores = self.layer_mass[windows.target_layer.astype(np.int64)].astype(np.float32)  # (N, E)
        return scores, scores.max(axis=1)

    def state(self) -> dict[str, np.ndarray]:
        return {"layer_mass": self.layer_mass}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.layer_mass = arrays["layer_mass"]


def row_keys(rows: np.ndarray) -> np.ndarray:
    """(N,) opaque, sortable keys of the rows of a 2-D array (N, m): equal rows have equal keys."""
    rows = np.ascontiguousarray(rows)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)


def context_keys(windows: WindowSet, length: int) -> np.ndarray:
    """(N,) opaque row keys of (target layer, experts of the last `length` context layers)."""
    context = windows.context_experts[:, -length:, :].reshape(len(windows), -1)
    return row_keys(np.concatenate([windows.target_layer[:, None].astype(np.int16), context.astype(np.int16)], axis=1))


def keyed_table(keys: np.ndarray, slots: tuple[np.ndarray, np.ndarray, np.ndarray], num_experts: int) -> dict[str, np.ndarray]:
    """Sparse table: per distinct row key (N,) (row_keys), the summed weight of each expert over the (window row,
    expert, weight) `slots`. CSR: sorted `keys`, `indptr` into `experts` and `mass`."""
    rows, experts, weights = slots
    unique_keys, key_of_row = np.unique(keys, return_inverse=True)
    cell, cell_of_slot = np.unique(key_of_row[rows] * num_experts + experts, return_inverse=True)
    mass = np.bincount(cell_of_slot, weights=weights)
    indptr = np.searchsorted(cell // num_experts, np.arange(len(unique_keys) + 1))
    return {"keys": unique_keys, "indptr": indptr, "experts": cell % num_experts, "mass": mass}


def keyed_distribution(table: dict[str, np.ndarray], queries: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the query keys (N,) that `table` holds (M,), and its normalised mass there (M, E)."""
    slot = np.searchsorted(table["keys"], queries).clip(max=len(table["keys"]) - 1)
    found = np.flatnonzero(table["keys"][slot] == queries)
    starts, ends = table["indptr"][slot[found]], table["indptr"][slot[found] + 1]
    counts = ends - starts
    entry = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    dense = np.zeros((len(found), num_experts))
    dense[np.repeat(np.arange(len(found)), counts), table["experts"][entry]] = table["mass"][entry]
    return found, normalise(dense)


def context_tables(windows: WindowSet, slots: tuple[np.ndarray, np.ndarray, np.ndarray], lengths: list[int],
                   num_experts: int) -> dict[int, dict[str, np.ndarray]]:
    """length -> keyed_table of (target layer, last `length` context layers) over the `slots` of `windows`."""
    return {length: keyed_table(context_keys(windows, length), slots, num_experts) for length in lengths}


def context_distribution(table: dict[str, np.ndarray], windows: WindowSet, length: int,
                         num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `windows` whose length-`length` context `table` holds (M,), and its normalised mass there (M, E)."""
    return keyed_distribution(table, context_keys(windows, length), num_experts)


def backed_off(tables: dict[int, dict[str, np.ndarray]], windows: WindowSet, num_experts: int) -> np.ndarray:
    """(N, E) the normalised mass of each window's longest context the tables hold; all-zero rows where none does."""
    matched = np.zeros((len(windows), num_experts))
    for length in sorted(tables):  # longer contexts overwrite shorter ones where they match
        found, distribution = context_distribution(tables[length], windows, length, num_experts)
        matched[found] = distribution
    return matched


@register_arch
class LookupPredictor(FrequencyPredictor):
    """For each target layer and context (the best-first experts of the last `max_context` layers), the gate
    mass of each target expert in training; unseen contexts back off to shorter ones, then to frequency."""

    arch = "lookup"
    config = LookupParams
    requires = ("context_experts",)

    @property
    def lengths(self) -> list[int]:
        return list(range(1, min(self.params["lookup"]["max_context"], self.geometry["context_length"]) + 1))

    def fit(self, train: WindowSet, val: WindowSet, log: Callable[[dict], None]) -> None:
        super().fit(train, val, log)
        self.tables = context_tables(train, target_mass(train), self.lengths, self.num_experts)
        log({"lookup_contexts": float(len(self.tables[self.lengths[-1]]["keys"]))})

    def score(self, windows: WindowSet) -> tuple[np.ndarray, np.ndarray]:
        prior, _ = super().score(windows)  # (N, E)
        matched = backed_off(self.tables, windows, self.num_experts).astype(prior.dtype)  # summed in float32, as exported
        unmatched = matched.sum(axis=1) == 0
        confidence = np.where(unmatched, prior.max(axis=1), matched.max(axis=1))
        return (matched + TIE_BREAK * prior).astype(np.float32), confidence.astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        arrays = {"layer_mass": self.layer_mass}
        for length, table in self.tables.items():
            keys = table["keys"]
            arrays[f"ctx{length}.keys"] = keys.view(np.uint8).reshape(len(keys), -1)
            for name in ("indptr", "experts", "mass"):
                arrays[f"ctx{length}.{name}"] = table[name]
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.layer_mass = arrays["layer_mass"]
        self.tables = {}
        for length in self.lengths:
            raw = np.ascontiguousarray(arrays[f"ctx{length}.keys"])
            keys = raw.view(np.dtype((np.void, raw.shape[1]))).reshape(-1)
            self.tables[length] = {"keys": keys, **{n: arrays[f"ctx{length}.{n}"] for n in ("indptr", "experts", "mass")}}

    def parameter_count(self) -> int:
        """Table entries (contexts x experts seen), the lookup's analogue of a parameter count."""
        return int(sum(len(t["mass"]) for t in self.tables.values()) + self.layer_mass.size)
