"""What the state commands share: loading the adapter and a state, and turning errors into
one clear line on stderr with an exit code instead of a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..assets import default_generator
from ..state import AdapterState, StateMismatchError
from .checkpoint import CheckpointError


class CLIError(Exception):
    """An error the user can fix; printed as one line, exit code `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def cli_errors(run: Callable[[argparse.Namespace], int | None]) -> Callable:
    """Print known errors as `error: ...` and return an exit code (2: usage/input, 1: runtime)."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(run(args) or 0)
        except CLIError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.code
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (StateMismatchError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generator (one of; default: the committed headline one)")
    group.add_argument(
        "--generator",
        metavar="DIR",
        help="a saved generator (save_pretrained); default experiments/generators/headline",
    )
    group.add_argument(
        "--base",
        metavar="MODEL",
        help="build a fresh, untrained generator for this base LM (hub id or path); its B is "
        "zero, so its states change nothing until it is trained: for plumbing and tests",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="init seed of a --base generator (fixes its identity)"
    )


def load_adapter(args: argparse.Namespace):
    """The GenerativeAdapter named by --generator, or a fresh one for --base."""
    import torch

    from ..model import GenerativeAdapter

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury our own progress
    if args.generator is not None and args.base is not None:
        raise CLIError("give one of --generator DIR or --base MODEL, not both")
    if args.generator is None and args.base is None:
        args.generator = default_generator()
        if not args.generator.is_dir():
            raise CLIError(f"no --generator DIR or --base MODEL given, and no {args.generator}")
    if args.generator is not None:
        if not Path(args.generator).is_dir():
            raise CLIError(f"--generator {args.generator}: no such directory")
        try:
            return GenerativeAdapter.from_pretrained(args.generator)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"cannot load the generator in {args.generator}: {e}") from e
    torch.manual_seed(args.seed)  # the generator's identity is its K, V: make them reproducible
    ga = GenerativeAdapter.from_base(args.base)
    print(
        f"note: fresh untrained generator for {args.base} (seed {args.seed}); "
        "its states change nothing until it is trained",
        file=sys.stderr,
    )
    return ga


def load_state(path: str | Path, ga=None, missing_ok: bool = False) -> AdapterState:
    """A one-row state from disk, checked against `ga`'s generator (empty if missing and allowed)."""
    path = Path(path)
    if not path.exists():
        if missing_ok and ga is not None:
            return ga.new_state()
        raise CLIError(f"no state file at {path}")
    try:
        state = AdapterState.load(path)
    except ValueError as e:
        raise CLIError(str(e)) from e
    if ga is not None:
        try:
            ga.check_state(state)
        except StateMismatchError as e:
            raise CLIError(f"{path} was read by another generator: {e}") from e
    if state.batch_size != 1:
        raise CLIError(f"{path} holds {state.batch_size} rows; these commands use one-row states")
    return state


def describe(state: AdapterState) -> str:
    """One line: tokens read, documents, size, generator."""
    from .checkpoint import total_documents

    return (
        f"{float(state.n.sum()):,.0f} tokens, {total_documents(state.metadata):,} documents, "
        f"{state.nbytes / 1024:,.1f} KiB, generator {state.generator}"
    )
