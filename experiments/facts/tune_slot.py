"""The answer slot's query map tuned through the answer loss, every state fixed.

`answer_slot.py` fits the slot's query map A as a regression onto proxy targets (the key a gold
value was written under). Here A learns from what the adapted model should do: write the gold
answer, then end its turn. A target's delta is (alpha/r) B N(S*)^T A x and the state does not
depend on A (K, V and G make it): each episode's N(S*) is read once, and a step is one frozen
forward of its questions with the side paths on, the gradient reaching only the layers from
the first target up (the headline's: 28 and 29 of 30).

    loss = mean over answer tokens of -log p(gold answer, end of turn | question; A)
           + anchor * ||A - A_0||^2 / ||A_0||^2 (per tuned target, A_0 the built map)

The best of `--epochs` on the answer loss of validation episodes the harness does not score is
kept; choice, answer NLL and F1 are then scored through the harness on the usual split.

    python experiments/facts/answer_slot.py --beta 90 --fit-beta 120 --fit-episodes 400 \
        --answer-episodes 96 --episodes 0 --save runs/answer-slot
    python experiments/facts/tune_slot.py --generator runs/answer-slot [--layers 28 29]
        [--fit-episodes 400] [--epochs 3] [--lr 0.01] [--anchor 0.1] [--episodes 16] [--save DIR]
        [--wiki-docs N]  # each episode read among 0..N Wikipedia summaries, as `make demo` reads
        [--tune-b]       # each tuned target's B learns too (anchored alike): what a read-out
                         # value raises, e.g. the end of turn where a value's end is read
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "experiments" / "recall"), str(ROOT / "experiments" / "facts")]
from analytic_copy import harness_scores  # noqa: E402
from copy_gate import add_scoring_arguments, chained_command  # noqa: E402

from genadapter.chunking import pad  # noqa: E402
from genadapter.data.corpus import among_wikipedia  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.methods import make_method  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402

DATA = ROOT / "data" / "benchmarks" / "facts"
OUT = Path(__file__).parent / "results" / "tune_slot.json"
NOTES = (
    "built, then tuned: the answer slot of experiments/facts/answer_slot.py with its targets' "
    "query maps trained through the answer loss (experiments/facts/tune_slot.py; see built_by)"
)


def questions(episode) -> list[tuple[str, str]]:
    """(question, gold answer) of any episode: facts and persona QAs, wiki-topic queries."""
    if hasattr(episode, "queries"):
        return [(q.input, q.output) for q in episode.queries]
    return [(qa.question, qa.answers[0]) for qa in episode.qas]


class Episode:
    """What a step needs of one episode: each target's read-out N(S*) (1, r_in, r) and its
    questions as prompt + gold answer + end of turn, right-padded, with the answer's labels."""

    def __init__(self, ga: GenerativeAdapter, episode, eos: int, wiki_docs: int = 0) -> None:
        fmt = PromptFormat(ga.tokenizer)
        stream = episode.context_texts()
        if wiki_docs:  # among 0..wiki_docs Wikipedia summaries, drawn per episode
            seed = zlib.crc32(episode.id.encode())
            stream = among_wikipedia(stream, random.Random(seed).randint(0, wiki_docs), seed)
        with torch.no_grad():
            state = ga.read(stream).sum()
            self.N = {k: v.detach() for k, v in ga.generator.normalized(state.S, state.n).items()}
        rows, labels = [], []
        for question, gold in questions(episode):
            prompt = fmt.prompt_ids(question)
            answer = fmt.answer_ids(gold, question) + [eos]
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        self.ids, self.mask = pad(rows, pad_id=0)
        self.labels = pad(labels, pad_id=-100)[0]


def answer_loss(ga: GenerativeAdapter, A: dict[str, Tensor], ep: Episode) -> Tensor:
    """Mean NLL of the episode's answer tokens with every target's query map from `A`."""
    with ga.side_paths(ga.generator.lora_of(ep.N, A)):
        logits = ga.base_model(input_ids=ep.ids, attention_mask=ep.mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ep.labels[:, 1:].flatten())


