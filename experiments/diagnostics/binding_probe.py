"""Can a question's hidden state find its own fact among the facts a context states?

A state built from per-token statistics can bind only if the frozen LM's hidden state where a
value is written (the last token of "... earned a degree from Leiden University") can be told
apart, by a linear match with the question's state, from the positions of the other values the
same context states. This probe learns that match, a rank-64 bilinear score qᵀ U Vᵀ k per
layer, on `facts` training episodes and measures retrieval accuracy on validation episodes:
for every question whose context also states same-type values of other entities (its
`options` found in the context), a softmax over the positions of the gold and those values.
Same-type candidates only, so the question's answer type alone cannot pick the gold one.
High accuracy: the features allow binding, and the failure is in training the generator.
Chance-level accuracy: per-token keys cannot bind, and the generator needs other features.

    python experiments/diagnostics/binding_probe.py          # ~3 min on 2 CPU cores; needs `genadapter make-benchmarks`
    python experiments/diagnostics/binding_probe.py --span   # keys pooled over the value's sentence
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from genadapter.assets import load_base_model  # noqa: E402
from genadapter.data.episodes import read_episodes  # noqa: E402
from genadapter.eval.prompts import PromptFormat  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "benchmarks" / "facts"
OUT = (
    Path(__file__).parent
    / "results"
    / ("binding_probe_span.json" if "--span" in sys.argv else "binding_probe.json")
)
LAYERS = (4, 10, 16, 22, 28)
RANK, STEPS, SEED = 64, 300, 0
# --span: the key is the mean state over the sentence that states the value (subject, relation
# and value together) instead of the value's last token
SPAN = "--span" in sys.argv


def value_tokens(tok, doc: str, value: str) -> tuple[int, int]:
    """Token indices in `doc` of the start of the sentence (or list item) that first mentions
    `value`, and of the value's last token."""
    start, end = doc.index(value), doc.index(value) + len(value)
    begin = max(doc.rfind(c, 0, start) for c in (".", "\n", "!", "?")) + 1
    offsets = tok(doc, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    first = min(i for i, (_, b) in enumerate(offsets) if b > begin)
    return first, max(i for i, (a, _) in enumerate(offsets) if a < end)


@torch.no_grad()
def episode_items(model, fmt: PromptFormat, episode) -> list[tuple[dict, list[dict]]]:
    """Per question with same-type distractors in the context: the question's states at LAYERS
    (last prompt token) and the states where each candidate value is written, gold first."""
    tok, texts, items, cache = fmt.tokenizer, episode.context_texts(), [], {}

    def states(doc: str) -> tuple:
        if doc not in cache:
            ids = tok(doc, add_special_tokens=False).input_ids
            cache[doc] = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        return cache[doc]

    for qa in episode.qas:
        values = [qa.answers[0], *(o for o in qa.options or [] if o != qa.answers[0])]
        keys = []
        for value in values:
            doc = next((d for d in texts if value in d), None)
            if doc is not None:
                first, last = value_tokens(tok, doc, value)
                span = slice(first if SPAN else last, last + 1)
                keys.append({layer: states(doc)[layer][0, span].mean(0) for layer in LAYERS})
            elif value == qa.answers[0]:
                break  # the gold value is not written verbatim: skip the question
        if len(keys) >= 2:  # the gold and at least one same-type value of another entity
            hq = model(torch.tensor([fmt.prompt_ids(qa.question)]), output_hidden_states=True)
            items.append(({layer: hq.hidden_states[layer][0, -1] for layer in LAYERS}, keys))
    return items


def collect(model, fmt, path: Path, n: int) -> list[tuple[dict, list[dict]]]:
    episodes, _ = read_episodes(path)
    return [it for ep in tqdm(episodes[:n], desc=path.name) for it in episode_items(model, fmt, ep)]


def scores(U: torch.Tensor, V: torch.Tensor, item, layer: int, d: int) -> torch.Tensor:
    q = F.layer_norm(item[0][layer], (d,))
    k = F.layer_norm(torch.stack([key[layer] for key in item[1]]), (d,))
    return (k @ V) @ (U.T @ q)


def accuracy(U: torch.Tensor, V: torch.Tensor, items, layer: int, d: int) -> float:
    """How often the gold value's position scores highest among the same-type candidates."""
    return sum(int(scores(U, V, it, layer, d).argmax() == 0) for it in items) / len(items)


def train(items, layer: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    U = (torch.randn(d, RANK, generator=g) / d**0.5).requires_grad_()
    V = (torch.randn(d, RANK, generator=g) / d**0.5).requires_grad_()
    opt = torch.optim.AdamW([U, V], lr=3e-3, weight_decay=0.01)
    gold = torch.zeros((), dtype=torch.long)
    for _ in range(STEPS):
        loss = sum(F.cross_entropy(scores(U, V, it, layer, d), gold) for it in items) / len(items)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return U.detach(), V.detach()


def main() -> int:
    torch.manual_seed(SEED)
    model, tok = load_base_model()
    model.eval()
    fmt = PromptFormat(tok)
    train_items = collect(model, fmt, DATA / "train.jsonl", 150)
    val_items = collect(model, fmt, DATA / "validation.jsonl", 60)
    d = model.config.hidden_size
    result = {"layers": {}, "train_questions": len(train_items), "val_questions": len(val_items),
              "chance": round(sum(1 / len(it[1]) for it in val_items) / len(val_items), 3),
              "rank": RANK, "steps": STEPS}  # fmt: skip
    for layer in LAYERS:
        U, V = train(train_items, layer, d)
        result["layers"][layer] = {"val_accuracy": round(accuracy(U, V, val_items, layer, d), 3),
                                   "train_accuracy": round(accuracy(U, V, train_items, layer, d), 3)}  # fmt: skip
        print(layer, result["layers"][layer], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
