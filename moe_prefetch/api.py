"""What an engine or a notebook calls, without knowing the pipeline's files: load a trained predictor, ask it for
the experts of MoE layer l + h from what is known when layer l runs, and read shards and windows as arrays.

    from moe_prefetch.api import load_predictor, predict_experts, read_routing, read_windows

    predictor = load_predictor(Path("data/predictor"))
    experts, scores = predict_experts(predictor, routed, layer=l, m=4)   # routed: (N, >= l+1, k) best-first ids
    routing = read_routing(Path("data/shards"))                          # every token: experts (N, L, k), weights, ...
    test = read_windows(Path("data/windows"), "test")                    # a split as numpy arrays (WindowSet)
"""

from __future__ import annotations

import numpy as np

from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors import Predictor, load_predictor
from moe_prefetch.traces import read_routing
from moe_prefetch.windows.data import WindowSet, read_windows

__all__ = ["Predictor", "WindowSet", "known_windows", "load_predictor", "predict_experts", "read_routing", "read_windows"]


def known_windows(geometry: dict, routed: np.ndarray, layer: int, hidden_state: np.ndarray | None = None,
                  previous_token_experts: np.ndarray | None = None,
                  token_context_experts: np.ndarray | None = None, token_id: np.ndarray | None = None,
                  routed_weights: np.ndarray | None = None) -> WindowSet:
    """The windows a predictor of `geometry` scores when MoE layer `layer` has just routed N tokens.

    routed: (N, >= layer+1, k) expert ids of MoE layers 0..layer (best-first, -1 = none): its last context_length
        layers ending at `layer` are the context; the target is layer + horizon.
    hidden_state: (N, D) the hidden state entering `layer` (hidden_mlp). previous_token_experts: (N, k) the
        previous token's experts at the target layer (only baselines read it). token_context_experts:
        (N, T, c+1, k) the previous tokens' routing (hybrid with token_context; layout in windows/data.py).
        token_id: (N,) the tokens' tokenizer ids (token_mlp). routed_weights: (N, >= layer+1, k) the gate weights
        of `routed` (predictors with context_encoding weighted_set or both).
    Unknown targets are -1, so the windows can be scored but not evaluated.
    """
    c, h, L, k = (int(geometry[name]) for name in ("context_length", "horizon", "num_layers", "top_k"))
    routed = np.asarray(routed)
    if routed.ndim != 3 or routed.shape[2] != k:
        raise PipelineError(f"routed: expected (tokens, layers, {k}) expert ids, got shape {routed.shape}")
    if not c - 1 <= layer <= L - 1 - h or routed.shape[1] < layer + 1:
        raise PipelineError(f"layer: {layer} cannot be predicted from (context {c}, horizon {h}, {L} MoE layers, "
                            f"{routed.shape[1]} routed layers given); accepted: {c - 1}..{min(L - 1 - h, routed.shape[1] - 1)}")
    n = len(routed)
    if routed_weights is not None and np.shape(routed_weights) != routed.shape:
        raise PipelineError(f"routed_weights: expected the shape of routed {routed.shape}, got {np.shape(routed_weights)}")
    return WindowSet(
        context_experts=routed[:, layer - c + 1 : layer + 1].astype(np.int16),  # (N, c, k)
        target_layer=np.full(n, layer + h, dtype=np.int16),
        target_experts=np.full((n, k), -1, dtype=np.int16),
        target_weights=np.zeros((n, k), dtype=np.float32),
        prev_token_experts=(np.full((n, k), -1, dtype=np.int16) if previous_token_experts is None
                            else np.asarray(previous_token_experts, dtype=np.int16)),
        position=np.zeros(n, dtype=np.int32),
        domain_index=np.zeros(n, dtype=np.int64),
        sequence_index=np.arange(n, dtype=np.int64),
        domains=["online"],
        sequence_ids=[str(i) for i in range(n)],
        hidden_state=None if hidden_state is None else np.asarray(hidden_state, dtype=np.float16),
        token_context_experts=None if token_context_experts is None else np.asarray(token_context_experts, dtype=np.int16),
        token_id=None if token_id is None else np.asarray(token_id, dtype=np.int32),
        context_weights=(None if routed_weights is None
                         else np.asarray(routed_weights, dtype=np.float32)[:, layer - c + 1 : layer + 1]),  # (N, c, k)
    )


def predict_experts(predictor: Predictor, routed: np.ndarray, layer: int, m: int | None = None, **known) -> tuple[np.ndarray, np.ndarray]:
    """(experts (N, m) best-first, scores (N, E)) for MoE layer layer + horizon; m defaults to the model's top_k.
    `known` are known_windows' optional inputs (hidden_state, previous_token_experts, token_context_experts, token_id,
    routed_weights)."""
    scores, _ = predictor.score(known_windows(predictor.geometry, routed, layer, **known))
    m = int(predictor.geometry["top_k"]) if m is None else m
    return np.argsort(-scores, axis=1, kind="stable")[:, :m], scores
