"""Where collect runs a model: which GPUs each data-parallel rank may use, and the device its inputs go to.

Under `accelerate launch` / `torchrun` with N processes per machine, every process sees every GPU. Without a
per-rank mapping, `collect.device: auto` would spread each rank's copy of the model over all of the machine's GPUs
(N copies competing for the same memory) and `cuda:N` would put every rank on one GPU. rank_placement() gives
rank r (its local index on the machine) its own share instead:

| collect.device | one process | N processes on a machine with G GPUs                                                   |
|----------------|-------------|----------------------------------------------------------------------------------------|
| cpu            | cpu         | cpu                                                                                    |
| cuda           | cuda        | cuda:r (needs G >= N)                                                                  |
| cuda:N         | cuda:N      | refused: one fixed GPU cannot serve several ranks (use cuda or auto)                   |
| auto           | all G GPUs  | GPUs r*G/N .. (r+1)*G/N - 1 for device_map="auto" (needs G a multiple of N)            |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moe_prefetch.errors import PipelineError


@dataclass(frozen=True)
class Placement:
    """What load_model is given: a device string, and for device "auto" the GPU indices it may spread over (None = all)."""

    device: str
    gpus: tuple[int, ...] | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise PipelineError(f"collect.device: environment variable {name}={value!r} is not an integer (set by the launcher)") from None


def rank_placement(device: str) -> Placement:
    """This process's share of the machine's GPUs for `device` (module docstring), from the launcher's environment
    (LOCAL_RANK, LOCAL_WORLD_SIZE; WORLD_SIZE when the machine's count is not given) and torch.cuda.device_count()."""
    world = _env_int("WORLD_SIZE", 1)
    local_ranks = _env_int("LOCAL_WORLD_SIZE", world)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "cpu" or local_ranks == 1:
        return Placement(device)
    gpus = torch.cuda.device_count()
    if device.startswith("cuda:"):
        raise PipelineError(f"collect.device: {device!r} would put all {local_ranks} data-parallel processes of this machine on one GPU; "
                            "use cuda (process r gets cuda:r) or auto (each process gets its own share of the GPUs)")
    if device == "cuda":
        if gpus < local_ranks:
            raise PipelineError(f"collect.device: cuda with {local_ranks} processes per machine needs {local_ranks} GPUs, "
                                f"{gpus} visible; launch at most {gpus} processes")
        return Placement(f"cuda:{local_rank}")
    if gpus < local_ranks or gpus % local_ranks:
        raise PipelineError(f"collect.device: auto with {local_ranks} processes per machine splits the {gpus} visible GPUs evenly, "
                            f"which needs a multiple of {local_ranks} GPUs; launch a divisor of {gpus} processes")
    share = gpus // local_ranks
    return Placement(device, tuple(range(local_rank * share, (local_rank + 1) * share)))


def input_device(model) -> torch.device:
    """The device the model's input ids must be on: where its input embedding runs. With accelerate's CPU/disk
    offload the embedding's weight lives on `meta` and its hook moves it to `execution_device` per call, so the
    first parameter's device (meta) is not where inputs can go."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # accelerate's SequentialHook chains several
    execution = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    return embedding.weight.device
