"""Adapters of the MoE families transformers 5.x added after the first ten (registered in `families.FAMILIES`).

Each states only what differs from `RoutingAdapter` (verified against the installed modeling_*.py; the tests
compare every family's recorded routing with what its experts module receives):

- glm4_moe, glm4_moe_lite, deepseek_v32, dots1, exaone_moe  DeepSeek-V3's router (sigmoid, bias-corrected
                 group-limited choice, scaled weights). Dense layers: `first_k_dense_replace` or `mlp_layer_types`.
- solar_open     the same router; no dense layers.
- afmoe          router `mlp.router` (its Linear is `gate`) takes the block's `expert_bias`: sigmoid, choice by
                 score + bias, renormalised weights * route_scale. The MoE input is `pre_mlp_layernorm`'s output.
- ernie4_5_moe   (logits, w, idx): float32 softmax, choice by probability + `moe_statics` bias, renormalised
                 weights cast to the hidden dtype. Dense layers by `moe_layer_start_index` / `moe_layer_interval`.
- minimax        (logits, w, idx): softmax -> top-k -> renormalise. Its residual is the normed hidden state scaled
                 by alpha/beta factors; the MoE input is still `post_attention_layernorm`'s output.
- minimax_m2     the router takes the block's `e_score_correction_bias` as an argument: sigmoid, choice by score +
                 bias, weights = renormalised scores. The look-ahead passes the later block's bias.
- hunyuan_v1_moe router `gate.wg`; top-k (`moe_topk`) may differ per layer: narrower layers pad with expert -1.
- granitemoeshared  granitemoe's router at `block_sparse_moe.router`, plus a shared MLP (not routed, not recorded).
- flex_olmo      post-norm (OLMo-2 style): the MoE block reads the residual stream itself and its output is normed
                 afterwards, so the look-ahead applies no norm.
- cohere2_moe    parallel attention and MoE: both read `input_layernorm`'s output. Top-k on logits, softmax over the
                 k (or sigmoid, renormalised iff norm_topk_prob).
- dbrx           the router (`ffn.router`, a `layer` Linear) returns logits only; `ffn.route_tokens_to_experts`
                 makes (weights, ids): softmax -> top-k -> p-norm normalisation. Layers are `transformer.blocks`.
- llama4_text    router at `feed_forward.router` returns (scores (T, E), logits): sigmoid of the top-k logits, 0
                 elsewhere. The experts module gets every token once per expert, pre-scaled by its score (0 for the
                 unchosen), so the dispatched weights are the non-zero scores. Dense layers: `moe_layers`.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_prefetch.errors import PipelineError
from moe_prefetch.routing.base import MoELayer, RoutingAdapter


class SigmoidGroupRouterAdapter(RoutingAdapter):
    """DeepSeek-V3's router as copied by later families: sigmoid scores, shared experts counted by `n_shared_experts`
    (exaone_moe: `num_shared_experts`); the router's output already carries the dispatched weights (unsorted)."""

    @property
    def shared_experts(self) -> int:
        return int(getattr(self.config, "n_shared_experts", None) or getattr(self.config, "num_shared_experts", 0) or 0)

    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(router_logits.float())


class Glm4MoeAdapter(SigmoidGroupRouterAdapter):
    family = "glm4_moe"


class DeepseekV32Adapter(SigmoidGroupRouterAdapter):
    family = "deepseek_v32"


class Dots1Adapter(SigmoidGroupRouterAdapter):
    family = "dots1"


class Glm4MoeLiteAdapter(SigmoidGroupRouterAdapter):
    family = "glm4_moe_lite"


class ExaoneMoeAdapter(SigmoidGroupRouterAdapter):
    family = "exaone_moe"


class SolarOpenAdapter(SigmoidGroupRouterAdapter):
    family = "solar_open"


