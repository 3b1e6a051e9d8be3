"""Low-balance alerts: a tenant's threshold, checked after every settlement pass, and a webhook
delivered from an outbox.

**The alert** (`balance_alerts`, one per tenant, in the currency it settles in): a threshold
(integer nanos), an http(s) webhook URL and a signing secret. It is *armed* when set. After
every settlement pass (`check`, called by `tokenhub.billing.settler.settle_pending`), an armed
alert whose tenant's spendable balance is below its threshold is disarmed and one delivery is
queued (`webhook_deliveries`) in the same transaction, under the tenant's ledger lock, with a
conditional UPDATE, so that two settlers (partitions) never queue it twice. A disarmed alert is
armed again once the balance is back at or above the threshold (a top-up, a redemption, a
higher credit limit): the next fall below fires again. Setting or changing the alert arms it;
a threshold set above the current balance fires on the next pass.

**Spendable balance** (`spendable`): what usage can still draw in money, as the tenant API's
`/v1/tokenhub/balance` shows it (`spendable` there): the wallet and the credit headroom
(credit limit less what is owed), each as far as the tenant's draw order names it. Packages
and points are not money and are left out (the balance card shows them apart).

**Cost**: one query per pass (the alerts joined with their profiles and the two accounts,
`accounts.balance`, kept by the ledger for constrained accounts), O(alerts), nothing per
event; with no alert set the query reads an empty table. A transaction only for an alert
whose state changes.

**Delivery** (`DeliveryWorker`, a task of the settle daemon, never on settlement's path): every
`poll_s` it reads the due rows (index `webhook_deliveries_due`), claims each with a
conditional UPDATE (its `next_ms` pushed past the request's timeout, so a second worker or a
crash mid-request retries it later, never at once), and POSTs the JSON body with
`Content-Type: application/json`, `X-Tokenhub-Event: balance.low`, `X-Tokenhub-Delivery: <event
id>` and `X-Tokenhub-Signature: sha256=<hex HMAC-SHA256 of the body with the alert's secret>`.
A 2xx is delivered; anything else (a status, a timeout, a refused connection) is retried with
exponential backoff and jitter (`BACKOFF_S` doubling up to `MAX_BACKOFF_S`) until
`MAX_ATTEMPTS`, then given up (`next_ms` = GAVE_UP, `last_error` says why). Redirects are not
followed. Delivery is at least once: a receiver dedupes by the event id. The outbox is rows, so
a restarted settler delivers what was queued. A delivery whose alert was removed is dropped
(the tenant took its webhook back); a rotated secret signs what is still queued. Logs name the
delivery and tenant, never the URL (it may carry a token) nor the secret.

**Which URLs** (`check_url`): `https://` only, a host name or a public IP address, no
credentials in the URL, at most MAX_URL_CHARS characters; at delivery the host's addresses are
resolved and any that is not global (loopback, private, link-local, ...) is refused, so a
tenant cannot make the operator's host call into its own network. An operator who wants
webhooks inside its network (an intranet, tests, the demo) sets the environment variable
`TOKENHUB_WEBHOOKS_ALLOW_PRIVATE=1` for the processes that take (gateway, admin) and deliver
(settler) them: then `http://` and private addresses are allowed too.

Performance notes (SQLite, 2-core VM): an idle settlement pass took 0.27 ms with the check
against 0.11 ms without it (one more read transaction on an empty table; nothing per event);
with 1,000 armed alerts above their thresholds the check takes 11 ms a pass (the join, ~11 us
an alert). Deliveries are rare (once per fall below a threshold), so the outbox stays small;
its due rows are read through webhook_deliveries_due, a tenant's through
webhook_deliveries_tenant. Delivered rows are kept (the tenant's page lists the latest).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import secrets
import socket
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from tokenhub.billing import ledger as L
from tokenhub.billing.terms import DRAW_ORDER
from tokenhub.db.database import Database, Tx
from tokenhub.money import MoneyError, check_currency, decimal_str, parse_amount

log = logging.getLogger("tokenhub.alerts")

ALLOW_PRIVATE_ENV = "TOKENHUB_WEBHOOKS_ALLOW_PRIVATE"
MAX_URL_CHARS = 2048
KIND_LOW_BALANCE = "balance.low"
MAX_ATTEMPTS = 10
BACKOFF_S = 5.0  # before the second attempt; doubled each time, with 0-25 % jitter
MAX_BACKOFF_S = 600.0
TIMEOUT_S = 10.0  # the whole request
CONNECT_TIMEOUT_S = 5.0
POLL_S = 1.0
DUE_BATCH = 20  # deliveries read per poll
GAVE_UP = 2**62  # next_ms of a delivery given up: never due
SECRET_PREFIX = "whsec_"


class AlertError(ValueError):
    """An alert or a webhook URL refused as given (the message says why)."""


def allow_private_default() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_url(url: str, *, allow_private: bool | None = None) -> str:
    """The webhook URL if it may be used (see the module docstring), else AlertError."""
    private = allow_private_default() if allow_private is None else allow_private
    url = url.strip()
    if not url:
        raise AlertError("give the webhook's URL")
    if len(url) > MAX_URL_CHARS:
        raise AlertError(f"the webhook URL may have at most {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise AlertError("the webhook URL must be printable ASCII without spaces")
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        raise AlertError("the webhook URL is not a valid URL") from None
    schemes = ("https", "http") if private else ("https",)
    if u.scheme not in schemes:
        raise AlertError(
            "the webhook URL must start with https://"
            + ("" if private else " (http:// only where the operator allows private webhooks)")
        )
    if not u.hostname:
        raise AlertError("the webhook URL has no host")
    if u.username is not None or u.password is not None:
        raise AlertError("the webhook URL must not carry credentials (user:password@)")
    if port == 0:
        raise AlertError("the webhook URL's port must be 1-65535")
    if not private:
        host = u.hostname
        if host == "localhost" or host.endswith(".localhost"):
            raise AlertError("the webhook URL must name a public host, not localhost")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and not ip.is_global:
            raise AlertError("the webhook URL must name a public address")
    return url


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes) -> str:
    """The X-Tokenhub-Signature header's value: `sha256=` + hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (constant time)."""
    return hmac.compare_digest(sign(secret, body), header)


