"""A recall generator trained on cached features: the match fitted to the answer's logits, exactly.

The built copy generator (`analytic_copy.py`) writes into the last decoder layer's `down_proj`,
whose output is added to the residual stream just before the final norm and the LM head. So
for such a generator, and for the first answer token, the adapted model's logits are

    logits = head(norm(r + dW x))         r: the frozen LM's last residual at the cloze's end,
                                          x: down_proj's input there, dW from the state

with nothing of the LM to run again: r and x of every training question, and the hidden states
every context chunk writes with, are read once by the frozen LM and cached, and the generator's
own code (`Generator.write`, `Generator.lora`) turns them into dW. Fitting K, A and the write
gate G on them (V, B stay the copy of `warm_start.copy_values`), or K alone with A = K R
(`--tie-queries`), is then exact (up to the float16 the cache keeps hidden states in) and fast. The loss is the cross-entropy of the gold value among
the cloze's options (their first tokens), plus `--nll-weight` times the NLL of its first token
over the whole vocabulary. Both memories are fitted the same way, so their difference is the
memory's.

    python experiments/recall/fit_copy.py --memory ridge --tie-queries --train K \
        --out experiments/recall/results/fit_copy_ridge_tied.json [--save DIR]

Writes --out: the training curve and first-token choice among the options, before and every
--eval-every steps, on 64 training episodes not fitted (held in: the training forms) and on
validation K = 16 (held-out forms). Results: README.md, "Fitting the match exactly".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from genadapter.assets import DEFAULT_MODEL, load_base_model  # noqa: E402
from genadapter.chunking import cut, pad  # noqa: E402
from genadapter.config import GeneratorConfig, KeyConfig  # noqa: E402
from genadapter.data.benchmarks.recall import make_recall  # noqa: E402
from genadapter.data.corpus import wiki_documents  # noqa: E402
from genadapter.data.episodes import Cloze, read_episodes  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.warm_start import copy_values, fit_queries, target_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "benchmarks" / "recall"
MAX_OPTIONS = 8


@dataclass
class Cached:
    """One episode as the frozen LM saw it: its context chunks' hidden states (the layers the
    generator reads) and, per cloze, the target's input x and the last residual r at its end,
    the ids of its options' first tokens and which of them is gold."""

    hidden: dict[int, Tensor]  # {layer: (chunks, chunk_len, d)}, float16 in the cache
    mask: Tensor  # (chunks, chunk_len)
    x: Tensor  # (questions, in)
    resid: Tensor  # (questions, d)
    options: Tensor  # (questions, MAX_OPTIONS) first-token ids, -1 past the episode's options
    gold: Tensor  # (questions,) index of the gold option


def last_layer_target(ga: GenerativeAdapter) -> str:
    """The one target this recipe can fit exactly: down_proj of the LM's last layer."""
    gen = ga.generator
    last = ga.base_model.config.num_hidden_layers - 1
    if len(gen.targets) != 1 or gen.targets[0].layer != last:
        raise ValueError(f"fit_copy fits one target in the last layer ({last}), got {gen.names}")
    return gen.names[0]


@torch.no_grad()
def cache_episode(
    ga: GenerativeAdapter, fmt: PromptFormat, episode, dtype: torch.dtype = torch.float16
) -> Cached:
    """One episode's `Cached` features; the chunks' hidden states kept in `dtype` (half of
    float32's memory by default; float32 keeps the logits exact)."""
    gen, tok = ga.generator, ga.tokenizer
    rows = tok(list(episode.context), add_special_tokens=False).input_ids  # as `read` reads
    chunks = [piece for row in rows for piece in cut(row, gen.config.chunk_len)]
    ids, mask = pad(chunks, pad_id=tok.pad_token_id or 0, length=gen.config.chunk_len)
    hidden = ga.context_features(ids, mask)
    qas = [qa for qa in episode.qas if qa.options]
    q_ids, q_mask = pad([fmt.prompt_ids(Cloze(qa.question)) for qa in qas])
    last = q_mask.sum(1) - 1  # right padding: causal attention keeps it from the real tokens
    last_block = ga.base_model.model.layers[-1]
    captured = {}
    hook = last_block.register_forward_hook(
        lambda m, a, out: captured.__setitem__("r", out[0] if isinstance(out, tuple) else out)
    )
    try:
        inputs = target_inputs(ga, q_ids, q_mask)[0]
    finally:
        hook.remove()
    name = last_layer_target(ga)
    first = [[fmt.answer_ids(o, Cloze(qa.question))[0] for o in qa.options] for qa in qas]
    first = [f + [-1] * (MAX_OPTIONS - len(f)) for f in first]  # -1: no option (K < 8)
    return Cached(
        hidden={k: v.to(dtype).cpu() for k, v in hidden.items()},
        mask=mask,
        x=inputs[name][torch.arange(len(qas)), last].cpu(),
        resid=captured["r"][torch.arange(len(qas)), last].cpu(),
        options=torch.tensor(first),
        gold=torch.tensor([qa.options.index(qa.answers[0]) for qa in qas]),
    )


