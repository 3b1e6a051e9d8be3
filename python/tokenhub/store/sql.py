"""The store's logic, written once over `tokenhub.db.database.Tx` for SQLite and PostgreSQL:
tenants, API keys, the change marker, limits, the audit log, daily token sums, the cluster's
host heartbeats and migrations.

`TxStore` implements those `Store` methods on two primitives an engine provides: `_write(fn)`
runs `fn(tx)` in a write transaction, `_read(fn)` in a read. The engines (store/sqlite.py over
sqlite3 connections per thread, store/postgres.py over asyncpg) keep only what differs: how a
transaction is run, the bulk usage insert, streaming export and `sync`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec

from tokenhub.db.database import Tx
from tokenhub.store.base import (
    DISPLAY_PREFIX_LEN,
    KEY_LIMIT_FIELDS,
    LIMIT_FIELDS,
    NO_LIMITS,
    SECRET_PREFIX,
    ActiveKey,
    AlreadyExists,
    ApiKey,
    AuditEntry,
    HostBeat,
    LimitRow,
    Limits,
    NotFound,
    StoreError,
    Tenant,
    _quote,
    check_secret,
    check_tenant_name,
)
from tokenhub.usage import MAX_TOKENS

T = TypeVar("T")

_LIMIT_COLS = ", ".join(LIMIT_FIELDS)
_KEY_SELECT = (
    "SELECT k.id, k.tenant_id, t.name, k.prefix, k.created_ms, k.revoked_ms, k.updated_ms "
    "FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        id=row[0],
        tenant_id=row[1],
        tenant=row[2],
        prefix=row[3],
        created_ms=row[4],
        revoked_ms=row[5],
        updated_ms=row[6],
    )


async def _bump_marker(tx: Tx) -> None:
    await tx.execute("UPDATE change_marker SET value = value + 1 WHERE id = 1")


async def _new_id(tx: Tx, table: str, prefix: str) -> str:
    # 48 random bits: collisions are rare, not impossible (1M keys: ~0.2%), so check.
    while True:
        new = prefix + secrets.token_hex(6)
        if await tx.fetchrow(f"SELECT 1 FROM {table} WHERE id = $1", new) is None:
            return new


async def _tenant(tx: Tx, name: str) -> Tenant:
    row = await tx.fetchrow("SELECT id, name, created_ms FROM tenants WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no tenant {_quote(name)}")
    return Tenant(id=row[0], name=row[1], created_ms=row[2])


async def _limits(tx: Tx, scope: str, name: str) -> Limits:
    row = await tx.fetchrow(
        f"SELECT {_LIMIT_COLS} FROM limits WHERE scope = $1 AND name = $2", scope, name
    )
    return NO_LIMITS if row is None else Limits(**dict(zip(LIMIT_FIELDS, row, strict=True)))


def _check_limits(scope: str, changes: dict[str, int | None]) -> None:
    if scope not in ("key", "tenant"):
        raise StoreError(f"unknown limit scope {_quote(scope)}")
    fields = KEY_LIMIT_FIELDS if scope == "key" else LIMIT_FIELDS
    for field, value in changes.items():
        if field not in fields:
            raise StoreError(f"a {scope} has no limit {_quote(field)}")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63
        ):
            raise StoreError(f"{field} must be a whole number >= 0 (got {value!r})")
        if field == "strong_share_pct" and value is not None and value > 100:
            raise StoreError(f"strong_share_pct is a percentage, 0 to 100 (got {value})")


class TxStore:
    """The engine-neutral `Store` methods (see the module docstring)."""

    def _write(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        raise NotImplementedError

    # -- tenants ---------------------------------------------------------------------------

    def create_tenant(self, name: str) -> Tenant:
        check_tenant_name(name)

        async def create(tx: Tx) -> Tenant:
            if await tx.fetchrow("SELECT 1 FROM tenants WHERE name = $1", name):
                raise AlreadyExists(f"tenant {_quote(name)} already exists")
            tenant = Tenant(id=await _new_id(tx, "tenants", "ten_"), name=name, created_ms=now_ms())
            await tx.execute(
                "INSERT INTO tenants (id, name, created_ms) VALUES ($1, $2, $3)",
                tenant.id,
                tenant.name,
                tenant.created_ms,
            )
            await _bump_marker(tx)
            return tenant

        return self._write(create)

    def get_tenant(self, name: str) -> Tenant:
        return self._read(lambda tx: _tenant(tx, name))

    def list_tenants(self) -> list[Tenant]:
        async def rows(tx: Tx) -> list[Tenant]:
            found = await tx.fetch("SELECT id, name, created_ms FROM tenants ORDER BY name")
            return [Tenant(id=r[0], name=r[1], created_ms=r[2]) for r in found]

        return self._read(rows)

    # -- API keys --------------------------------------------------------------------------

    def create_key(self, tenant_name: str, *, secret: str | None = None) -> tuple[ApiKey, str]:
        if secret is None:
            secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        else:
            check_secret(secret)
        sha = digest(secret)
        prefix = secret[:DISPLAY_PREFIX_LEN]

        async def create(tx: Tx) -> ApiKey:
            tenant = await _tenant(tx, tenant_name)
            if await tx.fetchrow("SELECT 1 FROM api_keys WHERE sha256 = $1", sha):
                raise AlreadyExists("this API key already exists")
            now = now_ms()
            key = ApiKey(
                id=await _new_id(tx, "api_keys", "key_"),
                tenant_id=tenant.id,
                tenant=tenant.name,
                prefix=prefix,
                created_ms=now,
                updated_ms=now,
            )
            await tx.execute(
                "INSERT INTO api_keys (id, tenant_id, prefix, sha256, created_ms, updated_ms) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                key.id,
                key.tenant_id,
                key.prefix,
                sha,
                now,
                now,
            )
            await _bump_marker(tx)
            return key

        return self._write(create), secret

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        async def rows(tx: Tx) -> list[ApiKey]:
            if tenant is None:
                found = await tx.fetch(f"{_KEY_SELECT} ORDER BY t.name, k.created_ms, k.id")
            else:
                t = await _tenant(tx, tenant)
                found = await tx.fetch(
                    f"{_KEY_SELECT} WHERE k.tenant_id = $1 ORDER BY k.created_ms, k.id", t.id
                )
            return [_key(r) for r in found]

        return self._read(rows)

    def revoke_key(self, key_id: str) -> ApiKey:
        async def revoke(tx: Tx) -> ApiKey:
            row = await tx.fetchrow(f"{_KEY_SELECT} WHERE k.id = $1", key_id)
            if row is None:
                raise NotFound(f"no API key {_quote(key_id)}")
            if row[5] is not None:
                raise StoreError(f"API key {_quote(key_id)} is already revoked")
            now = now_ms()
            await tx.execute(
                "UPDATE api_keys SET revoked_ms = $1, updated_ms = $2 WHERE id = $3",
                now,
                now,
                key_id,
            )
            await _bump_marker(tx)
            return msgspec.structs.replace(_key(row), revoked_ms=now, updated_ms=now)

        return self._write(revoke)

    def active_keys(self) -> list[ActiveKey]:
        async def rows(tx: Tx) -> list[ActiveKey]:
            found = await tx.fetch(
                "SELECT k.sha256, k.id, t.name FROM api_keys k "
                "JOIN tenants t ON t.id = k.tenant_id WHERE k.revoked_ms IS NULL"
            )
            return [ActiveKey(*r) for r in found]

        return self._read(rows)

    def key_digests(self) -> list[ActiveKey]:
        return self.active_keys()

    def change_marker(self) -> int:
        async def value(tx: Tx) -> int:
            v = await tx.fetchval("SELECT value FROM change_marker WHERE id = 1")
            return int(v) if v is not None else 0

        return self._read(value)

    # -- limits ----------------------------------------------------------------------------

    def set_limits(self, scope: str, name: str, **changes: int | None) -> Limits:
        _check_limits(scope, changes)

        async def update(tx: Tx) -> Limits:
            if scope == "key":
                if await tx.fetchrow("SELECT 1 FROM api_keys WHERE id = $1", name) is None:
                    raise NotFound(f"no API key {_quote(name)}")
            else:
                await _tenant(tx, name)
            merged = msgspec.structs.replace(await _limits(tx, scope, name), **changes)
            await tx.execute("DELETE FROM limits WHERE scope = $1 AND name = $2", scope, name)
            if merged.any():
                marks = ", ".join(f"${i}" for i in range(3, 3 + len(LIMIT_FIELDS)))
                await tx.execute(
                    f"INSERT INTO limits (scope, name, {_LIMIT_COLS}, updated_ms) "
                    f"VALUES ($1, $2, {marks}, ${3 + len(LIMIT_FIELDS)})",
                    scope,
                    name,
                    *(getattr(merged, f) for f in LIMIT_FIELDS),
                    now_ms(),
                )
            await _bump_marker(tx)
            return merged

        return self._write(update)

    def get_limits(self, scope: str, name: str) -> Limits:
        return self._read(lambda tx: _limits(tx, scope, name))

    def all_limits(self) -> list[LimitRow]:
        async def rows(tx: Tx) -> list[LimitRow]:
            found = await tx.fetch(
                f"SELECT scope, name, {_LIMIT_COLS} FROM limits ORDER BY scope, name"
            )
            return [
                LimitRow(r[0], r[1], Limits(**dict(zip(LIMIT_FIELDS, r[2:], strict=True))))
                for r in found
            ]

        return self._read(rows)

    def tokens_since(self, since_ms: int) -> dict[str, int]:
        async def sums(tx: Tx) -> dict[str, int]:
            # Each count clamped to the bounds every event obeys (tokenhub.usage.MAX_TOKENS):
            # a row written before they were checked cannot overflow the sum (which would stop
            # a server with daily budgets from starting) nor subtract from it. SQLite's
            # two-argument MIN/MAX are PostgreSQL's LEAST/GREATEST.
            lo, hi = ("GREATEST", "LEAST") if tx.dialect == "postgresql" else ("MAX", "MIN")
            found = await tx.fetch(
                f"SELECT tenant, SUM({hi}({lo}(input_tokens, 0), $1) "
                f"+ {hi}({lo}(output_tokens, 0), $1)) "
                "FROM usage_events WHERE ts_ms >= $2 GROUP BY tenant",
                MAX_TOKENS,
                since_ms,
            )
            return {t: int(n or 0) for t, n in found}

        return self._read(sums)

    # -- audit log -------------------------------------------------------------------------

    def add_audit(self, kind: str, tenant: str, key_id: str, details: dict[str, Any]) -> str:
        ts = now_ms()
        entry_id = f"aud_{ts:012x}{secrets.token_hex(8)}"  # time-ordered, unique
        text = msgspec.json.encode(details).decode()

        async def add(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO audit_log (id, ts_ms, kind, tenant, key_id, details) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                entry_id,
                ts,
                kind,
                tenant,
                key_id,
                text,
            )

        self._write(add)
        return entry_id

    def audit_entries(self, since_ms: int | None = None, limit: int = 1000) -> list[AuditEntry]:
        async def rows(tx: Tx) -> list[AuditEntry]:
            found = await tx.fetch(
                "SELECT id, ts_ms, kind, tenant, key_id, details FROM audit_log "
                "WHERE ts_ms >= $1 ORDER BY ts_ms, id LIMIT $2",
                since_ms or 0,
                limit,
            )
            return [
                AuditEntry(r[0], r[1], r[2], r[3], r[4], msgspec.json.decode(r[5])) for r in found
            ]

        return self._read(rows)

    # -- cluster hosts ---------------------------------------------------------------------

    def heartbeat(self, beat: HostBeat) -> None:
        async def upsert(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO cluster_hosts (host_id, started_ms, heartbeat_ms, interval_ms, pid, "
                "workers, version, journal_backlog) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (host_id) DO UPDATE SET started_ms = excluded.started_ms, "
                "heartbeat_ms = excluded.heartbeat_ms, interval_ms = excluded.interval_ms, "
                "pid = excluded.pid, "
                "workers = excluded.workers, version = excluded.version, "
                "journal_backlog = excluded.journal_backlog",
                *beat,
            )

        self._write(upsert)

    def cluster_hosts(self) -> list[HostBeat]:
        async def rows(tx: Tx) -> list[HostBeat]:
            found = await tx.fetch(
                "SELECT host_id, started_ms, heartbeat_ms, interval_ms, pid, workers, "
                "version, journal_backlog FROM cluster_hosts ORDER BY host_id"
            )
            return [HostBeat(*r) for r in found]

        return self._read(rows)
