"""Table and plot of the instruction-tuning ablations (the configs in this folder).

    python experiments/finetune/ablations/report.py

Copies the metrics CSV of every run found under runs/ablation-ft-*/ into results/ (committed),
then builds results.md, results.json and results.png from results/*.metrics.csv: per ablation
and validation step, the held-out facts answer NLL under the state (loss_adapted, next to the
base's and the prompt's), the choice accuracy among 4 candidates (chance 25 %) and, for runs
logged since they exist, the retrieval figures at the last step: how often a target's query at
the question finds an answer token as its best-matching context key (chance ~1 %), and the
answer tokens' share of the state's linear read-out weights |s_t| (uniform ~1 %), and for
runs with a write gate, its mean on the answer tokens and on the others (it starts at 1).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
RESULTS = HERE / "results"
TASK = "val/facts/validation"
LABELS = {  # also the table's row order
    "base": "reference: pretrained all-layer generator, per-token keys, Frobenius",
    "keywin16": "keys: mean of the last 16 tokens (key_window 16)",
    "svd": "normalisation: SVD",
    "attention": "targets: o_proj only",
    "mlp": "targets: down_proj only",
    "scratch": "no pretraining (fresh generator)",
    "retrieval": "loss: + retrieval loss of kind softmax (weight 1)",
    "retrieval-share": "loss: + retrieval loss of kind share (weight 1)",
    "gate": "keys: learned write gate (key_gate)",
    "gate-share": "keys: write gate, loss: + retrieval loss of kind share",
    "gate-share-long": "the same, 360 steps",
    "retrieval-keywin16": "loss: + retrieval loss, keys: key_window 16",
    "scratch-rin128-gate-share": "fresh generator with r_in 128, write gate, + share loss",
    "gate-supervised": "keys: write gate trained on answer tokens, + share loss",
    "gate-supervised-keywin16": "the same, keys: key_window 16",
    "oracle-writes": "diagnostic: only the episode's asked answers write (oracle gate)",
    "oracle-writes-share": "diagnostic: the same, + retrieval loss of kind share",
    "oracle-writes-share-keywin16": "diagnostic: the same, keys: key_window 16",
    "oracle-writes-share-keywin16-lr5e-3": "diagnostic: the same, learning rate 5e-3",
    "oracle-writes-share-lookahead": "diagnostic: the same, keys: 16 tokens back and 16 ahead",
    "match-fit": "K, A and write gate fitted offline first (match_fit.py), + share loss",
    "match-fit-zero-b": "the same, from B = 0 (queries as fitted)",
    "match-fit-oracle-writes": "diagnostic: the same, only the episode's asked answers write",
    "match-fit-zero-b-oracle-writes": "diagnostic: the same, from B = 0 (queries as fitted)",
    "oracle-row": "diagnostic: only the question's own answer writes (oracle gate)",
}


def read_run(path: Path) -> list[dict]:
    """Validation rows (step, NLL base / adapted / prompt, choice) of one metrics CSV."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"{TASK}/loss_adapted")]
    keys = (
        "loss_base",
        "loss_adapted",
        "loss_prompt",
        "choice",
        "retrieval_hit",
        "retrieval_share",
        "gate_on",
        "gate_off",
    )
    return [
        {
            "step": int(r["step"]) + 1,
            **{k: float(r[f"{TASK}/{k}"]) for k in keys if r.get(f"{TASK}/{k}")},
        }
        for r in rows
    ]


def main() -> int:
    RESULTS.mkdir(exist_ok=True)
    for run in sorted(ROOT.glob("runs/ablation-ft-*/csv/metrics.csv")):
        name = run.parents[1].name.removeprefix("ablation-ft-")
        shutil.copy(run, RESULTS / f"{name}.metrics.csv")
    found = {
        p.name.removesuffix(".metrics.csv"): read_run(p) for p in RESULTS.glob("*.metrics.csv")
    }
    runs = {k: found[k] for k in (*LABELS, *sorted(set(found) - set(LABELS))) if found.get(k)}
    if not runs:
        raise SystemExit("no ablation runs found: run the configs in this folder first")
    (RESULTS / "results.json").write_text(json.dumps(runs, indent=2) + "\n")

    steps = sorted({r["step"] for rows in runs.values() for r in rows})
    head = " | ".join(f"step {s}" for s in steps)
    lines = [
        "Held-out facts validation (24 episodes): answer NLL under the state / choice accuracy % "
        "among 4 candidates (chance 25)\n",
        f"| ablation | {head} | base NLL | prompt NLL | retrieval hit / share % | gate on / off |",
        "|---|" + "---|" * (len(steps) + 4),
    ]
    for name, rows in runs.items():
        by_step = {r["step"]: r for r in rows}
        cells = [
            f"{by_step[s]['loss_adapted']:.2f} / {100 * by_step[s]['choice']:.0f}"
            if s in by_step
            else "–"
            for s in steps
        ]
        last = rows[-1]
        hit = (
            f"{100 * last['retrieval_hit']:.0f} / {100 * last['retrieval_share']:.1f}"
            if "retrieval_hit" in last
            else "–"
        )
        gate = f"{last['gate_on']:.2f} / {last['gate_off']:.2f}" if "gate_on" in last else "–"
        lines.append(
            f"| {LABELS.get(name, name)} | {' | '.join(cells)} | {last['loss_base']:.2f} | {last['loss_prompt']:.2f} | {hit} | {gate} |"
        )
    (RESULTS / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 6.5))
    for name, rows in runs.items():
        x = [r["step"] for r in rows]
        style = {"marker": "o", "label": LABELS.get(name, name)}
        ax1.plot(x, [r["loss_adapted"] for r in rows], **style)
        ax2.plot(x, [100 * r["choice"] for r in rows], **style)
        shared = [r for r in rows if "retrieval_share" in r]
        ax3.plot([r["step"] for r in shared], [100 * r["retrieval_share"] for r in shared], **style)
    any_rows = next(iter(runs.values()))
    ax1.axhline(any_rows[-1]["loss_base"], color="grey", ls=":", label="base (no context)")
    ax1.axhline(any_rows[-1]["loss_prompt"], color="black", ls="--", label="prompt")
    ax2.axhline(25, color="grey", ls="-.", label="chance (choice)")
    ax2.set_ylim(0, 100)  # a full-scale axis: most differences are within noise (65 questions)
    ax1.set(xlabel="step", ylabel="answer NLL (nats/token)", title="held-out facts answer NLL")
    ax2.set(xlabel="step", ylabel="choice accuracy %", title="gold among 4 same-type candidates")
    ax3.set(
        xlabel="step",
        ylabel="answer tokens' share of |s_t| (%)",
        title="retrieval share of the linear read-out",
    )
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    handles = {}
    for ax in (ax1, ax2, ax3):  # one legend for all panels, below them
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(RESULTS / "results.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
