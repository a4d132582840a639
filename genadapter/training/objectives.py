"""Training objectives (docs/method.md): self-supervised completion and reconstruction, and the
answer loss of instruction tuning; batched, no Python loop over chunks.

Contexts arrive as chunks (D documents or episodes, T chunks, C tokens). One frozen no-grad pass
reads every real chunk on its own, exactly as `GenerativeAdapter.read` does (`chunk_writes`);
the per-chunk statistics carry gradients into the generator and are summed per row (a prefix
sum for pretraining targets, the whole context for an episode); then ONE adapted forward runs
every target row with its own state. Losses and probes that look inside the state (retrieval,
write gates, oracle writes) live in `probes.py`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genadapter.chunking import pad, real_chunks, scatter_chunks
from genadapter.compat import cache_argument
from genadapter.devices import to_device
from genadapter.eval.batched import prefix_cache, shared_prefix_length, suffix_logits
from genadapter.eval.metrics import log_softmax
from genadapter.generator import Writes
from genadapter.model import GenerativeAdapter
from genadapter.state import AdapterState


def chunk_writes(
    ga: GenerativeAdapter,
    input_ids: Tensor,
    mask: Tensor,
    weight: Tensor | None = None,
    host_mask: Tensor | None = None,
) -> Writes:
    """What each chunk of (D, T, C) `input_ids` writes: S (D, T, r_in, r) and n (D, T) per chunk,
    keys (D, T * C, r_in) and gate logits (D, T * C) per token. Padding chunks cost nothing
    and write zeros. `weight` (D, T, C): per-token write weights (`Generator.write`).
    `host_mask`: a CPU copy of `mask`, so that finding the real chunks never waits for the device."""
    D, T, C = input_ids.shape
    where = real_chunks(mask if host_mask is None else host_mask)
    where = to_device(where, input_ids.device)
    flat = [x.flatten(0, 1)[where] if x is not None else None for x in (input_ids, mask, weight)]
    writes = ga.read_chunks(*flat, mask_attention=False)  # right-padded chunks
    where = where.to(ga.device)

    def per_chunk(x: Tensor) -> Tensor:
        return scatter_chunks(x, where, D, T)

    def per_token(x: Tensor) -> Tensor:
        return per_chunk(x).flatten(1, 2)

    return Writes(
        S={k: per_chunk(s) for k, s in writes.S.items()},
        n=per_chunk(writes.n),
        keys={k: per_token(x) for k, x in writes.keys.items()},
        gate_logits={k: per_token(x) for k, x in writes.gate_logits.items()},
    )


def token_losses(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed next-token loss and token count over positions whose target is real."""
    R, L, V = logits.shape  # flat (rows*positions, vocab) is the fast layout for cross_entropy
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), reduction="none"
    )
    m = mask[:, 1:].to(nll.dtype)
    return (nll.view(R, L - 1) * m).sum(1), m.sum(1)


