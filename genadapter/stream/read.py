"""`genadapter read`: stream documents into a state file, with progress, checkpoints and resume.

    genadapter read --generator DIR --state s.safetensors --input docs.txt
    tail -f log.jsonl | genadapter read --generator DIR --state s.safetensors --input - --format jsonl
    genadapter read --generator DIR --state s.safetensors --dataset NAME --split train --resume

Input formats (see genadapter.stream.sources): `text` (default) = documents separated by blank
lines; `lines` = one document per line; `jsonl` = one JSON object per line, text in --field.
Bad records (invalid UTF-8, malformed JSON, missing field, empty, binary, oversize) are
skipped with a counted warning. SIGINT/SIGTERM: the document at hand is finished, the state
saved, exit 0. `--resume` skips the records of this source the state has already consumed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from ..state import AdapterState
from .checkpoint import Checkpointer, GracefulStop, source_progress
from .common import (
    CLIError,
    add_generator_arguments,
    cli_errors,
    describe,
    load_adapter,
    load_state,
)
from .reader import Stats, StreamReader
from .sources import FORMATS, MAX_DOC_BYTES, Record, open_source, source_key

WARNINGS_PER_REASON = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--state", required=True, help="state file (created if missing)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="PATH", help="a file, or - for stdin")
    src.add_argument("--dataset", metavar="NAME", help="a `datasets` name, read streaming")
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        dest="fmt",
        help="text: documents separated by blank lines (default); lines: one per line; "
        "jsonl: one JSON object per line, text in --field",
    )
    parser.add_argument("--field", default="text", help="text field of jsonl/dataset records")
    parser.add_argument("--chunk-len", type=int, default=None, help="tokens per chunk read")
    parser.add_argument("--decay", type=float, default=None, help="gamma in (0, 1]")
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, metavar="N", help="save every N documents"
    )
    parser.add_argument("--resume", action="store_true", help="skip what the state already read")
    parser.add_argument("--batch-size", type=int, default=8, help="short documents per forward")
    parser.add_argument("--max-doc-bytes", type=int, default=MAX_DOC_BYTES)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class Display:
    """Progress bar (documents, tokens, tokens/s) and rate-limited warnings, on stderr."""

    def __init__(self, quiet: bool):
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(unit="doc", file=sys.stderr, disable=quiet, mininterval=0.5 if tty else 10)
        self.warned: dict[str, int] = {}

    def commit(self, state: AdapterState, stats: Stats) -> None:
        self.bar.update(stats.documents - self.bar.n)
        self.bar.set_postfix(tokens=f"{stats.tokens:,}", tok_s=f"{stats.tokens_per_s:,.0f}")

    def skip(self, record: Record) -> None:
        count = self.warned[record.reason] = self.warned.get(record.reason, 0) + 1
        if count <= WARNINGS_PER_REASON:
            tail = " (further such warnings suppressed)" if count == WARNINGS_PER_REASON else ""
            self.bar.write(
                f"warning: skipped record {record.index} ({record.reason}): {record.detail}{tail}",
                file=sys.stderr,
            )

    def close(self) -> None:
        self.bar.close()


def check_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.checkpoint_every < 0:
        raise CLIError("--batch-size must be >= 1 and --checkpoint-every >= 0")
    if args.chunk_len is not None and args.chunk_len < 1:
        raise CLIError("--chunk-len must be >= 1")
    if args.decay is not None and not 0.0 < args.decay <= 1.0:
        raise CLIError(f"--decay must be in (0, 1], got {args.decay}")


def start_position(args: argparse.Namespace, state: AdapterState, key: str) -> int:
    """How many records of the source to skip: those already read, with --resume only."""
    done = source_progress(state.metadata, key)["position"]
    if args.resume:
        print(f"resuming {key} after {done} records", file=sys.stderr)
        return done
    if done:
        print(
            f"note: {args.state} already read {done} records of {key}; reading it again from "
            "the start (use --resume to continue instead)",
            file=sys.stderr,
        )
    return 0


def print_summary(args: argparse.Namespace, reader: StreamReader, stopped_by: str | None) -> None:
    stats = reader.stats
    skipped = sum(stats.skipped.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items()))
    print(
        f"read {stats.documents:,} documents, {stats.tokens:,} tokens "
        f"({stats.tokens_per_s:,.0f} tokens/s); skipped {skipped}"
        + (f" ({reasons})" if reasons else ""),
        file=sys.stderr,
    )
    if stopped_by:
        print(f"stopped by {stopped_by}: state saved", file=sys.stderr)
    print(f"{args.state}: {describe(reader.committed)}", file=sys.stderr)


@cli_errors
def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    ga = load_adapter(args)
    if ga.tokenizer is None:
        raise CLIError("the base LM has no tokenizer: cannot read text")
    if args.chunk_len is not None:  # how text is cut; the generator's identity is unchanged
        ga.config.chunk_len = args.chunk_len
    state = load_state(args.state, ga, missing_ok=True)
    key = source_key(args.input, args.dataset, args.split, args.fmt, args.dataset_config)
    skip = start_position(args, state, key)
    source = open_source(
        args.input,
        args.dataset,
        args.split,
        args.fmt,
        args.field,
        args.dataset_config,
        skip,
        max_bytes=args.max_doc_bytes,
    )
    reader = StreamReader(ga, state, key, start=skip, decay=args.decay, batch_size=args.batch_size)
    checkpointer = Checkpointer(args.state, args.checkpoint_every)
    display = Display(args.quiet)

    def on_commit(committed: AdapterState, stats: Stats) -> None:
        display.commit(committed, stats)
        checkpointer.maybe_save(committed, stats.documents)

    with GracefulStop() as stop:

        def fetch(it: Iterator[Record]) -> Record | None:
            with stop.waiting():  # a signal while blocked on input ends the loop at once
                return next(it, None)

        try:
            reader.run(
                source.records,
                on_commit=on_commit,
                on_skip=display.skip,
                should_stop=lambda: stop.requested is not None,
                fetch=fetch,
                input_ready=source.ready,
            )
        finally:
            display.close()
        checkpointer.save(reader.committed, reader.stats.documents)  # signals: flag only here
    print_summary(args, reader, stop.requested)
    return 0
