"""The console's operations pages: routing health (`/console/routing`) and the audit logs
(`/console/audit`), for operators with role read or above.

Routing health is what the database knows: the admin listener is built from the database URL
alone (tokenhub.admin.app.build_admin_app) and holds no reference to the gateway's router,
so live circuit states are not reachable from here. Per deployment it shows the settled
requests and error rate of the last hour and 24 hours (the hourly rollups) and, from at most
`SAMPLE` most recent usage events of the last hour (an indexed, bounded read), latency
p50/p95, the router's decisions per reason (`route`: policy, affinity, fallback, probe,
degraded) and the tier share. A deployment whose recent decisions include `probe` or whose
traffic arrives as `fallback` is one the router has been steering around.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from tokenhub.billing import io as bio
from tokenhub.billing import reports
from tokenhub.console import charts
from tokenhub.console.core import ConsoleError, PageRoute, Session, db, gettext, render
from tokenhub.db.database import Tx

SAMPLE = 5000
AUDIT_PAGE = 50


def _now() -> int:
    return int(time.time() * 1000)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}%"


async def routing(request: web.Request, session: Session) -> web.StreamResponse:
    now = _now()
    rows = await (await db(request)).read(
        lambda tx: reports.deployment_health(tx, now=now, sample=SAMPLE)
    )
    reasons = sorted({r for d in rows for r in d.routes})
    tiers = sorted({t for d in rows for t in d.tiers})
    table = [
        {
            "d": d,
            "err_1h": _pct(d.error_pct("1h")),
            "err_24h": _pct(d.error_pct("24h")),
            "p50": "" if d.latency_p50_ms is None else f"{d.latency_p50_ms:.0f}",
            "p95": "" if d.latency_p95_ms is None else f"{d.latency_p95_ms:.0f}",
            "routes": [d.routes.get(r, 0) for r in reasons],
            "tiers": [
                _pct(100.0 * d.tiers.get(t, 0) / d.sampled if d.sampled else None) for t in tiers
            ],
        }
        for d in rows
    ]
    chart = None
    if rows and reasons:
        labels = [d.deployment or "-" for d in rows]
        chart = charts.bar_chart(
            labels,
            {gettext(request, r): [d.routes.get(r, 0) for d in rows] for r in reasons},
            title=gettext(request, "Decisions per reason, recent requests"),
        )
    return render(
        request,
        session,
        "ops_routing.html",
        rows=table,
        reasons=reasons,
        tiers=tiers,
        chart=chart,
        sample=SAMPLE,
    )


def _position(request: web.Request) -> tuple[int, str] | None:
    raw = request.query.get("before", "")
    if not raw:
        return None
    ts, _, entry = raw.partition(".")
    if not ts.isdigit() or not entry:
        raise ConsoleError(gettext(request, "Invalid cursor: follow the page links as given."))
    return int(ts), entry


def _json(value: Any) -> str:
    return "" if value is None else msgspec.json.encode(value).decode()


async def audit(request: web.Request, session: Session) -> web.StreamResponse:
    """Both logs, newest first, each paged on its own (`before` / `gbefore`) with filters:
    the admin audit (actor, action prefix, target) and the guard's (kind, tenant, key)."""
    q = request.query
    log = q.get("log", "admin")
    if log not in ("admin", "guard"):
        log = "admin"
    f = {k: q.get(k, "").strip() for k in ("actor", "action", "target", "kind", "tenant", "key")}
    before = _position(request)

    async def run(tx: Tx) -> list[Any]:
        if log == "admin":
            return list(
                await reports.admin_audit(
                    tx, actor=f["actor"] or None, action=f["action"] or None,
                    target=f["target"] or None, before=before, limit=AUDIT_PAGE + 1,
                )
            )  # fmt: skip
        return list(
            await reports.guard_audit(
                tx, kind=f["kind"] or None, tenant=f["tenant"] or None,
                key_id=f["key"] or None, before=before, limit=AUDIT_PAGE + 1,
            )
        )  # fmt: skip

    rows = await (await db(request)).read(run)
    more = len(rows) > AUDIT_PAGE
    rows = rows[:AUDIT_PAGE]
    next_url = None
    if more:
        last = rows[-1]
        params = {k: v for k, v in f.items() if v}
        params |= {"log": log, "before": f"{last.ts_ms}.{last.id}"}
        next_url = "/console/audit?" + urlencode(params)
    if log == "admin":
        entries = [
            {
                "e": e,
                "time": bio.iso_z(e.ts_ms),
                "before": _json(e.before),
                "after": _json(e.after),
            }
            for e in rows
        ]
    else:
        entries = [{"e": e, "time": bio.iso_z(e.ts_ms), "details": _json(e.details)} for e in rows]
    return render(
        request,
        session,
        "ops_audit.html",
        log=log,
        f=f,
        entries=entries,
        next_url=next_url,
    )


ROUTES: list[PageRoute] = [
    PageRoute("GET", "/console/routing", "read", routing),
    PageRoute("GET", "/console/audit", "read", audit),
]
