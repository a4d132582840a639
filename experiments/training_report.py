"""Plot and summarise a pretraining or fine-tuning run from its metrics CSV.

    python experiments/training_report.py RUN_DIR OUT_PREFIX [--after EARLIER.metrics.csv]

writes OUT_PREFIX.metrics.csv (the run's CSV; with --after, the earlier run's rows first and,
for a run started from its weights, this run's steps shifted to follow them), OUT_PREFIX.png
(train losses; held-out gap_closed of every objective or task; held-out choice accuracy of the
tasks whose questions rank candidates) and OUT_PREFIX.json (the last held-out figures of each).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(run_dir: str, out_prefix: str, after: str | None = None) -> dict:
    rows = read_rows(Path(run_dir) / "csv" / "metrics.csv")
    boundary = None  # the step where the continuation starts
    if after:  # a continuation run: its steps follow the earlier run's
        earlier = read_rows(Path(after))
        offset = max(int(r["step"]) for r in earlier if r.get("step")) + 1
        if min(int(r["step"]) for r in rows if r.get("step")) >= offset:
            offset = 0  # a resumed run (--ckpt_path) already counts on from the earlier steps
        rows = earlier + [{**r, "step": str(int(r["step"]) + offset)} for r in rows]
        boundary = min(int(r["step"]) for r in rows[len(earlier) :] if r.get("step"))
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{out}.metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    gaps = [k for k in keys if k.startswith("val/") and k.endswith("/gap_closed")]
    choices = [k for k in keys if k.startswith("val/") and k.endswith("/choice")]
    n = 1 + bool(gaps) + bool(choices)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    ax1, ax2 = axes[0][0], axes[0][1 if gaps else 0]
    for key in (k for k in keys if k.startswith("train/") and ("loss" in k)):
        x, y = series(rows, key)
        if x:
            ax1.plot(x, y, label=key.removeprefix("train/"), alpha=0.8)
    ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss (adapted)")
    ax1.legend()
    final: dict = {}
    for key in gaps:
        name = key.removeprefix("val/").removesuffix("/gap_closed")
        x, y = series(rows, key)
        ax2.plot(x, y, marker="o", label=name)
        for what in ("loss_base", "loss_adapted", "loss_prompt", "gap_closed"):
            _, v = series(rows, f"val/{name}/{what}")
            if v:
                final[f"{name}/{what}"] = v[-1]
    for ax in {ax1, ax2} if boundary else ():
        ax.axvline(boundary, color="grey", ls="--", lw=0.8)
    if gaps:
        ax2.axhline(0, color="grey", lw=0.5)
        ax2.set(
            xlabel="step", ylabel="gap closed", title="held-out: (base − adapted) / (base − prompt)"
        )
        ax2.legend()
    if choices:
        ax3 = axes[0][-1]
        for key in choices:
            x, y = series(rows, key)
            ax3.plot(x, y, marker="o", label=key.removeprefix("val/").removesuffix("/choice"))
            final[key.removeprefix("val/")] = y[-1]
        ax3.set(
            xlabel="step", ylabel="gold ranks first", title="held-out choice accuracy", ylim=(0, 1)
        )
        ax3.legend()
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    steps = [int(r["step"]) for r in rows if r.get("step")]
    final["steps"] = max(steps) + 1 if steps else 0
    Path(f"{out}.json").write_text(json.dumps(final, indent=2) + "\n")
    print(json.dumps(final, indent=2))
    return final


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("out_prefix")
    p.add_argument("--after", help="metrics CSV of the run this one continues")
    a = p.parse_args()
    main(a.run_dir, a.out_prefix, a.after)
