"""Stage train: fit the predictor named by `train.arch` on the train split, early-stopping on val.

Writes the checkpoint (`<out>/predictor.safetensors`, params and architecture inside) and DVCLive logs
(`<live>/metrics.json`, `<live>/plots/metrics/*.tsv`: per-epoch train/val loss, val top-1, lr). Wall-clock time
is printed, not stored, so that `dvc repro --force` reproduces every output byte for byte.

    python -m stages.train --windows data/windows --out data/predictor --live dvclive
    accelerate launch --multi_gpu --num_processes 2 -m stages.train ...   # DDP (train.launcher); on CPU: 2 gloo processes

Under a distributed launcher every process trains (neural.py splits each batch), and only the main process
writes the checkpoint and the logs.
"""

from __future__ import annotations

import time
from pathlib import Path

from stages.common import atomic_path, run_stage, stage_arguments
from stages.params import TrainParams, as_dict
from stages.predictors import ARCHITECTURES
from stages.predictors.neural import on_cpu
from stages.window_data import WindowStream, read_summary, read_windows


def geometry_of(summary: dict) -> dict:
    """The routing geometry a predictor is built for (stored inside its checkpoint)."""
    return {name: summary[name] for name in ("num_experts", "top_k", "num_layers", "context_length", "horizon")}


def train(params: TrainParams, windows_dir: Path, out: Path | None, live_dir: Path | None) -> dict:
    """Fit; save the checkpoint into `out` and DVCLive logs into `live_dir` (None: write nothing, as in the
    non-main processes of a distributed run); return the final summary metrics."""
    from dvclive import Live

    summary = read_summary(windows_dir)
    if params.stream_buffer:
        train_set = WindowStream(windows_dir, "train", params.stream_buffer)
    else:
        train_set = read_windows(windows_dir, "train")
    val_set = read_windows(windows_dir, "val")
    predictor = ARCHITECTURES[params.arch](geometry_of(summary), as_dict(params))
    epochs_run, fit_summary = [], {}
    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None) if live_dir is not None else None

    def log(row: dict) -> None:
        if "epoch" not in row:  # end-of-fit figures (e.g. hybrid's temporal accuracy) go to the summary
            fit_summary.update({name: float(value) for name, value in row.items()})
            return
        epochs_run.append(row)
        if live is None:
            return
        for name, value in row.items():
            if name != "epoch":
                live.log_metric(name, value)
        live.next_step()
        print(f"epoch {row['epoch']}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"), flush=True)

    started = time.time()
    predictor.fit(train_set, val_set, log)
    if live is not None:
        print(f"train: {params.arch} fitted in {time.time() - started:.1f}s on {len(train_set)} windows")
    scores, _ = predictor.score(val_set)
    val_top1 = float((scores.argmax(axis=1) == val_set.target_experts[:, 0]).mean())
    final = {
        **fit_summary,
        "parameters": predictor.parameter_count(),
        "epochs": len(epochs_run),
        "train_windows": len(train_set),
        "val_top1": round(val_top1, 6),
    }
    if live is not None:
        if not epochs_run:  # count tables fit in one pass: one point, so every arch has the curves dvc.yaml declares
            log({"epoch": 1, "val_top1": val_top1})
        live.summary = {**live.summary, **final}
        live.end()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        predictor.save(out)
    return final


def main() -> None:
    from accelerate import PartialState

    params, args = stage_arguments("train", "Train the expert predictor named by train.arch.", "windows", "out", "live")
    state = PartialState(cpu=on_cpu(params.device))  # one process, or this process's rank under `accelerate launch`
    if not state.is_main_process:
        train(params, args.windows, None, None)
        return
    with atomic_path(args.out) as out, atomic_path(args.live) as live_dir:
        final = train(params, args.windows, out, live_dir)
    print(f"train: {params.arch}: {final}")


if __name__ == "__main__":
    run_stage(main)
