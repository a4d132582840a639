"""Fold a stream of records into an AdapterState, a batch of short documents at a time.

Every document is read on its own (its chunks never see another document). Short documents
are batched into one `ga.read` call and their rows folded into the single state exactly as if
they had been read one after the other (also with decay). Long documents are tokenised and
read in bounded segments, so a 1 MB document costs no more memory than a short one.

`committed` is always a consistent pair: the state and, in its metadata, the bookkeeping of
exactly the records folded into it. A stop or a crash between commits loses nothing committed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..model import GenerativeAdapter
from ..state import AdapterState
from .checkpoint import StopRequested, source_progress, with_progress
from .sources import Record

PIECE_CHARS = 16_384  # text tokenised at a time
SEGMENT_CHUNKS = 32  # chunks read per call for long documents


def split_text(text: str, max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Pieces of at most `max_chars`, cut before a whitespace when there is one (so that BPE
    tokenisers, which attach a leading space to the next word, tokenise the pieces as a whole)."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        cut = cut if cut > start + max_chars // 2 else end
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def token_segments(
    text: str, tokenizer, segment_tokens: int, piece_chars: int = PIECE_CHARS
) -> Iterator[list[int]]:
    """Token ids of `text` in segments of `segment_tokens` (a multiple of the chunk length, so
    chunk boundaries are those of the whole document), tokenising `piece_chars` at a time."""
    buf: list[int] = []
    for piece in split_text(text, piece_chars):
        buf.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        while len(buf) > segment_tokens:
            yield buf[:segment_tokens]
            buf = buf[segment_tokens:]
    if buf:
        yield buf


def fold_rows(
    state: AdapterState, rows: AdapterState, chunks: list[int], gamma: float
) -> AdapterState:
    """Add the rows of a batch read from empty states into the one-row `state`, as if read in order.

    Reading chunk by chunk does S <- gamma S + dS, so row i is weighted by gamma to the number
    of chunks that follow it, and the old state by gamma to the number of all new chunks.
    """
    after = torch.tensor([sum(chunks[i + 1 :]) for i in range(len(chunks))], dtype=rows.n.dtype)
    weight = (gamma**after).to(rows.device)
    old = gamma ** sum(chunks)
    S = {
        k: s * old + (rows.S[k] * weight[:, None, None]).sum(0, keepdim=True)
        for k, s in state.S.items()
    }
    n = state.n * old + (rows.n * weight).sum(0, keepdim=True)
    return AdapterState(S, n, state.generator, state.config, dict(state.metadata))


@dataclass
class Stats:
    """Counters of this run (the state's metadata holds the totals over all runs)."""

    documents: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)


