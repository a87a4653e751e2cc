"""Stage collect: run a Hugging Face MoE model over the text sources and record its routing.

Writes `<out>/chunk-NNNNN.parquet` (one row per non-padding token, schema in moe_prefetch/traces.py) as collection
proceeds, and `<out>/meta.json` last. Resumable: chunk files are complete or absent (written to a temp name,
then renamed), and a re-run with the same plan (params, model, token ids, row code, torch and transformers versions;
plan_digest) skips the chunks already written.
Data-parallel: under `accelerate launch --multi_gpu --num_processes N` (also on a CPU-only machine: gloo) or
`torchrun --nproc_per_node N`, process r collects chunks r, r+N, ...; the shard stage merges them. (`accelerate
launch --cpu --num_processes N` starts a single process unless an MPI hostfile is given.)

collect.mode generate records decode-time routing (moe_prefetch/collect/generation.py); collect.import reads routing recorded
elsewhere instead of running a model (moe_prefetch/collect/importer.py). Memory: the plan (token ids) plus one chunk of
rows (at most collect.max_chunk_bytes; moe_prefetch/collect/footprint.py). Each data-parallel rank gets its own GPUs
(moe_prefetch/collect/devices.py).

    python -m stages.collect --out data/traces
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from moe_prefetch import traces
from moe_prefetch.collect.chunks import (
    ChunkSequence,
    chunk_table,
    run_summary,
    write_chunk,
)
from moe_prefetch.collect.config import CollectParams
from moe_prefetch.collect.sources import (
    INPUTS,
    SourceSpec,
    check_input_path,
    iter_documents,
    source_fingerprint,
)
from moe_prefetch.config import as_dict
from moe_prefetch.errors import PipelineError
from moe_prefetch.files import write_json
from moe_prefetch.progress import Progress

PLAN_NAME = "plan.json"


@dataclass
class PlannedSequence(ChunkSequence):
    token_ids: list[int]


def bos_token_id(params: CollectParams, tokenizer) -> int | None:
    """The token every sequence starts with: the tokenizer's BOS if collect.add_bos and it has one, else None."""
    bos = tokenizer.bos_token_id if params.add_bos else None
    if bos is not None and params.seq_len < 2:
        raise PipelineError(f"collect.seq_len: must be >= 2 with collect.add_bos (the BOS takes one of its tokens), got {params.seq_len}")
    return bos


