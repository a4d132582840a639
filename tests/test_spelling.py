"""Bare spellings: a copy raises a word as a chat answer begins it (`GeneratorConfig.value_bare`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.generator import rms_normalize
from genadapter.spelling import bare_token_ids


def first(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False).input_ids[0]


def test_bare_token_ids_drop_the_leading_space_and_keep_the_rest(smollm2_tokenizer):
    tok = smollm2_tokenizer
    bare = bare_token_ids(tok, len(tok) + 3)
    for word in ["butter", "Arusha", "Monash", "florist"]:
        assert bare[first(tok, " " + word)] == first(tok, word)
    for text in ["butter", "the", ",", "\n"]:  # no leading space: itself
        i = first(tok, text)
        assert bare[i] == i
    assert bare[tok.eos_token_id] == tok.eos_token_id
    assert torch.equal(bare[len(tok) :], torch.arange(len(tok), len(tok) + 3))


def test_value_bare_features_carry_both_spellings(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny_model("llama", vocab=len(tok))
    config = GeneratorConfig(
        r=4, r_in=4, target_modules=["down_proj"], value_layer=0, key_layer=1, value_bare=True
    )
    ga = GenerativeAdapter.from_base(model, config, tokenizer=tok)
    plain = GenerativeAdapter.from_base(model, config.replace(value_bare=False), tokenizer=tok)
    plain.generator.load_state_dict(ga.generator.state_dict())
    ids = torch.tensor([tok("Saho is known for its butter chicken.").input_ids])
    mask = torch.ones_like(ids)
    E = model.get_input_embeddings().weight.detach()
    bare = bare_token_ids(tok, E.shape[0])[ids]
    expected = rms_normalize(E[ids]) + rms_normalize(E[bare])
    features = ga.context_features(ids, mask)
    torch.testing.assert_close(features[0], expected)
    torch.testing.assert_close(features[1], plain.context_features(ids, mask)[1])  # keys: same
    assert ga.generator.fingerprint() != plain.generator.fingerprint()  # states mean another thing


def test_value_bare_needs_values_from_the_embeddings():
    with pytest.raises(ValueError, match="value_layer: 0"):
        GeneratorConfig(value_bare=True)
    with pytest.raises(ValueError, match="tokenizer"):
        config = GeneratorConfig(r=4, r_in=4, value_layer=0, value_bare=True)
        ga = GenerativeAdapter.from_base(tiny_model("llama"), config)
        ga.context_features(torch.tensor([[1, 2, 3]]), None)
