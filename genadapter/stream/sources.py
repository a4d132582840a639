"""Document sources: files, stdin and streaming datasets, as records with bad-input handling.

Every input unit becomes a `Record` with a position, also when it is unusable (invalid UTF-8,
malformed JSON, missing field, empty, binary garbage, oversize): the reader counts and skips
those, and the position lets `--resume` skip exactly what a state has already consumed.

Text formats (chosen so that a stream behind `tail -f` is processed as it arrives):
- `text`: documents separated by one or more blank lines (paragraph mode). A document is
  emitted when the blank line that ends it arrives, or at end of input.
- `lines`: one document per line.
- `jsonl`: one JSON object per line, the text in a field (default "text").
"""

from __future__ import annotations

import json
import select
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMATS = ("text", "lines", "jsonl")
MAX_DOC_BYTES = 16 * 2**20  # larger documents are skipped (counted as "oversize")
_CONTROLS = bytes(b for b in range(32) if b not in (9, 10, 12, 13))  # all but tab, LF, FF, CR


@dataclass(frozen=True)
class Record:
    """One input unit at `index` in its source: `text` to read, or `reason` why it is skipped."""

    index: int
    text: str | None
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.text is not None


def looks_binary(data: bytes) -> bool:
    """NUL bytes or many control characters: not text, whatever the encoding says."""
    if b"\x00" in data:
        return True
    if not data:
        return False
    controls = len(data) - len(data.translate(None, _CONTROLS))
    return controls > 0.1 * len(data)


def decode(data: bytes) -> tuple[str | None, str | None, str]:
    """(text, None, "") for usable text, else (None, reason, detail)."""
    if looks_binary(data):
        return None, "binary", f"{len(data)} bytes of binary data"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", f"invalid UTF-8 at byte {e.start}"
    if not text.strip():
        return None, "empty", "empty document"
    return text, None, ""


