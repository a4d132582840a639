"""`persona`: remember what a user said about themself across chat sessions.

An episode is several user-assistant sessions of small talk; here and there the user mentions
a fact about themself (pet's name, home town, job, allergy, ...) and, as distractors, facts
about other people ("My neighbour's dog is called ..."). Questions come after all sessions:
"What is my dog's name?".

Held out from train, as in `facts`:
- values: invented values (the user's name, pets', relatives' names, home towns, bands) hash
  into train/validation/test, so a test answer never occurs in train or validation;
- phrasings: the last `N_TEST_PHRASINGS` mention and question forms of every attribute are
  used only in test.
Pooled values (jobs, allergies, sports, ...) are shared; only their pairing is random.

The text (value pools, mentions, questions, distractors, small talk) lives in
`templates/persona.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from genadapter.data.episodes import QA, ConversationEpisode

from .common import (
    NameMaker,
    article,
    build_attributes,
    check_fields,
    check_phrasings,
    check_split,
    lines,
    load_templates,
    rng_for,
    slots_of,
    unknown_value_maker,
)
from .facts import POOLS as FACTS_POOLS
from .facts import place_name

N_TEST_PHRASINGS = 2


@dataclass(frozen=True)
class PersonaAttribute:
    """A fact about the user: value sampler, optional relation word {s}, mentions, questions."""

    name: str
    value: Callable[[NameMaker], str]
    mentions: tuple[str, ...]  # {v} value, {av} "a/an value", {s} relation, {as} "a/an relation"
    questions: tuple[str, ...]
    relations: tuple[str, ...] = ("",)

    def mention_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self.mentions, split)

    def question_templates(self, split: str) -> tuple[str, ...]:
        return _phrasings(self.questions, split)


def _phrasings(templates: tuple[str, ...], split: str) -> tuple[str, ...]:
    return templates[-N_TEST_PHRASINGS:] if split == "test" else templates[:-N_TEST_PHRASINGS]


def _first_name(names: NameMaker) -> str:
    return names.unique(names.first_name)


def _band(names: NameMaker) -> str:
    r = names.rng

    def make() -> str:
        adjective, noun = r.choice(POOLS["band_adjectives"]), r.choice(POOLS["band_nouns"])
        if r.random() < 0.5:
            return f"The {adjective} {noun}"
        return f"{names.word(2)} and the {adjective} {noun}"

    return names.unique(make)


# ----------------------------------------------------------------------------- templates/persona.yaml


def value_maker(spec: str | dict, pools: dict[str, tuple[str, ...]]) -> Callable[[NameMaker], str]:
    """The function a `value:` spec of persona.yaml stands for: names -> value."""
    match spec:
        case {"pool": str(name)} if name in pools:
            pool = pools[name]
            return lambda names: names.rng.choice(pool)
        case "first_name":
            return _first_name
        case "place":
            return place_name
        case "band":
            return _band
    raise unknown_value_maker(spec, "pool, first_name, place, band", pools)


def load_attributes(
    entries: list[dict], pools: dict[str, tuple[str, ...]]
) -> tuple[PersonaAttribute, ...]:
    """The `attributes:` of persona.yaml, checked: a mistake raises ValueError naming its attribute."""
    return build_attributes(
        "persona.yaml", entries, lambda e: e.get("name"), lambda e: _attribute(e, pools)
    )


def _attribute(entry: dict, pools: dict[str, tuple[str, ...]]) -> PersonaAttribute:
    check_fields(entry, {"name", "value", "mentions", "questions"}, {"relations"})
    relations = entry.get("relations")
    if relations is not None and relations not in pools:
        raise ValueError(f"relations: no pool {relations!r}")
    attr = PersonaAttribute(
        entry["name"],
        value_maker(entry["value"], pools),
        lines(entry["mentions"]),
        lines(entry["questions"]),
        pools[relations] if relations else ("",),
    )
    # without relations, {s} would fill in as nothing
    relation = {"s", "as"} if relations else set()
    value = {"v", "av"}
    check_phrasings("mentions", attr.mentions, N_TEST_PHRASINGS, value | relation, [value])
    check_phrasings("questions", attr.questions, N_TEST_PHRASINGS, relation, [])
    return attr


_TEMPLATES = load_templates("persona.yaml")
# facts.yaml's pools too: the user's job is drawn from its professions
POOLS = FACTS_POOLS | {name: lines(text) for name, text in _TEMPLATES["pools"].items()}
ATTRIBUTES = load_attributes(_TEMPLATES["attributes"], POOLS)
DISTRACTOR_SLOTS = {
    slot: value_maker(spec, POOLS) for slot, spec in _TEMPLATES["distractor_slots"].items()
}
DISTRACTORS = lines(_TEMPLATES["distractors"])
# a slot no maker fills would fail only in the episode that draws it
check_phrasings(
    "persona.yaml: distractors",
    DISTRACTORS,
    0,
    {*DISTRACTOR_SLOTS, *(f"a{k}" for k in DISTRACTOR_SLOTS)},
    [],
)
OPENERS = lines(_TEMPLATES["openers"])
GREETINGS = lines(_TEMPLATES["greetings"])
PREFIXES = tuple(_TEMPLATES["prefixes"])
ACKS = lines(_TEMPLATES["acknowledgements"])
SMALL_TALK = tuple((pair["user"], pair["assistant"]) for pair in _TEMPLATES["small_talk"])
CLOSERS = tuple((pair["user"], pair["assistant"]) for pair in _TEMPLATES["closers"])


def _fill(template: str, **slots: str) -> str:
    """Fill {key} slots; {akey} is the value with its article ("an iguana")."""
    slots |= {f"a{k}": f"{article(v)} {v}" for k, v in slots.items() if v}
    s = template.format(**slots)
    return s[0].upper() + s[1:]


def _distractor(r, names: NameMaker) -> str:
    template = r.choice(DISTRACTORS)
    slots = slots_of(template)
    values = {k: make(names) for k, make in DISTRACTOR_SLOTS.items() if {k, f"a{k}"} & slots}
    return _fill(template, **values)


def make_persona(
    split: str,
    n_episodes: int,
    n_sessions: int | tuple[int, int] = (3, 6),
    seed: int = 0,
    facts_per_episode: tuple[int, int] = (4, 8),
    distractors_per_session: tuple[int, int] = (0, 2),
) -> list[ConversationEpisode]:
    """Generate `persona` episodes for one split: one QA per fact the user told about themself."""
    check_split(split)
    r = rng_for("persona", split, seed, n_sessions)
    episodes = []
    for i in range(n_episodes):
        names = NameMaker(r, split)
        n_s = n_sessions if isinstance(n_sessions, int) else r.randint(*n_sessions)
        chosen = r.sample(ATTRIBUTES, min(r.randint(*facts_per_episode), len(ATTRIBUTES)))
        # each session: user lines (facts, distractors) to bury in small talk
        planned: list[list[str]] = [[] for _ in range(n_s)]
        qas = []
        for attr in chosen:
            value, rel = attr.value(names), r.choice(attr.relations)
            template = r.choice(attr.mention_templates(split))
            mention = _fill(template, v=value, s=rel)
            if template.startswith(("My ", "Our ")):  # small-talk lead-in, as people do
                mention = r.choice(PREFIXES) + mention[0].lower() + mention[1:]
            planned[r.randrange(n_s)].append(mention)
            question = _fill(r.choice(attr.question_templates(split)), s=rel)
            qas.append(QA(question, [value]))
        sessions = []
        for facts in planned:
            facts += [_distractor(r, names) for _ in range(r.randint(*distractors_per_session))]
            r.shuffle(facts)
            turns = [("user", r.choice(OPENERS)), ("assistant", r.choice(GREETINGS))]
            chat = r.sample(SMALL_TALK, r.randint(1, 3) + max(0, 2 - len(facts)))
            for item in [(f, True) for f in facts] + [(c, False) for c in chat]:
                pos = r.randint(2, len(turns)) // 2 * 2  # insert between exchanges
                if item[1]:
                    pair = [("user", item[0]), ("assistant", r.choice(ACKS))]
                else:
                    pair = [("user", item[0][0]), ("assistant", item[0][1])]
                turns[pos:pos] = pair
            turns += list(zip(("user", "assistant"), r.choice(CLOSERS), strict=True))
            sessions.append([{"role": role, "content": text} for role, text in turns])
        episodes.append(ConversationEpisode(f"persona-{split}-s{seed}-{i:05d}", sessions, qas))
    return episodes
