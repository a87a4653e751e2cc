"""Training: (1) throughput (train windows/s through `Predictor.fit`, one epoch) of every architecture in
moe_prefetch.predictors.ARCHITECTURES at its default params (params.yaml `train:` section, arch swapped in), on synthetic
windows of the default geometry built by stages.windows.build_windows (with the token context/horizon and hidden
states that hybrid / hidden_mlp need); architectures alternate round by round. (2) Time for the default
architecture (all neural ones with --big) to reach the lookup baseline's val top-1, on the real windows in
data/windows (read only) when present, else on learnable synthetic windows; the lookup is fit on the same train
windows (and, for reference, on the whole train split as evaluate does).

    python benchmarks/bench_training.py [--windows 8192] [--target-windows 40000] [--arch NAME ...]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from common import REPO, Row, Stats, command_line, finish, parser, rounds_of, set_threads, synthetic_windows


class Reached(Exception):
    """Raised from the fit log callback once the lookup's top-1 is reached."""


def train_section() -> dict:
    try:
        return dict((yaml.safe_load((REPO / "params.yaml").read_text()) or {}).get("train") or {})
    except Exception as err:  # noqa: BLE001
        print(f"note: params.yaml unreadable ({err}); schema defaults")
        return {}


def make(name: str, geometry: dict, **overrides):
    """A fresh predictor of architecture `name` with the default train params (+ overrides)."""
    from moe_prefetch.params import as_dict, parse_section
    from moe_prefetch.predictors import ARCHITECTURES

    params = parse_section("train", {**train_section(), **overrides, "arch": name})
    return ARCHITECTURES[name](geometry, as_dict(params))


def subset(windows, count: int, seed: int):
    if len(windows) <= count:
        return windows
    return windows.subset(np.sort(np.random.default_rng(seed).choice(len(windows), count, replace=False)))


def top1(predictor, windows) -> float:
    scores, _ = predictor.score(windows)
    return float((scores.argmax(axis=1) == windows.target_experts[:, 0]).mean())


