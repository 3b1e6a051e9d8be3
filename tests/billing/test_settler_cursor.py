"""The settler finds pending events through the partial index of unsettled ones (migration 7),
reads without SQLite's write lock, and marks what it settled."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ledger_kit import ms, usage

from tokenhub.billing.io import store_events
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.db.database import Database, Tx, open_database
from tokenhub.db.schema import CREATE_MIGRATIONS_TABLE, MIGRATIONS
from tokenhub.usage import UsageEvent


async def _priced(b: Billing) -> None:
    await b.set_profile("acme", currency="USD", draw_order=["wallet"])
    await b.set_price(
        "gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60", effective_ms=0
    )
    await b.topup("acme", "100", "USD")


async def _store(db: Database, events: list[UsageEvent]) -> None:
    async def run(tx: Tx) -> None:
        await store_events(tx, events)

    await db.transaction(run)


async def _unsettled(db: Database) -> set[str]:
    async def run(tx: Tx) -> set[str]:
        rows = await tx.fetch("SELECT request_id FROM usage_events WHERE settled_ms IS NULL")
        return {r[0] for r in rows}

    return await db.transaction(run)


def _events(n: int, *, model: str = "gpt", day: int = 2) -> list[UsageEvent]:
    return [usage("acme", model, ms(2026, 11, day, 0, i % 60), input_tokens=1000) for i in range(n)]


async def test_settled_events_leave_the_pending_index(billing: Billing) -> None:
    db = billing.db
    await _priced(billing)
    first = _events(30)
    await _store(db, first)
    s = await settle_pending(billing, batch=7)
    assert (s.read, s.settled, s.failed) == (30, 30, 0)
    assert await _unsettled(db) == set()
    # An idle pass reads nothing; a new event is the only one read by the next.
    assert (await settle_pending(billing)).read == 0
    [new] = _events(1, day=3)
    await _store(db, [new])
    s = await settle_pending(billing)
    assert (s.read, s.settled) == (1, 1)

    # An event that cannot be settled (no price) stays pending, is skipped until retried.
    [bad] = _events(1, model="no-price")
    await _store(db, [bad])
    s = await settle_pending(billing)
    assert (s.read, s.failed) == (1, 1)
    assert await _unsettled(db) == {bad.request_id}
    assert (await settle_pending(billing)).read == 0
    await billing.set_price(
        "no-price", currency="USD", input_per_1m="1", output_per_1m="1", effective_ms=0
    )
    s = await settle_pending(billing, retry_failed=True)
    assert (s.read, s.settled) == (1, 1)
    assert await _unsettled(db) == set()


async def test_an_event_settled_elsewhere_is_read_once_and_marked(billing: Billing) -> None:
    """Settled but not marked (a crash between the settlement and the mark, or a direct
    `Billing.settle`): the next pass finds it settled, posts nothing, and marks it."""
    db = billing.db
    await _priced(billing)
    [ev] = _events(1)
    await _store(db, [ev])
    assert (await billing.settle([ev])).settled == 1
    assert await _unsettled(db) == {ev.request_id}
    s = await settle_pending(billing)
    assert (s.read, s.settled, s.duplicates) == (1, 0, 1)
    assert await _unsettled(db) == set()
    assert (await settle_pending(billing)).read == 0


class _Recorder:
    """Wraps a database: the SQL of every statement, and whether it ran in a read or a write
    transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = db.dialect
        self.url = db.url
        self.seen: list[tuple[str, str]] = []

    def _wrap(self, kind: str, fn: Callable[[Tx], Awaitable[Any]]) -> Callable[[Tx], Any]:
        rec = self

        class _Tx:
            def __init__(self, tx: Tx) -> None:
                self._tx = tx
                self.dialect = tx.dialect
                self.for_update = tx.for_update

            def __getattr__(self, name: str) -> Any:
                inner = getattr(self._tx, name)

                async def call(sql: str, *args: Any) -> Any:
                    rec.seen.append((kind, sql))
                    return await inner(sql, *args)

                return call

        async def run(tx: Tx) -> Any:
            return await fn(_Tx(tx))  # type: ignore[arg-type]

        return run

    async def transaction(self, fn: Callable[[Tx], Awaitable[Any]]) -> Any:
        return await self.db.transaction(self._wrap("write", fn))

    async def read(self, fn: Callable[[Tx], Awaitable[Any]]) -> Any:
        return await self.db.read(self._wrap("read", fn))

    async def migrate(self) -> list[int]:
        return await self.db.migrate()

    async def close(self) -> None:
        await self.db.close()


