"""The `evaluate` section of params.yaml: top-m, scoring, horizons and the expert-cache replay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_prefetch.config import doc, positive
from moe_prefetch.errors import PipelineError


@dataclass
class CacheParams:
    """Expert-cache prefetch simulation. Defaults model Mixtral-8x7B decoding with experts offloaded to CPU memory:
    an expert is 3 x 4096 x 14336 bf16 weights = 352,321,536 bytes (~336 MiB), moved over PCIe 4.0 x16 at a
    practical 25 GB/s (~14 ms each), while one MoE layer of a decode step computes in ~0.4 ms on a GPU
    (about 26 GB of active weights read at 2 TB/s over 32 layers)."""

    capacity: int = doc("Experts the cache holds (per layer if per_layer, else in total).", 4)
    per_layer: bool = doc("One cache per MoE layer (true) or one global cache (false).", True)
    policy: Literal["lru", "lfu"] = doc("Eviction policy.", "lru")
    prefetch_m: int = doc("Experts prefetched per token: the predictor's top-m for layer l+h, issued when layer l runs.", 2)
    expert_bytes: float = doc("Bytes of one expert.", 352_321_536.0)
    bandwidth_gbps: float = doc("Host-to-device link bandwidth in GB/s (1e9 bytes/s).", 25.0)
    layer_compute_ms: float = doc("Compute time of one MoE layer of one decode step with its experts resident.", 0.4)
    overlap_prefetch: bool = doc("Prefetch transfers overlap compute (demand loads never do).", True)
    batch_size: int = doc("Sequences decoded together: a step needs the union of their experts.", 1)
    max_tokens: int = doc("Replay at most this many test tokens (whole sequences, in order) to bound run time.", 4000)
    capacity_sweep: list = doc("Capacities of the hit-rate/speedup vs capacity plot.", factory=lambda: [1, 2, 4, 8, 12])
    batch_sweep: list = doc("Batch sizes of the hit-rate/speedup vs batch size plot.", factory=lambda: [1, 4, 16])

    def validate(self) -> None:
        positive("evaluate.cache", self, "capacity", "prefetch_m", "expert_bytes", "bandwidth_gbps", "batch_size", "max_tokens")
        if self.layer_compute_ms < 0:
            raise PipelineError(f"evaluate.cache.layer_compute_ms: must be >= 0, got {self.layer_compute_ms}")
        for name in ("capacity_sweep", "batch_sweep"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise PipelineError(f"evaluate.cache.{name}: must be a non-empty list of integers >= 1, got {values}")


@dataclass
class EvaluateParams:
    topk: list = doc("m values of the top-m accuracy of the highest-weight target expert.", factory=lambda: [1, 3, 5, 10])
    batch_size: int = doc("Windows scored per batch.", 4096)
    seed: int = doc("Seed of the random baseline.", 0)
    max_horizon: int = doc(
        "Also score the baselines (lookup, frequency, previous_token, stale_gate) at horizons 1..max_horizon, each on "
        "windows rebuilt from the shards with the windows split, and the predictor at its own horizon (metrics "
        "per_horizon, plot per_horizon); 0 = off. Needs windows.context_length + max_horizon <= MoE layers.", 4)
    cache: CacheParams = doc("Expert-cache prefetch simulation.", factory=CacheParams)

    def validate(self) -> None:
        if not self.topk or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in self.topk):
            raise PipelineError(f"evaluate.topk: must be a non-empty list of integers >= 1, got {self.topk}")
        if 1 not in self.topk:
            raise PipelineError(f"evaluate.topk: must include 1 (top-1 is the headline metric), got {self.topk}")
        positive("evaluate", self, "batch_size")
        if self.max_horizon < 0:
            raise PipelineError(f"evaluate.max_horizon: must be >= 0 (0 = off), got {self.max_horizon}")
        self.cache.validate()
