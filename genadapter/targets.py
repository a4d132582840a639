"""Which linear modules of a base LM get adapters: resolved from the config's suffixes and layers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import GeneratorConfig


@dataclass(frozen=True)
class Target:
    """One adapted linear module of the base LM."""

    name: str  # full module name, e.g. "model.layers.20.self_attn.o_proj"
    layer: int  # decoder layer it lives in
    in_features: int
    out_features: int
    transposed: bool  # GPT-2's Conv1D stores W as in x out


def decoder_layers(model: nn.Module) -> tuple[str, int]:
    """Name and length of the ModuleList that holds the decoder layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, n_layers
    raise ValueError(f"cannot find the {n_layers} decoder layers of {type(model).__name__}")


def find_targets(model: nn.Module, config: GeneratorConfig) -> list[Target]:
    """Resolve the config's target suffixes and layers against a concrete model."""
    suffixes = config.resolve_targets(model.config.model_type)
    layers_name, n_layers = decoder_layers(model)
    wanted_layers = set(config.resolve_layers(n_layers))
    named = (
        ("value_layer", config.value_layer),
        ("key_layer", config.key_layer),
        ("queries.layer", config.queries.layer),
    )
    for name, layer in named:
        if layer is not None and layer >= n_layers:
            raise ValueError(f"{name} {layer} out of range for a model with {n_layers} layers")
    query_layer = config.queries.layer
    if query_layer is not None and query_layer > min(wanted_layers):
        raise ValueError(
            f"queries.layer {query_layer} is above the lowest adapted layer {min(wanted_layers)}: "
            "a query's features must be made before the targets it queries run"
        )
    pattern = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.")
    all_names = [name for name, _ in model.named_modules() if name]
    targets, matched = [], set()
    for name, module in model.named_modules():
        hit = next((s for s in suffixes if name == s or name.endswith("." + s)), None)
        layer = pattern.match(name)
        if hit is None or layer is None:
            continue
        matched.add(hit)
        if int(layer.group(1)) not in wanted_layers:
            continue
        if isinstance(module, nn.Linear):
            dims, transposed = (module.in_features, module.out_features), False
        elif isinstance(module, Conv1D):
            dims, transposed = tuple(module.weight.shape), True  # (in, out)
        else:
            raise TypeError(
                f"target {name} is a {type(module).__name__}; only nn.Linear and Conv1D are supported"
            )
        targets.append(Target(name, int(layer.group(1)), dims[0], dims[1], transposed))
    missing = [s for s in suffixes if s not in matched]
    if missing:
        leaf_names = sorted({n.split(".")[-1] for n in all_names if pattern.match(n + ".")})
        layer0 = [n for n in all_names if n.startswith(f"{layers_name}.0.")]
        raise ValueError(
            f"target modules {missing} match no module inside the decoder layers of "
            f"{type(model).__name__}. Module names in layer 0: {layer0}. Leaf names: {leaf_names}"
        )
    return targets
