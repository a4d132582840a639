"""Plot and summarise a pretraining run from its metrics CSV; copy the CSV next to the config.

    python experiments/pretrain/report.py runs/pretrain-smollm2-wiki experiments/pretrain/smollm2-wiki
writes <out>.metrics.csv, <out>.png (train loss, held-out gap_closed over steps) and <out>.json
(the final held-out figures).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(run_dir: str, out_prefix: str) -> None:
    src = Path(run_dir) / "csv" / "metrics.csv"
    with open(src) as f:
        rows = list(csv.DictReader(f))
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, f"{out}.metrics.csv")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in [("train/loss", "mixed"), ("train/completion_loss", "completion"),
                       ("train/reconstruction_loss", "reconstruction")]:  # fmt: skip
        x, y = series(rows, key)
        if x:
            ax1.plot(x, y, label=label, alpha=0.8)
    ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss (adapted)")
    ax1.legend()
    final = {}
    for obj in ("completion", "reconstruction"):
        x, y = series(rows, f"val/{obj}/gap_closed")
        if x:
            ax2.plot(x, y, marker="o", label=obj)
        for what in ("loss_base", "loss_adapted", "loss_prompt", "gap_closed"):
            _, v = series(rows, f"val/{obj}/{what}")
            if v:
                final[f"{obj}/{what}"] = v[-1]
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set(
        xlabel="step", ylabel="gap closed", title="held-out: (base − adapted) / (base − prompt)"
    )
    ax2.legend()
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    steps = [int(r["step"]) for r in rows if r.get("step")]
    final["steps"] = max(steps) + 1 if steps else 0
    Path(f"{out}.json").write_text(json.dumps(final, indent=2) + "\n")
    print(json.dumps(final, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
