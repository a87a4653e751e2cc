"""The predictor and the baselines against a known Bayes optimum: routing drawn from a
moe_prefetch.synthetic_chain.SetChain, written as shards, cut into windows by the windows stage's build_windows,
the predictor fit by the train stage's train() and every baseline built by baseline_scorers, as the pipeline does.
Each scorer is then scored on the test windows twice: its *expected* top-1 and recall@k under the chain's exact
posterior (no noise from the sampled targets, so it compares with the optimum directly) and its empirical ones
(RankingAccumulator, as evaluate scores them). Used by tests/test_known_optimum.py and
benchmarks/bench_known_optimum.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from moe_prefetch.errors import PipelineError
from moe_prefetch.evaluation.baselines import baseline_scorers
from moe_prefetch.evaluation.metrics import RankingAccumulator
from moe_prefetch.predictors import load_predictor
from moe_prefetch.synthetic import write_synthetic_shards
from moe_prefetch.synthetic_chain import SetChain, bayes_optimum, expected_accuracy
from moe_prefetch.training import train
from moe_prefetch.windows.build import build_windows
from moe_prefetch.windows.data import read_summary, read_windows

SCORE_BATCH = 8192  # test windows scored at once: bounds the (batch, E) score memory


def chain_windows(work: Path, chain: SetChain, num_tokens: int, windows_params, seed: int = 0) -> Path:
    """The windows directory of >= num_tokens tokens of the chain's routing (shards under work/shards)."""
    if windows_params.horizon != 1:
        raise PipelineError(f"windows.horizon: the chain's optimum is exact at horizon 1 only, got {windows_params.horizon}")
    # one 64-token sequence per document: the chain's tokens are independent, and many small documents split evenly
    write_synthetic_shards(work / "shards", num_tokens, seed=seed, seq_len=64, chunks_per_document=1, chain=chain)
    windows_dir = work / "windows"
    windows_dir.mkdir(parents=True, exist_ok=True)
    build_windows(work / "shards", windows_dir, windows_params)
    return windows_dir


def score_against_optimum(chain: SetChain, scorers: dict, test) -> dict[str, dict[str, float]]:
    """name -> expected top1/recall_at_k (exact posterior) and empirical_top1/empirical_recall_at_k on `test`,
    with "optimum" (the Bayes-optimal expectation) first."""
    k = chain.top_k
    results = {"optimum": bayes_optimum(chain, test)}
    for name, scorer in scorers.items():
        expected = {"top1": 0.0, "recall_at_k": 0.0}
        empirical = RankingAccumulator([1], chain.num_experts, k)
        for start in range(0, len(test), SCORE_BATCH):
            batch = test.subset(np.arange(start, min(start + SCORE_BATCH, len(test))))
            scores, _ = scorer(batch)
            for metric, value in expected_accuracy(chain, batch, scores).items():
                expected[metric] += value * len(batch) / len(test)  # batch means -> the mean over all windows
            empirical.update(scores, batch.target_experts)
        measured = empirical.result()
        results[name] = {**expected, "empirical_top1": measured["top1"], "empirical_recall_at_k": measured["recall_at_k"]}
    return results


def compare_with_optimum(work: Path, chain: SetChain, num_tokens: int, windows_params, train_params, seed: int = 0) -> dict:
    """Build windows of the chain's routing in `work`, train the predictor `train_params` names on them and score it
    and every baseline (but the seeded random one) on the test split against the optimum. Returns the scores
    (score_against_optimum), the train summary, the fit's wall-clock seconds and the split sizes."""
    windows_dir = chain_windows(work, chain, num_tokens, windows_params, seed)
    started = time.perf_counter()
    fit = train(train_params, windows_dir, work / "predictor", None)
    train_seconds = time.perf_counter() - started
    summary = read_summary(windows_dir)
    train_windows, val, test = (read_windows(windows_dir, split) for split in ("train", "val", "test"))
    scorers = {"predictor": load_predictor(work / "predictor").score, **baseline_scorers(train_windows, summary, val=val)}
    return {"scores": score_against_optimum(chain, scorers, test), "train": fit, "train_seconds": train_seconds,
            "windows": {split: summary["splits"][split]["windows"] for split in ("train", "val", "test")}}
