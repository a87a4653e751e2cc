"""The adapter base class: finding a model's MoE layers and decoding a router's forward output.

Re-exported by `moe_prefetch.routing`; family adapters live in `moe_prefetch.routing.families` and `.hybrid_families`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_prefetch.errors import PipelineError


@dataclass
class MoELayer:
    """One MoE layer of the model."""

    layer_index: int  # true index in its layer stack (dense layers are skipped, so this may differ from the order)
    stack: str  # "decoder", or "encoder" for encoder-decoder models
    router: nn.Module  # the module whose forward output holds the routing decision
    pre_norm: nn.Module | None  # the norm applied to the residual stream before this layer's MoE input


class RoutingAdapter:
    """Base adapter for routers whose forward returns (router_logits, topk_weights, topk_indices), as in
    Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GraniteMoE and PhiMoE in transformers 5.x.

    A decoder layer is an MoE layer when its `moe_attr` block (default `mlp`) holds both a router (`router_attr`)
    and an `experts` module; dense layers (a plain MLP there) are skipped, keeping the true layer index.
    """

    family = "base"
    moe_attr = "mlp"  # name of the MoE block inside a decoder layer
    router_attr = "gate"  # name of the router inside the MoE block
    norm_attr = "post_attention_layernorm"  # the norm whose output is the MoE block's input
    recurrent = False  # token mixers with a recurrent state (Mamba, linear attention): generate mode decodes per sequence
    load_overrides: dict = {}  # config overrides for from_pretrained that drop modules a text collection never runs

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.layers = self.find_layers()
        if not self.layers:
            raise PipelineError(f"model {getattr(self.config, '_name_or_path', '?')!r} ({self.family}) has no MoE layer; nothing to trace")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise PipelineError(f"model {getattr(self.config, '_name_or_path', '?')!r} ({self.family}): top-k is not set in its config (num_experts_per_tok={self.top_k!r})")

    # -- model geometry -------------------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        base = getattr(self.model, "base_model", self.model)  # XForCausalLM.model, or the bare XModel itself
        return base.layers

    def find_layers(self) -> list[MoELayer]:
        found = []
        for index, layer in enumerate(self.decoder_layers()):
            block = getattr(layer, self.moe_attr, None)
            router = getattr(block, self.router_attr, None)
            if router is not None and self.is_router(router) and isinstance(getattr(block, "experts", None), nn.Module):
                found.append(MoELayer(index, "decoder", router, getattr(layer, self.norm_attr, None)))
        return found

    def is_router(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Module) and hasattr(module, "weight")

    def _router_attr(self, name: str):
        return getattr(self.layers[0].router, name, None) if getattr(self, "layers", None) else None

    @property
    def num_experts(self) -> int:
        """Routed experts, as the router sizes its logits (config spellings differ between families)."""
        value = self._router_attr("num_experts")
        return int(value if value is not None else self.config.num_local_experts)

    @property
    def top_k(self) -> int:
        """Experts dispatched per token, as the router uses it."""
        value = self._router_attr("top_k")
        value = value if value is not None else getattr(self.config, "num_experts_per_tok", None)
        return int(value) if value is not None else None

    @property
    def shared_experts(self) -> int:
        return 0

    def causal_lm(self) -> nn.Module:
        """The module whose forward maps input_ids to next-token logits: the model itself, unless a multimodal
        wrapper has no text forward of its own (Qwen3-Omni-MoE: its thinker)."""
        return self.model

    def forward_inputs(self, input_ids, attention_mask) -> dict:
        """Keyword arguments of the model forward that routes these tokens (encoder-decoders add decoder inputs)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

    # -- decoding router outputs ----------------------------------------------------------------------------
    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The router's distribution over experts (softmax unless the family says otherwise)."""
        return torch.softmax(router_logits.float(), dim=-1)

    def decode(self, router_output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(experts (T, k) int64 best-first, weights (T, k) float32, router_logits (T, E)) from a router's output."""
        router_logits, weights, indices = router_output
        return (*best_first(indices, weights), router_logits.reshape(-1, router_logits.shape[-1]))


def best_first(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's (expert, weight) pairs by weight, descending; equal weights keep the lower expert id first."""
    indices = indices.reshape(-1, indices.shape[-1]).long()
    weights = weights.reshape(-1, weights.shape[-1]).float()
    by_id = torch.argsort(indices, dim=-1, stable=True)
    indices, weights = indices.gather(1, by_id), weights.gather(1, by_id)
    order = torch.argsort(-weights, dim=-1, stable=True)
    return indices.gather(1, order), weights.gather(1, order)
