"""`hidden_mlp`: predicts the experts of MoE layer t from the hidden state of the token entering layer t-h (the
last context layer), not from routing ids: what a router h layers later will do, read off the residual stream.
Needs `collect.capture.hidden_states: true` (windows then carry column `hidden_state`, moe_prefetch/windows/data.py).

The hidden state is LayerNorm-ed (raw residual streams differ in scale between layers and models), joined with
the target layer's embedding (each target has its own router) and passed through an MLP. Trained like every
neural predictor against the target router's gate-weight distribution (soft cross-entropy, neural.py).
With `routing_embedding_dim: N > 0` it is "hidden+routing": the context layers' routed experts, each slot
embedded in N dims, are joined to the hidden state too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moe_prefetch.config import check_network, doc
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors.base import register_arch
from moe_prefetch.predictors.layers import Heads, expert_embedding, mlp_stack
from moe_prefetch.predictors.neural import NeuralPredictor
from moe_prefetch.windows.data import WindowSet


@dataclass
class HiddenMLPParams:
    layer_dim: int = doc("Width of the target layer's embedding, concatenated to the normalised hidden state.", 16)
    hidden: list = doc("Hidden layer widths (GELU).", factory=lambda: [256])
    dropout: float = doc("Dropout after each hidden layer.", 0.1)
    routing_embedding_dim: int = doc(
        "0: the hidden state only. N > 0: hidden+routing, also the routing context (the c context layers' experts, "
        "each slot embedded in N dims), joined to the hidden state.", 0)

    def validate(self) -> None:
        check_network("train.hidden_mlp", self, ("layer_dim",), ("hidden",))
        if self.routing_embedding_dim < 0:
            raise PipelineError(f"train.hidden_mlp.routing_embedding_dim: must be >= 0 (0 = hidden state only), got {self.routing_embedding_dim}")


class HiddenMLP(nn.Module):
    def __init__(self, hidden_dim: int, num_layers: int, num_experts: int, layer_dim: int, hidden: list[int], dropout: float,
                 routing_slots: int = 0, routing_dim: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.target = nn.Embedding(num_layers, layer_dim)
        # hidden+routing: one embedding per context slot's expert
        self.routing = expert_embedding(num_experts, routing_dim) if routing_dim else None
        self.trunk, width = mlp_stack(hidden_dim + layer_dim + routing_slots * routing_dim, hidden, dropout)
        self.heads = Heads(width, num_experts)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.norm(inputs["hidden_state"]), self.target(inputs["target_layer"])]  # (B, D), (B, layer_dim)
        if self.routing is not None:
            parts.append(self.routing(inputs["context_experts"]).flatten(1))  # (B, c*k*routing_dim)
        return self.heads(self.trunk(torch.cat(parts, dim=1)))


@register_arch
class HiddenMLPPredictor(NeuralPredictor):
    arch = "hidden_mlp"
    config = HiddenMLPParams
    requires = (*NeuralPredictor.requires, "hidden_state")

    def data_geometry(self, train: WindowSet) -> dict:
        if train.hidden_state is None:
            raise PipelineError("train.arch: hidden_mlp needs hidden states; set collect.capture.hidden_states: true "
                                "and re-run collect, shard and windows")
        return {"hidden_dim": int(train.hidden_state.shape[1])}

    def build_module(self) -> nn.Module | None:
        if not self.geometry.get("hidden_dim"):
            return None  # the width is known once fit sees the windows (or the checkpoint's geometry has it)
        g, s = self.geometry, self.section
        routing_dim = s.get("routing_embedding_dim", 0)  # absent in checkpoints written before it existed
        return HiddenMLP(g["hidden_dim"], g["num_layers"], g["num_experts"], s["layer_dim"], s["hidden"], s["dropout"],
                         g["context_length"] * g["top_k"] if routing_dim else 0, routing_dim)

    def batch(self, windows: WindowSet, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        if windows.hidden_state is None:
            raise PipelineError("hidden_mlp: these windows carry no hidden_state column; re-run the windows stage on shards with hidden states")
        inputs = super().batch(windows, rows, device)
        inputs["hidden_state"] = torch.from_numpy(windows.hidden_state[rows].astype(np.float32)).to(device)  # (B, D)
        return inputs
