"""The command line every DVC stage shares: parse the paths dvc.yaml passes, load and validate the stage's params
section, and turn a PipelineError (or an OS error writing outputs) into one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_prefetch.config import load_section
from moe_prefetch.errors import PipelineError


def stage_arguments(section: str, schema: type, description: str, *paths: str) -> tuple[Any, argparse.Namespace]:
    """Parse `--<path> DIR` for each path the stage reads or writes (dvc.yaml passes them) and `--params`,
    then load params section `section` of that file as the config dataclass `schema`: (params, args)."""
    parser = argparse.ArgumentParser(description=description)
    for name in paths:
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    return load_section(section, schema, args.params), args


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
