"""`genadapter chat`: a multi-turn conversation with a state applied, in the base LM's chat
template. Commands: /quit (or end of input), /reset (forget the conversation, keep the state),
/state, /help. Works with stdin piped: one user turn per line.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

import torch

from .common import add_generator_arguments, cli_errors, describe, load_adapter, load_state

HELP = "/quit: leave   /reset: forget the conversation (the state stays)   /state: state info"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generator_arguments(parser)
    parser.add_argument("--state", help="state file (omitted: the base model alone)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--system", default=None, help="system prompt (default: the template's)")


def prompt_ids(tokenizer, messages: list[dict[str, str]], budget: int) -> torch.Tensor:
    """The conversation in the chat template, oldest turns dropped to fit `budget` tokens."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while True:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                system + turns, tokenize=False, add_generation_prompt=True
            )
        else:  # a bare tokenizer: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in system + turns) + "assistant:"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget or len(turns) <= 1:
            return torch.tensor([ids[-budget:]], dtype=torch.long)
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # drop the oldest exchange


def converse(ga, state, lines: TextIO, out: TextIO, max_new_tokens: int, system: str | None) -> int:
    """The loop, on any line source (testable without a terminal). Returns the turns answered."""
    base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    window = getattr(ga.base_model.config, "max_position_embeddings", 2048)
    interactive = lines.isatty()
    turns = 0
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = list(base)
            out.write("(conversation reset)\n")
            continue
        if text == "/state":
            out.write(f"(state: {describe(state)})\n")
            continue
        if text.startswith("/"):
            out.write(f"({HELP})\n")
            continue
        messages.append({"role": "user", "content": text})
        ids = prompt_ids(ga.tokenizer, messages, max(window - max_new_tokens, 1))
        start = time.perf_counter()
        new = ga.generate(ids, state=state, max_new_tokens=max_new_tokens)
        answer = ga.tokenizer.decode(new[0], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        out.write(f"assistant> {answer}\n")
        if interactive:
            out.write(f"({time.perf_counter() - start:.1f} s)\n")
        out.flush()
        turns += 1
    return turns


@cli_errors
def run(args: argparse.Namespace) -> int:
    ga = load_adapter(args)
    state = load_state(args.state, ga) if args.state else ga.new_state()
    if sys.stdin.isatty():
        print(f"state: {describe(state)}\n{HELP}", file=sys.stderr)
    converse(ga, state, sys.stdin, sys.stdout, args.max_new_tokens, args.system)
    return 0
