"""The predictor's calibrated probabilities of use laid out for the expert-cache replay (simulate's use_scores and
prefetch_probs), for the strategies of replay.py that evict or gate by them. Duck-typed on replay.py's ReplayInputs
and DecodeSteps (this module cannot import them: replay.py imports it)."""

from __future__ import annotations

import numpy as np

from moe_prefetch.evaluation.cache import stream_ahead
from moe_prefetch.evaluation.calibration import fit_calibration, used_mask


def _batched_union(per_token: np.ndarray, sequence: np.ndarray, batch_size: int) -> np.ndarray:
    """(tokens, L, E) P(used) per token -> (steps, L, E) P(the step uses e) = 1 - prod over its tokens (1 - p),
    grouping sequences as batched_steps does (NaN stays NaN: an unscored layer)."""
    starts = np.flatnonzero(np.r_[True, sequence[1:] != sequence[:-1]])
    ends = np.r_[starts[1:], len(sequence)]
    steps = []
    for group in range(0, len(starts), batch_size):
        members = list(zip(starts[group : group + batch_size], ends[group : group + batch_size]))
        unused = np.ones((max(end - start for start, end in members), *per_token.shape[1:]))  # (length, L, E)
        for start, end in members:
            unused[: end - start] *= 1.0 - per_token[start:end]
        steps.append(1.0 - unused)
    return np.concatenate(steps)


def window_probabilities(inputs, scorer: str) -> np.ndarray:
    """(N, E) calibrated P(used) of `scorer` for each replayed window: calibration.fit_calibration on the val windows
    (on the replayed windows themselves when they are the val ones, for the gate's tuning). Cached with the inputs'
    top-m predictions (ReplayInputs._predicted)."""
    key = f"{scorer}:calibrated"
    if key not in inputs._predicted:
        scores = inputs.scorers[scorer](inputs.windows)[0]  # (N, E)
        fit_on = inputs.val or inputs
        fit_scores = scores if fit_on is inputs else fit_on.scorers[scorer](fit_on.windows)[0]
        used = used_mask(fit_on.windows.target_experts.astype(np.int64), fit_scores.shape[1])
        inputs._predicted[key] = fit_calibration(fit_scores, used)(scores)
    return inputs._predicted[key]


def use_probabilities(inputs, steps, scorer: str) -> np.ndarray:
    """(steps, layers, E) calibrated P(used) of `scorer` at each replayed target layer (NaN at layers it cannot
    score), placed like DecodeSteps.issue places its predictions, a step's being the union over its tokens."""
    key = f"{scorer}:use_probabilities:{steps.batch_size}"
    if key not in inputs._predicted:
        probabilities = window_probabilities(inputs, scorer)  # (N, E)
        T, h, num_experts = inputs.num_target_layers, inputs.horizon, probabilities.shape[1]
        per_token = probabilities.reshape(inputs.tokens, T, num_experts)  # (tokens, T, E)
        placed = np.full((inputs.tokens, steps.routed.shape[1], num_experts), np.nan)  # (tokens, layers, E)
        if inputs.token_routing is not None:  # target layers L-T .. L-1: c-1+h .. L-1, or every layer across tokens
            placed[:, steps.routed.shape[1] - T :] = per_token
        else:  # target layers only: a layer below h is never predicted (issue() prefetches nothing for it)
            placed[:, h:T] = per_token[:, h:]
        inputs._predicted[key] = _batched_union(placed, steps.sequence, steps.batch_size)
    return inputs._predicted[key]


def predictor_scores(inputs, steps, plan: np.ndarray | None) -> dict:
    """simulate()'s use_scores: the predictor's calibrated P(used) (predicted eviction and the prefetch guard)."""
    return {"use_scores": use_probabilities(inputs, steps, "predictor")}


def predictor_gate(inputs, steps, plan: np.ndarray | None) -> dict:
    """use_scores, and prefetch_probs: each planned entry's P(used) at its target layer l + h (NaN for -1)."""
    use = use_probabilities(inputs, steps, "predictor")  # (steps, L, E)
    if plan is None:
        return {"use_scores": use}
    # Row l holds the position h after it (the next step's layers for l >= L-h: only a plan across tokens lists any)
    target = stream_ahead(use, inputs.horizon, np.nan)  # (steps, L, E)
    probs = np.take_along_axis(target, np.clip(plan, 0, None), axis=2)  # (steps, L, m)
    return {"use_scores": use, "prefetch_probs": np.where(plan >= 0, probs, np.nan)}
