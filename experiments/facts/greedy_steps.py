"""What a generator adds at each step of a greedy answer: the top tokens of the base LM, of the
adapted LM and of their difference (the push), for one facts question read with its episode.

    python experiments/facts/greedy_steps.py "Trarix Raive prefer" [--generator DIR]
        [--split test-500] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.methods import make_method  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def top(tokenizer, logprobs: torch.Tensor, k: int = 5) -> str:
    values, ids = logprobs.topk(k)
    return " | ".join(
        f"{tokenizer.decode([i])!r} {v:+.1f}" for v, i in zip(values, ids.tolist(), strict=True)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("question", help="part of the question's text")
    p.add_argument("--generator", type=Path, default=ROOT / "experiments/generators/headline")
    p.add_argument("--split", default="test-500")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    ga = GenerativeAdapter.from_pretrained(args.generator)
    model, tok = ga.base_model, ga.tokenizer
    episodes = read_episodes(ROOT / "data/benchmarks/facts" / f"{args.split}.jsonl")[0]
    found = [(e, qa) for e in episodes for qa in e.qas if args.question in qa.question]
    if not found:
        p.error(f"no {args.split} question contains {args.question!r}")
    episode, qa = found[0]
    print(f"{qa.question}  gold {qa.answers}")
    with make_method("genadapter", model, tok, ga=ga).adapt(episode.context) as handle:
        ids = handle.fmt.prompt_ids(qa.question)
        for step in range(args.steps):
            x = torch.tensor([ids], device=ga.device)
            with torch.no_grad():
                base = model(x).logits[0, -1].log_softmax(-1)
                with handle.lm.applied():
                    adapted = model(x).logits[0, -1].log_softmax(-1)
            ids.append(int(adapted.argmax()))
            print(f"step {step} -> {tok.decode(ids[-1:])!r}")
            print(f"  base    {top(tok, base)}")
            print(f"  adapted {top(tok, adapted)}")
            print(f"  push    {top(tok, adapted - base)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
