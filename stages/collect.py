"""Stage collect: run a Hugging Face MoE model over the text sources and record its routing.

Writes `<out>/chunk-NNNNN.parquet` (one row per non-padding token, schema in stages/traces.py) as collection
proceeds, and `<out>/meta.json` last. Resumable: chunk files are complete or absent (written to a temp name,
then renamed), and a re-run with the same plan (params, model, token ids) skips the chunks already written.
Data-parallel under `accelerate launch`: process r collects chunks r, r+N, ...; the shard stage merges them.

    python -m stages.collect --out data/traces
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from stages import traces
from stages.common import atomic_path, run_stage, write_json
from stages.errors import PipelineError
from stages.models import load_model_and_tokenizer
from stages.params import CollectParams, as_dict, load_section
from stages.routing import adapter_for
from stages.routing.recorder import RoutingRecorder
from stages.sources import SourceSpec, iter_documents, source_fingerprint

META_NAME = "meta.json"
PLAN_NAME = "plan.json"


@dataclass
class PlannedSequence:
    sequence_id: str
    document_id: str
    domain: str
    token_ids: list[int]


def plan_sequences(params: CollectParams, tokenizer) -> list[PlannedSequence]:
    """Chunk each source's documents into up to `chunks_per_document` sequences of <= seq_len tokens, until
    `num_sequences` per source. Deterministic given the params and the tokenizer."""
    planned = []
    for raw in params.sources:
        spec = SourceSpec.parse(raw)
        taken = 0
        for doc_index, (doc_name, text) in enumerate(iter_documents(spec, params.seed)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for chunk_index in range(min(params.chunks_per_document, -(-len(ids) // params.seq_len))):
                chunk = ids[chunk_index * params.seq_len : (chunk_index + 1) * params.seq_len]
                if len(chunk) < params.min_tokens or taken == params.num_sequences:
                    break
                planned.append(PlannedSequence(f"{spec.name}/{doc_index}/{chunk_index}", f"{spec.name}/{doc_name}", spec.name, chunk))
                taken += 1
            if taken == params.num_sequences:
                break
        if taken == 0:
            raise PipelineError(f"collect.sources: source {spec.name!r} yielded no chunk of >= {params.min_tokens} tokens (empty or too short text)")
        if taken < params.num_sequences:
            print(f"note: source {spec.name!r} has only {taken} chunks (< collect.num_sequences={params.num_sequences})")
    if len({s.domain for s in planned}) != len(params.sources):
        raise PipelineError("collect.sources: two sources share a name; each source is a domain and needs its own name")
    return planned


def plan_digest(params: CollectParams, planned: list[PlannedSequence]) -> str:
    """Identifies what a run will produce: params (minus batching-only knobs that don't change results) + tokens."""
    digest = hashlib.sha256(json.dumps(as_dict(params), sort_keys=True).encode())
    for seq in planned:
        digest.update(f"{seq.sequence_id}\t{seq.document_id}\t{','.join(map(str, seq.token_ids))}\n".encode())
    return digest.hexdigest()


def prepare_output(out: Path, digest: str, is_main: bool) -> None:
    """Keep finished chunks of an interrupted run with the same plan; otherwise start from an empty directory."""
    plan_file = out / PLAN_NAME
    if is_main:
        same = plan_file.exists() and json.loads(plan_file.read_text()).get("digest") == digest
        if not same and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / META_NAME).unlink(missing_ok=True)  # meta marks a finished run; it is rewritten at the end
        for stale in out.glob(".chunk-*"):
            shutil.rmtree(stale, ignore_errors=True)
        write_json(plan_file, {"digest": digest})


