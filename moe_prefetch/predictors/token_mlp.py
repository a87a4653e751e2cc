"""`token_mlp`: the `mlp` with the token's identity. Token i's tokenizer id is embedded next to every context expert
slot and the target layer, then the MLP maps them to expert logits and a confidence logit. The token id is what
an engine knows before any layer has routed, and it is the strongest single signal: a table keyed on it alone
(`token` baseline) is as good as today's routing-only predictors. Needs windows with `token_id`
(`windows.token_ids: true`, the default).

The vocabulary is the ids seen in train (0..max). An id above it, or -1 (none), maps to one shared "unknown" row,
so a model never indexes past its table at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from moe_prefetch.config import doc
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.layers import CONTEXT_ENCODINGS, FlatContext, Heads, mlp_stack
from moe_prefetch.predictors.mlp import MLPParams, context_columns, transitions_of, with_transitions
from moe_prefetch.predictors.neural import NeuralPredictor
from moe_prefetch.windows.data import WindowSet


@dataclass
class TokenMLPParams(MLPParams):
    prefix = "train.token_mlp"
    token_embedding_dim: int = doc("Width of the token id's embedding.", 64)
    context_encoding: Literal[CONTEXT_ENCODINGS] = doc(
        "How each context layer's routed set is embedded (see train.mlp.context_encoding). weighted_set by default "
        "since stop 23: on the default data it beats slots at h = 1..4 and on the 64x6 geometry with half the "
        "parameters (README: windows.context_weights); needs windows.context_weights: true.", "weighted_set")
    hidden: list = doc("Hidden layer widths (GELU).", factory=lambda: [512, 256])
    transitions: bool = doc(
        "Add the learned first-order transition table to the logits (predictors/layers.py ExpertTransitions). On by "
        "default: with it the default predictor reaches the known optimum of 64-expert top-6 synthetic routing "
        "(benchmarks/bench_known_optimum.py), at a cost within the intervals on the 16-expert default data.", True)

    def validate(self) -> None:
        super().validate()
        if self.token_embedding_dim < 1:
            raise PipelineError(f"{self.prefix}.token_embedding_dim: must be >= 1, got {self.token_embedding_dim}")


class TokenMLP(nn.Module):
    def __init__(self, geometry: dict, embedding_dim: int, hidden: list[int], dropout: float, token_embedding_dim: int,
                 context_encoding: str = "slots", transitions: bool = False):
        super().__init__()
        g = geometry
        self.context = FlatContext(g["num_experts"], g["num_layers"], embedding_dim, context_encoding, g["context_length"])
        self.token = nn.Embedding(g["vocab_size"] + 1, token_embedding_dim)  # row vocab_size: unknown / none
        width = FlatContext.width(g["context_length"], g["top_k"], embedding_dim, context_encoding) + token_embedding_dim
        self.trunk, trunk_width = mlp_stack(width, hidden, dropout)
        self.heads = Heads(trunk_width, g["num_experts"])
        self.transitions = transitions_of(g, transitions)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.context(inputs["context_experts"], inputs["target_layer"], inputs.get("context_weights"))  # (B, width)
        token = self.token(inputs["token_id"])  # (B, token_embedding_dim)
        return with_transitions(self.transitions, self.heads(self.trunk(torch.cat([context, token], dim=1))), inputs)  # (B, E), (B,)


@register_arch
class TokenMLPPredictor(NeuralPredictor):
    arch = "token_mlp"
    config = TokenMLPParams

    @property
    def requires(self) -> tuple[str, ...]:
        return (*context_columns(self.section), "token_id")

    def data_geometry(self, train: WindowSet) -> dict:
        if train.token_id is None:
            raise PipelineError("train.arch: token_mlp needs the token_id column; set windows.token_ids: true and "
                                "re-run the windows stage")
        return {"vocab_size": int(train.token_id.max(initial=-1)) + 1}

    def build_module(self) -> nn.Module | None:
        if not self.geometry.get("vocab_size"):
            return None  # the vocabulary is known once fit sees the windows (or the checkpoint's geometry has it)
        return TokenMLP(self.geometry, **self.network_args)

    def batch(self, windows: WindowSet, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        if windows.token_id is None:
            raise PipelineError("token_id: token_mlp reads the tokens' ids; windows need windows.token_ids: true, "
                                "predict_experts needs token_id=")
        ids = windows.token_id[rows].astype(np.int64)
        vocab = int(self.geometry["vocab_size"])
        ids[(ids < 0) | (ids >= vocab)] = vocab  # unknown / none
        return {**super().batch(windows, rows, device), "token_id": torch.from_numpy(ids).to(device)}  # (B,)
