"""Usage rollups (tokenhub.billing.rollups) against a GROUP BY over the settled events, on
SQLite and PostgreSQL: after random batches settled by the settler, after replays (which add
nothing), refunds (the cost leaves, the request stays) and voids (counted with cost 0); and
`rebuild` gives what settlement kept incrementally."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from functools import partial
from typing import Any

import pytest
from ledger_kit import ms, postings_sum

from tokenhub.billing import ledger as L
from tokenhub.billing import rollups as R
from tokenhub.billing import settler as Q
from tokenhub.billing.io import store_events
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.db.database import Database, Tx, open_database
from tokenhub.db.schema import MIGRATIONS
from tokenhub.usage import MAX_TOKENS, UsageEvent

START = ms(2026, 11, 2)
HOUR = 3_600_000
TENANTS = ("cash", "pack", "usd")
MODELS = ("gpt", "qwen", "noprice")  # noprice: never settles (no price)
KEYS = ("k1", "k2", "k3")
DEPLOYMENTS = ("", "d1", "d2")
STATUSES = (200, 200, 200, 200, 429, 500, 499)
GROUPINGS = [(p, d) for p in R.PERIODS for d in R.DIMENSIONS]
Summary = dict[tuple[int, str], tuple[int, int, int, int, int, dict[str, int]]]


async def _setup(b: Billing) -> None:
    await b.set_profile("cash", currency="CNY", draw_order=["wallet"])
    await b.set_profile("pack", currency="CNY", credit_limit="50")
    await b.set_profile("usd", currency="USD", draw_order=["wallet"])
    await b.set_fx("CNY", "USD", "0.14", effective_ms=0)
    for model, (pin, pout) in {"gpt": ("2", "8"), "qwen": ("0.5", "1.5")}.items():
        await b.set_price(
            model, currency="CNY", input_per_1m=pin, output_per_1m=pout, effective_ms=0
        )
    await b.create_plan("small", price="1", currency="CNY", tokens=200_000, period="month")
    for t, cur in (("cash", "CNY"), ("pack", "CNY"), ("usd", "USD")):
        await b.topup(t, "1000", cur, ts_ms=START)
    await b.assign("pack", "small", start_ms=START)


def _events(rng: random.Random, n: int, seq: list[int]) -> list[UsageEvent]:
    out = []
    for _ in range(n):
        seq[0] += 1
        status = rng.choice(STATUSES)
        inp = rng.randrange(0, 5000) if status != 500 else 0
        out.append(
            UsageEvent(
                request_id=f"ev{seq[0]:06d}",
                ts_ms=START + rng.randrange(0, 3 * 24 * HOUR),
                tenant=rng.choice(TENANTS),
                key_id=rng.choice(KEYS),
                endpoint="chat.completions",
                model=rng.choice(MODELS),
                deployment=rng.choice(DEPLOYMENTS),
                provider="prov",
                status=status,
                input_tokens=inp,
                cached_input_tokens=rng.randrange(0, inp + 1),
                output_tokens=rng.randrange(0, 3000) if status == 200 else 0,
            )
        )
    return out


async def _store(db: Database, events: list[UsageEvent]) -> None:
    async def run(tx: Tx) -> None:
        await store_events(tx, events)

    await db.transaction(run)


_BUCKET = {"hour": "(e.ts_ms / 3600000) * 3600000", "day": "(e.ts_ms / 86400000) * 86400000"}
_SETTLED = "FROM usage_events e JOIN settlements s ON s.event_id = e.request_id"


async def _group_by(
    db: Database, period: str, dim: str, tenant: str | None, span: tuple[int, int] = (0, 2**62)
) -> Summary:
    """The reference: a GROUP BY over the settled raw events (counts), and over their usage
    transactions' postings on the tenant's money accounts, unless refunded (cost)."""
    b, g = _BUCKET[period], f"e.{R.DIMENSIONS[dim]}"
    args: list[Any] = list(span)
    where = "WHERE e.ts_ms >= $1 AND e.ts_ms < $2"
    if tenant:
        args.append(tenant)
        where += " AND e.tenant = $3"
    and_t = where.replace("WHERE", "AND", 1)

    async def run(tx: Tx) -> Summary:
        counts = await tx.fetch(
            f"SELECT {b}, {g}, COUNT(*), "
            "SUM(CASE WHEN e.status >= 200 AND e.status < 300 THEN 1 ELSE 0 END), "
            "SUM(e.input_tokens), SUM(e.cached_input_tokens), SUM(e.output_tokens) "
            f"{_SETTLED} {where} GROUP BY {b}, {g}",
            *args,
        )
        costs = await tx.fetch(
            f"SELECT {b}, {g}, p.unit, SUM(p.amount) {_SETTLED} "
            "JOIN postings p ON p.txn_id = s.txn_id WHERE p.account LIKE 't:%' "
            "AND p.unit NOT IN ('TOKENS', 'POINTS') AND NOT EXISTS (SELECT 1 FROM ledger_txns r "
            f"WHERE r.kind = 'refund' AND r.ref = e.request_id) {and_t} "
            f"GROUP BY {b}, {g}, p.unit",
            *args,
        )
        out: Summary = {
            (int(r[0]), r[1]): (*(int(x) for x in r[2:7]), {})  # type: ignore[misc]
            for r in counts
        }
        for bk, grp, unit, amount in costs:
            if int(amount):
                out[(int(bk), grp)][5][unit] = int(amount)
        return out

    return await db.transaction(run)


async def _summary(
    db: Database,
    period: str,
    dim: str,
    tenant: str | None,
    span: tuple[int, int] = (START, START + 10 * 24 * HOUR),
) -> Summary:
    rows = await db.read(
        partial(
            R.usage_summary, since=span[0], until=span[1], group_by=(period, dim), tenant=tenant
        )
    )
    return {
        (r.bucket_ms, r.group): (
            r.requests, r.ok, r.input_tokens, r.cached_tokens, r.output_tokens, r.cost
        )
        for r in rows
    }  # fmt: skip


async def _assert_equal(db: Database) -> None:
    for period, dim in GROUPINGS:
        for tenant in (None, "usd"):
            want = await _group_by(db, period, dim, tenant)
            assert await _summary(db, period, dim, tenant) == want, (period, dim, tenant)
            # Hours on either side of whole days: daily rows between hourly ones.
            span = (START + 5 * HOUR + 17, START + 53 * HOUR)
            want = await _group_by(db, period, dim, tenant, (START + 5 * HOUR, span[1]))
            assert await _summary(db, period, dim, tenant, span) == want, (period, dim, span)


async def _raw_rollups(
    db: Database, tables: tuple[str, ...] = (*R.TABLES, *R.TOTALS, R.DIMS_HOURLY)
) -> list[tuple[Any, ...]]:
    """The tables' nonzero rows."""
    out: list[tuple[Any, ...]] = []
    for table in tables:
        order = "1, 2, 3, 4, 5, 6" + (", 7" if table in R.TABLES else "")
        sql = f"SELECT * FROM {table} WHERE cost <> 0 OR requests <> 0 ORDER BY {order}"
        rows = await db.read(lambda tx, sql=sql: tx.fetch(sql))
        out += [(table, *(int(v) if isinstance(v, int) else v for v in r)) for r in rows]
    return out


