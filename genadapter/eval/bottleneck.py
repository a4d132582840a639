"""Houlsby bottleneck adapters (Houlsby et al. 2019), attached with forward hooks.

After each decoder layer's attention block and MLP block, before the residual add:

    y = f(x);  y <- y + up(act(down(y)))      down: d -> m,  up: m -> d (zero-initialised)

`up` starts at zero, so a fresh adapter is the identity and the model's outputs are exactly
the base model's. Hooks leave every base module and weight untouched; `detach()` removes
them, which restores the base model by construction.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


class BottleneckAdapter(nn.Module):
    """Down-project, nonlinearity, up-project, added to its input (identity at init)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.act = nn.GELU()
        nn.init.normal_(self.down.weight, std=dim**-0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x))).to(x.dtype)


def sublayers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention and MLP blocks of every decoder layer, matched by their last name part."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        in_layer = any(p.isdigit() for p in parts)  # inside a numbered decoder layer
        nested = any(name.startswith(f + ".") for f, _ in found)  # outermost match only
        if parts[-1] in ATTENTION_NAMES + MLP_NAMES and in_layer and not nested:
            found.append((name, module))
    if not found:
        raise ValueError("no attention/MLP blocks found to attach bottleneck adapters to")
    return found


def _add_to_output(adapter: BottleneckAdapter):
    def hook(module, args, output):
        if isinstance(output, tuple):  # attention blocks return (hidden, weights, ...)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


class HoulsbyAdapters(nn.Module):
    """A set of bottleneck adapters hooked onto a model; `detach()` takes them all off."""

    def __init__(self, model: nn.Module, bottleneck: int = 16) -> None:
        super().__init__()
        dim = model.config.hidden_size
        param = next(model.parameters())
        self.names = [name for name, _ in sublayers(model)]
        self.adapters = nn.ModuleList(
            BottleneckAdapter(dim, bottleneck).to(param.device) for _ in self.names
        )
        modules = dict(model.named_modules())
        self._handles = [
            modules[name].register_forward_hook(_add_to_output(adapter))
            for name, adapter in zip(self.names, self.adapters, strict=True)
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
