"""A facts generator built, not trained: the recall copy with entity-level keys and a write gate.

`match_readout.py` found what a facts question can find in a state: with keys that average the
64 tokens before each token (a document's entity, named in every sentence) and ridge lambda 1,
the context's gold value weighs most among the options the context mentions in 80 % of
questions, but a copy of all ~700 context tokens reads out at chance (the weights of the whole
document add up in the token embeddings). Only value tokens must write. This script builds
that generator (`analytic_copy.copy_generator`: pooled queries tied to the keys, values copied
from the token embeddings into the last layer's down_proj) and fits its write gate
g_t = 2 sigmoid(G . h_t) by class-balanced logistic regression on training episodes: a token
inside a value (any option or answer of the episode the context spells) against every other
token; `--gate-scale` sharpens it (G <- c G). Reports choice, answer NLL and F1 on the chosen
split. `--window 1 --query-window 1 --layer 24` builds the next-token copy instead (README,
"Next-token copies"): each token's key is the layer-24 state of the token before it, a
position's query its own layer-24 state.

    python experiments/facts/copy_gate.py [--window 64] [--lam 1] [--beta 120 360]
        [--gate-scale 1 3] [--whiten none 1] [--bare] [--gate-episodes 96] [--gate-closed 1] [--episodes 16] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "recall"))
from analytic_copy import (  # noqa: E402
    add_whiten_argument,
    copy_generator,
    grid_variants,
    harness_scores,
)

from genadapter.assets import DEFAULT_MODEL, load_base_model  # noqa: E402
from genadapter.chunking import cut, pad  # noqa: E402
from genadapter.config import QueryConfig  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.methods import make_method  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402

DATA = ROOT / "data" / "benchmarks" / "facts"
OUT = Path(__file__).parent / "results" / "copy_gate.json"
METRICS = ("choice", "nll", "f1")
NOTES = (
    "built, not trained: a ridge copy (warm_start.copy_values; settings in built_by) with a write "
    "gate fitted by logistic regression on facts training episodes; experiments/facts/README.md"
)


def value_tokens(ids: list[int], values: list[list[int]], after: int = 0) -> Tensor:
    """1 at every position of `ids` inside an occurrence of one of `values` (token ids), and at
    the `after` positions that follow it, else 0."""
    label = torch.zeros(len(ids))
    for v in values:
        for i in range(len(ids) - len(v) + 1):
            if ids[i : i + len(v)] == v:
                label[i : i + len(v) + after] = 1
    return label


def context_chunks(tok, texts: list[str], chunk_len: int) -> tuple[list[int], Tensor, Tensor]:
    """Each text cut into `chunk_len` chunks as `GenerativeAdapter.read` cuts it: the tokens of
    all chunks in order, and the chunks padded into ids and mask (chunks, chunk_len)."""
    chunks = [
        ch for text in texts for ch in cut(tok(text, add_special_tokens=False).input_ids, chunk_len)
    ]
    ids, mask = pad(chunks, pad_id=tok.pad_token_id or 0)
    return [i for ch in chunks for i in ch], ids, mask


@torch.no_grad()
def gate_examples(
    ga: GenerativeAdapter, episodes: list, layer: int | None = None, after: int = 0
) -> tuple[Tensor, Tensor]:
    """Each context token's gate features h_t (those of the target at `layer`, default the
    first, as `Generator.write` reads them, documents cut into chunks as `read` cuts them) and
    whether it spells a value (or is one of the `after` tokens that follow one)."""
    gen, tok = ga.generator, ga.tokenizer
    layer = gen.layers[0] if layer is None else layer
    hs, labels = [], []
    for episode in tqdm(episodes, desc="gate examples"):
        values = {v for qa in episode.qas for v in [*(qa.options or []), *qa.answers]}
        spelled = [tok(" " + v, add_special_tokens=False).input_ids for v in values]
        flat, ids, mask = context_chunks(tok, episode.context, gen.config.chunk_len)
        h = gen.features(ga.context_features(ids, mask)[layer], mask)[0]
        hs.append(h[mask.bool()])
        labels.append(value_tokens(flat, spelled, after))
    return torch.cat(hs).float(), torch.cat(labels)


def fit_gate(h: Tensor, label: Tensor, closed: float = 1.0, steps: int = 200) -> Tensor:
    """G of the class-balanced logistic regression label ~ sigmoid(G . h) (no bias: the gate has
    none; RMS features carry constant directions); `closed` > 1 weighs the tokens that must stay
    closed that many times more (fewer false opens, fewer values found)."""
    weight = torch.where(label > 0, 0.5 / label.mean(), closed * 0.5 / (1 - label.mean()))
    G = torch.zeros(h.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([G], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        opt.zero_grad()
        out = F.binary_cross_entropy_with_logits(h @ G, label, weight=weight)
        out.backward()
        return out

    opt.step(loss)
    return G.detach()


def chained_command(built_by: str, script: str) -> str:
    """A saved generator's `built_by`: the commands that built its input, then this one."""
    command = " ".join([f"python experiments/facts/{script}", *sys.argv[1:]])
    return f"{built_by} && {command}" if built_by else command


