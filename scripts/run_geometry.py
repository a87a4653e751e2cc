"""Run the whole pipeline on the second embedded checkpoint, models/tiny-moe-64x6 (64 routed experts, top-6), as a
DVC experiment, and write its summary `metrics/geometry.json`, which `scripts/update_readme.py` renders next to the
default model's results (README section `geometry`).

    python scripts/run_geometry.py              # dvc exp run --temp -n geometry-64x6 ..., then the summary
    python scripts/run_geometry.py --no-run     # only the summary, from the finished experiment of that name
    python scripts/run_geometry.py --workspace  # run it in this working tree instead (no temp copy), then restore
                                                # the tracked params and outputs from git HEAD (data/: dvc checkout)
    python scripts/run_geometry.py --set collect.num_sequences=250   # any further -S override, recorded in the summary

The experiment changes the model and scales the expert cache to the geometry: the default caches 4 of 16 experts
per layer and prefetches top-2 (= k); here 16 of 64 and top-6 (= k), so both cache the same share of the experts
and prefetch one routed set. Everything else is the default params.yaml. The wall time is that of `dvc exp run`
(every stage from scratch), measured here; it is a rough figure on whatever machine ran it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import update_readme
from experiments import exp_run_command, experiment_metrics, timed_run
from update_readme import pct, pct_interval, table

EXPERIMENT = "geometry-64x6"
MODEL = "models/tiny-moe-64x6"
OVERRIDES = (f"collect.model={MODEL}", "evaluate.cache.capacity=16", "evaluate.cache.prefetch_m=6",
             "evaluate.cache.capacity_sweep=[4,8,16,32,48]")
SUMMARY = Path("metrics/geometry.json")
ACCURACY_KEYS = ("top1", "top1_ci95", "top5", "recall_at_k", "recall_at_k_ci95")
CACHE_KEYS = ("hit_rate", "speedup_vs_on_demand", "speedup_ci95", "share_of_ideal")
STRATEGIES = ("on_demand", "belady", "predictor", "predictor_gated", "lookup", "oracle", "oracle_belady", "ideal")


TRACKED_OUTPUTS = ("params.yaml", "dvc.lock", "metrics", "plots", "dvclive")  # what a workspace run rewrites


def command(extra: tuple[str, ...] = (), temp: bool = True) -> list[str]:
    """The `dvc exp run` of the experiment: OVERRIDES, then the `extra` KEY=VALUE overrides."""
    return exp_run_command(EXPERIMENT, (*OVERRIDES, *extra), temp)


def summary_of(metrics: dict, wall_seconds: float | None, run: list[str] | None = None) -> dict:
    """The part of an evaluate.json the README compares: geometry, accuracy with intervals of the predictor and of
    every baseline, the paired top-1 difference to the best baseline, and the main cache replay."""
    def accuracy(result: dict) -> dict:
        return {key: result[key] for key in ACCURACY_KEYS if key in result}

    cache = metrics["cache"]
    return {
        "experiment": EXPERIMENT,
        "command": " ".join(run or command()),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
        "data": metrics["data"],
        "test_windows": metrics["test_windows"],
        "bootstrap": metrics["bootstrap"],
        "predictor": {"arch_parameters": metrics["predictor"].get("arch_parameters"), **accuracy(metrics["predictor"])},
        "baselines": {name: accuracy(result) for name, result in metrics["baselines"].items()},
        "predictor_minus_best_baseline_top1": metrics["predictor_minus_best_baseline_top1"],
        "cache": {"config": cache["config"],
                  **{s: {key: cache[s][key] for key in CACHE_KEYS if key in cache[s]} for s in STRATEGIES if s in cache}},
    }


def geometry_section(summary: dict, default: dict) -> str:
    """README table: the default model's test accuracy next to the 64x6 model's, per scorer, with the 64x6
    predictor's lead over each scorer; then the cache replay's speedups of both."""
    g, d = summary["data"], default["data"]
    scorers = [("predictor", default["predictor"], summary["predictor"])] + [
        (name, default["baselines"].get(name), summary["baselines"][name])
        for name in update_readme.BASELINES if name in summary["baselines"]]
    p = summary["predictor"]
    rows = [[name, pct_interval(base, "top1") if base else "-", pct_interval(base, "recall_at_k") if base else "-",
             pct_interval(ours, "top1"), pct_interval(ours, "recall_at_k"),
             "" if name == "predictor" else f"{100 * (p['top1'] - ours['top1']):+.1f} / {100 * (p['recall_at_k'] - ours['recall_at_k']):+.1f}"]
            for name, base, ours in scorers]
    diff = summary["predictor_minus_best_baseline_top1"]
    strategies = [s for s in STRATEGIES if s in summary["cache"] and s in default["cache"]]
    cache_rows = [[s, f"{default['cache'][s]['speedup_vs_on_demand']:.3f}x", pct(default["cache"][s].get("hit_rate")),
                   f"{summary['cache'][s]['speedup_vs_on_demand']:.3f}x", pct(summary["cache"][s].get("hit_rate"))]
                  for s in strategies]
    dc, gc = default["cache"]["config"], summary["cache"]["config"]
    wall = "" if summary["wall_seconds"] is None else f"; every stage from scratch took {summary['wall_seconds'] / 60:.1f} min of wall time on the shared 2-core development machine"
    return "\n\n".join([
        f"`{MODEL}` ({g['num_experts']} experts, top-{g['top_k']}, {g['num_layers']} MoE layers) next to the default "
        f"`models/tiny-moe` ({d['num_experts']} experts, top-{d['top_k']}): experiment `{summary['experiment']}`, "
        f"`python scripts/run_geometry.py{'' if '--temp' in summary['command'] else ' --workspace'}` (`{summary['command']}`){wall}. The summary it writes, "
        f"`metrics/geometry.json`, is rendered here. Test split: {summary['test_windows']:,} windows from "
        f"{summary['bootstrap']['documents']} documents (default: {default['test_windows']:,} from "
        f"{default['bootstrap']['documents']}); intervals are 95% document-bootstrap intervals.",
        table(["scorer", "default top-1", "default recall@k", "64x6 top-1", "64x6 recall@k",
               "64x6 predictor minus scorer (top-1 / recall@k, points)"], rows),
        f"64x6: predictor minus the best baseline ({diff['best_baseline']}) on top-1: {100 * diff['difference']:+.1f} "
        f"points [{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}] (paired bootstrap).",
        f"Expert cache: default capacity {dc['capacity']} per layer, prefetch top-{dc['prefetch_m']}; 64x6 capacity "
        f"{gc['capacity']}, prefetch top-{gc['prefetch_m']} (the same share of the experts cached); speedup over on-demand "
        "loading and on-time hit rate:",
        table(["strategy", "default speedup", "default hits", "64x6 speedup", "64x6 hits"], cache_rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help=f"summarise the finished experiment {EXPERIMENT} only")
    parser.add_argument("--workspace", action="store_true", help="run in this working tree, then restore its tracked outputs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a further -S override")
    args = parser.parse_args()
    run = command(tuple(args.set), temp=not args.workspace)
    wall_seconds = None
    if not args.no_run:
        wall_seconds = timed_run(run)
    if args.workspace and not args.no_run:
        metrics = json.loads(Path("metrics/evaluate.json").read_text())
        subprocess.run(["git", "checkout", "HEAD", "--", *TRACKED_OUTPUTS], check=True)
        print("restored params.yaml and the tracked outputs from HEAD; `dvc checkout` restores data/", file=sys.stderr)
    else:
        metrics = experiment_metrics(EXPERIMENT)
    SUMMARY.write_text(json.dumps(summary_of(metrics, wall_seconds, run), indent=2) + "\n")
    print(f"wrote {SUMMARY}; now run python scripts/update_readme.py", file=sys.stderr)


if __name__ == "__main__":
    main()
