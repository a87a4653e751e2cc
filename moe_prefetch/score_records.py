"""Run a trained predictor over routing records from another engine and write what it predicts and how well:
how an engine team checks a predictor on its own production traces without running the pipeline.

    python -m moe_prefetch.score_records --predictor data/predictor --records 'logs/*.jsonl' --out scored/ [--m 4]

The records are collect.import's format (one per sequence, token, MoE layer: sequence_id, position, layer,
experts, weights; moe_prefetch/collect/importer.py documents it, and bad records are the same one-line errors).
They go through the importer and the shard stage's writer into a temporary directory, then every token is
scored at every layer the predictor can predict (moe_prefetch.api.predict_experts: the routed sets of layers
0..l, what an engine knows when layer l has run), exactly as the evaluate stage scores its windows. Writes, into
--out (replaced only when complete):
  predictions.parquet  sequence_id, position, target_layer (MoE layer index), predicted (top-m ids, best first),
                       routed (the record's experts at that layer, best-first)
  accuracy.json        top-1 / top-m / recall@k / recall@2k overall and per target layer (metric definitions as in
                       metrics/evaluate.json), the records' geometry and counts
Predictors that read inputs the records lack (hidden_mlp's hidden state) are a one-line error.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_prefetch import traces
from moe_prefetch.api import load_predictor, predict_experts, read_routing
from moe_prefetch.cli import run_stage
from moe_prefetch.collect.config import CollectParams
from moe_prefetch.collect.importer import import_traces
from moe_prefetch.errors import PipelineError
from moe_prefetch.evaluation.metrics import RankingAccumulator
from moe_prefetch.files import atomic_path, write_json
from moe_prefetch.sharding import ShardParams, write_shards


def routing_of_records(records: str, num_experts: int, work: Path) -> traces.RoutingTable:
    """The records matched by glob `records`, imported and sharded under `work`, as arrays."""
    params = CollectParams(import_glob=records, num_experts=num_experts)
    params.validate()
    import_traces(params, work / "traces")
    (work / "shards").mkdir()
    write_shards(work / "traces", work / "shards", ShardParams())
    return read_routing(work / "shards")


def score_records(predictor_dir: Path, records: str, out: Path, m: int | None = None) -> dict:
    """Score every predictable (token, layer) of the records; write predictions.parquet and accuracy.json."""
    predictor = load_predictor(predictor_dir)
    g = predictor.geometry
    E, k, L, c, h = (int(g[name]) for name in ("num_experts", "top_k", "num_layers", "context_length", "horizon"))
    m = k if m is None else m
    with tempfile.TemporaryDirectory(prefix="score-records-") as work:
        routing = routing_of_records(records, E, Path(work))
    if routing.experts.shape[1:] != (L, k):
        raise PipelineError(f"--records: {records!r} has {routing.experts.shape[1]} MoE layers of top-{routing.experts.shape[2]} "
                            f"routing; the predictor was trained on {L} layers of top-{k}")
    accuracy = RankingAccumulator(sorted({1, m}), E, k)
    columns: dict[str, list] = {"sequence_id": [], "position": [], "target_layer": [], "predicted": [], "routed": []}
    sequence_ids = np.asarray(routing.sequence_ids, dtype=object)[routing.sequence_index]
    for layer in range(c - 1, L - h):
        target = routing.experts[:, layer + h]  # (N, k)
        predicted, scores = predict_experts(predictor, routing.experts[:, : layer + 1], layer=layer, m=m)
        accuracy.update(scores, target, {"layer": np.full(len(target), layer + h, dtype=np.int64)})
        for name, values in (("sequence_id", sequence_ids), ("position", routing.position),
                             ("target_layer", np.full(len(target), layer + h, dtype=np.int16)),
                             ("predicted", predicted.astype(np.int16)), ("routed", target)):
            columns[name].append(values)
    table = pa.table({
        "sequence_id": pa.array(np.concatenate(columns["sequence_id"]), type=pa.string()),
        "position": pa.array(np.concatenate(columns["position"]), type=pa.int32()),
        "target_layer": pa.array(np.concatenate(columns["target_layer"]), type=pa.int16()),
        "predicted": traces.nested_array(np.concatenate(columns["predicted"]), pa.int16()),
        "routed": traces.nested_array(np.concatenate(columns["routed"]), pa.int16()),
    })
    report = {
        "records": records, "tokens": len(routing.position), "scored": table.num_rows, "m": m,
        "geometry": {"num_layers": L, "top_k": k, "num_experts": E, "context_length": c, "horizon": h},
        "overall": accuracy.result(),
        "per_layer": {f"layer_{layer}": result for layer, result in accuracy.result_by_group("layer").items()},
    }
    with atomic_path(out) as temp:
        temp.mkdir()
        pq.write_table(table, temp / "predictions.parquet")
        write_json(temp / "accuracy.json", report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="Score routing records from another engine with a trained predictor.")
    parser.add_argument("--predictor", type=Path, required=True, help="a trained predictor directory (data/predictor)")
    parser.add_argument("--records", required=True, help="glob of .jsonl/.csv/.parquet routing records (collect.import format)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write predictions.parquet and accuracy.json")
    parser.add_argument("--m", type=int, default=None, help="experts predicted per token and layer (default: top_k)")
    args = parser.parse_args()
    if args.m is not None and args.m < 1:
        raise PipelineError(f"--m: must be >= 1, got {args.m}")
    report = score_records(args.predictor, args.records, args.out, args.m)
    overall = report["overall"]
    print(f"score_records: {report['scored']} (token, layer) pairs of {report['tokens']} tokens: top-1 {overall['top1']:.4f}, "
          f"recall@k {overall['recall_at_k']:.4f} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
