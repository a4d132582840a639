"""A few checks on the real offline SmolLM2-135M-Instruct (fetched by `make assets`)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_generator

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.assets import DEFAULT_MODEL, is_complete, smollm2_dir

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def ga():
    if not is_complete(smollm2_dir()):
        pytest.fail("offline SmolLM2 assets missing: run `make assets`")
    cfg = GeneratorConfig(r=8, r_in=8, layers="-4:", chunk_len=32)
    return GenerativeAdapter.from_base(DEFAULT_MODEL, cfg)


def test_smollm2_empty_state_and_generate(ga):
    assert ga.config.base_model == DEFAULT_MODEL
    assert len(ga.generator.targets) == 8  # o_proj + down_proj in the last four layers
    enc = ga.tokenizer(
        ["The capital of France is", "Water boils at"], return_tensors="pt", padding=True
    )
    base = ga.base_model(**enc).logits
    assert torch.equal(
        ga(enc["input_ids"], state=ga.new_state(2), attention_mask=enc["attention_mask"]).logits,
        base,
    )

    before = {k: v.clone() for k, v in ga.base_model.state_dict().items()}
    plain = ga.generate("What is the capital of France?", chat=True, max_new_tokens=8)
    assert "Paris" in plain  # the converted weights are the real model
    randomize_generator(ga, std=0.05)
    state = ga.read("Zorblat is a small town on the river Quenn, famous for its copper bells.")
    assert state.n.item() > 10
    adapted = ga.generate("Tell me about Zorblat.", state=state, chat=True, max_new_tokens=8)
    assert isinstance(adapted, str) and adapted
    after = ga.base_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
