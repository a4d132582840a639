"""Training throughput: a pretraining step vs a plain forward+backward through the frozen LM.

Both process the same batch of D documents x T chunks x C tokens; tokens/s counts those D*T*C
context tokens for both.
- pretraining step: what `GeneratorPretraining.training_step` runs, without Lightning:
  `pretrain_losses` (one no-grad pass of the frozen LM over every chunk, statistics with grad,
  one adapted forward over all completion and reconstruction target rows), backward, and an
  AdamW step on the generator;
- plain forward+backward: the frozen LM with its LM head over the same D*T chunks, next-token
  loss, backward to the input embeddings: through every layer's activations, no weight grads.
The frozen pass alone (no grad) is timed too, to break the step down.
Target: pretraining step >= 0.7x the plain forward+backward tokens/s.

    python experiments/bench/train_step.py           # the committed config (C 32) and C 128
    python experiments/bench/train_step.py --quick   # the committed config, 3 rounds
"""

from __future__ import annotations

import sys

import common
import torch

from genadapter.training.objectives import chunk_writes, pretrain_losses

# (chunk_len C, chunks per document T, documents D, targets per document and objective)
COMMITTED = (32, 8, 4, 3)  # experiments/pretrain/smollm2_wiki.yaml
LONGER = (128, 8, 4, 3)


def main() -> int:
    args = common.parser(__doc__).parse_args()
    env = common.setup(args)
    configs = [COMMITTED] if args.quick else [COMMITTED, LONGER]
    reps = args.reps or (3 if args.quick else 5)
    ga = common.load_adapter(args)
    lm = ga.base_model
    ga.train()  # the generator trains; the frozen LM stays in eval mode
    opt = torch.optim.AdamW(ga.generator.parameters(), lr=1e-4)
    stream = common.wiki_tokens(ga.tokenizer, max(c * t * d for c, t, d, _ in configs))

    rows, table = [], []
    for C, T, D, per_doc in configs:
        host_mask = torch.ones(D, T, C, dtype=torch.long)  # as training keeps it (no sync)
        ids, mask = stream[: C * T * D].view(D, T, C).to(args.device), host_mask.to(args.device)
        flat, flat_mask = ids.view(D * T, C), mask.view(D * T, C)
        rows_adapted = {}

        def step(
            ids=ids, mask=mask, host_mask=host_mask, per_doc=per_doc, rows_adapted=rows_adapted
        ):
            opt.zero_grad(set_to_none=True)
            out = pretrain_losses(
                ga,
                ids,
                mask,
                per_doc=per_doc,
                completion_weight=0.5,
                generator=torch.Generator().manual_seed(0),
                host_mask=host_mask,
            )
            out["loss"].backward()
            opt.step()
            rows_adapted["n"] = int(sum(v for k, v in out.items() if k.endswith("/tokens")))

        def plain(flat=flat, flat_mask=flat_mask):
            embeds = lm.get_input_embeddings()(flat).detach().requires_grad_(True)
            lm(inputs_embeds=embeds, attention_mask=flat_mask, labels=flat).loss.backward()

        @torch.no_grad()
        def frozen(ids=ids, mask=mask):
            chunk_writes(ga, ids, mask)

        methods = {"pretraining step": step, "forward+backward": plain, "frozen pass": frozen}
        tokens = ids.numel()
        prof = args.out / "profiles" / f"train_{D}x{T}x{C}.txt" if args.profile else None
        times, tps = common.throughput(methods, reps, tokens, prof)
        ratio = tps["pretraining step"] / tps["forward+backward"]
        row = {
            "chunk_len": C,
            "chunks_per_doc": T,
            "documents": D,
            "targets_per_doc": per_doc,
            "context_tokens": tokens,
            "adapted_target_tokens_scored": rows_adapted["n"],
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "seconds": {k: v["total"] for k, v in times.items()},
            "step_over_plain": round(ratio, 3),
            "verdict": common.verdict(ratio, 0.7),
        }
        rows.append(row)
        med = {k: common.median(v["total"]) for k, v in times.items()}
        table.append(
            [
                f"{D}×{T}×{C}",
                tokens,
                f"{tps['pretraining step']:,.0f}",
                f"{tps['forward+backward']:,.0f}",
                f"{ratio:.2f}",
                row["verdict"],
                f"{med['pretraining step']:.2f}",
                f"{med['frozen pass']:.2f}",
                f"{med['forward+backward']:.2f}",
            ]
        )
        print(table[-1], flush=True)

    worst = min(r["step_over_plain"] for r in rows)
    result = {
        **common.header("train_step", env, ga, reps, args.generator),
        "worst_ratio": worst,
        "verdict": common.verdict(worst, 0.7),
        "counted": "context tokens of the batch (documents x chunks x chunk_len), the same for both",
        "pretraining_step": "pretrain_losses (completion_weight 0.5) + backward + AdamW step, no Lightning",
        "baseline": "frozen LM incl. LM head over the same chunks, next-token loss, backward to the "
        "input embeddings (activation gradients through every layer, no weight grads)",
        "rows": rows,
    }
    markdown = "\n\n".join(
        [
            "## Training throughput (context tokens/s, median)",
            common.md_table(
                [
                    "batch D×T×C",
                    "tokens",
                    "pretraining step",
                    "plain fwd+bwd",
                    "step / plain",
                    "target ≥ 0.7",
                    "step (s)",
                    "of which frozen pass (s)",
                    "plain fwd+bwd (s)",
                ],
                table,
            ),
            f"Worst ratio {worst:.2f}: **{result['verdict']}**. Counted: {result['counted']}. "
            f"Pretraining step: {result['pretraining_step']}; its adapted pass runs "
            f"{2 * COMMITTED[3]} target chunks per document (completion + reconstruction) with "
            f"adapters in layers {ga.generator.layers[0]}–{ga.generator.layers[-1]}, so its backward "
            f"stops at layer {ga.generator.layers[0]}. Plain: {result['baseline']}. "
            f"{reps} interleaved rounds after 1 warm-up.",
        ]
    )

    fig = common.grouped_bars(
        rows,
        ["pretraining step", "forward+backward", "frozen pass"],
        "step_over_plain",
        [f"{r['documents']}×{r['chunks_per_doc']}×{r['chunk_len']}" for r in rows],
        xlabel="batch: documents × chunks × chunk length",
        ylabel="context tokens / s",
        title=f"pretraining step vs plain forward+backward ({ga.config.base_model}, {args.device})",
    )
    common.write("train_step", args.out, result, markdown, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
