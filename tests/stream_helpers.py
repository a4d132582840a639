"""Helpers of the streaming tests: a tiny random Llama with the SmolLM2 tokenizer saved as a
base-model folder plus a generator folder (what the CLI loads), reference reads, documents."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import randomize_generator, tiny_model

from genadapter import AdapterState, GenerativeAdapter, GeneratorConfig

CFG = {"r": 4, "r_in": 4, "chunk_len": 16}


def make_generator_dir(root: Path, tokenizer, seed: int) -> Path:
    base = root / "base"
    if not base.exists():
        model = tiny_model("llama", vocab=49152)
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    ga = GenerativeAdapter.from_base(str(base), GeneratorConfig(**CFG))
    randomize_generator(ga, seed)
    out = root / f"gen{seed}"
    ga.save_pretrained(out)
    return out


def assert_close(a: AdapterState, b: AdapterState, tol: float = 1e-4) -> None:
    assert a.generator == b.generator and a.S.keys() == b.S.keys()
    torch.testing.assert_close(a.n, b.n)
    for k in a.S:
        torch.testing.assert_close(a.S[k], b.S[k], rtol=tol, atol=tol)


def read_all(ga: GenerativeAdapter, docs: list[str], decay: float | None = None) -> AdapterState:
    """Reference: every document read alone, one after the other, with the plain API."""
    state = ga.new_state()
    for doc in docs:
        state = ga.read(doc, state, decay=decay)
    return state


def jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Pacific Ocean is the largest and deepest of the world's five oceans. " * 4,
    "Ada Lovelace wrote what is considered the first computer program.",
    "Mount Everest is Earth's highest mountain above sea level.",
    "The mitochondrion is the powerhouse of the cell. " * 3,
    "Jazz originated in the African-American communities of New Orleans.",
    "A haiku is a short form of Japanese poetry in three phrases.",
    "The Great Barrier Reef is the world's largest coral reef system.",
    "Alan Turing formalised the concepts of algorithm and computation.",
]
