"""The headline's read-out settings, swept without rebuilding: ridge lambda and each copy's size.

The ridge memory reads a query q as G^T (H + lam_bar I)^-1 q: directions the context's keys
barely span are amplified up to 1 / lam_bar, and the states of a free answer drift into them
(digit strings, loops). This scores the generator with every combination of `--lam` (all
targets), `--copy-lam` (the next-token copy's alone, overriding `--lam`), `--copy-scale` (the
next-token copy's B, times) and `--slot-scale` (the answer slot's B, times) on the chosen split
through the real harness, and prints one answer per setting.

    python experiments/facts/readout_sweep.py [--generator experiments/generators/headline]
        [--lam 0.03 0.1] [--copy-lam 0.003] [--copy-scale 1 0.5] [--slot-scale 1]
        [--episodes 16] [--out F] [--save DIR]  # --save: one setting only, saved as a generator
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from answer_slot import DATA, ROOT, add_scoring_arguments, harness_scores  # noqa: E402
from copy_gate import chained_command  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.methods import make_method  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402

OUT = Path(__file__).parent / "results" / "readout_sweep.json"


def set_readout(
    ga: GenerativeAdapter, B0: dict, lams: dict[int, float], scales: dict[int, float]
) -> None:
    """Target at layer l's ridge lambda to lams[l] and its B to scales[l] B0."""
    with torch.no_grad():
        for target in ga.generator.targets:
            block = ga.generator[target.name]
            block.log_lambda.fill_(math.log(lams[target.layer]))
            block.B.copy_(scales[target.layer] * B0[target.name])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, default=ROOT / "experiments/generators/headline")
    p.add_argument("--lam", type=float, nargs="+", default=[0.03, 0.1])
    p.add_argument("--copy-lam", type=float, nargs="+", default=[None], help="default: --lam")
    p.add_argument("--copy-scale", type=float, nargs="+", default=[1.0])
    p.add_argument("--slot-scale", type=float, nargs="+", default=[1.0])
    p.add_argument("--save", type=Path, help="save the generator with the (one) setting here")
    add_scoring_arguments(p, OUT)
    args = p.parse_args()
    grid = list(itertools.product(args.lam, args.copy_lam, args.copy_scale, args.slot_scale))
    if args.save and len(grid) != 1:
        p.error(f"--save takes one setting; the grid has {len(grid)}")
    ga = GenerativeAdapter.from_pretrained(args.generator).eval()
    copy_layer, slot_layer = max(ga.generator.layers), min(ga.generator.layers)
    B0 = {t.name: ga.generator[t.name].B.detach().clone() for t in ga.generator.targets}
    episodes = read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]
    method = make_method("genadapter", ga.base_model, ga.tokenizer, ga=ga)
    results: dict = {"args": {k: str(x) for k, x in vars(args).items()}, "scores": {}}
    for lam, copy_lam, copy_scale, slot_scale in tqdm(grid, desc="settings"):
        lams = {slot_layer: lam, copy_layer: lam if copy_lam is None else copy_lam}
        set_readout(ga, B0, lams, {copy_layer: copy_scale, slot_layer: slot_scale})
        name = f"lam {lam} copy x{copy_scale} slot x{slot_scale}"
        name += "" if copy_lam is None else f" copy lam {copy_lam}"
        results["scores"][name] = harness_scores(method, episodes, args.questions)
        with method.adapt(episodes[0].context) as handle:
            answer = handle.answers([episodes[0].qas[0].question])[0]
        tqdm.write(f"{name}: {results['scores'][name]}  e.g. {answer!r}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    # The read-out does not change a state (K, V and the gates make it): the fingerprint holds.
    if args.save:  # a lambda per target is stored as `ridge_learned`'s per-target parameter
        for target in ga.generator.targets:
            block = ga.generator[target.name]
            log_lambda = block.log_lambda.detach().clone()
            del block.log_lambda
            block.log_lambda = torch.nn.Parameter(log_lambda, requires_grad=False)
        ga.config.ridge_learned = True
        built = ga.config.extra.get("built_by", f"(the generator at {args.generator})")
        ga.config.extra["built_by"] = chained_command(built, "readout_sweep.py")
        ga.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
