"""The generator: per-module projections that turn context hidden states into low-rank deltas.

For a target module with frozen weight W (out x in) in decoder layer l (DESIGN.md):

    S  = sum_t (K h_t)(V h_t)^T            state, r_in x r, h_t = RMS-normalised layer-l input
    dW = (alpha / r) B N(S)^T A            a LoRA with lora_A = N(S)^T A and lora_B = B

`Generator` holds every trainable parameter of the system and nothing else.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .config import GeneratorConfig

RMS_EPS = 1e-6


@dataclass(frozen=True)
class Target:
    """One adapted linear module of the base LM."""

    name: str  # full module name, e.g. "model.layers.20.self_attn.o_proj"
    layer: int  # decoder layer it lives in
    in_features: int
    out_features: int
    transposed: bool  # GPT-2's Conv1D stores W as in x out


def _decoder_layers(model: nn.Module) -> tuple[str, int]:
    """Name and length of the ModuleList that holds the decoder layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, n_layers
    raise ValueError(f"cannot find the {n_layers} decoder layers of {type(model).__name__}")


def find_targets(model: nn.Module, config: GeneratorConfig) -> list[Target]:
    """Resolve the config's target suffixes and layers against a concrete model."""
    suffixes = config.resolve_targets(model.config.model_type)
    layers_name, n_layers = _decoder_layers(model)
    wanted_layers = set(config.resolve_layers(n_layers))
    pattern = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.")
    all_names = [name for name, _ in model.named_modules() if name]
    targets, matched = [], set()
    for name, module in model.named_modules():
        hit = next((s for s in suffixes if name == s or name.endswith("." + s)), None)
        layer = pattern.match(name)
        if hit is None or layer is None:
            continue
        matched.add(hit)
        if int(layer.group(1)) not in wanted_layers:
            continue
        if isinstance(module, nn.Linear):
            dims, transposed = (module.in_features, module.out_features), False
        elif isinstance(module, Conv1D):
            dims, transposed = tuple(module.weight.shape), True  # (in, out)
        else:
            raise TypeError(
                f"target {name} is a {type(module).__name__}; only nn.Linear and Conv1D are supported"
            )
        targets.append(Target(name, int(layer.group(1)), dims[0], dims[1], transposed))
    missing = [s for s in suffixes if s not in matched]
    if missing:
        leaf_names = sorted({n.split(".")[-1] for n in all_names if pattern.match(n + ".")})
        layer0 = [n for n in all_names if n.startswith(f"{layers_name}.0.")]
        raise ValueError(
            f"target modules {missing} match no module inside the decoder layers of "
            f"{type(model).__name__}. Module names in layer 0: {layer0}. Leaf names: {leaf_names}"
        )
    return targets


def rms_normalize(h: Tensor) -> Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def window_mean(h: Tensor, mask: Tensor, back: int, ahead: int = 0) -> Tensor:
    """Mean of h (b, t, d) over each position's window of its row: its last `back` positions
    (itself included) and the next `ahead`, cut at the row's ends; masked positions (padding)
    never enter a real position's mean."""
    if back == 1 and ahead == 0:
        return h
    m = mask.to(h.dtype)[..., None]
    total = F.pad((h * m).cumsum(1), (0, 0, 1, 0))  # prefix sums, total[:, i] = sum of h[:, :i]
    count = F.pad(m.cumsum(1), (0, 0, 1, 0))
    here = torch.arange(1, h.shape[1] + 1, device=h.device)
    start, end = (here - back).clamp(min=0), (here + ahead).clamp(max=h.shape[1])
    return (total[:, end] - total[:, start]) / (count[:, end] - count[:, start]).clamp(min=1)


