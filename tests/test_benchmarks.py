"""Built-in benchmarks: deterministic, split-disjoint, answerable, and the right size."""

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from genadapter.assets import is_complete, wiki_summaries_path
from genadapter.data.benchmarks import facts, make, make_facts, make_persona, persona
from genadapter.data.benchmarks.common import estimate_tokens, load_templates
from genadapter.data.episodes import read_episodes


def as_json(episodes) -> str:
    return json.dumps([e.to_json() for e in episodes])


def text_of(episode) -> str:
    return "\n".join(episode.context_texts())


def template_regex(template: str, slots: dict[str, str]) -> re.Pattern:
    """A template as a full-match regex: literal text kept, each {slot} -> its pattern."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile(
        "".join(re.escape(p) if i % 2 == 0 else slots.get(p, ".+") for i, p in enumerate(parts)),
        re.IGNORECASE,  # rendering capitalises the first letter
    )


def occurring(names, text: str) -> set[str]:
    """Which of `names` occur in `text` as whole words (one regex pass)."""
    alternation = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return set(re.findall(rf"\b(?:{alternation})\b", text))


def spy_templates(monkeypatch, module, name: str) -> list[str]:
    """Record every template the module renders through `module.<name>`."""
    seen, real = [], getattr(module, name)

    def spy(template, *args, **kwargs):
        seen.append(template)
        return real(template, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.fixture(scope="module")
def facts_splits():
    return {s: make_facts(s, n, seed=0) for s, n in (("train", 300), ("test", 150))}


# ----------------------------------------------------------------------------- facts


def test_facts_catalogue():
    kinds = Counter(a.kind for a in facts.ATTRIBUTES)
    assert len(facts.ATTRIBUTES) >= 20 and set(kinds) == set(facts.KINDS)
    assert len(facts.HELD_OUT) >= 3
    for a in facts.ATTRIBUTES:
        assert len(set(a.facts)) >= 10 and len(set(a.questions)) >= 10, a.name
        assert all("{e}" in t and ("{v}" in t or "{av}" in t) for t in a.facts), a.name
        assert all("{e}" in t and "{v}" not in t for t in a.questions), a.name
    styles = set(facts.STYLES)
    assert {"encyclopedia", "news", "letter", "interview", "profile"} <= styles


def test_facts_deterministic():
    a = make_facts("train", 5, seed=1)
    assert as_json(a) == as_json(make_facts("train", 5, seed=1))
    assert as_json(a) != as_json(make_facts("train", 5, seed=2))


def test_facts_answerable(facts_splits):
    for eps in facts_splits.values():
        for ep in eps:
            assert ep.qas and len(ep.context) >= 1
            for qa in ep.qas:
                assert all(ans in text_of(ep) for ans in qa.answers), (qa, ep.id)


def test_facts_answer_options(facts_splits, monkeypatch):
    read_distractors = 0
    for eps in facts_splits.values():
        for ep in eps:
            for qa in ep.qas:
                assert len(set(qa.options)) == facts.N_OPTIONS and qa.answers[0] in qa.options
                others = [o for o in qa.options if o != qa.answers[0]]
                read_distractors += any(o in text_of(ep) for o in others)
    assert read_distractors > 0  # same-type values of other entities in the context are among them
    # the candidates come from their own generator: episodes are the same without them
    with_options = make_facts("train", 20, seed=3)
    monkeypatch.setattr(facts, "answer_options", lambda *args, **kwargs: None)
    without = make_facts("train", 20, seed=3)
    for a, b in zip(with_options, without, strict=True):
        assert a.context == b.context and [(q.question, q.answers) for q in a.qas] == [
            (q.question, q.answers) for q in b.qas
        ]


def _match_question(question: str, split: str):
    """(attribute, entity) of a question, matched against the split's question templates."""
    for a in facts.ATTRIBUTES:
        for t in a.question_templates(split):
            m = template_regex(t, {"e": "(?P<e>.+)"}).fullmatch(question)
            if m:
                return a, m["e"]
    return None, None


