"""The web console's users and sessions (migration 15), over `Tx` for SQLite and PostgreSQL.

Users are operators (role admin, billing or read; tenant NULL) or a tenant's own users (role
'tenant', tenant set). Passwords arrive here already hashed (tokenhub.console.passwords); a
session row holds the SHA-256 of the cookie's secret, never the secret. Disabling a user or
changing its password deletes its sessions in the same transaction, so they stop at once.

Below them, the reads of the operator pages (tokenhub.console.operator_pages) that the other
store modules lack: kept account balances of a page of tenants, overrun accounts, the oldest
unsettled event, the ledger check's cheap share, a page of keys' limits; each an indexed read
or one over a small table, never a scan of usage_events or postings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from tokenhub.db.database import Tx
from tokenhub.store.base import (
    KEY_LIMIT_FIELDS,
    TENANT_NAME,
    AlreadyExists,
    Limits,
    NotFound,
    StoreError,
    _quote,
)

OPERATOR_ROLES = ("read", "billing", "admin")  # rank order
ROLES = (*OPERATOR_ROLES, "tenant")
LANGS = ("en", "zh-CN")


class ConsoleUser(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    tenant: str | None
    lang: str
    created_ms: int
    disabled_ms: int | None = None


class SessionRow(msgspec.Struct, frozen=True, kw_only=True):
    """A live session and its user, as one indexed read finds them."""

    user: str
    role: str
    tenant: str | None
    lang: str
    csrf: str
    expires_ms: int


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_USER_COLS = "name, role, tenant, lang, created_ms, disabled_ms"


def _user(r: Sequence[Any]) -> ConsoleUser:
    return ConsoleUser(
        name=r[0], role=r[1], tenant=r[2], lang=r[3], created_ms=r[4], disabled_ms=r[5]
    )


def check_user(name: str, role: str, tenant: str | None, lang: str = "en") -> None:
    """StoreError for a bad name, role, language or role/tenant pairing."""
    if not TENANT_NAME.fullmatch(name):
        raise StoreError(
            f"invalid user name {_quote(name)}: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )
    if role not in ROLES:
        raise StoreError(f"unknown role {_quote(role)}: use one of {', '.join(ROLES)}")
    if role == "tenant" and not tenant:
        raise StoreError("a user with role tenant needs its tenant (--tenant)")
    if role != "tenant" and tenant:
        raise StoreError(f"role {role} is an operator's: it takes no tenant")
    if lang not in LANGS:
        raise StoreError(f"unknown language {_quote(lang)}: use one of {', '.join(LANGS)}")


async def create_user_in(
    tx: Tx, name: str, password_hash: str, role: str, tenant: str | None, lang: str = "en"
) -> ConsoleUser:
    """A new console user (AlreadyExists; NotFound for an unknown tenant; StoreError)."""
    check_user(name, role, tenant, lang)
    if (
        tenant is not None
        and await tx.fetchrow("SELECT 1 FROM tenants WHERE name = $1", tenant) is None
    ):
        raise NotFound(f"no tenant {_quote(tenant)}")
    if await tx.fetchrow("SELECT 1 FROM console_users WHERE name = $1", name) is not None:
        raise AlreadyExists(f"console user {_quote(name)} already exists")
    user = ConsoleUser(name=name, role=role, tenant=tenant, lang=lang, created_ms=now_ms())
    await tx.execute(
        "INSERT INTO console_users (name, password_hash, role, tenant, lang, created_ms) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        name,
        password_hash,
        role,
        tenant,
        lang,
        user.created_ms,
    )
    return user


async def user_in(tx: Tx, name: str) -> ConsoleUser:
    row = await tx.fetchrow(f"SELECT {_USER_COLS} FROM console_users WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no console user {_quote(name)}")
    return _user(row)


async def password_hash_in(tx: Tx, name: str) -> tuple[ConsoleUser, str] | None:
    """The user (enabled or not) and its stored hash, None when there is no such user."""
    row = await tx.fetchrow(
        f"SELECT {_USER_COLS}, password_hash FROM console_users WHERE name = $1", name
    )
    return None if row is None else (_user(row), row[6])


async def users_in(tx: Tx, tenant: str | None = None) -> list[ConsoleUser]:
    if tenant is None:
        rows = await tx.fetch(f"SELECT {_USER_COLS} FROM console_users ORDER BY name")
    else:
        rows = await tx.fetch(
            f"SELECT {_USER_COLS} FROM console_users WHERE tenant = $1 ORDER BY name", tenant
        )
    return [_user(r) for r in rows]


async def set_password_in(tx: Tx, name: str, password_hash: str, *, enable: bool = False) -> None:
    """A new password; the user's sessions end. `enable` also lifts a disable."""
    await user_in(tx, name)
    if enable:
        await tx.execute(
            "UPDATE console_users SET password_hash = $1, disabled_ms = NULL WHERE name = $2",
            password_hash,
            name,
        )
    else:
        await tx.execute(
            "UPDATE console_users SET password_hash = $1 WHERE name = $2", password_hash, name
        )
    await tx.execute("DELETE FROM console_sessions WHERE user_name = $1", name)


async def disable_user_in(tx: Tx, name: str) -> ConsoleUser:
    """Disables the user and ends its sessions (StoreError when already disabled)."""
    user = await user_in(tx, name)
    if user.disabled_ms is not None:
        raise StoreError(f"console user {_quote(name)} is already disabled")
    now = now_ms()
    await tx.execute("UPDATE console_users SET disabled_ms = $1 WHERE name = $2", now, name)
    await tx.execute("DELETE FROM console_sessions WHERE user_name = $1", name)
    return msgspec.structs.replace(user, disabled_ms=now)


