"""Cutting token streams into chunks and padding them: the one place both reading and training
do it, so that training reads exactly as `GenerativeAdapter.read` reads.

A document of token ids is cut into `chunk_len` pieces (the last may be shorter); each chunk is
read by the frozen LM on its own, right-padded (causal attention never sees right padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Ids = Sequence[int] | Tensor


def cut(ids: Ids, chunk_len: int) -> list[Ids]:
    """The non-empty `chunk_len` pieces of a 1-D id sequence, in order."""
    return [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)]


def pad(
    seqs: Sequence[Ids], left: bool = False, pad_id: int = 0, length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Stack 1-D id sequences into (rows, length) ids and a 0/1 mask, padded right or left.
    Tensors keep their device; `length` defaults to the longest sequence."""
    device = next((s.device for s in seqs if isinstance(s, Tensor)), None)
    L = max(len(s) for s in seqs) if length is None else length
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long, device=device)
        mask[i, cols] = 1
    return ids, mask


def left_pad(x: Tensor, length: int, dim: int) -> Tensor:
    """`x` padded with zeros at the start of `dim` up to `length`."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def join_left(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """The rows of `a`, then `b`'s, each left-padded with zeros along `dim` to the longer one
    (batches that decode on: their KV caches, masks and query windows)."""
    length = max(a.shape[dim], b.shape[dim])
    return torch.cat([left_pad(a, length, dim), left_pad(b, length, dim)])


def pad_chunks(
    docs: Sequence[Sequence[Ids]], chunk_len: int, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """Documents of chunks -> ids and mask (D, T, C): T the most chunks, padding chunks all 0."""
    T = max(len(d) for d in docs)
    ids = torch.full((len(docs), T, chunk_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for d, doc in enumerate(docs):
        if doc:
            ids[d, : len(doc)], mask[d, : len(doc)] = pad(doc, pad_id=pad_id, length=chunk_len)
    return ids, mask


def real_chunks(mask: Tensor) -> Tensor:
    """Flat indices of the chunks of a (D, T, C) mask that hold at least one token."""
    return mask.flatten(0, 1).any(1).nonzero()[:, 0]


def scatter_chunks(per_chunk: Tensor, where: Tensor, D: int, T: int) -> Tensor:
    """Rows computed for the real chunks `where` -> (D, T, ...), zeros for padding chunks."""
    out = per_chunk.new_zeros(D * T, *per_chunk.shape[1:]).index_copy(0, where, per_chunk)
    return out.view(D, T, *per_chunk.shape[1:])