def cache(ga, episodes, desc: str, path: Path) -> list[Cached]:
    """The episodes' cached features, read by the frozen LM once and kept in `path`
    (safetensors); they depend on the base LM, the chunk length and the layers read only."""
    fields = ["mask", "x", "resid", "options", "gold"]
    if path.exists():
        flat = load_file(path)
        return [
            Cached(
                hidden={
                    int(k.split(".")[2]): v for k, v in flat.items() if k.startswith(f"{i}.hidden.")
                },
                **{f: flat[f"{i}.{f}"] for f in fields},
            )
            for i in range(len(episodes))
        ]
    fmt = PromptFormat(ga.tokenizer)
    data = [cache_episode(ga, fmt, e) for e in tqdm(episodes, desc=desc)]
    flat = {f"{i}.{f}": getattr(c, f).contiguous() for i, c in enumerate(data) for f in fields}
    flat |= {
        f"{i}.hidden.{k}": v.contiguous() for i, c in enumerate(data) for k, v in c.hidden.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, path)
    return data


def episode_states(gen, batch: list[Cached]) -> tuple[dict[str, Tensor], Tensor]:
    """The state (S, n) each cached episode's context writes, one row an episode, as `read`
    sums its chunks."""
    hidden = {k: torch.cat([c.hidden[k] for c in batch]).float() for k in gen.feature_layers}
    mask = torch.cat([c.mask for c in batch])
    episode_of = torch.cat([torch.full((len(c.mask),), i) for i, c in enumerate(batch)])
    writes = gen.write(hidden, mask)
    S = {
        k: s.new_zeros(len(batch), *s.shape[1:]).index_add(0, episode_of, s)
        for k, s in writes.S.items()
    }
    return S, writes.n.new_zeros(len(batch)).index_add(0, episode_of, writes.n)


def option_logits(ga: GenerativeAdapter, batch: list[Cached]) -> tuple[Tensor, Tensor, Tensor]:
    """The adapted model's first-token logits of every option (q, n_options) and of the whole
    vocabulary (q, V), and the gold index (q,), for a batch of cached episodes."""
    gen = ga.generator
    name = last_layer_target(ga)
    lora = gen.lora(*episode_states(gen, batch))[name]
    # each episode's questions meet its own lora_A: dW x = scaling B (lora_A x)
    read = torch.cat([c.x @ lora.A[i].T for i, c in enumerate(batch)])
    resid = torch.cat([c.resid for c in batch]) + lora.scaling * read @ lora.B.T
    scores, logits = first_token_logits(ga, resid, torch.cat([c.options for c in batch]))
    return scores, logits, torch.cat([c.gold for c in batch])


def first_token_logits(
    ga: GenerativeAdapter, resid: Tensor, options: Tensor
) -> tuple[Tensor, Tensor]:
    """The LM head's logits of the last residuals `resid` (q, d) (the last layer's output, with
    the adapter's delta): of every option's first token (-inf where `options` is -1), and of
    the whole vocabulary."""
    model = ga.base_model
    logits = model.lm_head(model.model.norm(resid))
    return logits.gather(1, options.clamp(min=0)).masked_fill(options < 0, -math.inf), logits


def losses(ga, batch: list[Cached], nll_weight: float) -> tuple[Tensor, float]:
    """Option cross-entropy + nll_weight x the gold first token's NLL; and the choice accuracy."""
    scores, logits, gold = option_logits(ga, batch)
    rank = F.cross_entropy(scores, gold)
    gold_ids = torch.cat([c.options for c in batch]).gather(1, gold[:, None])[:, 0]
    nll = F.cross_entropy(logits, gold_ids)
    return rank + nll_weight * nll, float((scores.argmax(1) == gold).float().mean())


@torch.no_grad()
def accuracy(ga, data: list[Cached], batch: int = 16) -> float:
    hits = total = 0
    for i in range(0, len(data), batch):
        part = data[i : i + batch]
        scores, _, gold = option_logits(ga, part)
        hits += int((scores.argmax(1) == gold).sum())
        total += len(gold)
    return hits / total


