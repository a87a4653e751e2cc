"""Every registered architecture exports (moe_prefetch/export.py) to files that scripts/reference_loader.py, which
uses no project code, scores exactly as `predictor.score` does: same ranking, values within float tolerance,
at any batch size. Parametrised over ARCHITECTURES: a new architecture fails here until it exports, or is listed
in UNSUPPORTED with its reason."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import single_thread
from test_predictors import make, synthetic

from moe_prefetch.errors import PipelineError
from moe_prefetch.export import INPUT_COLUMNS, export_predictor
from moe_prefetch.predictors import ARCHITECTURES, Predictor
from moe_prefetch.windows.data import WindowSet

ROOT = Path(__file__).resolve().parents[1]
LOADER = ROOT / "scripts" / "reference_loader.py"
UNSUPPORTED: dict[str, str] = {}  # arch -> why it has no export (none today)
OVERRIDES = {  # a lookup with back-off over context lengths 1..3 (test_predictors' SMALL keys on 1 only)
    "lookup": {"lookup": {"max_context": 3}},
    "ensemble": {"lookup": {"max_context": 3}},
}


def reference_loader():
    spec = importlib.util.spec_from_file_location("reference_loader", LOADER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def with_gaps(windows: WindowSet) -> WindowSet:
    """Some context slots set to -1 (no expert), which the exported program must map as the module expects."""
    if windows.context_experts is None:  # frequency reads no context
        return windows
    context = windows.context_experts.copy()
    context[::3, 0, 1] = -1
    context[::7, :, 1] = -1
    return dataclasses.replace(windows, context_experts=context)


def export_inputs(manifest: dict, windows: WindowSet) -> dict[str, np.ndarray]:
    return {spec["name"]: getattr(windows, INPUT_COLUMNS[spec["name"]]) for spec in manifest["inputs"]}


def fitted(arch: str) -> Predictor:
    predictor = make(arch, epochs=1, **OVERRIDES.get(arch, {}))
    predictor.fit(synthetic(1500, 0, predictor.requires), synthetic(200, 1, predictor.requires), lambda row: None)
    return predictor


def assert_same_scores(expected: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.argsort(-got, axis=1, kind="stable"), np.argsort(-expected, axis=1, kind="stable"))


def test_every_unsupported_architecture_is_registered() -> None:
    assert set(UNSUPPORTED) <= set(ARCHITECTURES), f"UNSUPPORTED names unregistered archs: {sorted(set(UNSUPPORTED) - set(ARCHITECTURES))}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_exported_scores_equal_in_process_scores(arch, tmp_path) -> None:
    predictor = fitted(arch)
    if arch in UNSUPPORTED:
        with pytest.raises(PipelineError, match=r"^export: "):
            export_predictor(predictor, tmp_path / "export")
        return
    manifest = export_predictor(predictor, tmp_path / "export")
    assert manifest == json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["arch"] == arch and (tmp_path / "export" / "README.md").exists()
    windows = with_gaps(synthetic(300, 3, predictor.requires))
    expected, _ = predictor.score(windows)
    scorer = reference_loader().load(tmp_path / "export")
    inputs = export_inputs(manifest, windows)
    for spec in manifest["inputs"]:  # the manifest describes the tensors (B = any batch)
        assert list(inputs[spec["name"]].shape[1:]) == spec["shape"][1:], spec
    assert_same_scores(expected, scorer(**inputs))
    one = windows.subset(np.arange(1))  # a batch of one: the batch dimension is not baked in
    assert_same_scores(predictor.score(one)[0], scorer(**export_inputs(manifest, one)))


def test_hybrid_with_token_context_exports_its_extra_input(tmp_path) -> None:
    predictor = make("hybrid", epochs=1, hybrid={"temporal_tokens": 0, "token_context": 2})
    rng = np.random.default_rng(0)

    def windows(n: int, seed: int) -> WindowSet:
        base = synthetic(n, seed)
        tokens = rng.integers(-1, 16, (n, 2, 4, 2)).astype(np.int16)  # (N, T, c+1, k)
        return dataclasses.replace(base, token_context_experts=tokens)

    predictor.fit(windows(600, 0), windows(100, 1), lambda row: None)
    manifest = export_predictor(predictor, tmp_path)
    assert [s["name"] for s in manifest["inputs"]] == ["context_experts", "target_layer", "token_context"]
    test = with_gaps(windows(200, 2))
    assert_same_scores(predictor.score(test)[0], reference_loader().load(tmp_path)(**export_inputs(manifest, test)))


def test_reference_loader_imports_no_project_code(tmp_path) -> None:
    allowed = {"__future__", "argparse", "json", "pathlib", "sys", "numpy", "torch", "safetensors"}
    imported = set()
    for node in ast.walk(ast.parse(LOADER.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= allowed, sorted(imported - allowed)
    # and end to end in a fresh process: export via the CLI, score via the loader's CLI, no moe_prefetch module loaded
    predictor = fitted("lookup")
    predictor.save(tmp_path / "checkpoint")
    subprocess.run([sys.executable, "-m", "moe_prefetch.export", "--predictor", str(tmp_path / "checkpoint"),
                    "--out", str(tmp_path / "export")], check=True, cwd=ROOT, capture_output=True)
    windows = with_gaps(synthetic(50, 4, predictor.requires))
    np.savez(tmp_path / "inputs.npz", context_experts=windows.context_experts, target_layer=windows.target_layer)
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert not any(m.startswith('moe_prefetch') for m in sys.modules), 'project code imported'")
    subprocess.run([sys.executable, "-c", code, str(LOADER), str(tmp_path / "export"), "--inputs", str(tmp_path / "inputs.npz"),
                    "--out", str(tmp_path / "scores.npy")], check=True, cwd=tmp_path)
    assert_same_scores(predictor.score(windows)[0], np.load(tmp_path / "scores.npy"))


def test_missing_checkpoint_is_a_one_line_error(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "moe_prefetch.export", "--predictor", str(tmp_path / "none"),
                             "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: {tmp_path / 'none' / 'predictor.safetensors'}: missing")


def test_an_architecture_without_an_exporter_is_a_one_line_error(tmp_path) -> None:
    class Unknown(Predictor):
        arch = "unknown"

    with pytest.raises(PipelineError, match=r"^export: architecture 'unknown' has no exporter; supported: "):
        export_predictor(Unknown({"num_experts": 16}, {}), tmp_path)
