"""`genadapter eval`: evaluate adaptation methods on an episode file.

    genadapter eval --task qa --data data/benchmarks/facts.jsonl \\
        --methods base,prompt,genadapter,ttt-lora --out experiments/eval/out

A `--config` YAML sets any field of `EvalConfig`; flags given on the command line override it.
The resolved config is written into the results, so the run can be repeated exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genadapter.eval.harness import ALL_METHODS, TASKS, EvalConfig, run_eval
from genadapter.eval.report import write_report

# flag -> (type, help); defaults come from EvalConfig so YAML and flags share one source
FLAGS: dict[str, tuple[type, str]] = {
    "task": (str, f"one of {', '.join(TASKS)}"),
    "data": (str, "episode file(s) (JSONL), comma-separated; each is one context-length group"),
    "methods": (str, f"comma-separated, from {', '.join(ALL_METHODS)}"),
    "out": (str, "output folder for results.json, results.md and plots"),
    "model": (str, "base LM: hub id or local path (offline SmolLM2 copy preferred)"),
    "generator": (str, "trained generator folder for `genadapter` (default: untrained)"),
    "max_episodes": (int, "at most N episodes per data file"),
    "max_questions": (int, "at most N questions per episode"),
    "ttt_steps": (int, "optimisation steps of the test-time-training baselines"),
    "ttt_lr": (float, "learning rate of the test-time-training baselines"),
    "window": (int, "context budget (tokens) of prompt-window"),
    "max_new_tokens": (int, "answer length limit"),
    "seed": (int, "seed of the test-time-training initialisations"),
    "reuse": (
        str,
        "earlier results.json file(s), comma-separated: take over their records of"
        " the same method and episode under the same settings",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with EvalConfig fields")
    for name, (typ, help_text) in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=typ, default=None, help=help_text)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--one-by-one",
        dest="batch_questions",
        action="store_false",
        default=None,
        help="answer and score an episode's questions one at a time (default: as one batch)",
    )


def resolve_config(args: argparse.Namespace) -> EvalConfig:
    """YAML config (if any) overridden by the flags that were given."""
    values: dict = {}
    if args.config:
        import yaml

        values = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"{args.config}: expected a mapping of EvalConfig fields")
    for name in FLAGS:
        value = getattr(args, name)
        if value is not None:
            values[name] = value.split(",") if name in ("data", "reuse") else value
    if args.batch_questions is not None:
        values["batch_questions"] = args.batch_questions
    if not values.get("data"):
        raise SystemExit("no episode file: pass --data or set `data` in --config")
    try:
        return EvalConfig.from_dict(values)
    except ValueError as e:
        raise SystemExit(str(e)) from e


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    results = run_eval(config, progress=not args.no_progress)
    paths = write_report(results, config.out)
    for problem in results["problems"]:
        print(f"skipped: {problem}", file=sys.stderr)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    n_ok = sum(r["status"] == "ok" for r in results["records"])
    return 0 if n_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genadapter eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