def plan_sequences(params: CollectParams, tokenizer) -> list[PlannedSequence]:
    """Chunk each source's documents into up to `chunks_per_document` sequences of <= seq_len tokens (the BOS of
    bos_token_id() first, then the chunk's text), until `num_sequences` per source. Deterministic given the params
    and the tokenizer."""
    bos = bos_token_id(params, tokenizer)
    prefix = [] if bos is None else [bos]
    text_len = params.seq_len - len(prefix)
    planned = []
    for raw in params.sources:
        spec = SourceSpec.parse(raw)
        taken = 0
        for doc_index, (doc_name, text) in enumerate(iter_documents(spec, params.seed)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for chunk_index in range(min(params.chunks_per_document, -(-len(ids) // text_len))):
                sequence = prefix + ids[chunk_index * text_len : (chunk_index + 1) * text_len]
                if len(sequence) < params.min_tokens or taken == params.num_sequences:
                    break
                planned.append(PlannedSequence(f"{spec.name}/{doc_index}/{chunk_index}", f"{spec.name}/{doc_name}", spec.name, sequence))
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


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # moe_prefetch/
ROW_CODE = ("collect", "routing", "traces.py")  # under PACKAGE_DIR: the code that plans, records and encodes a trace row


def software_versions() -> dict[str, str]:
    """The libraries whose version can change a recorded row: torch (kernels) and transformers (modeling code)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def code_fingerprint(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the relative path and bytes of every .py file of ROW_CODE below `package_dir`."""
    digest = hashlib.sha256()
    for entry in ROW_CODE:
        root = package_dir / entry
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(f"{path.relative_to(package_dir)}\t{path.stat().st_size}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def device_kind(device: str) -> str:
    """cpu or cuda: the arithmetic collect.device selects (which GPU, or a device_map over several, is the same arithmetic)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def plan_digest(params: CollectParams, planned: list[PlannedSequence], model_fingerprint: str, code: str | None = None,
                versions: dict[str, str] | None = None) -> str:
    """Identifies what a run will produce: the params, the model's weights, every planned token id, the code that
    shapes a row (`code`, default code_fingerprint()) and the torch/transformers versions (default software_versions()).

    collect.device counts only as its kind (cpu or cuda): moving to another GPU or to device_map=auto keeps the
    finished chunks. collect.batch_size counts: it changes the padded width of a forward, and with it the float
    rounding of the gate weights (tiny-moe, batch 1 vs 4 or 16: the same experts, but 2487 of 3969 tokens have a
    gate weight differing by up to 1.2e-7), so chunks of another batch size would not equal a fresh run's bytes.
    """
    fields = {**as_dict(params), "device": device_kind(params.device)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    digest.update(model_fingerprint.encode())
    digest.update((code if code is not None else code_fingerprint()).encode())
    digest.update(json.dumps(versions if versions is not None else software_versions(), sort_keys=True).encode())
    for seq in planned:
        digest.update(f"{seq.sequence_id}\t{seq.document_id}\t{','.join(map(str, seq.token_ids))}\n".encode())
    return digest.hexdigest()


def prepare_output(out: Path, digest: str, is_main: bool) -> None:
    """Keep finished chunks of an interrupted run with the same plan; otherwise start from an empty directory. A run
    that finished (its meta.json written) is never resumed: DVC runs collect again only when it must (`dvc repro -f
    collect`, or a dependency the plan digest does not cover changed), and then every chunk is collected anew."""
    plan_file = out / PLAN_NAME
    if is_main:
        interrupted = not (out / traces.META_NAME).exists()
        same = interrupted and plan_file.exists() and json.loads(plan_file.read_text()).get("digest") == digest
        if not same and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / traces.META_NAME).unlink(missing_ok=True)  # meta marks a finished run; it is rewritten at the end
        for stale in out.glob(".chunk-*"):
            shutil.rmtree(stale, ignore_errors=True)
        write_json(plan_file, {"digest": digest})


def captured(params: CollectParams, stored_hidden_dim: int) -> traces.Capture:
    """What this run records beyond experts and weights (stored_hidden_dim: the hidden-state width written, 0 = none)."""
    return traces.Capture(
        router_probs=params.capture.router_probs,
        hidden_dim=stored_hidden_dim,
        hidden_projection_seed=params.seed if params.capture.hidden_dim else None,
        lookahead=params.capture.lookahead,
    )


def trace_meta(params: CollectParams, adapter, capture: traces.Capture, collect_summary: dict) -> traces.TraceMeta:
    """The meta.json of a finished run: the adapter's routing geometry, the capture, `collect_summary` as `collect`."""
    return traces.TraceMeta(
        model=params.model,
        family=adapter.family,
        moe_layers=[layer.layer_index for layer in adapter.layers],
        layer_stacks=[layer.stack for layer in adapter.layers],
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        shared_experts=adapter.shared_experts,
        capture=capture,
        collect=collect_summary,
    )


def distributed_state(device: str):
    """accelerate's PartialState; cpu=True unless the model runs on CUDA (else a CPU-only launch is not distributed)."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=timedelta(hours=12))  # ranks wait for the slowest at the end: allow long runs


def collect(params: CollectParams, out: Path, inputs: Path = INPUTS) -> None:
    """Run the model over the planned sequences and write trace chunks plus meta.json into `out`. Every file it
    reads (collect.import, a {name, path} source) must lie below `inputs`, the directory dvc.yaml tracks."""
    if params.import_glob is not None:
        from moe_prefetch.collect.importer import import_traces

        check_input_path("collect.import", params.import_glob, inputs)
        if int(os.environ.get("RANK", "0")) == 0:  # one writer if launched with several processes
            import_traces(params, out)
        return
    for raw in params.sources:  # a bad source spec fails before the model is loaded
        spec = SourceSpec.parse(raw)
        if spec.path is not None:
            check_input_path(f"collect.sources: {spec.name}", spec.path, inputs)
    # torch and the model code load here, not at module import: shard and collect.import use this module's helpers
    import torch

    from moe_prefetch.collect.devices import input_device, rank_placement
    from moe_prefetch.collect.footprint import chunk_sequences, token_bytes
    from moe_prefetch.collect.generation import (
        check_generate,
        eos_token_ids,
        forward_rows,
        generate_rows,
    )
    from moe_prefetch.collect.models import (
        load_config,
        load_model,
        load_tokenizer,
        model_fingerprint,
    )
    from moe_prefetch.routing import FAMILIES, adapter_for
    from moe_prefetch.routing.recorder import RoutingRecorder

    state = distributed_state(params.device)
    torch.manual_seed(params.seed)
    model_type = getattr(load_config(params.model), "model_type", None)
    if model_type not in FAMILIES:  # checked before the weights load
        raise PipelineError(f"collect.model: {params.model!r} is a {model_type!r} model, not one of the supported MoE families "
                            f"({', '.join(sorted(FAMILIES))}); a dense model has no routing to record")
    tokenizer = load_tokenizer(params.model)
    planned = plan_sequences(params, tokenizer)  # before the weights load: a bad source fails fast
    digest = plan_digest(params, planned, model_fingerprint(params.model))
    placement = rank_placement(params.device)  # each data-parallel rank its own GPUs
    model = load_model(params.model, params.dtype, placement.device, placement.gpus)
    adapter = adapter_for(model)
    if params.mode == "generate":
        check_generate(adapter)
    stored_hidden = (params.capture.hidden_dim or int(adapter.config.hidden_size)) if params.capture.hidden_states else 0
    capture = captured(params, stored_hidden)
    geometry = traces.TraceGeometry(len(adapter.layers), adapter.top_k, adapter.num_experts, capture)
    table_schema = traces.schema(geometry)
    per_chunk = chunk_sequences(params, token_bytes(geometry))  # bounded by collect.max_chunk_bytes
    prepare_output(out, digest, state.is_main_process)  # only now: a failure above leaves `out` as it was
    state.wait_for_everyone()

    recorder = RoutingRecorder(adapter, params.capture, projection_seed=params.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model_device = input_device(model)
    eos_ids = eos_token_ids(model)
    chunk_starts = list(range(0, len(planned), per_chunk))
    mine = chunk_starts[state.process_index :: state.num_processes]
    progress = Progress(sum(len(planned[s : s + per_chunk]) for s in mine), f"collect[{state.process_index}]",
                        unit="seq")
    tokens_done, resumed, started = 0, [], time.perf_counter()
    for start in mine:
        path = out / f"chunk-{start // per_chunk:05d}.parquet"
        sequences = planned[start : start + per_chunk]
        if path.exists():
            resumed.append(path.name)
            progress.update(len(sequences))
            continue
        rows: list[dict] = []  # this chunk only: memory does not grow with num_sequences
        for b in range(0, len(sequences), params.batch_size):
            token_lists = [s.token_ids for s in sequences[b : b + params.batch_size]]
            if params.mode == "generate":
                batch_rows = generate_rows(model, adapter, recorder, token_lists, pad_id, model_device, params.max_new_tokens, eos_ids)
            else:
                batch_rows = forward_rows(model, adapter, recorder, token_lists, pad_id, model_device)
            rows.extend(batch_rows)
            tokens_done += sum(len(r["position"]) for r in batch_rows)
            progress.update(len(token_lists), tok_s=f"{tokens_done / (time.perf_counter() - started):.0f}")
        write_chunk(path, chunk_table(sequences, rows, table_schema))
    progress.close()
    recorder.remove()
    print(f"collect[{state.process_index}/{state.num_processes}]: {len(mine) - len(resumed)} chunks written "
          f"({tokens_done} tokens, {tokens_done / (time.perf_counter() - started):.0f} tok/s), "
          f"{len(resumed)} kept from an interrupted run", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        trace_meta(params, adapter, capture, {
            **run_summary(params, planned, len(chunk_starts)),
            "builtin_text_python_version": source_fingerprint(),
            "software_versions": software_versions(),
            "bos_token_id": bos_token_id(params, tokenizer),
            "sequences_per_chunk": per_chunk,
            "plan_digest": digest,
        }).write(out)
