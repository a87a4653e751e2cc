"""DVC stage validate: check every section of params.yaml (moe_prefetch.params.validate_all) and write the marker
--out, whose content never depends on the params.

    python -m stages.validate --out data/params.ok

dvc.yaml runs it first (collect depends on the marker) and lists all five params sections, so a bad value anywhere
fails here, before `dvc repro` deletes the outputs of the stage that reads it. The marker is the same file after
every successful run, so a change in one section re-runs this stage and that section's stage, and no other.
"""

import argparse
from pathlib import Path

from moe_prefetch.cli import run_stage
from moe_prefetch.params import validate_all

MARKER = "params.yaml passed validation (stages/validate.py); this file does not change with the params\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Validate every section of params.yaml before any stage runs.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    validate_all(args.params)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(MARKER)
    print(f"validate: {args.params} is valid -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
