"""Does a wider key space make the state's linear match more exclusive?

`match_fit.py` fits each target's K, A and write gate at the generator's r_in = 32: the asked fact
then wins among the context's values ~74 % of the time in the upper layers, yet holds only ~16 %
of the gated read-out sum_t g_t |s_t| over every context token (≈ 4 % without the gate), and the
oracle diagnostics say decoding needs it to hold nearly all of it. A linear read-out can only
silence a token t by making its key K h̄_t orthogonal to the query, and r_in dimensions leave
little room for that. This fits the same loss from a fresh random init at growing r_in, on the same
cached features, for a few targets, and reports the validation figures per width.

    python experiments/diagnostics/match_width.py   # ~17 min here; needs match_fit.py's cache
        [--widths 32 128 512] [--targets model.layers.22.self_attn.o_proj ...] [--steps 300] [--replot]
Writes results/match_width.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import torch
from match_fit import ROOT, SEED, collect, fit_target
from tqdm.auto import tqdm

from genadapter.eval.prompts import PromptFormat
from genadapter.model import GenerativeAdapter

OUT = Path(__file__).parent / "results" / "match_width.json"
TARGETS = ["model.layers.22.self_attn.o_proj", "model.layers.28.mlp.down_proj"]
PANELS = {
    "share": "gold share of the gated read-out",
    "share_ungated": "gold share, no gate",
    "hit_values": "hit among the value tokens",
    "share_values": "gold share among the value tokens",
}


def fresh_block(r_in: int, d_in: int, d: int) -> SimpleNamespace:
    """K, A at the generator's init (std 1/sqrt(fan-in)), the gate open (G = 0)."""
    return SimpleNamespace(
        K=torch.randn(r_in, d) * d**-0.5, A=torch.randn(r_in, d_in) * d_in**-0.5, G=torch.zeros(d)
    )


def plot(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6), sharex=True)
    for ax, (key, title) in zip(axes, PANELS.items(), strict=True):
        for target in result["targets"]:
            fits = [f for f in result["fits"] if f["target"] == target]
            ax.plot(
                [f["r_in"] for f in fits],
                [100 * f["after"][key] for f in fits],
                marker="o",
                label=target.removeprefix("model."),
            )
        ax.set(xscale="log", xlabel="r_in", ylabel="%", title=title, ylim=(0, None))
        ax.set_xticks(result["widths"], [str(w) for w in result["widths"]])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--val-episodes", type=int, default=80)
    parser.add_argument(
        "--init", default=str(ROOT / "experiments/pretrain/smollm2-wiki-all-generator")
    )
    parser.add_argument("--data", default=str(ROOT / "data" / "benchmarks" / "facts"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the JSON")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(OUT.read_text()), OUT.with_suffix(".png"))
        return 0
    # the features and their cache are match_fit.py's: the same generator settings
    ga = GenerativeAdapter.from_pretrained(
        args.init, keys={"window": 16, "lookahead": 16, "gate": True}
    )
    targets = {t.name: t for t in ga.generator.targets}
    unknown = sorted(set(args.targets) - set(targets))
    if unknown:
        parser.error(f"not a target of {args.init}: {unknown}")
    fmt, data = PromptFormat(ga.tokenizer), Path(args.data)
    train = collect(ga, fmt, data / "train.jsonl", args.episodes, every_token=False)
    val = collect(ga, fmt, data / "validation.jsonl", args.val_episodes, every_token=True)
    result = {"steps": args.steps, "widths": args.widths, "targets": args.targets, "fits": []}
    for name in args.targets:
        t, d = targets[name], ga.base_model.config.hidden_size
        for r_in in tqdm(args.widths, desc=name):
            torch.manual_seed(SEED)
            block = fresh_block(r_in, ga.generator[name].A.shape[1], d)
            before, after = fit_target(block, train, val, t.layer, name, args.steps)
            result["fits"].append({"target": name, "r_in": r_in, "before": before, "after": after})
            tqdm.write(
                f"{name} r_in {r_in}: {json.dumps({k: round(v, 3) for k, v in after.items()})}"
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, OUT.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
