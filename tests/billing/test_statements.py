"""Statements (tokenhub.billing.statements): an open period's statement, computed the fast way
(the latest closed period's stored closing balances plus the postings since, the requests not
billed from the daily usage totals plus the unsettled events), equals the full computation
(every posting up to the period, the month's raw events) on SQLite and PostgreSQL: with no
period closed, with periods closed in order and with a gap, with refunds, package lots,
postpaid, events settled by the settler, events settled directly (not marked in the pending
index), and events left unsettled (no price, quarantined)."""

from __future__ import annotations

import random
from typing import Any

import msgspec
from ledger_kit import ms

from tokenhub.billing import rollups as R
from tokenhub.billing import statements as ST
from tokenhub.billing.io import store_events
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.db.database import Database, Tx
from tokenhub.db.schema import MIGRATIONS
from tokenhub.usage import MAX_TOKENS, UsageEvent

TENANTS = ("cash", "pack", "post")
MODELS = ("gpt", "qwen", "noprice")  # noprice never settles
STATUSES = (200, 200, 200, 499, 429, 500, 502, 0, 201)
MONTHS = [(2026, m) for m in (8, 9, 10, 11, 12)] + [(2027, 1)]
PERIODS = [f"{y}-{m:02d}" for y, m in MONTHS]


async def _setup(b: Billing) -> None:
    await b.set_profile("cash", currency="CNY", draw_order=["wallet"])
    await b.set_profile("pack", currency="CNY", credit_limit="50")
    await b.set_profile("post", currency="USD", credit_limit="100000")
    await b.set_fx("CNY", "USD", "0.14", effective_ms=0)
    for model, (pin, pout) in {"gpt": ("2", "8"), "qwen": ("0.5", "1.5")}.items():
        await b.set_price(
            model, currency="CNY", input_per_1m=pin, output_per_1m=pout, effective_ms=0
        )
    # A small package with a USD overage: most months run past it.
    await b.create_plan(
        "small", price="1", currency="CNY", tokens=30_000, period="month",
        overage_per_1m="3", overage_currency="USD",
    )  # fmt: skip


def _events(rng: random.Random, n: int, month: tuple[int, int], seq: list[int]) -> list[UsageEvent]:
    out = []
    for _ in range(n):
        seq[0] += 1
        status = rng.choice(STATUSES)
        inp = rng.randrange(0, 20_000)
        ev = UsageEvent(
            request_id=f"ev{seq[0]:06d}",
            ts_ms=ms(*month, rng.randrange(1, 28), rng.randrange(0, 24)),
            tenant=rng.choice(TENANTS),
            key_id="k1",
            endpoint="chat.completions",
            model=rng.choice(MODELS),
            deployment=rng.choice(("d1", "d2")),
            provider="prov",
            status=status,
            input_tokens=inp,
            cached_input_tokens=rng.randrange(0, inp + 1),
            output_tokens=rng.randrange(0, 3000),
        )
        out.append(ev)
    return out


async def _store(db: Database, events: list[UsageEvent]) -> None:
    async def run(tx: Tx) -> None:
        await store_events(tx, events)

    await db.transaction(run)


async def _both(db: Database, tenant: str, period: str) -> tuple[dict[str, Any], dict[str, Any]]:
    async def run(tx: Tx) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            await ST.tenant_statement(tx, tenant, period),
            await ST.tenant_statement(tx, tenant, period, full=True),
        )

    return await db.read(run)


async def _assert_fast_equals_full(db: Database) -> int:
    """Every tenant and period: the two ways agree. Returns how many open statements had
    requests not billed (so that the test shows it compared some)."""
    seen = 0
    for tenant in TENANTS:
        for period in PERIODS:
            fast, full = await _both(db, tenant, period)
            assert fast == full, (tenant, period)
            seen += bool(fast["not_billed"]) and not fast["closed"]
    return seen


