"""Can a continuation key find the next token of an answer? The match alone, layer by layer.

For each question of the split, with its gold answer teacher-forced, each later answer token
(after the first; end of turn left out) is looked up in the context the way a next-token copy
reads (docs/method.md, "Next-token copies"): context token t written under the key of the
token before it, the query the answer position's own feature, a ridge read-out
a_t = k_t^T (H + lam_bar I)^-1 q, a token's score the sum of a_t over its occurrences. Reports
how often the gold token scores highest:

- with raw layer-L features as keys and queries (K = A = I), every context token written, and
  with the generator's write gate of its copy target (`--copy-layer`) weighting the writes;
- with the generator's own copy target (its K, A, gate and lambda);
- and how many later gold tokens the context never spells (a copy cannot write them).

    python experiments/facts/continuation_match.py [--generator experiments/generators/headline]
        [--layers 2 4 8 16 24] [--lam 0.003 0.03] [--split test-500] [--episodes 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from tune_slot import DATA, Episode  # noqa: E402

from genadapter.chunking import cut, pad  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.generator import rms_normalize  # noqa: E402
from genadapter.model import GenerativeAdapter  # noqa: E402

OUT = Path(__file__).parent / "results" / "continuation_match.json"


def later_positions(ep: Episode, eos: int) -> list[tuple[int, int, int]]:
    """(row, position predicting it, gold token) of every answer token after the first."""
    out = []
    for row, labels in enumerate(ep.labels):
        for i, pos in enumerate((labels != -100).nonzero().flatten().tolist()):
            if i and int(labels[pos]) != eos:
                out.append((row, pos - 1, int(labels[pos])))
    return out


def top1(keys: Tensor, written: Tensor, H: Tensor, lam: float, queries: Tensor, tokens: Tensor,
         later: list, vocab: int) -> list[bool]:  # fmt: skip
    """Whether each later gold token scores highest in the ridge read-out of its query:
    `keys` (N, r) k_t, `written` (N, r) w_t k_t, H their sum of outer products."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    P = torch.linalg.solve(H + lam * H.trace() / H.shape[0] * eye, queries.transpose(1, 2))
    hits = []
    for row, pos, gold in later:
        score = torch.zeros(vocab, dtype=H.dtype).index_add_(0, tokens, written @ P[row, :, pos])
        hits.append(bool(score.argmax() == gold))
    return hits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, default=Path("experiments/generators/headline"))
    p.add_argument("--copy-layer", type=int, default=29, help="the generator's copy target")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 24])
    p.add_argument("--lam", type=float, nargs="+", default=[0.003, 0.03])
    p.add_argument("--split", default="test-500")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    ga = GenerativeAdapter.from_pretrained(args.generator).eval()
    gen, eos, chunk_len = ga.generator, ga.tokenizer.eos_token_id, ga.config.chunk_len
    copy_name = next(t.name for t in gen.targets if t.layer == args.copy_layer)
    copy = gen[copy_name]
    hits: dict[str, list[bool]] = {}
    absent = total = 0
    for e in tqdm(read_episodes(DATA / f"{args.split}.jsonl")[0][: args.episodes]):
        ep = Episode(ga, e, eos)
        later = later_positions(ep, eos)
        pieces = [c for row in ga._rows(e.context_texts(), None) for c in cut(row, chunk_len)]
        ids, mask = pad(pieces)
        tokens = ids.flatten()
        absent += sum(not bool((tokens[mask.flatten() > 0] == g).any()) for _, _, g in later)
        total += len(later)
        with torch.no_grad():
            hc = ga.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hq = ga.base_model(input_ids=ep.ids, attention_mask=ep.mask, output_hidden_states=True)
            hc, hq = hc.hidden_states, hq.hidden_states
            gate = 2 * torch.sigmoid(copy.gate_logits(rms_normalize(hc[args.copy_layer])))
            writes = ga.read_chunks(ids, mask).keys[copy_name]
        for L in args.layers:
            f = rms_normalize(hc[L].double())
            k = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], 1)  # the token before, in chunk
            k = (k * mask[..., None]).flatten(0, 1)
            q = rms_normalize(hq[L].double())
            for gated in (False, True):
                w = k * (gate * mask).flatten()[:, None].double() if gated else k
                H = w.T @ k
                for lam in args.lam:
                    name = f"layer {L}, {'gated' if gated else 'all tokens'}, lam {lam}"
                    hits.setdefault(name, []).extend(
                        top1(k, w, H, lam, q, tokens, later, ga.vocab_size)
                    )
        # the copy target itself: k_t = g_t K h̄_t written, H from the raw keys, q = A x̃
        # (hidden_states[l] is what `context_features` captures: the input of layer l)
        raw = copy.unit_keys(gen.features(hc[ga.config.key_layer], mask)[1]).detach()
        raw = raw.double().flatten(0, 1)
        w = writes.detach().double().flatten(0, 1)
        q = (rms_normalize(hq[ga.config.queries.layer].float()) @ copy.A.T).detach().double()
        lam = copy.log_lambda.exp().item()
        hits.setdefault("the copy target", []).extend(
            top1(raw, w, w.T @ raw, lam, q, tokens, later, ga.vocab_size)
        )
    rows = {name: sum(h) / len(h) for name, h in hits.items()}
    for name, share in rows.items():
        print(f"{name}: gold next token top-1 {100 * share:.1f} % of {total}")
    print(f"later gold tokens the context never spells: {100 * absent / total:.1f} % of {total}")
    result = {"args": {k: str(x) for k, x in vars(args).items()}, "top1": rows,
              "absent": absent / total, "tokens": total}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
