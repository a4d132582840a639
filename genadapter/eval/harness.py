"""Run every method on every episode of one task and collect one record per (method, episode).

Same base model, same data, same prompt format for all methods; the whole run is fixed by an
`EvalConfig`, which is saved next to the results so every figure can be regenerated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from genadapter.assets import DEFAULT_MODEL
from genadapter.config import strict_from_dict
from genadapter.data.corpus import among_wikipedia
from genadapter.data.episodes import read_episodes
from genadapter.eval.methods import BaseModelChanged, DoesNotFit, Method, OverBudget, make_method
from genadapter.eval.metrics import option_accuracy, peak_rss_bytes, reset_peak_rss, squad_scores
from genadapter.eval.prompts import join_context

TASKS = ("qa", "demo", "conversation")
ALL_METHODS = (
    "base",
    "prompt",
    "prompt-window",
    "genadapter",
    "ttt-lora",
    "ttt-bitfit",
    "ttt-adapter",
)


@dataclass
class EvalConfig:
    """Everything that fixes an evaluation run (YAML keys = field names = CLI flags)."""

    task: str = "qa"
    data: list[str] = field(default_factory=list)  # episode files; each is one group in plots
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    out: str = "experiments/eval/out"
    model: str = DEFAULT_MODEL
    generator: str | None = None  # trained generator dir; None = fresh (untrained) generator
    # more generators side by side: method "genadapter:LABEL" uses generators[LABEL]
    generators: dict[str, str] = field(default_factory=dict)
    max_episodes: int | dict[str, int] | None = None  # per data file (a dict: per file path)
    max_questions: int | None = None  # per episode
    ttt_steps: int = 5
    ttt_lr: float = 1e-3
    ttt_max_len: int = 512
    window: int = 256  # prompt-window budget, tokens of context
    max_new_tokens: int = 24
    seed: int = 0
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method kwargs
    # earlier results.json files: a record of the same method on the same episode under the same
    # settings is taken over instead of recomputed (see `reusable_records`); missing files are ignored
    reuse: list[str] = field(default_factory=list)
    # an episode's questions answered and scored as one batch (same results, several times faster)
    batch_questions: bool = True
    # qa: each episode's documents spread among this many Wikipedia summaries (as `make demo`)
    wiki_docs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.reuse, str):
            self.reuse = [self.reuse]
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        labelled = {m for m in self.methods if m.startswith("genadapter:")}
        missing = sorted(m for m in labelled if m.split(":", 1)[1] not in self.generators)
        if missing:
            raise ValueError(f"{missing}: no such label in `generators` {sorted(self.generators)}")
        unknown = sorted(set(self.methods) - set(ALL_METHODS) - labelled)
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("no methods to evaluate")
        if self.wiki_docs < 0 or (self.wiki_docs and self.task != "qa"):
            raise ValueError(f"wiki_docs {self.wiki_docs}: a count >= 0, and only for task qa")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return strict_from_dict(cls, d, "eval config keys")

    def method_kwargs(self, name: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if name == "prompt-window":
            kwargs["window"] = self.window
        if name.startswith("ttt-"):
            kwargs.update(
                steps=self.ttt_steps, lr=self.ttt_lr, max_len=self.ttt_max_len, seed=self.seed
            )
        kwargs.update(self.method_options.get(name, {}))
        return kwargs


def load_episodes(config: EvalConfig) -> tuple[list[tuple[str, Any]], list[str]]:
    """(source, episode) pairs of every data file, and every problem found (skipped lines)."""
    pairs, problems = [], []
    for path in config.data:
        episodes, bad = read_episodes(path, kind=config.task)
        problems += [f"{path}: {p}" for p in bad]
        limit = config.max_episodes
        if isinstance(limit, dict):
            limit = limit.get(str(path))
        for ep in episodes[:limit]:
            if config.wiki_docs:
                seed = zlib.crc32(f"{config.seed}:{ep.id}".encode())
                ep = dataclasses.replace(
                    ep, context=among_wikipedia(ep.context, config.wiki_docs, seed)
                )
            pairs.append((str(path), ep))
    return pairs, problems


def evaluate_episode(
    method: Method,
    episode: Any,
    task: str,
    max_questions: int | None = None,
    batched: bool = True,
) -> dict[str, Any]:
    """Adapt `method` to one episode and score it; one JSON-ready record. `batched`: the
    episode's questions answered and scored as one batch (`eval/batched.py`), else one by one."""
    reset_peak_rss()
    rec: dict[str, Any] = {"status": "ok"}
    with method.adapt(episode.context_texts()) as adapted:
        score = demo_items if task == "demo" else qa_items
        items, seconds = score(adapted, episode, max_questions, batched)
        stats = {k: v for k, v in adapted.stats.items() if k != "train_losses"}
        if "train_losses" in adapted.stats:
            stats["train_loss_first"] = adapted.stats["train_losses"][0]
            stats["train_loss_last"] = adapted.stats["train_losses"][-1]
    rec.update(stats)
    rec["answer_seconds"] = seconds / max(len(items), 1)
    rec["peak_rss_bytes"] = peak_rss_bytes()
    keys = ("accuracy",) if task == "demo" else ("em", "f1", "choice", "nll")
    for k in keys:
        values = [it[k] for it in items if k in it]
        if values:
            rec[k] = sum(values) / len(values)
    rec["items"] = items
    return rec


