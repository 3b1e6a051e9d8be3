"""The console's billing pages (`/console/billing/...`): price book, FX, plans, redemption
codes, statements, invoices and payments, provider settlement, reconciliation, the ledger
check and the overrun report.

Reads need role read; writes the role the admin API's scopes ask for the same act (prices, FX
and plans: admin; codes, statements, invoices, payments, reconciliation: billing). A write
runs the service function the CLI and the admin API run (tokenhub.billing.service's `*_in`,
tokenhub.billing.statements) in one transaction with its admin audit entry (actor
`console:<user>`, the admin API's action names); a payment also records its form's one-time
token in idempotency_keys in that transaction, so a form sent twice pays once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import secrets
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from tokenhub.billing import io as bio
from tokenhub.billing import reports, terms
from tokenhub.billing import statements as ST
from tokenhub.billing.check import ledger_check
from tokenhub.billing.ledger import period_bounds, period_of
from tokenhub.billing.service import PERIODS as PLAN_PERIODS
from tokenhub.billing.service import (
    Billing,
    Plan,
    create_codes_in,
    create_plan_in,
    invoice_in,
    pay_in,
    set_fx_in,
    set_price_in,
)
from tokenhub.billing.terms import Price
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
    take_once,
)
from tokenhub.db.database import Tx
from tokenhub.money import TOKENS, decimal_str, fmt, fmt_units
from tokenhub.store import sql

T = TypeVar("T")

MAX_CODES = 1000  # codes per batch
MAX_UPLOAD_BYTES = 512 * 1024  # a reconciliation CSV (the admin listener's body limit is 1 MiB)
BATCH_TTL_S = 900.0


def _now() -> int:
    return int(time.time() * 1000)


class _Replayed(Exception):
    """The form's one-time token was used before: this submission does nothing."""

    def __init__(self, same: bool) -> None:
        super().__init__("replayed")
        self.same = same


def _s(posted: Any, name: str) -> str:
    v = posted.get(name, "")
    return v.strip() if isinstance(v, str) else ""


def _opt(posted: Any, name: str) -> str | None:
    return _s(posted, name) or None


