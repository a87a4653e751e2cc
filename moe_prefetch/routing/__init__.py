"""How routing is read out of each Hugging Face MoE family.

An adapter finds the MoE layers of a loaded model (true layer index, router module, the norm in front of it)
and turns a router's forward output into what the experts module receives: the top-k expert ids and their
weights, best-first. The base class is in `base.py`; the family adapters, registered by `config.model_type` in
FAMILIES, are in `families.py` and (hybrid-recurrent and multimodal families) `hybrid_families.py`; their docstrings
list how each family's dispatched weights are obtained.
"""

from __future__ import annotations

from torch import nn

from moe_prefetch.errors import PipelineError
from moe_prefetch.routing.base import MoELayer, RoutingAdapter, best_first
from moe_prefetch.routing.families import (
    FAMILIES,
    DeepseekV2Adapter,
    DeepseekV3Adapter,
    GptOssAdapter,
    GraniteMoeAdapter,
    MixtralAdapter,
    OlmoeAdapter,
    PhimoeAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
    SwitchTransformersAdapter,
)
from moe_prefetch.routing import hybrid_families  # noqa: F401  (registers the hybrid-recurrent and multimodal families in FAMILIES)

__all__ = [
    "FAMILIES",
    "DeepseekV2Adapter",
    "DeepseekV3Adapter",
    "GptOssAdapter",
    "GraniteMoeAdapter",
    "MixtralAdapter",
    "MoELayer",
    "OlmoeAdapter",
    "PhimoeAdapter",
    "Qwen2MoeAdapter",
    "Qwen3MoeAdapter",
    "RoutingAdapter",
    "SwitchTransformersAdapter",
    "adapter_for",
    "best_first",
]


def adapter_for(model: nn.Module) -> RoutingAdapter:
    """The adapter of a loaded model's family, or a one-line error listing the supported families."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise PipelineError(f"model family {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type](model)
