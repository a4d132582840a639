"""What differs between the transformers versions this package supports, in one place."""

from __future__ import annotations

import inspect

from torch import nn


def cache_argument(model: nn.Module) -> str:
    """The forward's name for the KV cache: transformers >= 5.2x calls it `cache` (the old
    `past_key_values` warns, then goes)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
