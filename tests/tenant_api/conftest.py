"""Fixtures of the tenant API tests: the gateway's test hub (tests/server/harness.py: mock
upstreams and a real gateway on 127.0.0.1, SQLite and PostgreSQL) with four tenants whose
billing terms, lots and usage are seeded through the billing service:

- acme (the hub's own tenant): CNY, credit line 50, FX CNY/USD 0.14, wallet topped up by 100,
  a 1000-token package for qwen-plus bought for 10; usage three days ago: 1M in + 500k out of
  gpt-4o-mini at 2/8 CNY per 1M (6 CNY from the wallet), a day later 150 tokens of qwen-plus
  (from the package) and a refused request.
- bravo: USD, wallet 5, one event; the "other tenant" of the isolation tests.
- charlie: EUR, no EUR/USD rate (the legacy endpoints cannot answer in USD).
- delta: no money, for the key-count policy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator

import pytest
from tenant_kit import Hub, World, seed, wait_until


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with_pg = request.param == "postgresql"
    cm = request.getfixturevalue("pg_databases")() if with_pg else None
    url = cm.__enter__() if cm is not None else None
    try:
        hub = Hub(tmp_path_factory.mktemp("tenant_api"), database=url)
        try:
            secrets, key_ids = {"acme": hub.secret}, {"acme": hub.key_id}
            for t in ("bravo", "charlie", "delta"):
                hub.store.create_tenant(t)
                key, secrets[t] = hub.store.create_key(t)
                key_ids[t] = key.id
            day0 = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=3)
            w = World(hub, secrets, key_ids, day0)
            asyncio.run(seed(w))
            for s in secrets.values():  # the gateway's key table has them (~0.5 s refresh)
                wait_until(lambda s=s: hub.knows(s), 5.0, what="the new keys")
            yield w
        finally:
            hub.close()
    finally:
        if cm is not None:
            cm.__exit__(None, None, None)
