"""Fit the generator's match (K, A) and write gate (G) offline, to convergence, on frozen features.

The instruction-tuning ablations show that decoding a read-out works (the oracle row: 71 %
choice) but selection does not: in 120 steps the query A x never learns to pick its own fact's
keys K h_t, even among the 4 written ones. The binding probe found such a match in the frozen
features only after a converged fit on thousands of questions. This script makes that fit for the
generator's own parameters, on exactly what the generator sees (chunks read alone, its key window
and the module inputs x of the base LM), and saves a generator to start instruction tuning from.

Per target module, on facts training episodes (every question of an episode), A, K and G are
fitted together on the state's own read-out weights g_t s_t, where s_t = (K h̄_t) . (A x) / sqrt(r_in)
scores the question's query x (the module's input at the last prompt token) against context token
t and g_t = 2 sigmoid(G . h_t) is its write gate. The loss is -log of the gold tokens' share of
sum_t g_t |s_t| over the context (the other facts' values all kept, the remaining tokens sampled and
weighted up), plus a balanced cross-entropy that opens the gate on value tokens.
Measured on validation episodes over *every* context token, before and after the fit:
`hit` (the largest g_t |s_t| is a gold token) and `share` (the gold share of sum g_t |s_t|); also
without the gate (`_ungated`) and among the value tokens only (`_values`, chance ~25 %).

    python experiments/diagnostics/match_fit.py   # ~45 min here; needs `genadapter make-benchmarks`
        [--episodes 1000] [--init DIR] [--key-window 16] [--key-lookahead 16] [--steps 300] [--keep-b]
        [--out DIR]        # the fitted generator (default runs/match-fit/generator)
Writes results/match_fit.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from genadapter.chunking import pad, real_chunks, scatter_chunks  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.training.instruct_data import collate_episodes, encode_episode  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).parent / "results" / "match_fit.json"
SEED, BATCH, OTHERS = 0, 8, 48  # episodes per frozen pass; non-value tokens kept per episode


def features(ga: GenerativeAdapter, batch: dict) -> tuple[dict[int, tuple], torch.Tensor]:
    """{layer: (h, h̄)} (E, T*C, d) as the generator reads the contexts, and the context mask."""
    ids, mask = batch["context_ids"], batch["context_mask"]
    E, T, C = ids.shape
    where = real_chunks(mask)  # each real chunk read alone, as `read` reads it
    real_mask = mask.flatten(0, 1)[where]
    hidden = ga.context_features(ids.flatten(0, 1)[where], real_mask)
    out = {}
    for layer in ga.generator.layers:
        pair = ga.generator.features(hidden[layer], real_mask)
        out[layer] = tuple(scatter_chunks(x, where, E, T).flatten(1, 2) for x in pair)
    return out, mask.view(E, T * C).bool()


def queries(
    ga: GenerativeAdapter, prompts: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """{target: its input x at each prompt's last token} in the base LM, (R, in)."""
    ids, attn = pad(prompts, pad_id=pad_id)
    lengths = attn.sum(1)
    rows, last, out, handles = torch.arange(len(prompts)), lengths - 1, {}, []
    modules = dict(ga.base_model.named_modules())
    for name in ga.generator.names:

        def hook(module, args, name=name):
            out[name] = args[0][rows, last].float()

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            ga.base_model(input_ids=ids, attention_mask=attn)
    finally:
        for h in handles:
            h.remove()
    return out


def collect(ga: GenerativeAdapter, fmt: PromptFormat, path: Path, n: int, every_token: bool):
    """Features of n episodes' kept context tokens (every value token, and every other token with
    `every_token`, else OTHERS of them at random, weighted up to stand for all), their queries and
    gold masks; flat over episodes. Cached as safetensors next to the episodes (probe/)."""
    c = ga.generator.config
    tag = "all" if every_token else f"others{OTHERS}"
    cache = (
        path.parent
        / "probe"
        / f"match-{path.stem}-{n}-w{c.keys.window}a{c.keys.lookahead}-{tag}.safetensors"
    )
    if cache.exists():
        return load_file(cache)
    episodes, _ = read_episodes(path)
    gen = torch.Generator().manual_seed(SEED)
    pad_id = fmt.tokenizer.pad_token_id or 0
    out: dict[str, list] = {}
    gold, sizes = [], []
    for start in tqdm(
        range(0, min(n, len(episodes)), BATCH), desc=f"reading {path.parent.name}/{path.name}"
    ):
        encoded = [
            encode_episode(e, fmt, c.chunk_len) for e in episodes[start : min(n, start + BATCH)]
        ]
        encoded = [e for e in encoded if e.answer_positions and all(e.answer_positions)]
        if not encoded:
            continue
        batch = collate_episodes(encoded, [0] * len(encoded), c.chunk_len, pad_id)
        with torch.no_grad():
            feats, mask = features(ga, batch)
        answer = batch["answer_context"].flatten(1)  # (R, N)
        for e in range(len(encoded)):
            rows = (batch["row_episode"] == e).nonzero()[:, 0]
            values = answer[rows].any(0) & mask[e]
            others = (mask[e] & ~values).nonzero()[:, 0]
            n_others = len(others)
            if not every_token:
                others = others[torch.randperm(len(others), generator=gen)[:OTHERS]]
            kept = torch.cat([values.nonzero()[:, 0], others]).sort().values
            for layer, (h, h_bar) in feats.items():
                out.setdefault(f"keys.{layer}", []).append(h_bar[e, kept].half())
                out.setdefault(f"own.{layer}", []).append(h[e, kept].half())
            is_value = values[kept]
            out.setdefault("is_value", []).append(is_value)
            # a sampled other token stands for n_others / len(others) of them in sum_t |s_t|
            weight = torch.where(is_value, 1.0, n_others / max(len(others), 1))
            out.setdefault("weight", []).append(weight)
            gold += [answer[r, kept] for r in rows]
            out.setdefault("row_episode", []).append(torch.full((len(rows),), len(sizes)))
            sizes.append(len(kept))
        for name, x in queries(ga, [p for e in encoded for p in e.prompts], pad_id).items():
            out.setdefault(f"q.{name}", []).append(x.half())
    data = {k: torch.cat(v) for k, v in out.items()}
    data["sizes"] = torch.tensor(sizes)
    data["gold"] = torch.nn.utils.rnn.pad_sequence(gold, batch_first=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in data.items()}, cache)
    return data


