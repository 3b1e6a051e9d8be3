"""Many settlements at once against one wallet, on SQLite (one writer thread; several
processes on one file) and on PostgreSQL (a pool of connections: tenant advisory locks and
row locks). The wallet must never go below zero, whatever the interleaving; what it cannot pay
goes to overrun; every event is charged exactly its price, once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from ledger_kit import closing, ms, opening, statement, tx, usage

from tokenhub.billing import ledger as L
from tokenhub.billing import statements
from tokenhub.billing.ledger import InsufficientFunds
from tokenhub.billing.service import Billing, BillingError
from tokenhub.db.database import Database, PgDatabase, open_database

HERE = Path(__file__).parent
NANOS = 10**9
TENANT, CUR = "hot", "CNY"
PRICE_OUT = "1.00"  # CNY per 1M output tokens


def nanos(text: str) -> int:
    v = Fraction(text) * NANOS
    assert v.denominator == 1
    return int(v)


def text(amount: int) -> str:
    """Nanos as the decimal string of a whole-fen amount ("12.30")."""
    assert amount % nanos("0.01") == 0
    return str(Decimal(amount).scaleb(-9).quantize(Decimal("0.01")))


def cost(output_tokens: int) -> int:
    v = Fraction(output_tokens * nanos(PRICE_OUT), 1_000_000)
    assert v.denominator == 1
    return int(v)


@pytest.fixture
async def pooled(ledger_url: str) -> AsyncIterator[Billing]:
    """A Billing whose PostgreSQL pool lets 25 transactions run at once (SQLite: one writer)."""
    db: Database
    if ledger_url.startswith("postgresql"):
        db = await PgDatabase.connect(ledger_url, max_size=25)
        await db.migrate()
    else:
        db = await open_database(ledger_url)
    b = Billing(db)
    try:
        yield b
        assert await b.invariants() == []
    finally:
        await db.close()


async def wallet_row(db: Database, tenant: str) -> tuple[int, int]:
    """(stored balance, sum of postings) of the wallet, read in one statement."""
    acc = L.wallet(tenant, CUR)
    row = await tx(
        db,
        lambda t: t.fetchrow(
            "SELECT a.balance, (SELECT COALESCE(SUM(p.amount), 0) FROM postings p "
            "WHERE p.account = a.id) FROM accounts a WHERE a.id = $1",
            acc,
        ),
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def usage_legs(db: Database, tenant: str) -> dict[str, dict[str, int]]:
    """Per usage event (ref): the money legs on the tenant's wallet and overrun."""
    rows = await tx(
        db,
        lambda t: t.fetch(
            "SELECT t.ref, p.account, p.amount FROM ledger_txns t JOIN postings p "
            "ON p.txn_id = t.id WHERE t.kind = 'usage' AND t.tenant = $1",
            tenant,
        ),
    )
    out: dict[str, dict[str, int]] = {}
    for ref, acc, amount in rows:
        if acc.startswith(f"t:{tenant}:"):
            d = out.setdefault(ref, {})
            d[acc] = d.get(acc, 0) + int(amount)
    return out


