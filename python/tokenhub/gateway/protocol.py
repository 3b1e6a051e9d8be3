"""The HTTP layer under the app: aiohttp's connection protocol with the gateway's error shape and
the limits on what a client may hold without sending a request.

aiohttp answers a request it cannot parse (a control byte or a bare CR in a header, an oversized
line) before any middleware runs: a plain-text 400 that quotes the offending line, and an ERROR
log with the line in its traceback, so a malformed `Authorization` header put the key in both.
`_Protocol.handle_error` answers with an error in the dialect of the request's path instead
(the error middleware's rule, `app._dialect_of`: under /v1/messages Anthropic's shape, else
OpenAI's), and logs only the exception's class. aiohttp hands it a placeholder request (method
UNKNOWN, path "/") when the head did not parse, so the connection keeps the start of each
request head (at most `_HEAD_LINE_MAX` bytes, up to the first line's end) to read the path
from; a head that does not even have one is answered in OpenAI's shape.

Connections (`[server]` in the config):

- `header_timeout_s`: a request head must be complete this long after its first byte, else the
  connection gets a 408 and is closed (a client trickling a header a byte at a time);
- `keepalive_timeout_s`: a connection with no request in progress is closed after this long
  (aiohttp's keep-alive timer, which also runs from the connect: it covers a client that
  connects and sends nothing);
- `max_connections`: a connection accepted while that many are open gets a 503 and is closed
  at once, which costs an accept and a write: the server's file descriptors cannot run out
  (the cap is lowered to fit the process's limit, which `raise_fd_limit` raises to the hard
  one) and requests on the open connections are served as before.

What this relies on in aiohttp (3.14, so pyproject pins it below 3.15): `RequestHandler` (its
constructor keywords, `handle_error`, `finish_response`, `data_received`, `_request_count`: the
number of request heads parsed on the connection), `web_protocol.ERROR` (the placeholder
request of an unparsable head) and `AppRunner._make_server`, which builds
the `web.Server` whose `__call__` makes one protocol per connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import ERROR as UNPARSED
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from tokenhub.gateway.dialects import DIALECTS
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.service import new_request_id

log = logging.getLogger("tokenhub.gateway")

SERVER_NAME = "tokenhub"  # the Server header: no version for a scanner to match
FD_HEADROOM = 256  # descriptors kept for the database, journal, settler pipes, logs
_HEAD_LINE_MAX = 512  # bytes of a request head kept to read its path from, should it not parse


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 10_000


def raise_fd_limit() -> int:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(configured: int, upstream_connections: int) -> int:
    """`max_connections`, lowered so that the clients' connections, the upstream pools' and
    FD_HEADROOM fit in the process's file-descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    room = soft - FD_HEADROOM - upstream_connections
    cap = max(1, min(configured, room))
    if cap < configured:
        log.warning(
            "server.max_connections lowered from %d to %d: the file-descriptor limit is %d",
            configured,
            cap,
            soft,
        )
    return cap


def _raw_response(err: ApiError) -> bytes:
    """A whole HTTP/1.1 response for a connection no request handler will see."""
    body = err.body()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(err.status, "Error")
    head = (
        f"HTTP/1.1 {err.status} {reason}\r\n"
        f"Server: {SERVER_NAME}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-request-id: {new_request_id()}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in err.headers.items())
        + "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _busy() -> ApiError:
    return ApiError(
        503,
        "The gateway has too many open connections; retry in a second.",
        type="api_error",
        code="too_many_connections",
        headers={"retry-after": "1"},
    )


def _head_timeout() -> ApiError:
    return ApiError(
        408,
        "The request's headers did not arrive in time.",
        code="request_timeout",
    )


def _protocol_error(status: int) -> ApiError:
    """aiohttp's own errors: never with aiohttp's message, which quotes the request's bytes."""
    if status == 400:
        return ApiError(
            400,
            "The request is not valid HTTP/1.1: a malformed request line or header "
            "(a control character, a bare CR, an over-long line).",
            code="invalid_http_request",
        )
    if status == 504:
        return ApiError(504, "The request timed out.", type="api_error", code="timeout")
    if status < 500:
        return ApiError(status, "The request was refused.", code="invalid_http_request")
    return ApiError.internal()


def _target(head: bytes) -> str:
    """The path of a request head's first line ("/" when it has none to read)."""
    parts = head.lstrip(b"\r\n").split(b"\n", 1)[0].split(b" ")
    if len(parts) < 2:
        return "/"
    return parts[1].split(b"?", 1)[0].decode("latin-1")


class _Protocol(RequestHandler):
    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._counted = False  # in the server's count of open connections
        self._refused = False  # over the cap: answered 503 and closed
        self._awaiting_head = True  # the next bytes start a request head
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_line = b""  # the start of the current request head (see the docstring)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.open >= server.limits.max_connections:
            self._refused = True
            # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
            tcp = cast(asyncio.Transport, transport)
            tcp.write(_raw_response(_busy()))  # each with its own request id
            tcp.close()
            server.refused += 1
            return
        server.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._counted = False
            self._server.open -= 1
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        line = self._head_line
        if self._awaiting_head and len(line) < _HEAD_LINE_MAX and b"\n" not in line:
            self._head_line = line + data[: _HEAD_LINE_MAX - len(line)]
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._awaiting_head = False
            self._cancel_head_timer()
        elif data and self._awaiting_head and self._head_timer is None:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(
                self._server.limits.header_timeout_s, self._head_timed_out
            )

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        self._awaiting_head = True
        self._head_line = b""
        return result

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or not self._awaiting_head:
            return
        log.info("closed a connection whose request headers did not arrive in time")
        self._server.head_timeouts += 1
        transport.write(_raw_response(_head_timeout()))
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp logs the exception (its message quotes the bad request line or header) and
        # renders `message` as the body: both stay out, whatever the request carried.
        what = type(exc).__name__ if exc is not None else f"status {status}"
        if status >= 500:
            log.error("error handling a request from %s: %s", request.remote, what)
        else:
            log.info("refused a malformed request from %s: %s", request.remote, what)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started: the connection is closed")
        from tokenhub.gateway.app import _dialect_of  # late: app imports this module

        path = request.path if request.method != UNPARSED.method else _target(self._head_line)
        err = _protocol_error(status)
        resp = web.Response(
            status=err.status,
            body=DIALECTS[_dialect_of(path)].error_body(err),
            content_type="application/json",
            headers=err.headers,
        )
        resp.headers["Server"] = SERVER_NAME
        resp.headers["x-request-id"] = new_request_id()
        resp.force_close()
        return resp


class _Server(web.Server):
    """aiohttp's server with `_Protocol` connections, and their count."""

    def __init__(self, base: web.Server, limits: ConnectionLimits) -> None:
        kwargs = dict(base._kwargs)
        kwargs["keepalive_timeout"] = limits.keepalive_timeout_s
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **kwargs,
        )
        self.limits = limits
        self.open = 0
        self.refused = 0  # connections refused over the cap (a counter)
        self.head_timeouts = 0  # connections closed for slow headers (a counter)

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` serving the app with `_Protocol` connections under `limits`."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.web_server: _Server | None = None

    async def _make_server(self) -> web.Server:
        self.web_server = _Server(await super()._make_server(), self.limits)
        return self.web_server
