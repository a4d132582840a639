"""`genadapter` command line: one subcommand per module, imported only when used.

Each command module exposes `add_arguments(parser)` and `run(args) -> int | None`, or, when it
parses its own arguments (YAML-driven commands), `main(argv) -> int | None`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "genadapter.demo",
        "read a document stream with the default model and answer questions",
    ),
    "pretrain": (
        "genadapter.training.cli",
        "self-supervised pretraining of a generator (--config FILE.yaml)",
    ),
    "finetune": (
        "genadapter.training.finetune",
        "instruction tuning of a generator on QA episodes (--config FILE.yaml)",
    ),
    "export-checkpoint": (
        "genadapter.training.export",
        "write a training checkpoint's generator as a from_pretrained folder",
    ),
    "eval": ("genadapter.eval.cli", "evaluate adaptation methods on an episode file"),
    "make-benchmarks": (
        "genadapter.data.benchmarks.make",
        "generate the built-in benchmarks into data/benchmarks/",
    ),
    "read": ("genadapter.stream.read", "stream documents (file, stdin, dataset) into a state file"),
    "ask": ("genadapter.stream.ask", "answer a question with a state applied"),
    "chat": ("genadapter.stream.chat", "multi-turn chat with a state applied"),
    "merge-states": ("genadapter.stream.merge", "sum states of one generator into one"),
    "export-lora": ("genadapter.stream.export", "write a state's adapter as a PEFT LoRA directory"),
    "serve": (
        "genadapter.serve",
        "OpenAI-compatible service: one generated adapter per API key (docs/serving.md)",
    ),
    "keys": ("genadapter.serve.keys", "add or revoke the API key of a tenant of `serve`"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genadapter", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the chosen subcommand's parser so `genadapter X` never imports every module.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in COMMANDS:
        parser = argparse.ArgumentParser(
            prog=f"genadapter {chosen}", description=COMMANDS[chosen][1]
        )
        module = importlib.import_module(COMMANDS[chosen][0])
        rest = list(argv)
        rest.remove(chosen)
        if hasattr(module, "main"):
            return int(module.main(rest) or 0)
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(rest)) or 0)
    build_parser().parse_args(argv)  # prints usage / errors for unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
