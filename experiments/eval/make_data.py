"""Generate the small, committed episode files the eval configs in this folder read.

    .venv/bin/python experiments/eval/make_data.py

`facts` (test split) at two context lengths, counted in SmolLM2 tokens, and `wiki-topic`
(test split, 16 demonstrations). Generation is seeded, so rerunning rewrites the same files
as long as the benchmark generators are unchanged; the files are committed so that results
stay reproducible even if the generators evolve.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from genadapter.assets import smollm2_dir
from genadapter.data.benchmarks.facts import make_facts
from genadapter.data.benchmarks.wiki_topic import make_wiki_topic
from genadapter.data.episodes import write_episodes

OUT = Path(__file__).parent / "data"


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    for tokens in (256, 1024):
        episodes = make_facts("test", n_episodes=4, target_tokens=tokens, tokenizer=tokenizer)
        write_episodes(OUT / f"facts-test-{tokens}.jsonl", episodes)
    write_episodes(OUT / "wiki-topic-test-k16.jsonl", make_wiki_topic("test", 3, k=16, n_queries=6))
    for path in sorted(OUT.glob("*.jsonl")):
        print(path, sum(1 for _ in path.open()))


if __name__ == "__main__":
    main()
