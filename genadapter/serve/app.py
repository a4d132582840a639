"""The HTTP routes (FastAPI): OpenAI's chat and completions, and the genadapter state routes.

Every route but /health authenticates: the bearer key alone selects the tenant, so a request
cannot name, and so cannot reach, another tenant's state. Errors are OpenAI-shaped JSON
{"error": {"message", "type", "param", "code"}} with a 4xx status for anything the client did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .keys import KeyStore
from .scheduler import Job, Scheduler
from .schemas import ChatRequest, CompletionRequest, ReadRequest, Sampling
from .store import ServeError, TenantStore

MODEL = "genadapter"  # the model name clients pass (any name is accepted)
MAX_BODY = 4 * 2**20
BODY_TIMEOUT = 10.0  # seconds for a whole request body to arrive


@dataclass
class Service:
    ga: Any
    keys: KeyStore
    store: TenantStore
    scheduler: Scheduler
    max_body: int = MAX_BODY
    body_timeout: float = BODY_TIMEOUT


def error(status: int, message: str, kind: str = "invalid_request_error", code: Any = None):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    # a body left unread (too slow, too big) must not be taken for the next request
    headers = {"Connection": "close"} if status in (408, 413) else {}
    headers |= {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="genadapter", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_exception_handler(ServeError, lambda r, e: error(e.status, str(e), e.kind))
    app.add_exception_handler(HTTPException, lambda r, e: error(e.status_code, http_message(r, e)))
    app.add_exception_handler(RequestValidationError, lambda r, e: error(400, str(e)))
    app.add_exception_handler(Exception, lambda r, e: error(500, internal(e), "server_error"))
    add_routes(app, service)
    return app


def http_message(request: Request, e: HTTPException) -> str:
    if e.status_code == 404:
        return f"no route {request.url.path}"
    if e.status_code == 405:
        return f"{request.url.path} does not take {request.method}"
    return str(e.detail)


def internal(e: Exception) -> str:
    print(f"error: {e!r}", file=sys.stderr, flush=True)  # a bug: say so in the log, keep serving
    return f"internal error: {type(e).__name__}"


def tenant_of(request: Request) -> str:
    """The caller's tenant, from `Authorization: Bearer KEY` (401 otherwise)."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    tenant = None
    if scheme.lower() == "bearer" and key.strip():
        tenant = request.app.state.service.keys.tenant(key.strip())
    if tenant is None:
        why = "invalid API key" if header else "missing API key (Authorization: Bearer KEY)"
        raise ServeError(401, why, "authentication_error")
    return tenant


