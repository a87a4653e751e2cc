"""collect.import at scale: records/s and peak RSS of moe_prefetch.collect.importer.import_traces on JSON Lines
routing logs of 10^6 and 10^7 records (one record per (sequence, token, MoE layer), as a serving engine logs them).

Data: synthetic records of 128-token sequences over 8 MoE layers, 16 experts, top-2 (the default model's geometry),
distinct experts and weights summing to 1 (4 decimals), with token ids; each sequence's records in token order,
layers in a random order (an engine logs a token's layers as they finish). Each import runs in its own fresh process that
reports its peak RSS (VmHWM) and wall time; a process that only imports the modules gives the baseline RSS.
Target: memory flat in the number of records, peak RSS at the largest size / the smallest <= 1.5.

    python benchmarks/bench_import.py [--sizes 1000000 10000000] [--keep DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, Row, command_line, finish, parser, verdict

TARGET_RSS_RATIO = 1.5
TOKENS, LAYERS, EXPERTS, TOP_K = 128, 8, 16, 2
WRITE_TOKENS = 1 << 16  # tokens formatted per write call

CHILD = """
import json, sys, time
from pathlib import Path
from moe_prefetch.collect.importer import import_traces
from moe_prefetch.params import parse_section
started = time.perf_counter()
if sys.argv[1] != "-":
    import_traces(parse_section("collect", {"import": sys.argv[1]}), Path(sys.argv[2]))
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: the latter survives exec and so counts the parent's memory at fork time
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "rss_mb": peak_kb / 1024}))
"""


def write_records(path: Path, records: int, seed: int = 0) -> None:
    """`records` JSON Lines records (rounded down to whole tokens) of synthetic routing, LAYERS per token, written by
    pandas' C JSON writer WRITE_TOKENS tokens at a time."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    tokens = records // LAYERS
    with open(path, "w") as handle:
        for first in range(0, tokens, WRITE_TOKENS):
            token = np.repeat(np.arange(first, min(first + WRITE_TOKENS, tokens)), LAYERS)  # (n,) each token LAYERS times
            count = len(token)
            layer = np.argsort(rng.random((count // LAYERS, LAYERS)), axis=1).ravel()  # a token's layers in a random order
            experts = np.argsort(rng.random((count, EXPERTS)), axis=1)[:, :TOP_K]  # (n, k) distinct
            top = rng.uniform(0.5, 1.0, count).round(4)
            frame = pd.DataFrame({
                "sequence_id": np.char.add("s", (token // TOKENS).astype(str)), "position": token % TOKENS, "layer": layer,
                "experts": experts.tolist(), "weights": np.stack([top, 1 - top], axis=1).round(4).tolist(),
                "token_id": np.repeat(rng.integers(0, 32000, count // LAYERS), LAYERS),
            })
            text = frame.to_json(orient="records", lines=True, double_precision=4)
            handle.write(text if text.endswith("\n") else text + "\n")


def child(args: list[str]) -> dict:
    """Run CHILD in a fresh interpreter (repository on the path); its JSON report."""
    out = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(f"import failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="records per run, ascending")
    p.add_argument("--keep", type=Path, default=None, help="write the generated inputs here (kept) instead of a temp dir")
    args = p.parse_args()
    baseline = child(["-"])["rss_mb"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            source = work / f"records-{size}.jsonl"
            started = time.perf_counter()
            if not source.exists():
                write_records(source, size)
            print(f"{size:,} records: {source.stat().st_size / 1e6:.0f} MB of JSON Lines (written in {time.perf_counter() - started:.0f} s)",
                  flush=True)
            report = child([str(source), str(work / f"traces-{size}")])
            results.append((size, size / report["seconds"], report["rss_mb"], report["seconds"]))
    print(f"\nbaseline RSS (interpreter + modules, no import): {baseline:.0f} MB")
    print(f"{'records':>12} {'records/s':>12} {'peak RSS MB':>12} {'seconds':>9}")
    for size, rate, rss, seconds in results:
        print(f"{size:>12,} {rate:>12,.0f} {rss:>12.0f} {seconds:>9.1f}")
    (small, _, small_rss, _), (large, _, large_rss, _) = results[0], results[-1]
    ratio = large_rss / small_rss
    print(f"peak RSS {large:,} / {small:,} records: {ratio:.2f} (flat = 1; records x{large / small:.0f})")
    command = command_line("bench_import.py", ["--sizes", *map(str, args.sizes)])
    rows = [
        Row("bench_import.py: peak RSS ratio", f"{ratio:.2f} ({small_rss:.0f} -> {large_rss:.0f} MB for {small:,} -> {large:,} records)",
            f"<= {TARGET_RSS_RATIO}", verdict(ratio, TARGET_RSS_RATIO, "<="), command),
        Row("bench_import.py: throughput", ", ".join(f"{size:,}: {rate:,.0f} records/s" for size, rate, _, _ in results), "report", "INFO",
            command),
    ]
    finish(args, rows)


if __name__ == "__main__":
    main()
