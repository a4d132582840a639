"""`genadapter export-lora`: write the adapter a state generates as a PEFT LoRA directory, for
anything that serves LoRA (`PeftModel.from_pretrained(base, DIR)`)."""

from __future__ import annotations

import argparse
import sys

from .common import add_generator_arguments, cli_errors, describe, load_adapter, load_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--state", required=True)
    parser.add_argument("-o", "--output", required=True, help="adapter directory")


@cli_errors
def run(args: argparse.Namespace) -> int:
    ga = load_adapter(args)
    state = load_state(args.state, ga)
    path = ga.export_lora(state, args.output)
    print(f"{path}: LoRA rank {ga.config.r} from {describe(state)}", file=sys.stderr)
    return 0
