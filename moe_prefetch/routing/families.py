"""Adapters of the MoE families of transformers 5.x, registered by `config.model_type` in FAMILIES.

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
- gpt_oss      (logits, w, idx): top-k on logits (with bias), softmax over the k. On a 3-D input (the recorder's
               look-ahead passes (B, S, D)) the router's softmax runs over dim 1 = the sequence, so there the
               weights are recomputed over the k; the model itself always routes a flattened (T, D) input.
- granitemoe   (logits, w, idx): top-k on float32 logits, softmax over the k, cast to the hidden dtype.
               Router at `block_sparse_moe.router`.
- phimoe       (logits, w, idx): sparsemixer, always top-2 whatever num_experts_per_tok says; eval mode is
               deterministic (training samples experts with Gumbel noise). Norm is a LayerNorm.
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
    family = "gpt_oss"
    router_attr = "router"

    def decode(self, router_output):
        router_logits, weights, indices = router_output
        if indices.dim() != 2:  # GptOssTopKRouter softmaxes over dim 1, which is the k only for a (T, D) input
            top = router_logits.gather(-1, indices)
            weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        return super().decode((router_logits, weights, indices))


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


FAMILIES: Registry[type[RoutingAdapter]] = Registry("model family")  # keyed by config.model_type
for _adapter in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV2Adapter, DeepseekV3Adapter,
                 GptOssAdapter, GraniteMoeAdapter, PhimoeAdapter, SwitchTransformersAdapter):
    FAMILIES.add(_adapter.family, _adapter)
