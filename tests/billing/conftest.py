"""Billing fixtures: a ledger database on each backend, and a `Billing` over it.

`ledger_url` runs a test once on SQLite (a file in tmp_path) and once on PostgreSQL (a fresh
database from the `pg_database` fixture, skipped when no test server is configured: see
tests/conftest.py and scripts/test-postgres).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokenhub.billing.service import Billing
from tokenhub.db.database import open_database


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
async def billing(ledger_url: str) -> AsyncIterator[Billing]:
    """A `Billing` over a fresh, migrated database. After the test, the books must be sound:
    `check_invariants()` finds nothing."""
    db = await open_database(ledger_url)
    b = Billing(db)
    try:
        yield b
        assert await b.invariants() == []
    finally:
        await db.close()
