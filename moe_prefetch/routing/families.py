"""Adapters of the MoE families of transformers 5.x, registered by `config.model_type` in FAMILIES (the families
added later are in `recent_families.py`; the MoE families not supported, with the reason, in `unsupported.py`).

What each router's forward returns and what its MoE block passes to the experts module (verified against the
installed modeling_*.py; `decode` must return exactly the latter):

- mixtral      (logits, w, idx): softmax -> top-k -> renormalise; float32 weights.
- qwen2_moe    (logits, w, idx): softmax -> top-k -> renormalise iff norm_topk_prob, cast to the logits dtype.
               Dense layers: `mlp_only_layers` and `decoder_sparse_step`. The shared expert (one MLP of width
               shared_expert_intermediate_size) is scaled per token by sigmoid(shared_expert_gate(x)); it is not
               routed, so it is not recorded; `shared_experts` counts its width in routed-expert units
               (Qwen1.5-MoE-A2.7B: 5632 / 1408 = 4).
- qwen3_moe, olmoe  as qwen2_moe without shared experts (olmoe has no dense layers).
- deepseek_v2  (logits, w, idx): softmax; greedy or group_limited_greedy top-k (torch.topk sorted=False);
               w = probability * routed_scaling_factor. This version never renormalises (norm_topk_prob unused).
- deepseek_v3  (logits, w, idx): sigmoid; choice by score + e_score_correction_bias within the top topk_group
               groups; w = uncorrected scores, renormalised iff norm_topk_prob, * routed_scaling_factor.
- gpt_oss      (logits, w, idx): top-k on logits (with bias), softmax over the k (over dim 1: the look-ahead
               passes flattened (T, D) tokens, as the model does). MXFP4 kernels bypass router.forward: see
               GptOssAdapter.
- granitemoe   (logits, w, idx): top-k on float32 logits, softmax over the k, cast to the hidden dtype.
               Router at `block_sparse_moe.router`.
- phimoe       (logits, w, idx): sparsemixer, always top-2 whatever num_experts_per_tok says; eval mode is
               deterministic (training samples experts with Gumbel noise). Norm is a LayerNorm. Equal weights keep
               the router's selection order (the argmax first).
- switch_transformers  (dispatch_mask (B, S, E) one-hot after expert capacity, max_prob (B, S, 1), logits):
               top-1; a token beyond its expert's capacity (counted per sequence, padding included, in order)
               is dropped: the experts module gets an all-zero mask row for it, so it is recorded as expert -1
               with weight 0. The experts module scales by max_prob, recorded for kept tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_prefetch.registry import Registry
from moe_prefetch.routing.base import MoELayer, RoutingAdapter
from moe_prefetch.routing.recent_families import (
    AfmoeAdapter,
    Cohere2MoeAdapter,
    DbrxAdapter,
    DeepseekV32Adapter,
    Dots1Adapter,
    Ernie45MoeAdapter,
    ExaoneMoeAdapter,
    FlexOlmoAdapter,
    Glm4MoeAdapter,
    Glm4MoeLiteAdapter,
    GraniteMoeSharedAdapter,
    HunyuanV1MoeAdapter,
    Llama4TextAdapter,
    MinimaxAdapter,
    MinimaxM2Adapter,
    SolarOpenAdapter,
)


class MixtralAdapter(RoutingAdapter):
    family = "mixtral"


class Qwen2MoeAdapter(RoutingAdapter):
    family = "qwen2_moe"

    @property
    def shared_experts(self) -> int:
        shared = int(getattr(self.config, "shared_expert_intermediate_size", 0) or 0)
        routed = int(getattr(self.config, "moe_intermediate_size", 0) or 0)
        if shared <= 0:
            return 0
        return max(1, round(shared / routed)) if routed > 0 else 1


class Qwen3MoeAdapter(RoutingAdapter):
    family = "qwen3_moe"


class OlmoeAdapter(RoutingAdapter):
    family = "olmoe"


class DeepseekV2Adapter(RoutingAdapter):
    family = "deepseek_v2"

    @property
    def shared_experts(self) -> int:
        return int(self.config.n_shared_experts or 0)


class DeepseekV3Adapter(RoutingAdapter):
    """DeepSeek-V3: sigmoid scores; choice uses scores + e_score_correction_bias within the top groups; weights are
    the uncorrected scores of the chosen experts, renormalised if norm_topk_prob, times routed_scaling_factor.
    The router's own output already applies all of this, so decoding only orders it (torch.topk is unsorted)."""

    family = "deepseek_v3"

    @property
    def num_experts(self) -> int:
        return int(self.config.n_routed_experts)

    @property
    def shared_experts(self) -> int:
        return int(self.config.n_shared_experts or 0)

    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(router_logits.float())


