"""Bad collect inputs through the CLI: one line on stderr starting `error:`, exit 1, no output written.

The stage's main() runs in-process through run_stage (exactly what `python -m stages.collect` runs), except the
offline hub case: HF_HUB_OFFLINE is read when huggingface_hub is imported, so it needs a fresh process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

import stages.collect
from conftest import MODEL, TINY, subprocess_env, tree_digest

SMALL = {**TINY["collect"], "sources": ["python-docs"], "num_sequences": 2, "model": str(MODEL)}


def write_params(directory, **overrides):
    (directory / "params.yaml").write_text(yaml.safe_dump({"collect": {**SMALL, **overrides}}))


def dense_model(directory):
    import transformers

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=2048)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / name, directory / name)
    return directory


def corrupted_model(directory):
    shutil.copytree(MODEL, directory)
    weights = directory / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return directory


def text_source(directory, name: str, content: bytes):
    path = directory / "inputs" / name  # collect reads files below inputs/ of the working directory only
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return [{"name": "mine", "path": str(path)}]


CASES = {
    "missing model": (lambda d: {"model": str(d / "no-such-model")}, ["collect.model", "no-such-model", "not a checkpoint directory"]),
    "directory without config.json": (lambda d: {"model": str(d)}, ["collect.model", "not a checkpoint directory (no config.json)"]),
    "dense model": (lambda d: {"model": str(dense_model(d / "dense"))}, ["collect.model", "'llama'", "dense model"]),
    "corrupted weights": (lambda d: {"model": str(corrupted_model(d / "broken"))}, ["collect.model", "corrupted safetensors"]),
    "empty source": (lambda d: {"sources": text_source(d, "empty.txt", b"")}, ["collect.sources", "'mine'", "no chunk"]),
    "whitespace source": (lambda d: {"sources": text_source(d, "blank.txt", b"  \n\n\t \n")}, ["'mine'", "no chunk"]),
    "binary source": (lambda d: {"sources": text_source(d, "data.txt", bytes(range(256)) * 4)}, ["data.txt", "binary"]),
    "unknown source": (lambda d: {"sources": ["python-doc"]}, ["collect.sources", "unknown source", "'python-doc'", "python-docs"]),
    "source outside inputs/": (lambda d: {"sources": [{"name": "mine", "path": "corpus/*.txt"}]},
                               ["collect.sources: mine: 'corpus/*.txt' is outside inputs/", "only below inputs/"]),
}


def assert_fails_cleanly(run_main, directory, fragments) -> str:
    """`python -m stages.collect` run in `directory` (the working directory, holding params.yaml) exits 1 with one
    `error:` line holding every fragment, creates no output directory and leaves an earlier run's output as it was."""
    previous = directory / "previous"
    previous.mkdir()
    (previous / "chunk-00000.parquet").write_text("earlier run")
    before = tree_digest(previous)
    for out in ("traces", "previous"):
        code, lines = run_main(stages.collect, "--out", out, "--params", "params.yaml")
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
        assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (directory / "traces").exists() and tree_digest(previous) == before
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, run_main):
    make, fragments = CASES[case]
    write_params(tmp_path, **make(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert_fails_cleanly(run_main, tmp_path, fragments)


def test_hub_id_offline_says_offline(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"collect": {**SMALL, "model": "no-such-org/no-such-moe"}}))
    result = subprocess.run([sys.executable, "-m", "stages.collect", "--out", "traces", "--params", "params.yaml"], cwd=tmp_path,
                            env={**subprocess_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: collect.model:"), result.stderr
    assert "offline" in lines[0] and "no-such-org/no-such-moe" in lines[0]
    assert not (tmp_path / "traces").exists()
