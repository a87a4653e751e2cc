"""Helpers shared by the scripts that run the pipeline as named DVC experiments and summarise them
(scripts/run_geometry.py, scripts/run_hidden_state.py): the `dvc exp run` command line, a timed run, and the
metrics/evaluate.json of a finished experiment from `dvc exp show --json`."""

from __future__ import annotations

import subprocess
import time

import update_readme


def exp_run_command(name: str, overrides: tuple[str, ...], temp: bool = True) -> list[str]:
    """`dvc exp run [--temp] -n name -S o ...` for every KEY=VALUE override `o`, in order."""
    return ["dvc", "exp", "run", *(["--temp"] if temp else []), "-n", name, *(arg for o in overrides for arg in ("-S", o))]


def timed_run(run: list[str]) -> float:
    """Run `run` (raising if it fails) and return its wall time in seconds."""
    started = time.monotonic()
    subprocess.run(run, check=True)
    return time.monotonic() - started


def experiment_metrics(name: str) -> dict:
    """metrics/evaluate.json of the finished experiment `name`, from `dvc exp show --json`."""
    data = update_readme.experiments_by_name().get(name)
    metrics = (data or {}).get("metrics", {}).get("metrics/evaluate.json", {}).get("data")
    if metrics is None:
        raise SystemExit(f"no finished experiment named {name} with metrics/evaluate.json in `dvc exp show`; run without --no-run")
    return metrics