def row_losses(
    model, ids: Tensor, attention_mask: Tensor | None, target_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """`token_losses` of `model` run on right-padded rows, scoring the tokens of `target_mask`."""
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    return token_losses(logits, ids, target_mask)


def mean_per_token(loss_sum: Tensor, n_tok: Tensor) -> Tensor:
    return loss_sum.sum() / n_tok.sum().clamp(min=1)


# ------------------------------------------------------------------------------- pretraining


@dataclass
class Targets:
    """Rows of the adapted pass: which document / chunk each row predicts, with which prefix."""

    doc: Tensor  # (R,)
    chunk: Tensor  # (R,) target chunk index
    prefix: Tensor  # (R,) the state covers chunks [0, prefix)
    completion: Tensor  # (R,) bool: completion row (else reconstruction)

    def split(self, device: torch.device) -> dict[str, Tensor]:
        """{objective: row selector}."""
        comp = self.completion.to(device)
        return {"completion": comp, "reconstruction": ~comp}


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


# the generator of a state made and used within one training step (`adapted(check=False)`):
# fingerprinting it would hash K and V on the host every step
STEP_STATE = "made within a training step"


def target_state(ga: GenerativeAdapter, writes: Writes, t: Targets) -> AdapterState:
    """Each row's state: the sum of its document's chunks [0, prefix) (a prefix sum over chunks)."""
    dev = writes.n.device
    doc, last = to_device(t.doc, dev), to_device(t.prefix - 1, dev)
    S = {name: s.cumsum(1)[doc, last] for name, s in writes.S.items()}
    n = writes.n.cumsum(1)[doc, last]
    return AdapterState(S, n, STEP_STATE, ga.config.to_dict())


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
    host_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Losses (mean per target token) of both objectives; the mixed `loss` carries gradients.

    Targets are planned on the host from `host_mask` (a CPU copy of `mask`; made here if not
    given, which waits for the device once): the step then runs without a device sync."""
    input_ids, mask = to_device(input_ids, ga.device), to_device(mask, ga.device)
    host_mask = mask.cpu() if host_mask is None else host_mask
    writes = chunk_writes(ga, input_ids, mask, host_mask=host_mask)
    t = sample_targets(host_mask, per_doc, completion_weight, generator)
    doc, chunk = to_device(t.doc, ga.device), to_device(t.chunk, ga.device)
    rows_ids, rows_mask = input_ids[doc, chunk], mask[doc, chunk]
    # target chunks are right-padded: no attention mask needed (none to check on the device)
    with ga.adapted(target_state(ga, writes, t), check=False):
        loss_sum, n_tok = row_losses(ga.base_model, rows_ids, None, rows_mask)
    # row selectors as 0/1 weights (boolean indexing would wait for the device to count rows)
    parts = {
        k: to_device(sel.to(loss_sum.dtype), ga.device)
        for k, sel in t.split(torch.device("cpu")).items()
        if sel.any()
    }
    out: dict[str, Tensor] = {}
    for key, sel in parts.items():
        out[f"{key}/loss_adapted"] = mean_per_token(loss_sum * sel, n_tok * sel)
        out[f"{key}/tokens"] = (n_tok * sel).sum()
    weight = {"completion": completion_weight, "reconstruction": 1 - completion_weight}
    out["loss"] = sum(weight[k] * out[f"{k}/loss_adapted"] for k in parts)
    if with_base:
        with torch.no_grad():
            base_sum, _ = row_losses(ga.base_model, rows_ids, None, rows_mask)
        out.update(
            {f"{k}/loss_base": mean_per_token(base_sum * s, n_tok * s) for k, s in parts.items()}
        )
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
    rows = zip(t.doc.tolist(), t.chunk.tolist(), t.prefix.tolist(), strict=True)
    for r, (d, j, p) in enumerate(rows):
        context = input_ids[d, :p][mask[d, :p].bool()]
        target = input_ids[d, j][mask[d, j].bool()]
        if max_len is None or len(context) + len(target) <= max_len:
            seqs.append(torch.cat([context, target]))
            tmask.append(torch.cat([torch.zeros_like(context), torch.ones_like(target)]))
            keep.append(r)
    if not seqs:
        return {}
    ids, attn = pad(seqs)
    tgt, _ = pad(tmask)
    # score exactly the target tokens the other losses score (the first one has no in-chunk history)
    tgt[torch.arange(len(seqs)), tgt.argmax(1)] = 0
    loss_sum, n_tok = row_losses(ga.base_model, ids, attn, tgt)
    out: dict[str, Tensor] = {}
    for key, sel in t.split(ga.device).items():
        sel = sel[torch.tensor(keep, device=sel.device)]
        if sel.any():
            out[f"{key}/loss_prompt"] = mean_per_token(loss_sum[sel], n_tok[sel])
            out[f"{key}/prompt_rows"] = sel.sum().float()
    return out


# ----------------------------------------------------------------------------- instruction tuning


def episode_state(ga: GenerativeAdapter, writes: Writes, row_episode: Tensor) -> AdapterState:
    """Each answer row's state: the sum over every chunk of its episode's context."""
    rows = row_episode.to(writes.n.device)
    S = {name: s.sum(1)[rows] for name, s in writes.S.items()}
    return AdapterState(S, writes.n.sum(1)[rows], STEP_STATE, ga.config.to_dict())


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


@dataclass
class Continuations:
    """What `continuation_losses` computed: per continuation its summed NLL `loss_sum`, token
    count `n_tok` and `logits` (N, L, V), position j predicting its token j; the prompt pass's
    `queries`; with `prompt_logits` = P > 0, `prompt_logits` (prompts, P, V), position i
    predicting the prompt's token -(P - i) (left padding: positions past a prompt's start are
    meaningless)."""

    loss_sum: Tensor
    n_tok: Tensor
    logits: Tensor
    queries: dict[str, Tensor]
    prompt_logits: Tensor | None = None


def continuation_losses(
    ga: GenerativeAdapter,
    prompts: list[Tensor],
    continuations: list[Tensor],
    owner: Tensor,
    prompt_state: AdapterState | None,
    continuation_state: AdapterState | None,
    keep_queries: bool = False,
    prompt_logits: int = 0,
) -> Continuations:
    """The NLL of each continuation after its prompt `prompts[owner[i]]`, and with
    `keep_queries` the prompt pass's queries (`GenerativeAdapter.adapted`; position -1 is each
    prompt's last token), with `prompt_logits` the logits at the prompts' last positions.

    Each prompt runs once (left-padded, with its positions counted from its first real token,
    so the result equals an unpadded run); its KV cache is then copied to every continuation
    that follows it: the candidates of a question cost their own few tokens, not the prompt's.
    States None run the frozen base."""
    base, cache_name = ga.base_model, cache_argument(ga.base_model)
    prompt_ids, prompt_mask = pad(prompts, left=True)
    windows = ga.query_windows()  # pooled queries: the prompts' windows reach the continuations
    with (
        ga.adapted(prompt_state, keep_queries, check=False, windows=windows)
        if prompt_state is not None
        else nullcontext({})
    ) as queries:
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        out = base(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=prompt_logits + 1,
        )
    cache = getattr(out, cache_name)
    cache.batch_select_indices(owner)
    if windows is not None:
        windows.select(owner)
    ids, mask = pad(continuations)
    positions = prompt_mask.sum(1)[owner, None] + torch.arange(ids.shape[1], device=ids.device)
    with (
        ga.adapted(continuation_state, check=False, windows=windows)
        if continuation_state is not None
        else nullcontext()
    ):
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
    return Continuations(
        (nll.view_as(m) * m).sum(1),
        m.sum(1),
        logits,
        queries,
        out.logits[:, :-1] if prompt_logits else None,
    )


@dataclass
class AnswerTrace:
    """What the answer pass saw, for the probes: the context's writes and the queries of each
    question's prompt ({target: (R, s, r_in)}, position -1 its last token)."""

    writes: Writes
    queries: dict[str, Tensor]