def _when(request: web.Request, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return bio.parse_time(text)
    except (bio.BillingIOError, OverflowError, ValueError):
        raise ConsoleError(
            gettext(request, "Bad date: give 2026-11-01 or 2026-11-01T12:00:00Z.")
        ) from None


def _period(request: web.Request, text: str) -> str:
    try:
        period_bounds(text)
    except Exception:
        raise ConsoleError(gettext(request, "Give the period as YYYY-MM.")) from None
    return text


def _require(request: web.Request, posted: Any, *names: str) -> None:
    missing = [n for n in names if not _s(posted, n)]
    if missing:
        raise ConsoleError(gettext(request, "Fill in: {fields}.").format(fields=", ".join(missing)))


async def _write(request: web.Request, run: Callable[[Tx], Awaitable[T]]) -> T:
    return await (await db(request)).transaction(run)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return msgspec.to_builtins(dataclasses.asdict(obj))
    return msgspec.to_builtins(obj)


def _price_text(nanos: int | None, currency: str) -> str:
    return "" if nanos is None else fmt(nanos, currency, exact=True)


# -- prices -----------------------------------------------------------------------------------


async def prices_page(request: web.Request, session: Session) -> web.StreamResponse:
    prices = await Billing(await db(request)).prices()
    rows = [
        {
            "p": p,
            "effective": bio.iso_z(p.effective_ms),
            "input": _price_text(p.input_per_1m, p.currency),
            "cached": _price_text(p.cached_input_per_1m, p.currency),
            "output": _price_text(p.output_per_1m, p.currency),
            # The price in force: the input price when the version sets none.
            "cache_write": _price_text(p.write_per_1m, p.currency),
            "points": "" if p.points_per_1m is None else decimal_str(p.points_per_1m),
        }
        for p in sorted(prices, key=lambda p: (p.model, p.tenant, -p.version))
    ]
    return render(request, session, "billing_prices.html", rows=rows)


async def set_price(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    _require(request, posted, "model", "currency", "input", "output")
    model, tenant = _s(posted, "model"), _s(posted, "tenant")
    eff = _when(request, _opt(posted, "effective"))

    async def run(tx: Tx) -> Price:
        p = await set_price_in(
            tx,
            model,
            currency=_s(posted, "currency").upper(),
            input_per_1m=_s(posted, "input"),
            output_per_1m=_s(posted, "output"),
            cached_input_per_1m=_opt(posted, "cached_input"),
            cache_write_per_1m=_opt(posted, "cache_write"),
            points_per_1m=_opt(posted, "points"),
            effective_ms=eff,
            tenant=tenant,
        )
        await sql.add_admin_audit(tx, session.actor, "price.set", model, None, _jsonable(p))
        return p

    p = await _write(request, run)
    msg = gettext(request, "Price of {model} set: version {version}.")
    raise redirect(
        request, "/console/billing/prices", flash=msg.format(model=model, version=p.version)
    )


# -- FX -------------------------------------------------------------------------------------------


async def fx_page(request: web.Request, session: Session) -> web.StreamResponse:
    rows = await (await db(request)).read(terms.fx_list)
    shown = [
        {"base": b, "quote": q, "effective": bio.iso_z(int(e)), "rate": str(r)}
        for b, q, e, r in rows
    ]
    return render(request, session, "billing_fx.html", rows=shown)


async def set_fx(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    _require(request, posted, "base", "quote", "rate")
    base, quote = _s(posted, "base").upper(), _s(posted, "quote").upper()
    eff = _when(request, _opt(posted, "effective"))
    rate_text = _s(posted, "rate")

    async def run(tx: Tx) -> Decimal:
        r = await set_fx_in(tx, base, quote, rate_text, effective_ms=eff)
        out = {"base": base, "quote": quote, "rate": str(r), "effective_ms": eff}
        await sql.add_admin_audit(tx, session.actor, "fx.set", f"{base}/{quote}", None, out)
        return r

    r = await _write(request, run)
    msg = gettext(request, "FX rate set: 1 {base} = {rate} {quote}.")
    raise redirect(request, "/console/billing/fx", flash=msg.format(base=base, quote=quote, rate=r))


# -- plans --------------------------------------------------------------------------------------


async def plans_page(request: web.Request, session: Session) -> web.StreamResponse:
    plans = await Billing(await db(request)).plans()
    rows = [
        {
            "p": p,
            "price": fmt(p.price, p.currency, exact=True),
            "quantity": fmt_units(p.quantity, TOKENS if p.kind == "package" else "POINTS"),
            "overage": _price_text(p.overage_per_1m, p.overage_currency),
            "models": ", ".join(p.models),
        }
        for p in plans
    ]
    return render(request, session, "billing_plans.html", rows=rows, periods=PLAN_PERIODS)


async def create_plan(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    _require(request, posted, "name", "price", "currency", "quantity")
    name = _s(posted, "name")
    kind = _s(posted, "kind") or "package"
    qty = _s(posted, "quantity")
    tokens: int | None = None
    points: str | None = None
    if kind == "package":
        if not qty.isdigit():
            raise ConsoleError(gettext(request, "Tokens must be a whole number."))
        tokens = int(qty)
    elif kind == "points":
        points = qty
    else:
        raise ConsoleError(gettext(request, "A plan sells tokens or points."))
    exhaustion = _s(posted, "exhaustion") or "hard_stop"
    auto = _opt(posted, "auto_topup")
    if exhaustion == "auto_topup" and (auto is None or not auto.isdigit()):
        raise ConsoleError(gettext(request, "Automatic top-up needs a whole number of tokens."))

    kw: dict[str, Any] = dict(
        price=_s(posted, "price"),
        currency=_s(posted, "currency").upper(),
        tokens=tokens,
        points=points,
        period=_s(posted, "period") or "month",
        overage_per_1m=_opt(posted, "overage") if exhaustion == "overage" else None,
        overage_currency=(_opt(posted, "overage_currency") or "").upper() or None,
        hard_stop=exhaustion == "hard_stop",
        auto_topup=int(auto) if exhaustion == "auto_topup" and auto else None,
        rollover=_s(posted, "rollover") == "on",
        models=[m.strip() for m in _s(posted, "models").split(",") if m.strip()],
    )

    async def run(tx: Tx) -> Plan:
        plan = await create_plan_in(tx, name, **kw)
        await sql.add_admin_audit(tx, session.actor, "plan.create", name, None, _jsonable(plan))
        return plan

    await _write(request, run)
    msg = gettext(request, "Plan {name} created.")
    raise redirect(request, "/console/billing/plans", flash=msg.format(name=name))


# -- redemption codes ----------------------------------------------------------------------------

# A created batch's codes, held in this process (the admin listener's one) for the session that
# created them: shown on the page after the redirect, downloadable once as CSV, then gone.
_BATCHES: dict[str, tuple[str, float, list[str], str, str]] = {}  # id -> (digest, t, codes,...)
_MAX_BATCHES = 100


def _hold_batch(session: Session, codes: list[str], amount: str, currency: str) -> str:
    now = time.monotonic()
    for k in [k for k, v in _BATCHES.items() if now - v[1] > BATCH_TTL_S]:
        del _BATCHES[k]
    while len(_BATCHES) >= _MAX_BATCHES:
        del _BATCHES[next(iter(_BATCHES))]
    batch_id = secrets.token_urlsafe(12)
    _BATCHES[batch_id] = (session.digest, now, codes, amount, currency)
    return batch_id


def _batch(session: Session, batch_id: str) -> tuple[str, float, list[str], str, str] | None:
    held = _BATCHES.get(batch_id)
    if held is None or held[0] != session.digest or time.monotonic() - held[1] > BATCH_TTL_S:
        return None
    return held


async def codes_page(request: web.Request, session: Session) -> web.StreamResponse:
    raw = request.query.get("before", "")
    before: tuple[int, str] | None = None
    if raw:
        ts, _, h = raw.partition(".")
        if not ts.isdigit() or not h:
            raise ConsoleError(gettext(request, "Invalid cursor: follow the page links as given."))
        before = (int(ts), h)
    rows, nxt = await (await db(request)).read(
        lambda tx: reports.codes_page(tx, before=before, limit=50)
    )
    now = _now()
    shown = [
        {
            "c": c,
            "amount": fmt(c.amount, c.currency, exact=True),
            "status": c.status(now),
            "created": bio.iso_z(c.created_ms),
            "expires": bio.iso_z(c.expires_ms) if c.expires_ms is not None else "",
        }
        for c in rows
    ]
    batch_id = take_once(request, "code_batch")
    batch = _batch(session, batch_id) if batch_id else None
    return render(
        request,
        session,
        "billing_codes.html",
        rows=shown,
        next_url=f"/console/billing/codes?before={nxt[0]}.{nxt[1]}" if nxt else None,
        batch_id=batch_id if batch else None,
        batch_codes=batch[2] if batch else [],
        batch_value=f"{batch[3]} {batch[4]}" if batch else "",
    )


async def create_codes(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    _require(request, posted, "count", "amount", "currency")
    count_text = _s(posted, "count")
    if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_CODES:
        raise ConsoleError(
            gettext(request, "Count must be a whole number from 1 to {n}.").format(n=MAX_CODES)
        )
    count = int(count_text)
    amount, currency = _s(posted, "amount"), _s(posted, "currency").upper()
    expires = _when(request, _opt(posted, "expires"))

    async def run(tx: Tx) -> list[str]:
        codes = await create_codes_in(tx, count, amount, currency, expires_ms=expires)
        # The codes are bearer secrets: the log keeps their prefixes, never the codes.
        out = {"count": len(codes), "amount": amount, "currency": currency,
               "expires_ms": expires, "prefixes": [c[:8] for c in codes]}  # fmt: skip
        await sql.add_admin_audit(
            tx, session.actor, "codes.create", f"{len(codes)} codes", None, out
        )
        return codes

    codes = await _write(request, run)
    batch_id = _hold_batch(session, codes, amount, currency)
    show_once(request, "code_batch", batch_id)
    msg = gettext(request, "{n} codes created. They are shown once: download them now.")
    raise redirect(request, "/console/billing/codes", flash=msg.format(n=len(codes)))


async def codes_csv(request: web.Request, session: Session) -> web.StreamResponse:
    batch_id = request.match_info["batch"]
    held = _batch(session, batch_id)
    if held is None:
        raise ConsoleError(
            gettext(request, "This batch's download is gone: it is given once, to the session "
                    "that created it, within 15 minutes.")
        )  # fmt: skip
    del _BATCHES[batch_id]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["code", "amount", "currency"])
    w.writerows([c, held[3], held[4]] for c in held[2])
    return web.Response(
        body=buf.getvalue().encode(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="codes-{batch_id}.csv"'},
    )


# -- statements -----------------------------------------------------------------------------


# A statement's other sections, by ledger transaction kind.
_KIND_TITLES = {
    "topup": "Top-ups",
    "redeem": "Redemptions",
    "adjustment": "Adjustments",
    "invoice": "Invoices",
    "payment": "Payments",
    "refund": "Refunds",
    "expiry": "Expiries",
}


def _tenant_names(rows: list[Any]) -> list[str]:
    return [r[0] for r in rows]


async def statements_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = request.query.get("tenant", "").strip()
    period = request.query.get("period", "").strip() or period_of(_now())
    st: dict[str, Any] | None = None
    database = await db(request)
    if tenant:
        _period(request, period)
        await database.read(lambda tx: sql.tenant_in(tx, tenant))  # 404 for an unknown tenant
        st = await database.read(lambda tx: ST.tenant_statement(tx, tenant, period))
    names = await database.read(
        lambda tx: tx.fetch("SELECT name FROM tenants ORDER BY name LIMIT 1000")
    )
    usage = []
    if st is not None:
        for u in st["usage"]:
            usage.append(
                {
                    "model": u["model"],
                    "tokens": u["tokens"],
                    # Of the tokens, those written to a prompt cache (absent: none).
                    "cache_write_tokens": u.get("cache_write_tokens", 0),
                    "package_tokens": u["package_tokens"],
                    "amounts": [fmt_units(v, c) for c, v in sorted(u["amounts"].items())],
                }
            )
    return render(
        request,
        session,
        "billing_statements.html",
        tenant=tenant,
        period=period,
        tenants=_tenant_names(names),
        st=st,
        usage=usage,
        overage=[fmt(v, c, exact=True) for c, v in sorted((st or {}).get("overage", {}).items())],
        other=[
            (_KIND_TITLES.get(k, k), [fmt_units(v, u) for u, v in sorted(units.items())])
            for k, units in sorted((st or {}).get("other", {}).items())
        ],
        purchases=[
            {"memo": p.get("memo", ""), "price": fmt(p["price"], p["currency"], exact=True)}
            for p in (st or {}).get("purchases", [])
            if "price" in p and "currency" in p
        ],
    )


async def close_period(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    _require(request, posted, "tenant", "period")
    tenant, period = _s(posted, "tenant"), _period(request, _s(posted, "period"))

    async def run(tx: Tx) -> dict[str, Any]:
        await sql.tenant_in(tx, tenant)
        st = await ST.close_period(tx, tenant, period)
        summary = {"tenant": tenant, "period": period, "closing": st["closing"]}
        await sql.add_admin_audit(tx, session.actor, "statement.close", tenant, None, summary)
        return st

    await (await db(request)).transaction(run)
    msg = gettext(request, "{tenant} {period} closed.")
    raise redirect(
        request,
        f"/console/billing/statements?tenant={tenant}&period={period}",
        flash=msg.format(tenant=tenant, period=period),
    )


# -- invoices and payments ---------------------------------------------------------------------


async def invoices_page(request: web.Request, session: Session) -> web.StreamResponse:
    tenant = request.query.get("tenant", "").strip() or None

    async def run(tx: Tx) -> tuple[list[reports.InvoiceRow], list[tuple[str, str, int]]]:
        return await reports.invoices(tx, tenant=tenant), await reports.receivables(tx)

    invoices, owed = await (await db(request)).read(run)
    rows = [
        {
            "i": i,
            "owed": fmt(i.owed, i.currency, exact=True) if i.currency else "",
            "due": fmt(i.due, i.currency, exact=True) if i.currency else "",
        }
        for i in invoices
    ]
    receivables = [
        {"tenant": t, "currency": c, "owed": fmt(v, c, exact=True), "nanos": v} for t, c, v in owed
    ]
    return render(
        request,
        session,
        "billing_invoices.html",
        rows=rows,
        receivables=receivables,
        tenant=tenant or "",
        period=period_of(_now()),
        pay_token=secrets.token_urlsafe(18),
    )


async def create_invoice(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    _require(request, posted, "tenant", "period")
    tenant, period = _s(posted, "tenant"), _period(request, _s(posted, "period"))

    async def run(tx: Tx) -> dict[str, Any]:
        await sql.tenant_in(tx, tenant)  # NotFound: invoice_in would bill a profile-less name
        inv = await invoice_in(tx, tenant, period)
        await sql.add_admin_audit(tx, session.actor, "invoice.create", tenant, None, inv)
        return inv

    inv = await _write(request, run)
    msg = gettext(request, "Invoiced {tenant} for {period}: {due} due.")
    raise redirect(
        request,
        "/console/billing/invoices",
        flash=msg.format(tenant=tenant, period=period, due=fmt(inv["due"], inv["currency"])),
    )


async def record_payment(request: web.Request, session: Session) -> web.StreamResponse:
    posted = await form(request)
    _require(request, posted, "tenant", "amount", "currency", "token")
    tenant, amount = _s(posted, "tenant"), _s(posted, "amount")
    currency, token = _s(posted, "currency").upper(), _s(posted, "token")
    if len(token) > 200 or not token.isascii():
        raise ConsoleError(gettext(request, "The form expired: reload the page."))
    digest = hashlib.sha256(msgspec.json.encode(["payment", tenant, amount, currency])).hexdigest()
    key = f"console-payment:{token}"

    async def run(tx: Tx) -> str:
        prev = await sql.idempotent_response(tx, session.actor, key)
        if prev is not None:
            raise _Replayed(prev.request_digest == digest)
        await sql.tenant_in(tx, tenant)
        txn = await pay_in(tx, tenant, amount, currency, ref=key)
        out = {"txn": txn, "amount": amount, "currency": currency}
        await sql.add_admin_audit(tx, session.actor, "payment.create", tenant, None, out)
        await sql.record_idempotent(
            tx, session.actor, key, digest, 201, msgspec.json.encode(out).decode()
        )
        return txn

    try:
        txn = await _write(request, run)
    except _Replayed as e:
        if not e.same:
            raise ConsoleError(
                gettext(request, "This form was submitted already with other values: reload "
                        "the page to record another payment.")
            ) from None  # fmt: skip
        raise redirect(
            request,
            "/console/billing/invoices",
            flash=gettext(request, "This payment was recorded already (the form was sent twice)."),
        ) from None
    except Exception:
        # A concurrent twin under the same token may have committed first: then this one is
        # its replay, not a failure.
        prev = await (await db(request)).read(
            lambda tx: sql.idempotent_response(tx, session.actor, key)
        )
        if prev is None:
            raise
        raise redirect(
            request,
            "/console/billing/invoices",
            flash=gettext(request, "This payment was recorded already (the form was sent twice)."),
        ) from None
    msg = gettext(request, "Payment of {amount} {currency} from {tenant} recorded ({txn}).")
    raise redirect(
        request,
        "/console/billing/invoices",
        flash=msg.format(amount=amount, currency=currency, tenant=tenant, txn=txn),
    )


# -- provider settlement --------------------------------------------------------------------


async def settlement_page(request: web.Request, session: Session) -> web.StreamResponse:
    provider = request.query.get("provider", "").strip()
    period = request.query.get("period", "").strip() or period_of(_now())
    result: dict[str, Any] | None = None
    if provider:
        _period(request, period)
        result = await (await db(request)).read(
            lambda tx: ST.provider_settlement(tx, provider, period)
        )
    return render(
        request,
        session,
        "billing_settlement.html",
        provider=provider,
        period=period,
        result=result,
    )


# -- reconciliation -------------------------------------------------------------------------


async def reconcile_page(request: web.Request, session: Session) -> web.StreamResponse:
    return render(
        request,
        session,
        "billing_reconcile.html",
        report=None,
        max_kib=MAX_UPLOAD_BYTES // 1024,
        provider="",
        period="",
    )


async def reconcile_upload(request: web.Request, session: Session) -> web.StreamResponse:
    """A provider's per-request counts (the CSV `tokenhub billing reconcile` reads) compared
    with the usage events: the same report (bio.reconcile), as tables. Writes nothing, so the
    report is this POST's own page."""
    posted = await form(request)
    upload = posted.get("file")
    if not isinstance(upload, web.FileField):
        raise ConsoleError(gettext(request, "Choose a CSV file to upload."))
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ConsoleError(
            gettext(request, "The file is larger than {kib} KiB: split it, or use tokenhub "
                    "billing reconcile.").format(kib=MAX_UPLOAD_BYTES // 1024)
        )  # fmt: skip
    provider = _opt(posted, "provider")
    period = _opt(posted, "period")
    since, until = None, None
    if period is not None:
        since, until = period_bounds(_period(request, period))
    text = data.decode("utf-8-sig", errors="replace")
    try:
        report = await bio.reconcile(
            await db(request), io.StringIO(text, newline=""), provider=provider, since=since,
            until=until,
        )  # fmt: skip
    except bio.BillingIOError as e:
        raise ConsoleError(str(e)) from None
    return render(
        request,
        session,
        "billing_reconcile.html",
        report=report,
        max_kib=MAX_UPLOAD_BYTES // 1024,
        provider=provider or "",
        period=period or "",
        filename=upload.filename,
    )


# -- ledger check, overruns ------------------------------------------------------------------


async def check_page(request: web.Request, session: Session) -> web.StreamResponse:
    result = await (await db(request)).read(ledger_check)
    return render(request, session, "billing_check.html", result=result)


async def overruns_page(request: web.Request, session: Session) -> web.StreamResponse:
    rows = await (await db(request)).read(sql.overruns_in)
    shown = [
        {"tenant": t, "currency": c, "nanos": v, "text": fmt(v, c, exact=True)}
        for t, c, v in rows
        if v > 0
    ]
    return render(request, session, "billing_overruns.html", rows=shown)


B = "/console/billing"

ROUTES: list[PageRoute] = [
    PageRoute("GET", f"{B}/prices", "read", prices_page),
    PageRoute("POST", f"{B}/prices", "admin", set_price),
    PageRoute("GET", f"{B}/fx", "read", fx_page),
    PageRoute("POST", f"{B}/fx", "admin", set_fx),
    PageRoute("GET", f"{B}/plans", "read", plans_page),
    PageRoute("POST", f"{B}/plans", "admin", create_plan),
    PageRoute("GET", f"{B}/codes", "read", codes_page),
    PageRoute("POST", f"{B}/codes", "billing", create_codes),
    PageRoute("GET", f"{B}/codes/batch/{{batch}}.csv", "billing", codes_csv),
    PageRoute("GET", f"{B}/statements", "read", statements_page),
    PageRoute("POST", f"{B}/statements/close", "billing", close_period),
    PageRoute("GET", f"{B}/invoices", "read", invoices_page),
    PageRoute("POST", f"{B}/invoices", "billing", create_invoice),
    PageRoute("POST", f"{B}/payments", "billing", record_payment),
    PageRoute("GET", f"{B}/settlements", "read", settlement_page),
    PageRoute("GET", f"{B}/reconcile", "read", reconcile_page),
    PageRoute("POST", f"{B}/reconcile", "billing", reconcile_upload),
    PageRoute("GET", f"{B}/check", "read", check_page),
    PageRoute("GET", f"{B}/overruns", "read", overruns_page),
]
