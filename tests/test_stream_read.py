"""`genadapter read` and the state commands on a tiny random model: exactness of streaming,
batching and resume; bad input; full disk; SIGKILL mid-checkpoint; stdin behind `tail -f`."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stream_helpers import DOCS, assert_close, jsonl, read_all

import genadapter.state
from genadapter import AdapterState
from genadapter.cli import main
from genadapter.stream.chat import converse, prompt_ids
from genadapter.stream.checkpoint import source_progress
from genadapter.stream.reader import StreamReader
from genadapter.stream.sources import Record, skip_records

pytest_plugins = ["stream_fixtures"]  # fixtures: gen_dirs, gen_dir, ga
REPO = Path(__file__).resolve().parents[1]


def records(docs: list[str]) -> list[Record]:
    return [Record(i, d) for i, d in enumerate(docs)]


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def progress(path: Path) -> dict:
    state = AdapterState.load(path)
    (key,) = state.metadata["sources"]
    return source_progress(state.metadata, key)


# --- the reader ---------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [None, 0.8])
def test_batched_reading_equals_one_by_one(ga, decay):
    reference = read_all(ga, DOCS, decay)
    for batch in (1, 3, 16):
        reader = StreamReader(ga, ga.new_state(), "k", decay=decay, batch_size=batch)
        state = reader.run(records(DOCS))
        assert_close(state, reference)
        assert source_progress(state.metadata, "k")["documents"] == len(DOCS)
        # no autograd graph kept across documents (it would grow with the stream)
        assert not state.n.requires_grad and not any(s.requires_grad for s in state.S.values())


def test_stop_and_resume_is_exact(ga):
    reference = read_all(ga, DOCS)
    seen = []
    reader = StreamReader(ga, ga.new_state(), "k", batch_size=3)
    first = reader.run(
        records(DOCS),
        on_commit=lambda s, st: seen.append(st.documents),
        should_stop=lambda: bool(seen) and seen[-1] >= 4,
    )
    done = source_progress(first.metadata, "k")["position"]
    assert 4 <= done < len(DOCS)
    resumed = StreamReader(ga, first, "k", start=done, batch_size=3)
    state = resumed.run(skip_records(iter(records(DOCS)), done))
    assert_close(state, reference)
    assert source_progress(state.metadata, "k") == {
        "position": len(DOCS),
        "documents": len(DOCS),
        "tokens": int(reference.n.item()),
        "skipped": {},
    }


def test_long_documents_are_read_in_segments(ga):
    doc = " ".join(f"word{i % 97} and more" for i in range(600))
    reader = StreamReader(ga, ga.new_state(), "k", segment_chunks=2)  # many small segments
    state = reader.run(records(["a short one", doc, "another short one"]))
    assert_close(state, read_all(ga, ["a short one", doc, "another short one"]), tol=1e-3)


def test_megabyte_document(ga):
    doc = " ".join(["internationalization"] * 50_000)  # 1 MB
    assert len(doc.encode()) > 2**20
    n_tokens = len(ga.tokenizer(doc, add_special_tokens=False)["input_ids"])
    calls = []
    original = ga.read

    def spy(inputs, state=None, **kw):
        calls.append(sum(len(r) for r in inputs))
        return original(inputs, state, **kw)

    chunk_len, ga.config.chunk_len = ga.config.chunk_len, 256  # fewer forwards: a faster test
    ga.read = spy
    try:
        reader = StreamReader(ga, ga.new_state(), "k", segment_chunks=16)
        state = reader.run(records(["a short one", doc]))
    finally:
        del ga.read
        ga.config.chunk_len = chunk_len
    assert max(calls) <= 16 * 256 and len(calls) > 10  # bounded segments
    assert state.n.item() == n_tokens + ga.read("a short one").n.item()
    assert source_progress(state.metadata, "k")["tokens"] == state.n.item()


# --- the read command ---------------------------------------------------------------------------
def test_read_bad_input_is_counted_and_state_stays_valid(ga, gen_dir, tmp_path, capsys):
    good = DOCS[:3]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "caf\xe9"}',
        b'{"text": "broken',
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": ""}).encode(),
        bytes(range(256)).replace(b"\n", b""),
        json.dumps({"text": good[1]}).encode(),
        json.dumps({"text": good[2]}).encode(),
    ]
    data = tmp_path / "docs.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    state_path = tmp_path / "s.safetensors"
    assert (
        cli(
            "read",
            "--generator",
            gen_dir,
            "--state",
            state_path,
            "--input",
            data,
            "--format",
            "jsonl",
            "--batch-size",
            "2",
            "--quiet",
        )
        == 0
    )
    err = capsys.readouterr().err
    for reason in ("invalid_utf8", "malformed_json", "missing_field", "empty", "binary"):
        assert f"({reason})" in err
    state = AdapterState.load(state_path)
    assert_close(state, read_all(ga, good))
    p = progress(state_path)
    assert (p["position"], p["documents"]) == (8, 3)
    assert p["skipped"] == {
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "empty": 1,
        "binary": 1,
    }


def test_read_resume_and_rerun(ga, gen_dir, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS[:4]) + "\n")
    state_path = tmp_path / "s.safetensors"
    args = ["read", "--generator", gen_dir, "--state", state_path, "--input", data, "--quiet"]
    assert cli(*args) == 0
    assert progress(state_path)["documents"] == 4
    with data.open("a") as f:  # the file grows; --resume reads only the new documents
        f.write("\n" + "\n\n".join(DOCS[4:]) + "\n")
    assert cli(*args, "--resume") == 0
    assert "after 4 records" in capsys.readouterr().err
    assert_close(AdapterState.load(state_path), read_all(ga, DOCS))
    assert progress(state_path)["documents"] == len(DOCS)
    assert cli(*args, "--resume") == 0  # nothing new: unchanged
    assert progress(state_path)["documents"] == len(DOCS)
    assert cli(*args) == 0  # without --resume: read again, counted again
    assert "already read" in capsys.readouterr().err
    assert progress(state_path)["documents"] == 2 * len(DOCS)


def test_state_of_another_generator_is_refused(gen_dirs, tmp_path, capsys):
    a, b = gen_dirs
    data = jsonl(tmp_path / "d.jsonl", DOCS[:2])
    state_path = tmp_path / "s.safetensors"
    assert (
        cli(
            "read",
            "--generator",
            a,
            "--state",
            state_path,
            "--input",
            data,
            "--format",
            "jsonl",
            "--quiet",
        )
        == 0
    )
    before = state_path.read_bytes()
    capsys.readouterr()
    code = cli("read", "--generator", b, "--state", state_path, "--input", data, "--quiet")
    err = capsys.readouterr().err
    fingerprint = AdapterState.load(state_path).generator
    assert code == 2 and "another generator" in err and fingerprint in err
    assert state_path.read_bytes() == before
    assert cli("ask", "--generator", b, "--state", state_path, "hello") == 2
    (tmp_path / "junk.safetensors").write_bytes(b"not a state at all")
    assert cli("ask", "--generator", a, "--state", tmp_path / "junk.safetensors", "hi") == 2
    assert "not a genadapter state file" in capsys.readouterr().err


def test_full_disk_keeps_old_state(gen_dir, tmp_path, monkeypatch, capsys):
    data = jsonl(tmp_path / "d.jsonl", DOCS)
    state_path = tmp_path / "s.safetensors"
    args = [
        "read",
        "--generator",
        gen_dir,
        "--state",
        state_path,
        "--input",
        data,
        "--format",
        "jsonl",
        "--quiet",
    ]
    assert cli(*args) == 0
    before = state_path.read_bytes()

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(genadapter.state, "save_file", no_space)
    capsys.readouterr()
    assert cli(*args, "--checkpoint-every", "2") == 1
    err = capsys.readouterr().err
    assert "disk full" in err and "intact" in err and "Traceback" not in err
    assert state_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "s.safetensors"]


def _wait_for(predicate, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


KILL_DRIVER = """
import os, sys, time
import genadapter.state as st
original, calls = st.save_file, [0]
def hanging_save(tensors, path, metadata=None):
    calls[0] += 1
    original(tensors, path, metadata=metadata)
    if calls[0] == int(os.environ["HANG_ON_SAVE"]):  # half-written temporary file, then hang
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        open(os.environ["HANG_MARKER"], "w").write(path)
        time.sleep(600)
