"""The main job on the embedded default: stream documents into a state with SmolLM2 and report."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", type=Path, default=None, help="trained generator folder")
    parser.add_argument("--documents", type=int, default=40, help="Wikipedia summaries to stream")
    parser.add_argument("--chunk-len", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from genadapter import GenerativeAdapter, GeneratorConfig
    from genadapter.assets import DEFAULT_MODEL, load_wiki_summaries

    console = Console()
    t0 = time.perf_counter()
    if args.generator is not None:
        ga = GenerativeAdapter.from_pretrained(args.generator)
        what = f"trained generator {args.generator}"
    else:
        ga = GenerativeAdapter.from_base(
            DEFAULT_MODEL, GeneratorConfig(r=32, r_in=32, layers="-10:")
        )
        what = "fresh (untrained) generator: B = 0, so the state changes nothing yet"
    if args.chunk_len:
        ga.config.chunk_len = args.chunk_len
    console.print(
        f"[bold]genadapter demo[/] — {DEFAULT_MODEL} loaded in {time.perf_counter() - t0:.1f}s; {what}"
    )
    docs = [d["extract"] for d in load_wiki_summaries()[: args.documents]]
    state, tokens, t_read = ga.new_state(), 0, 0.0
    for doc in tqdm(docs, desc="reading", unit="doc"):
        t = time.perf_counter()
        state = ga.read(doc, state)
        t_read += time.perf_counter() - t
    tokens = int(state.n.item())
    with tempfile.TemporaryDirectory() as tmp:
        ga.export_lora(state, tmp)
        import json

        rank = json.loads((Path(tmp) / "adapter_config.json").read_text())["r"]
    table = Table(title="stream read into one state")
    for col in ("documents", "tokens", "tokens/s", "state bytes", "LoRA rank", "adapted modules"):
        table.add_column(col, justify="right")
    table.add_row(str(len(docs)), str(tokens), f"{tokens / t_read:.0f}", f"{state.nbytes:,}",
                  str(rank), str(len(ga.generator.targets)))  # fmt: skip
    console.print(table)
    return 0
