"""Regenerate the measured sections of README.md from the committed outputs, so no figure there is typed by hand.

Each section sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers:
  tiny-model   models/tiny-moe/report.json (written by scripts/train_tiny_moe.py); tiny-model-64x6 likewise
  results      metrics/evaluate.json (written by dvc repro)
  families     moe_prefetch/routing (FAMILIES and unsupported.UNSUPPORTED)
  geometry     metrics/geometry.json (written by scripts/run_geometry.py) next to metrics/evaluate.json
  hidden-state metrics/hidden_state.json (written by scripts/run_hidden_state.py)
  across-tokens metrics/across_tokens.json (written by scripts/run_across_tokens.py)
  archs, domain-split           experiments, with --archs / --domain-split (dvc exp show --json)
  gpu-estimates   moe_prefetch/gpu_estimates.py at params.yaml's collect section

    python scripts/update_readme.py            # rewrite README.md
    python scripts/update_readme.py --check    # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from pathlib import Path

import yaml
from readme_conclusions import conclusion_lines  # scripts/ is on sys.path when this script runs

README = Path("README.md")
BASELINES = ("lookup", "lookup_interpolated", "top1_table", "cooccurrence", "token", "token_context", "frequency",
             "previous_token", "stale_gate", "random")
PREFETCH_STRATEGIES = ("on_demand", "belady", "predictor", "predictor_gated", "predictor_expert_gated", "predictor_evict",
                       "predicted_eviction",
                       "lookup", "lookup_gated", "stale_gate", "oracle", "oracle_belady", "oracle_belady_lead1",
                       "oracle_belady_lead2", "oracle_belady_lead4", "oracle_belady_next_token")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def pct_interval(result: dict, metric: str) -> str:
    """`metric` of a scorer's result as a percentage, followed by its 95% interval `[lo, hi]` (in percent) when the
    result carries `<metric>_ci95` (evaluate writes one for top1 and recall_at_k; metrics written before the
    intervals existed carry none)."""
    interval = result.get(f"{metric}_ci95")
    if interval is None or None in interval:
        return pct(result.get(metric))
    return f"{pct(result.get(metric))} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def difference_lines(metrics: dict) -> list[str]:
    """The paired interval of predictor minus the best baseline on top-1, when the metrics carry it."""
    difference = metrics.get("predictor_minus_best_baseline_top1")
    if difference is None:
        return []
    lo, hi = difference["ci95"]
    return [f"Predictor minus the best baseline ({difference['best_baseline']}) on top-1: "
            f"{100 * difference['difference']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]. Intervals in brackets are "
            f"95% percentile-bootstrap intervals over the {metrics['bootstrap']['documents']} test documents (whole "
            f"documents resampled with replacement, {metrics['bootstrap']['resamples']:,} resamples, paired across scorers)."]


def bounds_line(b: dict) -> str:
    """The bounds on the Bayes top-1 for the lookup's context: the valid lower bounds, the Fano upper bound with what
    holds of it, and the plug-in H by train size. Metrics written before the lower bounds existed carry their old
    2^-H_plugin instead, which this renders as it was until they are re-run."""
    counts = (f"empirical Bayes (lookup fit on test itself, optimistic): {pct(b['empirical_bayes_top1'])}; "
              f"{b['contexts']:,.0f} contexts, {b['samples_per_context_mean']:.1f} samples each on average, "
              f"{pct(b['singleton_context_share'])} of samples in a context seen once. Predictor top-1: {pct(b['predictor_top1'])}.")
    if "bayes_top1_lower_bound_best_scorer" not in b:
        return ("Bounds for the lookup's context (target layer + the context layers' experts) on the test split: "
                f"plug-in H(top-1 | context) = {b['h_plugin_bits']:.3f} bits (Miller-Madow {b['h_miller_madow_bits']:.3f}); "
                f"Fano upper bound on any top-1: {pct(b['fano_top1_upper_bound'])}; 2^-H lower bound on the Bayes top-1: "
                f"{pct(b['bayes_top1_lower_bound'])}; " + counts)
    best, entropy = b["bayes_top1_lower_bound_best_scorer"], b["bayes_top1_lower_bound_cross_entropy"]
    cross_entropy = "infinite" if entropy["cross_entropy_bits"] is None else f"{entropy['cross_entropy_bits']:.2f} bits"
    by_size = ", ".join(f"{int(n):,}: {h:.3f}" for n, h in b["plugin_entropy_by_train_size"].items())
    return ("Bounds on the Bayes-optimal top-1 for the lookup's context (target layer + the context layers' experts), "
            f"test split. Lower bounds, valid up to sampling error: the best test top-1 of a scorer reading only this "
            f"context, {best['scorer']} {pct_interval({'top1': best['value'], 'top1_ci95': best['top1_ci95']}, 'top1')}; "
            f"2^-CE of the lowest held-out cross-entropy of the top-1 expert, {entropy['model']} {cross_entropy}: "
            f"{pct(entropy['value'])}. Fano upper bound on any top-1 from the Miller-Madow H(top-1 | context) = "
            f"{b['h_miller_madow_bits']:.3f} bits: {pct(b['fano_top1_upper_bound'])} (plug-in H {b['h_plugin_bits']:.3f} "
            f"bits: {pct(b['fano_top1_upper_bound_plugin'])}), not guaranteed and erring high: the plug-in H is biased "
            f"low while contexts have few samples (on nested train subsets, windows: bits, {by_size}); " + counts)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tiny_model_section(report: dict) -> str:
    """An embedded checkpoint's report.json (scripts/train_tiny_moe.py): val loss and per-layer routing balance."""
    domains = [d for d in report if isinstance(report[d], dict) and "routing" in report[d]]
    experts = len(report[domains[0]]["routing"]["per_layer_load_share"][0])
    loss_rows = [[d, f"{report[d]['val_loss_model']:.3f}", f"{report[d]['val_loss_unigram']:.3f}", str(report[d]["val_tokens"])] for d in domains]
    layers = range(len(report[domains[0]]["routing"]["per_layer_max_share_over_fair"]))
    balance_rows = []
    for layer in layers:
        row = [str(layer)]
        for d in domains:
            r = report[d]["routing"]
            row += [f"{r['per_layer_max_share_over_fair'][layer]:.2f}x", f"{r['per_layer_load_entropy_bits'][layer]:.2f}",
                    pct(r["per_layer_frequency_top1"][layer])]
        balance_rows.append(row)
    summary = "; ".join(
        f"{d}: mean {report[d]['routing']['max_share_over_fair_mean']:.2f}x, worst {report[d]['routing']['max_share_over_fair_worst']:.2f}x "
        f"({report[d]['routing']['chunks']} chunks)" for d in domains
    )
    shares = [report[d]["routing"]["per_layer_load_share"] for d in domains[:2]]
    for layer, row in zip(layers, balance_rows):  # how differently the two domains load this layer's experts
        row.append(f"{0.5 * sum(abs(a - b) for a, b in zip(shares[0][layer], shares[1][layer])):.2f}")
    header = ["MoE layer"] + [f"{d} {c}" for d in domains for c in ("max/fair", "load entropy (bits)", "favourite = top-1")]
    header.append("load distance between domains")
    return "\n\n".join([
        f"{report['parameters']:,} parameters; {report['train_seconds']:.0f} s of wall-clock training on the shared 2-core development machine.",
        table(["domain", "val loss (nats/token)", "unigram val loss", "val tokens"], loss_rows),
        f"Most-used expert's share of routed slots over its fair share (1/{experts}), per domain — {summary}. "
        f"Load entropy is of the per-layer expert load (max {math.log2(experts):g} bits); \"favourite = top-1\" is how often the layer's "
        "most frequent expert is a token's highest-weight expert (the per-layer frequency baseline); \"load distance\" is "
        "the total variation distance between the two domains' expert-load distributions (0 = same experts equally "
        "used, 1 = disjoint experts): how much routing differs between prose and code.",
        table(header, balance_rows),
    ])


