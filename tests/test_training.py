"""Pretraining on tiny random models: what learns, what stays frozen, DDP, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model

from genadapter import GenerativeAdapter
from genadapter.training.checkpoint_io import SafetensorsCheckpointIO
from genadapter.training.cli import build, build_parser
from genadapter.training.datamodule import ChunkedBatches, PretrainDataModule, cut_document
from genadapter.training.module import gap_closed

CORPUS = [
    "the red fox jumps over the lazy dog near the old mill by the river bank today",
    "seven silver swans swim slowly south while the winter wind whistles in the reeds",
    "a quiet library holds many dusty books about ancient kings and forgotten wars",
    "the baker wakes at four to knead the dough and light the big stone oven early",
    "mountain goats climb the steep cliffs looking for salt licks and tender grass",
    "the captain steered the ship through the storm with a broken compass and a map",
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    # each document repeated 6 times: short, memorisable; validation reuses training text by design
    rows = [{"text": d} for d in CORPUS for _ in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def config(tmp_path: Path, tiny_dir: Path, corpus: Path, **over) -> dict:
    cfg = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "model": {
            "base_model": str(tiny_dir),
            "generator": {"r": 8, "r_in": 8, "chunk_len": 4},
            "lr": 0.01,
            "warmup_steps": 2,
            "targets_per_doc": 3,
        },
        "data": {
            "source": str(corpus),
            "chunk_len": 4,
            "max_chunks": 5,
            "min_chunks": 3,
            "batch_size": 2,
            "val_documents": 4,
            "val_batch_size": 2,
            "val_percent": 30.0,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "check_val_every_n_epoch": None,
        },
        "checkpoint": {"save_last": True, "every_n_train_steps": 2, "save_top_k": -1},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg_path: Path, *extra: str):
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(cfg_path), *extra])
    model, data, trainer = build(cfg)
    ckpt = cfg.ckpt_path
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    return model, trainer


def test_only_generator_learns_and_base_is_unchanged(tmp_path, tiny_dir, corpus_file):
    model, _ = fit(config(tmp_path, tiny_dir, corpus_file))
    ga = model.ga
    fresh = tiny_model(
        "llama", vocab=ga.vocab_size, init_range=0.5
    )  # same seed: the weights the run started from
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ga.base_model.state_dict().items())
    assert all(p.grad is None for p in ga.base_model.parameters())
    assert not any(p.requires_grad for p in ga.base_model.parameters())
    assert all(p.grad is not None for p in ga.generator.parameters())
    assert any(
        b.B.abs().sum() > 0 for b in ga.generator.blocks.values()
    )  # B left zero-init: it learned


def test_reconstruction_learns_a_memorisable_corpus(tmp_path, tiny_dir, corpus_file):
    cfg = config(
        tmp_path,
        tiny_dir,
        corpus_file,
        trainer__max_steps=50,
        trainer__limit_val_batches=1.0,
        trainer__val_check_interval=50,
        model__completion_weight=0.0,
        data__val_source=str(corpus_file),
        model__lr=0.02,
        model__min_lr_ratio=1.0,
        model__generator={"r": 16, "r_in": 16, "chunk_len": 4},
    )
    model, trainer = fit(cfg)
    m = trainer.callback_metrics
    base, adapted = (
        m["val/reconstruction/loss_base"].item(),
        m["val/reconstruction/loss_adapted"].item(),
    )
    assert adapted < 0.5 * base, (base, adapted)  # the state carried the document into the weights
    assert {
        "val/reconstruction/loss_prompt",
        "val/completion/loss_prompt",
        "val/completion/loss_base",
    } <= set(m)
    metrics_csv = Path(tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "val/reconstruction/loss_adapted" in metrics_csv and "train/loss" in metrics_csv
    assert (tmp_path / "run" / "tb").is_dir()
    # later validations reuse the frozen base's losses: the same figures as computing them afresh
    cached = trainer.validate(model, datamodule=trainer.datamodule, verbose=False)[0]
    assert model._references
    model._references.clear()
    fresh = trainer.validate(model, datamodule=trainer.datamodule, verbose=False)[0]
    assert cached.keys() == fresh.keys() and cached == pytest.approx(fresh, rel=1e-6)


def test_gap_closed():
    assert gap_closed(3.0, 2.0, 1.0) == 0.5
    assert gap_closed(3.0, 0.5, 1.0) == 1.25  # better than prompting
    assert gap_closed(3.0, 2.0, 3.5) is None  # prompting does not help: undefined


def test_resume_is_exact_and_checkpoints_hold_only_the_generator(tmp_path, tiny_dir, corpus_file):
    # the lr schedule spans 6 steps in every run; the first half stops at 3
    straight, _ = fit(
        config(tmp_path / "a", tiny_dir, corpus_file, trainer__max_steps=6, model__decay_steps=6)
    )
    first, _ = fit(
        config(
            tmp_path / "b",
            tiny_dir,
            corpus_file,
            trainer__max_steps=3,
            model__decay_steps=6,
            checkpoint={"save_last": True, "every_n_train_steps": 3},
        )
    )
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "last.ckpt"
    stored = SafetensorsCheckpointIO().load_checkpoint(ckpt)
    assert set(stored["state_dict"]) == set(first.ga.generator_state_dict())  # no frozen LM inside
    assert stored["optimizer_states"] and stored["global_step"] == 3
    resumed, _ = fit(
        config(tmp_path / "b", tiny_dir, corpus_file, trainer__max_steps=6),
        "--ckpt_path",
        str(ckpt),
    )
    for k, v in straight.ga.generator_state_dict().items():
        assert torch.equal(v, resumed.ga.generator_state_dict()[k]), k
    # the exported generator loads with from_pretrained
    out = tmp_path / "export"
    resumed.ga.save_pretrained(out)
    ga = GenerativeAdapter.from_pretrained(out, base_model=str(tiny_dir))
    assert ga.generator.fingerprint() == resumed.ga.generator.fingerprint()


def test_two_process_ddp_on_cpu(tmp_path, tiny_dir):
    distinct = (
        tmp_path / "distinct.jsonl"
    )  # every document different: overlap would mean shared reading
    words = " ".join(CORPUS).split()
    rows = [
        {"text": f"entry {i}: " + " ".join(words[(7 * i + k) % len(words)] for k in range(14))}
        for i in range(60)
    ]
    distinct.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = config(
        tmp_path,
        tiny_dir,
        distinct,
        trainer__devices=2,
        trainer__strategy="ddp",
        trainer__max_steps=3,
    )
    env = {
        **os.environ,
        "GENADAPTER_AUDIT_DIR": str(tmp_path / "audit"),
        "OMP_NUM_THREADS": "1",
        "PL_DISABLE_FORK": "1",
    }
    cmd = [sys.executable, "-m", "genadapter.cli", "pretrain", "--config", str(cfg)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "audit" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["global_step"] == r1["global_step"] == 3
    assert r0["generator"] == r1["generator"]  # DDP kept the ranks in sync
    assert len(r0["batches"]) == 3 and not set(r0["batches"]) & set(
        r1["batches"]
    )  # different documents


def test_ranks_read_disjoint_documents(smollm2_tokenizer):
    docs = [f"document {i}: " + " ".join(CORPUS[i % 6].split()[i % 5 :]) for i in range(12)]
    seen = []
    for rank in (0, 1):
        ds = ChunkedBatches(
            lambda e: docs, smollm2_tokenizer, 4, 3, 1, 1, repeat=False, rank=rank, world_size=2
        )
        seen.append({tuple(b["input_ids"].flatten().tolist()) for b in ds})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_cut_document_and_bad_config(tmp_path, tiny_dir, corpus_file):
    assert cut_document(list(range(10)), 3, 2, 2) == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9]]]
    assert cut_document(list(range(4)), 3, 4, 3) == []
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        PretrainDataModule(source=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: fast\n")
    with pytest.raises(Exception, match="lr"):
        build_parser().parse_args(["--config", str(bad)])
    bad.write_text("model:\n  no_such_option: 1\n")
    with pytest.raises(Exception, match="no_such_option"):
        build_parser().parse_args(["--config", str(bad)])
    mismatched = config(tmp_path, tiny_dir, corpus_file, data__chunk_len=8)
    with pytest.raises(ValueError, match="chunk_len"):
        build(build_parser().parse_args(["--config", str(mismatched)]))
