"""The baselines the predictor is compared with, one registered entry each in BASELINES, in the order of the
metrics. Each builds a scorer (function(windows batch) -> (scores (n, E), None or confidence (n,))) from the train
windows and the windows summary; entries that need an input the run lacks are left out (stale_gate without the
captured look-ahead, random without the evaluation's seeded rng, as in per_horizon; lookup_interpolated without
the val windows, token and token_context without the windows' token ids). The count-table baselines beyond lookup live in moe_prefetch/evaluation/table_baselines.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moe_prefetch.evaluation.table_baselines import (
    Cooccurrence,
    InterpolatedLookup,
    TokenTable,
    Top1Table,
)
from moe_prefetch.predictors import FrequencyPredictor, LookupPredictor
from moe_prefetch.registry import Registry
from moe_prefetch.windows.data import WindowSet, geometry_of

Scorer = Callable[[WindowSet], tuple[np.ndarray, np.ndarray | None]]
HIGHEST_WEIGHT_BONUS = 2.0  # ranks a copied expert list best-first: slot s scores (k - s) + bonus for slot 0


def copied_scores(experts: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Scores that rank the given best-first experts (N, k) first, in order, then the prior (N, E)."""
    scores = prior / max(prior.max(), 1e-12)  # < 1, below any copied expert
    rows = np.arange(len(experts))
    k = experts.shape[1]
    for slot in range(k):
        present = experts[:, slot] >= 0
        scores[rows[present], experts[present, slot]] = 1.0 + (k - slot) + (HIGHEST_WEIGHT_BONUS if slot == 0 else 0.0)
    return scores


@dataclass
class BaselineInputs:
    """What baselines are built from: the train windows, the windows summary, the evaluation's seeded rng (None:
    no seeded baseline) and the val windows (None: no baseline tuned on val). The frequency table several
    baselines share is fitted once, on first use."""

    train: WindowSet
    summary: dict
    rng: np.random.Generator | None = None
    val: WindowSet | None = None

    @cached_property
    def frequency(self) -> FrequencyPredictor:
        frequency = FrequencyPredictor(geometry_of(self.summary), {})
        frequency.fit(self.train, self.train, lambda row: None)
        return frequency


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: `build` makes its scorer, `available` says whether the inputs allow it."""

    build: Callable[[BaselineInputs], Scorer]
    available: Callable[[BaselineInputs], bool]
    doc: str  # one line: what it predicts (the builder's docstring)
    requires: tuple[str, ...]  # WindowSet columns the scorer reads besides the target layer (as Predictor.requires)


BASELINES: Registry[Baseline] = Registry("baseline")


def register_baseline(name: str, requires: tuple[str, ...],
                      available: Callable[[BaselineInputs], bool] = lambda inputs: True):
    """Decorator: register a scorer builder (documented by its docstring) as baseline `name`, whose scorer reads the
    window columns `requires` besides the target layer."""

    def add(build: Callable[[BaselineInputs], Scorer]) -> Callable[[BaselineInputs], Scorer]:
        BASELINES.add(name, Baseline(build, available, build.__doc__, requires))
        return build

    return add


def baseline_scorers(train: WindowSet, summary: dict, rng: np.random.Generator | None = None,
                     val: WindowSet | None = None) -> dict[str, Scorer]:
    """name -> scorer of every baseline the inputs allow, fit on `train` (tuned on `val`), in registration order."""
    inputs = BaselineInputs(train, summary, rng, val)
    return {name: baseline.build(inputs) for name, baseline in BASELINES.items() if baseline.available(inputs)}


@register_baseline("random", (), available=lambda inputs: inputs.rng is not None)
def _random(inputs: BaselineInputs) -> Scorer:
    """Seeded random ranking (expected top-m = m/E); draws from the rng batch by batch."""
    rng, num_experts = inputs.rng, inputs.summary["num_experts"]
    return lambda w: (rng.random((len(w), num_experts)).astype(np.float32), None)


@register_baseline("frequency", ())
def _frequency(inputs: BaselineInputs) -> Scorer:
    """Per target layer, experts by gate mass in train."""
    return inputs.frequency.score


@register_baseline("lookup", ("context_experts",))
def _lookup(inputs: BaselineInputs) -> Scorer:
    """Per (target layer, context) table fit on train, with back-off."""
    params = {"lookup": {"max_context": inputs.summary["context_length"]}}  # the baseline keys on the full context
    lookup = LookupPredictor(geometry_of(inputs.summary), params)
    lookup.fit(inputs.train, inputs.train, lambda row: None)
    return lookup.score


@register_baseline("previous_token", ("prev_token_experts",))
def _previous_token(inputs: BaselineInputs) -> Scorer:
    """The same layer's experts of the previous token (then frequency)."""
    return _copied(inputs, "prev_token_experts")


@register_baseline("stale_gate", ("stale_gate_experts",),
                   available=lambda inputs: inputs.train.stale_gate_experts is not None)
def _stale_gate(inputs: BaselineInputs) -> Scorer:
    """Layer t's own router applied h layers early (then frequency), when the collector captured look-ahead."""
    return _copied(inputs, "stale_gate_experts")


@register_baseline("top1_table", ("context_experts",))
def _top1_table(inputs: BaselineInputs) -> Scorer:
    """Per (target layer, context) count of the target's top-1 expert in train, with lookup's back-off."""
    return Top1Table(inputs.train, inputs.summary).score


@register_baseline("cooccurrence", ("context_experts",))
def _cooccurrence(inputs: BaselineInputs) -> Scorer:
    """Sum over routed context experts of P(target expert | that expert at that context layer), per target layer."""
    return Cooccurrence(inputs.train, inputs.summary, inputs.frequency).score


@register_baseline("lookup_interpolated", ("context_experts",), available=lambda inputs: inputs.val is not None)
def _lookup_interpolated(inputs: BaselineInputs) -> Scorer:
    """Frequency and every context length's lookup table mixed, the mixture weights fit by EM on val."""
    return InterpolatedLookup(inputs.train, inputs.val, inputs.summary, inputs.frequency).score


@register_baseline("token", ("token_id",), available=lambda inputs: inputs.train.token_id is not None)
def _token(inputs: BaselineInputs) -> Scorer:
    """Per (target layer, token id) gate mass in train, then frequency (windows written with windows.token_ids)."""
    return TokenTable(inputs.train, inputs.summary, inputs.frequency).score


@register_baseline("token_context", ("token_id", "context_experts"), available=lambda inputs: inputs.train.token_id is not None)
def _token_context(inputs: BaselineInputs) -> Scorer:
    """Per (target layer, token id, last context layer's set) gate mass in train, backing off to that layer's top-1,
    then the token id alone, then frequency (windows written with windows.token_ids)."""
    slots = (0, 1, inputs.summary["top_k"])  # token alone, + the last context layer's top-1, + its whole routed set
    return TokenTable(inputs.train, inputs.summary, inputs.frequency, slots).score


def _copied(inputs: BaselineInputs, column: str) -> Scorer:
    """A scorer ranking the window's best-first experts in `column` first, then the rest by frequency."""
    prior = inputs.frequency.score
    return lambda w: (copied_scores(getattr(w, column), prior(w)[0]), None)
