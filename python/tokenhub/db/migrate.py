"""The migration runner over `tokenhub.db.database` (SQLite and PostgreSQL): the schema of
`tokenhub.db.schema`, each migration once, recorded in schema_migrations.

The gateway's synchronous SQLite store (tokenhub.store.sqlite) still runs the same migrations
with its own loop over a sqlite3 connection; it goes when the store moves onto `db.Tx`
(issue 12, step "one persistence layer").
"""

from __future__ import annotations

import time
from typing import Any

from tokenhub.db.database import Database, Tx
from tokenhub.db.schema import CREATE_MIGRATIONS_TABLE, MIGRATIONS


async def apply_migrations(db: Database) -> list[int]:
    """Applies the migrations `db` has not recorded, each in a transaction of its own; returns
    the versions applied now."""

    async def current(tx: Tx) -> set[int]:
        await tx.execute(CREATE_MIGRATIONS_TABLE)
        return {r[0] for r in await tx.fetch("SELECT version FROM schema_migrations")}

    done = await db.transaction(current)
    applied: list[int] = []
    for m in MIGRATIONS:
        if m.version in done:
            continue

        async def apply(tx: Tx, m: Any = m) -> None:
            for stmt in m.statements:
                await tx.execute(stmt)
            await tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
                m.version,
                m.name,
                int(time.time() * 1000),
            )

        await db.transaction(apply)
        applied.append(m.version)
    return applied
