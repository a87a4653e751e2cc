"""Count-table baselines beyond `lookup` (registered in moe_prefetch/evaluation/baselines.py), each fit on the train
windows in a few vectorised passes:

- Top1Table: `lookup`'s back-off tables counting only each window's top-1 target expert (slot 0).
- Cooccurrence: per (context layer, target layer), P(expert e' at the target | expert e routed at that context
  layer), summed over every routed context expert: dense (c, L, E, E), so it never starves on unseen contexts.
- InterpolatedLookup: a mixture of the frequency and every context length's `lookup` table, with mixture weights
  fit by EM on the val windows.
- TokenTable: per target layer and token id, the gate mass of each expert (windows with windows.token_ids), keyed
  also on the last context layer's routed set for `token_context` (backing off to its top-1, then the token id alone).
"""

from __future__ import annotations

import numpy as np

from moe_prefetch.predictors import FrequencyPredictor
from moe_prefetch.predictors.tables import (
    TIE_BREAK,
    backed_off,
    context_distribution,
    context_tables,
    keyed_distribution,
    keyed_table,
    layer_distribution,
    row_keys,
    target_mass,
)
from moe_prefetch.windows.data import WindowSet

COOCCURRENCE_ALPHA = 0.1  # add-alpha pseudo-mass per (context expert, target expert) cell: ~1/10 of one window's gate mass
EM_ITERATIONS = 200  # upper bound; EM stops earlier once no mixture weight moves by more than EM_TOLERANCE
EM_TOLERANCE = 1e-7
LIKELIHOOD_FLOOR = 1e-12  # avoids 0 / 0 for a target expert no component gives any probability
VAL_BATCH = 8192  # val windows scored at once while fitting the mixture weights: bounds the (c + 1, n, E) memory


def top1_slots(windows: WindowSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window row, expert, 1.0) of every window's top-1 target expert (windows whose slot 0 was dropped left out)."""
    rows = np.flatnonzero(windows.target_experts[:, 0] >= 0)
    return rows, windows.target_experts[rows, 0].astype(np.int64), np.ones(len(rows))


class Top1Table:
    """Per target layer and context (the last 1..c context layers), how often each expert was the target's top-1
    in train; a window uses its longest context seen in train, then the layer's top-1 frequency."""

    def __init__(self, train: WindowSet, summary: dict):
        self.num_experts = summary["num_experts"]
        slots = top1_slots(train)
        self.tables = context_tables(train, slots, list(range(1, summary["context_length"] + 1)), self.num_experts)
        self.layer_top1 = layer_distribution(train, slots, summary["num_layers"], self.num_experts)  # (L, E)

    def score(self, windows: WindowSet) -> tuple[np.ndarray, None]:
        prior = self.layer_top1[windows.target_layer.astype(np.int64)]  # (N, E)
        return (backed_off(self.tables, windows, self.num_experts) + TIE_BREAK * prior).astype(np.float32), None


class Cooccurrence:
    """score(e' at target layer t) = sum over context layers j and experts e routed at j of P(e' at t | e at j),
    P from train's gate mass per (j, t) with add-alpha smoothing; the frequency prior (times TIE_BREAK) orders
    windows without a routed context expert."""

    def __init__(self, train: WindowSet, summary: dict, frequency: FrequencyPredictor, alpha: float = COOCCURRENCE_ALPHA):
        c, L, E = summary["context_length"], summary["num_layers"], summary["num_experts"]
        self.frequency = frequency
        rows, experts, weights = target_mass(train)
        cell_of_layer = train.target_layer[rows].astype(np.int64) * E * E + experts  # (slots,) cell less the context expert
        mass = np.zeros((c, L * E * E))
        for j in range(c):
            for context_slot in range(train.context_experts.shape[2]):
                source = train.context_experts[rows, j, context_slot].astype(np.int64)
                routed = source >= 0
                cells = cell_of_layer[routed] + source[routed] * E
                mass[j] += np.bincount(cells, weights=weights[routed], minlength=L * E * E)
        mass = mass.reshape(c, L, E, E)
        self.conditional = ((mass + alpha) / (mass.sum(axis=3, keepdims=True) + alpha * E)).astype(np.float32)  # (c, L, E, E)

    def score(self, windows: WindowSet) -> tuple[np.ndarray, None]:
        layer = windows.target_layer.astype(np.int64)
        scores = TIE_BREAK * self.frequency.score(windows)[0]  # (N, E)
        for j in range(self.conditional.shape[0]):
            for context_slot in range(windows.context_experts.shape[2]):
                source = windows.context_experts[:, j, context_slot].astype(np.int64)
                routed = np.flatnonzero(source >= 0)
                scores[routed] += self.conditional[j, layer[routed], source[routed]]
        return scores, None


