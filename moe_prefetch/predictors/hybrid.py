"""`hybrid`: the prior research's Qwen "hybrid" predictor. One trunk (context experts, target layer, optionally
the previous tokens' routing) with two heads:
  current   multi-label prediction of the target layer's routed set: an independent sigmoid per expert;
  temporal  the same layer's experts of the next 1..temporal_tokens tokens (multi-label each), the experts a
            decoder will need at this layer in the coming steps. Needs windows.token_horizon >= temporal_tokens.
Labels are graded, not 0/1: each routed expert's gate weight divided by the largest (the highest-weight expert
is 1), so the sigmoids keep the routed set's order and top-1 means the highest-weight expert, as evaluated.

`score()` returns the current head only (what evaluation ranks; softmax of its logits ranks as the sigmoid
does). The temporal head's top-1 accuracy on val (its highest logit vs each next token's highest-weight expert)
is reported through `log` at the end of fit; `temporal_scores()` exposes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_prefetch.config import doc
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.layers import FlatContext, Heads, expert_embedding, mlp_stack
from moe_prefetch.predictors.mlp import MLPParams, context_columns, transitions_of, with_transitions
from moe_prefetch.predictors.neural import (
    NeuralPredictor,
    expert_ids,
    gate_distribution,
)
from moe_prefetch.windows.data import WindowSet

# train.hybrid.<key> > 0 reads these window columns, which windows.<param> >= that value makes
TOKEN_INPUTS = {
    "temporal_tokens": ("token_horizon", ("next_token_experts", "next_token_weights")),
    "token_context": ("token_context", ("token_context_experts",)),
}


def graded_labels(distribution: torch.Tensor) -> torch.Tensor:
    """(..., E) gate-weight distributions -> labels with the highest-weight expert at 1 (all 0 where none)."""
    return distribution / distribution.amax(dim=-1, keepdim=True).clamp(min=1e-12)


def multi_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE summed over experts: (..., E) -> (...)."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(dim=-1)


@dataclass
class HybridParams(MLPParams):
    prefix = "train.hybrid"
    embedding_dim: int = doc("Width of expert embeddings (context, previous tokens) and of the target layer's.", 32)
    hidden: list = doc("Hidden layer widths of the shared trunk (GELU).", factory=lambda: [128, 64])
    temporal_tokens: int = doc(
        "The temporal head predicts the target layer's experts of the next 1..this tokens (needs windows.token_horizon "
        ">= this; the prior research used 4); 0 = no temporal head.", 0)
    token_context: int = doc("Previous tokens whose routing the model reads (needs windows.token_context >= this).", 0)
    temporal_weight: float = doc("Weight of the temporal head's loss next to the current token's.", 0.5)

    def validate(self) -> None:
        super().validate()
        for name in ("temporal_tokens", "token_context", "temporal_weight"):
            if getattr(self, name) < 0:
                raise PipelineError(f"train.hybrid.{name}: must be >= 0, got {getattr(self, name)}")


class Hybrid(nn.Module):
    def __init__(self, geometry: dict, embedding_dim: int, hidden: list[int], dropout: float, temporal_tokens: int,
                 token_context: int, context_encoding: str = "slots", transitions: bool = False):
        super().__init__()
        g, d = geometry, embedding_dim
        self.num_experts, self.temporal_tokens = g["num_experts"], temporal_tokens
        self.context = FlatContext(g["num_experts"], g["num_layers"], d, context_encoding, g["context_length"])
        # the previous tokens' slots share the context's slot embedding; a weighted_set context has none, so its own
        self.token_table = expert_embedding(g["num_experts"], d) if token_context and context_encoding == "weighted_set" else None
        width = FlatContext.width(g["context_length"], g["top_k"], d, context_encoding)
        width += token_context * (g["context_length"] + 1) * g["top_k"] * d  # previous tokens share the embedding
        self.trunk, out = mlp_stack(width, hidden, dropout)
        self.heads = Heads(out, g["num_experts"])
        self.temporal = nn.Linear(out, temporal_tokens * g["num_experts"]) if temporal_tokens else None
        self.transitions = transitions_of(g, transitions)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        parts = [self.context(inputs["context_experts"], inputs["target_layer"], inputs.get("context_weights"))]  # (B, width)
        if "token_context" in inputs:
            table = self.context.experts if self.token_table is None else self.token_table
            parts.append(table(inputs["token_context"]).flatten(1))  # (B, T*(c+1)*k*d)
        features = self.trunk(torch.cat(parts, dim=1))  # (B, width)
        logits, confidence = with_transitions(self.transitions, self.heads(features), inputs)
        if self.temporal is None:
            return logits, confidence
        return logits, confidence, self.temporal(features).view(len(features), self.temporal_tokens, self.num_experts)


@register_arch
class HybridPredictor(NeuralPredictor):
    arch = "hybrid"
    config = HybridParams

    @property
    def requires(self) -> tuple[str, ...]:
        extra = [column for key, (_, columns) in TOKEN_INPUTS.items() if self.section[key] for column in columns]
        return (*context_columns(self.section), *extra)

    def data_geometry(self, train: WindowSet) -> dict:
        for key, (window_key, columns) in TOKEN_INPUTS.items():
            column = getattr(train, columns[0])
            carried = 0 if column is None else column.shape[1]  # tokens: (N, T or H, ...)
            if self.section[key] > carried:
                raise PipelineError(f"train.hybrid.{key}: {self.section[key]} needs windows.{window_key} >= "
                                    f"{self.section[key]}; the windows carry {carried}")
        return {}

    def build_module(self) -> nn.Module:
        s = self.section
        return Hybrid(self.geometry, s["embedding_dim"], s["hidden"], s["dropout"], s["temporal_tokens"], s["token_context"],
                      s["context_encoding"], s["transitions"])

    def batch(self, windows: WindowSet, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = super().batch(windows, rows, device)
        T, H = self.section["token_context"], self.section["temporal_tokens"]
        if T:  # the T most recent of the carried previous tokens
            inputs["token_context"] = expert_ids(windows.token_context_experts[rows, -T:], self.num_experts, device)  # (B, T, c+1, k)
        if H and windows.next_token_experts is not None:  # temporal targets: used by the loss only
            upcoming = windows.next_token_experts[rows, :H]  # (B, H, k)
            dist = gate_distribution(upcoming.reshape(-1, upcoming.shape[2]), windows.next_token_weights[rows, :H].reshape(
                -1, upcoming.shape[2]), self.num_experts).reshape(len(rows), H, self.num_experts)  # (B, H, E)
            inputs["next_token_labels"] = graded_labels(torch.from_numpy(dist)).to(device)
        return inputs

    def target_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multi_label_loss(logits, graded_labels(target)).mean()

    def auxiliary_loss(self, outputs: tuple, inputs: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if len(outputs) < 3:
            return 0.0
        labels = inputs["next_token_labels"]  # (B, H, E)
        exists = (labels.amax(dim=-1) > 0).float()  # (B, H): no next token past the sequence end
        loss = multi_label_loss(outputs[2].float(), labels)  # (B, H)
        return self.section["temporal_weight"] * (loss * exists).sum() / exists.sum().clamp(min=1.0)

    def fit(self, train: WindowSet, val: WindowSet, log: Callable[[dict], None]) -> None:
        super().fit(train, val, log)
        if self.section["temporal_tokens"]:
            log(self.temporal_accuracy(val))

    @torch.no_grad()
    def temporal_scores(self, windows: WindowSet) -> np.ndarray:
        """(N, H, E) sigmoid probabilities of the next H tokens' experts at the target layer."""
        if not self.section["temporal_tokens"]:
            raise PipelineError("train.hybrid.temporal_tokens: 0, so this hybrid has no temporal head to score")
        self.module.eval()
        return torch.sigmoid(self.module(self.batch(windows, np.arange(len(windows)), torch.device("cpu")))[2]).numpy()

    def temporal_accuracy(self, windows: WindowSet) -> dict[str, float]:
        """Top-1 of the temporal head per look-ahead token (where that token exists), and over all of them."""
        predicted = self.temporal_scores(windows).argmax(axis=2)  # (N, H)
        truth = windows.next_token_experts[:, : predicted.shape[1], 0]  # (N, H) highest-weight expert, -1 = none
        hits, valid = predicted == truth, truth >= 0
        row = {"temporal_top1": float(hits[valid].mean()) if valid.any() else float("nan")}
        for j in range(predicted.shape[1]):
            row[f"temporal_top1_next{j + 1}"] = float(hits[valid[:, j], j].mean()) if valid[:, j].any() else float("nan")
        return row
