"""What the predictions buy an expert cache: replay test sequences through the simulator in
moe_prefetch/evaluation/cache.py with each prefetch strategy, the same cache for all.

Replayed layers are the target layers of the windows (MoE layers c-1+h .. L-1: earlier layers have no
prediction, so leaving them out favours no strategy). A step is one decode step of `batch_size` sequences:
the experts it needs at a layer are the union over its tokens. Strategies:
  on_demand   no prefetch: the cache alone
  predictor   the trained predictor's top-m for layer l+h, issued when layer l runs
  lookup      the same from the lookup baseline
  stale_gate  layer l+h's router applied at layer l (when captured)
  oracle      the experts layer l+h will really use (perfect knowledge)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moe_prefetch.evaluation.cache import (
    CacheConfig,
    CostModel,
    oracle_prefetch,
    oracle_share,
    simulate,
    speedup,
)
from moe_prefetch.evaluation.config import CacheParams
from moe_prefetch.windows.data import WindowSet


def replay_windows(test: WindowSet, num_target_layers: int, max_tokens: int) -> WindowSet:
    """The windows of the first whole test sequences holding at most `max_tokens` tokens (at least one sequence)."""
    token_rows = np.arange(0, len(test), num_target_layers)  # first window of each token
    sequence = test.sequence_index[token_rows]
    ends = np.r_[np.flatnonzero(sequence[1:] != sequence[:-1]) + 1, len(token_rows)]  # token index after each sequence
    fitting = ends[ends <= max_tokens]
    cut = fitting[-1] if len(fitting) else ends[0]
    return test.subset(np.arange(cut * num_target_layers))


def top_m(scores: np.ndarray, m: int) -> np.ndarray:
    """(N, m) expert ids of the m highest scores, best first (ties to the lower id)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :m]


def batched_steps(per_token: np.ndarray, sequence: np.ndarray, batch_size: int) -> np.ndarray:
    """(tokens, T, w) per-token arrays -> (steps, T, batch_size * w): groups of `batch_size` consecutive
    sequences decode together; step p holds position p of every member (-1 where a member has ended)."""
    starts = np.flatnonzero(np.r_[True, sequence[1:] != sequence[:-1]])
    ends = np.r_[starts[1:], len(sequence)]
    steps = []
    for group in range(0, len(starts), batch_size):
        members = list(zip(starts[group : group + batch_size], ends[group : group + batch_size]))
        length = max(end - start for start, end in members)
        block = np.full((length, per_token.shape[1], batch_size, per_token.shape[2]), -1, dtype=np.int64)
        for slot, (start, end) in enumerate(members):
            block[: end - start, :, slot] = per_token[start:end]
        steps.append(block.reshape(length, per_token.shape[1], -1))
    return np.concatenate(steps)


def simulate_strategies(replay: WindowSet, predictions: dict[str, np.ndarray], params: CacheParams,
                        num_target_layers: int, horizon: int, capacity: int, batch_size: int) -> dict[str, dict]:
    """Run every strategy through the same cache; `predictions` maps a strategy to per-window (N, m) experts."""
    tokens = len(replay) // num_target_layers
    sequence = replay.sequence_index[::num_target_layers]
    routed = batched_steps(replay.target_experts.reshape(tokens, num_target_layers, -1), sequence, batch_size)
    cache = CacheConfig(capacity=capacity, per_layer=params.per_layer, policy=params.policy)
    cost = CostModel(params.expert_bytes, params.bandwidth_gbps, params.layer_compute_ms, params.overlap_prefetch)
    plans: dict[str, np.ndarray | None] = {"on_demand": None}
    for name, experts in predictions.items():
        per_token = experts.reshape(tokens, num_target_layers, -1)
        # prefetch[t, l] lists the experts for layer l + h: shift the per-target-layer predictions back by h.
        issued = np.full_like(per_token, -1)
        issued[:, : num_target_layers - horizon] = per_token[:, horizon:]
        plans[name] = batched_steps(issued, sequence, batch_size)
    plans["oracle"] = oracle_prefetch(routed, horizon, routed.shape[2])
    results = {name: simulate(routed, plan, cache, cost, horizon) for name, plan in plans.items()}
    base, best = results["on_demand"]["time_ms"], results["oracle"]["time_ms"]
    summary = {}
    for name, result in results.items():
        summary[name] = {
            "hit_rate": result["hit_rate"],
            "bytes_moved": result["bytes_moved"],
            "wasted_prefetch_bytes": result["wasted_prefetch_bytes"],
            "stall_ms": result["stall_ms"],
            "time_per_token_ms": result["time_ms"] / tokens,
            "speedup_vs_on_demand": speedup(base, result["time_ms"]),
            "share_of_oracle_speedup": oracle_share(base, result["time_ms"], best),
        }
    return summary


def cache_report(test: WindowSet, scorers: dict[str, Callable], params: CacheParams, summary: dict) -> tuple[dict, list, list]:
    """The simulator summary at the configured cache, and the rows of the capacity and batch-size sweeps."""
    T = len(summary["target_layers"])
    h = summary["horizon"]
    replay = replay_windows(test, T, params.max_tokens)
    m = min(params.prefetch_m, summary["num_experts"])
    predictions = {name: top_m(scorers[name](replay)[0], m) for name in ("predictor", "lookup")}
    if replay.stale_gate_experts is not None:
        predictions["stale_gate"] = replay.stale_gate_experts.astype(np.int64)[:, :m]
    main = simulate_strategies(replay, predictions, params, T, h, params.capacity, params.batch_size)
    by_capacity, by_batch = [], []
    for capacity in params.capacity_sweep:
        result = simulate_strategies(replay, predictions, params, T, h, capacity, params.batch_size)
        by_capacity.append({"capacity": capacity, **_flat(result)})
    for batch_size in params.batch_sweep:
        result = simulate_strategies(replay, predictions, params, T, h, params.capacity, batch_size)
        by_batch.append({"batch_size": batch_size, **_flat(result)})
    config = {"replayed_tokens": len(replay) // T, "replayed_layers": T, "capacity": params.capacity,
              "prefetch_m": m, "batch_size": params.batch_size,
              "transfer_ms_per_expert": params.expert_bytes / (params.bandwidth_gbps * 1e9) * 1e3}
    return {"config": config, **main}, by_capacity, by_batch


def _flat(result: dict[str, dict]) -> dict[str, float]:
    return {f"{name}_{key}": value[key] for name, value in result.items() for key in ("hit_rate", "speedup_vs_on_demand")}
