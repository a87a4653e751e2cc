"""dvc.yaml's code deps are exactly what each stage runs (scripts/stage_deps.py derives them from the imports),
stages import library modules only, and the package has no import cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from stage_deps import PACKAGE, compact, imported_modules, module_file, stage_code_deps  # noqa: E402

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: str) -> list[str]:
    return sorted(dep for dep in STAGES[stage]["deps"] if dep.startswith((f"{PACKAGE}/", "stages/")))


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_lists_exactly_the_code_each_stage_runs(stage):
    expected = stage_code_deps(stage)
    assert code_deps(stage) == expected, (
        f"dvc.yaml stage {stage}: code deps differ from what it imports; `python scripts/stage_deps.py {stage}` "
        f"prints the list: {expected}")


def test_a_docstring_edit_in_a_predictor_reruns_train_and_evaluate_only():
    touched = {stage for stage in STAGES if any("moe_prefetch/predictors/mlp.py".startswith(dep) for dep in code_deps(stage))}
    assert touched == {"validate", "train", "evaluate"}  # validate (the train schema) re-runs, its marker stays the same


def test_compact_replaces_a_directory_only_when_every_module_in_it_is_used():
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / PACKAGE / "routing").glob("*.py"))
    assert compact(modules) == [f"{PACKAGE}/routing"]
    assert compact(modules[1:]) == modules[1:]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stages_import_library_modules_never_another_stage(stage):
    imported = imported_modules(ROOT / "stages" / f"{stage}.py")
    assert not [name for name in imported if name.split(".")[0] == "stages"], imported


def top_level_imports(path: Path) -> set[Path]:
    """Project modules imported at module level (what runs at import time, where a cycle breaks)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    files = {module_file(name) for name in names if name.split(".")[0] == PACKAGE}
    return {f for f in files if f is not None and f != path}


def test_the_package_has_no_import_cycle():
    graph = {path: top_level_imports(path) for path in (ROOT / PACKAGE).rglob("*.py")}
    # an __init__ that imports its own submodules (to register them) is not a cycle with them
    state: dict[Path, int] = {}

    def visit(path: Path, trail: list[Path]) -> None:
        state[path] = 1
        for target in graph.get(path, ()):
            if target.name == "__init__.py" and path.is_relative_to(target.parent):
                continue  # a module importing its own package's __init__ (already executing)
            if state.get(target) == 1:
                cycle = trail[trail.index(target):] + [target] if target in trail else [path, target]
                raise AssertionError("import cycle: " + " -> ".join(str(p.relative_to(ROOT)) for p in cycle))
            if target not in state:
                visit(target, trail + [target])
        state[path] = 2

    for path in graph:
        if path not in state:
            visit(path, [path])
