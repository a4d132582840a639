"""uvicorn with the timeouts it lacks: a connection must send a whole request head within
`head_timeout` seconds (uvicorn alone waits forever for a client that connects and says
nothing, or trickles its headers); idle keep-alive connections close after `keep_alive` s.
Slow bodies are timed by the app (`app.read_body`), which answers 408 itself."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT = 10.0
KEEP_ALIVE = 5.0


class TimedH11Protocol(H11Protocol):
    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.head_timeout = getattr(config, "head_timeout", HEAD_TIMEOUT)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the start of a next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        message = f"no complete request within {self.head_timeout:g} s"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
        head = (
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body.encode())
        self.transport.close()


class Server(uvicorn.Server):
    """Prints `banner` once the socket accepts connections."""

    def __init__(self, config: uvicorn.Config, banner: str | None = None):
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.banner:
            print(self.banner, flush=True)


def make_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    head_timeout: float = HEAD_TIMEOUT,
    keep_alive: float = KEEP_ALIVE,
    log: bool = False,
) -> tuple[Server, socket.socket]:
    """A uvicorn server and its bound socket (port 0: a free port, `sock.getsockname()[1]`)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=TimedH11Protocol,
        lifespan="off",
        timeout_keep_alive=max(1, round(keep_alive)),
        timeout_graceful_shutdown=5,
        log_level="info" if log else "warning",
        access_log=log,
    )
    config.head_timeout = head_timeout
    sock = config.bind_socket()
    return Server(config), sock