def build(args, model, tokenizer) -> GenerativeAdapter:
    d = model.config.hidden_size
    config = GeneratorConfig(
        r=d, r_in=args.r_in, layers=[model.config.num_hidden_layers - 1],
        target_modules=["down_proj"], memory=args.memory, ridge_lambda=args.lam,
        normalization="none", value_layer=0, chunk_len=args.chunk_len,
        keys=KeyConfig(shift=1, window=args.window, gate=True), key_layer=args.key_layer,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    ga = GenerativeAdapter.from_base(model, config, tokenizer=tokenizer)
    copy_values(ga, args.beta)
    fits = fit_queries(ga, wiki_documents("train")[:64])  # the match starts as query = key
    print("query R² on wiki text", fits)
    return ga


class TiedQueries:
    """A = K R with R fixed (`--tie-queries`): the query stays the key its input would write
    (warm_start.fit_queries), and fitting K learns which directions of the key features tell
    one pair from another (a metric), with a fifth of the parameters of K and A apart."""

    def __init__(self, block) -> None:
        self.block, self.K = block, block.K
        self.R = torch.linalg.lstsq(block.K.detach().double(), block.A.detach().double())
        self.R = self.R.solution.to(block.A.dtype)  # exact: A = K R after fit_queries
        del block.A  # a tensor computed from K from now on
        block.A = (self.K @ self.R).detach()

    def __enter__(self):
        self.block.A = self.K @ self.R
        return self

    def __exit__(self, *exc) -> None:
        self.block.A = (self.K @ self.R).detach()

    def release(self) -> None:
        """A a parameter again (for saving)."""
        self.block.A = torch.nn.Parameter((self.K @ self.R).detach())


def choices(ga, sets: dict[str, list[Cached]]) -> dict[str, float]:
    return {name: accuracy(ga, data) for name, data in sets.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory", default="ridge", choices=["ridge", "linear"])
    p.add_argument("--r-in", type=int, default=576)
    p.add_argument("--lam", type=float, default=0.01, help="ridge lambda (GeneratorConfig)")
    p.add_argument("--beta", type=float, default=60.0, help="size of the copy (copy_values)")
    p.add_argument("--window", type=int, default=1, help="key window (KeyConfig.window)")
    p.add_argument("--chunk-len", type=int, default=64)
    p.add_argument(
        "--key-layer", type=int, default=None, help="keys from this layer (0: embeddings)"
    )
    p.add_argument("--train-episodes", type=int, default=600, help="the last 64 are held in")
    p.add_argument("--val-episodes", type=int, default=64)
    p.add_argument(
        "--one-form", action="store_true", help="fit on episodes whose pairs share one form"
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16, help="episodes a step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--nll-weight", type=float, default=0.0)
    p.add_argument("--train", nargs="+", default=["K", "A", "G"], help="parameters fitted")
    p.add_argument("--tie-queries", action="store_true", help="A = K R: fit K (and --train)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, help="save the fitted generator here")
    p.add_argument("--out", type=Path, required=True, help="the fit's log and accuracies (JSON)")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "recall-fit" / "cache")
    args = p.parse_args()

    model, tokenizer = load_base_model(DEFAULT_MODEL)
    model.requires_grad_(False)
    ga = build(args, model, tokenizer)
    if args.one_form:  # every pair of an episode in one form: only the key tells them apart
        train = make_recall("train", args.train_episodes, seed=args.seed, one_form=True)
    else:
        train = read_episodes(DATA / "train.jsonl")[0][: args.train_episodes]
    val = read_episodes(DATA / "validation-k16.jsonl")[0][: args.val_episodes]
    t0 = time.perf_counter()
    tag = f"c{args.chunk_len}-l{'-'.join(map(str, ga.generator.feature_layers))}"
    train_data = cache(
        ga,
        train,
        "reading train",
        args.cache / f"train{len(train)}{'-one-form' if args.one_form else ''}-{tag}.safetensors",
    )
    val_data = cache(ga, val, "reading val", args.cache / f"val-k16-{len(val)}-{tag}.safetensors")
    read_seconds = time.perf_counter() - t0
    # held in: episodes not fitted, in the training forms (K 4-64); validation: K 16, new forms
    fit_data, sets = train_data[:-64], {"held_in": train_data[-64:], "validation": val_data}

    block = ga.generator[ga.generator.names[0]]
    tied = TiedQueries(block) if args.tie_queries else contextlib.nullcontext()
    params = [getattr(block, n) for n in args.train if not (args.tie_queries and n == "A")]
    params += [block.K] if args.tie_queries and "K" not in args.train else []
    for prm in ga.generator.parameters():
        prm.requires_grad_(False)
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    rng = random.Random(args.seed)
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "read_seconds": read_seconds}
    log["choice"] = {0: choices(ga, sets)}
    log["train"] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc=f"fitting {args.memory}", mininterval=5)
    for step in bar:
        with tied:
            loss, acc = losses(ga, rng.sample(fit_data, args.batch), args.nll_weight)
            opt.zero_grad()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log["train"].append((step, loss.item(), acc))
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if step % args.eval_every == 0 or step == args.steps:
            with tied:  # A = K R of the K just stepped
                log["choice"][step] = choices(ga, sets)
            tqdm.write(f"step {step}: first-token choice {log['choice'][step]}")
    log["fit_seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(log, indent=1) + "\n")
    if args.save:
        if args.tie_queries:
            tied.release()
        ga.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
