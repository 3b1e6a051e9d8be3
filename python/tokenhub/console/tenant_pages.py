"""Tenant self-service pages (`/console/my/...`, role "tenant": the session's own tenant only).

- `/console/my/`: the balance card (wallet, credit, spendable, packages left with expiry,
  points), the low-balance alert (threshold + webhook: set, clear; its signing secret shown
  once) and its latest webhook deliveries.
- `/console/my/usage`: settled usage per day, model or key with its cost, from the rollups
  (tokenhub.billing.rollups.usage_summary): a stacked bar chart per day and a table of the
  same data; `/console/my/usage.csv` the table as CSV.
- `/console/my/requests`: the request log, metadata only (events hold no prompt), newest
  first, keyset-paged on (ts_ms, request_id) through the index usage_events_tenant_ts;
  `/console/my/requests/{id}` one request.
- `/console/my/keys`: own keys; create (the secret shown once, on the next page only, within
  MAX_KEYS_PER_TENANT), revoke.
- `/console/my/redeem`: a redemption code; the form carries a one-time token recorded with
  the redemption (idempotency_keys), so a resubmitted form redeems once.
- `/console/my/statements?period=YYYY-MM`: the month's statement.
- `/console/my/limits`: the configured limits of the tenant and its keys, with today's
  settled tokens against the daily budget (the live per-minute headroom is the gateway's:
  `GET /v1/tokenhub/limits`).

Isolation: every read and write names `session.tenant` and nothing from the request; an id
from the URL (a key, a request) that is not the tenant's is 404, as one that does not exist.
The service functions are the tenant API's (tokenhub.tenant.routes) and billing's.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import time
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from tokenhub.billing import alerts, reports, rollups
from tokenhub.billing.ledger import LedgerError, period_bounds, period_of
from tokenhub.billing.service import get_profile, redeem_in
from tokenhub.billing.statements import tenant_statement
from tokenhub.billing.tenant_service import (
    KEY_LIMITS,
    MAX_KEYS_PER_TENANT,
    TENANT_LIMITS,
    balance_in,
    create_key_in,
    revoke_own_key_in,
)
from tokenhub.console import charts
from tokenhub.console.core import (
    ConsoleError,
    PageRoute,
    Session,
    db,
    decode_cursor,
    encode_cursor,
    form,
    gettext,
    new_secret,
    redirect,
    render,
    show_once,
    take_once,
)
from tokenhub.db.database import Tx
from tokenhub.money import fmt, fmt_units
from tokenhub.store import sql
from tokenhub.store.base import NotFound
from tokenhub.usage import EVENT_FIELDS, UsageEvent

DAY_MS = rollups.DAY_MS
RANGES = {"7d": 7, "30d": 30, "90d": 90}
DEFAULT_RANGE = "30d"
GROUPS = ("day", "model", "key")
MAX_SERIES = 6  # chart series: the largest, the rest as "other"
REQUESTS_PAGE = 50
MAX_FORM_TOKEN = 100


def _now() -> int:
    return int(time.time() * 1000)


def _tenant(session: Session) -> str:
    if session.tenant is None:  # a tenant user always has one (console_users.tenant)
        raise ConsoleError("this user has no tenant")
    return session.tenant


def _field(posted: Any, name: str) -> str:
    v = posted.get(name, "")
    return v.strip() if isinstance(v, str) else ""


def _money_text(cost: dict[str, int]) -> list[str]:
    return [fmt(v, c, exact=True) for c, v in sorted(cost.items()) if v]


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _day(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")


# -- balance and the low-balance alert ----------------------------------------------------------


async def balance_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)

    async def run(tx: Tx) -> tuple[dict[str, Any], alerts.Alert | None, list[alerts.Delivery]]:
        return (
            await balance_in(tx, tenant),
            await alerts.get_alert(tx, tenant),
            await alerts.deliveries(tx, tenant, 10),
        )

    bal, alert, sent = await (await db(request)).read(run)
    deliveries = [
        {
            "id": d.id,
            "created": _iso(d.created_ms),
            "state": d.state,
            "attempts": d.attempts,
            "error": d.last_error or "",
        }
        for d in sent
    ]
    return render(
        request,
        session,
        "tenant_balance.html",
        bal=bal,
        alert=alert,
        threshold=None if alert is None else fmt(alert.threshold, alert.currency, exact=True),
        threshold_value=""
        if alert is None
        else fmt(alert.threshold, alert.currency, exact=True).split()[0],
        alert_secret=take_once(request, "alert_secret"),
        has_overrun=Decimal(bal["overrun"]["amount"]) != 0,
        deliveries=deliveries,
        allow_http=alerts.allow_private_default(),
    )


async def set_alert(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    posted = await form(request)
    amount, url = _field(posted, "amount"), _field(posted, "webhook_url")
    if not amount or not url:
        raise ConsoleError(gettext(request, "Give a threshold and a webhook URL."))
    rotate = _field(posted, "rotate") == "1"

    async def run(tx: Tx) -> str | None:
        prof = await get_profile(tx, tenant)
        before = await alerts.get_alert(tx, tenant)
        alert, secret = await alerts.set_alert(
            tx, tenant, amount, prof.currency, url, rotate_secret=rotate
        )
        await sql.add_admin_audit(
            tx,
            session.actor,
            "alert.set",
            tenant,
            None if before is None else {"threshold": before.threshold},
            {"threshold": alert.threshold},
        )
        return secret

    secret = await (await db(request)).transaction(run)
    if secret is not None:
        show_once(request, "alert_secret", secret)
    raise redirect(request, "/console/my/", flash=gettext(request, "Low-balance alert saved."))


async def clear_alert(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)

    async def run(tx: Tx) -> bool:
        gone = await alerts.delete_alert(tx, tenant)
        if gone:
            await sql.add_admin_audit(tx, session.actor, "alert.delete", tenant, None, None)
        return gone

    gone = await (await db(request)).transaction(run)
    msg = "Low-balance alert removed." if gone else "No low-balance alert was set."
    raise redirect(request, "/console/my/", flash=gettext(request, msg), error=not gone)


# -- usage --------------------------------------------------------------------------------------


def _date_ms(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name, "").strip()
    if not raw:
        return None
    try:
        d = dt.date.fromisoformat(raw)
    except ValueError:
        raise ConsoleError(
            gettext(request, "{name} must be a date like 2026-11-01.").format(name=name)
        ) from None
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp() * 1000)


def usage_window(request: web.Request, now: int | None = None) -> tuple[int, int, str]:
    """(since, until, range): whole UTC days; a preset (7d, 30d, 90d, ending today) or
    since/until dates (until exclusive), at most 366 days."""
    now = _now() if now is None else now
    tomorrow = now - now % DAY_MS + DAY_MS
    since, until = _date_ms(request, "since"), _date_ms(request, "until")
    preset = request.query.get("range", "")
    if preset in RANGES or (since is None and until is None):
        days = RANGES.get(preset, RANGES[DEFAULT_RANGE])
        return tomorrow - days * DAY_MS, tomorrow, preset if preset in RANGES else DEFAULT_RANGE
    hi = until if until is not None else tomorrow
    lo = since if since is not None else hi - RANGES[DEFAULT_RANGE] * DAY_MS
    if hi <= lo:
        raise ConsoleError(gettext(request, "until must be later than since"))
    if hi - lo > 366 * DAY_MS:
        raise ConsoleError(gettext(request, "The range is too long: at most 366 days."))
    return lo, hi, "custom"


async def _usage(
    request: web.Request, tenant: str
) -> tuple[int, int, str, str, list[rollups.SummaryRow], dict[str, str], str]:
    since, until, preset = usage_window(request)
    group = request.query.get("group", "day")
    if group not in GROUPS:
        raise ConsoleError(gettext(request, "Group by must be day, model or key."))
    dim = "model" if group == "day" else group

    async def run(tx: Tx) -> tuple[list[rollups.SummaryRow], dict[str, str], str]:
        rows = await rollups.usage_summary(
            tx, since=since, until=until, group_by=("day", dim), tenant=tenant
        )
        prefixes = {k.id: k.prefix for k in await sql.keys_in(tx, tenant)}
        return rows, prefixes, (await get_profile(tx, tenant)).currency

    rows, prefixes, currency = await (await db(request)).read(run)
    return since, until, preset, group, rows, prefixes, currency


def _grouped(rows: list[rollups.SummaryRow], group: str) -> list[rollups.SummaryRow]:
    """The per-day-and-dimension rows summed per day (group "day") or per model / key."""
    out: dict[Any, rollups.SummaryRow] = {}
    for r in rows:
        k: Any = r.bucket_ms if group == "day" else r.group
        acc = out.setdefault(k, rollups.SummaryRow(r.bucket_ms, r.group))
        acc.requests += r.requests
        acc.ok += r.ok
        acc.input_tokens += r.input_tokens
        acc.cached_tokens += r.cached_tokens
        acc.output_tokens += r.output_tokens
        for c, v in r.cost.items():
            acc.cost[c] = acc.cost.get(c, 0) + v
    return [out[k] for k in sorted(out)]


def _chart(rows: list[rollups.SummaryRow], label: dict[str, str], other: str) -> Any:
    """Tokens (in + out) per day, stacked by model or key."""
    days = sorted({r.bucket_ms for r in rows})
    index = {b: i for i, b in enumerate(days)}
    totals: dict[str, int] = {}
    for r in rows:
        totals[r.group] = totals.get(r.group, 0) + r.input_tokens + r.output_tokens
    top = sorted(totals, key=lambda g: (-totals[g], g))
    shown = set(top[:MAX_SERIES]) if len(top) > MAX_SERIES + 1 else set(top)
    series: dict[str, list[int]] = {label.get(g, g) or "-": [0] * len(days) for g in sorted(shown)}
    for r in rows:
        name = (label.get(r.group, r.group) or "-") if r.group in shown else other
        series.setdefault(name, [0] * len(days))[index[r.bucket_ms]] += (
            r.input_tokens + r.output_tokens
        )
    return charts.bar_chart([_day(d) for d in days], series, unit=" tokens")


async def usage_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    since, until, preset, group, rows, prefixes, currency = await _usage(request, tenant)
    label = prefixes if group != "model" else {}
    grouped = _grouped(rows, group)
    table = []
    total = rollups.SummaryRow(0, "")
    for r in grouped:
        total.requests += r.requests
        total.ok += r.ok
        total.input_tokens += r.input_tokens
        total.cached_tokens += r.cached_tokens
        total.output_tokens += r.output_tokens
        for c, v in r.cost.items():
            total.cost[c] = total.cost.get(c, 0) + v
        name = _day(r.bucket_ms) if group == "day" else (label.get(r.group, r.group) or "-")
        table.append(
            {
                "row": r,
                "name": name,
                "cost": _money_text(r.cost),
                "cost_attr": ";".join(f"{c}:{v}" for c, v in sorted(r.cost.items()) if v),
            }
        )
    chart_label = prefixes if group == "key" else {}
    chart = _chart(rows, chart_label, gettext(request, "other")) if rows else None
    q = {"since": _day(since), "until": _day(until), "group": group}
    return render(
        request,
        session,
        "tenant_usage.html",
        rows=table,
        total=total,
        total_cost=_money_text(total.cost),
        total_cost_attr=";".join(f"{c}:{v}" for c, v in sorted(total.cost.items()) if v),
        chart=chart,
        group=group,
        groups=GROUPS,
        preset=preset,
        ranges=tuple(RANGES),
        since_day=_day(since),
        until_day=_day(until - DAY_MS),
        since_value=request.query.get("since", "") if preset == "custom" else "",
        until_value=request.query.get("until", "") if preset == "custom" else "",
        currency=currency,
        csv_url="/console/my/usage.csv?" + urlencode(q),
    )


async def usage_csv(request: web.Request, session: Session) -> web.StreamResponse:
    """The usage table as CSV: the group, counts, and one cost column per currency (the
    tenant's first), amounts as exact decimals."""
    tenant = _tenant(session)
    since, until, _, group, rows, prefixes, currency = await _usage(request, tenant)
    grouped = _grouped(rows, group)
    currencies = sorted({c for r in grouped for c in r.cost}, key=lambda c: (c != currency, c))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = {"day": "day", "model": "model", "key": "key_id"}[group]
    w.writerow(
        [head]
        + (["key_prefix"] if group == "key" else [])
        + ["requests", "ok", "input_tokens", "cached_input_tokens", "output_tokens"]
        + [f"cost_{c}" for c in currencies]
    )
    for r in grouped:
        first = _day(r.bucket_ms) if group == "day" else r.group
        w.writerow(
            [first]
            + ([prefixes.get(r.group, "")] if group == "key" else [])
            + [r.requests, r.ok, r.input_tokens, r.cached_tokens, r.output_tokens]
            + [fmt(r.cost.get(c, 0), c, exact=True).split()[0] for c in currencies]
        )
    name = f"usage-{tenant}-{_day(since)}-{_day(until - DAY_MS)}-by-{group}.csv"
    return web.Response(
        body=buf.getvalue().encode(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# -- the request log ----------------------------------------------------------------------------

_EVENT_COLS = ", ".join(EVENT_FIELDS)


def _event(row: Any) -> UsageEvent:
    fields = dict(zip(EVENT_FIELDS, row, strict=True))
    fields["stream"] = bool(fields["stream"])
    return UsageEvent(**fields)


async def requests_page_in(
    tx: Tx, tenant: str, before: tuple[int, str] | None, limit: int
) -> list[UsageEvent]:
    """The tenant's events newest first, the `limit` after (older than) `before`: index
    usage_events_tenant_ts (tenant, ts_ms), read backwards."""
    if before is None:
        rows = await tx.fetch(
            f"SELECT {_EVENT_COLS} FROM usage_events WHERE tenant = $1 "
            "ORDER BY ts_ms DESC, request_id DESC LIMIT $2",
            tenant,
            limit,
        )
    else:
        rows = await tx.fetch(
            f"SELECT {_EVENT_COLS} FROM usage_events WHERE tenant = $1 AND ts_ms <= $2 "
            "AND (ts_ms < $2 OR request_id < $3) ORDER BY ts_ms DESC, request_id DESC LIMIT $4",
            tenant,
            before[0],
            before[1],
            limit,
        )
    return [_event(r) for r in rows]


def _request_row(e: UsageEvent, prefixes: dict[str, str], cost: dict[str, dict[str, int]]) -> Any:
    return {
        "e": e,
        "time": _iso(e.ts_ms),
        "prefix": prefixes.get(e.key_id, ""),
        "settled": e.request_id in cost,
        "cost": _money_text(cost.get(e.request_id, {})),
        "latency": f"{e.latency_ms:.0f}",
    }


async def requests_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    before = decode_cursor(request)

    async def run(tx: Tx) -> tuple[list[UsageEvent], dict[str, str], dict[str, dict[str, int]]]:
        rows = await requests_page_in(tx, tenant, before, REQUESTS_PAGE + 1)
        prefixes = {k.id: k.prefix for k in await sql.keys_in(tx, tenant)}
        cost = await reports.charges(tx, [e.request_id for e in rows[:REQUESTS_PAGE]])
        return rows, prefixes, cost

    rows, prefixes, cost = await (await db(request)).read(run)
    more = len(rows) > REQUESTS_PAGE
    rows = rows[:REQUESTS_PAGE]
    return render(
        request,
        session,
        "tenant_requests.html",
        rows=[_request_row(e, prefixes, cost) for e in rows],
        next_cursor=encode_cursor(rows[-1].ts_ms, rows[-1].request_id) if more else None,
        first_page=before is None,
    )


async def request_detail(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    rid = request.match_info["id"]

    async def run(tx: Tx) -> tuple[UsageEvent, dict[str, str], dict[str, dict[str, int]]]:
        row = await tx.fetchrow(
            f"SELECT {_EVENT_COLS} FROM usage_events WHERE request_id = $1 AND tenant = $2",
            rid,
            tenant,
        )
        if row is None:  # another tenant's request is not found, as one that does not exist
            raise NotFound(gettext(request, "No such request."))
        prefixes = {k.id: k.prefix for k in await sql.keys_in(tx, tenant)}
        return _event(row), prefixes, await reports.charges(tx, [rid])

    e, prefixes, cost = await (await db(request)).read(run)
    return render(request, session, "tenant_request.html", r=_request_row(e, prefixes, cost))


# -- keys ---------------------------------------------------------------------------------------


async def keys_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    keys = await (await db(request)).read(lambda tx: sql.keys_in(tx, tenant))
    active = sum(1 for k in keys if k.active)
    return render(
        request,
        session,
        "tenant_keys.html",
        keys=keys,
        active=active,
        max_keys=MAX_KEYS_PER_TENANT,
        new_secret=take_once(request, "key_secret"),
        new_key_id=take_once(request, "key_id"),
    )


async def create_key(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    secret = sql.new_key_secret()
    key = await (await db(request)).transaction(
        lambda tx: create_key_in(tx, tenant, secret, session.actor)
    )
    show_once(request, "key_secret", secret)
    show_once(request, "key_id", key.id)
    raise redirect(
        request,
        "/console/my/keys",
        flash=gettext(request, "Key {prefix} created.").format(prefix=key.prefix),
    )


async def revoke_key(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    key_id = request.match_info["id"]
    key = await (await db(request)).transaction(
        lambda tx: revoke_own_key_in(tx, tenant, key_id, session.actor)
    )
    raise redirect(
        request,
        "/console/my/keys",
        flash=gettext(request, "Key {prefix} revoked.").format(prefix=key.prefix),
    )


# -- redeem -------------------------------------------------------------------------------------


async def redeem_page(request: web.Request, session: Session) -> web.StreamResponse:
    return render(request, session, "tenant_redeem.html", form_token=new_secret())


async def redeem(request: web.Request, session: Session) -> web.StreamResponse:
    """Redeems once per form: the form's token is recorded (idempotency_keys, actor
    tenant:<t>) in the transaction that moves the money, so a resubmit (a reload, a double
    click) finds it and redeems nothing; a code already used is the service's error."""
    tenant = _tenant(session)
    posted = await form(request)
    code, token = _field(posted, "code"), _field(posted, "form_token")
    if not code:
        raise ConsoleError(gettext(request, "Enter a redemption code."))
    if not token or len(token) > MAX_FORM_TOKEN or not token.isascii() or not token.isprintable():
        raise ConsoleError(gettext(request, "The form expired: reload the page and try again."))
    actor, key = f"tenant:{tenant}", f"console-redeem:{token}"
    digest = hashlib.sha256(code.encode()).hexdigest()

    async def replayed(tx: Tx) -> bool:
        prev = await sql.idempotent_response(tx, actor, key)
        if prev is None:
            return False
        if prev.request_digest != digest:
            raise ConsoleError(
                gettext(request, "This form was used for another code: reload the page.")
            )
        return True

    async def run(tx: Tx) -> dict[str, Any] | None:
        if await replayed(tx):
            return None
        prof = await get_profile(tx, tenant)
        txn = await redeem_in(tx, tenant, code)
        bal = await balance_in(tx, tenant)
        out = {"transaction": txn, "wallet": bal["wallet"], "currency": prof.currency}
        await sql.add_admin_audit(tx, session.actor, "code.redeem", tenant, None, {"txn": txn})
        await sql.record_idempotent(tx, actor, key, digest, 201, json.dumps(out))
        return out

    database = await db(request)
    try:
        out = await database.transaction(run)
    except (ConsoleError, ValueError, LedgerError):
        raise
    except Exception:
        if not await database.read(replayed):  # a concurrent twin committed first
            raise
        out = None
    if out is None:
        raise redirect(
            request,
            "/console/my/",
            flash=gettext(request, "This form was sent already: the code was redeemed once."),
        )
    w = out["wallet"]
    raise redirect(
        request,
        "/console/my/",
        flash=gettext(request, "Code redeemed. Wallet: {amount} {currency}.").format(
            amount=w["amount"], currency=w["currency"]
        ),
    )


# -- statements ---------------------------------------------------------------------------------


def _months(now: int, n: int = 12) -> list[str]:
    out = [period_of(now)]
    while len(out) < n:
        y, m = map(int, out[-1].split("-"))
        out.append(f"{y - (m == 1):04d}-{(m - 2) % 12 + 1:02d}")
    return out


async def statements_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    now = _now()
    period = request.query.get("period", "").strip() or period_of(now)
    try:
        period_bounds(period)
    except LedgerError:
        raise ConsoleError(gettext(request, "Month must look like 2026-11.")) from None
    st = await (await db(request)).read(lambda tx: tenant_statement(tx, tenant, period))
    usage = [
        {
            "model": u["model"],
            "tokens": u["tokens"],
            "package_tokens": u["package_tokens"],
            "amounts": [fmt_units(v, c) for c, v in sorted(u["amounts"].items())],
        }
        for u in st["usage"]
    ]
    return render(
        request,
        session,
        "tenant_statements.html",
        st=st,
        period=period,
        months=_months(now),
        usage=usage,
        purchases=[
            {"memo": p.get("memo", ""), "price": fmt(p["price"], p["currency"], exact=True)}
            for p in st["purchases"]
            if "price" in p and "currency" in p
        ],
        other=[
            (k, [fmt_units(v, u) for u, v in sorted(units.items())])
            for k, units in sorted(st["other"].items())
        ],
    )


# -- limits -------------------------------------------------------------------------------------


async def limits_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = _tenant(session)
    now = _now()
    today = now - now % DAY_MS

    async def run(tx: Tx) -> tuple[Any, list[tuple[Any, Any]], int]:
        tlim = await sql.limits_in(tx, "tenant", tenant)
        keys = [k for k in await sql.keys_in(tx, tenant) if k.active]
        klims = [(k, await sql.limits_in(tx, "key", k.id)) for k in keys]
        used = sum(
            r.input_tokens + r.output_tokens
            for r in await rollups.usage_summary(
                tx, since=today, until=today + DAY_MS, group_by=("day", "tenant"), tenant=tenant
            )
        )
        return tlim, klims, used

    tlim, klims, used = await (await db(request)).read(run)
    budget = tlim.tokens_per_day
    return render(
        request,
        session,
        "tenant_limits.html",
        tenant_limits=[(f, getattr(tlim, f)) for f in TENANT_LIMITS],
        key_fields=KEY_LIMITS,
        keys=[{"key": k, "limits": [getattr(lim, f) for f in KEY_LIMITS]} for k, lim in klims],
        used_today=used,
        budget=budget,
        left_today=None if budget is None else max(0, budget - used),
    )


ROUTES: list[PageRoute] = [
    PageRoute("GET", "/console/my/", "tenant", balance_page),
    PageRoute("POST", "/console/my/alert", "tenant", set_alert),
    PageRoute("POST", "/console/my/alert/delete", "tenant", clear_alert),
    PageRoute("GET", "/console/my/usage", "tenant", usage_page),
    PageRoute("GET", "/console/my/usage.csv", "tenant", usage_csv),
    PageRoute("GET", "/console/my/requests", "tenant", requests_page),
    PageRoute("GET", "/console/my/requests/{id}", "tenant", request_detail),
    PageRoute("GET", "/console/my/keys", "tenant", keys_page),
    PageRoute("POST", "/console/my/keys/new", "tenant", create_key),
    PageRoute("POST", "/console/my/keys/{id}/revoke", "tenant", revoke_key),
    PageRoute("GET", "/console/my/redeem", "tenant", redeem_page),
    PageRoute("POST", "/console/my/redeem", "tenant", redeem),
    PageRoute("GET", "/console/my/statements", "tenant", statements_page),
    PageRoute("GET", "/console/my/limits", "tenant", limits_page),
]
