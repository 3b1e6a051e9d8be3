"""Usage rollups: settled usage per hour and day, kept in the transaction that settles it.

`usage_rollups` holds, per UTC hour, tenant, key, model, deployment, status class (`ok`: an
HTTP 2xx, else `error`) and currency, the settled events' requests, ok, input / cached / output
tokens and cost; `usage_rollups_daily` the same per UTC day; `usage_totals_daily` the same per
UTC day without the key, and with the exact HTTP status instead of its class (migration 17): a
summary that neither groups nor filters by key reads its whole days there (less than half the
rows), and a statement's requests not billed come from it by status; `usage_dims_daily` the
same per UTC day and single dimension (dimension 'tenant', 'model' or 'deployment' and its
value), and `usage_dims` per UTC hour and single dimension, with the status class, read by the
summaries of all tenants that filter by nothing but the status. All five are written beside
each other, in the same statements' transaction. Pages and `usage_summary`
read them,
never the raw events. `usage_statement_lines` (migration 17) holds per tenant, statement period
and model what a statement shows of the usage transactions (their postings per tenant account,
tokens, overage), written by `apply_settled` too; `rebuild` (all) recomputes it.

Kept equal to the settled events at every commit: `apply_settled` runs inside every settling
transaction (Billing.settle, after its postings and beside its `also`), and adds exactly the
events that transaction settled (`SettleResult.txn_ids`), so a replayed or duplicate batch adds
nothing. A voided event (tokenhub.billing.settler.void) is settled with no charge and counts
with cost 0; a refund (Billing.refund) takes the event's cost back out in the refund's own
transaction, as the ledger reverses its postings (the request and its tokens still count).

Cost is what the event's usage transaction charged the tenant, per money unit: the sum of its
postings on the tenant's own accounts (`t:<tenant>:...`: wallet, receivable, overrun, a lot's
deferred price earned) in a currency, tokens and points left out; integer nanos. The counts of
an event go on the row of its first currency ('' when it charged nothing; a refund leaves them
there); a charge in another currency too goes on a row of that currency with counts 0, so sums
over rows never count a request twice. Rows whose every sum is 0 may stay.

Rows are upserted with `INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x` (SQLite and
PostgreSQL), in key order: two settlers that touch the same rows are serialized by the tenant
locks they hold already, and the order keeps anything else from deadlocking.

`rebuild` recomputes the rollups from settlements, usage events and postings (the backfill of
a database settled before migration 14, `tokenhub billing rollups rebuild`); on PostgreSQL it
holds the tables in EXCLUSIVE mode, so a settlement that commits meanwhile adds its events after
the rebuild, never twice. Migration 17 fills the daily totals of an existing database in SQL
(the same rule, from the settled events and their postings), and the per-dimension tables
from them and from the hourly rollups.

Performance notes (benches/bench_rollups.py, 1M settled events over 30 days, 50 tenants, 150
keys, 6 models x 2 deployments: 384k hourly rows, 2-core VM): a 30-day day x model summary
reads the daily rows in 53 ms on SQLite / 26 ms on PostgreSQL against 4.7 s / 1.1 s for the
same GROUP BY over the raw events; one tenant's 30 days by key 1.6 / 2.0 ms (1.0 s / 0.5 s
raw). Hourly rows alone were 594 / 159 ms for the 30-day query (the hourly key x model x
deployment rows hardly compress at ~1,400 events an hour), hence the daily table. Without the
key (usage_totals_daily: 26k rows for the 30 days against 58k) the 30-day day x model query
reads its days in ~20 ms on SQLite instead of ~52 (the explorer filtered by tenant or model
reads them). Hourly totals were left out: the hours of a day-grouped summary are only those
of the partial days at its ends, and group-by-hour ranges are short. `usage_dims_daily` sums
them once more per single dimension (tenant, model or deployment) for the summaries of all
tenants with no filter but the status (the overview, the explorer as it opens): 4.2k rows in
all for the 30 days, the days of a 30-day day x model summary in ~1 ms instead of ~40;
`usage_dims` the same per hour for the hours at either end (today's 18 hours by tenant:
19 -> 5 ms). With 1M events settled through billing (benches/bench_console_pages.py, SQLite)
the overview went from 94 to 9 ms at p50, the explorer's 30 days by model from 133 to 13 ms.

Token columns are the events' own counts: `input_tokens` is all of the prompt, prompt-cache
reads (`cached_tokens`) and writes (`UsageEvent.cache_write_tokens`) included; the writes have
no column of their own (the tables would need one more migration and a rebuild for a figure the
statements show: their 'cache_write' line below), and `cost` is what the ledger charged, each
line at its price, so it is exact whatever the split.

The statement lines (usage_statement_lines, for tokenhub.billing.statements) come from the
same read of the transactions' tenant postings that gives the cost, the token counts from the
events' billed lines, and details parsed only where they mention an overage; the busiest
tenant's open statement went from 4.7 s to 0.4 ms.

What the tables cost settlement depends on how many rows a batch touches: a settler's batch
of 1000 events from the same minute writes the rollups in ~12 us an event, ~2 of it the
per-dimension tables (a settled event costs ~100 us on SQLite); benches/bench_settle.py's
events, spread over a month so that every event is a row of its own, take ~60 us (~30 without
the dimension tables), and its settlement went from ~100 to ~150 us an event in batches of
100-1000 (before/after in turns on a busy shared 2-core VM), the worst case, a backlog.
Rebuild runs at ~54k events/s on SQLite, ~12k on PostgreSQL (asyncpg's executemany of the
upserts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenhub.db.database import Tx
from tokenhub.money import POINTS, TOKENS
from tokenhub.usage import UsageEvent, billed_lines

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
PERIODS = ("hour", "day")
DIMENSIONS = {
    "tenant": "tenant",
    "key": "key_id",
    "model": "model",
    "deployment": "deployment",
}
PROGRESS_EVERY = 100_000
_CHUNK = 500
_READ = 10_000

# (hour_ms, tenant, key_id, model, deployment, HTTP status, currency)
Key = tuple[int, str, str, str, str, int, str]
_SUMS = ("requests", "ok", "input_tokens", "cached_tokens", "output_tokens", "cost")
_KEYS = ("hour_ms", "tenant", "key_id", "model", "deployment", "status", "currency")
_TOTAL_KEYS = ("hour_ms", "tenant", "model", "deployment", "status", "currency")
# By key, with the status class (hourly, daily).
TABLES = ("usage_rollups", "usage_rollups_daily")
# Without the key, with the HTTP status (daily); and per single dimension (daily).
TOTALS_DAILY = "usage_totals_daily"
DIMS_DAILY = "usage_dims_daily"
TOTALS = (TOTALS_DAILY, DIMS_DAILY)
# Per single dimension, hourly, by status class (as usage_rollups).
DIMS_HOURLY = "usage_dims"
_DIM_KEYS = ("hour_ms", "dimension", "value", "status", "currency")


def _upsert(table: str) -> str:
    keys = (
        _DIM_KEYS
        if table in (DIMS_HOURLY, DIMS_DAILY)
        else _TOTAL_KEYS
        if table in TOTALS
        else _KEYS
    )
    cols = (*keys, *_SUMS)
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) "
        f"VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE "
        "SET " + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in _SUMS)
    )


def tables_for(dimension: str, *, by_key: bool, narrowed: bool = True) -> tuple[str, str]:
    """The (hourly, daily) tables a summary grouped by `dimension` reads: for its whole days,
    the daily totals unless it groups or filters (`by_key`) by key, and the per-dimension
    rows when nothing narrows it (`narrowed`: a filter on tenant, key, model or deployment;
    the status may be). Grouped by DIMS_DAILY's rows, a query reads `value` where
    `dimension` is the grouping (`dims_where`)."""
    if by_key or dimension == "key":
        return TABLES
    return (TABLES[0], TOTALS_DAILY) if narrowed else (DIMS_HOURLY, DIMS_DAILY)


def dims_where(table: str, dimension: str) -> tuple[str, str]:
    """(the group column, an extra condition) of a summary grouped by `dimension` reading
    `table`."""
    if table in (DIMS_HOURLY, DIMS_DAILY):
        return "value", f"dimension = '{dimension}'"
    return DIMENSIONS[dimension], ""


# The tenant's side of a usage transaction, in money units.
_COST_SQL = (
    "SELECT txn_id, unit, SUM(amount) FROM postings WHERE txn_id IN ({marks}) "
    f"AND account LIKE 't:%' AND unit NOT IN ('{TOKENS}', '{POINTS}') GROUP BY txn_id, unit"
)


def hour_of(ts_ms: int) -> int:
    return ts_ms - ts_ms % HOUR_MS


def status_class(status: int) -> str:
    return "ok" if 200 <= status < 300 else "error"


class _Acc:
    """Rollup deltas keyed by row, then written in key order."""

    def __init__(self) -> None:
        self.rows: dict[Key, list[int]] = {}

    def add(
        self,
        hour: int,
        tenant: str,
        key_id: str,
        model: str,
        deployment: str,
        status: int,
        counts: tuple[int, int, int],
        cost: dict[str, int],
    ) -> None:
        currencies = sorted(cost) or [""]
        for i, cur in enumerate(currencies):
            row = self.rows.setdefault(
                (hour, tenant, key_id, model, deployment, status, cur), [0] * 6
            )
            if i == 0:
                row[0] += 1
                row[1] += 200 <= status < 300
                row[2] += counts[0]
                row[3] += counts[1]
                row[4] += counts[2]
            row[5] += cost.get(cur, 0)

    async def write(self, tx: Tx) -> int:
        """Upserts the hourly rows, the daily ones, then the daily totals; returns the hourly
        rows written."""
        hourly: dict[tuple[Any, ...], list[int]] = {}
        daily: dict[tuple[Any, ...], list[int]] = {}
        totals: dict[tuple[Any, ...], list[int]] = {}
        dims: dict[tuple[Any, ...], list[int]] = {}
        dims_h: dict[tuple[Any, ...], list[int]] = {}
        for (hour, tenant, key_id, model, dep, status, cur), v in self.rows.items():
            day, cls = hour - hour % DAY_MS, status_class(status)
            for got, k in (
                (hourly, (hour, tenant, key_id, model, dep, cls, cur)),
                (daily, (day, tenant, key_id, model, dep, cls, cur)),
                (totals, (day, tenant, model, dep, status, cur)),
                (dims, (day, "tenant", tenant, status, cur)),
                (dims, (day, "model", model, status, cur)),
                (dims, (day, "deployment", dep, status, cur)),
                (dims_h, (hour, "tenant", tenant, cls, cur)),
                (dims_h, (hour, "model", model, cls, cur)),
                (dims_h, (hour, "deployment", dep, cls, cur)),
            ):
                d = got.get(k)
                if d is None:
                    got[k] = list(v)
                else:
                    for j, x in enumerate(v):
                        d[j] += x
        n = 0
        tables = (*TABLES, TOTALS_DAILY, DIMS_DAILY, DIMS_HOURLY)
        for table, got in zip(tables, (hourly, daily, totals, dims, dims_h), strict=True):
            rows = [(*k, *v) for k, v in sorted(got.items()) if any(v)]
            for i in range(0, len(rows), 5000):
                await tx.executemany(_upsert(table), rows[i : i + 5000])
            n = n or len(rows)
        return n


async def _costs(tx: Tx, txn_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per usage transaction, what it charged the tenant per currency."""
    ids = sorted({t for t in txn_ids if t})
    out: dict[str, dict[str, int]] = {}
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        marks = ",".join(f"${j + 1}" for j in range(len(chunk)))
        for tid, unit, amount in await tx.fetch(_COST_SQL.format(marks=marks), *chunk):
            out.setdefault(tid, {})[unit] = int(amount)
    return out


