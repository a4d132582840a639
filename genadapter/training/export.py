"""`genadapter export-checkpoint CKPT OUT_DIR`: a training checkpoint as a generator folder.

A run exports its generator when it ends (`model.export_dir`); this does the same for any
checkpoint on the way (an interrupted run, an earlier step), so `from_pretrained` can load it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genadapter.training.checkpoint_io import SafetensorsCheckpointIO


def export_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    from genadapter.training.finetune import GeneratorFinetuning

    stored = SafetensorsCheckpointIO().load_checkpoint(ckpt)
    hparams = dict(stored.get("hyper_parameters") or {})
    if not hparams:
        raise ValueError(f"{ckpt}: no hyper_parameters, not a genadapter training checkpoint")
    # the generator's shape comes from its config or from the generator it started from
    module = GeneratorFinetuning(**{**hparams, "export_dir": None})
    module.load_state_dict(stored["state_dict"])
    module.ga.save_pretrained(Path(out_dir))
    return Path(out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="a .ckpt of `genadapter pretrain` or `finetune`"
    )
    parser.add_argument("out_dir", type=Path, help="generator folder to write")


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"wrote {out} (load with GenerativeAdapter.from_pretrained)")
    return 0
