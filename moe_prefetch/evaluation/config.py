"""The `evaluate` section of params.yaml: top-m, scoring, horizons and the expert-cache replay, and the named cost
profiles (hardware presets) whose numbers the replay's cost model takes unless evaluate.cache overrides them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_prefetch.config import doc, non_negative, positive, positive_int_list
from moe_prefetch.errors import PipelineError
from moe_prefetch.evaluation.cache import EVICTION_POLICIES, MISS_PATHS, PREFETCH_TARGETS, CostModel
from moe_prefetch.evaluation.fallback import FALLBACK_RULES
from moe_prefetch.registry import Registry


@dataclass(frozen=True)
class CostProfile:
    """A named hardware preset of the cost model's numbers, with how they were derived."""

    expert_bytes: float
    bandwidth_gbps: float
    layer_compute_ms: float
    derivation: str
    expert_compute_share: float = 0.0  # share of a batch-1 layer's compute reading its k experts' weights
    miss_path: str = "transfer"  # cache.MISS_PATHS: a missing expert is moved, or computed on the CPU
    cpu_expert_ms: float = 0.0  # one expert's batch-1 compute on the CPU (miss_path cpu)

    def cost_model(self, overlap_prefetch: bool, chunk_bytes: float = 0.0, links: int = 1) -> CostModel:
        return CostModel(self.expert_bytes, self.bandwidth_gbps, self.layer_compute_ms, overlap_prefetch, chunk_bytes,
                         links, self.expert_compute_share, self.miss_path, self.cpu_expert_ms)


