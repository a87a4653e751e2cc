"""The default learned predictor against a known Bayes optimum: routing of a first-order Markov chain over best-first
expert sets (moe_prefetch/synthetic_chain.py; 64 experts, top-6, 24 MoE layers by default) written as shards, cut into
windows by build_windows with params.yaml's windows section, the predictor trained by train() with params.yaml's
train section (the default arch), every baseline built by baseline_scorers (moe_prefetch/known_optimum.py).
Prints, per scorer, the expected top-1 and recall@k under the chain's exact posterior next to the optimum (and their
ratio), and the empirical figures on the sampled test targets. The target: the predictor's expected recall@k within
1 point of the optimum's.

    python benchmarks/bench_known_optimum.py [--tokens 30000] [--experts 64] [--top-k 6] [--layers 24] [--seed 0] [--arch NAME]
        [--set KEY=VALUE ...]   # train-section overrides, e.g. --set token_mlp.transitions=true --set lr=0.03
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from common import Row, command_line, default_section, finish, parser, set_threads

TOLERANCE_POINTS = 1.0  # the acceptance: within 1 point of the optimum's recall@k


def with_overrides(train_params, assignments: list[str]):
    """The train section with `KEY=VALUE` overrides (dotted keys into its sub-sections, YAML values), validated."""
    import yaml

    from moe_prefetch.params import as_dict, parse_section

    raw = as_dict(train_params)
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        *path, leaf = key.split(".")
        section = raw
        for part in path:
            section = section.setdefault(part, {})
        section[leaf] = yaml.safe_load(value)
    return parse_section("train", raw)


def run(args) -> list[Row]:
    from moe_prefetch.known_optimum import compare_with_optimum
    from moe_prefetch.synthetic_chain import DEFAULT_CARRY, SetChain

    windows_params, windows_source = default_section("windows")
    train_params, train_source = default_section("train")
    if args.arch:
        train_params = dataclasses.replace(train_params, arch=args.arch)
    if args.set:
        train_params = with_overrides(train_params, args.set)
    carry = tuple(DEFAULT_CARRY[: args.top_k]) if args.top_k <= len(DEFAULT_CARRY) else None
    if carry is None:
        raise SystemExit(f"--top-k {args.top_k}: the default carry probabilities cover top-k <= {len(DEFAULT_CARRY)}")
    chain = SetChain.random(args.layers, args.experts, carry, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-known-optimum-"))
    try:
        started = time.perf_counter()
        report = compare_with_optimum(work, chain, args.tokens, windows_params, train_params, seed=args.seed)
        total = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scores, optimum = report["scores"], report["scores"]["optimum"]
    print(f"chain: E={args.experts}, k={args.top_k}, L={args.layers}, carry {list(carry)}, seed {args.seed}; "
          f"{args.tokens} tokens -> windows {report['windows']} (windows from {windows_source}, train from {train_source}: "
          f"arch {train_params.arch}, epochs run {report['train']['epochs']}, kept epoch {report['train'].get('kept_epoch')})")
    print(f"train {report['train_seconds']:.0f} s, end to end {total:.0f} s\n")
    print(f"{'scorer':<22} {'E[top-1]':>9} {'/opt':>6} {'E[recall@k]':>12} {'/opt':>6} {'top-1':>7} {'recall@k':>9}")
    for name, result in scores.items():
        print(f"{name:<22} {100 * result['top1']:8.2f}% {result['top1'] / optimum['top1']:6.3f} "
              f"{100 * result['recall_at_k']:11.2f}% {result['recall_at_k'] / optimum['recall_at_k']:6.3f} "
              + (f"{100 * result['empirical_top1']:6.2f}% {100 * result['empirical_recall_at_k']:8.2f}%" if name != "optimum" else ""))
    gap = 100 * (optimum["recall_at_k"] - scores["predictor"]["recall_at_k"])
    status = "PASS" if gap <= TOLERANCE_POINTS else "FAIL"
    extra = [f"--tokens {args.tokens}", f"--experts {args.experts}", f"--top-k {args.top_k}", f"--layers {args.layers}",
             *([f"--arch {args.arch}"] if args.arch else []), *(f"--set {item}" for item in args.set)]
    return [Row("bench_known_optimum.py", f"{train_params.arch} recall@k {gap:.2f} points below the optimum "
                f"({100 * scores['predictor']['recall_at_k']:.2f}% vs {100 * optimum['recall_at_k']:.2f}%)",
                f"<= {TOLERANCE_POINTS:g} point", status, command_line("bench_known_optimum.py", extra),
                [f"train {report['train_seconds']:.0f} s"])]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=30_000, help="tokens of synthetic routing (default 30000)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="seed of the chain's maps and of the sampled routing")
    p.add_argument("--arch", default=None, help="train this arch instead of params.yaml's train.arch (its own section's params)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train param (dotted into its sub-sections), e.g. token_mlp.transitions=true")
    args = p.parse_args()
    set_threads(args.threads)
    finish(args, run(args))


if __name__ == "__main__":
    main()
