"""The PostgreSQL store: the same `Store` over asyncpg, through the one database layer
(`tokenhub.db.database.PgDatabase`, its `Tx` and the one migration runner).

The store's callers are synchronous threads (the sink's writer thread, `asyncio.to_thread` for
key and limit reloads, the CLI), while asyncpg lives on an event loop. So a `PgStore` owns a
daemon thread running a private loop with the connection pool on it; each method hands its
transaction to that loop and waits for the result. The gateway's own loop never waits on it,
as with SQLite. Several threads may call at once: each transaction takes its own pooled
connection (at most `max_connections`).

What differs from SQLite, and why:

- **Usage inserts are one statement per batch**: `INSERT ... SELECT FROM unnest($1::text[],
  ...) ON CONFLICT (request_id) DO NOTHING`, the batch's columns bound as arrays. Its status
  says how many rows were new; only when fewer than the batch (a replay) are the stored rows
  fetched (`request_id = ANY($1)`) and compared field by field, as on SQLite.
- **Export pages by key**: `iter_events` reads 1000 rows at a time after the last
  (ts_ms, request_id) seen, each page its own short read (no transaction or cursor held open
  while the caller writes a file); the (ts_ms, request_id) index serves every page.
- **`sync()` is True at once**: a committed PostgreSQL transaction is durable (WAL flushed at
  commit under the default synchronous_commit), so the journal may drop what it committed.
- Values PostgreSQL refuses that SQLite takes (status or attempts beyond 32 bits, NUL in text)
  make an event unstorable for good: InvalidEvents names them, the sink sets them aside.

Performance notes (benches/bench_store_engines.py, 20k events, 2-core VM, PostgreSQL 15 on the
same machine; CPU of the gateway's process, all threads): 26 µs per event in batches of 50 and
9.2 µs in batches of 1000, against SQLite's 13.9 and 5.3 in the same run; wall time 80 / 33 µs
(a round trip per batch, the server's work). Off the response path, as on SQLite: the sink's
writer thread waits, the event loop does not. Not tried yet: COPY into a temporary table.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import msgspec

from tokenhub.db.database import DatabaseError, PgDatabase, Tx
from tokenhub.db.migrate import apply_migrations, where_is
from tokenhub.store.base import InsertResult, InvalidEvents, StoreError, event_problem
from tokenhub.store.sql import TxStore
from tokenhub.usage import EVENT_FIELDS, UsageEvent

T = TypeVar("T")

_PG_TYPES = {
    "ts_ms": "bigint",
    "stream": "boolean",
    "input_tokens": "bigint",
    "cached_input_tokens": "bigint",
    "output_tokens": "bigint",
    "cache_write_tokens": "bigint",
    "status": "integer",
    "latency_ms": "double precision",
    "ttft_ms": "double precision",
    "attempts": "integer",
}
_COLS = ", ".join(EVENT_FIELDS)
_INSERT = (
    f"INSERT INTO usage_events ({_COLS}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{_PG_TYPES.get(f, 'text')}[]" for i, f in enumerate(EVENT_FIELDS, 1))
    + ") ON CONFLICT (request_id) DO NOTHING"
)
_INT32 = ("status", "attempts")
_TEXT = tuple(f for f in EVENT_FIELDS if f not in _PG_TYPES)
_PAGE = 1000
_MIN, _MAX = -(2**63), 2**63 - 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def pg_event_problem(event: object) -> str | None:
    """`event_problem`, plus what PostgreSQL refuses and SQLite takes."""
    why = event_problem(event)
    if why is not None or not isinstance(event, UsageEvent):
        return why
    for f in _INT32:
        if not -(2**31) <= getattr(event, f) < 2**31:
            return f"{f} is out of the 32-bit range"
    for f in _TEXT:
        if "\x00" in getattr(event, f):
            return f"{f} holds a NUL character"
    return None


def _row_event(row: Sequence[Any]) -> UsageEvent:
    return UsageEvent(**dict(zip(EVENT_FIELDS, row, strict=True)))


class PgStore(TxStore):
    """`Store` on one PostgreSQL database. See the module docstring."""

    def __init__(self, url: str, *, max_connections: int = 4) -> None:
        self.url = url
        self.path = where_is(url)  # for messages: never the password
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tokenhub-store-pg")
        self._thread.daemon = True
        self._thread.start()
        self._closed = False
        try:
            self._db = self._call(lambda: PgDatabase.connect(url, max_size=max_connections))
        except BaseException:
            self._stop()
            raise

    # -- the loop thread -------------------------------------------------------------------

    def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Runs `make()` on the store's loop and waits for it; DatabaseError -> StoreError."""
        if self._closed:
            raise StoreError("the store is closed")

        async def run() -> T:
            return await make()

        fut: Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return fut.result()
        except DatabaseError as e:
            msg = _one_line(e)
            if "does not exist" in msg and "relation" in msg:
                msg = f"{msg} (the database has no tokenhub schema: run migrate)"
            raise StoreError(f"database {self.path}: {msg}") from e

    def _write(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        return self._call(lambda: self._db.transaction(fn))

    def _read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        return self._call(lambda: self._db.read(fn))

    def _stop(self) -> None:
        self._closed = True
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    # -- schema ----------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        return self._call(lambda: apply_migrations(self._db))

    # -- usage events ----------------------------------------------------------------------

    def insert_events(self, events: Sequence[UsageEvent]) -> InsertResult:
        if not events:
            return InsertResult(0, 0, 0)

        async def insert(tx: Tx) -> tuple[int, list[str]]:
            rows = [msgspec.structs.astuple(e) for e in events]
            if any(len(r) != len(EVENT_FIELDS) for r in rows):
                raise TypeError("an event of another shape than UsageEvent")
            inserted = await tx.execute(_INSERT, *map(list, zip(*rows, strict=True)))
            conflicts: list[str] = []
            if inserted < len(events):
                ids = list(dict.fromkeys(e.request_id for e in events))
                stored = {
                    r[0]: r
                    for r in await tx.fetch(
                        f"SELECT {_COLS} FROM usage_events WHERE request_id = ANY($1::text[])",
                        ids,
                    )
                }
                conflicts = [
                    e.request_id
                    for e in events
                    if stored[e.request_id] != msgspec.structs.astuple(e)
                ]
            return inserted, conflicts

        try:
            inserted, conflict_ids = self._write(insert)
        except (StoreError, TypeError, OverflowError, ValueError) as e:
            # As on SQLite: what can never be stored is named, so the sink sets it aside;
            # anything else (connection lost, server down) is transient and propagates.
            bad = [(ev, why) for ev in events if (why := pg_event_problem(ev)) is not None]
            if bad:
                raise InvalidEvents(bad) from e
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot insert usage events: {_one_line(e)}") from e
        return InsertResult(
            inserted=inserted,
            duplicates=len(events) - inserted - len(conflict_ids),
            conflicts=len(conflict_ids),
            conflict_ids=tuple(conflict_ids),
        )

    def iter_events(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> Iterator[UsageEvent]:
        lo = _MIN if since_ms is None else since_ms
        hi = _MAX if until_ms is None else until_ms
        after: tuple[int, str] | None = None
        while True:

            async def page(tx: Tx, after: tuple[int, str] | None = after) -> list[Any]:
                if after is None:
                    return await tx.fetch(
                        f"SELECT {_COLS} FROM usage_events WHERE ts_ms >= $1 AND ts_ms < $2 "
                        f"ORDER BY ts_ms, request_id LIMIT {_PAGE}",
                        lo,
                        hi,
                    )
                return await tx.fetch(
                    f"SELECT {_COLS} FROM usage_events WHERE ts_ms < $1 "
                    "AND (ts_ms, request_id) > ($2::bigint, $3::text) "
                    f"ORDER BY ts_ms, request_id LIMIT {_PAGE}",
                    hi,
                    *after,
                )

            rows = self._read(page)
            for row in rows:
                yield _row_event(row)
            if len(rows) < _PAGE:
                return
            after = (rows[-1][1], rows[-1][0])

    def count_events(self) -> int:
        return int(self._read(lambda tx: tx.fetchval("SELECT count(*) FROM usage_events")))

    def sync(self) -> bool:
        return True

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._call(self._db.close)
        self._stop()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
