"""`genadapter serve` over loopback with a real HTTP client: routes, validation, persistence,
and concurrent requests that never observe a half-updated state."""

from __future__ import annotations

import errno
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch
from stream_helpers import DOCS, assert_close, read_all

from genadapter import AdapterState
from genadapter.serve import make_server

pytest_plugins = ["stream_fixtures"]  # fixtures: gen_dirs, gen_dir, ga


@contextmanager
def serving(ga, state_dir, **kw):
    server = make_server(ga, state_dir, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as client:
            yield client
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_read_generate_state_and_persistence(ga, tmp_path):
    with serving(ga, tmp_path) as client:
        r = client.post("/read", json={"tenant": "alice", "texts": DOCS[:2]})
        assert r.status_code == 200, r.text
        assert r.json()["documents_read"] == 2
        r = client.post("/read", json={"tenant": "alice", "text": DOCS[2]})
        info = client.get("/state", params={"tenant": "alice"}).json()
        expected = read_all(ga, DOCS[:3])
        assert info["documents"] == 3 and info["tokens"] == expected.n.item()
        assert info["generator"] == ga.generator.fingerprint() and info["bytes"] == expected.nbytes
        assert client.get("/state", params={"tenant": "bob"}).json()["tokens"] == 0
        r = client.post(
            "/generate", json={"tenant": "alice", "prompt": "Where?", "max_new_tokens": 3}
        )
        assert r.status_code == 200, r.text
        assert r.json()["text"] == ga.generate(
            "Where?", state=expected, max_new_tokens=3, chat=True
        )
    assert_close(AdapterState.load(tmp_path / "alice.safetensors"), expected)
    with serving(ga, tmp_path) as client:  # a restarted server continues from disk
        client.post("/read", json={"tenant": "alice", "text": DOCS[3]})
        assert client.get("/state", params={"tenant": "alice"}).json()["documents"] == 4
    assert_close(AdapterState.load(tmp_path / "alice.safetensors"), read_all(ga, DOCS[:4]))


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/read", {"tenant": "../etc", "text": "x"}, 400),
        ("POST", "/read", {"tenant": ".hidden", "text": "x"}, 400),
        ("POST", "/read", {"tenant": "a/b", "text": "x"}, 400),
        ("POST", "/read", {"tenant": "a" * 65, "text": "x"}, 400),
        ("POST", "/read", {"tenant": 7, "text": "x"}, 400),
        ("POST", "/read", {"tenant": "ok"}, 400),
        ("POST", "/read", {"tenant": "ok", "text": "x", "texts": ["y"]}, 400),
        ("POST", "/read", {"tenant": "ok", "texts": ["x", 3]}, 400),
        ("POST", "/read", {"tenant": "ok", "texts": []}, 400),
        ("POST", "/read", ["not", "an", "object"], 400),
        ("POST", "/generate", {"tenant": "ok"}, 400),
        ("POST", "/generate", {"tenant": "ok", "prompt": "hi", "max_new_tokens": 0}, 400),
        ("POST", "/generate", {"tenant": "ok", "prompt": "hi", "chat": "yes"}, 400),
        ("GET", "/state?tenant=a%2Fb", None, 400),
        ("GET", "/state", None, 400),
        ("GET", "/nope", None, 404),
        ("POST", "/nope", {}, 404),
        ("GET", "/read", None, 405),
    ],
)
def test_bad_requests(ga, tmp_path, method, path, body, status):
    with serving(ga, tmp_path) as client:
        r = (
            client.request(method, path, json=body)
            if body is not None
            else client.request(method, path)
        )
        assert r.status_code == status and "error" in r.json()
        assert client.get("/health").json()["ok"]  # still serving
    assert not any(tmp_path.iterdir())  # nothing written by a refused request


def test_malformed_json_oversize_body_and_foreign_state(ga, gen_dirs, tmp_path):
    with serving(ga, tmp_path, max_body=1024) as client:
        r = client.post(
            "/read",
            content=b'{"tenant": "x", "text": ',
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        r = client.post("/read", json={"tenant": "x", "text": "y" * 5000})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        assert client.get("/health").status_code == 200
        # a tenant whose file was written by another generator: a clear conflict, file untouched
        other = read_all(ga, DOCS[:1])
        other.generator = "0123456789abcdef"
        other.save(tmp_path / "carol.safetensors")
        before = (tmp_path / "carol.safetensors").read_bytes()
        r = client.post("/read", json={"tenant": "carol", "text": "hello"})
        assert r.status_code == 409 and "0123456789abcdef" in r.json()["error"]
        assert (tmp_path / "carol.safetensors").read_bytes() == before


def test_concurrent_requests_never_see_half_updated_state(ga, tmp_path):
    doc = DOCS[0]
    k = read_all(ga, [doc]).n.item()  # tokens of one document
    writers, reads_each = 4, 4
    stop = threading.Event()
    observed: list[tuple[float, int]] = []

    def write(client: httpx.Client) -> None:
        for _ in range(reads_each):
            r = client.post("/read", json={"tenant": "shared", "text": doc})
            assert r.status_code == 200, r.text
            observed.append((r.json()["tokens"], r.json()["documents"]))

    def poll(client: httpx.Client) -> None:
        while not stop.is_set():
            info = client.get("/state", params={"tenant": "shared"}).json()
            observed.append((info["tokens"], info["documents"]))

    def ask(client: httpx.Client) -> None:
        r = client.post("/generate", json={"tenant": "shared", "prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 200, r.text

    with serving(ga, tmp_path) as client, ThreadPoolExecutor(8) as pool:
        pollers = [pool.submit(poll, client) for _ in range(2)]
        jobs = [pool.submit(write, client) for _ in range(writers)]
        jobs += [pool.submit(ask, client) for _ in range(2)]
        for job in jobs:
            job.result(timeout=120)
        stop.set()
        for job in pollers:
            job.result(timeout=30)
        final = client.get("/state", params={"tenant": "shared"}).json()
    total = writers * reads_each
    assert final["documents"] == total and final["tokens"] == total * k
    assert len(observed) > total
    for tokens, documents in observed:  # tokens and documents always from the same whole state
        assert tokens == documents * k and 0 <= documents <= total
    on_disk = AdapterState.load(tmp_path / "shared.safetensors")
    assert on_disk.n.item() == total * k
    one = read_all(ga, [doc])
    for name, s in on_disk.S.items():
        torch.testing.assert_close(s, one.S[name] * total, rtol=1e-4, atol=1e-4)


def test_full_disk_is_507_and_state_unchanged(ga, tmp_path, monkeypatch):
    import genadapter.state

    with serving(ga, tmp_path) as client:
        assert client.post("/read", json={"tenant": "d", "text": DOCS[0]}).status_code == 200
        before = (tmp_path / "d.safetensors").read_bytes()

        def no_space(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(genadapter.state, "save_file", no_space)
        r = client.post("/read", json={"tenant": "d", "text": DOCS[1]})
        assert r.status_code == 507 and "disk full" in r.json()["error"]
        assert client.get("/state", params={"tenant": "d"}).json()["documents"] == 1
    assert (tmp_path / "d.safetensors").read_bytes() == before
