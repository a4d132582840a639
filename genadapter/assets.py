"""Where the offline default assets live, and how names resolve to them.

`data/fetch_assets.py` downloads and converts the assets once; this module only finds them.
Any Hugging Face model id or local path works as a base model; the offline default is a
fallback used when a known hub id is asked for and a converted copy is on disk.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import torch

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMPLETE_MARKER = "COMPLETE.json"  # written last by the fetch step; its presence means "finished"


def data_dir() -> Path:
    """Root of data files: `$GENADAPTER_DATA`, else the repository's `data/` folder."""
    env = os.environ.get("GENADAPTER_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def default_generator() -> Path:
    """The committed headline generator of this checkout (experiments/generators/headline): the
    default of `demo`, `read`, `ask`, `chat`, `export` and `serve`."""
    return Path(__file__).resolve().parents[1] / "experiments" / "generators" / "headline"


def assets_dir() -> Path:
    return data_dir() / "assets"


def smollm2_dir() -> Path:
    return assets_dir() / "SmolLM2-135M-Instruct"


def wiki_summaries_path() -> Path:
    return assets_dir() / "wiki-summaries" / "summaries_en-us.json"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


# hub id -> converted local copy made by data/fetch_assets.py
OFFLINE_MODELS = {DEFAULT_MODEL: smollm2_dir}


def resolve_model(name_or_path: str) -> str:
    """A local folder for known offline models, otherwise the name unchanged (hub id or path)."""
    if Path(name_or_path).is_dir():
        return name_or_path
    local = OFFLINE_MODELS.get(name_or_path)
    if local is not None and is_complete(local()):
        return str(local())
    return name_or_path


def load_base_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer by hub id or path (offline copy preferred)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    if name_or_path in OFFLINE_MODELS and path == name_or_path and os.environ.get("HF_HUB_OFFLINE"):
        raise FileNotFoundError(
            f"{name_or_path} is not on disk and the hub is offline: run `make assets` "
            "(python data/fetch_assets.py) first."
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config._name_or_path = name_or_path if name_or_path in OFFLINE_MODELS else path
    return model, tokenizer


@cache
def load_wiki_summaries() -> tuple[dict, ...]:
    """The ~10k Wikipedia Vital-Article summaries: dicts with title, extract, description, topic.

    Sorted by title, so every consumer sees the same order.
    """
    path = wiki_summaries_path()
    if not is_complete(path.parent):
        raise FileNotFoundError(
            f"{path} is missing: run `make assets` (python data/fetch_assets.py)"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows = [
        {k: str(v.get(k, "")) for k in ("title", "extract", "description", "topic")}
        for v in raw.values()
    ]
    return tuple(sorted((r for r in rows if r["extract"].strip()), key=lambda r: r["title"]))
