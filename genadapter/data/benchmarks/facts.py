"""`facts`: knowledge injection about fictional people, organisations and places.

An episode's context is a stream of documents (encyclopedia entries, news snippets, letters,
interviews, profiles), each about one invented entity; questions ask about a few of them, so
the rest act as distractors. Episodes run from one document (~200 tokens) to hundreds.

What the test split holds out, so that a score measures reading rather than memorising:
- entities: names hash into train/validation/test (`common.split_of`), so no test entity
  (nor person-valued answer such as a founder) ever appears in train or validation;
- phrasings: the last `N_TEST_PHRASINGS` fact sentences and question forms of every
  attribute are used only in test; train and validation use the others;
- attribute types: `HELD_OUT` (a person's instrument, an organisation's product, a place's
  festival) never appear in train or validation, only in test.
Validation therefore matches train's distribution on unseen entities; test is the harder,
out-of-distribution set. Values (cities, jobs, years) come from shared pools: only the
entity-value pairing is random.

The text (value pools, fact and question templates, filler) lives in `templates/facts.yaml`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from genadapter.data.episodes import QA, QAEpisode

from .common import (
    NameMaker,
    article,
    build_attributes,
    check_fields,
    check_phrasings,
    check_split,
    estimate_tokens,
    lines,
    load_templates,
    rng_for,
    unknown_value_maker,
)

N_TEST_PHRASINGS = 4
N_OPTIONS = 8  # candidate answers per question (chance = 1/8)
KINDS = ("person", "organisation", "place")


@dataclass(frozen=True)
class Attribute:
    """One attribute type: value sampler, fact sentences ({e} entity, {v}/{av} value) and questions."""

    kind: str
    name: str
    value: Callable[[NameMaker, str], str]  # (names, entity) -> value
    facts: tuple[str, ...]
    questions: tuple[str, ...]
    held_out: bool = False

    def fact_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self, self.facts, split)

    def question_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self, self.questions, split)


def _phrasings(attr: Attribute, templates: tuple[str, ...], split: str) -> tuple[str, ...]:
    if attr.held_out:
        return templates if split == "test" else ()
    return templates[-N_TEST_PHRASINGS:] if split == "test" else templates[:-N_TEST_PHRASINGS]


# ----------------------------------------------------------------------------- templates/facts.yaml


def value_maker(
    spec: str | dict, pools: dict[str, tuple[str, ...]]
) -> Callable[[NameMaker, str], str]:
    """The function a `value:` spec of facts.yaml stands for: (names, entity) -> value."""
    match spec:
        case {"pool": str(name)} if name in pools:
            pool = pools[name]
            return lambda names, entity: names.rng.choice(pool)
        case {"number": [int(lo), int(hi)]}:
            return lambda names, entity: f"{names.rng.randint(lo, hi):,}"
        case {"year": [int(lo), int(hi)]}:
            return lambda names, entity: str(names.rng.randint(lo, hi))
        case {"word": int(n_syllables)}:
            return lambda names, entity: names.unique(lambda: names.word(n_syllables))
        case "person":
            return lambda names, entity: names.person()
        case "sibling":
            return lambda names, entity: names.person(surname=entity.split()[-1])
        case "organisation":
            return lambda names, entity: organisation_name(names)
    raise unknown_value_maker(
        spec, "pool, number, year, word, person, sibling, organisation", pools
    )


def load_attributes(
    entries: list[dict], pools: dict[str, tuple[str, ...]]
) -> tuple[Attribute, ...]:
    """The `attributes:` of facts.yaml, checked: a mistake raises ValueError naming its attribute."""
    return build_attributes(
        "facts.yaml",
        entries,
        lambda e: f"{e.get('kind')}.{e.get('name')}",
        lambda e: _attribute(e, pools),
    )


def _attribute(entry: dict, pools: dict[str, tuple[str, ...]]) -> Attribute:
    check_fields(entry, {"kind", "name", "value", "facts", "questions"}, {"held_out"})
    attr = Attribute(
        entry["kind"],
        entry["name"],
        value_maker(entry["value"], pools),
        lines(entry["facts"]),
        lines(entry["questions"]),
        entry.get("held_out", False),
    )
    if attr.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    n_test = 0 if attr.held_out else N_TEST_PHRASINGS
    check_phrasings("facts", attr.facts, n_test, {"e", "v", "av"}, [{"e"}, {"v", "av"}])
    check_phrasings("questions", attr.questions, n_test, {"e"}, [{"e"}])
    return attr


_TEMPLATES = load_templates("facts.yaml")
POOLS = {name: lines(text) for name, text in _TEMPLATES["pools"].items()}
ORG_SUFFIXES = lines(_TEMPLATES["name_parts"]["org_suffixes"])
PLACE_ENDINGS = tuple(_TEMPLATES["name_parts"]["place_endings"])
ATTRIBUTES = load_attributes(_TEMPLATES["attributes"], POOLS)
HELD_OUT = tuple(f"{a.kind}.{a.name}" for a in ATTRIBUTES if a.held_out)
_FILLER = {kind: lines(text) for kind, text in _TEMPLATES["filler"].items()}
_BY_KEY = {(a.kind, a.name): a for a in ATTRIBUTES}


def organisation_name(names: NameMaker) -> str:
    r = names.rng
    return names.unique(lambda: f"{names.word(r.choice((2, 3)))} {r.choice(ORG_SUFFIXES)}")


def place_name(names: NameMaker) -> str:
    return names.unique(lambda: names.word(2) + names.rng.choice(PLACE_ENDINGS))


def attributes(kind: str, split: str) -> list[Attribute]:
    """Attribute types of one entity kind that may appear in a split."""
    return [a for a in ATTRIBUTES if a.kind == kind and (split == "test" or not a.held_out)]


# ----------------------------------------------------------------------------- documents


def _encyclopedia(r, e, kind, facts, filler, names):
    return f"{e}\n\n" + " ".join(facts + filler)


def _news(r, e, kind, facts, filler, names):
    head = r.choice(("In brief", "Local news", "Around the region", "This week", "Update"))
    return f"{head}: {e}\n\n" + " ".join(facts + filler) + " More details are expected soon."


def _letter(r, e, kind, facts, filler, names):
    if r.random() < 0.5:
        day = r.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"))
        return f"Dear diary, {day}.\n\nToday I learned a few things about {e}. " + " ".join(
            facts + filler
        )
    to, sender = names.unique(names.first_name), names.unique(names.first_name)
    body = " ".join(facts + filler)
    return f"Dear {to},\n\nYou asked me about {e}, so here is what I know. {body}\n\nWarm wishes,\n{sender}"


def _interview(r, e, kind, facts, filler, names):
    prompts = (
        f"What can you tell us about {e}?",
        "Anything else?",
        "Interesting. Go on.",
        "What else should our readers know?",
        "And?",
    )
    lines = [f"Interviewer: {prompts[0]}"]
    for i, sentence in enumerate(facts + filler):
        if i:
            lines.append(f"Interviewer: {r.choice(prompts[1:])}")
        lines.append(f"Guest: {sentence}")
    return "\n".join(lines)


def _profile(r, e, kind, facts, filler, names):
    title = {"person": "Profile", "organisation": "Company profile", "place": "Place profile"}
    return f"{title[kind]}: {e}\n" + "\n".join(f"- {s}" for s in facts + filler)


STYLES = {
    "encyclopedia": _encyclopedia,
    "news": _news,
    "letter": _letter,
    "interview": _interview,
    "profile": _profile,
}


def _render(template: str, e: str, v: str) -> str:
    s = template.format(e=e, v=v, av=f"{article(v)} {v}")
    return s[0].upper() + s[1:]


@dataclass
class _Entity:
    kind: str
    name: str
    facts: dict[str, str]  # attribute name -> value


def _entity(r, names: NameMaker, split: str, n_facts: int) -> _Entity:
    kind = r.choice(KINDS)
    if kind == "person":
        name = names.person()
    else:
        name = organisation_name(names) if kind == "organisation" else place_name(names)
    allowed = attributes(kind, split)
    chosen = r.sample(allowed, min(n_facts, len(allowed)))
    return _Entity(kind, name, {a.name: a.value(names, name) for a in chosen})


def _document(r, ent: _Entity, split: str, names: NameMaker) -> str:
    facts = [
        _render(r.choice(_BY_KEY[ent.kind, a].fact_templates(split)), ent.name, v)
        for a, v in ent.facts.items()
    ]
    filler = [_render(t, ent.name, "") for t in r.sample(_FILLER[ent.kind], r.randint(1, 3))]
    style = STYLES[r.choice(list(STYLES))]
    return style(r, ent.name, ent.kind, facts, filler, names)


def make_facts(
    split: str,
    n_episodes: int,
    docs_per_episode: int | tuple[int, int] = (1, 8),
    target_tokens: int | None = None,
    seed: int = 0,
    n_questions: int = 4,
    facts_per_entity: tuple[int, int] = (3, 5),
    tokenizer=None,
) -> list[QAEpisode]:
    """Generate `facts` episodes for one split.

    Length is set either by `docs_per_episode` (an int, or a (lo, hi) range drawn per
    episode) or, if given, by `target_tokens`: documents are added until the context reaches
    it (estimated as 1.3 x words, or counted exactly with `tokenizer`). Questions go to
    `n_questions` facts spread over distinct entities anywhere in the stream.
    """
    check_split(split)
    r = rng_for("facts", split, seed, target_tokens, docs_per_episode)
    episodes = []
    for i in range(n_episodes):
        names = NameMaker(r, split)
        if isinstance(docs_per_episode, int):
            n_docs = docs_per_episode
        else:
            n_docs = r.randint(*docs_per_episode)
        entities, docs, tokens = [], [], 0
        while (tokens < target_tokens) if target_tokens else (len(docs) < n_docs):
            ent = _entity(r, names, split, r.randint(*facts_per_entity))
            entities.append(ent)
            docs.append(_document(r, ent, split, names))
            tokens += estimate_tokens(docs[-1], tokenizer)
        asked = r.sample(entities, min(n_questions, len(entities)))
        while len(asked) < n_questions:  # few entities: ask several things about one
            asked.append(r.choice(entities))
        qas, seen, episode_id = [], set(), f"facts-{split}-s{seed}-{i:05d}"
        for ent in asked:
            left = [a for a in ent.facts if (ent.name, a) not in seen]
            if not left:
                continue
            a = r.choice(left)
            seen.add((ent.name, a))
            attr = _BY_KEY[ent.kind, a]
            q = _render(r.choice(attr.question_templates(split)), ent.name, "")
            key = f"{episode_id}/{len(qas)}"
            qas.append(QA(q, [ent.facts[a]], answer_options(attr, ent, entities, split, key)))
        episodes.append(QAEpisode(episode_id, docs, qas))
    return episodes


def answer_options(
    attr: Attribute, ent: _Entity, entities: list[_Entity], split: str, key: str, k: int = N_OPTIONS
) -> list[str]:
    """`k` candidates of the asked attribute's type: the gold value, the values the context
    gives other entities for it (distractors that were read too), then fresh values.

    Drawn from their own generator (seeded by `key`), so episodes are the same with or without."""
    gold = ent.facts[attr.name]
    in_context = [
        e.facts[attr.name] for e in entities if e.kind == ent.kind and attr.name in e.facts
    ]
    options = list(dict.fromkeys([gold, *in_context]))[:k]
    r = random.Random(f"options/{key}")
    names = NameMaker(r, split)
    for _ in range(20 * k):
        if len(options) == k:
            break
        value = attr.value(names, ent.name)
        if value not in options:
            options.append(value)
    r.shuffle(options)
    return options