def spendable(
    wallet: int, receivable: int, credit_limit: int, draw_order: Sequence[str] = DRAW_ORDER
) -> int:
    """The money usage can still draw: the wallet (what it holds, tenant-side) and the credit
    headroom (limit less what is owed), as far as the draw order names them."""
    return (max(0, wallet) if "wallet" in draw_order else 0) + (
        max(0, credit_limit - receivable) if "postpaid" in draw_order else 0
    )


# -- the alert ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    tenant: str
    currency: str
    threshold: int  # nanos
    webhook_url: str
    armed: bool
    fired_ms: int | None
    updated_ms: int


_ALERT_COLS = "tenant, currency, threshold, webhook_url, armed, fired_ms, updated_ms"


def _alert(r: Sequence[Any]) -> Alert:
    return Alert(r[0], r[1], int(r[2]), r[3], bool(r[4]), r[5], int(r[6]))


def _now_ms() -> int:
    return int(time.time() * 1000)


async def get_alert(tx: Tx, tenant: str) -> Alert | None:
    row = await tx.fetchrow(
        f"SELECT {_ALERT_COLS} FROM balance_alerts WHERE tenant = $1 "
        "ORDER BY updated_ms DESC LIMIT 1",
        tenant,
    )
    return None if row is None else _alert(row)


async def set_alert(
    tx: Tx,
    tenant: str,
    amount: str,
    currency: str,
    webhook_url: str,
    *,
    rotate_secret: bool = False,
    allow_private: bool | None = None,
) -> tuple[Alert, str | None]:
    """Sets the tenant's alert (replacing the one it had) and arms it. The currency must be
    the one the tenant settles in. Returns the alert and its new signing secret when one was
    made (a first alert, or `rotate_secret`), else None: the secret is shown once, then
    only used. AlertError / MoneyError on a refused value (nothing changes)."""
    from tokenhub.billing.service import get_profile

    url = check_url(webhook_url, allow_private=allow_private)
    try:
        cur = check_currency(currency.strip().upper())
        threshold = parse_amount(amount.strip(), cur)
    except MoneyError as e:
        raise AlertError(str(e)) from None
    if threshold <= 0:
        raise AlertError("the threshold must be more than 0")
    await L.lock_tenants(tx, [tenant])
    prof = await get_profile(tx, tenant)
    if cur != prof.currency:
        raise AlertError(f"this tenant settles in {prof.currency}; set the threshold in it")
    old = await tx.fetchval(
        "SELECT secret FROM balance_alerts WHERE tenant = $1 AND currency = $2", tenant, cur
    )
    secret = new_secret() if old is None or rotate_secret else str(old)
    now = _now_ms()
    await tx.execute("DELETE FROM balance_alerts WHERE tenant = $1", tenant)
    await tx.execute(
        "INSERT INTO balance_alerts (tenant, currency, threshold, webhook_url, secret, armed, "
        "fired_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
        tenant, cur, threshold, url, secret, True, now,
    )  # fmt: skip
    alert = Alert(tenant, cur, threshold, url, True, None, now)
    return alert, (secret if secret != old else None)


