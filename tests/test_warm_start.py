"""fit_queries: a target's query map A starts as its keys' map K, A x_t = K h̄_t in the frozen LM."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.generator import rms_normalize
from genadapter.training.module import GeneratorPretraining
from genadapter.warm_start import (
    copy_values,
    final_norm_weight,
    fit_queries,
    regression,
    target_inputs,
    whitening,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 6,
    "Ruper Duleth lives in Odense, and Nevum Babene has moved to Krakow with her family. " * 6,
]


def adapter(tokenizer, targets: list[str]) -> GenerativeAdapter:
    model = tiny_model("llama", vocab=len(tokenizer), init_range=0.5)
    with torch.no_grad():  # norms that are not the identity, so R has something to undo
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
    torch.manual_seed(0)
    config = GeneratorConfig(r=4, r_in=8, target_modules=targets, chunk_len=16, dtype="float64")
    return GenerativeAdapter.from_base(model.double(), config, tokenizer=tokenizer)


def test_regression_recovers_a_linear_map_and_its_r2():
    g = torch.Generator().manual_seed(0)
    X, R = torch.randn(500, 6, generator=g), torch.randn(3, 6, generator=g)
    fitted, r2 = regression(X, X @ R.T, lam=1e-9)
    torch.testing.assert_close(fitted, R.double(), rtol=1e-5, atol=1e-5)
    assert r2 == pytest.approx(1.0, abs=1e-9)
    _, r2_noise = regression(X, torch.randn(500, 3, generator=g))
    assert r2_noise < 0.1


def test_queries_of_a_normed_input_become_the_keys_exactly(smollm2_tokenizer):
    ga = adapter(smollm2_tokenizer, ["v_proj", "o_proj"])
    B = {n: ga.generator[n].B.clone() for n in ga.generator.names}
    fits = fit_queries(ga, TEXTS)
    v, o = "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"
    assert fits[v] == pytest.approx(1.0, abs=1e-6)  # v_proj reads input_layernorm(h): exact
    assert fits[o] < 0.999  # o_proj reads the attention's output: only a regression
    ids = smollm2_tokenizer("Odense is a city in Denmark, home of Ruper Duleth.").input_ids
    ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    inputs, hidden = target_inputs(ga, ids, mask)
    x = inputs[v][0]
    torch.testing.assert_close(hidden[1], ga.context_features(ids, mask)[1])  # one forward
    h = ga.generator.features(ga.context_features(ids, mask)[1], mask)[0][0]
    block = ga.generator[v]
    query, key = x @ block.A.T, h @ block.K.T  # Llama's norm runs in float32: 1e-3 of the scale
    torch.testing.assert_close(query, key, rtol=0, atol=1e-3 * key.abs().max().item())
    for name, b in B.items():  # B untouched: the adapter still changes nothing
        assert torch.equal(ga.generator[name].B, b)


def test_fit_queries_refuses_text_shorter_than_a_key(smollm2_tokenizer):
    ga = adapter(smollm2_tokenizer, ["v_proj"])
    with pytest.raises(ValueError, match="calibration text"):
        fit_queries(ga, [""])


def test_copy_values_adds_the_read_tokens_output_embedding():
    model = tiny_model("llama", init_range=0.5)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    torch.manual_seed(0)
    config = GeneratorConfig(
        r=32, r_in=8, target_modules=["down_proj"], value_layer=0, dtype="float64"
    )
    ga = GenerativeAdapter.from_base(model.double(), config)
    copy_values(ga, beta=3.0)
    E = model.get_input_embeddings().weight.detach().double()
    U = model.get_output_embeddings().weight.detach().double()
    for name in ga.generator.names:
        block = ga.generator[name]
        copied = config.scaling * rms_normalize(E) @ block.V.T @ block.B.T  # a value read out
        M = regression(rms_normalize(E), U)[0]
        torch.testing.assert_close(copied, 3.0 * rms_normalize(E) @ M.T)  # r = d: all of it
        cos = torch.nn.functional.cosine_similarity(copied, U, dim=-1)
        assert cos.min() > 0.99  # tied: the copy is the token's own embedding


def test_whitening_is_a_projection_that_keeps_a_tokens_own_rise():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(256, 16, generator=g, dtype=torch.float64) + 2.0  # a shared direction
    gain = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    plain = (U * gain) @ U.T  # token y's logit rise (rows) for a copy of u_x (columns)
    white = (U * gain) @ whitening(U, gain, 1e-12) @ U.T
    # u_y' P u_x' with P = (U'^T U')^-1, up to scale: a symmetric projection (the hat matrix)
    torch.testing.assert_close(white, white.T)
    scale = (white @ white).trace() / white.trace()
    top = (scale * white).abs().max().item()
    torch.testing.assert_close(white @ white, scale * white, rtol=0, atol=1e-9 * top)
    torch.testing.assert_close(white.diagonal().mean(), plain.diagonal().mean())
    off = ~torch.eye(len(U), dtype=torch.bool)
    crossing = lambda L: L[off].abs().mean() / L.diagonal().mean()  # noqa: E731
    assert crossing(white) < 0.5 * crossing(plain)  # copies cross over less
    far = (U * gain) @ whitening(U, gain, 1e9) @ U.T  # mu -> inf: a copy of gain * u
    seen = (U * gain) @ (U * gain).T
    torch.testing.assert_close(far / far.trace(), seen / seen.trace(), rtol=1e-6, atol=1e-9)


def test_whitened_copy_values_add_the_whitened_embedding():
    model = tiny_model("llama", init_range=0.5)
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    config = GeneratorConfig(
        r=32, r_in=8, target_modules=["down_proj"], value_layer=0, dtype="float64"
    )
    ga = GenerativeAdapter.from_base(model.double(), config)
    copy_values(ga, beta=3.0, whiten=0.1)
    E = rms_normalize(model.get_input_embeddings().weight.detach().double())
    U = model.get_output_embeddings().weight.detach().double()
    W = whitening(U, model.model.norm.weight.detach().double(), 0.1)
    for name in ga.generator.names:
        block = ga.generator[name]
        copied = config.scaling * E @ block.V.T @ block.B.T
        torch.testing.assert_close(copied, 3.0 * E @ (W @ regression(E, U)[0]).T)


def test_final_norm_weight_is_the_gain_the_head_reads():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    assert final_norm_weight(llama).data_ptr() == llama.model.norm.weight.data_ptr()
    assert final_norm_weight(gpt2).data_ptr() == gpt2.transformer.ln_f.weight.data_ptr()


def test_copy_values_refuses_what_cannot_copy():
    model = tiny_model("llama")
    own = GenerativeAdapter.from_base(model, GeneratorConfig(r=4, r_in=4))
    with pytest.raises(ValueError, match="value_layer: 0"):
        copy_values(own, 1.0)
    up = GenerativeAdapter.from_base(
        model, GeneratorConfig(r=4, r_in=4, target_modules=["up_proj"], value_layer=0)
    )
    with pytest.raises(ValueError, match="write the residual stream"):
        copy_values(up, 1.0)
    wide = GenerativeAdapter.from_base(model, GeneratorConfig(r=64, r_in=4, value_layer=0))
    with pytest.raises(ValueError, match="r <= the hidden size"):
        copy_values(wide, 1.0)


def test_training_starts_warm_and_learns_only_what_it_is_told(tiny_dir):
    generator = {
        "r": 4, "r_in": 8, "chunk_len": 16, "target_modules": ["down_proj"], "value_layer": 0,
        "keys": {"gate": True, "shift": 1},
    }  # fmt: skip
    kw = dict(base_model=str(tiny_dir), generator=generator, query_init_docs=4)
    cold = GeneratorPretraining(**kw)
    warm = GeneratorPretraining(**kw, copy_init_beta=2.0, trainable=["G", "B"], decay_steps=10)
    for name in warm.ga.generator.names:
        a, b = cold.ga.generator[name], warm.ga.generator[name]
        torch.testing.assert_close(a.A, b.A)  # same seed, same fit: V and B do not enter it
        assert a.B.abs().sum() == 0 and b.B.abs().sum() > 0  # the copy is on
    learning = {n for n, p in warm.ga.generator.named_parameters() if p.requires_grad}
    assert learning and {n.rsplit(".", 1)[-1] for n in learning} == {"G", "B"}
    optimiser = warm.configure_optimizers()["optimizer"]
    optimised = {id(p) for g in optimiser.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in warm.ga.generator.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="trainable must name parameters"):
        GeneratorPretraining(**kw, trainable=["Q"])
    white = GeneratorPretraining(**kw, copy_init_beta=2.0, copy_init_whiten=1.0)
    copy_values(warm.ga, 2.0, whiten=1.0)  # the same copy, whitened by hand
    for name in white.ga.generator.names:
        torch.testing.assert_close(white.ga.generator[name].B, warm.ga.generator[name].B)
