"""The admin API's billing resources: statements and their closing, invoices, payments, refunds,
provider settlements and revenue splits, billing profiles, the overrun report, the catalogue
(prices, FX, plans, redemption codes), the settlement quarantine, settle and expire.

Each handler calls the service function the CLI command calls (`tokenhub.billing.service`'s
`*_in`, `tokenhub.billing.statements`, `tokenhub.billing.settler`) inside one transaction with
its admin audit entry (who, what, before, after). Money-moving POSTs (invoices, payments,
refunds) take an Idempotency-Key: a replay answers as the first time, another body under the
same key is 409. Settle and expire need none: each is idempotent by itself (an event settles
once, a lot ends once), a repeat finds nothing left to do.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from tokenhub.admin.web import (
    Idempotency,
    Route,
    actor,
    db,
    decode_cursor,
    json_response,
    money,
    money_moving,
    page,
    page_limit,
    read_json,
)
from tokenhub.billing import ledger as L
from tokenhub.billing import settler as Q
from tokenhub.billing import statements as S
from tokenhub.billing import terms
from tokenhub.billing.service import (
    Billing,
    Plan,
    adjust_in,
    create_codes_in,
    create_plan_in,
    expire_in,
    get_profile,
    invoice_in,
    now_ms,
    pay_in,
    refund_in,
    set_fx_in,
    set_price_in,
    set_profile_in,
    set_split_in,
    wallet_view_in,
)
from tokenhub.billing.terms import Price, Profile
from tokenhub.db.database import Tx
from tokenhub.gateway.errors import ApiError
from tokenhub.money import decimal_str, parse_amount
from tokenhub.store import sql
from tokenhub.store.base import Tenant

V1 = "/admin/v1"
_PERIOD = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
MAX_CODES = 1000  # per request: the codes come back in the response
MAX_EVENT_IDS = 1000


def _period(value: str, name: str = "period") -> str:
    # Periods are compared as strings in the ledger, so '2026-1' must not get through.
    if not _PERIOD.fullmatch(value):
        raise ApiError.bad_request(f"period must look like 2026-11 (got {value!r})", param=name)
    return value


def _pct_text(ppm: int) -> str:
    return decimal_str(ppm * 100_000)  # parts per million of the whole -> percent: "20.5"


async def _empty_or(request: web.Request, into: type[msgspec.Struct]) -> Any:
    """The JSON body as `into`, or `into()` when the request has no body."""
    if not request.can_read_body:
        return into()
    return await read_json(request, into)


# -- records ------------------------------------------------------------------------------------


def _profile_json(p: Profile) -> dict[str, Any]:
    cur = p.currency
    return {
        "object": "billing_profile",
        "tenant": p.tenant,
        "currency": cur,
        "draw_order": list(p.draw_order),
        "credit_limit": money(p.credit_limit, cur),
        "low_balance": None if p.low_balance is None else money(p.low_balance, cur),
        "discount_pct": _pct_text(p.discount_ppm),
    }


def _price_json(p: Price) -> dict[str, Any]:
    return {
        "object": "price",
        "model": p.model,
        "tenant": p.tenant or None,
        "version": p.version,
        "effective_ms": p.effective_ms,
        "input_per_1m": money(p.input_per_1m, p.currency),
        "cached_input_per_1m": money(p.cached_input_per_1m, p.currency),
        "output_per_1m": money(p.output_per_1m, p.currency),
        # The price in force (the input price when the version sets none), and whether it did.
        "cache_write_per_1m": money(p.write_per_1m, p.currency),
        "cache_write_set": p.cache_write_per_1m is not None,
        "points_per_1m": None if p.points_per_1m is None else decimal_str(p.points_per_1m),
    }


def _plan_json(p: Plan) -> dict[str, Any]:
    return {
        "object": "plan",
        "name": p.name,
        "kind": p.kind,
        "price": money(p.price, p.currency),
        "quantity": p.quantity if p.kind == "package" else decimal_str(p.quantity),
        "unit": "tokens" if p.kind == "package" else "points",
        "period": p.period,
        "exhaustion": p.exhaustion,
        "overage_per_1m": None
        if p.overage_per_1m is None
        else money(p.overage_per_1m, p.overage_currency),
        "auto_topup": p.auto_topup,
        "rollover": p.rollover,
        "models": list(p.models),
    }


async def _receivable(tx: Tx, tenant: str, currency: str) -> dict[str, str]:
    acc = L.receivable(tenant, currency)
    bals = await L.balances(tx, tenant=tenant, prefix=acc)
    return money(bals.get(acc, 0), currency)  # what the tenant owes


# -- statements, invoices, payments, refunds ---------------------------------------------------


async def get_statement(request: web.Request) -> web.Response:
    """`tokenhub billing statement --format json`: amounts are integer nanos, each with its
    `text` (exact, with the currency or unit)."""
    tenant_id = request.match_info["id"]
    period = _period(request.match_info["period"])

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        st = await S.tenant_statement(tx, t.name, period)
        return {"object": "statement", "tenant_id": t.id, **st}

    return json_response(await (await db(request)).read(run))


async def close_statement(request: web.Request) -> web.Response:
    """`tokenhub billing close`: freezes the period's statement (400 when closed already or a
    later period is)."""
    tenant_id = request.match_info["id"]
    period = _period(request.match_info["period"])
    who = actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        st = await S.close_period(tx, t.name, period)
        after = {"period": period, "closed": True, "next_open": L.next_period(period)}
        await sql.add_admin_audit(tx, who, "statement.close", t.id, {"period": period}, after)
        return {"object": "statement", "tenant_id": t.id, **st}

    return json_response(await (await db(request)).transaction(run))


class InvoiceCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    period: str


class Payment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount: str  # exact decimal in the currency's major unit
    currency: str


class RefundCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    memo: str = ""


async def _tenant_money_move(
    request: web.Request, body: msgspec.Struct, action: str, move: Any
) -> web.Response:
    """A money-moving POST on the tenant of the URL under its Idempotency-Key: replay, else
    `move(tx, tenant, key)` -> (response fields, audit before, audit after), audited and
    recorded as the key's 201, in one transaction."""
    tenant_id = request.match_info["id"]
    who = actor(request)
    idem = Idempotency(request, who, body)

    async def run(tx: Tx) -> web.Response:
        replayed = await idem.replay(tx)
        if replayed is not None:
            return replayed
        t = await sql.tenant_by_id_in(tx, tenant_id)
        fields, before, after = await move(tx, t, idem.key)
        out = {**fields, "tenant_id": t.id, "tenant": t.name}
        await sql.add_admin_audit(tx, who, action, t.id, before, after)
        return await idem.record(tx, 201, out)

    return await money_moving(request, idem, run)