def results_section(metrics: dict) -> str:
    cols = ["top1", "top3", "top5", "top10", "recall_at_k", "recall_at_2k", "exact_set", "any_overlap"]
    names = [("predictor", metrics["predictor"])] + [(b, metrics["baselines"][b]) for b in BASELINES if b in metrics["baselines"]]
    rows = [[name] + [pct_interval(m, c) for c in cols] for name, m in names]  # intervals: top1, recall_at_k
    data = metrics["data"]
    cache = metrics["cache"]
    strategies = [s for s in (*PREFETCH_STRATEGIES, "ideal") if s in cache]
    cache_rows = [[s, pct(cache[s].get("hit_rate")), pct(cache[s].get("late_hit_rate")), f"{cache[s]['time_per_token_ms']:.2f}",
                   *([f"{cache[s]['stall_per_token_ms']:.2f}", f"{cache[s]['bytes_moved'] / 1e9:,.0f}",
                      f"{cache[s]['wasted_prefetch_bytes'] / 1e9:,.0f}", f"{cache[s]['cancelled_prefetches']:,.0f}"]
                     if s != "ideal" else ["—"] * 4),
                   f"{cache[s]['speedup_vs_on_demand']:.3f}x" + (" [{:.3f}, {:.3f}]".format(*cache[s]["speedup_ci95"])
                                                                   if "speedup_ci95" in cache[s] else ""),
                   f"{cache[s]['share_of_ideal']:.2f}"] for s in strategies]
    c = cache["config"]
    return "\n\n".join([
        f"Test split: {metrics['test_windows']:,} windows from {data['test_documents']} held-out documents "
        f"(train {data['train_windows']:,} windows / {data['train_documents']} documents); context "
        f"{data['context_length']} layers, horizon {data['horizon']}; {data['num_experts']} experts, top-{data['top_k']}.",
        table(["scorer"] + cols, rows),
        *difference_lines(metrics),
        bounds_line(metrics["bounds"]),
        f"Confidence head: ECE {metrics['calibration']['ece']:.3f}, Brier {metrics['calibration']['brier']:.3f}.",
        *horizon_lines(metrics.get("per_horizon")),
        f"Expert cache (capacity {c['capacity']} per layer, prefetch top-{c['prefetch_m']}, batch {c['batch_size']}, "
        f"{c['replayed_tokens']:,} test tokens x {c['replayed_layers']} layers, {c['transfer_ms_per_expert']:.1f} ms per expert transfer):",
        table(["strategy", "on-time hits", "late hits", "ms / token", "stall ms / token", "GB moved", "GB wasted",
               "cancelled", "speedup", "share of ideal"], cache_rows),
        *profile_lines(metrics),
    ])


