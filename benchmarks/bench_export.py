"""Exported predictors: latency per decode step of every architecture in ARCHITECTURES in its exported form
(moe_prefetch/export.py), scored through scripts/reference_loader.py: torch.export programs called on ready
tensors, count tables by the reference numpy lookup, the ensemble by its members + mixing rule.

A decode step of B tokens (B = 1, 16, 256) asks one prediction per target layer t (every layer the predictor
predicts), each as its own call of B rows, because layer t's context is known only once layer t - h has routed.
Reported: p50 and p99 of one call (one target layer) and of the whole step (the G calls' sum), on CPU and, when
torch.cuda.is_available(), on CUDA. Target: the default predictor (params.yaml train.arch) at batch 1 takes less
than one MoE layer's compute time of the default cost profile (evaluate.cache.profile, 0.4 ms for Mixtral-8x7B),
judged on a call's p50: a prediction issued when layer t - h routes then completes under the next layer's compute.
The other architectures are reported against the same budget. Weights are fit for one epoch on synthetic windows
(they do not change the cost).

    python benchmarks/bench_export.py [--batches 1 16 256] [--arch NAME ...] [--steps 200]
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_training import make, subset, train_section
from common import (
    REPO,
    Row,
    command_line,
    default_section,
    finish,
    parser,
    rounds_of,
    set_threads,
    synthetic_windows,
)

from moe_prefetch.export import INPUT_COLUMNS


def reference_loader():
    spec = importlib.util.spec_from_file_location("reference_loader", REPO / "scripts" / "reference_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def budget_ms() -> tuple[float, str]:
    from moe_prefetch.evaluation.config import COST_PROFILES

    evaluate, _ = default_section("evaluate")
    profile = evaluate.cache.profile
    return float(evaluate.cache.costs().layer_compute_ms), f"{profile} (COST_PROFILES: {COST_PROFILES[profile].layer_compute_ms} ms)"


def step_calls(scorer, windows, targets: list[int], batch: int, device: str):
    """One zero-argument callable per target layer scoring `batch` tokens of that layer as the engine would: the
    program on ready tensors (on `device`), the numpy rules on arrays."""
    import torch

    calls = []
    for t in targets:
        rows = np.flatnonzero(windows.target_layer == t)
        rows = np.resize(rows, batch)  # repeats rows when the split has fewer windows of t than the batch
        inputs = {name: getattr(windows, INPUT_COLUMNS[name])[rows] for name in scorer.inputs}
        if hasattr(scorer, "run"):
            tensors = scorer.tensors(inputs)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            calls.append(lambda tensors=tensors, sync=sync: (scorer.run(tensors), sync()))
        else:
            calls.append(lambda inputs=inputs: scorer(**inputs))
    return calls


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def run(args) -> list[Row]:
    import torch

    from moe_prefetch.export import export_predictor
    from moe_prefetch.predictors import ARCHITECTURES
    from moe_prefetch.windows.data import geometry_of, read_summary, read_windows

    set_threads(args.threads)
    loader = reference_loader()
    budget, profile = budget_ms()
    default_arch = train_section().get("arch", "mlp")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        directory = synthetic_windows(work, 12_000, seed=6, hidden_dim=args.hidden_dim)
        summary = read_summary(directory)
        geometry, targets = geometry_of(summary), [int(t) for t in summary["target_layers"]]
        train, val = subset(read_windows(directory, "train"), 4096, 0), subset(read_windows(directory, "val"), 1024, 0)
        test = read_windows(directory, "test")
        scorers, skipped = {}, {}
        for name in args.arch or list(ARCHITECTURES):
            try:
                predictor = make(name, geometry, epochs=1, patience=1, max_train_windows=0, device="cpu")
                predictor.fit(train, val, lambda row: None)
                export_predictor(predictor, work / "export" / name)
                for device in devices:
                    scorers[(name, device)] = loader.load(work / "export" / name, device)
            except Exception as err:  # noqa: BLE001 - report the arch as skipped, measure the others
                skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        print(f"export: exported predictors via scripts/reference_loader.py, {args.threads} torch thread(s), "
              f"{len(targets)} target layers {targets} per decode step (one call each), {rounds_of(args)} rounds "
              f"alternating archs; synthetic windows (c={geometry['context_length']}, h={geometry['horizon']}, "
              f"E={geometry['num_experts']}, k={geometry['top_k']}); budget: one MoE layer = {budget} ms, {profile}")
        steps = {b: max(5, args.steps // max(1, int(np.sqrt(b)))) for b in args.batches}  # fewer steps at big batches
        calls = {(key, b): step_calls(s, test, targets, b, key[1]) for key, s in scorers.items() for b in args.batches}
        per_call = {key: [] for key in calls}
        per_step = {key: [] for key in calls}
        for key, fns in calls.items():  # warm-up
            for fn in fns:
                fn()
        for _ in range(rounds_of(args)):
            for key, fns in calls.items():
                for _ in range(max(1, steps[key[1]] // rounds_of(args))):
                    total = 0.0
                    for fn in fns:
                        started = time.perf_counter()
                        fn()
                        elapsed = time.perf_counter() - started
                        per_call[key].append(elapsed)
                        total += elapsed
                    per_step[key].append(total)
        header = f"  {'arch':<26}{'device':<7}" + "".join(
            f"{f'b{b} call p50/p99':>20}{f'b{b} step p50/p99':>20}" for b in args.batches) + f"{'b1 call p50 / budget':>22}"
        print(header + "\n  (ms; call = one target layer's prediction for B tokens, step = all target layers)")
        for (name, device) in scorers:
            cells = ""
            for b in args.batches:
                (c50, c99), (s50, s99) = percentiles(per_call[((name, device), b)]), percentiles(per_step[((name, device), b)])
                cells += f"{c50 * 1e3:>11.3f}/{c99 * 1e3:<8.3f}{s50 * 1e3:>11.3f}/{s99 * 1e3:<8.3f}"
            first = min(args.batches)
            call50, call99 = percentiles(per_call[((name, device), first)])
            step50, _ = percentiles(per_step[((name, device), first)])
            share = call50 * 1e3 / budget
            label = f"{name} (default)" if name == default_arch else name
            print(f"  {label:<26}{device:<7}{cells}{share:>21.2f}x")
            status = ("PASS" if share <= 1 else "FAIL") if name == default_arch and first == 1 else "INFO"
            rows.append(Row(f"export {name} ({device}): b{first} call p50 vs one MoE layer", f"{call50 * 1e3:.3f} ms (p99 {call99 * 1e3:.3f}; "
                            f"step of {len(targets)} layers p50 {step50 * 1e3:.3f} ms) = {share:.2f}x of {budget} ms",
                            f"<= {budget} ms" if status != "INFO" else "report", status, command_line("bench_export.py")))
        for name, reason in skipped.items():
            print(f"  {name:<26}SKIP {reason}")
            rows.append(Row(f"export {name}", "skipped", "report", "SKIP", command_line("bench_export.py"), [reason]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256], help="tokens per decode step")
    p.add_argument("--steps", type=int, default=200, help="decode steps measured at batch 1 (fewer at bigger batches)")
    p.add_argument("--hidden-dim", type=int, default=128, help="synthetic hidden-state width (tiny-moe's hidden size)")
    p.add_argument("--arch", nargs="*", help="architectures (default: all registered)")
    args = p.parse_args()
    finish(args, run(args))


if __name__ == "__main__":
    main()
