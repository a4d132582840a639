"""Outputs of every committed generator on a fixed text, stored once as a reference.

`python tests/reference_outputs.py` adds the outputs of generators committed since to
`tests/data/committed_generators.safetensors` and drops those of generators no longer committed
(`--all` rewrites every entry, `DIR ...` the entries of retrained generators);
`test_committed_generators.py` recomputes the same outputs and compares. Write it only from
code whose outputs are known good: a refactor must leave them unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "committed_generators.safetensors"
GENERATORS = sorted(p.parent for p in (ROOT / "experiments").rglob("generator_config.json"))
DOCUMENTS = [
    "Teideim Kreda earned a degree from Leiden University. Her brother Oskar runs a bakery.",
    "The town of Zorblat lies on the river Quenn; its mayor is Ada Pell, elected in 2019.",
]
PROMPT = "Where did Teideim Kreda earn a degree?"
VOCAB_SLICE = 1024  # logits of the first tokens only: enough to see any change, small on disk


def outputs(ga) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The state read from DOCUMENTS, logits of PROMPT under it and a greedy answer."""
    state = ga.read(DOCUMENTS).sum()
    names = ga.generator.names
    ids = ga.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ga(ids, state=state).logits[0, -4:]
    answer = ga.generate(PROMPT, state=state, chat=True, max_new_tokens=8)
    tensors = {
        "n": state.n,
        "S_first": state.S[names[0]][0],
        "S_last": state.S[names[-1]][0],
        "logits": logits[:, :VOCAB_SLICE].contiguous(),
        "argmax": logits.argmax(-1),
    }
    return tensors, {"fingerprint": state.generator, "answer": answer}


def load_all(skip: set[str] = frozenset()):
    """(relative dir, adapter) of each committed generator but `skip`, sharing one base model."""
    from genadapter import GenerativeAdapter
    from genadapter.assets import DEFAULT_MODEL, load_base_model

    base, tokenizer = load_base_model(DEFAULT_MODEL)
    for path in GENERATORS:
        if str(path.relative_to(ROOT)) in skip:
            continue
        ga = GenerativeAdapter.from_pretrained(path, base_model=base, tokenizer=tokenizer)
        yield str(path.relative_to(ROOT)), ga


def read_reference() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, object]]]:
    out: dict = {}
    with safe_open(str(REFERENCE), framework="pt") as f:
        meta = json.loads(f.metadata()["reference"])
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            name, tensor = key.rsplit("/", 1)
            out.setdefault(name, ({}, meta[name]))[0][tensor] = f.get_tensor(key)
    return out


def main() -> int:
    """Add the reference of every generator that has none; `--all` rewrites them all, named
    generator folders are rewritten, and entries of generators no longer committed go."""
    old = {} if "--all" in sys.argv else read_reference() if REFERENCE.is_file() else {}
    committed = {str(p.relative_to(ROOT)) for p in GENERATORS}
    redo = {a.rstrip("/") for a in sys.argv[1:] if not a.startswith("--")}
    old = {name: v for name, v in old.items() if name in committed and name not in redo}
    tensors, meta = {}, {}
    for name, (t, m) in old.items():
        tensors.update({f"{name}/{k}": v for k, v in t.items()})
        meta[name] = m
    for name, ga in load_all(skip=set(old)):
        t, m = outputs(ga)
        # cloned: with one target S_first and S_last are one tensor, which safetensors refuses
        tensors.update({f"{name}/{k}": v.detach().cpu().clone() for k, v in t.items()})
        meta[name] = m
        print(name, m)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(REFERENCE), metadata={"reference": json.dumps(meta)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
