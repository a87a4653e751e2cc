"""Plot data (JSON, for `dvc plots`) and PNGs (matplotlib) of the evaluation, written into the plots directory."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TABLEAU_COLORS  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from moe_prefetch.evaluation.metrics import CalibrationAccumulator, RankingAccumulator  # noqa: E402

STYLE = {"predictor": "-o", "lookup": "--s", "frequency": ":^", "random": ":x", "previous_token": "-.d", "stale_gate": "--v",
         "on_demand": ":x", "oracle": "-*", "perfect": "--", "belady": "-.+", "oracle_belady": "-P", "ideal": "--",
         "lookup_interpolated": "-s", "top1_table": ":s", "cooccurrence": "-.o", "token": "-^", "token_context": "-.^",
         "predictor_gated": "--o", "lookup_gated": "--s", "predictor_expert_gated": "--D", "predictor_evict": "-.o",
         "predicted_eviction": ":P", "oracle_belady_lead1": "-1", "oracle_belady_lead2": "-2", "oracle_belady_lead4": "-3",
         "oracle_belady_next_token": "-X"}
# A series keeps its colour in every figure; a name without one takes the tab10 colours left over.
COLORS = {"predictor": "tab:blue", "lookup": "tab:red", "frequency": "tab:green", "random": "tab:gray",
          "previous_token": "tab:purple", "stale_gate": "tab:brown", "on_demand": "tab:olive", "oracle": "tab:orange",
          "perfect": "black", "belady": "tab:pink", "oracle_belady": "tab:cyan", "ideal": "black",
          "lookup_interpolated": "darkred", "top1_table": "salmon", "cooccurrence": "teal", "token": "goldenrod",
          "token_context": "darkgoldenrod",
          "predictor_gated": "navy", "lookup_gated": "darkred", "predictor_expert_gated": "darkviolet",
          "predictor_evict": "deepskyblue", "predicted_eviction": "magenta", "oracle_belady_lead1": "turquoise",
          "oracle_belady_lead2": "darkcyan", "oracle_belady_lead4": "cadetblue", "oracle_belady_next_token": "slategray"}
SPARE_COLORS = [color for color in TABLEAU_COLORS if color not in COLORS.values()] or ["tab:blue", "tab:orange", "tab:green"]
MAX_VALUE_TICKS = 12  # integer x: a tick at each value up to this many values, else integer ticks only
LEGEND_INSIDE_MAX = 8  # series; a figure with more gets its legend to the right of the axes


def _dump(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")


def _figure(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], integer_x: bool = False,
            log_x: bool = False) -> None:
    """One line per series, each in its own colour with a legend entry; `integer_x` for counts (layers, m, sizes),
    `log_x` for ratios spanning orders of magnitude."""
    outside = len(series) > LEGEND_INSIDE_MAX  # a long legend inside the axes covers the curves
    fig, ax = plt.subplots(figsize=(8.5 if outside else 6, 4), dpi=100)
    if log_x:
        ax.set_xscale("log")
    if integer_x:
        values = sorted({x for xs, _ in series.values() for x in xs})
        if len(values) <= MAX_VALUE_TICKS:
            ax.set_xticks(values, labels=[f"{x:,}" for x in values] if log_x else None)  # not 2.5x10^4
            ax.set_xticks([], minor=True)  # a log axis labels its minor ticks too: they would crowd the values
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    spare = itertools.cycle(SPARE_COLORS)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, STYLE.get(name, "-o"), color=COLORS.get(name) or next(spare), label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    (fig.suptitle if outside else ax.set_title)(title)  # over the whole figure: a long title outgrows narrow axes
    ax.grid(alpha=0.3)
    if outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.tight_layout(rect=(0.0, 0.0, 0.79, 1.0))
    else:
        ax.legend(fontsize=8)
        fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: identical bytes on every run
    plt.close(fig)


def write_plots(directory: Path, metrics: dict, calibration: CalibrationAccumulator, m_values: list[int],
                accumulators: dict[str, RankingAccumulator]) -> None:
    names = list(accumulators)
    layers = sorted(int(key.split("_")[1]) for key in metrics["per_layer"])
    per_layer = [{"layer": layer, **metrics["per_layer"][f"layer_{layer}"]} for layer in layers]
    _dump(directory / "per_layer_top1.json", per_layer)
    _figure(directory / "per_layer_top1.png", "Top-1 of the highest-weight expert per target layer", "target MoE layer",
            "top-1 accuracy", {n: (layers, [row[n] for row in per_layer]) for n in names}, integer_x=True)

    results = {name: acc.result() for name, acc in accumulators.items()}
    top_m = [{"m": m, **{n: results[n][f"top{m}"] for n in names}} for m in m_values]
    _dump(directory / "top_m.json", top_m)
    _figure(directory / "top_m.png", "Top-m accuracy", "m (experts predicted)", "top-m accuracy",
            {n: (list(m_values), [row[n] for row in top_m]) for n in names}, integer_x=True)

    if "per_horizon" in metrics:
        write_horizon_plot(directory, metrics["per_horizon"])
    write_entropy_plot(directory, metrics["bounds"])

    reliability = calibration.reliability()
    coverage = calibration.coverage_curve()
    _dump(directory / "calibration.json", reliability)
    _dump(directory / "coverage.json", [row for row in coverage if not math.isnan(row["accuracy"])])
    if reliability:
        _figure(directory / "calibration.png", f"Confidence head (ECE {metrics['calibration']['ece']:.3f})",
                "confidence", "accuracy", {
                    "predictor": ([r["mean_confidence"] for r in reliability], [r["accuracy"] for r in reliability]),
                    "perfect": ([0, 1], [0, 1]),
                })


def write_horizon_plot(directory: Path, per_horizon: dict) -> None:
    """Top-1 vs horizon: every baseline at each horizon, the predictor at the one it was trained for."""
    horizons = sorted(int(key[1:]) for key in per_horizon)
    rows = [{"horizon": h, **{name: result["top1"] for name, result in per_horizon[f"h{h}"].items() if name != "test_windows"}}
            for h in horizons]
    _dump(directory / "per_horizon.json", rows)
    names = list(dict.fromkeys(name for row in rows for name in row if name != "horizon"))
    _figure(directory / "per_horizon.png", "Top-1 vs horizon (target = MoE layer l + h)", "horizon h (layers ahead)",
            "top-1 accuracy", {n: ([r["horizon"] for r in rows if n in r], [r[n] for r in rows if n in r]) for n in names},
            integer_x=True)


def write_entropy_plot(directory: Path, bounds: dict) -> None:
    """Plug-in and Miller-Madow H(top-1 | lookup context) vs the number of train windows they were estimated on
    (nested random subsets, log x): a curve still rising at the right end has not converged."""
    sizes = sorted(int(n) for n in bounds["plugin_entropy_by_train_size"])
    rows = [{"train_windows": n, "h_plugin_bits": bounds["plugin_entropy_by_train_size"][str(n)],
             "h_miller_madow_bits": bounds["miller_madow_entropy_by_train_size"][str(n)]} for n in sizes]
    _dump(directory / "plugin_entropy_by_train_size.json", rows)
    _figure(directory / "plugin_entropy_by_train_size.png", "H(top-1 | lookup context) vs train sample size",
            "train windows (nested random subsets, log)", "conditional entropy (bits)",
            {label: (sizes, [row[key] for row in rows]) for key, label in (("h_plugin_bits", "plug-in"),
                                                                          ("h_miller_madow_bits", "Miller-Madow"))},
            integer_x=True, log_x=True)


SPEEDUP = "_speedup_vs_on_demand"
SPEEDUP_LABEL = "speedup over on-demand LRU (x, time per token)"
AXES = {"capacity": "cache capacity (experts per pool)", "batch_size": "decode batch size (sequences)"}
MEASURES = {"hit_rate": ("Expert-cache on-time hit rate", "on-time hit rate (share of expert uses)"),
            "speedup_vs_on_demand": ("Speedup over on-demand LRU", SPEEDUP_LABEL)}


def _series(rows: list[dict], axis: str, measure: str) -> dict[str, tuple[list, list]]:
    """strategy -> (x, y) of `measure` over the rows' `axis`, every strategy the rows carry, in their order."""
    names = [key[: -len(measure) - 1] for key in rows[0] if key.endswith(f"_{measure}")]
    return {name: ([row[axis] for row in rows], [row[f"{name}_{measure}"] for row in rows]) for name in names}


