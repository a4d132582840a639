"""Document sources for pretraining and streaming: offline Wikipedia summaries, local files,
and any `datasets` corpus streamed from the hub.

Every source yields plain strings. Train/validation splits are decided by a stable hash of a
document key, so they are disjoint and identical on every machine and every rank.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path


def is_validation(key: str, val_percent: float) -> bool:
    """Stable split: the same key lands in the same split everywhere."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 10_000
    return bucket < val_percent * 100


def wiki_documents(
    split: str, val_percent: float = 2.0, join_topic: int = 1, seed: int = 0
) -> list[str]:
    """Wikipedia summaries of one split. With join_topic=k > 1, k summaries of the same topic are
    concatenated into one long document, so the stream has many coherent chunks to learn from."""
    from genadapter.assets import load_wiki_summaries

    rows = [
        r
        for r in load_wiki_summaries()
        if is_validation(r["title"], val_percent) == (split == "validation")
    ]
    if join_topic <= 1:
        return [f"{r['title']}: {r['extract']}" for r in rows]
    rng = random.Random(seed)
    docs = []
    for _, group in groupby(sorted(rows, key=lambda r: r["topic"]), key=lambda r: r["topic"]):
        group = list(group)
        rng.shuffle(group)
        for i in range(0, len(group), join_topic):
            docs.append(
                "\n\n".join(f"{r['title']}: {r['extract']}" for r in group[i : i + join_topic])
            )
    return docs


def among_wikipedia(docs: list[str], n_wiki: int, seed: int) -> list[str]:
    """`docs` spread evenly, in order, among `n_wiki` Wikipedia summaries drawn with `seed`: a
    stream where what is asked about is a small part of what was read."""
    from genadapter.assets import load_wiki_summaries

    wiki = random.Random(seed).sample(load_wiki_summaries(), n_wiki)
    stream = [f"{w['title']}: {w['extract']}" for w in wiki]
    for i, doc in enumerate(docs):
        stream.insert(min(len(stream), (i + 1) * len(stream) // (len(docs) + 1) + i), doc)
    return stream


def file_documents(path: str | Path, field: str = "text") -> Iterator[str]:
    """Documents of a local file: JSONL (`field` of each object) or text (blank-line separated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    text = json.loads(line).get(field)
                    if isinstance(text, str) and text.strip():
                        yield text
        return
    block: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def hub_documents(
    name: str,
    split: str,
    field: str = "text",
    config: str | None = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[str]:
    """A `datasets` corpus streamed from the hub; each rank reads its own shard."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    ds = load_dataset(name, config, split=split, streaming=True)
    if shuffle_buffer > 0:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    for row in ds:
        text = row.get(field)
        if isinstance(text, str) and text.strip():
            yield text
