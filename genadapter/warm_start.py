"""Warm starts: a generator that binds before it is trained (docs/method.md §2).

`fit_queries`: queries that start as keys, each target's A fitted so that A x_t = K h̄_t in the
frozen LM. `copy_values`: values that are copies, V and B set so that a value read out adds the
read token's output embedding to the residual stream. Together, on a ridge memory with keys
shifted one token back and values from the token embeddings (`value_layer: 0`), a question
ending in a context's words raises the logit of the token that followed them there: recall with
no training (experiments/recall/analytic_copy.py), a start that training only refines.

Queries. With keys shifted back (`KeyConfig.shift` = s) a value v_t is written under the key of the
tokens before it, K h̄_{t-s}. A question that ends in those same tokens ("You will find Ruper
Duleth in") finds that value if its query is the key those tokens would write, and a least-
squares memory then reads that key's value nearly alone (docs/method.md §4). No match is left
to learn, which is what training from random A, K never found on recall in 150 steps.

A reads the target's input x, keys read the layer's normalised input h: A = K R, R the ridge
regression of h̄_t (the key window at shift 0) on x_t over calibration text. The fit is exact
when the target reads a norm of h (an attention's q/k/v projection; R² 1), close for an MLP's
(up_proj R² 0.99, down_proj 0.85-0.93 in SmolLM2), poor for o_proj (0.5); `fit_queries` returns
each target's R² so a user sees which.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunking import cut, pad
from .generator import rms_normalize, window_mean

RIDGE = 1e-4  # of the regressions, relative to tr(X^T X) / in_features


def regression(X: Tensor, Y: Tensor, lam: float = RIDGE) -> tuple[Tensor, float]:
    """R (out x in) minimising |X R^T - Y|^2 + lam_bar |R|^2 in float64, and its R² on X, Y."""
    X, Y = X.double(), Y.double()
    XtX = X.T @ X
    lam_bar = lam * XtX.diagonal().sum() / XtX.shape[0]
    R = torch.linalg.solve(XtX + lam_bar * torch.eye(XtX.shape[0], dtype=X.dtype), X.T @ Y).T
    return R, r_squared(X, Y, R)


def r_squared(X: Tensor, Y: Tensor, R: Tensor) -> float:
    """The share of Y's variance that X R^T explains (in float64; on held-out X, Y too)."""
    X, Y, R = X.double(), Y.double(), R.double()
    return float(1 - (Y - X @ R.T).pow(2).sum() / (Y - Y.mean(0)).pow(2).sum())


@torch.no_grad()
def set_queries(block, R: Tensor) -> None:
    """A = K R for one target's ModuleGenerator: the query of x is the key R x would write."""
    block.A.copy_((block.K.double() @ R.to(block.K.device)).to(block.A.dtype))


def target_inputs(ga, ids: Tensor, mask: Tensor) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """{target: its input x (b, t, in)} in the frozen LM reading these rows, and its hidden
    states (HF `hidden_states[l]`: the input of layer l, what `context_features` returns), from
    one forward."""
    modules = dict(ga.base_model.named_modules())
    out, handles = {}, []
    for name in ga.generator.names:
        hook = lambda module, args, name=name: out.__setitem__(name, args[0])  # noqa: E731
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        hidden = ga.base_model(
            input_ids=ids.to(ga.device),
            attention_mask=mask.to(ga.device),
            output_hidden_states=True,
        ).hidden_states
    finally:
        for h in handles:
            h.remove()
    return out, hidden


@torch.no_grad()
def fit_queries(ga, texts: list[str], max_chunks: int = 64, batch: int = 16) -> dict[str, float]:
    """Set every target's A to K R (see the module docstring) from `texts` read in the
    generator's chunks (at most `max_chunks`); returns each target's R². B stays as it is.

    Pooled queries (GeneratorConfig.queries) read the features keys are made of: A = K, no
    text needed (`tie_queries`)."""
    gen, tok = ga.generator, ga.tokenizer
    if gen.config.queries.pooled:
        return tie_queries(ga)
    c = gen.config
    chunks = [
        ids for t in texts for ids in cut(tok(t, add_special_tokens=False).input_ids, c.chunk_len)
    ]
    chunks = [ids for ids in chunks if len(ids) > c.keys.window][:max_chunks]
    if not chunks:
        raise ValueError("fit_queries needs calibration text longer than the key window")
    xs: dict[str, list] = {}
    ys: dict[int, list] = {}
    keys = c.keys
    for start in range(0, len(chunks), batch):
        ids, mask = pad(chunks[start : start + batch], pad_id=tok.pad_token_id or 0)
        inputs, hidden = target_inputs(ga, ids, mask)
        mask = mask.to(ga.device)
        real = mask.bool()
        for name, x in inputs.items():
            xs.setdefault(name, []).append(x[real].cpu())
        for layer in gen.feature_layers:
            h = gen.features(hidden[layer], mask)[0]
            h_key = window_mean(h, mask.to(h), keys.window, keys.lookahead, 0)
            ys.setdefault(layer, []).append(h_key[real].cpu())
    fits = {}
    for target in gen.targets:
        key_layer = target.layer if c.key_layer is None else c.key_layer
        R, fits[target.name] = regression(torch.cat(xs[target.name]), torch.cat(ys[key_layer]))
        set_queries(gen[target.name], R)
    return fits


