"""Tenant states on disk: one `<tenant>.safetensors` per tenant, replaced whole.

A read takes the tenant's lock, computes a new state from the current one, saves it atomically
(temp, fsync, rename) and only then swaps the reference and answers: an acknowledged read is on
disk, and concurrent reads of one tenant apply one after the other (none lost, none twice).
Requests only ever see a whole state, old or new. Model compute of a read takes the model lock
per `ga.read` call, so decode steps of the batch scheduler interleave with long reads.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..state import AdapterState, StateMismatchError
from ..stream.checkpoint import CheckpointError, save_checkpoint, source_progress, total_documents
from ..stream.reader import StreamReader
from ..stream.sources import Record, field_text
from .keys import check_tenant

SOURCE = "http"


class ServeError(Exception):
    """An error the client gets as JSON with this HTTP status (and OpenAI error type)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class FairLock:
    """A FIFO lock: waiters get it in arrival order, so a decode loop that re-takes the lock
    every step cannot starve a read waiting for it (threading.Lock makes no such promise)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0

    def __enter__(self) -> FairLock:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class LockedReads:
    """The adapter as StreamReader sees it, with every `read` under the model lock."""

    def __init__(self, ga, lock: FairLock):
        self._ga, self._lock = ga, lock

    def read(self, *args: Any, **kwargs: Any):
        with self._lock:
            return self._ga.read(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ga, name)


class TenantStore:
    def __init__(self, ga, state_dir: str | Path, model_lock: FairLock):
        self.ga = ga
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.reader_ga = LockedReads(ga, model_lock)
        self.states: dict[str, AdapterState] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._registry = threading.Lock()

    def path(self, tenant: str) -> Path:
        return self.dir / f"{check_tenant(tenant)}.safetensors"

    def lock(self, tenant: str) -> threading.Lock:
        with self._registry:
            return self._locks.setdefault(tenant, threading.Lock())

    def get(self, tenant: str) -> AdapterState:
        """The tenant's current state (a snapshot: never modified after it is published)."""
        state = self.states.get(tenant)
        if state is not None:
            return state
        with self.lock(tenant):
            return self._current(tenant)

    def _current(self, tenant: str) -> AdapterState:
        if tenant not in self.states:
            self.states[tenant] = self._load(tenant)
        return self.states[tenant]

    def _load(self, tenant: str) -> AdapterState:
        path = self.path(tenant)
        if not path.exists():
            return self.ga.new_state()
        try:
            state = AdapterState.load(path)
            self.ga.check_state(state, 1)
        except StateMismatchError as e:
            raise ServeError(409, f"your state was read by another generator: {e}") from e
        except ValueError as e:
            raise ServeError(409, f"your state file is unreadable: {e}") from e
        return state

    def read(self, tenant: str, texts: list[str]) -> dict[str, Any]:
        with self.lock(tenant):
            current = self._current(tenant)
            start = source_progress(current.metadata, SOURCE)["position"]
            reader = StreamReader(self.reader_ga, current, SOURCE, start=start, batch_size=8)
            records = [
                Record(start + i, *field_text({"text": t}, "text")) for i, t in enumerate(texts)
            ]
            new = reader.run(records)
            self._save(tenant, new)
            self.states[tenant] = new  # the swap, after the state is on disk
        stats = reader.stats
        return {
            "documents_read": stats.documents,
            "tokens_read": stats.tokens,
            "skipped": stats.skipped,
            **self.info(new),
        }

    def _save(self, tenant: str, state: AdapterState) -> None:
        try:
            save_checkpoint(state, self.path(tenant))
        except CheckpointError as e:
            raise ServeError(507, str(e), "server_error") from e

    def reset(self, tenant: str) -> dict[str, Any]:
        """Forget everything read: the file goes (durably), the state is empty again."""
        with self.lock(tenant):
            self.path(tenant).unlink(missing_ok=True)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self.states[tenant] = state = self.ga.new_state()
        return self.info(state)

    def export(self, tenant: str) -> bytes:
        """The state as a state file (what `merge-states` and `export-lora` take)."""
        with self.lock(tenant):
            path = self.path(tenant)
            if path.exists():
                return path.read_bytes()
            state = self._current(tenant)
        with tempfile.TemporaryDirectory() as tmp:
            state.save(Path(tmp) / "state.safetensors")
            return (Path(tmp) / "state.safetensors").read_bytes()

    def info(self, state: AdapterState) -> dict[str, Any]:
        return {
            "tokens": float(state.n.sum()),
            "documents": total_documents(state.metadata),
            "bytes": state.nbytes,
            "generator": state.generator,
        }
