"""Shared helpers of the performance benchmarks: interleaved timing, peak RSS, result files.

Every comparison runs its methods side by side in one process: warm-up calls first, then rounds
in which each method runs once, the order alternating A B / B A so that drift (thermal, other
processes) falls on both equally. Figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).parent / "results"
GENERATOR = ROOT / "experiments" / "pretrain" / "smollm2-wiki-generator"
BENCHMARKS = ROOT / "data" / "benchmarks"
MiB = 2**20


# --- command line --------------------------------------------------------------------------------
def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small settings, about 2 minutes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per comparison")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    p.add_argument("--profile", action="store_true", help="also write torch.profiler op tables")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings wait for the device)")
    p.add_argument(
        "--generator",
        type=Path,
        default=GENERATOR,
        help="generator folder (its config names the LM)",
    )
    p.add_argument(
        "--benchmarks", type=Path, default=BENCHMARKS, help="`genadapter make-benchmarks` output"
    )
    return p


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Threads, seed and the conditions of the run (recorded in every result file)."""
    _OTHERS.start()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    return environment(args)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    device = torch.device(getattr(args, "device", "cpu"))
    return {
        "mode": "quick" if args.quick else "full",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python "
        + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


class _OtherProcesses:
    """CPU time every other process used during the run, in cores: flags contaminated timings."""

    def start(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _own() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float:
        wall = time.perf_counter() - self.wall
        return max(0.0, (self._busy() - self.busy) - (self._own() - self.own)) / max(wall, 1e-9)


_OTHERS = _OtherProcesses()


# --- timing --------------------------------------------------------------------------------------
def interleaved(
    methods: dict[str, Callable[[], dict[str, float] | None]], reps: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Run every method `warmup` times, then `reps` rounds of each once (order A B, then B A, ...).

    A method may return a dict of its own sub-timings (e.g. prefill / decode); they are kept next
    to "total", the wall time of the call (other return values are ignored).
    Returns {method: {timing: [seconds, one per round]}}.
    """
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    out: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    names = list(methods)
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            parts = methods[name]()
            sync()
            total = time.perf_counter() - start
            parts = parts if isinstance(parts, dict) else {}
            for key, value in {"total": total, **parts}.items():
                out[name].setdefault(key, []).append(value)
    return out


def throughput(
    methods: dict[str, Callable[[], Any]], reps: int, tokens: int, profile_to: Path | None = None
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """`interleaved` timings and tokens/s from their medians; a torch.profiler table on request."""
    times = interleaved(methods, reps)
    if profile_to is not None:
        profile(methods, profile_to)
    return times, {k: tokens / median(v["total"]) for k, v in times.items()}


def profile(methods: dict[str, Callable[[], Any]], path: Path, rows: int = 15) -> None:
    """One call of each method under torch.profiler; the top ops by self CPU time, to a text file."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for name, fn in methods.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            f.write(f"=== {name}\n{table}\n")
    print(f"profile: {path}")


def sync() -> None:
    """Wait for queued GPU work, so that a wall-clock interval holds all of it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative spread of the rounds: (max - min) / median."""
    return (max(values) - min(values)) / statistics.median(values)


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


# --- memory --------------------------------------------------------------------------------------
def rss_mib() -> float:
    return psutil.Process().memory_info().rss / MiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size since the last reset (VmHWM), in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that RSS shows live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float | None]]:
    """fn's result, its wall time, the RSS before it and the peak RSS while it ran (MiB; None
    where the kernel does not allow resetting the peak)."""
    release_memory()
    gpu = torch.cuda.is_initialized()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    before = rss_mib()
    ok = reset_peak_rss()
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    seconds = time.perf_counter() - start
    peak = round(peak_rss_mib(), 1) if ok else None
    figures = {"seconds": seconds, "rss_before_mib": round(before, 1), "peak_rss_mib": peak}
    if gpu:  # what the caching allocator handed out at most, model weights included
        figures["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / MiB, 1)
    return result, figures


# --- inputs --------------------------------------------------------------------------------------
def load_adapter(args: argparse.Namespace):
    """`--generator` (default: the committed pretrained one on SmolLM2-135M-Instruct) on `--device`."""
    from genadapter import GenerativeAdapter

    return GenerativeAdapter.from_pretrained(args.generator).to(args.device)


def shown(path: Path) -> str:
    """A path as results record it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def wiki_tokens(tokenizer, n: int) -> torch.Tensor:
    """The first n tokens of the offline Wikipedia summaries in title order, cycled: real text."""
    from genadapter.assets import load_wiki_summaries

    ids: list[int] = []
    for row in itertools.cycle(load_wiki_summaries()):
        text = f"{row['title']}\n\n{row['extract']}\n\n"
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return torch.tensor(ids[:n], dtype=torch.long)
    raise AssertionError("unreachable")


# --- results -------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def conditions_md(env: dict[str, Any]) -> str:
    others = env["other_processes_cores"]
    note = (
        f" **Timings contaminated: other processes used {others} cores.**" if others > 0.2 else ""
    )
    return (
        f"{env['mode']} mode; {env['cpu']}, {env['torch_threads']} torch threads of {env['cores']} "
        f"cores, other processes used {others} cores meanwhile.{note} torch {env['torch']}, "
        f"transformers {env['transformers']}, commit {env['commit']}, {env['date']}.\n\n"
        f"Regenerate: `{env['command']}`"
    )


def write(name: str, out: Path, result: dict[str, Any], markdown: str, figure) -> None:
    """results/<name>.json, .md (with the conditions of the run appended) and .png."""
    env = result["environment"]
    env["other_processes_cores"] = round(_OTHERS.cores(), 2)
    markdown = markdown.rstrip() + "\n\n" + conditions_md(env) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=120)
    print(markdown)
    print(f"wrote {out / name}.json, .md, .png")


def header(name: str, env: dict[str, Any], ga, reps: int, generator: Path = GENERATOR) -> dict:
    """The fields every result JSON opens with: what ran, on what, how often."""
    return {
        "benchmark": name,
        "environment": env,
        "model": ga.config.base_model,
        "generator": shown(generator),
        "adapted_layers": ga.generator.layers,
        "targets": len(ga.generator.targets),
        "rounds": reps,
        "warmup": 1,
    }


def grouped_bars(rows: list[dict], keys: list[str], ratio_key: str, labels: list[str], **axis):
    """Tokens/s of `keys` per row as grouped bars, the first key's bar labelled with its ratio."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for i, key in enumerate(keys):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r["tokens_per_s"][key] for r in rows], width, label=key)
    for j, r in enumerate(rows):
        ax.annotate(
            f"{r[ratio_key]:.2f}×",
            (j - width, r["tokens_per_s"][keys[0]]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(range(len(rows)), labels)
    ax.set(**axis)
    ax.legend(fontsize=8)
    return fig


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