def throughput(args, rows: list[Row]) -> None:
    from moe_prefetch.params import parse_section
    from moe_prefetch.predictors import ARCHITECTURES
    from moe_prefetch.windows.data import geometry_of
    from moe_prefetch.windows.data import read_summary, read_windows

    raw = {**train_section()}
    hybrid = parse_section("train", {**raw, "arch": "lookup"}).__dict__.get("hybrid")
    needs = {"token_horizon": getattr(hybrid, "temporal_tokens", 0) or 0, "token_context": getattr(hybrid, "token_context", 0) or 0}
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    try:
        tokens = int(args.windows * 1.6 / 5) + 2000  # 5 target layers per token; train split ~80%
        started = time.perf_counter()
        directory = synthetic_windows(work, tokens, seed=3, hidden_dim=args.hidden_dim, **needs)
        summary = read_summary(directory)
        train, val = read_windows(directory, "train"), read_windows(directory, "val")
        train = subset(train, args.windows, 0)
        val = subset(val, 2048, 0)
        geometry = geometry_of(summary)
        print(f"throughput: {len(train)} synthetic train windows (c={summary['context_length']}, h={summary['horizon']}, "
              f"L={summary['num_layers']}, E={summary['num_experts']}, k={summary['top_k']}, token_context {needs['token_context']}, "
              f"token_horizon {needs['token_horizon']}, hidden {args.hidden_dim}), val {len(val)}; built in {time.perf_counter() - started:.0f} s")
        names = args.arch or list(ARCHITECTURES)
        times: dict[str, list[float]] = {name: [] for name in names}
        skipped: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for _ in range(rounds_of(args)):
            for name in names:
                if name in skipped:
                    continue
                try:
                    predictor = make(name, geometry, epochs=1, patience=1, max_train_windows=0, device="cpu")
                    begun = time.perf_counter()
                    predictor.fit(train, val, lambda row: None)
                    times[name].append(time.perf_counter() - begun)
                    sizes[name] = predictor.parameter_count()
                except Exception as err:  # noqa: BLE001 - an architecture that cannot run here is reported, not fatal
                    skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        print(f"  fit of one epoch on {len(train)} windows (incl. its val pass on {len(val)}), {rounds_of(args)} rounds alternating archs:")
        for name in names:
            if name in skipped:
                print(f"  {name:<24} SKIP {skipped[name]}")
                rows.append(Row(f"training throughput {name}", "skipped", "report", "SKIP", command_line("bench_training.py"), [skipped[name]]))
                continue
            s = Stats.of(times[name])
            rate = len(train) / s.median
            print(f"  {name:<24} {rate:>10,.0f} windows/s  (fit {s.show('s')}; {sizes[name]:,} parameters)")
            rows.append(Row(f"training throughput {name}", f"{rate:,.0f} windows/s (min-max {len(train) / s.high:,.0f}-{len(train) / s.low:,.0f})",
                            "report", "INFO", command_line("bench_training.py")))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def time_to_lookup(args, rows: list[Row]) -> None:
    from moe_prefetch.predictors import ARCHITECTURES
    from moe_prefetch.predictors.neural import NeuralPredictor
    from moe_prefetch.windows.data import geometry_of
    from moe_prefetch.windows.data import read_summary, read_windows

    work = Path(tempfile.mkdtemp(prefix="bench-training-target-"))
    try:
        real = REPO / "data" / "windows"
        try:
            directory, source = real, f"real windows ({real}, read only)"
            summary = read_summary(directory)
            train_all, val = read_windows(directory, "train"), read_windows(directory, "val")
        except Exception as err:  # noqa: BLE001
            print(f"note: {real} unusable ({err}); learnable synthetic windows")
            directory, source = synthetic_windows(work, int(args.target_windows * 1.6 / 5) + 4000, seed=5), "learnable synthetic windows"
            summary = read_summary(directory)
            train_all, val = read_windows(directory, "train"), read_windows(directory, "val")
        geometry = geometry_of(summary)
        train = subset(train_all, args.target_windows, 1)
        val = subset(val, 10_000, 1)
        lookup = make("lookup", geometry)
        lookup.fit(train, val, lambda row: None)
        target = top1(lookup, val)
        full = make("lookup", geometry)
        full.fit(train_all, val, lambda row: None)
        target_full = top1(full, val)
        default_arch = train_section().get("arch", "speculation_transformer")
        names = args.arch or ([n for n, c in ARCHITECTURES.items() if issubclass(c, NeuralPredictor)] if args.big else [default_arch])
        print(f"\ntime to the lookup's val top-1 on {source}: {len(train)} train windows (of {len(train_all)}), {len(val)} val; "
              f"lookup val top-1 {target:.4f} (fit on the same windows), {target_full:.4f} (fit on all {len(train_all)})")
        for name in names:
            if not issubclass(ARCHITECTURES[name], NeuralPredictor):
                continue
            history: list[tuple[float, int, float]] = []
            predictor = make(name, geometry, max_train_windows=0, device="cpu", epochs=args.epochs, patience=args.epochs)
            started = time.perf_counter()

            def log(row: dict) -> None:
                if "val_top1" in row:
                    history.append((time.perf_counter() - started, int(row["epoch"]), float(row["val_top1"])))
                    if history[-1][2] >= target and not args.all_epochs:
                        raise Reached  # stop training: the time to target is known

            try:
                predictor.fit(train, val, log)
            except Reached:
                pass
            except Exception as err:  # noqa: BLE001
                print(f"  {name}: SKIP {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                continue
            curve = ", ".join(f"ep{e} {t:.0f}s {v:.4f}" for t, e, v in history)
            reached = next(((t, e) for t, e, v in history if v >= target), None)
            reached_full = next(((t, e) for t, e, v in history if v >= target_full), None)
            print(f"  {name}: val top-1 by epoch: {curve}")
            say = lambda hit: f"{hit[0]:.0f} s (epoch {hit[1]})" if hit else f"not within {len(history)} epoch(s)"  # noqa: E731
            best = max((v for _, _, v in history), default=float("nan"))
            rows.append(Row(f"training: {name} time to lookup top-1", f"{say(reached)}; best {best:.4f} vs lookup {target:.4f} "
                            f"(full-train lookup {target_full:.4f}: {say(reached_full)})", "report", "INFO",
                            command_line("bench_training.py"), [f"{source}, {len(train)} train windows"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile_step(args, name: str) -> None:
    """torch profiler of training steps of `name` (batch train.batch_size) on synthetic windows: where a step goes."""
    import torch
    from torch.profiler import profile

    from moe_prefetch.predictors.neural import NeuralPredictor, target_distribution
    from moe_prefetch.windows.data import geometry_of
    from moe_prefetch.windows.data import read_summary, read_windows

    work = Path(tempfile.mkdtemp(prefix="bench-training-profile-"))
    try:
        directory = synthetic_windows(work, 20_000, seed=4)
        windows = read_windows(directory, "train")
        predictor = make(name, geometry_of(read_summary(directory)))
        if not isinstance(predictor, NeuralPredictor):
            return
        predictor.data_geometry(windows)
        rows = np.arange(min(predictor.params["batch_size"], len(windows)))
        inputs = predictor.batch(windows, rows, torch.device("cpu"))
        target = torch.from_numpy(target_distribution(windows.subset(rows), predictor.num_experts))
        best = torch.from_numpy(windows.target_experts[rows, 0].astype(np.int64))
        optimizer = torch.optim.AdamW(predictor.module.parameters())
        predictor.module.train()

        def step():
            loss, _, _ = predictor._loss(inputs, target, best)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        for _ in range(2):
            step()
        started = time.perf_counter()
        for _ in range(5):
            step()
        print(f"\nprofile: {name} training step, batch {len(rows)}: {(time.perf_counter() - started) / 5 * 1e3:.0f} ms; top ops over 3 steps:")
        with profile() as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args) -> list[Row]:
    set_threads(args.threads)
    rows: list[Row] = []
    throughput(args, rows)
    if not args.no_target:
        time_to_lookup(args, rows)
    if args.profile is not None or not args.big:
        profile_step(args, args.profile or train_section().get("arch", "speculation_transformer"))
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--windows", type=int, default=None, help="train windows per throughput fit (default 8192, 65536 with --big)")
    p.add_argument("--target-windows", type=int, default=None, help="train windows of the time-to-lookup run (default 24000, 200000 with --big)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the time-to-lookup run")
    p.add_argument("--hidden-dim", type=int, default=128, help="synthetic hidden-state width (tiny-moe's hidden size)")
    p.add_argument("--arch", nargs="*", help="architectures (default: all registered; time-to-lookup: the default arch)")
    p.add_argument("--no-target", action="store_true", help="throughput only")
    p.add_argument("--all-epochs", action="store_true", help="keep training after the lookup's top-1 is reached")
    p.add_argument("--profile", nargs="?", const="", default=None,
                   help="torch-profile one training step of ARCH (default: params.yaml train.arch)")
    args = p.parse_args()
    args.windows = args.windows or (65_536 if args.big else 8192)
    args.target_windows = args.target_windows or (200_000 if args.big else 24_000)
    if not args.rounds and not args.big:
        args.rounds = 3
    finish(args, run(args))


if __name__ == "__main__":
    main()
