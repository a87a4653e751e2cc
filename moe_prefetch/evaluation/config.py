"""The `evaluate` section of params.yaml: top-m, scoring, horizons and the expert-cache replay, and the named cost
profiles (hardware presets) whose numbers the replay's cost model takes unless evaluate.cache overrides them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_prefetch.config import doc, non_negative, positive, positive_int_list
from moe_prefetch.errors import PipelineError
from moe_prefetch.evaluation.cache import EVICTION_POLICIES, CostModel
from moe_prefetch.registry import Registry


@dataclass(frozen=True)
class CostProfile:
    """A named hardware preset of the cost model's numbers, with how they were derived."""

    expert_bytes: float
    bandwidth_gbps: float
    layer_compute_ms: float
    derivation: str

    def cost_model(self, overlap_prefetch: bool) -> CostModel:
        return CostModel(self.expert_bytes, self.bandwidth_gbps, self.layer_compute_ms, overlap_prefetch)


COST_PROFILES: Registry[CostProfile] = Registry("cost profile")
COST_PROFILES.add("mixtral-8x7b-bf16-pcie4", CostProfile(
    expert_bytes=352_321_536.0, bandwidth_gbps=25.0, layer_compute_ms=0.4,
    derivation="Mixtral-8x7B decoding with experts offloaded to CPU memory: an expert is 3 x 4096 x 14336 bf16 weights "
               "= 352,321,536 bytes (~336 MiB), moved over PCIe 4.0 x16 at a practical 25 GB/s (~14 ms each), while one "
               "MoE layer of a decode step computes in ~0.4 ms on a GPU (about 26 GB of active weights read at 2 TB/s "
               "over 32 layers).",
))
COST_OVERRIDES = ("expert_bytes", "bandwidth_gbps", "layer_compute_ms")  # CacheParams fields replacing a profile's


@dataclass
class CacheParams:
    """Expert-cache prefetch simulation. The costs are those of `profile` (by default Mixtral-8x7B decoding with
    experts offloaded to CPU memory, see COST_PROFILES), each replaced by its override when that is not null."""

    capacity: int = doc("Experts the cache holds (per layer if per_layer, else in total).", 4)
    per_layer: bool = doc("One cache per MoE layer (true) or one global cache (false).", True)
    policy: str = doc(f"Eviction policy: {' | '.join(EVICTION_POLICIES)}.", "lru")
    prefetch_m: int = doc("Experts prefetched per token: the predictor's top-m for layer l+h, issued when layer l runs.", 2)
    profile: str = doc(f"Hardware preset of the cost model's numbers: {' | '.join(COST_PROFILES)}.",
                       "mixtral-8x7b-bf16-pcie4")
    expert_bytes: float | None = doc("Bytes of one expert; null = the profile's.", None)
    bandwidth_gbps: float | None = doc("Host-to-device link bandwidth in GB/s (1e9 bytes/s); null = the profile's.", None)
    layer_compute_ms: float | None = doc(
        "Compute time of one MoE layer of one decode step with its experts resident; null = the profile's.", None)
    overlap_prefetch: bool = doc("Prefetch transfers overlap compute (demand loads never do).", True)
    decode_batch_size: int = doc("Sequences decoded together: a step needs the union of their experts.", 1)
    max_tokens: int = doc("Replay at most this many test tokens (whole sequences, in order) to bound run time.", 4000)
    capacity_sweep: list = doc("Capacities of the hit-rate/speedup vs capacity plot.", factory=lambda: [1, 2, 4, 8, 12])
    decode_batch_sweep: list = doc("Decode batch sizes of the hit-rate/speedup vs batch size plot.", factory=lambda: [1, 4, 16])

    def costs(self) -> CostProfile:
        """The profile with every non-null override applied."""
        profile = COST_PROFILES.get(self.profile, "evaluate.cache.profile")
        overrides = {name: getattr(self, name) for name in COST_OVERRIDES if getattr(self, name) is not None}
        return dataclasses.replace(profile, **overrides)

    def cost_model(self) -> CostModel:
        return self.costs().cost_model(self.overlap_prefetch)

    def validate(self) -> None:
        positive("evaluate.cache", self, "capacity", "prefetch_m", "decode_batch_size", "max_tokens")
        EVICTION_POLICIES.get(self.policy, "evaluate.cache.policy")
        costs = self.costs()  # the numbers the replay uses: each override, or else the profile's own
        positive("evaluate.cache", costs, "expert_bytes", "bandwidth_gbps")
        non_negative("evaluate.cache", costs, "layer_compute_ms")
        positive_int_list("evaluate.cache", self, "capacity_sweep", "decode_batch_sweep")


@dataclass
class EvaluateParams:
    top_m: list = doc("m values of the top-m accuracy of the highest-weight target expert.", factory=lambda: [1, 3, 5, 10])
    score_batch_size: int = doc("Windows scored per batch.", 4096)
    seed: int = doc("Seed of the random baseline.", 0)
    max_horizon: int = doc(
        "Also score every baseline but random (chance does not depend on h) at horizons 1..max_horizon, each on "
        "windows rebuilt from the shards with the windows split, and the predictor at its own horizon (metrics "
        "per_horizon, plot per_horizon); 0 = off. An upper bound: a model with L MoE layers has horizons "
        "1..L - windows.context_length only, so evaluate prints a note and per_horizon holds just those.", 4)
    cache: CacheParams = doc("Expert-cache prefetch simulation.", factory=CacheParams)

    def validate(self) -> None:
        positive_int_list("evaluate", self, "top_m")
        if 1 not in self.top_m:
            raise PipelineError(f"evaluate.top_m: must include 1 (top-1 is the headline metric), got {self.top_m}")
        positive("evaluate", self, "score_batch_size")
        if self.max_horizon < 0:
            raise PipelineError(f"evaluate.max_horizon: must be >= 0 (0 = off), got {self.max_horizon}")
        self.cache.validate()
