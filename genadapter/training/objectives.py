"""Self-supervised objectives (DESIGN.md): completion and reconstruction, batched.

A batch is D documents of up to T chunks of C tokens: `input_ids`, `attention_mask` (D, T, C).
One frozen no-grad pass reads every chunk on its own; per-chunk statistics are projected with
grad and prefix-summed over chunks; then ONE adapted forward runs every target chunk with its
own state (rows = completion targets + reconstruction targets). No Python loop over chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genadapter.model import GenerativeAdapter
from genadapter.state import AdapterState


def chunk_statistics(
    ga: GenerativeAdapter, input_ids: Tensor, mask: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-chunk state increments: {name: (D, T, r_in, r)} and token counts (D, T)."""
    D, T, C = input_ids.shape
    flat_ids, flat_mask = input_ids.reshape(D * T, C), mask.reshape(D * T, C)
    real = flat_mask.any(1)  # padding chunks cost nothing
    hidden = ga.context_features(flat_ids[real], flat_mask[real])
    stats = ga.generator.statistics(hidden, flat_mask[real].to(ga.device))
    out = {}
    for name, s in stats.items():
        full = s.new_zeros(D * T, *s.shape[1:])
        out[name] = full.index_copy(0, real.nonzero()[:, 0].to(s.device), s).view(
            D, T, *s.shape[1:]
        )
    return out, flat_mask.sum(1).view(D, T).to(ga.generator.state_dtype).to(ga.device)


@dataclass
class Targets:
    """Rows of the adapted pass: which document / chunk each row predicts, with which prefix."""

    doc: Tensor  # (R,)
    chunk: Tensor  # (R,) target chunk index
    prefix: Tensor  # (R,) the state covers chunks [0, prefix)
    completion: Tensor  # (R,) bool: completion row (else reconstruction)


def sample_targets(
    chunk_mask: Tensor, per_doc: int, completion_weight: float, generator: torch.Generator
) -> Targets:
    """Up to `per_doc` targets of each objective per document (an objective with weight 0 is skipped)."""
    n_chunks = chunk_mask.any(-1).sum(1).tolist()  # (D,) real chunks per document
    rows: list[tuple[int, int, int, bool]] = []
    for d, T in enumerate(n_chunks):
        if completion_weight > 0 and T >= 2:
            picks = torch.randperm(T - 1, generator=generator)[:per_doc] + 1
            rows += [(d, t, t, True) for t in sorted(picks.tolist())]
        if completion_weight < 1 and T >= 1:
            picks = torch.randperm(T, generator=generator)[:per_doc]
            rows += [(d, j, T, False) for j in sorted(picks.tolist())]
    if not rows:
        raise ValueError("no targets: documents need at least 2 chunks for completion")
    cols = list(zip(*rows, strict=True))
    return Targets(*(torch.tensor(c) for c in cols[:3]), torch.tensor(cols[3], dtype=torch.bool))


def target_state(
    ga: GenerativeAdapter, stats: dict[str, Tensor], counts: Tensor, t: Targets
) -> AdapterState:
    """Each row's state: the sum of its document's chunks [0, prefix) (a prefix sum over chunks)."""
    dev = counts.device
    doc, last = t.doc.to(dev), (t.prefix - 1).to(dev)
    S = {name: s.cumsum(1)[doc, last] for name, s in stats.items()}
    n = counts.cumsum(1)[doc, last]
    return AdapterState(S, n, ga.generator.fingerprint(), ga.config.to_dict())


