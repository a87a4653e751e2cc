"""Train the embedded default checkpoint `models/tiny-moe/`: a byte-level BPE tokenizer and a tiny
DeepSeek-V3-architecture MoE (8 MoE layers, 16 routed experts top-2, 1 shared expert) on the built-in text.

Why DeepSeek-V3: its router keeps an `e_score_correction_bias` that steers expert *choice* without touching the
gate weights, so load can be balanced after every step ("auxiliary-loss-free" balancing, as DeepSeek-V3 was
trained). Tiny Mixtral-style routers trained for minutes collapse onto 1-2 experts per layer even with a large
aux loss; a collapsed router makes every downstream prediction number meaningless. Batches draw the two domains
evenly, because balance is only reached on what is sampled.

Run (about 6 CPU minutes on 2 cores):  python scripts/train_tiny_moe.py --out models/tiny-moe
Every setting below is also an option (`--routed-experts 64 --experts-per-token 6 ...`): the second embedded
geometry, models/tiny-moe-64x6, is this script with the options its README section lists.
It writes the checkpoint, the tokenizer, `training_settings.json` (everything below) and `report.json` (validation
loss vs a unigram model, per-domain routing balance), which the README quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

from moe_prefetch.collect.sources import SourceSpec, iter_documents


@dataclass
class Settings:
    seed: int = 0
    domains: tuple[str, ...] = ("python-docs", "python-stdlib")
    val_fraction: float = 0.1  # documents (by name hash) held out for validation loss and the routing report
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    routed_experts: int = 16
    experts_per_token: int = 2
    shared_experts: int = 1
    moe_intermediate_size: int = 64
    seq_len: int = 128
    batch_size: int = 16  # half of every batch from each domain
    steps: int = 800
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    bias_update_rate: float = 0.01  # e_score_correction_bias += rate * sign(mean load - expert load), every step
    sequence_balance_loss: float = 0.01  # DeepSeek-V3's complementary sequence-wise balance loss; sequences are
    # single-domain, so this balances load within each domain where the global bias cannot
    report_chunks_per_domain: int = 256
    val_tokens: int = 0  # validation loss on the first this-many tokens of each domain's stream (0 = all of it)
    threads: int = 2  # torch threads (1 is faster on a machine shared with other jobs; results may differ in rounding)


def is_validation(doc_id: str, fraction: float) -> bool:
    return zlib.crc32(doc_id.encode()) % 1000 < fraction * 1000


def load_domains(settings: Settings) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """domain -> {"train": [(doc_id, text)], "val": [...]}."""
    out = {}
    for domain in settings.domains:
        docs = list(iter_documents(SourceSpec(name=domain), seed=settings.seed))
        out[domain] = {
            "train": [d for d in docs if not is_validation(d[0], settings.val_fraction)],
            "val": [d for d in docs if is_validation(d[0], settings.val_fraction)],
        }
    return out


def train_tokenizer(texts_by_domain: dict[str, list[str]], settings: Settings) -> PreTrainedTokenizerFast:
    # Equal bytes from each domain, so code does not own the vocabulary.
    budget = min(sum(map(len, texts)) for texts in texts_by_domain.values())
    corpus = []
    for texts in texts_by_domain.values():
        used = 0
        for text in texts:
            if used >= budget:
                break
            corpus.append(text[: budget - used])
            used += len(corpus[-1])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def token_stream(tokenizer, docs: list[tuple[str, str]]) -> np.ndarray:
    """All documents' tokens, each followed by end-of-text."""
    ids = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int64)


def build_model(settings: Settings, tokenizer) -> DeepseekV3ForCausalLM:
    config = DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=4 * settings.hidden_size,  # dense MLP size; unused, every layer is MoE
        moe_intermediate_size=settings.moe_intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        n_shared_experts=settings.shared_experts,
        n_routed_experts=settings.routed_experts,
        num_experts_per_tok=settings.experts_per_token,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=1024,
        num_mtp_layers=0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return DeepseekV3ForCausalLM(config)


