"""GenerativeAdapter: a frozen causal LM plus a generator that adapts it from a context stream.

The base LM is never changed: the side path adds (alpha/r) B N(S)^T A x through forward hooks
that exist only for the duration of one call, and `merged` restores W bit-exactly on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import memory
from .assets import load_base_model
from .chunking import cut, pad
from .config import GeneratorConfig
from .devices import to_device
from .generator import Generator, LoRA, ModuleGenerator, Writes, rms_normalize
from .queries import PooledFeatures
from .spelling import bare_token_ids
from .state import AdapterState, StateMismatchError
from .targets import decoder_layers, find_targets

CONFIG_NAME = "generator_config.json"
WEIGHTS_NAME = "generator.safetensors"

TextOrIds = str | Sequence[str] | Tensor | Sequence[Sequence[int]]


def newly_neutral(saved: GeneratorConfig, config: GeneratorConfig) -> set[str]:
    """Parameters `config` switches on that `saved` lacks and that start at a no-op."""
    on = {p: bool(attrgetter(option)(config)) for p, option in ModuleGenerator.NEUTRAL.items()}
    return {
        p
        for p, option in ModuleGenerator.NEUTRAL.items()
        if on[p] and not attrgetter(option)(saved)
    }


class _HaveAllLayers(Exception):
    """Raised once reading has the input of its highest layer: the layers above never run."""


class GenerativeAdapter(nn.Module):
    def __init__(self, base_model: nn.Module, generator: Generator, tokenizer: Any = None):
        super().__init__()
        base_model.requires_grad_(False)
        base_model.eval()
        self.base_model = base_model
        self.generator = generator
        self.tokenizer = tokenizer
        self.config: GeneratorConfig = generator.config
        # chunks per frozen forward while reading; None: as many as fit in read_batch_tokens
        # (about 1K tokens a forward is the fastest on CPU: 128-token chunks 8 at a time)
        self.chunk_batch_size: int | None = None
        self.read_batch_tokens = 1024
        self._merged = False
        self.active_lora: dict[str, LoRA] | None = None  # the side paths hooked on (side_paths)
        self._modules_by_name = dict(base_model.named_modules())
        self._layers_name = decoder_layers(base_model)[0]  # the ModuleList of decoder layers
        self._bare_ids: Tensor | None = None  # spelling.bare_token_ids, made on first use
        self.generator.to(self.device)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_base(
        cls,
        base_model: nn.Module | str,
        config: GeneratorConfig | None = None,
        tokenizer: Any = None,
    ) -> GenerativeAdapter:
        """A fresh generator (B = 0, so it changes nothing yet) for a base LM or its name/path."""
        config = dataclasses.replace(config or GeneratorConfig())
        if isinstance(base_model, str):
            name = base_model
            base_model, loaded_tok = load_base_model(name)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
            config.base_model = name
        elif config.base_model is None:
            config.base_model = getattr(base_model.config, "_name_or_path", None) or None
        targets = find_targets(base_model, config)
        generator = Generator(config, targets, base_model.config.hidden_size)
        return cls(base_model, generator, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base_model: nn.Module | str | None = None,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> GenerativeAdapter:
        """A trained generator; loads the base LM its config names unless one is passed.

        `overrides` replace config fields (`GeneratorConfig.replace`), e.g. to fine-tune under
        another `normalization`, or on a subset of the saved targets (`layers`,
        `target_modules`): the weights of the targets left out are dropped. An option whose
        parameters start at a no-op (`keys={"gate": True}`: open gates, G = 0) may be switched
        on. Fields that change weight shapes (r, r_in) cannot be overridden."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a saved generator")
        saved = GeneratorConfig.load(path / CONFIG_NAME)
        if fixed := {"r", "r_in", "base_model"} & overrides.keys():
            raise ValueError(f"cannot override {sorted(fixed)} of a trained generator")
        config = saved.replace(**overrides)
        if config.queries.pooled != saved.queries.pooled:  # A reads x or pooled features
            raise ValueError("cannot switch a trained generator's queries between LoRA and pooled")
        if base_model is None:
            if not config.base_model:
                raise ValueError(f"{path} names no base model; pass base_model=")
            base_model = config.base_model
        if isinstance(base_model, str):
            base_model, loaded_tok = load_base_model(base_model)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        generator = Generator(
            config, find_targets(base_model, config), base_model.config.hidden_size
        )
        ga = cls(base_model, generator, tokenizer)
        subset = bool({"layers", "target_modules"} & overrides.keys())
        ga._load_generator_weights(path / WEIGHTS_NAME, newly_neutral(saved, config), subset)
        return ga

    def _load_generator_weights(self, file: Path, may_miss: set[str], may_leave: bool) -> None:
        """Copy saved weights in; only parameters in `may_miss` (a no-op at init) may be absent,
        and only when `may_leave` (a subset of the targets) may saved weights go unused."""
        weights = load_file(str(file))
        expected = self.generator_state_dict()
        missing = {
            k for k in expected.keys() - weights.keys() if k.rsplit(".", 1)[1] not in may_miss
        }
        unexpected = set() if may_leave else weights.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(
                f"{file} does not fit this base model and config: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for k, p in expected.items():
                if k in weights:
                    p.copy_(weights[k])

    def generator_state_dict(self) -> dict[str, Tensor]:
        """Generator parameters keyed by the base-LM module they adapt: '<module>.<A|K|V|B>',
        and '.G' (a write gate) and '.log_lambda' (a learned ridge lambda) where present."""
        return {
            f"{n}.{p}": param
            for n in self.generator.names
            for p, param in self.generator[n].named_parameters()
        }

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path / CONFIG_NAME)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.generator_state_dict().items()}
        save_file(
            tensors,
            str(path / WEIGHTS_NAME),
            metadata={"fingerprint": self.generator.fingerprint()},
        )

    # --- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.base_model.get_input_embeddings().num_embeddings

    def train(self, mode: bool = True) -> GenerativeAdapter:
        """Only the generator trains; the frozen LM stays in eval mode (no dropout)."""
        self.training = mode
        self.generator.train(mode)
        self.base_model.eval()
        return self

    # --- states -----------------------------------------------------------------------------
    def new_state(self, batch_size: int = 1) -> AdapterState:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g, c = self.generator, self.config
        kw = {"dtype": g.state_dtype, "device": self.device}
        width = memory.state_width(c.memory, c.r, c.r_in)
        S = {name: torch.zeros(batch_size, c.r_in, width, **kw) for name in g.names}
        return AdapterState(S, torch.zeros(batch_size, **kw), g.fingerprint(), c.to_dict())

    def check_state(self, state: AdapterState, batch_size: int | None = None) -> None:
        if not isinstance(state, AdapterState):
            raise TypeError(f"state must be an AdapterState, got {type(state).__name__}")
        theirs = state.config.get("memory", "linear")
        if theirs != self.config.memory:
            raise StateMismatchError(
                f"state was written by a {theirs!r} memory, but this adapter's generator has a "
                f"{self.config.memory!r} memory: a state is only read out by its own kind"
            )
        mine = self.generator.fingerprint()
        if state.generator != mine:
            raise StateMismatchError(
                f"state belongs to generator {state.generator} "
                f"(base {state.config.get('base_model')!r}, r={state.config.get('r')}, "
                f"r_in={state.config.get('r_in')}), but this adapter's generator is {mine} "
                f"(base {self.config.base_model!r}, r={self.config.r}, r_in={self.config.r_in})"
            )
        if batch_size is not None and state.batch_size != batch_size:
            raise ValueError(f"state has batch size {state.batch_size}, inputs have {batch_size}")

    # --- reading ----------------------------------------------------------------------------
    def _rows(self, inputs: TextOrIds, attention_mask: Tensor | None) -> list[Tensor]:
        """One 1-D LongTensor of real (unpadded) token ids per batch row."""
        if isinstance(inputs, str) or (
            isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs)
        ):
            if self.tokenizer is None:
                raise ValueError("this adapter has no tokenizer: pass token ids")
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return [torch.tensor(r, dtype=torch.long) for r in ids]
        if isinstance(inputs, Sequence) and not isinstance(inputs, Tensor):
            if not inputs:
                raise ValueError("empty input: nothing to read")
            try:
                return [self._check_ids(torch.tensor(list(r), dtype=torch.long)) for r in inputs]
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"read takes text, a list of texts or token ids; got {type(inputs[0]).__name__} rows ({e})"
                ) from e
        if not isinstance(inputs, Tensor):
            raise TypeError(
                f"read takes text, a list of texts or token ids, not {type(inputs).__name__}"
            )
        ids = inputs[None] if inputs.dim() == 1 else inputs
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(
                f"token ids must be an integer tensor (batch, seq), got {ids.dtype} {tuple(ids.shape)}"
            )
        self._check_ids(ids)
        if attention_mask is None:
            return [row.long() for row in ids]
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} != input shape {tuple(ids.shape)}"
            )
        return [row[m.bool()].long() for row, m in zip(ids, mask, strict=True)]

    def _check_ids(self, ids: Tensor) -> Tensor:
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}); got min {int(ids.min())}, max {int(ids.max())}"
            )
        return ids

    @torch.no_grad()
    def context_features(
        self, input_ids: Tensor, attention_mask: Tensor | None
    ) -> dict[int, Tensor]:
        """{layer l: hidden state entering decoder layer l} (HF `hidden_states[l]`) for every layer
        the generator reads (`Generator.feature_layers`), when the frozen LM reads these chunks
        alone.

        The forward stops at the input of the highest such layer: the layers above it, the
        final norm and the LM head never run, and no other hidden state is kept.
        """
        layers, captured = self.generator.feature_layers, {}
        blocks = self._modules_by_name[self._layers_name]

        def capture(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[layer] = args[0] if args else kwargs["hidden_states"]
                if layer == layers[-1]:
                    raise _HaveAllLayers

            return hook

        handles = [
            blocks[layer].register_forward_pre_hook(capture(layer), with_kwargs=True)
            for layer in layers
        ]
        try:
            self.base_model.base_model(
                input_ids=to_device(input_ids, self.device),
                attention_mask=None
                if attention_mask is None
                else to_device(attention_mask, self.device),
                # with a cache HF skips its check for packed sequences, which waits for the
                # device; the price: a copy of each run layer's K, V, held until we stop
                use_cache=True,
            )
        except _HaveAllLayers:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(layers):
            raise RuntimeError(
                f"the base model never ran decoder layers {sorted(set(layers) - set(captured))}"
            )
        if self.config.value_bare:
            captured[0] = self.with_bare_spelling(input_ids, captured[0])
        return captured

    def with_bare_spelling(self, input_ids: Tensor, embedded: Tensor) -> Tensor:
        """rms(e(x)) + rms(e(bare x)) per token (`GeneratorConfig.value_bare`, genadapter/spelling.py):
        layer 0's features carry each word as the context spells it and as an answer begins."""
        embeddings = self.base_model.get_input_embeddings()
        if self._bare_ids is None:  # once, on the embeddings' device
            if self.tokenizer is None:
                raise ValueError("value_bare needs the adapter's tokenizer")
            ids = bare_token_ids(self.tokenizer, embeddings.num_embeddings)
            self._bare_ids = ids.to(embeddings.weight.device)
        bare = self._bare_ids[to_device(input_ids, self._bare_ids.device)]
        spelled = embeddings(bare).to(embedded.dtype)
        return rms_normalize(embedded) + rms_normalize(spelled)

    def read_chunks(
        self, ids: Tensor, mask: Tensor, weight: Tensor | None = None, mask_attention: bool = True
    ) -> Writes:
        """What chunks (b, C), right-padded, write: one frozen forward, then the generator.
        `read` and every training objective read through here (`weight`: `Generator.write`).

        `mask_attention=False` runs the frozen forward without the mask: causal attention never
        lets right padding reach a real token, and HF's check of a mask waits for the device.
        (`read` masks only forwards that hold padding, as before: states stay bit-exact.)"""
        hidden = self.context_features(ids, mask if mask_attention else None)
        mask = to_device(mask, self.device)
        return self.generator.write(
            hidden, mask, None if weight is None else to_device(weight, self.device)
        )

    def read(
        self,
        inputs: TextOrIds,
        state: AdapterState | None = None,
        attention_mask: Tensor | None = None,
        decay: float | None = None,
    ) -> AdapterState:
        """Read context into a new state: each row is cut into `chunk_len` chunks, each chunk is
        one no-grad forward of the frozen LM on its own. Padding never enters S or n.

        With decay gamma, each chunk does S <- gamma S + dS, so reading chunk by chunk or in
        one call gives the same state. Gradients flow into K and V when grad is enabled.
        """
        rows = self._rows(inputs, attention_mask)
        state = self.new_state(len(rows)) if state is None else state
        self.check_state(state, len(rows))
        gamma = self.config.decay if decay is None else float(decay)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {gamma}")
        # every chunk of every row, with its row and how many chunks of that row follow it
        chunks, n_chunks = [], []
        for i, row in enumerate(rows):
            pieces = cut(row, self.config.chunk_len)
            chunks += [(i, piece, len(pieces) - 1 - j) for j, piece in enumerate(pieces)]
            n_chunks.append(len(pieces))
        if not chunks:
            return state.clone()
        # everything the loop needs reaches the device in one asynchronous copy before it: the
        # loop itself never waits for the host (no blocking copy, no sync per forward)
        dev, dtype = self.device, state.n.dtype
        ids, mask = pad([piece for _, piece, _ in chunks])
        widths = [len(piece) for _, piece, _ in chunks]
        after = torch.tensor([after for _, _, after in chunks], dtype=dtype)
        ids, mask, weight, row_idx, row_decay = (
            to_device(t, dev)
            for t in (
                ids,
                mask,
                gamma**after,
                torch.tensor([i for i, _, _ in chunks]),
                gamma ** torch.tensor(n_chunks, dtype=dtype),
            )
        )
        S = {k: s * row_decay[:, None, None] for k, s in state.S.items()}
        n = state.n * row_decay
        per_forward = self.chunk_batch_size or max(
            1, self.read_batch_tokens // self.config.chunk_len
        )
        for start in range(0, len(chunks), per_forward):
            end = start + per_forward
            width = max(widths[start:end])  # padded to this forward's longest chunk only
            writes = self.read_chunks(
                ids[start:end, :width],
                mask[start:end, :width],
                mask_attention=min(widths[start:end]) < width,  # HF drops an all-ones mask
            )
            w, rows_of = weight[start:end], row_idx[start:end]
            for k, dS in writes.S.items():
                S[k] = S[k].index_add(0, rows_of, dS * w[:, None, None])
            n = n.index_add(0, rows_of, writes.n * w)
        return AdapterState(S, n, state.generator, state.config, dict(state.metadata))

    # --- the adapted model ------------------------------------------------------------------
    @contextlib.contextmanager
    def adapted(
        self,
        state: AdapterState,
        keep_queries: bool = False,
        check: bool = True,
        windows: PooledFeatures | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Within the block, every forward of `base_model` uses the state (side path, per row):
        each target's output gains (alpha/r) B N(S)^T A x, as the two small matmuls
        (x lora_A^T)(scaling B^T), never the out x in dW.

        Yields a dict that, with `keep_queries`, holds each target's last query A x (b, s, r_in)
        after a forward: what the state's keys are matched against (for losses and probes).

        `check=False` (training objectives, whose states are this generator's writes of the
        same step) skips the fingerprint: it hashes K and V on the host, a device sync per step.
        `windows`: pooled queries' windows carried over from an earlier block (`side_paths`)."""
        if self._merged:
            raise RuntimeError(
                "a state is merged into the weights: call without state= inside merged()"
            )
        if check:
            self.check_state(state)
        queries: dict[str, Tensor] = {}
        # an empty state adds exact zeros; skipping its hooks is only worth a check that costs no
        # device->host sync (on an accelerator the hooks run and add those zeros)
        # (carried windows must see every forward of their cache)
        if windows is None and state.n.device.type == "cpu" and bool(state.is_empty().all()):
            yield queries  # an empty state is exactly the base model
            return
        lora = self.row_loras(state, check=False)
        with self.side_paths(lora, queries if keep_queries else None, windows):
            yield queries

    @contextlib.contextmanager
    def side_paths(
        self,
        lora: dict[str, LoRA],
        queries: dict[str, Tensor] | None = None,
        windows: PooledFeatures | None = None,
    ) -> Iterator[None]:
        """Each target's side path hooked on within the block (`adapted` makes `lora` from a
        state). `active_lora` names it meanwhile: a checkpointed layer, recomputed in the
        backward after the block has closed, re-enters the side paths it ran with. Pooled
        queries use `windows` (`query_windows`), a fresh one if None."""
        handles, previous = [], self.active_lora
        self.active_lora = lora
        pooled = windows or self.query_windows()
        capture = contextlib.nullcontext() if pooled is None else pooled.hooked()
        try:
            for t in self.generator.targets:
                at = self.config.queries.layer_of(t.layer)
                hook = self._side_path(t.name, lora[t.name], queries, pooled, at)
                handles.append(self._modules_by_name[t.name].register_forward_hook(hook))
            with capture:
                yield
        finally:
            for h in handles:
                h.remove()
            self.active_lora = previous

    def query_windows(self) -> PooledFeatures | None:
        """What makes pooled queries (`queries.PooledFeatures`; None for LoRA queries): pass one
        to `adapted` or `side_paths` to carry its windows across blocks over one KV cache."""
        q = self.config.queries
        if not q.pooled:
            return None
        layers = sorted({q.layer_of(t.layer) for t in self.generator.targets})
        blocks = self._modules_by_name[self._layers_name]
        return PooledFeatures(
            q.window, self.generator.dtype, self.base_model.base_model, blocks, layers
        )

    def _side_path(
        self,
        name: str,
        lora: LoRA,
        queries: dict[str, Tensor] | None,
        pooled: PooledFeatures | None = None,
        layer: int = 0,
    ):
        """The forward hook that adds one target's per-row LoRA to its output; with `pooled`
        queries, the LoRA reads the pooled features of `layer` instead of its input."""
        B_scaled = lora.B.T * lora.scaling  # (r, out), shared by every row

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x, A = args[0] if pooled is None else pooled.now[layer], lora.A
            if x.shape[0] != A.shape[0]:
                if x.shape[0] % A.shape[0]:
                    raise ValueError(
                        f"input batch {x.shape[0]} does not match state batch {A.shape[0]}"
                    )
                A = A.repeat_interleave(x.shape[0] // A.shape[0], 0)  # generate's expansion
            x = x.to(A.dtype)
            if queries is not None:
                queries[name] = F.linear(x, self.generator[name].A)
            xa = torch.bmm(x, A.transpose(1, 2))  # (b, s, r)
            return output + (xa @ B_scaled).to(output.dtype)

        return hook

    def forward(
        self,
        input_ids: Tensor,
        state: AdapterState | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ):
        """HF-style causal-LM output of the base LM adapted by `state` (one state row per input row)."""
        input_ids = self._as_batch(input_ids)
        context = contextlib.nullcontext()
        if state is not None:
            self.check_state(state, input_ids.shape[0])
            context = self.adapted(state)
        with context:
            return self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )

    def _as_batch(self, input_ids: Tensor) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.is_floating_point():
            raise TypeError("input_ids must be an integer tensor")
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (batch, seq) with seq > 0, got {tuple(input_ids.shape)}"
            )
        return self._check_ids(ids).to(self.device)

    @torch.no_grad()
    def encode_prompts(self, texts: list[str], chat: bool = False) -> tuple[Tensor, Tensor]:
        """Left-padded (ids, attention_mask) on the device; with chat=True each text is wrapped
        as a user turn in the tokenizer's chat template."""
        if self.tokenizer is None:
            raise ValueError("this adapter has no tokenizer: pass token ids")
        if chat:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                )
                for t in texts
            ]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            enc = self.tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=not chat
            )
        finally:
            self.tokenizer.padding_side = side
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generate(
        self,
        prompt: str | Sequence[str] | Tensor,
        state: AdapterState | None = None,
        max_new_tokens: int = 64,
        chat: bool = False,
        **kwargs: Any,
    ) -> str | list[str] | Tensor:
        """Greedy (by default) continuation of the prompt with the state applied.

        Text in, text out (new tokens only); token ids in, new token ids out. With chat=True the
        prompt is wrapped as a user turn in the tokenizer's chat template.
        """
        single = isinstance(prompt, str)
        if isinstance(prompt, Tensor):
            ids, mask = self._as_batch(prompt), None
        else:
            ids, mask = self.encode_prompts([prompt] if single else list(prompt), chat)
        kwargs.setdefault("do_sample", False)
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        kwargs.setdefault(
            "pad_token_id", pad if pad is not None else self.base_model.config.eos_token_id
        )
        ctx = self.adapted(state) if state is not None else contextlib.nullcontext()
        if state is not None:
            self.check_state(state, ids.shape[0])
            beams = kwargs.get("num_beams", self.base_model.generation_config.num_beams)
            if self.config.queries.pooled and (beams or 1) > 1:
                raise ValueError("beam search reorders rows under a pooled query's window")
        with ctx:
            out = self.base_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs
            )
        new = out[:, ids.shape[1] :]
        if isinstance(prompt, Tensor):
            return new
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return texts[0] if single else texts

    # --- weights ----------------------------------------------------------------------------
    def row_loras(self, state: AdapterState, check: bool = True) -> dict[str, LoRA]:
        """{module name: LoRA} with one A row per state row: what `side_paths` applies. Made once
        per state (a ridge memory solves here), so a caller that runs many forwards on the same
        rows (the server's decode loop) makes it once."""
        if check:
            self.check_state(state)
        return self.generator.lora(state.S, state.n)

    def lora(self, state: AdapterState, row: int | None = None) -> dict[str, LoRA]:
        """{module name: LoRA} of one state row (`row` may be left out for a one-row state): the
        weight delta `delta_weights`, `merged` and `export_lora` use."""
        if self.config.queries.pooled:
            raise ValueError(
                "this generator's queries are pooled (GeneratorConfig.queries): its side path reads "
                "a window of layer features, not the module's input, so it is no weight delta to "
                "merge or export. Apply it with adapted(state)."
            )
        self.check_state(state)
        if row is None:
            if state.batch_size != 1:
                raise ValueError(f"state has {state.batch_size} rows: pass row=")
            row = 0
        one = state.select(row)
        return self.generator.lora(one.S, one.n)

    def delta_weights(self, state: AdapterState, row: int | None = None) -> dict[str, Tensor]:
        """{module name: dW (out x in, nn.Linear convention)} for one state row."""
        return {name: lora.delta() for name, lora in self.lora(state, row).items()}

    @contextlib.contextmanager
    def merged(self, state: AdapterState, row: int | None = None) -> Iterator[GenerativeAdapter]:
        """W <- W + dW for fast decoding; restored bit-exactly on exit, also on error."""
        if self._merged:
            raise RuntimeError("already inside merged()")
        with torch.no_grad():
            lora = self.lora(state, row)
        saved: dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                for t in self.generator.targets:
                    weight = self._modules_by_name[t.name].weight
                    saved[t.name] = weight.detach().clone()
                    dW = lora[t.name].delta()  # one module at a time: never every dW at once
                    weight.add_((dW.T if t.transposed else dW).to(weight.dtype))  # Conv1D: in x out
            self._merged = True
            yield self
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self._modules_by_name[name].weight.copy_(original)
            self._merged = False

    def export_lora(self, state: AdapterState, path: str | Path, row: int | None = None) -> Path:
        """Write the generated adapter as a PEFT LoRA directory (`PeftModel.from_pretrained`)."""
        from peft import LoraConfig

        lora = self.lora(state, row)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (A, B, _) in lora.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = A[0].detach().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().contiguous().cpu()
        config = LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,  # PEFT's scaling alpha / r is Generator.lora's
            target_modules=self.generator.names,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            fan_in_fan_out=any(t.transposed for t in self.generator.targets),
            base_model_name_or_path=self.config.base_model,
        )
        config.save_pretrained(str(path))
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        tokens = float(state.select(row or 0).n[0])
        (path / "genadapter.json").write_text(
            json.dumps({"generator": state.generator, "tokens_read": tokens}, indent=1)
        )
        return path
