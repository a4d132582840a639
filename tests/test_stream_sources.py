"""Document sources: formats, bad input classified and counted, never a crash, resume skips."""

from __future__ import annotations

import io
import json

import pytest

from genadapter.stream.checkpoint import merge_metadata, source_progress, with_progress
from genadapter.stream.reader import split_text
from genadapter.stream.sources import (
    jsonl_records,
    line_records,
    looks_binary,
    open_source,
    source_key,
    text_records,
)


def reasons(records) -> list:
    return [r.reason if not r.ok else r.text for r in records]


def test_text_format_paragraphs():
    raw = b"first doc\nstill first\n\n\n  \nsecond\r\n\r\nthird\n"
    assert reasons(text_records(io.BytesIO(raw))) == ["first doc\nstill first", "second", "third"]
    assert [r.index for r in text_records(io.BytesIO(raw))] == [0, 1, 2]


def test_bad_records_are_classified_and_stream_goes_on():
    garbage = bytes(range(256)) * 4  # NULs and control bytes: binary
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "caf\xe9 latin-1"}',  # invalid UTF-8
        b'{"text": "unterminated',  # malformed JSON
        json.dumps({"title": "no text"}).encode(),  # missing field
        json.dumps({"text": 42}).encode(),  # wrong type
        json.dumps({"text": "   "}).encode(),  # empty document
        json.dumps(["not", "an", "object"]).encode(),
        garbage.replace(b"\n", b" "),
        b"",  # blank line
        json.dumps({"text": "good two"}).encode(),
    ]
    records = list(jsonl_records(io.BytesIO(b"\n".join(lines) + b"\n")))
    assert reasons(records) == [
        "good one",
        "invalid_utf8",
        "malformed_json",
        "missing_field",
        "missing_field",
        "empty",
        "malformed_json",
        "binary",
        "empty",
        "good two",
    ]
    assert [r.index for r in records] == list(range(10))
    assert all(r.detail for r in records if not r.ok)


def test_lines_format_and_oversize():
    raw = b"one\n\xff\xfe\n" + b"x" * 100 + b"\n\nlast"
    records = list(line_records(io.BytesIO(raw), max_bytes=50))
    assert reasons(records) == ["one", "invalid_utf8", "oversize", "empty", "last"]
    # paragraph mode: an oversize document is skipped whole, the next one is read
    raw = b"a\n" + b"y" * 30 + b"\n" + b"z" * 30 + b"\n\nnext\n"
    assert reasons(text_records(io.BytesIO(raw), max_bytes=50)) == ["oversize", "next"]


def test_looks_binary():
    assert looks_binary(b"abc\x00def")
    assert looks_binary(bytes(range(32)) * 3)
    assert not looks_binary("Ünïcödé text\twith tabs\r\n".encode())


def test_resume_skips_exactly(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(7)))
    source = open_source(str(path), fmt="jsonl", skip=4)
    assert [r.text for r in source.records] == ["doc 4", "doc 5", "doc 6"]
    assert source.key == source_key(str(path), fmt="jsonl") and source.key.startswith("file:")
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError):
        open_source(None, None)
    stdin = open_source("-", fmt="lines", stdin=io.BytesIO(b"a\nb\nc\n"), skip=1)
    assert stdin.key == "stdin:lines" and [r.text for r in stdin.records] == ["b", "c"]


def test_split_text_bounds_and_reassembles():
    text = "word " * 5000 + "x" * 3000
    pieces = list(split_text(text, 1000))
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:-3])  # cut before a space


def test_metadata_bookkeeping_and_merge():
    a = with_progress(
        {}, "k", {"position": 5, "documents": 4, "tokens": 40, "skipped": {"empty": 1}}
    )
    b = with_progress(
        {}, "k", {"position": 3, "documents": 3, "tokens": 30, "skipped": {"binary": 2}}
    )
    b = with_progress(b, "other", {"position": 2, "documents": 2, "tokens": 9, "skipped": {}})
    merged = merge_metadata([a, b])
    assert source_progress(merged, "k") == {
        "position": 5,
        "documents": 7,
        "tokens": 70,
        "skipped": {"empty": 1, "binary": 2},
    }
    assert source_progress(merged, "other")["documents"] == 2
    assert source_progress(merged, "never")["position"] == 0
    assert source_progress(a, "k")["documents"] == 4  # inputs untouched


def test_dataset_source_skips_through_the_library(monkeypatch):
    """The streaming-datasets path (no network here): skip is delegated, indices continue."""
    import datasets

    class FakeStream:
        def __init__(self, rows):
            self.rows = rows

        def skip(self, n):
            return FakeStream(self.rows[n:])

        def __iter__(self):
            return iter(self.rows)

    rows = [{"text": "a"}, {"text": ""}, {"body": "x"}, {"text": "d"}]
    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return FakeStream(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = open_source(dataset="org/corpus", split="train", skip=1)
    assert source.key == "dataset:org/corpus:train"
    assert [(r.index, r.text, r.reason) for r in source.records] == [
        (1, None, "empty"),
        (2, None, "missing_field"),
        (3, "d", None),
    ]
    assert calls == [("org/corpus", None, "train", True)]
