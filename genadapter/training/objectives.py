"""Self-supervised objectives (DESIGN.md): completion and reconstruction, batched.

A batch is D documents of up to T chunks of C tokens: `input_ids`, `attention_mask` (D, T, C).
One frozen no-grad pass reads every chunk on its own; per-chunk statistics are projected with
grad and prefix-summed over chunks; then ONE adapted forward runs every target chunk with its
own state (rows = completion targets + reconstruction targets). No Python loop over chunks.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genadapter.model import GenerativeAdapter
from genadapter.state import AdapterState


def chunk_statistics(
    ga: GenerativeAdapter,
    input_ids: Tensor,
    mask: Tensor,
    keys: dict[str, Tensor] | None = None,
    write: Tensor | None = None,
    gates: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-chunk state increments: {name: (D, T, r_in, r)} and token counts (D, T).
    With a `keys` dict, also fills it with every context token's key {name: (D, T * C, r_in)},
    with a `gates` dict with its write-gate logit {name: (D, T * C)}.
    `write` (D, T, C), optional: per-token write weights (`Generator.statistics`)."""
    D, T, C = input_ids.shape
    flat_ids, flat_mask = input_ids.reshape(D * T, C), mask.reshape(D * T, C)
    real = flat_mask.any(1)  # padding chunks cost nothing
    where = real.nonzero()[:, 0].to(ga.device)
    hidden = ga.context_features(flat_ids[real], flat_mask[real])
    real_mask = flat_mask[real].to(ga.device)

    def scatter(per_chunk: dict[str, Tensor]) -> dict[str, Tensor]:  # padding chunks get zeros
        return {
            name: x.new_zeros(D * T, *x.shape[1:]).index_copy(0, where, x)
            for name, x in per_chunk.items()
        }

    if write is not None:
        write = write.reshape(D * T, C)[real].to(ga.device)
    stats = scatter(ga.generator.statistics(hidden, real_mask, keys, write, gates))
    for per_token in (keys, gates):  # filled per real chunk: scattered and flattened in place
        if per_token is not None:
            per_token.update(
                {name: x.view(D, T * C, *x.shape[2:]) for name, x in scatter(per_token).items()}
            )
    return (
        {name: x.view(D, T, *x.shape[1:]) for name, x in stats.items()},
        flat_mask.sum(1).view(D, T).to(ga.generator.state_dtype).to(ga.device),
    )


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
    ga: GenerativeAdapter,
    input_ids: Tensor,
    mask: Tensor,
    per_doc: int,
    completion_weight: float,
    generator: torch.Generator,
    with_base: bool = False,
    with_prompt: bool = False,
    max_prompt_len: int | None = None,
) -> dict[str, Tensor]:
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


