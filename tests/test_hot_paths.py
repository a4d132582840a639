"""The fast paths equal their definitions: early-stopping context features, the side path."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_generator, tiny_model

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.generator import rms_normalize


def make(arch: str, layers) -> GenerativeAdapter:
    cfg = GeneratorConfig(r=4, r_in=6, chunk_len=8, layers=layers)
    ga = GenerativeAdapter.from_base(tiny_model(arch), cfg)
    randomize_generator(ga)
    return ga


@pytest.mark.parametrize("layers", [[0, 1], [1], None])
def test_context_features_are_hf_hidden_states_and_stop_early(arch, layers):
    ga = make(arch, layers)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = ga.base_model.base_model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states
    blocks = ga._modules_by_name[ga._layers_name]
    ran = []
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)
    ]
    try:
        feats = ga.context_features(ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert sorted(feats) == ga.generator.layers
    for layer, h in feats.items():
        assert torch.equal(h, ref[layer])
    assert ran == list(range(max(ga.generator.layers)))  # the highest adapted layer never runs
    # statistics: sum over real tokens of (K rms(h))(V rms(h))^T, against float64
    stats = ga.generator.write(feats, mask).S
    for t in ga.generator.targets:
        g = ga.generator[t.name]
        h = rms_normalize(ref[t.layer].double()) * mask[..., None]
        want = (h @ g.K.double().T).transpose(1, 2) @ (h @ g.V.double().T)
        torch.testing.assert_close(stats[t.name].double(), want, rtol=1e-5, atol=1e-5)


def test_side_path_is_x_plus_delta_for_every_batch_shape(arch):
    """The side path (mixer made once per state) equals W x + (alpha/r) B N^T A x per row,
    also when generate expands each state row over several input rows."""
    ga = make(arch, None)
    state = ga.read(torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1)))
    x = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ga(x, state=state.repeat(2)).logits
        with ga.adapted(state):  # 2 state rows for 4 input rows: rows 0, 1 <- 0 and 2, 3 <- 1
            expanded = ga.base_model(x).logits
    torch.testing.assert_close(expanded, got, rtol=1e-5, atol=1e-5)
    for row in range(4):
        with torch.no_grad(), ga.merged(state, row=row // 2):
            ref = ga.base_model(x[row : row + 1]).logits
        torch.testing.assert_close(got[row : row + 1], ref, rtol=1e-4, atol=1e-4)


def test_chunks_per_forward_do_not_change_the_state(arch):
    ga = make(arch, None)
    rows = torch.randint(0, VOCAB, (3, 45), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(rows)
    mask[1, 30:] = 0
    default = ga.read(rows, attention_mask=mask)  # one forward: 16 chunks of 8 tokens fit 1,024
    ga.chunk_batch_size = 2
    two_at_a_time = ga.read(rows, attention_mask=mask)
    assert torch.equal(default.n, two_at_a_time.n)
    for k, s in default.S.items():
        torch.testing.assert_close(s, two_at_a_time.S[k], rtol=1e-5, atol=1e-6)
