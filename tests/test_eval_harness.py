"""The harness end to end on tiny models: bad episodes skipped, "does not fit", report, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_eval_methods import tiny_llama as methods_tiny_llama
from transformers import LlamaForCausalLM

from genadapter.cli import main as genadapter_main
from genadapter.eval.harness import ALL_METHODS, EvalConfig, load_episodes, run_eval
from genadapter.eval.report import assign_groups, summarize, write_report

GOOD = [
    {
        "id": "short",
        "context": ["Alice lives in Paris."],
        "qas": [
            {
                "question": "Where does Alice live?",
                "answers": ["Paris"],
                "options": ["Rome", "Paris", "Oslo"],
            }
        ],
    },
    {
        "id": "long",
        "context": ["Bob sells bread in Rome. " * 30],
        "qas": [
            {"question": "What does Bob sell?", "answers": ["bread"]},
            {"question": "Where is Bob?", "answers": ["Rome", "in Rome"]},
        ],
    },
]
BAD = [
    {"id": "no-qas", "context": ["x"]},
    {"id": "empty-context", "context": [" "], "qas": [{"question": "q", "answers": ["a"]}]},
    {"id": "no-answers", "context": ["x"], "qas": [{"question": "q", "answers": []}]},
]
DEMO = {
    "id": "d1",
    "demonstrations": [
        {"input": "Paris is a city.", "output": "place"},
        {"input": "Alice is a doctor.", "output": "person"},
    ],
    "queries": [
        {"input": "Rome is old.", "output": "place", "options": ["place", "person"]},
        {"input": "Bob bakes.", "output": "person", "options": ["place", "person"]},
    ],
}


def tiny_llama(max_positions: int = 128) -> LlamaForCausalLM:
    return methods_tiny_llama(max_positions=max_positions)


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", GOOD + BAD, ["{not json"])


def test_run_eval_all_methods_qa(qa_file, tmp_path, smollm2_tokenizer):
    config = EvalConfig(
        task="qa",
        data=[qa_file],
        out=str(tmp_path / "out"),
        ttt_steps=2,
        window=16,
        max_new_tokens=4,
    )
    results = run_eval(config, tiny_llama(), smollm2_tokenizer, progress=False)
    assert len(results["problems"]) == 4  # three bad episodes + one broken line, all reported
    recs = {(r["method"], r["episode"]): r for r in results["records"]}
    assert set(recs) == {(m, e) for m in ALL_METHODS for e in ("short", "long")}
    # the long context exceeds the 128-token window only when it is put in the prompt
    assert recs["prompt", "long"]["status"] == "does not fit"
    assert all(r["status"] == "ok" for k, r in recs.items() if k != ("prompt", "long"))
    for r in results["records"]:
        if r["status"] == "ok":
            assert 0 <= r["em"] <= r["f1"] + 1e-9 <= 1 + 1e-9 and r["nll"] > 0
            assert r["answer_seconds"] > 0 and r["peak_rss_bytes"] > 0
    # candidate ranking where the episode gives options, and only there
    for m in ALL_METHODS:
        item = recs[m, "short"]["items"][0]
        assert item["choice"] in (0.0, 1.0) and recs[m, "short"]["choice"] == item["choice"]
    assert all("choice" not in r for (m, e), r in recs.items() if e == "long")
    assert recs["prompt", "short"]["kv_cache_bytes"] > recs["base", "short"]["kv_cache_bytes"]
    assert recs["genadapter", "long"]["kv_cache_bytes"] == recs["base", "long"]["kv_cache_bytes"]

    paths = write_report(results, config.out)
    saved = json.loads(paths["json"].read_text())
    assert saved["summary"]["overall"]["prompt"]["does_not_fit"] == 1
    assert saved["config"]["ttt_steps"] == 2
    md = paths["markdown"].read_text()
    assert all(f"| {m} |" in md for m in ALL_METHODS) and "does not fit" in md
    assert "choice acc" in md
    for key in ("score_plot", "cost_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_eval_demo(tmp_path, smollm2_tokenizer):
    data = write_jsonl(tmp_path / "demo.jsonl", [DEMO])
    config = EvalConfig(
        task="demo", data=[data], methods=["base", "prompt", "ttt-bitfit"], ttt_steps=1
    )
    results = run_eval(config, tiny_llama(), smollm2_tokenizer, progress=False)
    assert not results["problems"]
    for r in results["records"]:
        assert r["status"] == "ok" and r["accuracy"] in (0.0, 0.5, 1.0)
        assert len(r["items"]) == 2 and len(r["items"][0]["scores"]) == 2
    summary = summarize(results)
    assert set(summary["overall"]) == {"base", "prompt", "ttt-bitfit"}


def test_groups_by_file_or_length_bins():
    recs = [{"source": "a.jsonl", "context_tokens": n} for n in (10, 20, 30, 40, 50, 60)]
    assign_groups(recs, n_bins=3)
    assert [r["group"] for r in recs] == ["10-29 tokens"] * 2 + ["30-49 tokens"] * 2 + [
        "50-60 tokens"
    ] * 2
    recs = [
        {"source": "x/ctx256.jsonl", "context_tokens": 1},
        {"source": "x/ctx1k.jsonl", "context_tokens": 2},
    ]
    assign_groups(recs)
    assert [r["group"] for r in recs] == ["ctx256", "ctx1k"]


def test_config_rejects_unknown_methods_and_keys():
    with pytest.raises(ValueError, match="unknown methods"):
        EvalConfig(data=["x"], methods="base,magic")
    with pytest.raises(ValueError, match="unknown eval config keys"):
        EvalConfig.from_dict({"data": ["x"], "stepz": 3})


def test_wiki_docs_spread_each_episode_among_wikipedia_summaries(qa_file):
    from genadapter.assets import load_wiki_summaries

    plain, _ = load_episodes(EvalConfig(task="qa", data=[qa_file]))
    mixed, _ = load_episodes(EvalConfig(task="qa", data=[qa_file], wiki_docs=3))
    again, _ = load_episodes(EvalConfig(task="qa", data=[qa_file], wiki_docs=3))
    wiki = {f"{r['title']}: {r['extract']}" for r in load_wiki_summaries()}
    for (_, ep), (_, mix), (_, mix2) in zip(plain, mixed, again, strict=True):
        assert mix.context == mix2.context and mix.qas == ep.qas
        assert [d for d in mix.context if d in ep.context] == ep.context  # all kept, in order
        assert len(mix.context) == len(ep.context) + 3
        assert all(d in wiki for d in mix.context if d not in ep.context)
    with pytest.raises(ValueError, match="wiki_docs"):
        EvalConfig(task="demo", data=["x"], wiki_docs=2)


def test_cli_with_yaml_config(qa_file, tmp_path, smollm2_tokenizer, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama(max_positions=512).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"task: qa\ndata: [{qa_file}]\nmodel: {model_dir}\nmethods: [base, prompt]\n"
        f"max_new_tokens: 3\nout: {tmp_path / 'ignored'}\n"
    )
    out = tmp_path / "cli-out"
    code = genadapter_main(
        [
            "eval",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--no-progress",
            "--methods",
            "base,prompt,prompt-window",
            "--window",
            "8",
        ]
    )
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["methods"] == ["base", "prompt", "prompt-window"]  # flag beats YAML
    assert saved["config"]["window"] == 8 and saved["config"]["max_new_tokens"] == 3
    assert len(saved["records"]) == 6 and not (tmp_path / "ignored").exists()
    assert "| prompt-window |" in capsys.readouterr().out


def test_labelled_generators_side_by_side_and_episode_limits_per_file(
    qa_file, tmp_path, smollm2_tokenizer
):
    from genadapter import GenerativeAdapter, GeneratorConfig

    model = tiny_llama()
    dirs = {}
    for label, scale in (("fresh", 0.0), ("trained", 1.0)):
        ga = GenerativeAdapter.from_base(model, GeneratorConfig(r=4, r_in=4, chunk_len=8))
        for block in ga.generator.blocks.values():
            torch.nn.init.normal_(block.B, std=scale)  # std 0: B = 0, the adapter is the identity
        dirs[label] = str(tmp_path / label)
        ga.save_pretrained(dirs[label])
    other = write_jsonl(tmp_path / "other.jsonl", GOOD)
    config = EvalConfig(
        task="qa",
        data=[qa_file, other],
        methods=["base", "genadapter:fresh", "genadapter:trained"],
        generators=dirs,
        max_episodes={other: 1},
        max_new_tokens=3,
    )
    results = run_eval(config, model, smollm2_tokenizer, progress=False)
    recs = {(r["method"], r["source"], r["episode"]): r for r in results["records"]}
    assert len(recs) == 3 * (2 + 1)  # both good episodes of qa_file, one of `other`
    for (method, source, episode), rec in recs.items():
        base = recs[("base", source, episode)]
        if method == "genadapter:fresh":
            assert rec["nll"] == pytest.approx(base["nll"], abs=1e-5)
        if method == "genadapter:trained":
            assert rec["nll"] != pytest.approx(base["nll"], abs=1e-3)
    assert results["generator"]["trained"] == dirs["trained"]
    with pytest.raises(ValueError, match="no such label"):
        EvalConfig(data=["x"], methods=["genadapter:missing"], generators=dirs)


def test_ttt_over_budget_is_recorded_not_run(qa_file, tmp_path, smollm2_tokenizer):
    config = EvalConfig(
        task="qa",
        data=[qa_file],
        methods=["base", "ttt-bitfit"],
        ttt_steps=1,
        max_new_tokens=2,
        method_options={"ttt-bitfit": {"max_context_tokens": 50}},
    )
    results = run_eval(config, tiny_llama(), smollm2_tokenizer, progress=False)
    status = {(r["method"], r["episode"]): r["status"] for r in results["records"]}
    assert (
        status[("ttt-bitfit", "short")] == "ok" and status[("ttt-bitfit", "long")] == "over budget"
    )
    assert status[("base", "long")] == "ok"
    assert summarize(results)["overall"]["ttt-bitfit"]["over_budget"] == 1


def test_reuse_takes_over_records_only_under_the_same_settings_and_weights(
    qa_file, tmp_path, smollm2_tokenizer
):
    from genadapter import GenerativeAdapter, GeneratorConfig

    model = tiny_llama()
    ga = GenerativeAdapter.from_base(model, GeneratorConfig(r=4, r_in=4, chunk_len=8))
    ga.save_pretrained(tmp_path / "gen")
    generators = {"a": str(tmp_path / "gen"), "b": str(tmp_path / "gen")}
    config = EvalConfig(
        task="qa",
        data=[qa_file],
        methods=["base", "genadapter:a", "genadapter:b"],
        generators=generators,
        max_new_tokens=3,
    )
    first = write_report(run_eval(config, model, smollm2_tokenizer, progress=False), tmp_path / "1")
    for block in ga.generator.blocks.values():  # generator b is retrained under the same path
        torch.nn.init.normal_(block.B)
    ga.save_pretrained(tmp_path / "gen-b")
    generators["b"] = str(tmp_path / "gen-b")
    again = EvalConfig(
        task="qa",
        data=[qa_file],
        methods=["base", "prompt", "genadapter:a", "genadapter:b"],
        generators=generators,
        max_new_tokens=3,
        reuse=[str(first["json"]), str(tmp_path / "missing.json")],
    )
    results = run_eval(again, model, smollm2_tokenizer, progress=False)
    earlier = {
        (r["method"], r["episode"]): r for r in json.loads(first["json"].read_text())["records"]
    }
    for rec in results["records"]:
        key = (rec["method"], rec["episode"])
        if rec["method"] in ("base", "genadapter:a"):
            assert rec == {**earlier[key], "reused_from": str(first["json"])}
        else:  # new method, or the same label with other weights: computed afresh
            assert "reused_from" not in rec
        if rec["method"] == "genadapter:b":
            assert rec["nll"] != pytest.approx(earlier[key]["nll"], abs=1e-3)
    assert "taken over from" in write_report(results, tmp_path / "2")["markdown"].read_text()
    other = dataclasses.replace(again, max_new_tokens=4)  # another setting: nothing is reused
    assert not any(
        "reused_from" in r
        for r in run_eval(other, model, smollm2_tokenizer, progress=False)["records"]
    )
