"""The tenant API: what a tenant may read and change with its own API key, on the gateway's
listener (the OpenAI-compatible one), through the service functions the CLI and the admin API
use (tokenhub.store.sql's `*_in`, tokenhub.billing).

- `GET /v1/tokenhub/balance`: wallet, credit headroom, spendable, packages left with expiry,
  points.
- `GET /v1/tokenhub/usage?since=&until=&group_by=day|model|key`: the tenant's own settled
  usage and its cost, from the rollups (tokenhub.billing.rollups).
- `GET|POST /v1/tokenhub/keys`, `POST /v1/tokenhub/keys/{id}/revoke`: its own keys.
- `POST /v1/tokenhub/redeem`: a redemption code, under an Idempotency-Key (the admin API's).
- `GET|PUT|DELETE /v1/tokenhub/alerts`: its low-balance threshold and webhook
  (tokenhub.billing.alerts; the signing secret is in the answer that made it, only).
- `GET /v1/tokenhub/statements/{period}`: its statement of a month (YYYY-MM).
- `GET /v1/tokenhub/limits`: its key's and its own configured rate limits, with the live
  headroom from this gateway's quota table where one is enforced.
- `GET /v1/dashboard/billing/subscription` and `/usage`: OpenAI's legacy billing endpoints.

The caller is authenticated exactly as `/v1/chat/completions` is (the gateway's in-memory key
table, `auth.KeyCache`: 401 invalid_api_key otherwise) and sees only its own tenant: another
tenant's key id is 404, as one that does not exist. Errors are OpenAI-shaped (the gateway's
middleware renders `ApiError`; this module maps the store's and billing's errors to it).

None of this is on the completions' request path: the routes only add entries to the URL map,
and the database is opened on the first tenant-API request (one pool per process), so a gateway
whose tenant API is never called holds no extra connection.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from functools import partial, wraps
from typing import Any

import msgspec
from aiohttp import web

from tokenhub.admin.web import DatabaseOpener, Idempotency, json_response, money, read_json
from tokenhub.billing import alerts, rollups, terms
from tokenhub.billing import ledger as L
from tokenhub.billing.ledger import LedgerError
from tokenhub.billing.service import get_profile, redeem_in
from tokenhub.billing.statements import tenant_statement
from tokenhub.billing.tenant_service import (
    KEY_LIMITS,
    TENANT_LIMITS,
    KeyLimitReached,
    balance_in,
    create_key_in,
    key_json,
    money_of,
    revoke_own_key_in,
)
from tokenhub.db.database import Database, DatabaseError, Tx
from tokenhub.gateway.auth import Principal
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.state import GATEWAY
from tokenhub.money import MoneyError
from tokenhub.store import sql
from tokenhub.store.base import ApiKey, NotFound, StoreError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TENANT_DB = web.AppKey("tenant_db", DatabaseOpener)

USAGE_DEFAULT_DAYS = 31
USAGE_MAX_DAYS = 92
DAY_MS = 86_400_000
GROUPS = ("day", "model", "key")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _handler(fn: Callable[[web.Request, Principal], Awaitable[web.Response]]) -> Handler:
    """Authenticates the caller by its API key, then maps the store's and billing's errors to
    the OpenAI error body (the gateway's middleware renders ApiError)."""

    @wraps(fn)
    async def run(request: web.Request) -> web.Response:
        who = request.app[GATEWAY].keys.authenticate(request.headers.get("Authorization"))
        try:
            return await fn(request, who)
        except NotFound as e:
            raise ApiError(404, _one_line(str(e)), code="not_found") from None
        except (StoreError, MoneyError, LedgerError, alerts.AlertError) as e:
            raise ApiError.bad_request(_one_line(str(e))) from None
        except DatabaseError:
            raise ApiError(
                503, "The database is unavailable.", type="server_error", code="database_error"
            ) from None

    return run


async def _db(request: web.Request) -> Database:
    return await request.app[TENANT_DB]()


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- balance ------------------------------------------------------------------------------------


async def balance(request: web.Request, who: Principal) -> web.Response:
    """Wallet, credit headroom and overrun in the tenant's currency; token packages and point
    packs left, with their expiry (active lots, soonest to expire first)."""
    return json_response(await (await _db(request)).read(partial(balance_in, tenant=who.tenant)))


# -- usage --------------------------------------------------------------------------------------


def _time_param(request: web.Request, name: str) -> int | None:
    """Unix milliseconds, or an ISO 8601 date or datetime (UTC unless it has an offset)."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw.isascii() and raw.isdigit() and len(raw) <= 15:
        return int(raw)
    try:
        t = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError.bad_request(
            f"{name}: give Unix milliseconds or an ISO 8601 date or datetime", param=name
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


_GROUP_DIM = {"day": "model", "model": "model", "key": "key"}


async def usage(request: web.Request, who: Principal) -> web.Response:
    """The tenant's settled usage in [since, until), grouped by UTC day, model or key:
    requests, the successful ones (HTTP 2xx), tokens in / cached in / out, and what they cost
    (`cost`: one amount per currency charged, usually the tenant's one; packages' tokens at
    their price as earned).

    Read from the usage rollups (tokenhub.billing.rollups.usage_summary: whole UTC days from
    the daily rows, the hours at either end from the hourly ones), never from the raw events:
    a request counts once settled (within the settle interval). Rollups are hourly, so since
    counts from the start of its hour. The window defaults to the last 31 days and may span at
    most 92. `truncated` is always false (kept for the shape: nothing is cut any more)."""
    group_by = request.query.get("group_by", "day")
    if group_by not in GROUPS:
        raise ApiError.bad_request(f"group_by must be one of {', '.join(GROUPS)}", param="group_by")
    until = _time_param(request, "until")
    until = _now_ms() if until is None else until
    since = _time_param(request, "since")
    since = until - USAGE_DEFAULT_DAYS * DAY_MS if since is None else since
    if until <= since:
        raise ApiError.bad_request("until must be later than since", param="until")
    if until - since > USAGE_MAX_DAYS * DAY_MS:
        raise ApiError.bad_request(
            f"the window may span at most {USAGE_MAX_DAYS} days", param="since"
        )

    async def run(tx: Tx) -> list[rollups.SummaryRow]:
        return await rollups.usage_summary(
            tx, since=since, until=until, group_by=("day", _GROUP_DIM[group_by]), tenant=who.tenant
        )

    rows = await (await _db(request)).read(run)
    groups: dict[Any, rollups.SummaryRow] = {}
    for r in rows:
        g: Any = r.bucket_ms if group_by == "day" else r.group
        acc = groups.setdefault(g, rollups.SummaryRow(r.bucket_ms, r.group))
        acc.requests += r.requests
        acc.ok += r.ok
        acc.input_tokens += r.input_tokens
        acc.cached_tokens += r.cached_tokens
        acc.output_tokens += r.output_tokens
        for cur, v in r.cost.items():
            acc.cost[cur] = acc.cost.get(cur, 0) + v
    data = []
    for g, acc in sorted(groups.items()):
        key: dict[str, Any]
        if group_by == "day":
            key = {"day": dt.datetime.fromtimestamp(g / 1000, dt.UTC).date().isoformat()}
        else:
            key = {"model": g} if group_by == "model" else {"key_id": g}
        data.append(
            key
            | {
                "requests": acc.requests,
                "ok": acc.ok,
                "input_tokens": acc.input_tokens,
                "cached_input_tokens": acc.cached_tokens,
                "output_tokens": acc.output_tokens,
                "cost": [money(v, c) for c, v in sorted(acc.cost.items()) if v],
            }
        )
    return json_response(
        {
            "object": "list",
            "group_by": group_by,
            "since_ms": since,
            "until_ms": until,
            "truncated": False,
            "data": data,
        }
    )


# -- keys ---------------------------------------------------------------------------------------


async def list_keys(request: web.Request, who: Principal) -> web.Response:
    async def run(tx: Tx) -> list[ApiKey]:
        return await sql.keys_in(tx, who.tenant)

    keys = await (await _db(request)).read(run)
    return json_response({"object": "list", "data": [key_json(k) for k in keys]})


async def create_key(request: web.Request, who: Principal) -> web.Response:
    """A new key for the caller's tenant, within the operator's policy (at most
    MAX_KEYS_PER_TENANT active keys: 403 key_limit_reached); the secret is in this response
    only."""
    if await request.read():
        raise ApiError.bad_request("this request takes no body")
    secret = sql.new_key_secret()

    async def run(tx: Tx) -> dict[str, Any]:
        return key_json(await create_key_in(tx, who.tenant, secret, f"tenant:{who.tenant}"))

    try:
        out = await (await _db(request)).transaction(run)
    except KeyLimitReached as e:
        raise ApiError(403, str(e), type="permission_error", code="key_limit_reached") from None
    return json_response({**out, "secret": secret}, status=201)


async def revoke_key(request: web.Request, who: Principal) -> web.Response:
    """Revokes one of the caller's tenant's keys (the calling key too, if asked); another
    tenant's key is 404, exactly as a key that does not exist."""
    key_id = request.match_info["id"]

    async def run(tx: Tx) -> dict[str, Any]:
        key = await revoke_own_key_in(tx, who.tenant, key_id, f"tenant:{who.tenant}")
        return key_json(key)

    return json_response(await (await _db(request)).transaction(run))


# -- redeem -------------------------------------------------------------------------------------


class Redeem(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    code: str


async def redeem(request: web.Request, who: Principal) -> web.Response:
    """Redeems a code for the caller's tenant. Money-moving: an Idempotency-Key is required
    (the admin API's helper, keyed per tenant): a replay returns the first response, another
    body under the same key is 409."""
    body = await read_json(request, Redeem)
    actor = f"tenant:{who.tenant}"
    idem = Idempotency(request, actor, body)

    async def run(tx: Tx) -> web.Response:
        replayed = await idem.replay(tx)
        if replayed is not None:
            return replayed
        prof = await get_profile(tx, who.tenant)
        txn = await redeem_in(tx, who.tenant, body.code)
        _, m, _ = await money_of(tx, who.tenant)
        out = {"object": "redemption", "transaction": txn, "wallet": money(m.wallet, prof.currency)}
        await sql.add_admin_audit(tx, actor, "code.redeem", who.tenant, None, {"txn": txn})
        return await idem.record(tx, 201, out)

    db = await _db(request)
    try:
        return await db.transaction(run)
    except ApiError:
        raise
    except Exception:
        replayed = await db.read(idem.replay)  # a concurrent twin committed first
        if replayed is None:
            raise
        return replayed


# -- low-balance alert --------------------------------------------------------------------------


class _Amount(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount: str
    currency: str


class AlertBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    threshold: _Amount
    webhook_url: str
    rotate_secret: bool = False


def _alert_json(a: alerts.Alert, spendable: int) -> dict[str, Any]:
    return {
        "object": "tokenhub.alert",
        "threshold": money(a.threshold, a.currency),
        "webhook_url": a.webhook_url,
        "armed": a.armed,
        "fired_ms": a.fired_ms,
        "updated_ms": a.updated_ms,
        "spendable": money(spendable, a.currency),
    }


async def get_alert(request: web.Request, who: Principal) -> web.Response:
    """The tenant's low-balance alert (never its secret); 404 when none is set."""

    async def run(tx: Tx) -> dict[str, Any]:
        a = await alerts.get_alert(tx, who.tenant)
        if a is None:
            raise NotFound("no low-balance alert is set (PUT one)")
        return _alert_json(a, await alerts.spendable_in(tx, who.tenant, a.currency))

    return json_response(await (await _db(request)).read(run))


async def put_alert(request: web.Request, who: Principal) -> web.Response:
    """Sets (or replaces) the alert and arms it. The first one, or one with rotate_secret,
    answers with `secret` (HMAC-SHA256 key of X-Tokenhub-Signature): shown here only."""
    body = await read_json(request, AlertBody)
    actor = f"tenant:{who.tenant}"

    async def run(tx: Tx) -> dict[str, Any]:
        before = await alerts.get_alert(tx, who.tenant)
        a, secret = await alerts.set_alert(
            tx,
            who.tenant,
            body.threshold.amount,
            body.threshold.currency,
            body.webhook_url,
            rotate_secret=body.rotate_secret,
        )
        out = _alert_json(a, await alerts.spendable_in(tx, who.tenant, a.currency))
        audit_before = None if before is None else {"threshold": before.threshold}
        await sql.add_admin_audit(
            tx, actor, "alert.set", who.tenant, audit_before, {"threshold": a.threshold}
        )
        return out if secret is None else out | {"secret": secret}

    return json_response(await (await _db(request)).transaction(run))


async def delete_alert(request: web.Request, who: Principal) -> web.Response:
    """Removes the alert (what it queued and has not delivered is dropped); 404 if none."""
    actor = f"tenant:{who.tenant}"

    async def run(tx: Tx) -> dict[str, Any]:
        if not await alerts.delete_alert(tx, who.tenant):
            raise NotFound("no low-balance alert is set")
        await sql.add_admin_audit(tx, actor, "alert.delete", who.tenant, None, None)
        return {"object": "tokenhub.alert", "deleted": True}

    return json_response(await (await _db(request)).transaction(run))


# -- statements ---------------------------------------------------------------------------------


async def statement(request: web.Request, who: Principal) -> web.Response:
    """The tenant's own statement of a month (YYYY-MM; as stored once the period is closed):
    opening and closing balances, purchases, usage by model, overage, breakage, what was not
    billed. Amounts are integers in their unit's smallest step (nanos for money), each balance
    with its text. 400 on a malformed period."""
    period = request.match_info["period"]

    async def run(tx: Tx) -> dict[str, Any]:
        return await tenant_statement(tx, who.tenant, period)

    st = await (await _db(request)).read(run)
    return json_response({"object": "tokenhub.statement"} | st)


# -- rate limits --------------------------------------------------------------------------------


def _configured(lim: Any, fields: tuple[str, ...]) -> dict[str, int | None]:
    return {f: getattr(lim, f) for f in fields}


def _live(request: web.Request, account: str) -> dict[str, Any] | None:
    """The account's headroom in this gateway's quota table (None when it enforces no limit
    on it): what is left this minute, in flight, today's tokens. In cluster mode the table
    holds this host's share of each limit."""
    limits = request.app[GATEWAY].limits
    if limits is None or account not in limits.limited:
        return None  # never touch the table for an unlimited account (it would create it)
    st = limits.quota.state(account)
    return {
        "requests_per_minute": {
            "limit": st.rpm.limit, "remaining": st.rpm.remaining, "reset_ms": st.rpm.reset_ms,
        },
        "tokens_per_minute": {
            "limit": st.tpm.limit, "remaining": st.tpm.remaining, "reset_ms": st.tpm.reset_ms,
        },
        "concurrent": {"limit": st.concurrent_limit, "in_flight": st.inflight},
        "tokens_today": {
            "limit": st.tokens.limit,
            "used": st.tokens.used,
            "held": st.tokens.held,
            "remaining": None
            if st.tokens.limit is None
            else max(0, st.tokens.limit - st.tokens.used - st.tokens.held),
        },
    }  # fmt: skip


async def limits(request: web.Request, who: Principal) -> web.Response:
    """The calling key's and its tenant's configured limits (null: none), each with its live
    headroom on this gateway (`live`, null where no limit is enforced)."""

    async def run(tx: Tx) -> tuple[Any, Any]:
        return (
            await sql.limits_in(tx, "key", who.key_id),
            await sql.limits_in(tx, "tenant", who.tenant),
        )

    key_lim, tenant_lim = await (await _db(request)).read(run)
    return json_response(
        {
            "object": "tokenhub.limits",
            "key": {
                "id": who.key_id,
                "limits": _configured(key_lim, KEY_LIMITS),
                "live": _live(request, f"key:{who.key_id}"),
            },
            "tenant": {
                "name": who.tenant,
                "limits": _configured(tenant_lim, TENANT_LIMITS),
                "live": _live(request, f"tenant:{who.tenant}"),
            },
        }
    )


# -- OpenAI's legacy billing endpoints -----------------------------------------------------------
#
# Shapes as OpenAI served them and as the client apps that still read them expect, followed
# from one-api's controller/billing.go (songquanpeng/one-api; New API's is the same):
#   subscription: {"object": "billing_subscription", "has_payment_method": true,
#                  "soft_limit_usd", "hard_limit_usd", "system_hard_limit_usd", "access_until"}
#   usage:        {"object": "list", "total_usage": <US cents>}
# Clients (ChatGPT-Next-Web, one-api's own channel balance check) show the balance as
# hard_limit_usd - total_usage / 100, so as one-api does, hard_limit_usd is the whole line
# (what can still be spent + all usage so far) and total_usage is the usage in the window.


_MONEY_ACCOUNTS_SQL = (
    "SELECT COALESCE(SUM(p.amount), 0) FROM postings p JOIN ledger_txns t ON t.id = p.txn_id "
    "WHERE t.tenant = $1 AND t.kind IN ('usage', 'refund') AND p.account IN ($2, $3, $4) "
    "AND t.ts_ms >= $5 AND t.ts_ms < $6"
)


async def _spent(tx: Tx, tenant: str, cur: str, since: int, until: int) -> int:
    """Money (tenant's currency, nanos) usage drew from the wallet, the credit line and the
    overrun in [since, until), less refunds."""
    accounts = (L.wallet(tenant, cur), L.receivable(tenant, cur), L.overrun(tenant, cur))
    return int(await tx.fetchval(_MONEY_ACCOUNTS_SQL, tenant, *accounts, since, until))


async def _to_usd(tx: Tx, cur: str) -> Decimal:
    """The rate converting the tenant's currency to USD now (the billing terms' FX); 503
    fx_rate_missing when the operator set none (no guess, no number in another currency)."""
    if cur == "USD":
        return Decimal(1)
    found = terms.fx_in(await terms.fx_rates(tx), cur, "USD", _now_ms())
    if found is None:
        raise ApiError(
            503,
            f"This tenant is billed in {cur} and no {cur}/USD rate is set, so no USD figure "
            "can be given; ask the operator to set one (tokenhub billing fx set).",
            type="server_error",
            code="fx_rate_missing",
        )
    return found[0]


def _usd(nanos: int, rate: Decimal) -> float:
    return float((Decimal(nanos) * rate / 10**9).quantize(Decimal("0.000001")))


async def legacy_subscription(request: web.Request, who: Principal) -> web.Response:
    async def run(tx: Tx) -> dict[str, Any]:
        prof, m, _ = await money_of(tx, who.tenant)
        rate = await _to_usd(tx, m.currency)
        used = await _spent(tx, who.tenant, m.currency, -(2**62), 2**62)
        line = _usd(m.spendable(prof.draw_order) + used, rate)
        return {
            "object": "billing_subscription",
            "has_payment_method": True,
            "soft_limit_usd": line,
            "hard_limit_usd": line,
            "system_hard_limit_usd": line,
            "access_until": 0,  # tokenhub keys do not expire
        }

    return json_response(await (await _db(request)).read(run))


def _date_param(request: web.Request, name: str, default: dt.date) -> dt.date:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise ApiError.bad_request(f"{name} must be a date, YYYY-MM-DD", param=name) from None


def _day_ms(d: dt.date) -> int:
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp() * 1000)


async def legacy_usage(request: web.Request, who: Principal) -> web.Response:
    """total_usage: US cents the tenant's usage cost from start_date to end_date (UTC days,
    end exclusive, as OpenAI's; default: this month so far)."""
    today = dt.datetime.now(dt.UTC).date()
    start = _date_param(request, "start_date", today.replace(day=1))
    end = _date_param(request, "end_date", today + dt.timedelta(days=1))
    if end <= start:
        raise ApiError.bad_request("end_date must be later than start_date", param="end_date")

    async def run(tx: Tx) -> dict[str, Any]:
        prof = await get_profile(tx, who.tenant)
        rate = await _to_usd(tx, prof.currency)
        used = await _spent(tx, who.tenant, prof.currency, _day_ms(start), _day_ms(end))
        return {"object": "list", "total_usage": _usd(used * 100, rate)}

    return json_response(await (await _db(request)).read(run))


# -- the URL map --------------------------------------------------------------------------------


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/v1/tokenhub/balance", _handler(balance)),
    ("GET", "/v1/tokenhub/usage", _handler(usage)),
    ("GET", "/v1/tokenhub/keys", _handler(list_keys)),
    ("POST", "/v1/tokenhub/keys", _handler(create_key)),
    ("POST", "/v1/tokenhub/keys/{id}/revoke", _handler(revoke_key)),
    ("POST", "/v1/tokenhub/redeem", _handler(redeem)),
    ("GET", "/v1/tokenhub/alerts", _handler(get_alert)),
    ("PUT", "/v1/tokenhub/alerts", _handler(put_alert)),
    ("DELETE", "/v1/tokenhub/alerts", _handler(delete_alert)),
    ("GET", "/v1/tokenhub/statements/{period}", _handler(statement)),
    ("GET", "/v1/tokenhub/limits", _handler(limits)),
    ("GET", "/v1/dashboard/billing/subscription", _handler(legacy_subscription)),
    ("GET", "/v1/dashboard/billing/usage", _handler(legacy_usage)),
)


def setup_tenant_routes(app: web.Application, database_url: str) -> None:
    """Adds the tenant API to the gateway app; its database opens on first use."""
    opener = DatabaseOpener(database_url)
    app[TENANT_DB] = opener
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_cleanup.append(opener.close)