st.save_file = hanging_save
from genadapter.cli import main
sys.exit(main(sys.argv[1:]))
"""


def env() -> dict[str, str]:
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_during_checkpoint_then_resume(ga, gen_dir, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", DOCS)
    state_path = tmp_path / "s.safetensors"
    marker = tmp_path / "hanging"
    args = [
        "read",
        "--generator",
        gen_dir,
        "--state",
        state_path,
        "--input",
        data,
        "--format",
        "jsonl",
        "--checkpoint-every",
        "2",
        "--batch-size",
        "1",
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DRIVER, *map(str, args)],
        env={**env(), "HANG_ON_SAVE": "3", "HANG_MARKER": str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(marker.exists, proc=proc)  # the third checkpoint (6 documents) is mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    leftover = Path(marker.read_text())
    assert leftover.exists() and leftover.parent == tmp_path  # the half-written temporary file
    # the previous checkpoint (4 documents) is intact and exact
    assert_close(AdapterState.load(state_path), read_all(ga, DOCS[:4]))
    assert progress(state_path)["position"] == 4
    assert cli(*args, "--resume") == 0
    assert_close(AdapterState.load(state_path), read_all(ga, DOCS))
    assert progress(state_path)["documents"] == len(DOCS)


@pytest.mark.slow
def test_stdin_is_read_as_it_arrives_and_sigterm_saves(ga, gen_dir, tmp_path):
    state_path = tmp_path / "s.safetensors"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "genadapter.cli",
            "read",
            "--generator",
            str(gen_dir),
            "--state",
            str(state_path),
            "--input",
            "-",
            "--format",
            "jsonl",
            "--checkpoint-every",
            "1",
            "--batch-size",
            "4",
            "--quiet",
        ],
        env=env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def position() -> int:
        try:
            return progress(state_path)["position"]
        except (FileNotFoundError, ValueError):
            return 0

    try:
        proc.stdin.write((json.dumps({"text": DOCS[0]}) + "\n").encode())
        proc.stdin.flush()
        _wait_for(lambda: position() == 1, proc=proc)  # read without EOF, batch not full
        proc.stdin.write(b"{not json\n" + (json.dumps({"text": DOCS[1]}) + "\n").encode())
        proc.stdin.flush()
        _wait_for(lambda: position() == 3, proc=proc)
        proc.send_signal(signal.SIGTERM)  # blocked on stdin: must still stop at once
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert code == 0, err
    assert "stopped by SIGTERM" in err
    assert_close(AdapterState.load(state_path), read_all(ga, DOCS[:2]))
    assert progress(state_path)["skipped"] == {"malformed_json": 1}


# --- merge, export, ask, chat -------------------------------------------------------------------
def test_merge_states(ga, gen_dirs, tmp_path, capsys):
    a, b = gen_dirs
    paths = []
    for i, (gen, docs) in enumerate([(a, DOCS[:3]), (a, DOCS[3:]), (b, DOCS[:1])]):
        paths.append(tmp_path / f"s{i}.safetensors")
        assert (
            cli(
                "read",
                "--generator",
                gen,
                "--state",
                paths[-1],
                "--input",
                jsonl(tmp_path / f"d{i}.jsonl", docs),
                "--format",
                "jsonl",
                "--quiet",
            )
            == 0
        )
    out = tmp_path / "merged.safetensors"
    assert cli("merge-states", paths[0], paths[1], "-o", out) == 0
    merged = AdapterState.load(out)
    assert_close(merged, read_all(ga, DOCS))
    keys = merged.metadata["sources"]
    assert sum(source_progress(merged.metadata, k)["documents"] for k in keys) == len(DOCS)
    capsys.readouterr()
    assert cli("merge-states", paths[0], paths[2], "-o", tmp_path / "bad.safetensors") == 2
    err = capsys.readouterr().err
    assert "different generators" in err and str(paths[2]) in err
    assert not (tmp_path / "bad.safetensors").exists()


def test_export_lora_ask_and_chat(ga, gen_dir, tmp_path, capsys):
    state_path = tmp_path / "s.safetensors"
    data = jsonl(tmp_path / "d.jsonl", DOCS[:3])
    assert (
        cli(
            "read",
            "--generator",
            gen_dir,
            "--state",
            state_path,
            "--input",
            data,
            "--format",
            "jsonl",
            "--quiet",
        )
        == 0
    )
    out = tmp_path / "lora"
    assert cli("export-lora", "--generator", gen_dir, "--state", state_path, "-o", out) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == ga.config.r and (out / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert (
        cli(
            "ask",
            "--generator",
            gen_dir,
            "--state",
            state_path,
            "Where is the tower?",
            "--max-new-tokens",
            "4",
        )
        == 0
    )
    captured = capsys.readouterr()
    state = AdapterState.load(state_path)
    expected = ga.generate("Where is the tower?", state=state, max_new_tokens=4, chat=True)
    assert captured.out.strip() == expected.strip()
    assert " s; state: " in captured.err and "3 documents" in captured.err


def test_chat_loop_multi_turn_reset_and_quit(ga, tmp_path):
    import io

    state = read_all(ga, DOCS[:2])
    out = io.StringIO()
    lines = io.StringIO("hello\n\n/state\nsecond question\n/reset\nthird\n/quit\nnever asked\n")
    assert converse(ga, state, lines, out, max_new_tokens=3, system=None) == 3
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and "(conversation reset)" in text
    assert "(state: " in text
    # multi-turn: the second prompt holds the first exchange; a tight budget drops it
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    ]
    full = ga.tokenizer.decode(prompt_ids(ga.tokenizer, messages, 10_000)[0])
    assert "first" in full and "reply" in full and "second" in full
    short_ids = prompt_ids(
        ga.tokenizer, messages, len(prompt_ids(ga.tokenizer, messages[2:], 999)[0])
    )
    short = ga.tokenizer.decode(short_ids[0])
    assert "first" not in short and "second" in short


def test_generator_defaults_to_the_committed_headline(ga, gen_dir, tmp_path, monkeypatch):
    """No --generator and no --base: the committed headline generator (here stood in for by a
    tiny one); both, or neither with no committed generator, are refused by name."""
    from genadapter.assets import default_generator
    from genadapter.stream import common

    assert (default_generator() / "generator_config.json").is_file()
    monkeypatch.setattr(common, "default_generator", lambda: Path(gen_dir))
    args = argparse.Namespace(generator=None, base=None, seed=0)
    loaded = common.load_adapter(args)
    assert args.generator == Path(gen_dir)
    assert loaded.new_state().generator == ga.new_state().generator  # gen_dir's fingerprint
    with pytest.raises(common.CLIError, match="not both"):
        common.load_adapter(argparse.Namespace(generator=str(gen_dir), base="x", seed=0))
    monkeypatch.setattr(common, "default_generator", lambda: tmp_path / "missing")
    with pytest.raises(common.CLIError, match="no --generator DIR or --base MODEL given"):
        common.load_adapter(argparse.Namespace(generator=None, base=None, seed=0))
