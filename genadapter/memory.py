"""The memory: what a target's state sums over the context, and the matrix it is read out as.

With keys k_t (r_in), values v_t (r) and write weights w_t >= 0 (the write gate; 0 at padding)
of the tokens read:

- "linear": the state is S = sum_t w_t k_t v_t^T (r_in x r) and is read out as itself. A query q
  then reads S^T q = sum_t w_t (k_t . q) v_t: vanilla linear attention, where every token keeps
  a share of the read-out.
- "ridge": the state is [G | H] (r_in x (r + r_in)), G = sum_t w_t k_t v_t^T,
  H = sum_t w_t k_t k_t^T, read out as the least-squares memory S* = (H + lam_bar I)^-1 G: the S
  that minimises sum_t w_t |S^T k_t - v_t|^2 + lam_bar |S|^2, lam_bar = lam tr(H) / r_in
  (scale-free). A query equal to a stored key reads (close to) that key's value alone.

Both states are sums over tokens: they stream exactly, add across machines and decay
(gamma on G and H scales S* not at all: only what is read later weighs more).
"""

from __future__ import annotations

import torch
from torch import Tensor


def state_width(memory: str, r: int, r_in: int) -> int:
    """Columns of a state tensor (b, r_in, width)."""
    return r + r_in if memory == "ridge" else r


def write(weighted_keys: Tensor, values: Tensor, keys: Tensor, memory: str) -> Tensor:
    """The state of a batch of token sequences: `weighted_keys` w_t k_t and `keys` k_t
    (b, t, r_in), values (b, t, r)."""
    G = weighted_keys.transpose(1, 2) @ values
    if memory == "linear":
        return G
    return torch.cat([G, weighted_keys.transpose(1, 2) @ keys], -1)


def read_out(S: Tensor, memory: str, lam: Tensor | float) -> Tensor:
    """The memory matrix (b, r_in, r) of states S (b, r_in, width); `lam` the ridge's lambda."""
    if memory == "linear":
        return S
    return ridge_solve(S[..., : -S.shape[-2]], S[..., -S.shape[-2] :], lam)


def ridge_solve(G: Tensor, H: Tensor, lam: Tensor | float) -> Tensor:
    """S* = (H + lam_bar I)^-1 G per row, lam_bar = lam tr(H) / r_in, by Cholesky in float64
    (once per state, r_in^3: never per token). An empty row (H = 0) gives S* = 0."""
    r_in = H.shape[-1]
    H64 = H.to(torch.float64)
    trace = H64.diagonal(dim1=-2, dim2=-1).sum(-1)
    lam = torch.as_tensor(lam, dtype=torch.float64, device=H.device)
    lam_bar = torch.where(trace > 0, lam * trace / r_in, torch.ones_like(trace))
    eye = torch.eye(r_in, dtype=torch.float64, device=H.device)
    L = torch.linalg.cholesky(H64 + lam_bar[:, None, None] * eye)
    return torch.cholesky_solve(G.to(torch.float64), L).to(G.dtype)
