"""Adapters of the hybrid-recurrent and multimodal MoE families of transformers 5.x, registered into FAMILIES.

Every router here returns (router_logits, top-k weights, top-k indices) and its MoE block passes exactly those
weights and indices to the experts module (verified against the installed modeling_*.py), so only the geometry
differs from the base adapter:

- qwen3_next       softmax -> top-k -> renormalise iff norm_topk_prob, cast to the logits dtype; a shared expert
                   gated by sigmoid(shared_expert_gate) as in qwen2_moe (not routed, counted in `shared_experts`).
                   Token mixers alternate Gated DeltaNet (recurrent) and full attention.
- qwen3_5_moe      as qwen3_next, always renormalised, every layer sparse. The checkpoint is multimodal
                   (Qwen3_5MoeForConditionalGeneration, text decoder under `model.language_model`);
                   qwen3_5_moe_text is its text-only Qwen3_5MoeForCausalLM.
- qwen3_vl_moe     softmax -> top-k -> renormalise, no shared expert, plain attention; text decoder under
                   `model.language_model` of Qwen3VLMoeForConditionalGeneration.
- qwen3_omni_moe   the thinker's text decoder (`thinker.model.language_model`), routed as qwen3_vl_moe (renormalised
                   iff norm_topk_prob). The wrapper has no forward of its own: text runs through `thinker`. The
                   talker (speech generation) has MoE layers too; it is not recorded (collect runs text only).
                   qwen3_omni_moe_thinker is the thinker loaded on its own.
- llama4           Llama4ForConditionalGeneration: the llama4_text decoder (sigmoid of the top-k logits, experts fed
                   pre-scaled tokens) under `language_model.model`. collect's load_model builds a llama4 checkpoint
                   as the text-only Llama4ForCausalLM (llama4_text); this adapter reads the multimodal model itself.
- jamba            softmax -> top-k, not renormalised, cast to the hidden dtype; router at
                   `feed_forward.router` behind `pre_ff_layernorm`; Mamba and attention mixers; dense layers
                   (expert_layer_period / offset) are skipped.
- granitemoehybrid as granitemoe (top-k on float32 logits, softmax over the k), Mamba-2 and attention mixers;
                   a dense `shared_mlp` of width shared_intermediate_size runs next to the routed experts.
- kimi_linear      DeepSeek-V3 routing (sigmoid scores, e_score_correction_bias within the top groups, weights
                   renormalised iff norm_topk_prob, times routed_scaling_factor, float32); Kimi Delta Attention
                   (recurrent, a PyTorch fallback when the `fla` kernels are absent) and MLA layers; dense layers
                   from `mlp_layer_types`; n_shared_experts shared experts.

The recurrent families set `recurrent = True`: generate mode decodes them one sequence at a time, because a
right-padded prompt's pad steps would run through the recurrent state that the decoded tokens continue from.
"""

from __future__ import annotations

from torch import nn

from moe_prefetch.routing.base import RoutingAdapter
from moe_prefetch.routing.families import (
    FAMILIES,
    DeepseekV3Adapter,
    GraniteMoeAdapter,
    Qwen2MoeAdapter,
)
from moe_prefetch.routing.recent_families import Llama4TextAdapter


class Qwen3NextAdapter(Qwen2MoeAdapter):
    family = "qwen3_next"
    recurrent = True


class MultimodalTextDecoder(RoutingAdapter):
    """A family whose checkpoint wraps the text decoder in a multimodal model: the decoder layers are those of its
    `language_model`, and the geometry comes from the text config. A text-only model of the family (no
    `language_model`) is read as usual."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        config = self.causal_lm().config
        self.config = getattr(config, "text_config", None) or config  # hidden_size and expert widths live there

    def decoder_layers(self) -> nn.ModuleList:
        causal_lm = self.causal_lm()
        base = getattr(causal_lm, "base_model", causal_lm)
        return getattr(base, "language_model", base).layers


class Qwen3_5MoeAdapter(MultimodalTextDecoder, Qwen3NextAdapter):
    family = "qwen3_5_moe"


class Qwen3_5MoeTextAdapter(Qwen3_5MoeAdapter):
    family = "qwen3_5_moe_text"


class Qwen3VLMoeAdapter(MultimodalTextDecoder):
    family = "qwen3_vl_moe"


class Qwen3OmniMoeAdapter(MultimodalTextDecoder):
    family = "qwen3_omni_moe"
    load_overrides = {"enable_audio_output": False}  # no talker / code2wav: text in, text out (their weights are skipped)

    def causal_lm(self) -> nn.Module:
        return getattr(self.model, "thinker", self.model)  # the wrapper itself has no forward; its thinker reads text


class Llama4Adapter(MultimodalTextDecoder, Llama4TextAdapter):
    family = "llama4"

    def decoder_layers(self) -> nn.ModuleList:
        # the wrapper's `language_model` is a whole Llama4ForCausalLM (head included), whose layers sit under `model`
        return self.model.language_model.model.layers


class Qwen3OmniMoeThinkerAdapter(Qwen3OmniMoeAdapter):
    """A thinker loaded on its own (Qwen3OmniMoeThinkerForConditionalGeneration, AutoModelForImageTextToText)."""

    family = "qwen3_omni_moe_thinker"


class JambaAdapter(RoutingAdapter):
    family = "jamba"
    recurrent = True
    moe_attr = "feed_forward"
    router_attr = "router"
    norm_attr = "pre_ff_layernorm"


class GraniteMoeHybridAdapter(GraniteMoeAdapter):
    family = "granitemoehybrid"
    recurrent = True

    @property
    def shared_experts(self) -> int:
        """The dense shared_mlp in routed-expert widths: shared_intermediate_size / intermediate_size."""
        shared = int(getattr(self.config, "shared_intermediate_size", 0) or 0)
        routed = int(self.config.intermediate_size)
        return max(1, round(shared / routed)) if shared > 0 else 0


class KimiLinearAdapter(DeepseekV3Adapter):
    family = "kimi_linear"
    recurrent = True
    num_experts = RoutingAdapter.num_experts  # the router's own count (config: num_local_experts, not n_routed_experts)


HYBRID_ADAPTERS = (Qwen3NextAdapter, Qwen3_5MoeAdapter, Qwen3_5MoeTextAdapter, Qwen3VLMoeAdapter, Qwen3OmniMoeAdapter,
                   Qwen3OmniMoeThinkerAdapter, Llama4Adapter, JambaAdapter, GraniteMoeHybridAdapter, KimiLinearAdapter)
for _adapter in HYBRID_ADAPTERS:
    FAMILIES.add(_adapter.family, _adapter)
