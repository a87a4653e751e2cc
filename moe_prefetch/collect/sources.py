"""Text sources: each source is a *domain* that yields (document_id, text) pairs.

A source spec (one entry of ``collect.sources`` in params.yaml) is either the name of a built-in source or a
mapping:

- ``python-docs``: the prose of ``pydoc_data.topics`` (ships with CPython), one document per help topic.
- ``python-stdlib``: the standard library's ``.py`` files (tests and site-packages excluded), one per file.
- ``{name: DOMAIN, path: GLOB}``: local ``.txt`` files (one document per file) or ``.jsonl`` files (one document
  per line, text in ``field``, default ``text``), below ``inputs/`` (``check_input_path``).
- ``{name: DOMAIN, hf_dataset: ID, config: NAME, split: SPLIT, field: text}``: a Hugging Face dataset, streamed
  with ``datasets`` (a local dataset directory or data files work offline).

Built-in sources are shuffled at the document level with the collect seed so a prefix of documents is a
random sample; file and dataset sources keep their order (stream them).
"""

from __future__ import annotations

import glob
import json
import os
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_prefetch.errors import PipelineError

BUILTIN_SOURCES = ("python-docs", "python-stdlib")
INPUTS = Path("inputs")  # relative to the working directory: the repo root under DVC


def check_input_path(key: str, pattern: str, inputs: Path = INPUTS) -> None:
    """A file glob collect reads (a {name, path} source, collect.import) must lie below `inputs`: dvc.yaml lists
    that directory as a dependency of collect, so editing, adding or replacing a file there re-runs collect, while a
    file elsewhere is invisible to `dvc status`. Judged on the glob's fixed leading part, after `..` is resolved."""
    fixed = []
    for part in Path(os.path.normpath(pattern)).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    if not Path(os.path.abspath(Path(*fixed))).is_relative_to(os.path.abspath(inputs)):
        raise PipelineError(f"{key}: {pattern!r} is outside {inputs}/; collect reads files only below {inputs}/ "
                            "(a DVC dependency of the collect stage): move them there")


@dataclass(frozen=True)
class SourceSpec:
    """One text source. ``name`` is the domain recorded for every token it yields."""

    name: str
    path: str | None = None
    hf_dataset: str | None = None
    config: str | None = None
    split: str = "train"
    field: str = "text"

    @staticmethod
    def parse(raw: object, key: str = "collect.sources") -> SourceSpec:
        if isinstance(raw, str):
            if raw not in BUILTIN_SOURCES:
                raise PipelineError(
                    f"{key}: unknown source {raw!r}; accepted: {', '.join(BUILTIN_SOURCES)}, "
                    "or a mapping with name + path (txt/jsonl glob) or name + hf_dataset"
                )
            return SourceSpec(name=raw)
        if not isinstance(raw, dict):
            raise PipelineError(f"{key}: source {raw!r} must be a string or a mapping")
        allowed = {"name", "path", "hf_dataset", "config", "split", "field"}
        unknown = set(raw) - allowed
        if unknown:
            raise PipelineError(f"{key}: unknown key(s) {sorted(unknown)} in source {raw!r}; accepted: {sorted(allowed)}")
        if not isinstance(raw.get("name"), str) or not raw["name"]:
            raise PipelineError(f"{key}: source {raw!r} needs a non-empty string 'name' (its domain)")
        if ("path" in raw) == ("hf_dataset" in raw):
            raise PipelineError(f"{key}: source {raw['name']!r} needs exactly one of 'path' or 'hf_dataset'")
        return SourceSpec(**{k: str(v) for k, v in raw.items()})


def _python_docs() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield topic, topics[topic]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _python_stdlib() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        yield str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace")


def _local_files(spec: SourceSpec) -> Iterator[tuple[str, str]]:
    paths = sorted(glob.glob(spec.path, recursive=True))
    if not paths:
        raise PipelineError(f"collect.sources: {spec.name}: no file matches path {spec.path!r}")
    for path in paths:
        raw = Path(path).read_bytes()
        if b"\x00" in raw[:8192]:
            raise PipelineError(f"collect.sources: {spec.name}: {path} looks binary (NUL bytes); expected UTF-8 text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PipelineError(f"collect.sources: {spec.name}: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        if path.endswith(".jsonl"):
            for line_no, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PipelineError(f"collect.sources: {path}:{line_no}: bad JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(spec.field), str):
                    raise PipelineError(f"collect.sources: {path}:{line_no}: no string field {spec.field!r}")
                yield f"{Path(path).name}:{line_no}", record[spec.field]
        else:
            yield Path(path).name, text


def _hf_dataset(spec: SourceSpec) -> Iterator[tuple[str, str]]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.hf_dataset, spec.config, split=spec.split, streaming=True)
    except Exception as err:  # datasets raises many types; the user needs the id and the reason
        raise PipelineError(f"collect.sources: cannot load HF dataset {spec.hf_dataset!r}: {type(err).__name__}: {err}".splitlines()[0]) from None
    for index, record in enumerate(dataset):
        text = record.get(spec.field)
        if not isinstance(text, str):
            raise PipelineError(f"collect.sources: {spec.hf_dataset}: record {index} has no string field {spec.field!r}")
        yield f"{index}", text


def iter_documents(spec: SourceSpec, seed: int) -> Iterator[tuple[str, str]]:
    """Yield (document_id, text) for a source; built-ins in a seeded random document order."""
    if spec.path is not None:
        yield from _local_files(spec)
    elif spec.hf_dataset is not None:
        yield from _hf_dataset(spec)
    else:
        documents = list(_python_docs() if spec.name == "python-docs" else _python_stdlib())
        random.Random(f"{seed}:{spec.name}").shuffle(documents)
        yield from documents


def source_fingerprint() -> str:
    """The Python version whose built-in text the built-in sources read (their content depends on it)."""
    return sys.version.split()[0]
