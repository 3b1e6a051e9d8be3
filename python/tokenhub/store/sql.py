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
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec

from tokenhub.db.database import Tx
from tokenhub.store.base import (
    ADMIN_SCOPES,
    ADMIN_SECRET_PREFIX,
    DISPLAY_PREFIX_LEN,
    KEY_LIMIT_FIELDS,
    LIMIT_FIELDS,
    NO_LIMITS,
    SECRET_PREFIX,
    TENANT_NAME,
    ActiveKey,
    AdminAudit,
    AdminToken,
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
from tokenhub.usage import EVENT_FIELDS, MAX_TOKENS, UsageEvent

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
        return self._write(lambda tx: create_tenant_in(tx, name))

    def get_tenant(self, name: str) -> Tenant:
        return self._read(lambda tx: _tenant(tx, name))

    def list_tenants(self) -> list[Tenant]:
        return self._read(tenants_in)

    # -- API keys --------------------------------------------------------------------------

    def create_key(self, tenant_name: str, *, secret: str | None = None) -> tuple[ApiKey, str]:
        secret = new_key_secret(secret)
        return self._write(lambda tx: create_key_in(tx, tenant_name, secret)), secret

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        return self._read(lambda tx: keys_in(tx, tenant))

    def revoke_key(self, key_id: str) -> ApiKey:
        return self._write(lambda tx: revoke_key_in(tx, key_id))

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
        return self._write(lambda tx: set_limits_in(tx, scope, name, **changes))

    def get_limits(self, scope: str, name: str) -> Limits:
        return self._read(lambda tx: _limits(tx, scope, name))

    def all_limits(self) -> list[LimitRow]:
        return self._read(all_limits_in)

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

    # -- admin tokens (tokenhub admin-tokens; the admin API reads them over db.Tx) ----------

    def create_admin_token(self, name: str, scope: str) -> tuple[AdminToken, str]:
        """A new admin token and its secret (shown once); audited with actor `cli`."""

        async def create(tx: Tx) -> tuple[AdminToken, str]:
            token, secret = await create_admin_token_in(tx, name, scope)
            await add_admin_audit(tx, "cli", "admin_token.create", token.id, None, token)
            return token, secret

        return self._write(create)

    def admin_tokens(self) -> list[AdminToken]:
        return self._read(admin_tokens_in)

    def revoke_admin_token(self, token_id: str) -> AdminToken:
        async def revoke(tx: Tx) -> AdminToken:
            token = await revoke_admin_token_in(tx, token_id)
            before = msgspec.structs.replace(token, revoked_ms=None)
            await add_admin_audit(tx, "cli", "admin_token.revoke", token.id, before, token)
            return token

        return self._write(revoke)

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


# -- the writes the CLI and the admin API share (one transaction each, or a part of one) --------


async def create_tenant_in(tx: Tx, name: str) -> Tenant:
    """Creates tenant `name` in `tx` (AlreadyExists; StoreError for a bad name)."""
    check_tenant_name(name)
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


async def tenant_in(tx: Tx, name: str) -> Tenant:
    """The tenant named `name` (NotFound)."""
    return await _tenant(tx, name)


def new_key_secret(secret: str | None = None) -> str:
    """A fresh API key secret, or `secret` checked (an imported one)."""
    if secret is None:
        return SECRET_PREFIX + secrets.token_urlsafe(32)
    check_secret(secret)
    return secret


async def create_key_in(tx: Tx, tenant_name: str, secret: str) -> ApiKey:
    """Stores a key for `secret` (its SHA-256 only) for the tenant, in `tx`."""
    sha = digest(secret)
    tenant = await _tenant(tx, tenant_name)
    if await tx.fetchrow("SELECT 1 FROM api_keys WHERE sha256 = $1", sha):
        raise AlreadyExists("this API key already exists")
    now = now_ms()
    key = ApiKey(
        id=await _new_id(tx, "api_keys", "key_"),
        tenant_id=tenant.id,
        tenant=tenant.name,
        prefix=secret[:DISPLAY_PREFIX_LEN],
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


async def key_in(tx: Tx, key_id: str) -> ApiKey:
    """The API key `key_id` as listed (NotFound)."""
    row = await tx.fetchrow(f"{_KEY_SELECT} WHERE k.id = $1", key_id)
    if row is None:
        raise NotFound(f"no API key {_quote(key_id)}")
    return _key(row)


async def revoke_key_in(tx: Tx, key_id: str) -> ApiKey:
    """Revokes `key_id` in `tx`; returns the key as revoked (NotFound; StoreError if it was)."""
    key = await key_in(tx, key_id)
    if key.revoked_ms is not None:
        raise StoreError(f"API key {_quote(key_id)} is already revoked")
    now = now_ms()
    await tx.execute(
        "UPDATE api_keys SET revoked_ms = $1, updated_ms = $2 WHERE id = $3", now, now, key_id
    )
    await _bump_marker(tx)
    return msgspec.structs.replace(key, revoked_ms=now, updated_ms=now)


async def limits_in(tx: Tx, scope: str, name: str) -> Limits:
    return await _limits(tx, scope, name)


async def all_limits_in(tx: Tx) -> list[LimitRow]:
    found = await tx.fetch(f"SELECT scope, name, {_LIMIT_COLS} FROM limits ORDER BY scope, name")
    return [
        LimitRow(r[0], r[1], Limits(**dict(zip(LIMIT_FIELDS, r[2:], strict=True)))) for r in found
    ]


async def tenants_in(tx: Tx) -> list[Tenant]:
    found = await tx.fetch("SELECT id, name, created_ms FROM tenants ORDER BY name")
    return [Tenant(id=r[0], name=r[1], created_ms=r[2]) for r in found]


async def keys_in(tx: Tx, tenant: str | None = None) -> list[ApiKey]:
    if tenant is None:
        found = await tx.fetch(f"{_KEY_SELECT} ORDER BY t.name, k.created_ms, k.id")
    else:
        t = await _tenant(tx, tenant)
        found = await tx.fetch(
            f"{_KEY_SELECT} WHERE k.tenant_id = $1 ORDER BY k.created_ms, k.id", t.id
        )
    return [_key(r) for r in found]


# -- admin tokens, the admin audit log, idempotency keys (the admin API, tokenhub.admin) -------


class IdempotentResponse(msgspec.Struct, frozen=True, kw_only=True):
    """What a key recorded: the request's digest and the response it got."""

    request_digest: str
    status: int
    response: str


_TOKEN_COLS = "id, name, prefix, scope, created_ms, revoked_ms"


def _admin_token(r: Sequence[Any]) -> AdminToken:
    return AdminToken(id=r[0], name=r[1], prefix=r[2], scope=r[3], created_ms=r[4], revoked_ms=r[5])


def check_admin_scope(scope: str) -> str:
    if scope not in ADMIN_SCOPES:
        raise StoreError(f"unknown scope {_quote(scope)}: use one of {', '.join(ADMIN_SCOPES)}")
    return scope


async def create_admin_token_in(tx: Tx, name: str, scope: str) -> tuple[AdminToken, str]:
    """A new admin token: (record, secret). Only the secret's SHA-256 is stored."""
    if not TENANT_NAME.fullmatch(name):  # a tenant's alphabet: the audit log's actor
        raise StoreError(
            f"invalid token name {_quote(name)}: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )
    check_admin_scope(scope)
    secret = ADMIN_SECRET_PREFIX + secrets.token_urlsafe(32)
    token = AdminToken(
        id=await _new_id(tx, "admin_tokens", "adm_"),
        name=name,
        prefix=secret[: DISPLAY_PREFIX_LEN + 1],
        scope=scope,
        created_ms=now_ms(),
    )
    await tx.execute(
        "INSERT INTO admin_tokens (id, name, digest, prefix, scope, created_ms) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        token.id,
        token.name,
        digest(secret),
        token.prefix,
        token.scope,
        token.created_ms,
    )
    return token, secret


async def admin_tokens_in(tx: Tx) -> list[AdminToken]:
    found = await tx.fetch(f"SELECT {_TOKEN_COLS} FROM admin_tokens ORDER BY created_ms, id")
    return [_admin_token(r) for r in found]


async def revoke_admin_token_in(tx: Tx, token_id: str) -> AdminToken:
    row = await tx.fetchrow(f"SELECT {_TOKEN_COLS} FROM admin_tokens WHERE id = $1", token_id)
    if row is None:
        raise NotFound(f"no admin token {_quote(token_id)}")
    if row[5] is not None:
        raise StoreError(f"admin token {_quote(token_id)} is already revoked")
    now = now_ms()
    await tx.execute("UPDATE admin_tokens SET revoked_ms = $1 WHERE id = $2", now, token_id)
    return msgspec.structs.replace(_admin_token(row), revoked_ms=now)


async def admin_token_by_digest(tx: Tx, sha256_hex: str) -> AdminToken | None:
    """The active token whose secret hashes to `sha256_hex`, or None."""
    row = await tx.fetchrow(
        f"SELECT {_TOKEN_COLS} FROM admin_tokens WHERE digest = $1 AND revoked_ms IS NULL",
        sha256_hex,
    )
    return None if row is None else _admin_token(row)


_AUDIT_SEQ = itertools.count()


async def add_admin_audit(
    tx: Tx, actor: str, action: str, target: str, before: Any, after: Any
) -> str:
    """Appends an admin write to the audit log, in the write's own transaction."""
    ts = now_ms()
    # Time-ordered and unique; within one millisecond, in this process's order of writing.
    entry_id = f"aa_{ts:012x}{next(_AUDIT_SEQ) & 0xFFFFFFFF:08x}{secrets.token_hex(4)}"
    enc = msgspec.json.encode
    await tx.execute(
        "INSERT INTO admin_audit (id, ts_ms, actor, action, target, before, after) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        entry_id,
        ts,
        actor,
        action,
        target,
        enc(before).decode(),
        enc(after).decode(),
    )
    return entry_id


async def admin_audit_page(tx: Tx, after: tuple[int, str] | None, limit: int) -> list[AdminAudit]:
    """Up to `limit` entries after the (ts_ms, id) position `after`, oldest first."""
    ts, last = after or (-1, "")
    found = await tx.fetch(
        "SELECT id, ts_ms, actor, action, target, before, after FROM admin_audit "
        "WHERE ts_ms > $1 OR (ts_ms = $1 AND id > $2) ORDER BY ts_ms, id LIMIT $3",
        ts,
        last,
        limit,
    )
    dec = msgspec.json.decode
    return [
        AdminAudit(
            id=r[0],
            ts_ms=r[1],
            actor=r[2],
            action=r[3],
            target=r[4],
            before=dec(r[5]),
            after=dec(r[6]),
        )
        for r in found
    ]


async def idempotent_response(tx: Tx, actor: str, key: str) -> IdempotentResponse | None:
    row = await tx.fetchrow(
        "SELECT request_digest, status, response FROM idempotency_keys "
        "WHERE actor = $1 AND key = $2",
        actor,
        key,
    )
    return None if row is None else IdempotentResponse(
        request_digest=row[0], status=row[1], response=row[2]
    )  # fmt: skip


async def record_idempotent(
    tx: Tx, actor: str, key: str, request_digest: str, status: int, response: str
) -> None:
    """Records the response of the request under `key`, in the transaction that did it (a
    concurrent twin fails on the primary key and its transaction, money included, rolls back)."""
    await tx.execute(
        "INSERT INTO idempotency_keys (key, actor, request_digest, status, response, "
        "created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        key,
        actor,
        request_digest,
        status,
        response,
        now_ms(),
    )


async def set_limits_in(tx: Tx, scope: str, name: str, **changes: int | None) -> Limits:
    """Sets (int) or removes (None) the named limits of a key or tenant in `tx` (see
    `Store.set_limits`); returns them all."""
    _check_limits(scope, changes)
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


# -- pages for the admin API: keyset pagination, `limit` rows after a position ------------------


async def tenant_by_id_in(tx: Tx, tenant_id: str) -> Tenant:
    row = await tx.fetchrow("SELECT id, name, created_ms FROM tenants WHERE id = $1", tenant_id)
    if row is None:
        raise NotFound(f"no tenant with id {_quote(tenant_id)}")
    return Tenant(id=row[0], name=row[1], created_ms=row[2])


async def tenants_page_in(tx: Tx, after_name: str | None, limit: int) -> list[Tenant]:
    """Tenants by name, the first `limit` after `after_name`."""
    found = await tx.fetch(
        "SELECT id, name, created_ms FROM tenants WHERE name > $1 ORDER BY name LIMIT $2",
        after_name or "",
        limit,
    )
    return [Tenant(id=r[0], name=r[1], created_ms=r[2]) for r in found]


async def keys_page_in(
    tx: Tx, tenant: str | None, after_id: str | None, limit: int
) -> list[ApiKey]:
    """API keys by id (optionally one tenant's), the first `limit` after `after_id`."""
    if tenant is None:
        found = await tx.fetch(
            f"{_KEY_SELECT} WHERE k.id > $1 ORDER BY k.id LIMIT $2", after_id or "", limit
        )
    else:
        t = await _tenant(tx, tenant)
        found = await tx.fetch(
            f"{_KEY_SELECT} WHERE k.tenant_id = $1 AND k.id > $2 ORDER BY k.id LIMIT $3",
            t.id,
            after_id or "",
            limit,
        )
    return [_key(r) for r in found]


async def active_key_counts_in(tx: Tx, tenant_ids: Sequence[str]) -> dict[str, int]:
    if not tenant_ids:
        return {}
    marks = ", ".join(f"${i}" for i in range(1, len(tenant_ids) + 1))
    found = await tx.fetch(
        f"SELECT tenant_id, COUNT(*) FROM api_keys WHERE revoked_ms IS NULL "
        f"AND tenant_id IN ({marks}) GROUP BY tenant_id",
        *tenant_ids,
    )
    return {r[0]: int(r[1]) for r in found}


_EVENT_COLS = ", ".join(EVENT_FIELDS)


async def usage_page_in(
    tx: Tx,
    *,
    tenant: str | None,
    since_ms: int | None,
    until_ms: int | None,
    after: tuple[int, str] | None,
    limit: int,
) -> list[UsageEvent]:
    """Usage events with since_ms <= ts_ms < until_ms (of one tenant, if given), ordered by
    (ts_ms, request_id) as `Store.iter_events`, the first `limit` after the position `after`."""
    where: list[str] = []
    args: list[Any] = []

    def arg(v: Any) -> str:
        args.append(v)
        return f"${len(args)}"

    if tenant is not None:
        where.append(f"tenant = {arg(tenant)}")
    if since_ms is not None:
        where.append(f"ts_ms >= {arg(since_ms)}")
    if until_ms is not None:
        where.append(f"ts_ms < {arg(until_ms)}")
    if after is not None:
        ts = arg(after[0])
        where.append(f"(ts_ms > {ts} OR (ts_ms = {ts} AND request_id > {arg(after[1])}))")
    sql = f"SELECT {_EVENT_COLS} FROM usage_events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY ts_ms, request_id LIMIT {arg(limit)}"
    out = []
    for row in await tx.fetch(sql, *args):
        fields = dict(zip(EVENT_FIELDS, row, strict=True))
        fields["stream"] = bool(fields["stream"])
        out.append(UsageEvent(**fields))
    return out


async def guard_audit_page(tx: Tx, after: tuple[int, str] | None, limit: int) -> list[AuditEntry]:
    """The gateway's audit log (`Store.audit_entries`: guard throttles, ...), `limit` entries
    after the (ts_ms, id) position `after`, oldest first."""
    ts, last = after or (-1, "")
    found = await tx.fetch(
        "SELECT id, ts_ms, kind, tenant, key_id, details FROM audit_log "
        "WHERE ts_ms > $1 OR (ts_ms = $1 AND id > $2) ORDER BY ts_ms, id LIMIT $3",
        ts,
        last,
        limit,
    )
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], msgspec.json.decode(r[5])) for r in found]


