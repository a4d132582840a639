"""experiments/pretrain/gpu_7b.yaml, validated on the CPU: the same file, a tiny Mistral (the
7B's architecture family) and a local corpus streamed through `datasets`, 2 steps on 2 FSDP
processes. And gradient checkpointing, which that config turns on, really recomputes layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VOCAB
from safetensors.torch import load_file
from test_training import CORPUS
from transformers import AutoModelForCausalLM, MistralConfig

from genadapter.training.module import GeneratorPretraining
from genadapter.training.objectives import pretrain_losses

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "pretrain" / "gpu_7b.yaml"


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory, smollm2_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-mistral")
    cfg = MistralConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=None,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_7b_config_trains_two_steps_on_a_tiny_model_of_its_family(tmp_path, tiny_mistral):
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["trainer"]["strategy"] == "fsdp_generator"
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["model"]["base_dtype"] == "bfloat16"
    assert cfg["model"]["gradient_checkpointing"] and cfg["data"]["source"].startswith("hf:")
    words = " ".join(CORPUS).split()
    corpus = tmp_path / "corpus"  # a local dataset folder: `datasets` streams it like the hub's
    corpus.mkdir()
    rows = [{"text": " ".join(words[(i + k) % len(words)] for k in range(900))} for i in range(16)]
    (corpus / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    overrides = {
        "run_dir": tmp_path / "run",
        "model.base_model": tiny_mistral,
        "model.export_dir": tmp_path / "generator",
        "data.source": f"hf:{corpus}",
        "data.hf_config": "null",
        "data.shuffle_buffer": 8,
        "data.val_percent": 0.0,
        "data.batch_size": 2,
        "data.max_chunks": 4,
        "trainer.accelerator": "cpu",
        "trainer.devices": 2,
        "trainer.max_steps": 2,
        "trainer.limit_val_batches": 0,
    }
    cmd = [sys.executable, "-m", "genadapter.cli", "pretrain", "--config", str(CONFIG)]
    cmd += [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    env = {
        **os.environ,
        "GENADAPTER_AUDIT_DIR": str(tmp_path / "audit"),
        "OMP_NUM_THREADS": "1",
        "PL_DISABLE_FORK": "1",
    }
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    audits = [json.loads((tmp_path / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert audits[0]["global_step"] == audits[1]["global_step"] == 2
    assert audits[0]["generator"] == audits[1]["generator"]
    assert not set(audits[0]["batches"]) & set(audits[1]["batches"])  # each rank its own shard
    weights = load_file(str(tmp_path / "generator" / "generator.safetensors"))
    layers = {int(k.split(".")[2]) for k in weights}
    assert layers == {0, 1} and {k.split(".")[-2] for k in weights} == {"o_proj", "down_proj"}
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith(".B"))


def test_gradient_checkpointing_recomputes_the_frozen_layers(tiny_dir):
    batch = torch.randint(0, VOCAB, (2, 3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(batch)
    grads, calls = {}, {}
    for checkpointing in (False, True):
        module = GeneratorPretraining(
            base_model=str(tiny_dir),
            generator={"r": 4, "r_in": 4, "chunk_len": 8},
            gradient_checkpointing=checkpointing,
        ).train()
        ga = module.ga
        for block in ga.generator.blocks.values():
            torch.nn.init.normal_(block.B, std=0.1)
        layer = ga._modules_by_name[f"{ga._layers_name}.0"]
        count = []
        # HF checkpoints the layer's forward: its MLP is entered again when it is recomputed
        layer.mlp.register_forward_pre_hook(lambda *_, c=count: c.append(torch.is_grad_enabled()))
        out = pretrain_losses(ga, batch, mask, 2, 0.5, torch.Generator().manual_seed(0))
        forwards = len(count)
        out["loss"].backward()
        calls[checkpointing] = len(count) - forwards  # layer forwards run by the backward
        grads[checkpointing] = [p.grad.clone() for p in ga.generator.parameters()]
        assert not any(m.training for m in layer.modules() if m is not layer)  # no dropout
    assert calls == {False: 0, True: 1}
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
