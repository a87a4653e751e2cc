"""Windows stage: (1) speed of stages.windows.shard_windows vs a straightforward per-token Python loop producing the
same windows (checked equal), target >= 50x; (2) peak RSS of `python -m stages.windows` at 1x and 10x the default
data size (synthetic shards of moe_prefetch/synthetic.py: 1x ~128k tokens, 8 MoE layers, k=2, E=16, shards of 100k
rows; 10x = ten times the tokens), target 10x / 1x <= 1.5. One subprocess per measurement, started by a small
launcher process whose RUSAGE_CHILDREN ru_maxrss is then that run's peak alone. On a miss (or with --memtrace) the stage is re-run with its phases instrumented to show where memory grows.

    python benchmarks/bench_windows.py [--tokens 128000] [--loop-tokens 20000] [--memtrace]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from common import (
    REPO,
    Row,
    Stats,
    alternate,
    command_line,
    default_section,
    finish,
    parser,
    print_sides,
    rounds_of,
)

from moe_prefetch.synthetic import write_synthetic_shards

TARGET_SPEED = 50.0
TARGET_RSS = 1.5


def loop_windows(table: pa.Table, num_layers: int, top_k: int, context_length: int, horizon: int, schema: pa.Schema) -> pa.Table:
    """The windows of one shard (no carry from a previous shard), one token and one target layer at a time."""
    sequence = table["sequence_id"].to_pylist()
    domain = table["domain"].to_pylist()
    position = table["position"].to_pylist()
    experts = table["experts"].to_pylist()  # per token: L lists of k experts
    weights = table["weights"].to_pylist()
    out = {name: [] for name in ("sequence_id", "domain", "position", "target_layer", "context_experts", "target_experts",
                                 "target_weights", "prev_token_experts")}
    none = [-1] * top_k
    for i in range(len(sequence)):
        has_previous = i > 0 and sequence[i - 1] == sequence[i] and position[i - 1] + 1 == position[i]
        for target in range(context_length - 1 + horizon, num_layers):
            context = []
            for layer in range(target - horizon - context_length + 1, target - horizon + 1):
                context.extend(experts[i][layer])
            out["sequence_id"].append(sequence[i])
            out["domain"].append(domain[i])
            out["position"].append(position[i])
            out["target_layer"].append(target)
            out["context_experts"].append(context)
            out["target_experts"].append(experts[i][target])
            out["target_weights"].append(weights[i][target])
            out["prev_token_experts"].append(experts[i - 1][target] if has_previous else none)
    return pa.table(out, schema=pa.schema([schema.field(name) for name in out]))


def speed(args, shard_dir: Path, params, rows: list[Row]) -> None:
    from moe_prefetch import traces
    from moe_prefetch.windows.build import build_windows, shard_windows

    manifest = traces.Manifest.read(shard_dir)
    table = pq.read_table(shard_dir / manifest.shards[0]["file"]).slice(0, args.loop_tokens)
    L, k = manifest.num_layers, manifest.top_k
    c, h = params.context_length, params.horizon
    vectorised, _ = shard_windows(table, manifest, params, None)
    reference = loop_windows(table, L, k, c, h, vectorised.schema)
    extra = [n for n in vectorised.column_names if n not in reference.column_names]
    equal = vectorised.select(reference.column_names).equals(reference)
    print(f"speed: {table.num_rows} tokens -> {vectorised.num_rows} windows (context {c}, horizon {h}); "
          f"loop output {'EQUALS' if equal else 'DIFFERS FROM'} shard_windows'" + (f" (extra columns not compared: {extra})" if extra else ""))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-windows-out-"))

    def whole_stage():
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        return build_windows(shard_dir, out_dir, params)

    times = alternate({"shard_windows (vectorised)": lambda: shard_windows(table, manifest, params, None),
                       "per-token Python loop": lambda: loop_windows(table, L, k, c, h, vectorised.schema),
                       f"build_windows (all {manifest.rows} tokens)": whole_stage},
                      rounds=rounds_of(args))
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"  per call, on {table.num_rows} tokens (build_windows: the whole 1x data, split + written):")
    stats = print_sides(times)
    vec, loop = stats["shard_windows (vectorised)"], stats["per-token Python loop"]
    stage = stats[f"build_windows (all {manifest.rows} tokens)"]
    ratio = loop.median / vec.median
    rate = lambda tokens, s: tokens / s.median  # noqa: E731
    stage_ratio = rate(manifest.rows, stage) / rate(table.num_rows, loop)
    print(f"  speed-up loop / shard_windows = {ratio:.1f}x (extremes {loop.low / vec.high:.1f} .. {loop.high / vec.low:.1f}); "
          f"tokens/s: shard_windows {rate(table.num_rows, vec) / 1e3:.0f}k, build_windows {rate(manifest.rows, stage) / 1e3:.0f}k, "
          f"loop {rate(table.num_rows, loop) / 1e3:.0f}k (build_windows / loop = {stage_ratio:.1f}x)")
    status = "PASS" if ratio >= TARGET_SPEED and equal else "FAIL"
    rows.append(Row("windows: shard_windows speed-up over per-token loop", f"{ratio:.0f}x" + ("" if equal else " (OUTPUT DIFFERS)"),
                    f">= {TARGET_SPEED:.0f}x, equal output", status, command_line("bench_windows.py"),
                    [f"{table.num_rows} tokens, {rate(table.num_rows, vec) / 1e3:.0f}k tokens/s vectorised"]))
    rows.append(Row("windows: build_windows (whole stage) tokens/s over loop's", f"{stage_ratio:.1f}x "
                    f"({rate(manifest.rows, stage) / 1e3:.0f}k tokens/s)", "report (>= 50x intended)", "INFO", command_line("bench_windows.py")))
    if status == "FAIL" or args.profile:
        profile_stage(table, manifest, params, shard_dir)


def profile_stage(table: pa.Table, manifest, params, shard_dir: Path) -> None:
    """Where shard_windows and build_windows spend their time (cProfile, own time; C calls such as pa.array of
    Python objects are charged to the calling line's function)."""
    import cProfile
    import io
    import pstats

    from moe_prefetch.windows.build import build_windows, shard_windows

    for label, call in (("shard_windows x5", lambda: [shard_windows(table, manifest, params, None) for _ in range(5)]),
                        ("build_windows (1x)", None)):
        profiler = cProfile.Profile()
        if call is None:
            out = Path(tempfile.mkdtemp(prefix="bench-windows-prof-"))
            profiler.enable()
            build_windows(shard_dir, out, params)
            profiler.disable()
            shutil.rmtree(out, ignore_errors=True)
        else:
            profiler.enable()
            call()
            profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(10)
        print(f"cProfile {label}, by own time:")
        print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))
    # the lines cProfile cannot split: shard_windows' own time, piece by piece
    import numpy as np

    from moe_prefetch import traces
    from moe_prefetch.windows.build import TokenRows

    def timed(label, fn, n=5):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"    {label:<58} {(time.perf_counter() - started) / n * 1e3:7.1f} ms")

    print(f"  pieces of shard_windows on {table.num_rows} tokens (same work, timed alone):")
    G = manifest.num_layers - params.context_length - params.horizon + 1
    timed("TokenRows.of (run codes of sequence ids, experts, weights)", lambda: TokenRows.of(table, manifest))
    timed("sequence_id column: take(np.repeat(arange))", lambda: table["sequence_id"].take(np.repeat(np.arange(table.num_rows), G)))
    experts = traces.column_to_numpy(table["experts"], (manifest.num_layers, manifest.top_k))
    targets = np.arange(params.context_length - 1 + params.horizon, manifest.num_layers)
    layers = targets[:, None] - params.horizon - params.context_length + 1 + np.arange(params.context_length)[None, :]
    timed("context_experts: fancy-index gather + nested_array", lambda: traces.nested_array(experts[:, layers, :].reshape(-1, params.context_length * manifest.top_k), pa.int16()))

