"""Lightning checkpoints as one safetensors file: tensors in the body, everything else as JSON in
its header. Nothing is ever unpickled (the Lightning default is torch.save / pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

HEADER_KEY = "genadapter_checkpoint"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able tree; tensors replaced by references, non-string dict keys and tuples tagged."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, path), _encode(v, tensors, f"{path}.{k}")]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, path) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, path) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(
        f"checkpoint entry {path} of type {type(obj).__name__} cannot be stored without pickle"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


class SafetensorsCheckpointIO(CheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        header = json.dumps(_encode(checkpoint, tensors, "checkpoint"))
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={HEADER_KEY: header})
        os.replace(tmp, path)  # a crash never leaves a half-written checkpoint under the real name

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        device = "cpu" if map_location is None or callable(map_location) else str(map_location)
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            if HEADER_KEY not in meta:
                raise ValueError(f"{path} is not a genadapter checkpoint (no {HEADER_KEY} header)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return _decode(json.loads(meta[HEADER_KEY]), tensors)

    def remove_checkpoint(self, path: str | Path) -> None:
        Path(path).unlink(missing_ok=True)