async def apply_settled(tx: Tx, events: Sequence[UsageEvent], txn_ids: dict[str, str]) -> int:
    """Adds to the rollups the `events` this transaction settled (`txn_ids`: event id ->
    usage transaction id, '' for no charge; the others are left out: duplicates, conflicts,
    failures). Returns the rows written."""
    if not txn_ids:
        return 0
    # A usage transaction's token counts are the billed lines of its event (Billing.settle):
    # all of them, and its prompt-cache writes.
    tokens: dict[str, tuple[int, int]] = {}
    for ev in events:
        tid = txn_ids.get(ev.request_id)
        if tid and tid not in tokens:
            billed = billed_lines(ev)
            tokens[tid] = (sum(billed), billed[3])
    costs, lines = await _txn_reads(tx, txn_ids.values(), tokens)
    await _write_lines(tx, lines)
    acc = _Acc()
    seen: set[str] = set()
    for ev in events:
        # An in-batch repeat: the first copy is the one settled.
        if ev.request_id not in txn_ids or ev.request_id in seen:
            continue
        seen.add(ev.request_id)
        acc.add(
            hour_of(ev.ts_ms),
            ev.tenant,
            ev.key_id,
            ev.model,
            ev.deployment,
            ev.status,
            (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens),
            costs.get(txn_ids[ev.request_id], {}),
        )
    return await acc.write(tx)


