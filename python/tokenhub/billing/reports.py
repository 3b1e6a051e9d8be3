"""Read-side queries of the web console's operator pages (tokenhub.console: usage, billing,
ops): each bounded by an index and a LIMIT, none a scan of the raw usage events.

- `usage_explore`: `rollups.usage_summary`'s reading of the rollup tables with more filters
  (key, model, deployment, status class), the same spans (whole UTC days from the daily rows,
  the hours at either end from the hourly ones).
- `events_page`: usage events in (ts_ms, request_id) order after a keyset position, filtered;
  the time range rides the (ts_ms, request_id) index or, with a tenant, (tenant, ts_ms).
  `iter_events` pages through them for an export, a read transaction per page.
- `deployment_health`: per deployment, the rollups of the last hour and day, and the latency,
  route reasons and tiers of at most `sample` most recent events of the last hour.
- `admin_audit`, `guard_audit`: newest first, keyset-paged on (ts_ms, id), with filters.
- `codes_page`, `invoices`, `receivables`: small reads of the ledger tables.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tokenhub.billing.rollups import (
    DAY_MS,
    DIMENSIONS,
    DIMS_HOURLY,
    HOUR_MS,
    PERIODS,
    TOTALS,
    SummaryRow,
    add_summary_rows,
    dims_where,
    summary_rows,
    tables_for,
)
from tokenhub.billing.rollups import hour_of as _hour_of
from tokenhub.db.database import Database, Tx
from tokenhub.store.base import AdminAudit, AuditEntry
from tokenhub.usage import EVENT_FIELDS, UsageEvent

STATUS_CLASSES = ("ok", "error")
EXPORT_PAGE = 1000


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    """What the usage explorer narrows to (None: any). `status` is the rollups' status class
    (`ok`: an HTTP 2xx, else `error`); `stream` exists on events only, not in the rollups."""

    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None
    deployment: str | None = None
    status: str | None = None
    stream: bool | None = None


NO_FILTERS = Filters()


class _Args:
    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, v: Any) -> str:
        self.values.append(v)
        return f"${len(self.values)}"


def _dimension_conds(
    f: Filters, arg: _Args, *, events: bool, http_status: bool | None = None
) -> list[str]:
    """`filters` as SQL conditions on usage_events (`events`) or a rollup table, whose status
    is the HTTP status (`http_status`, default: `events`) or its class."""
    http_status = events if http_status is None else http_status
    conds = []
    for col, v in (
        ("tenant", f.tenant),
        ("key_id", f.key_id),
        ("model", f.model),
        ("deployment", f.deployment),
    ):
        if v is not None:
            conds.append(f"{col} = {arg(v)}")
    if f.status is not None:
        if f.status not in STATUS_CLASSES:
            raise ValueError(f"status must be one of {', '.join(STATUS_CLASSES)}")
        if http_status:
            inside = f"status >= {arg(200)} AND status < {arg(300)}"
            conds.append(f"({inside})" if f.status == "ok" else f"NOT ({inside})")
        else:
            conds.append(f"status = {arg(f.status)}")
    if events and f.stream is not None:
        conds.append(f"stream = {arg(f.stream)}")
    return conds


async def usage_explore(
    tx: Tx,
    *,
    since: int,
    until: int,
    group_by: tuple[str, str] = ("day", "model"),
    filters: Filters = NO_FILTERS,
) -> list[SummaryRow]:
    """Settled usage from the rollups, as `rollups.usage_summary` (the hours h with
    hour_of(since) <= h < until; by bucket, then group), narrowed by `filters` (its `stream`
    is not in the rollups: ValueError). Unless it groups or filters by key, whole days from
    the daily totals (no key, fewer rows), or with no filter but the status from the rows
    per dimension (fewer still). ValueError on an unknown group_by or status."""
    period, dim = group_by
    if period not in PERIODS or dim not in DIMENSIONS:
        raise ValueError(f"group by must be one of {PERIODS} x {tuple(DIMENSIONS)}")
    if filters.stream is not None:
        raise ValueError("the rollups do not keep stream: filter the events instead")
    narrowed = (filters.tenant, filters.key_id, filters.model, filters.deployment) != (None,) * 4
    hourly, daily = tables_for(dim, by_key=filters.key_id is not None, narrowed=narrowed)
    start = _hour_of(since)
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
        arg = _Args()
        conds = [f"hour_ms >= {arg(lo)}", f"hour_ms < {arg(hi)}", *([extra] if extra else [])]
        conds += _dimension_conds(filters, arg, events=False, http_status=table in TOTALS)
        rows = await tx.fetch(
            f"SELECT {bucket} AS b, {col} AS g, currency, SUM(requests), SUM(ok), "
            "SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), SUM(cost) "
            f"FROM {table} WHERE {' AND '.join(conds)} GROUP BY b, g, currency",
            *arg.values,
        )
        add_summary_rows(found, rows)
    return summary_rows(found)


def bucket_end(bucket_ms: int, period: str) -> int:
    return bucket_ms + (HOUR_MS if period == "hour" else DAY_MS)


_EVENT_COLS = ", ".join(EVENT_FIELDS)


def _event(row: Any) -> UsageEvent:
    fields = dict(zip(EVENT_FIELDS, row, strict=True))
    fields["stream"] = bool(fields["stream"])
    return UsageEvent(**fields)


async def events_page(
    tx: Tx,
    *,
    since: int | None,
    until: int | None,
    filters: Filters = NO_FILTERS,
    after: tuple[int, str] | None = None,
    limit: int = 100,
) -> list[UsageEvent]:
    """Usage events with since <= ts_ms < until matching `filters`, in (ts_ms, request_id)
    order (that of `tokenhub events export`), the first `limit` after the position `after`.

    Without a tenant, the time range rides the (ts_ms, request_id) index and reads events
    until `limit` of them match: a filter few events match (a fallback deployment's errors)
    reads the whole range, ~100 ms for a day of 33k events on SQLite. Indexes on (model,
    ts_ms) and (deployment, ts_ms) would make it cheap but cost the gateway's event writes
    ~40-65% more CPU (benches/bench_store.py's method: 11.8 -> 19.4 us an event in batches
    of 50, 6.4 -> 9.0 in batches of 1000); narrowing to the hours the rollups say hold a
    match halved the rare case and slowed the common ones. The explorer's rows drill down
    to a day at most (its link to the whole range's events can cover more)."""
    arg = _Args()
    conds = _dimension_conds(filters, arg, events=True)
    if since is not None:
        conds.append(f"ts_ms >= {arg(since)}")
    if until is not None:
        conds.append(f"ts_ms < {arg(until)}")
    if after is not None:
        ts = arg(after[0])
        conds.append(f"(ts_ms > {ts} OR (ts_ms = {ts} AND request_id > {arg(after[1])}))")
    sql = f"SELECT {_EVENT_COLS} FROM usage_events"
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    sql += f" ORDER BY ts_ms, request_id LIMIT {arg(int(limit))}"
    return [_event(r) for r in await tx.fetch(sql, *arg.values)]


async def iter_events(
    db: Database,
    *,
    since: int | None,
    until: int | None,
    filters: Filters = NO_FILTERS,
    page: int = EXPORT_PAGE,
) -> AsyncIterator[list[UsageEvent]]:
    """`events_page` a page per read transaction, to the end (an export holds no long
    snapshot; memory stays one page)."""
    after: tuple[int, str] | None = None
    while True:

        async def run(tx: Tx, after: tuple[int, str] | None = after) -> list[UsageEvent]:
            return await events_page(
                tx, since=since, until=until, filters=filters, after=after, limit=page
            )

        rows = await db.read(run)
        if rows:
            yield rows
        if len(rows) < page:
            return
        after = (rows[-1].ts_ms, rows[-1].request_id)


async def charges(tx: Tx, event_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per settled event, what its usage transaction charged the tenant per currency (nanos;
    the rollups' cost: postings on the tenant's accounts in money units). Unsettled events
    are absent."""
    out: dict[str, dict[str, int]] = {}
    if not event_ids:
        return out
    marks = ", ".join(f"${i + 1}" for i in range(len(event_ids)))
    rows = await tx.fetch(
        "SELECT s.event_id, p.unit, SUM(p.amount) FROM settlements s "
        "LEFT JOIN postings p ON p.txn_id = s.txn_id AND p.account LIKE 't:%' "
        "AND p.unit NOT IN ('TOKENS', 'POINTS') "
        f"WHERE s.event_id IN ({marks}) GROUP BY s.event_id, p.unit",
        *event_ids,
    )
    for eid, unit, amount in rows:
        d = out.setdefault(eid, {})
        if unit is not None and int(amount):
            d[unit] = d.get(unit, 0) + int(amount)
    return out


# -- routing health ---------------------------------------------------------------------------


@dataclass
class DeploymentHealth:
    deployment: str
    requests_1h: int = 0
    errors_1h: int = 0
    requests_24h: int = 0
    errors_24h: int = 0
    sampled: int = 0  # recent events the figures below come from
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    routes: dict[str, int] = field(default_factory=dict)  # route reason -> events
    tiers: dict[str, int] = field(default_factory=dict)  # tier -> events

    def error_pct(self, window: str) -> float | None:
        req = self.requests_1h if window == "1h" else self.requests_24h
        err = self.errors_1h if window == "1h" else self.errors_24h
        return None if not req else 100.0 * err / req


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


async def deployment_health(tx: Tx, *, now: int, sample: int = 5000) -> list[DeploymentHealth]:
    """Per deployment: settled requests and errors of the last hour and 24 hours (the hourly
    rollups per dimension: the current hour and the one before, the last 24 + 1), and from
    the `sample` most recent usage events of the last hour (settled or not): latency
    p50/p95, route reasons and tiers. Sorted by deployment."""
    out: dict[str, DeploymentHealth] = {}
    h = _hour_of(now)
    for since, which in ((h - HOUR_MS, "1h"), (h - 24 * HOUR_MS, "24h")):
        rows = await tx.fetch(
            f"SELECT value, status, SUM(requests) FROM {DIMS_HOURLY} "
            "WHERE hour_ms >= $1 AND hour_ms <= $2 AND dimension = 'deployment' "
            "GROUP BY value, status",
            since,
            h,
        )
        for dep, cls, n in rows:
            d = out.setdefault(dep, DeploymentHealth(dep))
            if which == "1h":
                d.requests_1h += int(n)
                d.errors_1h += int(n) if cls == "error" else 0
            else:
                d.requests_24h += int(n)
                d.errors_24h += int(n) if cls == "error" else 0
    rows = await tx.fetch(
        "SELECT deployment, latency_ms, route, tier FROM usage_events "
        "WHERE ts_ms >= $1 ORDER BY ts_ms DESC, request_id DESC LIMIT $2",
        now - HOUR_MS,
        int(sample),
    )
    lat: dict[str, list[float]] = defaultdict(list)
    routes: dict[str, Counter[str]] = defaultdict(Counter)
    tiers: dict[str, Counter[str]] = defaultdict(Counter)
    for dep, latency, route, tier in rows:
        lat[dep].append(float(latency))
        routes[dep][route or "-"] += 1
        if tier:
            tiers[dep][tier] += 1
    for dep, values in lat.items():
        d = out.setdefault(dep, DeploymentHealth(dep))
        d.sampled = len(values)
        d.latency_p50_ms = _pct(values, 0.5)
        d.latency_p95_ms = _pct(values, 0.95)
        d.routes = dict(sorted(routes[dep].items()))
        d.tiers = dict(sorted(tiers[dep].items()))
    return [out[k] for k in sorted(out)]


# -- audit logs, newest first ----------------------------------------------------------------


async def admin_audit(
    tx: Tx,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    before: tuple[int, str] | None = None,
    limit: int = 50,
) -> list[AdminAudit]:
    """The admin audit log, newest first, the first `limit` older than the (ts_ms, id)
    position `before`; `action` matches a prefix ("plan." matches plan.create)."""
    arg = _Args()
    conds = []
    if actor:
        conds.append(f"actor = {arg(actor)}")
    if action:
        conds.append(f"action LIKE {arg(action.replace('%', '').replace('_', '') + '%')}")
    if target:
        conds.append(f"target = {arg(target)}")
    if before is not None:
        ts = arg(before[0])
        conds.append(f"(ts_ms < {ts} OR (ts_ms = {ts} AND id < {arg(before[1])}))")
    where = " WHERE " + " AND ".join(conds) if conds else ""
    rows = await tx.fetch(
        "SELECT id, ts_ms, actor, action, target, before, after FROM admin_audit"
        f"{where} ORDER BY ts_ms DESC, id DESC LIMIT {arg(int(limit))}",
        *arg.values,
    )
    dec = msgspec.json.decode
    return [
        AdminAudit(
            id=r[0], ts_ms=r[1], actor=r[2], action=r[3], target=r[4],
            before=dec(r[5]), after=dec(r[6]),
        )
        for r in rows
    ]  # fmt: skip


async def guard_audit(
    tx: Tx,
    *,
    kind: str | None = None,
    tenant: str | None = None,
    key_id: str | None = None,
    before: tuple[int, str] | None = None,
    limit: int = 50,
) -> list[AuditEntry]:
    """The gateway's audit log (guard throttles, ...), newest first, filtered, the first
    `limit` older than the (ts_ms, id) position `before`."""
    arg = _Args()
    conds = []
    for col, v in (("kind", kind), ("tenant", tenant), ("key_id", key_id)):
        if v:
            conds.append(f"{col} = {arg(v)}")
    if before is not None:
        ts = arg(before[0])
        conds.append(f"(ts_ms < {ts} OR (ts_ms = {ts} AND id < {arg(before[1])}))")
    where = " WHERE " + " AND ".join(conds) if conds else ""
    rows = await tx.fetch(
        f"SELECT id, ts_ms, kind, tenant, key_id, details FROM audit_log{where} "
        f"ORDER BY ts_ms DESC, id DESC LIMIT {arg(int(limit))}",
        *arg.values,
    )
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], msgspec.json.decode(r[5])) for r in rows]


# -- ledger reads -------------------------------------------------------------------------------


@dataclass
class CodeRow:
    prefix: str
    amount: int
    currency: str
    created_ms: int
    expires_ms: int | None
    redeemed_by: str | None
    redeemed_ms: int | None

    def status(self, now: int) -> str:
        if self.redeemed_ms is not None:
            return "redeemed"
        if self.expires_ms is not None and self.expires_ms <= now:
            return "expired"
        return "open"


async def codes_page(
    tx: Tx, *, before: tuple[int, str] | None = None, limit: int = 50
) -> tuple[list[CodeRow], tuple[int, str] | None]:
    """Redemption codes (their prefix only: the code is a secret kept as SHA-256), newest
    first; returns the rows and the position after them (None at the end)."""
    arg = _Args()
    where = ""
    if before is not None:
        ts = arg(before[0])
        where = f" WHERE (created_ms < {ts} OR (created_ms = {ts} AND sha256 < {arg(before[1])}))"
    rows = await tx.fetch(
        "SELECT prefix, amount, currency, created_ms, expires_ms, redeemed_by, redeemed_ms, "
        f"sha256 FROM redemption_codes{where} ORDER BY created_ms DESC, sha256 DESC "
        f"LIMIT {arg(int(limit) + 1)}",
        *arg.values,
    )
    out = [CodeRow(r[0], int(r[1]), r[2], int(r[3]), r[4], r[5], r[6]) for r in rows[:limit]]
    nxt = (int(rows[limit - 1][3]), rows[limit - 1][7]) if len(rows) > limit else None
    return out, nxt


@dataclass
class InvoiceRow:
    txn_id: str
    tenant: str
    period: str
    currency: str
    owed: int
    due: int
    ts_ms: int


async def invoices(tx: Tx, *, tenant: str | None = None, limit: int = 200) -> list[InvoiceRow]:
    """Postpaid invoices (ledger transactions of kind invoice, ref `invoice:<period>`, found
    through the ref index), the latest periods first."""
    arg = _Args()
    conds = [
        f"ref >= {arg('invoice:')}",
        f"ref < {arg('invoice;')}",
        "kind = 'invoice'",
    ]
    if tenant:
        conds.append(f"tenant = {arg(tenant)}")
    rows = await tx.fetch(
        f"SELECT id, tenant, details, ts_ms FROM ledger_txns WHERE {' AND '.join(conds)} "
        f"ORDER BY ref DESC, tenant, id LIMIT {arg(int(limit))}",
        *arg.values,
    )
    out = []
    for tid, ten, details, ts in rows:
        d = msgspec.json.decode(details) if details else {}
        out.append(
            InvoiceRow(
                tid, ten, str(d.get("period", "")), str(d.get("currency", "")),
                int(d.get("owed", 0)), int(d.get("due", 0)), int(ts),
            )
        )  # fmt: skip
    return out


async def receivables(tx: Tx) -> list[tuple[str, str, int]]:
    """(tenant, currency, nanos owed) of every receivable above 0."""
    rows = await tx.fetch(
        "SELECT tenant, unit, balance FROM accounts WHERE kind = 'receivable' AND balance > 0 "
        "ORDER BY tenant, unit"
    )
    return [(r[0], r[1], int(r[2])) for r in rows]
