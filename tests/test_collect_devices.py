"""collect at real scale without a GPU: hidden states projected and cast where they are recorded (never gathered
full-width float32 on the host), chunks bounded by collect.max_chunk_bytes, per-rank GPU shares under data
parallel (faked launcher environment, mocked GPU count), and inputs of a model whose embedding is disk-offloaded."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import dispatch_model
from conftest import assert_error, tiny_params
from test_collect import SMALL, forward, forward_dir, one_thread, run  # noqa: F401 (fixtures)
from test_routing_families import batch, build

from moe_prefetch.collect import models
from moe_prefetch.collect.collector import collect
from moe_prefetch.collect.config import CaptureParams
from moe_prefetch.collect.devices import Placement, rank_placement
from moe_prefetch.routing import adapter_for
from moe_prefetch.routing.recorder import RoutingRecorder


@pytest.fixture
def moved_to_host(monkeypatch) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every tensor the code under test moves to the host with .cpu()."""
    moved = []
    cpu = torch.Tensor.cpu

    def recording_cpu(tensor, *args, **kwargs):
        moved.append((tensor.dtype, tuple(tensor.shape)))
        return cpu(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", recording_cpu)
    return moved


@pytest.mark.parametrize("hidden_dim", [4, 0])
def test_hidden_states_reach_the_host_projected_and_float16_one_layer_at_a_time(hidden_dim, moved_to_host):
    model = build("olmoe")
    width = int(model.config.hidden_size)
    adapter = adapter_for(model)
    router_inputs = []  # the reference: what each router received, recorded by a hook of the test's own
    handles = [layer.router.register_forward_pre_hook(lambda _m, args: router_inputs.append(args[0].detach().clone()))
               for layer in adapter.layers]
    recorder = RoutingRecorder(adapter, CaptureParams(hidden_states=True, hidden_dim=hidden_dim), projection_seed=3)
    ids, mask = batch()
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        moved_to_host.clear()  # count only what take() moves
        stored = recorder.take(*ids.shape)["hidden_states"]  # (B, S, L, d)
    finally:
        recorder.remove()
        for handle in handles:
            handle.remove()
    batch_size, seq = ids.shape
    hidden_moves = [(dtype, shape) for dtype, shape in moved_to_host if shape[-1] in (width, hidden_dim)]
    # one (B, S, d) float16 tensor per MoE layer; never a float32 or full-width (with a projection) one
    assert hidden_moves == [(torch.float16, (batch_size, seq, hidden_dim or width))] * len(adapter.layers)
    projection = torch.randn(width, hidden_dim, generator=torch.Generator().manual_seed(3)) / hidden_dim**0.5 if hidden_dim else None
    for index, router_input in enumerate(router_inputs):
        hidden = router_input.reshape(batch_size, seq, -1).float()
        expected = (hidden @ projection if hidden_dim else hidden).to(torch.float16).numpy()  # as before the change: on the host
        assert np.array_equal(stored[:, :, index], expected), index


def test_a_chunk_holds_no_more_rows_than_max_chunk_bytes(tmp_path, forward):
    # tiny-moe: 8 MoE layers x top-2 -> 8*2*(2 + 4) bytes of experts and weights + 4 + 4 + 1 = 105 bytes per token;
    # a sequence is at most 32 tokens = 3360 bytes, so 3.5 sequences' worth fits 2 (a multiple of batch_size 2), not 4
    _, table = run(tmp_path / "bounded", max_chunk_bytes=int(3.5 * 3360))
    files = sorted((tmp_path / "bounded").glob("chunk-*.parquet"))
    assert len(files) == 3  # 6 sequences, 2 per chunk (sequences_per_chunk 4 alone would give 2 chunks)
    assert all(len(set(pq.read_table(f)["sequence_id"].to_pylist())) == 2 for f in files)
    assert table.equals(forward)  # the same rows, only cut into smaller chunks


def test_max_chunk_bytes_below_one_batch_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "traces"
    assert_error(lambda: collect(tiny_params("collect", **{**SMALL, "max_chunk_bytes": 5000}), out),
                 "collect.max_chunk_bytes: 5000", "2 sequences x 32 tokens x 105 bytes = 6720", "lower collect.batch_size")
    assert not out.exists()


def disk_offloaded(load):
    """load_model, then accelerate's dispatch with the input embedding and every decoder layer but the first on disk."""
    def load_offloaded(name, dtype, device, gpus=None):
        model = load(name, dtype, device, gpus)
        device_map = {f"model.{child}": "cpu" for child, _ in model.model.named_children() if child not in ("layers", "embed_tokens")}
        device_map |= {f"model.layers.{index}": "disk" if index else "cpu" for index in range(len(model.model.layers))}
        device_map |= {"model.embed_tokens": "disk", "lm_head": "cpu"}
        dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=load_offloaded.offload_dir)
        assert next(model.parameters()).device.type == "meta"  # the first parameter, the embedding's, is offloaded
        return model

    return load_offloaded