async def test_open_statement_fast_equals_full(billing: Billing) -> None:
    db = billing.db
    await _setup(billing)
    rng = random.Random(17)
    seq = [0]
    for i, month in enumerate(MONTHS[1:5]):
        start = ms(*month, 1, 1)
        for t, cur in (("cash", "CNY"), ("pack", "CNY"), ("post", "USD")):
            await billing.topup(t, str(200 + i), cur, ts_ms=start)
        await billing.assign("pack", "small", start_ms=start)
        evs = _events(rng, 60, month, seq)
        await _store(db, evs)
        if i % 2:
            # Settled directly, as an ingest does: settled, yet still in the pending index.
            res = await billing.settle([e for e in evs if e.model != "noprice"])
            assert res.settled > 0
        await settle_pending(billing, batch=rng.choice((7, 25, 1000)))
    # Refunds, in the month of the event or later.
    charged = await db.read(
        lambda tx: tx.fetch("SELECT event_id FROM settlements WHERE txn_id <> '' ORDER BY 1")
    )
    for (eid,) in rng.sample(charged, 6):
        await billing.refund(eid)
    # A quarantined event (never settles while quarantined): counted from the pending side.
    bad = msgspec.structs.replace(
        _events(rng, 1, MONTHS[3], seq)[0], model="gpt", status=500, input_tokens=MAX_TOKENS + 1
    )
    await _store(db, [bad])
    assert (await settle_pending(billing)).quarantined == 1

    # No period closed: the opening balances are the postings' sums before the period.
    assert await _assert_fast_equals_full(db) > 0
    sts = [(await _both(db, "pack", p))[0] for p in PERIODS]
    assert any(s["overage"] for s in sts) and any(
        u["package_tokens"] for s in sts for u in s["usage"]
    )

    # September and October closed (in order): later periods open from October's closing.
    for period in ("2026-09", "2026-10"):
        for tenant in TENANTS:
            await db.transaction(lambda tx, t=tenant, p=period: ST.close_period(tx, t, p))
    # Postings dated in a closed month now go to November.
    for t, cur in (("cash", "CNY"), ("post", "USD")):
        await billing.topup(t, "7", cur, ts_ms=ms(2026, 9, 15))
    late = _events(rng, 30, MONTHS[2], seq)
    await _store(db, late)
    await settle_pending(billing)
    assert await _assert_fast_equals_full(db) > 0

    # A gap: December closed with November still open, then more postings into November.
    await db.transaction(lambda tx: ST.close_period(tx, "cash", "2026-12"))
    await billing.topup("cash", "3", "CNY", ts_ms=ms(2026, 11, 20))
    await _assert_fast_equals_full(db)
    fast, _ = await _both(db, "cash", "2027-01")
    assert fast["opening"] and not fast["closed"]


async def test_not_billed_counts_unsettled_events_once(billing: Billing) -> None:
    """An event stored but not settled yet counts from the pending side; once settled, from
    the totals; once marked settled too, still once."""
    db = billing.db
    await _setup(billing)
    ev = _events(random.Random(1), 1, MONTHS[3], [0])[0]
    ev = msgspec.structs.replace(
        ev, model="gpt", status=502, input_tokens=1234, cached_input_tokens=0
    )
    await _store(db, [ev])
    want = [{"status": 502, "requests": 1, "prompt_tokens": 1234}]
    empty = await db.read(lambda tx: tx.fetchval("SELECT COUNT(*) FROM usage_totals_daily"))
    assert empty == 0
    for step in ("pending", "settled directly", "marked settled"):
        fast, full = await _both(db, ev.tenant, "2026-11")
        assert fast["not_billed"] == full["not_billed"] == want, step
        if step == "pending":
            assert (await billing.settle([ev])).settled == 1
        elif step == "settled directly":
            assert (await settle_pending(billing)).duplicates == 1
    marked = await db.read(
        lambda tx: tx.fetchval("SELECT COUNT(*) FROM usage_events WHERE settled_ms IS NULL")
    )
    assert marked == 0


async def test_statement_lines_before_migration_17_and_rebuild(billing: Billing) -> None:
    """A database settled before migration 17 has no statement lines for its usage so far:
    the migration marks the latest period with usage, statements up to it read the postings,
    later ones the lines; `rebuild` recomputes the lines (equal to what settlement kept) and
    clears the mark."""
    db = billing.db
    await _setup(billing)
    rng = random.Random(5)
    seq = [0]
    for month in MONTHS[2:5]:
        await billing.topup("cash", "300", "CNY", ts_ms=ms(*month, 1))
        await billing.topup("post", "300", "USD", ts_ms=ms(*month, 1))
        await _store(db, _events(rng, 60, month, seq))
        await settle_pending(billing, batch=40)
    kept = await db.read(
        lambda tx: tx.fetch(f"SELECT * FROM {R.LINES_TABLE} ORDER BY 1, 2, 3, 4, 5, 6")
    )
    assert kept and await db.read(R.lines_from) == ""
    (m17,) = [m for m in MIGRATIONS if m.version == 17]
    (mark,) = [s for s in m17.statements if s.startswith("INSERT INTO statement_lines_from")]

    async def before_17(tx: Tx) -> None:
        # As migration 17 finds a database settled up to December: no lines, the mark.
        await tx.execute(f"DELETE FROM {R.LINES_TABLE}")
        await tx.execute("DELETE FROM statement_lines_from")
        await tx.execute(mark)

    await db.transaction(before_17)
    assert await db.read(R.lines_from) == "2026-12"
    # Settled after the migration: January's usage goes to the lines.
    await _store(db, _events(rng, 40, MONTHS[5], seq))
    await settle_pending(billing)
    assert await _assert_fast_equals_full(db) > 0
    await db.transaction(lambda tx: R.rebuild(tx, dialect=db.dialect))
    assert await db.read(R.lines_from) == ""
    assert await _assert_fast_equals_full(db) > 0
    rebuilt = await db.read(
        lambda tx: tx.fetch(
            f"SELECT * FROM {R.LINES_TABLE} WHERE period < '2027-01' ORDER BY 1, 2, 3, 4, 5, 6"
        )
    )
    assert [tuple(map(str, r)) for r in rebuilt] == [tuple(map(str, r)) for r in kept]
