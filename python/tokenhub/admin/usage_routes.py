"""The admin API's usage reads: the summary over the rollups, the exports (FOCUS, the token event
log with settlements) streamed, and reconciliation of a provider's CSV against the events.

Each calls what the CLI calls: `tokenhub.billing.rollups.usage_summary`, and
`tokenhub.billing.io` (`focus_rows`, `iter_event_log`, `reconcile`) as `tokenhub billing export`
and `tokenhub billing reconcile` do, and writes the same bytes they write.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from tokenhub.admin.web import (
    Route,
    actor,
    csv_lines,
    db,
    json_response,
    money,
    read_json,
    time_param,
)
from tokenhub.billing import io as bio
from tokenhub.billing import rollups as R
from tokenhub.billing.rollups import DIMENSIONS, PERIODS, usage_summary
from tokenhub.db.database import Tx
from tokenhub.gateway.errors import ApiError
from tokenhub.store import sql

log = logging.getLogger("tokenhub.admin")

V1 = "/admin/v1"
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
MAX_RANGE_DAYS = 366  # any summary
MAX_HOURLY_DAYS = 31  # grouped by hour: at most 744 buckets per group
DEFAULT_RANGE_DAYS = 30
EXPORT_CHUNK = 1000  # rows per write


# -- the summary -------------------------------------------------------------------------------


def _group_by(request: web.Request) -> tuple[str, str]:
    raw = request.query.get("group_by", "day,model")
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) != 2 or parts[0] not in PERIODS or parts[1] not in DIMENSIONS:
        raise ApiError.bad_request(
            f"group_by must be PERIOD,DIMENSION with PERIOD one of {', '.join(PERIODS)} and "
            f"DIMENSION one of {', '.join(DIMENSIONS)} (got {raw!r})",
            param="group_by",
        )
    return parts[0], parts[1]


async def get_usage_summary(request: web.Request) -> web.Response:
    """Settled usage from the rollups, bucketed by hour or UTC day and grouped by tenant, key,
    model or deployment. [since, until) fall on hours (since rounds down, until up); default
    the last 30 days."""
    group_by = _group_by(request)
    until = time_param(request, "until")
    if until is None:
        until = int(time.time() * 1000)
    until += -until % HOUR_MS
    since = time_param(request, "since")
    if since is None:
        since = until - DEFAULT_RANGE_DAYS * DAY_MS
    since -= since % HOUR_MS
    if until <= since:
        raise ApiError.bad_request("until must be later than since", param="until")
    days = MAX_HOURLY_DAYS if group_by[0] == "hour" else MAX_RANGE_DAYS
    if until - since > days * DAY_MS:
        raise ApiError.bad_request(
            f"the range is at most {days} days when grouped by {group_by[0]}", param="since"
        )
    tenant = request.query.get("tenant")
    rows = await (await db(request)).read(
        lambda tx: usage_summary(tx, since=since, until=until, group_by=group_by, tenant=tenant)
    )
    data = [
        {
            "object": "usage_bucket",
            "bucket_ms": r.bucket_ms,
            group_by[1]: r.group,
            "requests": r.requests,
            "ok": r.ok,
            "input_tokens": r.input_tokens,
            "cached_tokens": r.cached_tokens,
            "output_tokens": r.output_tokens,
            "cost": [money(v, c) for c, v in r.cost.items()],
        }
        for r in rows
    ]
    return json_response(
        {
            "object": "usage_summary",
            "since_ms": since,
            "until_ms": until,
            "group_by": list(group_by),
            "tenant": tenant,
            "data": data,
        }
    )


# -- exports -----------------------------------------------------------------------------------


def _window(request: web.Request) -> tuple[str | None, int | None, int | None]:
    """(period, since, until) as `tokenhub billing export` reads --period/--since/--until."""
    q = request.query
    period = q.get("period")
    try:
        since, until = bio.time_window(period, q.get("since"), q.get("until"))
    except bio.BillingIOError as e:
        raise ApiError.bad_request(str(e).replace("--", "")) from None
    return period, since, until


async def _stream(
    request: web.Request,
    content_type: str,
    filename: str,
    chunks: AsyncIterator[bytes],
) -> web.StreamResponse:
    """Writes `chunks` as a chunked response. The first chunk is made before the status line
    is sent, so an error there is still a clean error response; a failure later cuts the
    connection, so that no truncated export looks complete."""
    first = await anext(chunks, b"")
    resp = web.StreamResponse(
        headers={
            "Content-Type": content_type,
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
    )
    await resp.prepare(request)
    try:
        await resp.write(first)
        async for chunk in chunks:
            await resp.write(chunk)
    except Exception:
        log.exception("admin API: export %s failed midway", filename)
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp


async def export_focus(request: web.Request) -> web.StreamResponse:
    """What `tokenhub billing export --format focus` writes for the same window, tenant and
    issuer. The FOCUS rows are aggregates (per tenant, day, model, token kind, ...), built by
    `focus_rows` a ledger page at a time; they are written a chunk at a time."""
    period, since, until = _window(request)
    tenant = request.query.get("tenant")
    issuer = request.query.get("issuer", "tokenhub")
    database = await db(request)

    async def chunks() -> AsyncIterator[bytes]:
        rows = await bio.focus_rows(
            database,
            period=period,
            since=None if period else since,
            until=None if period else until,
            tenant=tenant,
            issuer=issuer,
        )
        yield csv_lines([list(bio.FOCUS_COLUMNS)])
        for i in range(0, len(rows), EXPORT_CHUNK):
            yield csv_lines([[r[c] for c in bio.FOCUS_COLUMNS] for r in rows[i : i + EXPORT_CHUNK]])

    return await _stream(request, "text/csv; charset=utf-8", "focus.csv", chunks())


async def export_event_log(request: web.Request) -> web.StreamResponse:
    """What `tokenhub billing export --format jsonl|csv` writes: usage events in time order,
    each with its settlement, streamed a page (one read transaction) at a time."""
    fmt_ = request.query.get("format", "")
    if fmt_ not in ("jsonl", "csv"):
        raise ApiError.bad_request("format must be jsonl or csv", param="format")
    _, since, until = _window(request)
    events = bio.iter_event_log(
        await db(request), since=since, until=until, tenant=request.query.get("tenant")
    )
    encode: Callable[[object], bytes] = msgspec.json.Encoder().encode

    async def chunks() -> AsyncIterator[bytes]:
        if fmt_ == "csv":
            yield csv_lines([list(bio.EVENT_LOG_FIELDS)])
        batch: list[bytes] = []
        rows: list[list[object]] = []
        async for ev in events:
            if fmt_ == "csv":
                rows.append([bio.csv_cell(ev[k]) for k in bio.EVENT_LOG_FIELDS])
                if len(rows) >= EXPORT_CHUNK:
                    yield csv_lines(rows)
                    rows = []
            else:
                batch.append(encode(ev) + b"\n")
                if len(batch) >= EXPORT_CHUNK:
                    yield b"".join(batch)
                    batch = []
        if rows:
            yield csv_lines(rows)
        if batch:
            yield b"".join(batch)

    ctype = "text/csv; charset=utf-8" if fmt_ == "csv" else "application/x-ndjson"
    return await _stream(request, ctype, f"usage-log.{fmt_}", chunks())


# -- reconciliation ----------------------------------------------------------------------------


async def create_reconciliation(request: web.Request) -> web.Response:
    """A provider's usage CSV (the body, text/csv, at most the admin listener's max body
    size: 413 beyond) against tokenhub's events in a window (period, or since and until: at
    most 366 days), as `tokenhub billing reconcile --format json` reports it: matched,
    missing (in the file, not in tokenhub), extra (in tokenhub's scope, not in the file),
    differing (both counts), malformed rows, totals. Changes nothing."""
    if request.content_type not in ("text/csv", "text/plain"):
        raise ApiError.bad_request("send the provider's CSV with Content-Type: text/csv")
    _, since, until = _window(request)
    if since is None or until is None:
        # Every event in the window without a row in the file is listed (extra): an unbounded
        # scope would list the whole event log.
        raise ApiError.bad_request("give period, or since and until: the events in scope")
    if until - since > MAX_RANGE_DAYS * DAY_MS:
        raise ApiError.bad_request(f"the window is at most {MAX_RANGE_DAYS} days", param="since")
    provider = request.query.get("provider")
    raw = await request.read()  # bounded by client_max_size: 413 beyond
    # As the CLI opens the file: a BOM is dropped, invalid UTF-8 becomes U+FFFD (that row is
    # reported as malformed).
    text = io.StringIO(raw.decode("utf-8-sig", errors="replace"), newline="")
    try:
        report = await bio.reconcile(
            await db(request), text, provider=provider, since=since, until=until
        )
    except bio.BillingIOError as e:
        raise ApiError.bad_request(str(e)) from None
    return json_response({"object": "reconciliation", "provider": provider, **report.as_dict()})


# -- ingest, rollups ----------------------------------------------------------------------------

MAX_PROBLEMS = 1000  # line results listed in an ingest's answer (the summary counts them all)
_JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/cloudevents-batch+jsonl")


async def ingest_events(request: web.Request) -> web.Response:
    """`tokenhub events ingest FILE [--settle]`: CloudEvents JSON lines (the body, at most the
    admin listener's max body size: 413 beyond) stored as usage events, idempotently (an id
    stored with the same payload is a duplicate, with another a conflict), settled with
    `settle=true`. One bad line never stops the rest; the answer counts every line and lists
    the problems (at most 1000)."""
    if request.content_type not in _JSONL_TYPES:
        raise ApiError.bad_request(
            "send CloudEvents JSON lines with Content-Type: application/x-ndjson"
        )
    settle_q = request.query.get("settle", "false")
    if settle_q not in ("true", "false"):
        raise ApiError.bad_request("settle must be true or false", param="settle")
    raw = await request.read()  # bounded by client_max_size: 413 beyond
    problems: list[bio.LineResult] = []

    def keep(r: bio.LineResult) -> None:
        if r.status in bio.PROBLEMS and len(problems) < MAX_PROBLEMS:
            problems.append(r)

    database = await db(request)
    summary = await bio.ingest(database, io.BytesIO(raw), settle=settle_q == "true", on_result=keep)
    out = {"object": "ingest", "ok": summary.ok, **summary.as_dict()}
    who = actor(request)
    # Stored a batch per transaction (as the CLI's): the audit entry follows them.
    await database.transaction(
        lambda tx: sql.add_admin_audit(tx, who, "usage.ingest", f"{summary.lines} lines", None, out)
    )
    return json_response({**out, "problems": [msgspec.to_builtins(r) for r in problems]})


class RollupsRebuild(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    since_ms: int | None = None  # from this time's UTC day (default: everything)


async def rebuild_rollups(request: web.Request) -> web.Response:
    """`tokenhub billing rollups rebuild [--since]`: the usage rollups recomputed from the
    settled events, in one transaction."""
    body = await read_json(request, RollupsRebuild) if request.can_read_body else RollupsRebuild()
    who = actor(request)
    database = await db(request)

    async def run(tx: Tx) -> dict[str, Any]:
        n, rows = await R.rebuild(tx, dialect=database.dialect, since=body.since_ms)
        out = {"object": "rollups_rebuild", "since_ms": body.since_ms, "events": n, "rows": rows}
        await sql.add_admin_audit(tx, who, "rollups.rebuild", "usage_rollups", None, out)
        return out

    return json_response(await database.transaction(run))


ROUTES: tuple[Route, ...] = (
    Route("GET", f"{V1}/usage/summary", "read", get_usage_summary),
    Route("GET", f"{V1}/usage/focus", "read", export_focus),
    Route("GET", f"{V1}/usage/log", "read", export_event_log),
    Route("POST", f"{V1}/reconciliations", "read", create_reconciliation),
    Route("POST", f"{V1}/usage/events", "billing", ingest_events),
    Route("POST", f"{V1}/billing/rollups/rebuild", "admin", rebuild_rollups),
)
