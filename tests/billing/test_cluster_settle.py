"""Settlement in cluster mode (tokenhub.billing.settler, `cluster=True`) keeps the lease
coordinator's pots (tokenhub.billing.leases) equal to the ledger: the hosts' charges are posted
and the caps set in the transaction that settles their events, so that from a second
connection every commit shows cap == the ledger's available balance and a sound invariant; a
dead instance is reconciled to what its events charged; silent instances are written off
after the window; the pass keeps to its partitions."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import msgspec
import pytest
from ledger_kit import ms, usage

from tokenhub.billing import leases as LS
from tokenhub.billing.io import store_events
from tokenhub.billing.leases import WRITTEN_OFF, Coordinator
from tokenhub.billing.pots import _ledger_pots
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import partition_of, settle_pending
from tokenhub.db.database import Tx, _PgTx, open_database
from tokenhub.usage import UsageEvent

IN, OUT = 150, 600  # nanos per token: gpt at USD 0.15 / 0.60 per 1M
USD = 1_000_000_000
TS = ms(2026, 11, 2)


@pytest.fixture
async def billing(ledger_url: str) -> AsyncIterator[Billing]:
    db = await open_database(ledger_url)
    b = Billing(db)
    try:
        await b.set_price(
            "gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60", effective_ms=0
        )
        yield b
        assert await b.invariants() == []
    finally:
        await db.close()


async def _tenant(b: Billing, tenant: str, dollars: str) -> None:
    await b.set_profile(tenant, currency="USD", draw_order=["wallet"])
    await b.topup(tenant, dollars, "USD")


def _event(
    tenant: str, instance: str, inp: int, out: int, *, status: int = 200, i: int = 0
) -> UsageEvent:
    """A request a host admitted: its hold charged what settlement will post (0 when the
    request failed: a failed request bills nothing and its hold charges nothing)."""
    cost = (IN * inp + OUT * out) if status in (200, 499) else 0
    ev = usage(tenant, "gpt", TS + i, input_tokens=inp, output_tokens=out)
    holds = f"@{instance}|pot:m:{tenant}={cost}" if cost else ""
    return msgspec.structs.replace(ev, status=status, holds=holds)


async def _store(b: Billing, events: list[UsageEvent]) -> None:
    async def run(tx: Tx) -> None:
        await store_events(tx, events)

    await b.db.transaction(run)


async def _exec(b: Billing, sql: str, *args: object) -> None:
    async def run(tx: Tx) -> None:
        await tx.execute(sql, *args)

    await b.db.transaction(run)


async def _wallet(b: Billing, tenant: str) -> int:
    pots = await b.db.read(lambda tx: _ledger_pots(tx, [tenant]))
    return pots[f"pot:m:{tenant}"]


async def test_settling_posts_the_charges_and_sets_the_caps(billing: Billing) -> None:
    b, c, pot = billing, Coordinator(billing.db), "pot:m:acme"
    await _tenant(b, "acme", "1")
    # The pass creates the pot of a tenant with a wallet, at the ledger's balance.
    s = await settle_pending(b, cluster=True)
    assert s.caps == 1
    assert await c.get_pot(pot) == LS.Pot(pot, "acme", "money", USD, 0, 0)

    lease = await c.grant("A/1:1", pot, "A", USD, 1, 60_000, instance="A/1")
    assert lease.amount == USD // 2  # half of what is left
    served = [_event("acme", "A/1", 1000, 200 * k, i=k) for k in range(1, 6)]
    failed = _event("acme", "A/1", 1000, 0, status=502, i=10)
    left = _event("acme", "A/1", 400, 100, status=499, i=11)  # client left: billed what it got
    await _store(b, [*served, failed, left])
    charged = sum(IN * e.input_tokens + OUT * e.output_tokens for e in [*served, left])

    s = await settle_pending(b, batch=3, cluster=True)
    assert (s.settled, s.posted) == (7, charged)
    p = await c.get_pot(pot)
    assert p is not None
    # The ledger debited what the hold charged; the lease still holds what paid for it:
    # granted + spent_unposted is what host A can still spend.
    assert p.cap == USD - charged == await _wallet(b, "acme")
    assert (p.granted, p.spent_unposted) == (USD // 2, -charged)
    assert await c.check() == []

    # A batch committed and not yet marked (a crash in between) is read again: found settled,
    # nothing is posted twice.
    await _exec(b, "UPDATE usage_events SET settled_ms = NULL")
    s = await settle_pending(b, cluster=True)
    assert (s.read, s.settled, s.duplicates, s.posted) == (7, 0, 7, 0)
    assert await c.get_pot(pot) == p

    # Host A gives its lease back having used `charged` of it: all of it was posted.
    await c.give_back("A/1:1", charged)
    p = await c.get_pot(pot)
    assert p is not None and (p.cap, p.granted, p.spent_unposted) == (USD - charged, 0, 0)
    assert await c.check() == []

    # A top-up outside settlement reaches the cap on the next pass.
    await b.topup("acme", "2", "USD")
    await settle_pending(b, cluster=True)
    p = await c.get_pot(pot)
    assert p is not None and p.cap == 3 * USD - charged == await _wallet(b, "acme")

    # Without cluster mode the same settlement posts nothing to the pots and sets no cap.
    await _store(b, [_event("acme", "A/1", 1000, 0, i=20)])
    s = await settle_pending(b)
    assert (s.settled, s.posted, s.caps) == (1, 0, 0)
    assert await c.get_pot(pot) == p


async def test_reconcile_frees_a_dead_instance_exactly_as_its_charges_say(
    billing: Billing,
) -> None:
    b, c, pot = billing, Coordinator(billing.db), "pot:m:acme"
    await _tenant(b, "acme", "10")
    await settle_pending(b, cluster=True)
    t0 = int(time.time() * 1000)
    # Instance A/1: an open lease, one that expires, one given back; its events: some posted,
    # some pending (stored, not settled), one quarantined.
    await c.grant("L1", pot, "A", 2 * USD, 1, 60_000, instance="A/1", now_ms=t0)
    await c.grant("L2", pot, "A", USD, 1, 1_000, instance="A/1", now_ms=t0)
    await c.grant("L3", pot, "A", USD, 1, 60_000, instance="A/1", now_ms=t0)
    await c.grant("B1", pot, "B", USD, 1, 60_000, instance="B/1", now_ms=t0)  # another host
    assert await c.expire(t0 + 1_000) == 1
    posted = [_event("acme", "A/1", 10_000, 5_000, i=k) for k in range(4)]
    await _store(b, posted)
    await settle_pending(b, cluster=True)
    await c.give_back("L3", 3_000_000)
    pending = [_event("acme", "A/1", 20_000, 1_000, i=10 + k) for k in range(3)]
    bad = msgspec.structs.replace(
        _event("acme", "A/1", 100, 0, i=20), input_tokens=-1, holds=f"@A/1|{pot}=777"
    )
    await _store(b, [*pending, bad])
    # One posted event left unmarked, as after a crash between the commit and the mark: it is
    # settled, so not pending.
    unmark = "UPDATE usage_events SET settled_ms = NULL WHERE request_id = $1"
    await _exec(b, unmark, posted[0].request_id)
    before = await c.get_pot(pot)
    assert before is not None and await c.check() == []

    # A/1 is gone (its host restarted as A/2): what it holds is free again, except what its
    # unsettled events charged (the quarantined one's 777 included: it may still be billed).
    owed = sum(IN * e.input_tokens + OUT * e.output_tokens for e in pending) + 777
    assert await c.reconcile("A/1") == 2  # L1 (open) and L2 (expired)
    p = await c.get_pot(pot)
    b1 = USD  # B's lease
    assert p is not None and (p.granted, p.spent_unposted) == (b1, owed)
    assert p.cap == before.cap
    assert await c.check() == []
    assert await c.reconcile("A/1") == 0
    assert await c.get_pot(pot) == p
    # Its host, back from a partition, gives back a written-off lease: nothing changes.
    assert (await c.give_back("L1", 5)).state == WRITTEN_OFF
    assert await c.get_pot(pot) == p

    # The pending events settle: posted, out of spent_unposted, into the cap.
    s = await settle_pending(b, cluster=True)
    # posted[0] found settled; `bad` quarantined, still owed.
    assert (s.settled, s.duplicates, s.quarantined) == (3, 1, 1)
    p = await c.get_pot(pot)
    assert p is not None and (p.granted, p.spent_unposted) == (b1, 777)
    assert p.cap == await _wallet(b, "acme")
    assert await c.check() == []
    # Voided: never billed, its charge final: posted, freeing its 777.
    from tokenhub.billing.settler import void

    await b.db.transaction(lambda tx: void(tx, [bad.request_id]))
    p = await c.get_pot(pot)
    assert p is not None and p.spent_unposted == 0
    assert await c.check() == []


async def test_the_pass_writes_off_silent_instances_after_the_window(billing: Billing) -> None:
    b, c, pot = billing, Coordinator(billing.db), "pot:m:acme"
    await _tenant(b, "acme", "1")
    await settle_pending(b, cluster=True)
    now = int(time.time() * 1000)
    # Gone: its last lease expired 3 s ago. Alive: an old expired lease, and a current one.
    await c.grant("G1", pot, "G", USD, 1, 1_000, instance="G/1", now_ms=now - 4_000)
    await c.grant("A1", pot, "A", USD, 1, 1_000, instance="A/1", now_ms=now - 4_000)
    await c.grant("A2", pot, "A", USD, 1, 60_000, instance="A/1", now_ms=now)
    s = await settle_pending(b, cluster=True, write_off_ms=10_000)
    assert (s.expired, s.written_off) == (2, [])  # within the window: counted spent
    p = await c.get_pot(pot)
    g, a1, a2 = USD // 2, USD // 4, USD // 8
    assert p is not None and (p.granted, p.spent_unposted) == (a2, g + a1)
    s = await settle_pending(b, cluster=True, write_off_ms=2_000)
    assert s.written_off == ["G/1"]
    p = await c.get_pot(pot)
    assert p is not None and (p.granted, p.spent_unposted) == (a2, a1)
    assert await c.check() == []
    # The write-off rule at its edge.
    assert (await c.grant("A3", pot, "A", 10, 1, 1_000, instance="A/3", now_ms=now)).amount
    await c.expire(now + 1_000)
    assert await c.write_off(5_000, now + 5_999) == []
    assert await c.write_off(5_000, now + 6_000) == ["A/3"]
    assert (await c.grant("A3", pot, "A", 10, 1, 1_000, instance="A/3")).state == WRITTEN_OFF


@pytest.mark.postgres
async def test_a_partitioned_pass_sets_only_its_partitions_caps(pg_database: str) -> None:
    db = await open_database(pg_database)
    try:
        b, c = Billing(db), Coordinator(db)
        await b.set_price(
            "gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60", effective_ms=0
        )
        tenants = [f"t{i}" for i in range(12)]
        for t in tenants:
            await _tenant(b, t, "1")
        mine = [t for t in tenants if partition_of(t, 4) in (1, 2)]
        assert 0 < len(mine) < len(tenants)
        s = await settle_pending(b, cluster=True, partitions=(4, [1, 2]))
        made = {t for t in tenants if await c.get_pot(f"pot:m:{t}") is not None}
        assert made == set(mine) and s.caps == len(mine)
        # Partition 0's holder also expires leases; others do not.
        await c.grant("x", f"pot:m:{mine[0]}", "A", 10, 1, 1, instance="A/1", now_ms=1)
        assert (await settle_pending(b, cluster=True, partitions=(4, [1, 2]))).expired == 0
        assert (await settle_pending(b, cluster=True, partitions=(4, [0]))).expired == 1
        assert await c.check() == []
    finally:
        await db.close()


@pytest.mark.postgres
async def test_every_commit_keeps_the_pots_equal_to_the_ledger(pg_database: str) -> None:
    """Three hosts lease, spend within what they hold (a fungible local pool each), give back
    and renew, while a settler settles in small batches in a loop; a second connection reads
    snapshots all along: in each, every pot's cap is the ledger's available balance and the
    lease invariant holds. Afterwards: no overdraw, and every charge posted."""
    db = await open_database(pg_database)
    b, c = Billing(db), Coordinator(db)
    tenants = ["acme", "bolt"]
    await b.set_price(
        "gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60", effective_ms=0
    )
    for t in tenants:
        await _tenant(b, t, "0.05")  # 50M nanos: a few hundred requests each
    await settle_pending(b, cluster=True)
    rng = random.Random(7)
    stop = asyncio.Event()
    snapshots = inside = 0
    problems: list[str] = []

    async def observe() -> None:
        nonlocal snapshots, inside
        conn = await asyncpg.connect(pg_database)
        try:
            while not stop.is_set():
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    tx = _PgTx(conn)
                    ledger = await _ledger_pots(tx, tenants)
                    for pot, cap, unposted in await tx.fetch(
                        "SELECT pot, cap, spent_unposted FROM budget_pots"
                    ):
                        if cap != ledger[pot]:
                            problems.append(f"{pot}: cap {cap}, ledger {ledger[pot]}")
                        # Charges posted while the lease that paid for them is open.
                        inside += unposted < 0
                    problems.extend(await LS.check(tx))
                snapshots += 1
                await asyncio.sleep(0)
        finally:
            await conn.close()

    served: list[UsageEvent] = []
    refused = 0

    async def host(name: str) -> None:
        nonlocal refused
        instance = f"{name}/1"
        limit = dict.fromkeys(tenants, 0)  # the local pool: leased - given back
        charged = dict.fromkeys(tenants, 0)
        open_: dict[str, list[tuple[str, int]]] = {t: [] for t in tenants}
        seq = 0
        for i in range(150):
            t = rng.choice(tenants)
            pot = f"pot:m:{t}"
            cost = IN * rng.randint(100, 3000) + OUT * rng.randint(0, 1000)
            if limit[t] - charged[t] < cost:
                seq += 1
                lease = await c.grant(
                    f"{instance}:{seq}", pot, name, 5 * cost, cost, 30_000, instance=instance
                )
                if lease.amount:
                    limit[t] += lease.amount
                    open_[t].append((lease.id, lease.amount))
                else:
                    refused += 1
            if limit[t] - charged[t] >= cost:
                inp = (cost % OUT) // IN
                ev = _event(t, instance, inp, (cost - IN * inp) // OUT, i=rng.randint(0, 10**6))
                assert IN * ev.input_tokens + OUT * ev.output_tokens == cost
                charged[t] += cost
                served.append(ev)
                await _store(b, [ev])
            if open_[t] and (i % 7 == 0 or len(open_[t]) > 2):
                # Shrink the pool first, then give back what stayed removed.
                lease_id, amount = open_[t].pop(0)
                g = min(amount, limit[t] - charged[t])
                limit[t] -= g
                await c.give_back(lease_id, amount - g)
            await asyncio.sleep(0.005)
        for t in tenants:
            for lease_id, amount in open_[t]:
                g = min(amount, limit[t] - charged[t])
                limit[t] -= g
                await c.give_back(lease_id, amount - g)

    async def settle() -> int:
        passes = 0
        while not stop.is_set():
            await settle_pending(b, batch=5, cluster=True)
            passes += 1
            await asyncio.sleep(0.01)
        return passes

    watcher = asyncio.create_task(observe())
    settler = asyncio.create_task(settle())
    try:
        await asyncio.wait_for(asyncio.gather(*(host(h) for h in "ABC")), 120)
    finally:
        stop.set()
        passes = await settler
        await watcher
    try:
        final = await settle_pending(b, cluster=True)
        assert final.failed == 0
        assert problems == []
        # (passes: at least a few settle passes ran while the hosts served; fewer under load)
        assert snapshots > 50 and inside > 10 and passes > 10
        assert len(served) > 150 and refused > 0  # the budgets ran out
        for t in tenants:
            p = await c.get_pot(f"pot:m:{t}")
            spent = sum(
                IN * e.input_tokens + OUT * e.output_tokens for e in served if e.tenant == t
            )
            assert p is not None and (p.granted, p.spent_unposted) == (0, 0)
            assert p.cap == 50_000_000 - spent == await _wallet(b, t)  # no overdraw
        assert await c.check() == []
        assert await b.invariants() == []
    finally:
        await db.close()
