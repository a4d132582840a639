"""Can the frozen LM do the task with the context in its prompt? Prompt-method choice accuracy
on `facts` (validation, 1-3 documents) and on `recall`, asked as questions in other words and as
clozes (the pair's own sentence up to its value), at K = 2 without filler and at K = 4 / 16 as
the benchmark has them. A benchmark the prompted LM cannot solve cannot rank the memories.

    python experiments/recall/prompt_check.py
"""

from __future__ import annotations

from genadapter.assets import DEFAULT_MODEL, load_base_model
from genadapter.data.benchmarks import make_facts, make_recall
from genadapter.eval.harness import evaluate_episode
from genadapter.eval.methods import make_method


def choice(method, episodes) -> tuple[float, int]:
    items = [it for e in episodes for it in evaluate_episode(method, e, "qa", 4)["items"]]
    scores = [it["choice"] for it in items if "choice" in it]
    return sum(scores) / len(scores), len(scores)


def main() -> int:
    model, tokenizer = load_base_model(DEFAULT_MODEL)
    prompt = make_method("prompt", model, tokenizer, max_new_tokens=12)
    cases = {
        "facts validation, 1-3 documents (8 options)": make_facts(
            "validation", 6, seed=0, docs_per_episode=(1, 3)
        ),
    }
    for ask in ("question", "cloze"):
        cases[f"recall validation, {ask}s, K = 2, no filler (2 options)"] = make_recall(
            "validation", 8, k=2, seed=0, filler=0.0, ask=ask
        )
        for k in (4, 16):
            cases[f"recall validation, {ask}s, K = {k} ({min(8, k)} options)"] = make_recall(
                "validation", 8, k=k, seed=0, ask=ask
            )
    for name, episodes in cases.items():
        accuracy, n = choice(prompt, episodes)
        print(f"{name}: prompt choice {100 * accuracy:.1f} % of {n} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
