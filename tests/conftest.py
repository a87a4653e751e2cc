"""Shared fixtures: a tiny trace set made by really running the stages on models/tiny-moe, and helpers to run
a stage's CLI (in-process or as a subprocess), craft shards, and compare output trees byte for byte.

The `tiny` fixture is built once per session (~20 s on 2 cores): 12 sequences of 32 tokens per source
(2 sources), 8 MoE layers x 16 experts, top-2; shards of 200 rows (sequences span shard boundaries); windows
with context 2 / horizon 1 split 0.6/0.2/0.2; a `lookup` and a one-epoch `speculation_transformer` predictor.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from moe_prefetch import traces
from moe_prefetch.errors import PipelineError
from moe_prefetch.params import parse_section
from moe_prefetch.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-moe"

# Small enough for seconds on 2 cores; every key is a real params.yaml key.
TINY = {
    "collect": {"model": "models/tiny-moe", "num_sequences": 12, "seq_len": 32, "chunks_per_document": 2,
                "min_tokens": 8, "batch_size": 4, "sequences_per_chunk": 4},
    "shard": {"rows_per_shard": 200},
    "windows": {"context_length": 2, "horizon": 1, "split": {"by": "sequence", "fractions": [0.6, 0.2, 0.2], "seed": 0}},
    "train": {"arch": "speculation_transformer", "epochs": 1, "batch_size": 64, "max_train_windows": 2000, "launcher": "python",
              "speculation_transformer": {"d_model": 16, "heads": 2, "ff": 32, "layers": 1, "dropout": 0.0}},
    "evaluate": {"top_m": [1, 3, 5, 10], "score_batch_size": 512, "max_horizon": 3},
}


def merged(base: dict, overrides: dict) -> dict:
    """A deep copy of `base` with the (nested) `overrides` applied."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def tiny_params(section: str, **overrides):
    """The validated TINY params of `section`, with overrides (nested dicts merge)."""
    raw = merged(TINY[section], overrides)
    if section == "collect":
        raw["model"] = str(ROOT / raw["model"])
    return parse_section(section, raw)


def write_params(directory: Path, overrides: dict | None = None) -> Path:
    """Write TINY (+ overrides) as directory/params.yaml; return its path."""
    path = Path(directory) / "params.yaml"
    path.write_text(yaml.safe_dump(merged(TINY, overrides or {}), sort_keys=False))
    return path


def assert_error(call, *fragments: str) -> str:
    """`call()` raises PipelineError whose one-line message contains every fragment; return the message."""
    with pytest.raises(PipelineError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `path` (or of `path` itself); {} if it does not exist."""
    path = Path(path)
    if path.is_file():
        return {".": traces.sha256_file(path)}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): traces.sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def hidden_leftovers(directory: Path) -> list[str]:
    """Names of dot-entries (the `.name.XXXX` temp siblings atomic_path makes) directly in `directory`."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


@contextlib.contextmanager
def single_thread():
    """One torch thread, as in subprocess_env(): much faster on a shared 2-core box, and the same float results
    in-process and in a stage subprocess."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spread_routers(model):
    """`model` with every router's weight redrawn from N(0, 1) (and a DeepSeek-V3-style score-correction bias from
    U(-0.3, 0.3)), in place: at the default init std the routing of a tiny random model is near-uniform, full of
    near-ties that float rounding could flip. Seed torch before building the model for a deterministic draw."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("Router"):
                weight = module.classifier.weight if hasattr(module, "classifier") else module.weight
                weight.normal_(0.0, 1.0)
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    """A TCP port nobody listens on, for a distributed launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(num_processes: int, stage: str, *args: str) -> list[str]:
    """`accelerate launch` of a stage module with `num_processes` processes (gloo on a CPU-only machine)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", f"stages.{stage}", *map(str, args)]


def stage_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", *map(str, args)]