class GptOssAdapter(RoutingAdapter):
    """With MXFP4 kernels, transformers swaps each `mlp` for `Mxfp4GptOssMLP`, whose forward computes the router
    logits itself (`F.linear` with the router's weight and bias) and hands them to the triton routing kernel (top-k
    on the logits, softmax over the k: the same rule as GptOssTopKRouter), so `router.forward` never runs. There the
    recorded module is the MLP block, whose output (routed_out, router_logits) carries the logits, and the
    dispatched (ids, weights) are recomputed from them by that rule; the look-ahead still runs the block's router."""

    family = "gpt_oss"
    router_attr = "router"

    def moe_layer(self, index, layer, block, router) -> MoELayer:
        moe = super().moe_layer(index, layer, block, router)
        if type(block).__name__ == "Mxfp4GptOssMLP" and not getattr(block.experts, "_is_hooked", False):
            moe.router = block  # the expert-parallel path (`_is_hooked`) still calls the router
        return moe

    def route(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        return self.decode(layer.block.router.forward(hidden.reshape(-1, hidden.shape[-1])))[0]

    def decode(self, router_output):
        if len(router_output) == 2:  # Mxfp4GptOssMLP's (routed_out, router_logits)
            router_logits = router_output[1]
            top, indices = torch.topk(router_logits, self.top_k, dim=-1)
            return super().decode((router_logits, torch.softmax(top, dim=-1, dtype=top.dtype), indices))
        return super().decode(router_output)


class GraniteMoeAdapter(RoutingAdapter):
    family = "granitemoe"
    moe_attr = "block_sparse_moe"
    router_attr = "router"


class PhimoeAdapter(RoutingAdapter):
    family = "phimoe"
    router_attr = "router"

    @property
    def top_k(self) -> int:
        return 2  # sparsemixer hard-codes two rounds of selection; its top_k argument is unused

    def order(self, indices, weights):
        """By weight, equal weights in the router's selection order: sparsemixer picks the argmax first, and its
        two multipliers are often both 1.0, so breaking ties by expert id would put the argmax second half the time."""
        indices = indices.reshape(-1, indices.shape[-1]).long()
        weights = weights.reshape(-1, weights.shape[-1]).float()
        order = torch.argsort(-weights, dim=-1, stable=True)
        return indices.gather(1, order), weights.gather(1, order)


class SwitchTransformersAdapter(RoutingAdapter):
    """Encoder-decoder: MoE layers of both stacks, encoder first, each with its index within its stack. The MoE
    input norm is `layer_norm` of the block's feed-forward layer (the last sub-layer), used for look-ahead."""

    family = "switch_transformers"

    def stacks(self) -> list[tuple[str, nn.Module]]:
        base = self.model
        return [(name, getattr(base, name)) for name in ("encoder", "decoder") if isinstance(getattr(base, name, None), nn.Module)]

    def find_layers(self) -> list[MoELayer]:
        found = []
        for stack, module in self.stacks():
            for index, block in enumerate(module.block):
                ff = block.layer[-1]
                router = getattr(getattr(ff, "mlp", None), "router", None)
                if router is not None and isinstance(getattr(ff.mlp, "experts", None), nn.Module):
                    found.append(MoELayer(index, stack, router, ff.layer_norm))
        return found

    @property
    def num_experts(self) -> int:
        return int(self.layers[0].router.num_experts)

    @property
    def top_k(self) -> int:
        return 1

    def forward_inputs(self, input_ids, attention_mask) -> dict:
        """The decoder reads the same text shifted right behind decoder_start_token_id, so decoder position p has
        consumed tokens < p and routes the prediction of token p; its mask is the encoder's."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if any(stack == "decoder" for stack, _ in self.stacks()):
            inputs.update(decoder_input_ids=self.model._shift_right(input_ids), decoder_attention_mask=attention_mask, use_cache=False)
        return inputs

    def decode(self, router_output):
        dispatch_mask, max_prob, router_logits = router_output
        dispatch_mask = dispatch_mask.reshape(-1, dispatch_mask.shape[-1])
        kept = dispatch_mask.sum(dim=-1, keepdim=True) > 0  # False: dropped by expert capacity, no expert ran
        experts = torch.where(kept, dispatch_mask.argmax(dim=-1, keepdim=True), torch.full_like(kept, -1, dtype=torch.long))
        weights = torch.where(kept, max_prob.reshape(-1, 1).float(), torch.zeros((), dtype=torch.float32, device=kept.device))
        return experts.long(), weights, router_logits.reshape(-1, router_logits.shape[-1])

    def route(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        return self.decode(layer.router.forward(hidden))[0]  # whole sequences: expert capacity is counted per sequence


FAMILIES: Registry[type[RoutingAdapter]] = Registry("model family")  # keyed by config.model_type
for _adapter in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV2Adapter, DeepseekV3Adapter,
                 GptOssAdapter, GraniteMoeAdapter, PhimoeAdapter, SwitchTransformersAdapter,
                 Glm4MoeAdapter, DeepseekV32Adapter, Dots1Adapter, Ernie45MoeAdapter, MinimaxAdapter, MinimaxM2Adapter,
                 HunyuanV1MoeAdapter, GraniteMoeSharedAdapter, FlexOlmoAdapter, Cohere2MoeAdapter, DbrxAdapter,
                 Llama4TextAdapter, Glm4MoeLiteAdapter, ExaoneMoeAdapter, SolarOpenAdapter, AfmoeAdapter):
    FAMILIES.add(_adapter.family, _adapter)
