"""Answer latency and memory after N context tokens: genadapter (side path, merged) vs prompt.

An answer is the prefill of a 32-token question plus 31 greedy steps (32 new tokens), by the same
loop for every method. Before answering, each method has taken the context in its own way, timed
separately as "ingest":
- genadapter: `ga.read` put the N tokens into a state; the answer runs the side path
  (`ga.adapted`), or `ga.merged` (the merge and the bit-exact restore count in the answer);
- prompt: one prefill put the N tokens into the KV cache; the answer continues from that cache.
  Past the model's window it is impossible, and reported so: nothing is truncated;
- base: no context at all, the reference for the cost of a decoding step.
N = 0, 512, 2K, 8K*, 32K, where 8K* = window - 64 = 8128 tokens so that context, question and
answer fit the 8192-token window. All (method, N) pairs run interleaved in one loop.
Memory: state bytes vs KV-cache bytes vs N, and the peak RSS while answering.

    python experiments/bench/answer_latency.py           # full
    python experiments/bench/answer_latency.py --quick   # N = 0, 512, 2K; 3 rounds
"""

from __future__ import annotations

import sys
import time

import common
import torch

QUESTION, NEW_TOKENS = 32, 32


@torch.no_grad()
def answer(lm, question: torch.Tensor, past=None) -> dict[str, float]:
    """Prefill the question (after the cached context, if any), then greedy steps."""
    start = time.perf_counter()
    out = lm(input_ids=question, past_key_values=past, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefilled = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        out = lm(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    end = time.perf_counter()
    return {"prefill": prefilled - start, "decode_per_token": (end - prefilled) / (NEW_TOKENS - 1)}


@torch.no_grad()  # as every inference caller (with grad on, read keeps a graph for training)
def read(ga, context: torch.Tensor):
    return ga.read(context[None]) if len(context) else ga.new_state()


@torch.no_grad()
def prefill(lm, context: torch.Tensor):
    """The KV cache of the context (None for no context); the body only, no logits."""
    return (
        lm.base_model(input_ids=context[None], use_cache=True).past_key_values
        if len(context)
        else None
    )


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) if cache else 0


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", help="context sizes N (default: see above)")
    args = p.parse_args()
    env = common.setup(args)
    reps = args.reps or (3 if args.quick else 5)
    ga = common.load_adapter(args)
    lm, cfg = ga.base_model, ga.base_model.config
    window = cfg.max_position_embeddings
    fits = window - QUESTION - NEW_TOKENS  # the longest context a prompt can hold
    sizes = sorted(
        set(args.sizes or ([0, 512, 2048] if args.quick else [0, 512, 2048, fits, 32768]))
    )
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    width = next(lm.parameters()).element_size()  # bytes per cached number (float32: 4)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * width

    tokens = common.wiki_tokens(ga.tokenizer, max(sizes) + QUESTION).to(args.device)
    question = tokens[-QUESTION:][None]  # text that follows no context it is asked after
    # ingest, each measured once (after a warm-up): every read first (small chunks), then prefills
    read(ga, tokens[:256]), prefill(lm, tokens[:256])
    states, caches, ingest = {}, {}, {n: {} for n in sizes}
    for n in sizes:
        states[n], ingest[n]["read"] = common.measured(lambda n=n: read(ga, tokens[:n]))
    for n in (n for n in sizes if n <= fits):
        caches[n], ingest[n]["prefill"] = common.measured(lambda n=n: prefill(lm, tokens[:n]))
        assert cache_bytes(caches[n]) == n * kv_per_token
    for n in sizes:
        print(f"N={n}: ingest {ingest[n]}", flush=True)

    def prompt(n: int):
        def run():
            result = answer(lm, question, caches[n])
            if caches[n] is not None:
                caches[n].crop(n - caches[n].get_seq_length())  # back to the context alone
            return result

        return run

    def side(n: int):
        def run():
            with ga.adapted(states[n]):
                return answer(lm, question)

        return run

    def merged(n: int):
        def run():
            with ga.merged(states[n]):
                return answer(lm, question)

        return run

    methods = {("base", 0): lambda: answer(lm, question)}
    for n in sizes:
        methods[("side", n)] = side(n)
        methods[("merged", n)] = merged(n)
        if n <= fits:
            methods[("prompt", n)] = prompt(n)
    times = common.interleaved(methods, reps)
    if args.profile:
        common.profile(
            {f"{m}@{n}": fn for (m, n), fn in methods.items()}, args.out / "profiles" / "answer.txt"
        )
    med = {key: {k: common.median(v) for k, v in t.items()} for key, t in times.items()}

    # memory while answering: only what one method holds is resident
    caches.clear()
    memory = {"base": common.measured(lambda: answer(lm, question))[1]}
    for n in sizes:
        memory[f"side@{n}"] = common.measured(side(n))[1]
        memory[f"merged@{n}"] = common.measured(merged(n))[1]
    for n in (n for n in sizes if n <= fits):
        cache = prefill(lm, tokens[:n])
        memory[f"prompt@{n}"] = common.measured(lambda c=cache: answer(lm, question, c))[1]
        del cache

    # --- figures and targets -------------------------------------------------------------------
    def total(method: str, n: int) -> float | None:
        return med[(method, n)]["total"] if (method, n) in med else None

    base_decode = med[("base", 0)]["decode_per_token"]
    big, mid = max(sizes), (fits if fits in sizes else None)
    rows = []
    for n in sizes:
        p = total("prompt", n)
        rows.append(
            {
                "context_tokens": n,
                "answer_s": {m: total(m, n) for m in ("side", "merged", "prompt")},
                "question_prefill_s": {
                    m: med[(m, n)]["prefill"] for m in ("side", "merged", "prompt") if (m, n) in med
                },
                "decode_ms_per_token": {
                    m: 1e3 * med[(m, n)]["decode_per_token"]
                    for m in ("side", "merged", "prompt")
                    if (m, n) in med
                },
                "prompt": "ok"
                if p is not None
                else f"impossible (exceeds the {window}-token window)",
                "prompt_over_side": p / total("side", n) if p else None,
                "ingest": ingest[n],
                "state_bytes": states[n].nbytes,
                "kv_cache_bytes": n * kv_per_token,
                "peak_rss_mib": {
                    m: memory.get(f"{m}@{n}", {}).get("peak_rss_mib")
                    for m in ("side", "merged", "prompt")
                },
                "rss_before_mib": {
                    m: memory.get(f"{m}@{n}", {}).get("rss_before_mib")
                    for m in ("side", "merged", "prompt")
                },
                "peak_gpu_mib": {  # on a GPU only: the allocator's peak while answering
                    m: memory.get(f"{m}@{n}", {}).get("peak_gpu_mib")
                    for m in ("side", "merged", "prompt")
                },
            }
        )
    kv_8k = 8192 * kv_per_token
    state_bytes = states[big].nbytes
    figures = {
        "prompt_over_side_at_8K*": total("prompt", mid) / total("side", mid) if mid else None,
        "prompt_over_merged_at_8K*": total("prompt", mid) / total("merged", mid) if mid else None,
        "side_largest_N_over_0": total("side", big) / total("side", 0) if 0 in sizes else None,
        "merged_largest_N_over_0": total("merged", big) / total("merged", 0)
        if 0 in sizes
        else None,
        "merged_decode_over_base": med[("merged", big)]["decode_per_token"] / base_decode,
        "side_decode_over_base": med[("side", big)]["decode_per_token"] / base_decode,
        "state_over_kv_8K": state_bytes / kv_8k,
    }
    if mid:  # not targets: the context prefilled inside every answer, or ingest counted for both
        with_prefill = ingest[mid]["prefill"]["seconds"] + total("prompt", mid)
        figures["prompt_with_prefill_over_side_at_8K*"] = with_prefill / total("side", mid)
        figures["cold_prompt_over_cold_side_at_8K*"] = with_prefill / (
            ingest[mid]["read"]["seconds"] + total("side", mid)
        )
    targets = [
        (
            "answer latency at N = 8K*: prompt / genadapter (side path)",
            "prompt_over_side_at_8K*",
            10.0,
            True,
        ),
        (
            f"genadapter (side path) latency at N = {big:,} / at 0",
            "side_largest_N_over_0",
            1.05,
            False,
        ),
        (
            f"genadapter (merged) latency at N = {big:,} / at 0",
            "merged_largest_N_over_0",
            1.05,
            False,
        ),
        (
            f"merged decoding / base decoding (per token, N = {big})",
            "merged_decode_over_base",
            1.03,
            False,
        ),
        (
            f"side-path decoding / base decoding (per token, N = {big})",
            "side_decode_over_base",
            1.15,
            False,
        ),
        ("state bytes / KV-cache bytes at 8K (8192 tokens)", "state_over_kv_8K", 0.01, False),
    ]
    verdicts = {key: common.verdict(figures[key], t, hi) for _, key, t, hi in targets}
    result = {
        **common.header("answer_latency", env, ga, reps, args.generator),
        "chunk_len": ga.config.chunk_len,
        "question_tokens": QUESTION,
        "new_tokens": NEW_TOKENS,
        "window": window,
        "context_sizes": sizes,
        "kv_bytes_per_token": kv_per_token,
        "base_decode_ms_per_token": 1e3 * base_decode,
        "base_answer_s": med[("base", 0)]["total"],
        "base_peak_rss_mib": memory["base"]["peak_rss_mib"],
        "figures": figures,
        "verdicts": verdicts,
        "rows": rows,
        "targets": [
            {
                "figure": name,
                "value": figures[key],
                "target": ("≥ " if hi else "≤ ") + f"{t:g}",
                "verdict": verdicts[key],
            }
            for name, key, t, hi in targets
        ],
        "timings_s": {f"{m}@{n}": t for (m, n), t in times.items()},
    }

    def s(x: float | None) -> str:
        return f"{x:.2f}" if x is not None else "—"

    def mib(b: int) -> str:
        return f"{b / common.MiB:,.2f}"

    latency = [
        [
            f"{r['context_tokens']:,}",
            s(r["answer_s"]["side"]),
            s(r["answer_s"]["merged"]),
            s(r["answer_s"]["prompt"]) if r["prompt"] == "ok" else r["prompt"],
            f"{r['prompt_over_side']:.1f}×" if r["prompt_over_side"] else "—",
            s(r["ingest"]["read"]["seconds"]),
            s(r["ingest"].get("prefill", {}).get("seconds")),
        ]
        for r in rows
    ]
    decode = [
        [f"{r['context_tokens']:,}"]
        + [s(r["decode_ms_per_token"].get(m)) for m in ("side", "merged", "prompt")]
        + [s(r["question_prefill_s"].get(m)) for m in ("side", "merged", "prompt")]
        for r in rows
    ]

    def growth(m: dict | None) -> str:  # peak RSS above the RSS before, MiB
        return s(m["peak_rss_mib"] - m["rss_before_mib"]) if m and m["peak_rss_mib"] else "—"

    mem = [
        [
            f"{r['context_tokens']:,}",
            f"{r['state_bytes']:,}",
            f"{mib(r['kv_cache_bytes'])}" + ("" if r["prompt"] == "ok" else " (would need)"),
            *(s(r["peak_rss_mib"][m]) for m in ("side", "merged", "prompt")),
            growth(r["ingest"]["read"]),
            growth(r["ingest"].get("prefill")),
        ]
        for r in rows
    ]
    verdict_rows = [
        [
            name,
            f"{figures[key]:.4g}" if figures[key] is not None else "n/a",
            ("≥ " if hi else "≤ ") + f"{t:g}",
            verdicts[key],
        ]
        for name, key, t, hi in targets
    ]
    markdown = "\n\n".join(
        [
            "## Answer latency (seconds, median): 32-token question + 32 greedy tokens after N context tokens",
            common.md_table(
                [
                    "N",
                    "genadapter side path",
                    "genadapter merged",
                    "prompt (KV cache)",
                    "prompt / side",
                    "ingest: read (s)",
                    "ingest: prefill (s)",
                ],
                latency,
            ),
            f"No context at all (base model): {s(med[('base', 0)]['total'])} s, "
            f"{1e3 * base_decode:.1f} ms per decoded token. 8K* = {fits} tokens: the longest context "
            f"that leaves room for the question and the answer in the {window}-token window. "
            f"Ingest (single run, not interleaved): `ga.read` in {ga.config.chunk_len}-token chunks "
            f"vs one prefill of the context into the KV cache. Merged answers include merging and "
            f"restoring the weights. At N = 0 the state is empty and genadapter is the base model "
            f"exactly (no hooks; merging adds zeros).",
            "### Per-token decoding (ms) and question prefill (s)",
            common.md_table(
                [
                    "N",
                    "decode side",
                    "decode merged",
                    "decode prompt",
                    "prefill side",
                    "prefill merged",
                    "prefill prompt",
                ],
                decode,
            ),
            "### Memory",
            common.md_table(
                [
                    "N",
                    "state (bytes)",
                    "KV cache (MiB)",
                    "peak RSS answering: side",
                    "merged",
                    "prompt",
                    "ingest peak growth: read",
                    "prefill",
                ],
                mem,
            ),
            f"KV cache: {kv_per_token:,} bytes per token (float32, {cfg.num_hidden_layers} layers × "
            f"{cfg.num_key_value_heads} KV heads × {head_dim} × K and V), checked against the cache "
            f"the prefill built. Peak RSS (MiB) while answering: the kernel's high-water mark, reset "
            f"before each answer (after handing freed heap back to the OS); only that method's context "
            f"is resident; model weights included (base model, no context: "
            f"{s(memory['base']['peak_rss_mib'])} MiB). Ingest peak growth: peak RSS while reading "
            f"or prefilling N tokens minus the RSS before (MiB).",
            "### Targets",
            common.md_table(["figure", "value", "target", ""], verdict_rows),
            f"{len(methods)} (method, N) pairs interleaved in one loop, {reps} rounds after 1 warm-up."
            + (
                f" Not targets, at 8K*: a prompt that prefills the context inside every answer is "
                f"{figures['prompt_with_prefill_over_side_at_8K*']:.1f}× the side path; counting ingest "
                f"for both (prefill + answer vs read + answer), {figures['cold_prompt_over_cold_side_at_8K*']:.1f}×."
                if mid
                else ""
            ),
        ]
    )

    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs, labels = range(len(sizes)), [f"{n:,}" if n != fits else f"{n:,} (8K*)" for n in sizes]
    for m in ("side", "merged", "prompt"):
        pts = [(x, r["answer_s"][m]) for x, r in zip(xs, rows, strict=True) if r["answer_s"][m]]
        ax1.plot(
            *zip(*pts, strict=True), marker="o", label=m if m == "prompt" else f"genadapter {m}"
        )
    for x, r in zip(xs, rows, strict=True):
        if r["prompt"] != "ok":
            ax1.annotate(
                "× prompt: impossible\n(exceeds the window)",
                (x, 0.25),
                xycoords=("data", "axes fraction"),
                ha="center",
                fontsize=8,
                color="C2",
            )
    ax1.axhline(med[("base", 0)]["total"], color="grey", ls=":", label="base, no context")
    ax1.set_xticks(xs, labels, fontsize=8)
    ax1.set_ylim(bottom=0)
    ax1.set(
        xlabel="context tokens N",
        ylabel="answer latency (s)",
        title="32-token question + 32 new tokens",
    )
    ax1.legend(fontsize=8)
    ax2.plot(
        xs, [r["state_bytes"] / common.MiB for r in rows], marker="o", label="genadapter state"
    )
    kv = [
        (x, r["kv_cache_bytes"] / common.MiB, r["prompt"] == "ok")
        for x, r in zip(xs, rows, strict=True)
        if r["kv_cache_bytes"]
    ]
    ax2.plot(
        [x for x, _, ok in kv if ok],
        [y for _, y, ok in kv if ok],
        marker="o",
        label="KV cache",
        color="C2",
    )
    beyond = [i for i, (*_, ok) in enumerate(kv) if not ok]
    if beyond:  # dashed: what a cache would need past the window
        part = kv[max(beyond[0] - 1, 0) :]
        ax2.plot(
            [x for x, *_ in part],
            [y for _, y, _ in part],
            ls="--",
            color="C2",
            label="KV cache (beyond window)",
        )
    ax2.set_xticks(xs, labels, fontsize=8)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.set(xlabel="context tokens N", ylabel="MiB", title="what holds the context")
    ax2.legend(fontsize=8)
    common.write("answer_latency", args.out, result, markdown, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
