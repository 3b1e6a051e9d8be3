"""The console's operations pages: routing health (`/console/routing`) and the audit logs
(`/console/audit`), for operators with role read or above.

Routing health has two sources. Live: the gateway's routers as they are now (circuit closed,
open or half-open with its cooldown's end, consecutive failures, requests in flight, latency
and time-to-first-token EWMAs, requests and errors of the last few minutes), from the admin
app's provider (tokenhub.routing_state; `tokenhub serve` sets it: a single process's routers,
or under --workers N worker 1's merged with the snapshots the other workers publish each
second). An admin app built without one (tests, benches) says "live state not available"
and shows the database's figures alone. The live section refreshes itself every 5 s where
JavaScript runs (console.js, data-refresh); the database's figures only on a reload.

From the database, per deployment: the settled requests and error rate of the last hour and
24 hours (the hourly rollups) and, from at most `SAMPLE` most recent usage events of the
last hour (an indexed, bounded read), latency p50/p95, the router's decisions per reason
(`route`: policy, affinity, fallback, probe, degraded) and the tier share. A deployment
whose recent decisions include `probe` or whose traffic arrives as `fallback` is one the
router has been steering around.
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
from tokenhub.routing_state import DeploymentLive, RoutingSnapshot, snapshot_of

SAMPLE = 5000
AUDIT_PAGE = 50


def _now() -> int:
    return int(time.time() * 1000)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}%"


def _clock(ms: int, *, date: bool = True) -> str:
    return time.strftime(("%Y-%m-%d " if date else "") + "%H:%M:%S UTC", time.gmtime(ms / 1000))


def _circuit_label(request: web.Request, d: DeploymentLive) -> tuple[str, str]:
    """(text, badge class) of a deployment's circuit."""
    if d.circuit == "closed":
        return gettext(request, "closed"), "ok"
    if d.circuit == "open":
        return gettext(request, "open (cooling down)"), "bad"
    if d.probing:
        return gettext(request, "half-open (probe out)"), "warn"
    return gettext(request, "half-open (next request probes)"), "warn"


def live_rows(
    request: web.Request, snap: RoutingSnapshot, health: dict[str, reports.DeploymentHealth]
) -> list[dict[str, Any]]:
    """The live table's rows, each with the database's figures of the same deployment."""
    out = []
    for d in sorted(snap.deployments, key=lambda d: (d.model, d.deployment)):
        text, badge = _circuit_label(request, d)
        until = ""
        if d.cooldown_until_ms is not None and d.circuit == "open":
            left = max(0, -(-(d.cooldown_until_ms - snap.taken_ms) // 1000))
            until = gettext(request, "{time} (in {s} s)").format(
                time=_clock(d.cooldown_until_ms, date=False), s=left
            )
        h = health.get(d.deployment)
        out.append(
            {
                "d": d,
                "circuit": text,
                "badge": badge,
                "until": until,
                "latency": "" if d.latency_ms is None else f"{d.latency_ms:.0f}",
                "ttft": "" if d.ttft_ms is None else f"{d.ttft_ms:.0f}",
                "err_recent": _pct(d.recent_error_pct),
                "db_requests_1h": None if h is None else h.requests_1h,
                "db_err_1h": "" if h is None else _pct(h.error_pct("1h")),
            }
        )
    return out


async def routing(request: web.Request, session: Session) -> web.StreamResponse:
    now = _now()
    rows = await (await db(request)).read(
        lambda tx: reports.deployment_health(tx, now=now, sample=SAMPLE)
    )
    snap = snapshot_of(request.app)
    live = None if snap is None else live_rows(request, snap, {d.deployment: d for d in rows})
    circuits: dict[str, str] = {}
    if snap is not None:  # per deployment name: the worst of its models' circuits
        rank = {"closed": 0, "half_open": 1, "open": 2}
        for d in snap.deployments:
            if rank[d.circuit] >= rank[circuits.get(d.deployment, "closed")]:
                circuits[d.deployment] = d.circuit
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
        snap=snap,
        live=live,
        window_s=None if snap is None else snap.window_ms // 1000,
        taken=None if snap is None else _clock(snap.taken_ms),
        circuits=circuits,
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
