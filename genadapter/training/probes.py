"""Probes and losses that look inside the state, for diagnosis and for training its parts directly.

For a question whose last prompt token gives target m the query q = A x, the state's linear
read-out is N(S)^T q = c sum_t (k_t . q) v_t: every context token t gets the weight k_t . q.
- `retrieval_losses`: does the question's query find the tokens that spell its answer?
- `gate_losses`: does the write gate open on the tokens that spell asked answers?
- `oracle_writes`: a batch transform that lets only those tokens write (selection vs decoding).
`probe_losses` runs the answer pass once and adds the figures the settings ask for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genadapter.model import GenerativeAdapter
from genadapter.training.objectives import answer_losses

RETRIEVAL_KINDS = ("softmax", "share")
ORACLE_MODES = ("episode", "row")


def asked_tokens(batch: dict[str, Tensor]) -> Tensor:
    """(E, T, C) bool: the context tokens that spell an answer asked of their episode."""
    if "answer_context" not in batch:
        raise ValueError("this probe needs `answer_context` in the batch (facts episodes)")
    per_row = batch["answer_context"].to(batch["context_mask"].dtype)
    asked = torch.zeros_like(batch["context_mask"]).index_add_(0, batch["row_episode"], per_row)
    return asked.clamp(max=1).bool()


def oracle_writes(batch: dict[str, Tensor], mode: str) -> dict[str, Tensor]:
    """The batch with only the context tokens that spell an asked answer writing (`context_write`;
    the key windows still see every token). "episode": those of every question asked of the
    episode (the read-out has only those few facts to choose from); "row": each question reads
    its own copy of the context and only its own answer writes (nothing to choose: only the
    LM's decoding of the read-out is tested)."""
    if mode not in ORACLE_MODES:
        raise ValueError(f"oracle_writes must be one of {ORACLE_MODES} or None, got {mode!r}")
    if "answer_context" not in batch:
        raise ValueError("oracle_writes needs `answer_context` in the batch (facts episodes)")
    if mode == "row":
        rows = batch["row_episode"]
        batch = {**batch, "row_episode": torch.arange(len(rows))}
        batch.update({k: batch[k][rows] for k in ("context_ids", "context_mask")})
    return {**batch, "context_write": asked_tokens(batch).to(batch["context_mask"].dtype)}


def retrieval_losses(
    keys: dict[str, Tensor],
    queries: dict[str, Tensor],
    answer_context: Tensor,
    row_episode: Tensor,
    context_mask: Tensor,
    kind: str = "softmax",
) -> dict[str, Tensor]:
    """How well each target's query finds the answer among its episode's context keys.

    keys {name: (E, N, r_in)} per context token, queries {name: (R, r_in)} per answer row (its
    last prompt token), answer_context (R, N) the tokens that spell the row's answer,
    context_mask (E, N). Per target and row, the scores s_t = k_t . q / sqrt(r_in) over the
    episode's tokens. For the rows whose context states their answer (`retrieval_rows`),
    averaged over targets:
    - `retrieval_hit` (per row): how often the best-scored token is an answer token;
    - `retrieval_share` (per row): the answer tokens' share of sum_t |s_t|, the weight the
      linear read-out gives them (there is no softmax there);
    - `retrieval_loss` (a mean over rows too), of `kind` "softmax": -log of the softmax mass on
      the answer tokens (they must out-score the rest), or "share": -log of the share (every
      other score must also shrink towards 0, which is what the linear read-out needs)."""
    if kind not in RETRIEVAL_KINDS:
        raise ValueError(f"retrieval loss kind must be one of {RETRIEVAL_KINDS}, got {kind!r}")
    rows = answer_context.any(1)
    if not rows.any():
        return {}
    gold, episode = answer_context[rows], row_episode[rows]
    valid = context_mask.bool()[episode]
    losses, hits, shares = [], [], []
    for name, k in keys.items():
        q = queries[name][rows].to(k.dtype)
        scores = torch.einsum("rnk,rk->rn", k[episode], q) / math.sqrt(q.shape[-1])
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16: fp32 softmax
        scores = scores.masked_fill(~valid, float("-inf"))
        hits.append(gold.gather(1, scores.argmax(1, keepdim=True))[:, 0].float())
        weight = scores.masked_fill(~valid, 0.0).abs()
        share = (weight * gold).sum(1) / weight.sum(1).clamp(min=1e-30)
        shares.append(share.detach())
        if kind == "share":
            losses.append(-share.clamp(min=1e-30).log())
        else:
            gold_mass = scores.masked_fill(~gold, float("-inf")).logsumexp(1)
            losses.append(scores.logsumexp(1) - gold_mass)
    return {
        "retrieval_loss": torch.stack(losses).mean(),
        "retrieval_hit": torch.stack(hits).mean(0),
        "retrieval_share": torch.stack(shares).mean(0),
        "retrieval_rows": rows.nonzero()[:, 0],
    }


def gate_losses(
    gates: dict[str, Tensor], stated: Tensor, context_mask: Tensor
) -> dict[str, Tensor]:
    """Supervision of the write gates g_t = 2 sigmoid(z_t): the tokens that spell an asked answer
    should write, the others should not.

    gates {name: (E, N)} logits z_t per context token, stated (E, N) the answer tokens,
    context_mask (E, N). Over the episodes whose context states an answer (`gate_episodes`):
    `gate_loss`, a binary cross-entropy with both classes weighted alike (answers are a few
    per cent of the tokens), averaged over targets; `gate_on` / `gate_off` (per episode), the
    mean gate on answer tokens / on the other tokens, averaged over targets. Unasked values
    count as "off": the gate can only learn how likely a token is to be asked about."""
    real = context_mask.bool()
    on, off = stated.bool() & real, real & ~stated.bool()
    keep = on.any(1)
    if not keep.any():
        return {}
    on, off = on[keep], off[keep]
    losses, opened, closed = [], [], []
    for z in gates.values():
        z = z[keep].float()
        losses.append(F.softplus(-z[on]).mean() + F.softplus(z[off]).mean())
        g = 2 * torch.sigmoid(z.detach())
        opened.append((g * on).sum(1) / on.sum(1))
        closed.append((g * off).sum(1) / off.sum(1).clamp(min=1))
    return {
        "gate_loss": torch.stack(losses).mean(),
        "gate_on": torch.stack(opened).mean(0),
        "gate_off": torch.stack(closed).mean(0),
        "gate_episodes": keep.nonzero()[:, 0],
    }


def probe_losses(
    ga: GenerativeAdapter,
    batch: dict[str, Tensor],
    retrieval: str | None = None,
    gate: bool = False,
    **answer_kwargs,
) -> dict:
    """`answer_losses` plus, with `retrieval` (a kind) and `answer_context` in the batch, the
    `retrieval_*` figures, and with `gate` the `gate_*` figures and `gate_rows`, the first
    answer row of each of their episodes."""
    if gate and not ga.config.keys.gate:
        raise ValueError("gate supervision needs a generator with a write gate (keys.gate: true)")
    out = answer_losses(ga, batch, trace=True, **answer_kwargs)
    trace = out.pop("trace")
    dev = ga.device
    episode = batch["row_episode"].to(dev)
    context_mask = batch["context_mask"].to(dev).flatten(1)
    if retrieval is not None and "answer_context" in batch:
        last = {name: q[:, -1] for name, q in trace.queries.items()}
        answer_context = batch["answer_context"].to(dev).flatten(1)
        out.update(
            retrieval_losses(
                trace.writes.keys, last, answer_context, episode, context_mask, retrieval
            )
        )
    if gate:
        stated = asked_tokens(batch).to(dev).flatten(1)
        out.update(gate_losses(trace.writes.gate_logits, stated, context_mask))
        if "gate_episodes" in out:  # each episode's first row: where its task is found
            out["gate_rows"] = torch.searchsorted(episode, out["gate_episodes"])
    return out
