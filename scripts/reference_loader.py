"""Reference loader of moe_prefetch export dirs (python -m moe_prefetch.export), using no project code: only the
standard library (json, pathlib, argparse, sys), numpy, torch and safetensors. It is the executable form of the rules
written in each dir's manifest.json / README.md, and what tests/test_export.py checks against `predictor.score`.

    from reference_loader import load
    scorer = load("export-dir")                       # any kind: torch.export, tables, ensemble
    scores = scorer(context_experts=ids, target_layer=layers)   # numpy or torch inputs -> (B, E) float32 numpy

    python scripts/reference_loader.py EXPORT_DIR --inputs inputs.npz [--out scores.npy]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

DTYPES = {"int64": torch.int64, "float32": torch.float32}


class Scorer:
    """Common interface: `inputs` (names in manifest order) and `__call__(**inputs) -> scores (B, E)`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.manifest = json.loads((directory / "manifest.json").read_text())
        self.inputs = [spec["name"] for spec in self.manifest["inputs"]]
        self.num_experts = int(self.manifest["geometry"]["num_experts"])

    def __call__(self, **inputs) -> np.ndarray:
        missing = [name for name in self.inputs if name not in inputs]
        if missing:
            raise ValueError(f"{self.directory}: missing inputs {missing}; expected {self.inputs}")
        return self.score(inputs)


class ProgramScorer(Scorer):
    """A torch.export program: positional tensors in manifest order -> softmax scores."""

    def __init__(self, directory: Path, device: str = "cpu"):
        super().__init__(directory)
        self.device = torch.device(device)
        self.module = torch.export.load(str(directory / self.manifest["files"]["program"])).module().to(self.device)
        self.dtypes = [DTYPES[spec["dtype"]] for spec in self.manifest["inputs"]]

    def tensors(self, inputs: dict) -> list[torch.Tensor]:
        return [torch.as_tensor(inputs[name], dtype=dtype, device=self.device) for name, dtype in zip(self.inputs, self.dtypes)]

    @torch.no_grad()
    def run(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The program on ready tensors (what an engine calls; the benchmark times this)."""
        return self.module(*tensors)

    def score(self, inputs: dict) -> np.ndarray:
        return self.run(self.tensors(inputs)).float().cpu().numpy()


class TableScorer(Scorer):
    """frequency / lookup count tables, scored by the manifest's rule in numpy."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        arrays = load_file(str(directory / self.manifest["files"]["tables"]))
        self.layer_mass = arrays["layer_mass"]
        self.tie_break = float(self.manifest.get("tie_break", 0.0))
        self.tables = []  # (n, sorted void keys, original row of each, indptr, experts, mass), shortest n first
        for n in self.manifest.get("context_lengths", []):
            keys = np.ascontiguousarray(arrays[f"ctx{n}.keys"].astype(np.int16))
            void = as_void(keys)
            order = np.argsort(void)  # byte order, the order searchsorted on void rows needs
            self.tables.append((n, void[order], order, arrays[f"ctx{n}.indptr"], arrays[f"ctx{n}.experts"], arrays[f"ctx{n}.mass"]))

    def score(self, inputs: dict) -> np.ndarray:
        target = np.asarray(inputs["target_layer"]).astype(np.int64)
        prior = self.layer_mass[target].astype(np.float32)  # (B, E)
        if self.manifest["arch"] == "frequency" or not self.tables:
            return prior
        context = np.asarray(inputs["context_experts"]).astype(np.int16)  # (B, c, k)
        matched = np.zeros_like(prior)
        for n, keys, rows_of, indptr, experts, mass in self.tables:  # shortest first: longer matches overwrite
            query = as_void(np.concatenate([target[:, None].astype(np.int16), context[:, -n:, :].reshape(len(target), -1)], axis=1))
            slot = np.searchsorted(keys, query).clip(max=len(keys) - 1)
            found = np.flatnonzero(keys[slot] == query)
            if not len(found):
                continue
            rows = rows_of[slot[found]]  # table rows of the matched queries
            starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
            entry = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())  # their CSR entries
            dense = np.zeros((len(found), self.num_experts))
            dense[np.repeat(np.arange(len(found)), counts), experts[entry]] = mass[entry]
            total = dense.sum(axis=1, keepdims=True)
            matched[found] = np.divide(dense, total, out=np.zeros_like(dense), where=total > 0)
        return matched + np.float32(self.tie_break) * prior


class EnsembleScorer(Scorer):
    """Members (each an export dir) mixed by per-target-layer weights, as the manifest's rule says."""

    def __init__(self, directory: Path, device: str = "cpu"):
        super().__init__(directory)
        self.members = [load(directory / name, device) for name in self.manifest["members"]]
        self.mix_logits = torch.from_numpy(load_file(str(directory / self.manifest["files"]["mixing"]))["mix_logits"])
        self.floor = float(self.manifest["floor"])

    def score(self, inputs: dict) -> np.ndarray:
        log_probs = []
        for member in self.members:
            scores = np.clip(member(**{name: inputs[name] for name in member.inputs}).astype(np.float64), 0, None)
            total = scores.sum(axis=1, keepdims=True)
            probs = np.divide(scores, total, out=np.full_like(scores, 1 / scores.shape[1]), where=total > 0)
            log_probs.append(np.log(np.clip(probs, self.floor, None)))
        log_probs = torch.from_numpy(np.stack(log_probs).astype(np.float32))  # (M, B, E)
        target = torch.as_tensor(np.asarray(inputs["target_layer"]).astype(np.int64))
        weights = torch.softmax(self.mix_logits[target], dim=1)  # (B, M)
        return torch.softmax(torch.einsum("nm,mne->ne", weights, log_probs), dim=1).numpy()


def as_void(rows: np.ndarray) -> np.ndarray:
    """(N, w) int16 rows -> (N,) opaque byte strings, comparable and searchable as one value each."""
    rows = np.ascontiguousarray(rows)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)


def load(directory, device: str = "cpu") -> Scorer:
    """The scorer of an export dir of any kind."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: missing; export with python -m moe_prefetch.export")
    kind = json.loads(manifest_path.read_text())["kind"]
    if kind == "torch.export":
        return ProgramScorer(directory, device)
    if kind == "tables":
        return TableScorer(directory)
    if kind == "ensemble":
        return EnsembleScorer(directory, device)
    raise ValueError(f"{directory}: unknown export kind {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Score inputs with an exported predictor.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--inputs", type=Path, required=True, help=".npz with one array per manifest input name")
    parser.add_argument("--out", type=Path, help="write the scores (B, E) here as .npy (default: print top experts)")
    args = parser.parse_args()
    scorer = load(args.directory)
    with np.load(args.inputs) as data:
        scores = scorer(**{name: data[name] for name in data.files})
    if args.out:
        np.save(args.out, scores)
    else:
        np.savetxt(sys.stdout, np.argsort(-scores, axis=1, kind="stable"), fmt="%d")


if __name__ == "__main__":
    main()