def test_facts_test_entities_never_in_train(facts_splits):
    train_text = "\n".join(
        text_of(e) + "\n" + "\n".join(q.question for q in e.qas) for e in facts_splits["train"]
    )
    person_valued = {"employer", "sibling", "founder", "ceo", "mayor"}
    names = []
    for ep in facts_splits["test"]:
        for qa in ep.qas:
            attr, entity = _match_question(qa.question, "test")
            assert attr is not None, f"test question with a non-test phrasing: {qa.question}"
            assert entity in text_of(ep)
            names += [entity] + (qa.answers if attr.name in person_valued else [])
    assert len(names) > 500
    assert occurring(names, train_text) == set()
    assert occurring(names[:50], "\n".join(text_of(e) for e in facts_splits["test"]))  # check works


def test_facts_phrasings_and_attributes_held_out(monkeypatch):
    test_only = {
        t for a in facts.ATTRIBUTES for t in a.fact_templates("test") + a.question_templates("test")
    }
    held_out = {t for a in facts.ATTRIBUTES if a.held_out for t in a.facts + a.questions}
    trainable = {
        t
        for a in facts.ATTRIBUTES
        for t in a.fact_templates("train") + a.question_templates("train")
    }
    assert held_out <= test_only and not test_only & trainable
    used = spy_templates(monkeypatch, facts, "_render")
    train = make_facts("train", 200, seed=0) + make_facts("validation", 50, seed=0)
    assert not set(used) & test_only, set(used) & test_only
    # the same at the text level: no train question is phrased like a test question
    for ep in train:
        for qa in ep.qas:
            assert _match_question(qa.question, "test") == (None, None), qa.question
            assert _match_question(qa.question, "train")[0] is not None, qa.question
    used.clear()
    test = make_facts("test", 200, seed=0)
    used_test = set(used) & (test_only | trainable)
    assert used_test <= test_only and used_test & held_out  # held-out types do show up in test
    assert sum(_match_question(q.question, "test")[0].held_out for e in test for q in e.qas) > 20


def test_facts_length():
    one = make_facts("test", 3, docs_per_episode=1, seed=0)
    assert all(len(e.context) == 1 for e in one)
    short = make_facts("test", 5, target_tokens=200, seed=0)
    for e in short:
        assert 200 <= estimate_tokens(text_of(e)) < 600
    long = make_facts("test", 2, target_tokens=30_000, seed=0)
    for e in long:
        assert estimate_tokens(text_of(e)) > 30_000 and len(e.context) > 100

    class CharTokenizer:  # exact counting path: one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    exact = make_facts("test", 2, target_tokens=3000, seed=0, tokenizer=CharTokenizer())
    for e in exact:
        chars = sum(len(d) for d in e.context)
        assert 3000 <= chars < 3000 + max(len(d) for d in e.context) + 1


# ----------------------------------------------------------------------------- persona


@pytest.fixture(scope="module")
def persona_splits():
    return {s: make_persona(s, n, seed=0) for s, n in (("train", 300), ("test", 100))}


def test_persona_catalogue_and_shape(persona_splits):
    assert len(persona.ATTRIBUTES) >= 10
    for a in persona.ATTRIBUTES:
        assert len(set(a.mentions)) >= 6 and len(set(a.questions)) >= 4, a.name
    for ep in persona_splits["test"]:
        assert len(ep.sessions) >= 3 and ep.qas
        for session in ep.sessions:
            assert {t["role"] for t in session} == {"user", "assistant"}
    sixteen = make_persona("test", 2, n_sessions=16, seed=0)
    assert all(len(e.sessions) == 16 for e in sixteen)


def test_persona_deterministic():
    a = make_persona("train", 5, seed=1)
    assert as_json(a) == as_json(make_persona("train", 5, seed=1))
    assert as_json(a) != as_json(make_persona("train", 5, seed=2))


def test_persona_answerable(persona_splits):
    for eps in persona_splits.values():
        for ep in eps:
            user_said = "\n".join(
                t["content"] for s in ep.sessions for t in s if t["role"] == "user"
            )
            for qa in ep.qas:
                assert all(ans in user_said for ans in qa.answers), (qa, ep.id)


