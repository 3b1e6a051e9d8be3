"""Rate-limit shares across hosts: the pure split (tokenhub.gateway.shares) and the Redis board
(tokenhub.runtime.shares) with three boards standing for hosts A, B and C.

The board tests need the throwaway redis-server `make test` starts (scripts/test-redis), passed
in TOKENHUB_TEST_REDIS_URL. Without it they skip, or fail when TOKENHUB_REQUIRE_REDIS=1 (as
.ci/run sets). Each test works under its own key prefix, so runs never see each other's hosts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import RedisError

from tokenhub.gateway.shares import fair_shares, static_share
from tokenhub.runtime.shares import ShareBoard

# --- the pure split ---------------------------------------------------------------------------

HOST_IDS = st.text("ABCDEFGHxyz0123456789", min_size=1, max_size=4)


@settings(deadline=None)  # pure and fast, but a loaded machine must not fail it on time
@given(
    limit=st.integers(0, 10**9),
    demands=st.dictionaries(HOST_IDS, st.integers(-5, 10**9), min_size=1, max_size=12),
)
def test_shares_never_sum_over_the_limit_and_keep_the_floor(
    limit: int, demands: dict[str, int]
) -> None:
    shares = fair_shares(limit, demands)
    assert set(shares) == set(demands)
    assert sum(shares.values()) <= limit
    floor = limit // len(demands)
    for host, demand in demands.items():
        assert shares[host] >= 0
        # A host never gets less than the even floor, unless it asked for less than that.
        assert shares[host] >= min(max(demand, 0), floor)
        if demand >= floor:
            assert shares[host] >= floor
    # Everything is handed out (as demand or headroom): no share of R is wasted.
    assert sum(shares.values()) == limit
    # When all demand fits, every host gets at least what it asked for.
    if sum(max(d, 0) for d in demands.values()) <= limit:
        assert all(shares[h] >= d for h, d in demands.items())


@settings(deadline=None)
@given(limit=st.integers(-10, 10**9), hosts=st.integers(1, 64))
def test_static_shares_never_sum_over_the_limit(limit: int, hosts: int) -> None:
    share = static_share(limit, hosts)
    assert 0 <= share * hosts <= max(limit, 0)
    assert share == max(limit, 0) // hosts


def test_skewed_demand_moves_share_to_the_busy_host() -> None:
    assert fair_shares(600, {"A": 100, "B": 100, "C": 100}) == {"A": 200, "B": 200, "C": 200}
    assert fair_shares(600, {"A": 1000, "B": 10, "C": 300}) == {"A": 295, "B": 10, "C": 295}
    assert fair_shares(600, {"A": 1000, "B": 1000, "C": 1000}) == {"A": 200, "B": 200, "C": 200}
    assert fair_shares(600, {}) == {}
    with pytest.raises(ValueError):
        static_share(600, 0)


# --- the Redis board --------------------------------------------------------------------------


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in {"", "0", "false", "no"}


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of the tests' redis-server, checked to answer."""
    url = os.environ.get("TOKENHUB_TEST_REDIS_URL", "")
    missing = pytest.fail if _flag("TOKENHUB_REQUIRE_REDIS") else pytest.skip
    if not url:
        missing("TOKENHUB_TEST_REDIS_URL is not set: run `make test` or scripts/test-redis start")

    async def ping() -> None:
        client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        # On a private loop in another thread: this fixture may be set up inside a running loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, ping()).result()
    except (RedisError, OSError) as exc:
        missing(f"Redis at {url} does not answer: {exc!r}")
    return url


Boards = Callable[..., ShareBoard]


@pytest.fixture
async def boards(redis_url: str) -> AsyncIterator[Boards]:
    """Makes boards on the test server under a prefix of this test's own; closes them and
    deletes the prefix's keys afterwards."""
    prefix = f"tokenhub-test:{uuid.uuid4().hex}"
    made: list[ShareBoard] = []

    def make(host: str, *, url: str = redis_url, hosts: int = 3, ttl: float = 30.0) -> ShareBoard:
        board = ShareBoard(url, host, hosts=hosts, ttl=ttl, timeout=5.0, prefix=prefix)
        made.append(board)
        return board

    yield make
    for board in made:
        await board.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _round(
    boards: dict[str, ShareBoard], key: str, limit: int, demand: dict[str, int]
) -> dict[str, int]:
    """Every host reports once; then every host reports again, so all read the same board."""
    for host, board in boards.items():
        await board.report(key, limit, demand[host])
    shares = {}
    for host, board in boards.items():
        share = await board.report(key, limit, demand[host])
        assert share.coordinated
        assert share.demands == demand
        shares[host] = share.amount
    return shares


