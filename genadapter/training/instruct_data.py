"""Episode batches for instruction tuning: read a context stream, answer questions about it.

Each episode (facts / persona QA, wiki-topic demonstrations) becomes its context cut into
chunks exactly as `GenerativeAdapter.read` cuts it (document by document, `chunk_len` tokens)
and one row per question: the shared prompt format (`eval.prompts.PromptFormat`) followed by
the answer and the end-of-turn token, with the loss on the answer tokens only.

The training stream is a seeded mixture: batch i draws its episodes from a generator seeded by
(seed, rank, i), and every `lm_every`-th batch is a pretraining batch instead, so language
modelling is not forgotten. Batch i depends only on i, which makes resuming exact.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset

from genadapter.chunking import cut, pad
from genadapter.data.episodes import DemoEpisode, Episode, read_episodes
from genadapter.eval.prompts import PromptFormat, join_context
from genadapter.training.datamodule import ChunkedBatches, PretrainDataModule, collate


@dataclass
class EncodedEpisode:
    chunks: list[list[int]]  # the context, chunked as `read` chunks it
    prompts: list[list[int]]  # one per question, without context
    answers: list[list[int]]  # target tokens (answer + end of turn)
    prompts_with_context: list[list[int]]  # the same questions, context in the prompt
    # per question: candidate answers to rank, gold first ([] for none, or no list at all)
    candidates: list[list[list[int]]] = field(default_factory=list)
    # per question: flat positions (chunk * chunk_len + index) of the context tokens that spell
    # its gold answer, wherever the context states it ([] if it never does; no list: not known)
    answer_positions: list[list[int]] = field(default_factory=list)


def question_candidates(episode: Episode, k: int) -> list[list[str]]:
    """Up to k candidate answers per question, gold first; [] for questions without options.

    Distractors the context mentions come first: they are the hard negatives (read, but bound
    to another entity), which format learning alone cannot tell from the gold answer."""
    if k < 2:
        return [[] for _ in question_answers(episode)]
    if isinstance(episode, DemoEpisode):
        pairs = [(q.output, q.options) for q in episode.queries]
    else:
        pairs = [(qa.answers[0], qa.options or []) for qa in episode.qas]
    context = join_context(episode.context_texts())
    out = []
    for gold, options in pairs:
        others = [o for o in dict.fromkeys(options) if o != gold]
        others.sort(key=lambda o: o not in context)  # stable: in-context ones first
        out.append([gold, *others[: k - 1]] if others else [])
    return out


def question_answers(episode: Episode) -> list[tuple[str, str]]:
    """(question, canonical answer) pairs of any episode kind."""
    if isinstance(episode, DemoEpisode):
        return [(q.input, q.output) for q in episode.queries]
    return [(qa.question, qa.answers[0]) for qa in episode.qas]


def answer_positions(
    texts: list[str], answers: list[str], tokenizer, chunk_len: int
) -> list[list[int]]:
    """Per answer, the flat chunk positions of every context token overlapping an occurrence of
    it (the tokens `encode_episode` cuts the context into; needs a fast tokenizer's offsets)."""
    out: list[list[int]] = [[] for _ in answers]
    first_chunk = 0
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for i, answer in enumerate(answers):
            spans = [(m.start(), m.end()) for m in re.finditer(re.escape(answer.strip()), text)]
            out[i] += [
                first_chunk * chunk_len + j
                for j, (a, b) in enumerate(enc.offset_mapping)
                if any(a < end and start < b for start, end in spans)
            ]
        first_chunk += -(-len(enc.input_ids) // chunk_len)
    return out


def encode_episode(
    episode: Episode,
    fmt: PromptFormat,
    chunk_len: int,
    questions: list[int] | None = None,
    with_context_prompts: bool = False,
    rank_options: int = 0,
) -> EncodedEpisode:
    tok = fmt.tokenizer
    chunks = []  # document by document, as `read` reads a stream
    for text in episode.context_texts():
        chunks += cut(tok(text, add_special_tokens=False).input_ids, chunk_len)
    pairs, candidates = question_answers(episode), question_candidates(episode, rank_options)
    if questions is not None:
        pairs, candidates = [pairs[i] for i in questions], [candidates[i] for i in questions]
    end = fmt.stop_token_ids()[:1]  # teach the model to stop after a short answer
    context = join_context(episode.context_texts()) if with_context_prompts else None
    positions = []
    if tok.is_fast and any(a.strip() for _, a in pairs):
        positions = answer_positions(episode.context_texts(), [a for _, a in pairs], tok, chunk_len)
    return EncodedEpisode(
        chunks=chunks,
        prompts=[fmt.prompt_ids(q) for q, _ in pairs],
        answers=[fmt.answer_ids(a, q) + end for q, a in pairs],
        prompts_with_context=[fmt.prompt_ids(q, context) for q, _ in pairs] if context else [],
        # scored as evaluation scores options: answer tokens only, no end of turn
        candidates=[
            [fmt.answer_ids(c, q) for c in cands]
            for (q, _), cands in zip(pairs, candidates, strict=True)
        ],
        answer_positions=positions,
    )


def pad_rows(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded prompt + answer rows; `loss_mask` marks the answer tokens."""
    pairs = list(zip(prompts, answers, strict=True))
    ids, attn = pad([p + a for p, a in pairs], pad_id=pad_id)
    loss, _ = pad([[0] * len(p) + [1] * len(a) for p, a in pairs])
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def collate_episodes(
    encoded: list[EncodedEpisode],
    tasks: list[int],
    chunk_len: int,
    pad_id: int,
    max_prompt_len: int | None = None,
) -> dict[str, Tensor]:
    """One batch: contexts (E, T, C), answer rows (R, L) with their episode and task index.

    When the episodes carry context prompts, also the `prompt_*` rows (context in the prompt)
    of the questions that fit `max_prompt_len`, and `prompt_rows`, their row indices.
    When questions carry candidates, also `cand_ids`, `cand_mask` (the candidates' own tokens,
    right-padded) and `cand_row`, the answer row each follows (the gold candidate comes first).
    When every episode knows where its answers stand in its context, also `answer_context`
    (R, T, C) bool: the context tokens of each row's episode that spell the row's answer."""
    batch = collate([e.chunks for e in encoded], chunk_len, pad_id)
    batch = {"context_ids": batch["input_ids"], "context_mask": batch["attention_mask"]}
    prompts = [p for e in encoded for p in e.prompts]
    answers = [a for e in encoded for a in e.answers]
    batch.update(pad_rows(prompts, answers, pad_id))
    batch["row_episode"] = torch.tensor([i for i, e in enumerate(encoded) for _ in e.prompts])
    batch["row_task"] = torch.tensor(
        [t for t, e in zip(tasks, encoded, strict=True) for _ in e.prompts]
    )
    # candidates as their own tokens only: they follow their answer row's prompt, run once
    groups = [q for e in encoded for q in e.candidates or [[]] * len(e.prompts)]  # per row
    if any(groups):
        cands = [torch.tensor(c) for q in groups for c in q]
        batch["cand_ids"] = pad_sequence(cands, batch_first=True, padding_value=pad_id)
        batch["cand_mask"] = pad_sequence([torch.ones_like(c) for c in cands], batch_first=True)
        batch["cand_row"] = torch.tensor([row for row, q in enumerate(groups) for _ in q])
    if all(e.answer_positions for e in encoded):
        T, C = batch["context_ids"].shape[1:]
        where = torch.zeros(len(prompts), T * C, dtype=torch.bool)
        row = 0
        for e in encoded:
            for pos in e.answer_positions:
                where[row, pos] = True
                row += 1
        batch["answer_context"] = where.view(-1, T, C)
    with_context = [p for e in encoded for p in e.prompts_with_context]
    if with_context:
        fits = [
            i
            for i, (p, a) in enumerate(zip(with_context, answers, strict=True))
            if max_prompt_len is None or len(p) + len(a) <= max_prompt_len
        ]
        batch["prompt_rows"] = torch.tensor(fits, dtype=torch.long)
        if fits:
            rows = pad_rows([with_context[i] for i in fits], [answers[i] for i in fits], pad_id)
            batch.update({f"prompt_{k}": v for k, v in rows.items()})
    return batch


class EpisodeMixture(IterableDataset):
    """Endless seeded batches of episodes drawn from weighted task files, with LM batches mixed in."""

    def __init__(
        self,
        tasks: list[list[Episode]],
        weights: list[float],
        fmt: PromptFormat,
        chunk_len: int,
        max_chunks: int,
        episodes_per_batch: int,
        max_questions: int,
        lm_every: int,
        lm_batches: ChunkedBatches | None,
        seed: int,
        rank: int = 0,
        skip: int = 0,
        rank_options: int = 0,
        context_prompts: bool = False,
        prompt_window: int | None = None,
    ):
        super().__init__()
        self.tasks, self.weights, self.fmt = tasks, weights, fmt
        self.chunk_len, self.max_chunks = chunk_len, max_chunks
        self.episodes_per_batch, self.max_questions = episodes_per_batch, max_questions
        self.lm_every, self.lm_batches = lm_every, lm_batches
        self.seed, self.rank, self.skip = seed, rank, skip
        self.rank_options = rank_options
        self.context_prompts, self.prompt_window = context_prompts, prompt_window

    def is_lm_batch(self, i: int) -> bool:
        return (
            self.lm_batches is not None
            and self.lm_every > 0
            and i % self.lm_every == self.lm_every - 1
        )

    def episode_batch(self, i: int) -> dict[str, Tensor]:
        rng = random.Random(f"{self.seed}/{self.rank}/{i}")
        encoded, task_ids = [], []
        while len(encoded) < self.episodes_per_batch:
            t = rng.choices(range(len(self.tasks)), weights=self.weights)[0]
            episode = rng.choice(self.tasks[t])
            n_q = len(question_answers(episode))
            questions = rng.sample(range(n_q), min(n_q, self.max_questions))
            enc = encode_episode(
                episode,
                self.fmt,
                self.chunk_len,
                questions,
                with_context_prompts=self.context_prompts,
                rank_options=self.rank_options,
            )
            if len(enc.chunks) <= self.max_chunks:  # longer contexts are skipped, not truncated
                encoded.append(enc)
                task_ids.append(t)
        pad = self.fmt.tokenizer.pad_token_id or 0
        return collate_episodes(encoded, task_ids, self.chunk_len, pad, self.prompt_window)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        lm_skip = sum(self.is_lm_batch(i) for i in range(self.skip))
        if self.lm_batches is not None:
            self.lm_batches.skip = lm_skip
        lm = iter(self.lm_batches) if self.lm_batches is not None else None
        i = self.skip
        while True:
            yield next(lm) if self.is_lm_batch(i) else self.episode_batch(i)
            i += 1


class FinetuneDataModule(PretrainDataModule):
    """Episode files (`train_files`: path -> weight; `val_files`: path list) plus the
    pretraining corpus settings inherited from PretrainDataModule for the LM batches."""

    def __init__(
        self,
        train_files: dict[str, float] | None = None,
        val_files: list[str] | None = None,
        episodes_per_batch: int = 8,
        max_questions: int = 4,
        max_context_chunks: int = 64,
        val_episodes: int = 32,
        prompt_window: int | None = 8192,  # context prompts longer than this are left out
        lm_every: int = 4,
        rank_options: int = 0,  # candidates ranked per question (gold + k-1 distractors); 0: off
        train_context_prompts: bool = False,  # training batches carry them too (distillation)
        **pretrain_data,
    ):
        super().__init__(**pretrain_data)  # its save_hyperparameters() records our arguments too
        if not train_files:
            raise ValueError("train_files is empty: name at least one episode file")
        for path in [*train_files, *(val_files or [])]:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"episode file not found: {path} (run `genadapter make-benchmarks`)"
                )
        if any(w < 0 for w in train_files.values()) or sum(train_files.values()) <= 0:
            raise ValueError(f"train_files weights must be >= 0 with a positive sum: {train_files}")
        self._episodes: dict[str, list[Episode]] = {}

    def episodes(self, path: str) -> list[Episode]:
        if path not in self._episodes:
            episodes, problems = read_episodes(path)
            if not episodes:
                raise ValueError(f"{path}: no valid episodes ({'; '.join(problems[:3])})")
            self._episodes[path] = episodes
        return self._episodes[path]

    @property
    def fmt(self) -> PromptFormat:
        return PromptFormat(self.tokenizer)

    def task_names(self) -> list[str]:
        return [Path(p).parent.name + "/" + Path(p).stem for p in self.hparams.val_files or []]

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        rank, _ = self._rank_world()
        lm = super().train_dataloader().dataset if h.lm_every > 0 else None
        ds = EpisodeMixture(
            [self.episodes(p) for p in h.train_files],
            list(h.train_files.values()),
            self.fmt,
            h.chunk_len,
            h.max_context_chunks,
            h.episodes_per_batch,
            h.max_questions,
            h.lm_every,
            lm,
            h.seed,
            rank,
            self._skip,
            h.rank_options,
            h.train_context_prompts,
            h.prompt_window,
        )
        return DataLoader(ds, batch_size=None)

    def val_dataloader(self) -> list[DataLoader] | DataLoader:
        h = self.hparams
        rank, world = self._rank_world()
        batches = []
        for t, path in enumerate(h.val_files or []):
            eps = self.episodes(path)[: h.val_episodes][rank::world]
            for i in range(0, len(eps), h.episodes_per_batch):
                enc = [
                    encode_episode(
                        e,
                        self.fmt,
                        h.chunk_len,
                        with_context_prompts=True,
                        rank_options=h.rank_options,
                    )
                    for e in eps[i : i + h.episodes_per_batch]
                ]
                enc = [e for e in enc if len(e.chunks) <= h.max_context_chunks]
                if enc:
                    pad = self.tokenizer.pad_token_id or 0
                    batches.append(
                        collate_episodes(enc, [t] * len(enc), h.chunk_len, pad, h.prompt_window)
                    )
        return DataLoader(batches, batch_size=None)