async def create_invoice(request: web.Request) -> web.Response:
    """`tokenhub billing invoice`: a postpaid tenant's invoice for a month (once per month)."""
    body = await read_json(request, InvoiceCreate)
    period = _period(body.period)

    async def move(tx: Tx, t: Tenant, key: str) -> tuple[dict[str, Any], Any, Any]:
        inv = await invoice_in(tx, t.name, period)
        cur = inv["currency"]
        out = {
            "object": "invoice",
            "period": period,
            "owed": money(inv["owed"], cur),
            "due": money(inv["due"], cur),
            "rounding": money(inv["rounding"], cur),
            "transaction": inv["txn"],
        }
        return out, None, out

    return await _tenant_money_move(request, body, "invoice.create", move)


async def create_payment(request: web.Request) -> web.Response:
    """`tokenhub billing pay`: a payment against the receivable (at most what is owed)."""
    body = await read_json(request, Payment)

    async def move(tx: Tx, t: Tenant, key: str) -> tuple[dict[str, Any], Any, Any]:
        before = await _receivable(tx, t.name, body.currency)
        txn = await pay_in(tx, t.name, body.amount, body.currency, ref=f"idem:{key}")
        after = await _receivable(tx, t.name, body.currency)
        out = {
            "object": "payment",
            "transaction": txn,
            "amount": money(parse_amount(body.amount, body.currency), body.currency),
            "receivable": after,
        }
        return out, {"receivable": before}, {"receivable": after, "txn": txn}

    return await _tenant_money_move(request, body, "payment.create", move)


