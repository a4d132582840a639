"""Adaptation methods behind one interface: adapt on the context, then answer.

    method = make_method("prompt", model, tokenizer)
    with method.adapt(episode.context_texts()) as adapted:
        adapted.answer(question)                    # greedy text
        adapted.answer_nll(question, gold)          # teacher-forced NLL per answer token
        adapted.score_options(input, options)       # mean log-prob per option token
        adapted.answers(questions)                  # ... and each of them for many at once
    adapted.stats                                   # adapt time, state bytes, KV-cache bytes

Every method wraps the same base model and the same `PromptFormat`; they differ only in
where the context goes: nowhere (`base`), the prompt (`prompt`, `prompt-window`), a generated
state (`genadapter`), or weights fine-tuned on it at test time (`ttt-*`). Test-time training
attaches fresh parameters per episode and takes them off on exit; the base weights are then
checked to be bit-identical, so one episode can never leak into the next.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from genadapter.eval.batched import PrefixCache, generate_rows, score_rows
from genadapter.eval.bottleneck import HoulsbyAdapters
from genadapter.eval.metrics import kv_cache_bytes
from genadapter.eval.prompts import PromptFormat, as_tensor, join_context


class BaseModelChanged(RuntimeError):
    """Test-time training left the base weights different: results would leak across episodes."""


class DoesNotFit(Exception):
    """The prompt (context + question + answer budget) is longer than the model's window."""


class OverBudget(Exception):
    """The context is longer than the method's compute budget (`max_context_tokens`)."""


