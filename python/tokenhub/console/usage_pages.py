"""The usage explorer (`/console/usage`, operators with role read or above).

- `/console/usage`: a time range (presets today / 7d / 30d, or since/until), filters (tenant,
  key, model, deployment, status class; `stream` narrows the events and exports only, the
  rollups do not keep it), group by hour|day x tenant|key|model|deployment: a stacked bar
  chart and a table of the same rows (requests, ok, tokens in / cached / out, cost per
  currency), with a totals row. Read from the rollups only (tokenhub.billing.reports).
- `/console/usage/events`: the raw events of one bucket and group (or any filter), metadata
  only (never a prompt: events hold none), keyset-paged on (ts_ms, request_id).
- `/console/usage/export.csv|.jsonl`: the events in the filter, streamed a page per read
  transaction, in the rows and columns of `tokenhub events export`; `export.focus.csv`:
  `tokenhub billing export --format focus` for the window (and tenant).

Time bounds: `since` inclusive, `until` exclusive (as the CLI's), ISO dates or datetimes (UTC)
or Unix milliseconds; the explorer rounds them out to whole hours (the rollups' grain).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import time
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from tokenhub.billing import io as bio
from tokenhub.billing import reports
from tokenhub.billing.rollups import DAY_MS, DIMENSIONS, HOUR_MS, PERIODS, SummaryRow
from tokenhub.console import charts
from tokenhub.console.core import (
    ConsoleError,
    PageRoute,
    Session,
    db,
    decode_cursor,
    encode_cursor,
    gettext,
    render,
)
from tokenhub.db.database import Tx
from tokenhub.money import fmt
from tokenhub.usage import EVENT_FIELDS, UsageEvent, event_csv_row, event_jsonl

log = logging.getLogger("tokenhub.console")

PRESETS = ("today", "7d", "30d")
DEFAULT_PRESET = "7d"
MAX_RANGE_MS = 400 * DAY_MS  # a summary reads at most this much (daily rows: ~400 buckets)
# Hourly buckets over at most 8 days (a week plus the partial days at either end: ~200 bars);
# 30 days by hour x model read 4,284 rows in 377 ms with 1M events (by day: 180 rows, 88 ms).
MAX_HOURLY_MS = 8 * DAY_MS
MAX_TABLE_ROWS = 400  # table rows a page renders (summary.csv has them all)
MAX_SERIES = 8  # chart series: the largest groups, the rest as one "other"
EVENTS_PAGE = 100
FILTER_KEYS = ("tenant", "key", "model", "deployment", "status", "stream")


def _now() -> int:
    return int(time.time() * 1000)


def _ceil_hour(ms: int) -> int:
    return ms + (-ms % HOUR_MS)


def _iso(ms: int) -> str:
    return bio.iso_z(ms)


def _parse_ms(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name, "").strip()
    if not raw:
        return None
    try:
        return bio.parse_time(raw)
    except (bio.BillingIOError, OverflowError, ValueError):
        raise ConsoleError(
            gettext(request, "Bad time for {name}: give a date (2026-11-01), a datetime "
                    "(2026-11-01T12:00:00Z) or Unix milliseconds.").format(name=name)
        ) from None  # fmt: skip


def window(request: web.Request, now: int | None = None) -> tuple[int, int, str]:
    """(since, until, preset) of the request: since/until when either is given ("custom"; the
    other missing takes the 7-day preset's bound), else the `range` preset (default 7d).
    ConsoleError on a bad or empty range."""
    now = _now() if now is None else now
    today = now - now % DAY_MS
    preset = request.query.get("range", "")
    since, until = _parse_ms(request, "since"), _parse_ms(request, "until")
    if since is not None or until is not None:
        preset = "custom"  # dates given win over the range menu
    elif preset not in PRESETS:
        preset = DEFAULT_PRESET
    if preset != "custom":
        days = {"today": 1, "7d": 7, "30d": 30}[preset]
        return today - (days - 1) * DAY_MS, _ceil_hour(now + 1), preset
    # Whole hours, the rollups' grain: the summary and its drill-downs then cover the same events.
    lo = since - since % HOUR_MS if since is not None else today - 6 * DAY_MS
    hi = _ceil_hour(until) if until is not None else _ceil_hour(now + 1)
    if hi <= lo:
        raise ConsoleError(gettext(request, "until must be later than since"))
    if hi - lo > MAX_RANGE_MS:
        raise ConsoleError(gettext(request, "The range is too long: at most 400 days."))
    return lo, hi, preset


def filters(request: web.Request) -> reports.Filters:
    """The request's filters; `none=deployment,...` asks for the empty value (a request that
    reached no deployment), which a form field cannot tell from "any"."""
    q = request.query
    empty = set(q.get("none", "").split(","))

    def opt(name: str) -> str | None:
        if name in empty:
            return ""
        v = q.get(name, "").strip()
        return v or None

    status = opt("status")
    if status is not None and status not in reports.STATUS_CLASSES:
        raise ConsoleError(gettext(request, "status must be ok or error"))
    stream_raw = opt("stream")
    if stream_raw is not None and stream_raw not in ("true", "false"):
        raise ConsoleError(gettext(request, "stream must be true or false"))
    return reports.Filters(
        tenant=opt("tenant"),
        key_id=opt("key"),
        model=opt("model"),
        deployment=opt("deployment"),
        status=status,
        stream=None if stream_raw is None else stream_raw == "true",
    )


def _filter_params(f: reports.Filters) -> dict[str, str]:
    out = {
        "tenant": f.tenant,
        "key": f.key_id,
        "model": f.model,
        "deployment": f.deployment,
        "status": f.status,
        "stream": None if f.stream is None else ("true" if f.stream else "false"),
    }
    params = {k: v for k, v in out.items() if v}
    if none := [k for k, v in out.items() if v == ""]:
        params["none"] = ",".join(none)
    return params


_FIELDS = {"tenant": "tenant", "key": "key_id", "model": "model", "deployment": "deployment"}
_LABELS = {"tenant": "Tenant", "key": "Key", "model": "Model", "deployment": "Deployment",
           "status": "Status", "stream": "Stream"}  # fmt: skip


def _shown(request: web.Request, f: reports.Filters) -> list[tuple[str, str]]:
    """(label, value) of each filter set, translated; the empty value as "(none)"."""
    params = _filter_params(f)
    out = [(gettext(request, _LABELS[k]), v) for k, v in params.items() if k != "none"]
    none = params.get("none", "")
    out += [
        (gettext(request, _LABELS[k]), gettext(request, "(none)")) for k in none.split(",") if k
    ]
    return out


def _query(params: Mapping[str, Any]) -> str:
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def _money_text(cost: Mapping[str, int]) -> list[str]:
    return [fmt(v, c, exact=True) for c, v in sorted(cost.items())]


def _bucket_label(ms: int, period: str) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return t.strftime("%Y-%m-%d") if period == "day" else t.strftime("%m-%d %H:00")


# -- the explorer -------------------------------------------------------------------------------


def _chart(rows: list[SummaryRow], period: str, metric: str, other: str, title: str) -> Any:
    buckets = sorted({r.bucket_ms for r in rows})
    index = {b: i for i, b in enumerate(buckets)}

    def value(r: SummaryRow) -> int:
        return r.requests if metric == "requests" else r.input_tokens + r.output_tokens

    totals: dict[str, int] = {}
    for r in rows:
        totals[r.group] = totals.get(r.group, 0) + value(r)
    top = sorted(totals, key=lambda g: (-totals[g], g))
    shown = set(top[:MAX_SERIES]) if len(top) > MAX_SERIES + 1 else set(top)
    series: dict[str, list[int]] = {g: [0] * len(buckets) for g in sorted(shown)}
    for r in rows:
        g = r.group if r.group in shown else other
        series.setdefault(g, [0] * len(buckets))[index[r.bucket_ms]] += value(r)
    labels = [_bucket_label(b, period) for b in buckets]
    return charts.bar_chart(labels, series, title=title, fmt=compact)


def compact(v: int) -> str:
    """An axis label that fits the chart's margin: 1.5M, 250k (the table has exact figures)."""
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if abs(v) >= size:
            return f"{v / size:.3g}{suffix}"
    return str(v)


