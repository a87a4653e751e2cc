"""Forward hooks that record, for one forward pass, what every MoE layer's router dispatched.

Hooks only read tensors; the model's own outputs are untouched. The stale-gate look-ahead calls later routers'
`forward` directly (bypassing hooks), after the model's forward, so it never disturbs the recorded routing.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.errors import PipelineError
from moe_prefetch.routing import RoutingAdapter


class RoutingRecorder:
    """Attach to a model through its adapter; `take(batch, seq)` returns numpy arrays for the last forward."""

    def __init__(self, adapter: RoutingAdapter, capture: CaptureParams, projection_seed: int):
        self.adapter = adapter
        self.capture = capture
        self.outputs: dict[int, tuple] = {}
        self.router_inputs: dict[int, torch.Tensor] = {}
        self.residuals: dict[int, torch.Tensor] = {}
        self.handles = []
        self.projection = None
        self.device_projections: dict[torch.device, torch.Tensor] = {}
        unnormed = [self.layer_name(index) for index, layer in enumerate(adapter.layers) if layer.pre_norm is None]
        if capture.lookahead and unnormed:  # checked before any hook is attached: a failed recorder leaves the model as it was
            raise PipelineError(f"collect.capture.lookahead: {capture.lookahead} needs the norm in front of every MoE layer, and "
                                f"{adapter.family} {', '.join(unnormed)} has none; use lookahead 0 for this model")
        for index, layer in enumerate(adapter.layers):
            self.handles.append(layer.router.register_forward_hook(self._keep(self.outputs, index, output=True)))
            if capture.hidden_states:
                self.handles.append(layer.router.register_forward_pre_hook(self._keep(self.router_inputs, index, stored=self._stored_hidden)))
            if capture.lookahead:
                self.handles.append(layer.pre_norm.register_forward_pre_hook(self._keep(self.residuals, index)))
        if capture.hidden_states and capture.hidden_dim:
            hidden_size = int(adapter.config.hidden_size)
            generator = torch.Generator().manual_seed(projection_seed)
            # A fixed Gaussian projection approximately preserves inner products (Johnson-Lindenstrauss).
            self.projection = torch.randn(hidden_size, capture.hidden_dim, generator=generator) / capture.hidden_dim**0.5

    def layer_name(self, index: int) -> str:
        """How errors name the adapter's `index`-th MoE layer: its stack and true layer index."""
        layer = self.adapter.layers[index]
        return f"{layer.stack} layer {layer.layer_index}"

    def mismatch(self, what: str) -> PipelineError:
        """The error of a model whose forward does not route as its family adapter expects (e.g. custom modeling code)."""
        family = self.adapter.family
        return PipelineError(f"collect.model: {what}; the {family} adapter (moe_prefetch/routing/families.py) reads routing as "
                             f"transformers' own {family} modeling code routes, and this model's code does not")

    def _keep(self, store: dict, index: int, output: bool = False, stored=None):
        """A hook keeping its module's output (or first input) in `store[index]`, converted by `stored` if given."""
        def hook(_module, inputs, result=None):
            value = result if output else inputs[0]
            if index in store:  # a second call in one forward would mean we misread the model's routing
                raise self.mismatch(f"the router of MoE {self.layer_name(index)} ran twice in one forward pass")
            store[index] = value if stored is None else stored(value)

        if output:
            return lambda module, inputs, result: hook(module, inputs, result)
        return lambda module, inputs: hook(module, inputs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def reset(self) -> None:
        self.outputs.clear()
        self.router_inputs.clear()
        self.residuals.clear()

    @torch.no_grad()
    def take(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        """Arrays for the last forward: experts (B, S, L, k) int16, weights (B, S, L, k) float32, and the captures."""
        layers = range(len(self.adapter.layers))
        missing = [self.layer_name(i) for i in layers if i not in self.outputs]
        if missing:
            raise self.mismatch(f"no routing recorded for MoE {', '.join(missing)} in a forward pass")
        experts, weights, probs = [], [], []
        for index in layers:  # each layer to the host first: a dispatched model's layers live on different devices
            ids, gate_weights, logits = self.adapter.decode(self.outputs[index])
            experts.append(ids.reshape(batch, seq, -1).cpu())
            weights.append(gate_weights.reshape(batch, seq, -1).cpu())
            if self.capture.router_probs:
                probs.append(self.adapter.router_probs(logits).reshape(batch, seq, -1).cpu())
        out = {
            "experts": torch.stack(experts, dim=2).to(torch.int16).numpy(),
            "weights": torch.stack(weights, dim=2).float().numpy(),
        }
        if probs:
            out["router_probs"] = torch.stack(probs, dim=2).to(torch.float16).numpy()
        if self.capture.hidden_states:
            out["hidden_states"] = torch.stack([self.hidden_state(i, batch, seq) for i in layers], dim=2).numpy()
        if self.capture.lookahead:
            out["lookahead_experts"] = self._lookahead(batch, seq)
        self.reset()
        return out

    @torch.no_grad()
    def _stored_hidden(self, router_input: torch.Tensor) -> torch.Tensor:
        """A router's input as stored, computed where it lives as the forward records it: projected to
        capture.hidden_dim dims (when a projection is set) and cast to float16, (..., D) -> (..., d). Only this
        float16 tensor is kept and later moved to the host, never the float32 full-width state (at Mixtral's width
        a (B, S, L, D) float32 gather is GBs per batch)."""
        if self.projection is None:
            return router_input.to(torch.float16)
        device = router_input.device
        if device not in self.device_projections:  # one copy per device of a dispatched model, made once
            self.device_projections[device] = self.projection.to(device)
        return (router_input.float() @ self.device_projections[device]).to(torch.float16)  # (..., D) @ (D, d) -> (..., d)

    def hidden_state(self, index: int, batch: int, seq: int) -> torch.Tensor:
        """(B, S, d) float16 on the host: the input of MoE layer `index`'s router as stored (_stored_hidden)."""
        return self.router_inputs[index].reshape(batch, seq, -1).cpu()

    def _lookahead(self, batch: int, seq: int) -> np.ndarray:
        """(B, S, L, H, k) int16: MoE layer l+h's router applied to layer l's residual stream, after l+h's norm;
        -1 where l+h is past the last MoE layer of l's stack. Layer l's residual goes to the device layer l+h's own
        residual was on in the forward: its norm's weight may be on `meta` (offloaded; accelerate loads it per call)."""
        moe = self.adapter.layers
        horizon = self.capture.lookahead
        top_k = self.adapter.top_k
        out = np.full((batch, seq, len(moe), horizon, top_k), -1, dtype=np.int16)
        for index in range(len(moe)):
            residual = self.residuals[index]
            for h in range(1, horizon + 1):
                if index + h >= len(moe) or moe[index + h].stack != moe[index].stack:
                    break  # no later MoE layer in this stack (an encoder's residual never reaches the decoder's routers)
                later = moe[index + h]
                normed = later.pre_norm.forward(residual.to(self.residuals[index + h].device))
                ids, _, _ = self.adapter.decode(later.router.forward(normed))
                out[:, :, index, h - 1, :] = ids.reshape(batch, seq, -1).to(torch.int16).cpu().numpy()
        return out
