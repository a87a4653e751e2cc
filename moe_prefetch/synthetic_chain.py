"""Synthetic routing whose Bayes-optimal prediction is known exactly: a first-order Markov chain over best-first
expert sets across MoE layers (`SetChain`), written as shards by moe_prefetch.synthetic.write_synthetic_shards.

The chain, for E experts, top-k and L MoE layers:

- layer 0: k distinct experts uniformly at random, in a random order;
- layer l >= 1, given the best-first set S = (s_0, ..., s_(k-1)) of layer l - 1: the expert in slot j *carries*
  with probability carry[j], independently per slot, to expert maps[l, s_j] (maps[l] is a fixed random permutation
  of the experts, so carried experts are distinct). The carried experts come first, in the order of their source
  slots; the remaining k - C slots (C carried) are filled uniformly without replacement from the E - C experts that
  are not a carried image, in a random order.

Given the whole routing history up to layer l - 1 the law of layer l depends on S alone (first-order), so for a
window with horizon 1 the last context layer is a sufficient statistic and the Bayes-optimal scores are exact:

- P(image of slot j in layer l's set) = carry[j] + (1 - carry[j]) E[(k - C')/(E - C')], C' the carried count of
  the other k - 1 slots; P(any other expert in the set) = E[(k - C)/(E - C)], C the carried count of all k slots;
- P(image of slot j is layer l's top-1) = carry[j] prod_(i<j) (1 - carry[i]) + prod_i (1 - carry[i]) / E, and
  prod_i (1 - carry[i]) / E for every other expert (the top-1 is a uniform fill only when nothing carries).

The best recall@k ranks experts by the first probability, the best top-1 by the second; `expected_accuracy` scores
any scorer's rankings under these probabilities, so that a predictor is compared with the optimum without the
noise of the sampled targets (only the contexts are sampled). Gate weights are Dirichlet(1) sorted descending, as
in moe_prefetch/synthetic.py, and carry no information beyond the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_prefetch.errors import PipelineError
from moe_prefetch.evaluation.metrics import rank_positions
from moe_prefetch.windows.data import WindowSet

DEFAULT_CARRY = (0.9, 0.85, 0.8, 0.75, 0.7, 0.65)  # top-6: the highest-weight slots carry most often


def carried_count_distribution(carry: np.ndarray) -> np.ndarray:
    """(n + 1,) P(C = c) of C, the number of successes of independent Bernoulli(carry) trials (n = len(carry))."""
    distribution = np.zeros(len(carry) + 1)
    distribution[0] = 1.0
    for probability in carry:  # add one trial: C stays (fails) or moves up by one (carries)
        distribution[1:] = distribution[1:] * (1 - probability) + distribution[:-1] * probability
        distribution[0] *= 1 - probability
    return distribution


@dataclass(frozen=True)
class SetChain:
    """The chain's parameters: maps (L, E) int64, row l the permutation experts of layer l - 1 carry through into
    layer l (row 0 unused), and carry (k,) float64, the chance that slot j's expert carries."""

    maps: np.ndarray  # (L, E)
    carry: np.ndarray  # (k,)

    @classmethod
    def random(cls, num_layers: int, num_experts: int, carry: tuple[float, ...] = DEFAULT_CARRY, seed: int = 0) -> SetChain:
        """A chain with seeded random per-layer permutations."""
        if not 1 <= len(carry) <= num_experts:
            raise PipelineError(f"synthetic chain: top-k = len(carry) = {len(carry)} must be in 1..num_experts ({num_experts})")
        if not all(0.0 <= p <= 1.0 for p in carry):
            raise PipelineError(f"synthetic chain: carry probabilities {list(carry)} must each be in [0, 1]")
        if num_layers < 2:
            raise PipelineError(f"synthetic chain: num_layers {num_layers} must be >= 2 (a chain needs a transition)")
        rng = np.random.default_rng(seed)
        maps = np.stack([rng.permutation(num_experts) for _ in range(num_layers)]).astype(np.int64)
        return cls(maps, np.asarray(carry, dtype=np.float64))

    @property
    def num_layers(self) -> int:
        return self.maps.shape[0]

    @property
    def num_experts(self) -> int:
        return self.maps.shape[1]

    @property
    def top_k(self) -> int:
        return len(self.carry)

    def describe(self) -> dict:
        """JSON-safe description (recorded in the synthetic shards' meta)."""
        return {"kind": "set_markov_chain", "carry": self.carry.tolist()}

    # -- sampling ----------------------------------------------------------------------------------------------
    def fill(self, carried_images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(N, k) best-first sets: each row's carried images (N, k) (-1 = slot did not carry) in slot order, then
        uniform fills from the experts that are not a carried image, in a random order."""
        n, k = carried_images.shape
        keys = rng.random((n, self.num_experts))  # (N, E): a random order of the experts per row
        carried_rows, carried_slots = np.nonzero(carried_images >= 0)
        keys[carried_rows, carried_images[carried_rows, carried_slots]] = np.inf  # a carried image is never a fill
        fills = np.argpartition(keys, k - 1, axis=1)[:, :k]  # (N, k) the k smallest keys: never a carried image
        fills = np.take_along_axis(fills, np.argsort(np.take_along_axis(keys, fills, axis=1), axis=1), axis=1)
        candidates = np.concatenate([carried_images, fills], axis=1)  # (N, 2k)
        first_valid = np.argsort(candidates < 0, axis=1, kind="stable")[:, :k]  # carried ones first, then fills
        return np.take_along_axis(candidates, first_valid, axis=1)

    def sample(self, num_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """experts (N, L, k) int16 best-first and gate weights (N, L, k) float32 of N independent tokens."""
        L, k = self.num_layers, self.top_k
        experts = np.empty((num_tokens, L, k), dtype=np.int64)
        experts[:, 0] = self.fill(np.full((num_tokens, k), -1), rng)
        for layer in range(1, L):
            carries = rng.random((num_tokens, k)) < self.carry  # (N, k)
            experts[:, layer] = self.fill(np.where(carries, self.maps[layer][experts[:, layer - 1]], -1), rng)
        weights = -np.sort(-rng.dirichlet(np.ones(k), size=(num_tokens, L)), axis=-1)
        return experts.astype(np.int16), weights.astype(np.float32)

    # -- the exact posterior -----------------------------------------------------------------------------------
    def fill_chance(self, carry: np.ndarray) -> float:
        """E[(k - C)/(E - C)]: the chance a given non-carried expert is filled, C ~ carried count of `carry`'s slots."""
        distribution = carried_count_distribution(carry)
        counts = np.arange(len(carry) + 1)
        return float((distribution * (self.top_k - counts) / (self.num_experts - counts)).sum())

    def slot_probabilities(self) -> tuple[np.ndarray, float, np.ndarray, float]:
        """(k,) P(image of slot j in the next set), P(any other expert in it), (k,) P(image of slot j is the next
        top-1), P(any other expert is)."""
        k = self.top_k
        others = [self.fill_chance(np.delete(self.carry, j)) for j in range(k)]
        image_inclusion = self.carry + (1 - self.carry) * np.array(others)
        nothing_carries = float(np.prod(1 - self.carry))
        reaches_slot = np.concatenate([[1.0], np.cumprod(1 - self.carry)[:-1]])  # prod_(i<j) (1 - carry_i)
        image_top1 = self.carry * reaches_slot + nothing_carries / self.num_experts
        return image_inclusion, self.fill_chance(self.carry), image_top1, nothing_carries / self.num_experts

    def posterior(self, windows: WindowSet) -> tuple[np.ndarray, np.ndarray]:
        """(N, E) P(expert in the target set) and (N, E) P(expert is the target's top-1), exactly, given each
        window's context (horizon-1 windows of this chain's routing: the last context layer is the previous layer)."""
        if windows.context_experts.shape[2] != self.top_k:
            raise PipelineError(f"synthetic chain: windows have top-k {windows.context_experts.shape[2]}, the chain {self.top_k}")
        previous = windows.context_experts[:, -1, :].astype(np.int64)  # (N, k) best-first set of layer t - 1
        layer = windows.target_layer.astype(np.int64)
        if (previous < 0).any() or (layer < 1).any() or (layer >= self.num_layers).any():
            raise PipelineError("synthetic chain: posterior needs full windows with target layers 1..L-1 of the chain's routing")
        images = self.maps[layer[:, None], previous]  # (N, k)
        image_inclusion, other_inclusion, image_top1, other_top1 = self.slot_probabilities()
        inclusion = np.full((len(windows), self.num_experts), other_inclusion)
        top1 = np.full((len(windows), self.num_experts), other_top1)
        rows = np.arange(len(windows))[:, None]
        inclusion[rows, images] = image_inclusion
        top1[rows, images] = image_top1
        return inclusion, top1


def expected_accuracy(chain: SetChain, windows: WindowSet, scores: np.ndarray) -> dict[str, float]:
    """Expected top-1 and recall@k of the rankings `scores` (N, E) on `windows` under the chain's exact posterior
    (ranked as RankingAccumulator ranks: stable, ties to the lower id)."""
    inclusion, top1 = chain.posterior(windows)
    positions = rank_positions(scores)  # (N, E)
    chosen = positions < chain.top_k  # (N, E) the predicted top-k
    best = positions.argmin(axis=1)  # (N,) the predicted top-1
    return {"top1": float(top1[np.arange(len(windows)), best].mean()),
            "recall_at_k": float((inclusion * chosen).sum(axis=1).mean() / chain.top_k)}


def bayes_optimum(chain: SetChain, windows: WindowSet) -> dict[str, float]:
    """The best expected top-1 and recall@k any scorer of the windows' contexts can reach (each metric's optimum
    ranks by its own posterior)."""
    inclusion, top1 = chain.posterior(windows)
    best_set = -np.sort(-inclusion, axis=1)[:, : chain.top_k]  # (N, k)
    return {"top1": float(top1.max(axis=1).mean()), "recall_at_k": float(best_set.sum(axis=1).mean() / chain.top_k)}
