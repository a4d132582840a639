"""N(S): the normalisation that turns a state of any length into a delta of fixed scale."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normalize_state(S: Tensor, n: Tensor, mode: str, top_k: int | None = None) -> Tensor:
    """N(S) for a batch of states S (b, r_in, r) with token counts n (b,). Empty rows give 0."""
    if mode == "none":
        return S / n.clamp(min=1).to(S.dtype)[:, None, None]
    norm = torch.linalg.matrix_norm(S)  # Frobenius, (b,)
    nonzero = (norm > 0)[:, None, None]
    if mode == "frobenius":
        r = S.shape[-1]
        return torch.where(nonzero, S * (math.sqrt(r) / norm.clamp(min=1e-30))[:, None, None], 0.0)
    if mode == "svd":
        if top_k is None:
            return torch.where(nonzero, PolarFactor.apply(S), 0.0)
        U, _, Vh = torch.linalg.svd(S, full_matrices=False)
        return torch.where(nonzero, U[..., :top_k] @ Vh[..., :top_k, :], 0.0)
    raise ValueError(f"unknown normalization {mode!r}")


class PolarFactor(torch.autograd.Function):
    """U V^T for S = U diag(s) V^T (batched), with a backward that stays finite.

    Autograd through `torch.linalg.svd` differentiates U and V one by one, with 1/(s_i^2 - s_j^2)
    terms that cancel in U V^T only in exact arithmetic: with repeated singular values (any
    rank-deficient state, e.g. a short context) they give inf - inf = NaN. The derivative of the
    polar factor itself only divides by s_i + s_j (and, for tall S, by s_i).
    """

    @staticmethod
    def forward(ctx, S: Tensor) -> Tensor:
        tall = S.shape[-2] >= S.shape[-1]
        U, s, Vh = torch.linalg.svd(S if tall else S.mT, full_matrices=False)
        ctx.save_for_backward(U, s, Vh)
        ctx.tall = tall
        P = U @ Vh
        return P if tall else P.mT

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        U, s, Vh = ctx.saved_tensors
        G = grad if ctx.tall else grad.mT
        tiny = torch.finfo(s.dtype).eps * s.amax(-1, keepdim=True).clamp(min=1e-30)
        s = s.clamp(min=tiny)  # null directions of a rank-deficient S get a finite, large weight
        M = U.mT @ G @ Vh.mT  # (k, k)
        inner = U @ ((M - M.mT) / (s[..., :, None] + s[..., None, :])) @ Vh
        outer = G @ Vh.mT - U @ M  # the part of G outside span(U): tall S only
        dS = inner + (outer / s[..., None, :]) @ Vh
        return dS if ctx.tall else dS.mT