def _panels(path: Path, title: str, xlabel: str, ylabel: str, panels: dict[str, dict[str, tuple[list, list]]]) -> None:
    """One panel per key of `panels` (a cost profile), one line per strategy in the same colours and styles in
    every panel, one legend for the figure; integer x at its values."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows + 0.9), dpi=100, squeeze=False)
    spare = itertools.cycle(SPARE_COLORS)
    colors: dict[str, str] = {}
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for strategy, (xs, ys) in series.items():
            color = colors.setdefault(strategy, COLORS.get(strategy) or next(spare))
            ax.plot(xs, ys, STYLE.get(strategy, "-o"), color=color, label=strategy, markersize=4)
        values = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(values)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.45 / (3.3 * rows + 0.9), 1, 1))
    fig.savefig(path, metadata={"Software": None})  # no version stamp: identical bytes on every run
    plt.close(fig)


def write_cache_plots(directory: Path, report: dict) -> None:
    """From moe_prefetch.evaluation.sweeps.cache_report: hit rate and speedup of each prefetch strategy vs cache
    capacity and vs decode batch size (configured profile), the same speedups with one panel per cost profile, and
    speedup vs the transfer/compute ratio (log x)."""
    by_regime, config = report["by_regime"], report["cache"]["config"]
    where = f"{config['profile']}, {config['replayed_tokens']:,} tokens"
    _dump(directory / "cache_by_capacity.json", report["by_capacity"])
    _dump(directory / "cache_by_batch.json", report["by_batch"])
    _dump(directory / "cache_by_regime.json", by_regime)
    ratios = [row["transfer_over_compute"] for row in by_regime]
    regime_tokens = config["profile_sweep_tokens"] or config["replayed_tokens"]  # the regime sweep's replay
    _figure(directory / "cache_speedup_by_regime.png",
            f"Speedup over on-demand LRU by regime\n({config['profile']}, {regime_tokens:,} tokens; expert bytes scaled)",
            "transfer time per expert / layer compute time (log)", SPEEDUP_LABEL,
            {key[: -len(SPEEDUP)]: (ratios, [row[key] for row in by_regime]) for key in by_regime[0] if key.endswith(SPEEDUP)},
            log_x=True)
    precisions = {key[: -len("_precision")]: (ratios, [row[key] for row in by_regime]) for key in by_regime[0]
                  if key.endswith("_precision") and key != "breakeven_precision"}
    _figure(directory / "cache_breakeven_precision_by_regime.png",
            f"Break-even prefetch precision by regime (prefetch pays above it)\n({config['profile']} compute and link, "
            f"{regime_tokens:,} test tokens)",
            "transfer time per expert / layer compute time (log)", "prefetch precision (share of listed experts used)",
            {"break-even": (ratios, [row["breakeven_precision"] for row in by_regime]),
             **{f"{name} (measured)": series for name, series in precisions.items()}}, log_x=True)
    for rows, axis in ((report["by_capacity"], "capacity"), (report["by_batch"], "batch_size")):
        for measure, (title, ylabel) in MEASURES.items():
            _figure(directory / f"cache_{measure}_by_{axis}.png", f"{title} vs {AXES[axis].split(' (')[0]}\n({where})", AXES[axis],
                    ylabel, _series(rows, axis, measure), integer_x=True)
    for key, axis in (("by_profile_capacity", "capacity"), ("by_profile_batch", "batch_size")):
        sweeps = report[key]
        if not sweeps:
            continue
        _dump(directory / f"cache_{key[len('by_'):]}.json", [{"profile": name, **row} for name, rows in sweeps.items() for row in rows])
        tokens = config["profile_sweep_tokens"]
        _panels(directory / f"cache_speedup_by_{axis}_profiles.png",
                f"Speedup over on-demand LRU vs {AXES[axis].split(' (')[0]}, per cost profile ({tokens:,} test tokens)",
                AXES[axis], "speedup (x)", {name: _series(rows, axis, "speedup_vs_on_demand") for name, rows in sweeps.items()})
