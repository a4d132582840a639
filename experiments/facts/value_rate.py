"""How often a free answer contains its gold value, per method and group of an eval's results.

Token F1 mixes two failures: answers that never write the value, and answers that write it among
many other words. This separates them: the share of greedy answers that contain a gold answer
(both SQuAD-normalised: lower case, no punctuation or articles, as words), and the mean F1 of
those that do.

    python experiments/facts/value_rate.py experiments/eval/results/facts_headline [--out F]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from genadapter.eval.metrics import squad_words


def contains(prediction: str, gold: str) -> bool:
    p, g = squad_words(prediction), squad_words(gold)
    return bool(g) and any(p[i : i + len(g)] == g for i in range(len(p) - len(g) + 1))


def value_rates(records: list[dict]) -> dict[str, dict[str, float]]:
    """{"method / group": {answers, contains %, F1 % of those containing, F1 %}}."""
    items = collections.defaultdict(list)
    for record in records:
        items[f"{record['method']} / {record['group']}"] += record["items"]
    rates = {}
    for key, its in sorted(items.items()):
        hits = [it for it in its if any(contains(it["prediction"], g) for g in it["gold"])]
        rates[key] = {
            "answers": len(its),
            "contains %": 100 * len(hits) / len(its),
            "F1 % where it does": 100 * sum(it["f1"] for it in hits) / max(len(hits), 1),
            "F1 %": 100 * sum(it["f1"] for it in its) / len(its),
        }
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="an eval's out folder (its results.json)")
    p.add_argument("--out", type=Path, help="default: RESULTS/value_rate.md")
    args = p.parse_args()
    records = json.loads((args.results / "results.json").read_text())["records"]
    rates = value_rates([r for r in records if r["status"] == "ok" and r["items"]])
    columns = list(next(iter(rates.values())))
    lines = ["| method / group | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [
        f"| {k} | " + " | ".join(f"{v[c]:.1f}" for c in columns) + " |" for k, v in rates.items()
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    (args.out or args.results / "value_rate.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
