"""The SQLite store: stdlib sqlite3, WAL, one connection per thread.

Tenants, keys, limits, the audit log and migrations are store/sql.py's, written once over
`db.Tx` for both engines and run here over this thread's connection (`drive`: the sqlite3
calls underneath never suspend); usage inserts, export and `sync` are SQLite's own.

Thread-safety: a `SQLiteStore` is shared freely between threads; each thread gets its own
connection on first use (threading.local), so threads never share a cursor or a transaction.
SQLite serialises writers itself: every write is `BEGIN IMMEDIATE` (take the write lock up
front, so two writers never deadlock on a lock upgrade) and waits up to `busy_timeout_ms` for
another writer (thread or process) to finish. `close()` closes every thread's connection.

Pragmas: WAL (readers never block the writer, and the server's key polls never block usage
writes), synchronous=NORMAL (a commit costs no fsync; on power loss the last commits can roll
back, which is why `sync()` exists: the journal keeps events until a checkpoint made them
durable), foreign_keys=ON, busy_timeout.

Performance notes (2-core VM, ext4, 1000-event batches, 300k rows): insert_events runs
~120-240k events/s when request ids grow with time (sequential or timestamp-prefixed) and
~30k/s with uuid4 ids under default pragmas: random keys dirty pages all over the primary-key
index and every checkpoint writes and fsyncs them. cache_size 64 MiB + wal_autocheckpoint
10000 pages bring uuid4 ids to ~45-80k/s. Either is 10x what one gateway process serves.
Duplicate/conflict detection costs nothing on the insert path: only when fewer rows than
events were inserted (a replay) does a second pass fetch the stored rows by primary key and
compare them field by field (~8 ms per 1000 duplicates).

CPU per event (the writer thread shares the cores with the event loop; benches/bench_store.py,
SQLite 3.40, 200k rows, time-ordered ids, 20 tenants): ~6.7 µs in batches of 50 and ~3.4 µs in
batches of 1000, plus ~1.3 / ~0.7 µs for sync() every 10k events. Events go in multi-row
INSERTs of up to 64 rows: one statement per row (executemany) cost 7.6 / 4.5 µs, as every row
paid the statement's reset, its loop in Python's sqlite3 and the opening of four b-tree
cursors; 32 to 512 rows per statement measure the same. They must be INSERT OR ROLLBACK (see
_insert_rows): without it the statement journal made them slower than executemany (11 µs at
50). What is left in small batches is the commit: the WAL gets every page the batch dirtied
(~44 for 50 events, 31 of them in the (tenant, ts_ms) index: one leaf per tenant in the batch),
two pwrites each, ~150 µs per commit.
Measured and dropped: one INSERT ... SELECT FROM json_each(?) of msgspec-encoded rows (17.6 /
10.8 µs: SQLite's JSON functions cost more than binding), WITHOUT ROWID (8.7 / 3.6 µs: index
b-trees split to 2/3-full pages where a rowid table appends, and the secondary indexes carry
the 36-byte key), page_size 2048 or 8192, mmap_size, temp_store=MEMORY, wal_autocheckpoint
2000 or 40000 (all within noise or worse).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import msgspec

from tokenhub.db.database import DatabaseError, Tx, drive, sqlite_tx
from tokenhub.db.migrate import migrate_tx, up_to_date
from tokenhub.store.base import (
    InsertResult,
    InvalidEvents,
    StoreError,
    _quote,
    event_problem,
    iter_chunks,
)
from tokenhub.store.sql import TxStore
from tokenhub.usage import EVENT_FIELDS, UsageEvent

T = TypeVar("T")

_COLS = ", ".join(EVENT_FIELDS)
_ROW = f"({', '.join('?' * len(EVENT_FIELDS))})"
_INSERT_EVENT = (
    f"INSERT INTO usage_events ({_COLS}) VALUES {_ROW} ON CONFLICT (request_id) DO NOTHING"
)
# Rows per INSERT statement, largest first: a batch of n events takes n // 64 statements
# plus one per bit of n % 64, and each connection prepares (once, ~1 ms in all) only these 7.
_ROWS_PER_INSERT = (64, 32, 16, 8, 4, 2, 1)
_WIDTH = len(EVENT_FIELDS)  # values per row


def _insert_rows(n: int) -> str:
    # OR ROLLBACK: a multi-row INSERT that may abort halfway (a NOT NULL column given None)
    # must undo its own earlier rows, so SQLite keeps a statement journal, a copy of every
    # page it touches: that copy costs more than the multi-row statement saves. A failure
    # that rolls back the whole transaction instead needs no such copy, and insert_events
    # rolls back the whole batch on any error anyway.
    return (
        f"INSERT OR ROLLBACK INTO usage_events ({_COLS}) VALUES {', '.join([_ROW] * n)} "
        "ON CONFLICT (request_id) DO NOTHING"
    )


_IN_CHUNK = 500  # ids per IN (...) list: well under every SQLite build's variable limit


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _row_event(row: Sequence[Any]) -> UsageEvent:
    fields = dict(zip(EVENT_FIELDS, row, strict=True))
    fields["stream"] = bool(fields["stream"])
    return UsageEvent(**fields)


class SQLiteStore(TxStore):
    """`Store` on one SQLite file. See the module docstring for threads and pragmas."""

    def __init__(self, path: str, *, create: bool = True, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        if not create and not os.path.exists(path):
            raise StoreError(f"no database at {_quote(path)}")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        conn = self._conn()  # fail now (bad path, not a database), not on first use
        # (rows, INSERT statement) pairs, within this SQLite build's limit on bound values
        # (32766 by default since 3.32; 999 before).
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._inserts = tuple((n, _insert_rows(n)) for n in _ROWS_PER_INSERT if n * _WIDTH <= limit)

    # -- connections and transactions ------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # only so close() may close it from another thread
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open database {_quote(self.path)}: {_one_line(e)}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Random request ids scatter inserts over the primary-key index: a bigger page
            # cache (allocated only as used) and fewer, larger checkpoints (~40 MiB of WAL)
            # double insert throughput (see the performance notes).
            conn.execute("PRAGMA cache_size = -65536")
            conn.execute("PRAGMA wal_autocheckpoint = 10000")
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"cannot open database {_quote(self.path)}: {_one_line(e)}") from e
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError("the store is closed")
            conn = self._connect()
            with self._conns_lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3 errors become one-line StoreErrors."""
        try:
            yield
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY:
                # A file SQLite could only open read-only stays read-only on that connection:
                # open a new one next time, so writes work again once the file is writable.
                self._drop_conn()
            msg = _one_line(e)
            if msg.startswith("no such table"):
                msg = f"{msg} (the database has no tokenhub schema: run migrate)"
            raise StoreError(f"database {_quote(self.path)}: {msg}") from e
        except DatabaseError as e:  # the migration runner's (a newer schema)
            raise StoreError(str(e)) from e

    def _drop_conn(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._conns_lock:
            if conn in self._conns:
                self._conns.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        with self._errors():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _write(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        with self._tx() as conn:
            return drive(fn(sqlite_tx(conn)))

    def _read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        with self._errors():
            return drive(fn(sqlite_tx(self._conn())))

    # -- schema ----------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """The one runner (tokenhub.db.migrate) over this store's connection: a read first,
        the write lock only when something is missing."""
        where = _quote(self.path)
        if self._read(lambda tx: up_to_date(tx, where)):
            return []
        return self._write(lambda tx: migrate_tx(tx, where))

    # -- usage events ----------------------------------------------------------------------

    def insert_events(self, events: Sequence[UsageEvent]) -> InsertResult:
        if not events:
            return InsertResult(0, 0, 0)
        try:
            with self._tx() as conn:
                inserted = self._insert(conn, events)
                conflict_ids: list[str] = []
                if inserted < len(events):
                    conflict_ids = self._conflicts(conn, events)
        except (StoreError, TypeError, OverflowError, ValueError) as e:
            # Data that SQLite refuses (a NOT NULL column given None, an int beyond 64 bits)
            # would fail every retry: name the offenders so the caller can set them aside.
            # Anything else (locked, disk full) is transient and propagates as it is.
            bad = [(ev, why) for ev in events if (why := event_problem(ev)) is not None]
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

    def _insert(self, conn: sqlite3.Connection, events: Sequence[UsageEvent]) -> int:
        """Insert what is new; returns the number of rows inserted."""
        if set(map(type, events)) != {UsageEvent}:
            # Something else slipped in (a subclass with more fields, a dict): one row per
            # statement, so a row of the wrong width fails on its own, as it always did;
            # astuple raises TypeError for what is not a Struct. event_problem() names them.
            rows = [msgspec.structs.astuple(e) for e in events]
            return int(conn.executemany(_INSERT_EVENT, rows).rowcount)
        # All exactly UsageEvents: every row has len(EVENT_FIELDS) values, so their
        # concatenation binds to a multi-row INSERT (see the performance notes).
        params = list(itertools.chain.from_iterable(map(msgspec.structs.astuple, events)))
        cur = conn.cursor()
        inserted = start = 0
        left = len(events)
        for n, sql in self._inserts:
            while left >= n:
                end = start + n * _WIDTH
                cur.execute(sql, params[start:end])
                inserted += cur.rowcount
                start, left = end, left - n
        cur.close()
        return inserted

    @staticmethod
    def _conflicts(conn: sqlite3.Connection, events: Sequence[UsageEvent]) -> list[str]:
        """Request ids whose stored row differs from the event (after the insert, every id
        exists: an equal row was either just inserted or already there)."""
        stored: dict[str, tuple[Any, ...]] = {}
        for chunk in iter_chunks(dict.fromkeys(e.request_id for e in events), _IN_CHUNK):
            marks = ", ".join("?" * len(chunk))
            for r in conn.execute(
                f"SELECT {_COLS} FROM usage_events WHERE request_id IN ({marks})", chunk
            ):
                stored[r[0]] = r
        # Tuple equality treats the stored 0/1 as False/True and NULL as None.
        return [e.request_id for e in events if stored[e.request_id] != msgspec.structs.astuple(e)]

    def iter_events(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> Iterator[UsageEvent]:
        where, params = [], []
        if since_ms is not None:
            where.append("ts_ms >= ?")
            params.append(since_ms)
        if until_ms is not None:
            where.append("ts_ms < ?")
            params.append(until_ms)
        sql = f"SELECT {_COLS} FROM usage_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts_ms, request_id"
        with self._errors():
            cur = self._conn().execute(sql, params)
            try:
                while rows := cur.fetchmany(1000):
                    for row in rows:
                        yield _row_event(row)
            finally:
                cur.close()

    def count_events(self) -> int:
        with self._errors():
            return int(self._conn().execute("SELECT count(*) FROM usage_events").fetchone()[0])

    def sync(self) -> bool:
        with self._errors():
            busy, log, done = self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        # (0, n, n): every WAL frame is in the database file, and the file was fsynced.
        return bool(busy == 0 and log == done)

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
