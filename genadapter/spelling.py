"""How a word is spelled at the start of an answer: the token without its leading space.

A context spells a fact's value mid-sentence, " butter chicken", and its first token carries
the space; a chat model's answer begins its turn with the word bare, "butter" (here even split
otherwise: "but" "ter"). A copy of the context's token raises the wrong one, so values from the
token embeddings may carry both spellings (`GeneratorConfig.value_bare`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SPACE_MARKS = ("Ġ", "▁")  # byte-level BPE (GPT-2, Llama 3, SmolLM), SentencePiece (Llama 2, T5)


def bare_token_ids(tokenizer: Any, vocab_size: int) -> Tensor:
    """(vocab_size,) the first token of each token's word spelled without its leading space; a
    token with no leading space (or past the tokenizer's vocabulary) maps to itself."""
    bare = torch.arange(vocab_size)
    ids = range(min(vocab_size, len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    spaced = [
        (i, tokenizer.convert_tokens_to_string([p]).strip())
        for i, p in zip(ids, pieces, strict=True)
        if isinstance(p, str) and p.startswith(SPACE_MARKS) and len(p) > 1
    ]
    spaced = [(i, word) for i, word in spaced if word]
    if spaced:
        firsts = tokenizer([w for _, w in spaced], add_special_tokens=False).input_ids
        for (i, _), first in zip(spaced, firsts, strict=True):
            if first:
                bare[i] = first[0]
    return bare