async def test_three_hosts_converge_to_shares_within_the_limit(boards: Boards) -> None:
    hosts = {h: boards(h) for h in "ABC"}
    even = await _round(hosts, "key:1:rpm", 600, {"A": 200, "B": 200, "C": 200})
    assert even == {"A": 200, "B": 200, "C": 200}
    # Repeated reports (a retried or replayed write) change nothing: keyed by host id.
    again = await _round(hosts, "key:1:rpm", 600, {"A": 200, "B": 200, "C": 200})
    assert again == even
    # Skewed demand moves the share to the busy host; the quiet ones keep what they asked for.
    skewed = await _round(hosts, "key:1:rpm", 600, {"A": 900, "B": 50, "C": 100})
    assert skewed == {"A": 450, "B": 50, "C": 100}
    assert sum(skewed.values()) <= 600
    # And back: the floor R/N returns to every host that wants it.
    hot = await _round(hosts, "key:1:rpm", 600, {"A": 900, "B": 900, "C": 900})
    assert hot == {"A": 200, "B": 200, "C": 200}
    # Another limit key is a board of its own.
    other = await _round(hosts, "tenant:t:rpm", 7, {"A": 0, "B": 5, "C": 0})
    assert sum(other.values()) <= 7
    assert other["B"] >= 5 // 3


async def test_a_host_that_stops_reporting_is_dropped_after_its_ttl(boards: Boards) -> None:
    ttl = 2.0
    a, b, c = boards("A"), boards("B"), boards("C", ttl=ttl)
    await a.report("k", 600, 600)
    await b.report("k", 600, 600)
    started = time.monotonic()
    await c.report("k", 600, 600)
    seen = await a.report("k", 600, 600)
    if time.monotonic() - started < ttl:  # only a stall longer than the TTL could drop C here
        assert set(seen.demands) == {"A", "B", "C"}
        assert seen.amount == 200
    # C reports no more: within a bounded wait (not before its TTL) A and B split R alone.
    deadline = started + 60
    while True:
        seen = await a.report("k", 600, 600)
        if "C" not in seen.demands:
            break
        assert time.monotonic() < deadline, "C was never dropped"
        await asyncio.sleep(0.1)
    assert time.monotonic() - started >= ttl * 0.9
    assert set(seen.demands) == {"A", "B"}
    assert seen.amount == 300
    assert (await b.report("k", 600, 600)).amount == 300
    # C coming back takes its share again at the next report.
    assert (await c.report("k", 600, 600)).amount == 200


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening for the whole test: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_without_redis_every_board_falls_back_to_the_static_share(closed_port: int) -> None:
    down = f"redis://127.0.0.1:{closed_port}/0"
    made: list[ShareBoard] = []

    def board(host: str, hosts: int = 3) -> ShareBoard:
        made.append(ShareBoard(down, host, hosts=hosts, timeout=5.0))
        return made[-1]

    try:
        hosts = [board(h) for h in "ABC"]
        for demand in (0, 50, 10**6):
            shares = [await b.report("k", 601, demand) for b in hosts]
            assert all(not s.coordinated and s.demands == {} for s in shares)
            assert [s.amount for s in shares] == [200, 200, 200]
        # The configured cluster size decides the fallback, not who happens to be up.
        assert (await board("D", hosts=4).report("k", 601, 1)).amount == 150
        assert (await board("E", hosts=1).report("k", 601, 1)).amount == 601
    finally:
        for b in made:
            await b.close()


def test_board_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        ShareBoard("redis://127.0.0.1:1/0", "", hosts=3)
    with pytest.raises(ValueError):
        ShareBoard("redis://127.0.0.1:1/0", "A", hosts=0)
    with pytest.raises(ValueError):
        ShareBoard("redis://127.0.0.1:1/0", "A", hosts=3, ttl=0)