class _Summary(NamedTuple):
    since: int
    until: int
    preset: str
    f: reports.Filters
    period: str
    dim: str
    rows: list[SummaryRow]


async def _summary(request: web.Request) -> _Summary:
    """The explorer's query (range, filters, group by) read from the rollups."""
    since, until, preset = window(request)
    f = filters(request)
    period = request.query.get("period", "day")
    dim = request.query.get("group", "model")
    if period not in PERIODS or dim not in DIMENSIONS:
        raise ConsoleError(gettext(request, "Group by must be hour or day x tenant, key, model "
                                   "or deployment."))  # fmt: skip
    if period == "hour" and until - since > MAX_HOURLY_MS:
        raise ConsoleError(gettext(request, "Group by hour covers at most 8 days."))
    summary_filters = msgspec.structs.replace(f, stream=None)

    async def run(tx: Tx) -> list[SummaryRow]:
        return await reports.usage_explore(
            tx, since=since, until=until, group_by=(period, dim), filters=summary_filters
        )

    rows = await (await db(request)).read(run)
    return _Summary(since, until, preset, f, period, dim, rows)


async def explorer(request: web.Request, session: Session | None) -> web.StreamResponse:
    since, until, preset, f, period, dim, rows = await _summary(request)
    metric = request.query.get("metric", "tokens")
    if metric not in ("tokens", "requests"):
        metric = "tokens"
    base = {"since": str(since), "until": str(until), **_filter_params(f)}
    total = SummaryRow(0, "")
    table = []
    # The table shows the latest MAX_TABLE_ROWS rows (rendering is what a 30-day day x tenant
    # page spends its time on); the totals, the chart and summary.csv count every row.
    first_shown = max(len(rows) - MAX_TABLE_ROWS, 0)
    for i, r in enumerate(rows):
        total.requests += r.requests
        total.ok += r.ok
        total.input_tokens += r.input_tokens
        total.cached_tokens += r.cached_tokens
        total.output_tokens += r.output_tokens
        for c, v in r.cost.items():
            total.cost[c] = total.cost.get(c, 0) + v
        if i < first_shown:
            continue
        drill = {
            # A day at either end of the range is partial: the drill-down covers its part.
            "since": str(max(r.bucket_ms, since)),
            "until": str(min(reports.bucket_end(r.bucket_ms, period), until)),
            **_filter_params(msgspec.structs.replace(f, **{_FIELDS[dim]: r.group})),
        }
        table.append(
            {
                "row": r,
                "label": _bucket_label(r.bucket_ms, period),
                "iso": _iso(r.bucket_ms),
                "cost": _money_text(r.cost),
                "cost_attr": ";".join(f"{c}:{v}" for c, v in sorted(r.cost.items())),
                "events_url": "/console/usage/events?" + _query(drill),
            }
        )
    total.cost = dict(sorted(total.cost.items()))
    chart = None
    if rows:
        title = gettext(request, "Tokens (in + out)" if metric == "tokens" else "Requests")
        chart = _chart(rows, period, metric, gettext(request, "other"), title)
    export_q = _query(base)
    return render(
        request,
        session,
        "usage_explorer.html",
        rows=table,
        rows_hidden=first_shown,
        summary_csv="/console/usage/summary.csv?"
        + _query({**base, "period": period, "group": dim}),
        total=total,
        total_cost=_money_text(total.cost),
        total_cost_attr=";".join(f"{c}:{v}" for c, v in total.cost.items()),
        chart=chart,
        since=since,
        until=until,
        since_iso=_iso(since),
        until_iso=_iso(until),
        preset=preset,
        presets=PRESETS,
        period=period,
        dim=dim,
        metric=metric,
        periods=PERIODS,
        dims=tuple(DIMENSIONS),
        f=_filter_params(f),
        since_value=request.query.get("since", "") if preset == "custom" else "",
        until_value=request.query.get("until", "") if preset == "custom" else "",
        export_csv="/console/usage/export.csv?" + export_q,
        export_jsonl="/console/usage/export.jsonl?" + export_q,
        export_focus="/console/usage/export.focus.csv?"
        + _query({"since": str(since), "until": str(until), "tenant": f.tenant}),
        events_url="/console/usage/events?" + export_q,
    )


