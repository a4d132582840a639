"""Shared fixtures: tiny random models of several architectures, built from a config (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from genadapter.assets import is_complete, smollm2_dir

torch.set_num_threads(1)
VOCAB = 128


def tiny_config(arch: str, vocab: int = VOCAB, init_range: float = 0.02):
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_range,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=512,
            initializer_range=init_range,
            bos_token_id=0,
            eos_token_id=1,
        )
    raise ValueError(arch)


def tiny_model(
    arch: str = "llama",
    vocab: int = VOCAB,
    seed: int = 0,
    dtype=torch.float32,
    init_range: float = 0.02,
):
    """A random model; a larger init_range gives logits with range, so losses can move."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, init_range), dtype=dtype)
    return model.eval()


ARCHS = ["llama", "qwen2", "gpt2"]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if not is_complete(smollm2_dir()):
        pytest.fail(
            "offline SmolLM2 assets missing: run `make assets` (python data/fetch_assets.py)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


def randomize_generator(ga, seed: int = 0, std: float = 0.5) -> None:
    """Give B (zero at init) random values so the generator actually changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ga.generator.parameters():
            if p.dim() == 0:  # a learned ridge lambda keeps its starting value
                continue
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std / p.shape[-1] ** 0.5)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    """A saved tiny Llama with SmolLM2's tokenizer (and chat template), loadable by path."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab=len(smollm2_tokenizer), init_range=0.5).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
