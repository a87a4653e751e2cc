"""The `windows` section of params.yaml: context length, horizon, temporal extents and the document split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_prefetch.config import doc, non_negative, positive
from moe_prefetch.errors import PipelineError


@dataclass
class SplitParams:
    by: Literal["sequence", "domain"] = doc("Split whole documents at random (sequence) or hold out a domain as test.", "sequence")
    test_domain: str | None = doc("With by: domain, the domain held out as the test split.", None)
    fractions: list = doc("train/val/test shares of documents (by: sequence) or train/val of the rest (by: domain).", factory=lambda: [0.8, 0.1, 0.1])
    seed: int = doc("Seed of the split.", 0)

    def validate(self) -> None:
        want = 3 if self.by == "sequence" else 2
        if len(self.fractions) != want or any(not isinstance(f, (int, float)) or f < 0 for f in self.fractions):
            raise PipelineError(f"windows.split.fractions: by {self.by} needs {want} non-negative numbers, got {self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise PipelineError(f"windows.split.fractions: must sum to 1, got {self.fractions} (sum {sum(self.fractions):g})")
        if self.by == "domain" and not self.test_domain:
            raise PipelineError("windows.split.test_domain: required when windows.split.by is domain")


@dataclass
class WindowsParams:
    context_length: int = doc("MoE layers of routing history in a context, ending at layer l.", 3)
    horizon: int = doc("The target is MoE layer l + horizon.", 1)
    split: SplitParams = doc("How documents are split into train/val/test.", factory=SplitParams)
    token_context: int = doc(
        "Previous tokens i-T..i-1 whose routing at the context layers and at the target layer each window carries "
        "(column token_context_experts, -1 before the sequence start); 0 = none. Diagram: moe_prefetch/windows/data.py.", 0)
    token_horizon: int = doc(
        "Next tokens i+1..i+H whose target-layer routing each window carries (next_token_experts/weights, -1/0 after "
        "the sequence end) for the hybrid's temporal head; the target stays token i's own. 0 = none.", 0)
    token_ids: bool = doc(
        "Also store each window's tokenizer id (column token_id), which the `token` baseline keys on (the token id is "
        "the strongest signal an engine has, so the default run measures it).", True)
    context_weights: bool = doc(
        "Also store the context layers' gate weights (column context_weights, aligned with context_experts), which "
        "predictors with context_encoding weighted_set or both read (the default token_mlp's, since stop 23).", True)
    across_tokens: bool = doc(
        "Count the context and the horizon in the decode stream (token, layer) across token boundaries: every MoE layer "
        "is a target, a context may reach into the previous tokens' last layers (-1 before the sequence start), the "
        "horizon may reach L (the next token's same layer, a whole forward pass ahead), and token_id is the newest id "
        "known when the prediction is issued. Off: targets c-1+h .. L-1 of token i's own routing. Diagram: "
        "moe_prefetch/windows/data.py.", False)

    def validate(self) -> None:
        positive("windows", self, "context_length", "horizon")
        non_negative("windows", self, "token_context", "token_horizon")
        if self.across_tokens and self.token_context:
            raise PipelineError(f"windows.token_context: {self.token_context} with windows.across_tokens is not supported "
                                "(the context already reaches into the previous tokens); accepted: 0")
        self.split.validate()
