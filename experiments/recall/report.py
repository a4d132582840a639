"""Choice accuracy vs K from the recall evaluation (experiments/recall/eval.yaml): a plot and a
table, written into results/ and between the markers of README.md.

    python experiments/recall/report.py [results/results.json] [--marker recall]

The table goes between README.md's `<!-- MARKER:start -->` and `<!-- MARKER:end -->`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).parent
README = HERE / "README.md"
N_OPTIONS = 8  # genadapter/data/benchmarks/recall.py: options = min(8, K)


def k_of(source: str) -> int:
    return int(re.search(r"-k(\d+)\.jsonl$", source).group(1))


def choice_by_k(results: dict) -> dict[str, dict[int, tuple[float, int]]]:
    """{method: {K: (mean choice over the questions, questions)}} of the records that ran."""
    table: dict[str, dict[int, list[float]]] = {}
    for rec in results["records"]:
        if rec.get("status") != "ok":
            continue
        choices = [it["choice"] for it in rec["items"] if "choice" in it]
        table.setdefault(rec["method"], {}).setdefault(k_of(rec["source"]), []).extend(choices)
    return {
        m: {k: (sum(v) / len(v), len(v)) for k, v in sorted(by_k.items())}
        for m, by_k in table.items()
    }


def markdown(by_method: dict[str, dict[int, tuple[float, int]]]) -> str:
    ks = sorted({k for by_k in by_method.values() for k in by_k})
    lines = ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |"]
    lines.append("|---|" + "---|" * len(ks))
    lines.append("| chance | " + " | ".join(f"{100 / min(N_OPTIONS, k):.1f}" for k in ks) + " |")
    for method, by_k in by_method.items():
        cells = [f"{100 * by_k[k][0]:.1f}" if k in by_k else "–" for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n = max((q for by_k in by_method.values() for _, q in by_k.values()), default=0)
    return "\n".join(lines) + f"\n\nChoice accuracy %, {n} questions per K and method."


def plot(by_method: dict[str, dict[int, tuple[float, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ks = sorted({k for by_k in by_method.values() for k in by_k})
    ax.plot(ks, [100 / min(N_OPTIONS, k) for k in ks], "k:", label="chance")
    for method, by_k in by_method.items():
        xs = sorted(by_k)
        ax.plot(xs, [100 * by_k[k][0] for k in xs], "o-", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="K pairs in the context", ylabel="choice accuracy %", ylim=(0, 100))
    ax.set_title("recall: the asked key's value among the context's values")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, nargs="?", default=HERE / "results" / "results.json")
    p.add_argument("--marker", default="recall", help="README.md's markers of the table")
    args = p.parse_args()
    path, start, end = args.results, f"<!-- {args.marker}:start -->", f"<!-- {args.marker}:end -->"
    by_method = choice_by_k(json.loads(path.read_text()))
    table = markdown(by_method)
    plot(by_method, path.parent / "choice_vs_k.png")
    (path.parent / "choice_vs_k.md").write_text(table + "\n")
    text = README.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        README.write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
