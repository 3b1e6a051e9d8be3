"""The admin API's route table and its handlers for tenants, keys, limits, wallet moves, the
price book's reads, usage events and the audit logs: decode, call the service functions the CLI
calls (tokenhub.store.sql, tokenhub.billing) in one transaction with the audit entry, encode.
`ROUTES` also takes in those of admin/usage_routes.py (summary, exports, reconciliation,
ingest) and admin/billing_routes.py (statements, invoices, payments, refunds, profiles,
splits, the catalogue's writes, codes, quarantine, settle, expire) and admin/token_routes.py
(admin tokens).

A handler's scope is the least an admin token needs: read < billing < admin (None: no token).
Tenants are addressed by id in paths (`ten_...`) and by name in filters and bodies, as usage
events and the CLI name them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
from aiohttp import web

from tokenhub.admin import billing_routes, token_routes, usage_routes
from tokenhub.admin.web import (
    ACTOR,
    DB,
    Idempotency,
    Route,
    decode_cursor,
    json_response,
    money,
    page,
    page_limit,
    read_json,
)
from tokenhub.admin.web import actor as _actor
from tokenhub.admin.web import csv_lines as _csv_lines
from tokenhub.admin.web import db as _db
from tokenhub.admin.web import money_moving as _money_moving
from tokenhub.admin.web import time_param as _time_param
from tokenhub.billing import ledger as L
from tokenhub.billing import terms
from tokenhub.billing.check import ledger_check
from tokenhub.billing.service import Billing, Lot, assign_in, get_profile, redeem_in, topup_in
from tokenhub.db.database import Tx
from tokenhub.gateway.errors import ApiError
from tokenhub.money import decimal_str, parse_amount
from tokenhub.store import sql
from tokenhub.store.base import KEY_LIMIT_FIELDS, LIMIT_FIELDS, ApiKey, Limits, Tenant
from tokenhub.usage import EVENT_FIELDS, event_csv_row, event_jsonl

log = logging.getLogger("tokenhub.admin")

# -- bodies and records -------------------------------------------------------------------------


class TenantCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str


class KeyCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: str  # the tenant's name
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


class LimitsChange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A limit given a whole number is set, given null is removed; one left out stays."""

    rpm: int | msgspec.UnsetType | None = msgspec.UNSET
    tpm: int | msgspec.UnsetType | None = msgspec.UNSET
    max_concurrency: int | msgspec.UnsetType | None = msgspec.UNSET
    tokens_per_day: int | msgspec.UnsetType | None = msgspec.UNSET
    guard_tpm: int | msgspec.UnsetType | None = msgspec.UNSET
    guard_jump: int | msgspec.UnsetType | None = msgspec.UNSET
    strong_share_pct: int | msgspec.UnsetType | None = msgspec.UNSET

    def changes(self) -> dict[str, int | None]:
        out = {f: v for f in LIMIT_FIELDS if (v := getattr(self, f)) is not msgspec.UNSET}
        if not out:
            raise ApiError.bad_request(f"give at least one of {', '.join(LIMIT_FIELDS)}")
        return out


