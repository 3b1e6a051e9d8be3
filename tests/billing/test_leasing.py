"""The lease agent (tokenhub.billing.leasing) on a real PostgreSQL database, a real quota table
and the real request path (`Contracts` with a `WantLink`): a want gets a lease and the waiting
admission succeeds (a want that cannot be met is refused at once); slices follow consumption
and idle pots give their leases back; a grant and a give-back whose replies are lost are retried
with the same ids and applied once; with the coordinator out of reach a lease leaves the pool
at its local deadline; an agent restarted on its own table gives back what its instance held,
and a restarted host reconciles its earlier instance once its workers' journals are replayed.

Each test has a fresh database with one tenant paying from a wallet at 100 USD per 1M tokens
(0.0001 USD a token), its pot's cap set by a settlement pass in cluster mode, as a server's
settler would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tokenhub.billing import leases
from tokenhub.billing.draw import money_pot
from tokenhub.billing.leasing import LeaseAgent, Want, WantLink, leaser_path, mark_replayed
from tokenhub.billing.pots import Contracts, Hold, Shortfall, new_epoch
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.db.database import Database, DatabaseError, Tx, open_database
from tokenhub.quota import Quota
from tokenhub.store import open_store
from tokenhub.usage import UsageEvent

T = TypeVar("T")
TENANT = "acme"
MODEL = "m"
POT = money_pot(TENANT)
TOKEN = 100_000  # nanos: 100 USD per 1M tokens
WORST = [100, 0, 100]  # a request's worst case: 200 tokens
ACTUAL = [100, 0, 50]  # what it used
WALLET_USD = 100


@dataclass
class Kit:
    url: str
    db: Database
    billing: Billing
    tmp: Path

    def table(self) -> Quota:
        """A host's quota table (a new one: a new epoch, a new instance)."""
        q = Quota.anonymous(accounts=64, reservations=4096)
        new_epoch(q)
        return q

    def agent(self, q: Quota, db: Any = None, **kw: Any) -> LeaseAgent:
        kw.setdefault("host", "A")
        return LeaseAgent(q, db or self.db, refresh_s=0.2, **kw)

    async def contracts(self, q: Quota, host: str = "A", wait_ms: int = 2000) -> Contracts:
        c = Contracts(q, self.db, cluster=WantLink(q, self.tmp, host, wait_ms=wait_ms))
        await c.start()
        return c

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return await self.db.read(lambda tx: tx.fetch(sql, *args))

    async def pot(self) -> leases.Pot:
        p = await self.db.read(lambda tx: leases.get_pot(tx, POT))
        assert p is not None
        return p

    async def room(self) -> int:
        p = await self.pot()
        return p.cap - p.granted - p.spent_unposted

    async def open_leases(self, instance: str | None = None) -> list[tuple[Any, ...]]:
        sql = "SELECT id, amount FROM budget_leases WHERE state = 'open'"
        if instance is None:
            return await self.fetch(sql + " ORDER BY created_ms, id")
        return await self.fetch(sql + " AND instance = $1 ORDER BY created_ms, id", instance)

    async def check(self) -> list[str]:
        return await self.db.read(leases.check)


@pytest.fixture
async def kit(pg_database: str, tmp_path: Path) -> AsyncIterator[Kit]:
    db = await open_database(pg_database)
    b = Billing(db)
    await b.set_price(MODEL, currency="USD", input_per_1m="100", output_per_1m="100",
                      effective_ms=0)  # fmt: skip
    await b.set_profile(TENANT, currency="USD", draw_order=["wallet"])
    await b.topup(TENANT, str(WALLET_USD), "USD")
    await settle_pending(b, cluster=True)  # the pots' caps, from the ledger
    try:
        yield Kit(pg_database, db, b, tmp_path)
    finally:
        await db.close()


def limit_and_charged(q: Quota) -> tuple[int, int]:
    s = q.state(POT).money
    return s.limit or 0, s.used + s.held


