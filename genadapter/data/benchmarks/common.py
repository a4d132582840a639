"""Helpers shared by the benchmark generators: splits, seeded RNGs, fictional names, lengths,
and reading their template files (templates/*.yaml)."""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

import yaml

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


# ----------------------------------------------------------------------------- template files


def load_templates(filename: str) -> dict:
    """A benchmark's template file, parsed: shipped as package data next to this module."""
    path = resources.files(__package__) / "templates" / filename
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def lines(text: str) -> tuple[str, ...]:
    """The entries of a one-a-line list (a YAML `|` block): stripped, blank lines dropped."""
    if not isinstance(text, str):
        raise ValueError(f"expected a `|` block with one entry a line, not {text!r:.60}")
    return tuple(line.strip() for line in text.strip().splitlines() if line.strip())


T = TypeVar("T")


def build_attributes(
    source: str, entries: list[dict], name_of: Callable[[dict], str], build: Callable[[dict], T]
) -> tuple[T, ...]:
    """`build` every attribute entry of a template file, in order; a bad or repeated one raises
    ValueError naming the file and the attribute."""
    built: dict[str, T] = {}
    for entry in entries:
        name = name_of(entry)
        try:
            if name in built:
                raise ValueError("defined twice")
            built[name] = build(entry)
        except ValueError as err:
            raise ValueError(f"{source}: attribute {name}: {err}") from None
    return tuple(built.values())


def unknown_value_maker(spec: object, makers: str, pools: dict) -> ValueError:
    """The error for a `value:` spec that no maker of the file reads."""
    return ValueError(f"unknown value maker {spec!r} (makers: {makers}; pools: {', '.join(pools)})")


def check_fields(entry: dict, required: set[str], optional: set[str]) -> None:
    """ValueError for a missing or unknown field: a misspelt `held_out` must not quietly put a
    test-only attribute into train."""
    if missing := required - set(entry):
        raise ValueError(f"missing field {sorted(missing)}")
    if unknown := set(entry) - required - optional:
        raise ValueError(f"unknown field {sorted(unknown)}; fields: {sorted(required | optional)}")


def slots_of(template: str) -> set[str]:
    """The {slot} names a template fills (ValueError if its braces are malformed)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_phrasings(
    what: str, templates: tuple[str, ...], n_test: int, slots: set[str], needs: list[set[str]]
) -> None:
    """Raise ValueError unless `templates` leave train a phrasing after the `n_test` test-only
    ones, differ from each other (a repeat would leak a test phrasing into train), fill only
    `slots`, and each fill at least one slot of every set in `needs`."""
    if len(templates) <= n_test:
        raise ValueError(
            f"{what}: {len(templates)} phrasings, need more than the {n_test} the test split holds out"
        )
    if len(set(templates)) < len(templates):
        raise ValueError(f"{what}: a phrasing appears twice")
    for template in templates:
        used = slots_of(template)
        if used - slots:
            raise ValueError(f"{what}: unknown slot {sorted(used - slots)} in {template!r}")
        for need in needs:
            if not used & need:
                wanted = " or ".join(f"{{{s}}}" for s in sorted(need))
                raise ValueError(f"{what}: {template!r} lacks {wanted}")


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
