"""`genadapter make-benchmarks`: write the default benchmark files into data/benchmarks/.

The files are git-ignored; this script and a seed regenerate them exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from genadapter.assets import data_dir
from genadapter.data.episodes import Episode, write_episodes

from .common import count_words, estimate_tokens
from .facts import make_facts
from .persona import make_persona
from .recall import K_VALUES, make_recall
from .wiki_topic import make_wiki_topic

BENCHMARKS = ("facts", "wiki-topic", "persona", "recall")


def default_jobs(seed: int, scale: float = 1.0) -> list[tuple[str, Callable[[], list[Episode]]]]:
    """(relative path, generator) for every default file; `scale` multiplies episode counts."""

    def n(count: int) -> int:
        return max(1, round(count * scale))

    jobs: list[tuple[str, Callable[[], list[Episode]]]] = []
    for split, count in (("train", 2000), ("validation", 200), ("test", 200)):
        jobs.append(
            (f"facts/{split}.jsonl", lambda s=split, c=count: make_facts(s, n(c), seed=seed))
        )
    for name, tokens, count in (
        ("500", 500, 200),
        ("2k", 2000, 100),
        ("8k", 8000, 50),
        ("30k", 30_000, 20),
    ):
        jobs.append(
            (
                f"facts/test-{name}.jsonl",
                lambda t=tokens, c=count: make_facts("test", n(c), target_tokens=t, seed=seed),
            )
        )
    for k in (4, 16, 64):
        for split, count in (("train", 500), ("validation", 100), ("test", 100)):
            jobs.append(
                (
                    f"wiki-topic/{split}-k{k}.jsonl",
                    lambda s=split, c=count, k=k: make_wiki_topic(s, n(c), k=k, seed=seed),
                )
            )
    for split, count in (("train", 1000), ("validation", 100), ("test", 200)):
        jobs.append(
            (f"persona/{split}.jsonl", lambda s=split, c=count: make_persona(s, n(c), seed=seed))
        )
    jobs.append(
        ("persona/test-s16.jsonl", lambda: make_persona("test", n(50), n_sessions=16, seed=seed))
    )
    for split, count in (("train", 4000), ("validation", 200)):
        jobs.append(
            (f"recall/{split}.jsonl", lambda s=split, c=count: make_recall(s, n(c), seed=seed))
        )
    for k in K_VALUES:
        for split in ("validation", "test"):
            jobs.append(
                (
                    f"recall/{split}-k{k}.jsonl",
                    lambda s=split, k=k: make_recall(s, n(100), k=k, seed=seed),
                )
            )
    return jobs


def summarize(episodes: list[Episode]) -> dict:
    """Episode count, questions, mean context words and mean estimated tokens of a file."""
    texts = ["\n\n".join(e.context_texts()) for e in episodes]
    n_q = sum(len(getattr(e, "qas", None) or getattr(e, "queries", [])) for e in episodes)
    k = max(len(episodes), 1)
    return {
        "episodes": len(episodes),
        "questions": n_q,
        "mean_words": sum(map(count_words, texts)) / k,
        "mean_tokens": sum(map(estimate_tokens, texts)) / k,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: data/benchmarks)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=BENCHMARKS, default=None, help="generate one benchmark")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every episode count")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    out = args.out or data_dir() / "benchmarks"
    jobs = [
        (p, f)
        for p, f in default_jobs(args.seed, args.scale)
        if args.only in (None, p.split("/")[0])
    ]
    table = Table(title=f"benchmarks in {out} (seed {args.seed})")
    table.add_column("file", no_wrap=True)
    for col in ("episodes", "questions", "mean words", "mean tokens (est.)"):
        table.add_column(col, justify="right")
    for rel, make in tqdm(jobs, desc="make-benchmarks", unit="file"):
        episodes = make()
        write_episodes(out / rel, episodes)
        s = summarize(episodes)
        table.add_row(
            rel,
            str(s["episodes"]),
            str(s["questions"]),
            f"{s['mean_words']:.0f}",
            f"{s['mean_tokens']:.0f}",
        )
    Console(width=120).print(table)
    return 0
