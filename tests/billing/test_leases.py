"""The budget lease coordinator (tokenhub.billing.leases) on a real PostgreSQL database: many
concurrent grants never exceed a pot's cap, a replayed grant id is applied once, give_back is
idempotent, an expired lease counts as spent, and `tokenhub billing check` reports a pot whose
invariant was broken by hand."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from tokenhub import cli
from tokenhub.billing.leases import EXPIRED, OPEN, REFUSED, RETURNED, Coordinator, LeaseError
from tokenhub.db.database import open_database

POT = "pot:m:acme"


@pytest.fixture
async def coord(pg_database: str) -> AsyncIterator[Coordinator]:
    db = await open_database(pg_database)
    c = Coordinator(db)
    try:
        yield c
    finally:
        await db.close()


async def totals(c: Coordinator) -> tuple[int, int]:
    p = await c.get_pot(POT)
    assert p is not None
    return p.granted, p.spent_unposted


async def test_concurrent_grants_never_exceed_the_cap(coord: Coordinator) -> None:
    cap = 10_000
    await coord.set_pot(POT, "acme", "nanos", cap)
    rng = random.Random(13)
    asks = [(f"lease-{i}", rng.randint(50, 400), rng.randint(1, 50)) for i in range(200)]

    async def ask(lease_id: str, want: int, minimum: int) -> int:
        lease = await coord.grant(lease_id, POT, f"host-{want % 3}", want, minimum, 60_000)
        assert lease.amount == 0 or minimum <= lease.amount <= want
        return lease.amount

    amounts = await asyncio.gather(*(ask(*a) for a in asks))
    assert await totals(coord) == (sum(amounts), 0)
    assert sum(amounts) <= cap
    # Demand was far above the cap: some were refused, and a refusal saw less room than its
    # minimum; room only shrank after that.
    assert 0 in amounts
    assert cap - sum(amounts) < max(m for _, _, m in asks)

    # Hosts give back (using half) while others ask for more, all at once.
    held = [(a[0], n) for a, n in zip(asks, amounts, strict=True) if n]
    back = held[: len(held) // 2]
    more = [(f"more-{i}", rng.randint(50, 400), 1) for i in range(100)]

    async def give(lease_id: str, amount: int) -> None:
        await coord.give_back(lease_id, amount // 2)

    _, extra = await asyncio.gather(
        asyncio.gather(*(give(*b) for b in back)),
        asyncio.gather(*(ask(*m) for m in more)),
    )
    granted, unposted = await totals(coord)
    assert unposted == sum(n // 2 for _, n in back)
    assert granted == sum(n for _, n in held[len(held) // 2 :]) + sum(extra)
    assert granted + unposted <= cap
    assert await coord.check() == []


async def test_a_replayed_grant_is_applied_once(coord: Coordinator) -> None:
    await coord.set_pot(POT, "acme", "tokens", 1_000)
    first = await coord.grant("L1", POT, "A", 300, 100, 60_000)
    # The reply was lost; the host retries with the id it journalled.
    again = await coord.grant("L1", POT, "A", 300, 100, 60_000)
    assert first == again and first.amount == 300 and first.state == OPEN
    assert await totals(coord) == (300, 0)
    # Many concurrent retries of one new id: one grant.
    replies = await asyncio.gather(
        *(coord.grant("L2", POT, "B", 500, 1, 60_000) for _ in range(20))
    )
    assert {r.amount for r in replies} == {500}
    assert await totals(coord) == (800, 0)
    # A refusal is stored too: a retry after room was freed still gets the refusal.
    refused = await coord.grant("L3", POT, "C", 400, 300, 60_000)
    assert (refused.amount, refused.state) == (0, REFUSED)
    await coord.give_back("L2", 0)
    assert (await coord.grant("L3", POT, "C", 400, 300, 60_000)).amount == 0
    assert await totals(coord) == (300, 0)
    # The same id from another host or for another pot is refused, nothing changed.
    with pytest.raises(LeaseError, match="asked for by 'A'"):
        await coord.grant("L1", POT, "B", 300, 100, 60_000)
    assert await totals(coord) == (300, 0)
    assert await coord.check() == []


async def test_give_back_is_idempotent(coord: Coordinator) -> None:
    await coord.set_pot(POT, "acme", "tokens", 1_000)
    await coord.grant("L1", POT, "A", 600, 1, 60_000)
    back = await coord.give_back("L1", 250)
    assert (back.state, back.used) == (RETURNED, 250)
    assert await totals(coord) == (0, 250)
    for _ in range(3):
        assert await coord.give_back("L1", 250) == back
    assert await totals(coord) == (0, 250)
    await asyncio.gather(*(coord.give_back("L1", 250) for _ in range(10)))
    assert await totals(coord) == (0, 250)
    # A different `used` for a returned lease, more than the lease, an unknown lease: refused.
    with pytest.raises(LeaseError, match="already given back with used=250"):
        await coord.give_back("L1", 300)
    await coord.grant("L2", POT, "A", 100, 1, 60_000)
    with pytest.raises(LeaseError, match="more than lease 'L2' holds"):
        await coord.give_back("L2", 101)
    with pytest.raises(LeaseError, match="no lease"):
        await coord.give_back("nope", 0)
    assert await totals(coord) == (100, 250)
    # The freed room is grantable again: 1000 - 100 - 250.
    assert (await coord.grant("L3", POT, "B", 10_000, 1, 60_000)).amount == 650
    assert await coord.check() == []


async def test_an_expired_lease_counts_as_spent(coord: Coordinator) -> None:
    await coord.set_pot(POT, "acme", "tokens", 1_000)
    t0 = 1_000_000
    await coord.grant("L1", POT, "A", 400, 1, 5_000, now_ms=t0)
    await coord.grant("L2", POT, "B", 400, 1, 60_000, now_ms=t0)
    assert await coord.expire(t0 + 4_999) == 0
    assert await coord.expire(t0 + 5_000) == 1
    assert await coord.expire(t0 + 5_000) == 0
    assert await totals(coord) == (400, 400)
    # The dead host's slice is not handed out again.
    assert (await coord.grant("L3", POT, "C", 1_000, 1, 60_000, now_ms=t0 + 6_000)).amount == 200
    assert await coord.check() == []
    # Its host comes back and returns it: only what it used stays spent.
    back = await coord.give_back("L1", 150)
    assert (back.state, back.used) == (RETURNED, 150)
    assert await totals(coord) == (600, 150)
    assert await coord.give_back("L1", 150) == back
    assert await totals(coord) == (600, 150)
    # An expired lease is not returned twice by expire, and its record says what happened.
    await coord.grant("L4", POT, "A", 100, 1, 1, now_ms=t0)
    assert await coord.expire(t0 + 10) == 1
    lease = await coord.grant("L4", POT, "A", 100, 1, 1)
    assert (lease.state, lease.amount) == (EXPIRED, 100)
    assert await totals(coord) == (600, 250)
    assert await coord.check() == []


async def test_billing_check_reports_a_broken_lease_invariant(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = await open_database(pg_database)
    try:
        c = Coordinator(db)
        await c.set_pot(POT, "acme", "nanos", 1_000)
        await c.grant("L1", POT, "A", 700, 1, 60_000)
    finally:
        await db.close()
    assert await asyncio.to_thread(cli.main, ["billing", "check", "--db", pg_database]) == 0
    assert capsys.readouterr().out.startswith("ledger OK: ")

    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("UPDATE budget_pots SET spent_unposted = 301 WHERE pot = $1", POT)
    finally:
        await conn.close()
    assert await asyncio.to_thread(cli.main, ["billing", "check", "--db", pg_database]) == 1
    out, err = capsys.readouterr()
    assert out == (f"budget pot {POT}: granted 700 + spent_unposted 301 = 1001 exceeds cap 1000\n")
    assert err == "tokenhub: error: the ledger check found 1 problems\n"

    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(
            "UPDATE budget_pots SET spent_unposted = 0, granted = 5 WHERE pot = $1", POT
        )
    finally:
        await conn.close()
    assert await asyncio.to_thread(cli.main, ["billing", "check", "--db", pg_database]) == 1
    out, err = capsys.readouterr()
    assert out == f"budget pot {POT}: granted 5 but its open leases hold 700\n"