# -- statement lines -----------------------------------------------------------------------------

# (tenant, period, model, line, account, unit): line 'posting' (the sum of the usage
# transactions' postings on a tenant account), 'tokens' (their details' token counts),
# 'cache_write' (the part of those that are prompt-cache writes: a row only where some were),
# 'overage' (their overage draws, per tenant currency).
LineKey = tuple[str, str, str, str, str, str]
LINES_TABLE = "usage_statement_lines"
_LINE_UPSERT = (
    f"INSERT INTO {LINES_TABLE} (tenant, period, model, line, account, unit, value) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) "
    "ON CONFLICT (tenant, period, model, line, account, unit) DO UPDATE "
    f"SET value = {LINES_TABLE}.value + excluded.value"
)
# The tenant's postings of usage transactions, with the details of those that may hold an
# overage draw (or all: {details}).
_TXN_SQL = (
    "SELECT t.id, t.tenant, t.period, t.memo, {details}, p.account, p.unit, p.amount "
    "FROM ledger_txns t JOIN postings p ON p.txn_id = t.id "
    "WHERE t.id IN ({marks}) AND t.kind = 'usage' AND p.account LIKE 't:%' "
    "ORDER BY t.id, p.leg"
)
_OVERAGE_DETAILS = "CASE WHEN t.details LIKE '%overage%' THEN t.details ELSE '' END"


