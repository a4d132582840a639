"""What a facts question finds in a state, and what a copy of it reads out: no parameter trained.

Per episode, keys are window means of layer L's RMS features (the `window` tokens before each
context token, documents cut into 64-token chunks as `read` cuts them), the query is the mean
of layer L over the question's last 24 prompt positions (pooled queries), and each context
token t gets the memory's weight w_t = k_t^T (H + lam_bar I)^-1 q (ridge; lam_bar = lam tr(H)/d)
or k_t^T q (linear). Three figures per setting:

- match: among a question's options that the context spells (at least two), the gold one has
  the largest weight at its occurrences (chance: 1 / their number, printed);
- ideal: over all options, the summed weight at the first token's occurrences is largest (what
  a copy would read out if token embeddings were orthogonal; absent options score 0);
- readout: over all options, the copy's read-out sum_t w_t e(x_t) scores the option's first
  token e(u) highest (e: SmolLM2's tied embeddings), as the built copy generators score;
  "(answer)": the first token as a chat answer spells it, without the leading space the
  context gives it ("but" of "butter chicken", not " butter"), as the harness scores options.

`--whiten MU` reads out through whitened embeddings too (warm_start.whitening); `--bare` lets
each value carry its bare spelling too (e(x) + e(bare x), GeneratorConfig.value_bare).

`--oracle` lets only tokens that spell a value (any option or answer of the episode) write;
`--gate DIR` weighs each token's write by the gate `copy_gate.py --save DIR` fitted.

    python experiments/facts/match_readout.py [--split validation] [--episodes 32]
        [--windows 8 64] [--lams 0.1 1 3] [--oracle | --gate DIR] [--whiten 0.1] [--bare]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from copy_gate import DATA, context_chunks, value_tokens  # noqa: E402

from genadapter.assets import DEFAULT_MODEL, load_base_model  # noqa: E402
from genadapter.chunking import pad  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402
from genadapter.generator import rms_normalize, window_mean  # noqa: E402
from genadapter.spelling import bare_token_ids  # noqa: E402
from genadapter.warm_start import whitening  # noqa: E402

OUT = Path(__file__).parent / "results"


def weights(k: torch.Tensor, g: torch.Tensor, q: torch.Tensor, lam: float | None) -> torch.Tensor:
    """(tokens, questions) memory weights of keys k (T, d) written with weights g (T) for queries
    q (Q, d), as `memory.write` weighs them (H = sum_t g_t k_t k_t^T); lam None: linear."""
    if lam is None:
        return g[:, None] * (k @ q.T)
    H = (k * g[:, None]).T @ k
    lam_bar = lam * H.trace() / H.shape[0]
    return g[:, None] * (k @ torch.linalg.solve(H + lam_bar * torch.eye(H.shape[0]), q.T))


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="validation")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--windows", type=int, nargs="+", default=[8, 64])
    p.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0, 3.0])
    p.add_argument("--query-window", type=int, default=24)
    p.add_argument("--oracle", action="store_true", help="only value tokens write")
    p.add_argument("--gate", type=Path, help="weigh writes by this generator's gate (copy_gate.py)")
    p.add_argument(
        "--whiten", type=float, nargs="+", default=[], metavar="MU",
        help="also read out through the whitened embeddings, ridge MU on their covariance",
    )  # fmt: skip
    p.add_argument("--bare", action="store_true", help="values carry bare spellings too")
    p.add_argument(
        "--out", type=Path, help="default: results/match_readout-SPLIT[-oracle|-gate].json"
    )
    args = p.parse_args()
    G = None
    if args.gate:
        G = next(
            v for k, v in load_file(args.gate / "generator.safetensors").items() if k.endswith(".G")
        )
        G = G.float()
    model, tok = load_base_model(DEFAULT_MODEL)
    fmt, E = PromptFormat(tok), model.get_input_embeddings().weight.float()
    readouts = {"readout": E.T} | {
        f"readout whiten {mu}": whitening(E.double(), None, mu).T.float() @ E.T
        for mu in args.whiten
    }
    first = lambda text: tok(" " + text, add_special_tokens=False).input_ids  # noqa: E731
    bare = bare_token_ids(tok, len(E))
    hits, chance = defaultdict(list), []
    for episode in tqdm(read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]):
        flat_ids, ids, mask = context_chunks(tok, episode.context, 64)
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h = rms_normalize(hidden[args.layer].float())
        flat = torch.tensor(flat_ids)
        qas = [qa for qa in episode.qas if qa.options]
        qids, qmask = pad([fmt.prompt_ids(qa.question) for qa in qas], pad_id=tok.pad_token_id or 0)
        qh = rms_normalize(model(qids, attention_mask=qmask, output_hidden_states=True)
                           .hidden_states[args.layer].float())  # fmt: skip
        # the pooled query at each prompt's last token (right-padded), as the side path forms it
        last = qmask.sum(1) - 1
        q = window_mean(qh, qmask.float(), args.query_window)[torch.arange(len(qas)), last]
        values = {v for qa in episode.qas for v in [*(qa.options or []), *qa.answers]}
        writes = torch.ones(len(flat))
        if args.oracle:
            writes = value_tokens(flat_ids, [first(v) for v in values])
        if G is not None:  # the gate reads its target's layer (down_proj of layer 29)
            writes = 2 * torch.sigmoid(rms_normalize(hidden[29].float())[mask.bool()] @ G)
        spelled = [[value_tokens(flat_ids, [first(o)]) for o in qa.options] for qa in qas]
        firsts = [torch.tensor([first(o)[0] for o in qa.options]) for qa in qas]
        answer_firsts = [
            torch.tensor([fmt.answer_ids(o, qa.question)[0] for o in qa.options]) for qa in qas
        ]
        copies = E[flat]
        if args.bare:
            copies = rms_normalize(E[flat]) + rms_normalize(E[bare[flat]])
        present = [[j for j, s in enumerate(sp) if s.any()] for sp in spelled]
        golds = [qa.options.index(qa.answers[0]) for qa in qas]
        ranked = [len(pr) > 1 and g in pr for pr, g in zip(present, golds, strict=True)]
        chance += [1 / len(pr) for pr, r in zip(present, ranked, strict=True) if r]
        for window in args.windows:
            k = window_mean(h, mask.float(), window, 0, 1)[mask.bool()]
            for lam in [None, *args.lams]:
                w = weights(k, writes, q, lam)
                name = f"window {window}, " + ("linear" if lam is None else f"ridge lam {lam}")
                copied = w.T @ copies  # (Q, d): what a copy adds to the residual stream
                for i, gold in enumerate(golds):
                    if ranked[i]:
                        at = {j: w[spelled[i][j] > 0, i].max() for j in present[i]}
                        hits[name, "match"].append(max(at, key=at.get) == gold)
                    ideal = torch.stack([w[flat == f, i].sum() for f in firsts[i]])
                    hits[name, "ideal"].append(ideal.argmax().item() == gold)
                    for kind, head in readouts.items():
                        for spelling, tokens in ("", firsts), (" (answer)", answer_firsts):
                            logits = copied[i] @ head[:, tokens[i]]
                            hits[name, kind + spelling].append(logits.argmax().item() == gold)
    table = defaultdict(dict)
    for (name, kind), found in hits.items():
        table[name][kind] = sum(found) / len(found)
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "match_chance": sum(chance) / len(chance),
        "match_questions": len(chance),
        "questions": len(next(v for (_, kind), v in hits.items() if kind == "readout")),
        "table": table,
    }
    tag = args.split + ("-oracle" if args.oracle else "") + ("-gate" if args.gate else "")
    tag += "-bare" if args.bare else ""
    out = args.out or OUT / f"match_readout-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"match chance {result['match_chance']:.3f} over {len(chance)} questions")
    for name, row in table.items():
        print(f"{name:28s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
