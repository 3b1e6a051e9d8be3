"""Operator pages: the overview (/console/), tenants (/console/tenants...) and keys
(/console/keys...).

The overview's alerts: settler lag (the oldest unsettled event, the pending index's first row),
overruns (overrun accounts' postings, through their index), and the ledger check's cheap share
(constrained accounts past their ceiling, events failing to settle or quarantined: small
tables); the full ledger check, which reads every posting, is the billing check page's, linked.
Deployments in cooldown (circuit open or half-open) come from the gateway's live routing state
(tokenhub.routing_state) when the admin app has it, and link the routing page.

Reads come from the rollups (tokenhub.billing.rollups.usage_summary), the accounts' kept
balances and keyset-paged indexed reads; never a scan of usage_events. Writes go through the
service functions the CLI and the admin API use (tokenhub.store.sql *_in,
tokenhub.billing.service topup_in / assign_in), each in one transaction with its admin audit
row (actor "console:<user>").

Money-moving forms (top up, assign a plan) carry a one-time token (hidden field `idem`, made
when the page is rendered) used as an Idempotency-Key in the admin API's table
(idempotency_keys, actor "console:<user>"): the move, its audit row and the token's record
commit together, so a double submit or a replayed form moves money once (the second answers
"already done"), and the same token on another request is refused.

Performance notes (benches/bench_console_pages.py, 1M settled events over 30 days, SQLite, a
2-core VM shared with other work, load ~4): overview p50 52 ms (p99 90), tenants 1.6 ms,
tenant detail 3.5 ms, keys 1.3 ms. The overview is its two rollup reads (14 days by tenant for
the chart and top tenants, 7 days by model for top models: ~34k + ~21k rollup rows, today's
from the hourly table) and ~3 ms of rendering. One pass grouped by day x tenant x model
instead (one scan of the 14 days) measured slower: 40 ms against 30 for the two reads (median
of 10, 1M events, a quiet moment): the GROUP BY's ~4k groups cost more than the second,
shorter scan. The tenants and keys pages are keyset pages with per-page reads (profiles, kept
balances, key limits by id), flat in the event count.

A new key's secret is shown once: held in this process for the session's next page
(core.show_once) and rendered on the key's page right after the redirect, never in a URL,
never again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tokenhub.billing import ledger as L
from tokenhub.billing import terms
from tokenhub.billing.rollups import DAY_MS, HOUR_MS, SummaryRow, hour_of, usage_summary
from tokenhub.billing.service import Billing, assign_in, get_profile, set_profile_in, topup_in
from tokenhub.console import charts
from tokenhub.console.core import (
    ConsoleError,
    PageRoute,
    Session,
    db,
    form,
    gettext,
    redirect,
    render,
    show_once,
    state,
    take_once,
)
from tokenhub.console.passwords import check_password, hash_password
from tokenhub.db.database import Tx
from tokenhub.money import check_currency, decimal_str, fmt, parse_amount
from tokenhub.routing_state import snapshot_of
from tokenhub.store import console as cstore
from tokenhub.store import sql
from tokenhub.store.base import KEY_LIMIT_FIELDS, LIMIT_FIELDS, ApiKey, Limits, Tenant

PAGE = 50
LAG_ALERT_MS = 5 * 60 * 1000  # an unsettled event older than this is an alert
TOP_N = 5
TENANT_CHOICES = 500  # tenant names offered in the keys page's pickers (any name may be typed)
ALREADY = "This form was submitted already: nothing more was added."


def _now() -> int:
    return time.time_ns() // 1_000_000


def _money(nanos: int, currency: str) -> dict[str, str]:
    """{"amount": "12.34", "currency": "CNY"}: exact, as the admin API writes money."""
    return {"amount": fmt(nanos, currency, exact=True).split()[0], "currency": currency}


def _day_label(ms: int) -> str:
    return time.strftime("%m-%d", time.gmtime(ms / 1000))


def _pct(part: int, whole: int) -> str:
    return "—" if whole == 0 else f"{100 * part / whole:.1f}%"


def _cursor(request: web.Request) -> str | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if not raw or len(raw) > 200 or not raw.isprintable():
        raise ConsoleError("invalid cursor: follow the page's own link")
    return raw


# -- usage aggregates (from the rollups) -------------------------------------------------------


@dataclass
class Totals:
    requests: int = 0
    ok: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost: dict[str, int] = field(default_factory=dict)

    def add(self, r: SummaryRow | Totals) -> None:
        self.requests += r.requests
        self.ok += r.ok
        self.input_tokens += r.input_tokens
        self.cached_tokens += r.cached_tokens
        self.output_tokens += r.output_tokens
        for cur, v in r.cost.items():
            self.cost[cur] = self.cost.get(cur, 0) + v

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    @property
    def success(self) -> str:
        return _pct(self.ok, self.requests)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def cost_text(self) -> str:
        # Exact: a few tokens cost a fraction of a cent, which rounding would show as 0.00.
        return ", ".join(fmt(v, c, exact=True) for c, v in sorted(self.cost.items())) or "—"


def _by_day(rows: list[SummaryRow], days: list[int]) -> dict[int, Totals]:
    out = {d: Totals() for d in days}
    for r in rows:
        if r.bucket_ms in out:
            out[r.bucket_ms].add(r)
    return out


def _by_group(rows: list[SummaryRow], since: int) -> list[tuple[str, Totals]]:
    groups: dict[str, Totals] = {}
    for r in rows:
        if r.bucket_ms >= since:
            groups.setdefault(r.group, Totals()).add(r)
    return sorted(groups.items(), key=lambda kv: (-kv[1].requests, -kv[1].tokens, kv[0]))


# -- overview ----------------------------------------------------------------------------------


async def overview(request: web.Request, session: Session) -> web.StreamResponse:
    now = _now()
    today = now - now % DAY_MS
    days = [today - i * DAY_MS for i in range(13, -1, -1)]
    until = hour_of(now) + HOUR_MS
    week = today - 6 * DAY_MS

    async def run(tx: Tx) -> tuple[Any, ...]:
        by_tenant = await usage_summary(tx, since=days[0], until=until, group_by=("day", "tenant"))
        by_model = await usage_summary(tx, since=week, until=until, group_by=("day", "model"))
        oldest = await cstore.oldest_unsettled_ms_in(tx)
        overruns = await cstore.overruns_in(tx)
        books = await cstore.books_at_a_glance_in(tx)
        return by_tenant, by_model, oldest, overruns, books

    by_tenant, by_model, oldest, overruns, books = await (await db(request)).read(run)
    daily = _by_day(by_tenant, days)
    today_t, week_t = Totals(), Totals()
    for d, t in daily.items():
        week_t.add(t) if d >= week else None
        today_t.add(t) if d == today else None
    labels = [_day_label(d) for d in days]
    chart = charts.bar_chart(
        labels,
        {
            gettext(request, "ok"): [daily[d].ok for d in days],
            gettext(request, "errors"): [daily[d].errors for d in days],
        },
        title=gettext(request, "Requests per day (14 days)"),
    )
    alerts: list[dict[str, Any]] = []
    paths = state(request).get_paths
    lag = None if oldest is None else now - oldest
    if lag is not None and lag > LAG_ALERT_MS:
        alerts.append(
            {
                "kind": "settler-lag",
                "level": "bad",
                "text": gettext(
                    request, "Settler lag: the oldest unsettled event arrived {minutes} min ago."
                ).format(minutes=lag // 60_000),
                "href": None,
            }
        )
    for tenant, account, owed in overruns:
        cur = account.rsplit(":", 1)[-1]
        alerts.append(
            {
                "kind": "overrun",
                "level": "bad",
                "text": gettext(
                    request, "Overrun: {tenant} owes {amount} beyond its terms."
                ).format(tenant=tenant, amount=fmt(owed, cur)),
                "href": "/console/billing/overruns"
                if "/console/billing/overruns" in paths
                else None,
            }
        )
    over_ceiling, failing, quarantined = books
    check = "/console/billing/check" if "/console/billing/check" in paths else None
    for account, balance, ceiling in over_ceiling:
        alerts.append(
            {
                "kind": "ledger",
                "level": "bad",
                "text": gettext(
                    request, "Ledger: account {account} is past its limit ({balance} > {ceiling})."
                ).format(account=account, balance=balance, ceiling=ceiling),
                "href": check,
            }
        )
    if failing:
        alerts.append(
            {
                "kind": "settlement-failures",
                "level": "bad",
                "text": gettext(
                    request,
                    "{failing} usage events fail to settle ({quarantined} quarantined: "
                    "tokenhub billing quarantine release|void).",
                ).format(failing=failing, quarantined=quarantined),
                "href": check,
            }
        )
    alerts += _cooldown_alerts(request, "/console/routing" if "/console/routing" in paths else None)
    links = [
        (href, gettext(request, label))
        for href, label in (
            ("/console/billing/check", "Ledger check"),
            ("/console/routing", "Routing health (deployments in cooldown)"),
            ("/console/billing/overruns", "Overrun report"),
        )
        if href in paths
    ]
    return render(
        request,
        session,
        "overview.html",
        today=today_t,
        week=week_t,
        days=[(labels[i], daily[d]) for i, d in enumerate(days)],
        chart=chart,
        top_tenants=_by_group(by_tenant, week)[:TOP_N],
        top_models=_by_group(by_model, week)[:TOP_N],
        alerts=alerts,
        lag_ms=lag,
        links=links,
    )


def _cooldown_alerts(request: web.Request, href: str | None) -> list[dict[str, Any]]:
    """One alert per deployment out of rotation in the live routing state (none without it)."""
    snap = snapshot_of(request.app)
    out: list[dict[str, Any]] = []
    if snap is None:
        return out
    for d in snap.in_cooldown():
        if d.circuit == "open" and d.cooldown_until_ms is not None:
            left = max(0, -(-(d.cooldown_until_ms - snap.taken_ms) // 1000))  # rounded up
            text = gettext(
                request,
                "Deployment {deployment} of {model} is in cooldown: its circuit opened after "
                "{failures} consecutive failures; a probe may go in {s} s.",
            ).format(
                deployment=d.deployment, model=d.model, failures=d.consecutive_failures, s=left
            )
        else:
            text = gettext(
                request,
                "Deployment {deployment} of {model} is half-open: its cooldown is over and the "
                "next request probes it.",
            ).format(deployment=d.deployment, model=d.model)
        if snap.workers > 1:
            text += " " + gettext(request, "In {k} of {n} workers.").format(
                k=d.cooling_in, n=d.seen_in
            )
        level = "bad" if d.circuit == "open" else ""
        out.append({"kind": "cooldown", "level": level, "text": text, "href": href})
    return out


# -- tenants -----------------------------------------------------------------------------------


@dataclass
class Money:
    wallet: int  # spendable prepaid balance (nanos)
    owed: int  # drawn on the credit line
    credit_limit: int
    currency: str

    @property
    def headroom(self) -> int:
        return self.wallet + self.credit_limit - self.owed


def _money_of(profile: terms.Profile, balances: dict[str, int]) -> Money:
    cur = profile.currency
    return Money(
        wallet=-balances.get(L.wallet(profile.tenant, cur), 0),  # the ledger is debit-positive
        owed=balances.get(L.receivable(profile.tenant, cur), 0),
        credit_limit=profile.credit_limit,
        currency=cur,
    )


async def tenants_list(request: web.Request, session: Session) -> web.StreamResponse:
    after = _cursor(request)

    async def run(tx: Tx) -> tuple[list[Tenant], dict[str, int], dict[str, Money]]:
        rows = await sql.tenants_page_in(tx, after, PAGE + 1)
        names = [t.name for t in rows[:PAGE]]
        active = await sql.active_key_counts_in(tx, [t.id for t in rows[:PAGE]])
        profiles = await terms.profiles_of(tx, names)
        bals = await cstore.account_balances_in(tx, names)
        money = {n: _money_of(profiles.get(n) or terms.Profile(tenant=n), bals) for n in names}
        return rows, active, money

    rows, active, money = await (await db(request)).read(run)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    return render(
        request,
        session,
        "tenants.html",
        tenants=[(t, active.get(t.id, 0), money[t.name]) for t in rows],
        next_cursor=rows[-1].name if more else None,
    )


async def tenant_new_form(request: web.Request, session: Session) -> web.StreamResponse:
    return render(request, session, "tenants_new.html")


async def tenant_create(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    name = str(posted.get("name", "")).strip()
    currency = str(posted.get("currency", "")).strip()
    if currency:
        check_currency(currency)

    async def run(tx: Tx) -> Tenant:
        tenant = await sql.create_tenant_in(tx, name)
        after: dict[str, Any] = {"id": tenant.id, "name": tenant.name}
        if currency:
            await set_profile_in(tx, name, currency=currency)
            after["currency"] = currency
        await sql.add_admin_audit(tx, session.actor, "tenant.create", tenant.id, None, after)
        return tenant

    tenant = await (await db(request)).transaction(run)
    raise redirect(
        request,
        f"/console/tenants/{tenant.id}",
        flash=gettext(request, "Created tenant {name}.").format(name=tenant.name),
    )


@dataclass
class LotView:
    lot: terms.Lot
    remaining: str
    unit: str


def _lot_view(lot: terms.Lot, bals: dict[str, int]) -> LotView:
    acc = L.lot_units(lot.tenant, lot.id)
    left = -bals[acc] if acc in bals else lot.quantity - lot.consumed
    if lot.kind == "package":
        return LotView(lot, f"{left:,}", "tokens")
    return LotView(lot, decimal_str(left), "points")


async def tenant_detail(request: web.Request, session: Session) -> web.StreamResponse:
    tenant_id = request.match_info["id"]
    now = _now()
    today = now - now % DAY_MS
    days = [today - i * DAY_MS for i in range(29, -1, -1)]
    until = hour_of(now) + HOUR_MS

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        prof = await get_profile(tx, t.name)
        bals = await cstore.account_balances_in(tx, [t.name])
        lots = (await terms.active_lots(tx, [t.name])).get(t.name, [])
        keys = await sql.keys_page_in(tx, t.name, None, PAGE + 1)
        rows = await usage_summary(
            tx, since=days[0], until=until, group_by=("day", "model"), tenant=t.name
        )
        return {
            "tenant": t,
            "profile": prof,
            "money": _money_of(prof, bals),
            "balances": bals,
            "lots": [_lot_view(lot, bals) for lot in lots],
            "keys": keys[:PAGE],
            "more_keys": len(keys) > PAGE,
            "limits": await sql.limits_in(tx, "tenant", t.name),
            "users": await cstore.users_in(tx, t.name),
            "usage": rows,
        }

    d = await (await db(request)).read(run)
    plans = await Billing(await db(request)).plans()
    daily = _by_day(d["usage"], days)
    labels = [_day_label(x) for x in days]
    chart = charts.bar_chart(
        labels,
        {
            gettext(request, "input (uncached)"): [
                daily[x].input_tokens - daily[x].cached_tokens for x in days
            ],
            gettext(request, "cached input"): [daily[x].cached_tokens for x in days],
            gettext(request, "output"): [daily[x].output_tokens for x in days],
        },
        title=gettext(request, "Tokens per day (30 days)"),
    )
    total = Totals()
    for t in daily.values():
        total.add(t)
    statements, usage = "/console/billing/statements", "/console/usage"
    paths = state(request).get_paths
    name = d["tenant"].name
    prefix = f"t:{name}:wallet:"
    other_wallets = sorted(
        (acc.removeprefix(prefix), -bal)
        for acc, bal in d["balances"].items()
        if acc.startswith(prefix) and acc != L.wallet(name, d["money"].currency) and bal
    )
    return render(
        request,
        session,
        "tenants_detail.html",
        **d,
        plans=plans,
        limit_fields=LIMIT_FIELDS,
        days=[(labels[i], daily[x]) for i, x in enumerate(days) if daily[x].requests],
        by_model=_by_group(d["usage"], days[0]),
        total=total,
        chart=chart,
        idem_topup=secrets.token_urlsafe(16),
        idem_plan=secrets.token_urlsafe(16),
        other_wallets=other_wallets,
        statements_href=f"{statements}?tenant={name}" if statements in paths else None,
        usage_href=f"{usage}?tenant={name}" if usage in paths else None,
    )


def _idem_token(posted: Any) -> str:
    token = str(posted.get("idem", ""))
    if not token or len(token) > 255 or not token.isascii() or not token.isprintable():
        raise ConsoleError("this form has no one-time token: reload the page and submit again")
    return token


async def _money_move(
    request: web.Request,
    session: Session,
    token: str,
    fields: list[Any],
    action: str,
    currency: str | None,
    move: Callable[[Tx, Tenant], Awaitable[dict[str, Any]]],
) -> tuple[Tenant | None, dict[str, Any] | None]:
    """Runs a money-moving form once per one-time token (module docstring): (tenant, what the
    move returned), or (None, None) when the token was used already for this same request."""
    tenant_id = request.match_info["id"]
    actor = session.actor
    digest = hashlib.sha256(
        json.dumps([request.path, *fields], separators=(",", ":")).encode()
    ).hexdigest()

    async def replayed(tx: Tx) -> bool:
        prev = await sql.idempotent_response(tx, actor, token)
        if prev is None:
            return False
        if prev.request_digest != digest:
            raise ConsoleError(
                "this form was already used for another request: reload the page and try again"
            )
        return True

    async def run(tx: Tx) -> tuple[Tenant | None, dict[str, Any] | None]:
        if await replayed(tx):
            return None, None
        t = await sql.tenant_by_id_in(tx, tenant_id)
        cur = currency or (await get_profile(tx, t.name)).currency
        acc = L.wallet(t.name, cur)
        before = _money(-(await cstore.account_balances_in(tx, [t.name])).get(acc, 0), cur)
        out = await move(tx, t)
        after = _money(-(await cstore.account_balances_in(tx, [t.name])).get(acc, 0), cur)
        await sql.add_admin_audit(
            tx, actor, action, t.id, {"wallet": before}, {"wallet": after, **out}
        )
        body = {"object": action, "tenant_id": t.id, "wallet": after, **out}
        await sql.record_idempotent(tx, actor, token, digest, 201, json.dumps(body))
        return t, out

    database = await db(request)
    try:
        return await database.transaction(run)
    except ConsoleError:
        raise
    except Exception:
        # A concurrent twin under the same token committed first (PostgreSQL: this one failed
        # on the key's primary key and rolled back): answer as a replay.
        if await database.read(replayed):
            return None, None
        raise


async def tenant_topup(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    token = _idem_token(posted)
    amount = str(posted.get("amount", "")).strip()
    currency = check_currency(str(posted.get("currency", "")).strip())
    value = parse_amount(amount, currency)  # exact; MoneyError on a bad amount
    if value <= 0:
        raise ConsoleError("a top-up must be positive")
    back = f"/console/tenants/{request.match_info['id']}"

    async def move(tx: Tx, t: Tenant) -> dict[str, Any]:
        txn = await topup_in(tx, t.name, amount, currency, ref=f"idem:{token}")
        return {"txn": txn, "amount": _money(value, currency)}

    t, out = await _money_move(
        request, session, token, [value, currency], "wallet.topup", currency, move
    )
    if t is None or out is None:
        raise redirect(request, back, flash=gettext(request, ALREADY))
    raise redirect(
        request,
        back,
        flash=gettext(request, "Added {amount} to {tenant}'s wallet.").format(
            amount=fmt(value, currency), tenant=t.name
        ),
    )


async def tenant_assign_plan(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    token = _idem_token(posted)
    plan = str(posted.get("plan", "")).strip()
    if not plan:
        raise ConsoleError("choose a plan")
    back = f"/console/tenants/{request.match_info['id']}"

    async def move(tx: Tx, t: Tenant) -> dict[str, Any]:
        lot = await assign_in(tx, t.name, plan)
        return {"lot": lot.id, "plan": lot.plan, "price": _money(lot.price, lot.currency)}

    t, out = await _money_move(request, session, token, [plan], "plan.assign", None, move)
    if t is None or out is None:
        raise redirect(request, back, flash=gettext(request, ALREADY))
    raise redirect(
        request,
        back,
        flash=gettext(request, "Assigned plan {plan} to {tenant}.").format(
            plan=plan, tenant=t.name
        ),
    )


def _limit_changes(posted: Any, fields: tuple[str, ...], current: Limits) -> dict[str, int | None]:
    """The limit fields that differ from `current`: a whole number sets, empty removes."""
    out: dict[str, int | None] = {}
    for f in fields:
        if f not in posted:
            continue
        raw = str(posted.get(f, "")).strip()
        if raw == "":
            value: int | None = None
        elif raw.isascii() and raw.isdigit() and int(raw) < 2**63:
            value = int(raw)
        else:
            raise ConsoleError(f"{f} must be a whole number >= 0, or empty for no limit")
        if value != getattr(current, f):
            out[f] = value
    return out


def _limits_json(limits: Limits, fields: tuple[str, ...]) -> dict[str, int | None]:
    return {f: getattr(limits, f) for f in fields}


async def tenant_limits(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    tenant_id = request.match_info["id"]

    async def run(tx: Tx) -> int:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        current = await sql.limits_in(tx, "tenant", t.name)
        changes = _limit_changes(posted, LIMIT_FIELDS, current)
        if not changes:
            return 0
        limits = await sql.set_limits_in(tx, "tenant", t.name, **changes)
        await sql.add_admin_audit(
            tx,
            session.actor,
            "tenant.limits",
            t.id,
            _limits_json(current, LIMIT_FIELDS),
            _limits_json(limits, LIMIT_FIELDS),
        )
        return len(changes)

    n = await (await db(request)).transaction(run)
    msg = "Limits saved." if n else "No limit changed."
    raise redirect(request, f"/console/tenants/{tenant_id}", flash=gettext(request, msg))


async def tenant_user_create(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    tenant_id = request.match_info["id"]
    name = str(posted.get("name", "")).strip()
    password = str(posted.get("password", ""))
    lang = str(posted.get("lang", "en"))
    check_password(password)  # ValueError: a flash, nothing written

    async def tenant_name(tx: Tx) -> str:
        return (await sql.tenant_by_id_in(tx, tenant_id)).name

    database = await db(request)
    tname = await database.read(tenant_name)
    cstore.check_user(name, "tenant", tname, lang)
    pw_hash = await asyncio.to_thread(hash_password, password)  # ~40 ms: off the loop

    async def run(tx: Tx) -> None:
        user = await cstore.create_user_in(tx, name, pw_hash, "tenant", tname, lang)
        after = {"name": user.name, "role": user.role, "tenant": user.tenant}
        await sql.add_admin_audit(tx, session.actor, "console_user.create", tenant_id, None, after)

    await database.transaction(run)
    raise redirect(
        request,
        f"/console/tenants/{tenant_id}",
        flash=gettext(request, "Created console login {name} for {tenant}.").format(
            name=name, tenant=tname
        ),
    )


# -- keys --------------------------------------------------------------------------------------


async def keys_list(request: web.Request, session: Session) -> web.StreamResponse:
    after = _cursor(request)
    tenant = request.query.get("tenant", "").strip() or None

    async def run(tx: Tx) -> tuple[list[ApiKey], dict[str, Limits], list[Tenant]]:
        rows = await sql.keys_page_in(tx, tenant, after, PAGE + 1)
        limits = await cstore.key_limits_in(tx, [k.id for k in rows[:PAGE]])
        tenants = await sql.tenants_page_in(tx, None, TENANT_CHOICES)
        return rows, limits, tenants

    rows, limits, tenants = await (await db(request)).read(run)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    return render(
        request,
        session,
        "keys.html",
        keys=rows,
        limits=limits,
        tenant=tenant,
        tenants=tenants,
        key_fields=KEY_LIMIT_FIELDS,
        next_cursor=rows[-1].id if more else None,
    )


async def key_create(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    tenant = str(posted.get("tenant", "")).strip()
    if not tenant:
        raise ConsoleError("choose the key's tenant")
    changes = {k: v for k, v in _limit_changes(posted, KEY_LIMIT_FIELDS, Limits()).items()}
    secret = sql.new_key_secret()

    async def run(tx: Tx) -> ApiKey:
        key = await sql.create_key_in(tx, tenant, secret)
        limits = await sql.set_limits_in(tx, "key", key.id, **changes) if changes else Limits()
        after = {
            "id": key.id,
            "tenant": key.tenant,
            "prefix": key.prefix,
            "limits": _limits_json(limits, KEY_LIMIT_FIELDS),
        }
        await sql.add_admin_audit(tx, session.actor, "key.create", key.id, None, after)
        return key

    key = await (await db(request)).transaction(run)
    # The secret goes to this session's next page only (never a URL, never stored).
    show_once(request, f"key:{key.id}", secret)
    raise redirect(
        request,
        f"/console/keys/{key.id}",
        flash=gettext(request, "Created key {id} for {tenant}.").format(id=key.id, tenant=tenant),
    )


async def key_detail(request: web.Request, session: Session) -> web.StreamResponse:
    key_id = request.match_info["id"]

    now = _now()
    today = now - now % DAY_MS
    days = [today - i * DAY_MS for i in range(29, -1, -1)]

    async def run(tx: Tx) -> tuple[ApiKey, Limits, list[SummaryRow]]:
        key = await sql.key_in(tx, key_id)
        # The key's tenant's rows only (the rollups' tenant index), grouped by key.
        rows = await usage_summary(
            tx,
            since=days[0],
            until=hour_of(now) + HOUR_MS,
            group_by=("day", "key"),
            tenant=key.tenant,
        )
        return key, await sql.limits_in(tx, "key", key.id), [r for r in rows if r.group == key.id]

    key, limits, rows = await (await db(request)).read(run)
    daily = _by_day(rows, days)
    total = Totals()
    for t in daily.values():
        total.add(t)
    return render(
        request,
        session,
        "keys_detail.html",
        key=key,
        limits=limits,
        key_fields=KEY_LIMIT_FIELDS,
        secret=take_once(request, f"key:{key.id}"),
        total=total,
        days=[(_day_label(d), daily[d]) for d in days if daily[d].requests],
        trend=charts.sparkline(
            [daily[d].requests for d in days],
            title=gettext(request, "Requests per day (30 days)"),
        ),
    )


async def key_revoke(request: web.Request, session: Session) -> web.StreamResponse:
    key_id = request.match_info["id"]

    async def run(tx: Tx) -> ApiKey:
        before = await sql.key_in(tx, key_id)
        after = await sql.revoke_key_in(tx, key_id)
        await sql.add_admin_audit(
            tx,
            session.actor,
            "key.revoke",
            key_id,
            {"revoked_ms": before.revoked_ms},
            {"revoked_ms": after.revoked_ms},
        )
        return after

    await (await db(request)).transaction(run)
    raise redirect(
        request,
        f"/console/keys/{key_id}",
        flash=gettext(request, "Revoked key {id}: the gateway refuses it at once.").format(
            id=key_id
        ),
    )


async def key_limits(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    key_id = request.match_info["id"]

    async def run(tx: Tx) -> int:
        key = await sql.key_in(tx, key_id)
        current = await sql.limits_in(tx, "key", key.id)
        changes = _limit_changes(posted, KEY_LIMIT_FIELDS, current)
        if not changes:
            return 0
        limits = await sql.set_limits_in(tx, "key", key.id, **changes)
        await sql.add_admin_audit(
            tx,
            session.actor,
            "key.limits",
            key.id,
            _limits_json(current, KEY_LIMIT_FIELDS),
            _limits_json(limits, KEY_LIMIT_FIELDS),
        )
        return len(changes)

    n = await (await db(request)).transaction(run)
    msg = "Limits saved." if n else "No limit changed."
    raise redirect(request, f"/console/keys/{key_id}", flash=gettext(request, msg))


ROUTES: list[PageRoute] = [
    PageRoute("GET", "/console/", "read", overview),
    PageRoute("GET", "/console/tenants", "read", tenants_list),
    PageRoute("GET", "/console/tenants/new", "admin", tenant_new_form),
    PageRoute("POST", "/console/tenants/new", "admin", tenant_create),
    PageRoute("GET", "/console/tenants/{id}", "read", tenant_detail),
    PageRoute("POST", "/console/tenants/{id}/topup", "billing", tenant_topup),
    PageRoute("POST", "/console/tenants/{id}/plan", "billing", tenant_assign_plan),
    PageRoute("POST", "/console/tenants/{id}/limits", "admin", tenant_limits),
    PageRoute("POST", "/console/tenants/{id}/users", "admin", tenant_user_create),
    PageRoute("GET", "/console/keys", "read", keys_list),
    PageRoute("POST", "/console/keys", "admin", key_create),
    PageRoute("GET", "/console/keys/{id}", "read", key_detail),
    PageRoute("POST", "/console/keys/{id}/revoke", "admin", key_revoke),
    PageRoute("POST", "/console/keys/{id}/limits", "admin", key_limits),
]
