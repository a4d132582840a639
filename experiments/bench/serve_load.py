"""Serving under load: tokens/s and latency of `genadapter serve` at 1 / 4 / 8 / 16 concurrent
clients over 4 tenants, the batching scheduler vs one request at a time, in the same run.

Two real servers (subprocesses, loopback): `--max-batch 16` and `--max-batch 1`, the same
generator, each tenant with its own state. Each client is the official `openai` client with its
tenant's key, asking greedy 32-token streamed chat completions (`ignore_eos`: all of the same
length) in a loop; the levels alternate the order of the two servers. A level runs 2 s of
warm-up, then `--seconds` measured: throughput is the tokens the server decoded meanwhile (its
/health counter); latency is per request, sent to last token received, of the requests that
start and end in the measured part. At the end of a level every open stream is closed, which
cancels its request on the server, so levels do not overlap and the run stays bounded.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, ROOT, conditions_md, md_table, parser, pyplot, setup, verdict, write

LEVELS = [1, 4, 8, 16]
TENANTS = ["ann", "ben", "cat", "dan"]
DOCS = [
    "Ann's cat is called Miso and sleeps on the piano.",
    "Ben works as a lighthouse keeper on the island of Rona.",
    "Cat's favourite food is lemon tart from the bakery on Elm Street.",
    "Dan learned to play the cello in Vienna at the age of nine.",
]
QUESTIONS = ["What do you know about me?", "Tell me a short story.", "What is my job?", "Hello!"]
MODES = {"batched": 16, "one at a time": 1}
GENERATOR = ROOT / "experiments" / "finetune" / "smollm2-instruct-generator"
TARGET = 2.5  # batched / one-at-a-time tokens/s at 8 clients


def start_server(root: Path, max_batch: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """A server with its own keys and states (not waited for); returns it and the keys."""
    from genadapter.serve.keys import add_key

    keys = {t: add_key(root / "keys.json", t) for t in TENANTS}
    cmd = [sys.executable, "-m", "genadapter.cli", "serve", "--generator", str(GENERATOR)]
    cmd += ["--state-dir", str(root / "states"), "--keys-file", str(root / "keys.json")]
    cmd += ["--port", "0", "--max-batch", str(max_batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env), keys


def ready(proc: subprocess.Popen, keys: dict[str, str]) -> str:
    """Wait for the server's banner, let each tenant read its own document; returns the URL."""
    import httpx

    line = proc.stdout.readline()
    if not line.startswith("serving "):
        raise RuntimeError(f"server did not start: {line!r}")
    url = line.split(" on ")[1].strip()
    for tenant, doc in zip(TENANTS, DOCS, strict=True):
        r = httpx.post(
            url + "/v1/read",
            json={"text": doc},
            headers={"Authorization": f"Bearer {keys[tenant]}"},
            timeout=120,
        )
        r.raise_for_status()
    return url


class Window:
    """A level: `warm` seconds not counted, then `seconds` measured. At its end every open
    stream is closed (which cancels its request on the server), so a level ends on time even
    with requests still queued."""

    def __init__(self, warm: float, seconds: float):
        self.start = time.perf_counter() + warm
        self.deadline = self.start + seconds
        self.open: set = set()
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            streams, self.open = list(self.open), set()
        for stream in streams:
            stream.close()

    def over(self) -> bool:
        return time.perf_counter() >= self.deadline


def ask(client, question: str, max_tokens: int, window: Window) -> None:
    """One streamed answer; its latency counts if it starts and ends in the measured part."""
    t0, stream = time.perf_counter(), None
    try:
        stream = client.chat.completions.create(
            model="genadapter",
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},  # every answer is max_tokens long
        )
        with window.lock:
            window.open.add(stream)
        with stream:
            for _ in stream:
                pass
        if t0 >= window.start and not window.over():
            with window.lock:
                window.latencies.append(time.perf_counter() - t0)
    except Exception:
        if not window.over():
            raise
    finally:
        with window.lock:
            window.open.discard(stream)


def decoded(url: str) -> int:
    """Tokens the server has decoded so far (every row of every forward is one token)."""
    import httpx

    return httpx.get(url + "/health", timeout=30).json()["tokens"]


