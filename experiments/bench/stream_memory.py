"""Memory of streaming: read a stream of documents and record RSS at 10K, 100K and 1M tokens.

A state is a fixed-size sufficient statistic, so reading more must not cost more memory: the
figures should stay flat. The stream goes through the same StreamReader (batching, long-document
segments, checkpoints) as `genadapter read`. Documents: the offline Wikipedia summaries, cycled.

    python experiments/bench/stream_memory.py               # tiny random Llama, 1M tokens
    python experiments/bench/stream_memory.py --smollm2     # SmolLM2-135M, 100K tokens

Results are merged into experiments/bench/results/stream_memory.json under "tiny"/"smollm2".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402

from genadapter import GenerativeAdapter, GeneratorConfig  # noqa: E402
from genadapter.assets import DEFAULT_MODEL, load_base_model, load_wiki_summaries  # noqa: E402
from genadapter.stream.checkpoint import Checkpointer  # noqa: E402
from genadapter.stream.reader import StreamReader  # noqa: E402
from genadapter.stream.sources import Record  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "stream_memory.json"
MiB = 2**20


def rss() -> float:
    return psutil.Process().memory_info().rss / MiB


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(smollm2: bool) -> GenerativeAdapter:
    torch.manual_seed(0)
    if smollm2:
        return GenerativeAdapter.from_base(DEFAULT_MODEL, GeneratorConfig(layers="upper_half"))
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tokenizer = load_base_model(DEFAULT_MODEL)  # only its tokenizer: a real vocabulary
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    return GenerativeAdapter.from_base(model, GeneratorConfig(), tokenizer=tokenizer)


def documents() -> itertools.cycle:
    rows = load_wiki_summaries()
    return itertools.cycle([f"{r['title']}\n\n{r['extract']}" for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="the real 135M model")
    parser.add_argument("--tokens", type=int, default=None, help="default: 1M tiny, 100K smollm2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more only slows a tiny model)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="the JSON file results merge into"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = args.tokens or (100_000 if args.smollm2 else 1_000_000)
    marks = [m for m in (1_000, 10_000, 100_000, 1_000_000) if m <= total]

    ga = build(args.smollm2)
    docs = documents()
    records = (Record(i, next(docs)) for i in itertools.count())
    loaded = {"rss_mib": round(rss(), 1), "peak_rss_mib": round(peak_rss(), 1)}
    figures: dict[str, dict] = {}
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = Checkpointer(Path(tmp) / "state.safetensors", args.checkpoint_every)

        def on_commit(state, stats) -> None:
            checkpointer.maybe_save(state, stats.documents)
            while marks and stats.tokens >= marks[0]:
                mark = marks.pop(0)
                figures[f"{mark:,}"] = {
                    "tokens": stats.tokens,
                    "documents": stats.documents,
                    "rss_mib": round(rss(), 1),
                    "peak_rss_mib": round(peak_rss(), 1),
                    "seconds": round(time.perf_counter() - start, 1),
                    "tokens_per_s": round(stats.tokens_per_s),
                }
                print(f"{mark:>9,} tokens: {figures[f'{mark:,}']}", flush=True)

        reader = StreamReader(ga, ga.new_state(), "bench", batch_size=args.batch_size)
        state = reader.run(records, on_commit=on_commit, should_stop=lambda: not marks)
        checkpoints = checkpointer.saves

    rows = list(figures.values())
    result = {
        "model": DEFAULT_MODEL if args.smollm2 else "tiny random llama (hidden 32, 3 layers)",
        "generator": {k: v for k, v in ga.config.to_dict().items() if k != "extra"},
        "state_bytes": state.nbytes,
        "checkpoints_written": checkpoints,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "after_model_load": loaded,
        "at": figures,
        "peak_growth_mib_first_to_last": round(
            rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"], 1
        ),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": "python experiments/bench/stream_memory.py"
        + (" --smollm2" if args.smollm2 else "")
        + (f" --tokens {args.tokens}" if args.tokens else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    existing["smollm2" if args.smollm2 else "tiny"] = result
    args.out.write_text(json.dumps(existing, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("state_bytes", "peak_growth_mib_first_to_last")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