LAUNCHER = r"""
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.call(sys.argv[1:])
print(f"__RUSAGE__ {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {time.perf_counter() - started} {code}", flush=True)
"""


def run_child(argv: list[str], cwd: Path) -> tuple[float, float, int, str]:
    """(peak RSS MiB, wall seconds, exit code, output) of one run of `argv`. A small launcher process runs it and
    reads RUSAGE_CHILDREN: the launcher has one child, so that is this run's peak. (Read directly from this big
    process, a child's ru_maxrss would include the pages it shared with this process before exec.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = result.stdout.decode(errors="replace")
    last = [line for line in output.splitlines() if line.startswith("__RUSAGE__")][-1].split()
    return int(last[1]) / 1024, float(last[2]), int(last[3]), output.replace(" ".join(last), "")


MEMTRACE = r"""
import sys, time
import numpy as np
import moe_prefetch.windows.build as w
import stages.windows

def rss():
    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return f"RSS {int(fields['VmRSS'].split()[0]) / 1024:7.1f} MiB, peak {int(fields['VmHWM'].split()[0]) / 1024:7.1f} MiB"

def wrap(name):
    original = getattr(w, name)
    def wrapped(*a, **kw):
        print(f"  memtrace: before {name:<15} {rss()}", flush=True)
        out = original(*a, **kw)
        print(f"  memtrace: after  {name:<15} {rss()}", flush=True)
        return out
    setattr(w, name, wrapped)

for name in ('assign_splits', 'shard_windows', 'write_json'):
    wrap(name)
