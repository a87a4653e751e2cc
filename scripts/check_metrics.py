"""Compare the metrics in the working tree with the committed ones (git HEAD, or --rev) leaf by leaf, within a
tolerance: how a fresh `dvc repro` on another machine is checked against the figures the repository reports.

    dvc repro && python scripts/check_metrics.py            # exit 1 and one line per leaf outside the tolerance
    python scripts/check_metrics.py --atol 0 --rtol 0       # byte-for-byte equal numbers (same machine)

What is guaranteed: on one machine, `dvc repro --force` reproduces every output byte for byte. Across x86 CPUs,
training in float32 can differ in the last bits (BLAS kernels differ by CPU), and so can collect's forward pass
(observed once: traces 356 bytes apart, predictor top-1 0.595185 vs 0.595586), which moves metrics in the 4th decimal,
so the defaults accept |fresh - committed| <= atol + rtol * |committed| with atol 0.002 and rtol 0.01.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("metrics/headline.json", "metrics/evaluate.json", "dvclive/metrics.json")


def leaves(data, prefix: str = "") -> dict[str, float]:
    """Dotted path -> number, as `dvc metrics diff` flattens a metrics file (lists and strings are skipped)."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return {prefix[:-1]: float(data)}
    return {}


def committed(path: str, rev: str) -> dict:
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(f"error: {path}: not in git revision {rev} ({shown.stderr.strip().splitlines()[0]})")
    return json.loads(shown.stdout)


def differences(fresh: dict, reference: dict, atol: float, rtol: float) -> list[str]:
    """One line per leaf missing on either side or outside the tolerance."""
    a, b = leaves(fresh), leaves(reference)
    lines = [f"{key}: missing in the fresh run" for key in sorted(set(b) - set(a))]
    lines += [f"{key}: not in the committed metrics" for key in sorted(set(a) - set(b))]
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if not (math.isclose(x, y, rel_tol=rtol, abs_tol=atol) or (math.isnan(x) and math.isnan(y))):
            lines.append(f"{key}: {x:g} vs committed {y:g} (difference {x - y:+.3g})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="git revision holding the reference metrics")
    parser.add_argument("--atol", type=float, default=0.002)
    parser.add_argument("--rtol", type=float, default=0.01)
    args = parser.parse_args()
    failed = False
    for path in FILES:
        lines = differences(json.loads((ROOT / path).read_text()), committed(path, args.rev), args.atol, args.rtol)
        for line in lines:
            print(f"{path}: {line}")
        failed |= bool(lines)
        print(f"{path}: {'differs' if lines else 'within tolerance'} (atol {args.atol}, rtol {args.rtol})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