def interpolation_weights(likelihoods: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """EM for the mixture weights (n,) maximising sum_i mass_i * log(sum_n weight_n * likelihoods_(i, n)), given each
    component's probability of each observed expert (M, n) and the observation's mass (M,)."""
    weights = np.full(likelihoods.shape[1], 1.0 / likelihoods.shape[1])
    for _ in range(EM_ITERATIONS):
        joint = likelihoods * weights  # (M, n)
        responsibility = joint / np.maximum(joint.sum(axis=1, keepdims=True), LIKELIHOOD_FLOOR)
        updated = (mass[:, None] * responsibility).sum(axis=0)
        updated /= updated.sum()
        converged = np.abs(updated - weights).max() < EM_TOLERANCE
        weights = updated
        if converged:
            break
    return weights


class InterpolatedLookup:
    """score = sum over n = 0..m of weight_(m, n) * P_n(e | target layer, last n context layers), where P_0 is the
    frequency, P_n (n >= 1) the gate-mass `lookup` table of length n and m the window's longest context seen in
    train (so every P_n in the sum is defined). The weights of each m maximise the gate-weighted log-likelihood of
    the target experts of the val windows with that m (EM; an m no val window has uses P_m alone, as lookup does)."""

    def __init__(self, train: WindowSet, val: WindowSet, summary: dict, frequency: FrequencyPredictor):
        c, self.num_experts, self.frequency = summary["context_length"], summary["num_experts"], frequency
        self.tables = context_tables(train, target_mass(train), list(range(1, c + 1)), self.num_experts)
        likelihoods, longest, mass = [], [], []
        for start in range(0, len(val), VAL_BATCH):
            batch = val.subset(np.arange(start, min(start + VAL_BATCH, len(val))))
            rows, experts, weights = target_mass(batch)
            components, longest_of_row = self.components(batch)
            likelihoods.append(components[:, rows, experts].T)  # (slots, c + 1)
            longest.append(longest_of_row[rows])
            mass.append(weights)
        likelihoods, longest, mass = np.concatenate(likelihoods), np.concatenate(longest), np.concatenate(mass)
        self.weights = np.eye(c + 1)  # (c + 1, c + 1): row m mixes P_0..P_m
        for m in range(c + 1):
            if (observed := longest == m).any():
                self.weights[m, : m + 1] = interpolation_weights(likelihoods[observed, : m + 1], mass[observed])

    def components(self, windows: WindowSet) -> tuple[np.ndarray, np.ndarray]:
        """(c + 1, N, E) P_0 (frequency) and P_n of each context length n (0 where the table lacks the context),
        and (N,) each window's longest context length the tables hold (0: none)."""
        stacked = np.zeros((len(self.tables) + 1, len(windows), self.num_experts))
        stacked[0] = self.frequency.score(windows)[0]
        longest = np.zeros(len(windows), dtype=np.int64)
        for length, table in self.tables.items():  # a context seen in train implies its shorter suffixes were
            found, distribution = context_distribution(table, windows, length, self.num_experts)
            stacked[length, found] = distribution
            longest[found] = length
        return stacked, longest

    def score(self, windows: WindowSet) -> tuple[np.ndarray, None]:
        components, longest = self.components(windows)
        return np.einsum("nc,cne->ne", self.weights[longest], components).astype(np.float32), None


def token_context_keys(windows: WindowSet, slots: int) -> np.ndarray:
    """(N,) opaque row keys of (target layer, token id, the first `slots` best-first experts of the last context
    layer); slots = 0 keys on (target layer, token id) alone."""
    last_layer = windows.context_experts[:, -1, :slots].astype(np.int32)  # (N, slots)
    return row_keys(np.concatenate([windows.target_layer[:, None].astype(np.int32), windows.token_id[:, None].astype(np.int32),
                                    last_layer], axis=1))


class TokenTable:
    """Per target layer and token id, the gate mass of each expert in train, keyed also on the first n best-first
    experts of the last context layer for each n of `last_layer_slots` (0: the token id alone). A window uses its
    longest key train saw, then the layer's frequency (which also breaks ties, times TIE_BREAK)."""

    def __init__(self, train: WindowSet, summary: dict, frequency: FrequencyPredictor, last_layer_slots: tuple[int, ...] = (0,)):
        self.num_experts, self.frequency = summary["num_experts"], frequency
        self.slots = sorted(set(last_layer_slots))  # coarsest key first
        slots_of_train = target_mass(train)
        self.tables = {n: keyed_table(token_context_keys(train, n), slots_of_train, self.num_experts) for n in self.slots}

    def score(self, windows: WindowSet) -> tuple[np.ndarray, None]:
        prior = self.frequency.score(windows)[0]  # (N, E)
        matched = np.zeros_like(prior)
        for n in self.slots:  # finer keys overwrite coarser ones where train saw them
            found, distribution = keyed_distribution(self.tables[n], token_context_keys(windows, n), self.num_experts)
            matched[found] = distribution
        return matched + TIE_BREAK * prior, None