def profile_lines(metrics: dict) -> list[str]:
    """Speedups of every cost profile at the configured cache, and the regime conclusion, from the metrics."""
    by_profile, by_regime = metrics["cache_by_profile"], metrics["cache_by_regime"]
    names = [s for s in (*PREFETCH_STRATEGIES, "ideal") if f"{s}_speedup_vs_on_demand" in next(iter(by_profile.values()))]
    rows = [[profile, f"{row['transfer_over_compute']:.1f}"] + [f"{row[f'{s}_speedup_vs_on_demand']:.3f}x" for s in names]
            for profile, row in by_profile.items()]
    regimes = sorted(by_regime.values(), key=lambda row: row["transfer_over_compute"])
    paying = [row["transfer_over_compute"] for row in regimes if row["predictor_speedup_vs_on_demand"] > 1.0]
    losing = [row for row in regimes if row["predictor_speedup_vs_on_demand"] < 1.0]
    worst = min(regimes, key=lambda row: row["predictor_speedup_vs_on_demand"])
    best = max(regimes, key=lambda row: row["predictor_speedup_vs_on_demand"])
    verdict = (f"Predictor prefetch pays where transfer / compute is in [{min(paying):g}, {max(paying):g}] "
               f"(best {best['predictor_speedup_vs_on_demand']:.3f}x at {best['transfer_over_compute']:g}, where the ideal "
               f"is {best['ideal_speedup_vs_on_demand']:.3f}x)" if paying else "Predictor prefetch pays in no swept regime")
    verdict += (f"; it loses from {losing[0]['transfer_over_compute']:g} on (worst {worst['predictor_speedup_vs_on_demand']:.3f}x at "
                f"{worst['transfer_over_compute']:g}), where Belady eviction alone gives "
                f"{worst['belady_speedup_vs_on_demand']:.3f}x." if losing else ".")
    return [
        "Every cost profile at this cache (`cache_by_profile`: speedup over on-demand LRU; transfer / compute is one "
        "expert's transfer time over one layer's compute):",
        table(["profile", "transfer / compute"] + names, rows),
        f"Regimes (`cache_by_regime`, `plots/cache_speedup_by_regime.png`): {verdict}",
        *conclusion_lines(metrics),
    ]


