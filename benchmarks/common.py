"""Shared helpers of the benchmarks: alternating timing, robust statistics, PASS/FAIL rows, synthetic routing.

Every benchmark measures both sides of a comparison in the same process and run, alternating A B A B ... over
several rounds (after a warm-up call of each side), and reports the median and the spread (min-max and IQR) of
each side and the ratio of the medians. Machines running these are often shared, so a ratio of medians of
interleaved measurements is what is compared against a target, never one absolute time against another run's.

A benchmark script exposes `run(args) -> list[Row]` and a `main()` that prints its rows; `--json PATH` writes
them for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL = REPO / "models" / "tiny-moe"


# -- statistics --------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    median: float
    low: float  # min
    high: float  # max
    q1: float
    q3: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Stats:
        values = sorted(values)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
        return Stats(statistics.median(values), values[0], values[-1], q1, q3, len(values))

    def show(self, unit: str = "s", scale: float = 1.0, digits: int = 4) -> str:
        f = lambda v: f"{v * scale:.{digits}g}"  # noqa: E731
        return f"median {f(self.median)} {unit} (min {f(self.low)} .. max {f(self.high)}, IQR {f(self.q1)} .. {f(self.q3)}, n={self.n})"


def alternate(sides: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1, inner: int = 1,
              before: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time each side `rounds` times, interleaved A B C A B C ...; a measurement is the mean of `inner` calls.
    `before(name)` (untimed) runs before each measurement, e.g. to attach or detach hooks."""
    for _ in range(warmup):
        for name, fn in sides.items():
            if before:
                before(name)
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            if before:
                before(name)
            started = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - started) / inner)
    return times


def print_sides(times: dict[str, list[float]], unit: str = "ms", scale: float = 1e3, per: str = "") -> dict[str, Stats]:
    stats = {name: Stats.of(values) for name, values in times.items()}
    width = max(len(n) for n in stats)
    for name, s in stats.items():
        print(f"  {name:<{width}}  {s.show(unit + per, scale)}")
    return stats


# -- result rows -------------------------------------------------------------------------------------------------
@dataclass
class Row:
    benchmark: str
    measured: str
    target: str
    status: str  # PASS | FAIL | INFO | SKIP
    command: str
    notes: list[str] = field(default_factory=list)


def verdict(value: float, limit: float, kind: str) -> str:
    """kind '<=' (value must not exceed limit) or '>='."""
    ok = value <= limit if kind == "<=" else value >= limit
    return "PASS" if ok else "FAIL"


def command_line(script: str, extra: list[str] | None = None) -> str:
    return " ".join(["python", f"benchmarks/{script}", *(extra or [])])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes (the default; kept for symmetry with --big)")
    p.add_argument("--big", action="store_true", help="bigger sizes and more rounds (minutes)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per side (default 5, 7 with --big)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable on a shared machine; the stages use torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the result rows here (used by run_all.py)")
    return p


def finish(args, rows: list[Row]) -> None:
    print()
    for row in rows:
        print(f"RESULT {row.status:<4} {row.benchmark}: {row.measured} (target {row.target})")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


def rounds_of(args) -> int:
    return args.rounds or (7 if args.big else 5)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- synthetic routing -------------------------------------------------------------------------------------------
