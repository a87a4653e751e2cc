"""Fallback prefetch of the replay (evaluate.cache.fallback): what a learned strategy prefetches for the layers no
predictor scores. A predictor needs c context layers, so the first prediction (for layer c-1+h) is issued when layer
c-1 runs; layers 0..c-2 run before any prediction exists. A fallback rule lists, when layer l in 0..c-2 runs, m
experts for layer l+h (layers 0..h-1 cannot be prefetched within a step by any strategy: nothing runs before them):

  none        nothing: those layers run on the cache alone.
  frequency   layer l+h's m most frequent experts over the train split's tokens (every slot of their top-k,
              ties to the lower id), the same for every token.
  stale_gate  layer l+h's router applied to layer l's hidden state (the shards' look-ahead capture, when it
              holds lookahead >= h), per token.
  token       layer l+h's m most frequent experts over the train tokens with the same token id (known before
              the step's first layer runs), ties and unseen ids by the frequency rule's counts, then the lower id.

Every rule returns (tokens, c-1, m) expert ids, best first, -1 = none (FALLBACK_RULES).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moe_prefetch.errors import PipelineError
from moe_prefetch.registry import Registry


@dataclass(frozen=True)
class FallbackInputs:
    """What a rule may read: the replayed tokens' routing rows, the train split's full routing, the shards'
    look-ahead capture (None when not captured) and the window geometry."""

    tokens: int
    train_experts: np.ndarray  # (train tokens, L, k) every MoE layer's experts of the train split
    lookahead: np.ndarray | None  # (tokens, L, H, k) the replayed tokens' look-ahead routers, None: not captured
    context_length: int
    horizon: int
    m: int
    token_ids: np.ndarray | None = None  # (tokens,) the replayed tokens' ids (rule token)
    train_token_ids: np.ndarray | None = None  # (train tokens,) the train tokens' ids (rule token)


def _none(inputs: FallbackInputs) -> None:
    return None


def _layer_counts(inputs: FallbackInputs, target: int) -> np.ndarray:
    """(E,) how often each expert is routed at MoE layer `target` over the train tokens (every top-k slot)."""
    num_experts = int(inputs.train_experts.max(initial=0)) + 1
    experts = inputs.train_experts[:, target].ravel()
    return np.bincount(experts[experts >= 0], minlength=num_experts)


def _frequency(inputs: FallbackInputs) -> np.ndarray:
    c, h, m = inputs.context_length, inputs.horizon, inputs.m
    rows = [np.argsort(-_layer_counts(inputs, target), kind="stable")[:m] for target in range(h, c - 1 + h)]  # ties to the lower id
    per_layer = np.asarray(rows, dtype=np.int64).reshape(c - 1, -1)  # (c-1, m)
    return np.broadcast_to(per_layer, (inputs.tokens, *per_layer.shape)).copy()


def _token(inputs: FallbackInputs) -> np.ndarray:
    if inputs.token_ids is None or inputs.train_token_ids is None:
        raise PipelineError("evaluate.cache.fallback: token needs the shards' token ids of the replayed and the train "
                            "tokens; accepted here: none, frequency")
    c, h, m = inputs.context_length, inputs.horizon, inputs.m
    vocabulary, train_code = np.unique(inputs.train_token_ids, return_inverse=True)  # the train split's distinct ids
    slot = np.searchsorted(vocabulary, inputs.token_ids).clip(max=max(len(vocabulary) - 1, 0))
    seen = len(vocabulary) > 0 and vocabulary[slot] == inputs.token_ids  # (tokens,)
    per_layer = []
    for target in range(h, c - 1 + h):
        overall = _layer_counts(inputs, target)  # (E,)
        experts = inputs.train_experts[:, target]  # (train tokens, k)
        routed = experts >= 0
        cells = np.broadcast_to(train_code[:, None], experts.shape)[routed] * len(overall) + experts[routed]
        by_token = np.bincount(cells, minlength=(len(vocabulary) + 1) * len(overall)).reshape(-1, len(overall))  # the last row: unseen ids
        score = by_token[np.where(seen, slot, len(vocabulary))] * (overall.sum() + 1) + overall  # (tokens, E)
        per_layer.append(np.argsort(-score, axis=1, kind="stable")[:, :m])  # ties to the lower id
    return np.stack(per_layer, axis=1).astype(np.int64)  # (tokens, c-1, m)


def _stale_gate(inputs: FallbackInputs) -> np.ndarray:
    c, h = inputs.context_length, inputs.horizon
    if inputs.lookahead is None or inputs.lookahead.shape[2] < h:
        captured = 0 if inputs.lookahead is None else inputs.lookahead.shape[2]
        raise PipelineError(f"evaluate.cache.fallback: stale_gate needs the shards' look-ahead capture at depth >= "
                            f"horizon {h}, got lookahead {captured}; accepted here: none, frequency")
    # lookahead[i, l, j - 1]: layer l+j's router applied at layer l.
    return inputs.lookahead[:, : c - 1, h - 1, : inputs.m].astype(np.int64)  # (tokens, c-1, m)


FALLBACK_RULES: Registry[Callable[[FallbackInputs], np.ndarray | None]] = Registry("fallback rule")
FALLBACK_RULES.add("none", _none)
FALLBACK_RULES.add("frequency", _frequency)
FALLBACK_RULES.add("stale_gate", _stale_gate)
FALLBACK_RULES.add("token", _token)


def fallback_plan(rule: str, inputs: FallbackInputs) -> np.ndarray | None:
    """(tokens, c-1, m) the fallback prefetch of `rule`, None when it prefetches nothing (or c = 1)."""
    if inputs.context_length < 2:
        return None
    return FALLBACK_RULES.get(rule, "evaluate.cache.fallback")(inputs)
