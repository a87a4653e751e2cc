"""`python -m moe_prefetch.score_records`: a predictor run over another engine's routing records (the import
format) scores every token at every predictable layer exactly as the evaluate stage scores its test windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from conftest import run_module

from moe_prefetch.api import read_routing, read_windows


def write_records(path, tiny, sequences: set[str]) -> int:
    """The routing of `sequences` from the tiny run's shards as import-format JSON Lines; returns the token count."""
    routing = read_routing(tiny.shards)
    rows = [i for i, s in enumerate(routing.sequence_index) if routing.sequence_ids[s] in sequences]
    moe_layers = tiny.manifest.moe_layers
    with open(path, "w") as handle:
        for i in rows:
            for layer, true_index in enumerate(moe_layers):
                handle.write(json.dumps({"sequence_id": routing.sequence_ids[routing.sequence_index[i]],
                                         "position": int(routing.position[i]), "layer": true_index,
                                         "experts": routing.experts[i, layer].tolist(),
                                         "weights": routing.weights[i, layer].tolist()}) + "\n")
    return len(rows)


def test_scores_of_records_equal_the_evaluate_stage(tiny, tmp_path):
    test = read_windows(tiny.windows, "test")
    tokens = write_records(tmp_path / "records.jsonl", tiny, set(test.sequence_ids))
    result = run_module("moe_prefetch.score_records", "--predictor", tiny.predictor, "--records", tmp_path / "records.jsonl",
                        "--out", tmp_path / "scored", "--m", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "scored" / "accuracy.json").read_text())
    assert report["tokens"] == tokens and report["scored"] == len(test)
    for metric in ("top1", "recall_at_k", "recall_at_2k"):
        assert abs(report["overall"][metric] - tiny.metrics["predictor"][metric]) < 1e-6, metric
    predictions = pq.read_table(tmp_path / "scored" / "predictions.parquet")
    assert predictions.num_rows == len(test)
    assert np.asarray(predictions["predicted"].to_pylist()).shape == (len(test), 3)


def test_records_the_predictor_cannot_score_are_one_line_errors(tiny, tmp_path):
    (tmp_path / "records.jsonl").write_text(json.dumps({"sequence_id": "s", "position": 0, "layer": 0, "experts": [1, 2, 3],
                                                        "weights": [0.5, 0.3, 0.2]}) + "\n")
    result = run_module("moe_prefetch.score_records", "--predictor", tiny.predictor, "--records", tmp_path / "records.jsonl",
                        "--out", tmp_path / "scored", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --records:"), result.stderr
    assert "top-3" in lines[0] and "top-2" in lines[0]
    assert not (tmp_path / "scored").exists()
