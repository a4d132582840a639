"""A recall generator built, not trained: how much recall does the mechanism give by itself?

One target, down_proj of one top layer (its output is the residual stream that SmolLM2's tied LM
head reads), ridge memory (`--memory linear`: the linear one, read as S / n), no gate, keys shifted one
token back:

    K random, r = r_in = d = 576
    V, B             (warm_start.copy_values: a value read out adds beta times the token's output
                      embedding to the residual stream)
    A = K R          (warm_start.fit_queries: the question's query is the key its tokens write)

so dW x = beta sum_t w_t u_t, w_t = k_t^T (H + lam_bar I)^-1 A x: the embedding of what
followed the context's tokens that match the question's last one. Choice accuracy (8 options, all
values of the same context) on validation recall at several K, for a few beta and layers, beside
the base LM; no parameter is trained.

    python experiments/recall/analytic_copy.py [--k 4 16 64] [--layers 29 26:30] [--beta 60 120]
        [--memory ridge linear] [--lam 0.01 0.1] [--chunk-len 32 64] [--key-layer L]
        [--window W] [--whiten none 0.1] [--fit-episodes N --fit-lam 1e-3 0.1] [--split validation] [--save DIR]
        [--data data/benchmarks/facts/validation.jsonl]

Every combination of the listed --memory, --layers, --lam, --chunk-len, --beta and --fit-lam is
one generator; with several layers ("26:30", "4,8,29") each copies beta / (their number).
`--fit-episodes N` fits the queries on N recall training episodes instead of wiki text: the
question read alone regressed onto the key its value was written under in the context
(`fit_recall_queries`). Writes results/analytic_copy.json (--out) after every generator.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from genadapter.assets import DEFAULT_MODEL, load_base_model  # noqa: E402
from genadapter.chunking import cut, pad  # noqa: E402
from genadapter.config import GeneratorConfig, KeyConfig, QueryConfig  # noqa: E402
from genadapter.data.corpus import wiki_documents  # noqa: E402
from genadapter.data.episodes import Cloze, read_episodes  # noqa: E402
from genadapter.eval.harness import evaluate_episode  # noqa: E402
from genadapter.eval.methods import make_method  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.warm_start import (  # noqa: E402
    copy_values,
    fit_queries,
    r_squared,
    regression,
    set_queries,
    target_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).parent / "results" / "analytic_copy.json"
PAIRS: dict[tuple, tuple[dict[str, Tensor], Tensor]] = {}  # recall_pairs, by what they depend on


def parse_layers(spec: str) -> list[int] | str:
    """ "29" -> [29]; "4,8,29" -> [4, 8, 29]; a slice "20:30" is kept as GeneratorConfig reads it."""
    return spec if ":" in spec else [int(x) for x in spec.split(",")]


def copy_generator(
    model,
    tokenizer,
    layers: list[int] | str,
    beta: float,
    memory: str = "ridge",
    lam: float = 0.01,
    chunk_len: int = 64,
    key_layer: int | None = None,
    window: int = 1,
    fit_episodes: list | None = None,
    fit_lam: float = 1e-4,
    queries: QueryConfig | None = None,
    r_in: int | None = None,
    gate: bool = False,
    whiten: float | None = None,
    bare: bool = False,
) -> tuple[GenerativeAdapter, float]:
    """The generator of the module docstring at `layers` (K random, r = d, r_in = d unless
    given); every layer copies beta / (number of layers), so beta is the size of the summed
    copy; `gate` adds an open write gate (G = 0); `whiten` whitens the copy
    (`warm_start.whitening`); `bare` copies each word's bare spelling too
    (`GeneratorConfig.value_bare`). Also returns the lowest R² of its query fits
    (pooled `queries`: tied, A = K)."""
    d = model.config.hidden_size
    config = GeneratorConfig(
        r=d, r_in=r_in or d, layers=layers, queries=queries or QueryConfig(), target_modules=["down_proj"], memory=memory,
        ridge_lambda=lam, normalization="none", value_layer=0, chunk_len=chunk_len,
        keys=KeyConfig(shift=1, window=window, gate=gate), key_layer=key_layer, value_bare=bare,
    )  # fmt: skip
    torch.manual_seed(0)
    ga = GenerativeAdapter.from_base(model, config, tokenizer=tokenizer).eval()
    copy_values(ga, beta / len(ga.generator.layers), whiten)
    if fit_episodes:
        fits = fit_recall_queries(ga, fit_episodes, fit_lam)
    else:
        fits = fit_queries(ga, wiki_documents("train")[:64])
    return ga, min(fits.values())


@torch.no_grad()
def recall_pairs(ga: GenerativeAdapter, episodes: list) -> tuple[dict[str, Tensor], Tensor]:
    """What a query should find, from recall episodes: per target, its input x at each cloze's
    last token (the question read alone, as it is asked), and the key features h̄ its value was
    written under in the context (the context read as `GenerativeAdapter.read` reads it)."""
    gen, tok, fmt = ga.generator, ga.tokenizer, PromptFormat(ga.tokenizer)
    c = gen.config
    key_layer = gen.layers[0] if c.key_layer is None else c.key_layer
    xs: dict[str, list[Tensor]] = {name: [] for name in gen.names}
    ys: list[Tensor] = []
    for episode in tqdm(episodes, desc="recall pairs"):
        encoded = [
            tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in episode.context
        ]
        chunks = [cut(enc.input_ids, c.chunk_len) for enc in encoded]
        ids, mask = pad([ch for doc in chunks for ch in doc], pad_id=tok.pad_token_id or 0)
        h_key = gen.features(ga.context_features(ids, mask)[key_layer], mask.to(ga.device))[1]
        first = [0, *itertools.accumulate(len(doc) for doc in chunks)]  # each text's first chunk
        found = []
        for text, enc, start in zip(episode.context, encoded, first, strict=False):
            for qa in episode.qas:
                at = text.find(f"{qa.question} {qa.answers[0]}")
                if at < 0:
                    continue
                char = at + len(qa.question) + 1  # the value's first character
                token = next(i for i, (_, end) in enumerate(enc.offset_mapping) if end > char)
                chunk, pos = divmod(token, c.chunk_len)
                if pos >= c.keys.shift:  # else its key window lies before its chunk: none
                    ys.append(h_key[start + chunk, pos].cpu())
                    found.append(qa.question)
        if found:
            ids, mask = pad([fmt.prompt_ids(Cloze(q)) for q in found], pad_id=tok.pad_token_id or 0)
            inputs = target_inputs(ga, ids, mask)[0]
            last = mask.sum(1) - 1
            for name, x in inputs.items():
                xs[name].append(x[torch.arange(len(found)), last.to(x.device)].cpu())
    return {name: torch.cat(x) for name, x in xs.items()}, torch.stack(ys)


@torch.no_grad()
def fit_recall_queries(ga: GenerativeAdapter, episodes: list, lam: float) -> dict[str, float]:
    """Set each target's A = K R, R the ridge regression of the key its cloze's value was
    written under on the question's x (`recall_pairs`); returns each target's R² on a fifth of
    the pairs held out of the fit."""
    c = ga.generator.config
    key = (tuple(ga.generator.names), c.chunk_len, repr(c.keys), c.key_layer, len(episodes))
    if key not in PAIRS:  # the pairs do not depend on K, V or the memory: read them once
        PAIRS[key] = recall_pairs(ga, episodes)
    xs, y = PAIRS[key]
    cut_at = len(y) * 4 // 5
    fits = {}
    for name, x in xs.items():
        R = regression(x[:cut_at], y[:cut_at], lam)[0]
        fits[name] = r_squared(x[cut_at:], y[cut_at:], R)
        set_queries(ga.generator[name], regression(x, y, lam)[0])
    return fits


def harness_scores(method, episodes, questions: int) -> dict[str, float]:
    """Mean choice accuracy, gold-answer NLL and greedy-answer F1 of a method through the real
    harness."""
    items = [it for e in episodes for it in evaluate_episode(method, e, "qa", questions)["items"]]
    found = [it["choice"] for it in items if "choice" in it]
    mean = {k: sum(it[k] for it in items) / len(items) for k in ("nll", "f1")}
    return {"choice": sum(found) / len(found), **mean}


def choice(method, episodes, questions: int) -> float:
    return harness_scores(method, episodes, questions)["choice"]


def grid_variants(p: argparse.ArgumentParser, grid: dict[str, list], save) -> list[dict]:
    """Every combination of the grid's listed values, one generator each; `--save` (`save`)
    takes a grid of one."""
    variants = [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
    if save and len(variants) != 1:
        flags = ", ".join("--" + k.replace("_", "-") for k in grid)
        p.error(f"--save takes one value of each of {flags}")
    return variants


def add_whiten_argument(p: argparse.ArgumentParser) -> None:
    """--whiten MU ...: one generator per value, each whitening its copy (warm_start.whitening)
    with ridge MU, or not at all ("none")."""
    p.add_argument(
        "--whiten",
        type=lambda x: None if x == "none" else float(x),
        nargs="+",
        default=[None],
        help="whiten the copy (warm_start.whitening): ridge mu, or none",
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--k", type=int, nargs="*", default=[4, 16, 64], help="none: build and --save only"
    )
    p.add_argument(
        "--layers", nargs="+", default=["29"], help='one generator each: "29", "4,8,29", "20:30"'
    )
    p.add_argument("--window", type=int, default=1, help="key window (KeyConfig.window)")
    p.add_argument("--beta", type=float, nargs="+", default=[60.0, 120.0, 360.0])
    p.add_argument("--lam", type=float, nargs="+", default=[0.01], help="ridge lambda")
    add_whiten_argument(p)
    p.add_argument("--chunk-len", type=int, nargs="+", default=[64])
    p.add_argument(
        "--fit-episodes",
        type=int,
        default=0,
        help="fit the queries on this many recall training episodes (0: on wiki text, A x = key)",
    )
    p.add_argument(
        "--fit-lam", type=float, nargs="+", default=[1e-4], help="ridge of the query regression"
    )
    p.add_argument("--key-layer", type=int, default=None, help="keys from this layer's features")
    p.add_argument("--memory", nargs="+", default=["ridge"], choices=["ridge", "linear"])
    p.add_argument(
        "--query-window",
        type=int,
        default=1,
        help="pooled queries over this many positions (QueryConfig.window; 1: the LoRA's A x)",
    )
    p.add_argument("--query-layer", type=int, default=None, help="pooled queries' feature layer")
    p.add_argument("--r-in", type=int, nargs="+", default=[None], help="key width (default d)")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    p.add_argument("--data", type=Path, help="episodes to evaluate instead of recall's (any task)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--save", help="save the generator here (one memory, layer and beta)")
    args = p.parse_args()
    grid = {
        "memory": args.memory,
        "layers": args.layers,
        "lam": args.lam,
        "chunk_len": args.chunk_len,
        "beta": args.beta,
        "fit_lam": args.fit_lam,
        "r_in": args.r_in,
        "whiten": args.whiten,
    }
    queries = QueryConfig(args.query_window, args.query_layer)
    if queries.pooled and args.fit_episodes:
        p.error("pooled queries are tied to the keys (A = K): nothing to fit on episodes")
    variants = grid_variants(p, grid, args.save)
    model, tokenizer = load_base_model(DEFAULT_MODEL)
    recall = ROOT / "data" / "benchmarks" / "recall"
    files = {args.data.stem: args.data} if args.data else {}
    files = files or {k: recall / f"{args.split}-k{k}.jsonl" for k in args.k}
    data = {k: read_episodes(f)[0][: args.episodes] for k, f in files.items()}
    train = ROOT / "data" / "benchmarks" / "recall" / "train.jsonl"
    fit_episodes = read_episodes(train)[0][: args.fit_episodes] if args.fit_episodes else None
    results = {
        "base": {
            k: choice(make_method("base", model, tokenizer), e, args.questions)
            for k, e in data.items()
        }
    }
    print("base", results["base"])
    r2 = {}
    for v in tqdm(variants, desc="generators"):
        options = {**v, "layers": parse_layers(v["layers"])}
        ga, fit = copy_generator(
            model, tokenizer, **options, key_layer=args.key_layer, window=args.window,
            fit_episodes=fit_episodes, queries=queries,
        )  # fmt: skip
        method = make_method("genadapter", model, tokenizer, ga=ga)
        name = ", ".join(f"{k} {x}" for k, x in v.items())
        results[name] = {k: choice(method, e, args.questions) for k, e in data.items()}
        r2[name] = fit
        tqdm.write(f"{name}: query R² {fit:.3f}, choice {results[name]}")
        if args.save:
            ga.save_pretrained(args.save)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every generator
        args.out.write_text(
            json.dumps(
                {
                    "args": {k: str(x) for k, x in vars(args).items()},
                    "choice": results,
                    "query_r2": r2,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