print(f"  memtrace: after imports          {rss()}", flush=True)
sys.argv = ['stages.windows'] + sys.argv[1:]
stages.windows.main()
print(f"  memtrace: end                    {rss()}", flush=True)
"""


def memory(args, shard_dirs: dict[str, Path], params_file: Path, work: Path, rows: list[Row]) -> None:
    python = sys.executable
    floor, _, _, _ = run_child([python, "-c", "import stages.windows, moe_prefetch.windows.build, pyarrow.parquet, numpy"], work)
    print(f"memory: peak RSS of importing the stage's modules alone: {floor:.0f} MiB")
    peaks: dict[str, list[float]] = {name: [] for name in shard_dirs}
    repeats = 2 if args.big else 1
    for _ in range(repeats):
        for name, shard_dir in shard_dirs.items():  # alternate 1x, 10x
            out = work / f"windows-{name}"
            peak, seconds, code, output = run_child([python, "-m", "stages.windows", "--shards", str(shard_dir), "--out", str(out),
                                                     "--params", str(params_file)], work)
            if code:
                raise SystemExit(f"windows stage failed on {name}:\n{output}")
            peaks[name].append(peak)
            print(f"  {name:>3}: peak RSS {peak:7.1f} MiB, {seconds:5.1f} s wall  | {output.strip().splitlines()[-1]}")
            shutil.rmtree(out, ignore_errors=True)
    one, ten = (Stats.of(peaks[n]).median for n in ("1x", "10x"))
    ratio = ten / one
    above = (ten - floor) / max(one - floor, 1e-9)
    print(f"  peak RSS 10x / 1x = {ratio:.2f} (above the import floor: {above:.1f}x)")
    status = "PASS" if ratio <= TARGET_RSS else "FAIL"
    rows.append(Row("windows: peak RSS 10x / 1x data", f"{ratio:.2f}x ({one:.0f} -> {ten:.0f} MiB)", f"<= {TARGET_RSS}x", status,
                    command_line("bench_windows.py"), [f"import floor {floor:.0f} MiB"]))
    if status == "FAIL" or args.memtrace:
        for name, shard_dir in shard_dirs.items():
            print(f"memtrace ({name}): RSS at the stage's phase boundaries")
            out = work / f"windows-trace-{name}"
            _, _, code, output = run_child([python, "-c", MEMTRACE, "--shards", str(shard_dir), "--out", str(out),
                                            "--params", str(params_file)], work)
            lines = [line for line in output.splitlines() if "memtrace" in line]
            shown = lines if len(lines) <= 12 else lines[:6] + ["  ..."] + lines[-5:]
            print("\n".join(shown))
            shutil.rmtree(out, ignore_errors=True)


def run(args) -> list[Row]:
    params, source = default_section("windows")
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="bench-windows-"))
    try:
        params_file = work / "params.yaml"
        raw = yaml.safe_load((REPO / "params.yaml").read_text()) if source == "params.yaml" else {}
        params_file.write_text(yaml.safe_dump({"windows": (raw or {}).get("windows") or {}}))
        started = time.perf_counter()
        shard_dirs = {"1x": work / "shards-1x"}
        write_synthetic_shards(shard_dirs["1x"], args.tokens, rows_per_shard=args.rows_per_shard, seed=1)
        print(f"windows params from {source}: context {params.context_length}, horizon {params.horizon}, "
              f"token_context {getattr(params, 'token_context', 0)}, token_horizon {getattr(params, 'token_horizon', 0)}")
        speed(args, shard_dirs["1x"], params, rows)
        generated = time.perf_counter() - started
        if not args.no_memory:
            started = time.perf_counter()
            shard_dirs["10x"] = work / "shards-10x"
            write_synthetic_shards(shard_dirs["10x"], args.tokens * 10, rows_per_shard=args.rows_per_shard, seed=2)
            print(f"(synthetic shards written in {generated:.0f} s (1x) + {time.perf_counter() - started:.0f} s (10x))")
            memory(args, shard_dirs, params_file, work, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=128_000, help="tokens of the 1x data (10x is ten times this)")
    p.add_argument("--rows-per-shard", type=int, default=100_000)
    p.add_argument("--loop-tokens", type=int, default=None, help="tokens of the speed comparison (default 20k, 100k with --big)")
    p.add_argument("--memtrace", action="store_true", help="show RSS at the stage's phase boundaries even on a pass")
    p.add_argument("--no-memory", action="store_true", help="speed comparison only")
    p.add_argument("--profile", action="store_true", help="profile the stage even when the speed target is met")
    args = p.parse_args()
    args.loop_tokens = args.loop_tokens or (100_000 if args.big else 20_000)
    finish(args, run(args))


if __name__ == "__main__":
    main()
