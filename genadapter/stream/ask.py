"""`genadapter ask`: answer one question with a state applied (answer on stdout, timing on stderr).

genadapter ask --generator DIR --state s.safetensors "Who painted the Mona Lisa?"
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import add_generator_arguments, cli_errors, describe, load_adapter, load_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--state", help="state file (omitted: the base model alone)")
    parser.add_argument("question")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--no-chat", dest="chat", action="store_false", help="plain completion, no chat template"
    )


@cli_errors
def run(args: argparse.Namespace) -> int:
    ga = load_adapter(args)
    state = load_state(args.state, ga) if args.state else ga.new_state()
    start = time.perf_counter()
    answer = ga.generate(
        args.question, state=state, max_new_tokens=args.max_new_tokens, chat=args.chat
    )
    seconds = time.perf_counter() - start
    print(answer.strip())
    print(f"[{seconds:.2f} s; state: {describe(state)}]", file=sys.stderr)
    return 0
