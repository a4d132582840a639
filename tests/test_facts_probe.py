"""experiments/facts/: the match probe's weights must be the memory's own read-out, and the
gate fit must find a separable split."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from genadapter import memory

FACTS = Path(__file__).resolve().parents[1] / "experiments" / "facts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, FACTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["ridge", "linear"])
def test_probe_weights_are_the_memorys_read_out(kind):
    probe = load("match_readout")
    torch.manual_seed(0)
    k, v, q = (
        torch.randn(40, 6, dtype=torch.float64),
        torch.randn(40, 5, dtype=torch.float64),
        torch.randn(3, 6, dtype=torch.float64),
    )
    g = torch.rand(40, dtype=torch.float64) * 2
    S = memory.write((g[:, None] * k)[None], v[None], k[None], kind)
    want = memory.read_out(S, kind, 0.7)[0].T @ q.T  # (r, Q): what the state reads for q
    got = v.T @ probe.weights(k, g, q, 0.7 if kind == "ridge" else None)
    torch.testing.assert_close(got, want)


def test_value_tokens_marks_every_occurrence():
    gate = load("copy_gate")
    label = gate.value_tokens([5, 1, 2, 7, 1, 2, 2, 9], [[1, 2], [9]])
    assert label.tolist() == [0, 1, 1, 0, 1, 1, 0, 1]


def test_gate_fit_separates_values():
    gate = load("copy_gate")
    torch.manual_seed(0)
    label = (torch.rand(400) < 0.1).float()
    h = torch.randn(400, 8)
    h[:, 0] = 1.0  # a constant direction stands in for the bias the gate has not
    h[:, 1] += 4 * (2 * label - 1)
    G = gate.fit_gate(h, label)
    assert ((h @ G > 0).float() == label).all()
