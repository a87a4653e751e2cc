"""DVC stage evaluate: score the trained predictor and every baseline on the test split; write the metrics JSON
and the plots directory (moe_prefetch.evaluation.evaluate).

    python -m stages.evaluate --windows data/windows --shards data/shards --predictor data/predictor \
        --metrics metrics/evaluate.json --headline metrics/headline.json --plots plots
"""

from moe_prefetch.cli import run_stage, stage_arguments
from moe_prefetch.evaluation.config import EvaluateParams
from moe_prefetch.evaluation.evaluate import evaluate, headline
from moe_prefetch.files import atomic_path, write_json


def main() -> None:
    params, args = stage_arguments("evaluate", EvaluateParams, "Evaluate the predictor and the baselines on the test split.",
                                   "windows", "shards", "predictor", "metrics", "headline", "plots")
    with atomic_path(args.plots) as plots_dir:
        plots_dir.mkdir()
        metrics = evaluate(params, args.windows, args.shards, args.predictor, plots_dir)
        write_json(args.metrics, metrics)
        write_json(args.headline, headline(metrics))
    p, b = metrics["predictor"], metrics["baselines"]
    print(f"evaluate: predictor top1 {p['top1']:.4f} recall@k {p['recall_at_k']:.4f} | lookup top1 "
          f"{b['lookup']['top1']:.4f} | frequency top1 {b['frequency']['top1']:.4f} | random top1 {b['random']['top1']:.4f}")


if __name__ == "__main__":
    run_stage(main)
