"""Adaptation time: genadapter's read of an episode's context vs test-time training on it.

The headline's methods and settings (experiments/eval/headline_facts.yaml: the instruction-tuned
generator; ttt-lora and ttt-bitfit with 5 AdamW steps over the whole context in 512-token windows)
adapt to the same held-out `facts` episodes, interleaved in one loop; each call is one method's
`adapt` as the evaluation times it. `genadapter (stream)` reads the documents one after another,
as a live stream must; `genadapter` reads them as rows of one batched read and sums the rows,
which gives the same state (checked here). Target: genadapter adapts >= 20x faster than ttt-lora.

    python experiments/bench/adapt_speed.py           # the 500- and 2K-token files, 2 episodes each
    python experiments/bench/adapt_speed.py --quick   # 500-token episodes only, 2 of them
    python experiments/bench/adapt_speed.py --task persona      # or wiki-topic: that headline's
                                                                # config, its first 2 episodes
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import torch
import yaml

from genadapter import GeneratorConfig
from genadapter.assets import load_base_model
from genadapter.eval.harness import EvalConfig, build_methods, load_episodes

CONFIGS = {
    task: common.ROOT / f"experiments/eval/headline_{task.replace('-', '_')}.yaml"
    for task in ("facts", "persona", "wiki-topic")
}
METHODS = ["genadapter:instruct", "ttt-lora", "ttt-bitfit"]
TARGET = 20.0


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--task", choices=list(CONFIGS), default="facts")
    parser.set_defaults(generator=None)  # None: the headline config's instruction-tuned one
    args = parser.parse_args()
    env = common.setup(args)
    reps = args.reps or (2 if args.quick else 3)
    raw = yaml.safe_load(CONFIGS[args.task].read_text())
    raw.update(methods=METHODS, out=None, reuse=[], max_episodes=None)
    if args.task == "facts":
        files = ["test-500"] if args.quick else ["test-500", "test-2k"]
        raw["data"] = [str(args.benchmarks / "facts" / f"{f}.jsonl") for f in files]
    if args.generator is not None:  # another generator, on the LM its config names
        raw["generators"] = {"instruct": str(args.generator)}
        raw["model"] = GeneratorConfig.load(args.generator / "generator_config.json").base_model
    config = EvalConfig.from_dict(raw)
    model, tokenizer = load_base_model(config.model)
    methods = build_methods(config, model, tokenizer)
    ga = methods["genadapter:instruct"].ga
    episodes, _ = load_episodes(config)
    per_file = 2
    rows = []
    for source in dict.fromkeys(src for src, _ in episodes):
        for _, ep in [e for e in episodes if e[0] == source][:per_file]:
            texts = ep.context_texts()
            tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)

            def stream(texts=texts):
                state = ga.new_state()
                with torch.no_grad():
                    for text in texts:
                        state = ga.read(text, state)
                return state

            def adapt(method, texts=texts):
                return lambda: method.adapt(texts).close()

            calls = {"genadapter (stream)": stream}
            calls.update({name: adapt(m) for name, m in methods.items()})
            with methods["genadapter:instruct"].adapt(texts) as handle:
                batched = handle.lm.state
            streamed = stream()
            same = max(  # relative: S sums hundreds of tokens, entries reach 1e6
                ((batched.S[k] - streamed.S[k]).abs().max() / streamed.S[k].abs().max()).item()
                for k in batched.S
            )
            times = common.interleaved(calls, reps, warmup=0 if rows else 1)  # warm once
            med = {name: common.median(t["total"]) for name, t in times.items()}
            row = {
                "source": Path(source).stem,
                "episode": ep.id,
                "context_tokens": tokens,
                "seconds": med,
                "state_max_rel_diff": same,
                "ttt_lora_over_genadapter": med["ttt-lora"] / med["genadapter:instruct"],
                "ttt_lora_over_stream": med["ttt-lora"] / med["genadapter (stream)"],
                "spread": {n: common.spread(t["total"]) for n, t in times.items()},
            }
            rows.append(row)
            print(
                f"{row['source']} {tokens} tokens: "
                + ", ".join(f"{n} {s:.2f} s" for n, s in med.items())
                + f"; ttt-lora / genadapter {row['ttt_lora_over_genadapter']:.1f}x"
                f" (stream {row['ttt_lora_over_stream']:.1f}x), states differ by {same:.1e} (relative)",
                flush=True,
            )
    ratio = common.median([r["ttt_lora_over_genadapter"] for r in rows])
    stem = "adapt_speed" if args.task == "facts" else f"adapt_speed_{args.task.replace('-', '_')}"
    result = common.header(stem, env, ga, reps)
    result.update(
        task=args.task,
        generator=config.generators["instruct"],
        rows=rows,
        median_ratio=ratio,
        target=TARGET,
        verdict=common.verdict(ratio, TARGET),
    )
    table = common.md_table(
        ["file", "context tokens", *calls, "ttt-lora / genadapter", "ttt-lora / stream"],
        [
            [
                r["source"],
                r["context_tokens"],
                *(f"{s:.2f}" for s in r["seconds"].values()),
                f"{r['ttt_lora_over_genadapter']:.1f}x",
                f"{r['ttt_lora_over_stream']:.1f}x",
            ]
            for r in rows
        ],
    )
    md = (
        f"# Adaptation time (seconds, median of {reps} interleaved rounds)\n\n{table}\n\n"
        f"Median ttt-lora / genadapter: **{ratio:.1f}x** (target ≥ {TARGET:.0f}x: "
        f"{result['verdict']}).\n"
    )
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows[0]["seconds"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [r["seconds"][name] for r in rows],
            width,
            label=name,
        )
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(rows))],
        [f"{r['context_tokens']} tok" for r in rows],
    )
    ax.set_yscale("log")
    ax.set_ylabel("adapt seconds (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.write(stem, args.out, result, md, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
