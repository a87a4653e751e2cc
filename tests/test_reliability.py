"""Bad inputs, failing writes and kill -9: every failure is one line `error: ...`, exit 1, and leaves the previous
output byte-identical with no temp sibling behind; an interrupted stage re-runs to the uninterrupted result."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import (assert_error, copy_dir, hidden_leftovers, reseal_shard, rewrite_routing, single_thread,
                      stage_command, subprocess_env, synthetic_shards, tiny_params, tree_digest, write_params)
from moe_prefetch import files, traces
from moe_prefetch.sharding import write_shards
from moe_prefetch.training import train as train_predictor
from moe_prefetch.windows.build import build_windows
from stages import shard, train, windows


def assert_fails_cleanly(run_main, module, args: list, out: Path, *fragments: str) -> str:
    """The stage CLI exits 1 with one `error:` line holding every fragment; `out` and its siblings are untouched."""
    before = tree_digest(out)
    code, err = run_main(module, *args)
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], f"{fragment!r} not in {err[0]!r}"
    assert tree_digest(out) == before
    assert hidden_leftovers(out.parent) == []
    return err[0]


@pytest.fixture
def project(tmp_path, tiny):
    """A work dir with TINY params.yaml and a previous good output of every stage under data/."""
    write_params(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("traces", "shards", "windows", "predictor"):
        copy_dir(getattr(tiny, name), data / name)
    copy_dir(tiny.live, tmp_path / "dvclive")
    return tmp_path


# --- shard stage: bad trace chunks ---------------------------------------------------------------------------

def chunk(traces_dir: Path, index: int) -> Path:
    return traces_dir / f"chunk-{index:05d}.parquet"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def set_expert(value):
    def edit(experts, weights):
        experts[3, 2, 1] = value
    return edit


def set_weight(value):
    def edit(experts, weights):
        weights[3, 2, 0] = value
    return edit


TRACE_DAMAGE = {
    "missing chunk": (lambda d, m: chunk(d, 2).unlink(), ["chunk files, meta.json expects"]),
    "truncated chunk": (lambda d, m: truncate(chunk(d, 1)), ["chunk-00001.parquet", "unreadable Parquet chunk"]),
    "missing meta": (lambda d, m: (d / "meta.json").unlink(), ["meta.json: missing"]),
    "expert too large": (lambda d, m: rewrite_routing(chunk(d, 1), m, set_expert(16)),
                         ["chunk-00001.parquet: row 3, MoE layer 2", "expert id 16 out of range [0, 16)"]),
    "expert negative": (lambda d, m: rewrite_routing(chunk(d, 1), m, set_expert(-2)), ["expert id -2 out of range"]),
    "nan weight": (lambda d, m: rewrite_routing(chunk(d, 0), m, set_weight(np.nan)), ["row 3, MoE layer 2", "NaN or infinite"]),
    "inf weight": (lambda d, m: rewrite_routing(chunk(d, 0), m, set_weight(np.inf)), ["NaN or infinite"]),
    "missing column": (lambda d, m: pq.write_table(pq.read_table(chunk(d, 3)).drop(["weights"]), chunk(d, 3)),
                       ["chunk-00003.parquet", "schema"]),
}


def damage_and_run(project: Path, tiny, run_main, module, source: str, out: str, damage: tuple) -> None:
    """Damage the copy of data/<source>, run the stage (`--<source> data/<source> --out data/<out>`): it must fail
    cleanly, naming the damage, with the previous data/<out> untouched."""
    make, fragments = damage
    data = project / "data"
    make(data / source, tiny.manifest)
    args = [f"--{source}", data / source, "--out", data / out, "--params", project / "params.yaml"]
    assert_fails_cleanly(run_main, module, args, data / out, *fragments)


@pytest.mark.parametrize("damage", TRACE_DAMAGE)
def test_shard_stage_rejects_bad_traces(project, tiny, run_main, damage):
    damage_and_run(project, tiny, run_main, shard, "traces", "shards", TRACE_DAMAGE[damage])


# --- windows stage: bad shards -------------------------------------------------------------------------------

def edit_manifest(shard_dir: Path, **changes) -> None:
    path = shard_dir / traces.MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def corrupt_checksum(shard_dir: Path, index: int) -> None:
    manifest = traces.Manifest.read(shard_dir)
    manifest.shards[index]["sha256"] = "0" * 64
    manifest.write(shard_dir / traces.MANIFEST_NAME)


def shard_file(shard_dir: Path, index: int) -> Path:
    return shard_dir / f"shard-{index:05d}.parquet"


def resealed(edit, index: int = 1):
    """Damage shard `index` with `edit`, then fix its checksum: only the content check can catch it."""
    def make(d: Path, m: traces.Manifest) -> None:
        edit(d, m)
        reseal_shard(d, index)
    return make


SHARD_DAMAGE = {
    "missing shard": (lambda d, m: shard_file(d, 1).unlink(), ["shard-00001.parquet: listed in the manifest but missing"]),
    "truncated shard": (lambda d, m: truncate(shard_file(d, 2)), ["shard-00002.parquet", "sha256 does not match"]),
    "checksum mismatch": (lambda d, m: corrupt_checksum(d, 0), ["shard-00000.parquet", "sha256 does not match"]),
    "unknown schema_version": (lambda d, m: edit_manifest(d, schema_version=99), ["manifest.json", "schema_version 99"]),
    "malformed manifest": (lambda d, m: edit_manifest(d, extra_field=1), ["manifest.json", "malformed manifest"]),
    "missing manifest": (lambda d, m: (d / traces.MANIFEST_NAME).unlink(), ["manifest.json: missing"]),
    "resealed: unreadable": (resealed(lambda d, m: truncate(shard_file(d, 1))), ["shard-00001.parquet", "unreadable"]),
    "resealed: expert out of range": (resealed(lambda d, m: rewrite_routing(shard_file(d, 1), m, set_expert(16))),
                                      ["row 3, MoE layer 2", "expert id 16 out of range"]),
    "resealed: nan weight": (resealed(lambda d, m: rewrite_routing(shard_file(d, 1), m, set_weight(np.nan))),
                             ["row 3, MoE layer 2", "NaN or infinite"]),
}


# "resealed": a shard whose checksum was recomputed after damage (as if the shard stage itself wrote it), so
# only the windows stage's own range/finite checks (traces.read_shard) can catch it.
@pytest.mark.parametrize("damage", list(SHARD_DAMAGE))
def test_windows_stage_rejects_bad_shards(project, tiny, run_main, damage):
    damage_and_run(project, tiny, run_main, windows, "shards", "windows", SHARD_DAMAGE[damage])


@pytest.mark.parametrize("damage", [name for name in SHARD_DAMAGE if name.startswith("resealed")])
def test_read_shard_rejects_resealed_damage(tiny, tmp_path, damage):
    """traces.read_shard (what read_routing uses, and the one-line fix for windows.py) catches what the
    checksum cannot."""
    make, fragments = SHARD_DAMAGE[damage]
    shard_dir = copy_dir(tiny.shards, tmp_path / "shards")
    make(shard_dir, tiny.manifest)
    assert_error(lambda: traces.read_routing(shard_dir, traces.Manifest.read(shard_dir)), "shard-00001.parquet", *fragments)


# --- train stage ---------------------------------------------------------------------------------------------

def train_args(project: Path, out: Path | None = None) -> list:
    data = project / "data"
    return ["--windows", data / "windows", "--out", out or data / "predictor", "--live", project / "dvclive",
            "--params", project / "params.yaml"]


@pytest.mark.parametrize("split", ["val", "train"])
def test_train_rejects_an_empty_split(project, run_main, split):
    path = project / "data" / "windows" / f"{split}.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 0), path)
    before = tree_digest(project / "dvclive")
    assert_fails_cleanly(run_main, train, train_args(project), project / "data" / "predictor",
                         f"{split}.parquet", f"the {split} split has no windows")
    assert tree_digest(project / "dvclive") == before


def test_train_stops_on_a_non_finite_loss(project, run_main):
    write_params(project, {"train": {"lr": 1e30, "epochs": 2}})
    before = tree_digest(project / "dvclive")
    message = assert_fails_cleanly(run_main, train, train_args(project), project / "data" / "predictor", "non-finite")
    assert "epoch 1, step " in message and "train.lr" in message
    assert tree_digest(project / "dvclive") == before
    assert hidden_leftovers(project) == []


# --- failing writes (root ignores permissions, so: a path under a regular file, or a patched disk-full) ----------

def test_output_under_a_regular_file(project, run_main):
    blocker = project / "data" / "blocker"
    blocker.write_text("not a directory")
    args = ["--shards", project / "data" / "shards", "--out", blocker / "windows", "--params", project / "params.yaml"]
    code, err = run_main(windows, *args)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(blocker) in err[0]
    assert blocker.read_text() == "not a directory" and hidden_leftovers(project / "data") == []


def test_train_output_under_a_regular_file_keeps_the_live_dir(project, run_main):
    blocker = project / "blocker"
    blocker.write_text("x")
    before = tree_digest(project / "dvclive")
    code, err = run_main(train, *train_args(project, out=blocker / "predictor"))
    assert code == 1 and len(err) == 1 and str(blocker) in err[0], err
    assert tree_digest(project / "dvclive") == before and hidden_leftovers(project) == []


def test_disk_full_while_writing_windows(project, run_main, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "data/windows/train.parquet")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", no_space)
    data = project / "data"
    args = ["--shards", data / "shards", "--out", data / "windows", "--params", project / "params.yaml"]
    message = assert_fails_cleanly(run_main, windows, args, data / "windows", "No space left on device")
    assert message.endswith("(data/windows/train.parquet)")


def test_evaluate_metrics_under_a_regular_file_keeps_previous_plots(project, tiny, run_main):
    from stages import evaluate

    plots = copy_dir(tiny.plots, project / "plots")
    (project / "metrics").write_text("a file where the metrics directory should be")
    args = ["--windows", project / "data" / "windows", "--shards", project / "data" / "shards", "--predictor", project / "data" / "predictor",
            "--metrics", project / "metrics" / "evaluate.json", "--headline", project / "metrics" / "headline.json",
            "--plots", plots, "--params", project / "params.yaml"]
    assert_fails_cleanly(run_main, evaluate, args, plots, "metrics")


# --- atomic outputs ------------------------------------------------------------------------------------------

def test_atomic_path_removes_stale_temp_siblings(tmp_path):
    """A kill -9 inside atomic_path leaves `.name.XXXXXXXX/`; the next write of `name` clears it (and only it)."""
    stale = tmp_path / ".windows.abcd1234"
    (stale / "windows").mkdir(parents=True)
    keep = [tmp_path / ".windows.json", tmp_path / ".windows_other.abcd1234", tmp_path / ".dvc"]
    for path in keep:
        path.mkdir()
    with files.atomic_path(tmp_path / "windows") as temp:
        temp.mkdir()
        (temp / "a").write_text("a")
    assert (tmp_path / "windows" / "a").read_text() == "a"
    assert not stale.exists() and all(path.exists() for path in keep)


def test_atomic_path_failure_keeps_previous_output(tmp_path):
    final = tmp_path / "out.json"
    files.write_json(final, {"v": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_path(final) as temp:
            temp.write_text("partial")
            raise RuntimeError("boom")
    assert json.loads(final.read_text()) == {"v": 1} and hidden_leftovers(tmp_path) == []


def kill_when(command: list, cwd: Path, ready, timeout: float = 60) -> None:
    """Start `command`, SIGKILL it as soon as `ready(process)` is true (it must not have finished by then)."""
    process = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    deadline = time.time() + timeout
    try:
        while not ready(process):
            assert process.poll() is None, "the stage finished before it could be killed: make its input larger"
            assert time.time() < deadline, "the stage never reached the kill point"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL


def test_windows_killed_mid_run_reruns_to_the_same_output(tmp_path):
    write_params(tmp_path)
    data = tmp_path / "data"
    synthetic_shards(data / "shards", documents=120, seq_len=500, rows_per_shard=3000)
    reference = tmp_path / "reference"
    reference.mkdir()
    build_windows(data / "shards", reference, tiny_params("windows"))
    command = stage_command("windows", "--shards", data / "shards", "--out", data / "windows")

    # Kill once the first shard's windows are written into the temp dir (19 shards still to go).
    kill_when(command, tmp_path, lambda p: any(data.glob(".windows.*/windows/train.parquet")))
    assert not (data / "windows").exists()  # nothing half-written under the real name
    assert len(hidden_leftovers(data)) == 1  # the killed run's temp dir ...

    rerun = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert hidden_leftovers(data) == []  # ... is gone after the next run
    assert tree_digest(data / "windows") == tree_digest(reference)


def test_shard_killed_mid_run_reruns_to_the_same_output(tmp_path):
    """Trace chunks (synthetic shards renamed, plus the meta.json collect writes) -> many small shards; kill -9 once
    the first shard is written into the temp dir, re-run, compare with an uninterrupted in-process run."""
    write_params(tmp_path, {"shard": {"rows_per_shard": 500}})
    data = tmp_path / "data"
    manifest = synthetic_shards(tmp_path / "source", documents=120, seq_len=500, rows_per_shard=6000)
    (data / "traces").mkdir(parents=True)
    for index, entry in enumerate(manifest.shards):
        shutil.copy(tmp_path / "source" / entry["file"], data / "traces" / f"chunk-{index:05d}.parquet")
    files.write_json(data / "traces" / traces.META_NAME, {
        "model": manifest.model, "family": manifest.family, "moe_layers": manifest.moe_layers,
        "layer_stacks": manifest.layer_stacks, "num_experts": manifest.num_experts, "top_k": manifest.top_k,
        "shared_experts": 0, "capture": manifest.capture,
        "collect": {"chunks": len(manifest.shards), "domains": manifest.domains},
    })
    reference = tmp_path / "reference"
    reference.mkdir()
    write_shards(data / "traces", reference, tiny_params("shard", rows_per_shard=500))
    command = stage_command("shard", "--traces", data / "traces", "--out", data / "shards")

    kill_when(command, tmp_path, lambda p: any(data.glob(".shards.*/shards/shard-00000.parquet")))
    assert not (data / "shards").exists()  # nothing half-written under the real name

    rerun = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert hidden_leftovers(data) == []
    assert tree_digest(data / "shards") == tree_digest(reference)


def test_train_killed_mid_run_reruns_to_the_same_output(project, tiny):
    """Kill -9 after epoch 1 of 3; the re-run equals an uninterrupted in-process run, byte for byte."""
    overrides = {"train": {"epochs": 3, "patience": 3, "max_train_windows": 1000}}
    write_params(project, overrides)
    reference = project / "reference"
    with single_thread():
        train_predictor(tiny_params("train", **overrides["train"]), project / "data" / "windows", reference / "predictor",
                    reference / "dvclive")
    command = stage_command("train", *train_args(project))
    for path in (project / "data" / "predictor", project / "dvclive"):
        shutil.rmtree(path)

    kill_when(command, project, lambda p: p.stdout.readline().startswith("epoch 1:"))
    assert not (project / "data" / "predictor").exists() and not (project / "dvclive").exists()

    rerun = subprocess.run(command, cwd=project, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert hidden_leftovers(project / "data") == [] and hidden_leftovers(project) == []
    assert tree_digest(project / "data" / "predictor") == tree_digest(reference / "predictor")
    assert tree_digest(project / "dvclive") == tree_digest(reference / "dvclive")
    logged = json.loads((project / "dvclive" / "metrics.json").read_text())
    assert logged["epochs"] == 3 and math.isfinite(logged["val_loss"])
