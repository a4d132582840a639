"""The generator: per-module projections that turn context hidden states into low-rank deltas.

For a target module with frozen weight W (out x in) in decoder layer l (docs/method.md):

    h_t = rms(hidden_t)                 the input of layer l, RMS-normalised (features)
    h̄_t = mean of h over t's key window  (KeyConfig.window back, .lookahead ahead, moved .shift
                                         back; inside t's chunk; h of GeneratorConfig.key_layer
                                         if set)
    k_t = g_t K h̄_t,  g_t = 2 sigmoid(G . h_t) (1 without a gate)          (keys)
    v_t = V h_t                         (values; h of GeneratorConfig.value_layer if set,
                                         0 = the token embeddings)
    S   = sum_t k_t v_t^T               the state, r_in x r                (Writes.S)
          ("ridge" memory: [G | H], H = sum_t k_t k_t^T, read out as M = (H + lam_bar I)^-1 G)
    dW  = (alpha / r) B N(M)^T A        a LoRA: lora_A = N(M)^T A, lora_B = B   (Generator.lora)
          (pooled queries, QueryConfig: the side path adds (alpha / r) B N(M)^T A h̃_s instead,
          h̃_s a window mean of layer features: genadapter/queries.py)

`Generator` holds every trainable parameter of the system and nothing else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import memory
from .config import GeneratorConfig
from .normalize import normalize_state
from .targets import Target

RMS_EPS = 1e-6


def rms_normalize(h: Tensor) -> Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def window_mean(h: Tensor, mask: Tensor, back: int, ahead: int = 0, shift: int = 0) -> Tensor:
    """Mean of h (b, t, d) over each position's window of its row: its last `back` positions
    (itself included) and the next `ahead`, the whole window moved `shift` positions back, cut
    at the row's ends (an empty window gives 0); masked positions (padding) never enter a real
    position's mean."""
    if back == 1 and ahead == 0 and shift == 0:
        return h
    m = mask.to(h.dtype)[..., None]
    total = F.pad((h * m).cumsum(1), (0, 0, 1, 0))  # prefix sums, total[:, i] = sum of h[:, :i]
    count = F.pad(m.cumsum(1), (0, 0, 1, 0))
    here = torch.arange(1, h.shape[1] + 1, device=h.device) - shift
    end = (here + ahead).clamp(min=0, max=h.shape[1])
    start = torch.minimum((here - back).clamp(min=0), end)
    return (total[:, end] - total[:, start]) / (count[:, end] - count[:, start]).clamp(min=1)


class LoRA(NamedTuple):
    """The adapter a state generates for one module: dW = scaling * B @ A (per state row)."""

    A: Tensor  # lora_A = N(S)^T A, (b, r, in)
    B: Tensor  # lora_B, (out, r), shared by every row
    scaling: float  # alpha / r

    def delta(self, row: int = 0) -> Tensor:
        """dW (out x in, nn.Linear convention) of one row."""
        return self.scaling * (self.B @ self.A[row])


@dataclass
class Writes:
    """What a batch of chunks writes into each target's state, and the per-token parts of it
    that losses and probes look at (`keys`, `gate_logits`); adapting needs only S and n."""

    S: dict[str, Tensor]  # sum_t k_t v_t^T per target, (b, r_in, r)
    n: Tensor  # real tokens read, (b,)
    keys: dict[str, Tensor]  # k_t per target, (b, t, r_in), 0 at padding
    gate_logits: dict[str, Tensor] = field(default_factory=dict)  # G . h_t, (b, t); gated only