async def codes_page_in(
    tx: Tx, after: tuple[int, str] | None, limit: int
) -> list[tuple[str, str, int, str, int | None, int, str | None, int | None, str | None]]:
    """Redemption codes as (sha256, prefix, amount, currency, expires_ms, created_ms,
    redeemed_by, redeemed_ms, txn_id), ordered by (created_ms, sha256), the first `limit`
    after the position `after`. Only the SHA-256 and the first 8 characters of a code are
    stored: a listing cannot show a code."""
    ts, last = after or (-1, "")
    rows = await tx.fetch(
        "SELECT sha256, prefix, amount, currency, expires_ms, created_ms, redeemed_by, "
        "redeemed_ms, txn_id FROM redemption_codes "
        "WHERE created_ms > $1 OR (created_ms = $1 AND sha256 > $2) "
        "ORDER BY created_ms, sha256 LIMIT $3",
        ts,
        last,
        limit,
    )
    return [(r[0], r[1], int(r[2]), r[3], r[4], int(r[5]), r[6], r[7], r[8]) for r in rows]


async def overruns_in(tx: Tx) -> list[tuple[str, str, int]]:
    """Every tenant's overrun (usage no contract covered, owed by the tenant) per currency, as
    (tenant, currency, nanos owed), the non-zero ones, by tenant and currency. An overrun
    account is unconstrained: its balance is the sum of its postings (debit-positive: what the
    tenant owes)."""
    # A correlated sum per overrun account: one postings_account index range each (a JOIN
    # let PostgreSQL's planner hash the whole postings table: 160 ms with 1M events).
    rows = await tx.fetch(
        "SELECT a.tenant, a.unit, (SELECT COALESCE(SUM(p.amount), 0) FROM postings p "
        "WHERE p.account = a.id) FROM accounts a WHERE a.kind = 'overrun' "
        "ORDER BY a.tenant, a.unit"
    )
    found: dict[tuple[str, str], int] = {}
    for tenant, unit, owed in rows:
        found[(tenant, unit)] = found.get((tenant, unit), 0) + int(owed)
    return [(t, u, v) for (t, u), v in found.items() if v]