def answer_losses(
    ga: GenerativeAdapter,
    batch: dict[str, Tensor],
    with_base: bool = False,
    with_ranking: bool = True,
    trace: bool = False,
    distill: str | None = None,
) -> dict:
    """Answer-token loss of QA rows whose state is read from their episode's context.

    batch (`instruct_data.collate_episodes`): `context_ids`, `context_mask` (E, T, C),
    `input_ids`, `attention_mask`, `loss_mask` (R rows: prompt + answer), `row_episode` (R,),
    optionally `context_write` (E, T, C) per-token write weights (`probes.oracle_writes`).
    `loss` is the mean per answer token, `row_loss` the mean per row. With candidates in the
    batch (`cand_ids`, `cand_mask`, `cand_row`) and `with_ranking`, each question also scores
    its candidates after its prompt (mean log-prob per token, as evaluation ranks options):
    `rank_loss`, `rank_correct`, `rank_group` (`rank_candidates`) and `cand_scores`.
    With `distill` (a span of `DISTILL_SPANS`) and context prompts in the batch (`prompt_*`),
    `distill_loss` is the KL from the prompted teacher (`distill_losses`).
    With `trace`, `trace` holds an AnswerTrace."""
    dev = ga.device
    context_write = batch.get("context_write")
    writes = chunk_writes(
        ga, batch["context_ids"].to(dev), batch["context_mask"].to(dev), context_write
    )
    episode = batch["row_episode"].to(dev)
    prompts, answers = split_rows(
        *(batch[k].to(dev) for k in ("input_ids", "attention_mask", "loss_mask"))
    )
    R = len(answers)
    continuations, owner = list(answers), torch.arange(R, device=dev)
    ranking = with_ranking and "cand_row" in batch
    if ranking:
        cand_row = batch["cand_row"].to(dev)
        pairs = zip(batch["cand_ids"], batch["cand_mask"].bool(), strict=True)
        continuations += [ids[m].to(dev) for ids, m in pairs]
        owner = torch.cat([owner, cand_row])
    states = (episode_state(ga, writes, episode), episode_state(ga, writes, episode[owner]))
    teacher = None
    if distill is not None and len(batch.get("prompt_rows", ())):
        teacher = teacher_rows(batch, prompts, answers, distill)
    passed = continuation_losses(
        ga,
        prompts,
        continuations,
        owner,
        *states,
        keep_queries=trace,
        prompt_logits=int(teacher.n_question.max()) if teacher is not None else 0,
    )
    loss_sum, n_tok, queries = passed.loss_sum, passed.n_tok, passed.queries
    mean = loss_sum / n_tok.clamp(min=1)
    out: dict = {"loss": mean_per_token(loss_sum[:R], n_tok[:R]), "tokens": n_tok[:R].sum()}
    out["row_loss"] = mean[:R]
    if ranking:
        out["cand_scores"] = -mean[R:]
        out.update(rank_candidates(out["cand_scores"], cand_row))
    if with_base:
        with torch.no_grad():
            base = continuation_losses(ga, prompts, answers, owner[:R], None, None)
        out["row_loss_base"] = base.loss_sum / n_tok[:R].clamp(min=1)
    if teacher is not None:
        out.update(distill_losses(ga, teacher, passed, answers))
    if trace:
        out["trace"] = AnswerTrace(writes, queries)
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
    rows = torch.repeat_interleave(torch.arange(len(ids), device=group.device), sizes)
    table[rows, slot] = scores
    gold = torch.zeros(len(ids), dtype=torch.long, device=group.device)
    return {
        "rank_loss": F.cross_entropy(table, gold),
        "rank_correct": (table.argmax(1) == 0).float(),
        "rank_group": ids,
    }


