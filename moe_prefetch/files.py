"""Atomic writes: an output is complete or absent, never half-written (temp sibling, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
