"""Why greedy answers miss what teacher forcing scores well: for each question, with the gold
answer teacher-forced after it, the rank of the gold token among the adapted model's next-token
predictions, at the answer's first token (which decides where a greedy answer goes) and at the
tokens after it (the continuation, end of turn included).

    python experiments/facts/answer_tokens.py [--generator experiments/generators/headline]
        [--split test-500] [--episodes 16] [--wiki-docs 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from tune_slot import DATA, Episode  # noqa: E402

from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402


def gold_ranks(ga: GenerativeAdapter, ep: Episode) -> tuple[list[int], list[int]]:
    """Ranks (0 = top-1) of each question's first gold answer token, and of the tokens after it."""
    with torch.no_grad(), ga.side_paths(ga.generator.lora_of(ep.N)):
        logits = ga.base_model(input_ids=ep.ids, attention_mask=ep.mask).logits
    first, rest = [], []
    for row, labels in zip(logits, ep.labels, strict=True):
        for i, pos in enumerate((labels != -100).nonzero().flatten().tolist()):
            scores = row[pos - 1]
            rank = int((scores > scores[labels[pos]]).sum())
            (rest if i else first).append(rank)
    return first, rest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, default=Path("experiments/generators/headline"))
    p.add_argument("--split", default="test-500")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--wiki-docs", type=int, default=0, help="as tune_slot.py --wiki-docs")
    args = p.parse_args()
    ga = GenerativeAdapter.from_pretrained(args.generator)
    eos = ga.tokenizer.eos_token_id
    first, rest = [], []
    for e in tqdm(read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]):
        f, r = gold_ranks(ga, Episode(ga, e, eos, args.wiki_docs))
        first += f
        rest += r
    print(
        f"{args.generator} on {args.split} ({len(first)} questions): first answer token top-1 "
        f"{100 * sum(r == 0 for r in first) / len(first):.1f} %, median rank "
        f"{statistics.median(first):.0f}; later tokens top-1 "
        f"{100 * sum(r == 0 for r in rest) / len(rest):.1f} % of {len(rest)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