# ----------------------------------------------------------------------------- context distillation

DISTILL_SPANS = ("answer", "question")  # KL on the answer tokens / on the question's too


@torch.no_grad()
def teacher_logits(
    model: torch.nn.Module, seqs: list[Tensor], start: Tensor, width: int, group: Tensor
) -> Tensor:
    """Logits (N, width, V) of the frozen LM on each sequence at positions `start` to
    `start + width - 1` (zeros past its end). Rows of one `group` (an episode's context
    prompts) share a prefix: it runs once and its KV cache serves them all."""
    out = None
    for g in group.unique().tolist():
        rows = (group == g).nonzero().flatten().tolist()
        ids = [seqs[i].tolist() for i in rows]
        first = min(int(start[i]) for i in rows)
        shared = shared_prefix_length(ids, first) if len(rows) > 1 else 0
        device = seqs[0].device
        cache = prefix_cache(model, ids[0][:shared], device) if shared else None
        logits = suffix_logits(model, [x[shared:] for x in ids], shared, cache, device)
        if out is None:
            out = logits.new_zeros(len(seqs), width, logits.shape[-1])
        for j, i in enumerate(rows):
            a = int(start[i]) - shared
            b = min(a + width, len(ids[j]) - shared)
            out[i, : b - a] = logits[j, a:b]
    return out


def shared_suffix(a: Tensor, b: Tensor) -> int:
    """How many last tokens two prompts share: the question and the chat template after it."""
    n = min(len(a), len(b))
    differ = (a[len(a) - n :] != b[len(b) - n :]).flip(0).nonzero()
    return n if not len(differ) else int(differ[0])


