"""Chunked document batches for pretraining: (D documents, T chunks, C tokens) with masks.

Training batches are an endless, seeded stream; each rank reads every world_size-th document.
The datamodule's state (batches consumed) is saved in checkpoints, so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from genadapter.chunking import cut, pad_chunks
from genadapter.data.corpus import file_documents, hub_documents, is_validation, wiki_documents


def cut_document(
    ids: list[int], chunk_len: int, max_chunks: int, min_chunks: int
) -> list[list[list[int]]]:
    """A tokenised document as training documents of at most max_chunks chunks each."""
    pieces = cut(cut(ids, chunk_len), max_chunks)
    return [p for p in pieces if len(p) >= min_chunks]


def collate(docs: list[list[list[int]]], chunk_len: int, pad_id: int = 0) -> dict[str, Tensor]:
    ids, mask = pad_chunks(docs, chunk_len, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


class ChunkedBatches(IterableDataset):
    """Batches of chunked documents from `documents(epoch)`; endless when `repeat`."""

    def __init__(
        self,
        documents: Callable[[int], Iterable[str]],
        tokenizer,
        chunk_len: int,
        max_chunks: int,
        min_chunks: int,
        batch_size: int,
        repeat: bool,
        rank: int = 0,
        world_size: int = 1,
        skip: int = 0,
    ):
        super().__init__()
        self.documents, self.tokenizer = documents, tokenizer
        self.chunk_len, self.max_chunks, self.min_chunks = chunk_len, max_chunks, min_chunks
        self.batch_size, self.repeat = batch_size, repeat
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        produced, epoch, buffer = 0, 0, []
        while True:
            empty_epoch = True
            for i, text in enumerate(self.documents(epoch)):
                if i % self.world_size != self.rank:
                    continue
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                for doc in cut_document(ids, self.chunk_len, self.max_chunks, self.min_chunks):
                    buffer.append(doc)
                    empty_epoch = False
                    if len(buffer) == self.batch_size:
                        if produced >= self.skip:  # resume: skip what was already trained on
                            yield collate(buffer, self.chunk_len)
                        produced += 1
                        buffer = []
            if not self.repeat:
                if buffer:
                    yield collate(buffer, self.chunk_len)
                return
            if empty_epoch:
                raise ValueError("the corpus yields no document with enough chunks for training")
            epoch += 1


class PretrainDataModule(L.LightningDataModule):
    """Documents from `source`: "wiki" (offline summaries), a .txt/.jsonl path, or "hf:NAME".

    Validation documents are a stable hash-split of the source, disjoint from training, unless
    `val_source` (a .txt/.jsonl file) names a separate validation corpus.
    """

    def __init__(
        self,
        source: str = "wiki",
        val_source: str | None = None,
        field: str = "text",
        hf_config: str | None = None,
        join_topic: int = 8,
        chunk_len: int = 32,
        max_chunks: int = 8,
        min_chunks: int = 2,
        batch_size: int = 4,
        val_documents: int = 32,
        val_batch_size: int = 4,
        val_percent: float = 2.0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        tokenizer: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._skip = 0
        self._tokenizer = None
        for path in (source, val_source):
            if (
                path is not None
                and path != "wiki"
                and not path.startswith("hf:")
                and not Path(path).is_file()
            ):
                raise FileNotFoundError(
                    f"corpus not found: {path!r} (use 'wiki', a .txt/.jsonl file or 'hf:NAME')"
                )

    # --- documents ------------------------------------------------------------------------------
    def documents(self, split: str, epoch: int) -> Iterable[str]:
        if split == "validation" and self.hparams.val_source is not None:
            return list(file_documents(self.hparams.val_source, self.hparams.field))
        if self.hparams.source == "wiki":
            docs = wiki_documents(
                split, self.hparams.val_percent, self.hparams.join_topic, seed=self.hparams.seed
            )
        elif self.hparams.source.startswith("hf:"):
            rank, world = self._rank_world() if split == "train" else (0, 1)
            it = hub_documents(
                self.hparams.source[3:],
                "train",
                self.hparams.field,
                self.hparams.hf_config,
                self.hparams.shuffle_buffer,
                self.hparams.seed + epoch,
                rank,
                world,
            )
            return (
                d
                for d in it
                if is_validation(d, self.hparams.val_percent) == (split == "validation")
            )
        else:
            docs = [
                d
                for d in file_documents(self.hparams.source, self.hparams.field)
                if is_validation(d, self.hparams.val_percent) == (split == "validation")
            ]
        if split == "train":
            random.Random(self.hparams.seed * 1_000_003 + epoch).shuffle(docs)
        return docs

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from genadapter.assets import DEFAULT_MODEL, resolve_model

            name = self.hparams.tokenizer
            if name is None and getattr(self, "trainer", None) is not None:
                name = getattr(self.trainer.lightning_module, "tokenizer_name", None)
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(name or DEFAULT_MODEL))
        return self._tokenizer

    # --- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        hub = self.hparams.source.startswith("hf:")
        ds = ChunkedBatches(
            lambda epoch: self.documents("train", epoch),
            self.tokenizer,
            self.hparams.chunk_len,
            self.hparams.max_chunks,
            self.hparams.min_chunks,
            self.hparams.batch_size,
            repeat=True,
            rank=0 if hub else rank,
            world_size=1 if hub else world,
            skip=self._skip,
        )
        return DataLoader(ds, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        def docs(epoch: int) -> list[str]:
            out = []
            for d in self.documents("validation", 0):
                out.append(d)
                if len(out) == self.hparams.val_documents:
                    break
            return out

        rank, world = self._rank_world()
        ds = ChunkedBatches(
            docs,
            self.tokenizer,
            self.hparams.chunk_len,
            self.hparams.max_chunks,
            self.hparams.min_chunks,
            self.hparams.val_batch_size,
            repeat=False,
            rank=rank,
            world_size=world,
        )
        return DataLoader(ds, batch_size=None)

    # --- exact resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        # "processed" already counts the batch whose end triggers the checkpoint ("completed" does not)
        consumed = trainer.fit_loop.epoch_loop.batch_progress.total.processed if trainer else 0
        return {"batches_consumed": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_consumed", 0))