def _persona_attr(question: str, split: str):
    for a in persona.ATTRIBUTES:
        for t in a.question_templates(split):
            if template_regex(t, {"s": r"\w+"}).fullmatch(question):
                return a
    return None


def test_persona_values_and_phrasings_held_out(persona_splits, monkeypatch):
    invented = {"name", "pet_name", "home_town", "sibling_name", "partner_name", "favourite_band"}
    train_text = "\n".join(text_of(e) for e in persona_splits["train"])
    values = []
    for ep in persona_splits["test"]:
        for qa in ep.qas:
            attr = _persona_attr(qa.question, "test")
            assert attr is not None, qa.question
            if attr.name in invented:
                values += qa.answers
    assert len(values) > 100
    assert occurring(values, train_text) == set()
    for ep in persona_splits["train"]:
        for qa in ep.qas:
            assert _persona_attr(qa.question, "test") is None, qa.question
    test_only = {
        t
        for a in persona.ATTRIBUTES
        for t in a.mention_templates("test") + a.question_templates("test")
    }
    used = spy_templates(monkeypatch, persona, "_fill")
    make_persona("train", 200, seed=0)
    make_persona("validation", 50, seed=0)
    assert used and not set(used) & test_only


# ----------------------------------------------------------------------------- template files


def test_template_files_load():
    """templates/*.yaml hold the catalogues, and pyproject.toml ships every one of them."""
    for module, filename in ((facts, "facts.yaml"), (persona, "persona.yaml")):
        data = load_templates(filename)
        loaded = module.load_attributes(data["attributes"], module.POOLS)
        assert [a.name for a in loaded] == [a.name for a in module.ATTRIBUTES] != []
        assert [a.questions for a in loaded] == [a.questions for a in module.ATTRIBUTES]
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["genadapter.data.benchmarks"]
    package = Path(facts.__file__).parent
    shipped = {path for g in globs for path in package.glob(g)}
    assert shipped == set(package.glob("templates/*")) and len(shipped) == 3


def _with(entries: list[dict], **change) -> list[dict]:
    """The entries with the first one changed."""
    entries = copy.deepcopy(entries)
    entries[0] |= change
    return entries


def test_facts_template_file_checked():
    entries = load_templates("facts.yaml")["attributes"]
    first = entries[0]  # person.birthplace
    facts_lines, questions = first["facts"].splitlines(), first["questions"].splitlines()
    bad = {
        "unknown value maker {'colour': 3}": _with(entries, value={"colour": 3}),
        "unknown value maker {'pool': 'planets'}": _with(entries, value={"pool": "planets"}),
        "lacks {av} or {v}": _with(entries, facts="\n".join(["{e} was born.", *facts_lines])),
        "lacks {e}": _with(entries, facts="\n".join(["She was born in {v}.", *facts_lines])),
        "unknown slot ['v']": _with(entries, questions="\n".join(["{e} in {v}?", *questions])),
        "4 phrasings, need more than the 4": _with(entries, questions="\n".join(questions[:4])),
        "a phrasing appears twice": _with(entries, facts="\n".join(facts_lines * 2)),
        "unknown field ['held-out']": _with(entries, **{"held-out": True}),
        "missing field ['value']": [{k: v for k, v in first.items() if k != "value"}],
        "defined twice": [first, first],
    }
    for message, broken in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            facts.load_attributes(broken, facts.POOLS)
        assert str(error.value).startswith("facts.yaml: attribute person.birthplace: ")
    # a held-out attribute is all test phrasings: one of each is enough
    one = _with(
        entries, facts="{e} was born in {v}.", questions="Where was {e} born?", held_out=True
    )
    assert facts.load_attributes(one, facts.POOLS)[0].fact_templates("train") == ()
    # a new attribute, as a researcher would write it
    new = yaml.safe_load("""
        - kind: person
          name: shoe_size
          value: {size: [36, 47]}
          facts: |
            {e} wears shoes of size {v}.
          questions: |
            What shoe size does {e} wear?
    """)
    with pytest.raises(ValueError, match=r"person\.shoe_size: unknown value maker"):
        facts.load_attributes(new, facts.POOLS)


