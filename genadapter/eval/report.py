"""Turn harness records into a summary, a Markdown table and plots (score and cost vs context).

Grouping by context length: each data file is one group (benchmarks ship one file per
context length); a single file is split into up to `n_bins` equal-count bins of context tokens.
Only records with status "ok" enter means; "does not fit", "over budget" and errors are counted
separately.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

# choice: the gold answer ranks first among same-type candidates (qa episodes with `options`)
SCORES = {
    "qa": ("em", "f1", "choice", "nll"),
    "conversation": ("em", "f1", "nll"),
    "demo": ("accuracy",),
}
COSTS = (
    "adapt_seconds",
    "answer_seconds",
    "state_bytes",
    "kv_cache_bytes",
    "memory_bytes",  # state + KV cache: what answering needs beyond the base weights
    "peak_rss_bytes",
)


def assign_groups(records: list[dict], n_bins: int = 3) -> None:
    """Set `group` on every record: its data file, or a context-length bin when there is one file."""
    sources = sorted({r["source"] for r in records})
    if len(sources) > 1:
        for r in records:
            r["group"] = Path(r["source"]).stem
        return
    lengths = sorted({r["context_tokens"] for r in records})
    n = max(1, min(n_bins, len(lengths)))
    edges = [lengths[(i * len(lengths)) // n] for i in range(n)]  # lower edge of each bin
    for r in records:
        b = max(i for i, e in enumerate(edges) if r["context_tokens"] >= e)
        upper = edges[b + 1] - 1 if b + 1 < n else lengths[-1]
        r["group"] = f"{edges[b]}-{upper} tokens"


def _summary_row(records: list[dict], task: str) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    row: dict[str, Any] = {
        "episodes": len(records),
        "ok": len(ok),
        "does_not_fit": sum(r["status"] == "does not fit" for r in records),
        "over_budget": sum(r["status"] == "over budget" for r in records),
        "errors": sum(r["status"] == "error" for r in records),
        "context_tokens": mean(r["context_tokens"] for r in records) if records else None,
    }
    for r in ok:
        r["memory_bytes"] = r.get("state_bytes", 0) + r.get("kv_cache_bytes", 0)
    for k in SCORES[task] + COSTS:
        vals = [r[k] for r in ok if r.get(k) is not None]
        row[k] = (max(vals) if k == "peak_rss_bytes" else mean(vals)) if vals else None
    return row


def summarize(results: dict[str, Any], n_bins: int = 3) -> dict[str, Any]:
    """Per method overall and per (method, group): means of scores and costs over ok episodes."""
    task, records = results["config"]["task"], results["records"]
    if records:
        assign_groups(records, n_bins)
    by_method: dict[str, list] = defaultdict(list)
    by_group: dict[tuple[str, str], list] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
        by_group[(r["method"], r["group"])].append(r)
    return {
        "overall": {m: _summary_row(rs, task) for m, rs in by_method.items()},
        "by_group": [
            {"method": m, "group": g, **_summary_row(rs, task)} for (m, g), rs in by_group.items()
        ],
    }


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "–"
    if key.endswith("bytes"):
        return f"{value / 2**20:.2f} MB" if value >= 2**16 else f"{value / 1024:.1f} KB"
    if key.endswith("seconds"):
        return f"{value:.3f}"
    if key in ("em", "f1", "choice", "accuracy"):
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}" if key == "nll" else f"{value:.0f}"
    return str(value)


def markdown(results: dict[str, Any], summary: dict[str, Any]) -> str:
    task = results["config"]["task"]
    cols = ["ok", "does_not_fit", "over_budget", "errors", "context_tokens", *SCORES[task], *COSTS]
    names = {
        "ok": "ok",
        "does_not_fit": "does not fit",
        "over_budget": "over budget",
        "errors": "errors",
        "context_tokens": "ctx tokens",
        "choice": "choice acc",
        "nll": "answer NLL",
        "adapt_seconds": "adapt s",
        "answer_seconds": "answer s",
        "state_bytes": "state",
        "kv_cache_bytes": "KV cache",
        "memory_bytes": "state+KV",
        "peak_rss_bytes": "peak RSS",
    }

    def table(first: str, rows: list[tuple[str, dict]]) -> list[str]:
        titles = " | ".join(names.get(c, c.upper()) for c in cols)
        out = [f"| {first} | {titles} |", "|---" * (len(cols) + 1) + "|"]
        return out + [f"| {k} | " + " | ".join(_fmt(r[c], c) for c in cols) + " |" for k, r in rows]

    cfg = results["config"]
    by_group = sorted(summary["by_group"], key=lambda r: (r["method"], r["context_tokens"] or 0))
    lines = [
        f"# Evaluation: task `{task}`",
        "",
        f"- model: `{results['model']}`; generator: `{results['generator']}`",
        f"- data: {', '.join(f'`{d}`' for d in cfg['data'])}; git commit `{results['git_commit']}`",
        f"- TTT: {cfg['ttt_steps']} steps, lr {cfg['ttt_lr']}; prompt window {cfg['window']} tokens",
        "- EM/F1/choice/accuracy in %; choice = the gold answer ranks first by likelihood among"
        " its same-type candidates (chance 1/#options); answer NLL in nats per gold-answer token (lower is better);"
        " means over the episodes that ran; peak RSS is the max over episodes.",
        "",
        "## Overall",
        "",
        *table("method", list(summary["overall"].items())),
        "",
        "## By context length",
        "",
        *table("method / group", [(f"{r['method']} / {r['group']}", r) for r in by_group]),
    ]
    reused = defaultdict(set)
    for r in results["records"]:
        if "reused_from" in r:
            reused[r["reused_from"]].add(r["method"])
    for path, methods in sorted(reused.items()):
        lines += [
            "",
            f"Records of {', '.join(sorted(methods))} were taken over from `{path}`"
            " (same episodes and settings; their timings were measured in that run).",
        ]
    if results["problems"]:
        lines += ["", "## Problems (skipped)", "", *[f"- {p}" for p in results["problems"]]]
    return "\n".join(lines) + "\n"


def _plot(summary: dict, keys: tuple[str, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    rows_by_method: dict[str, list] = defaultdict(list)
    for row in summary["by_group"]:
        rows_by_method[row["method"]].append(row)
    for ax, key in zip(axes[0], keys, strict=True):
        for m, rows in rows_by_method.items():
            pts = sorted((r["context_tokens"], r[key]) for r in rows if r[key] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(key)
        if key.endswith("bytes"):
            ax.set_yscale("log")
        elif key.endswith("seconds"):  # zero adaptation time is a real value: keep it visible
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: str | Path, n_bins: int = 3) -> dict[str, Path]:
    """Write results.json, results.md, score_vs_context.png and cost_vs_context.png to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, n_bins)
    task = results["config"]["task"]
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "score_plot": out / "score_vs_context.png",
        "cost_plot": out / "cost_vs_context.png",
    }
    paths["json"].write_text(json.dumps({**results, "summary": summary}, indent=1) + "\n")
    paths["markdown"].write_text(markdown(results, summary))
    scores = [k for k in SCORES[task] if any(r[k] is not None for r in summary["by_group"])]
    _plot(
        summary,
        tuple(scores) or SCORES[task],
        paths["score_plot"],
        f"{task}: score vs context length",
    )
    _plot(
        summary,
        ("adapt_seconds", "answer_seconds", "memory_bytes", "peak_rss_bytes"),
        paths["cost_plot"],
        f"{task}: cost vs context length",
    )
    return paths
