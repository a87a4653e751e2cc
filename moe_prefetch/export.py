"""Export a trained predictor into files an inference engine loads without this project:

  neural archs   program.pt2: a `torch.export` program (torch.export.save) of plain tensors in, expert scores out
  frequency      tables.safetensors: layer_mass (L, E) + the lookup rule in manifest.json and README.md
  lookup         tables.safetensors: layer_mass + per context length n the CSR table ctx{n}.keys/indptr/experts/mass
  ensemble       one export dir per member (member<i>-<arch>/) + mixing.safetensors (mix_logits (L, M)) + the rule

Every export dir has manifest.json (format, arch, geometry, inputs with names/shapes/dtypes, output, files, rule)
and README.md (the same in prose). scripts/reference_loader.py (torch, numpy, safetensors, json only) loads any of
them; tests/test_export.py checks its scores against `predictor.score` for every registered architecture.

Why torch.export and not ONNX: it needs no package beyond torch (the project pins no onnx/onnxruntime, and
the ONNX exporter of torch 2.x needs `onnx` and, for its dynamo path, `onnxscript`), and a torch-based engine
(vLLM, SGLang, a custom PyTorch loop) loads it with `torch.export.load(path).module()` and runs it on its own
device, or compiles it further (torch.compile / AOTInductor). The trade-off: a .pt2 is only loadable by torch
(of the same or a newer release; the format is not promised stable across major versions), while ONNX would be
loadable by onnxruntime, TensorRT and C++/Rust engines without torch. The count tables are plain arrays, so any
runtime can use those.

Inputs of a neural program, positional in manifest order: context_experts (B, c, k) int64, the best-first expert
ids of the c context layers, oldest first, -1 = no expert (the program maps -1 to the padding index E itself);
target_layer (B,) int64; hidden_state (B, D) float32 where the arch reads it; token_context (B, T, c+1, k) int64
(hybrid with token_context). Output: scores (B, E) float32, softmax of the expert logits, as `predictor.score`
returns (the confidence head and hybrid's temporal head are not exported). B is dynamic (1 and up).

    python -m moe_prefetch.export --predictor data/predictor --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors import Predictor, load_predictor
from moe_prefetch.predictors.ensemble import FLOOR, EnsemblePredictor
from moe_prefetch.predictors.neural import NeuralPredictor
from moe_prefetch.predictors.tables import (
    TIE_BREAK,
    FrequencyPredictor,
    LookupPredictor,
)
from moe_prefetch.windows.data import target_layers

FORMAT = "moe_prefetch.export/1"
MANIFEST, PROGRAM, TABLES, MIXING = "manifest.json", "program.pt2", "tables.safetensors", "mixing.safetensors"
ID_INPUTS = {"context_experts", "token_context"}  # expert ids: -1 (no expert) allowed, mapped inside the program
TRAINING_ONLY = {"next_token_labels"}  # batch() entries only the loss reads

INPUT_DOCS = {
    "context_experts": "best-first expert ids of the c context layers (oldest first, ending at the layer that just routed); -1 = none",
    "context_weights": "gate weights of context_experts, slot for slot, float32 (context_encoding weighted_set | both)",
    "target_layer": "the MoE layer predicted (last context layer + horizon)",
    "hidden_state": "hidden state entering the last context layer, float32",
    "token_context": "previous T tokens' routing (c context layers + target layer), oldest token first; -1 = none",
    "token_id": "tokenizer id of the token; -1 or an id beyond geometry.vocab_size - 1 = unknown",
}
INPUT_COLUMNS = {"context_experts": "context_experts", "context_weights": "context_weights", "target_layer": "target_layer",
                 "hidden_state": "hidden_state", "token_context": "token_context_experts", "token_id": "token_id"}  # input name -> WindowSet column
SCORES = {"name": "scores", "shape": ["B", "E"], "dtype": "float32",
          "meaning": "expert scores, higher = more likely (rank them; best-first = argsort descending, stable)"}

FREQUENCY_RULE = (
    "scores[b] = float32(layer_mass[target_layer[b]]): the gate-weight mass each expert received at that target layer "
    "in training, normalised to sum to 1 per layer.")
LOOKUP_RULE = (
    "prior = float32(layer_mass[target_layer[b]]). For n = max_context down to 1 (back-off order: longest context "
    "first, the first match wins): key = [target_layer[b], context_experts[b, -n:, :] flattened layer-major (oldest "
    "layer first, best-first within a layer), -1 kept] as int16 of width 1 + n*k; if a row i of ctx{n}.keys equals "
    "key, dense = zeros(E); dense[ctx{n}.experts[j]] = ctx{n}.mass[j] for j in ctx{n}.indptr[i] .. ctx{n}.indptr[i+1]-1; "
    "matched = float32(dense / dense.sum()). No n matches: matched = zeros(E). scores[b] = matched + tie_break * prior "
    "(tie_break orders experts the context never saw by their frequency). ctx{n}.keys rows are unique and sorted "
    "lexicographically as signed integers (binary search or a hash map both work).")
ENSEMBLE_RULE = (
    "For each member m (its own export dir, same inputs by name): p_m = clip(scores_m, 0) / its row sum (uniform 1/E "
    "where the sum is 0), logp_m = float32(log(max(p_m, floor))). w[b] = softmax(mix_logits[target_layer[b]]) over "
    "the M members; scores[b] = softmax(sum_m w[b, m] * logp_m[b]).")


def export_predictor(predictor: Predictor, out: Path) -> dict:
    """Write `predictor` as an export dir at `out` (replaced if present); returns its manifest."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # subclasses first: LookupPredictor is a FrequencyPredictor
    if isinstance(predictor, NeuralPredictor):
        manifest = export_neural(predictor, out)
    elif isinstance(predictor, LookupPredictor):
        manifest = export_lookup(predictor, out)
    elif isinstance(predictor, FrequencyPredictor):
        manifest = export_frequency(predictor, out)
    elif isinstance(predictor, EnsemblePredictor):
        manifest = export_ensemble(predictor, out)
    else:
        raise PipelineError(f"export: architecture {predictor.arch!r} has no exporter; supported: neural predictors, "
                            "frequency, lookup, ensemble")
    g = predictor.geometry
    targets = target_layers(g)
    manifest = {"format": FORMAT, "arch": predictor.arch, "geometry": g, "target_layers": targets,
                "parameter_count": predictor.parameter_count(), **manifest, "output": SCORES}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(readme(manifest))
    return manifest