def test_inputs_go_where_an_offloaded_embedding_runs(tmp_path, monkeypatch, forward):
    offloaded = disk_offloaded(models.load_model)
    offloaded.offload_dir = tmp_path / "offload"
    monkeypatch.setattr(models, "load_model", offloaded)
    _, table = run(tmp_path / "traces")
    assert table.equals(forward)


def launcher(monkeypatch, gpus: int, local_rank: int, local_ranks: int, world: int | None = None):
    """The environment accelerate launch / torchrun give a process, and `gpus` visible CUDA devices."""
    monkeypatch.setenv("WORLD_SIZE", str(world or local_ranks))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


@pytest.mark.parametrize(("device", "gpus", "local_rank", "local_ranks", "expected"), [
    ("auto", 4, 1, 2, Placement("auto", (2, 3))),  # rank 1 of 2 on 4 GPUs: the second half
    ("auto", 8, 3, 4, Placement("auto", (6, 7))),
    ("auto", 2, 0, 1, Placement("auto")),  # one process: every GPU
    ("cuda", 4, 3, 4, Placement("cuda:3")),
    ("cuda:1", 4, 0, 1, Placement("cuda:1")),
    ("cpu", 0, 1, 2, Placement("cpu")),
])
def test_each_data_parallel_rank_gets_its_own_gpus(device, gpus, local_rank, local_ranks, expected, monkeypatch):
    launcher(monkeypatch, gpus, local_rank, local_ranks)
    assert rank_placement(device) == expected


def test_the_local_world_counts_not_the_global_one(monkeypatch):
    launcher(monkeypatch, gpus=2, local_rank=1, local_ranks=2, world=4)  # machine 2 of 2, its second process
    assert rank_placement("auto") == Placement("auto", (1,))


@pytest.mark.parametrize(("device", "gpus", "local_ranks", "fragments"), [
    ("cuda:0", 4, 2, ["collect.device: 'cuda:0'", "all 2 data-parallel processes", "use cuda"]),
    ("cuda", 1, 2, ["collect.device: cuda with 2 processes", "1 visible"]),
    ("auto", 3, 2, ["collect.device: auto with 2 processes", "3 visible GPUs", "multiple of 2"]),
])
def test_a_device_ranks_cannot_share_is_one_line(device, gpus, local_ranks, fragments, monkeypatch):
    launcher(monkeypatch, gpus, 0, local_ranks)
    assert_error(lambda: rank_placement(device), *fragments)


def test_a_rank_loads_auto_onto_its_own_gpus_only(monkeypatch):
    """load_model gives from_pretrained a max_memory listing only the rank's GPUs (accelerate places nothing elsewhere)."""
    seen = {}

    class Auto:
        @staticmethod
        def from_pretrained(name, **kwargs):
            seen.update(kwargs)
            return torch.nn.Linear(1, 1)

    import accelerate.utils

    monkeypatch.setattr(models, "auto_model_class", lambda config: Auto)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {0: 10, 1: 11, 2: 12, 3: 13, "cpu": 100})
    models.load_model(str(models.Path(__file__).parents[1] / "models" / "tiny-moe"), "bfloat16", "auto", (2, 3))
    assert seen["device_map"] == "auto" and seen["max_memory"] == {2: 12, 3: 13, "cpu": 100}
