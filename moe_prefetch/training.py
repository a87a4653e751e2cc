"""The train stage's work and its params section: fit the predictor named by `train.arch` on the train split,
early-stopping on val.

Writes the checkpoint (`<out>/predictor.safetensors`, params and architecture inside) and DVCLive logs
(`<live>/plots/metrics/*.tsv`: per-epoch train/val loss, val top-1, lr; `<live>/metrics.json`: the kept epoch's
figures, `kept_epoch` (neural archs: the epoch of the best validation loss, whose weights are saved), the
number of epochs run and the parameter count). Wall-clock time
is printed, not stored, so that `dvc repro --force` reproduces every output byte for byte.

    python -m stages.train --windows data/windows --out data/predictor --live dvclive
    accelerate launch --multi_gpu --num_processes 2 -m stages.train ...   # DDP (train.launcher); on CPU: 2 gloo processes

Under a distributed launcher every process trains (neural.py splits each batch), and only the main process
writes the checkpoint and the logs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from moe_prefetch.config import as_dict, doc, positive
from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors import ARCHITECTURES
from moe_prefetch.windows.data import (
    WindowStream,
    geometry_of,
    read_summary,
    read_windows,
)


@dataclass
class TrainLoopParams:
    """The keys of the train section every architecture shares (the per-arch sections are added below)."""

    arch: str = doc("Predictor architecture: a name registered in moe_prefetch.predictors.ARCHITECTURES.", "token_mlp")
    epochs: int = doc("Maximum epochs (learned predictors).", 12)
    batch_size: int = doc("Windows per optimisation step (the global batch: split across processes under DDP).", 1024)
    lr: float = doc("Peak learning rate (AdamW, cosine decay).", 2e-3)
    weight_decay: float = doc("AdamW weight decay.", 0.01)
    top1_target_weight: float = doc(
        "Neural archs: share of the training target on the highest-weight expert, the rest on the gate-weight "
        "distribution over the routed set (0 = gate weights only; 1 = top-1 only). Trades recall@k for top-1.", 0.25)
    patience: int = doc("Stop after this many epochs without a better validation loss.", 3)
    max_train_windows: int = doc("Subsample train windows to at most this many (0 = all).", 0)
    device: str = doc("cpu, cuda or auto.", "cpu")
    seed: int = doc("Seed of initialisation and batch order.", 0)
    stream_buffer: int = doc(
        "0: read the whole train split into memory. N > 0: stream it from disk instead, reading its row groups in a "
        "random order and shuffling N windows at a time (memory ~ N windows, not the split), for splits larger than "
        "RAM. Neural archs only; not with max_train_windows.", 0)
    launcher: str = doc(
        "The command dvc.yaml runs the train stage with: python (one process) or a distributed launcher, e.g. "
        "'accelerate launch --multi_gpu --num_processes 8' (DDP over 8 GPUs; on a CPU-only machine, 8 gloo "
        "processes). Read by dvc.yaml only.", "python")

    def validate(self) -> None:
        architecture = ARCHITECTURES.get(self.arch, "train.arch")
        positive("train", self, "epochs", "batch_size", "lr", "patience")
        if not 0.0 <= self.top1_target_weight <= 1.0:
            raise PipelineError(f"train.top1_target_weight: must be in [0, 1], got {self.top1_target_weight}")
        if self.max_train_windows < 0:
            raise PipelineError(f"train.max_train_windows: must be >= 0, got {self.max_train_windows}")
        if self.stream_buffer < 0:
            raise PipelineError(f"train.stream_buffer: must be >= 0 (0 = in memory), got {self.stream_buffer}")
        if self.stream_buffer and self.max_train_windows:
            raise PipelineError(f"train.stream_buffer: {self.stream_buffer} streams the whole split; accepted with "
                                f"max_train_windows 0 only (got {self.max_train_windows})")
        if self.stream_buffer and not architecture.streams:
            raise PipelineError(f"train.stream_buffer: {self.stream_buffer} streams neural archs only; {self.arch} counts "
                                f"its split in memory: set 0")
        if self.device not in ("cpu", "cuda", "auto"):
            raise PipelineError(f"train.device: {self.device!r} is not one of cpu, cuda, auto")
        for name in ARCH_SECTIONS:
            getattr(self, name).validate()


ARCH_SECTIONS = sorted(name for name, cls in ARCHITECTURES.items() if cls.config is not None)  # by name: stable
TrainParams = dataclasses.make_dataclass(
    "TrainParams",
    [(name, ARCHITECTURES[name].config, doc(f"Hyper-parameters of arch {name}.", factory=ARCHITECTURES[name].config))
     for name in ARCH_SECTIONS],
    bases=(TrainLoopParams,),
)
TrainParams.__doc__ = "The train section: the shared training keys, then one train.<arch> section per registered architecture."


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
            fit_summary.update({name: value if isinstance(value, int) else float(value) for name, value in row.items()})
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
    # The checkpoint holds the kept (best val loss) epoch, not the last: its figures are the summary's, so that
    # dvclive/metrics.json describes the model that was saved (DVCLive's own summary holds the last epoch's).
    kept = {name: row[name] for row in epochs_run if row["epoch"] == fit_summary.get("kept_epoch")
            for name in ("train_loss", "val_loss", "lr")}
    final = {
        **fit_summary,
        **kept,
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
