"""Check the headline targets (issue 7) on a `facts` evaluation and write them as JSON + Markdown.

    python experiments/eval/headline_targets.py experiments/eval/results/headline_facts \
        [--method genadapter:headline]     # -> targets-headline.{json,md}

Per context-length group (one data file each), for one genadapter method (default the
instruction-tuned one):
- gap closed by genadapter between base and prompt, in F1 and in answer NLL
  (target: F1 gap >= 0.5 where the context fits the prompt window);
- at the longest context, genadapter F1 vs prompt-window F1 (target: higher);
- adaptation time of ttt-lora / genadapter (target: >= 20x at equal or better F1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from genadapter.eval.report import summarize

TUNED, LORA = "genadapter:instruct", "ttt-lora"


def gap(base: float | None, method: float | None, prompt: float | None) -> float | None:
    if None in (base, method, prompt) or abs(prompt - base) < 1e-9:
        return None
    return (method - base) / (prompt - base)


def main(results_dir: str, method: str = TUNED) -> dict:
    results = json.loads((Path(results_dir) / "results.json").read_text())
    summary = summarize(results)
    rows = {(r["method"], r["group"]): r for r in summary["by_group"]}
    groups = sorted({g for _, g in rows}, key=lambda g: rows[(method, g)]["context_tokens"] or 0)
    out: dict = {"groups": {}}
    for g in groups:

        def get(m: str, key: str, g: str = g):
            return rows.get((m, g), {}).get(key)

        fits = (get("prompt", "ok") or 0) > 0
        entry = {
            "context_tokens": get(method, "context_tokens"),
            "prompt_fits": fits,
            "f1": {m: get(m, "f1") for m, _ in rows if _ == g},
            "nll": {m: get(m, "nll") for m, _ in rows if _ == g},
            "f1_gap_closed": gap(get("base", "f1"), get(method, "f1"), get("prompt", "f1"))
            if fits
            else None,
            "nll_gap_closed": gap(get("base", "nll"), get(method, "nll"), get("prompt", "nll"))
            if fits
            else None,
            "f1_vs_prompt_window": (get(method, "f1") or 0) - (get("prompt-window", "f1") or 0),
        }
        t_lora, t_ga = get(LORA, "adapt_seconds"), get(method, "adapt_seconds")
        if t_lora and t_ga:
            entry["adapt_speedup_vs_lora"] = t_lora / t_ga
            entry["f1_at_least_lora"] = (get(method, "f1") or 0) >= (get(LORA, "f1") or 0)
        out["groups"][g] = entry
    fitting = [e for e in out["groups"].values() if e["f1_gap_closed"] is not None]
    longest = out["groups"][groups[-1]] if groups else {}
    out["targets"] = {
        "f1_gap_closed>=0.5 where it fits": all(e["f1_gap_closed"] >= 0.5 for e in fitting)
        if fitting
        else None,
        "beats prompt-window at the longest context": longest.get("f1_vs_prompt_window", 0) > 0,
        "adapts >=20x faster than ttt-lora at >= F1": all(
            e.get("adapt_speedup_vs_lora", 0) >= 20 and e.get("f1_at_least_lora", False)
            for e in out["groups"].values()
        ),
    }
    lines = [
        "| group | ctx tokens | F1 gap closed | NLL gap closed | F1 − prompt-window | adapt × vs ttt-lora |",
        "|---|---|---|---|---|---|",
    ]
    f = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    for g, e in out["groups"].items():
        lines.append(
            f"| {g} | {f(e['context_tokens'], 0)} | {f(e['f1_gap_closed'])} | {f(e['nll_gap_closed'])} | "
            f"{f(100 * e['f1_vs_prompt_window'], 1)} | {f(e.get('adapt_speedup_vs_lora'), 1)} |"
        )
    lines += ["", *(f"- {k}: **{'met' if v else 'missed'}**" for k, v in out["targets"].items())]
    name = "targets" if method == TUNED else f"targets-{method.split(':')[-1]}"
    lines = [f"{method}:", "", *lines]
    (Path(results_dir) / f"{name}.md").write_text("\n".join(lines) + "\n")
    (Path(results_dir) / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir")
    p.add_argument("--method", default=TUNED, help="the genadapter method to check")
    args = p.parse_args()
    main(args.results_dir, args.method)