class StreamReader:
    """Reads records of one source into a state; see the module docstring.

    on_commit(state, stats) runs after every commit (progress display, checkpoints);
    on_skip(record) after a skipped record; should_stop() is polled between documents and
    between segments of a long document (a partly read document is dropped, not committed).
    """

    def __init__(
        self,
        ga: GenerativeAdapter,
        state: AdapterState,
        source_key: str,
        *,
        start: int = 0,
        decay: float | None = None,
        batch_size: int = 1,
        segment_chunks: int = SEGMENT_CHUNKS,
    ):
        if ga.tokenizer is None:
            raise ValueError("reading text needs the base LM's tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        ga.check_state(state, 1)
        self.ga, self.key = ga, source_key
        self.gamma = ga.config.decay if decay is None else float(decay)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.gamma}")
        self.batch_size = batch_size
        self.segment_tokens = ga.config.chunk_len * segment_chunks
        progress = source_progress(state.metadata, source_key)
        progress["position"] = start
        self.committed = state.clone()
        self.committed.metadata = with_progress(state.metadata, source_key, progress)
        self.stats = Stats()
        self.on_commit: Callable[[AdapterState, Stats], None] | None = None
        # documents tokenised but not yet folded in, and records consumed since the last commit
        self._pending: list[list[int]] = []
        self._pending_records = 0
        self._pending_skips: dict[str, int] = {}

    # --- the loop ----------------------------------------------------------------------------
    @torch.no_grad()  # ga.read keeps an autograd graph when grad is on: it would grow per document
    def run(
        self,
        records: Iterable[Record],
        on_commit: Callable[[AdapterState, Stats], None] | None = None,
        on_skip: Callable[[Record], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        fetch: Callable[[Iterator[Record]], Record | None] | None = None,
        input_ready: Callable[[], bool] | None = None,
    ) -> AdapterState:
        """Read until the records end or should_stop(); returns the committed state.

        fetch(iterator) gets the next record (None at the end); the CLI wraps it so that a
        signal can interrupt a blocking read of stdin (StopRequested ends the loop).
        input_ready() says whether more input is at hand: when it is not, pending documents
        are read at once rather than held back until a batch is full (`tail -f`).
        """
        self.on_commit = on_commit
        it = iter(records)
        fetch = fetch or (lambda i: next(i, None))
        while not should_stop():
            if self._pending and input_ready is not None and not input_ready():
                self.flush()
            try:
                record = fetch(it)
            except StopRequested:
                break
            if record is None:
                break
            if record.ok:
                self._add_document(record.text, should_stop)
                continue
            self._skip_pending(record.reason)
            if on_skip:
                on_skip(record)
            if not self._pending:
                self.flush()
        self.flush()
        return self.committed

    def _add_document(self, text: str, should_stop: Callable[[], bool]) -> None:
        segments = token_segments(text, self.ga.tokenizer, self.segment_tokens)
        first = next(segments, None)
        second = next(segments, None) if first is not None else None
        if first is None:  # a tokenizer that yields nothing: nothing to read
            self._skip_pending("empty")
            return
        if second is None:  # short: batch it
            self._pending.append(first)
            self._pending_records += 1
            if len(self._pending) >= self.batch_size:
                self.flush()
            return
        self.flush()  # long: on its own, segment by segment, committed only when complete
        state, tokens = self.committed, 0
        for segment in _chain(first, second, segments):
            if should_stop():
                return  # dropped: the committed state never saw a part of it
            state = self.ga.read([segment], state, decay=self.gamma)
            tokens += len(segment)
        self._commit(state, records=1, documents=1, tokens=tokens)

    def _skip_pending(self, reason: str) -> None:
        self._pending_records += 1
        self._pending_skips[reason] = self._pending_skips.get(reason, 0) + 1

    # --- commits -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Fold the pending documents (and skipped records) into the committed state."""
        if not self._pending and not self._pending_records:
            return
        state, docs = self.committed, self._pending
        if len(docs) == 1:
            state = self.ga.read(docs, state, decay=self.gamma)
        elif docs:
            rows = self.ga.read(docs, None, decay=self.gamma)
            chunks = [math.ceil(len(d) / self.ga.config.chunk_len) for d in docs]
            state = fold_rows(state, rows, chunks, self.gamma)
        self._commit(
            state, self._pending_records, len(docs), sum(len(d) for d in docs), self._pending_skips
        )

    def _commit(
        self,
        state: AdapterState,
        records: int,
        documents: int,
        tokens: int,
        skipped: dict[str, int] | None = None,
    ) -> None:
        progress = source_progress(self.committed.metadata, self.key)
        progress["position"] += records
        progress["documents"] += documents
        progress["tokens"] += tokens
        for reason, count in (skipped or {}).items():
            progress["skipped"][reason] = progress["skipped"].get(reason, 0) + count
            self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + count
        metadata = with_progress(self.committed.metadata, self.key, progress)
        # a new object even when only skips are committed: published states never change
        state = AdapterState(state.S, state.n, state.generator, state.config, metadata)
        self.committed = state  # one assignment: state and bookkeeping change together
        self.stats.documents += documents
        self.stats.tokens += tokens
        self._pending, self._pending_records, self._pending_skips = [], 0, {}
        if self.on_commit:
            self.on_commit(self.committed, self.stats)


def _chain(first: list[int], second: list[int], rest: Iterator[list[int]]) -> Iterator[list[int]]:
    yield first
    yield second
    yield from rest
