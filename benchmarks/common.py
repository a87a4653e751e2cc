"""Shared helpers of the benchmarks: alternating timing, robust statistics, PASS/FAIL rows, synthetic windows.

Every benchmark measures both sides of a comparison in the same process and run, alternating A B A B ... over
several rounds (after a warm-up call of each side), and reports the median and the spread (min-max and IQR) of
each side and the ratio of the medians. Machines running these are often shared, so a ratio of medians of
interleaved measurements is what is compared against a target, never one absolute time against another run's.

A benchmark script exposes `run(args) -> list[Row]` and a `main()` that prints its rows; `--json PATH` writes
them for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL = REPO / "models" / "tiny-moe"


# -- statistics --------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    median: float
    low: float  # min
    high: float  # max
    q1: float
    q3: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Stats:
        values = sorted(values)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
        return Stats(statistics.median(values), values[0], values[-1], q1, q3, len(values))

    def show(self, unit: str = "s", scale: float = 1.0, digits: int = 4) -> str:
        f = lambda v: f"{v * scale:.{digits}g}"  # noqa: E731
        return f"median {f(self.median)} {unit} (min {f(self.low)} .. max {f(self.high)}, IQR {f(self.q1)} .. {f(self.q3)}, n={self.n})"


def alternate(sides: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1, inner: int = 1,
              before: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time each side `rounds` times, interleaved A B C A B C ...; a measurement is the mean of `inner` calls.
    `before(name)` (untimed) runs before each measurement, e.g. to attach or detach hooks."""
    for _ in range(warmup):
        for name, fn in sides.items():
            if before:
                before(name)
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            if before:
                before(name)
            started = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - started) / inner)
    return times


def print_sides(times: dict[str, list[float]], unit: str = "ms", scale: float = 1e3, per: str = "") -> dict[str, Stats]:
    stats = {name: Stats.of(values) for name, values in times.items()}
    width = max(len(n) for n in stats)
    for name, s in stats.items():
        print(f"  {name:<{width}}  {s.show(unit + per, scale)}")
    return stats


# -- result rows -------------------------------------------------------------------------------------------------
@dataclass
class Row:
    benchmark: str
    measured: str
    target: str
    status: str  # PASS | FAIL | INFO | SKIP
    command: str
    notes: list[str] = field(default_factory=list)


def verdict(value: float, limit: float, kind: str) -> str:
    """kind '<=' (value must not exceed limit) or '>='."""
    ok = value <= limit if kind == "<=" else value >= limit
    return "PASS" if ok else "FAIL"


def command_line(script: str, extra: list[str] | None = None) -> str:
    return " ".join(["python", f"benchmarks/{script}", *(extra or [])])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--big", action="store_true", help="bigger sizes and more rounds (minutes)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per side (default 5, 7 with --big)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable on a shared machine; the stages use torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the result rows here (used by run_all.py)")
    return p


def finish(args, rows: list[Row]) -> None:
    print()
    for row in rows:
        print(f"RESULT {row.status:<4} {row.benchmark}: {row.measured} (target {row.target})")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


def rounds_of(args) -> int:
    return args.rounds or (7 if args.big else 5)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- synthetic data ------------------------------------------------------------------------------------------
def synthetic_windows(work: Path, num_tokens: int, seed: int = 0, hidden_dim: int = 0, **windows_overrides) -> Path:
    """Windows of synthetic routing built by stages.windows.build_windows (default windows params from params.yaml,
    then `windows_overrides` where the schema has them). Returns the windows directory."""
    import dataclasses

    from moe_prefetch.synthetic import write_synthetic_shards
    from moe_prefetch.windows.build import build_windows

    params, _ = default_section("windows")
    known = {f.name for f in dataclasses.fields(params)}
    params = dataclasses.replace(params, **{k: v for k, v in windows_overrides.items() if k in known and v})
    shards = work / "synthetic-shards"
    write_synthetic_shards(shards, num_tokens, seed=seed, hidden_dim=hidden_dim)
    out = work / "synthetic-windows"
    out.mkdir(parents=True, exist_ok=True)
    build_windows(shards, out, params)
    return out


def default_section(name: str):
    """The validated params section `name` of the repository's params.yaml (the pipeline's defaults); the schema's
    defaults if params.yaml cannot be read or validated (it may be mid-edit)."""
    import yaml

    from moe_prefetch.params import parse_section

    try:
        raw = yaml.safe_load((REPO / "params.yaml").read_text()) or {}
        return parse_section(name, raw.get(name)), "params.yaml"
    except Exception as err:  # noqa: BLE001 - fall back to the schema defaults, say so
        print(f"note: params.yaml {name} section unusable ({err}); using the schema defaults")
        return parse_section(name, {}), "schema defaults"
