"""Fixtures of the console tests: a seeded SQLite database (console_kit.seed: tenants, keys,
prices, a plan, settled usage, users of every role; seeded once per session, copied per test),
the admin app on aiohttp's test server, and signed-in clients.

    async def test_x(console_client, post_form, world):
        admin = await console_client("admin")            # or "billing", "read"
        tenant = await console_client("tenant", tenant="acme")
        anon = await console_client(None)                # not signed in
        resp = await post_form(admin, "/console/tenants/new", {"name": "zeta"})
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from console_kit import ROLE_USER, TENANT_USER, World, seed, sign_in
from console_kit import post_form as _post_form

from tokenhub.admin.app import build_admin_app


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> World:
    path = tmp_path_factory.mktemp("console_seed") / "seed.db"
    return asyncio.run(seed(str(path)))


@pytest.fixture
def world(seeded: World, tmp_path: Path) -> World:
    """This test's own copy of the seeded database (writes stay in the test)."""
    path = tmp_path / "console.db"
    shutil.copyfile(seeded.db, path)
    return World(
        db=str(path),
        tenant_ids=dict(seeded.tenant_ids),
        key_ids=dict(seeded.key_ids),
        secrets=dict(seeded.secrets),
        lot_id=seeded.lot_id,
        day0=seeded.day0,
        codes=list(seeded.codes),
    )


ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def console_server(world: World) -> AsyncIterator[TestServer]:
    server = TestServer(build_admin_app(world.db))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def console_client(console_server: TestServer) -> AsyncIterator[ClientFactory]:
    """`await console_client(role, tenant=...)`: a new client signed in as the seeded user of
    that role ("admin", "billing", "read", "tenant" with tenant "acme" or "bravo"; None: not
    signed in). Its CSRF token is `client.csrf`."""
    made: list[TestClient[Any, Any]] = []

    async def make(role: str | None, tenant: str = "acme") -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(console_server)
        await client.start_server()
        made.append(client)
        if role == "tenant":
            await sign_in(client, TENANT_USER[tenant])
        elif role is not None:
            await sign_in(client, ROLE_USER[role])
        return client

    try:
        yield make
    finally:
        for c in made:
            await c._session.close()  # the server is the fixture's: closed once, after


@pytest.fixture
def post_form() -> Callable[..., Any]:
    """`await post_form(client, path, data, follow=False)`: console_kit.post_form."""
    return _post_form
