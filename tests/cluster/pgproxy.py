"""A TCP proxy in front of a PostgreSQL that can lose the reply of a lease grant (issue 13:
"a lease grant whose reply is lost and replayed after healing is applied once").

`PgProxy` listens on 127.0.0.1 (an ephemeral port) and forwards every connection, byte for
byte, to the PostgreSQL behind it, on an event loop in a thread of its own. It watches what
clients send (the PostgreSQL wire protocol, v3): the untyped startup messages (an SSLRequest
first, answered 'N' by a server without TLS), then typed messages, of which three matter:

- Parse ('P': statement name, query): remembers whether a named (or the unnamed) statement is
  an `INSERT INTO budget_leases` (asyncpg prepares a statement once and binds it many times);
- Bind ('B': portal, statement, parameter formats, parameters): a bind of such a statement
  puts the connection's transaction among those that grant a lease, and its first parameter
  is the lease id (text: the same bytes in either format);
- Query ('Q': simple protocol, which asyncpg uses for BEGIN, COMMIT and ROLLBACK): a COMMIT (or
  END) ends the transaction; ROLLBACK, ABORT or BEGIN forget it.

`arm()` makes the next granting transaction's COMMIT the cut: the proxy forwards that COMMIT
and from then on drops every byte the server sends on that connection, silently (the client's
socket stays open and its bytes are still forwarded: the commit happens, its reply never
arrives; a silent partition of one direction, as when the answer's packets are lost). A
server FIN on that connection is withheld too. `heal()` ends it the way a broken network
eventually does: the connection is reset (RST to the client) and closed to the server.
Every other connection is untouched throughout.

Bounded: at most MAX_CONNECTIONS at once (more are refused), reads of READ_SIZE, a message
parsed only if it is one of the three above and at most MAX_PARSED bytes long (the rest are
counted past, never buffered); `close()` (or leaving the `with` block) resets every
connection, stops the listener and the loop, and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MAX_CONNECTIONS = 256
READ_SIZE = 65536
MAX_PARSED = 1 << 20  # a Parse, Bind or Query longer than this is forwarded unparsed
CONNECT_TIMEOUT_S = 10.0

MARK = "INSERT INTO BUDGET_LEASES"
PROTOCOL_3 = 196608  # the StartupMessage's version (3.0)
PRE_STARTUP = {80877102, 80877103, 80877104}  # CancelRequest, SSLRequest, GSSENCRequest


def _cstring(body: bytes, at: int) -> tuple[str, int]:
    end = body.index(b"\0", at)
    return body[at:end].decode("utf-8", "replace"), end + 1


def _first_param(body: bytes, at: int) -> str | None:
    """The first parameter of a Bind whose portal and statement names end at `at`."""
    (nformats,) = struct.unpack_from("!h", body, at)
    at += 2 + 2 * nformats
    (nparams,) = struct.unpack_from("!h", body, at)
    at += 2
    if nparams < 1:
        return None
    (size,) = struct.unpack_from("!i", body, at)
    if size < 0:
        return None
    return body[at + 4 : at + 4 + size].decode("utf-8", "replace")


def _keyword(sql: str) -> str:
    head = sql.lstrip().split(None, 1)
    return head[0].rstrip(";").upper() if head else ""


class Watcher:
    """What one connection's client sends, parsed as it streams by: `feed` each chunk, in
    order; it returns the lease ids of a granting transaction whose COMMIT is in the chunk."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.skip = 0  # bytes of a message not parsed, still to come
        self.started = False  # past the untyped startup messages
        self.broken = False  # not PostgreSQL v3 as expected: forwarded, no longer parsed
        self.statements: dict[str, bool] = {}  # prepared statement -> an INSERT of a lease
        self.granting = False  # the open transaction inserted a lease
        self.lease_ids: list[str] = []  # the ids it inserted (Bind parameters)

    def feed(self, data: bytes) -> list[list[str]]:
        commits: list[list[str]] = []
        if self.broken:
            return commits
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
        self.buf += data
        try:
            while self._one(commits):
                pass
        except (ValueError, struct.error, IndexError):
            self.broken = True
            self.buf.clear()
        return commits

    def _one(self, commits: list[list[str]]) -> bool:
        """Consumes one message (or the start of one to skip); False: needs more bytes."""
        buf = self.buf
        if self.skip or not buf:
            return False
        if not self.started:
            if len(buf) < 8:
                return False
            size, code = struct.unpack_from("!ii", buf, 0)
            if size < 8 or size > MAX_PARSED:
                raise ValueError("not a startup message")
            if len(buf) < size:
                return False
            del buf[:size]
            if code == PROTOCOL_3:
                self.started = True
            elif code not in PRE_STARTUP:
                raise ValueError(f"startup code {code}")
            return True
        if len(buf) < 5:
            return False
        kind = chr(buf[0])
        (size,) = struct.unpack_from("!i", buf, 1)
        if size < 4:
            raise ValueError(f"message {kind!r} of length {size}")
        total = 1 + size
        if kind not in "PBQ" or size > MAX_PARSED:
            n = min(total, len(buf))
            del buf[:n]
            self.skip = total - n
            return True
        if len(buf) < total:
            return False
        body = bytes(buf[5:total])
        del buf[:total]
        if kind == "P":
            name, at = _cstring(body, 0)
            query, _ = _cstring(body, at)
            self.statements[name] = MARK in " ".join(query.split()).upper()
        elif kind == "B":
            _, at = _cstring(body, 0)
            statement, at = _cstring(body, at)
            if self.statements.get(statement):
                self.granting = True
                lease_id = _first_param(body, at)
                if lease_id is not None:
                    self.lease_ids.append(lease_id)
        else:
            sql, _ = _cstring(body, 0)
            word = _keyword(sql)
            if MARK in " ".join(sql.split()).upper():
                self.granting = True
            if word in ("COMMIT", "END"):
                if self.granting:
                    commits.append(self.lease_ids)
                self.granting, self.lease_ids = False, []
            elif word in ("ROLLBACK", "ABORT", "BEGIN", "START"):
                self.granting, self.lease_ids = False, []
        return True


