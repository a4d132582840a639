"""The main job on the embedded default (`make demo`): stream fictional-fact documents and
Wikipedia summaries into a state with SmolLM2 and the committed generator, then ask questions
about them, base / prompt / genadapter side by side with timings and memory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from genadapter.assets import default_generator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--generator", type=Path, default=default_generator(), help="saved generator folder"
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


def load_adapter(generator: Path):
    """The trained generator, or a fresh one (B = 0: its answers are the base model's)."""
    from genadapter import GenerativeAdapter, GeneratorConfig
    from genadapter.assets import DEFAULT_MODEL

    if (generator / "generator_config.json").is_file():
        return GenerativeAdapter.from_pretrained(generator), f"generator {generator}"
    config = GeneratorConfig(r=32, r_in=32, layers="-10:", chunk_len=32)
    what = "a FRESH generator (no trained one found): B = 0, so genadapter answers = base answers"
    return GenerativeAdapter.from_base(DEFAULT_MODEL, config), what


def answer_table(handles: dict, qas: list) -> tuple[Table, dict[str, list[float]]]:
    """Each method's answer, F1, answer NLL and time per question, and their means."""
    from genadapter.eval.metrics import squad_scores

    table = Table(title="questions about the fictional documents", show_lines=True)
    table.add_column("question / gold")
    for name in handles:
        table.add_column(name)
    totals = {name: [0.0, 0.0, 0.0] for name in handles}  # F1, answer NLL, seconds
    for qa in qas:
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
                totals[name][k] += v / len(qas)
            cells.append(f"{text}\n[dim]F1 {f1:.2f} · answer NLL {nll:.2f} · {dt:.1f}s[/]")
        table.add_row(f"{qa.question}\n[green]{qa.answers[0]}[/]", *cells)
    return table, totals


def cost_table(handles: dict, n_docs: int, n_tokens: int) -> Table:
    table = Table(title=f"adapting to a stream of {n_docs} documents")
    for col in ("method", "adapt time", "memory for the context", "context tokens"):
        table.add_column(col, justify="right")
    for name, h in handles.items():
        s = h.stats
        if name == "base":
            memory, tokens = "-", "0"
        elif name == "genadapter":
            memory, tokens = f"state {s.get('state_bytes', 0):,} B", str(n_tokens)
        else:
            memory, tokens = f"KV cache {s.get('kv_cache_bytes', 0):,} B", str(n_tokens)
        table.add_row(name, f"{s['adapt_seconds']:.1f}s", memory, tokens)
    return table


def summary_table(totals: dict[str, list[float]]) -> Table:
    table = Table(title="means over the questions")
    for col in ("method", "F1", "answer NLL (nats/token)", "answer time"):
        table.add_column(col, justify="right")
    for name, (f1, nll, dt) in totals.items():
        table.add_row(name, f"{f1:.2f}", f"{nll:.2f}", f"{dt:.1f}s")
    return table


def run(args: argparse.Namespace) -> int:
    import torch

    from genadapter.assets import DEFAULT_MODEL
    from genadapter.data.benchmarks import make_facts
    from genadapter.data.corpus import among_wikipedia
    from genadapter.eval.methods import make_method

    console = Console()
    t0 = time.perf_counter()
    ga, what = load_adapter(args.generator)
    console.print(
        f"[bold]genadapter demo[/]: {DEFAULT_MODEL} + {what} (loaded in {time.perf_counter() - t0:.1f}s)"
    )
    episode = make_facts(
        "test", 1, docs_per_episode=args.fact_docs, seed=args.seed, n_questions=args.questions
    )[0]
    stream = among_wikipedia(episode.context, args.wiki_docs, args.seed)
    handles = {}
    with torch.no_grad():
        for name in ("base", "prompt", "genadapter"):
            method = make_method(
                name, ga.base_model, ga.tokenizer, ga=ga, max_new_tokens=args.max_new_tokens
            )
            t = time.perf_counter()
            handles[name] = method.adapt(stream)
            handles[name].stats["adapt_seconds"] = time.perf_counter() - t
    answers, totals = answer_table(handles, episode.qas)
    console.print(answers)
    n_tokens = sum(len(ga.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in stream)
    console.print(cost_table(handles, len(stream), n_tokens))
    console.print(summary_table(totals))
    console.print(
        "[dim]answer NLL: teacher-forced loss of the gold answer; lower means the knowledge got in, "
        "even when the wording of a small model's free answer is off.[/]"
    )
    return 0
