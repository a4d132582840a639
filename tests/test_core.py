"""The contract of docs/method.md on tiny random Llama, Qwen2 and GPT-2 models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, randomize_generator, tiny_model

from genadapter import AdapterState, GenerativeAdapter, GeneratorConfig, StateMismatchError
from genadapter.config import KeyConfig
from genadapter.generator import rms_normalize
from genadapter.normalize import PolarFactor, normalize_state


@pytest.fixture(params=["linear", "ridge"])
def memory(request) -> str:
    """Every property of the core holds for both memories (genadapter/memory.py)."""
    return request.param


def make(arch: str, seed: int = 0, random: bool = True, **cfg) -> GenerativeAdapter:
    cfg = {"r": 4, "r_in": 6, "chunk_len": 8, **cfg}
    ga = GenerativeAdapter.from_base(tiny_model(arch), GeneratorConfig(**cfg))
    if random:
        randomize_generator(ga, seed)
    return ga


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_states_close(a: AdapterState, b: AdapterState, tol: float = 1e-5) -> None:
    assert a.S.keys() == b.S.keys()
    torch.testing.assert_close(a.n, b.n)
    for k in a.S:
        torch.testing.assert_close(a.S[k], b.S[k], rtol=tol, atol=tol)


def base_params(ga) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ga.base_model.state_dict().items()}


# 1. empty state == base, exactly
@pytest.mark.parametrize("batch", [1, 3])
def test_empty_state_is_exactly_base(arch, batch, memory):
    ga = make(arch, memory=memory)
    x = ids(batch, 11)
    base = ga.base_model(x).logits
    assert torch.equal(ga(x, state=ga.new_state(batch)).logits, base)
    if batch == 1:
        assert torch.equal(ga(x[0], state=ga.new_state(1)).logits, base)


# 2. fresh generator (B = 0) changes nothing, even with a non-empty state
def test_fresh_generator_changes_nothing(arch, memory):
    ga = make(arch, random=False, memory=memory)
    state = ga.read(ids(2, 30))
    assert (state.n == 30).all() and any(s.abs().sum() > 0 for s in state.S.values())
    x = ids(2, 9, seed=5)
    assert torch.equal(ga(x, state=state).logits, ga.base_model(x).logits)


# 3. exact streaming (also with windowed keys: the windows stay inside a chunk; and gates)
@pytest.mark.parametrize("key_window,key_gate,ahead", [(1, False, 0), (3, True, 2)])
def test_streaming_equalities(arch, key_window, key_gate, ahead, memory):
    keys = KeyConfig(key_window, ahead, key_gate, shift=int(key_gate))
    ga = make(arch, chunk_len=8, keys=keys, memory=memory)
    doc = ids(1, 32)  # four chunks
    chunks = doc.split(8, dim=1)
    whole = ga.read(doc)
    one_by_one = ga.new_state()
    for c in chunks:
        one_by_one = ga.read(c, one_by_one)
    assert_states_close(whole, one_by_one)
    reversed_order = ga.new_state()
    for c in reversed(chunks):
        reversed_order = ga.read(c, reversed_order)
    assert_states_close(whole, reversed_order)
    a, b = torch.cat(chunks[:2], 1), torch.cat(chunks[2:], 1)
    assert_states_close(ga.read(a) + ga.read(b), whole)
    assert_states_close(ga.read(torch.cat([a, b])).sum(), whole)  # pieces as rows, then summed
    # decay: chunk by chunk equals one call
    gamma = 0.7
    stepwise = ga.new_state()
    for c in chunks:
        stepwise = ga.read(c, stepwise, decay=gamma)
    assert_states_close(ga.read(doc, decay=gamma), stepwise)
    assert_states_close(whole.decay(0.5), ga.read(doc).decay(0.5))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("key_window,key_gate,ahead", [(1, False, 0), (5, True, 3)])
def test_padded_batch_matches_single_rows(arch, side, key_window, key_gate, ahead, memory):
    ga = make(arch, chunk_len=8, keys=KeyConfig(key_window, ahead, key_gate), memory=memory)
    rows = [ids(1, n, seed=n)[0] for n in (5, 19, 12)]
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        x[i, sl], mask[i, sl] = r, 1
    batched = ga.read(x, attention_mask=mask)
    singles = AdapterState.stack([ga.read(r) for r in rows])
    assert_states_close(batched, singles)
    assert batched.n.tolist() == [5, 19, 12]


@pytest.mark.parametrize(
    "key_gate,ahead,shift", [(False, 0, 0), (True, 0, 0), (True, 2, 0), (False, 0, 1)]
)
def test_key_window_state_matches_float64_definition(arch, key_gate, ahead, shift, memory):
    keys = KeyConfig(3, ahead, key_gate, normalize=memory == "ridge", shift=shift)
    ga = make(arch, chunk_len=8, keys=keys, memory=memory)
    doc = ids(1, 20)  # chunks of 8, 8 and 4 tokens, each read on its own
    state = ga.read(doc)
    expected = {}
    with torch.no_grad():
        for chunk in doc.split(8, dim=1):
            hidden = ga.context_features(chunk, torch.ones_like(chunk))
            for t in ga.generator.targets:
                h = rms_normalize(hidden[t.layer][0].double())
                windows = [  # the last 3 tokens and the next `ahead`, `shift` back, in the chunk
                    h[max(0, i - shift - 2) : max(0, i - shift + 1 + ahead)] for i in range(len(h))
                ]
                keys = torch.stack([w.mean(0) if len(w) else 0 * h[0] for w in windows])
                block = ga.generator[t.name]
                raw = keys @ block.K.double().T
                if memory == "ridge":  # (tested with unit keys; an empty window stays 0)
                    raw = raw / raw.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                k = raw
                if key_gate:  # each token's write gate, from its own features
                    k = k * (2 * torch.sigmoid(h @ block.G.double()))[:, None]
                S = k.T @ (h @ block.V.double().T)
                if memory == "ridge":  # [G | H], H = sum_t g_t k_t k_t^T
                    S = torch.cat([S, k.T @ raw], 1)
                expected[t.name] = expected.get(t.name, 0) + S
    for name, S in expected.items():
        torch.testing.assert_close(state.S[name][0].double(), S, rtol=1e-5, atol=1e-5)
    per_token = make(arch, chunk_len=8, memory=memory)  # same seed and A K V B: other keys
    assert not torch.allclose(per_token.read(doc).S[name], state.S[name])
    assert per_token.generator.fingerprint() != ga.generator.fingerprint()
    if key_gate:  # the gate is saved and loaded with the rest
        assert all(f"{n}.G" in ga.generator_state_dict() for n in ga.generator.names)


def test_write_weights_scale_each_tokens_write_not_the_key_windows(arch, memory):
    ga = make(arch, chunk_len=12, keys=KeyConfig(window=3, gate=True), memory=memory)
    chunk = ids(2, 12)
    mask = torch.ones_like(chunk)
    mask[1, :4] = 0  # a left-padded row
    write = torch.rand(2, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = ga.context_features(chunk, mask)
        got = ga.generator.write(hidden, mask, weight=write).S
        unweighted = ga.generator.write(hidden, mask).S
        for t in ga.generator.targets:
            block = ga.generator[t.name]
            for b in range(2):
                real = mask[b].bool()
                h = rms_normalize(hidden[t.layer][b][real].double())
                windows = torch.stack([h[max(0, i - 2) : i + 1].mean(0) for i in range(len(h))])
                gate = 2 * torch.sigmoid(h @ block.G.double())
                raw = windows @ block.K.double().T
                k = raw * (gate * write[b][real].double())[:, None]
                expected = k.T @ (h @ block.V.double().T)
                if memory == "ridge":  # the gate and the weight weigh each token's equation
                    expected = torch.cat([expected, k.T @ raw], 1)
                torch.testing.assert_close(got[t.name][b].double(), expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got[t.name], unweighted[t.name])


# 4. delta weights: rank <= r, and the side path == W + dW (float64 recomputation)
def test_delta_weights_match_float64_recomputation(arch, memory):
    ga = make(arch, r=3, r_in=5, memory=memory)
    state = ga.read(ids(1, 40))
    x = ids(1, 13, seed=9)
    adapted = ga(x, state=state).logits
    deltas = ga.delta_weights(state)
    for dW in deltas.values():
        sv = torch.linalg.svdvals(dW.detach())
        assert sv[3:].max() < 1e-5 * sv[0]  # rank <= r up to float32 rounding
    # reference: a float64 copy of everything, dW recomputed from the definition
    g64 = copy.deepcopy(ga).double()
    ref_model = copy.deepcopy(ga.base_model).double()
    st64 = AdapterState({k: s.double() for k, s in state.S.items()}, state.n.double(), "", {})
    modules = dict(ref_model.named_modules())
    with torch.no_grad():
        for t in g64.generator.targets:
            block = g64.generator[t.name]
            S = st64.S[t.name][0]
            if memory == "ridge":  # S* = (H + lam tr(H)/r_in I)^-1 G
                G, H = S[:, :3], S[:, 3:]
                lam = ga.config.ridge_lambda * H.trace() / 5
                S = torch.linalg.solve(H + lam * torch.eye(5, dtype=H.dtype), G)
            N = S * (3**0.5) / torch.linalg.matrix_norm(S)
            dW = (ga.config.alpha / 3) * block.B @ N.T @ block.A
            torch.testing.assert_close(deltas[t.name].double(), dW, rtol=1e-5, atol=1e-6)
            w = modules[t.name].weight
            w += dW.T if t.transposed else dW
        ref = ref_model(x).logits
    rel = (adapted.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, rel
    assert (adapted - ga.base_model(x).logits).abs().max() > 1e-3  # the delta does something


# 5. merged == side path; W restored bit-exactly, also on error
def test_merged_matches_side_path_and_restores(arch, memory):
    ga = make(arch, memory=memory)
    state = ga.read(ids(1, 25))
    x = ids(1, 10, seed=3)
    side = ga(x, state=state).logits
    before = base_params(ga)
    with ga.merged(state):
        merged = ga(x).logits
        with pytest.raises(RuntimeError):
            ga(x, state=state)
    torch.testing.assert_close(merged, side, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, ga.base_model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ZeroDivisionError), ga.merged(state):
        _ = 1 / 0
    assert all(torch.equal(v, ga.base_model.state_dict()[k]) for k, v in before.items())
    assert not ga._merged


# 6. PEFT loads the exported LoRA and gives the adapted logits
def test_export_lora_loads_in_peft(arch, tmp_path, memory):
    from peft import PeftModel

    ga = make(arch, memory=memory)
    state = ga.read(ids(1, 30))
    x = ids(2, 12, seed=4)
    adapted = ga(x, state=state.repeat(2)).logits
    ga.export_lora(state, tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ga.base_model), tmp_path / "lora")
    with torch.no_grad():
        got = peft_model(input_ids=x).logits
    rel = (got - adapted).norm() / adapted.norm()
    assert rel < 1e-4, rel


# 7. normalised deltas do not depend on how much was read
@pytest.mark.parametrize("norm", ["frobenius", "svd"])
def test_reading_twice_gives_same_deltas(norm, memory):
    ga = make("llama", normalization=norm, memory=memory)
    doc = ids(1, 24)
    once = ga.delta_weights(ga.read(doc))
    twice = ga.delta_weights(ga.read(doc, ga.read(doc)))
    for k in once:
        torch.testing.assert_close(twice[k], once[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 9, 4), (2, 4, 9)])
def test_svd_normalization_gradient(shape):
    """N(S) = U V^T: its custom backward matches finite differences (float64, square / tall /
    wide) and stays finite where autograd through torch.linalg.svd gives NaN."""
    S = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PolarFactor.apply, (S,))
    U, _, Vh = torch.linalg.svd(S.detach(), full_matrices=False)
    torch.testing.assert_close(PolarFactor.apply(S), U @ Vh)
    k, v = torch.randn(1, shape[1], 1), torch.randn(1, 1, shape[2])
    for deficient in (k @ v, torch.eye(*shape[1:])[None]):  # rank 1; all singular values equal
        grad = torch.randn_like(deficient)
        ours = deficient.clone().requires_grad_()
        (normalize_state(ours, torch.ones(1), "svd") * grad).sum().backward()
        assert ours.grad.isfinite().all()
    plain = torch.eye(*shape[1:])[None].requires_grad_()
    U, _, Vh = torch.linalg.svd(plain, full_matrices=False)
    ((U @ Vh) * torch.randn_like(plain)).sum().backward()
    assert not plain.grad.isfinite().all()  # the failure the custom backward exists for


def test_none_normalization_is_mean():
    ga = make("llama", normalization="none")
    doc = ids(1, 24)
    st = ga.read(doc)
    torch.testing.assert_close(
        ga.delta_weights(ga.read(doc, st))["model.layers.0.mlp.down_proj"],
        ga.delta_weights(st)["model.layers.0.mlp.down_proj"],
    )


# 8. save/load round trips; a state of another generator is refused by name
def test_round_trips_and_mismatch(tmp_path, memory):
    ga = make("qwen2", memory=memory)
    state = ga.read(ids(2, 20))
    state.metadata["note"] = "x"
    state.save(tmp_path / "s.safetensors")
    loaded = AdapterState.load(tmp_path / "s.safetensors")
    assert loaded.equal(state) and loaded.metadata == {"note": "x"}
    assert loaded.config["r"] == 4
    ga.save_pretrained(tmp_path / "gen")
    ga2 = GenerativeAdapter.from_pretrained(tmp_path / "gen", base_model=ga.base_model)
    for k, v in ga.generator_state_dict().items():
        assert torch.equal(v, ga2.generator_state_dict()[k])
    x = ids(2, 7)
    assert torch.equal(ga2(x, state=loaded).logits, ga(x, state=state).logits)
    other = make("qwen2", seed=1, memory=memory)
    with pytest.raises(StateMismatchError, match=state.generator) as err:
        other(x, state=loaded)
    assert other.generator.fingerprint() in str(err.value)
    with pytest.raises(StateMismatchError):
        _ = state + other.read(ids(2, 5))


def test_from_pretrained_overrides(tmp_path):
    ga = make("qwen2")
    ga.save_pretrained(tmp_path / "gen")
    weights = ga.generator_state_dict()
    svd = GenerativeAdapter.from_pretrained(
        tmp_path / "gen", base_model=ga.base_model, normalization="svd"
    )
    assert svd.config.normalization == "svd"
    assert all(torch.equal(v, weights[k]) for k, v in svd.generator_state_dict().items())
    suffix = ga.generator.names[-1].rsplit(".", 1)[-1]
    sub = GenerativeAdapter.from_pretrained(
        tmp_path / "gen", base_model=ga.base_model, target_modules=[suffix]
    )
    assert 0 < len(sub.generator.names) < len(ga.generator.names)
    assert all(n.endswith(suffix) for n in sub.generator.names)
    assert all(torch.equal(v, weights[k]) for k, v in sub.generator_state_dict().items())
    with pytest.raises(ValueError, match="cannot override"):
        GenerativeAdapter.from_pretrained(tmp_path / "gen", base_model=ga.base_model, r=8)
    # gates added to an ungated generator start open: the same states and outputs
    gated = GenerativeAdapter.from_pretrained(
        tmp_path / "gen", base_model=ga.base_model, keys={"gate": True}
    )
    assert all(
        torch.equal(gated.generator[n].G, torch.zeros_like(gated.generator[n].G))
        for n in gated.generator.names
    )
    x = ids(1, 20)
    assert_states_close(gated.read(x), ga.read(x), tol=1e-6)
    gated.save_pretrained(tmp_path / "gated")
    reloaded = GenerativeAdapter.from_pretrained(tmp_path / "gated", base_model=ga.base_model)
    assert reloaded.config.keys.gate and set(reloaded.generator_state_dict()) == set(
        gated.generator_state_dict()
    )
    # a gated config whose weights lack the gate is a broken file, not an override
    (tmp_path / "gen" / "generator_config.json").write_text(gated.config.to_json())
    with pytest.raises(ValueError, match=r"missing \['.*\.G'"):
        GenerativeAdapter.from_pretrained(tmp_path / "gen", base_model=ga.base_model)
    with pytest.raises(ValueError, match="KeyConfig.gate must be a bool"):
        GeneratorConfig(keys=KeyConfig(gate="yes"))
    with pytest.raises(ValueError, match="KeyConfig.lookahead must be an int >= 0"):
        GeneratorConfig(keys={"lookahead": -1})
    with pytest.raises(ValueError, match="unknown KeyConfig fields \\['widow'\\]"):
        GeneratorConfig(keys={"widow": 3})


def test_flat_key_fields_of_older_configs_are_upgraded(tmp_path):
    """Generators and YAML written before KeyConfig name its fields `key_window`,
    `key_lookahead`, `key_gate`: they load into `keys`, and give the same fingerprint."""
    flat = {
        "r": 4,
        "r_in": 6,
        "chunk_len": 8,
        "key_window": 3,
        "key_lookahead": 2,
        "key_gate": True,
    }
    config = GeneratorConfig.from_dict(flat)
    assert config.keys == KeyConfig(window=3, lookahead=2, gate=True)
    assert GeneratorConfig.from_json(config.to_json()) == config  # the new form round-trips
    assert config.replace(key_window=5, keys={"gate": False}).keys == KeyConfig(5, 2, False)
    assert GeneratorConfig.from_dict({"r": 4}).keys == KeyConfig()  # no key fields at all
    with pytest.raises(ValueError, match="unknown GeneratorConfig fields \\['key_widow'\\]"):
        GeneratorConfig.from_dict({"key_widow": 3})
    ga = make("llama", keys=config.keys)
    ga.save_pretrained(tmp_path / "new")
    old = {k: v for k, v in ga.config.to_dict().items() if k != "keys"}
    old.update(key_window=3, key_lookahead=2, key_gate=True)
    (tmp_path / "new" / "generator_config.json").write_text(json.dumps(old))
    loaded = GenerativeAdapter.from_pretrained(tmp_path / "new", base_model=ga.base_model)
    assert loaded.config.keys == config.keys
    assert loaded.generator.fingerprint() == ga.generator.fingerprint()


# 9. base LM untouched by every public call, never requires grad; gradients reach the generator
@pytest.mark.parametrize("memory", ["linear", "ridge", "ridge_learned"])
def test_base_untouched_and_gradients_reach_generator(tmp_path, memory):
    kind = memory.split("_")[0]
    ga = make("llama", memory=kind, ridge_learned=memory == "ridge_learned")
    before = base_params(ga)
    assert not any(p.requires_grad for p in ga.base_model.parameters())
    state = ga.read(ids(2, 30))  # grad enabled: flows through K and V
    out = ga(ids(2, 9), state=state, labels=ids(2, 9))
    out.loss.backward()
    for name, p in ga.generator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(p.grad is not None for p in ga.base_model.parameters())
    ga.generate(ids(1, 4), state=state.select(0).detach(), max_new_tokens=3)
    ga.delta_weights(state.select(1))
    ga.export_lora(state.select(0), tmp_path / "l")
    with ga.merged(state.select(0)):
        ga(ids(1, 5))
    after = ga.base_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert {id(p) for p in ga.generator.parameters()}.isdisjoint(
        id(p) for p in ga.base_model.parameters()
    )


def test_per_row_states_in_one_batch(memory):
    ga = make("llama", memory=memory)
    s0, s1 = ga.read(ids(1, 20, seed=1)), ga.read(ids(1, 33, seed=2))
    x = ids(2, 6, seed=7)
    both = ga(x, state=AdapterState.stack([s0, s1])).logits
    torch.testing.assert_close(both[0:1], ga(x[0:1], state=s0).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:2], ga(x[1:2], state=s1).logits, rtol=1e-5, atol=1e-5)
    mixed = AdapterState.stack([s0, ga.new_state()])  # an empty row is exactly base
    assert torch.equal(ga(x, state=mixed).logits[1], ga.base_model(x).logits[1])


# bad input: clear errors, nothing changes
def test_bad_inputs():
    ga = make("llama")
    state = ga.read(ids(1, 10))
    with pytest.raises(ValueError, match="token ids must lie"):
        ga.read(torch.tensor([[1, VOCAB + 5]]), state)
    with pytest.raises(ValueError, match="token ids must lie"):
        ga(torch.tensor([[-1, 2]]), state=state)
    with pytest.raises(TypeError):
        ga.read(3.5, state)
    with pytest.raises(TypeError):
        ga(torch.rand(1, 4), state=state)
    with pytest.raises(ValueError, match="batch size"):
        ga(ids(2, 5), state=state)
    with pytest.raises(ValueError, match="batch size"):
        ga.read(ids(3, 5), state)
    with pytest.raises(ValueError):
        GeneratorConfig(normalization="l2")
    with pytest.raises(ValueError, match="match no module"):
        GenerativeAdapter.from_base(tiny_model("llama"), GeneratorConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="only nn.Linear"):
        GenerativeAdapter.from_base(
            tiny_model("llama"), GeneratorConfig(target_modules=["input_layernorm"])
        )
    empty = ga.read(torch.zeros(1, 0, dtype=torch.long), state)
    assert empty.equal(state)


def test_text_reading_and_empty_text(smollm2_tokenizer):
    model = tiny_model("llama", vocab=len(smollm2_tokenizer))
    ga = GenerativeAdapter.from_base(
        model, GeneratorConfig(r=4, r_in=4, chunk_len=8), tokenizer=smollm2_tokenizer
    )
    randomize_generator(ga)
    state = ga.read(
        ["The cat sat on the mat.", "A much longer second document about the river and the town."]
    )
    n_tokens = [
        len(smollm2_tokenizer(t, add_special_tokens=False)["input_ids"])
        for t in [
            "The cat sat on the mat.",
            "A much longer second document about the river and the town.",
        ]
    ]
    assert state.n.tolist() == n_tokens
    one = state.select(0)
    assert ga.read("", one).equal(one)
    text = ga.generate("Hello", state=one, max_new_tokens=3)
    assert isinstance(text, str)


def test_config_json_round_trip_and_layers():
    cfg = GeneratorConfig(
        r=8, r_in=16, layers="-2:", target_modules=["o_proj"], normalization="svd", svd_top_k=4
    )
    assert GeneratorConfig.from_json(cfg.to_json()) == cfg
    assert cfg.resolve_layers(30) == [28, 29]
    assert GeneratorConfig(layers="upper_half").resolve_layers(30) == list(range(15, 30))
    assert GeneratorConfig(layers=[0, -1]).resolve_layers(4) == [0, 3]
    with pytest.raises(ValueError, match="unknown GeneratorConfig fields"):
        GeneratorConfig.from_dict({"rank": 3})
    ga = GenerativeAdapter.from_base(tiny_model("gpt2"), GeneratorConfig(r=2, r_in=2, layers="1:"))
    assert [t.layer for t in ga.generator.targets] == [1, 1, 2, 2]
