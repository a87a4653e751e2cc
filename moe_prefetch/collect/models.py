"""Loading a checkpoint exactly as a hub id would be loaded, with one-line errors for the ways it goes wrong."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe_prefetch.errors import PipelineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1


def load_config(name: str):
    """The checkpoint's config, or a one-line error: not a directory, unreachable hub (offline), unknown model type."""
    from transformers import AutoConfig

    if _looks_local(name) and not Path(name).is_dir():
        raise PipelineError(f"collect.model: {name!r} is not a checkpoint directory (and not an owner/name hub id)")
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise PipelineError(f"collect.model: {name!r} is not a checkpoint directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(err).lower() or "connect" in str(err).lower()
        hint = " (no network: the hub cannot be reached offline; download it first or use a local directory)" if offline else ""
        raise PipelineError(f"collect.model: cannot load config of {name!r}{hint}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise PipelineError(f"collect.model: {name!r}: {str(err).splitlines()[0]}") from None


FINGERPRINT_FULL_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones by size + head + tail
FINGERPRINT_EDGE_BYTES = 8 << 20


def model_fingerprint(name: str) -> str:
    """What identifies the weights a run routes with: for a local checkpoint a sha256 over its files (large
    weight files by size, first and last 8 MiB, so a 100 GB model is not read twice); for a hub id its commit."""
    import hashlib

    if not Path(name).is_dir():
        return f"hub:{name}@{getattr(load_config(name), '_commit_hash', None) or 'unknown'}"
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(name).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(name)}\t{size}\n".encode())
        with open(path, "rb") as handle:
            if size <= FINGERPRINT_FULL_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
                handle.seek(size - FINGERPRINT_EDGE_BYTES)
                digest.update(handle.read())
    return digest.hexdigest()


def load_tokenizer(name: str):
    """The checkpoint's tokenizer (the config is checked first, for the same one-line errors as the model)."""
    from transformers import AutoTokenizer

    load_config(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, RuntimeError) as err:
        raise PipelineError(f"collect.model: cannot load the tokenizer of {name!r}: {str(err).splitlines()[0]}") from None


def auto_model_class(config):
    """The transformers Auto class that builds `config`'s model with its language-model head: seq2seq for an
    encoder-decoder, else causal LM, else (a multimodal checkpoint whose text decoder an adapter reads) image-text-
    to-text (Qwen3-VL-MoE, Qwen3.5-MoE) or multimodal LM (Qwen3-Omni-MoE); causal LM's own error names any other."""
    import transformers

    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    candidates = (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText, transformers.AutoModelForMultimodalLM)
    # _model_mapping (config class -> model class) is how the Auto classes themselves dispatch
    return next((auto for auto in candidates if type(config) in auto._model_mapping), transformers.AutoModelForCausalLM)


def load_model(name: str, dtype: str, device: str, gpus: tuple[int, ...] | None = None):
    """AutoModel from a local directory or a hub id, in eval mode on `device`.

    device "auto" passes device_map="auto" so accelerate spreads a model larger than one GPU over all of them, or
    over `gpus` only (a data-parallel rank's share, moe_prefetch/collect/devices.py), then CPU RAM.
    A family's adapter may add config overrides that leave out what a text collection never runs
    (`RoutingAdapter.load_overrides`: Qwen3-Omni-MoE's speech talker).
    """
    from safetensors import SafetensorError

    from moe_prefetch.routing import FAMILIES

    config = load_config(name)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"collect.device: {device!r} requested but no CUDA device is available; use cpu")
    auto = auto_model_class(config)
    model_type = getattr(config, "model_type", None)
    kwargs = {"dtype": DTYPES[dtype], **(FAMILIES[model_type].load_overrides if model_type in FAMILIES else {})}
    if device == "auto":
        kwargs["device_map"] = "auto"
        if gpus is not None:
            from accelerate.utils import get_max_memory

            # accelerate places only on the devices max_memory lists: this rank's GPUs, then CPU RAM
            kwargs["max_memory"] = {key: free for key, free in get_max_memory().items() if not isinstance(key, int) or key in gpus}
    try:
        model = auto.from_pretrained(name, **kwargs)
    except SafetensorError as err:
        raise PipelineError(f"collect.model: {name!r} has a corrupted safetensors file ({err})") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise PipelineError(f"collect.model: cannot load {name!r}: {str(err).splitlines()[0]}") from None
    if device != "auto":
        model = model.to(device)
    return model.eval()