def horizon_lines(per_horizon: dict | None) -> list[str]:
    """The per-horizon table (top-1 / recall@k per scorer and horizon), if evaluate.max_horizon was on."""
    if not per_horizon:
        return []
    horizons = sorted(per_horizon, key=lambda key: int(key[1:]))
    names = [n for n in ("predictor", *BASELINES) if any(n in per_horizon[h] for h in horizons)]
    rows = [[name] + [f"{pct(per_horizon[h][name]['top1'])} / {pct(per_horizon[h][name]['recall_at_k'])}" if name in per_horizon[h]
                      else "—" for h in horizons] for name in names]
    rows.append(["test windows"] + [f"{per_horizon[h]['test_windows']:,}" for h in horizons])
    return [
        "Per horizon (`per_horizon`, top-1 / recall@k; the baselines refit at every horizon on windows rebuilt from the "
        "shards with the same document split, the predictor only at the horizon it was trained for; a larger horizon "
        "leaves fewer target layers, so the columns differ in their layer mix too):",
        table(["scorer"] + [f"h = {h[1:]}" for h in horizons], rows),
    ]


def finished_by_horizon(prefix: str) -> dict[int, dict]:
    """h -> evaluate metrics of the finished experiments named `<prefix><h>`."""
    runs = {}
    for name, data in experiments_by_name().items():
        if name.startswith(prefix) and "data" in data.get("metrics", {}).get("metrics/evaluate.json", {}):
            runs[int(name[len(prefix):])] = data
    if not runs:
        raise SystemExit(f"no finished experiment named {prefix}<h> in `dvc exp show`")
    return runs


@functools.cache
def experiment_revs() -> dict[str, dict]:
    """name -> the first rev entry (`rev`, `data`: params, metrics) of every experiment `dvc exp show --json`
    lists, the newest where experiments on different commits share a name (a re-run); `dvc exp show` runs once per
    script run."""
    import subprocess

    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], capture_output=True, text=True, check=True).stdout)
    newest: dict[str, dict] = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            name, rev = exp.get("name"), exp["revs"][0]
            if name and (name not in newest or (rev["data"].get("timestamp") or "") > (newest[name]["data"].get("timestamp") or "")):
                newest[name] = rev
    return newest


def experiments_by_name() -> dict[str, dict]:
    """name -> data of every experiment `dvc exp show --json` lists (params, metrics)."""
    return {name: rev["data"] for name, rev in experiment_revs().items()}


def fit_seconds(experiment: str) -> str:
    """The fit time the train stage printed (wall clock, not stored in any output so that `dvc repro --force` is
    byte-identical), read back from the experiment queue's log; '-' when the experiment did not run queued."""
    import subprocess

    log = subprocess.run(["dvc", "queue", "logs", experiment], capture_output=True, text=True).stdout
    match = re.search(r"fitted in ([0-9.]+)s", log)
    return f"{float(match.group(1)):.0f}" if match else "-"


def archs_section(prefix: str, baseline: dict) -> str:
    """One row per experiment named `<prefix><arch>` plus the committed default, from `dvc exp show --json`."""
    default_arch = yaml.safe_load(Path("params.yaml").read_text())["train"]["arch"]
    runs = {f"{default_arch} (default)": (baseline, None)}
    for name, data in sorted(experiments_by_name().items()):
        finished = "data" in data.get("metrics", {}).get("metrics/evaluate.json", {}) and "data" in data["metrics"].get("dvclive/metrics.json", {})
        if name.startswith(prefix) and finished and name != f"{prefix}{default_arch}":  # queued or failed: no metrics yet
            runs[name[len(prefix):]] = (data["metrics"]["metrics/evaluate.json"]["data"], data)
    rows = []
    for arch, (metrics, data) in runs.items():
        live = data["metrics"]["dvclive/metrics.json"]["data"] if data else json.loads(Path("dvclive/metrics.json").read_text())
        train = data["params"]["params.yaml"]["data"]["train"] if data else None
        note = "" if not train or not train["max_train_windows"] else f"{train['max_train_windows']:,} windows, {train['epochs']} epochs"
        p = metrics["predictor"]
        rows.append([arch, pct(p["top1"]), pct(p["top5"]), pct(p["recall_at_k"]), f"{p['arch_parameters']:,}",
                     str(live.get("epochs", "")), fit_seconds(prefix + arch.split()[0]), note])
    b = baseline["baselines"]
    return "\n\n".join([
        f"Test split of the default data (lookup baseline: top-1 {pct(b['lookup']['top1'])}, recall@k "
        f"{pct(b['lookup']['recall_at_k'])}; frequency: top-1 {pct(b['frequency']['top1'])}). Each row is "
        f"`dvc exp run -n {prefix}<arch> -S train.arch=<arch>` at the arch's default size; the table is written by "
        f"`python scripts/update_readme.py --archs {prefix}` from `dvc exp show --json`. Parameters of the tables "
        "are their entries. Train time is the wall-clock fit the train stage printed in the experiment's queue log "
        f"(`dvc queue logs {prefix}<arch>`; the default's from `{prefix}mlp`), on the shared 2-core development machine "
        "while other jobs ran: a rough guide, not a benchmark (that is `benchmarks/bench_training.py`).",
        table(["arch", "top-1", "top-5", "recall@k", "parameters", "epochs", "train time (s)", "deviation from defaults"], rows),
    ])


