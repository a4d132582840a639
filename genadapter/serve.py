"""`genadapter serve`: an HTTP API on localhost, one state per tenant, persisted to disk.

    POST /read      {"tenant": "alice", "text": "..."} or {"tenant": ..., "texts": ["...", ...]}
    POST /generate  {"tenant": "alice", "prompt": "...", "max_new_tokens": 64, "chat": true}
    GET  /state?tenant=alice   -> tokens read, documents, bytes, generator
    GET  /health

Consistency: a read takes the tenant's lock, computes a new state from the current one,
saves it atomically, then swaps the reference; other requests only ever see a whole state
(old or new). One model lock serialises all model compute, since a state is applied through
forward hooks that would otherwise leak into a concurrent forward. Standard library only.
Errors are JSON {"error": ...}: 400 bad request, 404 unknown route or tenant file,
405 wrong method, 409 state of another generator, 411/413 missing or oversize body,
507 disk full.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from .state import AdapterState, StateMismatchError
from .stream.checkpoint import CheckpointError, save_checkpoint, source_progress, total_documents
from .stream.reader import StreamReader
from .stream.sources import Record, field_text

TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SOURCE = "http"
MAX_BODY = 4 * 2**20
MAX_TEXTS = 1024
MAX_NEW_TOKENS = 1024


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_tenant(tenant: Any) -> str:
    """Tenant ids name files: letters, digits, `_.-`, not starting with a dot, 1-64 chars."""
    if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
        raise HTTPError(400, "tenant must be 1-64 of [A-Za-z0-9_.-], starting with a letter/digit")
    return tenant


class TenantStore:
    """States per tenant: loaded lazily, replaced whole, saved before they are published."""

    def __init__(self, ga, state_dir: str | Path):
        self.ga = ga
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.states: dict[str, AdapterState] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._registry = threading.Lock()
        self.model_lock = threading.Lock()

    def path(self, tenant: str) -> Path:
        return self.dir / f"{tenant}.safetensors"

    def lock(self, tenant: str) -> threading.Lock:
        with self._registry:
            return self._locks.setdefault(tenant, threading.Lock())

    def get(self, tenant: str) -> AdapterState:
        """The tenant's current state (a snapshot: never modified after it is published)."""
        state = self.states.get(tenant)
        if state is not None:
            return state
        with self.lock(tenant):
            return self._current(tenant)

    def _current(self, tenant: str) -> AdapterState:
        """The state, loaded on first use; the caller holds the tenant's lock."""
        if tenant not in self.states:
            self.states[tenant] = self._load(tenant)
        return self.states[tenant]

    def _load(self, tenant: str) -> AdapterState:
        path = self.path(tenant)
        if not path.exists():
            return self.ga.new_state()
        try:
            state = AdapterState.load(path)
            self.ga.check_state(state, 1)
        except StateMismatchError as e:
            raise HTTPError(
                409, f"state of tenant {tenant!r} was read by another generator: {e}"
            ) from e
        except ValueError as e:
            raise HTTPError(409, f"state of tenant {tenant!r} is unreadable: {e}") from e
        return state

    def read(self, tenant: str, texts: list[str]) -> dict[str, Any]:
        with self.lock(tenant):
            current = self._current(tenant)
            start = source_progress(current.metadata, SOURCE)["position"]
            reader = StreamReader(self.ga, current, SOURCE, start=start, batch_size=8)
            records = [
                Record(start + i, *field_text({"text": t}, "text")) for i, t in enumerate(texts)
            ]
            with self.model_lock:
                new = reader.run(records)
            try:
                save_checkpoint(new, self.path(tenant))
            except CheckpointError as e:
                raise HTTPError(507, str(e)) from e
            self.states[tenant] = new  # the swap: readers see the old or the new state, whole
        stats = reader.stats
        return {
            "tenant": tenant,
            "documents_read": stats.documents,
            "tokens_read": stats.tokens,
            "skipped": stats.skipped,
            **self.info(tenant, new),
        }

    def generate(self, tenant: str, prompt: str, max_new_tokens: int, chat: bool) -> dict[str, Any]:
        state = self.get(tenant)
        start = time.perf_counter()
        with self.model_lock:
            text = self.ga.generate(prompt, state=state, max_new_tokens=max_new_tokens, chat=chat)
        return {
            "tenant": tenant,
            "text": text,
            "seconds": round(time.perf_counter() - start, 3),
            "state_tokens": float(state.n.sum()),
        }

    def info(self, tenant: str, state: AdapterState | None = None) -> dict[str, Any]:
        state = self.get(tenant) if state is None else state
        return {
            "tenant": tenant,
            "tokens": float(state.n.sum()),
            "documents": total_documents(state.metadata),
            "bytes": state.nbytes,
            "generator": state.generator,
        }


