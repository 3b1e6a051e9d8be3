"""One async database interface for the ledger, on SQLite (default) or PostgreSQL (asyncpg).

    db = await open_database("sqlite:///./tokenhub.db")     # or "postgresql://user@host/db"
    result = await db.transaction(lambda tx: do_work(tx))    # BEGIN ... COMMIT, or ROLLBACK

The ledger's logic is written once, against `Tx`: `execute`, `executemany`, `fetch`, `fetchrow`,
`fetchval`, with PostgreSQL-style `$1` placeholders (SQLite accepts the same numbered form as
`?1`, translated once per statement) and plain SQL both engines accept. Where they differ the
`Tx` says so: `tx.for_update` is `" FOR UPDATE"` on PostgreSQL and empty on SQLite.

Isolation and concurrency:

- **SQLite**: one connection owned by one worker thread, running its own event loop; each
  transaction (`BEGIN IMMEDIATE`) runs start to finish there, one at a time, so SQLite never
  blocks the caller's loop and writers never interleave. Other processes wait on the file lock
  (busy_timeout). `read` runs a read-only transaction (`BEGIN DEFERRED`: a WAL snapshot, no
  write lock), so a long read, or a reader stopped halfway (SIGSTOP), never blocks a writer.
- **PostgreSQL**: a pool of connections, each transaction READ COMMITTED on its own connection.
  Constrained balances are protected by row locks (`SELECT ... FOR UPDATE`, taken in account-id
  order so that two settlements cannot deadlock) and by a conditional update that refuses to go
  below an account's floor. Deadlocks and serialization failures are retried. Every session
  has `idle_in_transaction_session_timeout` (IDLE_IN_TRANSACTION_MS): a client cut off in the
  middle of a transaction (a silent network partition drops its packets, its FIN too) would
  otherwise leave PostgreSQL waiting for it, holding its row locks, until TCP keepalive
  notices (hours by default), stalling every other host; this way PostgreSQL ends the session
  and frees them. tokenhub never idles in a transaction: its transactions are a few
  statements with Python work between them, not user think time.

Both run the same migrations (`tokenhub.db.schema.MIGRATIONS`, applied by the one runner,
`tokenhub.db.migrate`), so a database made by the gateway's store and one made here are the
same database. The URL rules (`is_postgres`, `sqlite_path`) live here too, for every opener.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Row = tuple[Any, ...]

IDLE_IN_TRANSACTION_MS = 5_000


# The client's side of the same: a connection whose data goes unacknowledged this long
# (TCP_USER_TIMEOUT), or that answers no keepalive probe, is closed, so a call made just before
# a silent partition fails instead of waiting forever for its reply (a server-side timeout ends
# the session, but its FIN is dropped too). A long query is not cut: its bytes are acknowledged.
CLIENT_USER_TIMEOUT_MS = 15_000
# A connection attempt gives up after this (asyncpg's default, 60 s, would leave a host that
# started connecting during a partition waiting long after the network is back).
CONNECT_TIMEOUT_S = 10.0


def tune_pg_socket(conn: Any) -> None:
    """Keepalives and TCP_USER_TIMEOUT on an asyncpg connection's socket (Linux; elsewhere,
    whatever of it the platform has)."""
    import socket

    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", 10),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", CLIENT_USER_TIMEOUT_MS),
    ):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def pg_session_settings() -> dict[str, str]:
    """What every tokenhub session on PostgreSQL sets: the idle-in-transaction timeout above,
    and TCP keepalives that find a client gone silent (a partitioned host) within about 25 s,
    so PostgreSQL ends its session and frees what it holds (row locks, a settler's advisory
    locks on its tenant partitions) instead of waiting hours for the kernel's default.

    And no JIT: tokenhub's statements are short, but a summing query over a large table (a
    correlated sum through an index, a rollup read) can have a planned cost past
    jit_above_cost, and compiling it then took 170 ms for a query that ran in 0.5 ms (the
    console's overruns page and overview with 1M events)."""
    return {
        "jit": "off",
        "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS),
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "3",
    }


DEFAULT_DATABASE = "tokenhub.db"


class DatabaseError(Exception):
    """The database could not be opened or a statement failed (the message says which)."""


def is_postgres(url: str | None) -> bool:
    """A `postgresql://` or `postgres://` URL (anything else names a SQLite file)."""
    return url is not None and url.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """`url` for a message or a log line: a URL's password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def sqlite_path(url: str | None) -> str:
    """The SQLite file for a `sqlite:///abs/path.db` URL or a plain path (default
    ./tokenhub.db). `sqlite:///x.db` is the absolute path /x.db, as in any file URL."""
    url = url or DEFAULT_DATABASE
    if "://" not in url:
        if url == ":memory:":
            raise DatabaseError("an in-memory database cannot be shared; give a file path")
        return url
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "sqlite":
        raise DatabaseError(
            f"unsupported database URL scheme {scheme!r} (use a SQLite path, "
            "sqlite:///ABSOLUTE/PATH or postgresql://...)"
        )
    if not rest.startswith("/") or rest == "/":
        shown = repr(url[:80]) + ("..." if len(url) > 80 else "")
        raise DatabaseError(
            f"bad database URL {shown}: use sqlite:///ABSOLUTE/PATH.db or a plain path"
        )
    return rest


def drive(coro: Awaitable[T]) -> T:
    """Run a coroutine that never suspends (store logic over a `_SqliteTx`, whose methods
    are synchronous underneath) to its result, without an event loop."""
    it = coro.__await__()
    try:
        it.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    it.close()
    raise RuntimeError("drive(): the coroutine suspended (it awaited real I/O)")


class Tx(Protocol):
    dialect: str
    for_update: str

    async def execute(self, sql: str, *args: Any) -> int: ...
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...


class Database(Protocol):
    dialect: str
    url: str

    async def transaction(self, fn: Callable[[Tx], Awaitable[T]]) -> T: ...
    async def read(self, fn: Callable[[Tx], Awaitable[T]]) -> T: ...
    async def migrate(self) -> list[int]: ...
    async def close(self) -> None: ...


async def open_database(url: str, *, migrate: bool = True) -> Database:
    """SQLite for a path or `sqlite:///...` URL, PostgreSQL for `postgresql://` /
    `postgres://`. Applies pending migrations unless `migrate=False`."""
    db: Database
    if is_postgres(url):
        db = await PgDatabase.connect(url)
    else:
        db = SqliteDatabase(url)
    if migrate:
        try:
            await db.migrate()
        except BaseException:
            await db.close()
            raise
    return db


# -- SQLite ------------------------------------------------------------------------------------

_PARAM = re.compile(r"\$(\d+)")


class _SqliteTx:
    dialect = "sqlite"
    for_update = ""

    def __init__(self, conn: sqlite3.Connection, cache: dict[str, str]) -> None:
        self._conn = conn
        self._cache = cache

    def _sql(self, sql: str) -> str:
        s = self._cache.get(sql)
        if s is None:
            s = self._cache[sql] = _PARAM.sub(r"?\1", sql)
        return s

    async def execute(self, sql: str, *args: Any) -> int:
        return self._conn.execute(self._sql(sql), args).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(self._sql(sql), rows)

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Plain bulk INSERT (no conflict handling)."""
        marks = ", ".join("?" * len(columns))
        self._conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._conn.execute(self._sql(sql), args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self._conn.execute(self._sql(sql), args).fetchone()
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._conn.execute(self._sql(sql), args).fetchone()
        return None if row is None else row[0]


_SHARED_CACHE: dict[str, str] = {}


def sqlite_tx(conn: sqlite3.Connection) -> Tx:
    """A `Tx` over a sqlite3 connection the caller holds (and has begun a transaction on, if
    it writes): for synchronous code, with `drive`."""
    return _SqliteTx(conn, _SHARED_CACHE)


class SqliteDatabase:
    """See the module docstring. `url` is a path, `sqlite:///abs`, `sqlite:///./rel` or
    `:memory:`."""

    dialect = "sqlite"

    def __init__(self, url: str, *, busy_timeout_ms: int = 10_000) -> None:
        self.url = url
        self.path = sqlite_path(url) if url != ":memory:" else url
        self._busy_timeout_ms = busy_timeout_ms
        self._cache: dict[str, str] = {}
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._error: BaseException | None = None
        self._lock: asyncio.Lock | None = None
        self._thread = threading.Thread(target=self._run, name="tokenhub-ledger-db", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise DatabaseError(f"cannot open {self.path}: {self._error}") from self._error

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL").fetchall()
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn = conn
            self._loop = asyncio.new_event_loop()
            self._lock = asyncio.Lock()
        except BaseException as e:  # reported by __init__
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()
            conn.close()

    async def _in_thread(
        self, fn: Callable[[Tx], Awaitable[T]], begin: str = "BEGIN IMMEDIATE"
    ) -> T:
        assert self._conn is not None and self._lock is not None
        async with self._lock:
            conn = self._conn
            conn.execute(begin)
            try:
                result = await fn(_SqliteTx(conn, self._cache))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    async def transaction(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        if self._loop is None or self._loop.is_closed():
            raise DatabaseError("the database is closed")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(self._in_thread(fn), self._loop)
        try:
            return await asyncio.wrap_future(fut)
        except sqlite3.Error as e:
            raise DatabaseError(f"{self.path}: {e}") from e

    async def read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        """A transaction that only reads: a WAL snapshot, without the write lock, so other
        processes (the gateway's usage writes) never wait for it."""
        if self._loop is None or self._loop.is_closed():
            raise DatabaseError("the database is closed")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(
            self._in_thread(fn, "BEGIN DEFERRED"), self._loop
        )
        try:
            return await asyncio.wrap_future(fut)
        except sqlite3.Error as e:
            raise DatabaseError(f"{self.path}: {e}") from e

    def run_sync(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        """`transaction` for callers without an event loop (a thread, the CLI)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._in_thread(fn), self._loop).result()

    async def migrate(self) -> list[int]:
        from tokenhub.db.migrate import apply_migrations

        return await apply_migrations(self)

    async def close(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)


# -- PostgreSQL -------------------------------------------------------------------------------


class _PgTx:
    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._conn.execute(sql, *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, list(rows))

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Plain bulk INSERT: COPY, one round trip and no per-row statement work."""
        if rows:
            await self._conn.copy_records_to_table(table, records=rows, columns=list(columns))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [tuple(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        r = await self._conn.fetchrow(sql, *args)
        return None if r is None else tuple(r)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)


async def _init_connection(conn: Any) -> None:
    tune_pg_socket(conn)


class PgDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, pool: Any) -> None:
        self.url = url
        self._pool = pool

    @classmethod
    async def connect(cls, url: str, *, min_size: int = 1, max_size: int = 20) -> PgDatabase:
        try:
            import asyncpg  # type: ignore[import-untyped]
        except ImportError:
            raise DatabaseError(
                "PostgreSQL needs the asyncpg package: pip install 'tokenhub[postgres]'"
            ) from None
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                server_settings=pg_session_settings(),
                init=_init_connection,
                timeout=CONNECT_TIMEOUT_S,
            )
        except (OSError, asyncpg.PostgresError) as e:
            raise DatabaseError(f"cannot connect to PostgreSQL: {e}") from e
        return cls(url, pool)

    async def transaction(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        import asyncpg

        for attempt in range(8):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    return await fn(_PgTx(conn))
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as e:
                if attempt == 7:
                    raise DatabaseError(f"PostgreSQL: {e}") from e
                await asyncio.sleep(0.001 * 2**attempt)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
                raise DatabaseError(f"PostgreSQL: {e}") from e
        raise AssertionError("unreachable")

    async def read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        """A transaction that only reads (READ COMMITTED takes no locks to read)."""
        return await self.transaction(fn)

    async def migrate(self) -> list[int]:
        from tokenhub.db.migrate import apply_migrations

        return await apply_migrations(self)

    async def close(self) -> None:
        await self._pool.close()
