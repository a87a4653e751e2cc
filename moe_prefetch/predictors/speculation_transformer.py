"""`speculation_transformer`: the inter-layer speculation model of the prior research, cleanly.

Each context layer becomes one token (layers.LayerTokens): its k best-first expert embeddings concatenated and
projected to d_model, plus an embedding of that layer's position in the model. A query token carries the target
layer. A pre-norm
transformer encoder mixes them; the query token's output gives expert logits and a confidence logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_prefetch.config import doc, positive
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.layers import LayerTokens
from moe_prefetch.predictors.neural import NeuralPredictor


@dataclass
class SpeculationTransformerParams:
    d_model: int = doc("Width of the expert and layer-position embeddings, the tokens and the encoder.", 96)
    heads: int = doc("Attention heads.", 4)
    ff: int = doc("Feed-forward width.", 192)
    layers: int = doc("Transformer encoder layers.", 2)
    dropout: float = doc("Dropout.", 0.1)

    def validate(self) -> None:
        positive("train.speculation_transformer", self, "d_model", "heads", "ff", "layers")
        if self.d_model % self.heads:
            raise PipelineError(f"train.speculation_transformer.d_model: {self.d_model} is not divisible by heads ({self.heads})")


class SpeculationTransformer(nn.Module):
    def __init__(self, num_experts: int, top_k: int, num_layers: int, horizon: int, d_model: int, heads: int, ff: int,
                 layers: int, dropout: float):
        super().__init__()
        self.tokens = LayerTokens(num_experts, top_k, num_layers, horizon, d_model)  # one token per context layer
        self.query_embedding = nn.Embedding(num_layers, d_model)  # which layer to predict
        block = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.expert_head = nn.Linear(d_model, num_experts)
        self.confidence_head = nn.Linear(d_model, 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        target = inputs["target_layer"]  # (B,)
        tokens = self.tokens(inputs["context_experts"], target)  # (B, c, d)
        query = self.query_embedding(target)[:, None, :]  # (B, 1, d)
        hidden = self.encoder(torch.cat([tokens, query], dim=1))  # (B, c+1, d)
        out = self.norm(hidden[:, -1])  # (B, d)
        return self.expert_head(out), self.confidence_head(out).squeeze(-1)


@register_arch
class SpeculationTransformerPredictor(NeuralPredictor):
    arch = "speculation_transformer"
    config = SpeculationTransformerParams

    def build_module(self) -> nn.Module:
        g, s = self.geometry, self.section
        return SpeculationTransformer(
            g["num_experts"], g["top_k"], g["num_layers"], g["horizon"], s["d_model"], s["heads"], s["ff"], s["layers"],
            s["dropout"],
        )
