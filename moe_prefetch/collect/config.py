"""The `collect` section of params.yaml: what model runs over which text, and what is recorded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_prefetch.config import doc, non_negative, positive
from moe_prefetch.errors import PipelineError


@dataclass
class CaptureParams:
    router_probs: bool = doc("Store the full router distribution per MoE layer (float16).", False)
    hidden_states: bool = doc("Store the hidden state entering each MoE layer (float16).", False)
    hidden_dim: int = doc("Project stored hidden states to this many dims with a fixed random matrix; 0 = keep all.", 0)
    lookahead: int = doc("Stale-gate look-ahead: for h = 1..H, the top-k that MoE layer l+h's router gives on layer l's input.", 0)


@dataclass
class CollectParams:
    model: str = doc("Local checkpoint directory or Hugging Face hub id (loaded with Auto*.from_pretrained).", "models/tiny-moe")
    sources: list = doc("Text sources, one domain each: python-docs, python-stdlib, {name, path} (a file or directory under inputs/, "
        "which the collect stage lists as a DVC dependency) or {name, hf_dataset}.", factory=lambda: ["python-docs", "python-stdlib"])
    num_sequences: int = doc("Sequences collected per source (domain).", 500)
    seq_len: int = doc("Tokens per sequence, the BOS included (a chunk of one document; shorter last chunks are padded, not recorded).", 128)
    add_bos: bool = doc("Start every sequence with the tokenizer's BOS token, if it has one, as a document starts in pretraining: "
        "the BOS, not the chunk's first text token, is then the attention sink whose routing is atypical; it is recorded "
        "(position 0) and meta.json's collect.bos_token_id names it (null: none added).", True)
    chunks_per_document: int = doc("At most this many consecutive chunks are taken from one document.", 8)
    min_tokens: int = doc("Sequences with fewer tokens than this, the BOS included, are skipped.", 16)
    batch_size: int = doc("Sequences per forward pass.", 16)
    sequences_per_chunk: int = doc("Sequences per trace chunk file (the unit of resume after a crash).", 256)
    max_chunk_bytes: int = doc("Upper bound on the bytes of one chunk's recorded rows, held in host memory until the chunk is written "
        "(moe_prefetch/collect/footprint.py): a chunk holds fewer than sequences_per_chunk sequences (a multiple of batch_size) "
        "when their rows would exceed it, e.g. with full-width hidden states of a large model. Writing a chunk briefly needs "
        "about twice this again (the Arrow table).", 1 << 30)
    dtype: Literal["float32", "bfloat16", "float16"] = doc("Model dtype.", "float32")
    device: str = doc("cpu, cuda, cuda:N, or auto (device_map='auto' spreads a large model over all GPUs).", "cpu")
    seed: int = doc("Seed for document order and chunk sampling.", 0)
    capture: CaptureParams = doc("Optional captures beyond expert ids and gate weights.", factory=CaptureParams)
    mode: Literal["forward", "generate"] = doc(
        "forward: one pass per sequence; generate: the sequence is a prompt (prefill), then greedy decoding with a KV cache; "
        "the routing of prompt and generated tokens is recorded (generated=True for the latter).", "forward"
    )
    max_new_tokens: int = doc("generate mode: decode steps per sequence, one generated token each (fewer if EOS comes first).", 32)
    # YAML key `import` is a Python keyword: the field is import_glob, the key is mapped by doc(key=...).
    import_glob: str | None = doc(
        "Glob, under inputs/ (a DVC dependency of collect), of routing records (.jsonl, .csv, .parquet; "
        "moe_prefetch/collect/importer.py) imported instead of running a model; null = run the model.", None, key="import")
    num_experts: int = doc("With import: routed experts per MoE layer; 0 = infer as the largest expert id + 1.", 0)

    def validate(self) -> None:
        positive("collect", self, "num_sequences", "seq_len", "chunks_per_document", "min_tokens", "batch_size", "sequences_per_chunk",
                  "max_new_tokens", "max_chunk_bytes")
        if self.num_experts < 0:
            raise PipelineError(f"collect.num_experts: must be >= 0 (0 = infer), got {self.num_experts}")
        if self.import_glob is not None and not self.import_glob.strip():
            raise PipelineError("collect.import: empty glob; give a path pattern or null")
        if not self.sources:
            raise PipelineError("collect.sources: must list at least one source")
        if self.sequences_per_chunk % self.batch_size:
            raise PipelineError(
                f"collect.sequences_per_chunk: must be a multiple of collect.batch_size ({self.batch_size}), got {self.sequences_per_chunk}"
            )
        if self.min_tokens > self.seq_len:
            raise PipelineError(f"collect.min_tokens: must be <= collect.seq_len ({self.seq_len}), got {self.min_tokens}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise PipelineError(f"collect.device: {self.device!r} is not one of cpu, cuda, cuda:N, auto")
        non_negative("collect.capture", self.capture, "hidden_dim", "lookahead")