def chunk_table(sequences: list[PlannedSequence], arrays: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Rows for the non-padding tokens of a chunk's sequences; arrays are (num_seqs, seq_len, ...)."""
    lengths = np.array([len(s.token_ids) for s in sequences])
    keep = np.arange(arrays["experts"].shape[1])[None, :] < lengths[:, None]  # (B, S) non-padding
    columns = {
        "sequence_id": np.repeat([s.sequence_id for s in sequences], lengths),
        "document_id": np.repeat([s.document_id for s in sequences], lengths),
        "domain": np.repeat([s.domain for s in sequences], lengths),
        "position": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        "token_id": np.concatenate([np.asarray(s.token_ids, dtype=np.int32) for s in sequences]),
        "generated": np.zeros(int(lengths.sum()), dtype=bool),
    }
    data = {name: pa.array(values, type=schema.field(name).type) for name, values in columns.items()}
    for name in ("experts", "weights", "router_probs", "hidden_states", "lookahead_experts"):
        if name in arrays:
            field_type = schema.field(name).type
            while pa.types.is_fixed_size_list(field_type):
                field_type = field_type.value_type
            data[name] = traces.nested_array(arrays[name][keep], field_type)
    return pa.table(data, schema=schema)


def model_info(params: CollectParams, adapter, stored_hidden_dim: int) -> dict:
    return {
        "model": params.model,
        "family": adapter.family,
        "moe_layers": [layer.layer_index for layer in adapter.layers],
        "layer_stacks": [layer.stack for layer in adapter.layers],
        "num_experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "shared_experts": adapter.shared_experts,
        "capture": {
            "router_probs": params.capture.router_probs,
            "hidden_dim": stored_hidden_dim,
            "hidden_projection_seed": params.seed if params.capture.hidden_dim else None,
            "lookahead": params.capture.lookahead,
        },
    }


def collect(params: CollectParams, out: Path) -> None:
    """Run the model over the planned sequences and write trace chunks plus meta.json into `out`."""
    from accelerate import PartialState

    state = PartialState()
    torch.manual_seed(params.seed)
    model, tokenizer = load_model_and_tokenizer(params.model, params.dtype, params.device)
    adapter = adapter_for(model)
    planned = plan_sequences(params, tokenizer)
    digest = plan_digest(params, planned)
    prepare_output(out, digest, state.is_main_process)
    state.wait_for_everyone()

    stored_hidden = (params.capture.hidden_dim or int(model.config.hidden_size)) if params.capture.hidden_states else 0
    table_schema = traces.schema(
        len(adapter.layers), adapter.top_k, adapter.num_experts, stored_hidden, params.capture.lookahead, params.capture.router_probs,
    )
    recorder = RoutingRecorder(adapter, params.capture, projection_seed=params.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    chunk_starts = list(range(0, len(planned), params.sequences_per_chunk))
    mine = chunk_starts[state.process_index :: state.num_processes]
    progress = tqdm(total=sum(len(planned[s : s + params.sequences_per_chunk]) for s in mine), unit="seq",
                    desc=f"collect[{state.process_index}]", disable=None)
    tokens_done = 0
    for start in mine:
        path = out / f"chunk-{start // params.sequences_per_chunk:05d}.parquet"
        sequences = planned[start : start + params.sequences_per_chunk]
        if path.exists():
            progress.update(len(sequences))
            continue
        parts: dict[str, list[np.ndarray]] = {}
        for b in range(0, len(sequences), params.batch_size):
            batch = sequences[b : b + params.batch_size]
            width = max(len(s.token_ids) for s in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                input_ids[row, : len(seq.token_ids)] = torch.tensor(seq.token_ids)
                mask[row, : len(seq.token_ids)] = 1
            with torch.no_grad():
                model(**adapter.forward_inputs(input_ids.to(device), mask.to(device)))
            arrays = recorder.take(len(batch), width)
            padded = {name: np.pad(a, [(0, 0), (0, params.seq_len - width)] + [(0, 0)] * (a.ndim - 2)) for name, a in arrays.items()}
            for name, array in padded.items():
                parts.setdefault(name, []).append(array)
            tokens_done += int(mask.sum())
            progress.update(len(batch))
            progress.set_postfix(tok_s=f"{tokens_done / max(progress.format_dict['elapsed'], 1e-9):.0f}")
        table = chunk_table(sequences, {n: np.concatenate(a) for n, a in parts.items()}, table_schema)
        with atomic_path(path) as temp:
            pq.write_table(table, temp)
    progress.close()
    recorder.remove()
    state.wait_for_everyone()
    if state.is_main_process:
        per_domain = {}
        for seq in planned:
            per_domain[seq.domain] = per_domain.get(seq.domain, 0) + 1
        info = model_info(params, adapter, stored_hidden)
        info["collect"] = {
            "params": as_dict(params),
            "sequences": len(planned),
            "sequences_per_domain": per_domain,
            "domains": list(per_domain),
            "chunks": len(chunk_starts),
            "builtin_text_python_version": source_fingerprint(),
            "plan_digest": digest,
        }
        write_json(out / META_NAME, info)


def main() -> None:
    parser = argparse.ArgumentParser(description="Record MoE routing of a model over text sources.")
    parser.add_argument("--out", type=Path, required=True, help="trace directory (chunks + meta.json)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_section("collect", args.params)
    collect(params, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage(main)
