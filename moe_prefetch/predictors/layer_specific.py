"""`layer_specific`: the mlp's shared trunk (context experts + target layer -> features) with a separate output
head per target layer, so each layer's router gets its own expert map while the feature extractor is shared.
Heads are one (L, width, E+1) tensor: all layers' logits are computed and the target layer's are picked, which
is cheaper than gathering a weight matrix per window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_prefetch.config import doc
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.mlp import ContextMLP, MLPParams, context_columns
from moe_prefetch.predictors.neural import NeuralPredictor


@dataclass
class LayerSpecificParams(MLPParams):
    prefix = "train.layer_specific"
    embedding_dim: int = doc("Width of each context expert's and the target layer's embedding.", 32)
    hidden: list = doc("Hidden layer widths of the shared trunk (GELU).", factory=lambda: [128])


class LayerSpecific(nn.Module):
    def __init__(self, geometry: dict, embedding_dim: int, hidden: list[int], dropout: float, context_encoding: str = "slots"):
        super().__init__()
        self.body = ContextMLP(geometry, embedding_dim, hidden, dropout, context_encoding)
        L, E, width = geometry["num_layers"], geometry["num_experts"], self.body.width
        bound = 1 / math.sqrt(width)  # nn.Linear's default initialisation, per head
        self.head_weight = nn.Parameter(torch.empty(L, width, E + 1).uniform_(-bound, bound))  # +1: confidence
        self.head_bias = nn.Parameter(torch.empty(L, E + 1).uniform_(-bound, bound))

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(inputs)  # (B, width)
        target = inputs["target_layer"]  # (B,)
        every = torch.einsum("bw,lwe->ble", features, self.head_weight) + self.head_bias  # (B, L, E+1)
        out = every[torch.arange(len(target), device=target.device), target]  # (B, E+1)
        return out[:, :-1], out[:, -1]


@register_arch
class LayerSpecificPredictor(NeuralPredictor):
    arch = "layer_specific"
    config = LayerSpecificParams
    network = LayerSpecific

    @property
    def requires(self) -> tuple[str, ...]:
        return context_columns(self.section)