def synthetic_routing(num_tokens: int, num_layers: int = 8, top_k: int = 2, num_experts: int = 16, seed: int = 0,
                      follow: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Realistic-looking routing: experts (N, L, k) int16 distinct and best-first, weights (N, L, k) float32 sorted
    descending and summing to 1. Learnable: with probability `follow` a token's top-1 expert at layer l is a fixed
    per-layer permutation of its top-1 at layer l-1 (else uniform), so a context of earlier layers predicts it."""
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])
    experts = np.empty((num_tokens, num_layers, top_k), dtype=np.int16)
    rows = np.arange(num_tokens)
    top1 = rng.integers(num_experts, size=num_tokens)
    for layer in range(num_layers):
        if layer:
            top1 = np.where(rng.random(num_tokens) < follow, perms[layer][top1], rng.integers(num_experts, size=num_tokens))
        if top_k == 2:  # fast path: a uniform second expert other than the first
            experts[:, layer, 0] = top1
            experts[:, layer, 1] = (top1 + rng.integers(1, num_experts, size=num_tokens)) % num_experts
            continue
        keys = rng.random((num_tokens, num_experts), dtype=np.float32)
        keys[rows, top1] = 2.0  # top-1 first, the other k-1 distinct at random
        experts[:, layer] = np.argsort(-keys, axis=1)[:, :top_k]
    weights = -np.sort(-rng.dirichlet(np.ones(top_k), size=(num_tokens, num_layers)), axis=-1)
    return experts, weights.astype(np.float32)


@dataclass
class SyntheticSequence:
    sequence_id: str
    document_id: str
    domain: str
    token_ids: list[int]


def synthetic_plan(num_tokens: int, seq_len: int = 128, seed: int = 0, chunks_per_document: int = 8,
                   domains: tuple[str, ...] = ("python-docs", "python-stdlib")) -> list[SyntheticSequence]:
    """Sequences as the collect stage plans them: documents of 1..chunks_per_document chunks of seq_len tokens,
    the last chunk of a document shorter (16..seq_len tokens); domains alternate by document. ~num_tokens total."""
    rng = np.random.default_rng(seed + 1)
    planned, total, doc = [], 0, 0
    while total < num_tokens:
        domain = domains[doc % len(domains)]
        chunks = int(rng.integers(1, chunks_per_document + 1))
        for chunk in range(chunks):
            length = seq_len if chunk < chunks - 1 else int(rng.integers(16, seq_len + 1))
            tokens = rng.integers(2, 2048, size=length).tolist()
            planned.append(SyntheticSequence(f"{domain}/{doc}/{chunk}", f"{domain}/doc{doc:05d}.py", domain, tokens))
            total += length
        doc += 1
    return planned


def chunk_table(sequences: list[SyntheticSequence], experts: np.ndarray, weights: np.ndarray, schema, hidden: np.ndarray | None = None) -> "pa.Table":
    """One trace chunk in the moe_prefetch/traces.py schema: the sequences' tokens in order, routing (N, L, k) per token.
    (Built here with traces.nested_array rather than through stages.collect.chunk_table, whose signature changes.)"""
    import pyarrow as pa

    from moe_prefetch import traces

    lengths = [len(s.token_ids) for s in sequences]
    columns = {
        "sequence_id": np.repeat([s.sequence_id for s in sequences], lengths),
        "document_id": np.repeat([s.document_id for s in sequences], lengths),
        "domain": np.repeat([s.domain for s in sequences], lengths),
        "position": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        "token_id": np.concatenate([np.asarray(s.token_ids, dtype=np.int32) for s in sequences]),
        "generated": np.zeros(sum(lengths), dtype=bool),
    }
    data = {name: pa.array(values, type=schema.field(name).type) for name, values in columns.items()}
    data["experts"] = traces.nested_array(experts, pa.int16())
    data["weights"] = traces.nested_array(weights, pa.float32())
    if hidden is not None:
        data["hidden_states"] = traces.nested_array(hidden, pa.float16())
    return pa.table(data, schema=schema)


def synthetic_chunks(num_tokens: int, num_layers: int = 8, top_k: int = 2, num_experts: int = 16, seq_len: int = 128,
                     sequences_per_chunk: int = 256, seed: int = 0, hidden_dim: int = 0):
    """(plan, iterator of trace-chunk tables of `sequences_per_chunk` sequences each) with synthetic routing (and
    random float16 hidden states of width hidden_dim when > 0)."""
    from moe_prefetch import traces

    planned = synthetic_plan(num_tokens, seq_len, seed)
    schema = traces.schema(num_layers, top_k, num_experts, hidden_dim)

    def tables():
        for number, start in enumerate(range(0, len(planned), sequences_per_chunk)):
            sequences = planned[start : start + sequences_per_chunk]
            count = sum(len(s.token_ids) for s in sequences)
            experts, weights = synthetic_routing(count, num_layers, top_k, num_experts, seed=seed + 7 * number + 3)
            hidden = None
            if hidden_dim:
                rng = np.random.default_rng(seed + 7 * number + 5)
                hidden = rng.standard_normal((count, num_layers, hidden_dim), dtype=np.float32).astype(np.float16)
            yield chunk_table(sequences, experts, weights, schema, hidden)

    return planned, tables()


def synthetic_meta(planned: list[SyntheticSequence], chunks: int, num_layers: int, top_k: int, num_experts: int, seed: int,
                   hidden_dim: int = 0) -> dict:
    per_domain: dict[str, int] = {}
    for seq in planned:
        per_domain[seq.domain] = per_domain.get(seq.domain, 0) + 1
    return {
        "model": "synthetic", "family": "deepseek_v3", "moe_layers": list(range(num_layers)),
        "layer_stacks": ["decoder"] * num_layers, "num_experts": num_experts, "top_k": top_k, "shared_experts": 0,
        "capture": {"router_probs": False, "hidden_dim": hidden_dim, "hidden_projection_seed": None, "lookahead": 0},
        "collect": {"params": {"synthetic": True, "seed": seed}, "sequences": len(planned),
                    "sequences_per_domain": per_domain, "domains": list(per_domain), "chunks": chunks},
    }


def write_synthetic_traces(trace_dir: Path, num_tokens: int, num_layers: int = 8, top_k: int = 2, num_experts: int = 16,
                           seq_len: int = 128, sequences_per_chunk: int = 256, seed: int = 0) -> int:
    """A trace directory as stages/collect.py writes it (chunk-NNNNN.parquet in the moe_prefetch/traces.py schema +
    meta.json), with synthetic routing. Returns the number of token rows."""
    import pyarrow.parquet as pq

    trace_dir.mkdir(parents=True, exist_ok=True)
    planned, tables = synthetic_chunks(num_tokens, num_layers, top_k, num_experts, seq_len, sequences_per_chunk, seed)
    rows = chunks = 0
    for number, table in enumerate(tables):
        pq.write_table(table, trace_dir / f"chunk-{number:05d}.parquet")
        rows, chunks = rows + table.num_rows, chunks + 1
    meta = synthetic_meta(planned, chunks, num_layers, top_k, num_experts, seed)
    (trace_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return rows


def write_synthetic_shards(out_dir: Path, num_tokens: int, rows_per_shard: int = 100_000, seed: int = 0, via_shard_stage: bool = True,
                           num_layers: int = 8, top_k: int = 2, num_experts: int = 16, seq_len: int = 128, hidden_dim: int = 0):
    """Synthetic shards + manifest. via_shard_stage: trace chunks on disk merged by stages.shard.write_shards (the
    pipeline's own path); else the chunks are cut into shards in memory and written with the traces helpers and
    shard.py's write options (row groups of min(65536, rows_per_shard)), which is twice as fast."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_prefetch import traces

    geometry = dict(num_layers=num_layers, top_k=top_k, num_experts=num_experts)
    out_dir.mkdir(parents=True, exist_ok=True)
    if via_shard_stage:
        assert not hidden_dim, "hidden states: use via_shard_stage=False"
        from moe_prefetch.sharding import ShardParams
        from moe_prefetch.sharding import write_shards

        trace_dir = out_dir.parent / f"{out_dir.name}.traces"
        write_synthetic_traces(trace_dir, num_tokens, seq_len=seq_len, seed=seed, **geometry)
        manifest = write_shards(trace_dir, out_dir, ShardParams(rows_per_shard=rows_per_shard))
        shutil.rmtree(trace_dir)
        return manifest
    planned, tables = synthetic_chunks(num_tokens, seq_len=seq_len, seed=seed, hidden_dim=hidden_dim, **geometry)
    entries: list[dict] = []

    def flush(table: pa.Table) -> None:
        name = f"shard-{len(entries):05d}.parquet"
        pq.write_table(table, out_dir / name, row_group_size=min(65536, rows_per_shard))
        entries.append({"file": name, "rows": table.num_rows, "sha256": traces.sha256_file(out_dir / name)})

    pending, pending_rows, chunks = [], 0, 0
    for table in tables:
        pending.append(table)
        pending_rows, chunks = pending_rows + table.num_rows, chunks + 1
        while pending_rows >= rows_per_shard:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, rows_per_shard))
            rest = merged.slice(rows_per_shard)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        flush(pa.concat_tables(pending))
    meta = synthetic_meta(planned, chunks, num_layers, top_k, num_experts, seed, hidden_dim)
    manifest = traces.Manifest(
        model=meta["model"], family=meta["family"], moe_layers=meta["moe_layers"], layer_stacks=meta["layer_stacks"],
        num_experts=num_experts, top_k=top_k, shared_experts=0, domains=meta["collect"]["domains"], shards=entries,
        capture=meta["capture"], collect=meta["collect"], rows=sum(e["rows"] for e in entries),
    )
    manifest.write(out_dir / traces.MANIFEST_NAME)
    return manifest


