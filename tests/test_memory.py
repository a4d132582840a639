"""The ridge memory: its solve against float64 least squares, recall where the linear memory
interferes, and states of one memory kind refused by the other."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_generator, tiny_model

from genadapter import AdapterState, GenerativeAdapter, GeneratorConfig, StateMismatchError
from genadapter.generator import rms_normalize
from genadapter.memory import read_out, write


def ridge_lstsq(k: torch.Tensor, v: torch.Tensor, lam: float, w=None) -> torch.Tensor:
    """argmin_S sum_t w_t |S^T k_t - v_t|^2 + lam_bar |S|^2 as one float64 least-squares
    problem: rows sqrt(w_t) k_t, then sqrt(lam_bar) I with targets 0."""
    k, v = k.double(), v.double()
    w = torch.ones(len(k), dtype=k.dtype) if w is None else w.double()
    r_in = k.shape[-1]
    lam_bar = lam * (w[:, None] * k * k).sum() / r_in
    rows = torch.cat([w.sqrt()[:, None] * k, lam_bar.sqrt() * torch.eye(r_in, dtype=k.dtype)])
    targets = torch.cat([w.sqrt()[:, None] * v, torch.zeros(r_in, v.shape[-1], dtype=v.dtype)])
    return torch.linalg.lstsq(rows, targets).solution


@pytest.mark.parametrize("tokens,lam", [(5, 1e-3), (40, 1e-2), (300, 1.0)])
def test_ridge_read_out_is_the_least_squares_memory(tokens, lam):
    g = torch.Generator().manual_seed(tokens)
    shape = {"generator": g, "dtype": torch.float64}  # the solve itself, free of float32 sums
    k, v = torch.randn(2, tokens, 8, **shape), torch.randn(2, tokens, 3, **shape)
    w = torch.rand(2, tokens, **shape) * 2  # write gates
    w[1, tokens // 2 :] = 0  # a padded row: weight 0 writes nothing
    got = read_out(write(w[..., None] * k, v, k, "ridge"), "ridge", lam)
    for b in range(2):
        want = ridge_lstsq(k[b], v[b], lam, w[b])
        torch.testing.assert_close(got[b], want, rtol=1e-9, atol=1e-10)
    linear = read_out(write(w[..., None] * k, v, k, "linear"), "linear", lam)
    torch.testing.assert_close(linear, (w[..., None] * k).mT @ v)
    empty = read_out(torch.zeros(1, 8, 11, dtype=torch.float64), "ridge", lam)
    assert torch.equal(empty, torch.zeros(1, 8, 3, dtype=torch.float64))


def test_ridge_recalls_pairs_that_interfere_in_the_linear_memory():
    """16 pairs whose keys share a strong common direction (as a frozen LM's do): querying a
    stored key gives back its own value from the ridge memory, a blend from the linear one."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(32, generator=g)
    keys = common + 0.3 * torch.randn(16, 32, generator=g)
    values = torch.randn(16, 8, generator=g)
    k, v = keys[None], values[None]

    def recall(memory: str) -> float:
        M = read_out(write(k, v, k, memory), memory, 1e-4)[0]
        got = keys @ M
        return (torch.nn.functional.cosine_similarity(got, values, dim=-1) > 0.99).float().mean()

    assert recall("ridge") == 1.0
    assert recall("linear") < 0.2


def make(memory: str, **cfg) -> GenerativeAdapter:
    ga = GenerativeAdapter.from_base(
        tiny_model("llama"), GeneratorConfig(r=4, r_in=6, chunk_len=8, memory=memory, **cfg)
    )
    randomize_generator(ga)
    return ga


@pytest.mark.parametrize("value_layer,key_layer", [(None, None), (0, None), (2, None), (0, 1)])
def test_read_state_solves_to_float64_least_squares_of_the_tokens(value_layer, key_layer):
    """The whole path: a document read in chunks, S* of each target against lstsq over the
    float64 keys K h_t and values V h_t recomputed from the frozen LM's hidden states (h of
    the target's own layer, or of `value_layer` / `key_layer` for the values / keys)."""
    ga = make("ridge", ridge_lambda=0.05, value_layer=value_layer, key_layer=key_layer)
    doc = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    state = ga.read(doc)
    with torch.no_grad():
        hidden = [ga.context_features(c, torch.ones_like(c)) for c in doc.split(8, dim=1)]
        for t in ga.generator.targets:
            block = ga.generator[t.name]
            at = t.layer if key_layer is None else key_layer
            h = torch.cat([rms_normalize(x[at][0].double()) for x in hidden])
            at = t.layer if value_layer is None else value_layer
            hv = torch.cat([rms_normalize(x[at][0].double()) for x in hidden])
            want = ridge_lstsq(h @ block.K.double().T, hv @ block.V.double().T, 0.05)
            got = block.read_out(state.S[t.name])[0].double()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # decay of the whole state leaves S* as it is: only later reading weighs more
    for name, s in state.S.items():
        block = ga.generator[name]
        faded = state.decay(0.3).S[name]
        torch.testing.assert_close(block.read_out(faded), block.read_out(s), rtol=1e-4, atol=1e-6)


def test_values_or_keys_from_another_layer_mean_another_state():
    torch.manual_seed(0)
    base = tiny_model("llama")
    own = GenerativeAdapter.from_base(base, GeneratorConfig(r=4, r_in=6, layers=[2]))
    torch.manual_seed(0)
    cfg = GeneratorConfig(r=4, r_in=6, layers=[2], value_layer=0)
    embedded = GenerativeAdapter.from_base(base, cfg)
    assert embedded.generator.feature_layers == [0, 2]
    assert embedded.generator.fingerprint() != own.generator.fingerprint()
    torch.manual_seed(0)
    keyed = GenerativeAdapter.from_base(base, cfg.replace(key_layer=1))
    assert keyed.generator.feature_layers == [0, 1]  # the read stops below the target's layer
    gated = GenerativeAdapter.from_base(base, cfg.replace(key_layer=1, keys={"gate": True}))
    assert gated.generator.feature_layers == [0, 1, 2]  # the gate reads the target's layer
    assert keyed.generator.fingerprint() != embedded.generator.fingerprint()
    with pytest.raises(ValueError, match="key_layer 5 out of range"):
        GenerativeAdapter.from_base(base, cfg.replace(key_layer=5))
    with pytest.raises(ValueError, match="value_layer 3 out of range"):
        GenerativeAdapter.from_base(base, cfg.replace(value_layer=3))
    with pytest.raises(ValueError, match="value_layer must be an int >= 0"):
        GeneratorConfig(value_layer=-1)


def test_a_state_of_the_other_memory_is_refused(tmp_path):
    linear, ridge = make("linear"), make("ridge")
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    assert linear.generator.fingerprint() != ridge.generator.fingerprint()
    for reader, user in ((linear, ridge), (ridge, linear)):
        state = reader.read(x)
        state.save(tmp_path / "s.safetensors")
        loaded = AdapterState.load(tmp_path / "s.safetensors")
        with pytest.raises(StateMismatchError, match=f"written by a '{reader.config.memory}'"):
            user(x, state=loaded)
    assert ridge.new_state(2).S[ridge.generator.names[0]].shape == (2, 6, 4 + 6)
    with pytest.raises(ValueError, match="memory must be one of"):
        GeneratorConfig(memory="delta")
    with pytest.raises(ValueError, match="ridge_lambda must be > 0"):
        GeneratorConfig(memory="ridge", ridge_lambda=0.0)


def test_learned_lambda_is_saved_and_starts_at_the_fixed_one(tmp_path):
    fixed = make("ridge", ridge_lambda=0.2)
    fixed.save_pretrained(tmp_path / "fixed")
    assert not any("log_lambda" in k for k in fixed.generator_state_dict())
    learned = GenerativeAdapter.from_pretrained(
        tmp_path / "fixed", base_model=fixed.base_model, ridge_learned=True
    )
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    state = fixed.read(x)  # the same fingerprint: lambda is on the read-out side
    torch.testing.assert_close(learned(x, state=state).logits, fixed(x, state=state).logits)
    with torch.no_grad():
        for block in learned.generator.blocks.values():
            block.log_lambda.fill_(0.0)  # lambda = 1
    learned.save_pretrained(tmp_path / "learned")
    again = GenerativeAdapter.from_pretrained(tmp_path / "learned", base_model=fixed.base_model)
    assert all(float(b.log_lambda) == 0.0 for b in again.generator.blocks.values())
    assert not torch.allclose(again(x, state=state).logits, fixed(x, state=state).logits)
