"""Read throughput: tokens/s of `ga.read` vs a plain no-grad forward of the base LM, same chunks.

`read` cuts each row into chunks of `chunk_len` tokens, runs the frozen LM over a batch of chunks
at a time (here `chunk_batch_size` = the batch) and projects the hidden states into the state.
The baseline is what reading needs from the LM and nothing more: the decoder body (all layers and
the final norm, **no LM head**) over the same chunks and mask, no grad, no cache. The full model
with its LM head is timed too, for reference. Chunk lengths 128, 512, 2048; batch 1 and 8 chunks
per forward; both under no grad, as inference callers read. Target: read >= 0.95x the body forward.

    python experiments/bench/read_throughput.py           # full
    python experiments/bench/read_throughput.py --quick   # chunks 128 and 512, 3 rounds
"""

from __future__ import annotations

import sys

import common
import torch


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", help="chunk lengths (default: see above)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="chunks per forward")
    args = p.parse_args()
    env = common.setup(args)
    lengths = args.lengths or ((128, 512) if args.quick else (128, 512, 2048))
    batches = args.batches
    reps = args.reps or (3 if args.quick else 5)

    ga = common.load_adapter(args)
    lm = ga.base_model
    stream = common.wiki_tokens(ga.tokenizer, max(lengths) * max(batches))
    rows, table = [], []
    for length in lengths:
        for batch in batches:
            ids = stream[: length * batch].view(batch, length).to(args.device)
            mask = torch.ones_like(ids)
            ga.config.chunk_len = length  # every row is one chunk: one forward of `batch` chunks
            ga.chunk_batch_size = batch

            @torch.no_grad()
            def body(ids=ids, mask=mask):
                lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

            @torch.no_grad()
            def full(ids=ids, mask=mask):
                lm(input_ids=ids, attention_mask=mask, use_cache=False)

            @torch.no_grad()  # as every inference caller (with grad on, read keeps a graph)
            def read(ids=ids):
                ga.read(ids)

            methods = {"read": read, "forward": body, "forward+head": full}
            tokens = ids.numel()
            prof = args.out / "profiles" / f"read_{length}x{batch}.txt" if args.profile else None
            times, tps = common.throughput(methods, reps, tokens, prof)
            ratio = tps["read"] / tps["forward"]
            row = {
                "chunk_len": length,
                "batch": batch,
                "tokens": tokens,
                "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                "seconds": {k: v["total"] for k, v in times.items()},
                "read_over_forward": round(ratio, 3),
                "read_over_forward_with_head": round(tps["read"] / tps["forward+head"], 3),
                "verdict": common.verdict(ratio, 0.95),
            }
            rows.append(row)
            table.append(
                [
                    length,
                    batch,
                    f"{tps['read']:,.0f}",
                    f"{tps['forward']:,.0f}",
                    f"{tps['forward+head']:,.0f}",
                    f"{ratio:.3f}",
                    row["verdict"],
                ]
            )
            print(table[-1], flush=True)

    worst = min(r["read_over_forward"] for r in rows)
    result = {
        **common.header("read_throughput", env, ga, reps, args.generator),
        "baseline": "no-grad decoder body (all layers + final norm, no LM head) over the same "
        "chunks and attention mask; 'forward+head' adds the LM head (logits of every position)",
        "target": "read >= 0.95x forward",
        "worst_ratio": worst,
        "verdict": common.verdict(worst, 0.95),
        "rows": rows,
    }
    markdown = "\n\n".join(
        [
            "## Read throughput (tokens/s, median)",
            common.md_table(
                [
                    "chunk",
                    "batch",
                    "read",
                    "forward (no head)",
                    "forward + LM head",
                    "read / forward",
                    "target ≥ 0.95",
                ],
                table,
            ),
            f"Worst ratio {worst:.3f}: **{result['verdict']}**. Baseline: {result['baseline']}. "
            f"Generator: {len(ga.generator.targets)} targets in layers {ga.generator.layers[0]}–"
            f"{ga.generator.layers[-1]}; {reps} interleaved rounds after 1 warm-up.",
        ]
    )

    fig = common.grouped_bars(
        rows,
        ["read", "forward", "forward+head"],
        "read_over_forward",
        [f"{r['chunk_len']}×{r['batch']}" for r in rows],
        xlabel="chunk length × chunks per forward",
        ylabel="tokens / s",
        title=f"read vs plain no-grad forward ({ga.config.base_model}, {args.device})",
    )
    common.write("read_throughput", args.out, result, markdown, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
