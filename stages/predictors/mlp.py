"""`mlp`: every context expert slot and the target layer embedded, concatenated, through an MLP to expert logits
and a confidence logit. The simplest learned baseline: no notion of layer order beyond slot position.

Parameter counts at E=16, k=2, c=3, 8 MoE layers (the prior research's variants, chosen through train.mlp):
  tiny         embedding_dim 16, hidden [128]                    17,057 parameters
  small        embedding_dim 32, hidden [128, 64]   (default)    38,961 parameters
  regularised  embedding_dim 48, hidden [384, 192], dropout 0.3  207,809 parameters
"""

from __future__ import annotations

import torch
from torch import nn

from stages.predictors.layers import FlatContext, Heads, mlp_stack
from stages.predictors.neural import NeuralPredictor


class ContextMLP(nn.Module):
    """FlatContext -> MLP trunk -> features (B, width); the trunk `mlp` and `layer_specific` share."""

    def __init__(self, geometry: dict, embedding_dim: int, hidden: list[int], dropout: float):
        super().__init__()
        g = geometry
        self.context = FlatContext(g["num_experts"], g["num_layers"], embedding_dim)
        width = FlatContext.width(g["context_length"], g["top_k"], embedding_dim)
        self.trunk, self.width = mlp_stack(width, hidden, dropout)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.trunk(self.context(inputs["context_experts"], inputs["target_layer"]))  # (B, width)


class MLP(nn.Module):
    def __init__(self, geometry: dict, embedding_dim: int, hidden: list[int], dropout: float):
        super().__init__()
        self.body = ContextMLP(geometry, embedding_dim, hidden, dropout)
        self.heads = Heads(self.body.width, geometry["num_experts"])

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.body(inputs))  # (B, E), (B,)


class MLPPredictor(NeuralPredictor):
    arch = "mlp"

    def build_module(self) -> nn.Module:
        s = self.section
        return MLP(self.geometry, s["embedding_dim"], s["hidden"], s["dropout"])