class ExpertLoad:
    """Counts the experts each MoE layer's router dispatched to, and keeps this forward's router outputs for the
    sequence-wise balance loss, via forward hooks on the routers."""

    def __init__(self, model, num_experts: int, top_k: int):
        self.counts = torch.zeros(len(model.model.layers), num_experts)
        self.top_k = top_k
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gates = [layer.mlp.gate for layer in model.model.layers]
        for index, gate in enumerate(self.gates):
            gate.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def record(_module, _inputs, output):
            logits, _weights, topk_indices = output
            self.counts[index] += torch.bincount(topk_indices.flatten(), minlength=self.counts.shape[1])
            self.outputs.append((logits, topk_indices))

        return record

    def sequence_balance_loss(self, batch: int) -> torch.Tensor:
        """Mean over layers and sequences of sum_i f_i * P_i (DeepSeek-V3, eq. 17-20): f_i = share of the
        sequence's slots on expert i times E/k, P_i = mean normalised affinity of expert i."""
        losses = []
        for logits, indices in self.outputs:
            experts = logits.shape[-1]
            scores = logits.sigmoid().view(batch, -1, experts)  # (B, S, E)
            affinity = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
            chosen = torch.zeros_like(scores).scatter_(2, indices.view(batch, -1, self.top_k), 1.0)
            load = chosen.mean(dim=1) * experts / self.top_k  # (B, E)
            losses.append((load * affinity).sum(dim=-1).mean())
        self.outputs.clear()
        return torch.stack(losses).mean()

    def take(self) -> torch.Tensor:
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        return counts


def sample_batch(streams: dict[str, np.ndarray], settings: Settings, rng: np.random.Generator) -> torch.Tensor:
    rows = []
    per_domain = settings.batch_size // len(streams)
    for stream in streams.values():
        starts = rng.integers(0, len(stream) - settings.seq_len, size=per_domain)
        rows.extend(stream[s : s + settings.seq_len] for s in starts)
    return torch.from_numpy(np.stack(rows))


def train(settings: Settings, model, streams: dict[str, np.ndarray]) -> list[dict]:
    rng = np.random.default_rng(settings.seed)
    load = ExpertLoad(model, settings.routed_experts, settings.experts_per_token)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    log = []
    started = time.time()
    for step in range(settings.steps):
        batch = sample_batch(streams, settings, rng)
        loss = model(input_ids=batch, labels=batch).loss
        (loss + settings.sequence_balance_loss * load.sequence_balance_loss(len(batch))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        counts = load.take()  # (layers, experts) for this step
        with torch.no_grad():
            for gate, layer_counts in zip(load.gates, counts):
                gate.e_score_correction_bias += settings.bias_update_rate * torch.sign(layer_counts.mean() - layer_counts)
        if step % 50 == 0 or step == settings.steps - 1:
            share = (counts.max(dim=1).values / counts.sum(dim=1) * settings.routed_experts).mean().item()
            log.append({"step": step, "loss": round(loss.item(), 4), "max_share_over_fair": round(share, 3)})
            print(f"step {step:4d} loss {loss.item():.3f} max-expert/fair {share:.2f} ({time.time() - started:.0f}s)", flush=True)
    return log


@torch.no_grad()
def validation_loss(model, stream: np.ndarray, seq_len: int) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows of the validation stream."""
    windows = torch.from_numpy(stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len))
    losses = [model(input_ids=chunk, labels=chunk).loss.item() * chunk.numel() for chunk in windows.split(32)]
    return sum(losses) / windows.numel()


def unigram_loss(train_stream: np.ndarray, val_stream: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats) of an add-one unigram model fit on the training stream."""
    counts = np.bincount(train_stream, minlength=vocab) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val_stream].mean())


