"""Break-even prefetch precision per regime: the precision below which prefetching stops paying.

Method (measured, not modelled): a synthetic prefetcher lists, when layer l runs, m experts for layer l+h; slot j
is the expert layer l+h really routes in slot j with probability q, else an expert it does not route (uniform,
seeded). Its precision is q by construction. Each q of BREAKEVEN_GRID is replayed through the same cache, link and
costs as on-demand loading (no prefetch, configured policy); the break-even precision is where the synthetic's
speedup over on-demand crosses 1.0, linearly interpolated between the grid's neighbouring points (0 when even q = 0
does not slow decoding, None when even q = 1 does not speed it up). The same uniform draws serve every q, so a
higher q only turns wrong listings right. Next to it, each learned strategy's measured precision: the share of the
experts its plan lists that the target layer routes. Replayed at decode batch 1 on the per-profile sweeps' tokens
(evaluate.cache.profile_sweep_tokens), like the regime sweep's strategies; a regime row gets breakeven_precision, synthetic_q<100 q>_speedup and
<strategy>_precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_prefetch.evaluation.cache import CacheConfig
from moe_prefetch.evaluation.config import CacheParams
from moe_prefetch.evaluation.replay import PREFETCH_STRATEGIES, DecodeSteps, ReplayInputs, Simulations

BREAKEVEN_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def synthetic_plan(routed: np.ndarray, horizon: int, m: int, num_experts: int, precision: float, seed: int) -> np.ndarray:
    """(T, L, m) prefetch: slot j of row (t, l) lists routed[t, l + h, j] with probability `precision`, else an
    expert layer l + h does not route at step t (-1 where layer l + h routes no slot j, or l + h >= L)."""
    steps, layers, width = routed.shape
    kept = min(m, width)
    target = np.full((steps, layers, m), -1, dtype=np.int64)  # (T, L, m) what layer l + h routes
    target[:, : layers - horizon, :kept] = routed[:, horizon:, :kept]
    used = np.zeros((steps, layers, num_experts + 1), dtype=bool)  # (T, L, E + 1); column E collects the -1 padding
    shifted = np.full((steps, layers, width), -1, dtype=np.int64)
    shifted[:, : layers - horizon] = routed[:, horizon:]
    t, l, _ = np.indices(shifted.shape)
    used[t, l, np.where(shifted >= 0, shifted, num_experts)] = True
    free = ~used[..., :num_experts]  # (T, L, E) experts layer l + h does not route
    rng = np.random.default_rng(seed)
    right, pick = rng.random(target.shape), rng.random(target.shape)  # (T, L, m) each
    rank = np.floor(pick * free.sum(axis=-1, keepdims=True)).astype(np.int64)  # (T, L, m) which free expert
    wrong = np.argmax(np.cumsum(free, axis=-1)[..., None, :] > rank[..., None], axis=-1)  # (T, L, m)
    return np.where(target >= 0, np.where(right < precision, target, wrong), -1)


def crossing(grid: tuple[float, ...], speedups: list[float]) -> float | None:
    """The q where speedup first reaches 1.0, linearly interpolated (see module doc)."""
    if speedups[0] >= 1.0:
        return 0.0
    for (q0, s0), (q1, s1) in zip(zip(grid, speedups), zip(grid[1:], speedups[1:])):
        if s0 < 1.0 <= s1:
            return q0 + (1.0 - s0) * (q1 - q0) / (s1 - s0)
    return None


def plan_precision(plan: np.ndarray | None, routed: np.ndarray, horizon: int) -> float | None:
    """Share of the experts `plan` lists (for layer l + h at row l) that layer l + h routes at that step."""
    if plan is None:
        return None
    layers = routed.shape[1]
    listed = plan[:, : layers - horizon]  # (T, L - h, m)
    target = routed[:, horizon:]  # (T, L - h, w)
    hits = (listed[..., :, None] == target[..., None, :]).any(axis=-1) & (listed >= 0)
    count = int((listed >= 0).sum())
    return float(hits.sum()) / count if count else None


@dataclasses.dataclass(frozen=True)
class BreakEven:
    """The break-even replays of one regime (a replay_all job): the synthetic prefetcher at every q of the grid."""

    capacity: int
    params: CacheParams
    num_experts: int
    inputs: str = "sweep"

    def key(self) -> tuple:
        return "breakeven", self.inputs, self.capacity, self.num_experts, repr(self.params)

    def replay(self, inputs: dict[str, ReplayInputs]) -> dict:
        replay_inputs = inputs[self.inputs]
        steps = DecodeSteps(replay_inputs, 1)
        runs = Simulations(steps, self.params.cost_model(), replay_inputs.horizon)
        cache = CacheConfig(capacity=self.capacity, per_layer=self.params.per_layer, policy=self.params.policy,
                            seed=self.params.seed)
        base = runs.run(None, cache)["time_ms"]
        speedups = [base / runs.run(synthetic_plan(steps.routed, replay_inputs.horizon, replay_inputs.m, self.num_experts,
                                                   q, self.params.seed), cache)["time_ms"] for q in BREAKEVEN_GRID]
        precision = {f"{name}_precision": plan_precision(strategy.plan(replay_inputs, steps, replay_inputs.m), steps.routed,
                                                         replay_inputs.horizon)
                     for name, strategy in PREFETCH_STRATEGIES.items()
                     if strategy.learned and not strategy.gated and strategy.available(replay_inputs)}
        return {"breakeven_precision": crossing(BREAKEVEN_GRID, speedups),
                **{f"synthetic_q{round(100 * q)}_speedup": s for q, s in zip(BREAKEVEN_GRID, speedups)}, **precision}
