"""GeneratorConfig: everything that fixes a generator's shape and behaviour, with a JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NORMALIZATIONS = ("frobenius", "svd", "none")
MEMORIES = ("linear", "ridge")  # genadapter/memory.py
DTYPES = ("float32", "float64", "bfloat16", "float16")

# Default targets per architecture: the two linears that write into the residual stream
# (attention output and MLP down projection), matched by name suffix.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("o_proj", "down_proj"),
    "mistral": ("o_proj", "down_proj"),
    "mixtral": ("o_proj",),
    "qwen2": ("o_proj", "down_proj"),
    "qwen3": ("o_proj", "down_proj"),
    "gemma": ("o_proj", "down_proj"),
    "gemma2": ("o_proj", "down_proj"),
    "phi3": ("o_proj", "down_proj"),
    "olmo": ("o_proj", "down_proj"),
    "olmo2": ("o_proj", "down_proj"),
    "granite": ("o_proj", "down_proj"),
    "smollm3": ("o_proj", "down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "dense_4h_to_h"),
    "phi": ("self_attn.dense", "fc2"),
    "opt": ("out_proj", "fc2"),
    "falcon": ("self_attention.dense", "dense_4h_to_h"),
}


def strict_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """Build a dataclass from a dict, naming unknown keys (typos) instead of ignoring them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return cls(**data)


