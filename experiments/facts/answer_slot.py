"""The answer slot: a second copy target whose query finds the value a question asks for.

The next-token copy (`copy_gate.py`, the headline's first target) raises the token that followed
the context's match of the current one: once an answer has begun, it continues it. What it cannot
give is the answer's first token: the position that opens an answer (the chat template's
"assistant" line) matches every sentence start read, so it pushes whatever begins a document.
This script adds a target at `--slot-layer` (down_proj; the same keys, values and copy) whose
query map is fitted, not tied: A = K R0, R0 the ridge regression, on training episodes, of

    the answer-opening position's layer-24 state  ->  the key its gold value was written under
                                                       (the state of the token before it in the
                                                       context, as the state reads it)
    every other position: context tokens, the question's tokens, the teacher-forced gold
    answer, and free answers of the base model and of the round before  ->  0

With `--teacher-episodes N`, the first N fit episodes also add the prompted LM's own free answers
(context distillation, in regression form): where such an answer writes the gold value after a
preamble ("The instrument of X is the | accordion"), the position before the value is an opening
too, and the rest of the answer is silent. So the slot reads a value where an answer opens, or
reaches the place a value goes, and stays nearly silent elsewhere (its free
answers enter the fit because a query off every fitted position still reads something: numbers,
written many times, win). Its write gate is fitted as the first target's (`copy_gate.fit_gate`)
on its own layer. Reports choice, answer NLL and F1 on the chosen split through the harness.

    python experiments/facts/answer_slot.py [--generator experiments/generators/next-token-copy]
        [--slot-layer 28] [--weight 100] [--lam 0.01] [--beta 60 120] [--rounds 2] [--fit-beta B]
        [--fit-episodes 200] [--teacher-episodes 0] [--episodes 16] [--save DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "experiments" / "recall"), str(ROOT / "experiments" / "facts")]
from analytic_copy import harness_scores  # noqa: E402
from copy_gate import add_scoring_arguments, context_chunks, fit_gate, gate_examples  # noqa: E402

from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.methods import make_method  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.generator import rms_normalize  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.warm_start import regression  # noqa: E402

DATA = ROOT / "data" / "benchmarks" / "facts"
OUT = Path(__file__).parent / "results" / "answer_slot.json"
CONTEXT_SAMPLE = 64  # context positions per episode regressed onto 0
NOTES = (
    "built, not trained: the next-token copy (copy_gate.py) plus an answer-slot target whose "
    "query map is a ridge regression (experiments/facts/answer_slot.py; settings in built_by)"
)


@dataclasses.dataclass
class SlotExamples:
    """What R0 is fitted on: answer-opening states, the keys they should read, and states of
    positions that should read nothing."""

    opening: list[Tensor] = dataclasses.field(default_factory=list)
    key: list[Tensor] = dataclasses.field(default_factory=list)
    silent: list[Tensor] = dataclasses.field(default_factory=list)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.stack(self.opening), torch.stack(self.key), torch.cat(self.silent)


def first_occurrence(ids: list[int], value: list[int]) -> int | None:
    return next(
        (i for i in range(len(ids) - len(value) + 1) if ids[i : i + len(value)] == value), None
    )


@torch.no_grad()
def query_states(ga: GenerativeAdapter, ids: list[int]) -> Tensor:
    """rms(input of the query layer) at every position of `ids` read by the frozen LM alone."""
    layer = ga.generator.config.queries.layer
    hidden = ga.base_model(torch.tensor([ids], device=ga.device), output_hidden_states=True)
    return rms_normalize(hidden.hidden_states[layer][0].float()).cpu()


def value_start(tok, answer: list[int], value: str) -> int | None:
    """Where `value` begins among an answer's tokens (after a space, or opening it), if it does."""
    found = [
        first_occurrence(answer, tok(v, add_special_tokens=False).input_ids)
        for v in (" " + value, value)
    ]
    return min((i for i in found if i is not None), default=None)