async def create_refund(request: web.Request) -> web.Response:
    """`tokenhub billing refund`: reverses a settled usage event's postings (once)."""
    body = await _empty_or(request, RefundCreate)
    event_id = request.match_info["id"]
    who = actor(request)
    idem = Idempotency(request, who, body)

    async def run(tx: Tx) -> web.Response:
        replayed = await idem.replay(tx)
        if replayed is not None:
            return replayed
        txn = await refund_in(tx, event_id, memo=body.memo)
        tenant = await tx.fetchval("SELECT tenant FROM ledger_txns WHERE id = $1", txn)
        out = {"object": "refund", "event_id": event_id, "tenant": tenant, "transaction": txn}
        await sql.add_admin_audit(
            tx, who, "usage.refund", event_id, None, {"txn": txn, "memo": body.memo}
        )
        return await idem.record(tx, 201, out)

    return await money_moving(request, idem, run)


class Adjustment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount: str  # "5.00" credits the wallet, "-5.00" debits it (never below zero)
    currency: str  # the tenant's settlement currency
    memo: str  # why (kept in the ledger)


async def create_adjustment(request: web.Request) -> web.Response:
    """`tokenhub wallet adjust`: an operator's correction to the wallet."""
    body = await read_json(request, Adjustment)

    async def move(tx: Tx, t: Tenant, key: str) -> tuple[dict[str, Any], Any, Any]:
        before = (await wallet_view_in(tx, t.name)).money["wallet"].get(body.currency, 0)
        txn = await adjust_in(tx, t.name, body.amount, body.currency, body.memo, ref=f"idem:{key}")
        after = (await wallet_view_in(tx, t.name)).money["wallet"][body.currency]
        out = {
            "object": "adjustment",
            "transaction": txn,
            "amount": money(
                parse_amount(body.amount, body.currency, allow_negative=True), body.currency
            ),
            "memo": body.memo,
            "wallet": money(after, body.currency),
        }
        return (
            out,
            {"wallet": money(before, body.currency)},
            {"wallet": money(after, body.currency), "txn": txn, "memo": body.memo},
        )

    return await _tenant_money_move(request, body, "wallet.adjust", move)


async def get_wallet(request: web.Request) -> web.Response:
    """`tokenhub wallet show --json`: money per kind and currency (the tenant's side), the
    active lots with what they have left, and the low-balance warning."""
    tenant_id = request.match_info["id"]

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        v = await wallet_view_in(tx, t.name)
        return {
            "object": "wallet",
            "tenant_id": t.id,
            "tenant": t.name,
            "profile": _profile_json(v.profile),
            **{
                kind: [money(n, c) for c, n in sorted(by_cur.items())]
                for kind, by_cur in v.money.items()
            },
            "low_balance_warning": v.low,
            "lots": [
                {
                    "object": "lot",
                    "id": lot.id,
                    "plan": lot.plan,
                    "kind": lot.kind,
                    "unit": "tokens" if lot.kind == "package" else "points",
                    "quantity": lot.quantity
                    if lot.kind == "package"
                    else decimal_str(lot.quantity),
                    "left": left if lot.kind == "package" else decimal_str(left),
                    "start_ms": lot.start_ms,
                    "end_ms": lot.end_ms,
                    "models": list(lot.models),
                }
                for lot, _, left in v.lots
            ],
        }

    return json_response(await (await db(request)).read(run))


# -- providers ----------------------------------------------------------------------------------


