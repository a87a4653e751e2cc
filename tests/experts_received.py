"""What each experts module received, read independently of the adapters: the ground truth of the routing tests.

A forward pre-hook on every experts module (`ExpertsCalls`) reads the per-token {expert: weight} of each call, and
`assert_same_routing` compares a recorder's (experts, weights) rows with it: experts as sets, weights per expert.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn


def where(name: str) -> tuple[str, int]:
    """(stack, layer index) from a module path such as model.layers.2.mlp.experts or encoder.block.3.layer.1.mlp.experts."""
    found = re.search(r"(?:(encoder|decoder)\.block|layers|blocks)\.(\d+)\.", name)
    return found.group(1) or "decoder", int(found.group(2))


def received_routing(args: tuple, kwargs: dict) -> list[dict[int, float]]:
    """Per token {expert: weight} as the experts module received it (standard (hidden, ids, weights) call, or
    Switch's (hidden, one-hot dispatch mask (T, 1, E), weights (T, 1)))."""
    values = list(args) + list(kwargs.values())
    _, ids, weights = values[:3]
    weights = weights.float()
    if ids.dim() == 3:  # Switch: every expert whose mask bit is set runs on the token, scaled by weights[t]
        return [{int(e): float(weights[t, 0]) for e in torch.nonzero(ids[t, 0]).flatten()} for t in range(ids.shape[0])]
    return [{int(e): float(w) for e, w in zip(ids[t], weights[t])} for t in range(ids.shape[0])]


def prescaled_routing(routed_in: torch.Tensor, hidden: torch.Tensor) -> list[dict[int, float]]:
    """Per token {expert: weight} of Llama 4's experts module, which gets each token once per expert (E * T, D),
    pre-scaled by its weight (exactly 0 for an expert not chosen): the weight is the one value of the model's dtype
    whose product with the block's input (T, D), rounded to that dtype, is exactly what the experts module got."""
    tokens = hidden.reshape(-1, hidden.shape[-1])  # (T, D)
    scaled = routed_in.reshape(-1, *tokens.shape)  # (E, T, D)
    ratio = (scaled.double() * tokens.double()).sum(-1) / tokens.double().square().sum(-1)  # (E, T)
    nonzero = scaled.abs().sum(-1) > 0  # (E, T)
    return [{int(e): exact_weight(ratio[e, t].to(routed_in.dtype), tokens[t], scaled[e, t]) for e in torch.nonzero(nonzero[:, t]).flatten()}
            for t in range(tokens.shape[0])]


def exact_weight(estimate: torch.Tensor, token: torch.Tensor, scaled: torch.Tensor, ulps: int = 3) -> float:
    """The weight w within `ulps` steps of `estimate` (in its dtype) with token * w == scaled exactly; the least-squares
    estimate alone can be an ulp off in bfloat16, whose products round coarsely (Llama 4's weights near 1)."""
    candidates = [estimate]
    for direction in (torch.tensor(float("inf"), dtype=estimate.dtype), torch.tensor(float("-inf"), dtype=estimate.dtype)):
        value = estimate
        for _ in range(ulps):
            value = torch.nextafter(value, direction)
            candidates.append(value)
    exact = sorted({float(w) for w in candidates if torch.equal(token * w, scaled)})
    assert len(exact) == 1, f"pre-scaled experts input: weight {float(estimate)} is not read unambiguously (fits: {exact})"
    return exact[0]


class ExpertsCalls:
    """Forward pre-hooks on every experts module: per (stack, layer), the per-token routing of each call, in order.

    Llama 4's experts module gets no ids or weights, only each token once per expert, pre-scaled by its weight: a
    pre-hook on its MoE block (`...TextMoe`) keeps that call's input to read the weights from (`prescaled_routing`)."""

    def __init__(self, model: nn.Module):
        self.calls: dict[tuple[str, int], list[list[dict[int, float]]]] = {}
        self.block_inputs: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = []
        for name, module in model.named_modules():
            if type(module).__name__.endswith("TextMoe"):
                self.handles.append(module.register_forward_pre_hook(self._keep_block_input(where(name + "."))))
            if type(module).__name__.endswith("Experts"):
                self.handles.append(module.register_forward_pre_hook(self._hook(where(name)), with_kwargs=True))

    def _keep_block_input(self, key):
        def hook(_module, args):
            self.block_inputs[key] = args[0]
        return hook

    def _hook(self, key):
        def hook(_module, args, kwargs):
            routing = (prescaled_routing(args[0], self.block_inputs[key]) if len(args) + len(kwargs) == 1
                       else received_routing(args, kwargs))
            self.calls.setdefault(key, []).append(routing)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def assert_same_routing(recorded_experts: np.ndarray, recorded_weights: np.ndarray, received: list[dict[int, float]], label: str):
    assert recorded_experts.shape[0] == len(received)
    for t, truth in enumerate(received):
        ids, weights = recorded_experts[t].tolist(), recorded_weights[t]
        assert all(w == 0 for e, w in zip(ids, weights) if e == -1), f"{label} token {t}: a no-expert slot has weight"
        recorded = {e: float(w) for e, w in zip(ids, weights) if e != -1}
        assert set(recorded) == set(truth), f"{label} token {t}: recorded experts {ids}, experts module got {sorted(truth)}"
        for expert, weight in truth.items():
            np.testing.assert_allclose(recorded[expert], weight, rtol=1e-5, atol=0, err_msg=f"{label} token {t} expert {expert}")
        assert list(weights) == sorted(weights, reverse=True), f"{label} token {t}: not best-first"
