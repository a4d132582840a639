"""Does a query that *is* a key bind on `recall`, with no training? The match a ridge memory makes.

A ridge state weighs context token t, for a query q, by w_t = k_t^T (H + lam_bar I)^-1 q (H the
keys' covariance). If a query is the same feature map as a key (q = K h at the question's last
token, k_t = K h̄_t with the key window shifted back one token, so a value is stored under the
tokens before it: "... will find Ruper Duleth in | Odense"), nothing is left to learn in the
match. This probe measures, per layer and with no fitted parameter, how often the asked pair's
value token gets the largest |w_t| among the K values the context gives (chance 1/K) and among
every context token, and how often the read-out of the tokens' embeddings (the values of
`GeneratorConfig.value_layer: 0`) points at the asked value's embedding first; for the raw
features (d = 576), random projections K to r_in = 32 / 128, and a plain dot product (the linear
memory's weight k_t . q) as the reference. `--query mid` takes the question's query from the
residual after the layer's attention (what an MLP's input projections read) instead.

    python experiments/diagnostics/recall_match.py [--k 16] [--episodes 16] [--window 1 4] [--query mid]
        [--span mean] [--out PATH]   # ~2 min a window
Writes results/recall_match.{json,png} (--out).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from genadapter.assets import DEFAULT_MODEL  # noqa: E402
from genadapter.chunking import pad  # noqa: E402
from genadapter.config import GeneratorConfig, KeyConfig  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.generator import window_mean  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.training.instruct_data import (  # noqa: E402
    answer_positions,
    collate_episodes,
    encode_episode,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).parent / "results" / "recall_match.json"
LAMBDA = 0.01  # relative to tr(H) / dim, as GeneratorConfig.ridge_lambda


def question_mean(h: Tensor, mask: Tensor) -> Tensor:
    """(Q, d) the mean of h (Q, t, d) over each question's tokens but the BOS its prompt starts
    with (`mask` (Q, t), right-padded)."""
    m = mask.clone()
    m[:, 0] = 0
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)


def weights(keys: Tensor, q: Tensor, memory: str) -> Tensor:
    """Read-out weight of every context token (N,) for one query (dim,)."""
    if memory == "linear":
        return keys @ q
    H = keys.T @ keys
    lam = LAMBDA * H.diagonal().sum() / H.shape[0]
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    return keys @ torch.linalg.solve(H + lam * eye, q)


def mid(ga: GenerativeAdapter, ids: Tensor, mask: Tensor) -> dict[int, Tensor]:
    """{layer l: the residual stream after l's attention} (the input of its MLP's norm)."""
    out, handles = {}, []
    for layer, block in enumerate(ga.base_model.model.layers):
        hook = lambda m, args, layer=layer: out.__setitem__(layer, args[0])  # noqa: E731
        handles.append(block.post_attention_layernorm.register_forward_pre_hook(hook))
    try:
        ga.base_model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return out


def episode_features(
    ga, fmt: PromptFormat, episode, window: int, query: str = "input", span: str = "last"
):
    """Per layer: (h̄ of every context token (N, d), h at each question's last token, or with
    `span` "mean" the mean of h over the question's tokens (Q, d));
    each question's gold value's first token (Q, N), the first tokens of every value the context
    gives (N,), and the token embeddings' features (N, d)."""
    c = ga.generator.config
    enc = encode_episode(episode, fmt, c.chunk_len)
    batch = collate_episodes([enc], [0], c.chunk_len, fmt.tokenizer.pad_token_id or 0)
    ids, mask = batch["context_ids"][0], batch["context_mask"][0]  # (T, C): chunks read alone
    gen = ga.generator
    with torch.no_grad():
        hidden = ga.context_features(ids, mask)
        p_ids, p_mask = pad(enc.prompts, pad_id=fmt.tokenizer.pad_token_id or 0)
        q_hidden = (
            ga.context_features(p_ids, p_mask) if query == "input" else mid(ga, p_ids, p_mask)
        )
    last = p_mask.sum(1) - 1
    flat = mask.flatten().bool()
    gold = batch["answer_context"].flatten(1)[:, flat]  # (Q, N)
    first = gold & ~F.pad(gold, (1, 0))[:, :-1]  # a value's first token
    # every value the context gives (each question's options hold 8 of the K), not only the asked
    options = sorted({o for qa in episode.qas for o in qa.options or []})
    where = answer_positions(episode.context_texts(), options, fmt.tokenizer, c.chunk_len)
    values = torch.zeros(mask.numel(), dtype=torch.bool)
    values[[p for ps in where for p in ps]] = True
    values = values[flat]
    values &= ~F.pad(values, (1, 0))[:-1]
    out = {}
    for layer in gen.layers:
        h = gen.features(hidden[layer], mask)[0]
        keys = window_mean(h, mask.float(), window, 0, 1).flatten(0, 1)[flat]
        q = gen.features(q_hidden[layer], p_mask)[0]
        q = question_mean(q, p_mask) if span == "mean" else q[torch.arange(len(last)), last]
        out[layer] = (keys.double(), q.double())
    embeddings = gen.features(hidden[0], mask)[0].flatten(0, 1)[flat].double()
    return out, first, values | first.any(0), embeddings


def score(keys: Tensor, q: Tensor, emb: Tensor, gold: Tensor, values: Tensor, memory: str):
    """One question: does the asked value's token weigh most among the values (`match`) and
    among every token (`every_token`), and does the read-out of the tokens' embeddings,
    sum_t w_t e_t, point at the asked value's embedding before the others' (`copy`)?"""
    w = weights(keys, q, memory)
    copy = emb[values] @ (w @ emb)
    return {
        "match": bool(gold[w.abs().masked_fill(~values, -1).argmax()]),
        "every_token": bool(gold[w.abs().argmax()]),
        "copy": bool(gold[values][copy.argmax()]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--window", type=int, nargs="+", default=[1, 4])
    p.add_argument("--split", default="validation")
    p.add_argument("--query", choices=["input", "mid"], default="input")
    p.add_argument(
        "--span", choices=["last", "mean"], default="last", help="query: last token or mean"
    )
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.manual_seed(0)
    config = GeneratorConfig(
        target_modules=["v_proj"], chunk_len=64, keys=KeyConfig(shift=1), layers="all"
    )
    ga = GenerativeAdapter.from_base(DEFAULT_MODEL, config).eval()
    fmt = PromptFormat(ga.tokenizer)
    d = ga.generator.hidden_size
    proj = {r: torch.randn(r, d, dtype=torch.float64) / d**0.5 for r in (32, 128)}
    path = ROOT / "data" / "benchmarks" / "recall" / f"{args.split}-k{args.k}.jsonl"
    episodes = read_episodes(path)[0][: args.episodes]
    cases = [(m, r) for m in ("linear", "ridge") for r in (d, 128, 32)]
    tallies: dict[str, list[dict]] = {}
    for window in args.window:
        for episode in tqdm(episodes, desc=f"window {window}"):
            feats, first, values, emb = episode_features(
                ga, fmt, episode, window, args.query, args.span
            )
            for layer, (keys, q) in feats.items():
                for memory, r in cases:
                    k_, q_ = (keys, q) if r == d else (keys @ proj[r].T, q @ proj[r].T)
                    for row in (i for i in range(len(q_)) if first[i].any()):
                        found = score(k_, q_[row], emb, first[row], values, memory)
                        tallies.setdefault(f"w{window}/{memory}/{r}/{layer}", []).append(found)
    results = {
        name: {m: sum(f[m] for f in found) / len(found) for m in found[0]} | {"n": len(found)}
        for name, found in tallies.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"k": args.k, "query": args.query, "span": args.span, "split": args.split}
    args.out.write_text(json.dumps(meta | {"results": results}, indent=1) + "\n")
    fig, axes = plt.subplots(2, len(args.window), figsize=(6 * len(args.window), 7), squeeze=False)
    for col, window in enumerate(args.window):
        for row, (metric, what) in enumerate(
            [("match", "asked value weighs most"), ("copy", "read-out copies the asked value")]
        ):
            ax = axes[row, col]
            for memory, r in cases:
                pts = sorted(
                    (int(n.split("/")[-1]), v[metric])
                    for n, v in results.items()
                    if n.startswith(f"w{window}/{memory}/{r}/")
                )
                ax.plot(*zip(*pts, strict=True), label=f"{memory}, dim {r}")
            ax.axhline(1 / args.k, color="gray", ls=":", label="chance")
            ax.set(title=f"key window {window}, shift 1, K = {args.k}", xlabel="layer")
            ax.set(ylabel=f"{what} (among the K values)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    for name, v in results.items():
        if name.endswith(("/2", "/6", "/10", "/14", "/18", "/22", "/26", "/29")):
            print(
                f"{name:22s} "
                + "  ".join(f"{m} {v[m]:.2f}" for m in ("match", "every_token", "copy"))
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