def split_rows(
    ids: Tensor, attention_mask: Tensor, loss_mask: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Right-padded prompt + answer rows -> (prompts, answers): the tokens before and from the
    first `loss_mask` token to the end of the row."""
    prompts, answers = [], []
    for row, attn, target in zip(ids, attention_mask.bool(), loss_mask.bool(), strict=True):
        if not target.any():
            raise ValueError("a row has no answer tokens (empty loss_mask): nothing to score")
        start, end = int(target.nonzero()[0]), int(attn.sum())
        prompts.append(row[:start])
        answers.append(row[start:end])
    return prompts, answers


def pad(seqs: list[Tensor], left: bool = False) -> tuple[Tensor, Tensor]:
    """Stack 1-D id tensors into (rows, max length) ids and mask, padded on the right or left."""
    L = max(len(s) for s in seqs)
    ids = seqs[0].new_zeros(len(seqs), L)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1
    return ids, mask


def continuation_losses(
    ga: GenerativeAdapter,
    prompts: list[Tensor],
    continuations: list[Tensor],
    owner: Tensor,
    prompt_state: AdapterState | None,
    continuation_state: AdapterState | None,
    prompt_queries: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed NLL and token count of each continuation after its prompt `prompts[owner[i]]`.

    Each prompt runs once (left-padded, with its positions counted from its first real token,
    so the result equals an unpadded run); its KV cache is then copied to every continuation
    that follows it: the candidates of a question cost their own few tokens, not the prompt's.
    States None run the frozen base. `prompt_queries` receives the prompt pass's queries
    (`GenerativeAdapter.adapted`): position -1 is each prompt's last token."""
    base = ga.base_model
    prompt_ids, prompt_mask = pad(prompts, left=True)
    with ga.adapted(prompt_state, prompt_queries) if prompt_state is not None else nullcontext():
        out = base(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            use_cache=True,
            position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
            logits_to_keep=1,
        )
    # transformers >= 5.2x names the KV cache `cache` (`past_key_values` is deprecated)
    cache_name = (
        "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    )
    cache = getattr(out, cache_name)
    cache.batch_select_indices(owner)
    ids, mask = pad(continuations)
    positions = prompt_mask.sum(1)[owner, None] + torch.arange(ids.shape[1], device=ids.device)
    with ga.adapted(continuation_state) if continuation_state is not None else nullcontext():
        logits = base(
            input_ids=ids,
            attention_mask=torch.cat([prompt_mask[owner], mask], 1),
            position_ids=positions,
            **{cache_name: cache},
        ).logits
    # the prompt's last position predicts each continuation's first token
    logits = torch.cat([out.logits[owner, -1:], logits[:, :-1]], 1)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none")
    m = mask.to(nll.dtype)
    return (nll.view_as(m) * m).sum(1), m.sum(1)


def answer_losses(
    ga: GenerativeAdapter,
    batch: dict[str, Tensor],
    with_base: bool = False,
    with_ranking: bool = True,
    with_retrieval: bool = False,
    retrieval_kind: str = "softmax",
    oracle_writes: str | None = None,
    with_gate: bool = False,
) -> dict[str, Tensor]:
    """Answer-token loss of QA rows whose state is read from their episode's context.

    batch: `context_ids`, `context_mask` (E episodes, T chunks, C), `input_ids`, `attention_mask`,
    `loss_mask` (R rows: prompt + answer; loss_mask marks the answer tokens), `row_episode` (R,).
    One frozen pass reads all contexts; one adapted pass runs the question prompts, one more
    their answers (`continuation_losses`). `loss` is the mean per answer token.
    With candidates (`cand_ids`, `cand_mask`, `cand_row`; see `collate_episodes`) and `with_ranking`, the
    second pass also scores every candidate after its question (mean log-prob per token, as
    evaluation ranks options) and adds `rank_loss`, the cross-entropy of a softmax over each
    question's candidates with the gold one as target, `rank_correct` (per question) and
    `cand_scores` (per candidate row).
    With `with_retrieval` and `answer_context` in the batch, also the `retrieval_*` figures of
    `retrieval_losses` (of `retrieval_kind`).
    `oracle_writes` (a diagnostic) lets only the context tokens that spell an asked answer write:
    "episode", those of every question asked of the episode in the batch (the read-out then has
    only those few facts to choose from); "row", each question's own answer only (it reads its
    own copy of the context: nothing to choose, only the LM's decoding of the read-out is tested).
    `with_gate` (generators with `key_gate`) adds the `gate_*` figures of `gate_losses`, and
    `gate_rows`, the first answer row of each of their episodes.
    """
    if oracle_writes not in (None, "episode", "row"):
        raise ValueError(f"oracle_writes must be 'episode', 'row' or None, got {oracle_writes!r}")
    if oracle_writes == "row":  # each row its own episode: a copy of its context
        rows = batch["row_episode"]
        batch = {**batch, "row_episode": torch.arange(len(rows))}
        batch.update({k: batch[k][rows] for k in ("context_ids", "context_mask")})
    context_mask = batch["context_mask"].to(ga.device)
    episode = batch["row_episode"].to(ga.device)
    asked = None  # (E, T, C): the context tokens that spell an answer asked of their episode
    if "answer_context" in batch:
        per_row = batch["answer_context"].to(ga.device).to(context_mask.dtype)
        asked = torch.zeros_like(context_mask).index_add_(0, episode, per_row).clamp(max=1)
    for wanted, what in ((oracle_writes, "oracle_writes"), (with_gate, "gate supervision")):
        if wanted and asked is None:
            raise ValueError(f"{what} needs `answer_context` in the batch (facts episodes)")
    if with_gate and not ga.config.key_gate:
        raise ValueError("gate supervision needs a generator with a write gate (key_gate: true)")
    retrieval = with_retrieval and asked is not None
    keys, queries = ({}, {}) if retrieval else (None, None)
    gates = {} if with_gate else None
    stats, counts = chunk_statistics(
        ga,
        batch["context_ids"].to(ga.device),
        context_mask,
        keys,
        asked if oracle_writes else None,
        gates,
    )
    rows = (batch[k].to(ga.device) for k in ("input_ids", "attention_mask", "loss_mask"))
    prompts, answers = split_rows(*rows)
    owner = torch.arange(len(prompts), device=ga.device)
    continuations = list(answers)
    ranking = with_ranking and "cand_row" in batch
    if ranking:
        cand_row = batch["cand_row"].to(ga.device)
        pairs = zip(batch["cand_ids"], batch["cand_mask"].bool(), strict=True)
        continuations += [ids[m].to(ga.device) for ids, m in pairs]
        owner = torch.cat([owner, cand_row])
    loss_sum, n_tok = continuation_losses(
        ga,
        prompts,
        continuations,
        owner,
        episode_state(ga, stats, counts, episode),
        episode_state(ga, stats, counts, episode[owner]),
        queries,
    )
    R = len(answers)
    mean = loss_sum / n_tok.clamp(min=1)
    out = {"loss": loss_sum[:R].sum() / n_tok[:R].sum().clamp(min=1)}
    out["tokens"], out["row_loss"] = n_tok[:R].sum(), mean[:R]
    if ranking:
        out["cand_scores"] = -mean[R:]
        out.update(rank_candidates(out["cand_scores"], cand_row))
    if retrieval:
        last = {name: q[:, -1] for name, q in queries.items()}
        answer_context = batch["answer_context"].to(ga.device).flatten(1)
        out.update(
            retrieval_losses(
                keys, last, answer_context, episode, context_mask.flatten(1), retrieval_kind
            )
        )
    if with_gate:
        out.update(gate_losses(gates, asked.flatten(1), context_mask.flatten(1)))
        if "gate_episodes" in out:  # each episode's first row: where its task is found
            out["gate_rows"] = torch.searchsorted(episode, out["gate_episodes"])
    if with_base:
        with torch.no_grad():
            base_sum, _ = continuation_losses(ga, prompts, answers, owner[:R], None, None)
        out["row_loss_base"] = base_sum / n_tok[:R].clamp(min=1)
    return out


def rank_candidates(scores: Tensor, group: Tensor) -> dict[str, Tensor]:
    """Softmax ranking over groups of candidate scores; `group` is sorted, gold first in each.

    Returns `rank_loss` (mean cross-entropy with the gold as target), `rank_correct` (G,) and
    `rank_group` (G,), the group ids."""
    ids, sizes = torch.unique_consecutive(group, return_counts=True)
    if (sizes < 2).any():
        raise ValueError("every question needs at least 2 candidates to rank")
    start = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(len(group), device=group.device) - start.repeat_interleave(sizes)
    table = scores.new_full((len(ids), int(sizes.max())), float("-inf"))
    table[torch.repeat_interleave(torch.arange(len(ids), device=group.device), sizes), slot] = (
        scores
    )
    gold = torch.zeros(len(ids), dtype=torch.long, device=group.device)
    return {
        "rank_loss": F.cross_entropy(table, gold),
        "rank_correct": (table.argmax(1) == 0).float(),
        "rank_group": ids,
    }


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
    context_mask (E, N). Per target and row, the scores s_t = (K h_t) . (A x) / sqrt(r_in) over
    the episode's tokens make a softmax. For the rows whose context states their answer
    (`retrieval_rows`), averaged over targets:
    - `retrieval_hit` (per row): how often the best-scored token is an answer token;
    - `retrieval_share` (per row): the answer tokens' share of sum_t |s_t|, i.e. of the weight
      the state's *linear* read-out N(S)^T A x = c sum_t s_t V h_t gives them (no softmax there);
    - `retrieval_loss` (a mean over rows too), of `kind` "softmax": -log of the softmax mass on
      the answer tokens (they must out-score the rest), or "share": -log of the share (every
      other score must also shrink towards 0, which is what the linear read-out needs).
    The loss trains the match directly; the answer loss reaches it only through the frozen LM."""
    if kind not in ("softmax", "share"):
        raise ValueError(f"retrieval loss kind must be 'softmax' or 'share', got {kind!r}")
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
