"""Storage: bytes per token-layer of the Parquet shards (moe_prefetch/traces.py schema, written by stages/shard.py) vs
(a) a pickle of the same records as Python dicts of lists, one per token (the prior research's format):
    {'sequence_id', 'position', 'token_id', 'experts': [[e]*k]*L, 'weights': [[w]*k]*L}   target: <= 1/20 of it
(b) raw packed numpy: int16 experts + float32 weights + int32 position + int32 token id + the bytes of the id
    strings (sequence_id, document_id, domain once per sequence; rows are ordered by sequence)   target: <= 1.2x
and read throughput (token-layers/s) into numpy: moe_prefetch.traces.read_routing vs pickle.loads + np.array vs np.load.

Data: the real routing of the tiny model in data/shards (written by `dvc repro`; read only) when it is there and
verifies, and synthetic routing (moe_prefetch/synthetic.py: distinct experts best-first, Dirichlet weights sorted,
summing to 1) written through collect's chunk_table and the shard stage's writer. Also prints what-if sizes of other
Parquet encodings.

    python benchmarks/bench_storage.py [--tokens 128000] [--shards data/shards] [--no-real]
"""

from __future__ import annotations

import cProfile
import io
import pickle
import pstats
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import (
    REPO,
    Row,
    alternate,
    command_line,
    finish,
    parser,
    print_sides,
    rounds_of,
)

from moe_prefetch.synthetic import write_synthetic_shards

TARGET_PICKLE = 1 / 20
TARGET_RAW = 1.2


def load_all(shard_dir: Path):
    """Manifest + the full table of every shard (all columns), verifying checksums."""
    from moe_prefetch import traces

    manifest = traces.Manifest.read(shard_dir)
    tables = [pq.read_table(traces.verify_shard(shard_dir, entry)) for entry in manifest.shards]
    return manifest, pa.concat_tables(tables)


def records_of(table: pa.Table, L: int, k: int) -> list[dict]:
    from moe_prefetch.traces import column_to_numpy

    experts = column_to_numpy(table["experts"], (L, k)).tolist()
    weights = column_to_numpy(table["weights"], (L, k)).tolist()
    return [
        {"sequence_id": s, "position": p, "token_id": t, "experts": e, "weights": w}
        for s, p, t, e, w in zip(table["sequence_id"].to_pylist(), table["position"].to_pylist(),
                                 table["token_id"].to_pylist(), experts, weights)
    ]


def raw_bytes(table: pa.Table, L: int, k: int, ids_per_row: bool = False) -> bytes:
    """np.save of the packed arrays + the id strings (once per sequence, or per row)."""
    from moe_prefetch.traces import column_to_numpy

    buffer = io.BytesIO()
    np.save(buffer, column_to_numpy(table["experts"], (L, k)).astype(np.int16))
    np.save(buffer, column_to_numpy(table["weights"], (L, k)).astype(np.float32))
    np.save(buffer, table["position"].to_numpy().astype(np.int32))
    np.save(buffer, table["token_id"].to_numpy().astype(np.int32))
    ids = table.select(["sequence_id", "document_id", "domain"])
    if not ids_per_row:
        first = np.flatnonzero(np.r_[True, table["position"].to_numpy()[1:] == 0])  # one row per sequence
        ids = ids.take(pa.array(first))
    for name in ids.column_names:
        buffer.write("\n".join(ids[name].to_pylist()).encode())
    return buffer.getvalue()