class ModuleGenerator(nn.Module):
    """Projections of one target module: A (r_in x in; r_in x d for pooled queries), K (r_in x d),
    V (r x d), B (out x r),
    with a write gate G (d), and with a learned ridge lambda its log, `log_lambda`."""

    # parameters that start at a no-op (a new gate is open: G = 0; a learned lambda starts at
    # the fixed one), so a saved generator without them can be loaded with the option on
    NEUTRAL = {"G": "keys.gate", "log_lambda": "ridge_learned"}

    def __init__(
        self, target: Target, hidden_size: int, config: GeneratorConfig, dtype: torch.dtype
    ):
        super().__init__()
        r, r_in = config.r, config.r_in
        self.memory, self.normalize_keys = config.memory, config.keys.normalize

        def init(rows: int, cols: int) -> nn.Parameter:
            std = config.init_std if config.init_std is not None else cols**-0.5
            return nn.Parameter(torch.randn(rows, cols, dtype=dtype) * std)

        # a pooled query reads layer features (genadapter/queries.py), a LoRA query the input x
        self.A = init(r_in, hidden_size if config.queries.pooled else target.in_features)
        self.K = init(r_in, hidden_size)
        self.V = init(r, hidden_size)
        self.B = nn.Parameter(torch.zeros(target.out_features, r, dtype=dtype))
        gate = nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if config.keys.gate else None
        self.register_parameter("G", gate)
        log_lambda = torch.tensor(float(config.ridge_lambda), dtype=torch.float64).log()
        if config.ridge_learned:
            self.log_lambda = nn.Parameter(log_lambda.to(dtype))
        else:
            self.register_buffer("log_lambda", log_lambda.to(dtype), persistent=False)

    def unit_keys(self, h_key: Tensor) -> Tensor:
        """K h̄_t per token (b, t, r_in), of unit length with `KeyConfig.normalize`."""
        k = h_key @ self.K.T
        return F.normalize(k, dim=-1) if self.normalize_keys else k

    def keys(self, h: Tensor, raw: Tensor, weight: Tensor) -> Tensor:
        """k_t = g_t K h̄_t per token (b, t, r_in) from `raw` = `unit_keys`, times `weight` (0 at
        padding): what the state sums and a query A x is matched against."""
        k = raw
        if self.G is not None:
            k = k * (2 * torch.sigmoid(self.gate_logits(h)))[..., None]
        return k * weight[..., None]

    def gate_logits(self, h: Tensor) -> Tensor:
        """G . h_t per token (b, t): the write gate is 2 sigmoid of it."""
        if self.G is None:
            raise ValueError("this generator has no write gate (GeneratorConfig.keys.gate is off)")
        return h @ self.G

    def statistics(self, h: Tensor, raw: Tensor, keys: Tensor) -> Tensor:
        """The state (memory.write) of values V h_t (h: the value layer's features) under
        `keys` = w_t K h̄_t, w_t the gate and weight of each token and `raw` = K h̄_t:
        sum_t k_t (V h_t)^T (b, r_in, r), and for a ridge memory H = sum_t w_t K h̄_t (K h̄_t)^T
        beside it."""
        return memory.write(keys, h @ self.V.T, raw, self.memory)

    def read_out(self, S: Tensor) -> Tensor:
        """The memory matrix (b, r_in, r) a state is read out as (memory.read_out)."""
        return memory.read_out(S, self.memory, self.log_lambda.exp())


def _given(value: int | None) -> tuple[int, ...]:
    return () if value is None else (value,)


def module_key(name: str) -> str:
    return name.replace(".", "__")  # nn.ModuleDict keys cannot contain dots