def _check_int(owner: str, name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        what = "a positive int" if least == 1 else f"an int >= {least}"
        raise ValueError(f"{owner}.{name} must be {what}, got {value!r}")


@dataclass
class KeyConfig:
    """How a context token's key is made: the research knobs of the write side.

    Every option keeps reading exact streaming: windows never leave their chunk, which is read
    in one forward, and the gate reads only the token's own features.
    """

    # keys from the mean feature of each token's last `window` tokens (1 = per-token keys).
    # Values stay per token: a value at the end of "<subject> <relation> <value>" gets a key
    # that still sees its subject.
    window: int = 1
    # keys also see the next `lookahead` tokens: a value stated before its relation
    # ("<value> founded <org>") then gets a key that sees the relation too
    lookahead: int = 0
    # a learned per-token write gate 2 sigmoid(G . h_t) on each key (G = 0 at init: gate 1), so
    # the state can keep the tokens that carry facts and drop the rest
    gate: bool = False
    # keys of unit length (before the gate): a least-squares memory then weighs every written
    # token alike. Queries stay A x: normalising them would make dW depend on x (not a LoRA).
    normalize: bool = False
    # the window moved `shift` tokens back: a value's key from the tokens before it ("<key> is"),
    # not from the value itself (the standard binding of associative recall; 0 = off)
    shift: int = 0

    def __post_init__(self) -> None:
        _check_int("KeyConfig", "window", self.window, 1)
        _check_int("KeyConfig", "lookahead", self.lookahead, 0)
        _check_int("KeyConfig", "shift", self.shift, 0)
        for name in ("gate", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KeyConfig.{name} must be a bool, got {getattr(self, name)!r}")


@dataclass
class QueryConfig:
    """Where a target's query comes from: the read side's counterpart of KeyConfig.

    By default the query at position s is A x_s, the target's own input: the adapter is then a
    LoRA (mergeable, exportable). A pooled query is A h̃_s, h̃_s the mean of RMS-normalised layer
    features over the row's last `window` positions: a question is matched by all of its tokens,
    as keys are made. It is computed in the side path (genadapter/queries.py), so it is no
    weight delta: merge and PEFT export refuse it.
    """

    # the query reads the mean feature of each position's last `window` positions (itself
    # included); 1 with no `layer` = the LoRA query A x
    window: int = 1
    # features from this decoder layer's input (HF hidden_states[layer]) instead of the
    # target's own layer; at most the lowest target's layer, which runs after it
    layer: int | None = None

    def __post_init__(self) -> None:
        _check_int("QueryConfig", "window", self.window, 1)
        if self.layer is not None:
            _check_int("QueryConfig", "layer", self.layer, 0)

    @property
    def pooled(self) -> bool:
        """Whether queries read pooled layer features (A: r_in x hidden) instead of x."""
        return self.window > 1 or self.layer is not None

    def layer_of(self, target_layer: int) -> int:
        """The layer whose features a pooled query of a target in `target_layer` reads."""
        return target_layer if self.layer is None else self.layer


# the flat names of KeyConfig's fields before it existed (saved generators, older YAML)
LEGACY_KEY_FIELDS = {"key_window": "window", "key_lookahead": "lookahead", "key_gate": "gate"}


def upgrade_legacy_fields(data: dict[str, Any], keys: KeyConfig | None = None) -> dict[str, Any]:
    """Fold flat `key_*` fields (and a partial `keys` dict) into one `keys` KeyConfig."""
    data = dict(data)
    base = keys or KeyConfig()
    given = data.pop("keys", None)
    if isinstance(given, KeyConfig):
        base, given = given, {}
    updates = {LEGACY_KEY_FIELDS[k]: data.pop(k) for k in list(data) if k in LEGACY_KEY_FIELDS}
    updates.update(given or {})
    data["keys"] = dataclasses.replace(base, **updates) if updates else base
    return data


@dataclass
class GeneratorConfig:
    """Shape and behaviour of a generative adapter (docs/method.md has the math).

    layers: None or "all" for every decoder layer; "upper_half"; a slice "start:stop"
    (Python semantics, negatives allowed, e.g. "-10:"); or an explicit list of indices.
    target_modules: name suffixes as in PEFT; None picks the architecture's default.
    """

    r: int = 32
    r_in: int = 32
    alpha: float = 32.0
    target_modules: list[str] | None = None
    layers: str | list[int] | None = None
    normalization: str = "frobenius"
    svd_top_k: int | None = None
    decay: float = 1.0
    chunk_len: int = 128
    keys: KeyConfig = field(default_factory=KeyConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    # what the state stores and how it is read out (genadapter/memory.py): "linear" sums
    # k_t v_t^T; "ridge" also keeps H = sum_t k_t k_t^T and solves (H + lam_bar I)^-1 G
    memory: str = "linear"
    ridge_lambda: float = 0.01  # lam, relative to tr(H) / r_in
    ridge_learned: bool = False  # lam learned per target (starting at ridge_lambda)
    # values v_t = V h_t from this layer's features instead of the target's own (0 = the token
    # embeddings: with a tied LM head, a value read out at a top layer says which token to copy)
    value_layer: int | None = None
    # with value_layer 0: each token's value also carries its word as spelled without the
    # leading space (rms(e(x)) + rms(e(bare x))): a chat answer's first word is spelled so,
    # the same word inside a context sentence is not (docs/method.md, "Bare spellings")
    value_bare: bool = False
    # keys K h̄_t from this layer's features instead of the target's own (the gate still reads
    # the target's layer): a match made where the features bind best, read out in another layer
    key_layer: int | None = None
    dtype: str = "float32"
    init_std: float | None = None  # std of A, K, V; None = 1/sqrt(fan_in)
    base_model: str | None = None  # hub id or path of the frozen LM, recorded by from_base
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (training run, ...)

    def __post_init__(self) -> None:
        for name in ("r", "r_in", "chunk_len"):
            _check_int("GeneratorConfig", name, getattr(self, name), 1)
        if isinstance(self.keys, dict):
            self.keys = strict_from_dict(KeyConfig, self.keys, "KeyConfig fields")
        if not isinstance(self.keys, KeyConfig):
            raise ValueError(f"GeneratorConfig.keys must be a KeyConfig, got {self.keys!r}")
        if isinstance(self.queries, dict):
            self.queries = strict_from_dict(QueryConfig, self.queries, "QueryConfig fields")
        if not isinstance(self.queries, QueryConfig):
            raise ValueError(f"GeneratorConfig.queries must be a QueryConfig, got {self.queries!r}")
        if self.memory not in MEMORIES:
            raise ValueError(f"memory must be one of {MEMORIES}, got {self.memory!r}")
        for name in ("value_layer", "key_layer"):
            if getattr(self, name) is not None:
                _check_int("GeneratorConfig", name, getattr(self, name), 0)
        if self.value_bare and self.value_layer != 0:
            raise ValueError("value_bare needs values from the token embeddings (value_layer: 0)")
        if not float(self.ridge_lambda) > 0.0:
            raise ValueError(f"ridge_lambda must be > 0, got {self.ridge_lambda}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.svd_top_k is not None and not (1 <= self.svd_top_k <= min(self.r, self.r_in)):
            raise ValueError(f"svd_top_k must be in [1, min(r, r_in)], got {self.svd_top_k}")
        if not (0.0 < float(self.decay) <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules must not be empty")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    def replace(self, **changes: Any) -> GeneratorConfig:
        """A copy with `changes`; `keys` and `queries` may be partial dicts, the flat `key_*`
        names work too."""
        changes = upgrade_legacy_fields(changes, self.keys)
        if isinstance(changes.get("queries"), dict):
            changes["queries"] = dataclasses.replace(self.queries, **changes["queries"])
        return dataclasses.replace(self, **changes)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def resolve_targets(self, model_type: str) -> list[str]:
        if self.target_modules is not None:
            return self.target_modules
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default target modules for model_type {model_type!r}; "
                "pass GeneratorConfig(target_modules=[...])"
            )
        return list(DEFAULT_TARGETS[model_type])

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The decoder-layer indices that get adapters."""
        spec = self.layers
        if spec is None or spec == "all":
            return list(range(num_layers))
        if spec == "upper_half":
            return list(range(num_layers // 2, num_layers))
        if isinstance(spec, str):
            parts = spec.split(":")
            if len(parts) != 2:
                raise ValueError(
                    f"layers must be 'all', 'upper_half', 'start:stop' or a list; got {spec!r}"
                )
            start, stop = (int(p) if p.strip() else None for p in parts)
            chosen = list(range(num_layers))[slice(start, stop)]
        else:
            chosen = []
            for i in spec:
                if not -num_layers <= int(i) < num_layers:
                    raise ValueError(f"layer {i} out of range for a model with {num_layers} layers")
                chosen.append(int(i) % num_layers)
            chosen = sorted(set(chosen))
        if not chosen:
            raise ValueError(f"layers={spec!r} selects no layer of {num_layers}")
        return chosen

    # --- JSON round-trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        """From `to_dict`'s output, or from a saved config of before KeyConfig (flat `key_*`)."""
        return strict_from_dict(cls, upgrade_legacy_fields(data), "GeneratorConfig fields")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GeneratorConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> GeneratorConfig:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