async def test_100_concurrent_settlements_never_overdraw_the_wallet(pooled: Billing) -> None:
    b, db = pooled, pooled.db
    await b.set_profile(TENANT, currency=CUR, draw_order=["wallet"])
    await b.set_price(
        "flat", currency=CUR, input_per_1m="0", output_per_1m=PRICE_OUT, effective_ms=0
    )
    plan_price = "0.50"
    await b.create_plan("side", price=plan_price, currency=CUR, tokens=1000)
    events = [
        usage(TENANT, "flat", ms(2026, 11, 2) + i, output_tokens=100_000 * (1 + i % 7))
        for i in range(100)
    ]
    total = sum(cost(e.output_tokens) for e in events)
    initial = total // 2 // nanos("0.01") * nanos("0.01")  # about half, in whole fen
    await b.topup(TENANT, text(initial), CUR, ts_ms=ms(2026, 11, 1))
    extra_topups = ["1.00"] * 5

    samples: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            samples.append(await wallet_row(db, TENANT))
            await asyncio.sleep(0)

    async def buy() -> bool:
        try:
            await b.assign(TENANT, "side", start_ms=ms(2026, 11, 2))
        except InsufficientFunds:
            return False
        return True

    watcher = asyncio.create_task(watch())
    work: list[Any] = [b.settle([e]) for e in events]
    work += [b.topup(TENANT, a, CUR, ts_ms=ms(2026, 11, 2)) for a in extra_topups]
    work += [buy() for _ in range(5)]
    # Interleave top-ups and purchases among the settlements.
    order = [i for k in range(0, 100, 10) for i in (*range(k, k + 10), 100 + k // 10)]
    results = await asyncio.gather(*(work[i] for i in order))
    done.set()
    await watcher
    by_index = dict(zip(order, results, strict=True))
    assert all(by_index[i].settled == 1 for i in range(100))
    bought = sum(1 for i in range(105, 110) if by_index[i])

    # Every event was charged exactly its price: from the wallet, the rest to overrun.
    legs = await usage_legs(db, TENANT)
    assert set(legs) == {e.request_id for e in events}
    wallet_acc, overrun_acc = L.wallet(TENANT, CUR), L.overrun(TENANT, CUR)
    for e in events:
        d = legs[e.request_id]
        assert set(d) <= {wallet_acc, overrun_acc}
        assert d.get(wallet_acc, 0) >= 0 and d.get(overrun_acc, 0) >= 0
        assert sum(d.values()) == cost(e.output_tokens)
    from_wallet = sum(d.get(wallet_acc, 0) for d in legs.values())
    to_overrun = sum(d.get(overrun_acc, 0) for d in legs.values())
    assert from_wallet + to_overrun == total
    assert from_wallet > 0 and to_overrun > 0  # the wallet really ran out

    stored, posted = await wallet_row(db, TENANT)
    funded = initial + sum(nanos(a) for a in extra_topups)
    assert stored == posted == -(funded - bought * nanos(plan_price) - from_wallet)
    assert stored <= 0  # never below zero: the wallet's balance is a credit
    assert samples and all(s == p and s <= 0 for s, p in samples)
    overrun_stored = await tx(
        db,
        lambda t: t.fetchval(
            "SELECT COALESCE(SUM(amount), 0) FROM postings WHERE account = $1", overrun_acc
        ),
    )
    assert int(overrun_stored) == to_overrun
    assert await b.invariants() == []


async def test_concurrent_replays_and_refunds_post_once(pooled: Billing) -> None:
    """The same event settled 20 times at once posts once (the rest are duplicates, not
    errors); refunded 20 times at once, it is reversed once."""
    b, db = pooled, pooled.db
    await b.set_profile(TENANT, currency=CUR)
    await b.set_price(
        "flat", currency=CUR, input_per_1m="0", output_per_1m=PRICE_OUT, effective_ms=0
    )
    await b.topup(TENANT, "10.00", CUR, ts_ms=ms(2026, 11, 1))
    e = usage(TENANT, "flat", ms(2026, 11, 2), output_tokens=3_000_000)
    results = await asyncio.gather(*(b.settle([e]) for _ in range(20)))
    assert sum(r.settled for r in results) == 1
    assert sum(r.duplicates for r in results) == 19
    assert (
        await tx(db, lambda t: t.fetchval("SELECT COUNT(*) FROM ledger_txns WHERE kind = 'usage'"))
        == 1
    )
    held = -(await wallet_row(db, TENANT))[0]
    assert held == nanos("10.00") - cost(3_000_000)

    refunds = await asyncio.gather(
        *(b.refund(e.request_id) for _ in range(20)), return_exceptions=True
    )
    ok = [r for r in refunds if isinstance(r, str)]
    errors = [r for r in refunds if not isinstance(r, str)]
    assert len(ok) == 1
    assert all(isinstance(x, BillingError) and "already been refunded" in str(x) for x in errors)
    assert -(await wallet_row(db, TENANT))[0] == nanos("10.00")
    assert await b.invariants() == []


async def test_closing_a_period_while_settling(pooled: Billing) -> None:
    """Closing November while November usage is being settled: each event lands either in
    the closed statement or in December's, never in a closed period behind its back."""
    b, db = pooled, pooled.db
    await b.set_profile(TENANT, currency=CUR)
    await b.set_price(
        "flat", currency=CUR, input_per_1m="0", output_per_1m=PRICE_OUT, effective_ms=0
    )
    await b.topup(TENANT, "100.00", CUR, ts_ms=ms(2026, 11, 1))
    events = [
        usage(TENANT, "flat", ms(2026, 11, 20), output_tokens=1_000_000 + i) for i in range(60)
    ]

    async def close_soon() -> dict[str, Any]:
        await asyncio.sleep(0.005)
        st: dict[str, Any] = await tx(db, statements.close_period, TENANT, "2026-11")
        return st

    closed, *results = await asyncio.gather(close_soon(), *(b.settle([e]) for e in events))
    assert all(r.settled == 1 for r in results)
    dec = await statement(db, TENANT, "2026-12")
    nov_now = await statement(db, TENANT, "2026-11")
    assert json.dumps(nov_now, sort_keys=True) == json.dumps(closed, sort_keys=True)
    assert opening(dec) == closing(closed)
    tokens = sum(u["tokens"] for u in closed["usage"]) + sum(u["tokens"] for u in dec["usage"])
    assert tokens == sum(e.output_tokens for e in events)
    # Token counts are distinct per event: the closed statement holds exactly the events
    # posted to November.
    rows = await tx(
        db,
        lambda t: t.fetch(
            "SELECT ref FROM ledger_txns WHERE kind = 'usage' AND period = '2026-11'"
        ),
    )
    by_id = {e.request_id: e.output_tokens for e in events}
    assert sum(u["tokens"] for u in closed["usage"]) == sum(by_id[r] for (r,) in rows)
    assert await b.invariants() == []


# -- several processes on one SQLite file ------------------------------------------------------


async def test_processes_settling_against_one_sqlite_wallet(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    import settle_worker as w

    procs_n, per = 3, 100
    path = tmp_path / "shared.db"
    db = await open_database(f"sqlite:///{path}")
    b = Billing(db)
    try:
        await b.set_profile(w.TENANT, currency=CUR, draw_order=["wallet"])
        await b.set_price(
            w.MODEL, currency=CUR, input_per_1m="0", output_per_1m=w.PRICE_PER_1M, effective_ms=0
        )
        events = [w.event(i) for i in range(procs_n * per)]
        prices = {
            e.request_id: int(Fraction(e.output_tokens * nanos(w.PRICE_PER_1M), 1_000_000))
            for e in events
        }
        total = sum(prices.values())
        initial = total // 2 // nanos("0.01") * nanos("0.01")
        await b.topup(w.TENANT, text(initial), CUR, ts_ms=w.TS)
    finally:
        await db.close()

    started = time.monotonic()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "settle_worker.py"),
            str(path),
            str(k * per),
            str(per),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for k in range(procs_n)
    ]
    for p in procs:  # all open, then all go at once
        assert p.stdout is not None
        assert (await asyncio.wait_for(p.stdout.readline(), 30)).strip() == b"ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    outs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert [p.returncode for p in procs] == [0] * procs_n
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [(s["settled"], s["failed"]) for s in summaries] == [(per, 0)] * procs_n
    # They really ran at the same time: the settling windows overlap.
    windows = [s["window"] for s in summaries]
    assert max(a for a, _ in windows) < min(z for _, z in windows)
    assert time.monotonic() - started < 20

    db = await open_database(f"sqlite:///{path}")
    b = Billing(db)
    try:
        legs = await usage_legs(db, w.TENANT)
        assert {k: sum(v.values()) for k, v in legs.items()} == prices
        wallet_acc = L.wallet(w.TENANT, CUR)
        from_wallet = sum(v.get(wallet_acc, 0) for v in legs.values())
        stored, posted = await wallet_row(db, w.TENANT)
        assert stored == posted == -(initial - from_wallet) <= 0
        assert 0 < from_wallet <= initial < total
        assert await b.invariants() == []
    finally:
        await db.close()
