"""Issue #12 on the default data: the hidden-state predictor (`train.arch: hidden_mlp`) against the stale gate (layer
l+h's router applied to layer l's hidden state) at horizons h = 1..4, as DVC experiments `hidden-h1..hidden-h4`, and
their summary `metrics/hidden_state.json`, which `scripts/update_readme.py` renders (README section `hidden-state`).

    python scripts/run_hidden_state.py                  # dvc exp run --temp -n hidden-hH ... for H = 1..4, one after another
    python scripts/run_hidden_state.py --no-run         # only the summary, from the finished experiments of those names
    python scripts/run_hidden_state.py --horizons 1 2   # a subset of the horizons
    python scripts/run_hidden_state.py --prefix hidden-sg-h --set train.hidden_mlp.stale_gate_input=true
                                                        # another variant: its own names, a further -S override

Each experiment is the default params.yaml with the hidden states (full width: the tiny model's 128) and the stale
gate's look-ahead 1..4 captured, hidden_mlp trained, and the target `windows.horizon` = H. Evaluate skips what this
comparison does not read (QUICK_EVALUATE: the per-profile cache sweeps, the per-horizon baselines, and the regime
sweep down to one ratio, the schema wanting a non-empty list); the accuracy metrics and their intervals are the
default's. After the first experiment, collect and shard come from DVC's run cache. The wall time of each `dvc exp
run` is measured here and kept in the summary (a rough figure on whatever machine ran it); --no-run keeps the wall
times an earlier summary recorded for the same command (or those given with --wall-seconds H=SECONDS). The summary
holds one entry per experiment prefix (`variants`); a run replaces the horizons it ran of its own prefix only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import exp_run_command, experiment_metrics, timed_run
from update_readme import table

PREFIX = "hidden-h"
HORIZONS = (1, 2, 3, 4)
CAPTURE = ("collect.capture.hidden_states=true", "collect.capture.lookahead=4", "train.arch=hidden_mlp")
QUICK_EVALUATE = ("evaluate.cache.profile_sweep_tokens=0", "evaluate.cache.regime_sweep=[1]", "evaluate.max_horizon=0")
SUMMARY = Path("metrics/hidden_state.json")


def overrides(horizon: int, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return (*CAPTURE, f"windows.horizon={horizon}", *QUICK_EVALUATE, *extra)


def command(horizon: int, extra: tuple[str, ...] = (), prefix: str = PREFIX) -> list[str]:
    """The `dvc exp run --temp` of the experiment at `horizon`."""
    return exp_run_command(f"{prefix}{horizon}", overrides(horizon, extra))


ACCURACY_KEYS = ("top1", "top1_ci95", "recall_at_k", "recall_at_k_ci95")
NOT_ROUTING = ("stale_gate", "random")  # the baselines that do not predict from the routing history


def accuracy(result: dict) -> dict:
    return {key: result[key] for key in ACCURACY_KEYS if key in result}


def horizon_summary(metrics: dict, horizon: int, run: list[str], wall_seconds: float | None) -> dict:
    """One horizon's part of the summary: hidden_mlp (the predictor), the stale gate and the best routing-history
    baseline on each metric, with their 95% document-bootstrap intervals, and the paired top-1 interval of the
    predictor minus the best baseline that evaluate computes. That paired interval is hidden_mlp minus the stale gate
    only when the stale gate is the best baseline on top-1; otherwise `hidden_mlp_minus_stale_gate_top1` is null."""
    if metrics["data"]["horizon"] != horizon:
        raise ValueError(f"horizon {horizon}: the metrics are of windows.horizon={metrics['data']['horizon']}")
    baselines = metrics["baselines"]
    if "stale_gate" not in baselines:
        raise ValueError(f"horizon {horizon}: no stale_gate baseline in the metrics (the windows carry no "
                         f"stale_gate_experts: collect.capture.lookahead < {horizon}?)")
    routing = [name for name in baselines if name not in NOT_ROUTING]
    if not routing:
        raise ValueError(f"horizon {horizon}: no routing baseline in the metrics")
    best = {metric: max(routing, key=lambda name: baselines[name][metric]) for metric in ("top1", "recall_at_k")}
    paired = metrics["predictor_minus_best_baseline_top1"]
    return {
        "experiment": run[run.index("-n") + 1],
        "command": " ".join(run),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
        "test_windows": metrics["test_windows"],
        "bootstrap": metrics["bootstrap"],
        "hidden_mlp": {"arch_parameters": metrics["predictor"].get("arch_parameters"), **accuracy(metrics["predictor"])},
        "stale_gate": accuracy(baselines["stale_gate"]),
        **{f"best_routing_baseline_{metric}": {"name": name, **accuracy(baselines[name])} for metric, name in best.items()},
        "predictor_minus_best_baseline_top1": paired,
        "hidden_mlp_minus_stale_gate_top1": paired if paired["best_baseline"] == "stale_gate" else None,
    }


def summary_of(runs: dict[int, tuple[dict, list[str], float | None]], prefix: str = PREFIX) -> dict:
    """The summary of the experiments `runs`: horizon -> (evaluate metrics, the `dvc exp run` command, wall seconds)."""
    if not runs:
        raise ValueError("no experiments to summarise")
    return {"prefix": prefix, "horizons": {str(h): horizon_summary(metrics, h, run, wall)
                                           for h, (metrics, run, wall) in sorted(runs.items())}}


def interval(result: dict, metric: str) -> str:
    ci = result.get(f"{metric}_ci95")
    return f"{100 * result[metric]:.1f}%" + ("" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")


def points(difference: dict | None) -> str:
    if difference is None:
        return "-"
    lo, hi = difference["ci95"]
    return f"{100 * difference['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def hidden_state_section(summary: dict) -> str:
    """README section: one table per variant of the summary file (`variants`: prefix -> summary_of)."""
    if not summary.get("variants"):
        raise ValueError(f"{SUMMARY}: no variants")
    return "\n\n".join(variant_section(variant) for variant in summary["variants"].values())


def variant_section(summary: dict) -> str:
    """One variant's table: hidden_mlp, the stale gate and the best routing baseline at each horizon, top-1 and
    recall@k with their intervals, the paired interval where evaluate gives one, and the wall time of each experiment."""
    rows, unpaired = [], []
    for h, s in sorted(summary["horizons"].items(), key=lambda item: int(item[0])):
        top1, recall = s["best_routing_baseline_top1"], s["best_routing_baseline_recall_at_k"]
        rows.append([h, interval(s["hidden_mlp"], "top1"), interval(s["stale_gate"], "top1"), f"{top1['name']} {interval(top1, 'top1')}",
                     interval(s["hidden_mlp"], "recall_at_k"), interval(s["stale_gate"], "recall_at_k"),
                     f"{recall['name']} {interval(recall, 'recall_at_k')}", points(s["hidden_mlp_minus_stale_gate_top1"]),
                     f"{s['predictor_minus_best_baseline_top1']['best_baseline']} {points(s['predictor_minus_best_baseline_top1'])}",
                     f"{s['test_windows']:,} / {s['bootstrap']['documents']}",
                     "-" if s["wall_seconds"] is None else f"{s['wall_seconds'] / 60:.1f}"])
        if s["hidden_mlp_minus_stale_gate_top1"] is None:
            unpaired.append(h)
    first = summary["horizons"][min(summary["horizons"], key=int)]
    note = (f"At h = {', '.join(unpaired)} the stale gate is not the best baseline on top-1, and evaluate computes the "
            "paired interval only against the best one, so there the two intervals are all there is: they come from "
            "the same document resamples but their overlap is not a paired test." if unpaired else "")
    return "\n\n".join(filter(None, [
        f"Experiments `{summary['prefix']}<h>` (`python scripts/run_hidden_state.py`, summary `metrics/hidden_state.json`): "
        f"`{first['command'].replace(first['experiment'], summary['prefix'] + '<h>').replace('windows.horizon=' + min(summary['horizons'], key=int), 'windows.horizon=<h>')}`. "
        "Predictor hidden_mlp on the hidden state entering layer l (the model's full width), the stale gate (layer "
        "l+h's router on that same hidden state) and the best baseline reading the routing history only, on the same "
        "test windows; intervals in brackets are 95% document-bootstrap intervals. The paired columns are evaluate's "
        "`predictor_minus_best_baseline_top1` (paired over the resampled documents), which is hidden_mlp - stale gate "
        "where the stale gate is that best baseline. Wall time: one `dvc exp run` on the shared 2-core machine.",
        table(["h", "hidden_mlp top-1", "stale gate top-1", "best routing baseline top-1", "hidden_mlp recall@k",
               "stale gate recall@k", "best routing baseline recall@k", "hidden_mlp - stale gate top-1 (paired, points)",
               "hidden_mlp - best baseline top-1 (paired, points)", "test windows / documents", "wall (min)"], rows),
        note,
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="summarise the finished experiments only")
    parser.add_argument("--horizons", type=int, nargs="+", default=list(HORIZONS), metavar="H")
    parser.add_argument("--prefix", default=PREFIX, help=f"experiment names are PREFIX<h> (default {PREFIX})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a further -S override")
    parser.add_argument("--wall-seconds", action="append", default=[], metavar="H=SECONDS",
                        help="with --no-run: the wall time of experiment H measured outside this script")
    parser.add_argument("--summary", type=Path, default=SUMMARY, help=f"where to write the summary (default {SUMMARY})")
    args = parser.parse_args()
    runs = {h: command(h, tuple(args.set), args.prefix) for h in args.horizons}
    previous = json.loads(args.summary.read_text())["variants"] if args.summary.exists() else {}
    earlier = previous.get(args.prefix, {}).get("horizons", {})
    walls = {h: earlier.get(str(h), {}).get("wall_seconds") if earlier.get(str(h), {}).get("command") == " ".join(run) else None
             for h, run in runs.items()}
    for given in args.wall_seconds:
        h, seconds = given.split("=")
        if int(h) not in runs:
            parser.error(f"--wall-seconds {given}: horizon {h} is not among --horizons")
        walls[int(h)] = float(seconds)
    if not args.no_run:
        for h, run in runs.items():
            print(f"{' '.join(run)}", file=sys.stderr)
            walls[h] = timed_run(run)
            print(f"h = {h}: {walls[h]:.0f} s", file=sys.stderr)
    variant = summary_of({h: (experiment_metrics(run[run.index("-n") + 1]), run, walls[h]) for h, run in runs.items()}, args.prefix)
    variant["horizons"] = dict(sorted({**earlier, **variant["horizons"]}.items(), key=lambda item: int(item[0])))
    summary = {"variants": {**previous, args.prefix: variant}}
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.summary}; now run python scripts/update_readme.py", file=sys.stderr)


if __name__ == "__main__":
    main()
