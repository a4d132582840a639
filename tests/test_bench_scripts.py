"""Every benchmark script runs once, end to end, on a tiny model (seconds), so that none rots.

The scripts take `--generator` (a generator folder whose config names its LM) and
`--benchmarks` (the `genadapter make-benchmarks` output); here both are small and made in a
temporary folder, and every result goes there too (`--out`), never into the committed results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize_generator

from genadapter import GenerativeAdapter, GeneratorConfig

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def run(*cmd: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, *cmd], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    ga = GenerativeAdapter.from_base(str(tiny_dir), GeneratorConfig(r=4, r_in=4, chunk_len=32))
    randomize_generator(ga)
    ga.save_pretrained(root / "generator")
    run(
        "-m",
        "genadapter.cli",
        "make-benchmarks",
        "--out",
        str(root / "data"),
        "--only",
        "facts",
        "--scale",
        "0.02",
    )
    return {"generator": root / "generator", "benchmarks": root / "data", "out": root / "out"}


def common_args(inputs: dict[str, Path]) -> list[str]:
    return ["--quick", "--reps", "1", "--threads", "1"] + [
        a for k in ("generator", "benchmarks", "out") for a in (f"--{k}", str(inputs[k]))
    ]


def test_run_all_quick_runs_every_script_of_the_suite(inputs):
    res = run(str(BENCH / "run_all.py"), *common_args(inputs))
    out = inputs["out"]
    for name in ("read_throughput", "answer_latency", "train_step", "adapt_speed"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["environment"]["mode"] == "quick", name
        assert (out / f"{name}.md").is_file() and (out / f"{name}.png").is_file()
    summary = (out / "summary.md").read_text()
    assert summary.count("| read |") == 4 and "| adapt |" in summary
    assert "measured targets hold" in res.stdout


def test_rank_step_and_stream_memory(inputs):
    run(str(BENCH / "rank_step.py"), *common_args(inputs))
    rank = json.loads((inputs["out"] / "rank_step.json").read_text())
    assert rank["max_score_difference"] < 1e-3  # shared-prompt scores equal the full rows'
    memory = inputs["out"] / "stream_memory.json"
    run(str(BENCH / "stream_memory.py"), "--tokens", "2000", "--out", str(memory))
    tiny = json.loads(memory.read_text())["tiny"]
    assert tiny["at"]["1,000"]["tokens"] >= 1000 and tiny["state_bytes"] > 0


def test_eval_speed_batched_equals_one_by_one(inputs):
    run(str(BENCH / "eval_speed.py"), *common_args(inputs))
    result = json.loads((inputs["out"] / "eval_speed.json").read_text())
    for row in result["rows"]:
        assert row["items"] > 0 and row["same_prediction"] == row["same_choice"] == row["items"]
        assert row["max_nll_diff"] < 1e-4
