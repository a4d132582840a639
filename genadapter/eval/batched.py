"""Scoring and greedy answering of many rows at once: an episode's questions share one context
(in the prompt, a state or trained weights), so they run as one batch.

`score_rows` runs the longest token prefix all rows share once (for prompt methods: the whole
context) and packs the rest of every row into one sequence that reads its KV cache;
`generate_rows` runs the prompts' shared prefix once too, then decodes every row together. A
`PrefixCache` carries that prefix from one call to the next (answering, then scoring). Both give
the results of running the rows one at a time, up to float rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from genadapter.compat import cache_argument
from genadapter.eval.metrics import log_softmax, target_logprobs

MIN_SHARED = 16  # a shorter shared prefix is not worth a separate forward
# tokens per scoring forward: packed rows count their own tokens; padded rows (no custom masks)
# count the shared prefix once per row too, as each extends its own copy of the prefix's KV
# cache, and on a CPU copying it for many rows costs more than a forward saves
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


class PrefixCache:
    """The KV cache of the last shared prefix one model ran, for the next call that shares it
    (an episode's greedy answers and its scoring run the same context once). Use one per model
    and weights: a cache is only valid for the weights that made it."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.cache = None

    def get(self, model: nn.Module, prefix: list[int], device: torch.device):
        """A cache holding exactly `prefix`: the one kept, grown by the rest of `prefix` if it
        starts it, else a new one. Callers extend copies of it, never it."""
        n = len(self.ids)
        if self.cache is None or self.ids != prefix[:n] or n > len(prefix):
            self.cache = prefix_cache(model, prefix, device)
        elif n < len(prefix):
            self.cache = prefix_cache(model, prefix[n:], device, self.cache, start=n)
        self.ids = list(prefix)
        return self.cache


def packs_rows(model: nn.Module) -> bool:
    """Whether the model takes a custom 4D attention mask (eager and SDPA attention do; flash
    attention does not): then rows are packed into one sequence instead of padded."""
    return getattr(model.config, "_attn_implementation", "eager") in ("eager", "sdpa")


@torch.no_grad()
def score_rows(
    model: nn.Module,
    rows: list[tuple[list[int], int]],
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    prefixes: PrefixCache | None = None,
    rows_apart: bool = False,
) -> list[Tensor]:
    """Log-probabilities of the last `n_target` tokens of each row `(ids, n_target)` under
    teacher forcing, computed for all rows together: the prefix every row shares runs once,
    the rest of the rows follow it packed into one sequence (`packed_logprobs`).

    `rows_apart`: every row runs whole, right-padded, with no shared prefix or packing (for
    side paths that read a row's positions, like pooled queries)."""
    if any(not 0 < n < len(ids) for ids, n in rows):
        raise ValueError("every row needs 0 < n_target < its length")
    if not rows:
        return []
    ids_list = [ids for ids, _ in rows]
    # every suffix keeps a prompt token, so each target is predicted inside its suffix
    shared = shared_prefix_length(ids_list, min(len(i) - n for i, n in rows) - 1)
    shared = shared if len(rows) > 1 and shared >= MIN_SHARED and not rows_apart else 0
    device = next(model.parameters()).device
    cache = (prefixes or PrefixCache()).get(model, ids_list[0][:shared], device) if shared else None
    suffixes = [(ids[shared:], n) for ids, n in rows]
    out: list[Tensor | None] = [None] * len(rows)
    packed = packs_rows(model) and not rows_apart
    for group in _batches([len(s) for s, _ in suffixes], max_batch_tokens, 0 if packed else shared):
        chosen = [suffixes[i] for i in group]
        if packed:
            scored = packed_logprobs(model, chosen, shared, cache, device)
        else:
            scored = padded_logprobs(model, chosen, shared, cache, device)
        for i, lp in zip(group, scored, strict=True):
            out[i] = lp.cpu()
    return out


def prefix_tree(rows: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """The rows as a tree of tokens, each prefix once: every node's token and parent (-1 at a
    root), and each row's path of nodes. Options of one question share its prompt's nodes."""
    tokens, parents, paths, index = [], [], [], {}
    for row in rows:
        node, path = -1, []
        for t in row:
            if (node, t) not in index:
                index[node, t] = len(tokens)
                tokens.append(t)
                parents.append(node)
            node = index[node, t]
            path.append(node)
        paths.append(path)
    return tokens, parents, paths


def packed_logprobs(
    model: nn.Module, rows: list[tuple[list[int], int]], shared: int, cache, device
) -> list[Tensor]:
    """Target log-probs of rows `(suffix, n_target)` that follow `shared` cached prefix tokens,
    their tokens packed as one sequence of batch 1, every prefix the rows share once
    (`prefix_tree`): a 4D mask lets each token see the cached prefix and its own ancestors only,
    so the prefix's cache is copied once, not once per row, and a question's options read its
    prompt once."""
    tokens, parents, paths = prefix_tree([s for s, _ in rows])
    sees = torch.eye(len(tokens), dtype=torch.bool)
    depth = torch.zeros(len(tokens), dtype=torch.long)
    for i, parent in enumerate(parents):  # parents come first: a node sees what its parent sees
        if parent >= 0:
            sees[i] |= sees[parent]
            depth[i] = depth[parent] + 1
    sees = torch.cat([sees.new_ones(len(tokens), shared), sees], 1)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill(~sees, torch.finfo(dtype).min)
    # the node before each target token predicts it; keep the logits of those nodes only
    before = [
        path[len(path) - n - 1 : len(path) - 1] for path, (_, n) in zip(paths, rows, strict=True)
    ]
    keep = sorted({i for b in before for i in b})
    at = {node: j for j, node in enumerate(keep)}
    kwargs = {cache_argument(model): copy.deepcopy(cache)} if cache is not None else {}
    logits = model(
        input_ids=torch.tensor([tokens], device=device),
        attention_mask=mask[None, None].to(device),
        position_ids=(shared + depth)[None].to(device),
        use_cache=cache is not None,
        logits_to_keep=torch.tensor(keep, device=device),
        **kwargs,
    ).logits[0]
    lp = log_softmax(logits)
    return [lp[[at[i] for i in b], s[len(s) - n :]] for b, (s, n) in zip(before, rows, strict=True)]


def padded_logprobs(
    model: nn.Module, rows: list[tuple[list[int], int]], shared: int, cache, device
) -> list[Tensor]:
    """What `packed_logprobs` gives, for attention that takes no custom mask: right-padded
    rows, each extending its own copy of the prefix's cache (`suffix_logits`)."""
    logits = suffix_logits(model, [s for s, _ in rows], shared, cache, device)
    return [
        target_logprobs(logits[j : j + 1, : len(s)], torch.tensor([s], device=device), n)
        for j, (s, n) in enumerate(rows)
    ]


def prefix_cache(
    model: nn.Module, prefix: list[int], device: torch.device, cache=None, start: int = 0
):
    """The KV cache of one shared prefix, for `suffix_logits` to extend; given `cache` (of the
    `start` tokens before `prefix`), that cache grown by `prefix`."""
    kwargs = {} if cache is None else {cache_argument(model): cache}
    out = model(
        input_ids=torch.tensor([prefix], device=device),
        position_ids=torch.arange(start, start + len(prefix), device=device)[None],
        use_cache=True,
        logits_to_keep=1,
        **kwargs,
    )
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
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: list[int],
    pad_id: int,
    prefixes: PrefixCache | None = None,
    rows_apart: bool = False,
) -> list[list[int]]:
    """Greedy continuations (new token ids, up to and without the stop token) of each prompt,
    decoded together. The longest prefix all prompts share (for prompt methods: the context)
    runs once and its KV cache serves every row; the rest of each prompt follows it
    left-padded (masked out, positions explicit), so every row's last token ends the batch.
    `rows_apart`: no shared prefix, each prompt runs whole (as `score_rows`)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    shared = shared_prefix_length(prompts, min(len(p) for p in prompts) - 1)
    shared = shared if len(prompts) > 1 and shared >= MIN_SHARED and not rows_apart else 0
    R, cache_name = len(prompts), cache_argument(model)
    cache = None
    if shared:
        cache = copy.deepcopy((prefixes or PrefixCache()).get(model, prompts[0][:shared], device))
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
