"""`recall`: multi-query associative recall in plain sentences.

An episode states K key -> value pairs of one kind (a person's home town, a code word's number,
a room's guest, a word's meaning, a person's colour), one sentence each, among filler; its
questions ask the value of some keys: by default as a cloze, the pair's own sentence up to its
value ("The code for zorba is" -> "4711", the classic recall probe: find the key, copy what
followed it), or as a question in other words ("What is the code for zorba?", `ask="question"`).
Every option of a question is a value the same context gives another key, so only a state that
binds each value to its key can choose: the kind of answer and the set of values read are no
help.

The splits hold out surface forms: train, validation and test state and ask with disjoint
sentences (`templates/recall.yaml`), and invented keys and values (names, code words) hash
into their split. The text lives in `templates/recall.yaml`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from genadapter.data.episodes import QA, Cloze, QAEpisode

from .common import (
    NameMaker,
    build_attributes,
    check_fields,
    check_phrasings,
    check_split,
    lines,
    load_templates,
    rng_for,
    unknown_value_maker,
)

N_HELD_OUT = 2  # statements and questions per split held out for validation and for test
N_OPTIONS = 8  # candidates per question: the gold value and up to 7 other values of the context
K_VALUES = (4, 8, 16, 32, 64)
ASK = ("cloze", "question")
CLOZE_END = re.compile(r"\s*\{v\}[.!?]?$")  # a statement that ends with its value makes a cloze


@dataclass(frozen=True)
class PairKind:
    """One kind of pair: how its keys and values are drawn, its statements and questions."""

    name: str
    key: Callable[[NameMaker], str]
    value: Callable[[NameMaker], str]
    statements: tuple[str, ...]
    questions: tuple[str, ...]

    def forms(self, templates: tuple[str, ...], split: str) -> tuple[str, ...]:
        """The split's surface forms: test the last N_HELD_OUT, validation the ones before."""
        n = N_HELD_OUT
        if split == "test":
            return templates[-n:]
        if split == "validation":
            return templates[-2 * n : -n]
        return templates[: -2 * n]

    def statement_forms(self, split: str, ask: str) -> tuple[str, ...]:
        """The split's statements; for clozes, those that end with the value."""
        forms = self.forms(self.statements, split)
        return tuple(f for f in forms if CLOZE_END.search(f)) if ask == "cloze" else forms


def drawer(spec: str | dict, pools: dict[str, tuple[str, ...]]) -> Callable[[NameMaker], str]:
    """The function a `key:` / `value:` spec of recall.yaml stands for."""
    match spec:
        case {"pool": str(name)} if name in pools:
            pool = pools[name]
            return lambda names: names.rng.choice(pool)
        case {"number": [int(lo), int(hi)]}:
            return lambda names: str(names.rng.randint(lo, hi))
        case {"word": int(n_syllables)}:
            return lambda names: names.word(n_syllables)
        case "person":
            return lambda names: names.person()
    raise unknown_value_maker(spec, "pool, number, word, person", pools)


def _pair_kind(entry: dict, pools: dict[str, tuple[str, ...]]) -> PairKind:
    check_fields(entry, {"name", "key", "value", "statements", "questions"}, set())
    kind = PairKind(
        entry["name"],
        drawer(entry["key"], pools),
        drawer(entry["value"], pools),
        lines(entry["statements"]),
        lines(entry["questions"]),
    )
    held_out = 2 * N_HELD_OUT
    check_phrasings("statements", kind.statements, held_out, {"k", "v"}, [{"k"}, {"v"}])
    check_phrasings("questions", kind.questions, held_out, {"k"}, [{"k"}])
    for split in ("train", "validation", "test"):
        if not kind.statement_forms(split, "cloze"):
            raise ValueError(
                f"recall.yaml: pair {kind.name!r} has no {split} statement ending with {{v}} "
                "(clozes need one)"
            )
    for pool in (entry["key"], entry["value"]):
        if isinstance(pool, dict) and "pool" in pool and len(pools[pool["pool"]]) < max(K_VALUES):
            raise ValueError(f"pool {pool['pool']} has fewer than {max(K_VALUES)} entries")
    return kind


_TEMPLATES = load_templates("recall.yaml")
POOLS = {name: lines(text) for name, text in _TEMPLATES["pools"].items()}
KINDS = build_attributes(
    "recall.yaml", _TEMPLATES["pairs"], lambda e: e.get("name"), lambda e: _pair_kind(e, POOLS)
)
FILLER = lines(_TEMPLATES["filler"])


def check_no_values(sentences: tuple[str, ...], pools: dict[str, tuple[str, ...]]) -> None:
    """Filler and templates must name no value: each value is stated once, by its pair."""
    for sentence in sentences:
        words = set(re.findall(r"[a-z]+", sentence.lower()))
        for name, pool in pools.items():
            if clash := words & {v.lower() for v in pool}:
                raise ValueError(f"recall.yaml: {sentence!r} names {sorted(clash)} of pool {name}")


check_no_values(FILLER + tuple(t for k in KINDS for t in k.statements + k.questions), POOLS)


def distinct(draw: Callable[[], str], n: int, taken: set[str]) -> list[str]:
    """`n` draws none of which is in `taken` (which they join)."""
    out = []
    for _ in range(1000 * n):
        if len(out) == n:
            return out
        x = draw()
        if x not in taken:
            taken.add(x)
            out.append(x)
    raise RuntimeError(f"could not draw {n} distinct values")


def _sentences(
    r: random.Random,
    kind: PairKind,
    pairs: list,
    split: str,
    filler: float,
    ask: str,
    one_form: bool = False,
) -> tuple[list[str], dict[int, str | None]]:
    """Each pair stated once in a form of the split (with `one_form`, the same for every pair),
    in random order, with filler between; and per pair, the form its cloze repeats (None when
    asking questions)."""
    forms, out, form_of = kind.statement_forms(split, ask), [], {}
    if one_form:
        forms = (r.choice(forms),)
    for i in r.sample(range(len(pairs)), len(pairs)):
        form = r.choice(forms)
        form_of[i] = form if ask == "cloze" else None
        out.append(form.format(k=pairs[i][0], v=pairs[i][1]))
        out += r.sample(FILLER, min(len(FILLER), int(filler) + (r.random() < filler % 1)))
    return out, form_of


def _documents(sentences: list[str], per_doc: int) -> list[str]:
    return [" ".join(sentences[i : i + per_doc]) for i in range(0, len(sentences), per_doc)]


def make_recall(
    split: str,
    n_episodes: int,
    k: int | tuple[int, ...] = K_VALUES,
    seed: int = 0,
    n_questions: int = 4,
    filler: float = 1.0,
    sentences_per_doc: int = 8,
    ask: str = "cloze",
    one_form: bool = False,
) -> list[QAEpisode]:
    """`recall` episodes for one split: `k` pairs each (an int, or a tuple drawn from per
    episode), `filler` filler sentences per pair on average, `n_questions` questions on distinct
    keys (`ask`: clozes or questions), documents of `sentences_per_doc` sentences.

    `one_form`: every pair of an episode is stated in one form, so that a cloze (which repeats
    its pair's form) can find its pair by the key alone, never by the form's words: training
    data for a match that must generalise to unseen forms."""
    check_split(split)
    if ask not in ASK:
        raise ValueError(f"ask must be one of {ASK}, got {ask!r}")
    ks = (k,) if isinstance(k, int) else tuple(k)
    if min(ks) < 2 or max(ks) > max(K_VALUES):
        raise ValueError(f"k must lie in [2, {max(K_VALUES)}], got {ks}")
    # questions keep the stream they had before clozes came (the same episodes as then)
    tail = ([ask] if ask == "cloze" else []) + (["one form"] if one_form else [])
    r = rng_for("recall", split, seed, ks, n_questions, filler, *tail)
    episodes = []
    for i in range(n_episodes):
        kind, n_pairs = r.choice(KINDS), r.choice(ks)
        episode_id = f"recall-{split}-s{seed}-k{n_pairs}-{kind.name}-{i:05d}"
        pairs = draw_pairs(NameMaker(r, split), kind, n_pairs)
        sentences, form_of = _sentences(r, kind, pairs, split, filler, ask, one_form)
        docs = _documents(sentences, sentences_per_doc)
        qas = [
            _question(r, kind, pairs, i, split, form_of[i])
            for i in r.sample(range(n_pairs), min(n_questions, n_pairs))
        ]
        episodes.append(QAEpisode(episode_id, docs, qas))
    return episodes


def draw_pairs(names: NameMaker, kind: PairKind, n: int) -> list[tuple[str, str]]:
    """`n` pairs of one kind; no key or value occurs twice (nor as both)."""
    taken: set[str] = set()
    keys = distinct(lambda: kind.key(names), n, taken)
    values = distinct(lambda: kind.value(names), n, taken)
    return list(zip(keys, values, strict=True))


def _question(
    r: random.Random, kind: PairKind, pairs: list, asked: int, split: str, form: str | None
) -> QA:
    """The question on pair `asked`: the cloze of its statement `form`, or (None) a question of
    the split; its options are its value and others of the context."""
    key, value = pairs[asked]
    others = [v for j, (_, v) in enumerate(pairs) if j != asked]
    options = [value, *r.sample(others, min(N_OPTIONS - 1, len(others)))]
    if form is None:
        question = r.choice(kind.forms(kind.questions, split)).format(k=key)
    else:
        question = Cloze(CLOZE_END.sub("", form).format(k=key))
    return QA(question, [value], r.sample(options, len(options)))