class AfmoeAdapter(RoutingAdapter):
    family = "afmoe"
    router_attr = "router"
    norm_attr = "pre_mlp_layernorm"  # dual norms around the MoE block; this one feeds it

    def is_router(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "gate", None), nn.Linear)

    @property
    def num_experts(self) -> int:
        return int(self.config.num_experts)

    @property
    def shared_experts(self) -> int:
        return int(getattr(self.config, "num_shared_experts", 0) or 0)

    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(router_logits.float())

    def route(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        # the router reads a (B, S, D) input and takes the block's `expert_bias` as an argument
        tokens = hidden.reshape(1, -1, hidden.shape[-1])  # (1, T, D)
        return self.decode(layer.router.forward(tokens, layer.block.expert_bias))[0]


class Ernie45MoeAdapter(RoutingAdapter):
    family = "ernie4_5_moe"

    @property
    def shared_experts(self) -> int:
        return int(getattr(self.config, "moe_num_shared_experts", 0) or 0)


class MinimaxAdapter(RoutingAdapter):
    family = "minimax"


class MinimaxM2Adapter(RoutingAdapter):
    family = "minimax_m2"

    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(router_logits.float())

    def route(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        # the bias lives on the block, not on the router; the block passes it at every call
        return self.decode(layer.router.forward(hidden.reshape(-1, hidden.shape[-1]), layer.block.e_score_correction_bias))[0]


class HunyuanV1MoeAdapter(RoutingAdapter):
    family = "hunyuan_v1_moe"

    def is_router(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "wg", None), nn.Linear)

    def moe_layer(self, index, layer, block, router) -> MoELayer:
        moe = super().moe_layer(index, layer, block, router)
        moe.top_k = int(router.top_k)  # moe_topk may be a per-layer list
        return moe

    @property
    def num_experts(self) -> int:
        counts = sorted({int(layer.router.num_experts) for layer in self.layers})
        if len(counts) > 1:  # one E per trace: its router_probs columns and every expert id share it
            raise PipelineError(f"collect.model: {self.family} with per-layer expert counts {counts} is not supported; "
                                "accepted: one num_experts for every MoE layer (moe_topk may vary)")
        return counts[0]

    @property
    def top_k(self) -> int:
        return max(layer.top_k for layer in self.layers)


class GraniteMoeSharedAdapter(RoutingAdapter):
    family = "granitemoeshared"
    moe_attr = "block_sparse_moe"
    router_attr = "router"

    @property
    def shared_experts(self) -> int:
        shared = int(getattr(self.config, "shared_intermediate_size", 0) or 0)
        routed = int(self.config.intermediate_size)
        return max(1, round(shared / routed)) if shared > 0 else 0


class FlexOlmoAdapter(RoutingAdapter):
    family = "flex_olmo"
    norm_attr = None  # post-norm: the MoE block reads the residual stream as it is


class Cohere2MoeAdapter(RoutingAdapter):
    family = "cohere2_moe"
    norm_attr = "input_layernorm"  # attention and MoE run in parallel on the same normed input

    @property
    def shared_experts(self) -> int:
        return int(getattr(self.config, "num_shared_experts", 0) or 0)


class DbrxAdapter(RoutingAdapter):
    family = "dbrx"
    moe_attr = "ffn"
    router_attr = "router"

    def decoder_layers(self) -> nn.ModuleList:
        return getattr(self.model, "transformer", self.model).blocks

    def moe_layer(self, index, layer, block, router) -> MoELayer:
        return MoELayer(index, "decoder", router, layer.norm_attn_norm.norm_2, block=block)

    def is_router(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "layer", None), nn.Linear)

    @property
    def num_experts(self) -> int:
        return int(self.config.ffn_config.moe_num_experts)

    @property
    def top_k(self) -> int:
        return int(self.config.ffn_config.moe_top_k)

    def decode(self, router_output):
        router_logits = router_output.reshape(-1, router_output.shape[-1])
        # every block routes with the same config-wide top-k and normalisation, so any block's function decodes
        weights, indices = self.layers[0].block.route_tokens_to_experts(router_logits)
        return (*self.order(indices, weights), router_logits)


class Llama4TextAdapter(RoutingAdapter):
    family = "llama4_text"
    moe_attr = "feed_forward"
    router_attr = "router"

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers  # Llama4ForCausalLM names its base model `language_model` but holds it in `model`

    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(router_logits.float())

    def decode(self, router_output):
        router_scores, router_logits = router_output  # (T, E) sigmoid of the chosen logits, 0 elsewhere; (T, E)
        indices = torch.topk(router_logits, self.top_k, dim=-1).indices  # the router's own choice
        return (*self.order(indices, router_scores.gather(-1, indices)), router_logits)
