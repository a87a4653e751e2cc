"""`multiscale`: the last s context layers, for each s in train.multiscale.scales (e.g. 1, 2, c), encoded
separately and fused by learned per-window weights. Short scales give a sharp recent signal, long ones more
history; the gate chooses per window.

The prior research's version diverged to NaN. What keeps this one finite: each scale's encoding is
LayerNorm-ed (equal scale whatever its input width), the fusion weights are a softmax of tanh-bounded gate
logits (a convex combination: the fused vector cannot exceed the largest encoding), the fused vector is
normalised again before the heads, and the shared loop clips gradients and stops on a non-finite loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_prefetch.config import check_network, doc
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.layers import Heads, LayerTokens
from moe_prefetch.predictors.neural import NeuralPredictor

GATE_BOUND = 5.0  # |gate logit| <= 5: no scale's weight falls below e^-10 of another's, none saturates


@dataclass
class MultiscaleParams:
    embedding_dim: int = doc("Width of expert embeddings and of each context layer's vector.", 32)
    scales: list = doc("Context lengths encoded separately (the last s context layers); each <= windows.context_length.",
                        factory=lambda: [1, 2, 3])
    width: int = doc("Width of each scale's encoding and of the fused vector.", 64)
    dropout: float = doc("Dropout before the heads.", 0.0)

    def validate(self) -> None:
        check_network("train.multiscale", self, ("embedding_dim", "width"), ("scales",))


class Multiscale(nn.Module):
    def __init__(self, geometry: dict, embedding_dim: int, scales: list[int], width: int, dropout: float):
        super().__init__()
        g, d = geometry, embedding_dim
        self.scales = list(scales)
        self.tokens = LayerTokens(g["num_experts"], g["top_k"], g["num_layers"], g["horizon"], d)
        self.target = nn.Embedding(g["num_layers"], d)
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(s * d + d, width), nn.LayerNorm(width), nn.GELU()) for s in self.scales
        )
        self.gate = nn.Linear(len(self.scales) * width, len(self.scales))
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.heads = Heads(width, g["num_experts"])

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(inputs["context_experts"], inputs["target_layer"])  # (B, c, d)
        target = self.target(inputs["target_layer"])  # (B, d)
        encoded = torch.stack([
            encoder(torch.cat([tokens[:, -s:].flatten(1), target], dim=1))  # (B, width)
            for s, encoder in zip(self.scales, self.encoders)
        ], dim=1)  # (B, S, width)
        gate = GATE_BOUND * torch.tanh(self.gate(encoded.flatten(1)) / GATE_BOUND)  # (B, S), bounded logits
        fused = (torch.softmax(gate, dim=-1)[:, :, None] * encoded).sum(dim=1)  # (B, width), convex mix
        return self.heads(self.dropout(self.norm(fused)))


@register_arch
class MultiscalePredictor(NeuralPredictor):
    arch = "multiscale"
    config = MultiscaleParams
    network = Multiscale

    def build_module(self) -> nn.Module:
        s, c = self.section, self.geometry["context_length"]
        if max(s["scales"]) > c:
            raise PipelineError(f"train.multiscale.scales: {s['scales']} has a scale longer than windows.context_length ({c})")
        return super().build_module()
