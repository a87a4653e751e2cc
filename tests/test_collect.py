"""The collect stage on models/tiny-moe: generate mode, bfloat16, captures, resume after kill -9, data parallel.

In-process runs use one torch thread (two threads on two shared cores are many times slower than one). The
resume and data-parallel tests start real processes: the first is killed with SIGKILL after its first chunk, the
second is `accelerate launch --multi_gpu --num_processes 2` (on a CPU-only machine that is two gloo processes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import MODEL, TINY, accelerate_command, subprocess_env, tiny_params

from moe_prefetch import traces
from moe_prefetch.collect.collector import PACKAGE_DIR, code_fingerprint, collect, plan_digest, software_versions
from moe_prefetch.collect.models import model_fingerprint
from moe_prefetch.sharding import write_shards

SMALL = {"sources": ["python-docs"], "num_sequences": 6, "seq_len": 32, "min_tokens": 8, "batch_size": 2, "sequences_per_chunk": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(directory: Path, **overrides):
    """collect in-process into directory; returns (params, all chunk rows as one table)."""
    params = tiny_params("collect", **{**SMALL, **overrides})
    collect(params, directory)
    return params, chunks(directory)


def chunks(directory: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(Path(directory).glob("chunk-*.parquet")))


def shard_table(trace_dir: Path, out: Path) -> tuple[traces.Manifest, pa.Table]:
    out.mkdir()
    manifest = write_shards(trace_dir, out, tiny_params("shard"))
    return manifest, pa.concat_tables(pq.read_table(out / e["file"]) for e in manifest.shards)


@pytest.fixture(scope="module")
def forward_dir(tmp_path_factory) -> Path:
    """An uninterrupted single-process forward-mode run of SMALL."""
    directory = tmp_path_factory.mktemp("forward") / "traces"
    run(directory)
    return directory


@pytest.fixture(scope="module")
def forward(forward_dir) -> pa.Table:
    return chunks(forward_dir)


def routing(table: pa.Table, name: str = "experts", k: int = 2) -> np.ndarray:
    return traces.column_to_numpy(table[name], (8, k))


def test_generate_records_prompt_then_decode_routing(tmp_path, forward):
    params, table = run(tmp_path / "gen", mode="generate", max_new_tokens=4)
    prompt = table.filter(pc.invert(table["generated"]))
    assert prompt.equals(forward)  # prefill of a right-padded batch routes exactly as forward mode
    generated = table.filter(table["generated"])
    assert generated.num_rows > 0
    from moe_prefetch.collect.config import CaptureParams
    from moe_prefetch.collect.generation import forward_rows
    from moe_prefetch.collect.models import load_model
    from moe_prefetch.routing import adapter_for
    from moe_prefetch.routing.recorder import RoutingRecorder

    model = load_model(params.model, "float32", "cpu")
    adapter = adapter_for(model)
    recorder = RoutingRecorder(adapter, CaptureParams(), projection_seed=0)
    for sequence_id in pc.unique(table["sequence_id"]).to_pylist():
        rows = table.filter(pc.equal(table["sequence_id"], sequence_id))
        flags = rows["generated"].to_numpy(zero_copy_only=False)
        n_prompt, n_new = int((~flags).sum()), int(flags.sum())
        assert 1 <= n_new <= 4 and not flags[:n_prompt].any()  # prompt rows first, then the generated ones
        assert rows["position"].to_pylist() == list(range(n_prompt + n_new))
        # one plain forward over prompt + generated tokens: the same routing, and each token is the greedy choice
        ids = rows["token_id"].to_pylist()
        full = forward_rows(model, adapter, recorder, [ids], 0, "cpu")[0]
        assert np.array_equal(full["experts"], routing(rows))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        recorder.reset()
        assert logits[n_prompt - 1 : -1].argmax(-1).tolist() == ids[n_prompt:]
    recorder.remove()
    meta = json.loads((tmp_path / "gen" / "meta.json").read_text())
    assert meta["collect"]["params"]["mode"] == "generate"


def test_every_sequence_starts_with_the_bos_and_meta_names_it(forward_dir, forward):
    meta = json.loads((forward_dir / "meta.json").read_text())["collect"]
    assert meta["bos_token_id"] == 0 and meta["params"]["add_bos"] is True  # tiny-moe's BOS is <|endoftext|>, id 0
    assert meta["software_versions"] == software_versions()
    first = forward.filter(pc.equal(forward["position"], 0))
    assert first.num_rows == meta["sequences"] and set(first["token_id"].to_pylist()) == {0}
    assert 0 not in forward.filter(pc.greater(forward["position"], 0))["token_id"].to_pylist()


def test_bfloat16_records_valid_routing(tmp_path, forward):
    _, table = run(tmp_path / "bf16", dtype="bfloat16")
    experts, weights = routing(table), routing(table, "weights")
    assert table.num_rows == forward.num_rows
    assert ((experts >= 0) & (experts < 16)).all() and (experts[..., 0] != experts[..., 1]).all()
    assert np.isfinite(weights).all() and (weights > 0).all() and (weights[..., 0] >= weights[..., 1]).all()
    assert (np.sort(experts, -1) == np.sort(routing(forward), -1)).all(-1).mean() > 0.8  # mostly as in float32
    shard_table(tmp_path / "bf16", tmp_path / "shards")  # the shard stage validates ids and weights


def test_hidden_states_and_lookahead_captures(tmp_path, forward):
    _, table = run(tmp_path / "cap", capture={"hidden_states": True, "hidden_dim": 64, "lookahead": 3})
    assert table.select(forward.column_names).equals(forward)  # captures do not change the recorded routing
    manifest, _ = shard_table(tmp_path / "cap", tmp_path / "shards")
    assert manifest.capture["hidden_dim"] == 64 and manifest.capture["lookahead"] == 3
    data = traces.read_routing(tmp_path / "shards", manifest, with_hidden=True)
    assert data.hidden_states.shape == (table.num_rows, 8, 64) and np.isfinite(data.hidden_states).all()
    look = data.lookahead_experts  # (N, L, H, k): -1 exactly where layer l + h is past the last MoE layer
    past = np.arange(8)[:, None] + np.arange(1, 4)[None, :] >= 8
    assert (look[:, past] == -1).all() and ((look[:, ~past] >= 0) & (look[:, ~past] < 16)).all()


def test_plan_digest_changes_with_params_and_model_weights(tmp_path):
    params = tiny_params("collect")
    fingerprint = model_fingerprint(str(MODEL))
    assert plan_digest(params, [], fingerprint) == plan_digest(params, [], fingerprint)
    assert plan_digest(tiny_params("collect", mode="generate"), [], fingerprint) != plan_digest(params, [], fingerprint)
    retrained = tmp_path / "model"
    shutil.copytree(MODEL, retrained)
    weights = retrained / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: a different model must not resume another model's traces
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(retrained)) != fingerprint


def test_plan_digest_changes_with_row_code_and_library_versions(tmp_path, monkeypatch):
    params = tiny_params("collect")
    package = tmp_path / "moe_prefetch"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(package) == code_fingerprint()  # relative paths and bytes: where the package lives does not count
    families = package / "routing" / "families.py"
    families.write_text(families.read_text().replace("return 2  # sparsemixer", "return 3  # sparsemixer"))
    edited = code_fingerprint(package)
    assert edited != code_fingerprint()
    assert plan_digest(params, [], "model", code=edited) != plan_digest(params, [], "model")
    for module in ("traces.py", "collect/generation.py"):  # the other row-shaping code counts too; the rest does not
        (package / module).write_text((package / module).read_text() + "\n")
        assert code_fingerprint(package) != edited
        edited = code_fingerprint(package)
    (package / "progress.py").write_text((package / "progress.py").read_text() + "\n")
    assert code_fingerprint(package) == edited
    before = plan_digest(params, [], "model")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "0.0.1")  # from_pretrained replaces it there
    assert software_versions()["transformers"] == "0.0.1"
    assert plan_digest(params, [], "model") != before
    assert plan_digest(params, [], "model", versions={"torch": torch.__version__, "transformers": "0.0.1"}) != before


def test_plan_digest_keeps_what_cannot_change_rows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    digest = {device: plan_digest(tiny_params("collect", device=device), [], "model") for device in ("cpu", "auto", "cuda", "cuda:1")}
    assert digest["auto"] == digest["cpu"]  # device_map=auto without a GPU computes on the CPU
    assert digest["cuda:1"] == digest["cuda"] != digest["cpu"]  # another GPU of the same kind; CUDA kernels round differently
    # batch_size changes the float rounding of the gate weights (plan_digest's docstring), so it restarts collection
    assert plan_digest(tiny_params("collect", batch_size=2), [], "model") != plan_digest(tiny_params("collect"), [], "model")


def write_yaml(directory: Path, **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    raw = {"collect": {**TINY["collect"], **SMALL, "model": str(MODEL), **overrides}}
    (directory / "params.yaml").write_text(yaml.safe_dump(raw))
    return directory / "params.yaml"


def one_thread_env() -> dict:
    return {**subprocess_env(), "OMP_NUM_THREADS": "1"}


# `python -m stages.collect`, except that writing the second chunk stalls half-way (inside atomic_path), so the
# SIGKILL always lands after one finished chunk and in the middle of the next write.
STALLING_COLLECT = """
import sys, time
import moe_prefetch.collect.collector as collector
import stages.collect
from moe_prefetch.cli import run_stage
from moe_prefetch.files import atomic_path