async def summary_csv(request: web.Request, session: Session | None) -> web.StreamResponse:
    """The explorer's table as CSV, every row: the bucket's start (ISO 8601), the group,
    the counts, and the cost as one exact decimal column per currency."""
    s = await _summary(request)
    currencies = sorted({c for r in s.rows for c in r.cost})
    out: list[list[object]] = [
        [
            "time", s.dim, "requests", "ok", "input_tokens", "cached_tokens", "output_tokens",
            *(f"cost_{c}" for c in currencies),
        ]
    ]  # fmt: skip
    for r in s.rows:
        out.append(
            [
                _iso(r.bucket_ms), r.group, r.requests, r.ok, r.input_tokens, r.cached_tokens,
                r.output_tokens,
                *(fmt(r.cost[c], c, exact=True).split()[0] if c in r.cost else "0"
                  for c in currencies),
            ]
        )  # fmt: skip
    return web.Response(
        body=_csv_bytes(out),
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="usage-summary-{s.period}-{s.dim}.csv"',
        },
    )


# -- drill-down ----------------------------------------------------------------------------------


async def events(request: web.Request, session: Session | None) -> web.StreamResponse:
    since, until = _parse_ms(request, "since"), _parse_ms(request, "until")
    if since is not None and until is not None and until <= since:
        raise ConsoleError(gettext(request, "until must be later than since"))
    if since is None and until is None:
        since, until, _ = window(request)
    f = filters(request)
    after = decode_cursor(request)

    async def run(tx: Tx) -> tuple[list[UsageEvent], dict[str, dict[str, int]], dict[str, str]]:
        rows = await reports.events_page(
            tx, since=since, until=until, filters=f, after=after, limit=EVENTS_PAGE + 1
        )
        shown = rows[:EVENTS_PAGE]
        cost = await reports.charges(tx, [e.request_id for e in shown])
        prefixes = await _key_prefixes(tx, sorted({e.key_id for e in shown}))
        return rows, cost, prefixes

    rows, cost, prefixes = await (await db(request)).read(run)
    more = len(rows) > EVENTS_PAGE
    rows = rows[:EVENTS_PAGE]
    params = {k: v for k, v in request.query.items() if k != "cursor"}
    next_url = None
    if more:
        last = rows[-1]
        next_url = "/console/usage/events?" + _query(
            {**params, "cursor": encode_cursor(last.ts_ms, last.request_id)}
        )
    table = [
        {
            "e": e,
            "time": _iso(e.ts_ms),
            "prefix": prefixes.get(e.key_id, ""),
            "settled": e.request_id in cost,
            "cost": _money_text(cost.get(e.request_id, {})),
            "latency": f"{e.latency_ms:.0f}",
            "ttft": "" if e.ttft_ms is None else f"{e.ttft_ms:.0f}",
        }
        for e in rows
    ]
    return render(
        request,
        session,
        "usage_events.html",
        rows=table,
        next_url=next_url,
        since_iso=_iso(since) if since is not None else "",
        until_iso=_iso(until) if until is not None else "",
        f=_filter_params(f),
        shown=_shown(request, f),
        back_url="/console/usage?"
        + _query({"since": str(since or ""), "until": str(until or ""), **_filter_params(f)}),
    )


