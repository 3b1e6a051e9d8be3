"""Fixtures of the admin API tests: a real database (SQLite, and PostgreSQL when the test server
is there; migrated by the store), one admin token per scope, and the admin app on aiohttp's test
server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from admin_kit import Admin

from tokenhub.admin.app import build_admin_app
from tokenhub.store import open_store


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def admin(
    request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client: Any
) -> AsyncIterator[Admin]:
    """The admin API on SQLite and on a fresh PostgreSQL database of the test server."""
    if request.param == "postgresql":
        db = str(request.getfixturevalue("pg_database"))
    else:
        db = str(tmp_path / "admin.db")
    store = open_store(db)
    store.migrate()
    tokens = {s: store.create_admin_token(f"ops-{s}", s)[1] for s in ("read", "billing", "admin")}
    client = await aiohttp_client(build_admin_app(db))
    try:
        yield Admin(client, store, db, tokens)
    finally:
        await client.close()  # closes the app's database before the test's goes
        store.close()
