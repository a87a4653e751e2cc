"""Helpers every stage shares: the CLI wrapper that turns PipelineError into a one-line exit, atomic writes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stages.errors import PipelineError


def stage_arguments(section: str, description: str, *paths: str) -> tuple[Any, argparse.Namespace]:
    """Parse `--<path> DIR` for each path the stage reads or writes (dvc.yaml passes them) and `--params`,
    then load and validate the stage's params section: (params, args)."""
    parser = argparse.ArgumentParser(description=description)
    for name in paths:
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    from stages.params import load_section

    return load_section(section, args.params), args


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError or an OS error writing outputs becomes one line on stderr, exit 1."""
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # disk full, permission denied: name the path, no traceback
        print(f"error: {err.strerror or err} ({err.filename or 'output'})", file=sys.stderr)
        sys.exit(1)


TEMP_RANDOM = re.compile(r"[a-z0-9_]{8}")  # the random part tempfile.mkdtemp appends to the prefix


def remove_stale_temps(final: Path) -> None:
    """Delete the `.<name>.XXXXXXXX` temp dirs a killed run (kill -9, power loss) left beside `final`: the
    `finally` below never ran for them, and they would pile up where git, DVC and the user see them."""
    prefix = f".{final.name}."
    with os.scandir(final.parent) as entries:
        stale = [e.path for e in entries if e.name.startswith(prefix) and TEMP_RANDOM.fullmatch(e.name[len(prefix):])]
    for path in stale:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that replaces `final` only if the block succeeds.
    Temp dirs of earlier killed writes of `final` are removed first (one writer per output, as under DVC)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield temp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(temp, final)
    finally:
        shutil.rmtree(temp.parent, ignore_errors=True)


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (temp file, then rename)."""
    with atomic_path(Path(path)) as temp:
        temp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
