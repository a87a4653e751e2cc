"""The README's cache/prefetch conclusions, generated from metrics/evaluate.json alone (scripts/update_readme.py)."""

from __future__ import annotations


def conclusion_lines(metrics: dict) -> list[str]:
    """Where prediction pays, from the metrics alone: per cost profile the best learned strategy's speedup next to
    Belady eviction alone and perfect prefetch with Belady; per regime the break-even prefetch precision next to
    each learned strategy's measured precision (none of it from metrics written before these keys existed)."""
    # The learned strategies are those the replay reports a fallback count for (replay.PrefetchStrategy.learned).
    learned = [name for name, result in metrics["cache"].items() if isinstance(result, dict) and "fallback_prefetches" in result]
    lines = []
    by_profile = metrics["cache_by_profile"]
    verdicts = []
    for profile, row in by_profile.items():
        speedups = {name: row[f"{name}_speedup_vs_on_demand"] for name in learned if f"{name}_speedup_vs_on_demand" in row}
        if not speedups:
            continue
        best = max(speedups, key=speedups.get)
        gain = speedups[best] - 1.0
        verdicts.append(f"{profile}: {'pays' if gain > 0.005 else 'does not pay'} (best learned {best} "
                        f"{speedups[best]:.3f}x; Belady eviction alone {row['belady_speedup_vs_on_demand']:.3f}x, perfect "
                        f"prefetch with Belady {row['oracle_belady_speedup_vs_on_demand']:.3f}x)")
    if verdicts:
        paying = sum(" pays " in verdict for verdict in verdicts)
        lines.append(f"Conclusion by profile (generated; 'pays' = more than 0.5% faster than on-demand LRU): prediction "
                     f"pays in {paying} of {len(verdicts)} profiles. " + "; ".join(verdicts) + ".")
    regimes = sorted(metrics["cache_by_regime"].values(), key=lambda row: row["transfer_over_compute"])
    if regimes and "breakeven_precision" in regimes[0]:
        def shown(value):
            return "never (not even q = 1 pays)" if value is None else f"{value:.2f}"

        parts = []
        for row in regimes:
            measured = ", ".join(f"{name} {row[f'{name}_precision']:.2f}" for name in learned
                                 if row.get(f"{name}_precision") is not None)
            parts.append(f"{row['transfer_over_compute']:g}: {shown(row['breakeven_precision'])} ({measured})")
        lines.append("Break-even prefetch precision by transfer / compute (`cache_by_regime.*.breakeven_precision`, "
                     "`plots/cache_breakeven_precision_by_regime.png`; a synthetic prefetcher right with probability q, "
                     "moe_prefetch/evaluation/breakeven.py; measured precision in brackets): " + "; ".join(parts) + ".")
        clears = []
        for name in (name for name in learned if any(row.get(f"{name}_precision") is not None for row in regimes)):
            ratios = [row["transfer_over_compute"] for row in regimes if row.get(f"{name}_precision") is not None
                      and row["breakeven_precision"] is not None and row[f"{name}_precision"] >= row["breakeven_precision"]]
            clears.append(f"{name} at transfer / compute {', '.join(f'{r:g}' for r in ratios)}" if ratios
                          else f"{name} in no swept regime")
        if clears:
            lines.append("Measured precision at or above break-even: " + "; ".join(clears) + ".")
    return lines
