"""Reproduction: `dvc repro` of the default pipeline from scratch (target <= 10 min on 2 cores; opt-in: --full) and a
no-op `dvc repro` (target <= 10 s), always in a copy of the repository (the git-tracked and untracked-not-ignored
files of /work/main, then `git init && git add -A && git commit`), never in /work/main itself: a concurrent edit
between a status check and the repro would turn the "no-op" into a real run over others' outputs, and it would take
the repository's DVC lock. PATH starts with /work/main/.venv/bin, HF_HUB_OFFLINE=1 as in the Makefile.

default  if /work/main/data exists: copy it (and dvclive/, metrics/, plots/) along. When `dvc status` in
         /work/main is clean, the copy is exactly that reproduced state. Otherwise (code or params edited since the
         last repro) the copy's dvc.lock is re-committed to its workspace with `dvc commit -f` (no stage runs), which
         makes the same pipeline a no-op: a proxy with the same hashing work, reported as such.
--full   from scratch in a fresh copy without outputs: times every stage, then the no-op repro on the result.
Both time the no-op repro alternating with `dvc status` (the floor: pipeline load + hashing), several rounds.

    python benchmarks/bench_repro.py [--full] [--rounds 5]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, Row, alternate, command_line, finish, parser, print_sides

TARGET_FULL = 600.0
TARGET_NOOP = 10.0
OUTPUT_DIRS = ("data", "dvclive", "metrics", "plots")


def environment() -> dict:
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def dvc_clean(cwd: Path) -> tuple[bool, str]:
    result = run(["dvc", "status", "--json"], cwd, check=False)
    try:
        return result.returncode == 0 and json.loads(result.stdout or "{}") == {}, result.stdout.strip()
    except json.JSONDecodeError:
        return False, result.stdout.strip() + result.stderr.strip()


def copy_repo(with_outputs: bool) -> Path:
    """The git-tracked + untracked-not-ignored files of /work/main (and the DVC outputs) in a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    target = Path(tempfile.mkdtemp(prefix="bench-repro-")) / "repo"
    target.mkdir()
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    if with_outputs:
        for name in OUTPUT_DIRS:
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, target / name, dirs_exist_ok=True)
    run(["git", "init", "-q"], target)
    run(["git", "add", "-A"], target)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "benchmark snapshot"], target)
    return target


def noop(args, repo: Path, label: str, rows: list[Row], proxy: str = "") -> None:
    def repro():
        result = run(["dvc", "repro"], repo, check=False)
        if result.returncode or re.search(r"Running stage", result.stdout):
            raise SystemExit(f"`dvc repro` in {repo} was not a no-op:\n{result.stdout[-1500:]}{result.stderr[-1500:]}")

    times = alternate({"dvc repro (no-op)": repro, "dvc status": lambda: run(["dvc", "status"], repo)}, rounds=args.rounds or 5)
    print(f"no-op ({label}), {args.rounds or 5} alternating rounds:")
    stats = print_sides(times, unit="s", scale=1)
    median = stats["dvc repro (no-op)"].median
    rows.append(Row(f"no-op dvc repro ({label})", f"{median:.1f} s (min-max {stats['dvc repro (no-op)'].low:.1f}-"
                    f"{stats['dvc repro (no-op)'].high:.1f}; dvc status {stats['dvc status'].median:.1f} s)" + (f" {proxy}" if proxy else ""),
                    f"<= {TARGET_NOOP:.0f} s", "PASS" if median <= TARGET_NOOP else "FAIL",
                    command_line("bench_repro.py", ["--full"] if "scratch" in label else None)))


def full(args, rows: list[Row]) -> None:
    repo = copy_repo(with_outputs=False)
    try:
        print(f"from scratch: dvc repro in {repo} (2 cores shared with whatever else runs)")
        started = time.perf_counter()
        marks: list[tuple[float, str]] = []
        process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in process.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            match = re.match(r"Running stage '([^']+)'", line)
            if match:
                marks.append((time.perf_counter() - started, match.group(1)))
        code = process.wait()
        total = time.perf_counter() - started
        if code:
            raise SystemExit("dvc repro from scratch failed:\n" + "\n".join(tail))
        bounds = marks + [(total, "end")]
        for (begin, name), (end, _) in zip(bounds, bounds[1:]):
            print(f"  stage {name:<10} {end - begin:7.1f} s")
        print(f"  total {total:.1f} s")
        clean, detail = dvc_clean(repo)
        print(f"  dvc status after: {'clean' if clean else detail}")
        stages = ", ".join(f"{name} {end - begin:.0f}s" for (begin, name), (end, _) in zip(bounds, bounds[1:]))
        rows.append(Row("dvc repro from scratch", f"{total / 60:.1f} min ({stages})", f"<= {TARGET_FULL / 60:.0f} min",
                        "PASS" if total <= TARGET_FULL and clean else "FAIL", command_line("bench_repro.py", ["--full"])))
        noop(args, repo, "after the from-scratch run", rows)
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


def default(args, rows: list[Row]) -> None:
    if not (REPO / "data").is_dir():
        print("no-op: /work/main/data does not exist; run with --full (reproduces the pipeline in a copy first)")
        rows.append(Row("no-op dvc repro", "needs --full (no data/ in /work/main)", f"<= {TARGET_NOOP:.0f} s", "SKIP", command_line("bench_repro.py", ["--full"])))
        return
    clean, detail = dvc_clean(REPO)
    repo = copy_repo(with_outputs=True)
    try:
        proxy = ""
        if not clean:
            changed = sorted(set(re.findall(r'"([a-z_]+)": \[', detail))) or ["?"]
            print(f"note: dvc status in /work/main is not clean (stages {', '.join(changed)} changed since the last repro): a true no-op "
                  "needs --full; measuring the proxy: the copy's dvc.lock re-committed with `dvc commit -f` (no stage runs)")
            run(["dvc", "commit", "-f"], repo)
            copy_clean, copy_detail = dvc_clean(repo)
            if not copy_clean:
                print(f"  the copy is still not clean after dvc commit: {copy_detail[:500]}; needs --full")
                rows.append(Row("no-op dvc repro", "needs --full (status not clean)", f"<= {TARGET_NOOP:.0f} s", "SKIP",
                                command_line("bench_repro.py", ["--full"])))
                return
            proxy = "[proxy: lock re-committed, /work/main status not clean]"
        noop(args, repo, "copy of /work/main with its outputs", rows, proxy)
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--full", action="store_true", help="dvc repro from scratch in a copy (~10 min), then the no-op")
    args = p.parse_args()
    rows: list[Row] = []
    if args.full:
        full(args, rows)
    else:
        default(args, rows)
    finish(args, rows)


if __name__ == "__main__":
    main()
