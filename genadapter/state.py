"""AdapterState: the fixed-size sufficient statistic of everything a generator has read.

One row per batch entry. States of the same generator add up (`a + b` is the state of both
streams), decay, and save to safetensors with JSON metadata (never pickle).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "genadapter-state/1"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` a temporary file beside `path` (mode 0600), fsync it, rename it over `path`,
    fsync the folder: a crash at any point leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateMismatchError(ValueError):
    """A state used with a generator it was not read by."""


@dataclass
class AdapterState:
    S: dict[str, Tensor]  # module name -> (batch, r_in, r); a ridge memory: [G | H], r + r_in
    n: Tensor  # (batch,) tokens read per row (decayed along with S)
    generator: str  # fingerprint of the generator that read it
    config: dict[str, Any] = field(default_factory=dict)  # that generator's GeneratorConfig
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form JSON (sources read, ...)

    def __post_init__(self) -> None:
        b = self.n.shape[0] if self.n.dim() == 1 else None
        for name, s in self.S.items():
            if b is None or s.dim() != 3 or s.shape[0] != b:
                raise ValueError(
                    f"state tensor {name} has shape {tuple(s.shape)}, n {tuple(self.n.shape)}"
                )

    # --- shape and bookkeeping --------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.n.shape[0]

    @property
    def nbytes(self) -> int:
        return self.n.nbytes + sum(s.nbytes for s in self.S.values())

    @property
    def device(self) -> torch.device:
        return self.n.device

    def is_empty(self) -> Tensor:
        """(batch,) bool: rows that have read nothing."""
        return self.n == 0

    def _like(self, S: dict[str, Tensor], n: Tensor, metadata: dict | None = None) -> AdapterState:
        meta = dict(self.metadata) if metadata is None else metadata
        return AdapterState(S, n, self.generator, dict(self.config), meta)

    def _check_compatible(self, other: AdapterState) -> None:
        if not isinstance(other, AdapterState):
            raise TypeError(f"cannot combine AdapterState with {type(other).__name__}")
        if other.generator != self.generator:
            raise StateMismatchError(
                f"states of different generators: {self.generator} vs {other.generator}"
            )
        if other.batch_size != self.batch_size:
            raise ValueError(f"batch sizes differ: {self.batch_size} vs {other.batch_size}")

    # --- algebra ----------------------------------------------------------------------------
    def __add__(self, other: AdapterState) -> AdapterState:
        """The state of both streams (sums are order-free); metadata is dropped."""
        self._check_compatible(other)
        S = {k: s + other.S[k] for k, s in self.S.items()}
        return self._like(S, self.n + other.n, metadata={})

    def sum(self) -> AdapterState:
        """One row: the state of all rows' streams read one after another (sums are order-free)."""
        S = {k: s.sum(0, keepdim=True) for k, s in self.S.items()}
        return self._like(S, self.n.sum(0, keepdim=True), metadata={})

    def decay(self, gamma: float) -> AdapterState:
        """Fade what was read so far: S <- gamma S (and n alike)."""
        if not 0.0 < float(gamma) <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {gamma}")
        return self._like({k: s * gamma for k, s in self.S.items()}, self.n * gamma)

    def select(self, rows: int | list[int] | Tensor) -> AdapterState:
        """Rows of the batch (an int keeps the batch dimension)."""
        idx = torch.as_tensor([rows] if isinstance(rows, int) else rows, dtype=torch.long)
        if idx.numel() and (idx.min() < -self.batch_size or idx.max() >= self.batch_size):
            raise IndexError(f"rows {idx.tolist()} out of range for batch size {self.batch_size}")
        idx = idx.to(self.device)
        return self._like({k: s[idx] for k, s in self.S.items()}, self.n[idx])

    @staticmethod
    def stack(states: list[AdapterState]) -> AdapterState:
        """Concatenate states along the batch: rows with different states run together."""
        if not states:
            raise ValueError("nothing to stack")
        first = states[0]
        for s in states[1:]:
            if s.generator != first.generator:
                raise StateMismatchError(
                    f"states of different generators: {first.generator} vs {s.generator}"
                )
        S = {k: torch.cat([s.S[k] for s in states]) for k in first.S}
        return first._like(S, torch.cat([s.n for s in states]), metadata={})

    def repeat(self, times: int) -> AdapterState:
        """Each row repeated `times` times in place (as HF generate expands a batch)."""
        S = {k: s.repeat_interleave(times, 0) for k, s in self.S.items()}
        return self._like(S, self.n.repeat_interleave(times, 0))

    def to(self, device: torch.device | str) -> AdapterState:
        return self._like({k: s.to(device) for k, s in self.S.items()}, self.n.to(device))

    def detach(self) -> AdapterState:
        return self._like({k: s.detach() for k, s in self.S.items()}, self.n.detach())

    def clone(self) -> AdapterState:
        return self._like({k: s.clone() for k, s in self.S.items()}, self.n.clone())

    def equal(self, other: AdapterState) -> bool:
        """Bit-exact equality of tensors and identity."""
        return (
            other.generator == self.generator
            and other.S.keys() == self.S.keys()
            and torch.equal(self.n, other.n)
            and all(torch.equal(s, other.S[k]) for k, s in self.S.items())
        )

    # --- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Atomic write: temporary file in the same folder, fsync, rename. The old file survives a crash."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"S/{k}": s.detach().contiguous().cpu() for k, s in self.S.items()}
        tensors["n"] = self.n.detach().contiguous().cpu()
        header = {
            "format": FORMAT,
            "generator": self.generator,
            "config": self.config,
            "metadata": self.metadata,
            "names": list(self.S),
        }
        atomic_write(
            path, lambda tmp: save_file(tensors, tmp, metadata={"genadapter": json.dumps(header)})
        )

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> AdapterState:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no state file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                header = json.loads((f.metadata() or {}).get("genadapter", "null"))
                if not isinstance(header, dict) or header.get("format") != FORMAT:
                    raise ValueError("missing genadapter header")
                S = {k: f.get_tensor(f"S/{k}") for k in header["names"]}
                n = f.get_tensor("n")
        except Exception as e:
            raise ValueError(f"{path} is not a genadapter state file ({e})") from e
        return cls(S, n, header["generator"], header.get("config", {}), header.get("metadata", {}))
