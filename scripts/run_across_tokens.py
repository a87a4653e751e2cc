"""Issue #12 on the default data: windows.across_tokens, a learned prediction for every MoE layer (the first layers
included, from the previous token's last layers and the newest known token id) and for the next token (h = L, a
whole forward pass ahead), as DVC experiments, next to the default run (metrics/evaluate.json, whose first c-1+h
layers get the `token` fallback table in the replay). Summary `metrics/across_tokens.json`, which
`scripts/update_readme.py` renders (README section `across-tokens`).

    python scripts/run_across_tokens.py                  # dvc exp run --temp -n <name> ... for every VARIANTS entry
    python scripts/run_across_tokens.py --no-run         # only the summary, from the finished experiments
    python scripts/run_across_tokens.py --only across-h1 # a subset of the variants

Each experiment is the default params.yaml with windows.across_tokens on and the variant's overrides, with the full
evaluate stage (the cache replay is what this comparison reads). The wall time of each `dvc exp run` is measured here
and kept (--no-run keeps the times of an earlier summary for the same command, or those given with --wall-seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import exp_run_command, experiment_metrics, timed_run
from run_hidden_state import accuracy, interval, points
from update_readme import table

SUMMARY = Path("metrics/across_tokens.json")
DEFAULT = Path("metrics/evaluate.json")
ACROSS = ("windows.across_tokens=true",)
VARIANTS = {  # experiment name -> its overrides after ACROSS
    "across-h1": (),
    "across-h1-within": ("evaluate.cache.across_steps=false",),  # layers 0..h-1 left to the cache, as by default
    "across-h8": ("windows.horizon=8",),
}
PROFILE_STRATEGIES = ("predictor", "predictor_evict", "predictor_gated")
NOT_ROUTING = ("random",)


def command(name: str) -> list[str]:
    return exp_run_command(name, (*ACROSS, *VARIANTS[name]))


def best_baselines(metrics: dict) -> dict:
    """metric -> {name, accuracy} of the best baseline on top-1 and on recall@k."""
    baselines = {name: result for name, result in metrics["baselines"].items() if name not in NOT_ROUTING}
    best = {metric: max(baselines, key=lambda name: baselines[name][metric]) for metric in ("top1", "recall_at_k")}
    return {metric: {"name": name, **accuracy(baselines[name])} for metric, name in best.items()}


def per_layer(metrics: dict) -> list[dict]:
    """Per target layer: the predictor's top-1 and the best baseline's there (chosen per layer)."""
    rows = []
    for key, row in metrics["per_layer"].items():  # layer_<t> -> scorer -> top-1
        baselines = {name: value for name, value in row.items() if name not in ("predictor", *NOT_ROUTING)}
        best = max(baselines, key=baselines.get)
        rows.append({"layer": int(key.split("_")[1]), "predictor": row["predictor"], "best_baseline": best,
                     "best_baseline_top1": baselines[best]})
    return sorted(rows, key=lambda row: row["layer"])


def profiles(metrics: dict) -> dict:
    """profile -> the learned strategies' speedups over on-demand and the ideal's, at the configured cache."""
    return {profile: {name: row[f"{name}_speedup_vs_on_demand"] for name in (*PROFILE_STRATEGIES, "ideal")
                      if f"{name}_speedup_vs_on_demand" in row}
            for profile, row in metrics["cache_by_profile"].items()}


def run_summary(metrics: dict, run: list[str] | None, wall_seconds: float | None) -> dict:
    """One run's part of the summary (the default run has no command)."""
    data = metrics["data"]
    return {
        **({} if run is None else {"experiment": run[run.index("-n") + 1], "command": " ".join(run)}),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
        "context_length": data["context_length"], "horizon": data["horizon"],
        "across_tokens": bool(data.get("across_tokens")),
        "test_windows": metrics["test_windows"], "bootstrap": metrics["bootstrap"],
        "predictor": {"arch_parameters": metrics["predictor"].get("arch_parameters"), **accuracy(metrics["predictor"])},
        "best_baseline": best_baselines(metrics),
        "predictor_minus_best_baseline_top1": metrics["predictor_minus_best_baseline_top1"],
        "per_layer": per_layer(metrics),
        "cache_by_profile": profiles(metrics),
    }


