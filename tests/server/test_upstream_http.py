"""The gateway's upstream HTTP client against real local servers: well-behaved aiohttp servers,
and raw asyncio servers that misbehave (close idle connections, stall, reset mid-body, frame
bodies every legal way, ignore Accept-Encoding)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from tokenhub.gateway.providers import http as upstream_http
from tokenhub.gateway.providers.http import (
    HIGH_WATER,
    ClientConnectorError,
    ClientPayloadError,
    ClientResponseError,
    Pool,
    ServerDisconnectedError,
)

# -- servers -----------------------------------------------------------------------------------

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Handler = Callable[["RawServer", Reader, Writer, int], Awaitable[None]]


class RawServer:
    """An asyncio TCP server that runs `handler(server, reader, writer, n)` for its n-th
    connection (from 0), and counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self.closed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = self.connections
        self.connections += 1
        self._writers.add(writer)
        try:
            await self.handler(self, reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self.closed += 1

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
        """One request; its request line and headers (lowercased names) are also recorded."""
        head = await reader.readuntil(b"\r\n\r\n")
        line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for h in lines:
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((line, headers, body))
        return body, headers

    async def close(self) -> None:
        for w in list(self._writers):
            w.close()
        self.server.close()
        await self.server.wait_closed()


Raw = Callable[[Handler], Awaitable[RawServer]]
Pools = Callable[..., Pool]


@contextlib.asynccontextmanager
async def raw_servers() -> AsyncIterator[Raw]:
    """Makes raw servers, closed at the end."""
    servers: list[RawServer] = []

    async def make(handler: Handler) -> RawServer:
        s = RawServer(handler)
        await s.start()
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            await s.close()


@contextlib.asynccontextmanager
async def made_pools() -> AsyncIterator[Pools]:
    """Makes pools, closed at the end."""
    made: list[Pool] = []

    def make(base_url: str, **kw: Any) -> Pool:
        p = Pool(base_url, **kw)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            await p.close()


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    async with raw_servers() as make:
        yield make


@pytest.fixture
async def pools() -> AsyncIterator[Pools]:
    async with made_pools() as make:
        yield make


def ok(body: bytes = b"{}", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra))
    return head.encode() + b"\r\n" + body


async def keep_alive_ok(s: RawServer, r: Reader, w: Writer, n: int) -> None:
    """Answers every request on the connection with 200 and a JSON body naming the connection."""
    while True:
        await s.read_request(r)
        w.write(ok(json.dumps({"conn": n}).encode()))


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.json_response(
            {
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body.decode(),
                "peer": list(peer) if peer else None,
            },
            headers={"X-Ratelimit-Reset-Requests": "1s", "Retry-After": "3"},
        )

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.02)
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "x"}}, status=int(request.match_info["s"]))

    app = web.Application()
    app.router.add_post("/v1/echo", echo)
    app.router.add_post("/v1/chunked", chunked)
    app.router.add_post("/v1/status/{s}", status)
    return app


