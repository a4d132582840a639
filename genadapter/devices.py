"""Moving host tensors to the compute device without making the host wait.

A blocking host->device copy (`.to("cuda")` from pageable memory) synchronises the stream; in a
loop that runs per chunk or per step it stalls the GPU every time. Host tensors go through
pinned memory with `non_blocking=True` instead (the caching host allocator keeps the pinned
buffer alive until the copy has run). On the CPU this is a plain `.to`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """`t` on `device`; a CPU tensor bound for CUDA is copied asynchronously from pinned memory."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