@pytest.mark.parametrize("seed", [14, 15, 16])
async def test_rollups_equal_group_by_over_settled_events(billing: Billing, seed: int) -> None:
    """Random batches, replays, refunds and a void: after each step, usage_summary (rollups
    only) equals the GROUP BY over the settled events for every group_by, for all tenants
    and one; rebuild gives back the same rows."""
    db = billing.db
    await _setup(billing)
    rng = random.Random(seed)
    seq = [0]
    settled: list[UsageEvent] = []
    for _ in range(3):
        evs = _events(rng, 150, seq)
        await _store(db, evs)
        # Small batches, so that several settling transactions share rows.
        s = await settle_pending(billing, batch=rng.choice((7, 40, 1000)))
        assert s.settled > 0 and s.failed > 0  # noprice fails where it charges
        ids = {r[0] for r in await db.read(lambda tx: tx.fetch("SELECT event_id FROM settlements"))}
        settled += [e for e in evs if e.request_id in ids]
        await _assert_equal(db)
        # A replay of settled events (shuffled, with in-batch repeats) adds nothing.
        before = await _raw_rollups(db)
        replay = rng.sample(settled, 60)
        res = await billing.settle(replay + replay[:5])
        assert res.settled == 0 and res.duplicates == 65
        assert await _raw_rollups(db) == before
    # Costs in both currencies, from wallets, the package and the FX conversion.
    total = await _summary(db, "day", "tenant", None)
    curs = {(g, c) for (_, g), v in total.items() for c, x in v[5].items() if x > 0}
    assert {("cash", "CNY"), ("pack", "CNY"), ("usd", "USD")} <= curs
    # Independent of the reference SQL: what the wallet-only tenant's rollups cost is what
    # left its wallet.
    cash = sum(v[5].get("CNY", 0) for (_, g), v in total.items() if g == "cash")
    assert cash == await postings_sum(db, L.wallet("cash", "CNY")) + 1000 * 10**9

    # Refunds: the cost leaves the rollups, the requests stay.
    charged = await db.read(
        lambda tx: tx.fetch("SELECT event_id FROM settlements WHERE txn_id <> '' ORDER BY 1")
    )
    for (eid,) in rng.sample(charged, 5):
        await billing.refund(eid)
    after = await _summary(db, "day", "tenant", None)
    assert sum(v[0] for v in after.values()) == sum(v[0] for v in total.values())
    assert sum(v[5].get("CNY", 0) for v in after.values()) < sum(
        v[5].get("CNY", 0) for v in total.values()
    )
    await _assert_equal(db)

    # A quarantined event, voided: settled with no charge, counted with cost 0.
    bad = _events(rng, 1, seq)[0]
    bad = UsageEvent(**{**{f: getattr(bad, f) for f in bad.__struct_fields__},
                        "model": "gpt", "status": 200, "input_tokens": MAX_TOKENS + 1})  # fmt: skip
    await _store(db, [bad])
    assert (await settle_pending(billing)).quarantined == 1
    await db.transaction(lambda tx: Q.void(tx, [bad.request_id], "test"))
    voided = await _summary(db, "day", "tenant", None)
    assert sum(v[0] for v in voided.values()) == sum(v[0] for v in after.values()) + 1
    assert (
        sum(v[2] for v in voided.values()) == sum(v[2] for v in after.values()) + bad.input_tokens
    )
    await _assert_equal(db)

    # Migration 17's backfill of the totals (SQL) equals what settlement kept.
    derived = (*R.TOTALS, R.DIMS_HOURLY)
    totals = await _raw_rollups(db, derived)
    assert {r[5] for r in totals if r[0] == R.TOTALS_DAILY} >= {200, 429, 499, 500}  # by status
    await _backfill_totals(db)
    assert await _raw_rollups(db, derived) == totals

    # Rebuild equals incremental: all of it, and from a time on.
    incremental = await _raw_rollups(db)
    n, _ = await db.transaction(lambda tx: R.rebuild(tx, dialect=db.dialect))
    assert n == await db.read(lambda tx: tx.fetchval("SELECT COUNT(*) FROM settlements"))
    assert await _raw_rollups(db) == incremental
    for table in (*R.TABLES, *R.TOTALS, R.DIMS_HOURLY):
        await db.transaction(lambda tx, t=table: tx.execute(f"UPDATE {t} SET requests = 0"))
    since = START + 36 * HOUR + 1234  # mid-day: rounds down to the day
    day = since - since % (24 * HOUR)
    await db.transaction(lambda tx: R.rebuild(tx, dialect=db.dialect, since=since))
    mixed = await _raw_rollups(db)
    assert [r for r in mixed if r[1] >= day] == [r for r in incremental if r[1] >= day]
    assert [r for r in mixed if r[1] < day]  # the earlier days are left as they were
    # requests, after the table's name and its key columns
    at = {R.TABLES[0]: 8, R.TABLES[1]: 8, R.TOTALS_DAILY: 7, R.DIMS_DAILY: 6, R.DIMS_HOURLY: 6}
    assert all(r[at[r[0]]] == 0 for r in mixed if r[1] < day)