async def delete_alert(tx: Tx, tenant: str) -> bool:
    """Removes the tenant's alert (its queued deliveries are dropped when due). Whether there
    was one."""
    return bool(await tx.execute("DELETE FROM balance_alerts WHERE tenant = $1", tenant))


async def spendable_in(tx: Tx, tenant: str, currency: str) -> int:
    """The tenant's spendable balance in `currency` now (see the module docstring)."""
    from tokenhub.billing.service import get_profile

    prof = await get_profile(tx, tenant)
    rows: dict[str, int] = dict(
        await tx.fetch(
            "SELECT id, balance FROM accounts WHERE id IN ($1, $2)",
            L.wallet(tenant, currency),
            L.receivable(tenant, currency),
        )
    )
    credit = prof.credit_limit if prof.currency == currency else 0
    return spendable(
        -int(rows.get(L.wallet(tenant, currency), 0)),
        int(rows.get(L.receivable(tenant, currency), 0)),
        credit,
        prof.draw_order,
    )


# -- the check after each settlement pass ------------------------------------------------------

# Every alert with what its balance needs: the profile (NULL: the defaults) and the two
# constrained accounts, whose `balance` the ledger keeps.
_CHECK_SQL = (
    "SELECT a.tenant, a.currency, a.threshold, a.armed, p.currency, p.draw_order, "
    "p.credit_limit, w.balance, r.balance FROM balance_alerts a "
    "LEFT JOIN billing_profiles p ON p.tenant = a.tenant "
    "LEFT JOIN accounts w ON w.id = 't:' || a.tenant || ':wallet:' || a.currency "
    "LEFT JOIN accounts r ON r.id = 't:' || a.tenant || ':receivable:' || a.currency"
)


def _spendable_row(r: Sequence[Any]) -> int:
    _, cur, _, _, pcur, order, limit, w, rec = r
    draw = tuple(order.split(",")) if order else DRAW_ORDER
    credit = int(limit or 0) if (pcur or "USD") == cur else 0
    return spendable(-int(w or 0), int(rec or 0), credit, draw)


def low_balance_body(
    event_id: str, tenant: str, currency: str, balance: int, threshold: int, now_ms: int
) -> str:
    return json.dumps(
        {
            "id": event_id,
            "type": KIND_LOW_BALANCE,
            "tenant": tenant,
            "currency": currency,
            "balance": {"amount": decimal_str(balance), "currency": currency},
            "threshold": {"amount": decimal_str(threshold), "currency": currency},
            "time": dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "time_ms": now_ms,
        },
        separators=(",", ":"),
        sort_keys=True,
    )


async def _transition(tx: Tx, tenant: str, currency: str) -> str:
    """Under the tenant's lock: fires (disarms and queues a delivery) or re-arms the alert
    as its balance now says; '' when neither applies (the state changed meanwhile)."""
    await L.lock_tenants(tx, [tenant])
    row = await tx.fetchrow(
        "SELECT threshold, armed, webhook_url FROM balance_alerts "
        f"WHERE tenant = $1 AND currency = $2{tx.for_update}",
        tenant,
        currency,
    )
    if row is None:
        return ""
    threshold, armed, url = int(row[0]), bool(row[1]), row[2]
    bal = await spendable_in(tx, tenant, currency)
    now = _now_ms()
    if armed and bal < threshold:
        n = await tx.execute(
            "UPDATE balance_alerts SET armed = $1, fired_ms = $2 "
            "WHERE tenant = $3 AND currency = $4 AND armed",
            False, now, tenant, currency,
        )  # fmt: skip
        if n != 1:
            return ""
        eid = L.new_id("evt")
        await tx.execute(
            "INSERT INTO webhook_deliveries (id, tenant, url, kind, body, created_ms, attempts, "
            "next_ms, delivered_ms, last_error) VALUES ($1, $2, $3, $4, $5, $6, 0, $6, NULL, NULL)",
            eid, tenant, url, KIND_LOW_BALANCE,
            low_balance_body(eid, tenant, currency, bal, threshold, now), now,
        )  # fmt: skip
        return "fired"
    if not armed and bal >= threshold:
        n = await tx.execute(
            "UPDATE balance_alerts SET armed = $1 WHERE tenant = $2 AND currency = $3 "
            "AND NOT armed",
            True,
            tenant,
            currency,
        )
        return "armed" if n == 1 else ""
    return ""


