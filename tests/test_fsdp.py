"""Two-process FSDP on the CPU (gloo): the same generator as DDP, and exact sharded resume.

`trainer.strategy: fsdp_generator` (genadapter/training/distributed.py) shards every decoder
layer of the frozen LM and the generator with its AdamW state; its checkpoints are one
safetensors file per rank plus the run's metadata, never pickle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import CORPUS, config

from genadapter.training.checkpoint_io import SafetensorsCheckpointIO

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def distinct(tmp_path_factory) -> Path:
    """Every document different, so that each rank reads its own."""
    words = " ".join(CORPUS).split()
    rows = [
        {"text": f"entry {i}: " + " ".join(words[(7 * i + k) % len(words)] for k in range(14))}
        for i in range(60)
    ]
    path = tmp_path_factory.mktemp("distinct") / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def run(tmp_path: Path, tiny_dir: Path, corpus: Path, strategy: str, *extra: str) -> Path:
    """`genadapter pretrain` on 2 CPU processes; returns the exported generator folder."""
    cfg = config(
        tmp_path,
        tiny_dir,
        corpus,
        trainer__devices=2,
        trainer__strategy=strategy,
        trainer__max_steps=STEPS,
        model__decay_steps=STEPS,
        model__export_dir=str(tmp_path / "generator"),
        checkpoint={"save_last": False, "every_n_train_steps": 2, "save_top_k": -1},
    )
    env = {
        **os.environ,
        "GENADAPTER_AUDIT_DIR": str(tmp_path / "audit"),
        "OMP_NUM_THREADS": "1",
        "PL_DISABLE_FORK": "1",
    }
    cmd = [sys.executable, "-m", "genadapter.cli", "pretrain", "--config", str(cfg), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    audits = [json.loads((tmp_path / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert audits[0]["global_step"] == audits[1]["global_step"] == STEPS
    assert audits[0]["generator"] == audits[1]["generator"]  # both ranks hold the same whole
    return tmp_path / "generator"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "generator.safetensors"))


def test_fsdp_matches_ddp_and_resumes_a_sharded_checkpoint(tmp_path, tiny_dir, distinct):
    ddp = weights(run(tmp_path / "ddp", tiny_dir, distinct, "ddp"))
    fsdp = weights(run(tmp_path / "fsdp", tiny_dir, distinct, "fsdp_generator"))
    assert ddp.keys() == fsdp.keys()
    for k, v in ddp.items():
        torch.testing.assert_close(fsdp[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(v.abs().sum() > 0 for k, v in fsdp.items() if k.endswith(".B"))  # it learned

    # the step-2 checkpoint: a folder of per-rank shards and metadata, safetensors only
    ckpt = next((tmp_path / "fsdp" / "run" / "checkpoints").glob("*step=2*"))
    assert ckpt.is_dir()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "meta.safetensors",
        "rank0-of-2.safetensors",
        "rank1-of-2.safetensors",
    ]
    io = SafetensorsCheckpointIO()
    shards = [io.load_checkpoint(ckpt / f"rank{r}-of-2.safetensors") for r in (0, 1)]
    for name, full in ddp.items():  # each rank holds a part of each weight, together all of it
        assert sum(s["state_dict"][name].numel() for s in shards) == full.numel()
    assert io.load_checkpoint(ckpt / "meta.safetensors")["global_step"] == 2

    resumed = run(tmp_path / "fsdp", tiny_dir, distinct, "fsdp_generator", "--ckpt_path", str(ckpt))
    for k, v in weights(resumed).items():
        assert torch.equal(v, fsdp[k]), k  # exact: the same shards, optimiser and batches