def normalize_state(S: Tensor, n: Tensor, mode: str, top_k: int | None = None) -> Tensor:
    """N(S) for a batch of states S (b, r_in, r) with token counts n (b,). Empty rows give 0."""
    if mode == "none":
        return S / n.clamp(min=1).to(S.dtype)[:, None, None]
    norm = torch.linalg.matrix_norm(S)  # Frobenius, (b,)
    nonzero = (norm > 0)[:, None, None]
    if mode == "frobenius":
        r = S.shape[-1]
        return torch.where(nonzero, S * (math.sqrt(r) / norm.clamp(min=1e-30))[:, None, None], 0.0)
    if mode == "svd":
        if top_k is None:
            return torch.where(nonzero, PolarFactor.apply(S), 0.0)
        U, _, Vh = torch.linalg.svd(S, full_matrices=False)
        return torch.where(nonzero, U[..., :top_k] @ Vh[..., :top_k, :], 0.0)
    raise ValueError(f"unknown normalization {mode!r}")


class PolarFactor(torch.autograd.Function):
    """U V^T for S = U diag(s) V^T (batched), with a backward that stays finite.

    Autograd through `torch.linalg.svd` differentiates U and V one by one, with 1/(s_i^2 - s_j^2)
    terms that cancel in U V^T only in exact arithmetic: with repeated singular values (any
    rank-deficient state, e.g. a short context) they give inf - inf = NaN. The derivative of the
    polar factor itself only divides by s_i + s_j (and, for tall S, by s_i).
    """

    @staticmethod
    def forward(ctx, S: Tensor) -> Tensor:
        tall = S.shape[-2] >= S.shape[-1]
        U, s, Vh = torch.linalg.svd(S if tall else S.mT, full_matrices=False)
        ctx.save_for_backward(U, s, Vh)
        ctx.tall = tall
        P = U @ Vh
        return P if tall else P.mT

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        U, s, Vh = ctx.saved_tensors
        G = grad if ctx.tall else grad.mT
        tiny = torch.finfo(s.dtype).eps * s.amax(-1, keepdim=True).clamp(min=1e-30)
        s = s.clamp(min=tiny)  # null directions of a rank-deficient S get a finite, large weight
        M = U.mT @ G @ Vh.mT  # (k, k)
        inner = U @ ((M - M.mT) / (s[..., :, None] + s[..., None, :])) @ Vh
        outer = G @ Vh.mT - U @ M  # the part of G outside span(U): tall S only
        dS = inner + (outer / s[..., None, :]) @ Vh
        return dS if ctx.tall else dS.mT


