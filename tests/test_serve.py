"""`genadapter serve` on loopback, driven by the real `openai` client and raw HTTP: the OpenAI
routes with each caller's state, authentication per tenant, batched decoding equal to solo
decoding, durability under concurrent reads, and hostile input. Servers are real uvicorn
servers on free ports (in a thread; the crash test kills a real subprocess)."""

from __future__ import annotations

import argparse
import errno
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from openai import AuthenticationError, OpenAI
from stream_helpers import DOCS, assert_close, read_all

from genadapter import AdapterState, GenerativeAdapter
from genadapter.cli import main as cli_main
from genadapter.serve import add_arguments, build
from genadapter.serve.keys import add_key
from genadapter.serve.transport import make_server

pytest_plugins = ["stream_fixtures"]  # fixtures: gen_dirs, gen_dir, ga
TENANTS = ["alice", "bob", "carol", "dave"]
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Running:
    url: str
    keys: dict[str, str]
    service: object
    state_dir: Path

    def http(self, tenant: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def openai(self, tenant: str) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=self.keys[tenant], max_retries=0)


@pytest.fixture
def keys_file(tmp_path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "keys.json"
    return path, {t: add_key(path, t) for t in TENANTS}


@contextmanager
def serving(ga, tmp_path, keys_file, *flags: str):
    """A real uvicorn server in a thread, with the CLI's defaults unless `flags` say otherwise."""
    path, keys = keys_file
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    state_dir = tmp_path / "states"
    args = parser.parse_args(["--keys-file", str(path), "--state-dir", str(state_dir), *flags])
    service, app = build(ga, args)
    server, sock = make_server(app, "127.0.0.1", 0, args.head_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    port = sock.getsockname()[1]
    try:
        yield Running(f"http://127.0.0.1:{port}", keys, service, state_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.scheduler.close()


def chat(client: OpenAI, question: str, **kw) -> str:
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    r = client.chat.completions.create(
        model="genadapter", messages=[{"role": "user", "content": question}], **kw
    )
    return r.choices[0].message.content


# --- the OpenAI API ----------------------------------------------------------------------------
def test_openai_client_chat_completions_and_streaming(ga, tmp_path, keys_file):
    with serving(ga, tmp_path, keys_file) as srv, srv.http("alice") as alice:
        r = alice.post("/v1/read", json={"texts": DOCS[:2]})
        assert r.status_code == 200 and r.json()["documents_read"] == 2, r.text
        state = read_all(ga, DOCS[:2])
        client = srv.openai("alice")
        assert [m.id for m in client.models.list()] == ["genadapter"]
        assert client.models.retrieve("genadapter").id == "genadapter"

        want = ga.generate("Where is it?", state=state, max_new_tokens=6, chat=True)
        r = client.chat.completions.create(
            model="genadapter",
            messages=[{"role": "user", "content": "Where is it?"}],
            max_tokens=6,
            temperature=0,
        )
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
        # bob's key: the same question, bob's (empty) state: the base model's answer
        assert chat(srv.openai("bob"), "Where is it?") == ga.generate(
            "Where is it?", max_new_tokens=6, chat=True
        )
        assert want != ga.generate("Where is it?", max_new_tokens=6, chat=True)

        stream = client.chat.completions.create(
            model="genadapter",
            messages=[{"role": "user", "content": "Where is it?"}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert len(deltas) > 2 and "".join(deltas) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 6

        plain = ga.generate("The tower", state=state, max_new_tokens=5, chat=False)
        r = client.completions.create(
            model="genadapter", prompt="The tower", max_tokens=5, temperature=0
        )
        assert r.choices[0].text == plain
        parts = client.completions.create(
            model="genadapter", prompt="The tower", max_tokens=5, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in parts) == plain


def test_stop_strings_sampling_and_seed(ga, tmp_path, keys_file):
    with serving(ga, tmp_path, keys_file) as srv:
        client = srv.openai("alice")
        full = chat(client, "Say something", max_tokens=12)
        stop = full[len(full) // 2 : len(full) // 2 + 3]  # a piece from the middle of the answer
        assert stop.strip()
        r = client.chat.completions.create(
            model="genadapter",
            messages=[{"role": "user", "content": "Say something"}],
            max_tokens=12,
            temperature=0,
            stop=[stop],
        )
        assert r.choices[0].message.content == full[: full.index(stop)]
        assert r.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(
            model="genadapter",
            messages=[{"role": "user", "content": "Say something"}],
            max_tokens=12,
            temperature=0,
            stop=stop,
            stream=True,
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]
        )
        a = chat(client, "Hi", max_tokens=8, temperature=1.0, seed=7)
        b = chat(client, "Hi", max_tokens=8, temperature=1.0, seed=7)
        c = chat(client, "Hi", max_tokens=8, temperature=1.0, seed=8)
        assert a == b and a != c  # a seed makes sampling reproducible


def test_batched_rows_equal_the_same_request_alone(ga, tmp_path, keys_file):
    questions = ["Where?", "Tell me about the ocean, please.", "Hi", "What did Ada write?"]
    # a long gather window: the tiny model decodes a request in milliseconds, so requests
    # arriving from 8 threads would otherwise rarely overlap
    with serving(ga, tmp_path, keys_file, "--gather-ms", "300") as srv:
        for i, tenant in enumerate(TENANTS):
            with srv.http(tenant) as h:
                assert h.post("/v1/read", json={"text": DOCS[i]}).status_code == 200
        alone = [
            chat(srv.openai(t), q, max_tokens=5 + 3 * i)
            for i, (t, q) in enumerate(zip(TENANTS, questions, strict=True))
        ]
        sched = srv.service.scheduler
        steps, rows = sched.steps, sched.rows
        clients = {t: srv.openai(t) for t in TENANTS}
        with ThreadPoolExecutor(8) as pool:  # each tenant twice, all at once
            jobs = [
                pool.submit(chat, clients[t], q, max_tokens=5 + 3 * i)
                for _ in range(2)
                for i, (t, q) in enumerate(zip(TENANTS, questions, strict=True))
            ]
            together = [j.result(timeout=120) for j in jobs]
        assert together == alone * 2
        assert (sched.rows - rows) / (sched.steps - steps) > 1.5  # rows really shared forwards
    for i, q in enumerate(questions):  # and the decode loop is HF's greedy generate
        want = ga.generate(q, state=read_all(ga, [DOCS[i]]), max_new_tokens=5 + 3 * i, chat=True)
        assert alone[i] == want


def test_a_client_that_goes_away_frees_its_row(ga, tmp_path, keys_file):
    with serving(ga, tmp_path, keys_file) as srv, srv.http() as anon:
        stream = srv.openai("alice").chat.completions.create(
            model="genadapter",
            messages=USER,
            max_tokens=400,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream)), next(iter(stream))
        stream.close()  # long before its 400 tokens
        deadline = time.time() + 10
        before = anon.get("/health").json()["tokens"]
        while time.time() < deadline:
            time.sleep(0.2)
            now = anon.get("/health").json()["tokens"]
            if now == before:
                break  # nothing decodes any more
            before = now
        assert now == before < 400


# --- authentication ----------------------------------------------------------------------------
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"prompt": "hi"}),
    ("POST", "/v1/read", {"text": "a secret"}),
    ("GET", "/v1/state", None),
    ("DELETE", "/v1/state", None),
    ("GET", "/v1/state/export", None),
]


def test_auth_no_key_wrong_key_revoked_key_other_tenant(ga, tmp_path, keys_file, capsys):
    path, keys = keys_file
    assert all(k not in path.read_text() for k in keys.values())  # only hashes on disk
    with serving(ga, tmp_path, keys_file) as srv, srv.http() as anon:
        for method, route, body in ROUTES:
            for headers in (
                {},
                {"Authorization": "Bearer ga-wrong"},
                {"Authorization": keys["alice"]},
            ):
                r = anon.request(method, route, json=body, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert not srv.state_dir.exists() or not any(srv.state_dir.iterdir())
        with srv.http("alice") as alice, srv.http("bob") as bob:
            assert alice.post("/v1/read", json={"text": DOCS[0]}).status_code == 200
            # bob cannot name alice: a "tenant" field is just ignored, bob reads into bob
            r = bob.post("/v1/read", json={"text": DOCS[1], "tenant": "alice"})
            assert r.status_code == 200 and r.json()["documents"] == 1
            assert bob.get("/v1/state", params={"tenant": "alice"}).json()["tenant"] == "bob"
            assert alice.get("/v1/state").json()["documents"] == 1
            bob_export = AdapterState.load(save(tmp_path / "b.st", bob.get("/v1/state/export")))
            assert_close(bob_export, read_all(ga, [DOCS[1]]))
            assert bob.delete("/v1/state").json()["documents"] == 0
            assert alice.get("/v1/state").json()["documents"] == 1  # bob reset only bob

            assert cli_main(["keys", "revoke", "alice", "--keys-file", str(path)]) == 0
            assert alice.get("/v1/state").status_code == 401  # at once, no restart
            with pytest.raises(AuthenticationError):
                srv.openai("alice").models.list()
            assert bob.get("/v1/state").status_code == 200
        assert srv.http().get("/health").json()["ok"]  # the one route without a key
    capsys.readouterr()
    assert cli_main(["keys", "add", "erin", "--keys-file", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and printed.startswith("ga-")
    assert cli_main(["keys", "add", "../x", "--keys-file", str(path)]) == 2


def save(path: Path, response: httpx.Response) -> Path:
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    return path


@pytest.mark.parametrize("pooled", [False, True])
def test_rows_joining_a_running_batch_decode_as_alone(ga, pooled):
    """A request that arrives while another decodes joins at a step boundary (its KV cache
    concatenated, left-padded), and both still decode exactly as HF's generate does alone;
    with pooled queries too, whose windows follow the rows (`PooledFeatures.joined`)."""
    from conftest import randomize_generator

    from genadapter.serve.scheduler import Job, Scheduler
    from genadapter.serve.store import FairLock

    if pooled:
        config = ga.config.replace(queries={"window": 6, "layer": 0})
        ga = GenerativeAdapter.from_base(ga.base_model, config, tokenizer=ga.tokenizer)
        randomize_generator(ga, std=1.0)
    tok = ga.tokenizer
    states = [read_all(ga, [DOCS[i]]) for i in range(3)]
    prompts = ["Tell me everything about the ocean", "Hi", "What did Ada write? Briefly."]
    lengths = [60, 7, 15]
    sched = Scheduler(ga, FairLock(), gather_ms=0)
    done = [threading.Event() for _ in prompts]
    started = threading.Event()
    texts: list[list[str]] = [[] for _ in prompts]

    def emitter(i: int):
        def emit(kind: str, *payload) -> None:
            if kind == "delta":
                texts[i].append(payload[0])
                started.set()
            else:
                assert kind == "done", payload
                done[i].set()

        return emit

    try:
        for i, (p, s, n) in enumerate(zip(prompts, states, lengths, strict=True)):
            text = tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
            sched.submit(Job(ids, s, n, emitter(i)))
            started.wait(30)  # the first row is decoding before the next one arrives
        assert all(d.wait(60) for d in done)
    finally:
        sched.close()
    assert sched.rows > sched.steps
    for i, (p, s, n) in enumerate(zip(prompts, states, lengths, strict=True)):
        assert "".join(texts[i]) == ga.generate(p, state=s, max_new_tokens=n, chat=True)


# --- durability --------------------------------------------------------------------------------
def test_eight_concurrent_readers_of_one_tenant_lose_nothing(ga, tmp_path, keys_file):
    doc = DOCS[0]
    k = read_all(ga, [doc]).n.item()  # tokens of one document
    readers, reads_each = 8, 3
    stop = threading.Event()
    acked: list[int] = []
    observed: list[tuple[float, int]] = []

    def read(srv: Running, i: int) -> None:
        with srv.http("alice") as h:
            for j in range(reads_each):
                texts = [doc] * (1 + (i + j) % 2)  # one or two documents a request
                r = h.post("/v1/read", json={"texts": texts})
                assert r.status_code == 200, r.text
                acked.append(r.json()["documents_read"])
                observed.append((r.json()["tokens"], r.json()["documents"]))

    def poll(srv: Running) -> None:
        with srv.http("alice") as h:
            while not stop.is_set():
                info = h.get("/v1/state").json()
                observed.append((info["tokens"], info["documents"]))

    def ask(srv: Running) -> None:
        assert chat(srv.openai("alice"), "hi", max_tokens=3) is not None

    with serving(ga, tmp_path, keys_file) as srv, ThreadPoolExecutor(12) as pool:
        pollers = [pool.submit(poll, srv) for _ in range(2)]
        jobs = [pool.submit(read, srv, i) for i in range(readers)]
        jobs += [pool.submit(ask, srv) for _ in range(2)]
        for job in jobs:
            job.result(timeout=120)
        stop.set()
        for job in pollers:
            job.result(timeout=30)
        with srv.http("alice") as h:
            final = h.get("/v1/state").json()
    total = sum(acked)
    assert len(acked) == readers * reads_each
    assert final["documents"] == total and final["tokens"] == total * k
    for tokens, documents in observed:  # tokens and documents always of one whole state
        assert tokens == documents * k and 0 <= documents <= total
    on_disk = AdapterState.load(srv.state_dir / "alice.safetensors")
    assert on_disk.n.item() == total * k
    one = read_all(ga, [doc])
    for name, s in on_disk.S.items():
        torch.testing.assert_close(s, one.S[name] * total, rtol=1e-4, atol=1e-4)


def test_sigkill_mid_load_keeps_every_acknowledged_read(gen_dir, tmp_path, keys_file):
    import os
    import signal
    import subprocess
    import sys

    path, keys = keys_file
    state_dir = tmp_path / "states"
    cmd = [sys.executable, "-m", "genadapter.cli", "serve", "--generator", str(gen_dir)]
    cmd += ["--state-dir", str(state_dir), "--keys-file", str(path), "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()
        assert line.startswith("serving "), line
        return proc, line.split(" on ")[1].strip()

    proc, url = start()
    acked, stop = [], threading.Event()

    def load(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['alice']}"}) as h:
            while not stop.is_set():
                try:
                    r = h.post("/v1/read", json={"texts": DOCS[i : i + 2]}, timeout=30)
                except httpx.HTTPError:
                    return  # the server died under this request: not acknowledged
                assert r.status_code == 200, r.text
                acked.append(r.json()["documents_read"])

    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(load, i) for i in range(4)]
            while len(acked) < 12:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            stop.set()
            for job in jobs:
                job.result(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    survived = AdapterState.load(state_dir / "alice.safetensors")  # valid after the kill
    assert not [
        p for p in state_dir.iterdir() if p.suffix != ".safetensors" and not p.name.startswith(".")
    ]
    proc, url = start()
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['alice']}"}) as h:
            documents = h.get("/v1/state").json()["documents"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # every acknowledged read is there; at most the 4 in flight (2 documents each) beyond them
    assert sum(acked) <= documents <= sum(acked) + 4 * 2
    assert survived.metadata["sources"]["http"]["documents"] == documents


def test_full_disk_is_507_and_state_unchanged(ga, tmp_path, keys_file, monkeypatch):
    import genadapter.state

    with serving(ga, tmp_path, keys_file) as srv, srv.http("dave") as h:
        assert h.post("/v1/read", json={"text": DOCS[0]}).status_code == 200
        before = (srv.state_dir / "dave.safetensors").read_bytes()

        def no_space(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(genadapter.state, "save_file", no_space)
        r = h.post("/v1/read", json={"text": DOCS[1]})
        assert r.status_code == 507 and "disk full" in r.json()["error"]["message"]
        assert h.get("/v1/state").json()["documents"] == 1
    assert (srv.state_dir / "dave.safetensors").read_bytes() == before


def test_state_of_another_generator_is_409_and_untouched(ga, tmp_path, keys_file):
    state_dir = tmp_path / "states"
    state_dir.mkdir()
    other = read_all(ga, DOCS[:1])
    other.generator = "0123456789abcdef"
    other.save(state_dir / "carol.safetensors")
    before = (state_dir / "carol.safetensors").read_bytes()
    with serving(ga, tmp_path, keys_file) as srv, srv.http("carol") as h:
        r = h.post("/v1/read", json={"text": "hello"})
        assert r.status_code == 409 and "0123456789abcdef" in r.json()["error"]["message"]
        assert h.get("/v1/state").status_code == 409
    assert (state_dir / "carol.safetensors").read_bytes() == before


def test_export_reset_and_restart(ga, tmp_path, keys_file):
    with serving(ga, tmp_path, keys_file) as srv, srv.http("alice") as h:
        empty = AdapterState.load(save(tmp_path / "e.st", h.get("/v1/state/export")))
        assert empty.n.item() == 0 and empty.generator == ga.generator.fingerprint()
        h.post("/v1/read", json={"texts": DOCS[:3]})
        exported = AdapterState.load(save(tmp_path / "a.st", h.get("/v1/state/export")))
        assert_close(exported, read_all(ga, DOCS[:3]))
        assert h.get("/v1/state").json()["bytes"] == exported.nbytes
    with serving(ga, tmp_path, keys_file) as srv, srv.http("alice") as h:  # continues from disk
        assert h.post("/v1/read", json={"text": DOCS[3]}).json()["documents"] == 4
        assert_close(AdapterState.load(srv.state_dir / "alice.safetensors"), read_all(ga, DOCS[:4]))
        r = h.delete("/v1/state")
        assert r.status_code == 200 and r.json()["documents"] == 0 and r.json()["tokens"] == 0
        assert not (srv.state_dir / "alice.safetensors").exists()
        assert chat(srv.openai("alice"), "Where?") == ga.generate(
            "Where?", max_new_tokens=6, chat=True
        )


# --- hostile input -----------------------------------------------------------------------------
BAD = [  # (method, route, body: JSON-able or raw bytes, status)
    ("POST", "/v1/read", b'{"text": ', 400),
    ("POST", "/v1/read", b'\xff\xfe{"text": "x"}', 400),
    ("POST", "/v1/read", b'{"text": "\xc3\x28"}', 400),
    ("POST", "/v1/read", b'{"text": "\\ud800"}', 400),
    ("POST", "/v1/read", b"[1, 2]", 400),
    ("POST", "/v1/read", b"[" * 1000 + b"]" * 1000, 400),  # nested too deeply
    ("POST", "/v1/read", b'{"texts": ["ok", ' + b"[" * 800 + b"]" * 800 + b"]}", 400),
    ("POST", "/v1/read", b"", 400),
    ("POST", "/v1/read", {"text": ""}, 400),
    ("POST", "/v1/read", {"texts": []}, 400),
    ("POST", "/v1/read", {"texts": ["ok", "  "]}, 400),
    ("POST", "/v1/read", {"texts": ["x", 3]}, 400),
    ("POST", "/v1/read", {"text": 5}, 400),
    ("POST", "/v1/read", {}, 400),
    ("POST", "/v1/read", {"text": "x", "texts": ["y"]}, 400),
    ("POST", "/v1/read", {"text": "y" * 5000}, 413),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400),
    ("POST", "/v1/chat/completions", {"messages": []}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 5000}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": "5"}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2.5}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "temperature": -1}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "stream": "yes"}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "stop": list("abcde")}, 400),
    ("POST", "/v1/chat/completions", {"messages": USER, "n": 2}, 400),
    ("POST", "/v1/completions", {}, 400),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400),
    ("POST", "/v1/completions", {"prompt": ""}, 400),
    ("POST", "/v1/completions", {"prompt": "w " * 600}, 400),  # over the 512-token window
    ("GET", "/v1/nope", None, 404),
    ("POST", "/read", {"tenant": "alice", "text": "x"}, 404),  # the old routes are gone
    ("POST", "/v1/models", {}, 405),
    ("PUT", "/v1/read", {"text": "x"}, 405),
    ("GET", "/v1/read", None, 405),
]


def test_hostile_input_is_4xx_json_and_changes_nothing(ga, tmp_path, keys_file):
    with (
        serving(ga, tmp_path, keys_file, "--max-body-bytes", "2048") as srv,
        srv.http("alice") as h,
    ):
        for method, route, body, status in BAD:
            raw = body if isinstance(body, bytes) else None
            r = h.request(
                method,
                route,
                content=raw,
                json=None if raw is not None or body is None else body,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == status, (method, route, body, r.text)
            assert r.json()["error"]["message"], r.text
        assert not srv.state_dir.exists() or not any(srv.state_dir.iterdir())  # nothing written
        assert h.get("/v1/state").json()["documents"] == 0
        assert chat(srv.openai("alice"), "hi", max_tokens=2) is not None  # still serving


def exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send `data` (maybe an incomplete request), then read until the server closes."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def test_idle_and_slow_clients_time_out(ga, tmp_path, keys_file):
    flags = ("--head-timeout", "0.5", "--body-timeout", "0.5")
    with serving(ga, tmp_path, keys_file, *flags) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        start = time.monotonic()
        for data in (b"", b"POST /v1/read HTTP/1.1\r\nHost: x\r\n"):  # idle, then slow headers
            reply = exchange(port, data)
            assert reply.startswith(b"HTTP/1.1 408") and b'"error"' in reply
        auth = f"Authorization: Bearer {srv.keys['alice']}\r\n".encode()
        head = b"POST /v1/read HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n" + auth + b"\r\n"
        reply = exchange(port, head + b'{"text": "')  # a body that never ends
        assert reply.startswith(b"HTTP/1.1 408")
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]
        assert time.monotonic() - start < 10
        with srv.http("alice") as h:
            assert h.get("/v1/state").json()["documents"] == 0


def test_serve_help_shows_a_session(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = capsys.readouterr().out
    for piece in ("keys add alice", "--keys-file", "curl", "/v1/read", "OpenAI(base_url="):
        assert piece in out


@pytest.mark.real
def test_real_model_rows_of_four_tenants_decode_as_alone(tmp_path, keys_file):
    """On SmolLM2 and a trained generator (30 layers: where padding numerics would show), rows
    that join a running batch at different steps give HF's greedy tokens exactly."""
    from genadapter import GenerativeAdapter
    from genadapter.assets import is_complete, smollm2_dir

    if not is_complete(smollm2_dir()):
        pytest.fail("offline SmolLM2 assets missing: run `make assets`")
    root = Path(__file__).resolve().parents[1]
    ga = GenerativeAdapter.from_pretrained(root / "experiments/finetune/smollm2-instruct-generator")
    docs = ["Ann's cat is called Miso.", "Ben keeps the lighthouse on Rona.", DOCS[3], DOCS[6]]
    prompts = ["The history of Paris began", "Once upon a time, a keeper", "My recipe is", "In"]
    with serving(ga, tmp_path, keys_file) as srv:
        for tenant, doc in zip(TENANTS, docs, strict=True):
            with srv.http(tenant) as h:
                assert h.post("/v1/read", json={"text": doc}).status_code == 200

        def complete(i: int) -> str:
            time.sleep(0.05 * i)  # arrive while the others decode
            r = srv.openai(TENANTS[i]).completions.create(
                model="genadapter", prompt=prompts[i], max_tokens=24, temperature=0
            )
            return r.choices[0].text

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(complete, range(4)))
        sched = srv.service.scheduler
        assert sched.rows > sched.steps  # rows shared forwards
    for i, prompt in enumerate(prompts):
        state = read_all(ga, [docs[i]])
        assert got[i] == ga.generate(prompt, state=state, max_new_tokens=24, chat=False)
