"""The budget lease coordinator (tokenhub.billing.leases) on SQLite and on a real PostgreSQL
database: each call's effect on a pot's granted and spent_unposted, and the invariant after it;
a grant takes at most half the room; a replayed grant or give-back id is applied once; many
concurrent grants (and batches in any pot order) never exceed a pot's cap nor deadlock; an
expired lease counts as spent; `check` and `tokenhub billing check` report each kind of broken
invariant made by hand."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest

from tokenhub import cli
from tokenhub.billing.leases import (
    EXPIRED,
    OPEN,
    REFUSED,
    RETURNED,
    WRITTEN_OFF,
    Ask,
    Coordinator,
    LeaseError,
)
from tokenhub.db.database import Tx, _PgTx, open_database

POT = "pot:m:acme"
T = TypeVar("T")


@pytest.fixture
async def coord(ledger_url: str) -> AsyncIterator[Coordinator]:
    db = await open_database(ledger_url)
    try:
        yield Coordinator(db)
    finally:
        await db.close()


@pytest.fixture
async def pg_coord(pg_database: str) -> AsyncIterator[Coordinator]:
    db = await open_database(pg_database)
    try:
        yield Coordinator(db)
    finally:
        await db.close()


async def totals(c: Coordinator, pot: str = POT) -> tuple[int, int]:
    p = await c.get_pot(pot)
    assert p is not None
    return p.granted, p.spent_unposted


async def test_a_grant_takes_at_most_half_the_room(coord: Coordinator) -> None:
    c = coord
    await c.set_pot(POT, "acme", "money", 1_000)

    async def ask(lease_id: str, want: int, minimum: int) -> int:
        lease = await c.grant(lease_id, POT, "A", want, minimum, 60_000, instance="A/1")
        assert lease.state == (OPEN if lease.amount else REFUSED)
        return lease.amount

    assert await ask("L1", 800, 1) == 500  # half of 1000
    assert await ask("L2", 100, 1) == 100  # less than half of 500: all of it
    assert await ask("L3", 400, 300) == 300  # half of 400 is below the minimum: the minimum
    assert await ask("L4", 200, 150) == 0  # the minimum is more than the room (100)
    assert await ask("L5", 200, 0) == 50
    assert await totals(c) == (950, 0)
    assert await ask("L6", 1, 1) == 1  # room 50: 25 > want
    assert await c.check() == []
    with pytest.raises(LeaseError, match="minimum"):
        await ask("L7", 10, 11)
    with pytest.raises(LeaseError, match="no pot"):
        await c.grant("L8", "pot:m:nobody", "A", 10, 1, 60_000, instance="A/1")


async def test_each_call_keeps_the_invariant(coord: Coordinator) -> None:
    """granted + spent_unposted is what the hosts may still spend or have spent unposted:
    worked through every call, with a host's fungible pool and its charges posted while its
    lease is open."""
    c, t0 = coord, 1_000_000
    await c.set_pot(POT, "acme", "money", 10_000)
    await c.grant("A:1", POT, "A", 4_000, 1, 5_000, instance="A/1", now_ms=t0)
    await c.grant("B:1", POT, "B", 2_000, 1, 5_000, instance="B/1", now_ms=t0)
    assert await totals(c) == (6_000, 0)
    # Settlement posts 1500 that A charged inside its open lease; the ledger (cap) has paid
    # it: A may spend 2500 more, B 2000.
    charges = [(POT, "A/1", 1_000), (POT, "A/1", 500), ("pot:m:other", "A/1", 9)]
    assert await c.post(charges) == 1_500  # a pot nobody leases is skipped
    await c.set_caps({POT: ("acme", "money", 8_500)})
    assert await totals(c) == (6_000, -1_500)
    assert await c.check() == []
    # A gives back its lease having used 1800 of it (300 not posted yet).
    await c.give_back("A:1", 1_800)
    assert await totals(c) == (2_000, 300)
    # B's lease expires: counted used whole, until B gives it back (used 700).
    assert await c.expire(t0 + 5_000) == 1
    assert await totals(c) == (0, 2_300)
    await c.give_back("B:1", 700)
    assert await totals(c) == (0, 1_000)
    await c.post([(POT, "A/1", 300), (POT, "B/1", 700)])
    await c.set_caps({POT: ("acme", "money", 7_500)})
    assert await totals(c) == (0, 0)
    assert await c.check() == []
    # An overrun: B charged 400 on a lease of 300 (usage beyond every reservation), all of it
    # posted: its term is floored at minus what its open leases hold, so the overrun is not
    # room for anyone, and B's next lease first covers it.
    await c.grant("B:2", POT, "B", 300, 300, 60_000, instance="B/2", now_ms=t0)
    await c.post([(POT, "B/2", 400)])
    await c.set_caps({POT: ("acme", "money", 7_100)})
    assert await totals(c) == (300, -300)
    await c.give_back("B:2", 300)
    assert await totals(c) == (0, 0)  # not -100
    assert await c.check() == []
    # set_caps creates pots and writes only what changed.
    caps = {POT: ("acme", "money", 7_100), "pot:t:lot1": ("acme", "tokens", 5)}
    assert await c.set_caps(caps) == 1
    assert await c.set_caps(caps) == 0
    pot = await c.get_pot("pot:t:lot1")
    assert pot is not None and (pot.tenant, pot.unit, pot.cap) == ("acme", "tokens", 5)
    # Reconcile of an instance with nothing pending: its usage is what was posted.
    await c.grant("A:2", POT, "A", 1_000, 1, 60_000, instance="A/1", now_ms=t0)
    assert await totals(c) == (1_000, 0)
    assert await c.reconcile("A/1") == 1
    assert await totals(c) == (0, 0)
    assert await c.check() == []


async def test_a_replayed_grant_is_applied_once(coord: Coordinator) -> None:
    c = coord
    await c.set_pot(POT, "acme", "tokens", 1_000)
    first = await c.grant("L1", POT, "A", 300, 100, 60_000, instance="A/1")
    # The reply was lost; the host retries with the id it kept.
    again = await c.grant("L1", POT, "A", 300, 100, 60_000, instance="A/1")
    assert first == again and first.amount == 300 and first.state == OPEN
    assert first.instance == "A/1"
    assert await totals(c) == (300, 0)
    # A refusal is stored too: a retry after room was freed still gets the refusal.
    refused = await c.grant("L3", POT, "C", 800, 701, 60_000, instance="C/1")
    assert (refused.amount, refused.state) == (0, REFUSED)
    await c.give_back("L1", 0)
    assert (await c.grant("L3", POT, "C", 800, 701, 60_000, instance="C/1")).amount == 0
    assert await totals(c) == (0, 0)
    # The same id from another host or instance, or for another pot: refused, nothing changed.
    with pytest.raises(LeaseError, match="asked for by 'A'"):
        await c.grant("L1", POT, "B", 300, 100, 60_000, instance="B/1")
    with pytest.raises(LeaseError, match="'A/1'"):
        await c.grant("L1", POT, "A", 300, 100, 60_000, instance="A/2")
    assert await totals(c) == (0, 0)
    assert await c.check() == []


async def test_give_back_is_idempotent(coord: Coordinator) -> None:
    c = coord
    await c.set_pot(POT, "acme", "tokens", 1_000)
    await c.grant("L1", POT, "A", 600, 600, 60_000, instance="A/1")
    back = await c.give_back("L1", 250)
    assert (back.state, back.used) == (RETURNED, 250)
    assert await totals(c) == (0, 250)
    for _ in range(3):
        assert await c.give_back("L1", 250) == back
    assert await totals(c) == (0, 250)
    # A different `used` for a returned lease, more than the lease, an unknown lease: refused.
    with pytest.raises(LeaseError, match="already given back with used=250"):
        await c.give_back("L1", 300)
    await c.grant("L2", POT, "A", 100, 1, 60_000, instance="A/1")
    with pytest.raises(LeaseError, match="more than lease 'L2' holds"):
        await c.give_back("L2", 101)
    with pytest.raises(LeaseError, match="no lease"):
        await c.give_back("nope", 0)
    assert await totals(c) == (100, 250)
    # The freed room is grantable again: what is left is 1000 - 100 - 250.
    assert (await c.grant("L3", POT, "B", 10_000, 650, 60_000, instance="B/1")).amount == 650
    assert await c.check() == []


async def test_an_expired_lease_counts_as_spent(coord: Coordinator) -> None:
    c = coord
    await c.set_pot(POT, "acme", "tokens", 1_000)
    t0 = 1_000_000
    await c.grant("L1", POT, "A", 400, 1, 5_000, instance="A/1", now_ms=t0)
    await c.grant("L2", POT, "B", 300, 1, 60_000, instance="B/1", now_ms=t0)
    assert await c.expire(t0 + 4_999) == 0
    assert await c.expire(t0 + 5_000) == 1
    assert await c.expire(t0 + 5_000) == 0
    assert await totals(c) == (300, 400)
    # The dead host's slice is not handed out again: 300 left.
    assert (await c.grant("L3", POT, "C", 1_000, 300, 60_000, instance="C/1")).amount == 300
    assert await c.check() == []
    # Its host comes back and returns it: only what it used stays spent.
    back = await c.give_back("L1", 150)
    assert (back.state, back.used) == (RETURNED, 150)
    assert await totals(c) == (600, 150)
    assert await c.give_back("L1", 150) == back
    assert await totals(c) == (600, 150)
    # An expired lease is not expired twice, and its record says what happened.
    await c.grant("L4", POT, "A", 100, 1, 1, instance="A/1", now_ms=t0)
    assert await c.expire(t0 + 10) == 1
    lease = await c.grant("L4", POT, "A", 100, 1, 1, instance="A/1")
    assert (lease.state, lease.amount) == (EXPIRED, 100)
    assert await totals(c) == (600, 250)
    assert await c.check() == []


async def test_a_batch_is_one_transaction_with_each_item_answered(coord: Coordinator) -> None:
    c = coord
    pots = [f"pot:m:t{i:02d}" for i in range(50)]
    await c.set_caps({p: (p[6:], "money", 1_000) for p in pots})
    asks = [Ask(f"A/1:{i}", p, "A", 600, 1, 60_000, "A/1") for i, p in enumerate(pots)]
    bad = Ask("A/1:x", "pot:m:nobody", "A", 10, 1, 60_000, "A/1")
    granted, backs = await c.batch([*asks, bad], [("nope", 0)])
    assert [g.amount for g in granted[:-1]] == [500] * 50  # type: ignore[union-attr]
    assert isinstance(granted[-1], LeaseError) and isinstance(backs[0], LeaseError)
    # The next tick gives them back and asks again; the replayed ids are applied once.
    again, backs = await c.batch(asks, [(a.lease_id, 100) for a in asks])
    assert [b.state for b in backs] == [RETURNED] * 50  # type: ignore[union-attr]
    assert [g.state for g in again] == [RETURNED] * 50  # type: ignore[union-attr]
    for p in pots:
        assert await totals(c, p) == (0, 100)
    assert await c.check() == []


@pytest.mark.postgres
async def test_concurrent_grants_never_exceed_the_cap(pg_coord: Coordinator) -> None:
    c, cap = pg_coord, 10_000
    await c.set_pot(POT, "acme", "money", cap)
    rng = random.Random(13)
    asks = [(f"lease-{i}", rng.randint(50, 400), rng.randint(1, 50)) for i in range(200)]

    async def ask(lease_id: str, want: int, minimum: int) -> int:
        host = f"host-{want % 3}"
        lease = await c.grant(lease_id, POT, host, want, minimum, 60_000, instance=f"{host}/1")
        assert lease.amount == 0 or minimum <= lease.amount <= want
        return lease.amount

    amounts = await asyncio.gather(*(ask(*a) for a in asks))
    assert await totals(c) == (sum(amounts), 0)
    assert sum(amounts) <= cap
    # Demand was far above the cap: some were refused.
    assert 0 in amounts

    # Hosts give back (using half) while others ask for more, all at once.
    held = [(a[0], n) for a, n in zip(asks, amounts, strict=True) if n]
    back = held[: len(held) // 2]
    more = [(f"more-{i}", rng.randint(50, 400), 1) for i in range(100)]

    async def give(lease_id: str, amount: int) -> None:
        await c.give_back(lease_id, amount // 2)

    _, extra = await asyncio.gather(
        asyncio.gather(*(give(*b) for b in back)),
        asyncio.gather(*(ask(*m) for m in more)),
    )
    granted, unposted = await totals(c)
    assert unposted == sum(n // 2 for _, n in back)
    assert granted == sum(n for _, n in held[len(held) // 2 :]) + sum(extra)
    assert granted + unposted <= cap
    assert await c.check() == []
    # Many concurrent retries of one new id, and of one give-back: each applied once.
    await c.set_pot("pot:m:other", "other", "money", 1_000)
    replies = await asyncio.gather(
        *(c.grant("R", "pot:m:other", "A", 900, 1, 60_000, instance="A/1") for _ in range(20))
    )
    assert {r.amount for r in replies} == {500}
    assert await totals(c, "pot:m:other") == (500, 0)
    await asyncio.gather(*(c.give_back("R", 1) for _ in range(20)))
    assert await totals(c, "pot:m:other") == (0, 1)
    assert await c.check() == []


@pytest.mark.postgres
async def test_concurrent_batches_in_any_pot_order_do_not_deadlock(pg_database: str) -> None:
    """Three hosts' ticks, each over the same 30 pots listed in its own order, concurrently:
    the pots are locked in pot order, so none waits on another in a cycle (PostgreSQL would
    abort one with a deadlock error, which the transactions here do not retry)."""
    await (await open_database(pg_database)).close()  # migrated
    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=6)
    c = Coordinator(_NoRetry(pool))  # type: ignore[arg-type]
    pots = [f"pot:m:t{i:02d}" for i in range(30)]
    rng = random.Random(5)

    async def host(name: str) -> None:
        prev: list[str] = []
        for tick in range(8):
            order = pots[:]
            rng.shuffle(order)
            asks = [
                Ask(f"{name}:{tick}:{p}", p, name, 1_000, 1, 60_000, f"{name}/1") for p in order
            ]
            granted, backs = await c.batch(asks, [(lease_id, 10) for lease_id in prev])
            assert all(not isinstance(x, LeaseError) for x in [*granted, *backs])
            prev = [a.lease_id for a in asks]

    try:
        await c.set_caps({p: (p[6:], "money", 100_000) for p in pots})
        await asyncio.wait_for(asyncio.gather(*(host(h) for h in "ABC")), 60)
        for p in pots:
            assert await totals(c, p) == (3_000, 3 * 7 * 10)
        assert await c.check() == []
    finally:
        await pool.close()


class _NoRetry:
    """PostgreSQL transactions without PgDatabase's retry of deadlocks."""

    dialect = "postgresql"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def transaction(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        async with self._pool.acquire() as conn, conn.transaction():
            return await fn(_PgTx(conn))

    read = transaction


async def test_check_reports_each_kind_of_violation(coord: Coordinator) -> None:
    c = coord
    await c.set_pot(POT, "acme", "money", 1_000)
    await c.grant("L1", POT, "A", 1_000, 600, 60_000, instance="A/1")
    await c.post([(POT, "A/1", 100)])
    assert await c.check() == []

    async def tamper(sql: str) -> None:
        await c.db.transaction(lambda tx: tx.execute(sql, POT))

    await tamper("UPDATE budget_pots SET cap = 499 WHERE pot = $1")
    assert await c.check() == [
        f"budget pot {POT}: granted 600 + spent_unposted -100 = 500 exceeds cap 499"
    ]
    await tamper("UPDATE budget_pots SET cap = 1000, granted = -1 WHERE pot = $1")
    assert await c.check() == [
        f"budget pot {POT}: negative granted -1 or granted + spent_unposted -101",
        f"budget pot {POT}: granted -1 but its open leases hold 600",
    ]
    await tamper("UPDATE budget_pots SET granted = 600, spent_unposted = 7 WHERE pot = $1")
    assert await c.check() == [f"budget pot {POT}: spent_unposted 7 but its hosts' usage says -100"]
    await tamper("UPDATE budget_pots SET spent_unposted = -100 WHERE pot = $1")
    await tamper("UPDATE budget_usage SET used = 50 WHERE pot = $1")
    assert await c.check() == [
        f"budget pot {POT}: spent_unposted -100 but its hosts' usage says -50"
    ]
    await tamper("UPDATE budget_leases SET state = 'expired' WHERE pot = $1")
    assert await c.check() == [
        f"budget pot {POT}: granted 600 but its open leases hold 0",
        f"budget pot {POT}: spent_unposted -100 but its hosts' usage says 0",
    ]


@pytest.mark.postgres
async def test_billing_check_reports_a_broken_lease_invariant(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = await open_database(pg_database)
    try:
        c = Coordinator(db)
        await c.set_pot(POT, "acme", "money", 1_000)
        await c.grant("L1", POT, "A", 700, 700, 60_000, instance="A/1")
    finally:
        await db.close()
    assert await asyncio.to_thread(cli.main, ["billing", "check", "--db", pg_database]) == 0
    assert capsys.readouterr().out.startswith("ledger OK: ")

    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("UPDATE budget_pots SET cap = 699 WHERE pot = $1", POT)
    finally:
        await conn.close()
    assert await asyncio.to_thread(cli.main, ["billing", "check", "--db", pg_database]) == 1
    out, err = capsys.readouterr()
    assert out == (f"budget pot {POT}: granted 700 + spent_unposted 0 = 700 exceeds cap 699\n")
    assert err == "tokenhub: error: the ledger check found 1 problems\n"


@pytest.mark.postgres
async def test_a_written_off_lease_stays_written_off(pg_coord: Coordinator) -> None:
    c = pg_coord
    await c.set_pot(POT, "acme", "money", 1_000)
    await c.grant("L1", POT, "A", 400, 400, 60_000, instance="A/1")
    assert await c.reconcile("A/1") == 1
    for _ in range(2):
        assert (await c.give_back("L1", 10)).state == WRITTEN_OFF
    assert await totals(c) == (0, 0)
    assert await c.check() == []
