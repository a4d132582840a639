"""Resume bookkeeping, atomic checkpoints and clean stops on SIGINT/SIGTERM.

A state's metadata says what it has read, per source key:

    metadata["sources"][key] = {"position": records consumed (read or skipped) in the last pass,
                                "documents": documents read, "tokens": tokens read,
                                "skipped": {reason: count}}

`--resume` skips `position` records of the same source, so a killed run continues exactly
where its last checkpoint left off. Checkpoints go through `AdapterState.save` (temporary
file, fsync, rename): a crash in the middle of a write leaves the previous file intact.
"""

from __future__ import annotations

import copy
import errno
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..state import AdapterState

SOURCES = "sources"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous state file is untouched."""


def source_progress(metadata: dict[str, Any], key: str) -> dict[str, Any]:
    """A copy of the bookkeeping of `key` (zeros for a source never read)."""
    entry = metadata.get(SOURCES, {}).get(key, {})
    return {
        "position": int(entry.get("position", 0)),
        "documents": int(entry.get("documents", 0)),
        "tokens": int(entry.get("tokens", 0)),
        "skipped": {k: int(v) for k, v in entry.get("skipped", {}).items()},
    }


def with_progress(metadata: dict[str, Any], key: str, progress: dict[str, Any]) -> dict[str, Any]:
    """New metadata with `key`'s bookkeeping replaced (the input is not modified)."""
    out = copy.deepcopy(metadata)
    out.setdefault(SOURCES, {})[key] = copy.deepcopy(progress)
    return out


def merge_metadata(metadatas: list[dict[str, Any]]) -> dict[str, Any]:
    """Metadata of a sum of states: per-source documents, tokens and skips add up.

    `position` is the furthest any of them reached in that source (the states may have read
    the same records, or disjoint shards: only the counts are exact, not the resume point).
    """
    sources: dict[str, dict[str, Any]] = {}
    for meta in metadatas:
        for key in meta.get(SOURCES, {}):
            mine, theirs = source_progress({SOURCES: sources}, key), source_progress(meta, key)
            mine["position"] = max(mine["position"], theirs["position"])
            mine["documents"] += theirs["documents"]
            mine["tokens"] += theirs["tokens"]
            for reason, count in theirs["skipped"].items():
                mine["skipped"][reason] = mine["skipped"].get(reason, 0) + count
            sources[key] = mine
    return {SOURCES: sources, "merged_from": len(metadatas)}


def total_documents(metadata: dict[str, Any]) -> int:
    return sum(source_progress(metadata, k)["documents"] for k in metadata.get(SOURCES, {}))


def save_checkpoint(state: AdapterState, path: str | Path) -> None:
    """Atomic save with a clear error; on failure the previous file is left as it was."""
    try:
        state.save(path)
    except OSError as e:
        why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise CheckpointError(
            f"could not write the state to {path} ({why}); the previous state file is intact"
        ) from e


class Checkpointer:
    """Saves every `every` documents (0: only at the end)."""

    def __init__(self, path: str | Path, every: int = 0):
        if every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {every}")
        self.path, self.every = Path(path), every
        self.saves = 0
        self._last_documents = 0

    def maybe_save(self, state: AdapterState, documents: int) -> bool:
        """Save if `every` documents passed since the last save; True when it did."""
        if self.every and documents - self._last_documents >= self.every:
            self.save(state, documents)
            return True
        return False

    def save(self, state: AdapterState, documents: int) -> None:
        save_checkpoint(state, self.path)
        self.saves += 1
        self._last_documents = documents


class StopRequested(BaseException):
    """Raised (from a signal handler) to leave a blocking read of the input."""


class GracefulStop:
    """SIGINT/SIGTERM set `requested`; the reader finishes the document at hand, saves, exits.

    While the reader waits for input (`waiting()`: e.g. stdin behind `tail -f`), a signal
    raises StopRequested instead, since a blocked read would never reach the next check.
    Only the main thread can install handlers; elsewhere this is inert.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._waiting = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        if self._waiting:
            self._waiting = False
            raise StopRequested(self.requested)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Signals interrupt the block at once (nothing half-done can be lost inside it)."""
        if self.requested:
            raise StopRequested(self.requested)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
