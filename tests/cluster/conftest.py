"""Fixtures of the cluster tests (tests/cluster/cluster_kit.py): the session's own PostgreSQL,
Redis, mock upstream and (as root) network namespace, and a fresh three-host cluster per test.

What a machine lacks (PostgreSQL or redis-server not installed, no root for the namespace) makes
the tests that need it skip, except in CI (TOKENHUB_REQUIRE_PG=1, as .ci/run sets, or CI), where
it is a broken set-up and they fail.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_kit import (
    PG_PORT,
    REDIS_PORT,
    Cluster,
    Netns,
    Postgres,
    Redis,
    Services,
    in_ci,
    netns_problem,
    pg_bindir,
    session_lock,
    start_mock,
)
from procs import Procs

SCRIPTS = Path(__file__).parents[2] / "scripts"


def missing(why: str) -> None:
    (pytest.fail if in_ci() else pytest.skip)(why)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    bindir = pg_bindir()
    if bindir is None:
        missing("PostgreSQL is not installed (scripts/test-postgres start installs it as root)")
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (scripts/test-redis start installs it as root)")
    if os.getuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing("no 'postgres' user to run PostgreSQL as (initdb refuses root)")
    assert bindir is not None
    tmp = tmp_path_factory.mktemp("cluster")
    with session_lock(), contextlib.ExitStack() as stack:
        netns = Netns() if netns_problem() is None else None
        if netns is not None:
            stack.callback(netns.close)
        addresses = ["127.0.0.1", *([netns.host_addr] if netns else [])]
        pg = Postgres(bindir, Path(f"/tmp/tokenhub-cluster-pg-{PG_PORT}"), PG_PORT, addresses,
                      [netns.ns_addr] if netns else [])  # fmt: skip
        stack.callback(pg.stop)
        pg.start()
        redis = Redis(Path(f"/tmp/tokenhub-cluster-redis-{REDIS_PORT}"), REDIS_PORT, addresses)
        stack.callback(redis.stop)
        redis.start()
        procs = Procs(tmp)
        stack.callback(procs.close)
        mock = start_mock(procs, addresses[-1])
        yield Services(tmp, pg, redis, mock, netns, procs)


@pytest.fixture
def cluster(services: Services, tmp_path: Path) -> Iterator[Cluster]:
    """Three hosts (not started) on a fresh database of the session's server; afterwards the
    hosts are killed if still running, PostgreSQL thawed, Redis restarted if a test left it
    stopped, and the database dropped."""
    name = f"cluster_{uuid.uuid4().hex[:12]}"
    services.pg.create_database(name)
    c = Cluster(services, tmp_path, name)
    try:
        yield c
    finally:
        services.pg.thaw()
        if not services.redis.ping():
            services.redis.start()
        c.close()
        services.pg.drop_database(name)


@pytest.fixture
def partitionable(services: Services) -> Netns:
    """The namespace host C runs in, with a working iptables (installed as root by
    scripts/test-iptables when missing)."""
    if services.netns is None:
        missing(f"no network namespace for host C: {netns_problem()}")
    assert services.netns is not None
    if not services.netns.iptables:
        out = subprocess.run([str(SCRIPTS / "test-iptables"), "ensure"], capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        if out.returncode != 0:
            missing(f"no working iptables: {out.stderr.strip()}")
        services.netns.iptables = out.stdout.strip()
    return services.netns