async def _key_prefixes(tx: Tx, key_ids: list[str]) -> dict[str, str]:
    if not key_ids:
        return {}
    marks = ", ".join(f"${i + 1}" for i in range(len(key_ids)))
    rows = await tx.fetch(f"SELECT id, prefix FROM api_keys WHERE id IN ({marks})", *key_ids)
    return {r[0]: r[1] for r in rows}


# -- exports ---------------------------------------------------------------------------------


def _csv_bytes(rows: list[list[object]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


async def _export_window(request: web.Request) -> tuple[int | None, int | None]:
    since, until = _parse_ms(request, "since"), _parse_ms(request, "until")
    if since is not None and until is not None and until <= since:
        raise ConsoleError(gettext(request, "until must be later than since"))
    if since is None and until is None and request.query.get("range") in PRESETS:
        lo, hi, _ = window(request)
        return lo, hi
    return since, until


async def _export(request: web.Request, kind: str) -> web.StreamResponse:
    since, until = await _export_window(request)
    f = filters(request)
    database = await db(request)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if kind == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="usage-events.{kind}"',
        }
    )
    await resp.prepare(request)
    try:
        if kind == "csv":
            await resp.write(_csv_bytes([list(EVENT_FIELDS)]))
        async for page in reports.iter_events(database, since=since, until=until, filters=f):
            if kind == "csv":
                await resp.write(_csv_bytes([event_csv_row(e) for e in page]))
            else:
                await resp.write(b"".join(event_jsonl(e) for e in page))
    except Exception:
        # The status line is sent: cut the connection, so that no truncated export looks
        # complete (as the admin API's export does).
        log.exception("console: usage export failed midway")
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp


async def export_csv(request: web.Request, session: Session | None) -> web.StreamResponse:
    return await _export(request, "csv")


async def export_jsonl(request: web.Request, session: Session | None) -> web.StreamResponse:
    return await _export(request, "jsonl")


FOCUS_CHUNK = 500


async def export_focus(request: web.Request, session: Session | None) -> web.StreamResponse:
    """`tokenhub billing export --format focus --since --until [--tenant]`: the same rows
    (bio.focus_rows), written in chunks."""
    since, until = await _export_window(request)
    tenant = request.query.get("tenant", "").strip() or None
    rows = await bio.focus_rows(await db(request), since=since, until=until, tenant=tenant)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": 'attachment; filename="focus.csv"',
        }
    )
    await resp.prepare(request)
    for i in range(0, max(len(rows), 1), FOCUS_CHUNK):
        buf = io.StringIO()
        w = csv.DictWriter(buf, bio.FOCUS_COLUMNS, lineterminator="\n")
        if i == 0:
            w.writeheader()
        w.writerows(rows[i : i + FOCUS_CHUNK])
        await resp.write(buf.getvalue().encode())
    await resp.write_eof()
    return resp


ROUTES: list[PageRoute] = [
    PageRoute("GET", "/console/usage", "read", explorer),
    PageRoute("GET", "/console/usage/summary.csv", "read", summary_csv),
    PageRoute("GET", "/console/usage/events", "read", events),
    PageRoute("GET", "/console/usage/export.csv", "read", export_csv),
    PageRoute("GET", "/console/usage/export.jsonl", "read", export_jsonl),
    PageRoute("GET", "/console/usage/export.focus.csv", "read", export_focus),
]