def token_losses(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed next-token loss and token count over positions whose target is real."""
    R, L, V = logits.shape  # flat (rows*positions, vocab) is the fast layout for cross_entropy
    logp = F.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), reduction="none"
    )
    logp = logp.view(R, L - 1)
    m = mask[:, 1:].to(logp.dtype)
    return (logp * m).sum(1), m.sum(1)


def row_losses(
    model, ids: Tensor, attention_mask: Tensor, target_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """`token_losses` of `model` run on right-padded rows, scoring the tokens of `target_mask`."""
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    return token_losses(logits, ids, target_mask)


def pretrain_losses(
    ga: GenerativeAdapter, input_ids: Tensor, mask: Tensor, per_doc: int, completion_weight: float,
    generator: torch.Generator, with_base: bool = False, with_prompt: bool = False, max_prompt_len: int | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """Losses (mean per target token) of both objectives; the mixed `loss` carries gradients."""
    input_ids, mask = input_ids.to(ga.device), mask.to(ga.device)
    stats, counts = chunk_statistics(ga, input_ids, mask)
    t = sample_targets(mask.cpu(), per_doc, completion_weight, generator)
    rows_ids = input_ids[t.doc.to(ga.device), t.chunk.to(ga.device)]
    rows_mask = mask[t.doc.to(ga.device), t.chunk.to(ga.device)]
    state = target_state(ga, stats, counts, t)
    with ga.adapted(state):
        loss_sum, n_tok = row_losses(ga.base_model, rows_ids, rows_mask, rows_mask)
    out: dict[str, Tensor] = {}
    comp = t.completion.to(ga.device)
    parts = {"completion": comp, "reconstruction": ~comp}
    for key, sel in parts.items():
        if sel.any():
            out[f"{key}/loss_adapted"] = loss_sum[sel].sum() / n_tok[sel].sum().clamp(min=1)
            out[f"{key}/tokens"] = n_tok[sel].sum()
    w = {"completion": completion_weight, "reconstruction": 1 - completion_weight}
    out["loss"] = sum(w[k] * out[f"{k}/loss_adapted"] for k in parts if f"{k}/loss_adapted" in out)
    if with_base:
        with torch.no_grad():
            base_sum, _ = row_losses(ga.base_model, rows_ids, rows_mask, rows_mask)
        for key, sel in parts.items():
            if sel.any():
                out[f"{key}/loss_base"] = base_sum[sel].sum() / n_tok[sel].sum().clamp(min=1)
    if with_prompt:
        out.update(prompt_losses(ga, input_ids, mask, t, max_prompt_len))
    return out


@torch.no_grad()
def prompt_losses(
    ga: GenerativeAdapter, input_ids: Tensor, mask: Tensor, t: Targets, max_len: int | None
) -> dict[str, Tensor]:
    """The same target tokens with the context in the prompt instead of the state.

    Rows whose context + target does not fit `max_len` are left out; `*/prompt_rows` says how
    many fitted, and the comparison figures use only those rows."""
    seqs, tmask, keep = [], [], []
    for r, (d, j, p) in enumerate(
        zip(t.doc.tolist(), t.chunk.tolist(), t.prefix.tolist(), strict=True)
    ):
        context = input_ids[d, :p][mask[d, :p].bool()]
        target = input_ids[d, j][mask[d, j].bool()]
        if max_len is not None and len(context) + len(target) > max_len:
            continue
        seqs.append(torch.cat([context, target]))
        tmask.append(torch.cat([torch.zeros_like(context), torch.ones_like(target)]))
        keep.append(r)
    out: dict[str, Tensor] = {}
    if not seqs:
        return out
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long, device=ga.device)
    attn, tgt = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, tmask, strict=True)):
        ids[i, : len(s)], attn[i, : len(s)], tgt[i, : len(s)] = s, 1, m
    # score exactly the target tokens the other losses score (the first one has no in-chunk history)
    first = tgt.argmax(1)
    tgt[torch.arange(len(seqs)), first] = 0
    loss_sum, n_tok = row_losses(ga.base_model, ids, attn, tgt)
    comp = t.completion[keep].to(ga.device)
    for key, sel in {"completion": comp, "reconstruction": ~comp}.items():
        if sel.any():
            out[f"{key}/loss_prompt"] = loss_sum[sel].sum() / n_tok[sel].sum().clamp(min=1)
            out[f"{key}/prompt_rows"] = sel.sum().float()
    return out


# ----------------------------------------------------------------------------- instruction tuning


def episode_state(
    ga: GenerativeAdapter, stats: dict[str, Tensor], counts: Tensor, row_episode: Tensor
) -> AdapterState:
    """Each answer row's state: the sum over every chunk of its episode's context."""
    rows = row_episode.to(counts.device)
    S = {name: s.sum(1)[rows] for name, s in stats.items()}
    return AdapterState(S, counts.sum(1)[rows], ga.generator.fingerprint(), ga.config.to_dict())


def answer_losses(
    ga: GenerativeAdapter, batch: dict[str, Tensor], with_base: bool = False
) -> dict[str, Tensor]:
    """Answer-token loss of QA rows whose state is read from their episode's context.

    batch: `context_ids`, `context_mask` (E episodes, T chunks, C), `input_ids`, `attention_mask`,
    `loss_mask` (R rows: prompt + answer; loss_mask marks the answer tokens, each scored as the
    target of the position before it), `row_episode` (R,). One frozen pass reads all contexts;
    one adapted pass answers all rows. `loss` is the mean per answer token.
    """
    stats, counts = chunk_statistics(
        ga, batch["context_ids"].to(ga.device), batch["context_mask"].to(ga.device)
    )
    ids, attn = batch["input_ids"].to(ga.device), batch["attention_mask"].to(ga.device)
    target = batch["loss_mask"].to(ga.device)
    with ga.adapted(episode_state(ga, stats, counts, batch["row_episode"])):
        loss_sum, n_tok = row_losses(ga.base_model, ids, attn, target)
    out = {"loss": loss_sum.sum() / n_tok.sum().clamp(min=1), "tokens": n_tok.sum()}
    out["row_loss"] = loss_sum / n_tok.clamp(min=1)
    if with_base:
        with torch.no_grad():
            base_sum, _ = row_losses(ga.base_model, ids, attn, target)
        out["row_loss_base"] = base_sum / n_tok.clamp(min=1)
    return out
