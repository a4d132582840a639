"""Evaluation speed: an episode's questions one at a time vs as one batch, same episodes, same run.

Batched (`genadapter eval`'s default), every question of an episode is answered in one greedy
decode and every gold answer and option is scored in one pass; both run the prefix all rows share
(for the prompt methods: the context) once and reuse its KV cache (`genadapter/eval/batched.py`).
One by one (`--one-by-one`) runs the same calls with one row each. Both modes evaluate every
episode in turn, the order alternating, and their results are compared item by item: the
predictions and choices must be identical and the answer NLLs equal up to float rounding.

    python experiments/bench/eval_speed.py           # 4 facts episodes of ~500 tokens (16 questions)
    python experiments/bench/eval_speed.py --quick   # 2 episodes
"""

from __future__ import annotations

import time

import common

TARGET = 3.0  # batched evaluation at least 3x as fast over the three methods
METHODS = ("base", "prompt", "genadapter")


def evaluate(method, episodes, batched: bool) -> tuple[list[dict], float]:
    from genadapter.eval.harness import evaluate_episode

    start = time.perf_counter()
    records = [evaluate_episode(method, e, "qa", batched=batched) for e in episodes]
    return records, time.perf_counter() - start


def compare(one: list[dict], batch: list[dict]) -> dict[str, float]:
    """How far the batched items are from the one-by-one items."""
    items = [
        (a, b)
        for ra, rb in zip(one, batch, strict=True)
        for a, b in zip(ra["items"], rb["items"], strict=True)
    ]
    return {
        "items": len(items),
        "same_prediction": sum(a["prediction"] == b["prediction"] for a, b in items),
        "same_choice": sum(a.get("choice") == b.get("choice") for a, b in items),
        "max_nll_diff": max(abs(a["nll"] - b["nll"]) for a, b in items),
    }


def main() -> int:
    args = common.parser(__doc__).parse_args()
    env = common.setup(args)
    from genadapter.data.benchmarks import make_facts
    from genadapter.eval.methods import context_window, make_method

    ga = common.load_adapter(args)
    n = 2 if args.quick else 4
    # = facts/test-500.jsonl's first n; shorter for a model with a small window (smoke tests)
    tokens = min(500, (context_window(ga.base_model) or 2048) // 4)
    episodes = make_facts("test", n, target_tokens=tokens, seed=0)
    rows = []
    for name in METHODS:
        method = make_method(name, ga.base_model, ga.tokenizer, ga=ga, max_new_tokens=24)
        evaluate(method, episodes[:1], True)  # warm-up
        seconds = {True: 0.0, False: 0.0}
        records = {True: [], False: []}
        for i, episode in enumerate(episodes):  # alternate the order: drift falls on both
            for batched in (True, False) if i % 2 == 0 else (False, True):
                recs, s = evaluate(method, [episode], batched)
                records[batched] += recs
                seconds[batched] += s
        diff = compare(records[False], records[True])
        rows.append(
            {
                "method": name,
                "one_by_one_s": seconds[False],
                "batched_s": seconds[True],
                "speedup": seconds[False] / seconds[True],
                **diff,
            }
        )
        print(rows[-1], flush=True)
    total = sum(r["one_by_one_s"] for r in rows) / sum(r["batched_s"] for r in rows)
    identical = all(r["same_prediction"] == r["same_choice"] == r["items"] for r in rows)
    verdict = common.verdict(total, TARGET) if identical else "MISS"
    table = common.md_table(
        [
            "method",
            "one by one (s)",
            "batched (s)",
            "speed-up",
            "same answers",
            "same choices",
            "max |Δ NLL|",
        ],
        [
            [
                r["method"],
                f"{r['one_by_one_s']:.1f}",
                f"{r['batched_s']:.1f}",
                f"{r['speedup']:.2f}×",
                f"{r['same_prediction']}/{r['items']}",
                f"{r['same_choice']}/{r['items']}",
                f"{r['max_nll_diff']:.1e}",
            ]
            for r in rows
        ],
    )
    markdown = (
        f"# Evaluation speed: {n} facts episodes of ~500 tokens, 4 questions each, 8 options\n\n"
        f"{table}\n\nAll three methods: {total:.2f}× (target ≥ {TARGET}× with identical answers"
        f" and choices): **{verdict}**."
    )
    result = {
        **common.header("eval_speed", env, ga, 1, args.generator),
        "episodes": [e.id for e in episodes],
        "rows": rows,
        "speedup": total,
        "verdict": verdict,
    }
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["one_by_one_s"] for r in rows], 0.4, label="one by one")
    ax.bar([x + 0.2 for x in xs], [r["batched_s"] for r in rows], 0.4, label="batched")
    ax.set_xticks(list(xs), [f"{r['method']}\n{r['speedup']:.1f}×" for r in rows])
    ax.set(ylabel="seconds for the episodes", title="eval: questions one by one vs batched")
    ax.legend()
    common.write("eval_speed", args.out, result, markdown, fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
