"""Why greedy answers miss what teacher forcing scores well: for each question, with the gold
answer teacher-forced after it, the rank of the gold token among the adapted model's next-token
predictions, at the answer's first token (which decides where a greedy answer goes), at the
value tokens after it (the continuation) and at the end of turn after the whole answer; and how
often the gold token is the top one of the generator's push alone (adapted minus base logits).

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

KINDS = ("first", "later", "end of turn")


def gold_ranks(ga: GenerativeAdapter, ep: Episode) -> dict[str, list[tuple[int, bool]]]:
    """Per kind of answer token: (rank of the gold token (0 = top-1), whether it tops the push)."""
    with torch.no_grad():
        base = ga.base_model(input_ids=ep.ids, attention_mask=ep.mask).logits
        with ga.side_paths(ga.generator.lora_of(ep.N)):
            adapted = ga.base_model(input_ids=ep.ids, attention_mask=ep.mask).logits
    out: dict[str, list[tuple[int, bool]]] = {kind: [] for kind in KINDS}
    eos = ga.tokenizer.eos_token_id
    for row, push_row, labels in zip(adapted, adapted - base, ep.labels, strict=True):
        for i, pos in enumerate((labels != -100).nonzero().flatten().tolist()):
            gold, scores = int(labels[pos]), row[pos - 1]
            kind = KINDS[0] if i == 0 else KINDS[2] if gold == eos else KINDS[1]
            rank = int((scores > scores[gold]).sum())
            out[kind].append((rank, bool(push_row[pos - 1].argmax() == gold)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, default=Path("experiments/generators/headline"))
    p.add_argument("--split", default="test-500")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--wiki-docs", type=int, default=0, help="as tune_slot.py --wiki-docs")
    args = p.parse_args()
    ga = GenerativeAdapter.from_pretrained(args.generator)
    eos = ga.tokenizer.eos_token_id
    ranks: dict[str, list[tuple[int, bool]]] = {kind: [] for kind in KINDS}
    for e in tqdm(read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]):
        for kind, found in gold_ranks(ga, Episode(ga, e, eos, args.wiki_docs)).items():
            ranks[kind] += found
    print(f"{args.generator} on {args.split}:")
    for kind, found in ranks.items():
        top = 100 * sum(r == 0 for r, _ in found) / len(found)
        push = 100 * sum(p for _, p in found) / len(found)
        median = statistics.median(r for r, _ in found)
        print(
            f"  {kind} ({len(found)} tokens): gold top-1 {top:.1f} %, median rank {median:.0f}; "
            f"top of the push alone {push:.1f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
