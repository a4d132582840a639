"""experiments/recall/fit_copy.py trains on cached features: its logits must be the adapted
model's own. Checked on a tiny random Llama against a real read and an adapted forward."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from test_eval_methods import tiny_llama

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.config import KeyConfig
from genadapter.data.episodes import QA, Cloze, QAEpisode
from genadapter.eval.prompts import PromptFormat

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "recall" / "fit_copy.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fit_copy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_cached_logits_are_the_adapted_models(smollm2_tokenizer):
    fc = load_script()
    model = tiny_llama()
    for memory in ("ridge", "linear"):
        config = GeneratorConfig(
            r=8, r_in=8, layers=[1], target_modules=["down_proj"], memory=memory,
            normalization="none", value_layer=0, chunk_len=16,
            keys=KeyConfig(shift=1, window=2, gate=True),
        )  # fmt: skip
        torch.manual_seed(1)
        ga = GenerativeAdapter.from_base(model, config, tokenizer=smollm2_tokenizer)
        with torch.no_grad():
            for p in ga.generator.parameters():
                p.normal_()
        episode = QAEpisode(
            id="e",
            context=["Anna lives in Lyon. Bert lives in Oslo. It rained.", "Carl lives in Rome."],
            qas=[
                QA(Cloze("Bert lives in"), ["Oslo"], ["Lyon", "Oslo", "Rome"]),
                QA(Cloze("Carl lives"), ["in Rome"], ["in Rome", "in Oslo"]),
            ],
        )
        cached = fc.cache_episode(ga, PromptFormat(smollm2_tokenizer), episode, torch.float32)
        scores, logits, gold = fc.option_logits(ga, [cached])
        assert gold.tolist() == [1, 0]

        state = ga.read(list(episode.context)).sum()
        fmt = PromptFormat(smollm2_tokenizer)
        for i, qa in enumerate(episode.qas):
            ids = torch.tensor([fmt.prompt_ids(qa.question)])
            with torch.no_grad(), ga.adapted(state):
                want = ga.base_model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(logits[i], want, rtol=1e-4, atol=1e-4)
            first = [fmt.answer_ids(o, qa.question)[0] for o in qa.options]
            torch.testing.assert_close(scores[i, : len(first)], want[first], rtol=1e-4, atol=1e-4)
            assert torch.isinf(scores[i, len(first) :]).all()
        assert (logits - model(input_ids=ids).logits[0, -1]).abs().max() > 1e-3  # it adapts
