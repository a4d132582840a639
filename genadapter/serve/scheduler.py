"""The batching scheduler: one model thread decodes every tenant's request in one batch.

Requests (prompt ids, the caller's state, max_tokens, temperature, stop strings) queue up. The
model thread runs a loop of steps; each step is either the prefill of the requests that arrived
(gathered for up to `gather_ms` when the batch is idle, so that simultaneous arrivals prefill
together) or one decode step of the whole running batch. Rows join at step boundaries: the new
rows are prefilled on their own, left-padded, and their KV cache is concatenated to the running
one (the shorter one left-padded with masked zeros), so nobody waits for a batch to drain; rows
leave as soon as they finish. Each row's adapter (its LoRA, `ga.row_loras`: the ridge solve
happens there) is made once, at its prefill, and rides along with the row; every forward hooks
the batch's adapters on (`ga.side_paths`): rows of different tenants run together, each with
its own adapter.

Every forward takes the model lock (FIFO), which reads also take per `ga.read` call: a state is
applied through forward hooks, which must not leak into a concurrent forward.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from ..chunking import join_left
from ..compat import cache_argument
from ..generator import LoRA
from ..queries import PooledFeatures
from ..state import AdapterState
from .store import FairLock


@dataclass
class Job:
    """One generate request. `emit` is called from the model thread with ("delta", text),
    then ("done", finish_reason, completion_tokens) or ("error", message)."""

    ids: list[int]
    state: AdapterState
    max_tokens: int
    emit: Callable[..., None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    cancelled: bool = False  # set by the server when the client went away
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    rng: torch.Generator | None = None


@dataclass
class Batch:
    """The running rows: their KV cache, attention mask (b, L), next input token, position and
    adapter (one LoRA A row per batch row, per target)."""

    jobs: list[Job]
    cache: DynamicCache
    mask: Tensor
    last: Tensor
    pos: Tensor
    lora: dict[str, LoRA]
    windows: PooledFeatures | None = None  # pooled queries' windows (ga.query_windows)


def merge(a: Batch | None, b: Batch | None) -> Batch | None:
    """One batch of the rows of both: caches and masks left-padded to a common length (the
    padding is masked out, and positions are explicit, so no row sees it)."""
    if a is None or b is None:
        return b if a is None else a
    layers = [
        (join_left(la.keys, lb.keys, 2), join_left(la.values, lb.values, 2))
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)
    ]
    cache = DynamicCache(ddp_cache_data=layers)
    windows = None
    if a.windows is not None:
        windows = a.windows.joined(b.windows)
        windows.follow(cache)
    return Batch(
        a.jobs + b.jobs,
        cache,
        join_left(a.mask, b.mask, 1),
        torch.cat([a.last, b.last]),
        torch.cat([a.pos, b.pos]),
        {k: la._replace(A=torch.cat([la.A, b.lora[k].A])) for k, la in a.lora.items()},
        windows,
    )


def keep(batch: Batch, rows: list[int]) -> Batch | None:
    """The batch without the rows that finished (None when none is left)."""
    if not rows:
        return None
    if len(rows) == len(batch.jobs):
        return batch
    idx = torch.tensor(rows, device=batch.mask.device)
    mask = batch.mask[idx]
    start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding for all
    layers = [
        (layer.keys[idx, :, start:], layer.values[idx, :, start:]) for layer in batch.cache.layers
    ]
    cache = DynamicCache(ddp_cache_data=layers)
    if batch.windows is not None:
        batch.windows.select(idx)
        batch.windows.follow(cache)
    return Batch(
        [batch.jobs[i] for i in rows],
        cache,
        mask[:, start:],
        batch.last[idx],
        batch.pos[idx],
        {k: lora._replace(A=lora.A[idx]) for k, lora in batch.lora.items()},
        batch.windows,
    )


class Scheduler:
    """The model thread and its queue; `submit` is thread-safe, `close` stops the thread."""

    def __init__(
        self,
        ga,
        lock: FairLock,
        max_batch: int = 16,
        gather_ms: float = 5.0,
        max_waiting: int = 256,
    ):
        self.ga, self.lock = ga, lock
        self.tokenizer = ga.tokenizer
        self.max_batch, self.gather_s, self.max_waiting = max_batch, gather_ms / 1000, max_waiting
        self.eos = eos_ids(ga)
        self.cache_arg = cache_argument(ga.base_model)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.steps = 0  # forwards run, and rows in them: batch sizes for /health and the bench
        self.rows = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="genadapter-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full or closed (the server answers 503)."""
        if self._closed or self.queue.qsize() >= self.max_waiting:
            return False
        if job.temperature > 0:
            job.rng = torch.Generator(device=self.ga.device)
            job.rng.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
        self.queue.put(job)
        return True

    def close(self) -> None:
        self._closed = True
        self.queue.put(None)
        self._thread.join(timeout=30)

    # --- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        batch: Batch | None = None
        while not self._closed:
            new = self._take(self.max_batch - (len(batch.jobs) if batch else 0), batch is None)
            try:
                if new:
                    batch = merge(batch, self._prefill(new)) if self._live(new) else batch
                elif batch is not None:
                    batch = self._decode(batch)
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                failed = {id(j): j for j in (batch.jobs if batch else []) + new}
                for job in failed.values():
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
                batch = None
        for job in batch.jobs if batch else []:
            job.emit("error", "the server is shutting down")
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if job is not None:
                job.emit("error", "the server is shutting down")

    def _take(self, room: int, idle: bool) -> list[Job]:
        """Jobs to start now: when idle, block for one, then gather more for `gather_s`; when a
        batch runs, only what is already waiting (the running rows must not stall)."""
        jobs: list[Job] = []
        if room <= 0:
            return jobs
        if idle:
            job = self.queue.get()
            if job is None:
                return jobs
            jobs.append(job)
        deadline = time.perf_counter() + (self.gather_s if idle else 0.0)
        while len(jobs) < room:
            try:
                wait = deadline - time.perf_counter()
                job = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._closed = True
                break
            jobs.append(job)
        return jobs

    def _live(self, jobs: list[Job]) -> bool:
        jobs[:] = [j for j in jobs if not j.cancelled]
        return bool(jobs)

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache, lora, windows) -> Tensor:
        """Logits of each row's next token, with each row's adapter applied."""
        with self.lock, torch.no_grad(), self.ga.side_paths(lora, windows=windows):
            out = self.ga.base_model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_arg: cache},
            )
        self.steps += 1
        self.rows += ids.shape[0]
        return out.logits[:, -1].float()

    def _prefill(self, jobs: list[Job]) -> Batch | None:
        device = self.ga.device
        length = max(len(j.ids) for j in jobs)
        ids = torch.tensor([[self.pad] * (length - len(j.ids)) + j.ids for j in jobs])
        mask = torch.tensor([[0] * (length - len(j.ids)) + [1] * len(j.ids) for j in jobs])
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        state = AdapterState.stack([j.state for j in jobs]).to(device)
        with torch.no_grad():
            lora = self.ga.row_loras(state)
        cache, windows = DynamicCache(), self.ga.query_windows()
        logits = self._forward(ids, mask, pos, cache, lora, windows)
        lengths = torch.tensor([len(j.ids) for j in jobs], device=device)
        batch = Batch(jobs, cache, mask, ids[:, -1], lengths, lora, windows)
        return self._advance(batch, logits)

    def _decode(self, batch: Batch) -> Batch | None:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.jobs), 1)], 1)
        logits = self._forward(
            batch.last[:, None],
            batch.mask,
            batch.pos[:, None],
            batch.cache,
            batch.lora,
            batch.windows,
        )
        batch.pos = batch.pos + 1
        return self._advance(batch, logits)

    def _advance(self, batch: Batch, logits: Tensor) -> Batch | None:
        """Sample each row's next token, stream its text, drop the rows that are done."""
        tokens = self._sample(batch.jobs, logits)
        batch.last = tokens
        running = [i for i, job in enumerate(batch.jobs) if not self._push(job, int(tokens[i]))]
        return keep(batch, running)

    def _sample(self, jobs: list[Job], logits: Tensor) -> Tensor:
        tokens = logits.argmax(-1)
        for i, job in enumerate(jobs):
            if job.temperature > 0:
                tokens[i] = sample(logits[i], job.temperature, job.top_p, job.rng)
        return tokens

    def _push(self, job: Job, token: int) -> bool:
        """Add a token to the job and emit what text is final; True when the job is done."""
        if job.cancelled:
            return True
        reason = "stop" if token in self.eos and not job.ignore_eos else None
        if reason is None:
            job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None and len(job.tokens) >= job.max_tokens:
            reason = "length"
        end = len(text) if reason else safe_end(text, job.stop)
        if end > job.sent:
            job.emit("delta", text[job.sent : end])
            job.sent = end
        if reason:
            job.emit("done", reason, len(job.tokens))
        return reason is not None


def safe_end(text: str, stops: list[str]) -> int:
    """How much of an unfinished text may be sent: not a trailing partial character (U+FFFD
    while a multi-byte character is cut), nor a tail that may begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


def sample(logits: Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> Tensor:
    """One token from softmax(logits / T), restricted to the top-p nucleus."""
    probs = F.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=rng)[0]


def eos_ids(ga) -> set[int]:
    """Tokens that end a reply: the tokenizer's EOS and the model's generation-config EOS."""
    ids = {ga.tokenizer.eos_token_id}
    config = getattr(ga.base_model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return {i for i in ids if i is not None}