class ModuleGenerator(nn.Module):
    """Projections of one target module: A (r_in x in), K (r_in x d), V (r x d), B (out x r),
    and with `key_gate` the write gate G (d)."""

    def __init__(
        self, target: Target, hidden_size: int, config: GeneratorConfig, dtype: torch.dtype
    ):
        super().__init__()
        r, r_in = config.r, config.r_in

        def init(rows: int, cols: int) -> nn.Parameter:
            std = config.init_std if config.init_std is not None else cols**-0.5
            return nn.Parameter(torch.randn(rows, cols, dtype=dtype) * std)

        self.A = init(r_in, target.in_features)
        self.K = init(r_in, hidden_size)
        self.V = init(r, hidden_size)
        self.B = nn.Parameter(torch.zeros(target.out_features, r, dtype=dtype))
        gate = nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if config.key_gate else None
        self.register_parameter("G", gate)

    def statistics(self, h: Tensor, keys: Tensor) -> Tensor:
        """sum_t k_t (V h_t)^T for the tokens' `keys` k_t (zero at padding, so padding adds
        nothing): h (b, t, d), keys (b, t, r_in) -> (b, r_in, r)."""
        return keys.transpose(1, 2) @ (h @ self.V.T)

    def keys(self, h: Tensor, mask: Tensor, h_key: Tensor | None = None) -> Tensor:
        """g_t K k_t per token (b, t, r_in), k_t = h_key_t (default h_t), g_t the write gate (1
        without one), times `mask` (0 at padding): what `statistics` sums and a query A x is
        matched against."""
        k = (h if h_key is None else h_key) @ self.K.T
        if self.G is not None:
            k = k * (2 * torch.sigmoid(self.gate_logits(h)))[..., None]
        return k * mask[..., None]

    def gate_logits(self, h: Tensor) -> Tensor:
        """G . h_t per token (b, t): the write gate is 2 sigmoid of it."""
        if self.G is None:
            raise ValueError("this generator has no write gate (GeneratorConfig.key_gate is off)")
        return h @ self.G

    def mixer(self, N: Tensor, scaling: float) -> Tensor:
        """M = N (alpha/r) B^T (b, r_in, out): the side path is (x A^T) M, so made once per state
        it leaves two small matmuls per call (and never the out x in dW)."""
        return N @ (self.B.T * scaling)

    def delta(self, x: Tensor, N: Tensor, scaling: float) -> Tensor:
        """(alpha/r) B N^T A x for x (b, s, in) and per-row N (b, r_in, r); never builds dW."""
        return (x @ self.A.T) @ self.mixer(N, scaling)


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

    def statistics(
        self,
        hidden_states: tuple[Tensor, ...],
        mask: Tensor,
        keys: dict[str, Tensor] | None = None,
        write: Tensor | None = None,
        gates: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-row state increments from the base LM's hidden states (HF index l = input of layer l).
        With a `keys` dict, also fills it with the per-token keys summed, {name: (b, t, r_in)},
        and with a `gates` dict (generators with `key_gate`), with the gate logits {name: (b, t)}.
        `write` (b, t), optional, scales each token's write (its key); the key windows still see
        every real token. Diagnostics use it as an oracle gate (only the answer tokens write)."""
        out, mask = {}, mask.to(self.dtype)
        weight = mask if write is None else mask * write.to(self.dtype)
        for layer in self.layers:
            h, h_key = self.features(hidden_states[layer], mask)
            for t in self.targets:
                if t.layer == layer:
                    k = self[t.name].keys(h, weight, h_key)
                    if keys is not None:
                        keys[t.name] = k
                    if gates is not None:
                        gates[t.name] = self[t.name].gate_logits(h)
                    out[t.name] = self[t.name].statistics(h, k).to(self.state_dtype)
        return out

    def features(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(h, h̄) for one layer's hidden states (b, t, d) and mask (b, t): the RMS-normalised
        features values are made of, and their key-window means keys are made of."""
        h = rms_normalize(hidden.to(self.dtype))
        c = self.config
        return h, window_mean(h, mask.to(self.dtype), c.key_window, c.key_lookahead)

    def normalized(self, S: dict[str, Tensor], n: Tensor) -> dict[str, Tensor]:
        c = self.config
        return {
            k: normalize_state(s.to(self.dtype), n, c.normalization, c.svd_top_k)
            for k, s in S.items()
        }

    def lora_weights(self, S: dict[str, Tensor], n: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """{name: (lora_A (b, r, in), lora_B (out, r))}: the exact LoRA this state generates."""
        N = self.normalized(S, n)
        return {name: (N[name].transpose(1, 2) @ self[name].A, self[name].B) for name in self.names}

    def fingerprint(self) -> str:
        """Identity of what a state means: config shape + the K, V weights that produce S."""
        blocks = [self[name] for name in self.names]
        params = [p for b in blocks for p in (b.K, b.V, b.G) if p is not None]
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            h = hashlib.sha256()
            c = self.config
            shape = (c.base_model, c.r, c.r_in, self.names)
            # windowed keys mean another S; per-token keys keep their earlier fingerprints
            # (a gate's weights enter below, with K and V)
            window = (c.key_window,) if c.key_window != 1 else ()
            window += ("ahead", c.key_lookahead) if c.key_lookahead else ()
            h.update(repr(shape + window).encode())
            for p in params:
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint_cache = (key, h.hexdigest()[:16])
        return self._fingerprint_cache[1]