class Generator(nn.Module):
    """All generator parameters, one ModuleGenerator per target module of the base LM."""

    def __init__(self, config: GeneratorConfig, targets: list[Target], hidden_size: int):
        super().__init__()
        if not targets:
            raise ValueError("the generator needs at least one target module")
        self.config = config
        self.targets = list(targets)
        self.hidden_size = hidden_size
        dtype = getattr(torch, config.dtype)
        self.blocks = nn.ModuleDict(
            {module_key(t.name): ModuleGenerator(t, hidden_size, config, dtype) for t in targets}
        )
        self.layers = sorted({t.layer for t in targets})
        # the layers whose features a read needs: the values' and the keys', and the targets'
        # own unless values and keys come from elsewhere and no gate reads them (a read then
        # stops below the targets: `context_features`)
        self.reads_own_layer = (
            config.keys.gate or config.value_layer is None or config.key_layer is None
        )
        self.feature_layers = sorted(
            {
                *(self.layers if self.reads_own_layer else ()),
                *_given(config.value_layer),
                *_given(config.key_layer),
            }
        )
        self._fingerprint_cache: tuple[tuple, str] | None = None

    def __getitem__(self, name: str) -> ModuleGenerator:
        return self.blocks[module_key(name)]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def state_dtype(self) -> torch.dtype:
        # states are sums over many tokens: accumulate in at least float32
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    # --- the write side: chunks -> state -------------------------------------------------------
    def features(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(h, h̄) for one layer's hidden states (b, t, d) and mask (b, t): the RMS-normalised
        features values are made of, and their key-window means keys are made of."""
        h = rms_normalize(hidden.to(self.dtype))
        keys = self.config.keys
        return h, window_mean(h, mask.to(self.dtype), keys.window, keys.lookahead, keys.shift)

    def write(
        self, hidden_states: dict[int, Tensor], mask: Tensor, weight: Tensor | None = None
    ) -> Writes:
        """What chunks write: `hidden_states` {layer l: input of layer l (b, t, d)}, `mask` (b, t).

        `weight` (b, t), optional, scales each token's write (its key) on top of the mask; the
        key windows still see every real token (diagnostics let only chosen tokens write)."""
        mask = mask.to(self.dtype)
        weight = mask if weight is None else mask * weight.to(self.dtype)
        S, keys, gates = {}, {}, {}
        c = self.config
        shared_values = (
            None if c.value_layer is None else self.features(hidden_states[c.value_layer], mask)[0]
        )
        shared_keys = (
            None if c.key_layer is None else self.features(hidden_states[c.key_layer], mask)[1]
        )
        for layer in self.layers:
            h, h_key = (
                self.features(hidden_states[layer], mask) if self.reads_own_layer else (None, None)
            )
            values = h if shared_values is None else shared_values
            h_key = h_key if shared_keys is None else shared_keys
            for t in (t for t in self.targets if t.layer == layer):
                block = self[t.name]
                raw = block.unit_keys(h_key)
                keys[t.name] = block.keys(h, raw, weight)
                S[t.name] = block.statistics(values, raw, keys[t.name]).to(self.state_dtype)
                if block.G is not None:
                    gates[t.name] = block.gate_logits(h)
        return Writes(S, mask.sum(1).to(self.state_dtype), keys, gates)

    # --- the read-out side: state -> dW ------------------------------------------------------
    def normalized(self, S: dict[str, Tensor], n: Tensor) -> dict[str, Tensor]:
        """N(M) per target, M the state's memory matrix."""
        c = self.config
        if c.memory == "ridge":  # S* is free of the length already: "none" leaves it as it is
            n = torch.ones_like(n)
        return {
            k: normalize_state(self[k].read_out(s).to(self.dtype), n, c.normalization, c.svd_top_k)
            for k, s in S.items()
        }

    def lora(self, S: dict[str, Tensor], n: Tensor) -> dict[str, LoRA]:
        """The exact LoRA each target gets from a state: dW = (alpha/r) B N(M)^T A, per row."""
        return self.lora_of(self.normalized(S, n))

    def lora_of(self, N: dict[str, Tensor], A: dict[str, Tensor] | None = None) -> dict[str, LoRA]:
        """The LoRAs of read-outs N(M) already made (`normalized`); `A` replaces the query maps
        of the targets it names (a map being tuned against fixed states)."""
        A, scaling = A or {}, self.config.scaling
        return {
            name: LoRA(N[name].transpose(1, 2) @ A.get(name, self[name].A), self[name].B, scaling)
            for name in self.names
        }

    def fingerprint(self) -> str:
        """Identity of what a state means: config shape + the K, V (and G) weights that make S."""
        params = [p for n in self.names for p in (self[n].K, self[n].V, self[n].G) if p is not None]
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            h = hashlib.sha256()
            c = self.config
            shape = (c.base_model, c.r, c.r_in, self.names)
            # windowed keys mean another S; per-token keys keep their earlier fingerprints
            # (a gate's weights enter below, with K and V)
            window = (c.keys.window,) if c.keys.window != 1 else ()
            window += ("ahead", c.keys.lookahead) if c.keys.lookahead else ()
            window += ("shift", c.keys.shift) if c.keys.shift else ()
            window += ("unit keys",) if c.keys.normalize else ()
            window += ("ridge",) if c.memory == "ridge" else ()
            window += ("values from", c.value_layer) if c.value_layer is not None else ()
            window += ("bare spelling",) if c.value_bare else ()
            window += ("keys from", c.key_layer) if c.key_layer is not None else ()
            h.update(repr(shape + window).encode())
            for p in params:
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint_cache = (key, h.hexdigest()[:16])
        return self._fingerprint_cache[1]
