"""Fixtures for the gateway's end-to-end tests: one hub of real servers for the session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
from harness import Hub
from procs import Procs, mock_process


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub"))
    try:
        yield h
    finally:
        h.close()


# The database engines the end-to-end tests run on: SQLite, and PostgreSQL on a fresh database
# of the test server (TOKENHUB_TEST_PG_DSN; without one the postgresql cases skip, see
# tests/conftest.py).
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=ENGINES)
def engine_hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hub]:
    """The session's hub (SQLite), then a hub of the module's own on PostgreSQL: a module
    that defines `hub` as this fixture runs every test on both engines."""
    if request.param == "sqlite":
        yield request.getfixturevalue("hub")
        return
    with request.getfixturevalue("pg_databases")() as url:
        h = Hub(tmp_path_factory.mktemp("pghub"), database=url)
        try:
            yield h
        finally:
            h.close()


@pytest.fixture(params=ENGINES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The database of a test run on both engines: a SQLite file in tmp_path, or the URL of
    a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "hub.db")
    else:
        yield request.getfixturevalue("pg_database")


@pytest.fixture(autouse=True)
def _fresh_routing(request: pytest.FixtureRequest) -> None:
    """Router state (circuit breakers, affinity, SWRR positions) starts afresh for each test
    that uses the session's hub, so that one test's failures do not route another's."""
    if "hub" in request.fixturenames:
        hub: Hub = request.getfixturevalue("hub")
        hub.gateway.reset_routing()


@pytest.fixture
def fresh_hub(tmp_path: Path) -> Iterator[Hub]:
    """A hub of its own: empty database and ledgers, for tests that reconcile totals."""
    h = Hub(tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def client(hub: Hub) -> Iterator[openai.OpenAI]:
    with hub.client() as c:
        yield c


@pytest.fixture
async def aclient(hub: Hub) -> AsyncIterator[openai.AsyncOpenAI]:
    async with hub.aclient() as c:
        yield c


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real `tokenhub` processes (tests/server/procs.py), killed with their groups at the end."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tokenhub mock-upstream` as a process (100 ms a request, so requests overlap) for the
    real-process tests of a module; a module that needs another one defines its own."""
    tmp = tmp_path_factory.mktemp("mock")
    with mock_process(tmp, "--latency-ms", "100", "--model", "gpt-4o-mini") as base:
        yield base
