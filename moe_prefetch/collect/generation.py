"""Running the model over one batch of planned sequences: per-sequence rows of routing, ready for a trace chunk.

forward mode: one right-padded forward pass without a cache; a sequence's rows are its non-padding tokens.

generate mode: the same right-padded batch is the prompt (prefill, with a KV cache: its routing equals forward
mode's), then greedy decoding, one forward per step: step t feeds each sequence's last generated token at position
len(prompt) + t, so decode-time routing is recorded one token at a time as an offloading engine sees it. Rows keep
their right padding during decoding: the gap between a short prompt and the decoded tokens is masked out of the
attention (a hole in the 2-D mask) and positions are passed explicitly, so every sequence decodes exactly as it
would alone. A sequence stops when it generates EOS (EOS is never fed back, so it has no routing and no row);
finished sequences are fed a masked pad token whose routing is discarded. Greedy argmax: deterministic.
A sliding attention window counts cache slots, holes included, so a model whose window is shorter than the longest
prompt plus max_new_tokens decodes one sequence at a time (exact, slower). So does a model with recurrent token
mixers (`adapter.recurrent`: Mamba, linear attention): a short prompt's pad steps would run through the recurrent
state before its first decoded token (decode steps are not masked there), so batching would change its routing.

Row dicts hold `position` (int32), `token_id` (int32), `generated` (bool) and the recorder's arrays
(experts, weights and the captures), each with one entry per recorded token in position order.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_prefetch.errors import PipelineError
from moe_prefetch.routing import RoutingAdapter
from moe_prefetch.routing.recorder import RoutingRecorder


def right_padded(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, W), attention_mask (B, W), lengths (B,)) with every sequence left-aligned."""
    lengths = torch.tensor([len(ids) for ids in token_lists])
    input_ids = torch.full((len(token_lists), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return input_ids, mask, lengths


def _rows(arrays: dict[str, np.ndarray], row: int, count: int, first_position: int, token_ids, generated: bool) -> dict:
    """The first `count` tokens of batch row `row` of arrays (B, S, ...) as a row dict."""
    out = {name: array[row, :count] for name, array in arrays.items()}
    out["position"] = np.arange(first_position, first_position + count, dtype=np.int32)
    out["token_id"] = np.asarray(token_ids, dtype=np.int32)
    out["generated"] = np.full(count, generated)
    return out


def forward_rows(model, adapter: RoutingAdapter, recorder: RoutingRecorder, token_lists: list[list[int]], pad_id: int, device) -> list[dict]:
    input_ids, mask, lengths = right_padded(token_lists, pad_id)
    with torch.no_grad():
        adapter.causal_lm()(**adapter.forward_inputs(input_ids.to(device), mask.to(device)))
    arrays = recorder.take(*input_ids.shape)
    return [_rows(arrays, row, len(ids), 0, ids, False) for row, ids in enumerate(token_lists)]


def check_generate(adapter: RoutingAdapter) -> None:
    if any(layer.stack != "decoder" for layer in adapter.layers):
        raise PipelineError(f"collect.mode: generate needs a decoder-only model; {adapter.family} is an encoder-decoder (use forward)")


def eos_token_ids(model) -> set[int]:
    """EOS ids from the generation config (or the model config); an int or a list in either."""
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def generate_rows(model, adapter: RoutingAdapter, recorder: RoutingRecorder, token_lists: list[list[int]], pad_id: int, device,
                  max_new_tokens: int, eos_ids: set[int]) -> list[dict]:
    """Prompt rows from the prefill, then one row per generated token (see the module docstring)."""
    window = getattr(adapter.config, "sliding_window", None)  # the text decoder's (a multimodal config nests it)
    window_too_short = bool(window) and window < max(map(len, token_lists)) + max_new_tokens
    if len(token_lists) > 1 and (adapter.recurrent or window_too_short):
        return [rows for ids in token_lists
                for rows in generate_rows(model, adapter, recorder, [ids], pad_id, device, max_new_tokens, eos_ids)]
    input_ids, mask, lengths = right_padded(token_lists, pad_id)
    batch = len(token_lists)
    inputs = adapter.forward_inputs(input_ids.to(device), mask.to(device))
    inputs["use_cache"] = True
    causal_lm = adapter.causal_lm()
    with torch.no_grad():
        out = causal_lm(**inputs, logits_to_keep=(lengths - 1)[:, None].to(device))  # logits of each prompt's last token
    prompt = recorder.take(*input_ids.shape)
    rows = [_rows(prompt, row, len(ids), 0, ids, False) for row, ids in enumerate(token_lists)]
    decoded: list[list[dict]] = [[] for _ in range(batch)]
    generated: list[list[int]] = [[] for _ in range(batch)]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    logits = out.logits  # (B, 1, V); (B, W, V) from a model that ignores logits_to_keep (Qwen3-Omni-MoE's thinker)
    if logits.shape[1] != 1:
        logits = logits[torch.arange(batch), (lengths - 1).to(logits.device)][:, None]
    next_token = logits[:, -1].argmax(-1).cpu()
    active = torch.ones(batch, dtype=torch.bool)
    cache = out.past_key_values
    for step in range(max_new_tokens):
        active &= ~torch.isin(next_token, eos)
        if not active.any():
            break
        feed = torch.where(active, next_token, torch.full_like(next_token, pad_id))
        mask = torch.cat([mask, active[:, None].long()], dim=1)
        with torch.no_grad():
            out = causal_lm(input_ids=feed[:, None].to(device), attention_mask=mask.to(device), position_ids=(lengths + step)[:, None].to(device),
                        past_key_values=cache, use_cache=True)
        arrays = recorder.take(batch, 1)
        for row in torch.nonzero(active).flatten().tolist():
            decoded[row].append({name: array[row, 0] for name, array in arrays.items()})
            generated[row].append(int(feed[row]))
        cache = out.past_key_values
        next_token = out.logits[:, -1].argmax(-1).cpu()
    for row, steps in enumerate(decoded):
        if steps:
            stacked = {name: np.stack([s[name] for s in steps])[None] for name in steps[0]}  # (1, steps, ...)
            new = _rows(stacked, 0, len(steps), len(token_lists[row]), generated[row], True)
            rows[row] = {name: np.concatenate([rows[row][name], new[name]]) for name in rows[row]}
    return rows