COST_PROFILES: Registry[CostProfile] = Registry("cost profile")
MIXTRAL_EXPERT_WEIGHTS = 3 * 4096 * 14336  # w1, w3 (4096 -> 14336) and w2 (14336 -> 4096) of one Mixtral-8x7B expert
QWEN3_30B_EXPERT_WEIGHTS = 3 * 2048 * 768  # the same three matrices of one Qwen3-30B-A3B expert (moe_intermediate 768)
COST_PROFILES.add("mixtral-8x7b-bf16-pcie4", CostProfile(
    expert_bytes=MIXTRAL_EXPERT_WEIGHTS * 2.0, bandwidth_gbps=25.0, layer_compute_ms=0.4, expert_compute_share=0.89,
    derivation="Mixtral-8x7B decoding with experts offloaded to CPU memory: an expert is 3 x 4096 x 14336 bf16 weights "
               "= 352,321,536 bytes (~336 MiB), moved over PCIe 4.0 x16 at a practical 25 GB/s (~14 ms each), while one "
               "MoE layer of a decode step computes in ~0.4 ms on a GPU (about 26 GB of active weights read at 2 TB/s "
               "over 32 layers). Expert share 0.89: a layer reads 2 experts (704.6 MB) and its bf16 attention (q, o "
               "4096 x 4096 and k, v 4096 x 1024: 83.9 MB) at one bandwidth, 704.6 / 788.5.",
))
COST_PROFILES.add("mixtral-8x7b-int4-pcie4", CostProfile(
    expert_bytes=MIXTRAL_EXPERT_WEIGHTS * 4.5 / 8, bandwidth_gbps=25.0, layer_compute_ms=0.3, expert_compute_share=0.70,
    derivation="Mixtral-8x7B with HQQ-style 4-bit experts (group size 64, a 16-bit scale and zero per group: 4.5 bits "
               "per weight) = 99,090,432 bytes, over PCIe 4.0 x16 at 25 GB/s (~4 ms each); a layer computes in ~0.3 ms "
               "(2 quantised experts plus bf16 attention, ~0.28 GB read per layer, at the lower bandwidth dequantising "
               "kernels reach). Expert share 0.70: 2 x 99.1 MB of experts of ~282 MB read per layer (with 83.9 MB of "
               "bf16 attention).",
))
COST_PROFILES.add("mixtral-8x7b-int2-pcie4", CostProfile(
    expert_bytes=MIXTRAL_EXPERT_WEIGHTS * 2.5 / 8, bandwidth_gbps=25.0, layer_compute_ms=0.25, expert_compute_share=0.57,
    derivation="Mixtral-8x7B with HQQ-style 2-bit experts (group size 16 with 8-bit scales and zeros, themselves "
               "grouped: ~2.5 bits per weight, as in Eliseev & Mazur's offloading setup) = 55,050,240 bytes over PCIe "
               "4.0 x16 at 25 GB/s (~2.2 ms each); a layer computes in ~0.25 ms. Expert share 0.57: 2 x 55.1 MB of "
               "experts of ~194 MB read per layer (with 83.9 MB of bf16 attention).",
))
COST_PROFILES.add("mixtral-8x7b-int4-pcie5", CostProfile(
    expert_bytes=MIXTRAL_EXPERT_WEIGHTS * 4.5 / 8, bandwidth_gbps=50.0, layer_compute_ms=0.3, expert_compute_share=0.70,
    derivation="The 4-bit Mixtral experts of mixtral-8x7b-int4-pcie4 over PCIe 5.0 x16 (64 GB/s raw, ~50 GB/s "
               "practical host-to-device): ~2 ms per expert, same compute (and expert share 0.70).",
))
COST_PROFILES.add("mixtral-8x7b-bf16-c2c", CostProfile(
    expert_bytes=MIXTRAL_EXPERT_WEIGHTS * 2.0, bandwidth_gbps=400.0, layer_compute_ms=0.25, expert_compute_share=0.89,
    derivation="Mixtral-8x7B bf16 experts in a Grace-Hopper superchip's LPDDR5X, moved over NVLink-C2C (450 GB/s per "
               "direction, ~400 GB/s practical host-to-device): ~0.9 ms per expert; a layer computes in ~0.25 ms "
               "(26 GB of active weights at H100's ~3.35 TB/s over 32 layers); expert share 0.89 as for bf16 over PCIe.",
))
COST_PROFILES.add("qwen3-30b-a3b-int4-nvme", CostProfile(
    expert_bytes=QWEN3_30B_EXPERT_WEIGHTS * 4.5 / 8, bandwidth_gbps=3.0, layer_compute_ms=0.4, expert_compute_share=0.66,
    derivation="Qwen3-30B-A3B (48 MoE layers, 128 experts, top-8) at 4.5 bits per weight on a laptop or phone, experts "
               "streamed from NVMe/UFS flash: an expert is 3 x 2048 x 768 weights = 2,654,208 bytes, read at ~3 GB/s "
               "for ~2.6 MB random reads (~0.9 ms each); a layer computes in ~0.4 ms (~1.9 GB of active weights per "
               "token over 48 layers at ~100 GB/s of unified memory). Expert share 0.66: 8 experts x 2.65 MB = 21.2 MB of "
               "~31.8 MB read per layer (attention: q 2048 x 4096, o 4096 x 2048, k, v 2048 x 512 = 18.9M weights, "
               "10.6 MB at 4.5 bits).",
))
COST_PROFILES.add("mixtral-8x7b-bf16-cpu", CostProfile(
    expert_bytes=MIXTRAL_EXPERT_WEIGHTS * 2.0, bandwidth_gbps=25.0, layer_compute_ms=0.4, expert_compute_share=0.89,
    miss_path="cpu", cpu_expert_ms=3.5,
    derivation="Fiddler-style (Kamahori et al., arXiv 2402.07033: unquantised Mixtral-8x7B at >3 tokens/s with a 24 GB "
               "GPU, REFERENCES.md): a missing bf16 expert is computed where it lives, on the CPU, instead of crossing "
               "PCIe 4.0 (~14 ms); only its activations move (8 KB each way). cpu_expert_ms 3.5: a batch-1 expert is "
               "memory-bound, its 352,321,536 bytes read at ~100 GB/s (a six-channel DDR4-2666 server socket, 128 GB/s "
               "peak; an assumption, not Fiddler's measurement); 32 layers x 2 experts x 3.5 ms = 4.5 tokens/s with no "
               "expert on the GPU, consistent with Fiddler's >3. GPU numbers as mixtral-8x7b-bf16-pcie4; prefetches "
               "still move over PCIe.",
))
# CacheParams fields replacing a profile's when not null
COST_OVERRIDES = ("expert_bytes", "bandwidth_gbps", "layer_compute_ms", "expert_compute_share", "miss_path", "cpu_expert_ms")


