"""What the least-squares memory costs: `memory: ridge` vs `linear`, same weights, side by side.

A ridge state keeps H = sum_t w_t k_t k_t^T (r_in x r_in) beside G and is read out as
(H + lam_bar I)^-1 G, a Cholesky solve once per state (genadapter/memory.py). Three costs,
for each r_in, all methods interleaved in one process:
- read: tokens/s of `ga.read` (1K-token forwards: 128-token chunks 8 at a time, and one
  2,048-token chunk) vs the no-grad decoder body over the same chunks (read_throughput.py's
  baseline). Target: ridge read >= 0.95x the forward;
- solve: making the per-target LoRA of one state (`ga.lora`), where the solve happens;
- answer: a 32-token question + 32 greedy tokens after an N-token state, side path and merged
  (answer_latency.py's loop; the solve counts in each answer). Target: ridge / linear <= 1.05.
The saved generator's r_in uses its trained weights; other r_in values are fresh generators of
the same config (B = 0: the same arithmetic, the timings do not depend on the values).

    python experiments/bench/memory_cost.py            # r_in = saved (32) and 128, N = 2,048
    python experiments/bench/memory_cost.py --quick    # saved r_in only, 3 rounds
"""

from __future__ import annotations

import sys

import common
import torch
from answer_latency import QUESTION, answer

from genadapter import GenerativeAdapter

MEMORIES = ("linear", "ridge")
SHAPES = ((128, 8), (2048, 1))  # (chunk_len, chunks per forward)


def adapters(saved: GenerativeAdapter, path, r_in: int) -> dict[str, GenerativeAdapter]:
    """A linear and a ridge adapter of `saved` (loaded from `path`) at `r_in`, on its base LM."""
    lm, tok = saved.base_model, saved.tokenizer
    if r_in == saved.config.r_in:  # the trained weights, read out by either memory
        out = {m: GenerativeAdapter.from_pretrained(path, lm, tok, memory=m) for m in MEMORIES}
    else:
        config = saved.config.replace(r_in=r_in)
        out = {m: GenerativeAdapter.from_base(lm, config.replace(memory=m), tok) for m in MEMORIES}
    return {m: ga.to(saved.device) for m, ga in out.items()}


def read_rows(gas: dict[str, GenerativeAdapter], tokens: torch.Tensor, reps: int) -> list[dict]:
    lm, rows = next(iter(gas.values())).base_model, []
    for length, batch in SHAPES:
        ids = tokens[: length * batch].view(batch, length)
        mask = torch.ones_like(ids)
        for ga in gas.values():
            ga.config.chunk_len, ga.chunk_batch_size = length, batch

        @torch.no_grad()
        def body(ids=ids, mask=mask):
            lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

        methods = {
            f"read {m}": torch.no_grad()(lambda ga=ga, ids=ids: ga.read(ids))
            for m, ga in gas.items()
        }
        _, tps = common.throughput({**methods, "forward": body}, reps, ids.numel())
        rows.append(
            {
                "chunk_len": length,
                "batch": batch,
                "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                **{f"{m}_over_forward": round(tps[f"read {m}"] / tps["forward"], 3) for m in gas},
            }
        )
        print(rows[-1], flush=True)
    return rows


