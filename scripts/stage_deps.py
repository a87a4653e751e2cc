"""The code each DVC stage runs: the transitive closure of `moe_prefetch` modules that `stages/<stage>.py` imports
(every `import` statement, including those inside functions), plus the `__init__.py` of each package on the way.

dvc.yaml must list exactly these as the stage's code deps (a directory stands for all its modules, allowed only
when the stage imports every module in it), so that editing a module re-runs the stages that run it and no
other; tests/test_dvc_deps.py checks it. Print what dvc.yaml should hold:

    python scripts/stage_deps.py            # every stage
    python scripts/stage_deps.py evaluate   # one stage
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moe_prefetch"


def module_file(name: str) -> Path | None:
    """The file of dotted module `name` inside the repo, or None (not ours, or a name inside a module)."""
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the project modules `path` imports (`from a import b` counts a.b when b is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in (PACKAGE, "stages") and module_file(name)}


def closure(stage: str) -> list[str]:
    """Repo-relative paths of every module the stage's entry point runs, sorted."""
    seen: set[Path] = set()
    todo = [ROOT / "stages" / f"{stage}.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
                found = module_file(".".join(parts[:depth]))
                if found is not None:
                    todo.append(found)
    return sorted(str(p.relative_to(ROOT)) for p in seen if p.name != "__init__.py" or p.parent.name != "stages")


def compact(paths: list[str]) -> list[str]:
    """Replace every directory whose Python files are all in `paths` (recursively) by the directory itself."""
    chosen = set(paths)
    directories = sorted({str(Path(p).parent) for p in paths}, key=lambda d: d.count("/"))
    for directory in directories:
        if directory in ("", ".", PACKAGE) or any(directory.startswith(f"{d}/") for d in chosen if not d.endswith(".py")):
            continue
        modules = {str(p.relative_to(ROOT)) for p in (ROOT / directory).rglob("*.py") if "__pycache__" not in p.parts}
        if modules <= chosen:
            chosen = {p for p in chosen if not p.startswith(f"{directory}/")} | {directory}
    return sorted(chosen)


def stage_code_deps(stage: str) -> list[str]:
    return compact(closure(stage))


if __name__ == "__main__":
    import yaml

    stages = sys.argv[1:] or list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    for name in stages:
        print(f"{name}:")
        for dep in stage_code_deps(name):
            print(f"  - {dep}")
