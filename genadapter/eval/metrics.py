"""Scores: SQuAD exact match and token F1, option accuracy, answer NLL, and cost figures.

EM/F1 use torchmetrics' SQuAD implementation (normalisation: lower-case, drop punctuation and
articles, collapse whitespace; the max over gold answers), which runs offline.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.text import squad
from torchmetrics.functional.text.squad import _normalize_text


def squad_scores(prediction: str, answers: list[str]) -> dict[str, float]:
    """Exact match and token F1 of one prediction against its gold answers, both in [0, 1]."""
    if not answers:
        raise ValueError("at least one gold answer is needed")
    out = squad(
        [{"prediction_text": prediction, "id": "0"}],
        [{"answers": {"answer_start": [0] * len(answers), "text": list(answers)}, "id": "0"}],
    )
    return {"em": float(out["exact_match"]) / 100.0, "f1": float(out["f1"]) / 100.0}


def squad_words(text: str) -> list[str]:
    """The words SQuAD EM/F1 compare: `text` normalised as `squad_scores` normalises it."""
    return _normalize_text(text).split()


def option_accuracy(scores: list[float], options: list[str], gold: str) -> float:
    """1.0 when the best-scored option is the gold one (ties go to the first option)."""
    if len(scores) != len(options):
        raise ValueError(f"{len(scores)} scores for {len(options)} options")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return float(options[best] == gold)


def target_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, n_target: int) -> torch.Tensor:
    """Log-probabilities of the last `n_target` tokens of `input_ids` (teacher forcing).

    logits: (1, T, V) from the model on input_ids (1, T); position t predicts token t + 1.
    """
    if not 0 < n_target < input_ids.shape[1]:
        raise ValueError(f"need 0 < n_target < sequence length, got {n_target}")
    pred = log_softmax(logits[0, -n_target - 1 : -1])
    return pred.gather(-1, input_ids[0, -n_target:, None]).squeeze(-1)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the last dimension, in float32 at least (bf16 / fp16 logits)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def kv_cache_bytes(config, n_tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a full-attention KV cache holding `n_tokens` (keys and values, every layer)."""
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return 2 * n_layers * n_kv * head_dim * n_tokens * torch.tensor([], dtype=dtype).element_size()


# ---------------------------------------------------------------------- peak memory (Linux)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark, so the next peak is per method.

    Linux only (writing "5" to clear_refs); returns False where the peak cannot be reset,
    in which case `peak_rss_bytes` is the process-lifetime peak.
    """
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM), else since process start."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024
