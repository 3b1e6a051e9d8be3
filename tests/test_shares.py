"""Rate-limit shares across hosts: the pure split (tokenhub.gateway.shares), the Redis board
(tokenhub.runtime.shares) with three boards standing for hosts A, B and C, and the keeper that
holds each host's local limits at its share: three simulated hosts (a quota table and a keeper
each, one clock moved by the test) whose limits in force never sum over R after any tick, with
Redis up, stopped (static shares) and restarted empty (recovered), and the limit sync that
leaves the share in place.

The board tests need the throwaway redis-server `make test` starts (scripts/test-redis), passed
in TOKENHUB_TEST_REDIS_URL. Without it they skip, or fail when TOKENHUB_REQUIRE_REDIS=1 (as
.ci/run sets). Each test works under its own key prefix, so runs never see each other's hosts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import RedisError

from tokenhub.gateway.limits import LimitSync
from tokenhub.gateway.shares import board_shares, fair_shares, quiet_share, static_share
from tokenhub.quota import Quota, Refusal
from tokenhub.runtime.shares import LEAVE_AFTER_S, ShareBoard, ShareKeeper
from tokenhub.store import LimitRow, Limits

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
    # C reports no more: within a bounded wait (not before its TTL) it leaves the board.
    deadline = started + 60
    while True:
        seen = await a.report("k", 600, 600)
        if "C" not in seen.demands:
            break
        assert time.monotonic() < deadline, "C was never dropped"
        await asyncio.sleep(0.1)
    assert time.monotonic() - started >= ttl * 0.9
    assert set(seen.demands) == {"A", "B"}
    # Unseen (cut off from the board, as far as A and B can tell) C is counted at the static
    # share it would take: A and B split the rest. Once the cluster counts 2 hosts (C down in
    # cluster_hosts), they split the whole limit.
    assert seen.amount == 200
    a.hosts = b.hosts = 2
    assert (await a.report("k", 600, 600)).amount == 300
    assert (await b.report("k", 600, 600)).amount == 300
    # C coming back takes its share again at the next report.
    a.hosts = b.hosts = 3
    assert (await c.report("k", 600, 600)).amount == 200
    assert (await a.report("k", 600, 600)).amount == 200


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


# --- the split as the board gives it ------------------------------------------------------------


@settings(deadline=None)
@given(
    limit=st.integers(0, 10**7),
    hosts=st.integers(1, 12),
    unseen=st.integers(0, 12),
    quiet=st.integers(0, 12),
    demands=st.lists(st.integers(-5, 10**7), min_size=1, max_size=12),
)
def test_board_shares_and_what_the_others_keep_sum_to_the_limit_at_most(
    limit: int, hosts: int, unseen: int, quiet: int, demands: list[int]
) -> None:
    """Reporters get board_shares; quiet hosts (present, not reporting) keep quiet_share; the
    unseen keep static_share: together never more than the limit."""
    reporting = {f"h{i}": d for i, d in enumerate(demands)}
    present = len(reporting) + quiet
    n = max(hosts, present + unseen)
    shares = board_shares(limit, n, present, reporting)
    assert set(shares) == set(reporting)
    kept = quiet * quiet_share(limit, n) + (n - present) * static_share(limit, n)
    assert sum(shares.values()) + kept <= max(limit, 0)
    for host, demand in reporting.items():
        assert shares[host] >= min(max(demand, 0), static_share(limit, n))
    assert 0 <= quiet_share(limit, n) <= static_share(limit, n)
    if static_share(limit, n):
        assert quiet_share(limit, n) >= 1


# --- the keeper: each host's local limits at its share ------------------------------------------

R_RPM, R_TPM, R_CONC = 600, 60_000, 30
TOTALS = {"key:k": {"rpm": R_RPM, "tpm": R_TPM, "concurrent": R_CONC}}


class Clock:
    """The keepers' clock, moved by the test: one tick a second, however fast the test runs."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Host:
    """A simulated host: its own quota table and keeper (what worker 1 of `serve` runs)."""

    def __init__(
        self,
        name: str,
        clock: Clock,
        board: ShareBoard | None,
        *,
        hosts: Callable[[], int] = lambda: 3,
        totals: Callable[[], Mapping[str, Mapping[str, int]]] = lambda: TOTALS,
    ) -> None:
        self.name = name
        self.quota = Quota.anonymous(accounts=64, reservations=1024)
        self.keeper = ShareKeeper(self.quota, totals, hosts, board, clock=clock)
        for account, kinds in totals().items():
            self.quota.set_limits(
                account, **{k: self.keeper.local_limit(account, k, r) for k, r in kinds.items()}
            )

    def send(self, n: int, *, tokens: int = 50) -> None:
        """`n` requests of `tokens` tokens on key:k: admitted ones are settled at once."""
        for _ in range(n):
            r = self.quota.reserve("key:k", tokens=tokens)
            if not isinstance(r, Refusal):
                self.quota.settle(r, tokens=tokens)

    def local(self, kind: str = "rpm") -> int | None:
        return self.quota.limits("key:k")[kind]


