"""Every committed generator loads and gives the outputs stored before the last refactor."""

from __future__ import annotations

import pytest
import torch
from reference_outputs import GENERATORS, load_all, outputs, read_reference

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_committed_generators_match_their_reference():
    reference = read_reference()
    assert len(reference) == len(GENERATORS) >= 4  # every committed generator has one
    for name, ga in load_all():
        tensors, meta = outputs(ga)
        want_tensors, want_meta = reference[name]
        assert meta == want_meta, name  # fingerprint and greedy answer
        assert tensors.keys() == want_tensors.keys()
        for key, want in want_tensors.items():
            got = tensors[key].detach().cpu()
            assert got.dtype == want.dtype and got.shape == want.shape, (name, key)
            if key in ("n", "argmax", "S_first", "S_last"):  # the state itself: bit-exact
                assert torch.equal(got, want), (name, key)
            else:  # float32 logits through 30 layers: the LoRA form reassociates (x A'^T) B'^T
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=f"{name} {key}")
