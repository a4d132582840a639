"""The README's quick start runs as written, and every relative link in the docs resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from genadapter import AdapterState
from genadapter.assets import DEFAULT_MODEL, is_complete, load_base_model, smollm2_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def quick_start_code(text: str) -> str:
    """The first ```python block under the "Quick start" heading (before the next heading)."""
    match = re.search(r"^## Quick start[ \t]*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## Quick start' section"
    block = re.search(r"^```python[ \t]*\n(.*?)^```", match.group(1), re.S | re.M)
    assert block, "the Quick start section has no ```python block"
    return block.group(1)


@pytest.mark.real
def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    if not is_complete(smollm2_dir()):
        pytest.fail("offline SmolLM2 assets missing: run `make assets`")
    code = quick_start_code(README.read_text(encoding="utf-8"))
    assert DEFAULT_MODEL in code  # the default id, resolved to the offline copy in data/assets
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_quick_start"}
    exec(compile(code, f"{README}:Quick start", "exec"), ns)

    ga, state = ns["ga"], ns["state"]
    assert isinstance(state, AdapterState) and state.n.item() > 0
    assert ns["state_a"].equal(state)  # saved and loaded back unchanged
    assert torch.equal(ns["both"].n, state.n + ns["state_b"].n)
    rows = ns["rows"]
    assert rows.batch_size == 3 and rows.sum().n.item() == rows.n.sum().item() > 0
    assert isinstance(ns["answer"], str) and ns["answer"].strip()
    assert isinstance(ns["merged_answer"], str) and ns["merged_answer"].strip()
    out, input_ids = ns["out"], ns["input_ids"]
    assert out.logits.shape[:2] == input_ids.shape and torch.isfinite(out.loss)

    # the exported directory is a PEFT LoRA of the adapted modules that reproduces the adapted logits
    from peft import PeftModel

    assert (tmp_path / "state.safetensors").is_file()
    base, _ = load_base_model(DEFAULT_MODEL)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "lora_dir")).eval()
    adapted = {name for name, m in peft.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(adapted) == len(ga.generator.targets) > 0
    with torch.no_grad():
        logits = peft(input_ids).logits
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)


def doc_files() -> list[Path]:
    files = [README, *sorted((ROOT / "docs").glob("*.md"))]
    return files + sorted((ROOT / "experiments").rglob("README.md"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_relative_links_resolve():
    problems = []
    for doc in doc_files():
        text = FENCE.sub("", doc.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # a URL: http:, mailto:, ...
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(ROOT)}: {target}"
            if not path.is_relative_to(ROOT):
                problems.append(f"{where} leaves the repository")
            elif not path.exists():
                problems.append(f"{where} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}: no heading with that anchor")
    assert not problems, "\n".join(problems)


def test_quick_start_block_is_found():
    code = quick_start_code(README.read_text(encoding="utf-8"))
    compile(code, "README.md:Quick start", "exec")  # valid Python
    assert "ga.read(" in code and "export_lora(" in code
