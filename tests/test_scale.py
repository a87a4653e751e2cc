"""Beyond one process and beyond memory: the windows stage's memory does not grow with the number of shards;
training under `accelerate launch` (DDP, two gloo processes on this CPU-only machine); `train.stream_buffer` (the
train split read from disk a few row groups at a time)."""

from __future__ import annotations

import json
import math
import subprocess
import tracemalloc
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from conftest import accelerate_command, stage_command, synthetic_shards, subprocess_env, tiny_params, write_params
from moe_prefetch import traces
from moe_prefetch.windows import build as windows_stage
from moe_prefetch.predictors import load_predictor
from moe_prefetch.training import train
from moe_prefetch.windows.data import WindowStream, read_windows
from moe_prefetch.windows.build import build_windows

MLP = {"arch": "mlp", "epochs": 6, "batch_size": 64, "max_train_windows": 0, "lr": 0.01,
       "mlp": {"embedding_dim": 16, "hidden": [64], "dropout": 0.0}}


def windows_peak_memory(shard_dir, out_dir, monkeypatch) -> int:
    """Peak bytes of the windows stage: numpy/Python (tracemalloc) plus Arrow's pool, sampled at every shard read."""
    arrow_peak = [0]
    read_shard = traces.read_shard

    def sampled(*args, **kwargs):
        table = read_shard(*args, **kwargs)
        arrow_peak[0] = max(arrow_peak[0], pa.total_allocated_bytes())
        return table

    monkeypatch.setattr(traces, "read_shard", sampled)
    out_dir.mkdir()
    tracemalloc.start()
    try:
        build_windows(shard_dir, out_dir, tiny_params("windows"))
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return python_peak + arrow_peak[0]


def test_windows_memory_does_not_grow_with_the_number_of_shards(tmp_path, monkeypatch):
    """Same shard size, 5x the shards: the stage holds one shard (plus its carry) at a time, so the peak stays
    put, where reading everything first would grow ~5x."""
    peaks = {}
    for shards in (3, 15):
        synthetic_shards(tmp_path / f"shards{shards}", documents=20 * shards, seq_len=100, rows_per_shard=2000)
        peaks[shards] = windows_peak_memory(tmp_path / f"shards{shards}", tmp_path / f"windows{shards}", monkeypatch)
    assert peaks[15] < 1.5 * peaks[3], peaks


def run(command: list, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_with_two_processes_reaches_the_accuracy_of_one(tiny, tmp_path):
    """The same global batches split over 2 processes with averaged gradients: the same optimisation up to float
    summation order, so val top-1 matches one process within noise; only the main process writes."""
    write_params(tmp_path, {"train": MLP})
    arguments = ("--windows", tiny.windows, "--params", tmp_path / "params.yaml")
    run(stage_command("train", *arguments, "--out", "one", "--live", "live-one"), tmp_path)
    two = run(accelerate_command(2, "train", *arguments, "--out", "two", "--live", "live-two"), tmp_path)
    summaries = [json.loads((tmp_path / live / "metrics.json").read_text()) for live in ("live-one", "live-two")]
    assert summaries[0]["epochs"] == summaries[1]["epochs"] == MLP["epochs"]
    assert summaries[0]["val_top1"] > 0.3 and abs(summaries[0]["val_top1"] - summaries[1]["val_top1"]) <= 0.01
    assert two.stdout.count("epoch 1:") == 1  # one process reports
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("live")) == ["one", "params.yaml", "two"]
    weights = [load_predictor(tmp_path / name).state() for name in ("one", "two")]
    for name, array in weights[0].items():
        np.testing.assert_allclose(weights[1][name], array, atol=2e-3, err_msg=name)


def test_ddp_error_in_training_stops_every_process_with_one_message(tiny, tmp_path):
    """A non-finite loss is checked on the loss averaged over processes, so all raise together (none hangs)."""
    write_params(tmp_path, {"train": {**MLP, "lr": 1e30}})
    command = accelerate_command(2, "train", "--windows", tiny.windows, "--out", "out", "--live", "live",
                                 "--params", tmp_path / "params.yaml")
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: train: non-finite") == 2  # both processes, the same one line
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()


@pytest.fixture(scope="module")
def small_row_groups(tiny, tmp_path_factory):
    """The tiny windows rewritten with 100-window row groups, so a stream has many groups to shuffle."""
    directory = tmp_path_factory.mktemp("windows-rg")
    patch = pytest.MonkeyPatch()
    patch.setattr(windows_stage, "ROW_GROUP_WINDOWS", 100)
    try:
        build_windows(tiny.shards, directory, tiny_params("windows"))
    finally:
        patch.undo()
    return directory


def window_keys(windows) -> list[tuple]:
    sequences = np.array(windows.sequence_ids)[windows.sequence_index]
    return list(zip(sequences.tolist(), windows.position.tolist(), windows.target_layer.tolist()))


def test_stream_yields_every_window_once_per_epoch_in_full_batches(small_row_groups):
    stream = WindowStream(small_row_groups, "train", buffer_windows=350)
    assert stream.file.num_row_groups > 10
    everything = Counter(window_keys(read_windows(small_row_groups, "train")))
    generator = np.random.default_rng(0)
    orders = []
    for _ in range(2):
        batches = list(stream.shuffled_batches(64, generator))
        assert len(batches) == math.ceil(len(stream) / 64) and all(len(b) == 64 for b in batches[:-1])
        keys = [key for batch in batches for key in window_keys(batch)]
        assert Counter(keys) == everything
        orders.append(keys)
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_streamed_training_learns_like_in_memory(small_row_groups, tmp_path):
    results = {}
    for name, buffer in (("memory", 0), ("stream", 300)):
        results[name] = train(tiny_params("train", **MLP, stream_buffer=buffer), small_row_groups, tmp_path / name, tmp_path / f"live-{name}")
    assert results["stream"]["train_windows"] == results["memory"]["train_windows"]
    assert results["stream"]["val_top1"] > 0.3 and abs(results["stream"]["val_top1"] - results["memory"]["val_top1"]) <= 0.03