async def until(cond: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    end = time.monotonic() + timeout
    while True:
        got = await cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_want_gets_a_lease_and_the_waiting_admit_succeeds(kit: Kit) -> None:
    assert (await kit.pot()).cap == WALLET_USD * 10**9
    q = kit.table()
    agent = kit.agent(q, shared_dir=kit.tmp)
    await agent.start()
    c = await kit.contracts(q)
    try:
        # Nothing leased yet: the pool is short, and the request waits for the agent.
        assert isinstance(c.admit(TENANT, MODEL, now_ms(), list(WORST), 60_000), Shortfall)
        t0 = time.monotonic()
        hold = await c.acquire(TENANT, MODEL, now_ms(), list(WORST), 60_000)
        assert isinstance(hold, Hold), hold
        assert time.monotonic() - t0 < 1.0
        # Leased for it: its worst case first (the pool in use may get a slice more since).
        (lease_id, amount), *_ = await kit.open_leases(agent.instance)
        assert lease_id.startswith(f"{agent.instance}:")
        assert amount == 200 * TOKEN
        assert limit_and_charged(q)[1] == 200 * TOKEN

        async def pool_is_granted() -> bool:
            leased = sum(int(a) for _, a in await kit.open_leases(agent.instance))
            return limit_and_charged(q)[0] == leased == (await kit.pot()).granted

        await until(pool_is_granted, 2.0, "the pool to hold what is granted")
        # A stream's next tranche the pool cannot pay waits for a lease the same way.
        more = 10_000  # 1 USD of output, far beyond the pool
        assert not hold.extend(more)
        assert await hold.extend_wait(more, more)
        assert hold.output_reserved == WORST[2] + more
        # The hold is tagged with the instance, so settlement posts it to the coordinator.
        assert hold.settle(ACTUAL) == f"@{agent.instance}|{POT}={150 * TOKEN}"

        # One the whole budget cannot pay is refused as soon as the agent says so, not when
        # the wait (2 s) is over.
        t0 = time.monotonic()
        big = [WALLET_USD * 10_000 + 1, 0, 0]
        assert isinstance(await c.acquire(TENANT, MODEL, now_ms(), big, 60_000), Shortfall)
        assert time.monotonic() - t0 < 1.0
        assert agent.counts["refusals"] >= 1

        figures = json.loads(leaser_path(kit.tmp).read_text())
        assert figures["instance"] == agent.instance
        assert figures["pots"][POT]["leases"] >= 1
        assert figures["grants"] >= 1 and figures["wants"] >= 2 and figures["failures"] == 0
    finally:
        await c.close()
        c.cluster.close()  # type: ignore[union-attr]
        await agent.close()
    # A clean stop gives everything back: the pool keeps only what was charged, which stays
    # spent (unposted) on the coordinator.
    assert await kit.open_leases() == []
    assert limit_and_charged(q) == (150 * TOKEN, 150 * TOKEN)
    p = await kit.pot()
    assert (p.granted, p.spent_unposted) == (0, 150 * TOKEN)
    assert await kit.check() == []
    assert not (kit.tmp / "want.sock").exists()


async def test_slices_follow_consumption_and_idle_pots_give_back(kit: Kit) -> None:
    q = kit.table()
    agent = kit.agent(q, shared_dir=kit.tmp, idle_s=0.6)
    await agent.start()
    c = await kit.contracts(q)
    room_before = await kit.room()
    admitted = refused = 0
    room_during = 0
    try:
        # ~200 requests a second for 2.5 s, each holding its worst case until it settles.
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            holds = []
            for _ in range(4):
                hold = c.admit(TENANT, MODEL, now_ms(), list(WORST), 60_000)
                if isinstance(hold, Shortfall):
                    hold = await c.acquire(TENANT, MODEL, now_ms(), list(WORST), 60_000)
                if isinstance(hold, Hold):
                    holds.append(hold)
                    admitted += 1
                else:
                    refused += 1
            await asyncio.sleep(0.02)
            for h in holds:
                h.settle(ACTUAL)
        room_during = await kit.room()
        calls = agent.counts["calls"]
        assert refused == 0 and admitted >= 200
        # Slices grow with consumption: one lease per call at most, far fewer than requests.
        assert calls / admitted < 0.2, (calls, admitted)
        print(f"coordinator calls per request: {calls / admitted:.3f} ({calls}/{admitted})")
        amounts = [a for _, a in await kit.fetch(
            "SELECT id, amount FROM budget_leases WHERE instance = $1 AND amount > 0 "
            "ORDER BY created_ms, id", agent.instance)]  # fmt: skip
        assert amounts[0] <= 2 * 200 * TOKEN  # a want or two's worst case
        assert max(amounts) >= 10 * amounts[0], amounts

        # Idle: every lease goes back; the pool keeps what was charged, the pot's room grows.
        await until(
            lambda: _none_open(kit, agent.instance), 5.0, "the idle pot's leases given back"
        )
    finally:
        await c.close()
        c.cluster.close()  # type: ignore[union-attr]
        await agent.close()
    spent = admitted * 150 * TOKEN
    assert limit_and_charged(q) == (spent, spent)
    p = await kit.pot()
    assert (p.granted, p.spent_unposted) == (0, spent)
    assert await kit.room() == room_before - spent > room_during
    assert agent.counts["give_backs"] == agent.counts["grants"]
    assert await kit.check() == []


async def _none_open(kit: Kit, instance: str) -> bool:
    return not await kit.open_leases(instance)


class LostReplies:
    """The agent's database, whose next `lose` transactions commit and then fail, as if the
    reply was lost on the way back."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = db.dialect
        self.url = db.url
        self.lose = 0

    async def transaction(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        out = await self.db.transaction(fn)
        if self.lose:
            self.lose -= 1
            raise DatabaseError("PostgreSQL: connection lost (the commit's reply)")
        return out

    async def read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        return await self.db.read(fn)


async def test_a_lost_reply_is_retried_with_the_same_id_and_applied_once(kit: Kit) -> None:
    q = kit.table()
    flaky = LostReplies(kit.db)
    agent = kit.agent(q, db=flaky)
    await agent.start(run=False)
    try:
        await agent.tick()  # the start-up call: nothing of this instance to give back
        agent.want(Want(TENANT, MODEL, now_ms(), list(WORST), time.time_ns() // 1000))
        flaky.lose = 1
        assert await agent.tick()
        assert agent.counts["failures"] == 1
        # Granted on the coordinator, not applied here: nothing in the pool yet.
        [(lease_id, amount)] = await kit.open_leases(agent.instance)
        assert amount > 0 and q.table.find_account(POT) is None
        assert [x.id for x in agent.leases.values()] == [lease_id]

        assert await agent.tick()  # the retry: the same id, the stored grant
        assert await kit.open_leases(agent.instance) == [(lease_id, amount)]
        assert limit_and_charged(q) == (amount, 0)
        assert (await kit.pot()).granted == amount
        assert agent.counts["grants"] == 1
        assert not await agent.tick()  # nothing due: no call, and nothing applied twice
        assert limit_and_charged(q) == (amount, 0)

        # The give-back of the idle pot loses its reply too, and is retried the same way.
        agent.idle_s = 0.0
        flaky.lose = 1
        assert await agent.tick()
        assert limit_and_charged(q) == (0, 0)  # out of the pool before the call
        assert await kit.open_leases() == []
        assert await agent.tick()
        assert agent.leases == {} and agent.counts["give_backs"] == 1
        rows = await kit.fetch("SELECT state, used FROM budget_leases WHERE id = $1", lease_id)
        assert rows == [("returned", 0)]
        assert (await kit.pot()).granted == 0
        assert await kit.check() == []
    finally:
        await agent.close()


async def test_a_lease_leaves_the_pool_at_its_local_deadline_without_the_coordinator(
    kit: Kit,
) -> None:
    q = kit.table()
    own = await open_database(kit.url, migrate=False)
    agent = kit.agent(q, db=own, ttl_s=2.0, idle_s=60.0)  # deadline: 2 s - 0.5 s margin
    await agent.start(run=False)
    c = await kit.contracts(q)
    try:
        await agent.tick()
        agent.want(Want(TENANT, MODEL, now_ms(), list(WORST), time.time_ns() // 1000))
        await agent.tick()
        [(lease_id, amount)] = await kit.open_leases(agent.instance)
        hold = c.admit(TENANT, MODEL, now_ms(), list(WORST), 60_000)
        assert isinstance(hold, Hold)
        hold.settle(ACTUAL)
        assert limit_and_charged(q) == (amount, 150 * TOKEN)

        # The coordinator is out of reach: a call fails, and the lease is not renewed.
        await own.close()
        agent.want(Want(TENANT, MODEL, now_ms(), list(WORST), time.time_ns() // 1000))
        assert await agent.tick()
        assert agent.counts["failures"] == 1 and agent.last_error
        await asyncio.sleep(1.6)
        await agent.tick()
        assert agent.counts["local_expiries"] == 1
        # Out of the pool: only what was charged stays; the coordinator still shows it open.
        assert limit_and_charged(q) == (150 * TOKEN, 150 * TOKEN)
        assert isinstance(c.admit(TENANT, MODEL, now_ms(), list(WORST), 60_000), Shortfall)
        assert await kit.open_leases() == [(lease_id, amount)]

        # Back in reach: the give-back goes through, with what the pool spent.
        agent.db = await open_database(kit.url, migrate=False)
        assert await agent.tick()
        assert agent.leases == {}
        rows = await kit.fetch("SELECT state, used FROM budget_leases WHERE id = $1", lease_id)
        assert rows == [("returned", 150 * TOKEN)]
        p = await kit.pot()
        assert (p.granted, p.spent_unposted) == (0, 150 * TOKEN)
        assert await kit.check() == []
    finally:
        await c.close()
        c.cluster.close()  # type: ignore[union-attr]
        await agent.close()
        await agent.db.close()


async def test_restarts_give_back_and_reconcile_the_earlier_instance(kit: Kit) -> None:
    q1 = kit.table()
    c1 = await kit.contracts(q1)

    async def lease_and_crash(q: Quota) -> LeaseAgent:
        agent = kit.agent(q)
        await agent.start(run=False)
        await agent.tick()
        agent.want(Want(TENANT, MODEL, now_ms(), list(WORST), time.time_ns() // 1000))
        await agent.tick()
        assert agent.counts["grants"] == 1
        await agent.terms.close()  # gone, without giving anything back
        return agent

    try:
        first = await lease_and_crash(q1)
        hold = c1.admit(TENANT, MODEL, now_ms(), list(WORST), 60_000)
        assert isinstance(hold, Hold)
        tag = hold.settle(ACTUAL)
        [(lost, _)] = await kit.open_leases(first.instance)

        # The settler restarts in the same server (same table, same instance): its agent
        # cannot know what is in the pool, counts the open lease in and gives it back.
        again = kit.agent(q1)
        assert again.instance == first.instance
        await again.start(run=False)
        await again.tick()
        await again.tick()
        assert await kit.open_leases() == []
        rows = await kit.fetch("SELECT state, used FROM budget_leases WHERE id = $1", lost)
        assert rows == [("returned", 150 * TOKEN)]
        assert limit_and_charged(q1) == (150 * TOKEN, 150 * TOKEN)
        await again.close()

        # It leases again and the whole host dies; host B holds a lease meanwhile.
        second = await lease_and_crash(q1)
        b = kit.agent(kit.table(), host="B")
        await b.start(run=False)
        await b.tick()
        b.want(Want(TENANT, MODEL, now_ms(), list(WORST), time.time_ns() // 1000))
        await b.tick()
        [(b_lease, _)] = await kit.open_leases(b.instance)
        # The dead host's last request is in its journal, replayed (unsettled) at restart.
        store = open_store(kit.url)
        try:
            store.migrate()
            event = UsageEvent(
                request_id="req-replayed", ts_ms=now_ms(), tenant=TENANT, key_id="k",
                endpoint="chat.completions", model=MODEL, input_tokens=100, output_tokens=50,
                holds=tag,
            )  # fmt: skip
            store.insert_events([event])
        finally:
            store.close()

        # Host A restarts: a new table, a new instance, and one worker whose journal replay
        # it waits for before it reconciles the earlier instance.
        q2 = kit.table()
        restarted = kit.agent(q2, workers=1)
        assert restarted.instance != second.instance
        await restarted.start(run=False)
        await restarted.tick()
        assert restarted.reconciled == []
        assert len(await kit.open_leases(second.instance)) == 1
        mark_replayed(q2, 1)
        assert await restarted.tick()
        assert restarted.reconciled == [first.instance]
        rows = await kit.fetch(
            "SELECT state FROM budget_leases WHERE instance = $1 ORDER BY created_ms, id",
            first.instance,
        )
        assert rows == [("returned",), ("written_off",)]
        # Its usage is exactly what its events charged: posted (nothing yet) + pending.
        usage = await kit.fetch(
            "SELECT used, posted FROM budget_usage WHERE instance = $1", first.instance
        )
        assert usage == [(150 * TOKEN, 0)]
        assert await kit.open_leases() == [(b_lease, (await kit.pot()).granted)]
        assert await kit.check() == []
        await restarted.close()
        await b.close()
    finally:
        await c1.close()
        c1.cluster.close()  # type: ignore[union-attr]
