"""Every method end to end on tiny random models; context effects; TTT hygiene; Houlsby identity."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.eval.bottleneck import HoulsbyAdapters, sublayers
from genadapter.eval.harness import ALL_METHODS
from genadapter.eval.methods import DoesNotFit, make_method, weights_fingerprint
from genadapter.eval.prompts import join_context

VOCAB = 49152  # the SmolLM2 tokenizer's
CONTEXT = ["Alice lives in Paris. She works as a doctor.", "Bob lives in Rome and sells bread."]
QUESTION = "Where does Alice live?"
TTT = ("ttt-lora", "ttt-bitfit", "ttt-adapter")


def tiny_llama(seed: int = 0, max_positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


def copying_model(c: float = 8.0) -> LlamaForCausalLM:
    """A one-layer LM that copies by construction: zero queries/keys make attention uniform
    over the prefix and identity values add the mean of earlier embeddings to the residual,
    so tokens seen in the prompt get higher logits (through the tied head)."""
    torch.manual_seed(0)
    d = 64
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=d,
        intermediate_size=d,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_()
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.v_proj.weight.copy_(torch.eye(d))
        attn.o_proj.weight.copy_(c * torch.eye(d))
        model.model.layers[0].mlp.down_proj.weight.zero_()
    return model


def method(name, model, tok, **kw):
    ga = None
    if name == "genadapter":
        ga = GenerativeAdapter.from_base(model, GeneratorConfig(r=4, r_in=4, chunk_len=16), tok)
    if name.startswith("ttt-"):
        kw = {"steps": 3, "lr": 1e-2, **kw}
    return make_method(name, model, tok, ga=ga, max_new_tokens=4, **kw)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_end_to_end(name, smollm2_tokenizer):
    model = tiny_llama()
    m = method(name, model, smollm2_tokenizer)
    with m.adapt(CONTEXT) as adapted:
        text = adapted.answer(QUESTION)
        nll = adapted.answer_nll(QUESTION, "Paris")
        scores = adapted.score_options(QUESTION, ["Paris", "Rome", "New York City"])
    assert isinstance(text, str)
    assert nll > 0 and all(s < 0 for s in scores) and len(scores) == 3
    stats = adapted.stats
    assert stats["adapt_seconds"] >= 0 and stats["kv_cache_bytes"] > 0
    assert (stats["state_bytes"] > 0) == (name in ("genadapter", *TTT))


def test_base_is_unaffected_by_context(smollm2_tokenizer):
    m = method("base", tiny_llama(), smollm2_tokenizer)
    with m.adapt(CONTEXT) as a, m.adapt(["Something else entirely, at some length."]) as b:
        assert a.answer_nll(QUESTION, "Paris") == b.answer_nll(QUESTION, "Paris")
        assert a.answer(QUESTION) == b.answer(QUESTION)


def test_prompt_sees_the_context(smollm2_tokenizer):
    """On a model that copies from its prompt, a context holding the answer lowers its NLL;
    `base` on the same model is not moved by either context."""
    model = copying_model()
    with_answer, without = ["Paris\n" * 20], ["The river ran slow through the old town at dusk."]
    nll = {}
    for name in ("prompt", "base"):
        m = method(name, model, smollm2_tokenizer)
        for label, ctx in (("with", with_answer), ("without", without)):
            with m.adapt(ctx) as adapted:
                nll[name, label] = adapted.answer_nll(QUESTION, "Paris")
    assert nll["prompt", "with"] < nll["prompt", "without"] - 1.0
    assert nll["base", "with"] == nll["base", "without"]


def test_prompt_reports_does_not_fit(smollm2_tokenizer):
    model = tiny_llama(max_positions=64)
    long_context = ["word " * 200]
    with method("prompt", model, smollm2_tokenizer).adapt(long_context) as adapted:
        with pytest.raises(DoesNotFit):
            adapted.answer(QUESTION)
        with pytest.raises(DoesNotFit):
            adapted.answer_nll(QUESTION, "Paris")
    window = method("prompt-window", model, smollm2_tokenizer, window=8)
    with window.adapt(long_context) as adapted:  # the last 8 tokens fit
        assert adapted.answer_nll(QUESTION, "Paris") > 0
        assert 0 < adapted.stats["prompt_context_tokens"] <= 8


def test_prompt_window_keeps_the_last_tokens(smollm2_tokenizer):
    m = method("prompt-window", tiny_llama(), smollm2_tokenizer, window=6)
    tail = m.last_tokens(join_context(CONTEXT))
    assert join_context(CONTEXT).endswith(tail) and tail.endswith("sells bread.")
    assert len(smollm2_tokenizer(tail, add_special_tokens=False).input_ids) <= 6


def context_loss(model, tok) -> float:
    ids = torch.tensor([tok(join_context(CONTEXT)).input_ids])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("name", TTT)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ttt_lowers_context_loss_and_restores_base(name, arch, smollm2_tokenizer):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_loss = context_loss(model, smollm2_tokenizer)
    m = method(name, model, smollm2_tokenizer, steps=5)
    for _ in range(2):  # fresh per episode: the second run starts from the same base
        with m.adapt(CONTEXT) as adapted:
            adapted_loss = context_loss(model, smollm2_tokenizer)
            assert adapted_loss < base_loss - 0.01
            losses = adapted.stats["train_losses"]
            assert losses[0] == pytest.approx(base_loss, rel=1e-4)  # starts at the base model
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert context_loss(model, smollm2_tokenizer) == base_loss
        assert not any(m._forward_hooks for m in model.modules())
        assert all(
            type(mod).__module__.startswith("transformers")
            or type(mod).__module__.startswith("torch")
            for mod in model.modules()
        )


def test_ttt_detects_a_changed_base(smollm2_tokenizer):
    model = tiny_llama()
    m = method("ttt-bitfit", model, smollm2_tokenizer, steps=1)
    adapted = m.adapt(CONTEXT)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # a leak the method must catch
    with pytest.raises(RuntimeError, match="base model changed"):
        adapted.close()
    fp = weights_fingerprint(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] -= 1.0
    assert weights_fingerprint(model) != fp


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bottleneck_adapter_starts_as_identity(arch):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        adapters = HoulsbyAdapters(model, bottleneck=8)
        assert len(adapters.adapters) == 2 * model.config.num_hidden_layers  # attention + MLP
        assert torch.equal(model(ids).logits, ref)
        adapters.adapters[0].up.weight.normal_()  # trained adapters do change the output
        assert not torch.allclose(model(ids).logits, ref)
        adapters.detach()
        assert torch.equal(model(ids).logits, ref)
    names = [n for n, _ in sublayers(model)]
    assert all(n.rsplit(".", 1)[-1] in ("self_attn", "attn", "mlp") for n in names)


def test_genadapter_control_reads_unrelated_text_of_the_same_length(smollm2_tokenizer):
    ga = GenerativeAdapter.from_base(
        tiny_llama(), GeneratorConfig(r=4, r_in=4, chunk_len=16), smollm2_tokenizer
    )
    control = make_method("genadapter", ga.base_model, smollm2_tokenizer, ga=ga, control=True)
    n_context = sum(len(smollm2_tokenizer(t).input_ids) for t in CONTEXT)
    texts = control.unrelated_texts(CONTEXT)
    lengths = [len(smollm2_tokenizer(t).input_ids) for t in texts]
    assert sum(lengths) >= n_context > sum(lengths[:-1])  # just enough unrelated text
    assert not set(texts) & set(CONTEXT)
    with control.adapt(CONTEXT) as handle:
        state = handle.lm.state
    expected = ga.read(texts[0])
    for t in texts[1:]:
        expected = ga.read(t, expected)
    for k in state.S:
        torch.testing.assert_close(state.S[k], expected.S[k])