def answer_timings(gas: dict[str, GenerativeAdapter], tokens: torch.Tensor, n: int, reps: int):
    """Median seconds of the LoRA of one state, and of side-path / merged answers, per memory."""
    question = tokens[-QUESTION:][None]
    methods = {}
    for m, ga in gas.items():
        ga.config.chunk_len, ga.chunk_batch_size = 128, None
        with torch.no_grad():
            state = ga.read(tokens[:n][None])

        def side(ga=ga, state=state):
            with ga.adapted(state):
                return answer(ga.base_model, question)

        def merged(ga=ga, state=state):
            with ga.merged(state):
                return answer(ga.base_model, question)

        methods[f"lora {m}"] = torch.no_grad()(lambda ga=ga, state=state: ga.lora(state))
        methods[f"side {m}"], methods[f"merged {m}"] = side, merged
    times = common.interleaved(methods, reps)
    return {k: common.median(v["total"]) for k, v in times.items()}


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--r-in", type=int, nargs="+", help="key widths (default: saved and 128)")
    p.add_argument("--context", type=int, default=2048, help="tokens read before answering")
    args = p.parse_args()
    env = common.setup(args)
    reps = args.reps or (3 if args.quick else 5)
    saved = common.load_adapter(args)
    widths = args.r_in or ([saved.config.r_in] if args.quick else [saved.config.r_in, 128])
    tokens = common.wiki_tokens(saved.tokenizer, max(2048, args.context + QUESTION)).to(args.device)

    results, table = [], []
    for r_in in widths:
        gas = adapters(saved, args.generator, r_in)
        reads = read_rows(gas, tokens, reps)
        t = answer_timings(gas, tokens, args.context, reps)
        worst = min(r["ridge_over_forward"] for r in reads)
        side, merged = t["side ridge"] / t["side linear"], t["merged ridge"] / t["merged linear"]
        results.append(
            {
                "r_in": r_in,
                "weights": "trained" if r_in == saved.config.r_in else "fresh (B = 0)",
                "read": reads,
                "seconds": t,
                "ridge_read_over_forward_worst": worst,
                "ridge_over_linear_side_answer": round(side, 3),
                "ridge_over_linear_merged_answer": round(merged, 3),
                "verdicts": {
                    "read": common.verdict(worst, 0.95),
                    "side": common.verdict(side, 1.05, higher_is_better=False),
                    "merged": common.verdict(merged, 1.05, higher_is_better=False),
                },
            }
        )
        for r in reads:
            table.append(
                [
                    r_in,
                    f"read {r['chunk_len']}×{r['batch']}: ridge / forward (≥ 0.95)",
                    f"{r['ridge_over_forward']:.3f} (linear {r['linear_over_forward']:.3f})",
                    common.verdict(r["ridge_over_forward"], 0.95),
                ]
            )
        table += [
            [
                r_in,
                f"LoRA of one state (the solve), {len(saved.generator.targets)} targets",
                f"ridge {1e3 * t['lora ridge']:.1f} ms, linear {1e3 * t['lora linear']:.1f} ms",
                "",
            ],
            [
                r_in,
                f"answer after {args.context:,} tokens, side path: ridge / linear (≤ 1.05)",
                f"{side:.3f} ({t['side ridge']:.2f} s vs {t['side linear']:.2f} s)",
                results[-1]["verdicts"]["side"],
            ],
            [
                r_in,
                "answer, merged: ridge / linear (≤ 1.05)",
                f"{merged:.3f} ({t['merged ridge']:.2f} s vs {t['merged linear']:.2f} s)",
                results[-1]["verdicts"]["merged"],
            ],
        ]
        del gas

    result = {
        **common.header("memory_cost", env, saved, reps, args.generator),
        "context_tokens": args.context,
        "results": results,
    }
    markdown = "\n\n".join(
        [
            "## Cost of the ridge memory (linear vs ridge, same generator config)",
            common.md_table(["r_in", "figure", "value", "target"], table),
            f"Generator {common.shown(args.generator)} ({len(saved.generator.targets)} targets); "
            f"{reps} interleaved rounds after 1 warm-up, medians. Read baseline: the no-grad "
            "decoder body over the same chunks.",
        ]
    )
    common.write("memory_cost", args.out, result, markdown, figure(results))
    return 0


def figure(results: list[dict]):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, values = [], {m: [] for m in MEMORIES}
    for res in results:
        for r in res["read"]:
            labels.append(f"r_in {res['r_in']}\n{r['chunk_len']}×{r['batch']}")
            for m in MEMORIES:
                values[m].append(r[f"{m}_over_forward"])
    xs = range(len(labels))
    for i, m in enumerate(MEMORIES):
        ax.bar([x + (i - 0.5) * 0.38 for x in xs], values[m], 0.38, label=f"read, {m}")
    ax.axhline(0.95, color="gray", ls="--", lw=1, label="target 0.95")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(ylabel="tokens/s ÷ plain forward", title="read throughput by memory")
    ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    sys.exit(main())