def committed_metrics(prefix: str, h: int) -> dict:
    """metrics/evaluate.json of experiment `<prefix><h>` as its commit holds it (`dvc exp show` drops lists such as
    the intervals)."""
    import subprocess

    rev = experiment_revs()[f"{prefix}{h}"]["rev"]
    return json.loads(subprocess.run(["git", "show", f"{rev}:metrics/evaluate.json"], capture_output=True, text=True,
                                     check=True).stdout)


def horizons_section(prefix: str, baseline: dict) -> str:
    """The default predictor trained at each horizon vs the strongest baseline on each metric, with intervals: h = 1
    from the committed metrics, h > 1 from the experiments named `<prefix><h>`."""
    runs = {1: baseline, **{h: committed_metrics(prefix, h) for h in finished_by_horizon(prefix)}}

    def cell(result: dict, metric: str) -> str:
        interval = result.get(f"{metric}_ci95")
        return pct(result[metric]) + (" [{:.1f}, {:.1f}]".format(*(100 * v for v in interval)) if interval else "")

    rows = []
    for h, metrics in sorted(runs.items()):
        row = [str(h)]
        for metric in ("top1", "recall_at_k"):
            best = max(metrics["baselines"], key=lambda name: metrics["baselines"][name][metric])
            row += [cell(metrics["predictor"], metric), f"{best} {cell(metrics['baselines'][best], metric)}"]
        difference = metrics["predictor_minus_best_baseline_top1"]
        row += ["{:+.1f} [{:+.1f}, {:+.1f}]".format(100 * difference["difference"], *(100 * v for v in difference["ci95"])),
                f"{metrics['test_windows']:,}"]
        rows.append(row)
    return "\n\n".join([
        f"The default predictor retrained at each horizon (`dvc exp run -n {prefix}<h> -S windows.horizon=<h>`; table by "
        f"`python scripts/update_readme.py --horizons {prefix}`), against the strongest baseline on each metric at that "
        "horizon; intervals are the document bootstrap's.",
        table(["h", "predictor top-1", "best baseline top-1", "predictor recall@k", "best baseline recall@k",
               "top-1 difference (points)", "test windows"], rows),
    ])


def domain_split_section(experiment: str, baseline: dict) -> str:
    """In-domain (the committed default: documents split at random) vs held-out-domain test metrics, from the
    metrics of a `dvc exp run -S windows.split.by=domain ...` experiment as `dvc exp show --json` reports them."""
    data = experiments_by_name().get(experiment)
    if data is None:
        raise SystemExit(f"no experiment named {experiment!r} in `dvc exp show`")
    held = data["metrics"]["metrics/evaluate.json"]["data"]
    split = data["params"]["params.yaml"]["data"]["windows"]["split"]
    in_domain = baseline["per_domain"][split["test_domain"]]  # the same domain's test documents, default split
    rows = []
    for name, key in (("predictor", None), ("token_context", "token_context"), ("top1_table", "top1_table"),
                      ("lookup", "lookup"), ("frequency", "frequency")):  # the two strongest baselines of the default data first
        a = in_domain[name]
        b = held["predictor"] if key is None else held["baselines"][key]
        for metric in ("top1", "top5", "recall_at_k"):
            rows.append([name, metric, pct(a[metric]), pct(b[metric]), f"{100 * (b[metric] - a[metric]):+.1f}"])
    return "\n\n".join([
        f"Held-out domain: test = every `{split['test_domain']}` document, train/val = the other domain "
        f"(`dvc exp run -S windows.split.by=domain -S windows.split.test_domain={split['test_domain']} "
        f"-S 'windows.split.fractions=[0.9, 0.1]'`, experiment `{experiment}`). In-domain: the test documents of the "
        f"same domain under the default split, where training also saw other `{split['test_domain']}` documents.",
        table(["scorer", "metric", "in-domain test", "held-out domain test", "gap (points)"], rows),
    ])