def input_spec(name: str, shape: list, dtype: str) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, "meaning": INPUT_DOCS.get(name, "")}


class ScoreProgram(nn.Module):
    """A neural predictor's module as a function of plain tensors: maps -1 ids to the padding index, runs the
    module and returns softmax scores, exactly what NeuralPredictor.score computes."""

    def __init__(self, module: nn.Module, names: list[str], num_experts: int, vocab_size: int = 0):
        super().__init__()
        self.module, self.names, self.num_experts, self.vocab_size = module, names, num_experts, vocab_size

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = {}
        for name, tensor in zip(self.names, tensors):
            if name in ID_INPUTS:
                tensor = torch.where(tensor < 0, self.num_experts, tensor)
            elif name == "token_id":  # -1 or an id train never saw: the unknown row, as TokenMLPPredictor.batch maps it
                tensor = torch.where((tensor < 0) | (tensor >= self.vocab_size), self.vocab_size, tensor)
            inputs[name] = tensor
        return torch.softmax(self.module(inputs)[0].float(), dim=-1)


def example_inputs(predictor: NeuralPredictor, rows: int = 3) -> dict[str, torch.Tensor]:
    """The module's input dict for `rows` dummy windows, built by the predictor's own batch() (so an arch that
    reads another column exports it too)."""
    from moe_prefetch.api import known_windows

    g = predictor.geometry
    c, k, h = int(g["context_length"]), int(g["top_k"]), int(g["horizon"])
    rng = np.random.default_rng(0)
    routed = rng.integers(-1, predictor.num_experts, (rows, c, k))
    known = {}
    if "hidden_state" in predictor.requires:
        known["hidden_state"] = rng.normal(size=(rows, int(g["hidden_dim"]))).astype(np.float32)
    if "token_id" in predictor.requires:
        known["token_id"] = rng.integers(0, int(g["vocab_size"]), rows)
    if "context_weights" in predictor.requires:
        known["routed_weights"] = rng.random((rows, c, k)).astype(np.float32)
    if "token_context_experts" in predictor.requires:
        tokens = int(predictor.section["token_context"])
        known["token_context_experts"] = rng.integers(-1, predictor.num_experts, (rows, tokens, c + 1, k))
    windows = known_windows({**g, "num_layers": c + h}, routed, layer=c - 1, **known)  # any valid target layer
    inputs = predictor.batch(windows, np.arange(rows), torch.device("cpu"))
    return {name: tensor for name, tensor in inputs.items() if name not in TRAINING_ONLY}


