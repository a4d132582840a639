"""Does the adapted model still ask the queries the match was fitted on?

`match_fit.py` fits A on the base LM's module inputs. During tuning the queries are the inputs
of the *adapted* model, which every earlier adapted layer moves. This reads 24 validation facts
episodes with the fitted generator and reports the retrieval figures of `probes.probe_losses` (hit and
share of the read-out, over every context token, and among the asked answers alone with
`oracle_writes: episode`) with the pretrained B kept and with B = 0 (the adapted model is then
the base LM, so the queries are exactly those fitted).

    python experiments/diagnostics/match_queries.py   # ~2 min; needs match_fit.py --keep-b first
        [--generator runs/match-fit/generator-keep-b]
Writes results/match_queries.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.training.instruct_data import collate_episodes, encode_episode  # noqa: E402
from genadapter.training.probes import oracle_writes, probe_losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).parent / "results" / "match_queries.json"
EPISODES, PER_BATCH, CHUNK_LEN, MAX_CHUNKS = 24, 4, 32, 24  # as the ablations validate


def retrieval(ga: GenerativeAdapter, batches: list[dict], oracle: str | None) -> dict[str, float]:
    hit, share = [], []
    with torch.no_grad():
        for batch in batches:
            batch = oracle_writes(batch, oracle) if oracle else batch
            out = probe_losses(ga, batch, retrieval="share", with_ranking=False)
            hit.append(out["retrieval_hit"])
            share.append(out["retrieval_share"])
    return {"hit": torch.cat(hit).mean().item(), "share": torch.cat(share).mean().item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default=str(ROOT / "runs/match-fit/generator-keep-b"))
    parser.add_argument("--data", default=str(ROOT / "data/benchmarks/facts/validation.jsonl"))
    args = parser.parse_args()
    ga = GenerativeAdapter.from_pretrained(args.generator)
    ga.eval()
    fmt = PromptFormat(ga.tokenizer)
    episodes, _ = read_episodes(args.data)
    batches = []
    for i in range(0, EPISODES, PER_BATCH):
        enc = [encode_episode(e, fmt, CHUNK_LEN) for e in episodes[i : i + PER_BATCH]]
        enc = [e for e in enc if len(e.chunks) <= MAX_CHUNKS]
        batches.append(
            collate_episodes(enc, [0] * len(enc), CHUNK_LEN, ga.tokenizer.pad_token_id or 0)
        )
    result = {}
    for b in ("pretrained B", "B = 0"):
        if b == "B = 0":
            with torch.no_grad():
                for block in ga.generator.blocks.values():
                    block.B.zero_()
        for oracle in (None, "episode"):
            result[f"{b}, {oracle or 'every token'}"] = figures = retrieval(ga, batches, oracle)
            print(
                f"{b:>13}, {oracle or 'every token':>11}: hit {figures['hit']:.3f}, "
                f"share {figures['share']:.3f}"
            )
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
