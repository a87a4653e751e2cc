"""The routed MoE families of the installed transformers that `FAMILIES` does not support, each with the reason.

Keyed by family directory (`transformers/models/<family>`, as `discovery.moe_families()` finds them).
tests/test_routing_registry.py fails when a family the discovery finds is neither supported nor listed here, when
a row names a family that is supported or no longer found, and the README's table is generated from this one
(`python scripts/update_readme.py`). "Probe" reasons come from building the family's causal LM with a tiny config
and comparing the base adapter's routing with what its experts module received: such a family may only need a
registered adapter and its tiny-config test.
"""

from __future__ import annotations

NOT_ADAPTED = "not adapted yet"

UNSUPPORTED: dict[str, str] = {
    # routing that the (ids, weights) contract of the recorder cannot state as it is
    "deepseek_v4": "hash-routed layers (`mlp_layer_types: hash_moe`): the router takes the token ids, which the look-ahead "
                   "does not pass; " + NOT_ADAPTED,
    "doge": "product-key embedding experts (`router_gate` scores sqrt(E) x sqrt(E) keys): no experts module receives "
            "(ids, weights) to check against",
    "jetmoe": "experts are `ParallelExperts` fed by a router returning (sorted experts, batch index, gates, sizes, logits), "
              "in the MLP and in the attention (mixture of attention heads): two routings per layer; " + NOT_ADAPTED,
    "longcat_flash": "zero-computation experts (the router may pick identity experts beyond the real ones) and a "
                     "two-sublayer block; " + NOT_ADAPTED,
    "nllb_moe": "encoder-decoder translation model; top-2 router with expert capacity and a `second_expert_policy`; "
                + NOT_ADAPTED,
    "diffusion_gemma": "diffusion language model (no causal LM): routing is per denoising step, not per generated token",
    "openai_privacy_filter": "a token classifier (no causal LM, nothing generates)",
    "gemma4": "the router and experts sit on the decoder layer itself (no MoE block), multimodal wrapper; " + NOT_ADAPTED,
    "nemotron_h": "hybrid Mamba-2: the MoE is a `mixer` of some layers, the recurrent state needs padding-safe generate "
                  "mode; " + NOT_ADAPTED,
    "lfm2_moe": "hybrid short-convolution / attention layers (recurrent conv state in generate mode); " + NOT_ADAPTED,
    "bailing_hybrid": "hybrid linear attention (recurrent state in generate mode); " + NOT_ADAPTED,
    # multimodal wrappers whose text decoder is MoE (image/audio inputs are not collected)
    "aria": "multimodal; text decoder router at `mlp.router` with a shared expert; " + NOT_ADAPTED,
    "deepseek_ocr2": "OCR vision-language model (no causal LM class); " + NOT_ADAPTED,
    "dots3_note": "multimodal with separate text and vision MoE blocks; " + NOT_ADAPTED,
    "ernie4_5_vl_moe": "multimodal with text and vision experts; " + NOT_ADAPTED,
    "glm4v_moe": "multimodal (GLM-4.5V); text decoder under `language_model`; " + NOT_ADAPTED,
    "glm5_next": "multimodal; " + NOT_ADAPTED,
    "inkling": "multimodal; probe: its text model failed (a two-value unpack where three were expected); " + NOT_ADAPTED,
    "inkling2": "multimodal; probe: its text model routes as the base adapter reads; no tiny-config test yet",
    "minimax_m3_vl": "multimodal; probe: its text model routes as the base adapter reads; no tiny-config test yet",
    "mistral4": "image-text model only (no text causal LM entry); " + NOT_ADAPTED,
    "mistral_large4": "image-text model only (no text causal LM entry); " + NOT_ADAPTED,
    "muse_spark": "multimodal (audio, vision) only; " + NOT_ADAPTED,
    "qwen4_exp": "multimodal with a text causal LM and a shared-expert gate; " + NOT_ADAPTED,
    "step3p7": "image-text model only; " + NOT_ADAPTED,
    "unlimited_ocr": "OCR vision-language model only; " + NOT_ADAPTED,
    # text causal LMs: probed or not yet probed
    "beam": "dense/sparse layers by `mlp_layer_types`, `routed_scaling_factor` on the block; " + NOT_ADAPTED,
    "glm_moe_dsa": "DeepSeek sparse attention with dense/sparse layers by `mlp_layer_types`; " + NOT_ADAPTED,
    "granitemoe_swa": "routes as granitemoe (forward mode matches its experts' inputs in float32 and bfloat16), but in "
                      "generate mode its prompt weights differ from a plain forward's by float rounding even with the "
                      "window above the sequence length (batched decode); not yet understood",
    "mimo_v2_flash": "probe: a tiny config from its defaults fails in the forward (a tensor size mismatch); " + NOT_ADAPTED,
    "axk1": "probe: routes as the base adapter reads; no tiny-config test yet",
    "axk2": "probe: routes as the base adapter reads; no tiny-config test yet",
    "flint": "probe: routes as the base adapter reads; no tiny-config test yet",
    "hy_v3": "probe: routes as the base adapter reads; no tiny-config test yet",
    "hy_v4": "probe: routes as the base adapter reads; no tiny-config test yet",
    "kolibri1": "probe: routes as the base adapter reads; no tiny-config test yet",
    "laguna": "probe: routes as the base adapter reads; `routed_scaling_factor` on the block; no tiny-config test yet",
    "mellum": "probe: routes as the base adapter reads; no tiny-config test yet",
    "zaya": NOT_ADAPTED + " (not probed)",
}