def export_neural(predictor: NeuralPredictor, out: Path) -> dict:
    if predictor.module is None:
        raise PipelineError(f"export: {predictor.arch} checkpoint has no module (geometry lacks its sizes); re-run the train stage")
    predictor.module.eval()  # dropout off, as score() runs it
    inputs = example_inputs(predictor)
    names = list(inputs)
    batch = torch.export.Dim("batch", min=1)
    # strict (dynamo) tracing keeps len(tensor) symbolic (layer_specific, hybrid); non-strict specialises it
    with torch.no_grad():
        score_program = ScoreProgram(predictor.module, names, predictor.num_experts, int(predictor.geometry.get("vocab_size", 0)))
        program = torch.export.export(score_program.eval(),
                                      tuple(inputs.values()), dynamic_shapes=(tuple({0: batch} for _ in names),), strict=True)
    torch.export.save(program, str(out / PROGRAM))
    specs = [input_spec(name, ["B", *tensor.shape[1:]], str(tensor.dtype).removeprefix("torch.")) for name, tensor in inputs.items()]
    return {"kind": "torch.export", "inputs": specs, "files": {"program": PROGRAM},
            "rule": f"scores = torch.export.load('{PROGRAM}').module()(*inputs in manifest order): the program maps -1 "
                    "ids to the padding index itself and returns the softmax of the expert logits"}


def table_inputs(predictor: Predictor, context: bool) -> list[dict]:
    g = predictor.geometry
    specs = [input_spec("target_layer", ["B"], "int64")]
    if context:
        specs.insert(0, input_spec("context_experts", ["B", int(g["context_length"]), int(g["top_k"])], "int64"))
    return specs


def export_frequency(predictor: FrequencyPredictor, out: Path) -> dict:
    save_file({"layer_mass": np.ascontiguousarray(predictor.layer_mass)}, str(out / TABLES))
    return {"kind": "tables", "inputs": table_inputs(predictor, context=False), "files": {"tables": TABLES},
            "rule": FREQUENCY_RULE}