def _each(batched: bool, fn, *columns: list) -> list:
    """fn over whole columns at once, or one row at a time (the same calls, batches of one)."""
    if batched:
        return fn(*columns)
    return [fn(*[[x] for x in row])[0] for row in zip(*columns, strict=True)]


def demo_items(adapted, episode, max_questions, batched: bool) -> tuple[list[dict], float]:
    """Each query's option scores and accuracy; the seconds spent scoring."""
    queries = episode.queries[:max_questions]
    t0 = time.perf_counter()
    scores = _each(
        batched, adapted.option_scores, [q.input for q in queries], [q.options for q in queries]
    )
    seconds = time.perf_counter() - t0
    items = [
        {
            "input": q.input,
            "gold": q.output,
            "scores": s,
            "accuracy": option_accuracy(s, q.options, q.output),
        }
        for q, s in zip(queries, scores, strict=True)
    ]
    return items, seconds


def qa_items(adapted, episode, max_questions, batched: bool) -> tuple[list[dict], float]:
    """Each question's greedy answer, F1 / EM, gold-answer NLL (did the knowledge get in at
    all?) and, with options, choice (the right value, or only the right kind of value?); the
    seconds spent answering."""
    qas = episode.qas[:max_questions]
    questions = [qa.question for qa in qas]
    t0 = time.perf_counter()
    predictions = _each(batched, adapted.answers, questions)
    seconds = time.perf_counter() - t0
    with_options = [qa for qa in qas if qa.options]
    golds, option_inputs = [qa.answers[0] for qa in qas], [qa.question for qa in with_options]
    options = [qa.options for qa in with_options]
    if batched:  # gold answers and options in one scoring pass (one read of a prompt's context)
        pairs = list(zip(questions, golds, strict=True))
        pairs += [(x, o) for x, opts in zip(option_inputs, options, strict=True) for o in opts]
        flat = iter(adapted.mean_logprobs(pairs))
        nlls = [-next(flat) for _ in qas]
        scores = [[next(flat) for _ in opts] for opts in options]
    else:
        nlls = _each(False, adapted.answer_nlls, questions, golds)
        scores = _each(False, adapted.option_scores, option_inputs, options)
    choice = {
        id(qa): option_accuracy(s, qa.options, qa.answers[0])
        for qa, s in zip(with_options, scores, strict=True)
    }
    items = []
    for qa, prediction, nll in zip(qas, predictions, nlls, strict=True):
        item = {"question": qa.question, "gold": qa.answers, "prediction": prediction}
        item.update(squad_scores(prediction, qa.answers), nll=nll)
        if id(qa) in choice:
            item["choice"] = choice[id(qa)]
        items.append(item)
    return items, seconds


# settings that change a method's record beyond its own kwargs
RECORD_SETTINGS = ("task", "model", "max_questions", "max_new_tokens", "seed", "wiki_docs")
REUSABLE_STATUS = ("ok", "does not fit", "over budget")  # errors are always retried


def generator_fingerprints(methods: dict[str, Method]) -> dict[str, str]:
    """What a genadapter record depends on besides the settings: all its generator's weights
    (`Generator.fingerprint` covers only those that give a state its meaning)."""
    out = {}
    for name, method in methods.items():
        if hasattr(method, "ga"):
            h = hashlib.sha256()
            for key, value in sorted(method.ga.generator_state_dict().items()):
                h.update(key.encode() + value.detach().cpu().float().contiguous().numpy().tobytes())
            out[name] = h.hexdigest()[:16]
    return out