@dataclass
class CheckResult:
    alerts: int = 0  # alerts looked at
    fired: int = 0  # deliveries queued
    rearmed: int = 0


async def check(db: Database, *, mine: Callable[[str], bool] | None = None) -> CheckResult:
    """After a settlement pass: fires the armed alerts whose balance is below the threshold
    and re-arms the disarmed ones whose balance is back (see the module docstring). `mine`:
    only the tenants it accepts (a partitioned settler's)."""
    out = CheckResult()
    rows = await db.read(lambda tx: tx.fetch(_CHECK_SQL))
    for r in rows:
        tenant, cur, threshold, armed = r[0], r[1], int(r[2]), bool(r[3])
        if mine is not None and not mine(tenant):
            continue
        out.alerts += 1
        bal = _spendable_row(r)
        if (armed and bal < threshold) or (not armed and bal >= threshold):
            done = await db.transaction(partial(_transition, tenant=tenant, currency=cur))
            out.fired += done == "fired"
            out.rearmed += done == "armed"
    return out


# -- deliveries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    id: str
    tenant: str
    url: str
    kind: str
    body: str
    created_ms: int
    attempts: int
    next_ms: int
    delivered_ms: int | None
    last_error: str | None

    @property
    def state(self) -> str:
        if self.delivered_ms is not None:
            return "delivered"
        return "failed" if self.next_ms >= GAVE_UP else "pending"


_DELIVERY_COLS = (
    "id, tenant, url, kind, body, created_ms, attempts, next_ms, delivered_ms, last_error"
)


def _delivery(r: Sequence[Any]) -> Delivery:
    return Delivery(
        r[0], r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), int(r[7]),
        None if r[8] is None else int(r[8]), r[9],
    )  # fmt: skip


async def deliveries(tx: Tx, tenant: str, limit: int = 20) -> list[Delivery]:
    """The tenant's latest deliveries, newest first."""
    rows = await tx.fetch(
        f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries WHERE tenant = $1 "
        "ORDER BY id DESC LIMIT $2",
        tenant,
        limit,
    )
    return [_delivery(r) for r in rows]


