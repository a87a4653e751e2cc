"""Helpers every stage shares: the CLI wrapper that turns PipelineError into a one-line exit, atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from stages.errors import PipelineError


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


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
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
