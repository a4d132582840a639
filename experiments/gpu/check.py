"""`make gpu-check`: what works on one GPU and how fast, in one command, offline, under 8 minutes.

    python experiments/gpu/check.py                        # CUDA: the check, into results/
    python experiments/gpu/check.py --device cpu --quick   # the dry run CI runs (under 3 minutes)

1. tests: the device-parametrised tests (tests/test_devices.py) on the device;
2. pretraining: bf16-mixed on SmolLM2-135M-Instruct (pretrain_smollm2.yaml, larger batch and
   chunks than the CPU runs): step time, context tokens/s, peak memory, an MFU estimate and the
   held-out gap_closed;
3. benchmarks on the device (experiments/bench/): answer latency after 8K* and 32K context
   tokens (reading them, side path vs merged vs prompt, memory), the pretraining step, reading;
4. one report: results/report.md and report.json (quick runs: results/quick/).
Every part runs even if one before it failed; the report says what failed. Its figures need only
the offline assets (`make assets`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BENCH = ROOT / "experiments" / "bench"
CONFIG = HERE / "pretrain_smollm2.yaml"
BUDGET_S = {False: 8 * 60, True: 3 * 60}  # full / quick
# dense bf16 tensor-core peaks (TFLOP/s) by device name, for the MFU estimate; --peak-tflops wins
PEAK_TFLOPS = {
    "H200": 989,
    "H100": 989,
    "A100": 312,
    "L40S": 362,
    "L40": 181,
    "L4": 121,
    "A10": 125,
    "RTX 4090": 165,
    "RTX 3090": 71,
    "V100": 125,
    "T4": 65,
}


# --- 1. tests ---------------------------------------------------------------------------------
# the dry run keeps to the core properties and the sync count: CI's `make test` runs the rest
QUICK_TESTS = "cpu and (streaming or side_path or peft or read_and_generate or sync)"


def run_tests(device: str, quick: bool, out: Path) -> dict[str, Any]:
    """tests/test_devices.py for this device (pytest in its own process, results from JUnit XML)."""
    xml = out / "tests.xml"
    selection = QUICK_TESTS if quick and device == "cpu" else device
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection]
    cmd += ["--junitxml", str(xml), str(ROOT / "tests" / "test_devices.py")]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    cases = ET.parse(xml).getroot().iter("testcase") if xml.is_file() else []
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcome["failed" if kind in ("failure", "error") else kind].append(case.get("name"))
    ok = res.returncode == 0 and outcome["passed"] and not outcome["failed"]
    return {
        "ok": bool(ok),
        "seconds": time.perf_counter() - start,
        **{k: len(v) for k, v in outcome.items()},
        "selection": selection,
        "failures": outcome["failed"],
        "log_tail": "" if ok else (res.stdout + res.stderr)[-3000:],
    }


# --- the dry run's model -------------------------------------------------------------------------
def tiny_generator(out: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and a random generator on it, saved: the dry
    run runs every part on it, so that it takes a minute on a CPU (its figures mean nothing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from genadapter import GenerativeAdapter, GeneratorConfig
    from genadapter.assets import smollm2_dir

    model_dir, generator_dir = out / "tiny-model", out / "tiny-generator"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ga = GenerativeAdapter.from_base(str(model_dir), GeneratorConfig(r=8, r_in=8, chunk_len=32))
    with torch.no_grad():
        for block in ga.generator.blocks.values():
            block.B.normal_(std=0.02)  # B = 0 would make the side path a no-op
    ga.save_pretrained(generator_dir)
    return generator_dir


# --- 2. pretraining -----------------------------------------------------------------------------
def layer_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters of the LM head)."""
    from genadapter.targets import decoder_layers

    layers = model.get_submodule(decoder_layers(model)[0])
    head = model.get_output_embeddings()
    return sum(p.numel() for p in layers[0].parameters()), head.weight.numel()


def forward_flops(per_layer: int, layers: int, hidden: int, seq: int) -> float:
    """Forward FLOPs of one token through `layers` decoder layers: 2 per weight, plus causal
    attention over a `seq`-token chunk (QK^T and AV: 2 x 2 x seq/2 x hidden per layer)."""
    return layers * (2 * per_layer + 2 * seq * hidden)