def layout(data: dict) -> tuple:
    """Per row, its episode's kept tokens as indices into the flat tables (R, P), the valid mask,
    the gold mask and the token weights (R, P)."""
    sizes, ep = data["sizes"], data["row_episode"]
    offset = torch.cumsum(sizes, 0) - sizes
    P = int(sizes.max())
    slot = torch.arange(P)
    valid = slot[None] < sizes[ep][:, None]
    index = (offset[ep][:, None] + slot[None]).clamp(max=int(sizes.sum()) - 1) * valid
    gold = torch.zeros(len(ep), P, dtype=torch.bool)
    gold[:, : data["gold"].shape[1]] = data["gold"][:, :P].bool()
    return index, valid, gold & valid, data["weight"][index] * valid


def figures(w: torch.Tensor, valid: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """hit (the largest |w_t| is gold) and share (gold share of sum |w_t|) of read-out weights w."""
    w = w.abs().masked_fill(~valid, 0.0)
    keep = gold.any(1)
    w, valid, gold = w[keep], valid[keep], gold[keep]
    best = w.masked_fill(~valid, -1).argmax(1)
    share = (w * gold).sum(1) / w.sum(1).clamp(min=1e-30)
    return {
        "hit": gold.gather(1, best[:, None]).float().mean().item(),
        "share": share.mean().item(),
    }


class Match(torch.nn.Module):
    """One target's K, A, G on cached features: the read-out weights g_t s_t of every kept token."""

    def __init__(self, block):
        super().__init__()
        self.K = torch.nn.Parameter(block.K.detach().float().clone())
        self.A = torch.nn.Parameter(block.A.detach().float().clone())
        self.G = torch.nn.Parameter(block.G.detach().float().clone())

    def forward(self, keys: Tensor, own: Tensor, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Scores s (R, P) of each row's query x against its episode's keys, and gate logits z
        of every token (N,); keys, own (N, d) are the flat h̄ and h tables."""
        q = x @ self.A.T
        s = ((keys @ self.K.T)[index] @ q[:, :, None])[..., 0] / math.sqrt(self.K.shape[0])
        return s, own @ self.G


def fit_target(block, train: dict, val: dict, layer: int, name: str, steps: int, lr: float = 3e-3):
    """Fits one target's A, K and G jointly: -log of the gold share of the gated read-out weights
    sum_t g_t |s_t| (others weighted up), plus the gate's balanced cross-entropy on value tokens."""
    match = Match(block)
    t_index, t_valid, t_gold, t_weight = layout(train)
    v_index, v_valid, v_gold, _ = layout(val)
    v_value = val["is_value"].bool()[v_index] & v_valid
    t_value = train["is_value"].bool()

    def tables(data: dict) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(data[k].float() for k in (f"keys.{layer}", f"own.{layer}", f"q.{name}"))

    v_tables, t_tables = tables(val), tables(train)

    def val_figures() -> dict[str, float]:
        with torch.no_grad():
            s, z = match(*v_tables, v_index)
            g = 2 * torch.sigmoid(z[v_index])
            out = figures(s * g, v_valid, v_gold)
            out |= {f"{k}_ungated": v for k, v in figures(s, v_valid, v_gold).items()}
            out |= {f"{k}_values": v for k, v in figures(s, v_value, v_gold).items()}
            out["gate_on"] = g[v_value].mean().item()
            out["gate_off"] = g[v_valid & ~v_value].mean().item()
            return out

    before = val_figures()
    opt = torch.optim.Adam(match.parameters(), lr=lr)
    for _ in range(steps):
        s, z = match(*t_tables, t_index)
        w = (2 * torch.sigmoid(z[t_index]) * s).abs() * t_weight
        share = (w * t_gold).sum(1) / w.sum(1).clamp(min=1e-30)
        gate = F.softplus(-z[t_value]).mean() + F.softplus(z[~t_value]).mean()
        loss = -share.clamp(min=1e-30).log().mean() + gate
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_figures()
    with torch.no_grad():
        for p in ("K", "A", "G"):
            getattr(block, p).copy_(getattr(match, p))
    return before, after


def plot(result: dict, path: Path) -> None:
    fits = result["targets"]
    panels = {
        "hit_values": "hit among the value tokens (chance ~25 %)",
        "hit": "hit over every token, gated",
        "share": "gold share of the gated read-out",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    for ax, (key, title) in zip(axes, panels.items(), strict=True):
        for kind in ("o_proj", "down_proj"):
            rows = [f for f in fits if f["target"].endswith(kind)]
            layers = [f["layer"] for f in rows]
            before, after = ([f[w][key] for f in rows] for w in ("before", "after"))
            ax.plot(layers, before, ":", marker=".", label=f"{kind}, before")
            ax.plot(layers, after, "-", marker="o", label=f"{kind}, fitted")
        ax.set(xlabel="layer", title=f"validation: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--val-episodes", type=int, default=80)
    parser.add_argument(
        "--init", default=str(ROOT / "experiments/pretrain/smollm2-wiki-all-generator")
    )
    parser.add_argument("--key-window", type=int, default=16)
    parser.add_argument("--key-lookahead", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, nargs="*", help="fit only these layers' targets")
    parser.add_argument("--data", default=str(ROOT / "data" / "benchmarks" / "facts"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "match-fit" / "generator"))
    parser.add_argument(
        "--keep-b", action="store_true", help="keep the init's B (default: B = 0, see below)"
    )
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the JSON")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(OUT.read_text()), OUT.with_suffix(".png"))
        return 0
    torch.manual_seed(SEED)
    ga = GenerativeAdapter.from_pretrained(
        args.init, keys={"window": args.key_window, "lookahead": args.key_lookahead, "gate": True}
    )
    ga.eval()
    fmt = PromptFormat(ga.tokenizer)
    data = Path(args.data)
    train = collect(ga, fmt, data / "train.jsonl", args.episodes, every_token=False)
    val = collect(ga, fmt, data / "validation.jsonl", args.val_episodes, every_token=True)
    result = {k: v for k, v in vars(args).items() if k not in ("data", "out", "init")}
    result |= {
        "train_questions": len(train["row_episode"]),
        "val_questions": len(val["row_episode"]),
    }
    result["targets"] = []
    targets = [t for t in ga.generator.targets if not args.layers or t.layer in args.layers]
    for t in tqdm(targets, desc="fitting"):
        before, after = fit_target(ga.generator[t.name], train, val, t.layer, t.name, args.steps)
        result["targets"].append(
            {"target": t.name, "layer": t.layer, "before": before, "after": after}
        )
        tqdm.write(f"{t.name}: {before} -> {after}")
    for when in ("before", "after"):
        result[when] = {
            k: sum(f[when][k] for f in result["targets"]) / len(result["targets"])
            for k in result["targets"][0][when]
        }
    if not args.keep_b:
        # the queries were the base LM's module inputs: with B = 0 the generator adapts nothing yet,
        # so tuning starts on the queries the match was fitted to (a pretrained B moves them: the
        # share of the read-out drops from 14.5 to 9.2 %); V and B then learn to decode
        with torch.no_grad():
            for block in ga.generator.blocks.values():
                block.B.zero_()
    ga.save_pretrained(args.out)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, OUT.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("before", "after")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
