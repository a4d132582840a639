"""Helpers shared by the benchmark generators: splits, seeded RNGs, fictional names, lengths."""

from __future__ import annotations

import hashlib
import random

SPLITS = ("train", "validation", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return split


def split_of(key: str) -> str:
    """80/10/10 split of a string by hash, independent of any seed.

    Splitting names and titles by hash (not by a seeded shuffle) keeps the splits disjoint
    even between files generated with different seeds.
    """
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % 10
    return "train" if h < 8 else "validation" if h == 8 else "test"


def rng_for(*parts: object) -> random.Random:
    """A private RNG per (benchmark, split, seed, ...): str seeds are stable across runs."""
    return random.Random("/".join(map(str, parts)))


def count_words(text: str) -> int:
    return len(text.split())


def estimate_tokens(text: str, tokenizer=None) -> int:
    """Exact token count with a tokenizer, else ~1.3 tokens per whitespace word."""
    if tokenizer is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return round(1.3 * count_words(text))


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# Syllable pools chosen to sound invented, so names rarely collide with real entities.
_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_FIRST_ONSETS = _ONSETS + ["br", "dr", "kr", "tr", "th", "sh", "st", "qu"]
_NUCLEI = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "a", "o", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th", "nd", "x"]


class NameMaker:
    """Fictional names that all hash into one split and never repeat within an episode."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.used = rng, check_split(split), set()

    def word(self, n_syllables: int) -> str:
        """Consonant-vowel syllables, a cluster only at the start, a coda only at the end.

        Every invented word hashes into this split, so no part of a test name (a surname, a
        town's stem) can turn up in train text either.
        """
        r = self.rng
        while True:
            onsets = [r.choice(_FIRST_ONSETS)] + [r.choice(_ONSETS) for _ in range(n_syllables - 1)]
            w = ("".join(o + r.choice(_NUCLEI) for o in onsets) + r.choice(_CODAS)).capitalize()
            if split_of(w) == self.split:
                return w

    def unique(self, make) -> str:
        """Draw `make()` until the result is unused and belongs to this split."""
        for _ in range(10_000):
            name = make()
            if name not in self.used and split_of(name) == self.split:
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted")

    def first_name(self) -> str:
        return self.word(2)  # one syllable gives real words ("Hi", "No")

    def person(self, surname: str | None = None) -> str:
        return self.unique(
            lambda: f"{self.first_name()} {surname or self.word(self.rng.choice((2, 2, 3)))}"
        )