def tenant_side(tenant: str, account: str) -> bool:
    """A posting a statement shows: on the tenant's own accounts, not a lot's deferred side
    (tokenhub.billing.statements)."""
    prefix = f"t:{tenant}:"
    return account.startswith(prefix) and not account.startswith(f"{prefix}deferred:")


def _add_txn(
    lines: dict[LineKey, int],
    tenant: str,
    period: str,
    model: str,
    details: str,
    legs: list[tuple[str, str, int]],
    tokens: tuple[int, int] | None,
) -> None:
    """One usage transaction's share of the statement lines (the statement's reading of it,
    tokenhub.billing.statements: only one with a posting the statement shows counts).
    `tokens`: its details' token counts summed, and its cache writes (None: read from
    `details`)."""
    shown = [(a, u, x) for a, u, x in legs if tenant_side(tenant, a)]
    if not shown:
        return
    for a, u, x in shown:
        k = (tenant, period, model, "posting", a, u)
        lines[k] = lines.get(k, 0) + x
    d = json.loads(details) if details else {}
    if tokens is None:
        counts = d.get("tokens", {})
        tokens = (sum(counts.values()), counts.get("cache_write", 0))
    k = (tenant, period, model, "tokens", "", "")
    lines[k] = lines.get(k, 0) + tokens[0]
    if tokens[1]:
        k = (tenant, period, model, "cache_write", "", "")
        lines[k] = lines.get(k, 0) + tokens[1]
    for draw in d.get("draws", []):
        if draw.get("from") == "overage":
            cur = draw.get("tenant_currency", draw["currency"])
            k = (tenant, period, model, "overage", "", cur)
            lines[k] = lines.get(k, 0) + draw.get("converted", draw["amount"])