@pytest.fixture
async def echo(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(echo_app())
    return server


# -- requests and replies ----------------------------------------------------------------------


async def test_post_headers_body_and_prefix(echo: TestServer, pools: Pools) -> None:
    base = str(echo.make_url("/v1/"))  # a trailing slash on the base is harmless
    pool = pools(base, headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
    resp = await pool.post("/echo", b'{"a": 1}', {"x-request-id": "req_1"})
    try:
        assert resp.status == 200
        got = json.loads(await resp.read())
    finally:
        resp.release()
    assert got["path"] == "/v1/echo"
    assert got["body"] == '{"a": 1}'
    h = got["headers"]
    assert h["host"] == f"127.0.0.1:{echo.port}"
    assert h["content-type"] == "application/json"
    assert h["authorization"] == "Bearer k"
    assert h["x-request-id"] == "req_1"
    assert h["content-length"] == "8"
    assert h["accept-encoding"] == "identity"
    # Reply headers, any case.
    assert resp.headers["retry-after"] == "3"
    assert "x-ratelimit-reset-requests" in resp.headers
    assert resp.headers["X-RATELIMIT-RESET-REQUESTS"] == "1s"
    assert "x-ratelimit-reset-tokens" not in resp.headers
    assert resp.headers.get("content-type", "").startswith("application/json")


async def test_error_statuses_are_replies(echo: TestServer, pools: Pools) -> None:
    pool = pools(str(echo.make_url("/v1")))
    for status in (400, 429, 500, 503):
        resp = await pool.post(f"/status/{status}", b"{}")
        try:
            assert resp.status == status
            assert json.loads(await resp.read()) == {"error": {"code": "x"}}
        finally:
            resp.release()


async def test_chunked_reply_read_whole_and_streamed(echo: TestServer, pools: Pools) -> None:
    pool = pools(str(echo.make_url("/v1")))
    expected = b"".join(f"data: {i}\n\n".encode() for i in range(5)) + b"data: [DONE]\n\n"
    resp = await pool.post("/chunked", b"{}")
    try:
        assert await resp.read() == expected
        assert await resp.readany() == b""
    finally:
        resp.release()
    resp = await pool.post("/chunked", b"{}")
    parts = []
    try:
        while data := await resp.readany():
            parts.append(data)
    finally:
        resp.release()
    assert b"".join(parts) == expected
    assert len(parts) >= 3  # handed out as it arrived, not at the end
    assert len(pool._conns) == 1  # both on one keep-alive connection


async def test_keep_alive_reuses_one_connection(raw: Raw, pools: Pools) -> None:
    server = await raw(keep_alive_ok)
    pool = pools(server.url + "/v1")
    for _ in range(5):
        resp = await pool.post("/x", b"{}")
        assert json.loads(await resp.read()) == {"conn": 0}
        resp.release()
    assert server.connections == 1
    line, headers, _ = server.requests[0]
    assert line == b"POST /v1/x HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{server.port}"


async def test_eof_delimited_and_http10_replies_are_read_and_not_reused(
    raw: Raw, pools: Pools
) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        if n == 0:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b"x" * 70_000)
        else:
            w.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()

    server = await raw(handler)
    pool = pools(server.url)
    resp = await pool.post("/a", b"{}")
    assert await resp.read() == b"x" * 70_000
    resp.release()
    resp = await pool.post("/a", b"{}")
    assert await resp.read() == b"ok"
    resp.release()
    resp = await pool.post("/a", b"{}")
    assert await resp.read() == b"ok"
    resp.release()
    assert server.connections == 3
    assert not pool._idle


async def test_connection_close_is_not_reused(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        w.write(ok(b"{}", "Connection: close"))
        await w.drain()
        await asyncio.sleep(0.5)  # the server does not even close: the client must not reuse

    server = await raw(handler)
    pool = pools(server.url)
    for _ in range(3):
        resp = await pool.post("/a", b"{}")
        assert await resp.read() == b"{}"
        resp.release()
    assert server.connections == 3


async def test_informational_reply_is_skipped(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        while True:
            await s.read_request(r)
            w.write(b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\n" + ok(b"{}", "X-Late: 2"))

    server = await raw(handler)
    pool = pools(server.url)
    for _ in range(2):
        resp = await pool.post("/a", b"{}")
        assert resp.status == 200
        assert await resp.read() == b"{}"
        assert "x-early" not in resp.headers and resp.headers["x-late"] == "2"
        resp.release()
    assert server.connections == 1


async def test_gzip_reply_is_decompressed(raw: Raw, pools: Pools) -> None:
    payload = json.dumps({"text": "compress me " * 500}).encode()

    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        while True:
            await s.read_request(r)
            w.write(ok(gzip.compress(payload), "Content-Encoding: gzip"))

    server = await raw(handler)
    pool = pools(server.url)
    resp = await pool.post("/a", b"{}")
    assert await resp.read() == payload
    resp.release()
    resp = await pool.post("/a", b"{}")  # and the connection stays usable
    assert await resp.read() == payload
    resp.release()
    assert server.connections == 1


async def test_bad_replies(raw: Raw, pools: Pools) -> None:
    replies = [
        (b"HTTZ/1.1 200 OK\r\n\r\n", ClientResponseError),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nxx",
            ClientResponseError,
        ),
        (ok(b"not gzip at all", "Content-Encoding: gzip"), ClientPayloadError),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ClientPayloadError,
        ),
    ]

    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        w.write(replies[n][0])
        await w.drain()
        await asyncio.sleep(1)

    server = await raw(handler)
    pool = pools(server.url)
    for _, exc in replies:
        with pytest.raises(exc):
            resp = await pool.post("/a", b"{}")
            try:
                await resp.read()
            finally:
                resp.release()
    assert not pool._conns


async def test_extra_bytes_after_a_reply_retire_the_connection(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        while True:
            await s.read_request(r)
            w.write(ok(b"{}") + ok(b"{}"))  # two replies to one request

    server = await raw(handler)
    pool = pools(server.url)
    for _ in range(2):
        resp = await pool.post("/a", b"{}")
        assert await resp.read() == b"{}"
        resp.release()
    assert server.connections == 2


async def test_line_breaks_and_other_schemes_are_refused() -> None:
    with pytest.raises(ValueError):
        Pool("http://127.0.0.1:9", headers={"X-Bad": "a\r\nInjected: 1"})
    with pytest.raises(ValueError):
        Pool("ftp://example.com/v1")
    pool = Pool("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        await pool.post("/a", b"{}", {"x-request-id": "a\nb"})
    await pool.close()


# -- connection failures -----------------------------------------------------------------------


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_refused_connection(pools: Pools) -> None:
    pool = pools(f"http://127.0.0.1:{dead_port()}/v1")
    with pytest.raises(ClientConnectorError) as e:
        await pool.post("/a", b"{}")
    assert isinstance(e.value, upstream_http.ClientError)
    assert not pool._conns and pool._opening == 0


async def test_server_closes_idle_connection(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        w.write(ok(json.dumps({"conn": n}).encode()))
        await w.drain()
        # and then closes the (idle, keep-alive) connection

    server = await raw(handler)
    pool = pools(server.url)
    for i in range(3):
        resp = await pool.post("/a", b"{}")
        assert json.loads(await resp.read()) == {"conn": i}
        resp.release()
        await asyncio.sleep(0.05)  # the FIN arrives while the connection is idle
    assert server.connections == 3
    assert not pool._conns


async def test_request_racing_an_idle_close_is_sent_again(raw: Raw, pools: Pools) -> None:
    """The server reads the second request on a kept-alive connection and closes without a
    byte of reply: the client sends it again on a new connection (once)."""

    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        w.write(ok(json.dumps({"conn": n}).encode()))
        await s.read_request(r)
        # closes without answering

    server = await raw(handler)
    pool = pools(server.url)
    resp = await pool.post("/a", b"{}")
    assert json.loads(await resp.read()) == {"conn": 0}
    resp.release()
    resp = await pool.post("/a", b'{"second": 1}')
    assert json.loads(await resp.read()) == {"conn": 1}
    resp.release()
    assert [r[2] for r in server.requests] == [b"{}", b'{"second": 1}', b'{"second": 1}']


async def test_fresh_connection_closed_before_reply_is_not_retried(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)

    server = await raw(handler)
    pool = pools(server.url)
    with pytest.raises(ServerDisconnectedError):
        await pool.post("/a", b"{}")
    assert server.connections == 1


async def test_reused_connection_broken_after_reply_bytes_is_not_retried(
    raw: Raw, pools: Pools
) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        w.write(ok())
        await s.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await w.drain()

    server = await raw(handler)
    pool = pools(server.url)
    resp = await pool.post("/a", b"{}")
    await resp.read()
    resp.release()
    with pytest.raises(ServerDisconnectedError):
        await pool.post("/a", b"{}")
    assert server.connections == 1


def reset(w: asyncio.StreamWriter) -> None:
    """Closes with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_body_broken_off(
    raw: Raw,
    pools: Pools,
    how: str,
    framing: str,
) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        if framing == "length":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        else:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        if how == "rst":
            reset(w)

    server = await raw(handler)
    pool = pools(server.url)
    for streamed in (False, True):
        resp = await pool.post("/a", b"{}")
        try:
            if streamed:
                assert await resp.readany() == b"0123456789"
            with pytest.raises(ClientPayloadError):
                await resp.read() if not streamed else await resp.readany()
        finally:
            resp.release()
    assert server.connections == 2
    assert not pool._conns


async def test_reset_before_reply(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        reset(w)

    server = await raw(handler)
    pool = pools(server.url)
    with pytest.raises(ServerDisconnectedError):
        await pool.post("/a", b"{}")


# -- timeouts ----------------------------------------------------------------------------------


async def test_read_timeout_before_headers(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        await asyncio.sleep(5)

    server = await raw(handler)
    pool = pools(server.url, read_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await pool.post("/a", b"{}")
    assert 0.19 <= time.monotonic() - t0 < 1.0
    assert not pool._conns


async def test_read_timeout_is_per_read(raw: Raw, pools: Pools) -> None:
    """Gaps shorter than the read timeout never time out, however long the reply takes; one
    longer gap does, after the bytes that came before it were handed out."""

    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.08)
            w.write(b"1\r\nx\r\n")
        if n == 0:
            w.write(b"0\r\n\r\n")
        else:
            await asyncio.sleep(5)

    server = await raw(handler)
    pool = pools(server.url, read_timeout=0.25)
    t0 = time.monotonic()
    resp = await pool.post("/a", b"{}")
    assert await resp.read() == b"x" * 8
    resp.release()
    assert time.monotonic() - t0 > 0.5  # longer than the read timeout in all
    resp = await pool.post("/a", b"{}")
    got = b""
    try:
        with pytest.raises(TimeoutError):
            while data := await resp.readany():
                got += data
    finally:
        resp.release()
    assert got == b"x" * 8


async def test_total_timeout(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            await asyncio.sleep(0.05)
            w.write(b"1\r\nx\r\n")

    server = await raw(handler)
    pool = pools(server.url, read_timeout=1.0, total_timeout=0.4)
    t0 = time.monotonic()
    resp = await pool.post("/a", b"{}")
    try:
        with pytest.raises(TimeoutError):
            await resp.read()
    finally:
        resp.release()
    assert 0.39 <= time.monotonic() - t0 < 1.0


async def test_connect_timeout_covers_the_tls_handshake(raw: Raw, pools: Pools) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await asyncio.sleep(5)  # accepts, never says a word

    server = await raw(handler)
    pool = pools(f"https://127.0.0.1:{server.port}", connect_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await pool.post("/a", b"{}")
    assert time.monotonic() - t0 < 1.0
    assert not pool._conns and pool._opening == 0


# -- the pool ----------------------------------------------------------------------------------


async def test_limit_is_kept_and_waiters_are_served(raw: Raw, pools: Pools) -> None:
    active = 0
    most = 0

    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        nonlocal active, most
        while True:
            await s.read_request(r)
            active += 1
            most = max(most, active)
            await asyncio.sleep(0.02)
            active -= 1
            w.write(ok())

    server = await raw(handler)
    pool = pools(server.url, limit=3)

    async def one() -> bytes:
        resp = await pool.post("/a", b"{}")
        try:
            return await resp.read()
        finally:
            resp.release()

    assert await asyncio.gather(*(one() for _ in range(20))) == [b"{}"] * 20
    assert most == 3
    assert server.connections == 3
    assert len(pool._idle) == 3 and not pool._waiters


async def test_waiting_for_a_connection_is_bounded_by_the_total_timeout(
    raw: Raw, pools: Pools
) -> None:
    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        await s.read_request(r)
        await asyncio.sleep(0.6)
        w.write(ok())
        await w.drain()

    server = await raw(handler)
    pool = pools(server.url, limit=1, total_timeout=0.3)
    first = asyncio.create_task(pool.post("/a", b"{}"))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await pool.post("/a", b"{}")
    with pytest.raises(TimeoutError):
        await first
    assert not pool._waiters


async def test_cancelled_waiter_passes_its_turn_on(raw: Raw, pools: Pools) -> None:
    server = await raw(keep_alive_ok)
    pool = pools(server.url, limit=1)
    held = await pool.post("/a", b"{}")
    waiting = [asyncio.create_task(pool.post("/a", b"{}")) for _ in range(2)]
    await asyncio.sleep(0.02)
    await held.read()
    held.release()  # wakes the first waiter...
    waiting[0].cancel()  # ...which is cancelled before it runs
    resp = await asyncio.wait_for(waiting[1], 2)
    assert await resp.read() == b'{"conn": 0}'
    resp.release()
    assert waiting[0].cancelled()
    assert server.connections == 1


async def test_unread_reply_closes_its_connection(echo: TestServer, pools: Pools) -> None:
    pool = pools(str(echo.make_url("/v1")))
    resp = await pool.post("/chunked", b"{}")
    assert await resp.readany()
    resp.release()  # the rest was never read
    resp.release()  # twice is harmless
    assert not pool._conns and not pool._idle
    with pytest.raises(RuntimeError):
        await resp.read()
    resp = await pool.post("/echo", b"{}")
    await resp.read()
    resp.release()
    assert len(pool._idle) == 1


async def test_idle_connections_expire(
    raw: Raw,
    pools: Pools,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_http, "KEEPALIVE_S", 0.05)
    server = await raw(keep_alive_ok)
    pool = pools(server.url)
    for i in range(2):
        resp = await pool.post("/a", b"{}")
        assert json.loads(await resp.read()) == {"conn": i}
        resp.release()
        await asyncio.sleep(0.1)
    assert server.connections == 2


async def test_flow_control_bounds_what_a_slow_reader_buffers(raw: Raw, pools: Pools) -> None:
    size = 64 << 20
    block = bytes(range(256)) * 256  # 64 KiB
    sent = 0

    async def handler(s: RawServer, r: Reader, w: Writer, n: int) -> None:
        nonlocal sent
        await s.read_request(r)
        w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        while sent < size:
            w.write(block)
            sent += len(block)
            await w.drain()

    server = await raw(handler)
    pool = pools(server.url)
    resp = await pool.post("/a", b"{}")
    total = len(await resp.readany())
    await asyncio.sleep(0.3)  # a slow client: nothing read for a while
    conn = resp._conn
    assert conn is not None and conn.paused
    assert conn.buffered < HIGH_WATER + (1 << 20)  # bounded by the high-water mark + a socket read
    assert sent < size / 2  # the server is held back by TCP, not buffered by us
    while data := await resp.readany():
        total += len(data)
    resp.release()
    assert total == size
    assert len(pool._idle) == 1  # read to the end: reused


async def test_close_closes_everything(raw: Raw, pools: Pools) -> None:
    server = await raw(keep_alive_ok)
    pool = Pool(server.url, limit=1)
    resp = await pool.post("/a", b"{}")
    await resp.read()
    resp.release()
    held = await pool.post("/a", b"{}")
    waiter = asyncio.create_task(pool.post("/a", b"{}"))
    await asyncio.sleep(0.02)
    await pool.close()
    with pytest.raises(upstream_http.ClientError):
        await waiter
    held.release()
    with pytest.raises(upstream_http.ClientError):
        await pool.post("/a", b"{}")
    for _ in range(50):
        if server.closed == server.connections:
            break
        await asyncio.sleep(0.01)
    assert server.closed == server.connections == 1


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_with_port_and_prefix(certificate: tuple[Path, Path], pools: Pools) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(echo_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        pool = pools(f"https://localhost:{port}/v1", ssl_context=trusting)
        for _ in range(2):
            resp = await pool.post("/echo", b'{"tls": true}', {"x-request-id": "r"})
            got = json.loads(await resp.read())
            resp.release()
            assert got["path"] == "/v1/echo" and got["body"] == '{"tls": true}'
            assert got["headers"]["host"] == f"localhost:{port}"
        assert len(pool._conns) == 1
        resp = await pool.post("/chunked", b"{}")
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        resp.release()
        # The default context does not trust a self-signed certificate.
        untrusting = pools(f"https://localhost:{port}/v1")
        with pytest.raises(ClientConnectorError):
            await untrusting.post("/echo", b"{}")
        await pool.close()
        await untrusting.close()
    finally:
        await runner.cleanup()


# -- the same under uvloop (the gateway's loop) ------------------------------------------------

UVLOOP_CASES: list[Callable[..., Awaitable[None]]] = [
    test_keep_alive_reuses_one_connection,
    test_eof_delimited_and_http10_replies_are_read_and_not_reused,
    test_bad_replies,
    test_server_closes_idle_connection,
    test_request_racing_an_idle_close_is_sent_again,
    functools.partial(test_body_broken_off, how="rst", framing="chunked"),
    functools.partial(test_body_broken_off, how="fin", framing="length"),
    test_reset_before_reply,
    test_read_timeout_before_headers,
    test_read_timeout_is_per_read,
    test_total_timeout,
    test_connect_timeout_covers_the_tls_handshake,
    test_limit_is_kept_and_waiters_are_served,
    test_cancelled_waiter_passes_its_turn_on,
    test_flow_control_bounds_what_a_slow_reader_buffers,
    test_close_closes_everything,
]


def _case_id(case: Callable[..., Awaitable[None]]) -> str:
    if isinstance(case, functools.partial):
        return "-".join([case.func.__name__, *map(str, case.keywords.values())])
    return case.__name__


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=_case_id)
def test_under_uvloop(case: Callable[..., Awaitable[None]]) -> None:
    async def main() -> None:
        async with raw_servers() as raw, made_pools() as pools:
            await case(raw=raw, pools=pools)

    uvloop.run(main())


def test_https_under_uvloop(certificate: tuple[Path, Path]) -> None:
    async def main() -> None:
        async with made_pools() as pools:
            await test_https_with_port_and_prefix(certificate, pools)

    uvloop.run(main())
