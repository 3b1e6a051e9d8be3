"""The HTTP/1.1 client the gateway calls upstream providers with: one `Pool` per provider.

A gateway request is one POST to one origin and one reply read whole or as a stream, so the
client does only that: `Pool.post` renders the request line and fixed headers once per path,
writes head and body to a pooled keep-alive connection in one `transport.write`, and each
connection is a plain `asyncio.Protocol` that feeds what arrives to llhttp (`httptools`) and
keeps the body as a list of byte strings until it is read. There are no per-request tracing
hooks, cookie jars, redirects, multipart payload objects or stream-reader layers.

- Pool: at most `limit` connections (open, opening or in use); a request that finds none free
  waits (bounded by the total timeout). Idle connections are reused last-in first-out and
  dropped after `KEEPALIVE_S` idle or as soon as the server closes them. A connection goes back
  to the pool only when its reply was read to the end and both sides keep it alive; anything
  else (an unread rest, an error, a timeout, `Connection: close`) closes it.
- A request on a reused connection that the server closed before sending any byte of the reply
  (the race with the server's idle timeout) is sent once more on a new connection.
- Timeouts, all raising `TimeoutError`: connect (TCP and TLS handshake), read (no byte for that
  long while a reader waits; one timer per request, re-armed lazily rather than per read) and
  total (from the start of `post` until the reply is read or released).
- Flow control: a streamed reply with more than `HIGH_WATER` unread bytes pauses reading from
  the upstream socket until the reader takes them (`readany` takes everything buffered).
- `Accept-Encoding: identity` is sent; a gzip or deflate reply sent anyway is decompressed.
- TLS: https origins are verified against the system's CAs, or against `ca_file` alone (a
  private CA); a failed handshake or verification raises `TLSError`, not a connect error.
- Egress proxy (`proxy_url`, else HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment, as
  urllib reads them): an https origin is reached through a CONNECT tunnel with TLS inside it;
  an http origin's requests go to the proxy in absolute form (`POST http://host/path`), which
  every forward proxy accepts (many refuse CONNECT to ports other than 443). Only http:// proxy
  URLs; user:password in one becomes `Proxy-Authorization: Basic` and appears in no message.
- Errors are `ClientError` subclasses named after aiohttp's (the gateway's 502 messages name
  the exception type, and stay what they were with aiohttp).

Performance notes (benches/bench_gateway.py: mock on one core, gateway on the other, wrk, 8 s
windows; CPU of the gateway process per request served, median and range over 6 runs before and
4 after, interleaved, on a shared 2-core VM where other load came and went):

    tokenhub CPU per request     aiohttp ClientSession        this client
    json,   64 connections       0.186 ms (0.144-0.218)       0.107 ms (0.095-0.127)   -42%
    json,    1 connection        0.334 ms (0.290-0.407)       0.209 ms (0.186-0.254)   -37%
    stream, 64 connections       0.211 ms (0.188-0.284)       0.140 ms (0.133-0.142)   -34%
    stream,  1 connection        0.338 ms (0.312-0.418)       0.266 ms (0.255-0.276)   -21%

In the quietest runs, json at 64 connections went from 4,600-6,900 to 10,000 req/s (77-84% of
the bench's bare aiohttp pass-through proxy before, 135% after: that proxy still uses aiohttp's
client) and the p50 at 1 connection from 0.41-0.50 ms to 0.28 ms.

py-spy (json, 64 connections) put ~36% of the gateway's samples under aiohttp's client
(client.py, client_reqrep.py, client_proto.py, connector.py, payload.py) and 15% under this
client, 6 of them in the send() system call of `_Conn.start`. Choices for the hot path: headers
are kept as raw (name, value) pairs and turned into `Headers` only when asked for (the gateway
asks only on 4xx); the read timeout is one timer per request re-armed when it fires, not one per
read; a reply that arrives with its headers is read without yielding to the loop.

Not done: a stream whose terminating chunk arrives after the reader stopped at `[DONE]` is
released unfinished and so closed (as aiohttp's client does); finishing such a read in the
background would save a reconnect (and a TLS handshake) per stream on such upstreams.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple, cast
from urllib.parse import unquote, urlsplit

import httptools

KEEPALIVE_S = 15.0  # idle connections older than this are closed, not reused
HIGH_WATER = 1 << 16  # unread body bytes above which reading from the upstream pauses
_TIMER_SLACK_S = 0.001  # libuv timers have millisecond resolution


class ClientError(Exception):
    """The upstream could not be reached, or its reply could not be read."""


class ClientConnectorError(ClientError):
    """Connecting failed (refused, unreachable, name resolution, TLS)."""


class TLSError(ClientConnectorError):
    """The TLS handshake failed: the certificate did not verify (unknown CA, wrong host name,
    expired) or the server does not speak TLS. `reason` says which, without the host."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ClientProxyConnectionError(ClientConnectorError):
    """The egress proxy could not be reached, or refused the CONNECT tunnel."""