async def _txn_reads(
    tx: Tx, txn_ids: Iterable[str], tokens: dict[str, tuple[int, int]] | None = None
) -> tuple[dict[str, dict[str, int]], dict[LineKey, int]]:
    """Per usage transaction, what it charged the tenant per currency (the rollups' cost);
    and the statement lines they add up to (`tokens`: each one's token counts, when known:
    its details are then read only when they may hold an overage draw)."""
    ids = sorted({t for t in txn_ids if t})
    costs: dict[str, dict[str, int]] = {}
    lines: dict[LineKey, int] = {}
    details = "t.details" if tokens is None else _OVERAGE_DETAILS
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        marks = ",".join(f"${j + 1}" for j in range(len(chunk)))
        rows = await tx.fetch(_TXN_SQL.format(marks=marks, details=details), *chunk)
        j = 0
        while j < len(rows):
            tid, tenant, period, model, det = rows[j][:5]
            legs = []
            while j < len(rows) and rows[j][0] == tid:
                a, u, x = rows[j][5], rows[j][6], int(rows[j][7])
                legs.append((a, u, x))
                if a.startswith("t:") and u not in (TOKENS, POINTS):
                    c = costs.setdefault(tid, {})
                    c[u] = c.get(u, 0) + x
                j += 1
            _add_txn(
                lines, tenant, period, model, det, legs, None if tokens is None else tokens[tid]
            )
    return costs, lines


async def _write_lines(tx: Tx, lines: dict[LineKey, int]) -> None:
    # Zero sums too: a statement lists what its transactions touched.
    rows = [(*k, v) for k, v in sorted(lines.items())]
    for i in range(0, len(rows), 5000):
        await tx.executemany(_LINE_UPSERT, rows[i : i + 5000])


async def lines_from(tx: Tx) -> str:
    """The statement lines hold every usage transaction of the periods after this one ('':
    all); a database settled before migration 17 holds its earlier ones only in postings
    until `rebuild` (all) recomputes them."""
    got = await tx.fetchval("SELECT period FROM statement_lines_from WHERE id = 1")
    return str(got or "")


async def rebuild_lines(tx: Tx, *, progress: Callable[[int], None] | None = None) -> int:
    """Recomputes the statement lines from every usage transaction; returns how many."""
    await tx.execute(f"DELETE FROM {LINES_TABLE}")
    n = 0
    after = ""
    while True:
        ids = [
            r[0]
            for r in await tx.fetch(
                "SELECT id FROM ledger_txns WHERE kind = 'usage' AND id > $1 ORDER BY id LIMIT $2",
                after,
                _READ,
            )
        ]
        if not ids:
            break
        after = ids[-1]
        _, lines = await _txn_reads(tx, ids)
        await _write_lines(tx, lines)
        n += len(ids)
        if progress is not None:
            progress(n)
    await tx.execute("UPDATE statement_lines_from SET period = '' WHERE id = 1")
    return n


