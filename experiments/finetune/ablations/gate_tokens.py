"""What a learned write gate keeps: g_t = 2 sigmoid(G . h_t) per context token, mean over targets.

    python experiments/finetune/ablations/gate_tokens.py [--ckpt runs/ablation-ft-gate-share-long/checkpoints/last.ckpt]

Reads every document of the first 24 held-out facts validation episodes with a gated generator
(a training checkpoint or a generator folder) and writes results/gate_tokens.{json,png}: the
mean gate on the tokens that spell a value some question asks for vs on all other tokens, and
the first 80 tokens of the first document that holds two such values, each with its gate
(1 = the open gate it started from).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from genadapter import GenerativeAdapter  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.training.export import export_checkpoint  # noqa: E402
from genadapter.training.instruct_data import answer_positions  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


def token_gates(ga: GenerativeAdapter, ids: torch.Tensor) -> torch.Tensor:
    """Mean write gate over the generator's targets for each token of one chunk (1, t)."""
    with torch.no_grad():
        logits = ga.read_chunks(ids, torch.ones_like(ids)).gate_logits
    return torch.stack([2 * torch.sigmoid(z[0]) for z in logits.values()]).mean(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default="runs/ablation-ft-gate-share-long/checkpoints/last.ckpt")
    parser.add_argument("--tokens", type=int, default=80, help="tokens shown in the plot")
    parser.add_argument("--episodes", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.ckpt)
        if path.is_file():
            path = export_checkpoint(path, Path(tmp) / "generator")
        ga = GenerativeAdapter.from_pretrained(path)
    if not ga.config.keys.gate:
        raise SystemExit(f"{args.ckpt}: this generator has no write gate (keys.gate is off)")
    episodes = read_episodes(ROOT / "data/benchmarks/facts/validation.jsonl")[0][: args.episodes]
    asked, other, shown = [], [], None
    for episode in episodes:
        values = [qa.answers[0] for qa in episode.qas]
        for text in episode.context_texts():
            ids = ga.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            chunks = ids.split(ga.config.chunk_len, dim=1)  # each chunk read alone, as `read` does
            gates = [g for chunk in chunks for g in token_gates(ga, chunk).tolist()]
            marked = {
                p for pos in answer_positions([text], values, ga.tokenizer, 10**9) for p in pos
            }
            asked += [g for i, g in enumerate(gates) if i in marked]
            other += [g for i, g in enumerate(gates) if i not in marked]
            if shown is None and len({p for p in marked if p < args.tokens}) >= 2:
                shown = [
                    {"token": ga.tokenizer.decode(t), "gate": g, "asked_value": i in marked}
                    for i, (t, g) in enumerate(zip(ids[0].tolist(), gates, strict=True))
                ][: args.tokens]
    summary = {
        "episodes": len(episodes),
        "mean_gate_asked_value_tokens": sum(asked) / len(asked),
        "mean_gate_other_tokens": sum(other) / len(other),
        "tokens": [len(asked), len(other)],
    }
    print(
        f"mean gate over {len(episodes)} validation episodes: tokens of asked values "
        f"{summary['mean_gate_asked_value_tokens']:.2f} ({len(asked)}), "
        f"other tokens {summary['mean_gate_other_tokens']:.2f} ({len(other)})"
    )
    out = HERE / "results"
    (out / "gate_tokens.json").write_text(
        json.dumps({"ckpt": args.ckpt, **summary, "shown": shown}, indent=1) + "\n"
    )
    rows = shown or []
    gates, tokens = [r["gate"] for r in rows], [r["token"] for r in rows]

    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.16), 3.6))
    colors = ["tab:red" if r["asked_value"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), gates, color=colors)
    ax.axhline(1.0, color="grey", ls=":", label="open gate (init)")
    ax.set_xticks(
        range(len(rows)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7
    )
    ax.set(
        ylabel="write gate (mean over targets)",
        title="learned write gate per context token (red: a value a question asks for)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gate_tokens.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