def profiles_section() -> str:
    """The registered cost profiles with their numbers and derivations (from the code, so the two cannot drift)."""
    from moe_prefetch.evaluation.config import COST_PROFILES

    rows = [[f"`{name}`", f"{p.expert_bytes:,.0f}", f"{p.bandwidth_gbps:g}", f"{p.expert_bytes / (p.bandwidth_gbps * 1e6):.2f}",
             f"{p.layer_compute_ms:g}", f"{p.expert_compute_share:g}",
             f"CPU, {p.cpu_expert_ms:g} ms" if p.miss_path == "cpu" else p.miss_path, p.derivation]
            for name, p in COST_PROFILES.items()]
    return table(["profile", "expert bytes", "GB/s", "transfer ms", "layer compute ms", "expert compute share", "misses",
                  "derivation"], rows)


def gpu_estimates_section() -> str:
    """Disk, memory and time of collecting three real models at params.yaml's collect section (computed, not measured)."""
    from moe_prefetch.gpu_estimates import readme_table
    from moe_prefetch.params import parse_section

    return readme_table(parse_section("collect", yaml.safe_load(Path("params.yaml").read_text())["collect"]))


def families_section() -> str:
    """The supported MoE families (FAMILIES) and the unsupported ones with the reason (routing/unsupported.py): the
    tables tests/test_routing_registry.py checks against every MoE family of the installed transformers."""
    import transformers

    from moe_prefetch.routing import FAMILIES
    from moe_prefetch.routing.discovery import family_of
    from moe_prefetch.routing.unsupported import UNSUPPORTED

    supported = table(["`config.model_type`", "transformers family", "adapter"],
                      [[f"`{name}`", f"`{family_of(name)}`", f"`{adapter.__module__.rsplit('.', 1)[1]}.{adapter.__name__}`"]
                       for name, adapter in sorted(FAMILIES.items())])
    unsupported = table(["transformers family", "why not supported"], [[f"`{family}`", reason] for family, reason in sorted(UNSUPPORTED.items())])
    return (f"Supported ({len(FAMILIES)} model types; each is tested on a tiny random-init config in float32 and bfloat16, "
            "against what its experts module receives, and its look-ahead against a hand-run of the later router; the "
            "decoder-only ones also in generate mode (prefill and every decode step), float32 and bfloat16):\n\n" + supported + f"\n\nEvery other routed MoE family of transformers {transformers.__version__} "
            f"({len(UNSUPPORTED)}; `moe_prefetch/routing/unsupported.py`):\n\n" + unsupported)


def render(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> section")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from what would be written")
    parser.add_argument("--archs", metavar="PREFIX", help="also rewrite the architecture table from experiments named PREFIX<arch>")
    parser.add_argument("--domain-split", metavar="EXPERIMENT", help="also rewrite the domain-split section from this experiment")
    parser.add_argument("--horizons", metavar="PREFIX", help="also rewrite the per-horizon predictor table from experiments PREFIX<h>")
    args = parser.parse_args()
    text = README.read_text()
    new = render(text, "tiny-model", tiny_model_section(json.loads(Path("models/tiny-moe/report.json").read_text())))
    new = render(new, "tiny-model-64x6", tiny_model_section(json.loads(Path("models/tiny-moe-64x6/report.json").read_text())))
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    new = render(new, "results", results_section(metrics))
    from run_geometry import SUMMARY, geometry_section  # imports this module: only once it is fully defined

    new = render(new, "geometry", geometry_section(json.loads(SUMMARY.read_text()), metrics))
    import run_hidden_state

    new = render(new, "hidden-state", run_hidden_state.hidden_state_section(json.loads(run_hidden_state.SUMMARY.read_text())))
    import run_across_tokens

    new = render(new, "across-tokens", run_across_tokens.across_tokens_section(json.loads(run_across_tokens.SUMMARY.read_text())))
    new = render(new, "cost-profiles", profiles_section())
    new = render(new, "gpu-estimates", gpu_estimates_section())
    new = render(new, "families", families_section())
    if args.archs:
        new = render(new, "archs", archs_section(args.archs, metrics))
    if args.domain_split:
        new = render(new, "domain-split", domain_split_section(args.domain_split, metrics))
    if args.horizons:
        new = render(new, "horizons", horizons_section(args.horizons, metrics))
    if args.check:
        sys.exit(0 if new == text else 1)
    README.write_text(new)


if __name__ == "__main__":
    main()