def step_flops(ga, batch_mask: torch.Tensor, targets: int) -> float:
    """LM FLOPs of one pretraining step (the generator's own are small and left out):
    the frozen no-grad pass over every real chunk, up to the highest adapted layer; the adapted
    pass over `targets` rows of one chunk, forward and head, and its backward, which computes
    input gradients only (the LM's weights are frozen): about one forward more."""
    cfg = ga.base_model.config
    per_layer, head = layer_params(ga.base_model)
    C = batch_mask.shape[-1]
    chunks = int(batch_mask.flatten(0, 1).any(1).sum())
    frozen = chunks * C * forward_flops(per_layer, max(ga.generator.layers), cfg.hidden_size, C)
    full = forward_flops(per_layer, cfg.num_hidden_layers, cfg.hidden_size, C) + 2 * head
    return frozen + 2 * targets * C * full


class StepTimer(L.Callback):
    """Wall time of each training step (the device drained at both ends), tokens and FLOPs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.flops: list[float] = []

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        from genadapter.training.objectives import sample_targets

        self._sync()
        self.seconds.append(time.perf_counter() - self._start)
        mask = batch["host_mask"]
        h = module.hparams
        rows = sample_targets(mask, h.targets_per_doc, h.completion_weight, torch.Generator())
        self.tokens.append(int(mask.sum()))
        self.flops.append(step_flops(module.ga, mask, len(rows.doc)))


def run_pretraining(
    device: str, quick: bool, out: Path, minutes: float, tiny: Path | None
) -> dict[str, Any]:
    from genadapter import GeneratorConfig
    from genadapter.training.cli import build, build_parser

    run_dir = ROOT / "runs" / ("gpu-check-quick" if quick else "gpu-check")  # git-ignored
    args = ["--config", str(CONFIG), "--run_dir", str(run_dir)]
    if tiny is not None:
        base = GeneratorConfig.load(tiny / "generator_config.json").base_model
        args += ["--model.base_model", base]
    args += ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]
    args += ["--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}"]
    if quick:  # a few small steps: the same code path, not the same figures
        small = {"model.generator.chunk_len": 32, "data.chunk_len": 32, "data.max_chunks": 4}
        small.update({"data.batch_size": 2, "data.val_documents": 4, "data.val_batch_size": 2})
        small.update({"trainer.max_steps": 3, "trainer.val_check_interval": 3})
        small.update({"trainer.limit_val_batches": 1, "data.join_topic": 1})
        small.update({"model.warmup_steps": 2})
        args += [a for k, v in small.items() for a in (f"--{k}", str(v))]
    cfg = build_parser().parse_args(args)
    model, data, trainer = build(cfg)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    if not any(k.startswith("val/") for k in trainer.callback_metrics):  # stopped by max_time
        trainer.validate(model, datamodule=data, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    steady = timer.seconds[2:] or timer.seconds  # the first steps compile kernels, warm caches
    step_s = statistics.median(steady)
    flops = statistics.median(timer.flops)
    return {
        "ok": trainer.global_step == cfg.trainer.max_steps,
        "steps": trainer.global_step,
        "planned_steps": cfg.trainer.max_steps,
        "seconds": wall,
        "precision": cfg.trainer.precision,
        "batch": f"{cfg.data.batch_size} documents x {cfg.data.max_chunks} chunks x "
        f"{cfg.data.chunk_len} tokens",
        "step_s_median": step_s,
        "context_tokens_per_s": statistics.median(timer.tokens) / step_s,
        "lm_flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "gap_closed": {
            k: metrics.get(f"val/{k}/gap_closed") for k in ("completion", "reconstruction")
        },
        "val_losses": {k[4:]: v for k, v in metrics.items() if k.startswith("val/")},
        "train_loss_last": metrics.get("train/loss"),
    }


# --- 3. benchmarks ------------------------------------------------------------------------------
def run_benchmarks(device: str, quick: bool, out: Path, tiny: Path | None) -> dict[str, Any]:
    """answer_latency (at 8K* and 32K), train_step and read_throughput, each in its own process."""
    bench_out = out / "bench"
    common = ["--device", device, "--out", str(bench_out)]
    common += ["--generator", str(tiny)] if tiny is not None else []
    plans = {  # the dry run: small contexts and chunks, one round
        "answer_latency": ["--sizes", *(["128", "512"] if quick else ["8128", "32768"])],
        "train_step": [],
        "read_throughput": ["--lengths", "128", "--batches", "1", "4"] if quick else [],
    }
    results = {}
    for name, extra in plans.items():
        cmd = [sys.executable, str(BENCH / f"{name}.py"), *common, *extra]
        cmd += ["--quick", "--reps", "1"] if quick else ["--reps", "3"]
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        file = bench_out / f"{name}.json"
        results[name] = {
            "ok": res.returncode == 0 and file.is_file(),
            "seconds": time.perf_counter() - start,
            "result": json.loads(file.read_text()) if res.returncode == 0 else None,
            "log_tail": "" if res.returncode == 0 else res.stderr[-3000:],
        }
    return results


# --- 4. the report --------------------------------------------------------------------------------
def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def answer_rows(answer: dict) -> list[str]:
    lines = [
        "| context N | read (s) | read tokens/s | prompt prefill (s) | answer: side | merged | "
        "prompt | decode ms/token side / merged / prompt | state / KV cache | peak GPU MiB read / side / prompt |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in answer["rows"]:
        n, ingest = r["context_tokens"], r["ingest"]
        read_s = ingest["read"]["seconds"]
        prefill = ingest.get("prefill", {}).get("seconds")
        a, d, gpu = r["answer_s"], r["decode_ms_per_token"], r.get("peak_gpu_mib", {})
        lines.append(
            f"| {n:,} | {fmt(read_s)} | {fmt(n / read_s if read_s else None, ',.0f')} | "
            f"{fmt(prefill)} | {fmt(a['side'])} | {fmt(a['merged'])} | "
            f"{fmt(a['prompt']) if r['prompt'] == 'ok' else 'does not fit'} | "
            f"{fmt(d.get('side'), '.1f')} / {fmt(d.get('merged'), '.1f')} / "
            f"{fmt(d.get('prompt'), '.1f')} | {r['state_bytes'] / 2**20:.2f} / "
            f"{r['kv_cache_bytes'] / 2**20:,.0f} MiB | {fmt(ingest['read'].get('peak_gpu_mib'), '.0f')}"
            f" / {fmt(gpu.get('side'), '.0f')} / {fmt(gpu.get('prompt'), '.0f')} |"
        )
    return lines


def markdown(report: dict) -> str:
    env, tests, train, bench = (report[k] for k in ("environment", "tests", "pretraining", "bench"))
    verdict = "within" if report["seconds"] <= report["budget_s"] else "**over**"
    lines = [
        f"# GPU check: {env['device_name']} ({report['mode']})",
        "",
        f"Model: {report['model']}."
        + (" A dry run: every part runs, its figures say nothing." if env["quick"] else ""),
        "",
        f"{report['seconds'] / 60:.1f} min, {verdict} the {report['budget_s'] / 60:.0f}-minute "
        f"budget. torch {env['torch']}, CUDA {env['cuda']}, commit {env['commit']}, {env['date']}. "
        f"Regenerate: `{report['command']}`.",
        "",
        "| part | works | seconds |",
        "|---|---|---|",
    ]
    parts = {"tests on the device": tests, "bf16-mixed pretraining": train}
    parts.update({f"benchmark {k}": v for k, v in bench.items()})

    def works(v: dict) -> str:
        return "skipped" if v.get("skipped") else "yes" if v.get("ok") else "**no**"

    lines += [f"| {k} | {works(v)} | {fmt(v.get('seconds'), '.0f')} |" for k, v in parts.items()]
    lines += ["", "## Tests", ""]
    lines.append(
        f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
        f"{tests.get('skipped', 0)} skipped (tests/test_devices.py -k "
        f"'{tests.get('selection', env['device'])}')."
        + (f" Failed: {', '.join(tests['failures'])}." if tests.get("failures") else "")
    )
    if train.get("steps"):
        gap = train["gap_closed"]
        lines += [
            "",
            f"## Pretraining ({report['model']}, wiki, experiments/gpu/pretrain_smollm2.yaml)",
            "",
            f"{train['steps']} of {train['planned_steps']} steps, {train['precision']}, "
            f"{train['batch']}: **{train['step_s_median'] * 1e3:.0f} ms a step** (median), "
            f"**{train['context_tokens_per_s']:,.0f} context tokens/s**, "
            f"{train['achieved_tflops']:.2f} TFLOP/s of LM compute, MFU "
            f"{fmt(report['mfu'], '.1%') if report['mfu'] is not None else 'n/a (no peak known)'}"
            f", peak GPU memory {fmt(train['peak_gpu_mib'], ',.0f')} MiB. Held-out gap_closed: "
            f"completion {fmt(gap['completion'], '.3f')}, reconstruction "
            f"{fmt(gap['reconstruction'], '.3f')}; last train loss {fmt(train['train_loss_last'], '.3f')}.",
            "",
            "MFU estimate: LM FLOPs per step from the model config (2 per weight and token, causal "
            "attention over a chunk; the frozen pass up to the highest adapted layer, the adapted "
            "pass over every target row with its head, its backward counted as one more forward since "
            "the LM's weights take no gradient) over the step time and the device's dense bf16 peak.",
        ]
    answer = bench.get("answer_latency", {}).get("result")
    if answer:
        lines += ["", "## Reading and answering after N context tokens (answer_latency.py)", ""]
        lines += answer_rows(answer)
        lines += [
            "",
            f"Answer: a {answer['question_tokens']}-token question and {answer['new_tokens']} "
            "greedy tokens, median; read: `ga.read` of the N tokens; prompt: its KV cache "
            "(prefilled once). Targets: "
            + "; ".join(
                f"{t['figure']} {fmt(t['value'], '.3g')} ({t['verdict']})"
                for t in answer["targets"]
            )
            + ".",
        ]
    train_b = bench.get("train_step", {}).get("result")
    if train_b:
        lines += ["", "## Pretraining step vs plain forward+backward (train_step.py)", ""]
        lines += [
            f"- {r['documents']}×{r['chunks_per_doc']}×{r['chunk_len']}: step "
            f"{r['tokens_per_s']['pretraining step']:,.0f} context tokens/s, plain fwd+bwd "
            f"{r['tokens_per_s']['forward+backward']:,.0f}, ratio {r['step_over_plain']:.2f} ({r['verdict']})"
            for r in train_b["rows"]
        ]
    read_b = bench.get("read_throughput", {}).get("result")
    if read_b:
        lines += ["", "## Read vs plain no-grad forward (read_throughput.py)", ""]
        lines += [
            f"- chunk {r['chunk_len']} × {r['batch']}: read {r['tokens_per_s']['read']:,.0f} tokens/s, "
            f"ratio {r['read_over_forward']:.3f} ({r['verdict']})"
            for r in read_b["rows"]
        ]
    failed = [(k, v["log_tail"]) for k, v in parts.items() if not v.get("ok") and v.get("log_tail")]
    for name, tail in failed:
        lines += ["", f"## {name}: what failed", "", "```", tail.strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def environment(device: str, quick: bool) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(0)
        if device == "cuda"
        else platform.processor() or "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": quick,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="small settings (the CPU dry run)")
    p.add_argument(
        "--out", type=Path, default=None, help="default: results/ (quick: results/quick/)"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "pretraining", "bench"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (use DEVICE=cpu QUICK=1 for the dry run)", file=sys.stderr)
        return 2
    out = args.out or HERE / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    start, budget = time.perf_counter(), BUDGET_S[args.quick]
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "budget_s": budget,
        "command": "python experiments/gpu/check.py " + " ".join(sys.argv[1:]),
        "environment": environment(args.device, args.quick),
    }

    def part(name: str, fn, *a) -> dict[str, Any]:
        if name in args.skip:
            return {"ok": None, "skipped": True}
        print(f"=== {name}", flush=True)
        try:
            return fn(*a)
        except Exception as e:  # one broken part must not hide what the others measure
            return {"ok": False, "log_tail": f"{type(e).__name__}: {e}"}

    report["tests"] = part("tests", run_tests, args.device, args.quick, out)
    # outside the repository: every generator folder under experiments/ is a committed one
    scratch = tempfile.TemporaryDirectory(prefix="gpu-check-")
    tiny = tiny_generator(Path(scratch.name)) if args.quick else None
    report["model"] = "a tiny random Llama" if tiny else "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the training run gets what the budget leaves after the benchmarks' share
    minutes = 3.0 if not args.quick else 1.0
    report["pretraining"] = part(
        "pretraining", run_pretraining, args.device, args.quick, out, minutes, tiny
    )
    report["bench"] = part("bench", run_benchmarks, args.device, args.quick, out, tiny)
    if report["bench"].get("skipped") or "ok" in report["bench"]:  # skipped, or failed as a whole
        report["bench"] = {"all": report["bench"]}
    peak = peak_tflops(args.device, args.peak_tflops)
    tflops = report["pretraining"].get("achieved_tflops")
    report["peak_tflops"] = peak
    report["mfu"] = tflops / peak if peak and tflops else None
    report["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (out / "report.md").write_text(text)
    print(text)
    print(f"wrote {out / 'report.md'} and report.json")
    scratch.cleanup()
    parts = [report["tests"], report["pretraining"], *report["bench"].values()]
    return 0 if all(p.get("ok") or p.get("skipped") for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
