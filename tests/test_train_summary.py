"""dvclive/metrics.json describes the saved model: the kept (best validation loss) epoch's losses and val top-1,
which epoch that was, and how many ran; the training curves keep every epoch."""

from __future__ import annotations

import csv
import json

from conftest import single_thread, tiny_params

from moe_prefetch.training import train


def curve(live, name: str) -> dict[int, float]:
    with open(live / "plots" / "metrics" / f"{name}.tsv") as handle:
        return {int(row["step"]) + 1: float(row[name]) for row in csv.DictReader(handle, delimiter="\t")}


def test_the_summary_is_the_kept_epochs(tiny, tmp_path):
    # a small train subset and a wide net over-fit: the best validation loss comes before the last epoch
    params = tiny_params("train", arch="mlp", epochs=6, patience=6, lr=0.01, max_train_windows=300, batch_size=32,
                         mlp={"embedding_dim": 32, "hidden": [256]})
    with single_thread():
        final = train(params, tiny.windows, tmp_path / "predictor", tmp_path / "live")
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    val_loss = curve(tmp_path / "live", "val_loss")
    kept = summary["kept_epoch"]
    assert len(val_loss) == summary["epochs"] == final["epochs"] == 6
    assert summary["kept_epoch"] < 6, val_loss  # otherwise this test could not tell the kept epoch from the last
    assert kept == min(val_loss, key=val_loss.get)  # the best validation loss is the epoch whose weights were saved
    assert abs(summary["val_loss"] - val_loss[kept]) < 1e-9
    assert abs(summary["train_loss"] - curve(tmp_path / "live", "train_loss")[kept]) < 1e-9
    assert abs(summary["val_top1"] - curve(tmp_path / "live", "val_top1")[kept]) < 1e-6
