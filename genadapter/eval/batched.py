"""Scoring and greedy answering of many rows at once: an episode's questions share one context
(in the prompt, a state or trained weights), so they run as one batch.

`score_rows` runs the longest token prefix all rows share once (for prompt methods: the whole
context) and reuses its KV cache for every row; `generate_rows` does the same for the prompts,
then decodes every row together. Both give the results of running the rows one at a time, up
to float rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from genadapter.compat import cache_argument
from genadapter.eval.metrics import target_logprobs

MIN_SHARED = 16  # a shorter shared prefix is not worth a separate forward
# tokens per forward, the shared prefix counted once per row: each row extends its own copy of
# the prefix's KV cache, and on a CPU copying it for many rows costs more than a forward saves
MAX_BATCH_TOKENS = 4096


def shared_prefix_length(rows: list[list[int]], limit: int) -> int:
    """Length of the longest prefix every row starts with, at most `limit`."""
    first, n = rows[0], min(limit, *(len(r) for r in rows))
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def _batches(lengths: list[int], budget: int, shared: int = 0) -> list[list[int]]:
    """Row indices in groups of at most `budget` padded tokens, each row counting `shared`
    prefix tokens too (longest rows first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, group = [], []
    for i in order:
        if group and (len(group) + 1) * (shared + lengths[group[0]]) > budget:
            groups.append(group)
            group = []
        group.append(i)
    return [*groups, group] if group else groups


@torch.no_grad()
def score_rows(
    model: nn.Module, rows: list[tuple[list[int], int]], max_batch_tokens: int = MAX_BATCH_TOKENS
) -> list[Tensor]:
    """Log-probabilities of the last `n_target` tokens of each row `(ids, n_target)` under
    teacher forcing, computed for all rows together."""
    if any(not 0 < n < len(ids) for ids, n in rows):
        raise ValueError("every row needs 0 < n_target < its length")
    if not rows:
        return []
    ids_list = [ids for ids, _ in rows]
    # every suffix keeps a prompt token, so each target is predicted inside its suffix
    shared = shared_prefix_length(ids_list, min(len(i) - n for i, n in rows) - 1)
    shared = shared if len(rows) > 1 and shared >= MIN_SHARED else 0
    cache = None
    device = next(model.parameters()).device
    if shared:
        cache = prefix_cache(model, ids_list[0][:shared], device)
    suffixes = [ids[shared:] for ids in ids_list]
    out: list[Tensor | None] = [None] * len(rows)
    for group in _batches([len(s) for s in suffixes], max_batch_tokens, shared):
        logits = suffix_logits(model, [suffixes[i] for i in group], shared, cache, device)
        for j, i in enumerate(group):
            ids = torch.tensor([suffixes[i]], device=device)
            out[i] = target_logprobs(logits[j : j + 1, : ids.shape[1]], ids, rows[i][1]).cpu()
    return out


def prefix_cache(model: nn.Module, prefix: list[int], device: torch.device):
    """The KV cache of one shared prefix, for `suffix_logits` to extend."""
    out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    return getattr(out, cache_argument(model))


def suffix_logits(model, suffixes: list[list[int]], shared: int, cache, device) -> Tensor:
    """Logits (R, L, V) of right-padded suffixes that follow `shared` cached prefix tokens."""
    R, L = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.zeros(R, L, dtype=torch.long, device=device)
    mask = torch.zeros(R, shared + L, dtype=torch.long, device=device)
    mask[:, :shared] = 1
    for j, s in enumerate(suffixes):
        ids[j, : len(s)] = torch.tensor(s, device=device)
        mask[j, shared : shared + len(s)] = 1
    positions = torch.arange(shared, shared + L, device=device).expand(R, L)
    kwargs = {}
    if cache is not None:
        own = copy.deepcopy(cache)  # each group extends its own copy
        own.batch_repeat_interleave(R)
        kwargs[cache_argument(model)] = own
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits


@torch.no_grad()
def generate_rows(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop: list[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuations (new token ids, up to and without the stop token) of each prompt,
    decoded together. The longest prefix all prompts share (for prompt methods: the context)
    runs once and its KV cache serves every row; the rest of each prompt follows it
    left-padded (masked out, positions explicit), so every row's last token ends the batch."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    shared = shared_prefix_length(prompts, min(len(p) for p in prompts) - 1)
    shared = shared if len(prompts) > 1 and shared >= MIN_SHARED else 0
    R, cache_name = len(prompts), cache_argument(model)
    cache = None
    if shared:
        cache = prefix_cache(model, prompts[0][:shared], device)
        cache.batch_repeat_interleave(R)
    suffixes = [p[shared:] for p in prompts]
    width = max(len(s) for s in suffixes)
    ids = torch.full((R, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(R, shared + width, dtype=torch.long, device=device)
    mask[:, :shared] = 1
    for j, s in enumerate(suffixes):
        ids[j, width - len(s) :] = torch.tensor(s, device=device)
        mask[j, shared + width - len(s) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, shared:]
    stops = torch.tensor(stop or [-1], device=device)
    new = torch.empty(R, 0, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    while new.shape[1] < max_new_tokens and not bool(done.all()):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: cache},
        )
        cache = getattr(out, cache_name)
        token = out.logits[:, -1].argmax(-1).masked_fill(done, pad_id)
        new = torch.cat([new, token[:, None]], 1)
        done |= torch.isin(token, stops)
        ids, pos = token[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(R, 1)], 1)
    rows = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows
