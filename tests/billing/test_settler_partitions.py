"""Settlers on several hosts share the work by tenant partition (`--partitions N`): two real
settler processes on one PostgreSQL database split the partitions through advisory locks,
settle every event exactly once, and when one is killed (kill -9) the other takes its
partitions and settles their events."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from ledger_kit import ms, usage

from tokenhub.billing.io import store_events
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import (
    _EVENT_COLS,
    _PARTITION_LOCK,
    _PARTITION_SQL,
    partition_of,
    settle_pending,
)
from tokenhub.db.database import Tx, open_database
from tokenhub.usage import UsageEvent

pytestmark = pytest.mark.postgres

N = 8
TENANTS = [f"t{i:02d}" for i in range(24)]
DEADLINE_S = 120.0  # generous: a loaded 2-core machine; the waits end as soon as it holds


@pytest.fixture
async def billing(pg_database: str) -> AsyncIterator[Billing]:
    db = await open_database(pg_database)
    b = Billing(db)
    try:
        await b.set_price(
            "gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60", effective_ms=0
        )
        for t in TENANTS:
            await b.set_profile(t, currency="USD", draw_order=["wallet"])
            await b.topup(t, "100", "USD")
        yield b
        assert await b.invariants() == []
    finally:
        await db.close()


async def _store(b: Billing, events: list[UsageEvent]) -> None:
    async def run(tx: Tx) -> None:
        await store_events(tx, events)

    await b.db.transaction(run)


def _events(per_tenant: int, day: int) -> list[UsageEvent]:
    return [
        usage(t, "gpt", ms(2026, 11, day, i // 60, i % 60), input_tokens=1000)
        for t in TENANTS
        for i in range(per_tenant)
    ]


async def _counts(b: Billing) -> tuple[int, int, int]:
    """(events, events pending, settlements)."""

    async def run(tx: Tx) -> tuple[int, int, int]:
        return (
            int(await tx.fetchval("SELECT count(*) FROM usage_events")),
            int(await tx.fetchval("SELECT count(*) FROM usage_events WHERE settled_ms IS NULL")),
            int(await tx.fetchval("SELECT count(*) FROM settlements")),
        )

    return await b.db.transaction(run)


async def _holders(url: str) -> dict[int, set[int]]:
    """Settler OS pid -> the partitions its lock session holds (via its application_name)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT a.application_name, l.objid::int AS p FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            f"AND l.classid = {_PARTITION_LOCK} AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    out: dict[int, set[int]] = {}
    for r in rows:
        out.setdefault(int(r["application_name"].split()[-1]), set()).add(r["p"])
    return out


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S:.0f} s: {what}")
        await asyncio.sleep(0.2)


DAEMON = [sys.executable, "-m", "tokenhub.billing.settler", "--interval", "0.2"]
# The settle worker of the CLI runs the same loop; with the daemon beside it they share too.
CLI = [str(Path(sys.executable).with_name("tokenhub")), "billing", "settle", "--follow", "0.2"]


@pytest.fixture(params=["daemons", "daemon+cli"])
def settlers(
    request: pytest.FixtureRequest, pg_database: str, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two settler processes with --partitions N: two `python -m tokenhub.billing.settler`,
    or one of those and one `tokenhub billing settle --follow`."""
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "TOKENHUB_DB": pg_database}
    cmds = [DAEMON, DAEMON if request.param == "daemons" else CLI]
    for i, cmd in enumerate(cmds):
        with (tmp_path / f"settler{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [*cmd, "--batch", "50", "--partitions", str(N)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def test_two_settlers_share_partitions_and_take_over_a_dead_ones(
    billing: Billing, pg_database: str, settlers: list[subprocess.Popen[bytes]]
) -> None:
    a, b = settlers
    everything = set(range(N))

    async def balanced() -> bool:
        h = await _holders(pg_database)
        return (
            set(h) == {a.pid, b.pid}
            and h[a.pid] | h[b.pid] == everything
            and len(h[a.pid]) == len(h[b.pid]) == N // 2
        )

    await _until("the two settlers hold half the partitions each", balanced)
    held = await _holders(pg_database)

    first = _events(20, day=2)
    await _store(billing, first)

    async def all_settled() -> bool:
        total, pending, settlements = await _counts(billing)
        return pending == 0 and settlements == total

    await _until("every event settled", all_settled)
    # Each settler reads only the tenants of the partitions it holds (the test below), and
    # both hold partitions with tenants in them: the work was shared.
    used = {partition_of(t, N) for t in TENANTS}
    assert used & held[a.pid] and used & held[b.pid]

    # kill -9 one: its session ends, its locks drop, the other takes its partitions.
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    second = _events(20, day=3)
    await _store(billing, second)

    async def taken_over() -> bool:
        h = await _holders(pg_database)
        return set(h) == {b.pid} and h[b.pid] == everything

    await _until("the survivor holds every partition", taken_over)
    await _until("every event settled after the kill", all_settled)

    total, pending, settlements = await _counts(billing)
    assert (total, pending, settlements) == (len(first) + len(second), 0, total)

    # Exactly once: one settlement and one ledger transaction per event, per tenant.
    async def per_tenant(tx: Tx) -> list[tuple[str, int, int]]:
        rows = await tx.fetch(
            "SELECT e.tenant, count(*), count(DISTINCT s.txn_id) FROM usage_events e "
            "JOIN settlements s ON s.event_id = e.request_id GROUP BY e.tenant ORDER BY 1"
        )
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    assert await billing.db.transaction(per_tenant) == [(t, 40, 40) for t in TENANTS]
    # Nothing left for a pass of its own.
    assert (await settle_pending(billing)).read == 0
    assert b.poll() is None


async def test_partitions_filter_the_pending_query(billing: Billing) -> None:
    """In process: a pass with partitions settles only the held partitions' tenants; the
    partition computed in SQL is `partition_of`."""
    events = _events(3, day=4)
    await _store(billing, events)
    mine = {0, 3, 5}
    s = await settle_pending(billing, batch=7, partitions=(N, sorted(mine)))
    expected = [e for e in events if partition_of(e.tenant, N) in mine]
    assert expected and len(expected) < len(events)
    assert (s.read, s.settled) == (len(expected), len(expected))

    async def pending(tx: Tx) -> set[str]:
        rows = await tx.fetch("SELECT tenant FROM usage_events WHERE settled_ms IS NULL")
        return {r[0] for r in rows}

    left = await billing.db.transaction(pending)
    assert left == {t for t in TENANTS if partition_of(t, N) not in mine}
    assert (await settle_pending(billing, partitions=(N, []))).read == 0
    s = await settle_pending(billing, partitions=(N, range(N)))
    assert s.settled == len(events) - len(expected)


async def test_the_partition_filter_keeps_the_pending_index(billing: Billing) -> None:
    """The partition is a filter on what the partial index yields: the pending query with it
    is still an ordered scan of `usage_events_pending` (no sort of the table)."""
    await _store(billing, _events(3, day=5))
    sql = (
        f"SELECT {_EVENT_COLS} FROM usage_events e WHERE e.settled_ms IS NULL "
        f"AND {_PARTITION_SQL.format(n=N)} = ANY('{{1,2}}'::int[]) "
        "ORDER BY e.ts_ms, e.request_id LIMIT 50"
    )

    async def plan(tx: Tx) -> str:
        # A tiny table would be read whole; the question is whether the index can serve.
        await tx.execute("SET LOCAL enable_seqscan = off")
        return "\n".join(r[0] for r in await tx.fetch("EXPLAIN " + sql))

    text = await billing.db.transaction(plan)
    assert "usage_events_pending" in text and "Sort" not in text, text