def synthetic_windows(work: Path, num_tokens: int, seed: int = 0, hidden_dim: int = 0, **windows_overrides) -> Path:
    """Windows of synthetic routing built by stages.windows.build_windows (default windows params from params.yaml,
    then `windows_overrides` where the schema has them). Returns the windows directory."""
    import dataclasses

    from moe_prefetch.windows.build import build_windows

    params, _ = default_section("windows")
    known = {f.name for f in dataclasses.fields(params)}
    params = dataclasses.replace(params, **{k: v for k, v in windows_overrides.items() if k in known and v})
    shards = work / "synthetic-shards"
    write_synthetic_shards(shards, num_tokens, seed=seed, via_shard_stage=False, hidden_dim=hidden_dim)
    out = work / "synthetic-windows"
    out.mkdir(parents=True, exist_ok=True)
    build_windows(shards, out, params)
    return out


def default_section(name: str):
    """The validated params section `name` of the repository's params.yaml (the pipeline's defaults); the schema's
    defaults if params.yaml cannot be read or validated (it may be mid-edit)."""
    import yaml

    from moe_prefetch.params import parse_section

    try:
        raw = yaml.safe_load((REPO / "params.yaml").read_text()) or {}
        return parse_section(name, raw.get(name)), "params.yaml"
    except Exception as err:  # noqa: BLE001 - fall back to the schema defaults, say so
        print(f"note: params.yaml {name} section unusable ({err}); using the schema defaults")
        return parse_section(name, {}), "schema defaults"