async def get_settlement(request: web.Request) -> web.Response:
    """`tokenhub billing settlement`: what the operator owes a provider for a month."""
    provider = request.match_info["provider"]
    period = _period(request.match_info["period"])
    st = await (await db(request)).read(lambda tx: S.provider_settlement(tx, provider, period))
    return json_response(
        {
            "object": "provider_settlement",
            "provider": provider,
            "period": period,
            "lines": [
                {
                    "model": x["model"],
                    "owed": money(x["owed"], x["currency"]),
                    "postings": x["postings"],
                }
                for x in st["lines"]
            ],
            "totals": [money(t["owed"], c) for c, t in sorted(st["totals"].items())],
        }
    )


class SplitSet(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    platform_pct: str
    channel_pct: str = "0"
    effective_ms: int | None = None  # default: now


async def set_split(request: web.Request) -> web.Response:
    """`tokenhub billing split`: the provider's revenue split from a time on."""
    body = await read_json(request, SplitSet)
    provider = request.match_info["provider"]
    who = actor(request)
    eff = body.effective_ms if body.effective_ms is not None else now_ms()

    async def run(tx: Tx) -> dict[str, Any]:
        row = await tx.fetchrow(
            "SELECT platform_ppm, channel_ppm FROM revenue_splits "
            "WHERE provider = $1 AND effective_ms <= $2 ORDER BY effective_ms DESC LIMIT 1",
            provider,
            eff,
        )
        before = None if row is None else {
            "platform_pct": _pct_text(int(row[0])), "channel_pct": _pct_text(int(row[1]))
        }  # fmt: skip
        pp, cp = await set_split_in(
            tx, provider, platform_pct=body.platform_pct, channel_pct=body.channel_pct,
            effective_ms=eff,
        )  # fmt: skip
        out = {
            "object": "revenue_split",
            "provider": provider,
            "effective_ms": eff,
            "platform_pct": _pct_text(pp),
            "channel_pct": _pct_text(cp),
            "provider_pct": _pct_text(1_000_000 - pp - cp),
        }
        await sql.add_admin_audit(tx, who, "split.set", provider, before, out)
        return out

    return json_response(await (await db(request)).transaction(run))


# -- billing profiles, overruns -----------------------------------------------------------------


async def get_billing_profile(request: web.Request) -> web.Response:
    tenant_id = request.match_info["id"]

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        return {**_profile_json(await get_profile(tx, t.name)), "tenant_id": t.id}

    return json_response(await (await db(request)).read(run))


class ProfileChange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A field left out stays as it is."""

    currency: str | None = None
    draw_order: list[str] | None = None
    credit_limit: str | None = None  # in the (new) currency
    low_balance: str | None = None
    discount_pct: str | None = None


async def patch_billing_profile(request: web.Request) -> web.Response:
    """`tokenhub billing profile TENANT --currency ... --order ...`."""
    body = await read_json(request, ProfileChange)
    if all(getattr(body, f) is None for f in body.__struct_fields__):
        raise ApiError.bad_request(f"give at least one of {', '.join(body.__struct_fields__)}")
    tenant_id = request.match_info["id"]
    who = actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        before = _profile_json(await get_profile(tx, t.name))
        new = await set_profile_in(
            tx,
            t.name,
            currency=body.currency,
            draw_order=body.draw_order,
            credit_limit=body.credit_limit,
            low_balance=body.low_balance,
            discount_pct=body.discount_pct,
        )
        after = _profile_json(new)
        await sql.add_admin_audit(tx, who, "billing_profile.set", t.id, before, after)
        return {**after, "tenant_id": t.id}

    return json_response(await (await db(request)).transaction(run))


async def list_overruns(request: web.Request) -> web.Response:
    """Usage no contract covered, owed by each tenant, per currency (the `overrun` line of
    `tokenhub wallet show`), for every tenant with one."""
    rows = await (await db(request)).read(sql.overruns_in)
    data = [{"object": "overrun", "tenant": t, "owed": money(v, c)} for t, c, v in rows]
    return json_response({"object": "list", "data": data, "has_more": False, "next_cursor": None})


# -- the catalogue: prices, FX, plans, codes ---------------------------------------------------


class PriceSet(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    currency: str
    input_per_1m: str
    output_per_1m: str
    cached_input_per_1m: str | None = None  # default: the input price
    cache_write_per_1m: str | None = None  # prompt-cache writes; default: the input price
    points_per_1m: str | None = None
    effective_ms: int | None = None  # default: now
    tenant: str | None = None  # an override for this tenant only


async def set_price(request: web.Request) -> web.Response:
    """`tokenhub prices set`: a new price-book version (or tenant override)."""
    body = await read_json(request, PriceSet)
    who = actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        if body.tenant:
            await sql.tenant_in(tx, body.tenant)  # 404 for a tenant that does not exist
        old = [
            p
            for p in await terms.all_prices(tx)
            if p.model == body.model and p.tenant == (body.tenant or "")
        ]
        p = await set_price_in(
            tx,
            body.model,
            currency=body.currency,
            input_per_1m=body.input_per_1m,
            output_per_1m=body.output_per_1m,
            cached_input_per_1m=body.cached_input_per_1m,
            cache_write_per_1m=body.cache_write_per_1m,
            points_per_1m=body.points_per_1m,
            effective_ms=body.effective_ms,
            tenant=body.tenant or "",
        )
        out = _price_json(p)
        before = _price_json(old[-1]) if old else None
        await sql.add_admin_audit(tx, who, "price.set", p.model, before, out)
        return out

    return json_response(await (await db(request)).transaction(run), status=201)


class FxSet(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    base: str
    quote: str
    rate: str  # units of quote per 1 base, exact decimal
    effective_ms: int | None = None  # default: now


async def set_fx(request: web.Request) -> web.Response:
    """`tokenhub fx set`: an effective-dated FX rate."""
    body = await read_json(request, FxSet)
    who = actor(request)
    eff = body.effective_ms if body.effective_ms is not None else now_ms()

    async def run(tx: Tx) -> dict[str, Any]:
        old = [r for r in await terms.fx_list(tx) if (r[0], r[1]) == (body.base, body.quote)]
        r = await set_fx_in(tx, body.base, body.quote, body.rate, effective_ms=eff)
        out = {"object": "fx_rate", "base": body.base, "quote": body.quote,
               "effective_ms": eff, "rate": str(r)}  # fmt: skip
        before = None if not old else {"effective_ms": old[-1][2], "rate": str(old[-1][3])}
        await sql.add_admin_audit(tx, who, "fx.set", f"{body.base}/{body.quote}", before, out)
        return out

    return json_response(await (await db(request)).transaction(run), status=201)


class PlanCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    price: str
    currency: str
    tokens: int | None = None  # a package of N tokens, or
    points: str | None = None  # a point pack
    period: str = "month"
    overage_per_1m: str | None = None
    overage_currency: str | None = None
    hard_stop: bool = False
    auto_topup: int | None = None
    rollover: bool = False
    models: list[str] = msgspec.field(default_factory=list)


_PLAN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


async def create_plan(request: web.Request) -> web.Response:
    """`tokenhub plans create`."""
    body = await read_json(request, PlanCreate)
    if not _PLAN_NAME.fullmatch(body.name):
        raise ApiError.bad_request(
            f"invalid plan name {body.name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -",
            param="name",
        )
    if body.overage_currency is not None and body.overage_per_1m is None:
        raise ApiError.bad_request("overage_currency goes with overage_per_1m")
    if any(not m.strip() for m in body.models):
        raise ApiError.bad_request("models: give model names, none empty", param="models")
    who = actor(request)
    fields = msgspec.structs.asdict(body)

    async def run(tx: Tx) -> dict[str, Any]:
        out = _plan_json(await create_plan_in(tx, **fields))
        await sql.add_admin_audit(tx, who, "plan.create", body.name, None, out)
        return out

    return json_response(await (await db(request)).transaction(run), status=201)


class CodesCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    count: int
    amount: str  # the value of each code
    currency: str
    expires_ms: int | None = None  # not redeemable from then on


async def create_codes(request: web.Request) -> web.Response:
    """`tokenhub codes create`: single-use codes, shown in this response only (tokenhub keeps
    their SHA-256 and first 8 characters; the audit log keeps those prefixes)."""
    body = await read_json(request, CodesCreate)
    if not 1 <= body.count <= MAX_CODES:
        raise ApiError.bad_request(f"count must be from 1 to {MAX_CODES}", param="count")
    who = actor(request)

    async def run(tx: Tx) -> tuple[list[str], dict[str, Any]]:
        codes = await create_codes_in(
            tx, body.count, body.amount, body.currency, expires_ms=body.expires_ms
        )
        value = money(parse_amount(body.amount, body.currency), body.currency)
        audited = {"count": len(codes), "amount": value, "expires_ms": body.expires_ms,
                   "prefixes": [c[:8] for c in codes]}  # fmt: skip
        await sql.add_admin_audit(tx, who, "codes.create", f"{len(codes)} codes", None, audited)
        return codes, value

    codes, value = await (await db(request)).transaction(run)
    return json_response(
        {"object": "code_batch", "amount": value, "expires_ms": body.expires_ms, "codes": codes},
        status=201,
    )


async def list_codes(request: web.Request) -> web.Response:
    """Redemption codes, oldest first, cursor-paged: each by its SHA-256 (`id`) and first 8
    characters, never the code."""
    limit = page_limit(request)
    after = decode_cursor(request, (int, str))

    async def run(tx: Tx) -> dict[str, Any]:
        rows = await sql.codes_page_in(tx, (after[0], after[1]) if after else None, limit + 1)
        data = [
            {
                "object": "redemption_code",
                "id": sha,
                "prefix": prefix,
                "amount": money(amount, cur),
                "expires_ms": expires,
                "created_ms": created,
                "redeemed_by": by,
                "redeemed_ms": at,
                "transaction": txn,
            }
            for sha, prefix, amount, cur, expires, created, by, at, txn in rows
        ]
        return page(data, rows, limit, lambda r: [r[5], r[0]])

    return json_response(await (await db(request)).read(run))


# -- quarantine, settle, expire -----------------------------------------------------------------


async def list_quarantine(request: web.Request) -> web.Response:
    """`tokenhub billing quarantine list`."""
    found = await (await db(request)).read(Q.quarantined)
    data = [{"object": "quarantined_event", **q.__dict__} for q in found]
    return json_response({"object": "list", "data": data, "has_more": False, "next_cursor": None})


class EventIds(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    event_ids: list[str]
    memo: str = ""  # void: why (kept in the audit logs)


async def _quarantine_act(request: web.Request, action: str) -> web.Response:
    body = await read_json(request, EventIds)
    if not 1 <= len(body.event_ids) <= MAX_EVENT_IDS or not all(body.event_ids):
        raise ApiError.bad_request(
            f"event_ids: give 1 to {MAX_EVENT_IDS} event ids", param="event_ids"
        )
    if action == "release" and body.memo:
        raise ApiError.bad_request("memo goes with void", param="memo")
    ids = list(dict.fromkeys(body.event_ids))
    who = actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        before = [q.__dict__ for q in await Q.quarantined(tx, ids)]
        if action == "release":
            done = await Q.release(tx, ids)
        else:
            done = await Q.void(tx, ids, body.memo)
        after = {"event_ids": done, **({"memo": body.memo} if action == "void" else {})}
        await sql.add_admin_audit(
            tx, who, f"quarantine.{action}", f"{len(done)} events", before, after
        )
        return {"object": f"quarantine_{action}", "event_ids": done}

    return json_response(await (await db(request)).transaction(run))


async def release_quarantine(request: web.Request) -> web.Response:
    """`tokenhub billing quarantine release`: the next settlement pass settles them again."""
    return await _quarantine_act(request, "release")


async def void_quarantine(request: web.Request) -> web.Response:
    """`tokenhub billing quarantine void`: settled with no charge, never billed."""
    return await _quarantine_act(request, "void")


class SettleRun(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    retry_failed: bool = False
    batch: int = 1000


async def settle(request: web.Request) -> web.Response:
    """`tokenhub billing settle` (one pass): settles the unsettled usage events."""
    body = await _empty_or(request, SettleRun)
    if not 1 <= body.batch <= 100_000:
        raise ApiError.bad_request("batch must be from 1 to 100000", param="batch")
    who = actor(request)
    database = await db(request)
    s = await Q.settle_pending(Billing(database), batch=body.batch, retry_failed=body.retry_failed)
    out = {
        "object": "settle_run",
        "read": s.read,
        "settled": s.settled,
        "duplicates": s.duplicates,
        "conflicts": list(s.conflicts),
        "failed": s.failed,
        "quarantined": s.quarantined,
        "reasons": dict(s.reasons),
    }
    # The pass commits a batch at a time (as the CLI's): the audit entry follows it.
    await database.transaction(
        lambda tx: sql.add_admin_audit(tx, who, "billing.settle", "usage_events", None, out)
    )
    return json_response(out)


class ExpireRun(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    now_ms: int | None = None  # the time to expire at (default: now)


async def expire(request: web.Request) -> web.Response:
    """`tokenhub billing expire`: ends every lot whose window closed (breakage or rollover)."""
    body = await _empty_or(request, ExpireRun)
    who = actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        txns = await expire_in(tx, now=body.now_ms)
        out = {"object": "expire_run", "now_ms": body.now_ms, "transactions": txns}
        await sql.add_admin_audit(tx, who, "billing.expire", "lots", None, out)
        return out

    return json_response(await (await db(request)).transaction(run))


ROUTES: tuple[Route, ...] = (
    Route("GET", f"{V1}/tenants/{{id}}/statements/{{period}}", "read", get_statement),
    Route("POST", f"{V1}/tenants/{{id}}/statements/{{period}}/close", "billing", close_statement),
    Route("POST", f"{V1}/tenants/{{id}}/invoices", "billing", create_invoice),
    Route("POST", f"{V1}/tenants/{{id}}/payments", "billing", create_payment),
    Route("POST", f"{V1}/tenants/{{id}}/adjustments", "billing", create_adjustment),
    Route("GET", f"{V1}/tenants/{{id}}/wallet", "read", get_wallet),
    Route("GET", f"{V1}/tenants/{{id}}/profile", "read", get_billing_profile),
    Route("PATCH", f"{V1}/tenants/{{id}}/profile", "billing", patch_billing_profile),
    Route("POST", f"{V1}/usage/events/{{id}}/refund", "billing", create_refund),
    Route("GET", f"{V1}/providers/{{provider}}/settlements/{{period}}", "read", get_settlement),
    Route("PUT", f"{V1}/providers/{{provider}}/split", "admin", set_split),
    Route("GET", f"{V1}/billing/overruns", "read", list_overruns),
    Route("POST", f"{V1}/prices", "admin", set_price),
    Route("POST", f"{V1}/fx", "admin", set_fx),
    Route("POST", f"{V1}/plans", "admin", create_plan),
    Route("POST", f"{V1}/codes", "admin", create_codes),
    Route("GET", f"{V1}/codes", "read", list_codes),
    Route("GET", f"{V1}/billing/quarantine", "read", list_quarantine),
    Route("POST", f"{V1}/billing/quarantine/release", "billing", release_quarantine),
    Route("POST", f"{V1}/billing/quarantine/void", "billing", void_quarantine),
    Route("POST", f"{V1}/billing/settle", "billing", settle),
    Route("POST", f"{V1}/billing/expire", "billing", expire),
)
