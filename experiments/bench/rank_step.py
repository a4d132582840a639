"""Instruction-tuning step with the ranking term: prompt run once (KV cache shared) vs full rows.

The same `facts` training batches (4 episodes, up to 4 questions each, 4 candidates a question)
are run three ways, forward + backward through the all-layer generator:
- no ranking: `answer_losses(with_ranking=False)`, the answer rows only;
- shared prompt: `answer_losses`, each question's prompt once, its KV cache copied to the answer
  and to every candidate (what training runs);
- full rows: every candidate as its own prompt + candidate row in one adapted pass (the direct
  way, and the reference the shared scores must equal);
- shared prompt + retrieval: as training runs with `retrieval_weight` > 0 (the retrieval loss
  of `probes.retrieval_losses` on top of the ranking term).
Reported: seconds per step, each over "no ranking", and the largest score difference between
shared and full rows (mean log-prob per candidate token).

    python experiments/bench/rank_step.py      # 3 batches, 3 rounds; needs `genadapter make-benchmarks`
"""

from __future__ import annotations

import itertools
import sys

import common
import torch

from genadapter import GenerativeAdapter
from genadapter.training.instruct_data import FinetuneDataModule, pad_rows
from genadapter.training.objectives import (
    answer_losses,
    chunk_writes,
    episode_state,
    rank_candidates,
    row_losses,
    split_rows,
)
from genadapter.training.probes import probe_losses

GENERATOR = common.ROOT / "experiments" / "pretrain" / "smollm2-wiki-all-generator"


def full_rows(ga: GenerativeAdapter, batch: dict) -> dict:
    """Answer and candidate rows each run in full (prompt included) in one adapted pass."""
    writes = chunk_writes(ga, batch["context_ids"], batch["context_mask"])
    keys = ("input_ids", "attention_mask", "loss_mask")
    prompts, answers = split_rows(*(batch[k] for k in keys))
    cands = [ids[m] for ids, m in zip(batch["cand_ids"], batch["cand_mask"].bool(), strict=True)]
    owner = torch.cat([torch.arange(len(prompts)), batch["cand_row"]])
    rows = pad_rows([prompts[i].tolist() for i in owner], [c.tolist() for c in answers + cands], 0)
    with ga.adapted(episode_state(ga, writes, batch["row_episode"][owner]), check=False):
        loss_sum, n_tok = row_losses(ga.base_model, *(rows[k] for k in keys))
    R = len(prompts)
    mean = loss_sum / n_tok.clamp(min=1)
    out = {"loss": loss_sum[:R].sum() / n_tok[:R].sum(), "scores": -mean[R:]}
    return {**out, **rank_candidates(-mean[R:], batch["cand_row"])}


def main() -> int:
    parser = common.parser(__doc__)
    parser.set_defaults(generator=GENERATOR)  # all layers: the finetuning runs' generator
    args = parser.parse_args()
    env = common.setup(args)
    reps = args.reps or 3
    ga = GenerativeAdapter.from_pretrained(args.generator)  # CPU: the batches stay there
    facts = args.benchmarks / "facts" / "train.jsonl"
    ga.train()
    data = FinetuneDataModule(
        train_files={str(facts): 1.0},
        tokenizer=ga.config.base_model,
        episodes_per_batch=4,
        max_questions=4,
        max_context_chunks=24,
        rank_options=4,
        lm_every=0,
        chunk_len=32,
    )
    batches = list(itertools.islice(iter(data.train_dataloader()), 2 if args.quick else 3))

    def run(fn):
        def step() -> None:
            for batch in batches:
                ga.generator.zero_grad(set_to_none=True)
                out = fn(batch)
                (out["loss"] + out.get("rank_loss", 0) + out.get("retrieval_loss", 0)).backward()

        return step

    methods = {
        "no ranking": run(lambda b: answer_losses(ga, b, with_ranking=False)),
        "shared prompt": run(lambda b: answer_losses(ga, b)),
        "full rows": run(lambda b: full_rows(ga, b)),
        "shared prompt + retrieval": run(lambda b: probe_losses(ga, b, retrieval="softmax")),
    }
    times = common.interleaved(methods, reps)
    med = {k: common.median(v["total"]) / len(batches) for k, v in times.items()}
    with torch.no_grad():  # the shared scores against the full rows' (same candidates, same order)
        diffs = []
        for b in batches:
            shared = answer_losses(ga, b)
            full = full_rows(ga, b)
            diffs.append((shared["cand_scores"] - full["scores"]).abs().max().item())
    ratio_shared, ratio_full = (
        med["shared prompt"] / med["no ranking"],
        med["full rows"] / med["no ranking"],
    )
    rows = [[k, f"{v:.2f}", f"{v / med['no ranking']:.2f}"] for k, v in med.items()]
    print(rows, flush=True)
    result = {
        **common.header("rank_step", env, ga, reps, args.generator),
        "batches": len(batches),
        "seconds_per_step": med,
        "shared_over_none": round(ratio_shared, 3),
        "full_over_none": round(ratio_full, 3),
        "max_score_difference": max(diffs),
        "candidate_rows_per_batch": [len(b["cand_row"]) for b in batches],
        "answer_rows_per_batch": [len(b["row_episode"]) for b in batches],
    }
    markdown = "\n\n".join(
        [
            "## Instruction-tuning step with candidate ranking (seconds per step, forward + backward, median)",
            common.md_table(["variant", "s / step", "over no ranking"], rows),
            f"{len(batches)} `facts` training batches of 4 episodes, {result['answer_rows_per_batch']} questions "
            f"and {result['candidate_rows_per_batch']} candidate rows; generator `{result['generator']}` "
            f"(adapters in {len(ga.generator.layers)} layers). Largest candidate-score difference between the "
            f"shared-prompt and the full-row computation: {result['max_score_difference']:.2e} nats/token. "
            f"{reps} interleaved rounds after 1 warm-up.",
        ]
    )
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(list(med), list(med.values()), color=["grey", "tab:blue", "tab:orange", "tab:green"])
    ax.set(ylabel="seconds per step", title="ranking 4 candidates a question (SmolLM2-135M, CPU)")
    common.write("rank_step", args.out, result, markdown, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