async def apply_refund(tx: Tx, event_id: str, txn_id: str) -> None:
    """Takes a refunded event's cost (that of its usage transaction `txn_id`) back out. The
    event's dimensions come from usage_events: one settled without being stored there (only
    tests settle events straight from memory) is left as it is."""
    row = await tx.fetchrow(
        "SELECT ts_ms, tenant, key_id, model, deployment, status FROM usage_events "
        "WHERE request_id = $1",
        event_id,
    )
    if row is None:
        return
    cost = (await _costs(tx, [txn_id])).get(txn_id, {})
    acc = _Acc()
    for cur, amount in sorted(cost.items()):
        if amount:
            hour, status = hour_of(int(row[0])), int(row[5])
            acc.rows[(hour, row[1], row[2], row[3], row[4], status, cur)] = [
                0,
                0,
                0,
                0,
                0,
                -amount,
            ]
    await acc.write(tx)


async def rebuild(
    tx: Tx,
    *,
    dialect: str,
    since: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Recomputes the rollups from the UTC day of `since` (all when None: the statement lines
    too, from every usage transaction) from the settled events, inside the caller's
    transaction on a database of `dialect` (Database.dialect).
    `progress(events read)` every PROGRESS_EVERY events. Returns (events, rows written)."""
    if dialect == "postgresql":
        locked = (*TABLES, *TOTALS, DIMS_HOURLY, *((LINES_TABLE,) if since is None else ()))
        await tx.execute(f"LOCK TABLE {', '.join(locked)} IN EXCLUSIVE MODE")
    if since is None:
        await rebuild_lines(tx)
    # From the start of since's UTC day, so that the daily rows are whole.
    start = since - since % DAY_MS if since is not None else None
    for table in (*TABLES, *TOTALS, DIMS_HOURLY):
        if start is None:
            await tx.execute(f"DELETE FROM {table}")
        else:
            await tx.execute(f"DELETE FROM {table} WHERE hour_ms >= $1", start)
    cols = (
        "e.ts_ms, e.request_id, e.tenant, e.key_id, e.model, e.deployment, e.status, "
        "e.input_tokens, e.cached_input_tokens, e.output_tokens, s.txn_id"
    )
    base = f"SELECT {cols} FROM usage_events e JOIN settlements s ON s.event_id = e.request_id"
    acc = _Acc()
    n = 0
    cursor: tuple[int, str] | None = None
    while True:
        where: list[str] = []
        args: list[Any] = []
        if start is not None:
            args.append(start)
            where.append(f"e.ts_ms >= ${len(args)}")
        if cursor is not None:
            args += [cursor[0], cursor[0], cursor[1]]
            a, b, c = len(args) - 2, len(args) - 1, len(args)
            where.append(f"(e.ts_ms > ${a} OR (e.ts_ms = ${b} AND e.request_id > ${c}))")
        sql = base + (" WHERE " + " AND ".join(where) if where else "")
        args.append(_READ)
        rows = await tx.fetch(f"{sql} ORDER BY e.ts_ms, e.request_id LIMIT ${len(args)}", *args)
        if not rows:
            break
        cursor = (int(rows[-1][0]), rows[-1][1])
        charged = [r[10] for r in rows if r[10]]
        costs = await _costs(tx, charged)
        refunded = await _refunded(tx, [r[1] for r in rows if r[10]])
        for r in rows:
            cost = costs.get(r[10], {})
            if r[1] in refunded:  # the rows the charge went to, with its cost taken out
                cost = dict.fromkeys(cost, 0)
            acc.add(
                hour_of(int(r[0])), r[2], r[3], r[4], r[5], int(r[6]),
                (int(r[7]), int(r[8]), int(r[9])), cost,
            )  # fmt: skip
            n += 1
            if progress is not None and n % PROGRESS_EVERY == 0:
                progress(n)
    return n, await acc.write(tx)


async def _refunded(tx: Tx, event_ids: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for i in range(0, len(event_ids), _CHUNK):
        chunk = event_ids[i : i + _CHUNK]
        marks = ",".join(f"${j + 1}" for j in range(len(chunk)))
        out |= {
            r[0]
            for r in await tx.fetch(
                f"SELECT ref FROM ledger_txns WHERE kind = 'refund' AND ref IN ({marks})",
                *chunk,
            )
        }
    return out


# -- reading ------------------------------------------------------------------------------------


@dataclass
class SummaryRow:
    bucket_ms: int  # the start of the hour or UTC day
    group: str  # the tenant, key id, model or deployment
    requests: int = 0
    ok: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost: dict[str, int] = field(default_factory=dict)  # currency -> nanos


def add_summary_rows(found: dict[tuple[int, str], SummaryRow], rows: Sequence[Any]) -> None:
    """Adds rows of (bucket, group, currency, requests, ok, input, cached and output tokens,
    cost), as the summaries' GROUP BY reads them, into `found`, by (bucket, group)."""
    for b, g, cur, req, ok, i, c, o, cost in rows:
        r = found.setdefault((int(b), g), SummaryRow(int(b), g))
        r.requests += int(req)
        r.ok += int(ok)
        r.input_tokens += int(i)
        r.cached_tokens += int(c)
        r.output_tokens += int(o)
        if cur and int(cost):
            r.cost[cur] = r.cost.get(cur, 0) + int(cost)


def summary_rows(found: dict[tuple[int, str], SummaryRow]) -> list[SummaryRow]:
    """`found`'s rows by bucket, then group; costs by currency, zeros left out."""
    for r in found.values():
        r.cost = {c: v for c, v in sorted(r.cost.items()) if v}
    return [found[k] for k in sorted(found)]


async def usage_summary(
    tx: Tx,
    *,
    since: int,
    until: int,
    group_by: tuple[str, str] = ("day", "model"),
    tenant: str | None = None,
) -> list[SummaryRow]:
    """Settled usage from the rollups only: per (`group_by[0]` in PERIODS, `group_by[1]` in
    DIMENSIONS), the hours h with hour_of(since) <= h < until (rollups are hourly: bounds
    fall on hours), of one `tenant` or all; ordered by bucket, then group. Grouped by day,
    the whole UTC days inside the range are read from the daily rows, the hours at either
    end from the hourly ones (grouped by anything but the key, the days from the daily totals,
    or for all tenants the per-dimension rows).
    ValueError on an unknown group_by."""
    period, dim = group_by
    if period not in PERIODS or dim not in DIMENSIONS:
        raise ValueError(
            f"group_by must be one of {PERIODS} x {tuple(DIMENSIONS)} (got {group_by!r})"
        )
    hourly, daily = tables_for(dim, by_key=False, narrowed=tenant is not None)
    start = hour_of(since)
    spans = [(hourly, start, until)]
    if period == "day":
        d0, d1 = start + (-start % DAY_MS), until - until % DAY_MS
        if d0 < d1:
            spans = [(hourly, start, d0), (daily, d0, d1), (hourly, d1, until)]
    bucket = "hour_ms" if period == "hour" else f"(hour_ms / {DAY_MS}) * {DAY_MS}"
    found: dict[tuple[int, str], SummaryRow] = {}
    for table, lo, hi in spans:
        if lo >= hi:
            continue
        col, extra = dims_where(table, dim)
        args: list[Any] = [lo, hi]
        where = "hour_ms >= $1 AND hour_ms < $2" + (f" AND {extra}" if extra else "")
        if tenant is not None:
            args.append(tenant)
            where += " AND tenant = $3"
        rows = await tx.fetch(
            f"SELECT {bucket} AS b, {col} AS g, currency, SUM(requests), SUM(ok), "
            "SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), SUM(cost) "
            f"FROM {table} WHERE {where} GROUP BY b, g, currency",
            *args,
        )
        add_summary_rows(found, rows)
    return summary_rows(found)