@torch.no_grad()
def context_examples(
    ga: GenerativeAdapter, episode, out: SlotExamples, teacher: list[str] | None = None
) -> None:
    """The episode's answer openings with the keys of their gold values, and silent positions:
    a sample of its context, and each question with its teacher-forced gold answer and, given
    `teacher` (an answer per question, e.g. the prompted LM's), with that answer too: the
    position before the gold value in it opens it, the others are silent."""
    gen, tok, fmt = ga.generator, ga.tokenizer, PromptFormat(ga.tokenizer)
    flat, ids, mask = context_chunks(tok, episode.context, gen.config.chunk_len)
    mask = mask.to(ga.device)
    h = gen.features(ga.context_features(ids, mask)[gen.config.key_layer], mask)[1]
    keys = h[mask.bool()].float().cpu()  # key features h̄_t of each context token, in order
    out.silent.append(keys[torch.randperm(len(keys))[:CONTEXT_SAMPLE]])
    for i, qa in enumerate(episode.qas):
        at = first_occurrence(flat, tok(" " + qa.answers[0], add_special_tokens=False).input_ids)
        if at is None or not keys[at].any():  # not spelled so, or first in its chunk: no key
            continue
        prompt = fmt.prompt_ids(qa.question)
        answers = [fmt.answer_ids(qa.answers[0], qa.question)]
        if teacher is not None:
            answers.append(tok(teacher[i], add_special_tokens=False).input_ids)
        for answer in answers:
            states = query_states(ga, prompt + answer)
            start = value_start(tok, answer, qa.answers[0])
            if start is None:  # an answer that never writes the value: every position is silent
                out.silent.append(states)
                continue
            opening = len(prompt) - 1 + start
            out.opening.append(states[opening])
            out.key.append(keys[at])
            out.silent.append(torch.cat([states[:opening], states[opening + 1 :]]))


@torch.no_grad()
def free_answers(ga: GenerativeAdapter, method: str, episode) -> list[str]:
    """The greedy answers `method` (base, prompt or genadapter) gives the episode's questions
    after reading its context (base reads nothing)."""
    with make_method(method, ga.base_model, ga.tokenizer, ga=ga).adapt(episode.context) as handle:
        return handle.answers([qa.question for qa in episode.qas])


@torch.no_grad()
def free_answer_states(ga: GenerativeAdapter, method: str, episode, out: SlotExamples) -> None:
    """Silent positions: the free answers `method` gives the episode's questions."""
    fmt, tok = PromptFormat(ga.tokenizer), ga.tokenizer
    for qa, answer in zip(episode.qas, free_answers(ga, method, episode), strict=True):
        prompt = fmt.prompt_ids(qa.question)
        states = query_states(ga, prompt + tok(answer, add_special_tokens=False).input_ids)
        out.silent.append(states[len(prompt) :])


def slot_map(examples: SlotExamples, weight: float, lam: float) -> Tensor:
    """R0 (d x d): openings -> their keys (each weighing `weight` silent positions), silent
    positions -> 0, by ridge regression (warm_start.regression)."""
    opening, key, silent = examples.tensors()
    X = torch.cat([weight**0.5 * opening, silent])
    Y = torch.cat([weight**0.5 * key, torch.zeros_like(silent)])
    return regression(X, Y, lam)[0].float()


