"""`lstm`: a recurrent model over the routing history. The c context layers, oldest first, are a sequence of
per-layer vectors (the layer's k experts + its absolute layer position, moe_prefetch/predictors/layers.LayerTokens);
an LSTM reads them and its last output, joined with the target layer's embedding (several targets share a
context length but not a router), feeds the expert and confidence heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_prefetch.config import check_network, doc
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.layers import Heads, LayerTokens
from moe_prefetch.predictors.neural import NeuralPredictor


@dataclass
class LSTMParams:
    embedding_dim: int = doc("Width of expert embeddings and of each context layer's input vector.", 32)
    hidden_size: int = doc("LSTM hidden state width.", 64)
    layers: int = doc("Stacked LSTM layers.", 1)
    dropout: float = doc("Dropout between stacked LSTM layers and before the heads.", 0.0)

    def validate(self) -> None:
        check_network("train.lstm", self, ("embedding_dim", "hidden_size", "layers"))


class RoutingLSTM(nn.Module):
    def __init__(self, geometry: dict, embedding_dim: int, hidden_size: int, layers: int, dropout: float):
        super().__init__()
        g = geometry
        self.tokens = LayerTokens(g["num_experts"], g["top_k"], g["num_layers"], g["horizon"], embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.target = nn.Embedding(g["num_layers"], hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.heads = Heads(hidden_size, g["num_experts"])

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        target = inputs["target_layer"]  # (B,)
        sequence, _ = self.lstm(self.tokens(inputs["context_experts"], target))  # (B, c, hidden)
        # added, not concatenated: the target picks a direction in the same space, and the norm keeps scales even
        features = self.norm(sequence[:, -1] + self.target(target))  # (B, hidden)
        return self.heads(self.dropout(features))


@register_arch
class LSTMPredictor(NeuralPredictor):
    arch = "lstm"
    config = LSTMParams
    network = RoutingLSTM