def across_tokens_section(summary: dict) -> str:
    """README section: accuracy table (every run), per-layer top-1, and the replay's speedups per profile."""
    runs = {"default (across_tokens off)": summary["default"], **summary["variants"]}
    accuracy_rows = []
    for label, s in runs.items():
        top1, recall = s["best_baseline"]["top1"], s["best_baseline"]["recall_at_k"]
        accuracy_rows.append([
            f"`{label}`", f"{s['horizon']}", f"{min(r['layer'] for r in s['per_layer'])}..{max(r['layer'] for r in s['per_layer'])}",
            interval(s["predictor"], "top1"), f"{top1['name']} {interval(top1, 'top1')}",
            points(s["predictor_minus_best_baseline_top1"]), interval(s["predictor"], "recall_at_k"),
            f"{recall['name']} {interval(recall, 'recall_at_k')}", f"{s['test_windows']:,}",
            "-" if s["wall_seconds"] is None else f"{s['wall_seconds'] / 60:.1f}"])
    layers = sorted({row["layer"] for s in runs.values() for row in s["per_layer"]})
    layer_rows = []
    for label, s in runs.items():
        by_layer = {row["layer"]: row for row in s["per_layer"]}
        layer_rows.append([f"`{label}`", *(f"{100 * by_layer[l]['predictor']:.1f} / {100 * by_layer[l]['best_baseline_top1']:.1f}"
                                           if l in by_layer else "-" for l in layers)])
    profile_names = list(summary["default"]["cache_by_profile"])
    speed_rows = []
    for label, s in runs.items():
        for strategy in PROFILE_STRATEGIES:
            speed_rows.append([f"`{label}`", strategy, *(f"{s['cache_by_profile'][p].get(strategy, float('nan')):.3f}x"
                                                          for p in profile_names)])
    speed_rows.append(["every run", "ideal", *(f"{summary['default']['cache_by_profile'][p]['ideal']:.3f}x" for p in profile_names)])
    first = next(iter(summary["variants"].values()))
    return "\n\n".join([
        f"Experiments (`python scripts/run_across_tokens.py`, summary `metrics/across_tokens.json`), e.g. "
        f"`{first['command']}`, next to the default run. Each row's baselines are refit on that row's windows; "
        "intervals in brackets are 95% document-bootstrap intervals, the paired column is evaluate's "
        "`predictor_minus_best_baseline_top1`. Wall time: one `dvc exp run` on the shared 2-core machine.",
        table(["run", "h", "target layers", "predictor top-1", "best baseline top-1", "predictor - best top-1 (paired, points)",
               "predictor recall@k", "best baseline recall@k", "test windows", "wall (min)"], accuracy_rows),
        "Top-1 per target layer, predictor / the best baseline at that layer (%):",
        table(["run", *(f"layer {l}" for l in layers)], layer_rows),
        "Speedup over on-demand at the configured cache, per cost profile (`cache_by_profile`). The default run's "
        "learned strategies prefetch layers h..c-2+h by the `token` fallback table; across tokens the predictor "
        "scores every layer. The ideal depends on the cache only, the same in every run:",
        table(["run", "strategy", *profile_names], speed_rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="summarise the finished experiments only")
    parser.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--wall-seconds", action="append", default=[], metavar="NAME=SECONDS",
                        help="with --no-run: the wall time of experiment NAME measured outside this script")
    args = parser.parse_args()
    previous = json.loads(SUMMARY.read_text())["variants"] if SUMMARY.exists() else {}
    runs = {name: command(name) for name in args.only}
    walls = {name: previous.get(name, {}).get("wall_seconds") if previous.get(name, {}).get("command") == " ".join(run) else None
             for name, run in runs.items()}
    for given in args.wall_seconds:
        name, seconds = given.split("=")
        if name not in runs:
            parser.error(f"--wall-seconds {given}: {name} is not among --only")
        walls[name] = float(seconds)
    if not args.no_run:
        for name, run in runs.items():
            print(" ".join(run), file=sys.stderr)
            walls[name] = timed_run(run)
            print(f"{name}: {walls[name]:.0f} s", file=sys.stderr)
    variants = {**previous, **{name: run_summary(experiment_metrics(name), run, walls[name]) for name, run in runs.items()}}
    summary = {"default": run_summary(json.loads(DEFAULT.read_text()), None, None),
               "variants": {name: variants[name] for name in VARIANTS if name in variants}}
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {SUMMARY}; now run python scripts/update_readme.py", file=sys.stderr)


if __name__ == "__main__":
    main()