async def parse(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as `model`: bounded in size and time, strict UTF-8, strict types."""
    service: Service = request.app.state.service
    data = await read_body(request, service.max_body, service.body_timeout)
    try:
        body = json.loads(data.decode("utf-8"))
        check_encodable(body)
    except UnicodeDecodeError as e:
        raise ServeError(400, f"body is not valid UTF-8: {e}") from e
    except json.JSONDecodeError as e:
        raise ServeError(400, f"body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ServeError(400, "body is nested too deeply") from e
    if not isinstance(body, dict):
        raise ServeError(400, "body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ServeError(400, f"{where + ': ' if where else ''}{message}") from e


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ServeError(400, f"bad Content-Length {length!r}")
    if length is not None and int(length) > limit:
        raise ServeError(413, f"body of {length} bytes is over the limit of {limit}")
    chunks, size = [], 0
    deadline = time.monotonic() + timeout
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), deadline - time.monotonic())
        except StopAsyncIteration:
            return b"".join(chunks)
        except (TimeoutError, asyncio.TimeoutError) as e:
            raise ServeError(408, f"request body not received within {timeout:g} s") from e
        except ClientDisconnect as e:
            raise ServeError(400, "client disconnected before the body ended") from e
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"body over the limit of {limit} bytes")
        chunks.append(chunk)


def check_encodable(value: Any) -> None:
    """JSON escapes can smuggle lone surrogates (\\ud800) that are no UTF-8: refuse them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ServeError(400, "text is not valid Unicode (a lone surrogate)") from e
    elif isinstance(value, dict | list):
        for v in value.values() if isinstance(value, dict) else value:
            check_encodable(v)


# --- generation --------------------------------------------------------------------------------
def chat_ids(ga, req: ChatRequest) -> list[int]:
    if not getattr(ga.tokenizer, "chat_template", None):
        raise ServeError(400, "this model has no chat template: use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    for m in messages:  # templates know "system", not OpenAI's newer "developer"
        m["role"] = "system" if m["role"] == "developer" else m["role"]
    try:
        text = ga.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # the template itself may refuse a conversation (jinja raise)
        raise ServeError(400, f"the chat template refused these messages: {e}") from e
    return ga.tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(ga, req: CompletionRequest) -> list[int]:
    return ga.tokenizer(req.text(), add_special_tokens=True)["input_ids"]


def context_window(ga) -> int:
    config = ga.base_model.config
    return int(getattr(config, "max_position_embeddings", None) or config.n_positions)


async def start(service: Service, tenant: str, ids: list[int], req: Sampling) -> AsyncIterator:
    """Queue the request with the caller's state; yields the scheduler's events as they come."""
    window = context_window(service.ga)
    if not ids:
        raise ServeError(400, "the prompt is empty")
    if len(ids) + req.limit > window:
        raise ServeError(
            400,
            f"prompt of {len(ids)} tokens + max_tokens {req.limit} is over the context window "
            f"of {window} tokens",
        )
    state = await run_in_threadpool(service.store.get, tenant)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(*event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody listens
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(ids, state, req.limit, emit, *req.sampling, req.stops, req.seed)
    job.ignore_eos = req.ignore_eos
    if not service.scheduler.submit(job):
        raise ServeError(503, "the server is busy, retry later", "server_error")
    return drain(job, events)


async def drain(job: Job, events: asyncio.Queue) -> AsyncIterator[tuple]:
    try:
        while True:
            event = await events.get()
            yield event
            if event[0] != "delta":
                return
    finally:
        job.cancelled = True  # a client that went away frees its row at the next step


async def collect(events: AsyncIterator[tuple]) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a whole generation."""
    parts = []
    async for event in events:
        if event[0] == "delta":
            parts.append(event[1])
        elif event[0] == "error":
            raise ServeError(500, event[1], "server_error")
        else:
            return "".join(parts), event[1], event[2]
    raise ServeError(500, "generation ended without a result", "server_error")


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_chunks(events, head: dict, chat: bool, n_prompt: int, with_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            delta |= {"content": text} if text is not None else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return head | {"choices": [choice]}

    if chat:
        yield sse(chunk(None, None, first=True))
    async for event in events:
        if event[0] == "delta":
            yield sse(chunk(event[1], None))
        elif event[0] == "error":
            yield sse({"error": {"message": event[1], "type": "server_error", "code": None}})
            return
        else:
            yield sse(chunk(None if chat else "", event[1]))
            if with_usage:
                yield sse(head | {"choices": [], "usage": usage(n_prompt, event[2])})
    yield sse("[DONE]")


async def answer(service: Service, tenant: str, req: Sampling, chat: bool) -> Response:
    ga = service.ga
    ids = chat_ids(ga, req) if chat else completion_ids(ga, req)
    events = await start(service, tenant, ids, req)
    kind = "chat.completion" if chat else "text_completion"
    head = {
        "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
        "object": kind + (".chunk" if chat and req.stream else ""),
        "created": int(time.time()),
        "model": req.model or MODEL,
    }
    if req.stream:
        body = stream_chunks(events, head, chat, len(ids), req.include_usage)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    text, finish, n = await collect(events)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice |= {"logprobs": None, "finish_reason": finish}
    return JSONResponse(head | {"choices": [choice], "usage": usage(len(ids), n)})


# --- routes ------------------------------------------------------------------------------------
def add_routes(app: FastAPI, service: Service) -> None:
    add_openai_routes(app, service)
    add_state_routes(app, service)


def add_openai_routes(app: FastAPI, service: Service) -> None:
    fingerprint = service.ga.generator.fingerprint()

    @app.get("/health")
    def health() -> dict:
        sched = service.scheduler  # forwards run and tokens decoded so far (for load tests)
        return {"ok": True, "generator": fingerprint, "forwards": sched.steps, "tokens": sched.rows}

    model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "genadapter"}
    model |= {"generator": fingerprint, "base_model": service.ga.config.base_model}

    @app.get("/v1/models")
    def models(tenant: str = Depends(tenant_of)) -> dict:
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{name}")
    def one_model(name: str, tenant: str = Depends(tenant_of)) -> dict:
        if name != MODEL:
            raise ServeError(404, f"no model {name!r}: this server has {MODEL!r}")
        return model

    @app.post("/v1/chat/completions")
    async def chat(request: Request, tenant: str = Depends(tenant_of)) -> Response:
        return await answer(service, tenant, await parse(request, ChatRequest), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, tenant: str = Depends(tenant_of)) -> Response:
        return await answer(service, tenant, await parse(request, CompletionRequest), chat=False)


def add_state_routes(app: FastAPI, service: Service) -> None:
    store = service.store

    @app.post("/v1/read")
    async def read(request: Request, tenant: str = Depends(tenant_of)) -> dict:
        texts = (await parse(request, ReadRequest)).all()
        return await run_in_threadpool(store.read, tenant, texts)

    @app.get("/v1/state")
    async def state(tenant: str = Depends(tenant_of)) -> dict:
        return {"tenant": tenant, **store.info(await run_in_threadpool(store.get, tenant))}

    @app.delete("/v1/state")
    async def reset(tenant: str = Depends(tenant_of)) -> dict:
        return {"tenant": tenant, **(await run_in_threadpool(store.reset, tenant))}

    @app.get("/v1/state/export")
    async def export(tenant: str = Depends(tenant_of)) -> Response:
        data = await run_in_threadpool(store.export, tenant)
        disposition = f'attachment; filename="{tenant}.safetensors"'
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": disposition},
        )
