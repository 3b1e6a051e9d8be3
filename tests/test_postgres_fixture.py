"""The PostgreSQL set-up the ledger tests stand on: scripts/test-postgres and the fixtures in
conftest.py (``pg_dsn``, ``pg_database``)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

# current_database() of each test that ran test_each_test_gets_a_fresh_database, in order.
_seen_databases: list[str] = []


async def test_round_trip(pg_database: str) -> None:
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("CREATE TABLE usage (id bigint PRIMARY KEY, nano_usd bigint NOT NULL)")
        await conn.executemany("INSERT INTO usage VALUES ($1, $2)", [(1, 1_500_000_000), (2, 7)])
        rows = await conn.fetch("SELECT id, nano_usd FROM usage ORDER BY id")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [(1, 1_500_000_000), (2, 7)]


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_a_fresh_database(pg_database: str, run: int) -> None:
    conn = await asyncpg.connect(pg_database)
    try:
        name = await conn.fetchval("SELECT current_database()")
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        await conn.execute("CREATE TABLE left_behind (x int)")
        # The databases of earlier tests were dropped when those tests ended.
        earlier = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1::text[])", _seen_databases
        )
    finally:
        await conn.close()
    assert tables == 0
    assert name not in _seen_databases
    assert earlier == 0
    _seen_databases.append(name)


def test_sync_tests_can_use_it_too(pg_database: str) -> None:
    async def count_tables() -> int:
        conn = await asyncpg.connect(pg_database)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM pg_tables"))
        finally:
            await conn.close()

    assert asyncio.run(count_tables()) > 0  # the catalog's own tables


async def test_server_is_configured_for_tests(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in (
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "max_connections",
                "listen_addresses",
                "server_encoding",
            )
        }
        version = conn.get_server_version()
    finally:
        await conn.close()
    assert settings == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        "listen_addresses": "127.0.0.1",
        "server_encoding": "UTF8",
    }
    assert version.major >= 13  # DROP DATABASE ... WITH (FORCE)


async def test_150_concurrent_connections(pg_database: str) -> None:
    """The ledger tests settle 100 requests at once, each on its own connection."""
    n = 150
    conns = await asyncio.gather(*(asyncpg.connect(pg_database) for _ in range(n)))
    try:
        pids = await asyncio.gather(*(c.fetchval("SELECT pg_backend_pid()") for c in conns))
        open_here = await conns[0].fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert len(set(pids)) == n
    assert open_here == n
