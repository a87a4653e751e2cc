"""collect.import in bounded memory: Arrow's streaming readers and the record-at-a-time path give the same traces,
good JSON Lines and Parquet never need the latter, and no stage of the import holds more than one batch or one
spill group of records, however many records there are."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tree_digest
from test_import import LAYERS, good_records, import_params, write_records

from moe_prefetch.collect import import_records, importer
from moe_prefetch.collect.importer import import_traces


def interleaved_files(directory, suffix: str, sequences: int = 40) -> str:
    """good_records of `sequences` sequences, records of different sequences interleaved, split over two files."""
    records = good_records(sequences=sequences, tokens=5)
    records = records[1::2] + records[::2]  # every sequence's records spread over the whole input
    for name, part in (("a", records[: len(records) // 2]), ("b", records[len(records) // 2 :])):
        write_records(directory / f"{name}.{suffix}", part)
    return str(directory / f"*.{suffix}")


def forbid(monkeypatch, name: str) -> None:
    def refused(*_args, **_kwargs):
        raise AssertionError(f"{name} was used")
    monkeypatch.setattr(importer, name, refused)


def always_inexact(*_args):
    raise import_records.Inexact


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_the_fast_and_the_exact_path_write_the_same_traces(suffix, tmp_path, monkeypatch):
    pattern = interleaved_files(tmp_path, suffix)
    with monkeypatch.context() as patch:
        forbid(patch, "exact_batches")  # good input: Arrow's readers take all of it
        import_traces(import_params(pattern), tmp_path / "fast")
    with monkeypatch.context() as patch:
        patch.setattr(importer, "fast_batches", always_inexact)  # the import restarts one record at a time
        import_traces(import_params(pattern), tmp_path / "exact")
    assert tree_digest(tmp_path / "fast") == tree_digest(tmp_path / "exact")


def test_integer_sequence_ids_in_json_lines_fall_back_and_read_as_their_digits(tmp_path):
    records = good_records(sequences=3, tokens=2)
    (tmp_path / "ints.jsonl").write_text("".join(json.dumps({**r, "sequence_id": int(r["sequence_id"][3:])}) + "\n" for r in records))
    (tmp_path / "strs.jsonl").write_text("".join(json.dumps({**r, "sequence_id": r["sequence_id"][3:]}) + "\n" for r in records))
    import_traces(import_params(str(tmp_path / "ints.jsonl")), tmp_path / "ints")
    import_traces(import_params(str(tmp_path / "strs.jsonl")), tmp_path / "strs")
    ints, strs = (pq.read_table(tmp_path / name / "chunk-00000.parquet") for name in ("ints", "strs"))
    assert ints["sequence_id"].to_pylist() == strs["sequence_id"].to_pylist() and ints["sequence_id"][0].as_py() == "0"
    assert ints.equals(strs)


def test_no_step_holds_more_than_a_batch_or_a_spill_group(tmp_path, monkeypatch):
    monkeypatch.setattr(import_records, "BATCH_RECORDS", 50)
    monkeypatch.setattr(import_records, "JSON_PIECE_BYTES", 1000)  # about 8 lines: most pieces cut a line in two
    monkeypatch.setattr(importer, "SPILL_SEQUENCES", 3)
    batches, groups = [], []
    add, group_rows = importer.Spill.add, importer.group_rows
    monkeypatch.setattr(importer.Spill, "add", lambda self, batch: (batches.append(len(batch["position"])), add(self, batch))[1])
    monkeypatch.setattr(importer, "group_rows", lambda state, records, *rest: (
        groups.append((len(records["position"]), len(set(records["sequence"].tolist())))), group_rows(state, records, *rest))[1])
    pattern = interleaved_files(tmp_path, "jsonl", sequences=40)
    import_traces(import_params(pattern), tmp_path / "traces")
    total = len(good_records(sequences=40, tokens=5))
    assert sum(batches) == total and max(batches) <= 50  # the records streamed through in batches
    assert len(groups) == -(-40 // 3) and max(sequences for _, sequences in groups) <= 3  # and were sorted 3 sequences at a time
    assert max(records for records, _ in groups) <= 3 * 5 * len(LAYERS) + len(LAYERS)  # one group's records (+ the incomplete token)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "traces").glob("chunk-*.parquet")))
    assert len(set(table["sequence_id"].to_pylist())) == 40  # and every sequence arrived
