"""Online expert prediction inside a real model run: a hook object that, while a Hugging Face MoE model of any
supported family runs (`model.generate` with a KV cache, or a plain forward), asks a trained predictor at each
MoE layer l for layer l + h, using only what is known when layer l's router has run, and records what it would
prefetch next to what layer l + h then routed.

    from moe_prefetch.online import OnlinePrefetcher

    with OnlinePrefetcher(model, load_predictor(Path("data/predictor")), m=4, hidden_projection_seed=0) as online:
        model.generate(input_ids, max_new_tokens=32, do_sample=False)
    records = online.records()        # numpy columns: run, row, position, token_id, generated, layer, target_layer,
                                      # predicted (n, m), scores (n, E), routed (n, k)
    online.accuracy()                 # recall_at_k etc., as the evaluate stage computes them

What is known at layer l: the routed experts of MoE layers 0..l of the tokens of the current forward (decoded by
the family's RoutingAdapter from the RoutingRecorder's router hooks, exactly as collect records them), and for
predictors that read `hidden_state` (hidden_mlp) the router input of layer l, projected with the recorder's fixed
random matrix when the predictor was trained on projected hidden states (collect.capture.hidden_dim; pass the
collect run's seed as hidden_projection_seed, or read it with `projection_seed(shards_dir)`). The predictor's
inputs are built by `moe_prefetch.api.known_windows` (the one copy of the window layout).

Prompt tokens: the prefill is one forward over all prompt tokens, and layer l runs for all of them before layer
l + 1, so every prompt token gets its predictions from the same hook (records with generated=False); each decode
step then adds one token per sequence (generated=True). Tokens masked out by attention_mask (padding) are not
recorded. Predictors that read other tokens' routing (token_context_experts) or stale-gate columns are refused:
in a prefill the previous tokens' later layers have not run yet, so their windows could not be rebuilt online.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_prefetch.api import predict_experts
from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors import Predictor
from moe_prefetch.routing import adapter_for
from moe_prefetch.routing.recorder import RoutingRecorder

ONLINE_COLUMNS = {"context_experts", "context_weights", "hidden_state", "next_token_experts", "next_token_weights", "token_id"}  # what score() can get


def projection_seed(shards_dir: Path) -> int | None:
    """The seed of the hidden-state projection a collect run used (None: hidden states were not projected)."""
    from moe_prefetch import traces

    return traces.Manifest.read(Path(shards_dir)).capture.get("hidden_projection_seed")


class OnlinePrefetcher:
    """Hooks on `model` (attached on construction, removed by `remove()` or leaving the `with` block).

    m: experts prefetched per (token, target layer), default the model's top_k. hidden_projection_seed: the
    collect seed when the predictor's hidden states were projected (collect.capture.hidden_dim)."""

    def __init__(self, model, predictor: Predictor, m: int | None = None, hidden_projection_seed: int | None = None):
        self.model = model
        self.predictor = predictor
        self.adapter = adapter_for(model)
        g = predictor.geometry
        if g.get("across_tokens"):
            raise PipelineError("predictor: trained with windows.across_tokens (contexts reaching into earlier forwards), "
                                "which the online prefetcher does not run; accepted: a predictor trained with "
                                "windows.across_tokens: false")
        self.c, self.h = int(g["context_length"]), int(g["horizon"])
        self.top_k, self.num_experts = int(g["top_k"]), int(g["num_experts"])
        num_layers = len(self.adapter.layers)
        for name, want in (("num_experts", self.adapter.num_experts), ("top_k", self.adapter.top_k), ("num_layers", num_layers)):
            if int(g[name]) != want:
                raise PipelineError(f"predictor: built for {name}={g[name]}, but the model {self.adapter.family!r} has {want} "
                                    f"(num_experts={self.adapter.num_experts}, top_k={self.adapter.top_k}, {num_layers} MoE layers)")
        unsupported = sorted(set(predictor.requires) - ONLINE_COLUMNS)
        if unsupported:
            raise PipelineError(f"predictor: {predictor.arch} reads {', '.join(unsupported)}, which is not known online; "
                                f"supported inputs: {', '.join(sorted(ONLINE_COLUMNS))}")
        self.m = self.top_k if m is None else int(m)
        if not 1 <= self.m <= self.num_experts:
            raise PipelineError(f"m: must be in 1..{self.num_experts}, got {self.m}")
        self.needs_hidden = "hidden_state" in predictor.requires
        capture = CaptureParams()
        if self.needs_hidden:
            width, hidden_size = int(g.get("hidden_dim") or 0), int(self.adapter.config.hidden_size)
            if hidden_projection_seed is None and width != hidden_size:
                raise PipelineError(f"hidden_projection_seed: the predictor reads {width}-dim hidden states but the model's are "
                                    f"{hidden_size}-dim; pass the collect seed of its run (projection_seed(shards_dir))")
            capture = CaptureParams(hidden_states=True, hidden_dim=width if hidden_projection_seed is not None else 0)
        # the recorder's hooks come first: ours (registered after) read what it stored for the same router call
        self.recorder = RoutingRecorder(self.adapter, capture, projection_seed=hidden_projection_seed or 0)
        self.handles = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                        model.register_forward_hook(self._end, with_kwargs=True)]
        for index, layer in enumerate(self.adapter.layers):
            self.handles.append(layer.router.register_forward_hook(self._layer_hook(index)))
        self.run = -1
        self._columns: list[dict[str, np.ndarray]] = []
        self._forward = None

    # -- hooks ------------------------------------------------------------------------------------------------
    def _begin(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        batch, seq = ids.shape[0], ids.shape[1]
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0:
            self.run += 1  # a new prompt (prefill, or a plain forward)
        mask = kwargs.get("attention_mask")
        valid = torch.ones(batch, seq, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask[:, -seq:].bool().cpu()
        token_ids = ids.cpu() if not ids.is_floating_point() else torch.full((batch, seq), -1)
        self.recorder.reset()
        self._forward = {"batch": batch, "seq": seq, "past": past, "valid": valid.reshape(-1).numpy(),
                         "token_id": token_ids.reshape(-1).numpy(), "routed": {}, "weights": {}, "pending": {}}

    def _layer_hook(self, index: int):
        def hook(_module, _inputs, _output):
            state = self._forward
            if state is None:
                return  # a router called outside a model forward (e.g. another tool's look-ahead)
            batch, seq = state["batch"], state["seq"]
            experts, weights = self.adapter.decode(self.recorder.outputs[index])[:2]  # (T, k) best-first, as collect records
            if experts.shape[0] != batch * seq:
                raise PipelineError(f"online: MoE layer {index} routed {experts.shape[0]} tokens in a forward of {batch}x{seq}; "
                                    f"{self.adapter.family} decoding without its encoder is not supported (use a plain forward)")
            state["routed"][index] = experts.to(torch.int16).cpu().numpy()
            state["weights"][index] = weights.float().cpu().numpy()
            if index in state["pending"]:  # the layer a prediction was made for has now routed
                self._record(state, index - self.h, state["pending"].pop(index), state["routed"][index])
            if self.c - 1 <= index <= len(self.adapter.layers) - 1 - self.h:
                routed = np.stack([state["routed"][i] for i in range(index + 1)], axis=1)  # (T, index+1, k)
                known = {}
                if "token_id" in self.predictor.requires:
                    known["token_id"] = state["token_id"]
                if "context_weights" in self.predictor.requires:
                    known["routed_weights"] = np.stack([state["weights"][i] for i in range(index + 1)], axis=1)  # (T, index+1, k)
                if self.needs_hidden:
                    hidden = self.recorder.hidden_state(index, batch, seq)  # exactly what collect stores
                    known["hidden_state"] = hidden.numpy().reshape(batch * seq, -1)
                predicted, scores = predict_experts(self.predictor, routed, layer=index, m=self.m, **known)
                state["pending"][index + self.h] = (predicted, scores, known.get("hidden_state"))
        return hook

    def _end(self, _module, _args, _kwargs, _output):
        state, self._forward = self._forward, None
        self.recorder.reset()
        if state is not None and state["pending"]:
            raise PipelineError(f"online: MoE layers {sorted(state['pending'])} never ran in this forward; the adapter does not match this model")

    def _record(self, state: dict, layer: int, prediction, routed: np.ndarray) -> None:
        predicted, scores, hidden = prediction
        keep = state["valid"]
        batch, seq = state["batch"], state["seq"]
        n = int(keep.sum())
        self._columns.append({
            "run": np.full(n, self.run, dtype=np.int64),
            "row": np.repeat(np.arange(batch), seq)[keep],
            "position": np.tile(np.arange(state["past"], state["past"] + seq), batch)[keep].astype(np.int32),
            "token_id": state["token_id"][keep].astype(np.int64),
            "generated": np.full(n, state["past"] > 0),
            "layer": np.full(n, layer, dtype=np.int16),
            "target_layer": np.full(n, layer + self.h, dtype=np.int16),
            "predicted": predicted[keep].astype(np.int16),
            "scores": scores[keep].astype(np.float32),
            "routed": routed[keep],
            **({} if hidden is None else {"hidden_state": hidden[keep]}),
        })

    # -- results ----------------------------------------------------------------------------------------------
    def records(self) -> dict[str, np.ndarray]:
        """One row per (token, prediction layer l) so far, in the order they were made: run (one per prompt /
        plain forward), row (batch row), position, token_id, generated, layer l, target_layer l + h,
        predicted (n, m) best-first, scores (n, E), routed (n, k) what layer l + h then routed (best-first), and
        for predictors that read it hidden_state (n, D) float16, the (projected) hidden state entering layer l."""
        if not self._columns:
            return {}
        return {name: np.concatenate([part[name] for part in self._columns]) for name in self._columns[0]}

    def accuracy(self) -> dict[str, float]:
        """The evaluate stage's ranking metrics over the records: recall_at_k = mean share of the routed target
        experts within the predicted top-k, top{m} = the highest-weight target within the top-m, ..."""
        from moe_prefetch.evaluation.metrics import RankingAccumulator

        records = self.records()
        if not records:
            raise PipelineError("online: no prediction recorded yet; run the model with the hook attached")
        accumulator = RankingAccumulator(sorted({1, self.m}), self.num_experts, self.top_k)
        accumulator.update(records["scores"], records["routed"])
        return accumulator.result()

    def clear(self) -> None:
        self._columns.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.recorder.remove()

    def __enter__(self) -> OnlinePrefetcher:
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()
