"""What a pooled query would recall: the copy generator queried by the mean over the question.

`experiments/diagnostics/recall_match.py --span mean` found the asked value weighs most among
16 in 80-89 % of clozes (ridge, layers 2-6) when the query is the mean of a layer's features over
the question and the keys average the 8 tokens before each value. Every generator so far
queried with one token's input instead (22-38 %). This script asks what that match gives at the
answer, with nothing trained. The generator has keys from layer L's features (`key_layer`,
window 8, shift 1), values that copy (`warm_start.copy_values`) and one target, the last layer's
`down_proj`. Its query is K times the mean of layer L's features over the cloze's tokens (BOS
left out), so the first-token logits are exactly head(norm(r + (alpha/r) B N(M)^T q)) at the
cloze's last token (`fit_copy.py`'s cached path). A per-token LoRA cannot form this query (it is
a mean over positions): this measures the design before building it.

    python experiments/recall/pooled_query.py [--key-layer 2 6] [--beta 30 60 120] [--episodes 64]

Writes results/pooled_query.json: first-token choice among the options (validation K = 16,
chance 12.5 %) per memory, layer and beta, beside the frozen LM's own (base: no context;
prompt: the context in its prompt). (Queried by its last token instead, the built
generator of `analytic_copy.py` gets 23.4 %.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "diagnostics"))
from fit_copy import (  # noqa: E402
    DATA,
    cache_episode,
    episode_states,
    first_token_logits,
    last_layer_target,
)
from recall_match import question_mean  # noqa: E402

from genadapter.assets import DEFAULT_MODEL, load_base_model  # noqa: E402
from genadapter.chunking import pad  # noqa: E402
from genadapter.config import GeneratorConfig, KeyConfig  # noqa: E402
from genadapter.data.episodes import Cloze, read_episodes  # noqa: E402
from genadapter.eval.batched import score_rows  # noqa: E402
from genadapter.eval.prompts import PromptFormat, join_context  # noqa: E402
from genadapter.generator import rms_normalize  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402
from genadapter.warm_start import copy_values  # noqa: E402

OUT = Path(__file__).parent / "results" / "pooled_query.json"


@torch.no_grad()
def pooled_features(ga: GenerativeAdapter, fmt: PromptFormat, episode, layer: int) -> Tensor:
    """Mean of rms(layer's input) over each cloze's tokens but the first (BOS): (Q, d)."""
    qas = [qa for qa in episode.qas if qa.options]
    ids, mask = pad([fmt.prompt_ids(Cloze(qa.question)) for qa in qas])
    hidden = ga.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return question_mean(rms_normalize(hidden.hidden_states[layer].float()), mask)


@torch.no_grad()
def reference_choice(ga: GenerativeAdapter, fmt: PromptFormat, episode, cached) -> dict:
    """First-token choice of the frozen LM on the same clozes: with no context (base) and with
    the whole context in its prompt (prompt), as every method's prompt is formatted."""
    base = first_token_logits(ga, cached.resid, cached.options)[0]
    context = join_context(list(episode.context))
    qas = [qa for qa in episode.qas if qa.options]
    prompts = [fmt.prompt_ids(Cloze(qa.question), context) for qa in qas]
    # one scoring pass: the context they share is read once (eval.batched.score_rows)
    options = cached.options.tolist()
    rows = [
        (ids + [o], 1) for ids, opts in zip(prompts, options, strict=True) for o in opts if o >= 0
    ]
    logprobs = iter(score_rows(ga.base_model, rows))
    prompt = cached.options.new_full(cached.options.shape, -torch.inf, dtype=torch.float)
    for i, j in (cached.options >= 0).nonzero().tolist():
        prompt[i, j] = next(logprobs)[0]
    return {
        "base": (base.argmax(1) == cached.gold).tolist(),
        "prompt": (prompt.argmax(1) == cached.gold).tolist(),
    }


@torch.no_grad()
def choice(ga: GenerativeAdapter, cached, pooled: Tensor) -> list[bool]:
    """First-token choice of one episode's clozes, queried by K times their `pooled` features."""
    gen = ga.generator
    name = last_layer_target(ga)
    N = gen.normalized(*episode_states(gen, [cached]))[name][0]  # (r_in, r)
    block = gen[name]
    q = pooled @ block.K.T
    resid = cached.resid + gen.config.scaling * (q @ N) @ block.B.T
    scores = first_token_logits(ga, resid, cached.options)[0]
    return (scores.argmax(1) == cached.gold).tolist()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--key-layer", type=int, nargs="+", default=[2, 6])
    p.add_argument("--beta", type=float, nargs="+", default=[30.0, 60.0, 120.0])
    p.add_argument("--memory", nargs="+", default=["ridge", "linear"])
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    model, tokenizer = load_base_model(DEFAULT_MODEL)
    fmt = PromptFormat(tokenizer)
    episodes = read_episodes(DATA / "validation-k16.jsonl")[0][: args.episodes]
    d, last = model.config.hidden_size, model.config.num_hidden_layers - 1
    results = {}
    for layer in args.key_layer:
        data = None
        for memory in args.memory:
            config = GeneratorConfig(
                r=d, r_in=d, layers=[last], target_modules=["down_proj"], memory=memory,
                normalization="none", value_layer=0, key_layer=layer,
                keys=KeyConfig(shift=1, window=args.window),
            )  # fmt: skip
            torch.manual_seed(0)  # the same K for both memories
            ga = GenerativeAdapter.from_base(model, config, tokenizer=tokenizer).eval()
            if data is None:  # the frozen LM's features: the same for both memories
                data = [
                    (cache_episode(ga, fmt, e), pooled_features(ga, fmt, e, layer))
                    for e in tqdm(episodes, desc=f"reading, keys from layer {layer}")
                ]
                if "base" not in results:
                    refs = [
                        reference_choice(ga, fmt, e, c)
                        for e, (c, _) in zip(episodes, data, strict=True)
                    ]
                    for name in ("base", "prompt"):
                        hits = [h for r in refs for h in r[name]]
                        results[name] = {"choice": sum(hits) / len(hits), "clozes": len(hits)}
                        tqdm.write(f"{name}: {results[name]['choice']:.3f}")
            for beta in args.beta:
                copy_values(ga, beta)
                hits = [h for cached, pooled in data for h in choice(ga, cached, pooled)]
                name = f"{memory}, keys from layer {layer}, beta {beta:g}"
                results[name] = {"choice": sum(hits) / len(hits), "clozes": len(hits)}
                tqdm.write(f"{name}: {results[name]['choice']:.3f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "choice": results})
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