def with_slot(next_token: GenerativeAdapter, layer: int) -> GenerativeAdapter:
    """A generator of the next-token copy's config with a second target at `layer`, both
    starting as copies of its one target (its K, V, B, G, A)."""
    if layer in next_token.generator.layers:
        raise ValueError(f"the next-token copy already targets layer {layer}: choose another")
    config = dataclasses.replace(next_token.config, layers=[layer, *next_token.generator.layers])
    ga = GenerativeAdapter.from_base(next_token.base_model, config, next_token.tokenizer).eval()
    source = next_token.generator[next_token.generator.names[0]]
    with torch.no_grad():
        for block in ga.generator.blocks.values():
            for name, p in block.named_parameters():
                p.copy_(getattr(source, name))
    return ga


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--generator", type=Path, default=ROOT / "experiments/generators/next-token-copy"
    )
    p.add_argument("--slot-layer", type=int, default=28)
    p.add_argument("--weight", type=float, default=100.0, help="weight of an opening in R0's fit")
    p.add_argument("--lam", type=float, default=0.01, help="ridge lambda of R0's fit")
    p.add_argument("--beta", type=float, nargs="+", default=[60.0, 120.0], help="slot's copy")
    p.add_argument("--source-beta", type=float, default=30.0, help="the copy's beta in --generator")
    p.add_argument("--gate-scale", type=float, default=3.0, help="the slot's gate: c G")
    p.add_argument("--rounds", type=int, default=2, help="fits; each adds the last's answers")
    p.add_argument("--fit-beta", type=float, help="the slot's copy in its own answers (1st --beta)")
    p.add_argument("--fit-episodes", type=int, default=200)
    p.add_argument("--answer-episodes", type=int, default=48, help="free answers, per round")
    p.add_argument("--gate-episodes", type=int, default=96)
    p.add_argument(
        "--teacher-episodes", type=int, default=0, help="fit episodes with prompted answers too"
    )
    add_scoring_arguments(p, OUT)
    p.add_argument("--save", help="save the generator here (one beta)")
    args = p.parse_args()
    if args.save and len(args.beta) != 1:
        p.error("--save takes one --beta")
    torch.manual_seed(0)
    next_token = GenerativeAdapter.from_pretrained(args.generator)
    ga = with_slot(next_token, args.slot_layer)
    slot = ga.generator[next(t.name for t in ga.generator.targets if t.layer == args.slot_layer)]
    train = read_episodes(DATA / "train.jsonl")[0]
    examples = SlotExamples()
    for i, episode in enumerate(tqdm(train[: args.fit_episodes], desc="slot examples")):
        teacher = free_answers(ga, "prompt", episode) if i < args.teacher_episodes else None
        context_examples(ga, episode, examples, teacher)
    answering = train[args.fit_episodes :]
    for episode in tqdm(answering[: args.answer_episodes], desc="base answers"):
        free_answer_states(ga, "base", episode, examples)
    h, label = gate_examples(ga, train[: args.gate_episodes], args.slot_layer)
    copy = slot.B.detach().clone() / args.source_beta  # B of a copy of size 1
    with torch.no_grad():
        slot.G.copy_(args.gate_scale * fit_gate(h, label))
    fit_beta = args.beta[0] if args.fit_beta is None else args.fit_beta
    for r in range(args.rounds):  # the slot's own free answers, with a copy of fit_beta
        with torch.no_grad():
            slot.A.copy_(slot.K @ slot_map(examples, args.weight, args.lam))
            slot.B.copy_(fit_beta * copy)
        if r + 1 < args.rounds:
            later = answering[args.answer_episodes * (r + 1) :][: args.answer_episodes]
            for episode in tqdm(later, desc=f"own answers, round {r + 1}"):
                free_answer_states(ga, "genadapter", episode, examples)
    episodes = read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]
    results: dict = {"args": {k: str(x) for k, x in vars(args).items()}, "scores": {}}
    model, tok = ga.base_model, ga.tokenizer

    def record(name: str, adapter: GenerativeAdapter) -> None:
        method = make_method("genadapter", model, tok, ga=adapter)
        results["scores"][name] = harness_scores(method, episodes, args.questions)
        tqdm.write(f"{name}: {results['scores'][name]}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    if args.episodes:
        record("next-token copy", next_token)
    for beta in args.beta:
        with torch.no_grad():
            slot.B.copy_(beta * copy)
        if args.episodes:
            record(f"slot beta {beta}", ga)
    if args.save:
        ga.config.extra = {
            "built_by": " ".join(["python experiments/facts/answer_slot.py", *sys.argv[1:]]),
            "notes": NOTES,
        }
        ga.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
