"""The one migration runner, over `tokenhub.db.database.Tx` on SQLite and PostgreSQL: the
schema of `tokenhub.db.schema`, each migration once, recorded in schema_migrations.

Every opener uses it: billing's `open_database`, the gateway's store on SQLite (which drives
`migrate_tx` over its own sqlite3 connection) and on PostgreSQL, `tokenhub serve`, the CLI.

- **One transaction, under a lock**: SQLite's `BEGIN IMMEDIATE` write lock, PostgreSQL's
  transaction-scoped advisory lock, so that processes starting together (forked workers, the
  settler, a CLI command) apply each migration once and the loser waits, then finds nothing to
  do. Both engines run DDL inside a transaction, so a failed migration leaves nothing behind.
- **A newer schema is refused**: a database migrated by a later tokenhub is not written by an
  older one (SchemaTooNew).
- **Up to date costs a read**: `up_to_date` looks first without the write lock, so a command
  opening a busy database does not queue behind its writers.
"""

from __future__ import annotations

import time

from tokenhub.db.database import Database, DatabaseError, Tx, redacted
from tokenhub.db.schema import CREATE_MIGRATIONS_TABLE, LATEST_VERSION, MIGRATIONS

# pg_advisory_xact_lock key of the runner: "tokenhub" read as a number, unlikely to collide.
_PG_LOCK = 0x746F6B656E687562 - 2**63


class SchemaTooNew(DatabaseError):
    """The database has migrations this tokenhub does not know."""


async def _versions(tx: Tx) -> set[int] | None:
    """The applied versions, or None when there is no schema_migrations table yet."""
    if tx.dialect == "postgresql":
        found = await tx.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    else:
        found = await tx.fetchval(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        )
    if not found:
        return None
    return {int(r[0]) for r in await tx.fetch("SELECT version FROM schema_migrations")}


def _check_not_newer(applied: set[int], where: str) -> None:
    if applied and max(applied) > LATEST_VERSION:
        raise SchemaTooNew(
            f"database {where} has schema version {max(applied)}, newer than this tokenhub "
            f"knows ({LATEST_VERSION}): upgrade tokenhub"
        )


async def up_to_date(tx: Tx, where: str = "") -> bool:
    """Every migration is applied (read only; SchemaTooNew for a newer schema). `where` names
    the database in errors (`where_is(url)`)."""
    applied = await _versions(tx)
    if applied is None:
        return False
    _check_not_newer(applied, where)
    return applied >= {m.version for m in MIGRATIONS}


async def migrate_tx(tx: Tx, where: str = "") -> list[int]:
    """Applies, inside the caller's (write) transaction, what `tx`'s database has not
    recorded; returns the versions applied now. `where` names the database in errors."""
    # Under the lock from the first statement: two PostgreSQL sessions creating the
    # migrations table at once would otherwise collide on its catalog row.
    if tx.dialect == "postgresql":
        await tx.execute(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
    await tx.execute(CREATE_MIGRATIONS_TABLE)
    applied = await _versions(tx) or set()  # again, under the lock
    _check_not_newer(applied, where)
    done: list[int] = []
    for m in MIGRATIONS:
        if m.version in applied:
            continue
        for stmt in m.statements:
            await tx.execute(stmt)
        await tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
            m.version,
            m.name,
            time.time_ns() // 1_000_000,
        )
        done.append(m.version)
    return done


async def apply_migrations(db: Database) -> list[int]:
    """Brings `db` up to date; returns the versions applied now."""
    where = where_is(db.url)
    if await db.read(lambda tx: up_to_date(tx, where)):
        return []
    return await db.transaction(lambda tx: migrate_tx(tx, where))


def where_is(url: str) -> str:
    """The database for a message: quoted, a URL without its password."""
    return repr(redacted(url))