def _is_public(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_global
    except ValueError:
        return False


def _public_resolver() -> Any:
    """An aiohttp resolver that keeps only global addresses: the check at delivery, against
    a host name that resolves into the operator's network (or is made to, later)."""
    from aiohttp.abc import AbstractResolver
    from aiohttp.resolver import DefaultResolver

    class PublicResolver(AbstractResolver):
        def __init__(self) -> None:
            self._inner = DefaultResolver()

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[Any]:
            found = [
                a for a in await self._inner.resolve(host, port, family) if _is_public(a["host"])
            ]
            if not found:
                raise OSError(f"{host} resolves to no public address")
            return found

        async def close(self) -> None:
            await self._inner.close()

    return PublicResolver()


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """The wait after `attempts` failed attempts: base, 2 base, 4 base, ... up to max_s,
    plus 0-25 % jitter (so that many failed deliveries do not retry in step)."""
    wait = min(max_s, base_s * 2.0 ** max(0, attempts - 1))
    return float(wait * random.uniform(1.0, 1.25))


class DeliveryWorker:
    """Delivers the outbox (see the module docstring): `run(stop)` in the settle daemon, or
    `deliver_due()` once."""

    def __init__(
        self,
        db: Database,
        *,
        poll_s: float = POLL_S,
        timeout_s: float = TIMEOUT_S,
        base_backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        max_attempts: int = MAX_ATTEMPTS,
        allow_private: bool | None = None,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.db = db
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts
        self.allow_private = allow_private_default() if allow_private is None else allow_private
        self.clock = clock
        self._session: Any = None
        self.delivered = 0
        self.failed = 0

    async def _http(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=10, resolver=None if self.allow_private else _public_resolver()
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s)
                ),
                headers={"User-Agent": "tokenhub-webhooks/1"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, stop: asyncio.Event) -> None:
        """Delivers what is due every `poll_s` until `stop` is set (errors are logged and the
        next poll tries again: the rows stay)."""
        try:
            while not stop.is_set():
                try:
                    await self.deliver_due()
                except Exception:
                    log.exception("webhook deliveries: pass failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)
        finally:
            await self.close()

    async def deliver_due(self) -> int:
        """One pass: claims and sends each due delivery (up to DUE_BATCH); returns how many
        were delivered."""
        now = self.clock()
        rows = await self.db.read(
            lambda tx: tx.fetch(
                f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries WHERE delivered_ms IS NULL "
                "AND next_ms <= $1 ORDER BY next_ms, id LIMIT $2",
                now,
                DUE_BATCH,
            )
        )
        done = 0
        for d in map(_delivery, rows):
            done += await self._one(d)
        return done

    async def _one(self, d: Delivery) -> bool:
        claim = self.clock() + int((self.timeout_s + 5) * 1000)

        async def take(tx: Tx) -> str | None:
            n = await tx.execute(
                "UPDATE webhook_deliveries SET next_ms = $1 WHERE id = $2 AND next_ms = $3 "
                "AND delivered_ms IS NULL",
                claim, d.id, d.next_ms,
            )  # fmt: skip
            if n != 1:
                return None  # another worker has it
            cur = json.loads(d.body).get("currency", "")
            secret = await tx.fetchval(
                "SELECT secret FROM balance_alerts WHERE tenant = $1 AND currency = $2",
                d.tenant,
                cur,
            )
            if secret is None:  # the alert was removed: drop what it queued
                await tx.execute(
                    "UPDATE webhook_deliveries SET next_ms = $1, last_error = $2 WHERE id = $3",
                    GAVE_UP, "dropped: the alert was removed", d.id,
                )  # fmt: skip
                return None
            return str(secret)

        secret = await self.db.transaction(take)
        if secret is None:
            return False
        body = d.body.encode()
        error = await self._post(d, body, sign(secret, body))
        attempts = d.attempts + 1
        now = self.clock()
        if error is None:
            await self.db.transaction(
                lambda tx: tx.execute(
                    "UPDATE webhook_deliveries SET delivered_ms = $1, attempts = $2, "
                    "last_error = NULL WHERE id = $3",
                    now,
                    attempts,
                    d.id,
                )
            )
            self.delivered += 1
            return True
        self.failed += 1
        if attempts >= self.max_attempts:
            nxt = GAVE_UP
            error = f"gave up after {attempts} attempts: {error}"
            log.warning("webhook %s (tenant %s): %s", d.id, d.tenant, error)
        else:
            nxt = now + int(backoff_s(attempts, self.base_backoff_s, self.max_backoff_s) * 1000)
        await self.db.transaction(
            lambda tx: tx.execute(
                "UPDATE webhook_deliveries SET attempts = $1, next_ms = $2, last_error = $3 "
                "WHERE id = $4",
                attempts,
                nxt,
                error[:300],
                d.id,
            )
        )
        return False

    async def _post(self, d: Delivery, body: bytes, signature: str) -> str | None:
        """None when the receiver took it (2xx), else a short reason (no URL, no secret)."""
        import aiohttp

        try:
            check_url(d.url, allow_private=self.allow_private)
            session = await self._http()
            async with session.post(
                d.url,
                data=body,
                allow_redirects=False,
                headers={
                    "Content-Type": "application/json",
                    "X-Tokenhub-Event": d.kind,
                    "X-Tokenhub-Delivery": d.id,
                    "X-Tokenhub-Signature": signature,
                },
            ) as resp:
                await resp.content.read(4096)  # a little of the answer, then let it go
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except AlertError as e:
            return f"refused: {e}"
        except TimeoutError:
            return f"timed out after {self.timeout_s:g} s"
        except aiohttp.ClientConnectorError as e:
            return f"cannot connect: {type(e.os_error).__name__}"
        except (aiohttp.ClientError, OSError) as e:
            return f"{type(e).__name__}"
