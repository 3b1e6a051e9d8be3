"""tokenhub.billing.reports (the console's read-side queries) on SQLite and PostgreSQL: the
explorer's rollup reads against usage_summary and against the settled events themselves, the
filtered keyset pages of events, charges, routing health, the audit logs, codes and invoices."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tokenhub.billing import io as bio
from tokenhub.billing import reports as R
from tokenhub.billing.rollups import DAY_MS, HOUR_MS, TABLES, usage_summary
from tokenhub.billing.service import Billing
from tokenhub.db.database import Database, Tx, open_database
from tokenhub.store import sql
from tokenhub.usage import UsageEvent

NOW = int(time.time() * 1000)
T0 = NOW - NOW % DAY_MS - 2 * DAY_MS  # two UTC days ago, midnight


def ev(rid: str, ts: int, tenant: str, model: str, **kw: Any) -> UsageEvent:
    return UsageEvent(
        request_id=rid, ts_ms=ts, tenant=tenant, key_id=f"key_{tenant}", endpoint="chat",
        model=model, deployment=kw.pop("deployment", f"d/{model}"), provider="p", **kw,
    )  # fmt: skip


EVENTS = [
    ev("e1", T0 + HOUR_MS, "acme", "m1", input_tokens=1_000_000, output_tokens=10),
    ev("e2", T0 + HOUR_MS + 5, "acme", "m2", input_tokens=50, cached_input_tokens=10,
       stream=True),
    ev("e3", T0 + DAY_MS + 7, "bravo", "m1", input_tokens=7, output_tokens=3,
       deployment="d/alt"),
    ev("e4", T0 + DAY_MS + 9, "acme", "m1", status=502, error="upstream", input_tokens=4),
    ev("e5", NOW - 60_000, "acme", "m1", input_tokens=1, output_tokens=1, latency_ms=120.0,
       route="policy", tier="cheap"),
    ev("e6", NOW - 30_000, "acme", "m1", status=500, latency_ms=80.0, route="fallback"),
]  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Database]:
    if request.param == "postgresql":
        url = str(request.getfixturevalue("pg_database"))
    else:
        url = f"sqlite:///{tmp_path / 'reports.db'}"
    database = await open_database(url)
    try:
        b = Billing(database)
        await b.set_profile("acme", currency="CNY")
        await b.set_profile("bravo", currency="USD", draw_order=["wallet"])
        await b.set_price("m1", currency="CNY", input_per_1m="2", output_per_1m="8",
                          effective_ms=0)  # fmt: skip
        await b.set_price("m2", currency="CNY", input_per_1m="1", output_per_1m="1",
                          effective_ms=0)  # fmt: skip
        await b.set_fx("CNY", "USD", "0.5", effective_ms=0)
        await b.topup("acme", "100", "CNY")

        async def store(tx: Tx) -> None:
            await bio.store_events(tx, EVENTS)

        await database.transaction(store)
        res = await b.settle(EVENTS)
        assert not res.failed, res.failed
        yield database
    finally:
        await database.close()


async def test_explore_equals_summary_and_the_events(db: Database) -> None:
    since, until = T0, NOW - NOW % HOUR_MS + HOUR_MS
    for group_by in (("day", "model"), ("hour", "tenant"), ("day", "deployment")):

        async def both(tx: Tx, g: tuple[str, str] = group_by) -> tuple[Any, Any]:
            return (
                await R.usage_explore(tx, since=since, until=until, group_by=g),
                await usage_summary(tx, since=since, until=until, group_by=g),
            )

        mine, theirs = await db.read(both)
        assert mine == theirs and mine
    # Filters: the rows the matching events make, exactly.
    f = R.Filters(tenant="acme", model="m1", status="ok")
    rows = await db.read(
        lambda tx: R.usage_explore(tx, since=since, until=until, group_by=("day", "key"), filters=f)
    )
    matching = [e for e in EVENTS if e.tenant == "acme" and e.model == "m1" and e.status == 200]
    assert sum(r.requests for r in rows) == len(matching) == 2
    assert sum(r.input_tokens for r in rows) == sum(e.input_tokens for e in matching)
    # 1M in at 2 CNY + 10 out at 8 CNY/1M, and 1 + 1 tokens: exact nanos.
    assert sum(r.cost.get("CNY", 0) for r in rows) == 2_000_080_000 + 2_000 + 8_000
    errors = await db.read(
        lambda tx: R.usage_explore(
            tx, since=since, until=until, group_by=("day", "model"),
            filters=R.Filters(status="error"),
        )
    )  # fmt: skip
    assert [(r.group, r.requests, r.ok) for r in errors] == [("m1", 1, 0), ("m1", 1, 0)]
    with pytest.raises(ValueError):
        await db.read(lambda tx: R.usage_explore(tx, since=since, until=until,
                                                 filters=R.Filters(stream=True)))  # fmt: skip
    with pytest.raises(ValueError):
        await db.read(lambda tx: R.usage_explore(tx, since=since, until=until,
                                                 filters=R.Filters(status="bad")))  # fmt: skip


async def test_events_pages_and_charges(db: Database) -> None:
    async def ids(**kw: Any) -> list[str]:
        rows = await db.read(lambda tx: R.events_page(tx, since=None, until=None, **kw))
        return [e.request_id for e in rows]

    assert await ids() == ["e1", "e2", "e3", "e4", "e5", "e6"]
    assert await ids(filters=R.Filters(stream=True)) == ["e2"]
    assert await ids(filters=R.Filters(stream=False, tenant="bravo")) == ["e3"]
    assert await ids(filters=R.Filters(status="error")) == ["e4", "e6"]
    assert await ids(filters=R.Filters(deployment="d/alt")) == ["e3"]
    first = await db.read(lambda tx: R.events_page(tx, since=T0, until=NOW, limit=2))
    rest = await db.read(
        lambda tx: R.events_page(
            tx, since=T0, until=NOW, after=(first[-1].ts_ms, first[-1].request_id), limit=10
        )
    )
    assert [e.request_id for e in first + rest] == ["e1", "e2", "e3", "e4", "e5", "e6"]
    pages = [p async for p in R.iter_events(db, since=None, until=None, page=4)]
    assert [len(p) for p in pages] == [4, 2]
    paged = [e.request_id for p in pages for e in p]
    assert paged == ["e1", "e2", "e3", "e4", "e5", "e6"]
    cost = await db.read(lambda tx: R.charges(tx, ["e1", "e4", "nope"]))
    assert cost == {"e1": {"CNY": 2_000_080_000}, "e4": {}}


async def test_deployment_health(db: Database) -> None:
    rows = await db.read(lambda tx: R.deployment_health(tx, now=NOW))
    d = {h.deployment: h for h in rows}["d/m1"]
    assert (d.requests_1h, d.errors_1h, d.requests_24h, d.errors_24h) == (2, 1, 2, 1)
    assert d.sampled == 2 and d.latency_p50_ms == 120.0 and d.latency_p95_ms == 120.0
    assert d.routes == {"fallback": 1, "policy": 1} and d.tiers == {"cheap": 1}
    assert d.error_pct("1h") == 50.0


async def test_audits_overruns_codes_invoices(db: Database) -> None:
    async def write(tx: Tx) -> None:
        for i, action in enumerate(("price.set", "plan.create", "price.set")):
            await sql.add_admin_audit(tx, f"console:u{i % 2}", action, f"t{i}", None, {"i": i})
        for i in range(3):
            await tx.execute(
                "INSERT INTO audit_log (id, ts_ms, kind, tenant, key_id, details) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                f"g{i}", 1000 + i, "guard_throttle", "acme" if i else "bravo", f"k{i}", "{}",
            )  # fmt: skip

    await db.transaction(write)
    got = await db.read(lambda tx: R.admin_audit(tx, action="price."))
    assert [e.target for e in got] == ["t2", "t0"]
    got = await db.read(lambda tx: R.admin_audit(tx, actor="console:u1"))
    assert [e.action for e in got] == ["plan.create"]
    page1 = await db.read(lambda tx: R.admin_audit(tx, limit=2))
    page2 = await db.read(lambda tx: R.admin_audit(tx, before=(page1[-1].ts_ms, page1[-1].id)))
    assert [e.target for e in page1 + page2] == ["t2", "t1", "t0"]
    guard = await db.read(lambda tx: R.guard_audit(tx, tenant="acme"))
    assert [g.id for g in guard] == ["g2", "g1"]
    guard = await db.read(lambda tx: R.guard_audit(tx, before=(1001, "g1")))
    assert [g.id for g in guard] == ["g0"]

    b = Billing(db)
    codes = await b.create_codes(3, "5", "CNY")
    await b.redeem("acme", codes[0])
    rows, nxt = await db.read(lambda tx: R.codes_page(tx, limit=2))
    assert len(rows) == 2 and nxt is not None
    more, end = await db.read(lambda tx: R.codes_page(tx, before=nxt, limit=2))
    assert len(more) == 1 and end is None
    statuses = sorted(c.status(NOW) for c in rows + more)
    assert statuses == ["open", "open", "redeemed"]

    await b.set_profile("bravo", credit_limit="10", draw_order=["postpaid"])
    late = ev("e9", NOW - 1000, "bravo", "m2", input_tokens=2_000_000)

    async def store(tx: Tx) -> None:
        await bio.store_events(tx, [late])

    await db.transaction(store)
    assert not (await b.settle([late])).failed
    assert await db.read(R.receivables) == [("bravo", "USD", 1_000_000_000)]
    period = time.strftime("%Y-%m", time.gmtime(NOW / 1000))
    await b.invoice("bravo", period)
    [inv] = await db.read(lambda tx: R.invoices(tx))
    assert (inv.tenant, inv.period, inv.currency, inv.due) == ("bravo", period, "USD",
                                                                1_000_000_000)  # fmt: skip
    assert await db.read(lambda tx: R.invoices(tx, tenant="acme")) == []


@pytest.mark.parametrize("period", ["hour", "day"])
async def test_explore_from_totals_equals_by_key_rows(
    db: Database, period: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The explorer reads the totals (no key, HTTP status) unless it groups or filters by key,
    the rows per dimension when only the status filters: every grouping and filter gives
    what the by-key rollups give."""
    since, until = T0 + 3 * HOUR_MS, NOW - NOW % HOUR_MS + HOUR_MS  # hours on either side
    filters = [
        R.NO_FILTERS,
        R.Filters(status="ok"),
        R.Filters(status="error"),
        R.Filters(tenant="acme", model="m1"),
        R.Filters(deployment="d/alt"),
        R.Filters(tenant="acme", status="error"),
    ]

    async def explore_all(tx: Tx) -> list[Any]:
        return [
            await R.usage_explore(tx, since=since, until=until, group_by=(period, d), filters=f)
            for d in ("tenant", "model", "deployment")
            for f in filters
        ]

    fast = await db.read(explore_all)
    assert sum(r.requests for rows in fast for r in rows) > 0
    monkeypatch.setattr(R, "tables_for", lambda dim, **kw: TABLES)
    assert await db.read(explore_all) == fast