class ServerDisconnectedError(ClientError):
    """The connection closed or broke before the reply's headers were complete."""


class ClientPayloadError(ClientError):
    """The reply's body broke off or could not be decoded."""


class ClientResponseError(ClientError):
    """The reply's status line or headers were not valid HTTP/1.1."""


class Headers(Mapping[str, str]):
    """Reply headers, looked up case-insensitively; repeated headers are joined with ", "."""

    __slots__ = ("_d",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        d: dict[str, str] = {}
        for n, v in raw:
            name = n.decode("latin-1").lower()
            value = v.decode("latin-1")
            d[name] = f"{d[name]}, {value}" if name in d else value
        self._d = d

    def __getitem__(self, name: str) -> str:
        return self._d[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Headers({self._d!r})"


class Response:
    """A reply whose status line and headers have arrived; the body is read with `read` or
    `readany`. `release` must be called (once is enough) whatever happens."""

    __slots__ = ("_conn", "_headers", "_raw", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self.status = conn.status
        self._raw = conn.raw_headers
        self._headers: Headers | None = None

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = Headers(self._raw)
        return self._headers

    def _live(self) -> _Conn:
        if self._conn is None:
            raise RuntimeError("the response was released")
        return self._conn

    async def read(self) -> bytes:
        """The whole (rest of the) body. Raises ClientError or TimeoutError."""
        c = self._live()
        if not c.done:
            c.read_all = True
            c.resume()
            while not c.done:
                if c.exc is not None:
                    raise c.exc
                await c.wait()
        return c.take()

    async def readany(self) -> bytes:
        """Whatever part of the body has arrived (waiting for some if none has), b"" at its end.
        Raises ClientError or TimeoutError (after handing out what arrived before)."""
        c = self._live()
        while True:
            if c.chunks:
                data = c.take()
                c.resume()
                return data
            if c.done:
                return b""
            if c.exc is not None:
                raise c.exc
            await c.wait()

    def release(self) -> None:
        """Returns the connection to its pool if the reply was read to its end, else closes it."""
        c = self._conn
        if c is not None:
            self._conn = None
            c.pool.release(c)


class _Conn(asyncio.Protocol):
    """One keep-alive connection and the reply in flight on it."""

    __slots__ = (
        "buffered",
        "busy",
        "chunks",
        "closed",
        "deadline",
        "decomp",
        "done",
        "exc",
        "got_bytes",
        "headers_done",
        "idle_since",
        "keep_alive",
        "loop",
        "parser",
        "paused",
        "pool",
        "raw_headers",
        "read_all",
        "served",
        "status",
        "timer",
        "transport",
        "wait_start",
        "waiter",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False  # no longer counted by the pool: lost, or being closed
        self.served = 0
        self.idle_since = 0.0
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.wait_start = 0.0
        self.deadline = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.done = False
        self.keep_alive = False
        self.got_bytes = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.read_all = False
        self.exc: ClientError | None = None
        self.decomp: zlib._Decompress | None = None

    # -- the request -----------------------------------------------------------------------

    def start(self, data: bytes, deadline: float) -> None:
        if self.served:
            self._reset()
        self.busy = True
        self.deadline = deadline
        assert self.transport is not None
        self.transport.write(data)

    async def head(self) -> None:
        while not self.headers_done:
            if self.exc is not None:
                raise self.exc
            await self.wait()

    async def wait(self) -> None:
        """Until the protocol has news (or the read or total timeout passes)."""
        loop = self.loop
        now = loop.time()
        if now >= self.deadline:
            raise TimeoutError
        self.wait_start = now
        if self.timer is None:
            due = min(now + self.pool.read_timeout, self.deadline)
            self.timer = loop.call_at(due, self._on_timer)
        fut = self.waiter = loop.create_future()
        try:
            await fut
        finally:
            self.waiter = None

    def _on_timer(self) -> None:
        self.timer = None
        fut = self.waiter
        if fut is None or fut.done():
            return  # armed again by the next wait
        due = min(self.wait_start + self.pool.read_timeout, self.deadline)
        if self.loop.time() >= due - _TIMER_SLACK_S:
            fut.set_exception(TimeoutError())
        else:
            self.timer = self.loop.call_at(due, self._on_timer)

    def _wake(self) -> None:
        fut = self.waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        return data

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def finished(self) -> None:
        """The reply is over (read or not): stop the timer, forget the reader."""
        self.busy = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:
            # Bytes nobody asked for: the connection is out of step, never reuse it.
            self.keep_alive = False
            self.pool.discard(self, clean=False)
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            if not self.done:
                cause = e.__context__
                if isinstance(cause, ClientError):  # raised by one of the callbacks below
                    self.exc = cause
                elif self.headers_done:
                    self.exc = ClientPayloadError(f"Invalid response body: {e}")
                else:
                    self.exc = ClientResponseError(f"Invalid response: {e}")
            self.keep_alive = False
            self.pool.discard(self, clean=False)
        else:
            if self.buffered > HIGH_WATER and not (self.done or self.read_all or self.paused):
                self.paused = True
                assert self.transport is not None
                self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)
        if self.busy and not self.done and self.exc is None:
            if not self.headers_done:
                detail = f": {exc}" if exc else ""
                self.exc = ServerDisconnectedError(f"Server disconnected{detail}")
            elif exc is None and self._until_eof():
                self.keep_alive = False
                try:
                    self._complete()
                except ClientError as e:
                    self.exc = e
            else:
                self.exc = ClientPayloadError("Response payload is not completed")
        self._wake()

    def _until_eof(self) -> bool:
        """The body has neither a length nor chunked framing: it ends when the server closes."""
        for n, v in self.raw_headers:
            name = n.lower()
            if name == b"content-length" or (
                name == b"transfer-encoding" and b"chunked" in v.lower()
            ):
                return False
        return True

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.headers_done:
            raise ClientResponseError("a second response to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.raw_headers = []  # 1xx: the real reply follows
            return
        for n, v in self.raw_headers:
            if len(n) == 16 and n.lower() == b"content-encoding":
                coding = v.strip().lower()
                if coding in (b"gzip", b"x-gzip", b"deflate"):
                    # 32 + 15: a gzip or zlib header, whichever it is.
                    self.decomp = zlib.decompressobj(47)
                elif coding not in (b"", b"identity"):
                    raise ClientResponseError(f"Unsupported Content-Encoding {coding!r}")
        self.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self.decomp is not None:
            try:
                body = self.decomp.decompress(body)
            except zlib.error as e:
                raise ClientPayloadError(f"cannot decompress the response: {e}") from None
        if body:
            self.chunks.append(body)
            self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self._complete()
            self.keep_alive = self.parser.should_keep_alive()

    def _complete(self) -> None:
        if self.decomp is not None:
            try:
                rest = self.decomp.flush()
            except zlib.error as e:
                raise ClientPayloadError(f"cannot decompress the response: {e}") from None
            if not self.decomp.eof:
                raise ClientPayloadError("the compressed response is truncated")
            if rest:
                self.chunks.append(rest)
                self.buffered += len(rest)
        self.done = True


class Pool:
    """Keep-alive connections to one origin, for POSTs under one base URL (which may carry a
    path prefix such as /v1). Create and use it inside a running event loop."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        limit: int = 100,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        total_timeout: float = 600.0,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str = "",
        proxy_url: str = "",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`ca_file`: verify https origins against this PEM file's CAs only (else `ssl_context`,
        else the system's). `proxy_url`: see `find_proxy` (environ: default os.environ)."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.loop = asyncio.get_running_loop()
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = tls_context(ca_file) if ca_file else ssl_context or tls_context("")
        self.proxy = find_proxy(base_url, proxy_url, environ)
        self.prefix = parts.path.rstrip("/")
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        netloc = parts.netloc.rpartition("@")[2]
        # An http origin behind a proxy: requests name it in absolute form, to the proxy.
        self._origin = f"http://{netloc}" if self.proxy and self.ssl is None else ""
        lines = [
            f"Host: {netloc}",
            "Accept: */*",
            "Accept-Encoding: identity",
            "User-Agent: tokenhub",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        if self._origin and self.proxy and self.proxy.auth:
            lines.append(f"Proxy-Authorization: {self.proxy.auth}")
        fixed = "".join(f"{_check(line)}\r\n" for line in lines)
        self._fixed = fixed.encode("latin-1")
        self._heads: dict[str, bytes] = {}
        self._idle: list[_Conn] = []
        self._conns: set[_Conn] = set()  # open connections, idle or in use (counted)
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> Response:
        """POSTs `body` to the base URL + `path` and returns once the reply's headers are in.
        Raises ClientError, TimeoutError, or ValueError for a header with a line break."""
        head = self._heads.get(path)
        if head is None:
            head = self._heads[path] = (
                f"POST {self._origin}{_check(self.prefix + path)} HTTP/1.1\r\n".encode("latin-1")
                + self._fixed
            )
        extra = "".join(f"{_check(k)}: {_check(v)}\r\n" for k, v in (headers or {}).items())
        data = b"%s%sContent-Length: %d\r\n\r\n%s" % (
            head,
            extra.encode("latin-1"),
            len(body),
            body,
        )
        deadline = self.loop.time() + self.total_timeout
        conn = await self._acquire(deadline, fresh=False)
        retried = False
        while True:
            reused = conn.served > 0
            try:
                conn.start(data, deadline)
                await conn.head()
            except ServerDisconnectedError:
                self.release(conn)
                if reused and not conn.got_bytes and not retried:
                    retried = True
                    conn = await self._acquire(deadline, fresh=True)
                    continue
                raise
            except BaseException:
                self.release(conn)
                raise
            return Response(conn)

    async def close(self) -> None:
        """Closes every connection; requests still waiting for one get ClientError."""
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ClientError("the connection pool is closed"))
        self._idle.clear()
        for conn in list(self._conns):
            self.discard(conn, clean=False)
        # Let the transports call connection_lost (uvloop does it on the next iteration).
        await asyncio.sleep(0)

    # -- connections -----------------------------------------------------------------------

    async def _acquire(self, deadline: float, fresh: bool) -> _Conn:
        while True:
            if self._closed:
                raise ClientError("the connection pool is closed")
            if not fresh:
                idle = self._idle
                now = self.loop.time()
                while idle:
                    conn = idle.pop()
                    if conn.closed:
                        continue
                    assert conn.transport is not None
                    if conn.transport.is_closing():
                        self.discard(conn, clean=False)
                        continue
                    if now - conn.idle_since > KEEPALIVE_S:
                        self.discard(conn, clean=True)
                        continue
                    return conn
            if fresh and self._idle and len(self._conns) + self._opening >= self.limit:
                self.discard(self._idle.pop(0), clean=True)  # the oldest makes room
            if len(self._conns) + self._opening < self.limit:
                return await self._connect(deadline)
            await self._wait_for_slot(deadline)

    async def _wait_for_slot(self, deadline: float) -> None:
        loop = self.loop
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(TimeoutError())

        timer = loop.call_at(deadline, expire)
        try:
            await fut
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self._wake_one()  # woken and then cancelled: pass the turn on
            raise
        finally:
            timer.cancel()

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _connect(self, deadline: float) -> _Conn:
        conn = _Conn(self)
        self._opening += 1
        try:
            timeout = min(self.connect_timeout, deadline - self.loop.time())
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):
                proxy = self.proxy
                if proxy is None:
                    await self.loop.create_connection(
                        lambda: conn,
                        self.host,
                        self.port,
                        ssl=self.ssl,
                        server_hostname=self.host if self.ssl is not None else None,
                    )
                elif self.ssl is None:
                    await self._to_proxy(proxy, lambda: conn)
                else:
                    await self._tunnel(proxy, conn, self.ssl)
        except BaseException as e:
            self._opening -= 1
            if conn.transport is not None:
                conn.closed = True
                conn.transport.abort()
            self._wake_one()
            if isinstance(e, ssl.SSLError | ssl.CertificateError):
                reason = _tls_reason(e)
                raise TLSError(
                    f"TLS handshake with {self.host}:{self.port} failed: {reason}", reason
                ) from e
            if isinstance(e, OSError) and not isinstance(e, TimeoutError):
                raise ClientConnectorError(
                    f"Cannot connect to host {self.host}:{self.port}: {e}"
                ) from e
            raise
        self._opening -= 1
        if conn.closed:  # lost during the handshake's last moments
            raise ClientConnectorError(f"Cannot connect to host {self.host}:{self.port}")
        self._conns.add(conn)
        return conn

    async def _to_proxy(
        self, proxy: Proxy, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.Transport:
        try:
            transport, _ = await self.loop.create_connection(factory, proxy.host, proxy.port)
        except OSError as e:
            if isinstance(e, TimeoutError):
                raise
            raise ClientProxyConnectionError(
                f"Cannot connect to proxy {proxy.host}:{proxy.port}: {e}"
            ) from e
        return transport

    async def _tunnel(self, proxy: Proxy, conn: _Conn, context: ssl.SSLContext) -> None:
        """CONNECT through the proxy, then TLS with the origin inside the tunnel."""
        tunnel = _Tunnel(self.loop)
        raw = await self._to_proxy(proxy, lambda: tunnel)
        try:
            target = f"{self.host}:{self.port}"
            if ":" in self.host:
                target = f"[{self.host}]:{self.port}"
            auth = f"Proxy-Authorization: {proxy.auth}\r\n" if proxy.auth else ""
            raw.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
            status = await tunnel.reply
            if status != 200:
                raise ClientProxyConnectionError(
                    f"the proxy {proxy.host}:{proxy.port} refused CONNECT {target}: status {status}"
                )
            tls = await self.loop.start_tls(raw, conn, context, server_hostname=self.host)
        except BaseException:
            raw.abort()
            raise
        if tls is None:  # the transport closed during the handshake
            raise ServerDisconnectedError("the proxy closed the tunnel during the TLS handshake")
        # start_tls does not call connection_made: the protocol takes the new transport here.
        conn.connection_made(tls)

    def release(self, conn: _Conn) -> None:
        conn.finished()
        if conn.done and conn.keep_alive and not conn.closed and not self._closed:
            conn.served += 1
            conn.idle_since = self.loop.time()
            conn.chunks = []
            self._idle.append(conn)
            self._wake_one()
        else:
            self.discard(conn, clean=conn.done)

    def discard(self, conn: _Conn, clean: bool) -> None:
        """Closes a connection: gracefully if its reply was whole, else at once."""
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        if conn.transport is not None:
            if clean:
                conn.transport.close()
            else:
                conn.transport.abort()
        self._wake_one()

    def lost(self, conn: _Conn) -> None:
        if not conn.closed:
            conn.closed = True
            self._conns.discard(conn)
            self._wake_one()


class _Tunnel(asyncio.Protocol):
    """A connection to the proxy until its reply to CONNECT (the status) has arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.reply: asyncio.Future[int] = loop.create_future()
        self.data = b""

    def data_received(self, data: bytes) -> None:
        if self.reply.done():
            return  # bytes before TLS started: start_tls fails on the broken handshake
        self.data += data
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            if len(self.data) > 16384:
                self._fail("the proxy's reply to CONNECT is too long")
            return
        line = self.data.split(b"\r\n", 1)[0].split(None, 2)
        if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
            self._fail("the proxy's reply to CONNECT is not HTTP")
        elif len(self.data) > end + 4:
            self._fail("the proxy sent bytes after its reply to CONNECT")
        else:
            self.reply.set_result(int(line[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("the proxy closed the connection before answering CONNECT")

    def _fail(self, message: str) -> None:
        if not self.reply.done():
            self.reply.set_exception(ClientProxyConnectionError(message))


class Proxy(NamedTuple):
    host: str
    port: int
    auth: str  # a Proxy-Authorization value, or ""


def find_proxy(
    base_url: str, proxy_url: str = "", environ: Mapping[str, str] | None = None
) -> Proxy | None:
    """The proxy to reach `base_url` through: `proxy_url` when set ("direct": none), else the
    environment's (HTTPS_PROXY for https, HTTP_PROXY for http, lower case first, unless NO_PROXY
    names the host: urllib.request's rules). Raises ValueError for a proxy URL that is not
    http://host[:port] (the message never repeats the URL: it may hold a password)."""
    parts = urlsplit(base_url)
    if proxy_url == "direct":
        return None
    where = "proxy_url"
    if not proxy_url:
        env = os.environ if environ is None else environ
        proxies = _env_proxies(env)
        proxy_url = proxies.get(parts.scheme, "")
        if not proxy_url:
            return None
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        if _bypass(host, proxies.get("no", "")):
            return None
        where = f"{parts.scheme.upper()}_PROXY"
    if "://" not in proxy_url:
        proxy_url = "http://" + proxy_url  # as curl and urllib read a bare host:port
    p = urlsplit(proxy_url)
    try:
        port = p.port or 80
    except ValueError:
        raise ValueError(f"{where}: not a valid port") from None
    if p.scheme != "http" or not p.hostname:
        raise ValueError(f"{where}: only http://[user:password@]host[:port] proxies are supported")
    auth = ""
    if p.username is not None:
        user_pass = f"{unquote(p.username)}:{unquote(p.password or '')}"
        auth = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
    return Proxy(p.hostname, port, auth)


def _env_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """urllib.request.getproxies_environment() over `environ`: lower case names win."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        key = name.lower()
        if value and key.endswith("_proxy") and (name == key or key[:-6] not in found):
            found[key[:-6]] = value
    return found


def _bypass(host: str, no_proxy: str) -> bool:
    """urllib.request.proxy_bypass_environment: NO_PROXY is "*" or a comma-separated list of
    host names, domain suffixes (with or without a leading dot) and host:port pairs."""
    if no_proxy.strip() == "*":
        return True
    host = host.lower()
    hostonly = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    for name in no_proxy.split(","):
        name = name.strip().lstrip(".").lower()
        if name and (
            name in (host, hostonly) or host.endswith("." + name) or hostonly.endswith("." + name)
        ):
            return True
    return False


def tls_context(ca_file: str) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only those in `ca_file` (PEM). Raises
    ValueError naming the file when it cannot be read."""
    if not ca_file:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"cannot load CA certificates from {ca_file}: {detail}") from None


def _tls_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    return str(e) or type(e).__name__


def _check(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise ValueError(f"line break in an HTTP header or path: {text!r}")
    return text