@dataclass
class CacheParams:
    """Expert-cache prefetch simulation. The costs are those of `profile` (by default Mixtral-8x7B decoding with
    experts offloaded to CPU memory, see COST_PROFILES), each replaced by its override when that is not null."""

    capacity: int = doc("Experts the cache holds (per layer if per_layer, else in total).", 4)
    capacity_fraction: float | None = doc(
        "The cache's size as a fraction of the experts a pool can hold (per layer: the model's experts; one global "
        "pool: experts x MoE layers), rounded to the nearest whole expert, at least 1, so models with 8 to 256 "
        "experts compare; null = `capacity`.", None)
    per_layer: bool = doc("One cache per MoE layer (true) or one global cache (false).", True)
    policy: str = doc(f"Eviction policy: {' | '.join(EVICTION_POLICIES)}.", "lru")
    prefetch_m: int = doc("Experts prefetched per token: the predictor's top-m for layer l+h, issued when layer l runs.", 2)
    profile: str = doc(f"Hardware preset of the cost model's numbers: {' | '.join(COST_PROFILES)}.",
                       "mixtral-8x7b-bf16-pcie4")
    expert_bytes: float | None = doc("Bytes of one expert; null = the profile's.", None)
    bandwidth_gbps: float | None = doc("Host-to-device link bandwidth in GB/s (1e9 bytes/s); null = the profile's.", None)
    layer_compute_ms: float | None = doc(
        "Compute time of one MoE layer of one decode step with its experts resident; null = the profile's.", None)
    expert_compute_share: float | None = doc(
        "Share s of a batch-1 layer's compute that reads its k experts' weights: a step's layer computes "
        "layer_compute_ms x ((1 - s) + s x distinct experts / k); 0 = constant; null = the profile's.", None)
    miss_path: str | None = doc("Where a missing expert is computed: transfer (moved to the GPU) | cpu (on the CPU, "
                                "Fiddler-style); null = the profile's.", None)
    cpu_expert_ms: float | None = doc("One expert's batch-1 compute time on the CPU (miss_path cpu); null = the "
                                      "profile's.", None)
    links: int = doc("Parallel host-to-device links (copy engines), each moving one expert at a time.", 1)
    prefetch_into: str = doc("Where prefetches land: cache (the same pools) | staging (staging_slots of each pool's "
                             "capacity hold only prefetches; a used one is promoted).", "cache")
    staging_slots: int = doc("Slots per pool given to staging when prefetch_into is staging (at most capacity - 1).", 1)
    overlap_prefetch: bool = doc("Prefetch transfers overlap compute (demand loads never do).", True)
    chunk_bytes: float = doc(
        "A demand load pre-empts a prefetch in flight at this granularity (bytes; an engine copying an expert in "
        "chunks on a copy stream and checking its demand queue between chunks); 0 = it waits for the whole transfer.",
        16_777_216.0)
    predictor_ms: float = doc(
        "The predictor's inference time per prefetching layer, charged on the compute stream to the `predictor` "
        "strategy (benchmarks/bench_export.py measures it).", 0.0)
    seed: int = doc("Seed of the random eviction policy.", 0)
    gate_margin: float = doc(
        "predictor_gated / lookup_gated prefetch only if that makes the val replay at least this much faster (a "
        "share of its time), else not at all.", 0.01)
    decode_batch_size: int = doc("Sequences decoded together: a step needs the union of their experts.", 1)
    max_tokens: int = doc("Replay at most this many test tokens (whole sequences, in order) to bound run time.", 4000)
    profile_sweep_tokens: int = doc(
        "Test tokens (whole sequences, in order; val likewise for the gates) of the capacity and decode batch-size "
        "sweeps of every cost profile (plots cache_*_by_*_profiles.png) and of the regime sweep, fewer than "
        "max_tokens to bound run time; 0 = no per-profile sweeps, the regime sweep on the max_tokens replay.", 1000)
    capacity_sweep: list = doc("Capacities of the hit-rate/speedup vs capacity plots, in capacity_sweep_unit.",
                               factory=lambda: [1, 2, 4, 8, 12])
    capacity_sweep_unit: str = doc(
        "Unit of capacity_sweep: experts (per pool) | fraction (of a pool's experts, rounded like capacity_fraction).",
        "experts")
    fallback: str = doc(
        f"What the learned strategies prefetch for layers h..c-2+h, issued at layers 0..c-2 where no predictor has "
        f"its context yet: {' | '.join(FALLBACK_RULES)} (moe_prefetch/evaluation/fallback.py). token by default: "
        f"on the default run it made the predictor's strategies faster in every cost profile where prefetching pays "
        f"(README, Fallback), frequency made them slower in every profile.", "token")
    across_steps: bool = doc(
        "With windows.across_tokens: the last h layers of a step prefetch the next step's layers 0..h-1 (true), or issue "
        "nothing, leaving those layers to the cache as without across_tokens (false; the oracles likewise).", True)
    decode_batch_sweep: list = doc("Decode batch sizes of the hit-rate/speedup vs batch size plot.", factory=lambda: [1, 4, 16])
    regime_sweep: list = doc(
        "Transfer time per expert over layer compute time, for the speedup-by-regime plot (the profile's compute "
        "and bandwidth, expert bytes scaled).", factory=lambda: [0.25, 0.5, 1, 2, 4, 8, 16, 35])

    def costs(self) -> CostProfile:
        """The profile with every non-null override applied."""
        profile = COST_PROFILES.get(self.profile, "evaluate.cache.profile")
        overrides = {name: getattr(self, name) for name in COST_OVERRIDES if getattr(self, name) is not None}
        return dataclasses.replace(profile, **overrides)

    def cost_model(self) -> CostModel:
        return self.costs().cost_model(self.overlap_prefetch, self.chunk_bytes, self.links)

    def experts_of(self, size: float, unit: str, pool_experts: int) -> int:
        """A cache size in `unit` (experts | fraction) as whole experts of a pool of `pool_experts`, at least 1."""
        return int(size) if unit == "experts" else max(1, int(round(size * pool_experts)))

    def cache_experts(self, pool_experts: int) -> int:
        """The configured cache in experts: capacity_fraction of the pool when set, else capacity."""
        if self.capacity_fraction is None:
            return self.capacity
        return self.experts_of(self.capacity_fraction, "fraction", pool_experts)

    def capacity_sweep_experts(self, pool_experts: int) -> list[int]:
        """capacity_sweep in experts, in order, repeats (two fractions rounding alike) dropped."""
        return list(dict.fromkeys(self.experts_of(size, self.capacity_sweep_unit, pool_experts) for size in self.capacity_sweep))

    def validate(self) -> None:
        positive("evaluate.cache", self, "capacity", "prefetch_m", "decode_batch_size", "max_tokens")
        EVICTION_POLICIES.get(self.policy, "evaluate.cache.policy")
        costs = self.costs()  # the numbers the replay uses: each override, or else the profile's own
        positive("evaluate.cache", costs, "expert_bytes", "bandwidth_gbps")
        non_negative("evaluate.cache", costs, "layer_compute_ms", "cpu_expert_ms")
        positive("evaluate.cache", self, "links", "staging_slots")
        if not 0.0 <= costs.expert_compute_share <= 1.0:
            raise PipelineError(f"evaluate.cache.expert_compute_share: must be in [0, 1], got {costs.expert_compute_share}")
        if costs.miss_path not in MISS_PATHS:
            raise PipelineError(f"evaluate.cache.miss_path: {costs.miss_path!r} is not one of {', '.join(MISS_PATHS)}")
        if costs.miss_path == "cpu" and costs.cpu_expert_ms <= 0:
            raise PipelineError(f"evaluate.cache.cpu_expert_ms: must be > 0 on the cpu miss path, got {costs.cpu_expert_ms}")
        if self.prefetch_into not in PREFETCH_TARGETS:
            raise PipelineError(f"evaluate.cache.prefetch_into: {self.prefetch_into!r} is not one of "
                                f"{', '.join(PREFETCH_TARGETS)}")
        non_negative("evaluate.cache", self, "chunk_bytes", "predictor_ms", "gate_margin", "profile_sweep_tokens")
        positive_int_list("evaluate.cache", self, "decode_batch_sweep")
        FALLBACK_RULES.get(self.fallback, "evaluate.cache.fallback")
        if self.capacity_fraction is not None and not (isinstance(self.capacity_fraction, (int, float))
                                                       and not isinstance(self.capacity_fraction, bool)
                                                       and 0 < self.capacity_fraction <= 1):
            raise PipelineError(f"evaluate.cache.capacity_fraction: must be null or a number in (0, 1], got {self.capacity_fraction}")
        if self.capacity_sweep_unit == "experts":
            positive_int_list("evaluate.cache", self, "capacity_sweep")
        elif self.capacity_sweep_unit == "fraction":
            if not self.capacity_sweep or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1
                                              for f in self.capacity_sweep):
                raise PipelineError(f"evaluate.cache.capacity_sweep: with capacity_sweep_unit fraction, must be a "
                                    f"non-empty list of numbers in (0, 1], got {self.capacity_sweep}")
        else:
            raise PipelineError(f"evaluate.cache.capacity_sweep_unit: unknown unit {self.capacity_sweep_unit!r}; "
                                f"accepted: experts, fraction")
        if not self.regime_sweep or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in self.regime_sweep):
            raise PipelineError(f"evaluate.cache.regime_sweep: must be a non-empty list of numbers > 0, got {self.regime_sweep}")


