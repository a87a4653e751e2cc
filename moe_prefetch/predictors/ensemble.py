"""`ensemble`: the predictors named in train.ensemble.members (each with its own train.<arch> section), trained in
this run, combined by learned weights: per target layer l, scores = softmax(sum_m w[l, m] * log p_m) with
w[l] = softmax(mix_logits[l]), a weighted geometric mean of the members' distributions.

The weights are fit on a held-out slice of the TRAIN split (whole sequences, train.ensemble.holdout_fraction),
which the members never see: fitting them on the members' own training windows would favour whichever member
over-fits most, and val is reserved for early stopping. All members' arrays are saved in the one safetensors
file under `member<i>.<arch>.` prefixes, with `mix_logits` beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moe_prefetch.config import doc, positive
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors.base import ARCHITECTURES, Predictor, register_arch
from moe_prefetch.predictors.neural import target_distribution
from moe_prefetch.windows.data import WindowSet

FLOOR = 1e-6  # probability floor before the log: count tables give exact zeros


@dataclass
class EnsembleParams:
    members: list = doc("Architectures combined (each trained in this run with its own train.<arch> section).",
                         factory=lambda: ["lookup", "mlp"])
    holdout_fraction: float = doc("Share of train sequences kept out of member training to fit the mixing weights.", 0.1)
    mix_steps: int = doc("Full-batch Adam steps fitting the per-target-layer mixing weights.", 200)

    def validate(self) -> None:
        architectures = ARCHITECTURES.names()
        if not isinstance(self.members, list) or len(self.members) < 2:
            raise PipelineError(f"train.ensemble.members: must list at least 2 architectures, got {self.members}")
        for name in self.members:
            if name == "ensemble" or name not in architectures:
                accepted = ", ".join(sorted(set(architectures) - {"ensemble"}))
                raise PipelineError(f"train.ensemble.members: {name!r} cannot be a member; accepted: {accepted}")
        if len(set(self.members)) != len(self.members):
            raise PipelineError(f"train.ensemble.members: lists an architecture twice: {self.members}")
        if not 0 < self.holdout_fraction < 1:
            raise PipelineError(f"train.ensemble.holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")
        positive("train.ensemble", self, "mix_steps")


@register_arch
class EnsemblePredictor(Predictor):
    arch = "ensemble"
    config = EnsembleParams

    def __init__(self, geometry: dict, params: dict):
        super().__init__(geometry, params)
        self.section = params["ensemble"]
        self.members = [ARCHITECTURES[name](geometry, params) for name in self.section["members"]]
        self.mix_logits = np.zeros((geometry["num_layers"], len(self.members)), dtype=np.float32)  # (L, M): equal weights

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(column for member in self.members for column in member.requires))  # ordered union

    def prefix(self, index: int) -> str:
        return f"member{index}.{self.members[index].arch}."

    def holdout(self, train: WindowSet) -> np.ndarray:
        """(N,) bool: windows of the sequences held out for the mixing weights (at least one, never all)."""
        rng = np.random.default_rng(self.params["seed"])
        held = rng.random(len(train.sequence_ids)) < self.section["holdout_fraction"]  # per sequence
        present = np.unique(train.sequence_index)
        if len(present) < 2:
            raise PipelineError("train.ensemble: the train split needs at least 2 sequences to hold some out for mixing")
        if not held[present].any() or held[present].all():
            held[present] = False
            held[present[0]] = True
        return held[train.sequence_index]

    def fit(self, train: WindowSet, val: WindowSet, log: Callable[[dict], None]) -> None:
        for member in self.members:
            member.data_geometry(train)  # a member missing an input (hidden states) fails before any training
        held = self.holdout(train)
        members_train, mixing = train.subset(~held), train.subset(held)
        for member in self.members:
            # metrics per member (a dvclive folder each), epochs numbered as the member logs them
            member.fit(members_train, val, lambda row, name=member.arch: log(
                {key if key == "epoch" else f"{name}/{key}": value for key, value in row.items()}))
            self.geometry = {**self.geometry, **member.geometry}  # sizes members read off the data (hidden_dim)
        self.mix_logits = self.fit_mixing(mixing)
        weights = torch.softmax(torch.from_numpy(self.mix_logits), dim=1).mean(dim=0)
        log({f"ensemble_weight/{m.arch}": float(w) for m, w in zip(self.members, weights)})

    def member_log_probs(self, windows: WindowSet) -> torch.Tensor:
        """(M, N, E) log of each member's scores normalised to a distribution."""
        out = []
        for member in self.members:
            scores = np.clip(member.score(windows)[0].astype(np.float64), 0, None)
            total = scores.sum(axis=1, keepdims=True)
            probs = np.divide(scores, total, out=np.full_like(scores, 1 / scores.shape[1]), where=total > 0)
            out.append(np.log(np.clip(probs, FLOOR, None)))
        return torch.from_numpy(np.stack(out).astype(np.float32))

    def combine(self, log_probs: torch.Tensor, target_layer: np.ndarray, mix_logits: torch.Tensor) -> torch.Tensor:
        """(M, N, E) member log-probs -> (N, E) mixed logits with the target layers' weights."""
        weights = torch.softmax(mix_logits[torch.from_numpy(target_layer.astype(np.int64))], dim=1)  # (N, M)
        return torch.einsum("nm,mne->ne", weights, log_probs)

    def fit_mixing(self, windows: WindowSet) -> np.ndarray:
        """Per-layer mixing logits minimising soft cross-entropy against the gate weights of `windows`."""
        log_probs = self.member_log_probs(windows)  # (M, N, E)
        target = torch.from_numpy(target_distribution(windows, self.num_experts))  # (N, E)
        mix = torch.zeros(self.mix_logits.shape, requires_grad=True)  # start from the plain geometric mean
        optimizer = torch.optim.Adam([mix], lr=0.1)
        for _ in range(self.section["mix_steps"]):
            mixed = self.combine(log_probs, windows.target_layer, mix)
            loss = -(target * torch.log_softmax(mixed, dim=1)).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return mix.detach().numpy().astype(np.float32)

    @torch.no_grad()
    def score(self, windows: WindowSet) -> tuple[np.ndarray, np.ndarray]:
        mixed = self.combine(self.member_log_probs(windows), windows.target_layer, torch.from_numpy(self.mix_logits))
        probs = torch.softmax(mixed, dim=1).numpy()
        return probs, probs.max(axis=1)

    def state(self) -> dict[str, np.ndarray]:
        arrays = {"mix_logits": self.mix_logits}
        for index, member in enumerate(self.members):
            arrays.update({self.prefix(index) + key: value for key, value in member.state().items()})
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.mix_logits = arrays["mix_logits"]
        for index, member in enumerate(self.members):
            prefix = self.prefix(index)
            member.load_state({key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)})

    def parameter_count(self) -> int:
        return int(sum(member.parameter_count() for member in self.members) + self.mix_logits.size)
