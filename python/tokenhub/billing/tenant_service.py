"""What a tenant may read and change of its own, shared by its two faces: the tenant API
(tokenhub.tenant.routes, with its API key) and the console's tenant pages
(tokenhub.console.tenant_pages, signed in): the balance, its keys within the operator's policy.

Here, not in tenant/, so that the console (mounted by the admin app) uses the same functions
without an import cycle (the tenant API uses the admin API's HTTP helpers).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenhub.billing import alerts, terms
from tokenhub.billing import ledger as L
from tokenhub.billing.service import get_profile, now_ms
from tokenhub.db.database import Tx
from tokenhub.money import decimal_str, fmt
from tokenhub.store import sql
from tokenhub.store.base import ApiKey, NotFound, StoreError

MAX_KEYS_PER_TENANT = 20  # the operator's policy: active keys a tenant may hold at once
KEY_LIMITS = ("rpm", "tpm", "max_concurrency")
TENANT_LIMITS = ("rpm", "tpm", "max_concurrency", "tokens_per_day")


def money(nanos: int, currency: str) -> dict[str, str]:
    """{"amount": "12.34", "currency": "CNY"}: exact, a string (as the admin API's)."""
    return {"amount": fmt(nanos, currency, exact=True).split()[0], "currency": currency}


# -- balance ------------------------------------------------------------------------------------


class _Money(msgspec.Struct, frozen=True):
    currency: str
    wallet: int  # what the prepaid wallet holds
    receivable: int  # what the tenant owes on its credit line
    overrun: int  # usage no contract covered
    credit_limit: int

    @property
    def credit_available(self) -> int:
        return max(0, self.credit_limit - self.receivable)

    def spendable(self, draw_order: tuple[str, ...]) -> int:
        """The money usage can still draw: the wallet and the credit headroom, as far as the
        tenant's draw order names them (what a low-balance alert compares: one definition,
        tokenhub.billing.alerts.spendable)."""
        return alerts.spendable(self.wallet, self.receivable, self.credit_limit, draw_order)


async def money_of(tx: Tx, tenant: str) -> tuple[terms.Profile, _Money, dict[str, int]]:
    """The tenant's profile, money and the balances (debit-positive) of its wallet,
    receivable, overrun and lots. Constrained accounts (wallet, receivable, lots) are read
    from `accounts.balance`, which the ledger keeps equal to their postings; only the overrun
    (unconstrained, rarely posted to) is summed from its postings (index postings_account):
    a few indexed reads however much the tenant has used."""
    prof = await get_profile(tx, tenant)
    cur = prof.currency
    bals: dict[str, int] = {
        a: int(b)
        for a, b in await tx.fetch(
            "SELECT id, balance FROM accounts WHERE tenant = $1 AND (kind = 'lot' OR id IN "
            "($2, $3))",
            tenant,
            L.wallet(tenant, cur),
            L.receivable(tenant, cur),
        )
    }
    bals[L.overrun(tenant, cur)] = int(
        await tx.fetchval(
            "SELECT COALESCE(SUM(amount), 0) FROM postings WHERE account = $1",
            L.overrun(tenant, cur),
        )
    )
    m = _Money(
        currency=cur,
        wallet=-bals.get(L.wallet(tenant, cur), 0),  # the ledger is debit-positive
        receivable=bals.get(L.receivable(tenant, cur), 0),
        overrun=bals.get(L.overrun(tenant, cur), 0),
        credit_limit=prof.credit_limit,
    )
    return prof, m, bals


async def balance_in(tx: Tx, tenant: str) -> dict[str, Any]:
    """The balance as /v1/tokenhub/balance answers it (the console's balance card too)."""
    prof, m, bals = await money_of(tx, tenant)
    lots = (await terms.active_lots(tx, [tenant])).get(tenant, [])
    now = now_ms()
    packages, packs = [], []
    points_left = 0
    for lot in lots:
        if lot.end_ms is not None and lot.end_ms <= now:
            continue  # ended, not expired by the settler yet: nothing left to draw
        left = -bals.get(L.lot_units(tenant, lot.id), 0)
        row: dict[str, Any] = {
            "id": lot.id,
            "plan": lot.plan,
            "valid_from_ms": lot.start_ms,
            "expires_ms": lot.end_ms,
            "models": list(lot.models),
        }
        if lot.kind == "package":
            packages.append(row | {"tokens_left": left, "tokens_total": lot.quantity})
        else:
            points_left += left
            packs.append(
                row | {"points_left": decimal_str(left), "points_total": decimal_str(lot.quantity)}
            )
    cur = m.currency
    return {
        "object": "tokenhub.balance",
        "tenant": tenant,
        "currency": cur,
        "draw_order": list(prof.draw_order),
        "wallet": money(m.wallet, cur),
        "credit_limit": money(m.credit_limit, cur),
        "credit_used": money(m.receivable, cur),
        "credit_available": money(m.credit_available, cur),
        "overrun": money(m.overrun, cur),
        "spendable": money(m.spendable(prof.draw_order), cur),
        "low_balance": None if prof.low_balance is None else money(prof.low_balance, cur),
        "low_balance_warning": prof.low_balance is not None and m.wallet < prof.low_balance,
        "packages": packages,
        "points": {"left": decimal_str(points_left), "packs": packs},
    }


# -- keys ---------------------------------------------------------------------------------------


def key_json(k: ApiKey) -> dict[str, Any]:
    """A key as its tenant sees it: never its secret (tokenhub keeps only its SHA-256)."""
    return {
        "id": k.id,
        "object": "api_key",
        "prefix": k.prefix,
        "created_ms": k.created_ms,
        "revoked_ms": k.revoked_ms,
    }


class KeyLimitReached(StoreError):
    """The tenant holds MAX_KEYS_PER_TENANT active keys already."""


async def create_key_in(tx: Tx, tenant: str, secret: str, actor: str) -> ApiKey:
    """A new key for `tenant` within the operator's policy (at most MAX_KEYS_PER_TENANT
    active keys: KeyLimitReached), audited as `actor` (the tenant API's and the console's)."""
    # One key creation per tenant at a time (PostgreSQL; SQLite writes one at a time), so
    # concurrent requests cannot pass the count together.
    await L.lock_tenants(tx, [tenant])
    t = await sql.tenant_in(tx, tenant)
    active = (await sql.active_key_counts_in(tx, [t.id])).get(t.id, 0)
    if active >= MAX_KEYS_PER_TENANT:
        raise KeyLimitReached(
            f"This tenant already has {active} active API keys, the most the operator "
            "allows; revoke one first."
        )
    key = await sql.create_key_in(tx, tenant, secret)
    await sql.add_admin_audit(tx, actor, "key.create", key.id, None, key_json(key))
    return key


async def revoke_own_key_in(tx: Tx, tenant: str, key_id: str, actor: str) -> ApiKey:
    """Revokes one of `tenant`'s keys; another tenant's key is NotFound, exactly as a key
    that does not exist (no hint that the id is taken)."""
    try:
        key = await sql.key_in(tx, key_id)
    except NotFound:
        key = None
    if key is None or key.tenant != tenant:
        raise NotFound(f"no API key {key_id!r}")
    revoked = await sql.revoke_key_in(tx, key_id)
    await sql.add_admin_audit(tx, actor, "key.revoke", key_id, key_json(key), key_json(revoked))
    return revoked