def parquet_column_bytes(paths: list[Path]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    return sizes


def what_if(table: pa.Table, L: int, k: int, rows_per_group: int) -> dict[str, int]:
    """Sizes of the same rows under other encodings (not the stage's format; for the report)."""
    from moe_prefetch import traces
    from moe_prefetch.traces import column_to_numpy

    out = {}

    def size(t: pa.Table, **options) -> int:
        buffer = io.BytesIO()
        pq.write_table(t, buffer, row_group_size=rows_per_group, **options)
        return buffer.tell()

    out["zstd"] = size(table, compression="zstd")
    out["zstd + byte_stream_split weights"] = size(table, compression="zstd", use_dictionary=["sequence_id", "document_id", "domain"],
                                                   column_encoding={"weights": "BYTE_STREAM_SPLIT"})
    experts = column_to_numpy(table["experts"], (L, k))
    weights = column_to_numpy(table["weights"], (L, k))
    slim = table.set_column(table.schema.get_field_index("weights"), "weights",
                            traces.nested_array(weights.astype(np.float16), pa.float16()))
    out["zstd + float16 weights"] = size(slim, compression="zstd")
    if k == 2:
        first = traces.nested_array(weights[:, :, :1].astype(np.float16), pa.float16())  # w2 = 1 - w1
        slim2 = slim.set_column(slim.schema.get_field_index("weights"), "weights", first)
        slim2 = slim2.set_column(slim2.schema.get_field_index("experts"), "experts", traces.nested_array(experts.astype(np.int8), pa.int8()))
        out["zstd + int8 experts + float16 w1 only"] = size(slim2, compression="zstd")
    return out


def measure(label: str, shard_dir: Path, args, rows: list[Row], throughput: bool) -> None:
    from moe_prefetch import traces

    manifest, table = load_all(shard_dir)
    L, k, N = manifest.num_layers, manifest.top_k, table.num_rows
    token_layers = N * L
    paths = [shard_dir / e["file"] for e in manifest.shards]
    parquet = sum(p.stat().st_size for p in paths)
    records = records_of(table, L, k)
    pickled = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
    raw = raw_bytes(table, L, k)
    raw_per_row = raw_bytes(table, L, k, ids_per_row=True)
    per = lambda b: b / token_layers  # noqa: E731
    print(f"\n[{label}] {N} tokens x {L} MoE layers, k={k}, E={manifest.num_experts}, {len(paths)} shard(s) in {shard_dir}")
    print(f"  parquet (shard.py)      {parquet:>12,d} B  {per(parquet):7.2f} B/token-layer")
    print(f"  pickle of dicts         {len(pickled):>12,d} B  {per(len(pickled)):7.2f} B/token-layer   parquet/pickle = {parquet / len(pickled):.4f}")
    print(f"  raw numpy (ids/seq)     {len(raw):>12,d} B  {per(len(raw)):7.2f} B/token-layer   parquet/raw = {parquet / len(raw):.3f}")
    print(f"  raw numpy (ids/row)     {len(raw_per_row):>12,d} B  {per(len(raw_per_row)):7.2f} B/token-layer   parquet/raw = {parquet / len(raw_per_row):.3f}")
    columns = parquet_column_bytes(paths)
    print("  parquet bytes by column: " + ", ".join(f"{n} {v / token_layers:.2f}" for n, v in sorted(columns.items(), key=lambda x: -x[1]))
          + " B/token-layer")
    rows_per_group = min(65536, 100_000)
    for name, size in what_if(table, L, k, rows_per_group).items():
        print(f"  what-if {name:<40} {per(size):6.2f} B/token-layer  (vs pickle {size / len(pickled):.4f})")
    r_pickle, r_raw = parquet / len(pickled), parquet / len(raw)
    cmd = command_line("bench_storage.py")
    rows.append(Row(f"storage parquet / pickle-of-dicts ({label})", f"{r_pickle:.4f} (1/{1 / r_pickle:.1f}); {per(parquet):.2f} vs "
                    f"{per(len(pickled)):.1f} B/token-layer", f"<= 1/20 = {TARGET_PICKLE:.3f}",
                    "PASS" if r_pickle <= TARGET_PICKLE else "FAIL", cmd))
    rows.append(Row(f"storage parquet / raw numpy ({label})", f"{r_raw:.3f}x; {per(len(raw)):.2f} B/token-layer raw",
                    f"<= {TARGET_RAW}x", "PASS" if r_raw <= TARGET_RAW else "FAIL", cmd))
    if not throughput:
        return
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        (work / "records.pkl").write_bytes(pickled)
        (work / "raw.npy").write_bytes(raw)
        del records, pickled

        def read_parquet():
            return traces.read_routing(shard_dir, manifest)

        def read_pickle():
            loaded = pickle.loads((work / "records.pkl").read_bytes())
            return np.array([r["experts"] for r in loaded], dtype=np.int16), np.array([r["weights"] for r in loaded], dtype=np.float32)

        def read_raw():
            with open(work / "raw.npy", "rb") as handle:
                return [np.load(handle) for _ in range(4)]

        rounds = rounds_of(args) if args.big else min(3, rounds_of(args))  # the pickle side takes seconds per call
        print(f"  read into numpy, {rounds} alternating rounds (files in page cache):")
        times = alternate({"read_routing (parquet)": read_parquet, "pickle.loads + np.array": read_pickle, "np.load (raw)": read_raw},
                          rounds=rounds)
        stats = print_sides(times)
        rates = {name: token_layers / s.median for name, s in stats.items()}
        for name, rate in rates.items():
            print(f"    {name}: {rate / 1e6:.1f} M token-layers/s")
        profiler = cProfile.Profile()
        profiler.enable()
        read_parquet()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(6)
        print("  cProfile of one read_routing, by own time:")
        print("\n".join("  " + line for line in text.getvalue().splitlines()[4:] if line.strip()))
        parquet_rate = rates["read_routing (parquet)"]
        rows.append(Row(f"read throughput read_routing ({label})", f"{parquet_rate / 1e6:.1f} M token-layers/s "
                        f"({parquet_rate / rates['pickle.loads + np.array']:.1f}x pickle, "
                        f"{parquet_rate / rates['np.load (raw)']:.2f}x raw np.load)", "report", "INFO", cmd))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args) -> list[Row]:
    rows: list[Row] = []
    real_dir = args.shards
    real_ok = False
    if not args.no_real and (real_dir / "manifest.json").exists():
        try:
            from moe_prefetch import traces

            manifest = traces.Manifest.read(real_dir)
            for entry in manifest.shards:
                traces.verify_shard(real_dir, entry)
            real_ok = True
        except Exception as err:  # noqa: BLE001
            print(f"note: {real_dir} unusable ({err}); synthetic routing only")
    if real_ok:
        measure("real tiny-moe routing", real_dir, args, rows, throughput=True)
    work = Path(tempfile.mkdtemp(prefix="bench-storage-synth-"))
    try:
        tokens = args.tokens * (10 if args.big else 1)
        write_synthetic_shards(work / "shards", tokens)
        measure("synthetic routing", work / "shards", args, rows, throughput=not real_ok)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=128_000, help="synthetic tokens (x10 with --big)")
    p.add_argument("--shards", type=Path, default=REPO / "data" / "shards", help="real shards (read only)")
    p.add_argument("--no-real", action="store_true", help="synthetic routing only")
    args = p.parse_args()
    finish(args, run(args))


if __name__ == "__main__":
    main()