def add_scoring_arguments(p: argparse.ArgumentParser, out: Path) -> None:
    """--episodes, --questions, --split: what the harness scores; --out: where results go."""
    p.add_argument("--episodes", type=int, default=16, help="0: build only")
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--split", default="validation")
    p.add_argument("--out", type=Path, default=out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--window", type=int, default=64, help="key window (KeyConfig.window)")
    p.add_argument("--query-window", type=int, default=24)
    p.add_argument("--layer", type=int, default=2, help="keys' and queries' feature layer")
    p.add_argument("--lam", type=float, nargs="+", default=[1.0], help="ridge lambda")
    p.add_argument("--beta", type=float, nargs="+", default=[120.0, 360.0])
    p.add_argument("--gate-scale", type=float, nargs="+", default=[1.0, 3.0])
    add_whiten_argument(p)
    p.add_argument("--bare", action="store_true", help="values carry bare spellings too")
    p.add_argument("--gate-episodes", type=int, default=96, help="training episodes to fit G")
    p.add_argument(
        "--gate-closed", type=float, default=1.0, help="weight of closed tokens in the fit"
    )
    add_scoring_arguments(p, OUT)
    p.add_argument("--save", help="save the generator here (one lambda, beta and gate scale)")
    args = p.parse_args()
    grid = {
        "lam": args.lam,
        "beta": args.beta,
        "gate_scale": args.gate_scale,
        "whiten": args.whiten,
    }
    variants = grid_variants(p, grid, args.save)
    model, tokenizer = load_base_model(DEFAULT_MODEL)
    episodes = read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]
    gate_fit = read_episodes(DATA / "train.jsonl")[0][: args.gate_episodes]
    queries = QueryConfig(args.query_window, args.layer)
    results: dict = {"args": {k: str(x) for k, x in vars(args).items()}}
    results.update({metric: {} for metric in METRICS})

    def record(name: str, method) -> None:
        scores = harness_scores(method, episodes, args.questions)
        for metric in METRICS:
            results[metric][name] = scores[metric]
        tqdm.write(f"{name}: " + ", ".join(f"{k} {x:.3f}" for k, x in scores.items()))

    if args.episodes:
        record("base", make_method("base", model, tokenizer))
    G = None
    for v in tqdm(variants, desc="generators"):
        ga = copy_generator(
            model, tokenizer, [29], v["beta"], lam=v["lam"], key_layer=args.layer,
            window=args.window, queries=queries, gate=True, whiten=v["whiten"], bare=args.bare,
        )[0]  # fmt: skip
        if G is None:  # the gate's features do not depend on lambda or beta: fit once
            h, label = gate_examples(ga, gate_fit)
            G = fit_gate(h, label, args.gate_closed)
            on = torch.sigmoid(h @ G) > 0.5
            results["gate_fit"] = {
                "tokens": len(label),
                "value_share": label.mean().item(),
                "recall": on[label > 0].float().mean().item(),
                "false_open": on[label == 0].float().mean().item(),
            }
            tqdm.write(f"gate fit: {results['gate_fit']}")
        block = ga.generator[ga.generator.names[0]]
        block.G.data = (v["gate_scale"] * G).to(block.G.dtype)
        name = ", ".join(f"{k} {x}" for k, x in v.items())
        if args.episodes:
            record(name, make_method("genadapter", model, tokenizer, ga=ga))
        if args.save:
            ga.config.extra.update(
                built_by=" ".join(["python experiments/facts/copy_gate.py", *sys.argv[1:]]),
                notes=NOTES,
            )
            ga.save_pretrained(args.save)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