def context_window(model: nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


# ---------------------------------------------------------------------- adapted language models


class HFLM:
    """A plain HF causal LM (the base model, possibly with test-time parameters attached)."""

    def __init__(self, model: nn.Module, tokenizer, rows_apart: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prefixes = PrefixCache()  # the context's KV cache, from answering to scoring
        self.rows_apart = rows_apart  # each row runs whole (`batched.score_rows`)

    def applied(self) -> contextlib.AbstractContextManager:
        """The context its forwards run in (nothing to add for a plain LM)."""
        return contextlib.nullcontext()

    def score(self, rows: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """Log-probs of each row's last n_target tokens (`batched.score_rows`)."""
        with self.applied():
            return score_rows(self.model, rows, prefixes=self.prefixes, rows_apart=self.rows_apart)

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, stop: list[int]
    ) -> list[tuple[str, int]]:
        """(text, new tokens) of the greedy continuation of each prompt, decoded together."""
        pad = stop[0] if stop else (self.tokenizer.pad_token_id or 0)
        with self.applied():
            new = generate_rows(
                self.model, prompts, max_new_tokens, stop, pad, self.prefixes, self.rows_apart
            )
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [(t, len(n) + (len(n) < max_new_tokens)) for t, n in zip(texts, new, strict=True)]


class AdapterLM(HFLM):
    """A GenerativeAdapter answering with one state (its side path hooked onto the base LM;
    the state's one row serves every row of a batch)."""

    def __init__(self, ga, state) -> None:
        # a pooled query reads a row's own positions: no shared prefix cache, no packed rows
        super().__init__(ga.base_model, ga.tokenizer, rows_apart=ga.config.queries.pooled)
        self.ga, self.state = ga, state

    def applied(self) -> contextlib.AbstractContextManager:
        return self.ga.adapted(self.state)


# ---------------------------------------------------------------------- the adapted handle


@dataclass
class Adapted:
    """What `Method.adapt` returns: answers questions, keeps cost figures, cleans up on close."""

    lm: HFLM | AdapterLM
    fmt: PromptFormat
    model_config: object
    context: str | None = None  # text placed in the prompt (prompt methods only)
    max_positions: int | None = None
    max_new_tokens: int = 24
    kv_dtype: torch.dtype = torch.float32
    stats: dict = field(default_factory=dict)
    on_close: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.stats.setdefault("kv_cache_bytes", 0)  # largest KV cache any call needed

    def _prompt(self, question: str, extra: int) -> list[int]:
        ids = self.fmt.prompt_ids(question, self.context)
        if self.max_positions is not None and len(ids) + extra > self.max_positions:
            raise DoesNotFit(
                f"prompt of {len(ids)} tokens + {extra} answer tokens > window {self.max_positions}"
            )
        return ids

    def _track_kv(self, n_tokens: int) -> None:
        nbytes = kv_cache_bytes(self.model_config, n_tokens, self.kv_dtype)
        self.stats["kv_cache_bytes"] = max(self.stats["kv_cache_bytes"], nbytes)

    def answers(self, questions: list[str]) -> list[str]:
        """Greedy answers (first line only), decoded as one batch."""
        prompts = [self._prompt(q, self.max_new_tokens) for q in questions]
        out = self.lm.generate(prompts, self.max_new_tokens, self.fmt.stop_token_ids())
        for ids, (_, n_new) in zip(prompts, out, strict=True):
            self._track_kv(len(ids) + n_new)
        return [self.fmt.clean_answer(text, q) for (text, _), q in zip(out, questions, strict=True)]

    def answer_nlls(self, questions: list[str], answers: list[str]) -> list[float]:
        """Teacher-forced negative log-likelihood of each gold answer, nats per answer token."""
        return [-lp for lp in self.mean_logprobs(list(zip(questions, answers, strict=True)))]

    def option_scores(self, inputs: list[str], options: list[list[str]]) -> list[list[float]]:
        """Mean log-prob per token of every option of every input, scored as one batch (per
        token, so long labels are not penalised)."""
        pairs = [(x, o) for x, opts in zip(inputs, options, strict=True) for o in opts]
        flat = iter(self.mean_logprobs(pairs))
        return [[next(flat) for _ in opts] for opts in options]

    def mean_logprobs(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Mean log-prob per answer token of each (question, answer) pair, all scored as one
        batch (a pair asked twice is scored once)."""
        unique = list(dict.fromkeys(pairs))
        rows = []
        for question, answer in unique:
            target = self.fmt.answer_ids(answer, question)
            ids = self._prompt(question, len(target)) + target
            self._track_kv(len(ids))
            rows.append((ids, len(target)))
        scored = dict(zip(unique, (lp.mean().item() for lp in self.lm.score(rows)), strict=True))
        return [scored[p] for p in pairs]

    # one question at a time: the batched calls with one row
    def answer(self, question: str) -> str:
        return self.answers([question])[0]

    def answer_nll(self, question: str, answer: str) -> float:
        return self.answer_nlls([question], [answer])[0]

    def score_options(self, input: str, options: list[str]) -> list[float]:
        return self.option_scores([input], [options])[0]

    def close(self) -> None:
        if self.on_close is not None:
            fn, self.on_close = self.on_close, None
            fn()

    def __enter__(self) -> Adapted:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- methods


class Method(ABC):
    """Adapts a shared base model to one episode's context."""

    name: str = ""

    def __init__(
        self, model: nn.Module, tokenizer, fmt: PromptFormat | None = None, max_new_tokens: int = 24
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.fmt = fmt or PromptFormat(tokenizer)
        self.max_new_tokens = max_new_tokens

    def _handle(self, lm, context: str | None = None, **stats) -> Adapted:
        return Adapted(
            lm,
            self.fmt,
            self.model.config,
            context,
            context_window(self.model),
            self.max_new_tokens,
            next(self.model.parameters()).dtype,
            dict(stats),
        )

    @abstractmethod
    def adapt(self, context_texts: list[str]) -> Adapted: ...


class BaseMethod(Method):
    """No context at all: the floor every method should beat."""

    name = "base"

    def adapt(self, context_texts: list[str]) -> Adapted:
        return self._handle(HFLM(self.model, self.tokenizer), adapt_seconds=0.0, state_bytes=0)


class PromptMethod(Method):
    """The whole context in the prompt; reported as "does not fit" beyond the window."""

    name = "prompt"

    def adapt(self, context_texts: list[str]) -> Adapted:
        context = join_context(context_texts)
        return self._handle(
            HFLM(self.model, self.tokenizer),
            context,
            adapt_seconds=0.0,
            state_bytes=0,
            prompt_context_tokens=len(self.tokenizer(context, add_special_tokens=False).input_ids),
        )


class PromptWindowMethod(Method):
    """Only the last `window` tokens of the context in the prompt (a fixed prompt budget)."""

    name = "prompt-window"

    def __init__(self, *args, window: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window = window

    def last_tokens(self, text: str) -> str:
        """Text of the last `window` tokens; re-tokenising may merge pieces, so re-check."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        keep = self.window
        while True:
            tail = self.tokenizer.decode(ids[max(len(ids) - keep, 0) :], skip_special_tokens=True)
            if len(self.tokenizer(tail, add_special_tokens=False).input_ids) <= self.window:
                return tail.strip()
            keep -= 1

    def adapt(self, context_texts: list[str]) -> Adapted:
        t0 = time.perf_counter()
        context = self.last_tokens(join_context(context_texts))
        return self._handle(
            HFLM(self.model, self.tokenizer),
            context,
            adapt_seconds=time.perf_counter() - t0,
            state_bytes=0,
            prompt_context_tokens=len(self.tokenizer(context, add_special_tokens=False).input_ids),
        )


class GenAdapterMethod(Method):
    """Read the context stream chunk by chunk into a state; answer with the state's deltas."""

    name = "genadapter"

    def __init__(
        self, ga, fmt: PromptFormat | None = None, max_new_tokens: int = 24, control: bool = False
    ) -> None:
        super().__init__(ga.base_model, ga.tokenizer, fmt, max_new_tokens)
        self.ga = ga
        # control: read unrelated text of the same length instead of the context, so what is
        # left of the score is answer format, not knowledge from the context
        self.control = control

    def unrelated_texts(self, context_texts: list[str]) -> list[str]:
        """Wikipedia summaries (a fixed order) up to the context's token count."""
        from genadapter.assets import load_wiki_summaries

        budget = sum(
            len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in context_texts
        )
        texts = []
        for row in load_wiki_summaries():
            if budget <= 0:
                break
            texts.append(f"{row['title']}: {row['extract']}")
            budget -= len(self.tokenizer(texts[-1], add_special_tokens=False).input_ids)
        return texts

    def adapt(self, context_texts: list[str]) -> Adapted:
        if self.control:
            context_texts = self.unrelated_texts(context_texts)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.ga.config.decay == 1.0 and context_texts:
                # the documents as rows of one read, then summed: the state of reading them one
                # after another (sums are order-free), with the chunks of all in full batches
                state = self.ga.read(context_texts).sum()
            else:  # a decaying state depends on the order: one document at a time
                state = self.ga.new_state(batch_size=1)
                for text in context_texts:
                    state = self.ga.read(text, state)
        seconds = time.perf_counter() - t0
        return self._handle(
            AdapterLM(self.ga, state), adapt_seconds=seconds, state_bytes=int(state.nbytes)
        )


# ---------------------------------------------------------------------- test-time training


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes, bytes) and the module tree."""
    h = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


class TTTMethod(Method):
    """Test-time training: fresh parameters per episode, `steps` AdamW steps of next-token
    loss on the context (every step sees the whole context, cut into `max_len` windows),
    then answer with them; on close they are removed and the base is verified unchanged."""

    def __init__(
        self,
        *args,
        steps: int = 5,
        lr: float = 1e-3,
        max_len: int = 512,
        seed: int = 0,
        verify: bool = True,
        max_context_tokens: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.steps, self.lr, self.max_len, self.seed, self.verify = steps, lr, max_len, seed, verify
        # a compute budget: longer contexts are recorded as over budget, not run
        self.max_context_tokens = max_context_tokens
        self._fingerprint: str | None = None

    @abstractmethod
    def attach(self) -> tuple[list[nn.Parameter], Callable[[], None]]:
        """Add fresh trainable parameters to `self.model`; return them and a detach function."""

    def context_windows(self, context_texts: list[str]) -> list[torch.Tensor]:
        ids = self.tokenizer(join_context(context_texts)).input_ids
        device = next(self.model.parameters()).device
        return [
            as_tensor(ids[i : i + self.max_len], device)
            for i in range(0, len(ids) - 1, self.max_len)
            if len(ids[i : i + self.max_len]) > 1
        ]

    def adapt(self, context_texts: list[str]) -> Adapted:
        if self.verify and self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        windows = self.context_windows(context_texts)
        n_tokens = sum(w.shape[1] - 1 for w in windows)
        if self.max_context_tokens is not None and n_tokens > self.max_context_tokens:
            raise OverBudget(f"{n_tokens} context tokens > budget {self.max_context_tokens}")
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)  # same fresh init for every episode
        grad_flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        params, detach = self.attach()
        losses = []
        try:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for w in windows:  # token-weighted mean loss over the whole context
                    loss = self.model(input_ids=w, labels=w).loss * (w.shape[1] - 1) / n_tokens
                    loss.backward()
                    total += loss.item()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(total)
        except BaseException:
            self._restore(detach, grad_flags)
            raise
        state_bytes = sum(p.numel() * p.element_size() for p in params)
        handle = self._handle(
            HFLM(self.model, self.tokenizer),
            adapt_seconds=time.perf_counter() - t0,
            state_bytes=state_bytes,
            train_losses=losses,
            trained_tokens=n_tokens,
        )
        handle.on_close = lambda: self._restore(detach, grad_flags)
        return handle

    def _restore(self, detach: Callable[[], None], grad_flags: dict[str, bool]) -> None:
        detach()
        for n, p in self.model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        if self.verify and weights_fingerprint(self.model) != self._fingerprint:
            raise BaseModelChanged(f"{self.name}: base model changed after test-time training")


class LoRAMethod(TTTMethod):
    """PEFT LoRA on the context (`target_modules="all-linear"`: every linear but the head)."""

    name = "ttt-lora"

    def __init__(
        self,
        *args,
        r: int = 8,
        alpha: float = 16.0,
        target_modules: str | list[str] = "all-linear",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.r, self.alpha, self.target_modules = r, alpha, target_modules

    def attach(self):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(self.model, config)
        params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        return params, lambda: peft_model.unload()  # removes the LoRA layers without merging


class BitFitMethod(TTTMethod):
    """BitFit: train bias terms only. A trained offset `Δb` (zero at start) is added to the
    output of every module that has a bias and of every linear layer inside the decoder (the
    zero-initialised bias a bias-free model like LLaMA lacks), through forward hooks."""

    name = "ttt-bitfit"

    def targets(self) -> list[tuple[str, nn.Module, int]]:
        found = []
        for name, m in self.model.named_modules():
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor):
                found.append((name, m, bias.shape[-1]))
            elif isinstance(m, nn.Linear) and any(c.isdigit() for c in name.split(".")):
                found.append((name, m, m.out_features))
        return found

    def attach(self):
        ref = next(self.model.parameters())
        params, handles = [], []
        for _, module, dim in self.targets():
            delta = nn.Parameter(torch.zeros(dim, dtype=ref.dtype, device=ref.device))
            params.append(delta)
            handles.append(module.register_forward_hook(lambda m, a, out, d=delta: out + d))

        def detach() -> None:
            for h in handles:
                h.remove()

        return params, detach


class AdapterMethod(TTTMethod):
    """Houlsby bottleneck adapters after every attention and MLP block (identity at start)."""

    name = "ttt-adapter"

    def __init__(self, *args, bottleneck: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bottleneck = bottleneck

    def attach(self):
        adapters = HoulsbyAdapters(self.model, self.bottleneck)
        return list(adapters.parameters()), adapters.detach


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        BaseMethod,
        PromptMethod,
        PromptWindowMethod,
        GenAdapterMethod,
        LoRAMethod,
        BitFitMethod,
        AdapterMethod,
    )
}


def make_method(name: str, model: nn.Module, tokenizer, *, ga=None, **options) -> Method:
    """Build a method by name; `options` are its keyword arguments (steps, lr, window, ...)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    if name == "genadapter":
        if ga is None:
            raise ValueError("the genadapter method needs a GenerativeAdapter (ga=...)")
        return GenAdapterMethod(ga, **options)
    return METHODS[name](model, tokenizer, **options)
