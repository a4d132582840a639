"""Run the performance suite (each script in its own process), then summarise every target.

    python experiments/bench/run_all.py            # full: results/*, summary.md, the block in README.md
    python experiments/bench/run_all.py --quick    # about 2 minutes a script, into results/quick/
    make benchmarks [QUICK=1]

Extra arguments (e.g. --threads 2) are passed to every script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
README = HERE / "README.md"  # experiments/bench/README.md, between the markers
START, END = "<!-- bench:start", "<!-- bench:end -->"
SCRIPTS = ["read_throughput", "answer_latency", "train_step", "adapt_speed"]


def targets(out: Path) -> list[list[str]]:
    """[benchmark, figure, value, verdict] for every target the scripts checked."""
    rows = []
    read = json.loads((out / "read_throughput.json").read_text())
    for r in read["rows"]:
        rows.append(
            [
                "read",
                f"read / forward, chunk {r['chunk_len']} × batch {r['batch']} (≥ 0.95)",
                f"{r['read_over_forward']:.3f}",
                r["verdict"],
            ]
        )
    answer = json.loads((out / "answer_latency.json").read_text())
    for t in answer["targets"]:
        value = f"{t['value']:.4g}" if t["value"] is not None else "n/a"
        rows.append(["answer", f"{t['figure']} ({t['target']})", value, t["verdict"]])
    train = json.loads((out / "train_step.json").read_text())
    for r in train["rows"]:
        rows.append(
            [
                "train",
                f"step / plain fwd+bwd, {r['documents']}×{r['chunks_per_doc']}×"
                f"{r['chunk_len']} (≥ 0.7)",
                f"{r['step_over_plain']:.3f}",
                r["verdict"],
            ]
        )
    adapt = json.loads((out / "adapt_speed.json").read_text())
    rows.append(
        [
            "adapt",
            "ttt-lora / genadapter adapt time, headline episodes, median (≥ 20)",
            f"{adapt['median_ratio']:.1f}",
            adapt["verdict"],
        ]
    )
    return rows


def main() -> int:
    args = sys.argv[1:]
    quick = "--quick" in args
    out = HERE / "results" / ("quick" if quick else "")
    if "--out" in args:  # the scripts write there: read their results from there too
        out = Path(args[args.index("--out") + 1])
    start = time.perf_counter()
    for name in SCRIPTS:
        print(f"=== {name} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], check=True)
    rows = targets(out)
    table = ["| benchmark | figure | value | |", "|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    passed = sum(r[3] == "PASS" for r in rows)
    text = (
        f"## Performance targets ({'quick' if quick else 'full'} mode)\n\n"
        + "\n".join(table)
        + f"\n\n{passed} of {sum(r[3] != 'n/a' for r in rows)} measured targets hold. Details: "
        + ", ".join(f"[{n}]({n}.md)" for n in SCRIPTS)
        + ". Regenerate: `python "
        + " ".join(["experiments/bench/run_all.py", *args])
        + "`.\n"
    )
    (out / "summary.md").write_text(text)
    readme = README.read_text()
    if not quick and "--out" not in args and START in readme and END in readme:  # the last full run
        head, rest = readme.split(START, 1)
        marker, _, tail = rest.partition(END)
        block = text.split("\n", 2)[2].strip()  # without the heading
        block = block.replace("](", "](results/")  # links relative to README
        README.write_text(f"{head}{START}{marker.splitlines()[0]}\n{block}\n{END}{tail}")
    print(text)
    print(f"suite took {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