async def test_the_pending_query_uses_the_partial_index_not_a_scan(tmp_path: Path) -> None:
    """SQLite's plan for every query of an idle pass: a search of usage_events_pending (the
    old anti-join against settlements scanned every event ever recorded), run in a read
    transaction."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db = await open_database(url)
    try:
        b = Billing(db)
        await _priced(b)
        await _store(db, _events(50))
        await settle_pending(b)
        rec = _Recorder(db)
        await settle_pending(Billing(rec))  # type: ignore[arg-type]
    finally:
        await db.close()
    reads = [sql for kind, sql in rec.seen if "FROM usage_events" in sql]
    assert reads and all(kind == "read" for kind, sql in rec.seen if sql in reads), rec.seen
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        for sql in reads:
            params = max(int(p) for p in re.findall(r"\$(\d+)", sql))
            args = (1000, 0, "")[:params]
            plan = conn.execute("EXPLAIN QUERY PLAN " + re.sub(r"\$", "?", sql), args).fetchall()
            details = " | ".join(str(r[-1]) for r in plan)
            # A scan of the partial index reads the pending events only.
            assert "e USING INDEX usage_events_pending" in details, details
    finally:
        conn.close()


async def test_an_idle_pass_does_not_wait_for_the_write_lock(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock (the gateway writing usage, or a settler
    stopped mid-batch): an idle pass still finishes at once, so the settler's reads never
    queue for, or hold, the lock the gateway's writes need."""
    path = tmp_path / "ledger.db"
    db = await open_database(f"sqlite:///{path}")
    try:
        b = Billing(db)
        await _priced(b)
        await _store(db, _events(20))
        await settle_pending(b)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            s = await asyncio.wait_for(settle_pending(b), 5)  # busy_timeout is 10 s
            assert s.read == 0
            other.execute("ROLLBACK")
        finally:
            other.close()
    finally:
        await db.close()


def test_migration_7_marks_what_was_settled_before(tmp_path: Path) -> None:
    """A database from before migration 7: its settled events are marked by the migration,
    the others stay pending."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(CREATE_MIGRATIONS_TABLE)
    for m in MIGRATIONS:
        if m.version >= 7:
            break
        for stmt in m.statements:
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (m.version, m.name))
    for rid in ("a", "b", "c"):
        conn.execute(
            "INSERT INTO usage_events (request_id, ts_ms, tenant, key_id, endpoint, model, "
            "deployment, provider, upstream_model, stream, input_tokens, cached_input_tokens, "
            "output_tokens, source, status, error, latency_ms, attempts) "
            "VALUES (?, 1, 't', 'k', 'e', 'm', '', '', '', 0, 1, 0, 1, 's', 200, '', 1.0, 1)",
            (rid,),
        )
    conn.execute("INSERT INTO settlements VALUES ('a', 'x', 'txn_1', 1234)")
    conn.close()

    async def run() -> None:
        db = await open_database(f"sqlite:///{path}")
        await db.close()

    asyncio.run(run())
    conn = sqlite3.connect(path)
    try:
        rows = dict(conn.execute("SELECT request_id, settled_ms FROM usage_events"))
    finally:
        conn.close()
    assert rows == {"a": 1234, "b": None, "c": None}


async def test_marks_are_chunked_past_the_variable_limit(billing: Billing) -> None:
    """A batch larger than one IN (...) chunk (500) is marked whole."""
    db = billing.db
    await _priced(billing)
    await _store(db, _events(1200))
    s = await settle_pending(billing, batch=1200)
    assert (s.read, s.settled) == (1200, 1200)
    assert await _unsettled(db) == set()