def _field(body: dict, name: str, kind: type, default: Any = None, required: bool = False) -> Any:
    if name not in body:
        if required:
            raise HTTPError(400, f"missing field {name!r}")
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HTTPError(400, f"field {name!r} must be {kind.__name__}")
    return value


def make_handler(store: TenantStore, max_body: int = MAX_BODY, quiet: bool = True) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            if not quiet:
                super().log_message(format, *args)

        def send_json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> dict[str, Any]:
            length = self.headers.get("Content-Length")
            if length is None:
                raise HTTPError(411, "Content-Length required")
            try:
                length = int(length)
            except ValueError as e:
                raise HTTPError(400, "bad Content-Length") from e
            if length > max_body:
                raise HTTPError(413, f"body of {length} bytes is over the limit of {max_body}")
            data = self.rfile.read(length)
            self.body_read = True
            try:
                body = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"body is not valid JSON: {e}") from e
            if not isinstance(body, dict):
                raise HTTPError(400, "body must be a JSON object")
            return body

        def handle_request(self, method: str) -> None:
            url = urlparse(self.path)
            self.body_read = False
            routes = {"/read": "POST", "/generate": "POST", "/state": "GET", "/health": "GET"}
            try:
                if url.path not in routes:
                    raise HTTPError(404, f"no route {url.path}")
                if method != routes[url.path]:
                    raise HTTPError(405, f"{url.path} takes {routes[url.path]}")
                self.send_json(200, getattr(self, "route_" + url.path[1:])(url))
            except HTTPError as e:
                if method == "POST" and not self.body_read:
                    self.close_connection = True  # an unread body must not be taken for a request
                self.send_json(e.status, {"error": str(e)})
            except Exception as e:  # a bug: say so, keep serving
                self.close_connection = True
                print(f"error: {method} {url.path}: {e!r}", file=sys.stderr)
                self.send_json(500, {"error": f"internal error: {type(e).__name__}"})

        def do_GET(self) -> None:
            self.handle_request("GET")

        def do_POST(self) -> None:
            self.handle_request("POST")

        def route_health(self, url) -> dict[str, Any]:
            return {"ok": True, "generator": store.ga.generator.fingerprint()}

        def route_state(self, url) -> dict[str, Any]:
            tenant = check_tenant(parse_qs(url.query).get("tenant", [None])[0])
            return store.info(tenant)

        def route_read(self, url) -> dict[str, Any]:
            body = self.body()
            tenant = check_tenant(body.get("tenant"))
            if ("text" in body) == ("texts" in body):
                raise HTTPError(400, "give exactly one of 'text' or 'texts'")
            texts = [_field(body, "text", str)] if "text" in body else _field(body, "texts", list)
            if not texts or len(texts) > MAX_TEXTS or not all(isinstance(t, str) for t in texts):
                raise HTTPError(400, f"'texts' must be 1-{MAX_TEXTS} strings")
            return store.read(tenant, texts)

        def route_generate(self, url) -> dict[str, Any]:
            body = self.body()
            tenant = check_tenant(body.get("tenant"))
            prompt = _field(body, "prompt", str, required=True)
            max_new = _field(body, "max_new_tokens", int, 64)
            if not prompt.strip() or not 1 <= max_new <= MAX_NEW_TOKENS:
                raise HTTPError(
                    400, f"need a non-empty prompt and 1 <= max_new_tokens <= {MAX_NEW_TOKENS}"
                )
            return store.generate(tenant, prompt, max_new, _field(body, "chat", bool, True))

    return Handler


def make_server(
    ga,
    state_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    max_body: int = MAX_BODY,
    quiet: bool = True,
) -> ThreadingHTTPServer:
    """A server bound to (host, port); port 0 picks a free one (`server.server_address`)."""
    server = ThreadingHTTPServer(
        (host, port), make_handler(TenantStore(ga, state_dir), max_body, quiet)
    )
    server.daemon_threads = True
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .stream.common import add_generator_arguments

    add_generator_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--state-dir", default="states", help="one <tenant>.safetensors per tenant")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY)
    parser.add_argument("--log", action="store_true", help="log every request")


def run(args: argparse.Namespace) -> int:
    from .stream.common import CLIError, load_adapter

    try:
        ga = load_adapter(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    server = make_server(
        ga, args.state_dir, args.host, args.port, args.max_body_bytes, not args.log
    )
    host, port = server.server_address[:2]
    print(f"serving generator {ga.generator.fingerprint()} on http://{host}:{port}", flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()  # every state is already on disk: each read saves before it swaps
    return 0
