"""Retrieval figures of generators trained WITHOUT the retrieval loss, on the ablations' validation.

    python experiments/finetune/ablations/retrieval_figures.py

The runs with a retrieval loss log `retrieval_hit` / `retrieval_share` in validation; this
measures the same two figures (probes.retrieval_losses) on the same 24 held-out facts
episodes for the generators that never saw that loss: the pretrained starting point, the
120-step reference run (if runs/ablation-ft-base exists) and instruction-tuning run 2 (800
steps). Does the answer + ranking loss alone teach the question to find its answer's tokens?
Also the chance level (scores equal everywhere). Writes results/retrieval_figures.json (≈ 3 min).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import yaml

from genadapter import GenerativeAdapter
from genadapter.training.export import export_checkpoint
from genadapter.training.instruct_data import FinetuneDataModule
from genadapter.training.probes import probe_losses

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


def figures(ga: GenerativeAdapter, batches: list[dict]) -> dict[str, float]:
    hit, share, n = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            out = probe_losses(ga, batch, retrieval="softmax", with_ranking=False)
            hit += out["retrieval_hit"].sum().item()
            share += out["retrieval_share"].sum().item()
            n += len(out["retrieval_hit"])
    return {"retrieval_hit": hit / n, "retrieval_share": share / n, "questions": n}


def chance(batches: list[dict]) -> dict[str, float]:
    """Both figures for scores equal everywhere: the answer tokens' share of the context."""
    shares = []
    for b in batches:
        gold = b["answer_context"].flatten(1)
        tokens = b["context_mask"].flatten(1).sum(1)[b["row_episode"]]
        shares += (gold.sum(1) / tokens)[gold.any(1)].tolist()
    mean = sum(shares) / len(shares)
    return {"retrieval_hit": mean, "retrieval_share": mean, "questions": len(shares)}


def main() -> int:
    cfg = yaml.safe_load((HERE / "base.yaml").read_text())
    data = FinetuneDataModule(
        **{k: v for k, v in cfg["data"].items()}, tokenizer=cfg["model"]["base_model"]
    )
    batches = list(data.val_dataloader())
    generators = {
        "pretrained (the runs' start)": ROOT / cfg["model"]["init_from"],
        "run 2 (800 steps, answer + ranking loss)": ROOT
        / "experiments/finetune/smollm2-instruct-all-rank-generator",
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ROOT / "runs/ablation-ft-base/checkpoints/last.ckpt"
        if ckpt.is_file():
            generators["reference run (120 steps, answer + ranking loss)"] = export_checkpoint(
                ckpt, Path(tmp) / "ref"
            )
        base, results = None, {"uniform scores (chance)": chance(batches)}
        for label, path in generators.items():
            ga = GenerativeAdapter.from_pretrained(path, base_model=base)
            base = ga.base_model
            results[label] = figures(ga, batches)
            print(
                f"{label}: hit {100 * results[label]['retrieval_hit']:.1f} %, "
                f"share {100 * results[label]['retrieval_share']:.1f} %"
            )
    (HERE / "results" / "retrieval_figures.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
