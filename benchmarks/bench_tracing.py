"""Tracing overhead: what stages/collect.py does per batch (forward with the RoutingRecorder hooks, then
recorder.take -> adapter.decode -> numpy arrays, padded to seq_len) vs a plain forward of the same model, batch and
dtype. Target: traced / plain <= 1.10. Also reported: with hidden_states + lookahead 3 captures, and the Arrow
table building (collect.chunk_table) per batch. On a miss, cProfile + torch profiler show where the time goes.

    python benchmarks/bench_tracing.py [--batch 16 --seq-len 128 --rounds 5 --threads 1]
"""

from __future__ import annotations

import cProfile
import inspect
import io
import pstats
import time

import numpy as np
from common import (
    TINY_MODEL,
    Row,
    Stats,
    alternate,
    command_line,
    default_section,
    finish,
    parser,
    print_sides,
    rounds_of,
    set_threads,
)

TARGET = 1.10


def text_batch(tokenizer, batch: int, seq_len: int) -> tuple[list, "torch.Tensor", "torch.Tensor"]:
    """The first `batch` full seq_len-token chunks of the built-in python-docs text (as the collect stage cuts them)."""
    import torch

    from moe_prefetch.collect.collector import PlannedSequence
    from moe_prefetch.collect.sources import SourceSpec, iter_documents

    sequences = []
    for doc_index, (name, text) in enumerate(iter_documents(SourceSpec.parse("python-docs"), 0)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for chunk in range(len(ids) // seq_len):
            sequences.append(PlannedSequence(f"python-docs/{doc_index}/{chunk}", f"python-docs/{name}", "python-docs",
                                              ids[chunk * seq_len : (chunk + 1) * seq_len]))
            if len(sequences) == batch:
                input_ids = torch.tensor([s.token_ids for s in sequences])
                return sequences, input_ids, torch.ones_like(input_ids)
    raise SystemExit("not enough built-in text for the batch")


def run(args) -> list[Row]:
    import torch

    from moe_prefetch import traces
    from moe_prefetch.collect.chunks import chunk_table
    from moe_prefetch.collect.config import CaptureParams
    from moe_prefetch.collect.models import load_model, load_tokenizer
    from moe_prefetch.routing import adapter_for
    from moe_prefetch.routing.recorder import RoutingRecorder

    set_threads(args.threads)
    model, tokenizer = load_model(str(TINY_MODEL), "float32", "cpu"), load_tokenizer(str(TINY_MODEL))
    adapter = adapter_for(model)
    sequences, input_ids, mask = text_batch(tokenizer, args.batch, args.seq_len)
    inputs = adapter.forward_inputs(input_ids, mask)
    B, S = input_ids.shape
    collect_params, source = default_section("collect")
    print(f"tracing: tiny-moe float32 CPU, batch {B} x {S} tokens, torch threads {torch.get_num_threads()}, "
          f"{rounds_of(args)} alternating rounds (collect.batch_size in {source}: {collect_params.batch_size})")

    captures = {
        "plain": None,
        "ids+weights": CaptureParams(),
        "hidden+lookahead3": CaptureParams(hidden_states=True, lookahead=3),
    }
    recorders: dict[str, RoutingRecorder] = {}
    active: list[RoutingRecorder] = []
    split_times: dict[str, list[tuple[float, float]]] = {name: [] for name in captures}
    last_arrays: dict[str, dict] = {}

    def attach(name: str) -> None:
        while active:
            active.pop().remove()
        if captures[name] is not None:
            recorders[name] = RoutingRecorder(adapter, captures[name], projection_seed=0)
            active.append(recorders[name])

    try:  # the collect loop's per-batch function (moe_prefetch/collect/generation.py); older code inlined it in collect()
        from moe_prefetch.collect.generation import forward_rows
    except ImportError:
        forward_rows = None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    token_lists = [s.token_ids for s in sequences]
    batch_rows: dict[str, list] = {}

    def side(name: str):
        def call():
            started = time.perf_counter()
            if captures[name] is None:
                with torch.no_grad():
                    model(**inputs)
                split_times[name].append((time.perf_counter() - started, 0.0))
                return
            recorder = recorders[name]
            take, spent = recorder.take, []

            def timed_take(*a):
                t0 = time.perf_counter()
                result = take(*a)
                spent.append(time.perf_counter() - t0)
                return result

            recorder.take = timed_take
            if forward_rows is not None:  # exactly what collect does per batch in forward mode
                batch_rows[name] = forward_rows(model, adapter, recorder, token_lists, pad_id, torch.device("cpu"))
            else:  # older collect: forward, take, pad to seq_len
                with torch.no_grad():
                    model(**inputs)
                arrays = recorder.take(B, S)
                last_arrays[name] = {n: np.pad(a, [(0, 0), (0, args.seq_len - S)] + [(0, 0)] * (a.ndim - 2)) for n, a in arrays.items()}
            del recorder.take
            total = time.perf_counter() - started
            split_times[name].append((total - spent[0], spent[0]))
        return call

    # hooks only read: the traced forward returns the same logits as the plain one
    attach("plain")
    with torch.no_grad():
        reference = model(**inputs).logits
    attach("ids+weights")
    with torch.no_grad():
        traced_logits = model(**inputs).logits
    recorders["ids+weights"].take(B, S)
    assert torch.equal(reference, traced_logits), "hooks changed the model output"

    times = alternate({name: side(name) for name in captures}, rounds=rounds_of(args), warmup=1, before=attach)
    attach("plain")
    print("per batch (plain: forward; traced: forward with hooks + recorder.take + per-sequence arrays):")
    stats = print_sides(times)
    for name in ("ids+weights", "hidden+lookahead3"):
        measured = split_times[name][1:]  # skip the warm-up call
        fwd = float(np.median([f for f, _ in measured])) * 1e3
        take = float(np.median([t for _, t in measured])) * 1e3
        print(f"  {name}: forward with hooks (+ row building) {fwd:.1f} ms + recorder.take {take:.1f} ms (medians)")

    # Arrow table building, per batch (collect.chunk_table runs once per chunk of sequences; cost is per row)
    schema = traces.schema(traces.TraceGeometry(len(adapter.layers), adapter.top_k, adapter.num_experts))
    if "rows" in inspect.signature(chunk_table).parameters:
        table_input = [{n: v for n, v in r.items() if n not in ("hidden_states", "lookahead_experts")} for r in batch_rows["ids+weights"]]
    else:
        table_input = {n: last_arrays["ids+weights"][n] for n in ("experts", "weights")}
    table_times = alternate({"chunk_table": lambda: chunk_table(sequences, table_input, schema)}, rounds=rounds_of(args))
    table = Stats.of(table_times["chunk_table"])
    print(f"  collect.chunk_table for this batch: median {table.median * 1e3:.1f} ms")
    print(f"  per-batch path measured: {'moe_prefetch.collect.generation.forward_rows' if forward_rows else 'forward + recorder.take + np.pad'}")

    plain = stats["plain"].median
    ratio = stats["ids+weights"].median / plain
    ratio_captures = stats["hidden+lookahead3"].median / plain
    ratio_table = (stats["ids+weights"].median + table.median) / plain
    low = stats["ids+weights"].low / stats["plain"].high
    high = stats["ids+weights"].high / stats["plain"].low
    print(f"ratio ids+weights / plain = {ratio:.3f} (extremes {low:.3f} .. {high:.3f}); "
          f"+ chunk_table {ratio_table:.3f}; hidden+lookahead3 / plain = {ratio_captures:.3f}")
    captures_profile(model, inputs, recorders, B, S, attach)
    status = "PASS" if ratio <= TARGET else "FAIL"
    if status == "FAIL" or args.profile:
        profile(model, inputs, recorders, adapter, B, S, attach)
    cmd = command_line("bench_tracing.py")
    return [
        Row("tracing overhead (ids+weights) / plain forward", f"{ratio:.3f}x", f"<= {TARGET:.2f}x", status, cmd,
            [f"batch {B}x{S}, float32, {torch.get_num_threads()} thread(s); incl. chunk_table {ratio_table:.3f}x"]),
        Row("tracing overhead (hidden_states + lookahead 3) / plain", f"{ratio_captures:.3f}x", "report", "INFO", cmd),
    ]


def captures_profile(model, inputs, recorders, B, S, attach) -> None:
    """Where recorder.take spends its time with hidden_states + lookahead 3 (one batch, cumulative time)."""
    import torch

    attach("hidden+lookahead3")
    with torch.no_grad():
        model(**inputs)
        profiler = cProfile.Profile()
        profiler.enable()
        recorders["hidden+lookahead3"].take(B, S)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(10)
    print("cProfile of recorder.take with hidden_states + lookahead 3 (1 batch, cumulative):")
    print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))
    attach("plain")


def profile(model, inputs, recorders, adapter, B, S, attach) -> None:
    """Where the traced batch spends its time: cProfile of forward + take (Python level), then torch ops."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    attach("ids+weights")
    recorder = recorders["ids+weights"]
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(3):
            model(**inputs)
            recorder.take(B, S)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    print("cProfile, 3 traced batches, by own time:")
    print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
        recorder.take(B, S)
    print("torch profiler, 1 traced batch, by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    attach("plain")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="print the profile even when the target is met")
    args = p.parse_args()
    finish(args, run(args))


if __name__ == "__main__":
    main()
