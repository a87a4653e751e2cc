"""Building blocks the neural predictors share: context embeddings, MLP stacks and the expert/confidence heads.

Expert ids arrive with -1 ("no expert") already mapped to index E (see NeuralPredictor.batch), the padding row
of every expert embedding here, so a missing expert contributes a zero vector.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_prefetch.windows.data import context_layer_offsets


def mlp_stack(in_dim: int, sizes: list[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Linear -> GELU -> Dropout per entry of `sizes`; returns the stack and its output width."""
    blocks: list[nn.Module] = []
    for size in sizes:
        blocks += [nn.Linear(in_dim, size), nn.GELU()]
        if dropout:
            blocks.append(nn.Dropout(dropout))
        in_dim = size
    return nn.Sequential(*blocks), in_dim


def expert_embedding(num_experts: int, dim: int) -> nn.Embedding:
    return nn.Embedding(num_experts + 1, dim, padding_idx=num_experts)  # +1: the "no expert" row, kept at zero


CONTEXT_ENCODINGS = ("slots", "weighted_set", "both")  # FlatContext's encodings (train.<arch>.context_encoding)


class FlatContext(nn.Module):
    """The context layers' routed sets and the target layer's embedding, concatenated. `encoding`:
      slots         every expert slot embedded (keeps layer and best-first slot order; no gate weights): c*k*d;
      weighted_set  each context layer's gate-weighted sum of its experts' embeddings, from that layer's own table
                    (the same expert at two depths means different things): order-invariant inside a layer, c*d;
      both          the two concatenated.
    (B, c, k) ids, (B,) target and, for weighted_set/both, (B, c, k) gate weights -> (B, width(...)). Slots with
    no expert (index E) embed to zero whatever their weight."""

    def __init__(self, num_experts: int, num_layers: int, dim: int, encoding: str = "slots", context_length: int = 0):
        super().__init__()
        self.encoding = encoding
        if encoding != "weighted_set":
            self.experts = expert_embedding(num_experts, dim)
        if encoding != "slots":
            # one table of c blocks of E+1 rows, block j context layer j's: one lookup per batch for all c layers
            # (at batch 1 the per-call overhead of c lookups is most of the cost); initialised as c separate tables
            blocks = [expert_embedding(num_experts, dim).weight.detach() for _ in range(context_length)]
            self.set_experts = nn.Embedding.from_pretrained(torch.cat(blocks), freeze=False)
            self.register_buffer("set_offsets", torch.arange(context_length)[None, :, None] * (num_experts + 1), persistent=False)
        self.num_experts = num_experts
        self.target = nn.Embedding(num_layers, dim)

    def forward(self, context: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.encoding != "weighted_set":
            parts.append(self.experts(context).flatten(1))  # (B, c*k*d)
        if self.encoding != "slots":
            routed = weights * (context != self.num_experts)  # (B, c, k): a slot with no expert (index E) adds nothing
            sets = self.set_experts(context + self.set_offsets) * routed.unsqueeze(-1)  # (B, c, k, d)
            parts.append(sets.sum(dim=2).flatten(1))  # (B, c*d)
        return torch.cat([*parts, self.target(target)], dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before stop 23 hold one table per context layer (set_experts.<j>.weight)
        old = sorted((key for key in state_dict if key.startswith(f"{prefix}set_experts.") and key.endswith(".weight")
                      and key != f"{prefix}set_experts.weight"), key=lambda key: int(key.split(".")[-2]))
        if old:
            state_dict[f"{prefix}set_experts.weight"] = torch.cat([state_dict.pop(key) for key in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def width(context_length: int, top_k: int, dim: int, encoding: str = "slots") -> int:
        slots = context_length * top_k * dim if encoding != "weighted_set" else 0
        sets = context_length * dim if encoding != "slots" else 0
        return slots + sets + dim


class ExpertTransitions(nn.Module):
    """A learned first-order transition table added to the expert logits: for target layer t, context layer j and
    each expert e routed there, a row of E logits T[t, j, e], scaled by a learned weight of its best-first slot s,
    a[t, j, s] (the heaviest expert of a layer says most about the next), and summed over the context: a log-linear
    co-occurrence model (what `cooccurrence` counts, fit jointly with the rest). It ties each (layer, expert) to the
    target layer's experts directly, which a flat MLP has to build in its hidden units from summed embeddings.
    T starts at zero, so training starts from the network it is added to. (B, c, k) ids, (B,) target -> (B, E)."""

    def __init__(self, num_experts: int, num_layers: int, context_length: int, top_k: int):
        super().__init__()
        self.num_experts, self.context_length = num_experts, context_length
        self.table = nn.Embedding(num_layers * context_length * (num_experts + 1), num_experts)
        nn.init.zeros_(self.table.weight)
        self.slot_scale = nn.Parameter(torch.ones(num_layers, context_length, top_k))

    def forward(self, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c, rows_per_layer = self.context_length, self.num_experts + 1
        layer = torch.arange(c, device=context.device)[None, :, None]  # (1, c, 1)
        index = (target[:, None, None] * c + layer) * rows_per_layer + context  # (B, c, k)
        routed = (context != self.num_experts).to(self.slot_scale.dtype)  # (B, c, k): index E = no expert, adds nothing
        scale = self.slot_scale[target] * routed  # (B, c, k)
        return (self.table(index) * scale.unsqueeze(-1)).sum(dim=(1, 2))  # (B, E)


class LayerTokens(nn.Module):
    """One vector per context layer: its k best-first expert embeddings concatenated and projected to d, plus
    an embedding of the layer's absolute position (windows.data.context_layer_offsets, mod L), so that sequence models
    see which layers they read. (B, c, k), (B,) -> (B, c, d)."""

    def __init__(self, num_experts: int, top_k: int, num_layers: int, horizon: int, dim: int):
        super().__init__()
        self.horizon = horizon
        self.experts = expert_embedding(num_experts, dim)
        self.project = nn.Linear(top_k * dim, dim)
        self.layer = nn.Embedding(num_layers, dim)

    def forward(self, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        B, c, _ = context.shape
        slots = self.experts(context).reshape(B, c, -1)  # (B, c, k*d)
        offsets = torch.tensor(context_layer_offsets(c, self.horizon), device=context.device)  # (c,)
        layers = (target[:, None] + offsets) % self.layer.num_embeddings  # (B, c): across tokens, the earlier token's layer
        return self.project(slots) + self.layer(layers)  # (B, c, d)


class Heads(nn.Module):
    """Expert logits (B, E) and a confidence logit (B,) from features (B, d), one linear map for both."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_experts + 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.linear(features)  # (B, E+1)
        return out[:, :-1], out[:, -1]