@torch.no_grad()
def routing_report(model, tokenizer, docs: list[tuple[str, str]], settings: Settings) -> dict:
    """Per layer: expert load, most-used expert's share over fair share, load entropy, and how often the layer's
    favourite expert is the token's highest-weight expert, on chunks from distinct documents."""
    rng = random.Random(settings.seed)
    chunks = []
    for _, text in rng.sample(docs, len(docs)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= settings.seq_len:
            start = rng.randrange(len(ids) - settings.seq_len + 1)
            chunks.append(ids[start : start + settings.seq_len])
        if len(chunks) == settings.report_chunks_per_domain:
            break
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in model.model.layers]
    layers = len(model.model.layers)
    load = np.zeros((layers, settings.routed_experts))
    first = np.zeros((layers, settings.routed_experts))
    for batch in torch.tensor(chunks).split(32):
        captured.clear()
        model(input_ids=batch)
        for layer, (_logits, weights, indices) in enumerate(captured):
            load[layer] += np.bincount(indices.flatten().numpy(), minlength=settings.routed_experts)
            best = indices.gather(1, weights.argmax(dim=1, keepdim=True)).flatten().numpy()
            first[layer] += np.bincount(best, minlength=settings.routed_experts)
    for hook in hooks:
        hook.remove()
    share = load / load.sum(axis=1, keepdims=True)
    max_over_fair = share.max(axis=1) * settings.routed_experts
    entropy = -(share * np.log2(np.where(share > 0, share, 1))).sum(axis=1)
    return {
        "chunks": len(chunks),
        "max_share_over_fair_mean": float(max_over_fair.mean()),
        "max_share_over_fair_worst": float(max_over_fair.max()),
        "per_layer_max_share_over_fair": [round(float(v), 3) for v in max_over_fair],
        "per_layer_load_entropy_bits": [round(float(v), 3) for v in entropy],
        "per_layer_frequency_top1": [round(float(v), 3) for v in first.max(axis=1) / first.sum(axis=1)],
        "per_layer_load_share": [[round(float(v), 4) for v in row] for row in share],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/tiny-moe"))
    for field in fields(Settings):
        # One option per setting (--routed-experts 64 ...), so a second geometry needs no copy of this script.
        if isinstance(field.default, tuple):
            parser.add_argument(f"--{field.name.replace('_', '-')}", nargs="+", default=list(field.default))
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    settings = Settings(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v for f in fields(Settings)})
    if settings.experts_per_token > settings.routed_experts:
        parser.error(f"--experts-per-token {settings.experts_per_token} exceeds --routed-experts {settings.routed_experts}")
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)

    domains = load_domains(settings)
    tokenizer = train_tokenizer({d: [t for _, t in s["train"]] for d, s in domains.items()}, settings)
    train_streams = {d: token_stream(tokenizer, s["train"]) for d, s in domains.items()}
    val_streams = {d: token_stream(tokenizer, s["val"])[: settings.val_tokens or None] for d, s in domains.items()}
    model = build_model(settings, tokenizer)
    started = time.time()
    log = train(settings, model, train_streams)
    train_seconds = time.time() - started

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)  # bf16 keeps the checkpoint under 16 MB; the router bias stays fp32
    tokenizer.save_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    report = {"train_seconds": round(train_seconds, 1), "parameters": sum(p.numel() for p in reloaded.parameters())}
    for domain in settings.domains:
        report[domain] = {
            "val_tokens": int(len(val_streams[domain])),
            "val_loss_model": round(validation_loss(reloaded, val_streams[domain], settings.seq_len), 4),
            "val_loss_unigram": round(unigram_loss(train_streams[domain], val_streams[domain], len(tokenizer)), 4),
            "routing": routing_report(reloaded, tokenizer, domains[domain]["train"] + domains[domain]["val"], settings),
        }
    report["train_log"] = log
    (args.out / "training_settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for domain in settings.domains:
        r = report[domain]
        print(
            f"{domain}: val loss {r['val_loss_model']:.3f} vs unigram {r['val_loss_unigram']:.3f}; "
            f"max-expert/fair mean {r['routing']['max_share_over_fair_mean']:.2f} worst {r['routing']['max_share_over_fair_worst']:.2f}"
        )


if __name__ == "__main__":
    main()
