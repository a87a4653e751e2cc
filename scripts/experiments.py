"""Helpers shared by the scripts that run the pipeline as named DVC experiments and summarise them
(scripts/run_geometry.py, scripts/run_hidden_state.py): the `dvc exp run` command line, a timed run, and the
metrics/evaluate.json of a finished experiment from `dvc exp show --json`."""

from __future__ import annotations

import json
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
    """metrics/evaluate.json of the finished experiment `name`: the file as committed in the experiment's commit
    (`dvc exp show --json` names it), since `dvc exp show` leaves out the list-valued metrics, every `_ci95`
    interval among them."""
    entry = update_readme.experiment_revs().get(name)
    if entry is None or (entry.get("data") or {}).get("metrics", {}).get("metrics/evaluate.json") is None:
        raise SystemExit(f"no finished experiment named {name} with metrics/evaluate.json in `dvc exp show`; run without --no-run")
    shown = subprocess.run(["git", "show", f"{entry['rev']}:metrics/evaluate.json"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"experiment {name} ({entry['rev']}): no metrics/evaluate.json in its commit: {shown.stderr.strip()}")
    return json.loads(shown.stdout)