def test_persona_template_file_checked():
    entries = load_templates("persona.yaml")["attributes"]
    first = entries[0]  # name: no relation word
    mentions = first["mentions"].splitlines()
    bad = {
        "unknown value maker 'nickname'": _with(entries, value="nickname"),
        "lacks {av} or {v}": _with(entries, mentions="\n".join(["Hi there.", *mentions])),
        "unknown slot ['s']": _with(entries, mentions="\n".join(["My {s} is {v}.", *mentions])),
        "2 phrasings, need more than the 2": _with(
            entries, questions="What is my name?\nWho am I?"
        ),
        "relations: no pool 'cousins'": _with(entries, relations="cousins"),
    }
    for message, broken in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            persona.load_attributes(broken, persona.POOLS)
        assert str(error.value).startswith("persona.yaml: attribute name: ")


# ----------------------------------------------------------------------------- wiki-topic


@pytest.fixture(scope="module")
def wiki():
    if not is_complete(wiki_summaries_path().parent):
        pytest.skip("wiki summaries asset not present: run `make assets`")
    from genadapter.data.benchmarks import wiki_topic

    return wiki_topic


def test_wiki_topic_labels_and_disjointness(wiki):
    from genadapter.assets import load_wiki_summaries

    assert set(wiki.TOPICS) == {r["topic"] for r in load_wiki_summaries()} - {"Uncategorized"}
    assert len(wiki.TOPICS) == 11
    by_split = {
        s: wiki.make_wiki_topic(s, 30, k=16, n_queries=8, seed=0) for s in ("train", "test")
    }
    inputs = {}
    for split, eps in by_split.items():
        inputs[split] = set()
        for ep in eps:
            demos = [d.input for d in ep.demonstrations]
            queries = [q.input for q in ep.queries]
            assert len(demos) == 16 and len(queries) == 8
            assert len(set(demos + queries)) == 24  # no article twice, demos vs queries disjoint
            assert {d.output for d in ep.demonstrations} <= set(wiki.TOPICS)
            assert len({d.output for d in ep.demonstrations}) == 11  # balanced: every label shown
            for q in ep.queries:
                assert q.options == list(wiki.TOPICS) and q.output in q.options
            inputs[split] |= set(demos + queries)
    assert not inputs["train"] & inputs["test"]
    # the label really is the article's topic
    topic_of = {wiki.article_input(r): r["topic"] for r in load_wiki_summaries()}
    ep = by_split["test"][0]
    assert all(topic_of[d.input] == d.output for d in ep.demonstrations)
    assert all(topic_of[q.input] == q.output for q in ep.queries)


def test_wiki_topic_k_and_determinism(wiki):
    for k in (4, 64):
        eps = wiki.make_wiki_topic("test", 3, k=k, n_queries=4, seed=0)
        assert all(len(e.demonstrations) == k for e in eps)
        assert all(len(e.input.split()) <= 48 + 30 for e in eps[0].demonstrations)
    a = wiki.make_wiki_topic("train", 4, k=4, seed=3)
    assert as_json(a) == as_json(wiki.make_wiki_topic("train", 4, k=4, seed=3))
    assert as_json(a) != as_json(wiki.make_wiki_topic("train", 4, k=4, seed=4))


# ----------------------------------------------------------------------------- command


def test_make_benchmarks_command(tmp_path, capsys):
    from genadapter.cli import main

    assert (
        main(["make-benchmarks", "--out", str(tmp_path), "--only", "persona", "--scale", "0.02"])
        == 0
    )
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert files == [
        "persona/test-s16.jsonl",
        "persona/test.jsonl",
        "persona/train.jsonl",
        "persona/validation.jsonl",
    ]
    eps, problems = read_episodes(tmp_path / "persona/test.jsonl", kind="conversation")
    assert eps and problems == []
    assert "persona/train.jsonl" in capsys.readouterr().out
    assert {p.split("/")[0] for p, _ in make.default_jobs(0)} == {
        "facts",
        "wiki-topic",
        "persona",
        "recall",
    }