def run_module(module: str, *args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` in `cwd`, as a user would."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_cli(stage: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage> args` in `cwd` (which holds params.yaml)."""
    return run_module(f"stages.{stage}", *args, cwd=cwd, timeout=timeout)


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def repo_process(repo: Path, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` (dvc, git) in the repo copy `repo`, whose own stages are on PYTHONPATH (not ROOT's)."""
    env = {**subprocess_env(), **GIT_IDENTITY, "PYTHONPATH": str(repo)}
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def repo_run(repo: Path, *command: str, timeout: float = 300) -> str:
    """repo_process() that must exit 0; its stdout."""
    result = repo_process(repo, *command, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def lock_outputs(repo: Path) -> dict[str, str]:
    """output path -> md5 of every stage output recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def copy_repo(repo: Path, overrides: dict | None = None) -> Path:
    """The files git sees in the working tree (tracked + untracked, not ignored) copied to `repo`, with the TINY
    params (+ overrides; the model path stays relative, as in params.yaml), committed in a fresh git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    write_params(repo, overrides)
    repo_run(repo, "git", "init", "-q")
    repo_run(repo, "git", "add", "-A")
    repo_run(repo, "git", "commit", "-q", "-m", "snapshot")
    return repo


@pytest.fixture
def run_main(monkeypatch, capsys):
    """Run a stage module's CLI in-process through run_stage: returns (exit code, stderr lines)."""
    from moe_prefetch.cli import run_stage

    def run(module, *args) -> tuple[int, list[str]]:
        monkeypatch.setattr(sys, "argv", [module.__name__, *map(str, args)])
        capsys.readouterr()
        try:
            run_stage(module.main)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        return code, capsys.readouterr().err.strip().splitlines()

    return run


@dataclass
class Tiny:
    root: Path
    traces: Path
    shards: Path
    windows: Path
    predictor: Path  # speculation_transformer
    lookup: Path  # lookup predictor
    live: Path
    plots: Path
    manifest: traces.Manifest
    summary: dict
    train_result: dict
    metrics: dict


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    from moe_prefetch.collect.collector import collect
    from moe_prefetch.evaluation.evaluate import evaluate
    from moe_prefetch.sharding import write_shards
    from moe_prefetch.training import train
    from moe_prefetch.windows.build import build_windows

    root = tmp_path_factory.mktemp("tiny")
    paths = {name: root / name for name in ("traces", "shards", "windows", "predictor", "lookup", "live", "plots")}
    for name in ("shards", "windows", "plots"):
        paths[name].mkdir()
    with single_thread():
        collect(tiny_params("collect"), paths["traces"])
        manifest = write_shards(paths["traces"], paths["shards"], tiny_params("shard"))
        summary = build_windows(paths["shards"], paths["windows"], tiny_params("windows"))
        train_result = train(tiny_params("train"), paths["windows"], paths["predictor"], paths["live"])
        train(tiny_params("train", arch="lookup"), paths["windows"], paths["lookup"], root / "live-lookup")
        metrics = evaluate(tiny_params("evaluate"), paths["windows"], paths["shards"], paths["predictor"], paths["plots"])
    return Tiny(root=root, **paths, manifest=manifest, summary=summary, train_result=train_result, metrics=metrics)


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def read_shard_tables(shard_dir: Path) -> pa.Table:
    manifest = traces.Manifest.read(shard_dir)
    return pa.concat_tables(pq.read_table(shard_dir / entry["file"]) for entry in manifest.shards)


def rewrite_routing(path: Path, manifest: traces.Manifest, edit) -> None:
    """Rewrite a Parquet trace chunk/shard with `edit(experts, weights)` applied in place to its numpy arrays."""
    table = pq.read_table(path)
    experts = traces.read_column(table, "experts", manifest.geometry).copy()
    weights = traces.read_column(table, "weights", manifest.geometry).copy()
    edit(experts, weights)
    for name, values in (("experts", experts), ("weights", weights)):
        table = table.set_column(table.schema.get_field_index(name), name, traces.column_array(name, values))
    pq.write_table(table, path)


def reseal_shard(shard_dir: Path, index: int) -> None:
    """Recompute shard `index`'s sha256 in the manifest (so a crafted shard passes the checksum)."""
    manifest = traces.Manifest.read(shard_dir)
    entry = manifest.shards[index]
    entry["sha256"] = traces.sha256_file(shard_dir / entry["file"])
    manifest.write(shard_dir / traces.MANIFEST_NAME)


def synthetic_shards(directory: Path, documents: int, seq_len: int, rows_per_shard: int, seed: int = 0,
                     num_layers: int = 8, top_k: int = 2, num_experts: int = 16) -> traces.Manifest:
    """Random routing shards + manifest in the shard stage's format (for inputs larger than the tiny model run):
    `documents` documents of one seq_len-token sequence each (moe_prefetch/synthetic.py)."""
    return write_synthetic_shards(directory, documents * seq_len, rows_per_shard, seed, num_layers, top_k, num_experts,
                                  seq_len=seq_len, chunks_per_document=1, min_tokens=seq_len)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end DVC run (~1-2 min); part of the default suite")
