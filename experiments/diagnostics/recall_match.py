"""Does a query that *is* a key bind on `recall`, with no training? The match a ridge memory makes.

A ridge state weighs context token t, for a query q, by w_t = k_t^T (H + lam_bar I)^-1 q (H the
keys' covariance). If a query is the same feature map as a key (q = K h at the question's last
token, k_t = K h̄_t with the key window shifted back one token, so a value is stored under the
tokens before it: "... will find Ruper Duleth in | Odense"), nothing is left to learn in the
match. This probe measures, per layer and with no fitted parameter, how often the asked pair's
value token gets the largest |w_t| among the K values the context gives (chance 1/K), and among
every context token; for the raw features (d = 576), random projections K to r_in = 32 / 128, and
a plain dot product (the linear memory's weight k_t . q) as the reference.

    python experiments/diagnostics/recall_match.py [--k 16] [--episodes 16] [--window 1 4]
Writes results/recall_match.{json,png}.
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
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from genadapter.assets import DEFAULT_MODEL  # noqa: E402
from genadapter.chunking import pad  # noqa: E402
from genadapter.config import GeneratorConfig, KeyConfig  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.generator import window_mean  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.training.instruct_data import collate_episodes, encode_episode  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).parent / "results" / "recall_match.json"
LAMBDA = 0.01  # relative to tr(H) / dim, as GeneratorConfig.ridge_lambda


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


def episode_features(ga, fmt: PromptFormat, episode, window: int, query: str = "input"):
    """Per layer: (h̄ of every context token (N, d), h at each question's last token (Q, d)), and
    each question's gold value tokens (Q, N) and the value tokens of every pair (N,)."""
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
    first = gold & ~torch.nn.functional.pad(gold, (1, 0))[:, :-1]  # a value's first token
    out = {}
    for layer in gen.layers:
        h = gen.features(hidden[layer], mask)[0]
        keys = window_mean(h, mask.float(), window, 0, 1).flatten(0, 1)[flat]
        q = gen.features(q_hidden[layer], p_mask)[0][torch.arange(len(last)), last]
        out[layer] = (keys.double(), q.double())
    embeddings = gen.features(hidden[0], mask)[0].flatten(0, 1)[flat].double()
    return out, first, first.any(0), embeddings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--window", type=int, nargs="+", default=[1, 4])
    p.add_argument("--split", default="validation")
    p.add_argument("--query", choices=["input", "mid"], default="input")
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
    cases = [(m, r) for m in ("linear", "ridge") for r in (None, 128, 32)]
    counts: dict[str, list] = {}
    for window in args.window:
        for episode in tqdm(episodes, desc=f"window {window}"):
            feats, first, values, emb = episode_features(ga, fmt, episode, window, args.query)
            for layer, (keys, q) in feats.items():
                for memory, r in cases:
                    k_, q_ = (keys, q) if r is None else (keys @ proj[r].T, q @ proj[r].T)
                    for row in range(len(q_)):
                        if not first[row].any():
                            continue
                        signed = weights(k_, q_[row], memory)
                        w = signed.abs()
                        # the value a token writes is its embedding: which value does the
                        # read-out sum_t w_t e_t point at?
                        copy = emb[values] @ (signed @ emb)
                        tally_copy = counts.setdefault(
                            f"copy/{window}/{memory}/{r or d}/{layer}", [0, 0, 0]
                        )
                        tally_copy[0] += int(first[row, values][copy.argmax()])
                        tally_copy[2] += 1
                        among = w.masked_fill(~values, -1).argmax()
                        name = f"w{window}/{memory}/{r or d}/{layer}"
                        tally = counts.setdefault(name, [0, 0, 0])
                        tally[0] += int(first[row, among])
                        tally[1] += int(first[row, w.argmax()])
                        tally[2] += 1
    results = {
        name: {"among_values": a / n, "every_token": e / n, "questions": n}
        for name, (a, e, n) in counts.items()
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"k": args.k, "results": results}, indent=1) + "\n")
    fig, axes = plt.subplots(1, len(args.window), figsize=(6 * len(args.window), 4), squeeze=False)
    for ax, window in zip(axes[0], args.window, strict=True):
        for memory, r in cases:
            pts = sorted(
                (int(n.split("/")[-1]), v["among_values"])
                for n, v in results.items()
                if n.startswith(f"w{window}/{memory}/{r or d}/")
            )
            ax.plot(*zip(*pts, strict=True), label=f"{memory}, dim {r or d}")
        ax.axhline(1 / args.k, color="gray", ls=":", label="chance")
        ax.set(title=f"key window {window}, shift 1, K = {args.k}", xlabel="layer")
        ax.set(ylabel="asked value has the largest weight")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)
    for name, v in results.items():
        if name.endswith(("/2", "/6", "/10", "/14", "/18", "/22", "/26", "/29")):
            print(
                f"{name:28s} among values {v['among_values']:.2f}  every token {v['every_token']:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
