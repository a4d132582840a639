"""Pooled queries (GeneratorConfig.queries): the side path reads a window mean of layer features.

Checked against a float64 recomputation from the frozen LM's own hidden states, across KV-cache
decoding and padding, and refused wherever a row's positions are unknown or a weight delta is
needed. (The server's batches: tests/test_serve.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_generator, tiny_model
from transformers import DynamicCache

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.compat import cache_argument
from genadapter.eval.batched import generate_rows, score_rows

CACHE = cache_argument(tiny_model())


def make(arch: str = "llama", memory: str = "ridge", layers=None, **queries) -> GenerativeAdapter:
    config = GeneratorConfig(r=4, r_in=8, memory=memory, layers=layers, queries=queries)
    ga = GenerativeAdapter.from_base(tiny_model(arch, init_range=0.3), config)
    randomize_generator(ga, std=2.0)
    return ga


def reference_logits(ga: GenerativeAdapter, state, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one unpadded row recomputed in float64: every pooled feature as an explicit
    mean over its window of the frozen LM's own hidden states, added through plain hooks."""
    q = ga.config.queries
    hidden = ga.base_model(ids, output_hidden_states=True).hidden_states
    N = ga.generator.normalized(state.S, state.n)
    handles = []

    def add(target):
        layer = target.layer if q.layer is None else q.layer
        h = hidden[layer][0].double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        pooled = torch.stack([h[max(0, s - q.window + 1) : s + 1].mean(0) for s in range(len(h))])
        block = ga.generator[target.name]
        delta = ga.config.scaling * pooled @ block.A.double().T @ N[target.name][0].double()
        delta = delta @ block.B.double().T
        return lambda module, args, out: out + delta.to(out.dtype)[None]

    for t in ga.generator.targets:
        handles.append(ga._modules_by_name[t.name].register_forward_hook(add(t)))
    try:
        return ga.base_model(ids).logits[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "window,layer,layers",
    # with no query layer each target pools its own layer's input, which lower targets change:
    # the reference (the frozen LM's features) then holds for one adapted layer
    [(4, 0, None), (1, 1, [1, 2]), (50, 0, None), (3, None, [2])],
)
def test_pooled_side_path_matches_a_float64_recomputation(arch, window, layer, layers):
    ga = make(arch, layers=layers, window=window, layer=layer)
    g = torch.Generator().manual_seed(1)
    state = ga.read(torch.randint(2, 128, (1, 40), generator=g))
    ids = torch.randint(2, 128, (1, 12), generator=g)
    got = ga(ids, state=state).logits[0]
    assert (got - ga.base_model(ids).logits[0]).abs().max() > 1e-2  # the state does something
    torch.testing.assert_close(got, reference_logits(ga, state, ids), atol=1e-4, rtol=1e-4)


def test_decoding_with_a_cache_equals_the_full_forward():
    ga = make(layers=[1, 2], window=6, layer=1)
    state = ga.read(torch.randint(2, 128, (1, 30)))
    ids = torch.randint(2, 128, (1, 14))
    with ga.adapted(state):
        full = ga.base_model(ids).logits[0]
        cache, steps = DynamicCache(), []
        for start, end in [(0, 5), (5, 6), (6, 7), (7, 11), (11, 14)]:
            out = ga.base_model(ids[:, start:end], use_cache=True, **{CACHE: cache})
            steps.append(out.logits[0])
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