def _lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(line, too_long) pairs; never holds more than `max_bytes` of one line in memory.

    `readline` returns as soon as a line is complete, so a pipe (`tail -f`) streams.
    """
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := stream.readline(max_bytes)) and not rest.endswith(b"\n"):
                pass  # drop the rest of an oversize line
            yield b"", True
        else:
            yield line, False


def text_records(stream: IO[bytes], max_bytes: int = MAX_DOC_BYTES) -> Iterator[Record]:
    """Paragraph mode: documents separated by blank lines."""
    index, parts, size, oversize = 0, [], 0, False

    def flush() -> Record:
        if oversize:
            return Record(index, None, "oversize", f"document over {max_bytes} bytes")
        text, reason, detail = decode(b"".join(parts).rstrip(b"\r\n"))
        return Record(index, text, reason, detail)

    for line, too_long in _lines(stream, max_bytes):
        if not too_long and not line.strip():  # a blank line ends the current document
            if parts or oversize:
                yield flush()
                index, parts, size, oversize = index + 1, [], 0, False
            continue
        size += len(line) if not too_long else max_bytes + 1
        if too_long or size > max_bytes:
            oversize, parts = True, []
        elif not oversize:
            parts.append(line)
    if parts or oversize:
        yield flush()


def line_records(stream: IO[bytes], max_bytes: int = MAX_DOC_BYTES) -> Iterator[Record]:
    """One document per line."""
    for index, (line, too_long) in enumerate(_lines(stream, max_bytes)):
        if too_long:
            yield Record(index, None, "oversize", f"line over {max_bytes} bytes")
        else:
            yield Record(index, *decode(line.rstrip(b"\r\n")))


def field_text(obj: Any, field: str) -> tuple[str | None, str | None, str]:
    """The text in `obj[field]`, or why there is none."""
    if not isinstance(obj, dict):
        return None, "malformed_json", f"expected a JSON object, got {type(obj).__name__}"
    if field not in obj:
        return None, "missing_field", f"no field {field!r} (fields: {sorted(obj)[:8]})"
    value = obj[field]
    if not isinstance(value, str):
        return None, "missing_field", f"field {field!r} is {type(value).__name__}, not a string"
    if not value.strip():
        return None, "empty", f"field {field!r} is empty"
    return value, None, ""


def jsonl_records(
    stream: IO[bytes], field: str = "text", max_bytes: int = MAX_DOC_BYTES
) -> Iterator[Record]:
    """One JSON object per line, the document in `field`."""
    for index, (line, too_long) in enumerate(_lines(stream, max_bytes)):
        if too_long:
            yield Record(index, None, "oversize", f"line over {max_bytes} bytes")
            continue
        raw, reason, detail = decode(line)
        if raw is None:
            yield Record(index, None, reason, detail)
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            yield Record(
                index, None, "malformed_json", f"malformed JSON ({e.msg} at column {e.colno})"
            )
            continue
        yield Record(index, *field_text(obj, field))


def stream_records(
    stream: IO[bytes], fmt: str = "text", field: str = "text", max_bytes: int = MAX_DOC_BYTES
) -> Iterator[Record]:
    """Records of a binary stream in one of FORMATS."""
    if fmt == "text":
        return text_records(stream, max_bytes)
    if fmt == "lines":
        return line_records(stream, max_bytes)
    if fmt == "jsonl":
        return jsonl_records(stream, field, max_bytes)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def example_records(
    examples: Iterable[Any], field: str = "text", start: int = 0
) -> Iterator[Record]:
    """Records of dataset examples (dicts), numbered from `start`."""
    for index, example in enumerate(examples, start):
        yield Record(index, *field_text(example, field))


def dataset_records(
    name: str, split: str, field: str = "text", config: str | None = None, skip: int = 0
) -> Iterator[Record]:
    """A streaming `datasets` source; `skip` examples are skipped by the library (cheap resume)."""
    from datasets import load_dataset

    ds = load_dataset(name, config, split=split, streaming=True)
    if skip:
        ds = ds.skip(skip)
    return example_records(ds, field, start=skip)


@dataclass(frozen=True)
class Source:
    """A named record stream. `key` identifies it in a state's metadata (for `--resume`)."""

    key: str
    records: Iterator[Record]
    skipped: int  # records already skipped (resume)
    ready: Callable[[], bool] | None = None  # is more input at hand now? (None: always)


def skip_records(records: Iterator[Record], count: int) -> Iterator[Record]:
    """Drop the first `count` records (already in the state)."""
    for record in records:
        if record.index >= count:
            yield record


def _ready(stream: IO[bytes]) -> Callable[[], bool] | None:
    """For a pipe or terminal: whether bytes are waiting (select with no timeout)."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return lambda: bool(select.select([stream], [], [], 0)[0])


def source_key(
    path: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    fmt: str = "text",
    dataset_config: str | None = None,
) -> str:
    """The name under which a state's metadata counts what it read from this source."""
    if (path is None) == (dataset is None):
        raise ValueError("give exactly one of an input path ('-' for stdin) or a dataset")
    if dataset is not None:
        return f"dataset:{dataset}" + (f"/{dataset_config}" if dataset_config else "") + f":{split}"
    if path == "-":
        return f"stdin:{fmt}"
    return f"file:{Path(path).resolve()}:{fmt}"


def open_source(
    path: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    fmt: str = "text",
    field: str = "text",
    dataset_config: str | None = None,
    skip: int = 0,
    stdin: IO[bytes] | None = None,
    max_bytes: int = MAX_DOC_BYTES,
) -> Source:
    """A file path, "-" for stdin, or a streaming dataset name, positioned after `skip` records."""
    key = source_key(path, dataset, split, fmt, dataset_config)
    if dataset is not None:
        return Source(key, dataset_records(dataset, split, field, dataset_config, skip), skip)
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        records = skip_records(stream_records(stream, fmt, field, max_bytes), skip)
        return Source(key, records, skip, _ready(stream))
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no input file at {file}")

    def records() -> Iterator[Record]:
        with open(file, "rb") as f:
            yield from skip_records(stream_records(f, fmt, field, max_bytes), skip)

    return Source(key, records(), skip)
