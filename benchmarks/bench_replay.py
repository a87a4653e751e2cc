"""Expert-cache replay (moe_prefetch/evaluation/cache.py): throughput in token-layers per second on 10^6
token-layers (125,000 decode steps x 8 MoE layers, 16 experts top-2, routing that follows the layer before with
probability 0.6) for on-demand LRU, LRU with perfect top-2 prefetch one layer ahead, and Belady, all in the same
run, alternating. Target: >= 100,000 token-layers/s for each (a default evaluate replays ~23 x 7 strategies x
20,000 token-layers, so this keeps it well under a minute). The default cost profile's numbers and 16 MiB
pre-emption chunks.

    python benchmarks/bench_replay.py [--steps 125000] [--big]
"""

from __future__ import annotations

import numpy as np
from common import Row, alternate, command_line, finish, parser, print_sides, rounds_of, verdict

from moe_prefetch.evaluation.cache import CacheConfig, CostModel, oracle_prefetch, simulate

TARGET = 100_000.0  # token-layers per second
LAYERS, EXPERTS, TOP_K, FOLLOW = 8, 16, 2, 0.6


def routing(steps: int, seed: int = 0) -> np.ndarray:
    """(steps, LAYERS, TOP_K) distinct experts; top-1 follows the previous layer's (shifted) with probability FOLLOW."""
    rng = np.random.default_rng(seed)
    first = np.empty((steps, LAYERS), dtype=np.int64)
    first[:, 0] = rng.integers(0, EXPERTS, steps)
    for layer in range(1, LAYERS):
        follow = rng.random(steps) < FOLLOW
        first[:, layer] = np.where(follow, (first[:, layer - 1] + layer) % EXPERTS, rng.integers(0, EXPERTS, steps))
    second = (first + rng.integers(1, EXPERTS, first.shape)) % EXPERTS
    return np.stack([first, second], axis=-1)


def run(args) -> list[Row]:
    steps = args.steps * (4 if args.big else 1)
    routed = routing(steps)
    prefetch = oracle_prefetch(routed, 1, TOP_K)
    cost = CostModel(352_321_536.0, 25.0, 0.4, chunk_bytes=16_777_216.0)
    sides = {
        "on-demand LRU": lambda: simulate(routed, None, CacheConfig(4), cost, 1),
        "perfect prefetch, LRU": lambda: simulate(routed, prefetch, CacheConfig(4), cost, 1),
        "Belady": lambda: simulate(routed, None, CacheConfig(4, policy="belady"), cost, 1),
    }
    token_layers = steps * LAYERS
    print(f"replay: {token_layers:,} token-layers ({steps:,} steps x {LAYERS} layers, E={EXPERTS}, k={TOP_K}), "
          f"capacity 4 per layer, {rounds_of(args)} rounds alternating")
    stats = print_sides(alternate(sides, rounds=rounds_of(args), warmup=0), unit="s", scale=1.0)
    rows = []
    for name, stat in stats.items():
        rate = token_layers / stat.median
        rows.append(Row(f"replay {name}", f"{rate:,.0f} token-layers/s", f">= {TARGET:,.0f}", verdict(rate, TARGET, ">="),
                        command_line("bench_replay.py")))
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=125_000, help="decode steps (x 8 layers = token-layers)")
    args = p.parse_args()
    if args.rounds is None:
        args.rounds = 3  # a round replays 10^6 token-layers three times
    finish(args, run(args))


if __name__ == "__main__":
    main()