@dataclass
class EvaluateParams:
    top_m: list = doc("m values of the top-m accuracy of the highest-weight target expert.", factory=lambda: [1, 3, 5, 10])
    score_batch_size: int = doc("Windows scored per batch.", 4096)
    seed: int = doc("Seed of the random baseline and of the bootstrap's document resamples.", 0)
    bootstrap_resamples: int = doc(
        "Resamples B of the document-level percentile bootstrap behind every `<metric>_ci95` interval (whole test "
        "documents drawn with replacement; moe_prefetch/evaluation/intervals.py).", 1000)
    max_horizon: int = doc(
        "Also score every baseline but random (chance does not depend on h) at horizons 1..max_horizon, each on "
        "windows rebuilt from the shards with the windows split, and the predictor at its own horizon (metrics "
        "per_horizon, plot per_horizon); 0 = off. An upper bound: a model with L MoE layers has horizons "
        "1..L - windows.context_length only, so evaluate prints a note and per_horizon holds just those.", 4)
    entropy_train_sizes: list = doc(
        "Train-window counts of the nested random subsets (seeded by evaluate.seed) on which the plug-in H(top-1 | "
        "lookup context) is recomputed to show whether it converged (metrics bounds.plugin_entropy_by_train_size, "
        "plot plugin_entropy_by_train_size); the whole train split is always added, counts >= it are skipped.",
        factory=lambda: [25000, 50000, 100000, 200000])
    cache: CacheParams = doc("Expert-cache prefetch simulation.", factory=CacheParams)

    def validate(self) -> None:
        positive_int_list("evaluate", self, "top_m", "entropy_train_sizes")
        if 1 not in self.top_m:
            raise PipelineError(f"evaluate.top_m: must include 1 (top-1 is the headline metric), got {self.top_m}")
        positive("evaluate", self, "score_batch_size", "bootstrap_resamples")
        if self.max_horizon < 0:
            raise PipelineError(f"evaluate.max_horizon: must be >= 0 (0 = off), got {self.max_horizon}")
        self.cache.validate()
