"""Metric functions against hand-computed cases; the shared prompt format."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genadapter.data.episodes import Cloze
from genadapter.eval.metrics import (
    kv_cache_bytes,
    option_accuracy,
    peak_rss_bytes,
    reset_peak_rss,
    squad_scores,
    target_logprobs,
)
from genadapter.eval.prompts import PromptFormat, join_context


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "f1"),
    [
        ("Paris", ["Paris"], 1.0, 1.0),
        ("the  Paris!", ["paris"], 1.0, 1.0),  # articles, punctuation, case, spaces normalised
        ("cat sat", ["a cat sat down"], 0.0, 0.8),  # P = 2/2, R = 2/3 -> F1 = 0.8
        ("red blue green", ["blue"], 0.0, 0.5),  # P = 1/3, R = 1 -> F1 = 0.5
        ("London", ["Paris", "london"], 1.0, 1.0),  # best of several gold answers
        ("Rome", ["Paris"], 0.0, 0.0),
        ("", ["Paris"], 0.0, 0.0),
    ],
)
def test_squad_scores(prediction, answers, em, f1):
    got = squad_scores(prediction, answers)
    assert got["em"] == pytest.approx(em)
    assert got["f1"] == pytest.approx(f1)


def test_squad_needs_answers():
    with pytest.raises(ValueError):
        squad_scores("x", [])


def test_option_accuracy():
    assert option_accuracy([-1.0, -0.5, -2.0], ["a", "b", "c"], "b") == 1.0
    assert option_accuracy([-1.0, -0.5, -2.0], ["a", "b", "c"], "a") == 0.0
    assert option_accuracy([-1.0, -1.0], ["a", "b"], "a") == 1.0  # tie: first option
    with pytest.raises(ValueError):
        option_accuracy([0.0], ["a", "b"], "a")


def test_target_logprobs_hand_computed():
    # vocab 2; the logits at position t predict token t + 1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 5.0]]])
    ids = torch.tensor([[1, 0, 1]])
    lp = target_logprobs(logits, ids, 2)
    assert lp.tolist() == pytest.approx([math.log(0.5), math.log(0.25)])
    with pytest.raises(ValueError):
        target_logprobs(logits, ids, 3)


def test_kv_cache_bytes_matches_a_real_cache():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 64, (1, 11)), use_cache=True).past_key_values
    measured = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(cfg, 11) == measured == 2 * 3 * 2 * 8 * 11 * 4


def test_peak_rss_is_reset_per_measurement():
    reset_peak_rss()
    before = peak_rss_bytes()
    big = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    big += 1
    grown = peak_rss_bytes()
    del big
    assert grown >= before + 32 * 2**20
    if reset_peak_rss():  # Linux: the high-water mark drops back after the reset
        assert peak_rss_bytes() < grown


def test_prompt_format_plain_and_chat(smollm2_tokenizer):
    plain = PromptFormat(smollm2_tokenizer, use_chat_template=False)
    assert plain.prompt_text("Who?") == "Question: Who?\nAnswer:"
    assert plain.prompt_text("Who?", "Ctx.") == "Ctx.\n\nQuestion: Who?\nAnswer:"
    assert smollm2_tokenizer.decode(plain.answer_ids("Paris")) == " Paris"
    chat = PromptFormat(smollm2_tokenizer)
    assert chat.use_chat_template
    text = chat.prompt_text("Who?", "Ctx.")
    assert "<|im_start|>user\nCtx.\n\nWho?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert (
        chat.prompt_ids("Who?")
        == smollm2_tokenizer(chat.prompt_text("Who?"), add_special_tokens=False).input_ids
    )
    assert chat.clean_answer("\n  Paris.\nQuestion: more") == "Paris."
    # a cloze follows the context as text, in every format, and its answer continues it
    cloze = Cloze("The code for zorba is")
    for fmt in (plain, chat):
        assert fmt.prompt_text(cloze, "Ctx.") == "Ctx.\n\nThe code for zorba is"
        assert fmt.prompt_text(cloze) == "The code for zorba is"
        assert smollm2_tokenizer.decode(fmt.answer_ids("4711", cloze)) == " 4711"
        assert fmt.clean_answer(" 4711. The code for vala is 12.", cloze) == "4711."
    assert smollm2_tokenizer.decode(chat.answer_ids("4711", "What is it?")) == "4711"
    assert join_context([" a ", "", "b"]) == "a\n\nb"