@dataclass
class _Conn:
    n: int
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    watcher: Watcher = field(default_factory=Watcher)
    holed: bool = False  # the server's bytes are dropped
    healed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Cut:
    """The connection whose grant's reply the proxy lost."""

    connection: int
    lease_ids: list[str]
    at_ms: int  # wall clock, when its COMMIT was forwarded
    at: float  # monotonic, the same moment
    dropped: int = 0  # the server's bytes dropped on it
    healed_ms: int = 0
    healed_at: float = 0.0


class PgProxy:
    """See the module docstring. `with PgProxy(host, port) as proxy:`; `proxy.url(db)`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.connections = 0  # accepted so far
        self.refused = 0  # over MAX_CONNECTIONS
        self.cut: Cut | None = None
        self.fired = threading.Event()
        self._armed = False
        self._conns: dict[int, _Conn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pgproxy", daemon=True)

    # -- control (from the test's thread) -------------------------------------------------

    def start(self) -> PgProxy:
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._accept, "127.0.0.1", 0, limit=READ_SIZE)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def url(self, database: str, user: str = "tokenhub") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def arm(self) -> None:
        """The next transaction that inserts a lease loses its COMMIT's reply."""

        def set_armed() -> None:
            self._armed = True

        self._loop.call_soon_threadsafe(set_armed)

    def heal(self) -> Cut:
        """Resets the cut connection (a broken network's end); the cut, with its figures."""
        assert self.cut is not None, "heal() before the proxy cut anything"

        async def heal() -> None:
            assert self.cut is not None
            conn = self._conns.get(self.cut.connection)
            self.cut.healed_ms = time.time_ns() // 1_000_000
            self.cut.healed_at = time.monotonic()
            if conn is not None:
                self._reset(conn)

        self._call(heal())
        return self.cut

    def close(self) -> None:
        if self._thread.is_alive():

            async def shut() -> None:
                if self._server is not None:
                    self._server.close()
                for conn in list(self._conns.values()):
                    self._reset(conn)
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

            with contextlib.suppress(Exception):
                self._call(shut(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> PgProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- the loop's side -------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # close(): asyncio's server would log a cancelled connection as an error
        finally:
            self._tasks.discard(task)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            self.refused += 1
            cwriter.close()
            return
        try:
            sreader, swriter = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream, limit=READ_SIZE), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            cwriter.close()
            return
        self.connections += 1
        conn = _Conn(self.connections, cwriter, swriter)
        self._conns[conn.n] = conn
        try:
            up = asyncio.create_task(self._client_to_server(conn, creader))
            down = asyncio.create_task(self._server_to_client(conn, sreader))
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if conn.holed and not up.done():
                # The server hung up on a cut connection: its FIN is lost too (until the
                # heal, or the client hangs up).
                healed = asyncio.create_task(conn.healed.wait())
                await asyncio.wait({up, healed}, return_when=asyncio.FIRST_COMPLETED)
                healed.cancel()
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            del self._conns[conn.n]
            for w in (cwriter, swriter):
                w.close()

    async def _client_to_server(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(READ_SIZE):
                commits = conn.watcher.feed(data)
                if commits and self._armed and not conn.holed:
                    # Dropping starts before the COMMIT goes out: whatever the server sends
                    # from now on is its reply (the client waited for every earlier one).
                    self._armed = False
                    conn.holed = True
                    self.cut = Cut(conn.n, commits[-1], time.time_ns() // 1_000_000,
                                   time.monotonic())  # fmt: skip
                    self.fired.set()
                conn.server.write(data)
                await conn.server.drain()

    async def _server_to_client(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(READ_SIZE):
                if conn.holed:
                    if self.cut is not None and self.cut.connection == conn.n:
                        self.cut.dropped += len(data)
                    continue
                conn.client.write(data)
                await conn.client.drain()

    def _reset(self, conn: _Conn) -> None:
        """RST to the client (SO_LINGER 0), close to the server."""
        sock = conn.client.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.client.transport.abort()
        conn.server.transport.abort()
        conn.healed.set()