class TopUp(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount: str  # exact decimal in the currency's major unit: "12.34"
    currency: str


def _limits_json(limits: Limits, fields: tuple[str, ...]) -> dict[str, int | None]:
    return {f: getattr(limits, f) for f in fields}


def _tenant_json(t: Tenant, active_keys: int, limits: Limits) -> dict[str, Any]:
    return {
        "id": t.id,
        "object": "tenant",
        "name": t.name,
        "created_ms": t.created_ms,
        "active_keys": active_keys,
        "limits": _limits_json(limits, LIMIT_FIELDS),
    }


def _key_json(k: ApiKey, limits: Limits) -> dict[str, Any]:
    return {
        "id": k.id,
        "object": "api_key",
        "tenant": k.tenant,
        "tenant_id": k.tenant_id,
        "prefix": k.prefix,
        "created_ms": k.created_ms,
        "revoked_ms": k.revoked_ms,
        "limits": _limits_json(limits, KEY_LIMIT_FIELDS),
    }


async def _wallet(tx: Tx, tenant: str, currency: str) -> dict[str, str]:
    acc = L.wallet(tenant, currency)
    bals = await L.balances(tx, tenant=tenant, prefix=acc)
    return money(-bals.get(acc, 0), currency)  # the ledger is debit-positive


# -- tenants ------------------------------------------------------------------------------------


async def list_tenants(request: web.Request) -> web.Response:
    limit = page_limit(request)
    after = decode_cursor(request, (str,))

    async def run(tx: Tx) -> dict[str, Any]:
        rows = await sql.tenants_page_in(tx, after[0] if after else None, limit + 1)
        active = await sql.active_key_counts_in(tx, [t.id for t in rows])
        limits = {r.name: r.limits for r in await sql.all_limits_in(tx) if r.scope == "tenant"}
        data = [_tenant_json(t, active.get(t.id, 0), limits.get(t.name, Limits())) for t in rows]
        return page(data, rows, limit, lambda t: [t.name])

    return json_response(await (await _db(request)).read(run))


async def create_tenant(request: web.Request) -> web.Response:
    body = await read_json(request, TenantCreate)
    actor = _actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        tenant = await sql.create_tenant_in(tx, body.name)
        out = _tenant_json(tenant, 0, Limits())
        await sql.add_admin_audit(tx, actor, "tenant.create", tenant.id, None, out)
        return out

    return json_response(await (await _db(request)).transaction(run), status=201)


async def get_tenant(request: web.Request) -> web.Response:
    tenant_id = request.match_info["id"]

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        active = await sql.active_key_counts_in(tx, [t.id])
        out = _tenant_json(t, active.get(t.id, 0), await sql.limits_in(tx, "tenant", t.name))
        prof = await get_profile(tx, t.name)
        out["billing"] = {
            "currency": prof.currency,
            "draw_order": list(prof.draw_order),
            "credit_limit": money(prof.credit_limit, prof.currency),
            "low_balance": None
            if prof.low_balance is None
            else money(prof.low_balance, prof.currency),
            "wallet": await _wallet(tx, t.name, prof.currency),
        }
        return out

    return json_response(await (await _db(request)).read(run))


async def create_topup(request: web.Request) -> web.Response:
    body = await read_json(request, TopUp)

    async def move(tx: Tx, t: Tenant, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        txn = await topup_in(tx, t.name, body.amount, body.currency, ref=f"idem:{key}")
        amount = money(parse_amount(body.amount, body.currency), body.currency)
        return {"object": "topup", "transaction": txn, "amount": amount}, {"txn": txn}

    return await _wallet_move(request, body, "wallet.topup", move, currency=body.currency)


async def _wallet_move(
    request: web.Request,
    body: msgspec.Struct,
    action: str,
    move: Callable[[Tx, Tenant, str], Awaitable[tuple[dict[str, Any], dict[str, Any]]]],
    *,
    currency: str | None = None,
) -> web.Response:
    """A money-moving POST on the tenant of the URL, under its Idempotency-Key, in one
    transaction: a replay answers as the first time did; else `move` (returning the response's
    own fields and what the audit row adds after the move), with the tenant's wallet (in
    `currency`, default the tenant's) before and after it in the audit row and the answer,
    recorded as the key's 201."""
    tenant_id = request.match_info["id"]
    actor = _actor(request)
    idem = Idempotency(request, actor, body)

    async def run(tx: Tx) -> web.Response:
        replayed = await idem.replay(tx)
        if replayed is not None:
            return replayed
        t = await sql.tenant_by_id_in(tx, tenant_id)
        cur = currency or (await get_profile(tx, t.name)).currency
        before = await _wallet(tx, t.name, cur)
        fields, audited = await move(tx, t, idem.key)
        after = await _wallet(tx, t.name, cur)
        out = {**fields, "tenant_id": t.id, "tenant": t.name, "wallet": after}
        await sql.add_admin_audit(
            tx, actor, action, t.id, {"wallet": before}, {"wallet": after, **audited}
        )
        return await idem.record(tx, 201, out)

    return await _money_moving(request, idem, run)


class PlanAssign(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    plan: str
    start_ms: int | None = None  # default: now


class Redeem(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    code: str


def _lot_json(lot: Lot) -> dict[str, Any]:
    return {
        "object": "lot",
        "id": lot.id,
        "plan": lot.plan,
        "kind": lot.kind,
        "quantity": lot.quantity if lot.kind == "package" else decimal_str(lot.quantity),
        "price": money(lot.price, lot.currency),
        "start_ms": lot.start_ms,
        "end_ms": lot.end_ms,
        "status": lot.status,
    }


async def assign_plan(request: web.Request) -> web.Response:
    body = await read_json(request, PlanAssign)

    async def move(tx: Tx, t: Tenant, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        lot = _lot_json(await assign_in(tx, t.name, body.plan, start_ms=body.start_ms))
        return {"object": "plan_assignment", "lot": lot}, {"lot": lot}

    return await _wallet_move(request, body, "plan.assign", move)


async def redeem_code(request: web.Request) -> web.Response:
    body = await read_json(request, Redeem)

    async def move(tx: Tx, t: Tenant, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        txn = await redeem_in(tx, t.name, body.code)
        # The code is a bearer secret: the log keeps the transaction, not the code.
        return {"object": "redemption", "transaction": txn}, {"txn": txn}

    return await _wallet_move(request, body, "code.redeem", move)


# -- keys ---------------------------------------------------------------------------------------


async def list_keys(request: web.Request) -> web.Response:
    limit = page_limit(request)
    after = decode_cursor(request, (str,))
    tenant = request.query.get("tenant")

    async def run(tx: Tx) -> dict[str, Any]:
        rows = await sql.keys_page_in(tx, tenant, after[0] if after else None, limit + 1)
        limits = {r.name: r.limits for r in await sql.all_limits_in(tx) if r.scope == "key"}
        data = [_key_json(k, limits.get(k.id, Limits())) for k in rows]
        return page(data, rows, limit, lambda k: [k.id])

    return json_response(await (await _db(request)).read(run))


async def create_key(request: web.Request) -> web.Response:
    body = await read_json(request, KeyCreate)
    actor = _actor(request)
    changes = {f: v for f in KEY_LIMIT_FIELDS if (v := getattr(body, f)) is not None}
    secret = sql.new_key_secret()

    async def run(tx: Tx) -> dict[str, Any]:
        key = await sql.create_key_in(tx, body.tenant, secret)
        limits = await sql.set_limits_in(tx, "key", key.id, **changes) if changes else Limits()
        out = _key_json(key, limits)
        await sql.add_admin_audit(tx, actor, "key.create", key.id, None, out)
        return out

    out = await (await _db(request)).transaction(run)
    # The secret is in this response only: tokenhub keeps its SHA-256, and the audit log and
    # every listing leave it out.
    return json_response({**out, "secret": secret}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    key_id = request.match_info["id"]
    actor = _actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        limits = await sql.limits_in(tx, "key", key_id)
        before = _key_json(await sql.key_in(tx, key_id), limits)
        after = _key_json(await sql.revoke_key_in(tx, key_id), limits)
        await sql.add_admin_audit(tx, actor, "key.revoke", key_id, before, after)
        return after

    return json_response(await (await _db(request)).transaction(run))


async def set_tenant_limits(request: web.Request) -> web.Response:
    changes = (await read_json(request, LimitsChange)).changes()
    tenant_id = request.match_info["id"]
    actor = _actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        t = await sql.tenant_by_id_in(tx, tenant_id)
        before = _limits_json(await sql.limits_in(tx, "tenant", t.name), LIMIT_FIELDS)
        limits = await sql.set_limits_in(tx, "tenant", t.name, **changes)
        after = _limits_json(limits, LIMIT_FIELDS)
        await sql.add_admin_audit(tx, actor, "tenant.limits", t.id, before, after)
        return {"object": "limits", "tenant_id": t.id, "tenant": t.name, "limits": after}

    return json_response(await (await _db(request)).transaction(run))


async def set_key_limits(request: web.Request) -> web.Response:
    changes = (await read_json(request, LimitsChange)).changes()
    key_id = request.match_info["id"]
    actor = _actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        key = await sql.key_in(tx, key_id)  # 404 before a refused field (a key has 3 limits)
        before = _limits_json(await sql.limits_in(tx, "key", key.id), KEY_LIMIT_FIELDS)
        limits = await sql.set_limits_in(tx, "key", key.id, **changes)
        after = _limits_json(limits, KEY_LIMIT_FIELDS)
        await sql.add_admin_audit(tx, actor, "key.limits", key.id, before, after)
        return {"object": "limits", "key_id": key.id, "limits": after}

    return json_response(await (await _db(request)).transaction(run))


# -- price book, FX, plans (read) -------------------------------------------------------------


def _per_1m(nanos: int | None, currency: str) -> dict[str, str] | None:
    return None if nanos is None else money(nanos, currency)


async def list_prices(request: web.Request) -> web.Response:
    prices = await Billing(await _db(request)).prices()
    data = [
        {
            "object": "price",
            "model": p.model,
            "tenant": p.tenant or None,
            "version": p.version,
            "effective_ms": p.effective_ms,
            "input_per_1m": money(p.input_per_1m, p.currency),
            "cached_input_per_1m": money(p.cached_input_per_1m, p.currency),
            "output_per_1m": money(p.output_per_1m, p.currency),
            "cache_write_per_1m": money(p.write_per_1m, p.currency),
            "cache_write_set": p.cache_write_per_1m is not None,
            "points_per_1m": None if p.points_per_1m is None else decimal_str(p.points_per_1m),
        }
        for p in prices
    ]
    return json_response({"object": "list", "data": data, "has_more": False, "next_cursor": None})


async def list_fx(request: web.Request) -> web.Response:
    rows = await (await _db(request)).read(terms.fx_list)
    data = [
        {"object": "fx_rate", "base": b, "quote": q, "effective_ms": e, "rate": str(r)}
        for b, q, e, r in rows
    ]
    return json_response({"object": "list", "data": data, "has_more": False, "next_cursor": None})


async def list_plans(request: web.Request) -> web.Response:
    plans = await Billing(await _db(request)).plans()
    data = [
        {
            "object": "plan",
            "name": p.name,
            "kind": p.kind,
            "price": money(p.price, p.currency),
            "quantity": p.quantity if p.kind == "package" else decimal_str(p.quantity),
            "unit": "tokens" if p.kind == "package" else "points",
            "period": p.period,
            "exhaustion": p.exhaustion,
            "overage_per_1m": _per_1m(p.overage_per_1m, p.overage_currency),
            "auto_topup": p.auto_topup,
            "rollover": p.rollover,
            "models": list(p.models),
        }
        for p in plans
    ]
    return json_response({"object": "list", "data": data, "has_more": False, "next_cursor": None})


# -- usage, billing, audit, health -------------------------------------------------------------


async def list_usage_events(request: web.Request) -> web.Response:
    limit = page_limit(request)
    after = decode_cursor(request, (int, str))
    since, until = _time_param(request, "since"), _time_param(request, "until")
    if since is not None and until is not None and until <= since:
        raise ApiError.bad_request("until must be later than since", param="until")
    tenant = request.query.get("tenant")

    async def run(tx: Tx) -> dict[str, Any]:
        rows = await sql.usage_page_in(
            tx,
            tenant=tenant,
            since_ms=since,
            until_ms=until,
            after=(after[0], after[1]) if after else None,
            limit=limit + 1,
        )
        data = [msgspec.structs.asdict(e) for e in rows]
        return page(data, rows, limit, lambda e: [e.ts_ms, e.request_id])

    return json_response(await (await _db(request)).read(run))


EXPORT_PAGE = 1000  # events per read transaction: an export of any size holds no long snapshot


async def export_usage_events(request: web.Request) -> web.StreamResponse:
    """The events `tokenhub events export` writes for the same range (since inclusive, until
    exclusive), in the same order and bytes, streamed a page at a time; `tenant` narrows it."""
    fmt_ = request.query.get("format", "")
    if fmt_ not in ("jsonl", "csv"):
        raise ApiError.bad_request("format must be jsonl or csv", param="format")
    since, until = _time_param(request, "since"), _time_param(request, "until")
    if since is not None and until is not None and until <= since:
        raise ApiError.bad_request("until must be later than since", param="until")
    tenant = request.query.get("tenant")
    db = await _db(request)
    page_of = partial(sql.usage_page_in, tenant=tenant, since_ms=since, until_ms=until)
    first = await db.read(partial(page_of, after=None, limit=EXPORT_PAGE))
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt_ == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="usage-events.{fmt_}"',
        }
    )
    await resp.prepare(request)
    rows = first
    try:
        if fmt_ == "csv":
            await resp.write(_csv_lines([list(EVENT_FIELDS)]))
        while rows:
            if fmt_ == "csv":
                await resp.write(_csv_lines([event_csv_row(e) for e in rows]))
            else:
                await resp.write(b"".join(event_jsonl(e) for e in rows))
            if len(rows) < EXPORT_PAGE:
                break
            last = (rows[-1].ts_ms, rows[-1].request_id)
            rows = await db.read(partial(page_of, after=last, limit=EXPORT_PAGE))
    except Exception:
        # The status line is sent: cut the connection, so that the reader sees a chunked body
        # that never ended, never an export that looks complete.
        log.exception("admin API: usage export failed midway")
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp


async def billing_check(request: web.Request) -> web.Response:
    result = await (await _db(request)).read(ledger_check)
    return json_response(
        {
            "object": "billing_check",
            "ok": not result.problems,
            "problems": result.problems,
            "transactions": result.transactions,
            "postings": result.postings,
        }
    )


async def list_audit(request: web.Request) -> web.Response:
    limit = page_limit(request)
    after = decode_cursor(request, (int, str))

    async def run(tx: Tx) -> dict[str, Any]:
        rows = await sql.admin_audit_page(tx, (after[0], after[1]) if after else None, limit + 1)
        data = [{"object": "audit_entry", **msgspec.structs.asdict(e)} for e in rows]
        return page(data, rows, limit, lambda e: [e.ts_ms, e.id])

    return json_response(await (await _db(request)).read(run))


async def list_guard_audit(request: web.Request) -> web.Response:
    limit = page_limit(request)
    after = decode_cursor(request, (int, str))

    async def run(tx: Tx) -> dict[str, Any]:
        rows = await sql.guard_audit_page(tx, (after[0], after[1]) if after else None, limit + 1)
        data = [{"object": "guard_audit_entry", **e._asdict()} for e in rows]
        return page(data, rows, limit, lambda e: [e.ts_ms, e.id])

    return json_response(await (await _db(request)).read(run))


async def health(request: web.Request) -> web.Response:
    async def ping(tx: Tx) -> Any:
        return await tx.fetchval("SELECT 1")

    try:
        await (await _db(request)).read(ping)
    except Exception:  # no token here: the reason goes to the log, not to the caller
        log.exception("admin API: health check: the database is unavailable")
        return json_response({"status": "unavailable", "database": "unavailable"}, status=503)
    return json_response({"status": "ok", "database": "ok"})


V1 = "/admin/v1"

ROUTES: tuple[Route, ...] = (
    Route("GET", f"{V1}/health", None, health),
    Route("GET", f"{V1}/tenants", "read", list_tenants),
    Route("POST", f"{V1}/tenants", "admin", create_tenant),
    Route("GET", f"{V1}/tenants/{{id}}", "read", get_tenant),
    Route("POST", f"{V1}/tenants/{{id}}/topups", "billing", create_topup),
    Route("POST", f"{V1}/tenants/{{id}}/plans", "billing", assign_plan),
    Route("POST", f"{V1}/tenants/{{id}}/redemptions", "billing", redeem_code),
    Route("GET", f"{V1}/keys", "read", list_keys),
    Route("POST", f"{V1}/keys", "admin", create_key),
    Route("POST", f"{V1}/keys/{{id}}/revoke", "admin", revoke_key),
    Route("PATCH", f"{V1}/tenants/{{id}}/limits", "admin", set_tenant_limits),
    Route("PATCH", f"{V1}/keys/{{id}}/limits", "admin", set_key_limits),
    Route("GET", f"{V1}/prices", "read", list_prices),
    Route("GET", f"{V1}/fx", "read", list_fx),
    Route("GET", f"{V1}/plans", "read", list_plans),
    Route("GET", f"{V1}/usage/events", "read", list_usage_events),
    Route("GET", f"{V1}/usage/events/export", "read", export_usage_events),
    Route("GET", f"{V1}/billing/check", "read", billing_check),
    Route("GET", f"{V1}/audit", "read", list_audit),
    Route("GET", f"{V1}/audit/guard", "read", list_guard_audit),
    *usage_routes.ROUTES,
    *billing_routes.ROUTES,
    *token_routes.ROUTES,
)

__all__ = ["ACTOR", "DB", "ROUTES", "Route"]