def test_generate_and_padded_rows_equal_each_row_alone():
    """HF generate (KV cache, left padding) and the eval's batched rows give each row's own
    greedy continuation and scores, as if it ran alone and whole."""
    ga = make(window=4, layer=0)
    state = ga.read(torch.randint(2, 128, (1, 30)))
    prompts = [[5, 9, 33, 12, 7], [40, 41], [3, 3, 90, 17, 18, 19, 20]]
    with ga.adapted(state):
        together = generate_rows(ga.base_model, prompts, 6, [], 0, rows_apart=True)
        alone = [generate_rows(ga.base_model, [p], 6, [], 0)[0] for p in prompts]
        rows = [(p + a, len(a)) for p, a in zip(prompts, alone, strict=True)]
        scores = score_rows(ga.base_model, rows, rows_apart=True)
        full = [ga.base_model(torch.tensor([ids])).logits[0].log_softmax(-1) for ids, _ in rows]
    assert together == alone
    for (ids, n), got, lp in zip(rows, scores, full, strict=True):
        want = lp[len(ids) - n - 1 : -1].gather(1, torch.tensor(ids[-n:])[:, None])[:, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    texts = ga.generate(torch.tensor([prompts[0]]), state=state, max_new_tokens=6)
    assert texts[0].tolist() == alone[0]


def test_rows_of_unknown_positions_are_refused():
    ga = make(window=4, layer=0)
    state = ga.read(torch.randint(2, 128, (1, 30)))
    ids = torch.randint(2, 128, (1, 8))
    outside = getattr(ga.base_model(ids, use_cache=True), CACHE)  # made outside the block
    with ga.adapted(state), pytest.raises(RuntimeError, match="KV cache made within"):
        ga.base_model(ids[:, :1], use_cache=True, **{CACHE: outside})
    packed = torch.zeros(1, 1, 8, 8)
    with ga.adapted(state), pytest.raises(ValueError, match="2-D attention mask"):
        ga.base_model(ids, attention_mask=packed)
    with pytest.raises(ValueError, match="beam search"):
        ga.generate(ids, state=state, max_new_tokens=2, num_beams=2)


def test_a_pooled_generator_is_no_weight_delta(tmp_path):
    ga = make(window=4)
    state = ga.read(torch.randint(2, 128, (1, 20)))
    for use in (
        lambda: ga.delta_weights(state),
        lambda: ga.export_lora(state, tmp_path / "lora"),
        lambda: ga.merged(state).__enter__(),
    ):
        with pytest.raises(ValueError, match="no weight delta"):
            use()


def test_config_round_trip_and_shapes(tmp_path):
    ga = make(layers=[1, 2], window=8, layer=1)
    down = next(t for t in ga.generator.targets if t.name.endswith("down_proj"))
    assert down.in_features != ga.generator.hidden_size  # a LoRA's A would read 64 features
    for t in ga.generator.targets:
        assert ga.generator[t.name].A.shape == (8, ga.generator.hidden_size)
    ga.save_pretrained(tmp_path / "g")
    back = GenerativeAdapter.from_pretrained(tmp_path / "g", base_model=ga.base_model)
    assert back.config.queries == ga.config.queries
    state = ga.read(torch.randint(2, 128, (1, 20)))
    ids = torch.randint(2, 128, (1, 6))
    torch.testing.assert_close(back(ids, state=state).logits, ga(ids, state=state).logits)
    wider = GenerativeAdapter.from_pretrained(
        tmp_path / "g", base_model=ga.base_model, queries={"window": 2}
    )
    assert wider.config.queries.layer == 1 and wider.config.queries.window == 2
    with pytest.raises(ValueError, match="between LoRA and pooled"):
        GenerativeAdapter.from_pretrained(
            tmp_path / "g", base_model=ga.base_model, queries={"window": 1, "layer": None}
        )
    with pytest.raises(ValueError, match="above the lowest adapted layer"):
        GenerativeAdapter.from_base(
            ga.base_model, GeneratorConfig(layers=[1], queries={"layer": 2})
        )
    with pytest.raises(ValueError, match="QueryConfig.window"):
        GeneratorConfig(queries={"window": 0})


def test_pooled_queries_start_as_the_keys_of_their_layer(smollm2_tokenizer):
    from genadapter.warm_start import fit_queries

    config = GeneratorConfig(r=4, r_in=8, layers=[1, 2], key_layer=1, queries={"layer": 1})
    ga = GenerativeAdapter.from_base(tiny_model(), config, tokenizer=smollm2_tokenizer)
    assert fit_queries(ga, []) == {name: 1.0 for name in ga.generator.names}
    for name in ga.generator.names:
        torch.testing.assert_close(ga.generator[name].A, ga.generator[name].K)
    untied = GenerativeAdapter.from_base(tiny_model(), config.replace(key_layer=0))
    with pytest.raises(ValueError, match="cannot be tied"):
        fit_queries(untied, [])


def test_candidate_continuations_carry_their_prompts_windows():
    """Training scores candidates from a copy of their prompt's KV cache: with pooled queries
    the prompt's windows follow (`windows.select`), so each NLL is that of the whole row."""
    from genadapter.state import AdapterState
    from genadapter.training.objectives import continuation_losses

    ga = make(window=5, layer=0)
    state = ga.read([[4, 8, 15, 16, 23, 42] * 5, [7, 7, 9, 30, 31, 2, 5] * 4]).detach()
    prompts = [torch.tensor([5, 9, 33, 12, 7, 60, 61]), torch.tensor([40, 41, 3])]
    continuations = [torch.tensor([3, 4]), torch.tensor([9, 10, 11]), torch.tensor([12])]
    owner = torch.tensor([0, 1, 1])
    rows = AdapterState.stack([state.select(int(i)) for i in owner])
    with torch.no_grad():
        got = continuation_losses(ga, prompts, continuations, owner, state, rows).loss_sum
    for j, (i, c) in enumerate(zip(owner.tolist(), continuations, strict=True)):
        ids = torch.cat([prompts[i], c])[None]
        with torch.no_grad():
            logits = ga(ids, state=state.select(i)).logits[0, len(prompts[i]) - 1 : -1]
        want = torch.nn.functional.cross_entropy(logits, c, reduction="sum")
        torch.testing.assert_close(got[j], want, atol=1e-4, rtol=1e-4)


def test_a_read_between_decoding_steps_is_not_taken_for_the_prompt():
    """`context_features` stops inside the forward: its features must not become the
    decoded rows' windows."""
    ga = make(window=4, layer=0)
    state = ga.read(torch.randint(2, 128, (1, 30)))
    ids = torch.randint(2, 128, (1, 8))
    with ga.adapted(state):
        cache = getattr(ga.base_model(ids, use_cache=True), CACHE)
        ga.context_features(torch.randint(2, 128, (1, 8)), None)
        with pytest.raises(RuntimeError, match="KV cache made within"):
            ga.base_model(ids[:, :1], use_cache=True, **{CACHE: cache})