def reusable_records(
    config: EvalConfig, fingerprints: dict[str, str]
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(method, source, episode id) -> a record from `config.reuse` computed under the same
    settings: equal `RECORD_SETTINGS` and method kwargs, and for genadapter methods the same
    generator weights (a fingerprint; results without one are not reused for them)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for path in config.reuse:
        if not Path(path).is_file():
            continue
        earlier = json.loads(Path(path).read_text())
        then = EvalConfig.from_dict(earlier["config"])
        if any(getattr(then, k) != getattr(config, k) for k in RECORD_SETTINGS):
            continue
        for rec in earlier["records"]:
            name = rec["method"]
            same = (
                name in config.methods
                and rec["status"] in REUSABLE_STATUS
                and then.method_kwargs(name) == config.method_kwargs(name)
                and earlier.get("generator_fingerprints", {}).get(name) == fingerprints.get(name)
            )
            if same:
                key = (name, rec["source"], rec["episode"])
                out.setdefault(key, {**rec, "reused_from": str(path)})
    return out


def build_methods(config: EvalConfig, model, tokenizer, ga=None) -> dict[str, Method]:
    methods = {}
    for name in config.methods:
        kind, _, label = name.partition(":")
        adapter = None
        if kind == "genadapter":
            path = config.generators[label] if label else config.generator
            adapter = ga if ga is not None and not label else load_generator(path, model, tokenizer)
        methods[name] = make_method(
            kind, model, tokenizer, ga=adapter, **config.method_kwargs(name)
        )
    return methods


def load_generator(path: str | None, model, tokenizer):
    """A trained generator from `path`; None gives a fresh (untrained) one, equal to the base."""
    from genadapter import GenerativeAdapter, GeneratorConfig

    if path:
        return GenerativeAdapter.from_pretrained(path, base_model=model, tokenizer=tokenizer)
    return GenerativeAdapter.from_base(model, GeneratorConfig(), tokenizer=tokenizer)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate_pair(
    method, episode, config: EvalConfig, problems: list[str], label: str
) -> dict[str, Any]:
    """One (method, episode) record; a failure is recorded, not raised (one bad pair must not
    sink the run), except a base model changed by test-time training."""
    try:
        return evaluate_episode(
            method, episode, config.task, config.max_questions, config.batch_questions
        )
    except DoesNotFit as e:
        return {"status": "does not fit", "reason": str(e)}
    except OverBudget as e:
        return {"status": "over budget", "reason": str(e)}
    except BaseModelChanged:
        raise
    except Exception as e:
        rec = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        problems.append(f"{label}: {rec['reason']}")
        return rec


def run_eval(
    config: EvalConfig, model=None, tokenizer=None, ga=None, progress: bool = True
) -> dict[str, Any]:
    """Evaluate every method on every episode; returns the results dict (see `report`).

    Bad episodes are skipped and listed under "problems"; a context too long for a prompt
    method is recorded as "does not fit"; any other failure of one (method, episode) pair is
    recorded as "error" with its message, except a base model changed by test-time training,
    which stops the run (every later result would be wrong).
    """
    model_name = config.model
    if model is None:
        from genadapter.assets import load_base_model

        model, tokenizer = load_base_model(config.model)
    else:
        model_name = getattr(model.config, "_name_or_path", "") or "(model passed in)"
    model.eval()
    torch.manual_seed(config.seed)
    pairs, problems = load_episodes(config)
    methods = build_methods(config, model, tokenizer, ga)
    fingerprints = generator_fingerprints(methods)
    reusable = reusable_records(config, fingerprints)
    records = []
    bar = tqdm(total=len(pairs) * len(methods), disable=not progress, desc="eval")
    for name, method in methods.items():
        for source, episode in pairs:
            bar.set_postfix_str(f"{name} {episode.id}")
            n_tokens = len(
                tokenizer(join_context(episode.context_texts()), add_special_tokens=False).input_ids
            )
            base = {"method": name, "episode": episode.id, "source": source}
            base["context_tokens"] = n_tokens
            earlier = reusable.get((name, source, episode.id))
            if earlier is not None and earlier["context_tokens"] == n_tokens:
                records.append(earlier)  # the same episode text, as far as its length tells
            else:
                rec = evaluate_pair(method, episode, config, problems, f"{name} on {episode.id}")
                records.append({**base, **rec})
            bar.update()
    bar.close()
    generator: str | dict = "n/a"
    if "genadapter" in methods:
        generator = config.generator or "untrained (fresh generator: equals base by design)"
    if config.generators:
        generator = {"genadapter": generator, **config.generators}
    return {
        "config": dataclasses.asdict(config),
        "git_commit": git_commit(),
        "model": model_name,
        "generator": generator,
        "generator_fingerprints": fingerprints,
        "torch_threads": torch.get_num_threads(),
        "problems": problems,
        "records": records,
    }
