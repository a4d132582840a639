"""`genadapter merge-states A B ... -o OUT`: the state of all inputs' streams (S and n add up;
see DESIGN.md). States of different generators are refused; per-source counts add up."""

from __future__ import annotations

import argparse
import sys

from ..state import AdapterState, StateMismatchError
from .checkpoint import merge_metadata, save_checkpoint
from .common import cli_errors, describe, load_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("states", nargs="+", metavar="STATE")
    parser.add_argument("-o", "--output", required=True, help="merged state file")


def merge_states(states: list[AdapterState], names: list[str] | None = None) -> AdapterState:
    """Sum of one-row states of one generator, with combined metadata."""
    if not states:
        raise ValueError("nothing to merge")
    names = names or [f"state {i}" for i in range(len(states))]
    first = states[0]
    for name, state in zip(names[1:], states[1:], strict=True):
        if state.generator != first.generator:
            raise StateMismatchError(
                f"cannot merge states of different generators: {names[0]} was read by "
                f"generator {first.generator}, {name} by generator {state.generator}"
            )
    total = first
    for state in states[1:]:
        total = total + state
    total.metadata = merge_metadata([s.metadata for s in states])
    return total


@cli_errors
def run(args: argparse.Namespace) -> int:
    states = [load_state(path) for path in args.states]
    merged = merge_states(states, list(args.states))
    save_checkpoint(merged, args.output)
    print(f"{args.output}: {describe(merged)}", file=sys.stderr)
    return 0