@torch.no_grad()
def tie_queries(ga) -> dict[str, float]:
    """A = K for every target with pooled queries from the layer its keys come from: a
    question's query is the key its window of tokens would write (R = I, R² 1 each)."""
    c = ga.generator.config
    fits = {}
    for t in ga.generator.targets:
        key_layer = t.layer if c.key_layer is None else c.key_layer
        query_layer = c.queries.layer_of(t.layer)
        if key_layer != query_layer:
            raise ValueError(
                f"queries from layer {query_layer} and keys from layer {key_layer} of {t.name} "
                "cannot be tied: set queries.layer to the key layer"
            )
        set_queries(ga.generator[t.name], torch.eye(ga.generator.hidden_size, dtype=torch.float64))
        fits[t.name] = 1.0
    return fits


def final_norm_weight(model) -> Tensor | None:
    """The gain of the norm the LM head reads (Llama-style `model.norm`, GPT-2's `ln_f`,
    GPT-NeoX's `final_layer_norm`), or None when the model has none of these."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        weight = getattr(getattr(decoder, name, None), "weight", None)
        if weight is not None:
            return weight.detach()
    return None


def whitening(U: Tensor, gain: Tensor | None, mu: float) -> Tensor:
    """W (d x d) such that adding W u_x to the residual stream raises token y's logit by
    u_y' P u_x' with u' = gain * u (what the head sees after the final norm) and
    P = (C + mu tr(C)/d I)^-1, C = U'^T U' / vocab: the copy leaves out the directions every
    output embedding shares, so a sum of many copies crosses over less (mu -> inf: a copy of
    u', the plain copy when the gain is 1). Scaled so that a token's own logit rises as much as
    under the plain copy, on average over the vocabulary."""
    g = torch.ones(U.shape[1], dtype=U.dtype) if gain is None else gain.to(U)
    Ug = U * g
    C = Ug.T @ Ug / U.shape[0]
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    W = torch.linalg.inv(C + mu * C.trace() / C.shape[0] * eye) * g  # P diag(g)
    plain, whitened = (Ug * U).sum(1).mean(), (Ug * (U @ W.T)).sum(1).mean()
    return W * (plain / whitened)


@torch.no_grad()
def copy_values(ga, beta: float, whiten: float | None = None) -> None:
    """Set every target's V and B so that a value V rms(e) read out adds beta u to the target's
    output, e and u a token's input and output embeddings: V the top r principal axes of the
    normalised embeddings (all of them at r = d), B = beta M V^T / scaling, M the regression of u
    on rms(e) over the vocabulary (for a tied LM head, a multiple of the identity). `whiten` mu:
    the copy adds beta W u instead (`whitening`).

    Needs values from the token embeddings (`value_layer: 0`) and targets that write into the
    residual stream (out_features = hidden size: o_proj, down_proj). beta is the size of the copy
    in units of |u| for a read-out that is exactly one value; `normalization: none` keeps it."""
    gen = ga.generator
    if gen.config.value_layer != 0:
        raise ValueError("copy_values needs values from the token embeddings (value_layer: 0)")
    d = gen.hidden_size
    wrong = [t.name for t in gen.targets if t.out_features != d]
    if wrong:
        raise ValueError(f"copy_values needs targets that write the residual stream; not {wrong}")
    model = ga.base_model
    E = rms_normalize(model.get_input_embeddings().weight.detach().double())
    head = model.get_output_embeddings()
    U = E if head is None else head.weight.detach().double()
    M = regression(E, U)[0]  # (d, d): rms(e) -> u
    if whiten is not None:
        M = whitening(U, final_norm_weight(model), whiten) @ M
    r = gen.config.r
    if r > d:
        raise ValueError(f"copy_values needs r <= the hidden size {d}, got r = {r}")
    V = torch.linalg.svd(E - E.mean(0), full_matrices=False).Vh[:r] if r < d else torch.eye(d)
    for target in gen.targets:
        block = gen[target.name]
        block.V.copy_(V.to(block.V))
        block.B.copy_((beta * M @ V.T.to(M) / gen.config.scaling).to(block.B))