def load(url: str, keys: dict[str, str], clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` clients in a loop; tokens/s decoded by the server in the measured part."""
    from openai import OpenAI

    window = Window(min(2.0, seconds / 4), seconds)

    def client_loop(i: int) -> None:
        tenant = TENANTS[i % len(TENANTS)]
        client = OpenAI(base_url=url + "/v1", api_key=keys[tenant], max_retries=0, timeout=300)
        while not window.over():
            ask(client, QUESTIONS[i % len(QUESTIONS)], max_tokens, window)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, window.start - time.perf_counter()))
    first, t_first = decoded(url), time.perf_counter()
    time.sleep(max(0.0, window.deadline - time.perf_counter()))
    tokens = decoded(url) - first
    elapsed = time.perf_counter() - t_first
    window.close()
    for t in threads:
        t.join()
    lat = sorted(window.latencies)
    return {
        "tokens_per_s": round(tokens / elapsed, 1),
        "requests": len(lat),
        "p50_s": round(statistics.median(lat), 2) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2) if lat else None,
    }


def seconds_cell(r: dict, window: float) -> str:
    """p50 / p95; no request that started in the window also ended in it: over the window."""
    if r["p50_s"] is None:
        return f"> {window:g} / > {window:g}"
    return f"{r['p50_s']} / {r['p95_s']}"


def little(r: dict, clients: int, max_tokens: int) -> str:
    """Mean latency by Little's law: each client always has one request out, so latency =
    clients / requests per second (exact in steady state, free of the window's edges)."""
    return f"{clients * max_tokens / r['tokens_per_s']:.1f}"


def table(rows: list[dict], window: float, max_tokens: int) -> str:
    cells = []
    for r in rows:
        b, o, c = r["batched"], r["one at a time"], r["clients"]
        cells.append(
            [
                c,
                b["tokens_per_s"],
                o["tokens_per_s"],
                f"{r['speedup']:.2f}×",
                seconds_cell(b, window),
                seconds_cell(o, window),
                f"{little(b, c, max_tokens)} / {little(o, c, max_tokens)}",
            ]
        )
    header = ["clients", "batched tok/s", "one-at-a-time tok/s", "speedup"]
    header += ["batched p50 / p95 s", "one-at-a-time p50 / p95 s", "mean latency s (Little)"]
    return md_table(header, cells)


def figure(rows: list[dict]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode in MODES:
        ax.plot(
            [r["clients"] for r in rows], [r[mode]["tokens_per_s"] for r in rows], "o-", label=mode
        )
    ax.set(xlabel="concurrent clients (4 tenants)", ylabel="completion tokens/s", xscale="log")
    ax.set_xticks(LEVELS, [str(c) for c in LEVELS])
    ax.legend()
    return fig


def report(result: dict) -> str:
    rows, seconds, max_tokens = result["rows"], result["seconds"], result["max_tokens"]
    at8 = result["speedup_at_8"]
    return (
        f"# Serving under load\n\n{table(rows, seconds, max_tokens)}\n\n"
        f"Batched / one-at-a-time tokens/s at 8 clients: {at8:.2f}× (target ≥ {TARGET}×: "
        f"{verdict(at8, TARGET)}). Greedy {max_tokens}-token streamed chat answers, "
        f"{seconds:g} s measured per level after 2 s of warm-up, 4 tenants with their own "
        "states, loopback. p50 / p95: requests that started and ended in the measured part "
        '("> N": none did); mean latency: clients × tokens per answer / tokens/s.\n'
    )


def measure(args) -> dict:
    env = setup(args)
    seconds = args.seconds or (4.0 if args.quick else 14.0)
    rows, procs, servers = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for mode, max_batch in MODES.items():  # both start at once: startup is half the wait
                procs[mode] = start_server(Path(tmp) / mode.replace(" ", "_"), max_batch)
            for mode, (proc, keys) in procs.items():
                servers[mode] = (ready(proc, keys), keys)
                load(*servers[mode], 1, 2.0, args.max_tokens)  # warm-up
            for j, clients in enumerate(LEVELS):
                row = {"clients": clients}
                for mode in list(MODES)[:: 1 if j % 2 == 0 else -1]:  # A B, B A, ...
                    row[mode] = load(*servers[mode], clients, seconds, args.max_tokens)
                    print(clients, mode, row[mode], flush=True)
                row["speedup"] = (
                    row["batched"]["tokens_per_s"] / row["one at a time"]["tokens_per_s"]
                )
                rows.append(row)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(timeout=60)
    return {
        "benchmark": "serve_load",
        "environment": env,
        "generator": str(GENERATOR.relative_to(ROOT)),
        "seconds": seconds,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "speedup_at_8": round(next(r["speedup"] for r in rows if r["clients"] == 8), 2),
        "target": TARGET,
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=None, help="measured per level (14; quick 4)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--report", action="store_true", help="rewrite the .md/.png from the .json")
    args = p.parse_args()
    if not args.report:
        result = measure(args)
        write("serve_load", args.out, result, report(result), figure(result["rows"]))
        return
    out = args.out or RESULTS
    result = json.loads((out / "serve_load.json").read_text())
    markdown = report(result).rstrip() + "\n\n" + conditions_md(result["environment"]) + "\n"
    (out / "serve_load.md").write_text(markdown)
    figure(result["rows"]).savefig(out / "serve_load.png", dpi=120)
    print(markdown)


if __name__ == "__main__":
    main()
