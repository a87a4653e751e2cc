"""Loading a checkpoint exactly as a hub id would be loaded, with one-line errors for the ways it goes wrong."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stages.errors import PipelineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1


def load_model_and_tokenizer(name: str, dtype: str, device: str):
    """AutoModel + AutoTokenizer from a local directory or a hub id, in eval mode on `device`.

    device "auto" passes device_map="auto" so accelerate spreads a model larger than one GPU over all of them.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if _looks_local(name) and not Path(name).is_dir():
        raise PipelineError(f"collect.model: {name!r} is not a checkpoint directory (and not an owner/name hub id)")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(err).lower() or "connect" in str(err).lower()
        hint = " (no network: the hub cannot be reached offline; download it first or use a local directory)" if offline else ""
        raise PipelineError(f"collect.model: cannot load config of {name!r}{hint}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise PipelineError(f"collect.model: {name!r}: {str(err).splitlines()[0]}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"collect.device: {device!r} requested but no CUDA device is available; use cpu")
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs = {"dtype": DTYPES[dtype]}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = auto.from_pretrained(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except SafetensorError as err:
        raise PipelineError(f"collect.model: {name!r} has a corrupted safetensors file ({err})") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise PipelineError(f"collect.model: cannot load {name!r}: {str(err).splitlines()[0]}") from None
    if device != "auto":
        model = model.to(device)
    return model.eval(), tokenizer