def export_lookup(predictor: LookupPredictor, out: Path) -> dict:
    k = int(predictor.geometry["top_k"])
    arrays = {"layer_mass": np.ascontiguousarray(predictor.layer_mass)}
    for length, table in predictor.tables.items():
        # the checkpoint's keys are opaque byte strings of int16 rows; the export gives them as int16 columns
        keys = np.frombuffer(np.ascontiguousarray(table["keys"]).tobytes(), dtype=np.int16).reshape(-1, 1 + length * k)
        order = np.lexsort(keys.T[::-1])  # numeric lexicographic order, first column most significant
        starts, counts = table["indptr"][:-1][order], np.diff(table["indptr"])[order]
        entry = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        arrays[f"ctx{length}.keys"] = np.ascontiguousarray(keys[order])
        arrays[f"ctx{length}.indptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        arrays[f"ctx{length}.experts"] = table["experts"][entry].astype(np.int64)
        arrays[f"ctx{length}.mass"] = table["mass"][entry].astype(np.float64)
    save_file(arrays, str(out / TABLES))
    return {"kind": "tables", "inputs": table_inputs(predictor, context=True), "files": {"tables": TABLES},
            "max_context": max(predictor.lengths), "context_lengths": predictor.lengths, "tie_break": TIE_BREAK,
            "rule": LOOKUP_RULE}


def export_ensemble(predictor: EnsemblePredictor, out: Path) -> dict:
    members, specs = [], {}
    for index, member in enumerate(predictor.members):
        name = f"member{index}-{member.arch}"
        manifest = export_predictor(member, out / name)
        members.append(name)
        specs.update({spec["name"]: spec for spec in manifest["inputs"]})  # same name = same tensor in every member
    save_file({"mix_logits": np.ascontiguousarray(predictor.mix_logits, dtype=np.float32)}, str(out / MIXING))
    order = ["context_experts", "target_layer", "hidden_state", "token_context"]
    inputs = sorted(specs.values(), key=lambda s: order.index(s["name"]) if s["name"] in order else len(order))
    return {"kind": "ensemble", "inputs": inputs, "members": members, "files": {"mixing": MIXING}, "floor": FLOOR,
            "rule": ENSEMBLE_RULE}


def readme(manifest: dict) -> str:
    """The manifest in prose, written next to it."""
    lines = [f"# Exported `{manifest['arch']}` predictor ({manifest['kind']}, {manifest['format']})", "",
             f"Geometry: {json.dumps(manifest['geometry'])}. Parameters: {manifest['parameter_count']:,}. "
             f"Target layers it predicts: {manifest['target_layers']}.", "",
             "Inputs (B = tokens in the batch, any size >= 1):", ""]
    lines += [f"- `{s['name']}` {s['dtype']} {s['shape']}: {s['meaning']}" for s in manifest["inputs"]]
    output = manifest["output"]
    lines += ["", f"Output: `{output['name']}` {output['dtype']} {output['shape']}: {output['meaning']}.", "",
              f"Files: {', '.join(f'`{f}`' for f in manifest['files'].values())}"
              + (f"; members: {', '.join(f'`{m}/`' for m in manifest['members'])}" if "members" in manifest else "") + ".", "",
              "Rule:", "", manifest["rule"], ""]
    if manifest["kind"] == "tables":
        lines += ["Arrays (safetensors): `layer_mass` float64 (L, E); for lookup, per context length n: `ctx{n}.keys` "
                  "int16 (K_n, 1 + n*k), `ctx{n}.indptr` int64 (K_n + 1), `ctx{n}.experts` int64, `ctx{n}.mass` float64 "
                  "(CSR: row i's entries are indptr[i]..indptr[i+1]-1).", ""]
    lines += ["A loader that uses no project code: `scripts/reference_loader.py` in the moe_prefetch repository.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a trained predictor for an inference engine (see the module docstring).")
    parser.add_argument("--predictor", type=Path, required=True, help="checkpoint dir (data/predictor)")
    parser.add_argument("--out", type=Path, required=True, help="export dir to write (replaced if present)")
    args = parser.parse_args(argv)
    try:
        manifest = export_predictor(load_predictor(args.predictor), args.out)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    shapes = ", ".join(f"{s['name']} {s['shape']}" for s in manifest["inputs"])
    print(f"exported {manifest['arch']} ({manifest['kind']}) to {args.out}: inputs {shapes} -> scores {manifest['output']['shape']}")


if __name__ == "__main__":
    main()