@dataclass
class TeacherRows:
    """The distilled answer rows: `rows` their indices, `seqs` the teacher's context prompt +
    answer of each, `prompt_len` its prompt's length, `n_question` how many of its prompt's
    last tokens are scored too, `episode` its episode (the rows of one share a context)."""

    rows: Tensor
    seqs: list[Tensor]
    n_question: Tensor
    prompt_len: Tensor
    episode: Tensor


def teacher_rows(
    batch: dict[str, Tensor], prompts: list[Tensor], answers: list[Tensor], span: str
) -> TeacherRows:
    """The rows with a context prompt (`prompt_*`, those that fit its window); with span
    "question" each scores the tokens both prompts end with (the question, the chat template
    after it) besides its answer."""
    if span not in DISTILL_SPANS:
        raise ValueError(f"distill span must be one of {DISTILL_SPANS}, got {span!r}")
    dev = prompts[0].device
    rows = batch["prompt_rows"].to(dev)
    teacher_prompts, teacher_answers = split_rows(
        *(batch[f"prompt_{k}"].to(dev) for k in ("input_ids", "attention_mask", "loss_mask"))
    )
    seqs, n_question = [], []
    for r, tp, ta in zip(rows.tolist(), teacher_prompts, teacher_answers, strict=True):
        if not torch.equal(answers[r], ta):
            raise ValueError(f"row {r}: the context prompt's answer differs from the row's")
        question = shared_suffix(prompts[r], tp) if span == "question" else 0
        seqs.append(torch.cat([tp, ta]))
        n_question.append(min(question, len(prompts[r]) - 1))
    lengths = torch.tensor([len(p) for p in teacher_prompts], device=dev)
    episode = batch["row_episode"].to(dev)[rows]
    return TeacherRows(rows, seqs, torch.tensor(n_question, device=dev), lengths, episode)


def distill_losses(
    ga: GenerativeAdapter, teacher: TeacherRows, student: Continuations, answers: list[Tensor]
) -> dict[str, Tensor]:
    """Context distillation: KL(teacher || adapted) of the next-token distributions, where the
    teacher is the frozen LM with the context in its prompt and the student the answer pass
    (`student`: the LM with the episode's state and the question alone), on every answer token
    and the `teacher.n_question` prompt tokens before it. `distill_loss` is the mean per
    scored token; `distill_row_kl` / `distill_row_tokens` the sum and count of each row;
    `teacher_row_loss` the teacher's mean NLL of each row's answer (the prompt's answer loss,
    free from the same logits)."""
    rows, q = teacher.rows, teacher.n_question
    n_answer = torch.tensor([len(answers[r]) for r in rows.tolist()], device=rows.device)
    P, L = student.prompt_logits.shape[1] if q.max() > 0 else 0, int(n_answer.max())
    pred = student.logits[rows, :L]
    if P:
        pred = torch.cat([student.prompt_logits[rows], pred], 1)
    # index k predicts token k - P of the answer (k < P: the prompt's token -(P - k))
    m = P + L
    start = teacher.prompt_len - P - 1
    target = teacher_logits(ga.base_model, teacher.seqs, start, m, teacher.episode)
    j = torch.arange(m, device=rows.device)
    scored = (j[None] >= P - q[:, None]) & (j[None] < P + n_answer[:, None])
    kl = F.kl_div(log_softmax(pred), log_softmax(target), log_target=True, reduction="none")
    kl = kl.sum(-1) * scored
    gold = pad([answers[r] for r in rows.tolist()])[0]
    nll = -log_softmax(target[:, P:]).gather(-1, gold[..., None]).squeeze(-1)
    nll = nll * (j[None, :L] < n_answer[:, None])
    return {
        "distill_loss": kl.sum() / scored.sum(),
        "distill_row_kl": kl.sum(1),
        "distill_row_tokens": q + n_answer,
        "teacher_row_loss": nll.sum(1) / n_answer,
    }