write = collector.write_chunk

def write_or_stall(path, table):
    if path.name != "chunk-00000.parquet":
        with atomic_path(path) as temp:
            temp.write_bytes(b"half a chunk")
            time.sleep(600)
    write(path, table)

collector.write_chunk = write_or_stall
sys.argv = ["stages.collect", "--out", "traces", "--params", "params.yaml"]
run_stage(stages.collect.main)
"""


def test_a_finished_run_is_collected_anew_not_resumed(tmp_path, forward, capsys):
    """`dvc repro -f collect` (or a dependency outside the plan digest) re-runs a finished collect: every chunk is
    written again, none "kept from an interrupted run", with the same rows."""
    out = tmp_path / "traces"
    collect(tiny_params("collect", **SMALL), out)
    first = {path.name: path.stat().st_mtime_ns for path in out.glob("chunk-*")}
    capsys.readouterr()
    collect(tiny_params("collect", **SMALL), out)
    assert "0 kept from an interrupted run" in capsys.readouterr().out
    assert all(path.stat().st_mtime_ns != first[path.name] for path in out.glob("chunk-*")) and len(first) >= 1
    assert chunks(out).equals(forward)


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path, forward, forward_dir):
    write_yaml(tmp_path)  # 2 chunks
    out = tmp_path / "traces"
    process = subprocess.Popen([sys.executable, "-c", STALLING_COLLECT], cwd=tmp_path, env=one_thread_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob(".chunk-00001.parquet.*/*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert [p.name for p in out.glob("chunk-*")] == ["chunk-00000.parquet"] and not (out / "meta.json").exists()
    first = (out / "chunk-00000.parquet").stat().st_mtime_ns

    collect(tiny_params("collect", **SMALL), out)  # the re-run resumes
    assert (out / "chunk-00000.parquet").stat().st_mtime_ns == first  # kept, not recomputed
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed write's temp is gone
    assert chunks(out).equals(forward)
    manifest, table = shard_table(out, tmp_path / "shards")
    reference, reference_table = shard_table(forward_dir, tmp_path / "reference-shards")
    assert table.equals(reference_table) and manifest.rows == forward.num_rows
    assert [e["sha256"] for e in manifest.shards] == [e["sha256"] for e in reference.shards]  # bytes equal too


def test_data_parallel_under_accelerate_equals_one_process(tmp_path, forward):
    write_yaml(tmp_path)  # 6 sequences, 4 per chunk: rank 0 takes chunk 0, rank 1 chunk 1
    command = accelerate_command(2, "collect", "--out", "traces", "--params", "params.yaml")
    result = subprocess.run(command, cwd=tmp_path, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "collect[0/2]: 1 chunks written" in result.stdout and "collect[1/2]: 1 chunks written" in result.stdout
    assert chunks(tmp_path / "traces").equals(forward)
    _, table = shard_table(tmp_path / "traces", tmp_path / "shards")
    assert table.equals(forward)
