"""One target's write gate fitted again, the rest of a generator kept: which tokens it writes.

The next-token copy writes only tokens inside values (`copy_gate.fit_gate`), so after a value's
last token its query finds no entry of its own and reads a blend of other values: free answers
run on ("dessertdessertdessert…"). With `--after 1` the gate also opens on the token that follows
each value in the context (the "." or "," that ends it), so the copy reads on to where the value
stops. Scores the refitted generator (and the one given) on the chosen split through the harness.

    python experiments/facts/refit_gate.py --generator runs/tune/slot-28-29
        [--layer 29] [--after 1] [--gate-scale 3] [--gate-episodes 96] [--episodes 16] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from answer_slot import DATA, add_scoring_arguments, harness_scores  # noqa: E402
from copy_gate import chained_command, fit_gate, gate_examples  # noqa: E402

from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.methods import make_method  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402

OUT = Path(__file__).parent / "results" / "refit_gate.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # no default: the headline's gate is already refitted (its built_by names the generator before)
    p.add_argument("--generator", type=Path, required=True)
    p.add_argument("--layer", type=int, default=29, help="the target whose gate is fitted")
    p.add_argument("--after", type=int, default=1, help="tokens after each value that open too")
    p.add_argument("--gate-scale", type=float, default=3.0, help="G <- c G, as copy_gate.py")
    p.add_argument("--gate-episodes", type=int, default=96, help="training episodes to fit G")
    add_scoring_arguments(p, OUT)
    p.add_argument("--save", help="save the refitted generator here")
    args = p.parse_args()
    ga = GenerativeAdapter.from_pretrained(args.generator).eval()
    names = [t.name for t in ga.generator.targets if t.layer == args.layer]
    if not names or ga.generator[names[0]].G is None:
        p.error(f"--layer {args.layer}: no gated target there ({ga.generator.layers})")
    block = ga.generator[names[0]]
    train = read_episodes(DATA / "train.jsonl")[0][: args.gate_episodes]
    h, label = gate_examples(ga, train, args.layer, args.after)
    G = fit_gate(h, label)
    episodes = read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]
    results: dict = {"args": {k: str(x) for k, x in vars(args).items()}, "scores": {}}
    method = make_method("genadapter", ga.base_model, ga.tokenizer, ga=ga)
    for name, gate in (("given", block.G.detach().clone()), ("refitted", args.gate_scale * G)):
        with torch.no_grad():
            block.G.copy_(gate)
        if args.episodes:
            results["scores"][name] = harness_scores(method, episodes, args.questions)
            with method.adapt(episodes[0].context) as handle:
                answer = handle.answers([q.question for q in episodes[0].qas[:2]])
            print(f"{name}: {results['scores'][name]}  e.g. {answer}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.save:
        built_by = ga.config.extra.get("built_by", "")
        ga.config.extra["built_by"] = chained_command(built_by, "refit_gate.py")
        ga.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
