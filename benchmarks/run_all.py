"""Run every benchmark (quick defaults), each in its own process, then print a markdown table:
benchmark | measured | target | status | command.

    python benchmarks/run_all.py [--only tracing storage ...] [--big] [--full-repro] [--markdown results.md]

--big passes --big to every benchmark (minutes each); --full-repro adds `dvc repro` from scratch (~10 min).
Exit status 1 when a target is missed or a benchmark crashed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCHMARKS = ["tracing", "storage", "windows", "training", "inference", "export", "replay", "import", "repro"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    p.add_argument("--big", action="store_true", help="bigger sizes and more rounds")
    p.add_argument("--full-repro", action="store_true", help="also dvc repro from scratch (bench_repro.py --full)")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args()

    rows, timings = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name in args.only or BENCHMARKS:
            script = HERE / f"bench_{name}.py"
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(script), "--json", str(out)] + (["--big"] if args.big else [])
            if name == "repro" and args.full_repro:
                cmd.append("--full")
            print(f"\n===== {name}: {' '.join(cmd[1:])}", flush=True)
            started = time.perf_counter()
            code = subprocess.call(cmd, cwd=REPO)
            timings[name] = time.perf_counter() - started
            if out.exists():
                rows.extend(json.loads(out.read_text()))
            if code:
                rows.append({"benchmark": f"bench_{name}.py", "measured": f"crashed (exit {code})", "target": "-",
                             "status": "ERROR", "command": f"python benchmarks/bench_{name}.py"})

    lines = ["| benchmark | measured | target | status | command |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row["benchmark"], row["measured"], row["target"], row["status"], f"`{row['command']}`"]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    print("\nwall time per benchmark: " + ", ".join(f"{n} {t:.0f}s" for n, t in timings.items()))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    sys.exit(1 if any(r["status"] in ("FAIL", "ERROR") for r in rows) else 0)


if __name__ == "__main__":
    main()
