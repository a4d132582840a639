"""Instruction tuning on tiny random models: answer-only loss, injection through the state, resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.config import KeyConfig
from genadapter.data.episodes import QAEpisode
from genadapter.eval.prompts import PromptFormat
from genadapter.training.checkpoint_io import SafetensorsCheckpointIO
from genadapter.training.cli import build, build_parser
from genadapter.training.export import export_checkpoint
from genadapter.training.finetune import GeneratorFinetuning, main
from genadapter.training.instruct_data import (
    EncodedEpisode,
    FinetuneDataModule,
    collate_episodes,
    encode_episode,
)
from genadapter.training.objectives import (
    answer_losses,
    chunk_writes,
    episode_state,
    row_losses,
    token_losses,
)
from genadapter.training.probes import oracle_writes, probe_losses

CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Perth"]
JOBS = ["baker", "pilot", "nurse", "judge"]


def qa_episode(i: int) -> dict:
    rng = random.Random(i)
    name = f"Person{i}"
    city, job = rng.choice(CITIES), rng.choice(JOBS)
    return {
        "id": f"ep{i}",
        "context": [f"{name} lives in {city}.", f"{name} works as a {job}."],
        "qas": [
            {"question": f"Where does {name} live?", "answers": [city]},
            {"question": f"What is the job of {name}?", "answers": [job]},
        ],
    }


def read_episode(d: dict) -> QAEpisode:
    return QAEpisode.from_json(d)


def demo_episode(i: int) -> dict:
    labels = ["good", "bad"]
    demos = [{"input": f"review {i}-{k}", "output": labels[k % 2]} for k in range(3)]
    return {
        "id": f"demo{i}",
        "demonstrations": demos,
        "queries": [{"input": f"review {i}-q", "output": "good", "options": labels}],
    }


@pytest.fixture(scope="module")
def episode_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("episodes")
    files = {
        "qa": [qa_episode(i) for i in range(12)],
        "demo": [demo_episode(i) for i in range(6)],
        "corpus": [
            {"text": f"document {i} tells a short story about the sea and a ship"}
            for i in range(20)
        ],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("\n".join(json.dumps(r) for r in rows))
    return paths


def config(tmp_path: Path, tiny_dir: Path, files: dict[str, Path], **trainer) -> Path:
    cfg = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "model": {
            "base_model": str(tiny_dir),
            "generator": {"r": 8, "r_in": 8, "chunk_len": 4, "keys": {"gate": True}},
            "lr": 0.01,
            "warmup_steps": 2,
            "decay_steps": 6,
            "targets_per_doc": 2,
            "rank_weight": 0.5,
            "retrieval_weight": 0.5,
            "gate_weight": 0.5,
            "distill_weight": 0.5,
        },
        "data": {
            "train_files": {str(files["qa"]): 2.0, str(files["demo"]): 1.0},
            "val_files": [str(files["qa"]), str(files["demo"])],
            "episodes_per_batch": 2,
            "max_questions": 2,
            "val_episodes": 2,
            "lm_every": 3,
            "source": str(files["corpus"]),
            "chunk_len": 4,
            "max_chunks": 3,
            "min_chunks": 2,
            "batch_size": 2,
            "val_percent": 0.0,
            "rank_options": 3,
            "train_context_prompts": True,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "check_val_every_n_epoch": None,
            **trainer,
        },
        "checkpoint": {"save_last": True, "every_n_train_steps": 3},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg_path: Path, *extra: str) -> tuple[GeneratorFinetuning, object]:
    from genadapter.training.instruct_data import FinetuneDataModule as Data

    cfg = build_parser("finetune", GeneratorFinetuning, Data).parse_args(
        ["--config", str(cfg_path), *extra]
    )
    model, data, trainer = build(cfg, GeneratorFinetuning, Data)
    trainer.fit(model, datamodule=data, ckpt_path=cfg.ckpt_path)
    return model, trainer


def test_loss_is_on_answer_tokens_only(tiny_dir, episode_files, smollm2_tokenizer):
    data = FinetuneDataModule(
        train_files={str(episode_files["qa"]): 1.0},
        tokenizer=str(tiny_dir),
        episodes_per_batch=3,
        lm_every=0,
        chunk_len=4,
    )
    batch = next(iter(data.train_dataloader()))
    episodes = [qa_episode(i) for i in range(12)]
    answers = {qa["answers"][0] for ep in episodes for qa in ep["qas"]}
    for ids, mask in zip(batch["input_ids"], batch["loss_mask"], strict=True):
        target = smollm2_tokenizer.decode(ids[mask.bool()])
        assert target.endswith("<|im_end|>") and target.removesuffix("<|im_end|>") in answers
    # gradients reach exactly the logits that predict answer tokens
    logits = torch.randn(*batch["input_ids"].shape, len(smollm2_tokenizer), requires_grad=True)
    loss_sum, n_tok = token_losses(logits, batch["input_ids"], batch["loss_mask"])
    loss_sum.sum().backward()
    predicts_answer = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
    predicts_answer[:, :-1] = batch["loss_mask"][:, 1:].bool()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, predicts_answer)
    assert torch.equal(n_tok, batch["loss_mask"][:, 1:].sum(1).float())


def test_episode_state_equals_reading_the_context_with_read(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ga = GenerativeAdapter.from_base(
        tiny_model("llama", vocab=len(tok)),
        GeneratorConfig(r=4, r_in=4, chunk_len=4),
        tokenizer=tok,
    )
    for block in ga.generator.blocks.values():
        torch.nn.init.normal_(block.B)
    episodes = [read_episode(qa_episode(i)) for i in range(3)]
    encoded = [encode_episode(e, PromptFormat(tok), chunk_len=4) for e in episodes]
    batch = collate_episodes(encoded, [0, 0, 0], chunk_len=4, pad_id=0)
    writes = chunk_writes(ga, batch["context_ids"], batch["context_mask"])
    state = episode_state(ga, writes, torch.arange(3))
    for e, episode in enumerate(episodes):
        reread = ga.new_state(1)
        for text in episode.context_texts():  # what the genadapter evaluation method does
            reread = ga.read(text, reread)
        for k in state.S:
            torch.testing.assert_close(state.S[k][e], reread.S[k][0], rtol=1e-5, atol=1e-6)
        assert state.n[e] == reread.n[0]


def test_tiny_model_learns_qa_through_the_state():
    """One fact per episode (name -> value); held-out episodes must be answered from the context:
    with the right state far below chance, with another episode's state far above it."""
    names, values, filler = range(10, 60), range(60, 68), range(70, 120)

    def episode(rng: random.Random) -> EncodedEpisode:
        name, value = rng.choice(names), rng.choice(values)
        f = [rng.choice(filler) for _ in range(5)]
        return EncodedEpisode([[f[0], name, 5, value], f[1:]], [[2, name, 6]], [[value]], [])

    def batch(eps: list[EncodedEpisode]) -> dict:
        return collate_episodes(eps, [0] * len(eps), chunk_len=4, pad_id=0)

    torch.manual_seed(0)
    ga = GenerativeAdapter.from_base(
        tiny_model("llama", init_range=0.5), GeneratorConfig(r=16, r_in=16, chunk_len=4)
    )
    opt = torch.optim.AdamW(ga.generator.parameters(), lr=0.01)
    rng = random.Random(0)
    for _ in range(400):  # a plateau at chance (format learnt) comes first, then injection
        loss = answer_losses(ga, batch([episode(rng) for _ in range(16)]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = [episode(random.Random(10_000 + i)) for i in range(32)]
    swapped = [
        EncodedEpisode(a.chunks, b.prompts, b.answers, [])
        for a, b in zip(held_out, held_out[1:] + held_out[:1], strict=True)
    ]
    with torch.no_grad():
        right = answer_losses(ga, batch(held_out), with_base=True)
        wrong = answer_losses(ga, batch(swapped))["loss"].item()
    chance = math.log(len(values))
    assert right["loss"].item() < 0.25 * chance < chance < right["row_loss_base"].mean().item()
    assert wrong > chance  # the answer comes from the context, not from a learned prior


def test_retrieval_loss_matches_a_float64_recomputation(tiny_dir):
    """`answer_context` marks the context tokens that spell each answer; `retrieval_loss` equals
    a recomputation from its definition: queries A x hooked at the question's last token of an
    adapted forward, keys K applied to windowed means of the frozen LM's hidden states."""
    from transformers import AutoTokenizer

    from genadapter.generator import rms_normalize

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = tiny_model("llama", vocab=len(tok), dtype=torch.float64)
    cfg = GeneratorConfig(r=4, r_in=4, chunk_len=4, keys=KeyConfig(window=3), dtype="float64")
    ga = GenerativeAdapter.from_base(model, cfg, tokenizer=tok)
    for block in ga.generator.blocks.values():
        torch.nn.init.normal_(block.B)
    raw = [qa_episode(i) for i in range(3)]
    raw[0]["context"].append("Person9 lives in Lima. Lima, Lima!")  # answers stated twice or more
    raw[0]["qas"][0]["answers"] = ["Lima"]
    raw[1]["qas"].append({"question": "Who?", "answers": ["nobody at all"]})  # never stated
    episodes = [read_episode(d) for d in raw]
    encoded = [encode_episode(e, PromptFormat(tok), chunk_len=4) for e in episodes]
    batch = collate_episodes(encoded, [0, 0, 0], chunk_len=4, pad_id=0)
    flat_ids = batch["context_ids"].flatten(1)
    answers = [qa.answers[0] for e in episodes for qa in e.qas]
    for row, (where, answer) in enumerate(
        zip(batch["answer_context"].flatten(1), answers, strict=True)
    ):
        e = int(batch["row_episode"][row])
        stated = sum(text.count(answer) for text in episodes[e].context_texts())
        assert stated >= (3 if row == 0 else 0)
        spelled = tok.decode(flat_ids[e, where]).replace(" ", "")
        assert spelled == answer.replace(" ", "") * stated
    out = probe_losses(ga, batch, retrieval="softmax")
    assert out["retrieval_rows"].tolist() == [
        r for r, a in enumerate(answers) if a != "nobody at all"
    ]

    queries: dict[str, torch.Tensor] = {}

    def capture(name: str):  # the query of the prompt's last token: A x at module `name`
        A = ga.generator[name].A
        return lambda module, args, y: queries.__setitem__(name, args[0][0, -1] @ A.T)

    losses, hits, shares = [], [], []
    for row in out["retrieval_rows"].tolist():
        e = int(batch["row_episode"][row])
        state = ga.new_state(1)
        for text in episodes[e].context_texts():
            state = ga.read(text, state)
        hooks = [
            ga.base_model.get_submodule(n).register_forward_hook(capture(n))
            for n in ga.generator.names
        ]
        prompt = encoded[e].prompts[row - int((batch["row_episode"] < e).sum())]
        with torch.no_grad():
            ga(torch.tensor([prompt]), state=state)
        for h in hooks:
            h.remove()
        keys = {name: [] for name in ga.generator.names}
        for chunk, mask in zip(batch["context_ids"][e], batch["context_mask"][e], strict=True):
            n = int(mask.sum())
            if n:
                hidden = model(chunk[None, :n], output_hidden_states=True).hidden_states
            for t in ga.generator.targets:
                h = rms_normalize(hidden[t.layer][0]) if n else None
                for i in range(4):  # the key of token i: the mean over its last 3 tokens
                    k = (
                        h[max(0, i - 2) : i + 1].mean(0) @ ga.generator[t.name].K.T
                        if i < n
                        else None
                    )
                    keys[t.name].append(k)
        gold = batch["answer_context"][row].flatten()
        real = [i for i, k in enumerate(keys[ga.generator.names[0]]) if k is not None]
        for name in ga.generator.names:
            scores = torch.stack([keys[name][i] @ queries[name] for i in real]) / 2.0  # sqrt(r_in)
            p = scores.softmax(0)
            losses.append(-p[gold[real]].sum().log())
            hits.append(float(gold[real][scores.argmax()]))
            shares.append(scores.abs()[gold[real]].sum() / scores.abs().sum())
    torch.testing.assert_close(
        out["retrieval_loss"], torch.stack(losses).mean().detach(), rtol=1e-9, atol=1e-9
    )
    n_targets = len(ga.generator.names)
    expected_hits = torch.tensor(hits, dtype=torch.float64).view(-1, n_targets).mean(1)
    torch.testing.assert_close(out["retrieval_hit"].double(), expected_hits)
    expected_shares = torch.stack(shares).view(-1, n_targets).mean(1)
    torch.testing.assert_close(out["retrieval_share"], expected_shares.detach())
    share = probe_losses(ga, batch, retrieval="share")
    expected_share_loss = -torch.stack(shares).log().mean().detach()
    torch.testing.assert_close(share["retrieval_loss"], expected_share_loss, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="one of \\('softmax', 'share'\\)"):
        probe_losses(ga, batch, retrieval="cosine")
    out["retrieval_loss"].backward()  # trains the match directly: K and A get gradients
    for block in ga.generator.blocks.values():
        assert block.K.grad.abs().sum() > 0 and block.A.grad.abs().sum() > 0


@pytest.mark.parametrize("oracle", ["episode", "row"])
def test_oracle_writes_state_holds_only_the_asked_answers(tiny_dir, oracle):
    """With `oracle_writes`, a row's state is the sum of k_t (V h_t)^T over the context tokens
    that spell an answer asked of its episode ("episode") or its own answer ("row"); windowed
    keys still see every token. Each row's answer loss equals a float64 recomputation through
    `ga(...)` with that state; so do the gate-supervision figures (per episode)."""
    from transformers import AutoTokenizer

    from genadapter import AdapterState
    from genadapter.generator import rms_normalize

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = tiny_model("llama", vocab=len(tok), dtype=torch.float64)
    cfg = GeneratorConfig(
        r=4, r_in=4, chunk_len=4, keys=KeyConfig(window=2, gate=True), dtype="float64"
    )
    ga = GenerativeAdapter.from_base(model, cfg, tokenizer=tok)
    for block in ga.generator.blocks.values():
        torch.nn.init.normal_(block.B)
        torch.nn.init.normal_(block.G)
    raw = [qa_episode(i) for i in range(2)]
    raw[1]["context"].append("Person7 lives in Oslo.")  # a stated value nobody asks for
    encoded = [encode_episode(read_episode(d), PromptFormat(tok), chunk_len=4) for d in raw]
    batch = collate_episodes(encoded, [0, 0], chunk_len=4, pad_id=0)
    out = probe_losses(ga, oracle_writes(batch, "episode"), gate=True)
    if oracle == "row":  # (the gate figures are those of "episode": one per row-episode here)
        out.update(
            {
                k: v
                for k, v in answer_losses(ga, oracle_writes(batch, "row")).items()
                if not k.startswith("gate")
            }
        )
    asked = torch.zeros_like(batch["context_mask"], dtype=torch.bool)
    for row, e in enumerate(batch["row_episode"].tolist()):
        asked[e] |= batch["answer_context"][row]
    gate_terms = {}  # (episode, target) -> [(logit, asked)] per real context token
    for row, e in enumerate(batch["row_episode"].tolist()):
        gate_terms = {k: v for k, v in gate_terms.items() if k[0] != e}  # each episode once
        S = {name: torch.zeros(4, 4, dtype=torch.float64) for name in ga.generator.names}
        writes = asked[e] if oracle == "episode" else batch["answer_context"][row]
        chunks = zip(
            batch["context_ids"][e], batch["context_mask"][e], writes, asked[e], strict=True
        )
        for chunk, mask, write, stated in chunks:
            n = int(mask.sum())
            if not n:
                continue
            hidden = model(chunk[None, :n], output_hidden_states=True).hidden_states
            for t in ga.generator.targets:
                block, h = ga.generator[t.name], rms_normalize(hidden[t.layer][0])
                for i in range(n):
                    z = h[i] @ block.G
                    gate_terms.setdefault((e, t.name), []).append((z, bool(stated[i])))
                    if write[i]:
                        gate = 2 * torch.sigmoid(h[i] @ block.G)
                        k = gate * h[max(0, i - 1) : i + 1].mean(0) @ block.K.T
                        S[t.name] += torch.outer(k, block.V @ h[i])
        n_tokens = batch["context_mask"][e].sum().to(torch.float64)[None]
        state = AdapterState(
            {k: v[None] for k, v in S.items()},
            n_tokens,
            ga.generator.fingerprint(),
            ga.config.to_dict(),
        )
        length = int(batch["attention_mask"][row].sum())
        ids, target = batch["input_ids"][row, :length], batch["loss_mask"][row, :length]
        with torch.no_grad():
            logits = ga(ids[None], state=state).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
        expected = nll[target[1:].bool()].mean()
        # (the cross-entropy runs in float32 there)
        torch.testing.assert_close(
            out["row_loss"][row].detach().double(), expected, rtol=1e-5, atol=1e-6
        )
    assert out["loss"] != answer_losses(ga, batch)["loss"]  # the other tokens did write before
    # gate supervision: a class-balanced BCE of the gate logits, answer tokens on, the rest off
    losses, opened = [], []
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for name in ga.generator.names:  # each class's tokens pooled over the batch's episodes
        terms = [term for (_, n), ts in gate_terms.items() if n == name for term in ts]
        z = torch.stack([z for z, _ in terms])
        on = torch.tensor([a for _, a in terms])
        losses.append(bce(z[on], torch.ones_like(z[on])) + bce(z[~on], torch.zeros_like(z[~on])))
        for e in range(2):
            z = torch.stack([z for z, a in gate_terms[e, name] if a])
            opened.append((2 * torch.sigmoid(z)).mean())
    torch.testing.assert_close(out["gate_loss"].double(), torch.stack(losses).mean().detach())
    n_targets = len(ga.generator.names)
    torch.testing.assert_close(
        out["gate_on"].double(), torch.stack(opened).view(n_targets, 2).mean(0).detach()
    )
    episodes = batch["row_episode"].tolist()
    assert out["gate_rows"].tolist() == [episodes.index(e) for e in (0, 1)]
    out["gate_loss"].backward()
    assert all(block.G.grad.abs().sum() > 0 for block in ga.generator.blocks.values())
    with pytest.raises(ValueError, match="one of \\('episode', 'row'\\) or None"):
        oracle_writes(batch, "all")
    with pytest.raises(ValueError, match="keys.gate"):
        probe_losses(
            GenerativeAdapter.from_base(
                model, GeneratorConfig(r=4, r_in=4, chunk_len=4), tokenizer=tok
            ),
            batch,
            gate=True,
        )
    del batch["answer_context"]
    with pytest.raises(ValueError, match="needs `answer_context`"):
        oracle_writes(batch, oracle)
    with pytest.raises(ValueError, match="needs `answer_context`"):
        probe_losses(ga, batch, gate=True)


def test_finetune_resume_is_exact_and_validation_reports_gaps(tmp_path, tiny_dir, episode_files):
    straight, _ = fit(config(tmp_path / "a", tiny_dir, episode_files))
    config(tmp_path / "b", tiny_dir, episode_files, max_steps=3)
    first, _ = fit(tmp_path / "b" / "cfg.yaml")
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "last.ckpt"
    assert set(SafetensorsCheckpointIO().load_checkpoint(ckpt)["state_dict"]) == set(
        first.ga.generator_state_dict()
    )
    resumed, _ = fit(config(tmp_path / "b", tiny_dir, episode_files), "--ckpt_path", str(ckpt))
    for k, v in straight.ga.generator_state_dict().items():
        assert torch.equal(v, resumed.ga.generator_state_dict()[k]), k
    # a checkpoint on the way exports as a generator folder that from_pretrained loads
    out = export_checkpoint(ckpt, tmp_path / "exported")
    loaded = GenerativeAdapter.from_pretrained(out, base_model=str(tiny_dir))
    assert loaded.generator.fingerprint() == resumed.ga.generator.fingerprint()  # last.ckpt: step 6
    # validation: answer NLL without / with the state / with the context in the prompt, per task
    model, trainer = fit(
        config(
            tmp_path / "c",
            tiny_dir,
            episode_files,
            max_steps=1,
            limit_val_batches=1.0,
            val_check_interval=1,
        )
    )
    m = trainer.callback_metrics
    cached = trainer.validate(model, datamodule=trainer.datamodule, verbose=False)[0]
    model._references.clear()  # the frozen base's losses, kept since the first validation
    fresh = trainer.validate(model, datamodule=trainer.datamodule, verbose=False)[0]
    assert cached.keys() == fresh.keys() and cached == pytest.approx(fresh, rel=1e-6)
    for task in (
        f"{episode_files['qa'].parent.name}/qa",
        f"{episode_files['qa'].parent.name}/demo",
    ):
        assert {f"val/{task}/loss_{w}" for w in ("base", "adapted", "prompt")} <= set(m), sorted(m)
    assert 0 <= m[f"val/{episode_files['demo'].parent.name}/demo/choice"] <= 1  # labels are ranked
    lines = (tmp_path / "a" / "run" / "csv" / "metrics.csv").read_text()
    assert "train/answer_loss" in lines and "train/lm_loss" in lines  # both kinds of batch ran
    assert all(f"train/{k}_loss" in lines for k in ("rank", "retrieval", "gate", "distill"))
    assert m[f"val/{episode_files['qa'].parent.name}/qa/distill_kl"] > 0
    for what in ("retrieval_hit", "retrieval_share"):
        assert 0 <= m[f"val/{episode_files['qa'].parent.name}/qa/{what}"] <= 1
    for what in ("gate_on", "gate_off"):  # the gate 2 sigmoid(z) lies in (0, 2)
        assert 0 < m[f"val/{episode_files['qa'].parent.name}/qa/{what}"] < 2


def test_candidates_are_ranked_as_evaluation_ranks_options(tiny_dir):
    """Candidate rows: gold first, then the distractors the context mentions; each candidate's
    score in the training pass equals the evaluation method's `score_options` after `read`."""
    from transformers import AutoTokenizer

    from genadapter.eval.methods import GenAdapterMethod
    from genadapter.training.instruct_data import question_candidates
    from genadapter.training.objectives import rank_candidates

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ga = GenerativeAdapter.from_base(
        tiny_model("llama", vocab=len(tok)),
        GeneratorConfig(r=4, r_in=4, chunk_len=4),
        tokenizer=tok,
    )
    for block in ga.generator.blocks.values():
        torch.nn.init.normal_(block.B)
    d = qa_episode(0)
    gold = d["qas"][0]["answers"][0]
    a, b, c, e = [x for x in CITIES if x != gold][:4]
    d["context"].append(f"Person99 lives in {a}. Person98 lives in {b}.")
    d["qas"][0]["options"] = [c, b, gold, a, e]
    job = d["qas"][1]["answers"][0]
    d["qas"][1]["options"] = [job, next(j for j in JOBS if j != job)]
    episode = read_episode(d)
    assert question_candidates(episode, 4)[0] == [gold, b, a, c]  # in-context distractors first
    assert question_candidates(episode, 0) == [[], []]
    batch = collate_episodes(
        [encode_episode(episode, PromptFormat(tok), 4, rank_options=4)], [0], 4, 0
    )
    assert batch["cand_row"].tolist() == [0, 0, 0, 0, 1, 1]
    with torch.no_grad():
        out = answer_losses(ga, batch)
        plain = answer_losses(ga, batch, with_ranking=False)
        method = GenAdapterMethod(ga).adapt(episode.context_texts())
        expected = [
            method.score_options(qa.question, c)
            for qa, c in zip(episode.qas, question_candidates(episode, 4), strict=True)
        ]
    torch.testing.assert_close(out["row_loss"], plain["row_loss"])  # candidates change nothing else
    scores = torch.tensor([s for group in expected for s in group])
    manual = -torch.stack([torch.tensor(g).log_softmax(0)[0] for g in expected]).mean()
    torch.testing.assert_close(out["rank_loss"], manual, rtol=1e-4, atol=1e-5)
    ranked = rank_candidates(scores, batch["cand_row"])
    assert ranked["rank_correct"].tolist() == [float(max(g) == g[0]) for g in expected]
    torch.testing.assert_close(ranked["rank_loss"], manual)
    out = answer_losses(ga, batch)  # prompts of unequal length: the left padding stays masked
    (out["loss"] + out["rank_loss"]).backward()
    grads = [p.grad for p in ga.generator.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        rank_candidates(torch.zeros(3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_losses(ga, {**batch, "loss_mask": torch.zeros_like(batch["loss_mask"])})


def test_finetune_bad_inputs(tmp_path, tiny_dir, episode_files, capsys):
    with pytest.raises(FileNotFoundError, match="make-benchmarks"):
        FinetuneDataModule(train_files={str(tmp_path / "missing.jsonl"): 1.0})
    with pytest.raises(ValueError, match="train_files is empty"):
        FinetuneDataModule(train_files={})
    with pytest.raises(ValueError, match="weights"):
        FinetuneDataModule(train_files={str(episode_files["qa"]): -1.0})
    cfg = config(tmp_path, tiny_dir, episode_files)
    text = cfg.read_text().replace(
        str(episode_files["demo"]) + ": 1.0", str(tmp_path / "nope.jsonl") + ": 1.0"
    )
    cfg.write_text(text)
    assert main(["--config", str(cfg)]) == 2
    assert "episode file not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="retrieval_kind"):
        GeneratorFinetuning(base_model=str(tiny_dir), retrieval_kind="dot")
    with pytest.raises(ValueError, match="keys.gate: true"):
        GeneratorFinetuning(base_model=str(tiny_dir), gate_weight=1.0)
    with pytest.raises(ValueError, match="distill_span must be one of"):
        GeneratorFinetuning(base_model=str(tiny_dir), distill_span="hidden")
    no_prompts = config(tmp_path / "d", tiny_dir, episode_files)
    no_prompts.write_text(no_prompts.read_text().replace("train_context_prompts: true", ""))
    with pytest.raises(ValueError, match="data.train_context_prompts: true"):
        fit(no_prompts)


@pytest.mark.parametrize("span", ["answer", "question"])
def test_distillation_is_the_kl_from_the_prompted_teacher(tiny_dir, span):
    """`distill_loss` equals a float64 recomputation row by row, unpadded: the teacher is the
    frozen LM on context prompt + answer, the student `ga(prompt + answer, state=read(context))`;
    the KL is taken where the student predicts an answer token (with span "question" also the
    tokens the two prompts end with: the question and the chat template after it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = tiny_model("llama", vocab=len(tok), dtype=torch.float64)
    cfg = GeneratorConfig(r=4, r_in=4, chunk_len=4, dtype="float64")
    ga = GenerativeAdapter.from_base(model, cfg, tokenizer=tok)
    for block in ga.generator.blocks.values():
        torch.nn.init.normal_(block.B)
    episodes = [read_episode(qa_episode(i)) for i in range(3)]
    fmt = PromptFormat(tok)
    encoded = [encode_episode(e, fmt, 4, with_context_prompts=True) for e in episodes]
    lengths = [
        len(p) + len(a)
        for e in encoded
        for p, a in zip(e.prompts_with_context, e.answers, strict=True)
    ]
    batch = collate_episodes(encoded, [0, 0, 0], 4, 0, max_prompt_len=max(lengths))
    out = answer_losses(ga, batch, distill=span)
    kls, counts = [], []
    for e, enc in zip(episodes, encoded, strict=True):
        state = ga.new_state(1)
        for text in e.context_texts():
            state = ga.read(text, state)
        for prompt, teacher_prompt, answer in zip(
            enc.prompts, enc.prompts_with_context, enc.answers, strict=True
        ):
            with torch.no_grad():
                teacher = model(torch.tensor([teacher_prompt + answer])).logits[0].log_softmax(-1)
                student = ga(torch.tensor([prompt + answer]), state=state).logits[0].log_softmax(-1)
            shared = 0
            while prompt[-1 - shared] == teacher_prompt[-1 - shared]:
                shared += 1
            n = len(answer) + (min(shared, len(prompt) - 1) if span == "question" else 0)
            assert shared > len(tok(e.qas[0].question[:4]).input_ids)  # the question is in it
            t, s = teacher[-n - 1 : -1], student[-n - 1 : -1]
            kls.append((t.exp() * (t - s)).sum())
            counts.append(n)
    expected = torch.stack(kls).sum() / sum(counts)
    torch.testing.assert_close(out["distill_loss"].detach(), expected, rtol=1e-9, atol=1e-12)
    assert out["distill_row_tokens"].tolist() == counts
    assert expected > 0
    # the teacher's answer NLL is the prompt's answer loss (row_losses on the context prompts)
    s, n = row_losses(
        model, *(batch[f"prompt_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
    )
    torch.testing.assert_close(out["teacher_row_loss"].float(), s / n)  # row_losses: float32
    # only the rows whose context prompt fits the window are distilled
    few = collate_episodes(encoded, [0, 0, 0], 4, 0, max_prompt_len=min(lengths))
    assert 0 < len(few["prompt_rows"]) < len(batch["prompt_rows"])
    assert len(answer_losses(ga, few, distill=span)["distill_row_tokens"]) == len(
        few["prompt_rows"]
    )
    out["distill_loss"].backward()  # the student's side of the KL trains the generator
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in (b.A for b in ga.generator.blocks.values())
    )
    with pytest.raises(ValueError, match="distill span"):
        answer_losses(ga, batch, distill="hidden")