def _sums(hosts: Mapping[str, Host]) -> dict[str, int]:
    out = {}
    for kind in ("rpm", "tpm", "concurrent"):
        values = [h.local(kind) for h in hosts.values()]
        assert all(v is not None for v in values), f"{kind} left unlimited: {values}"
        out[kind] = sum(v for v in values if v is not None)
    return out


async def _second(clock: Clock, hosts: Mapping[str, Host], traffic: Mapping[str, int]) -> None:
    """One second: the traffic, then every host ticks; after EVERY tick the shares in force
    sum to R at most (rpm, tpm and concurrency)."""
    for name, n in traffic.items():
        hosts[name].send(n)
    clock.t += 1.0
    for host in hosts.values():
        await host.keeper.tick()
        sums = _sums(hosts)
        assert sums["rpm"] <= R_RPM and sums["tpm"] <= R_TPM and sums["concurrent"] <= R_CONC, (
            sums,
            {
                h.name: (h.local("rpm"), h.local("tpm"), h.local("concurrent"))
                for h in hosts.values()
            },
        )


async def _close(hosts: Mapping[str, Host]) -> None:
    for host in hosts.values():
        await host.keeper.close()


async def test_three_keepers_move_a_limit_to_the_busy_host_and_never_exceed_it(
    redis_url: str,
) -> None:
    prefix = f"tokenhub-test:{uuid.uuid4().hex}"
    clock = Clock()
    hosts = {
        h: Host(h, clock, ShareBoard(redis_url, h, hosts=3, timeout=5.0, prefix=prefix))
        for h in "ABC"
    }
    quiet_rpm = quiet_share(R_RPM, 3)  # 25
    try:
        # Before any traffic every host keeps the quiet share, and reports nothing.
        await _second(clock, hosts, {})
        assert [h.local() for h in hosts.values()] == [quiet_rpm] * 3
        assert all(h.keeper.stats()["reporting"] == 0 for h in hosts.values())
        # All the traffic on A: within a few ticks A holds what the quiet hosts leave.
        for _ in range(4):
            await _second(clock, hosts, {"A": 20})
        assert hosts["A"].local() == R_RPM - 2 * quiet_rpm
        assert hosts["A"].local("tpm") == R_TPM - 2 * quiet_share(R_TPM, 3)
        assert hosts["B"].local() == hosts["C"].local() == quiet_rpm
        assert all(h.keeper.coordinated for h in hosts.values())
        # The load balancer moves it all to C: A keeps its share until it has been quiet for
        # LEAVE_AFTER_S, then cuts, leaves, and C gets it. Never over R on the way.
        rounds = 0
        while hosts["C"].local() != R_RPM - 2 * quiet_rpm:
            await _second(clock, hosts, {"C": 20})
            rounds += 1
            assert rounds <= LEAVE_AFTER_S + 12, [h.local() for h in hosts.values()]
        for _ in range(2):  # A's raise back to the quiet share waits 1.5 ticks
            await _second(clock, hosts, {"C": 20})
        assert hosts["A"].local() == quiet_rpm
        assert hosts["C"].local() == R_RPM - 2 * quiet_rpm
        # Everyone busy: the even split.
        for _ in range(4):
            await _second(clock, hosts, {"A": 20, "B": 20, "C": 20})
        assert [h.local() for h in hosts.values()] == [R_RPM // 3] * 3
    finally:
        await _close(hosts)


async def test_without_redis_each_host_takes_the_static_share_of_the_live_hosts() -> None:
    clock = Clock()
    n = 3
    hosts = {h: Host(h, clock, None, hosts=lambda: n) for h in "ABC"}
    try:
        await _second(clock, hosts, {"A": 20})
        assert [h.local() for h in hosts.values()] == [200] * 3  # skewed load: 429s on A
        assert all(not h.keeper.coordinated for h in hosts.values())
        # C goes down (cluster_hosts): A and B take half each, 1.5 ticks after they saw it.
        n = 2
        del hosts["C"]
        for _ in range(2):
            await _second(clock, hosts, {})
            assert [h.local() for h in hosts.values()] == [200, 200]
        await _second(clock, hosts, {})
        assert [h.local() for h in hosts.values()] == [300, 300]
        # A host coming back: cut at once.
        n = 3
        await _second(clock, hosts, {})
        assert [h.local() for h in hosts.values()] == [200, 200]
    finally:
        await _close(hosts)


class RedisServer:
    """A redis-server of this test's own (scripts/test-redis's settings: loopback, no
    persistence), to stop and restart empty on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            (pytest.fail if _flag("TOKENHUB_REQUIRE_REDIS") else pytest.skip)(
                "redis-server is not installed (scripts/test-redis start installs it)"
            )
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not answer within 30 s"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_stopped_means_static_shares_and_restarted_empty_they_recover(
    own_redis: RedisServer,
) -> None:
    clock = Clock()
    hosts = {h: Host(h, clock, ShareBoard(own_redis.url, h, hosts=3, timeout=5.0)) for h in "ABC"}
    ttl = hosts["A"].keeper.board.ttl_s  # type: ignore[union-attr]
    busy = R_RPM - 2 * quiet_share(R_RPM, 3)
    try:
        for _ in range(4):
            await _second(clock, hosts, {"A": 20})
        assert hosts["A"].local() == busy
        own_redis.stop()
        # While the board may still count them as they were, no host raises: A cuts to the
        # static share at once, B and C stay quiet.
        await _second(clock, hosts, {"A": 20})
        assert [h.local() for h in hosts.values()] == [200, 25, 25]
        assert all(not h.keeper.coordinated for h in hosts.values())
        # Once their stamps have expired: the static share everywhere.
        for _ in range(int(ttl) + 2):
            await _second(clock, hosts, {"A": 20})
        assert [h.local() for h in hosts.values()] == [200, 200, 200]
        assert all(h.keeper.failures >= int(ttl) for h in hosts.values())
        own_redis.start()  # empty: no script, no hosts, no demands
        for _ in range(4):
            await _second(clock, hosts, {"A": 20})
        assert all(h.keeper.coordinated for h in hosts.values())
        assert [h.local() for h in hosts.values()] == [busy, 25, 25]
    finally:
        await _close(hosts)


async def test_the_limit_sync_keeps_the_share_and_follows_a_changed_limit(
    redis_url: str,
) -> None:
    rows = [LimitRow("key", "k", Limits(rpm=R_RPM))]
    marker = [1]
    clock = Clock()
    prefix = f"tokenhub-test:{uuid.uuid4().hex}"
    a_quota = Quota.anonymous(accounts=64, reservations=1024)
    # Host A's two workers: worker 1 owns the shares, worker 2 leaves rate limits to it.
    worker1 = LimitSync(a_quota, lambda: rows, lambda: marker[0], daily_reset=False)
    worker2 = LimitSync(a_quota, lambda: rows, lambda: marker[0], daily_reset=False)
    board = ShareBoard(redis_url, "A", hosts=3, timeout=5.0, prefix=prefix)
    keeper = ShareKeeper(a_quota, lambda: worker1.rate_totals, lambda: 3, board, clock=clock)
    worker1.rate_share = keeper.local_limit
    worker2.rate_share = lambda account, kind, total: None
    worker2.reload()  # first: it leaves the rate limit alone
    assert a_quota.limits("key:k")["rpm"] is None
    worker1.reload()
    assert a_quota.limits("key:k")["rpm"] == quiet_share(R_RPM, 3)
    totals = {"key:k": {"rpm": R_RPM}}
    others = {h: Host(h, clock, ShareBoard(redis_url, h, hosts=3, timeout=5.0, prefix=prefix),
                      totals=lambda: totals) for h in "BC"}  # fmt: skip

    def send_a(n: int) -> None:
        for _ in range(n):
            r = a_quota.reserve("key:k", tokens=1)
            if not isinstance(r, Refusal):
                a_quota.settle(r, tokens=1)

    async def tick_all() -> None:
        send_a(20)
        clock.t += 1
        await keeper.tick()
        for h in others.values():
            await h.keeper.tick()
        local = a_quota.limits("key:k")["rpm"]
        assert local is not None
        assert local + sum(h.local() or 0 for h in others.values()) <= rows[0].limits.rpm  # type: ignore[operator]

    try:
        for _ in range(4):
            await tick_all()
        share = a_quota.limits("key:k")["rpm"]
        assert share == R_RPM - 2 * quiet_share(R_RPM, 3)
        # Any change in the store (another key, say) makes both workers reload: the share stays.
        marker[0] += 1
        worker2.reload()
        worker1.reload()
        assert a_quota.limits("key:k")["rpm"] == share
        # A lower limit: worker 2 leaves it to worker 1, which starts it at the quiet share of
        # the new total; the next ticks give A its share of that.
        rows[0] = LimitRow("key", "k", Limits(rpm=300))
        totals["key:k"] = {"rpm": 300}
        worker2.reload()
        assert a_quota.limits("key:k")["rpm"] == share
        worker1.reload()
        assert a_quota.limits("key:k")["rpm"] == quiet_share(300, 3)
        for _ in range(3):
            await tick_all()
        assert a_quota.limits("key:k")["rpm"] == 300 - 2 * quiet_share(300, 3)
        # Removed: unlimited, and the keeper lets it be.
        rows.clear()
        worker1.reload()
        assert a_quota.limits("key:k")["rpm"] is None
        clock.t += 1
        await keeper.tick()
        assert a_quota.limits("key:k")["rpm"] is None
        assert keeper.shares() == {}
    finally:
        await keeper.close()
        await _close(others)
