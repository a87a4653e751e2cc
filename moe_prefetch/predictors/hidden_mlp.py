"""`hidden_mlp`: predicts the experts of MoE layer t from the hidden state of the token entering layer t-h (the
last context layer), not from routing ids: what a router h layers later will do, read off the residual stream.
Needs `collect.capture.hidden_states: true` (windows then carry column `hidden_state`, moe_prefetch/windows/data.py).

The hidden state is LayerNorm-ed (raw residual streams differ in scale between layers and models), joined with
the target layer's embedding (each target has its own router) and passed through an MLP. Trained like every
neural predictor against the target router's gate-weight distribution (soft cross-entropy, neural.py).
With `routing_embedding_dim: N > 0` it is "hidden+routing": the context layers' routed experts, each slot
embedded in N dims, are joined to the hidden state too. With `stale_gate_input: true` it is a learned correction of
the stale gate: the stale gate's top-k for the target layer (its router applied to this same hidden state; windows
column `stale_gate_experts`, recorded with `collect.capture.lookahead` >= `windows.horizon`), each best-first slot
embedded in `layer_dim` dims, joins the hidden state too. With `linear_head: true` (the default) a per-target-layer
affine map of the hidden state is added to the logits: the function class then holds the stale gate itself.
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
from moe_prefetch.predictors.neural import NeuralPredictor, expert_ids
from moe_prefetch.windows.data import WindowSet


@dataclass
class HiddenMLPParams:
    layer_dim: int = doc("Width of the target layer's embedding, concatenated to the normalised hidden state.", 16)
    hidden: list = doc(
        "Hidden layer widths (GELU). [512, 256] since stop 23 (with linear_head): at h = 1 on the default data it "
        "lifts test top-1 from 78.9% ([256], no linear head) to 82.7%, past the stale gate's 79.6%.", factory=lambda: [512, 256])
    dropout: float = doc("Dropout after each hidden layer.", 0.1)
    routing_embedding_dim: int = doc(
        "0: the hidden state only. N > 0: hidden+routing, also the routing context (the c context layers' experts, "
        "each slot embedded in N dims), joined to the hidden state.", 0)
    stale_gate_input: bool = doc(
        "Also read the stale gate's top-k for the target layer (the target router applied to this hidden state, "
        "best-first; windows column stale_gate_experts, which needs collect.capture.lookahead >= windows.horizon), "
        "each slot embedded in layer_dim dims: a learned correction of the stale gate.", False)
    linear_head: bool = doc(
        "Add a per-target-layer affine map of the stored hidden state to the logits (zero at the start). The stored "
        "state is layer l's router input, norm_l(r_l) of the residual r_l; the stale gate is target t's router on "
        "norm_t(r_l), which differs from it only by the norms' per-channel weights, so this map can express the stale "
        "gate's logits exactly and the MLP learns what changes between l and t.", True)

    def validate(self) -> None:
        check_network("train.hidden_mlp", self, ("layer_dim",), ("hidden",))
        if self.routing_embedding_dim < 0:
            raise PipelineError(f"train.hidden_mlp.routing_embedding_dim: must be >= 0 (0 = hidden state only), got {self.routing_embedding_dim}")


class HiddenMLP(nn.Module):
    def __init__(self, hidden_dim: int, num_layers: int, num_experts: int, layer_dim: int, hidden: list[int], dropout: float,
                 routing_slots: int = 0, routing_dim: int = 0, stale_slots: int = 0, linear_head: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.target = nn.Embedding(num_layers, layer_dim)
        # hidden+routing: one embedding per context slot's expert
        self.routing = expert_embedding(num_experts, routing_dim) if routing_dim else None
        # stale gate input: one embedding of the stale gate's experts, read slot by slot
        self.stale = expert_embedding(num_experts, layer_dim) if stale_slots else None
        self.trunk, width = mlp_stack(hidden_dim + layer_dim + routing_slots * routing_dim + stale_slots * layer_dim, hidden, dropout)
        self.heads = Heads(width, num_experts)
        # linear head: per target layer a (D, E) map and an (E,) bias, zero-initialised (training starts from the MLP)
        self.linear = nn.Parameter(torch.zeros(num_layers, hidden_dim, num_experts)) if linear_head else None
        self.linear_bias = nn.Parameter(torch.zeros(num_layers, num_experts)) if linear_head else None

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.norm(inputs["hidden_state"]), self.target(inputs["target_layer"])]  # (B, D), (B, layer_dim)
        if self.routing is not None:
            parts.append(self.routing(inputs["context_experts"]).flatten(1))  # (B, c*k*routing_dim)
        if self.stale is not None:
            parts.append(self.stale(inputs["stale_gate_experts"]).flatten(1))  # (B, k*layer_dim)
        logits, confidence = self.heads(self.trunk(torch.cat(parts, dim=1)))  # (B, E), (B,)
        if self.linear is not None:
            target = inputs["target_layer"]
            hidden = inputs["hidden_state"].unsqueeze(1)  # (B, 1, D) as stored, not LayerNorm-ed: the stale gate is linear in it
            logits = logits + torch.bmm(hidden, self.linear[target]).squeeze(1) + self.linear_bias[target]  # (B, E)
        return logits, confidence


@register_arch
class HiddenMLPPredictor(NeuralPredictor):
    arch = "hidden_mlp"
    config = HiddenMLPParams
    @property
    def requires(self) -> tuple[str, ...]:
        return (*NeuralPredictor.requires, "hidden_state", *(["stale_gate_experts"] if self.stale_gate_input else []))

    @property
    def stale_gate_input(self) -> bool:
        return bool(self.section.get("stale_gate_input", False))  # absent in checkpoints written before it existed

    def data_geometry(self, train: WindowSet) -> dict:
        if train.hidden_state is None:
            raise PipelineError("train.arch: hidden_mlp needs hidden states; set collect.capture.hidden_states: true "
                                "and re-run collect, shard and windows")
        self.check_stale_gate(train)
        return {"hidden_dim": int(train.hidden_state.shape[1])}

    def build_module(self) -> nn.Module | None:
        if not self.geometry.get("hidden_dim"):
            return None  # the width is known once fit sees the windows (or the checkpoint's geometry has it)
        g, s = self.geometry, self.section
        routing_dim = s.get("routing_embedding_dim", 0)  # absent in checkpoints written before it existed
        return HiddenMLP(g["hidden_dim"], g["num_layers"], g["num_experts"], s["layer_dim"], s["hidden"], s["dropout"],
                         g["context_length"] * g["top_k"] if routing_dim else 0, routing_dim,
                         g["top_k"] if self.stale_gate_input else 0,
                         s.get("linear_head", False))  # absent in checkpoints written before it existed

    def check_stale_gate(self, windows: WindowSet) -> None:
        if self.stale_gate_input and windows.stale_gate_experts is None:
            raise PipelineError("train.hidden_mlp.stale_gate_input: these windows carry no stale_gate_experts; set "
                                "collect.capture.lookahead >= windows.horizon and re-run collect, shard and windows")

    def batch(self, windows: WindowSet, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        if windows.hidden_state is None:
            raise PipelineError("hidden_mlp: these windows carry no hidden_state column; re-run the windows stage on shards with hidden states")
        inputs = super().batch(windows, rows, device)
        inputs["hidden_state"] = torch.from_numpy(windows.hidden_state[rows].astype(np.float32)).to(device)  # (B, D)
        if self.stale_gate_input:
            self.check_stale_gate(windows)
            inputs["stale_gate_experts"] = expert_ids(windows.stale_gate_experts[rows], self.num_experts, device)  # (B, k)
        return inputs
