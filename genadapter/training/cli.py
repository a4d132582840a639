"""`genadapter pretrain --config FILE.yaml`: YAML-driven pretraining with the Trainer's own settings.

The YAML has four sections: `model` (GeneratorPretraining), `data` (PretrainDataModule),
`trainer` (any plain lightning.Trainer argument: precision, strategy, devices, num_nodes,
accumulate_grad_batches, gradient_clip_val, max_steps, val_check_interval, ...) and
`checkpoint` (ModelCheckpoint). Every key can be overridden on the command line, e.g.
`--trainer.max_steps 10`. Unknown or ill-typed keys are clear errors (jsonargparse).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from genadapter.training import distributed  # noqa: F401 - registers `fsdp_generator`
from genadapter.training.checkpoint_io import SafetensorsCheckpointIO
from genadapter.training.datamodule import PretrainDataModule
from genadapter.training.module import GeneratorPretraining

TRAINER_SKIP = {"callbacks", "logger", "plugins", "profiler", "enable_checkpointing"}


def build_parser(
    prog: str = "genadapter pretrain",
    model_class: type = GeneratorPretraining,
    data_class: type = PretrainDataModule,
) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0], exit_on_error=False)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file with the sections below"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run_dir", type=str, default="runs/pretrain", help="logs and checkpoints")
    parser.add_argument(
        "--ckpt_path",
        type=str | None,
        default=None,
        help="checkpoint to resume from ('last' = newest)",
    )
    parser.add_class_arguments(model_class, "model")
    parser.add_class_arguments(data_class, "data")
    parser.add_class_arguments(L.Trainer, "trainer", skip=TRAINER_SKIP)
    parser.add_class_arguments(ModelCheckpoint, "checkpoint", skip={"dirpath"})
    return parser


def build(cfg, model_class: type = GeneratorPretraining, data_class: type = PretrainDataModule):
    """Model, datamodule and trainer from a parsed config."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    model_kw = cfg.model.as_dict()
    model_kw.setdefault("seed", cfg.seed)
    model = model_class(**model_kw)
    data_kw = cfg.data.as_dict()
    if data_kw.get("tokenizer") is None:
        data_kw["tokenizer"] = model.tokenizer_name
    data = data_class(**data_kw)
    if data.hparams.chunk_len != model.ga.config.chunk_len:  # trained chunks must be read chunks
        raise ValueError(
            f"data.chunk_len ({data.hparams.chunk_len}) differs from the generator's chunk_len "
            f"({model.ga.config.chunk_len}), the length `read` cuts context into: set them equal"
        )
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", **cfg.checkpoint.as_dict())
    trainer = L.Trainer(
        **cfg.trainer.as_dict(),
        logger=[
            CSVLogger(run_dir, name="csv", version=""),
            TensorBoardLogger(run_dir, name="tb", version=""),
        ],
        callbacks=[checkpoint, LearningRateMonitor("step")],
        plugins=[SafetensorsCheckpointIO()],
    )
    return model, data, trainer


def resolve_ckpt(ckpt_path: str | None, run_dir: str) -> str | None:
    if ckpt_path != "last":
        return ckpt_path
    found = sorted((Path(run_dir) / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def keep_metrics(csv_path: Path) -> None:
    """Lightning's CSVLogger starts its file afresh: keep the metrics of the run being resumed."""
    if csv_path.is_file():
        n = len(list(csv_path.parent.glob("metrics.before-resume-*.csv"))) + 1
        kept = csv_path.with_name(f"metrics.before-resume-{n}.csv")
        csv_path.rename(kept)
        print(f"resuming: earlier metrics kept in {kept}", file=sys.stderr)


def main(
    argv: list[str] | None = None,
    prog: str = "genadapter pretrain",
    model_class: type = GeneratorPretraining,
    data_class: type = PretrainDataModule,
) -> int:
    parser = build_parser(prog, model_class, data_class)
    try:
        cfg = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except Exception as e:  # jsonargparse explains malformed configs; show it without a traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        model, data, trainer = build(cfg, model_class, data_class)
    except (FileNotFoundError, ValueError) as e:  # missing corpus / episode file, bad setting
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    parser.save(cfg, Path(cfg.run_dir) / "config.yaml", overwrite=True, skip_check=True)
    ckpt = resolve_ckpt(cfg.ckpt_path, cfg.run_dir)
    if ckpt is not None:
        keep_metrics(Path(cfg.run_dir) / "csv" / "metrics.csv")
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
