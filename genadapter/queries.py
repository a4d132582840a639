"""Pooled queries: a target's side path queried by a window of the row, not by one token.

A LoRA's query is A x_s, the target's input at position s alone. With `QueryConfig` pooled, the
query is A h̃_s, where h̃_s is the mean of h = rms(input of decoder layer `queries.layer`) over the
row's last `window` positions (`window_mean`, padding left out): a question is matched by all of
its tokens, the way a key is made of a window of the context. A last token's features alone
match the key of the asked pair poorly; a question's mean matches it well
(experiments/diagnostics/README.md).

`PooledFeatures` makes h̃ inside the frozen LM's forwards, for one `side_paths` block: a pre-hook
on the query layer captures h, and a window reaches back into earlier forwards that extended the
same KV cache (decoding), whose last window - 1 features it keeps. It needs what a row's
positions are: a 2-D attention mask (or none), and a KV cache made within the block. A packed
4-D mask, a cache made elsewhere or rows reordered under it (beam search) are refused, never
guessed at.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .chunking import join_left
from .compat import cache_argument
from .generator import rms_normalize, window_mean


class PooledFeatures:
    """h̃ (b, s, d) of the positions the current forward runs, per query layer: `now[layer]`.

    One is made per `side_paths` block, or passed in to carry windows from one block to the
    next over the same KV cache (`select` follows its rows: `cache.batch_select_indices`)."""

    def __init__(
        self,
        window: int,
        dtype: torch.dtype,
        model: nn.Module,
        blocks: nn.ModuleList,
        layers: list[int],
    ) -> None:
        self.window, self.dtype = window, dtype
        self.model, self.blocks, self.layers = model, blocks, layers
        self.now: dict[int, Tensor] = {}
        self._tails: dict[int, tuple[Tensor, Tensor]] = {}  # last window - 1 (h, mask) per layer
        self._cache: weakref.ref | None = None  # the KV cache the tails belong to
        self._seen = 0  # positions that cache holds
        self._mask: Tensor | None = None  # (b, s): real positions of the current forward
        self._continues = False

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """The capture hooks within the block: on `model`, the decoder stack (HF `base_model`:
        a row's mask and cache), and on the `layers` of its `blocks` (the features)."""
        cache_name = cache_argument(self.model)
        handles = [
            self.model.register_forward_pre_hook(self._before(cache_name), with_kwargs=True),
            self.model.register_forward_hook(self._after(cache_name), with_kwargs=True),
            *(
                self.blocks[layer].register_forward_pre_hook(self._capture(layer), with_kwargs=True)
                for layer in self.layers
            ),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def select(self, rows: Tensor) -> None:
        """Keep the windows of `rows` (an index, repeats allowed), as the KV cache they go with."""
        self._tails = {k: (h[rows], m[rows]) for k, (h, m) in self._tails.items()}

    def joined(self, other: PooledFeatures) -> PooledFeatures:
        """The windows of this batch's rows, then `other`'s, as two KV caches are joined (each
        left-padded to a common length: the padding is masked, before every real token)."""
        both = PooledFeatures(self.window, self.dtype, self.model, self.blocks, self.layers)
        for layer, (h, m) in self._tails.items():
            h2, m2 = other._tails[layer]
            both._tails[layer] = (join_left(h, h2, 1), join_left(m, m2, 1))
        return both

    def follow(self, cache) -> None:
        """Continue over `cache` from now on: a KV cache rebuilt from the one these windows
        ran with (rows selected or joined, all-padding columns cut)."""
        self._cache, self._seen = weakref.ref(cache), int(cache.get_seq_length())

    def _before(self, cache_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            inputs = ids if ids is not None else kwargs["inputs_embeds"]
            cache = kwargs.get(cache_name)
            past = 0 if cache is None else int(cache.get_seq_length())
            if past and (self._cache is None or self._cache() is not cache or self._seen != past):
                raise RuntimeError(
                    "a pooled query continues only a KV cache made within this adapted block, "
                    "forward by forward: the window needs the features of the cached positions"
                )
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(inputs.shape[:2], device=inputs.device)
            elif mask.dim() != 2:
                raise ValueError(
                    "a pooled query needs a 2-D attention mask (padding) to know a row's "
                    f"positions, not a {mask.dim()}-D one: packed rows are not supported"
                )
            self._mask, self._continues = mask[:, -inputs.shape[1] :].to(self.dtype), past > 0
            # a new sequence ends the one before (a forward that stops early, like
            # `context_features`, never reaches `_after`: its rows are no cache's)
            if not past:
                self._cache = None
            self.now.clear()

        return hook

    def _after(self, cache_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            cache = getattr(output, cache_name, None)
            cache = getattr(output, "past_key_values", None) if cache is None else cache
            self._cache = None if cache is None else weakref.ref(cache)
            self._seen = 0 if cache is None else int(cache.get_seq_length())

        return hook

    def _capture(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = rms_normalize((args[0] if args else kwargs["hidden_states"]).to(self.dtype))
            mask, s = self._mask, h.shape[1]
            if self._continues:
                tail_h, tail_mask = self._tails[layer]
                if tail_h.shape[0] != h.shape[0]:
                    raise RuntimeError(
                        f"the batch changed from {tail_h.shape[0]} to {h.shape[0]} rows under a "
                        "pooled query's window"
                    )
                h, mask = torch.cat([tail_h, h], 1), torch.cat([tail_mask, mask], 1)
            self.now[layer] = window_mean(h, mask, self.window)[:, -s:]
            keep = h.shape[1] - min(self.window - 1, h.shape[1])
            self._tails[layer] = (h[:, keep:], mask[:, keep:])

        return hook
