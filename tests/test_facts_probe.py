"""experiments/facts/: the match probe's weights must be the memory's own read-out, the gate fit
must find a separable split, and the query maps' tuning loss must be the adapted model's own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_generator, tiny_model

from genadapter import GenerativeAdapter, GeneratorConfig, memory
from genadapter.config import KeyConfig, QueryConfig
from genadapter.data.episodes import QA, QAEpisode
from genadapter.eval.prompts import PromptFormat

FACTS = Path(__file__).resolve().parents[1] / "experiments" / "facts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, FACTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["ridge", "linear"])
def test_probe_weights_are_the_memorys_read_out(kind):
    probe = load("match_readout")
    torch.manual_seed(0)
    k, v, q = (
        torch.randn(40, 6, dtype=torch.float64),
        torch.randn(40, 5, dtype=torch.float64),
        torch.randn(3, 6, dtype=torch.float64),
    )
    g = torch.rand(40, dtype=torch.float64) * 2
    S = memory.write((g[:, None] * k)[None], v[None], k[None], kind)
    want = memory.read_out(S, kind, 0.7)[0].T @ q.T  # (r, Q): what the state reads for q
    got = v.T @ probe.weights(k, g, q, 0.7 if kind == "ridge" else None)
    torch.testing.assert_close(got, want)


def test_value_tokens_marks_every_occurrence():
    gate = load("copy_gate")
    label = gate.value_tokens([5, 1, 2, 7, 1, 2, 2, 9], [[1, 2], [9]])
    assert label.tolist() == [0, 1, 1, 0, 1, 1, 0, 1]
    # `after`: the tokens that end each value open too, never past the text's end
    label = gate.value_tokens([5, 1, 2, 7, 1, 2, 2, 9], [[1, 2], [9]], after=1)
    assert label.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert gate.value_tokens([1, 2, 3, 4], [[2]], after=2).tolist() == [0, 1, 1, 1]


def test_gate_fit_separates_values():
    gate = load("copy_gate")
    torch.manual_seed(0)
    label = (torch.rand(400) < 0.1).float()
    h = torch.randn(400, 8)
    h[:, 0] = 1.0  # a constant direction stands in for the bias the gate has not
    h[:, 1] += 4 * (2 * label - 1)
    G = gate.fit_gate(h, label)
    assert ((h @ G > 0).float() == label).all()


def test_slot_map_sends_openings_to_their_keys_and_the_rest_to_zero():
    slot = load("answer_slot")
    torch.manual_seed(0)
    template = torch.zeros(16)
    template[0] = 3.0  # every opening shares the chat template's direction
    examples = slot.SlotExamples()
    for _ in range(60):
        opening = template.clone()
        opening[1:8] = torch.randn(7)
        examples.opening.append(opening)
        examples.key.append(torch.randn(16))
    silent = torch.zeros(400, 16)
    silent[:, 8:] = torch.randn(400, 8)
    examples.silent.append(silent)
    R0 = slot.slot_map(examples, weight=10.0, lam=1e-6)
    opening, key, silent = examples.tensors()
    # 8 directions cannot send 60 openings to 60 random keys: the fit is the least-squares one
    X = torch.cat([opening[:, :8], torch.zeros(400, 8)]).double()
    lstsq = torch.linalg.lstsq(X[:60], key.double()).solution  # (8, 16)
    torch.testing.assert_close(opening @ R0.T, (X[:60] @ lstsq).float(), atol=1e-3, rtol=1e-3)
    assert (silent @ R0.T).abs().max() < 1e-3


def test_with_slot_adds_a_copy_of_the_next_token_target():
    slot = load("answer_slot")
    config = GeneratorConfig(
        r=8, r_in=8, layers=[2], target_modules=["down_proj"], memory="ridge", key_layer=1,
        keys=KeyConfig(window=1, shift=1, gate=True), queries=QueryConfig(1, 1), value_layer=0,
    )  # fmt: skip
    next_token = GenerativeAdapter.from_base(tiny_model(), config)
    randomize_generator(next_token)
    ga = slot.with_slot(next_token, 1)
    assert ga.config.layers == [1, 2] and next_token.config.layers == [2]
    source = next_token.generator[next_token.generator.names[0]]
    for name in ga.generator.names:
        for param, got in ga.generator[name].named_parameters():
            assert torch.equal(got, getattr(source, param)), (name, param)
    with pytest.raises(ValueError, match="already targets layer 2"):
        slot.with_slot(next_token, 2)


def test_value_start_finds_a_value_after_a_preamble_or_opening_the_answer():
    slot = load("answer_slot")
    words = {" The": [1], " is": [2], " the": [3], " accordion": [4, 5], "accordion": [6, 5]}

    def tok(text, add_special_tokens=False):  # a word-level tokenizer, spaces kept with words
        ids = [i for w in text.replace(" ", "| ").split("|") if w for i in words[w]]
        return type("Encoding", (), {"input_ids": ids})

    assert slot.value_start(tok, [1, 2, 3, 4, 5, 9], "accordion") == 3
    assert slot.value_start(tok, [6, 5, 9], "accordion") == 0
    assert slot.value_start(tok, [1, 2, 3, 5, 4], "accordion") is None  # its pieces out of order


def test_value_rate_counts_whole_normalised_words():
    rate = load("value_rate")
    assert rate.contains("The crowd flocks to the Fiddlers' Gathering.", "Fiddlers' Gathering")
    assert rate.contains("Born in 1961, he", "1961")
    assert not rate.contains("CrowdFiddlers, a type of", "Fiddlers' Gathering")
    assert not rate.contains("19611961", "1961")  # a digit string is not the year
    records = [
        {"method": "m", "group": "g", "items": [
            {"prediction": "It is Recife.", "gold": ["Recife"], "f1": 0.5},
            {"prediction": "Hifuon", "gold": ["Recife"], "f1": 0.0},
        ]},
    ]  # fmt: skip
    got = rate.value_rates(records)["m / g"]
    assert got == {"answers": 2, "contains %": 50.0, "F1 % where it does": 50.0, "F1 %": 25.0}


def test_tune_slot_loss_is_the_adapted_models_answer_nll(tiny_dir):
    tune = load("tune_slot")
    config = GeneratorConfig(
        r=8, r_in=8, layers=[1, 2], target_modules=["down_proj"], memory="ridge", key_layer=1,
        keys=KeyConfig(window=1, shift=1, gate=True), queries=QueryConfig(1, 1), value_layer=0,
        chunk_len=16,
    )  # fmt: skip
    ga = GenerativeAdapter.from_base(str(tiny_dir), config)
    randomize_generator(ga)
    episode = QAEpisode(
        "e",
        ["Ada Lovelace plays the cello. She lives in Turin.", "Bram Stoker lives in Oslo."],
        [QA("What does Ada play?", ["cello"]), QA("Where does Bram Stoker live?", ["Oslo"])],
    )
    eos = ga.tokenizer.eos_token_id
    tuning = tune.Episode(ga, episode, eos)
    got = tune.answer_loss(ga, {}, tuning)
    # the reference: the generator's own adapted model, one question at a time, unpadded
    fmt, state = PromptFormat(ga.tokenizer), ga.read(episode.context).sum()
    nll, count = 0.0, 0
    for qa in episode.qas:
        prompt, answer = fmt.prompt_ids(qa.question), fmt.answer_ids(qa.answers[0]) + [eos]
        with torch.no_grad(), ga.adapted(state):
            logits = ga.base_model(torch.tensor([prompt + answer])).logits[0]
        logp = logits[len(prompt) - 1 : -1].double().log_softmax(-1)
        nll -= logp[torch.arange(len(answer)), answer].sum().item()
        count += len(answer)
    torch.testing.assert_close(got.item(), nll / count, rtol=1e-4, atol=1e-5)
    # a query map in `A` replaces the generator's, and the loss reaches it
    name = ga.generator.names[0]
    A = {name: ga.generator[name].A.detach().clone().requires_grad_(True)}
    tune.answer_loss(ga, A, tuning).backward()
    assert A[name].grad is not None and A[name].grad.abs().sum() > 0
