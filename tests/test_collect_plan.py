"""collect's plan: how documents become sequences, with and without the BOS token collect.add_bos prepends.

A word tokenizer (each whitespace-separated word is its integer id) makes every expected sequence hand-computable."""

from __future__ import annotations

import pytest
from conftest import MODEL, assert_error, tiny_params

from moe_prefetch.collect.collector import bos_token_id, plan_sequences
from moe_prefetch.collect.models import load_tokenizer


class WordTokenizer:
    """Token ids are the words of the text read as integers; `bos_token_id` as given (None: the tokenizer has none)."""

    def __init__(self, bos_token_id: int | None):
        self.bos_token_id = bos_token_id

    def __call__(self, text: str, add_special_tokens: bool) -> dict:
        assert not add_special_tokens  # the plan adds the BOS itself, and only that
        return {"input_ids": [int(word) for word in text.split()]}


@pytest.fixture
def words(tmp_path) -> dict:
    """A one-document source of the ten tokens 100..109."""
    (tmp_path / "doc.txt").write_text(" ".join(str(t) for t in range(100, 110)))
    return {"name": "words", "path": str(tmp_path / "*.txt")}


def planned(source: dict, bos: int | None, **overrides) -> list[list[int]]:
    params = tiny_params("collect", **{"sources": [source], "seq_len": 4, "min_tokens": 2, "chunks_per_document": 8, **overrides})
    return [s.token_ids for s in plan_sequences(params, WordTokenizer(bos))]


def test_bos_starts_every_sequence_and_counts_in_seq_len_and_min_tokens(words):
    assert planned(words, bos=7) == [[7, 100, 101, 102], [7, 103, 104, 105], [7, 106, 107, 108], [7, 109]]
    assert planned(words, bos=7, min_tokens=3) == [[7, 100, 101, 102], [7, 103, 104, 105], [7, 106, 107, 108]]
    assert planned(words, bos=7, chunks_per_document=2) == [[7, 100, 101, 102], [7, 103, 104, 105]]


def test_no_bos_when_off_or_when_the_tokenizer_has_none(words):
    plain = [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109]]
    assert planned(words, bos=7, add_bos=False) == plain
    assert planned(words, bos=None) == plain
    assert bos_token_id(tiny_params("collect", add_bos=False), WordTokenizer(7)) is None
    assert bos_token_id(tiny_params("collect"), WordTokenizer(None)) is None


def test_bos_needs_room_for_a_text_token(words):
    assert_error(lambda: planned(words, bos=7, seq_len=1, min_tokens=1), "collect.seq_len: must be >= 2 with collect.add_bos", "got 1")
    assert planned(words, bos=None, seq_len=1, min_tokens=1, chunks_per_document=2) == [[100], [101]]


def test_tiny_moe_tokenizer_has_a_bos_and_it_starts_every_sequence():
    tokenizer = load_tokenizer(str(MODEL))
    assert tokenizer.bos_token_id == 0 == tokenizer.convert_tokens_to_ids("<|endoftext|>")  # its document separator
    with_bos = plan_sequences(tiny_params("collect"), tokenizer)
    without = plan_sequences(tiny_params("collect", add_bos=False), tokenizer)
    assert all(s.token_ids[0] == 0 and 0 not in s.token_ids[1:] and len(s.token_ids) <= 32 for s in with_bos)
    first_chunks = {s.sequence_id: s.token_ids for s in without if s.sequence_id.endswith("/0")}
    for s in with_bos:
        if s.sequence_id in first_chunks:  # a document's first chunk: its first 31 text tokens after the BOS
            assert s.token_ids[1:] == first_chunks[s.sequence_id][:31]