async def _backfill_totals(db: Database) -> None:
    """Empties the totals and runs migration 17's INSERTs again."""
    (m17,) = [m for m in MIGRATIONS if m.version == 17]
    fills = [s for s in m17.statements if s.startswith(("INSERT INTO usage_totals_daily",
                                                         "INSERT INTO usage_dims"))]  # fmt: skip
    assert len(fills) == 3

    async def run(tx: Tx) -> None:
        for table in (*R.TOTALS, R.DIMS_HOURLY):
            await tx.execute(f"DELETE FROM {table}")
        for sql in fills:
            await tx.execute(sql)

    await db.transaction(run)


async def test_totals_equal_the_rollups_by_key(billing: Billing) -> None:
    """The daily totals are the daily by-key rollups summed over keys (status classes from
    the HTTP statuses); summaries read the by-key rows when they group or filter by key."""
    db = billing.db
    await _setup(billing)
    await _store(db, _events(random.Random(3), 300, [0]))
    await settle_pending(billing, batch=50)
    cls = "CASE WHEN status >= 200 AND status < 300 THEN 'ok' ELSE 'error' END"
    sums = ", ".join(
        f"SUM({c})"
        for c in ("requests", "ok", "input_tokens", "cached_tokens", "output_tokens", "cost")
    )

    async def grouped(tx: Tx, table: str, status: str) -> list[tuple[str, ...]]:
        rows = await tx.fetch(
            f"SELECT hour_ms, tenant, model, deployment, {status}, currency, {sums} "
            f"FROM {table} GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6"
        )
        return [tuple(map(str, r)) for r in rows]

    want = await db.read(partial(grouped, table=R.TABLES[1], status="status"))
    assert want and await db.read(partial(grouped, table=R.TOTALS_DAILY, status=cls)) == want
    # The per-dimension rows: the totals summed per tenant, model and deployment.
    for dim in ("tenant", "model", "deployment"):
        q = (
            f"SELECT hour_ms, {{g}}, status, currency, {sums} FROM {{t}} {{w}} "
            "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
        )
        mine = q.format(g="value", t=R.DIMS_DAILY, w=f"WHERE dimension = '{dim}'")
        theirs = q.format(g=dim, t=R.TOTALS_DAILY, w="")
        want = await db.read(lambda tx, sql=theirs: tx.fetch(sql))
        got = await db.read(lambda tx, sql=mine: tx.fetch(sql))
        assert want and [tuple(map(str, r)) for r in got] == [tuple(map(str, r)) for r in want]
        # Hourly: the by-key hourly rollups summed per dimension (status classes).
        mine = q.format(g="value", t=R.DIMS_HOURLY, w=f"WHERE dimension = '{dim}'")
        theirs = q.format(g=dim, t=R.TABLES[0], w="")
        want = await db.read(lambda tx, sql=theirs: tx.fetch(sql))
        got = await db.read(lambda tx, sql=mine: tx.fetch(sql))
        assert want and [tuple(map(str, r)) for r in got] == [tuple(map(str, r)) for r in want]
    assert R.tables_for("key", by_key=False) == R.TABLES
    assert R.tables_for("model", by_key=True) == R.TABLES
    assert R.tables_for("model", by_key=False) == (R.TABLES[0], R.TOTALS_DAILY)
    assert R.tables_for("model", by_key=False, narrowed=False) == (R.DIMS_HOURLY, R.DIMS_DAILY)


async def test_summary_refuses_unknown_group_by(billing: Billing) -> None:
    for bad in (("week", "model"), ("day", "provider")):
        with pytest.raises(ValueError, match="group_by"):
            await billing.db.read(partial(R.usage_summary, since=0, until=1, group_by=bad))


def test_rebuild_cli(tmp_path: Any) -> None:
    """`tokenhub billing rollups rebuild`: exit 0 and a summary on an existing database, 2 on
    a bad --since or a missing database."""
    db = tmp_path / "t.db"
    cli = [sys.executable, "-m", "tokenhub"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)

    assert run("billing", "rollups", "rebuild", "--db", str(db)).returncode == 2

    async def seed() -> None:
        d = await open_database(f"sqlite:///{db}")
        b = Billing(d)
        await _setup(b)
        evs = _events(random.Random(1), 40, [0])
        await _store(d, evs)
        await settle_pending(b)
        await d.close()

    asyncio.run(seed())
    ok = run("billing", "rollups", "rebuild", "--db", str(db), "--since", "2026-11-03")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("rebuilt usage rollups from ")
    bad = run("billing", "rollups", "rebuild", "--db", str(db), "--since", "soon")
    assert bad.returncode == 2 and bad.stderr.startswith("tokenhub: error: bad time")
