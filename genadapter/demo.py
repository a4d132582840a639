"""The main job on the embedded default (`make demo`): stream fictional-fact documents and
Wikipedia summaries into a state with SmolLM2 and the committed generator, then ask questions
about them, base / prompt / genadapter side by side with timings and memory."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from genadapter.assets import data_dir

# the instruction-tuned generator (experiments/finetune), else the self-supervised one it started from
_EXPERIMENTS = data_dir().parent / "experiments"
_GENERATORS = [
    _EXPERIMENTS / "finetune" / "smollm2-instruct-generator",
    _EXPERIMENTS / "pretrain" / "smollm2-wiki-generator",
]
DEFAULT_GENERATOR = next((g for g in _GENERATORS if g.is_dir()), _GENERATORS[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--generator", type=Path, default=DEFAULT_GENERATOR, help="trained generator folder"
    )
    parser.add_argument(
        "--fact-docs", type=int, default=4, help="documents about fictional entities"
    )
    parser.add_argument(
        "--wiki-docs", type=int, default=12, help="Wikipedia summaries mixed into the stream"
    )
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from genadapter import GenerativeAdapter, GeneratorConfig
    from genadapter.assets import DEFAULT_MODEL, load_wiki_summaries
    from genadapter.data.benchmarks import make_facts
    from genadapter.eval.methods import make_method
    from genadapter.eval.metrics import squad_scores

    console = Console()
    t0 = time.perf_counter()
    if (args.generator / "generator_config.json").is_file():
        ga = GenerativeAdapter.from_pretrained(args.generator)
        what = f"generator {args.generator}"
    else:
        ga = GenerativeAdapter.from_base(
            DEFAULT_MODEL, GeneratorConfig(r=32, r_in=32, layers="-10:", chunk_len=32)
        )
        what = (
            "a FRESH generator (no trained one found): B = 0, so genadapter answers = base answers"
        )
    console.print(
        f"[bold]genadapter demo[/]: {DEFAULT_MODEL} + {what} (loaded in {time.perf_counter() - t0:.1f}s)"
    )

    episode = make_facts(
        "test", 1, docs_per_episode=args.fact_docs, seed=args.seed, n_questions=args.questions
    )[0]
    wiki = random.Random(args.seed).sample(load_wiki_summaries(), args.wiki_docs)
    stream = [f"{w['title']}: {w['extract']}" for w in wiki]
    for i, doc in enumerate(episode.context):  # the facts hide among the summaries
        stream.insert(
            min(len(stream), (i + 1) * len(stream) // (len(episode.context) + 1) + i), doc
        )

    methods = {
        name: make_method(
            name, ga.base_model, ga.tokenizer, ga=ga, max_new_tokens=args.max_new_tokens
        )
        for name in ("base", "prompt", "genadapter")
    }
    handles, cost = {}, Table(title=f"adapting to a stream of {len(stream)} documents")
    for col in ("method", "adapt time", "memory for the context", "context tokens"):
        cost.add_column(col, justify="right")
    n_tokens = sum(len(ga.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in stream)
    with torch.no_grad():
        for name, method in methods.items():
            t = time.perf_counter()
            handles[name] = method.adapt(stream)
            handles[name].stats["adapt_seconds"] = time.perf_counter() - t
    answers = Table(title="questions about the fictional documents", show_lines=True)
    answers.add_column("question / gold")
    for name in methods:
        answers.add_column(name)
    totals = {name: [0.0, 0.0, 0.0] for name in methods}  # F1, answer NLL, seconds
    for qa in episode.qas:
        cells = []
        for name, h in handles.items():
            t = time.perf_counter()
            try:
                text = h.answer(qa.question)
                nll = h.answer_nll(qa.question, qa.answers[0])
            except Exception as e:  # e.g. the prompt does not fit the window
                cells.append(f"[red]{type(e).__name__}: {e}[/]")
                continue
            dt = time.perf_counter() - t
            f1 = squad_scores(text, qa.answers)["f1"]
            for k, v in enumerate((f1, nll, dt)):
                totals[name][k] += v / len(episode.qas)
            cells.append(f"{text}\n[dim]F1 {f1:.2f} · answer NLL {nll:.2f} · {dt:.1f}s[/]")
        answers.add_row(f"{qa.question}\n[green]{qa.answers[0]}[/]", *cells)
    console.print(answers)
    for name, h in handles.items():
        s = h.stats
        memory = (
            f"state {s.get('state_bytes', 0):,} B"
            if name == "genadapter"
            else f"KV cache {s.get('kv_cache_bytes', 0):,} B"
        )
        cost.add_row(
            name,
            f"{s['adapt_seconds']:.1f}s",
            memory if name != "base" else "-",
            str(n_tokens) if name != "base" else "0",
        )
    console.print(cost)
    summary = Table(title="means over the questions")
    for col in ("method", "F1", "answer NLL (nats/token)", "answer time"):
        summary.add_column(col, justify="right")
    for name, (f1, nll, dt) in totals.items():
        summary.add_row(name, f"{f1:.2f}", f"{nll:.2f}", f"{dt:.1f}s")
    console.print(summary)
    console.print(
        "[dim]answer NLL: teacher-forced loss of the gold answer; lower means the knowledge got in, "
        "even when the wording of a small model's free answer is off.[/]"
    )
    return 0
