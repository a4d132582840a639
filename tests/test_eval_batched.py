"""An episode's questions answered and scored as one batch give what one at a time gives."""

from __future__ import annotations

import pytest
import torch
from test_eval_methods import CONTEXT, tiny_gpt2, tiny_llama

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.data.episodes import QA, QAEpisode
from genadapter.eval import batched
from genadapter.eval.batched import PrefixCache, generate_rows, score_rows, shared_prefix_length
from genadapter.eval.harness import evaluate_episode
from genadapter.eval.methods import make_method

QAS = [
    QA("Where does Alice live?", ["Paris"], ["Paris", "Rome", "the old town of Lyon"]),
    QA("What does Bob sell?", ["bread"], ["bread", "fish"]),
    QA("What is Alice's job?", ["doctor"], None),
]


@pytest.mark.parametrize("packed", [True, False])
def test_score_rows_equals_one_forward_per_row(monkeypatch, packed):
    """Rows sharing a long prefix (run once, its KV cache reused), rows that share more of it
    (a tree: options of one prompt) and rows that do not, packed into one sequence or padded:
    log-probs equal a plain float64 forward of each row alone."""
    monkeypatch.setattr(batched, "packs_rows", lambda model: packed)
    model = tiny_llama(seed=3).double()
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 500, (40,), generator=g).tolist()
    rows = [
        (shared + torch.randint(0, 500, (n,), generator=g).tolist(), t)
        for n, t in [(3, 1), (9, 4), (5, 2), (12, 7)]
    ]
    branch = shared + torch.randint(0, 500, (6,), generator=g).tolist()
    rows += [(branch + [7, 8], 2), (branch + [7, 9, 4], 3), (branch + [5], 1)]  # a prefix tree
    rows.append((torch.randint(0, 500, (20,), generator=g).tolist(), 5))  # nothing shared
    assert shared_prefix_length([r for r, _ in rows[:7]], 100) >= 40
    for batch in (rows[:7], rows, rows[1:2], rows[4:6]):
        got = score_rows(model, batch, max_batch_tokens=30)  # several groups
        for (ids, n), lp in zip(batch, got, strict=True):
            logits = model(torch.tensor([ids])).logits[0, -n - 1 : -1]
            want = logits.log_softmax(-1).gather(-1, torch.tensor(ids[-n:])[:, None])[:, 0]
            torch.testing.assert_close(lp, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="n_target"):
        score_rows(model, [([1, 2], 2)])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_cache_reuses_grows_and_renews(arch):
    """A kept prefix serves a call that shares it, grows for a longer one and is made anew for
    another: scores with one PrefixCache over several calls equal scores without one."""
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(seed=2).double()
    g = torch.Generator().manual_seed(4)
    context = torch.randint(0, 500, (30,), generator=g).tolist()
    more = context + torch.randint(0, 500, (6,), generator=g).tolist()
    other = torch.randint(0, 500, (25,), generator=g).tolist()
    prefixes = PrefixCache()
    for prefix in (context, context, more, other):
        rows = [(prefix + torch.randint(0, 500, (n,), generator=g).tolist(), 2) for n in (3, 5)]
        got = score_rows(model, rows, prefixes=prefixes)
        assert prefixes.ids == prefix
        for a, b in zip(got, score_rows(model, rows), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    generate_rows(model, [other + [1], other + [2]], 3, [], 0, prefixes)
    assert prefixes.cache.get_seq_length() == len(other)  # decoding extended a copy


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_rows_equals_hf_generate_one_row_at_a_time(arch):
    """Prompts sharing a long prefix (run once, its KV cache serving every row) and prompts that
    do not, decoded together: the greedy tokens of HF `generate` on each prompt alone, cut
    before the first stop token."""
    from transformers import GenerationConfig

    model = (tiny_llama if arch == "llama" else tiny_gpt2)(seed=5).double()
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 500, (30,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 500, (n,), generator=g).tolist() for n in (1, 7, 4)]
    prompts.append(torch.randint(0, 500, (9,), generator=g).tolist())
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None)
    alone = [
        model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
        for p in prompts
    ]
    stop = [alone[1][3]]  # one row stops early; the others may not
    for batch in (prompts[:3], prompts, prompts[3:]):
        got = generate_rows(model, batch, 8, stop, pad_id=0)
        for p, row in zip(batch, got, strict=True):
            want = alone[prompts.index(p)]
            cut = next((i for i, t in enumerate(want) if t in stop), len(want))
            assert row == want[:cut]
    assert len(generate_rows(model, prompts[:3], 8, stop, 0)[1]) < 8  # the stop was met


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["base", "prompt", "genadapter", "ttt-bitfit"])
def test_batched_episode_equals_one_by_one(smollm2_tokenizer, arch, name):
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(seed=1)
    ga = GenerativeAdapter.from_base(
        model, GeneratorConfig(r=4, r_in=4, chunk_len=8), tokenizer=smollm2_tokenizer
    )
    with torch.no_grad():
        for block in ga.generator.blocks.values():
            block.B.normal_(0, 0.5)  # a state that changes the answers
    options = {"steps": 2} if name.startswith("ttt") else {}
    method = make_method(name, model, smollm2_tokenizer, ga=ga, max_new_tokens=6, **options)
    episode = QAEpisode("e", CONTEXT, QAS)
    one, batch = (evaluate_episode(method, episode, "qa", batched=b) for b in (False, True))
    for a, b in zip(one["items"], batch["items"], strict=True):
        assert a["prediction"] == b["prediction"]
        assert a.get("choice") == b.get("choice")
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)
    assert one["kv_cache_bytes"] == batch["kv_cache_bytes"]