def mean_loss(ga: GenerativeAdapter, A: dict[str, Tensor], episodes: list[Episode]) -> float:
    with torch.no_grad():
        return sum(answer_loss(ga, A, ep).item() for ep in episodes) / len(episodes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, required=True, help="a built slot: answer_slot.py")
    p.add_argument("--layers", type=int, nargs="+", help="targets whose A learns (default: all)")
    p.add_argument(
        "--train", type=Path, nargs="+", default=[DATA / "train.jsonl"], help="episode files"
    )
    p.add_argument("--fit-episodes", type=int, nargs="+", default=[400], help="of each --train")
    p.add_argument(
        "--dev", type=Path, nargs="+", default=[DATA / "validation.jsonl"], help="episode files"
    )
    p.add_argument("--dev-episodes", type=int, default=32, help="of each --dev, after the scored")
    p.add_argument(
        "--wiki-docs",
        type=int,
        default=0,
        help="read each episode among up to N Wikipedia summaries",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01, help="Adam's step, relative to rms(A_0)")
    p.add_argument("--anchor", type=float, default=0.1, help="weight of ||A - A_0||^2/||A_0||^2")
    p.add_argument("--tune-b", action="store_true", help="each tuned target's B learns too")
    add_scoring_arguments(p, OUT)
    p.add_argument("--save", help="save the tuned generator here")
    args = p.parse_args()
    torch.manual_seed(0)
    ga = GenerativeAdapter.from_pretrained(args.generator)
    ga.requires_grad_(False)
    gen, eos = ga.generator, ga.tokenizer.eos_token_id
    layers = args.layers or [t.layer for t in gen.targets]
    names = [t.name for t in gen.targets if t.layer in layers]
    if len(names) != len(set(layers)):
        p.error(f"--layers {args.layers}: the generator targets {[t.layer for t in gen.targets]}")
    A0 = {k: gen[k].A.detach().clone() for k in names}
    A = {k: a.clone().requires_grad_(True) for k, a in A0.items()}
    # (learning matrix, its built value, the generator's own): the maps A, with --tune-b the Bs
    learning = [(A[k], A0[k], gen[k].A) for k in names]
    if args.tune_b:
        learning += [
            (gen[k].B.requires_grad_(True), gen[k].B.detach().clone(), gen[k].B) for k in names
        ]
    scale = [m0.pow(2).sum() for _, m0, _ in learning]
    opt = torch.optim.Adam(
        [{"params": [m], "lr": args.lr * m0.pow(2).mean().sqrt().item()} for m, m0, _ in learning]
    )
    if len(args.fit_episodes) not in (1, len(args.train)):
        p.error("--fit-episodes takes one count, or one per --train file")
    counts = args.fit_episodes * (len(args.train) // len(args.fit_episodes))
    train = [e for f, n in zip(args.train, counts, strict=True) for e in read_episodes(f)[0][:n]]
    dev = [e for f in args.dev for e in read_episodes(f)[0][args.episodes :][: args.dev_episodes]]
    fit = [Episode(ga, e, eos, args.wiki_docs) for e in tqdm(train, desc="states (train)")]
    held = [Episode(ga, e, eos, args.wiki_docs) for e in tqdm(dev, desc="states (dev)")]
    log = [{"epoch": 0, "dev_loss": mean_loss(ga, A, held)}]
    best = (log[0]["dev_loss"], [m.detach().clone() for m, _, _ in learning])
    tqdm.write(f"epoch 0: dev answer loss {log[0]['dev_loss']:.3f}")
    for epoch in range(1, args.epochs + 1):
        random.Random(epoch).shuffle(fit)
        total = 0.0
        for ep in tqdm(fit, desc=f"epoch {epoch}"):
            loss = answer_loss(ga, A, ep)
            total += loss.item()
            anchor = sum(
                (m - m0).pow(2).sum() / c for (m, m0, _), c in zip(learning, scale, strict=True)
            )
            opt.zero_grad()
            (loss + args.anchor * anchor).backward()
            opt.step()
        log.append(
            {"epoch": epoch, "train_loss": total / len(fit), "dev_loss": mean_loss(ga, A, held)}
        )
        tqdm.write(
            f"epoch {epoch}: train {log[-1]['train_loss']:.3f}, dev {log[-1]['dev_loss']:.3f}"
        )
        if log[-1]["dev_loss"] < best[0]:
            best = (log[-1]["dev_loss"], [m.detach().clone() for m, _, _ in learning])
    with torch.no_grad():
        for (_, _, own), kept in zip(learning, best[1], strict=True):
            own.copy_(kept)
    results: dict = {"args": {k: str(x) for k, x in vars(args).items()}, "log": log, "scores": {}}
    if args.episodes:
        episodes = read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]
        method = make_method("genadapter", ga.base_model, ga.tokenizer, ga=ga)
        results["scores"]["tuned"] = harness_scores(method, episodes, args.questions)
        tqdm.write(f"tuned: {results['scores']['tuned']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.save:
        built = ga.config.extra.get("built_by", f"(the generator at {args.generator})")
        ga.config.extra = {"built_by": chained_command(built, "tune_slot.py"), "notes": NOTES}
        ga.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