async def set_lang_in(tx: Tx, name: str, lang: str) -> None:
    if lang not in LANGS:
        raise StoreError(f"unknown language {_quote(lang)}: use one of {', '.join(LANGS)}")
    await tx.execute("UPDATE console_users SET lang = $1 WHERE name = $2", lang, name)


async def create_session_in(
    tx: Tx, digest: str, user: str, csrf: str, expires_ms: int, *, now: int | None = None
) -> None:
    now = now_ms() if now is None else now
    # Expired rows of this user go as it signs in again: the table stays small without a sweeper.
    await tx.execute(
        "DELETE FROM console_sessions WHERE user_name = $1 AND expires_ms <= $2", user, now
    )
    await tx.execute(
        "INSERT INTO console_sessions (digest, user_name, csrf, created_ms, expires_ms) "
        "VALUES ($1, $2, $3, $4, $5)",
        digest,
        user,
        csrf,
        now,
        expires_ms,
    )


async def session_in(tx: Tx, digest: str, now: int) -> SessionRow | None:
    """The unexpired session whose secret hashes to `digest`, of an enabled user, or None."""
    row = await tx.fetchrow(
        "SELECT s.user_name, u.role, u.tenant, u.lang, s.csrf, s.expires_ms "
        "FROM console_sessions s JOIN console_users u ON u.name = s.user_name "
        "WHERE s.digest = $1 AND s.expires_ms > $2 AND u.disabled_ms IS NULL",
        digest,
        now,
    )
    if row is None:
        return None
    return SessionRow(
        user=row[0], role=row[1], tenant=row[2], lang=row[3], csrf=row[4], expires_ms=row[5]
    )


async def delete_session_in(tx: Tx, digest: str) -> None:
    await tx.execute("DELETE FROM console_sessions WHERE digest = $1", digest)


# -- reads for the operator pages (indexed or small tables; never a scan of usage_events) -----


async def account_balances_in(tx: Tx, tenants: Sequence[str]) -> dict[str, int]:
    """{account id: balance (debit-positive)} of these tenants' constrained ledger accounts
    (wallet, receivable, lot: the ones whose balance the ledger keeps on the row), one indexed
    read, not a sum over postings."""
    if not tenants:
        return {}
    marks = ", ".join(f"${i}" for i in range(1, len(tenants) + 1))
    rows = await tx.fetch(
        f"SELECT id, balance FROM accounts WHERE tenant IN ({marks}) AND ceiling IS NOT NULL",
        *tenants,
    )
    return {r[0]: int(r[1]) for r in rows}


async def overruns_in(tx: Tx) -> list[tuple[str, str, int]]:
    """(tenant, account, balance) of every overrun account that is not zero. Overrun
    accounts keep no balance on their row (no ceiling): their postings are summed per
    account through the postings' account index (a correlated sum: a JOIN let PostgreSQL
    hash the whole postings table)."""
    rows = await tx.fetch(
        "SELECT a.tenant, a.id, (SELECT COALESCE(SUM(p.amount), 0) FROM postings p "
        "WHERE p.account = a.id) FROM accounts a WHERE a.kind = 'overrun' "
        "ORDER BY a.tenant, a.id"
    )
    return [(r[0], r[1], int(r[2])) for r in rows if int(r[2])]


async def oldest_unsettled_ms_in(tx: Tx) -> int | None:
    """The arrival time of the oldest usage event not yet settled (the pending index's first
    row), None when every event is settled."""
    # `settled_ms IS NULL` word for word as the partial index's predicate (SQLite's planner
    # matches the terms).
    row = await tx.fetchrow(
        "SELECT ts_ms FROM usage_events WHERE settled_ms IS NULL ORDER BY ts_ms, request_id LIMIT 1"
    )
    return None if row is None else int(row[0])


async def key_limits_in(tx: Tx, key_ids: Sequence[str]) -> dict[str, Limits]:
    """{key id: limits} of the given keys that have any (one read by primary key)."""
    if not key_ids:
        return {}
    marks = ", ".join(f"${i}" for i in range(1, len(key_ids) + 1))
    rows = await tx.fetch(
        f"SELECT name, {', '.join(KEY_LIMIT_FIELDS)} FROM limits "
        f"WHERE scope = 'key' AND name IN ({marks})",
        *key_ids,
    )
    return {r[0]: Limits(**dict(zip(KEY_LIMIT_FIELDS, r[1:], strict=True))) for r in rows}


async def books_at_a_glance_in(tx: Tx) -> tuple[list[tuple[str, int, int]], int, int]:
    """The overview's cheap share of the ledger check: (constrained accounts over their
    ceiling as (id, balance, ceiling), events failing to settle, of them quarantined). Small
    tables only; the full check (every posting) is the ledger check page's."""
    over = await tx.fetch(
        "SELECT id, balance, ceiling FROM accounts "
        "WHERE ceiling IS NOT NULL AND balance > ceiling ORDER BY id"
    )
    row = await tx.fetchrow(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN quarantined THEN 1 ELSE 0 END), 0) "
        "FROM settlement_failures"
    )
    failing, quarantined = (int(row[0]), int(row[1])) if row is not None else (0, 0)
    return [(r[0], int(r[1]), int(r[2])) for r in over], failing, quarantined
