"""`mlp`: every context expert slot and the target layer embedded, concatenated, through an MLP to expert logits
and a confidence logit. The simplest learned baseline: no notion of layer order beyond slot position.

Parameter counts at E=16, k=2, c=3, 8 MoE layers (the prior research's variants, chosen through train.mlp):
  tiny         embedding_dim 16, hidden [128]                    17,057 parameters
  small        embedding_dim 32, hidden [128, 64]                38,961 parameters
  regularised  embedding_dim 48, hidden [384, 192], dropout 0.3  207,809 parameters
  wide         embedding_dim 64, hidden [512, 256]   (default)   367K parameters
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moe_prefetch.config import check_network, doc
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.layers import CONTEXT_ENCODINGS, ExpertTransitions, FlatContext, Heads, mlp_stack
from moe_prefetch.predictors.neural import NeuralPredictor


@dataclass
class MLPParams:
    prefix = "train.mlp"  # not a field (no annotation): the key errors name; subclasses reuse the checks
    embedding_dim: int = doc("Width of each context expert's and the target layer's embedding.", 64)
    hidden: list = doc(
        "Hidden layer widths (GELU). At E=16, k=2, c=3: the default 64, [512, 256] has ~367K parameters; the prior "
        "research's tiny ~17K = embedding_dim 16, hidden [128]; small ~39K = 32, [128, 64]; regularised ~208K = 48, "
        "[384, 192] with dropout 0.3.", factory=lambda: [512, 256])
    dropout: float = doc("Dropout after each hidden layer.", 0.0)
    context_encoding: Literal[CONTEXT_ENCODINGS] = doc(
        "How each context layer's routed set is embedded: slots (each best-first slot its own position), "
        "weighted_set (the gate-weighted sum of the layer's expert embeddings: order-invariant, needs "
        "windows.context_weights) or both (predictors/layers.py FlatContext).", "slots")
    transitions: bool = doc(
        "Add a learned first-order transition table to the logits: per (target layer, context layer, routed expert) "
        "a row of expert logits, summed over the context (predictors/layers.py ExpertTransitions).", False)
    transitions_lr_scale: float = doc(
        "The transition table's learning rate over train.lr: each of its rows is updated only by the windows whose "
        "context routes that expert, far fewer than the network's shared weights see.", 15.0)

    def validate(self) -> None:
        check_network(self.prefix, self, ("embedding_dim",), ("hidden",))


class ContextMLP(nn.Module):
    """FlatContext -> MLP trunk -> features (B, width); the trunk `mlp` and `layer_specific` share."""

    def __init__(self, geometry: dict, embedding_dim: int, hidden: list[int], dropout: float, context_encoding: str = "slots"):
        super().__init__()
        g = geometry
        self.context = FlatContext(g["num_experts"], g["num_layers"], embedding_dim, context_encoding, g["context_length"])
        width = FlatContext.width(g["context_length"], g["top_k"], embedding_dim, context_encoding)
        self.trunk, self.width = mlp_stack(width, hidden, dropout)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        context = self.context(inputs["context_experts"], inputs["target_layer"], inputs.get("context_weights"))
        return self.trunk(context)  # (B, width)


def context_columns(section: dict) -> tuple[str, ...]:
    """The window columns a context encoding reads (Predictor.requires of the mlp family)."""
    weighted = section.get("context_encoding", "slots") != "slots"
    return ("context_experts", "context_weights") if weighted else ("context_experts",)


def transitions_of(geometry: dict, enabled: bool) -> ExpertTransitions | None:
    """The transition table of train.<arch>.transitions (None when off)."""
    g = geometry
    return ExpertTransitions(g["num_experts"], g["num_layers"], g["context_length"], g["top_k"]) if enabled else None


def with_transitions(table: ExpertTransitions | None, heads_out: tuple, inputs: dict[str, torch.Tensor]) -> tuple:
    """(logits + the table's logits, confidence) when there is a table, else heads_out unchanged."""
    if table is None:
        return heads_out
    logits, confidence = heads_out
    return logits + table(inputs["context_experts"], inputs["target_layer"]), confidence


class MLP(nn.Module):
    def __init__(self, geometry: dict, embedding_dim: int, hidden: list[int], dropout: float, context_encoding: str = "slots",
                 transitions: bool = False):
        super().__init__()
        self.body = ContextMLP(geometry, embedding_dim, hidden, dropout, context_encoding)
        self.heads = Heads(self.body.width, geometry["num_experts"])
        self.transitions = transitions_of(geometry, transitions)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return with_transitions(self.transitions, self.heads(self.body(inputs)), inputs)  # (B, E), (B,)


@register_arch
class MLPPredictor(NeuralPredictor):
    arch = "mlp"
    config = MLPParams
    network = MLP

    @property
    def requires(self) -> tuple[str, ...]:
        return context_columns(self.section)
