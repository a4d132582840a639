"""The `recall` benchmark: deterministic, disjoint surface forms per split, options that only a
binding can tell apart."""

from __future__ import annotations

import re

import pytest

from genadapter.data.benchmarks import make_recall
from genadapter.data.benchmarks.common import split_of
from genadapter.data.benchmarks.recall import CLOZE_END, KINDS, N_OPTIONS
from genadapter.data.episodes import Cloze, QAEpisode, read_episodes, write_episodes


def form_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{k\}", "(.+?)").replace(r"\{v\}", "(.+?)"))


def forms_used(episodes: list[QAEpisode], kind_of_template: str) -> set[str]:
    used = set()
    for e in episodes:
        text = " ".join(e.context)
        for kind in KINDS:
            for t in kind.statements if kind_of_template == "statements" else kind.questions:
                parts = (
                    [e.context] if kind_of_template == "statements" else [q.question for q in e.qas]
                )
                if kind_of_template == "statements":
                    if form_regex(t).search(text):
                        used.add(t)
                elif any(form_regex(t).fullmatch(q) for q in parts):
                    used.add(t)
    return used


@pytest.mark.parametrize("ask", ["cloze", "question"])
def test_recall_is_deterministic_and_round_trips(tmp_path, ask):
    a, b = make_recall("train", 6, seed=3, ask=ask), make_recall("train", 6, seed=3, ask=ask)
    assert [e.to_json() for e in a] == [e.to_json() for e in b]
    assert [e.to_json() for e in make_recall("train", 6, seed=4)] != [e.to_json() for e in a]
    write_episodes(tmp_path / "r.jsonl", a)
    loaded, problems = read_episodes(tmp_path / "r.jsonl")
    assert not problems and [e.to_json() for e in loaded] == [e.to_json() for e in a]
    kinds = {type(qa.question) for e in loaded for qa in e.qas}
    assert kinds == ({Cloze} if ask == "cloze" else {str})


def key_of(question: str) -> str:
    """The key a recall question or cloze asks about."""
    return next(
        w
        for kind in KINDS
        for t in (*kind.questions, *(CLOZE_END.sub("", s) for s in kind.statements))
        if (m := form_regex(t).fullmatch(question))
        for w in m.groups()
    )


@pytest.mark.parametrize("ask", ["cloze", "question"])
@pytest.mark.parametrize("k", [4, 16, 64])
def test_every_question_is_answered_once_by_its_key_and_options_come_from_the_context(k, ask):
    for e in make_recall("test", 10, k=k, seed=0, n_questions=5, ask=ask):
        text = " ".join(e.context)
        assert f"-k{k}-" in e.id
        sentences = re.split(r"(?<=[.])\s+", text)
        for qa in e.qas:
            assert len(qa.options) == min(N_OPTIONS, k) == len(set(qa.options))
            assert qa.answers[0] in qa.options
            for option in qa.options:  # each value of the context is stated exactly once
                stating = [s for s in sentences if re.search(rf"\b{re.escape(option)}\b", s)]
                assert len(stating) == 1, (option, stating)
            (gold_sentence,) = [
                s for s in sentences if re.search(rf"\b{re.escape(qa.answers[0])}\b", s)
            ]
            assert re.search(rf"\b{re.escape(key_of(qa.question))}\b", gold_sentence)
            if ask == "cloze":  # the pair's own sentence up to its value, which ends it
                assert gold_sentence.startswith(f"{qa.question} {qa.answers[0]}")
                assert gold_sentence.rstrip(".!?").endswith(qa.answers[0])
        assert len({qa.question for qa in e.qas}) == len(e.qas)


def test_splits_use_disjoint_surface_forms_and_names():
    episodes = {
        s: make_recall(s, 60, k=(4, 8), seed=0, ask="question")
        for s in ("train", "validation", "test")
    }
    for what in ("statements", "questions"):
        used = {s: forms_used(eps, what) for s, eps in episodes.items()}
        assert used["train"] and used["validation"] and used["test"]
        assert not used["train"] & used["validation"]
        assert not used["train"] & used["test"]
        assert not used["validation"] & used["test"]
    clozes = {s: make_recall(s, 60, k=(4, 8), seed=0) for s in episodes}
    used = {s: forms_used(eps, "statements") for s, eps in clozes.items()}
    assert all(used.values()) and not used["train"] & (used["validation"] | used["test"])
    assert not used["validation"] & used["test"]
    for split, eps in episodes.items():
        for e in eps:
            if "-home-" in e.id or "-colour-" in e.id:  # invented person keys hash into the split
                key = e.qas[0].question
                names = re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", key)
                assert names and all(split_of(n) == split for n in names)


def one_cloze_form(e: QAEpisode) -> str | None:
    """The form (with {k}) every cloze of the episode repeats, if they all repeat one."""
    forms = {qa.question.replace(key_of(qa.question), "{k}") for qa in e.qas}
    return forms.pop() if len(forms) == 1 else None


def test_one_form_states_every_pair_of_an_episode_alike():
    for e in make_recall("train", 20, k=(8, 16), seed=1, one_form=True):
        form = one_cloze_form(e)
        assert form is not None
        k = int(re.search(r"-k(\d+)-", e.id).group(1))
        sentences = re.split(r"(?<=[.])\s+", " ".join(e.context))
        stated = [s for s in sentences if form_regex(form + " {v}.").fullmatch(s)]
        assert len(stated) == k  # every pair in the clozes' form: only its key tells them apart
    mixed = make_recall("train", 20, k=(8, 16), seed=1)
    assert any(one_cloze_form(e) is None for e in mixed)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        make_recall("dev", 1)
    with pytest.raises(ValueError, match="k must lie"):
        make_recall("train", 1, k=1)
    with pytest.raises(ValueError, match="k must lie"):
        make_recall("train", 1, k=(4, 200))
    with pytest.raises(ValueError, match="ask must be one of"):
        make_recall("train", 1, ask="riddle")
