"""Period budgets across hosts (issue 13): a tenant's tokens per day B split between three
simulated hosts (a quota table, a LimitSync and a ShareKeeper each, one clock moved by the
test), as `serve --host-id` runs them in worker 1. After every tick of every host the limits in
force sum to B at most, and what the hosts admit together never passes B: with Redis, with
Redis stopped and restarted empty (a redis-server of the test's own), without Redis, across a
new day, and across a restarted host whose new table carried everybody's usage. The pure split
(tokenhub.gateway.shares) is checked on random boards.

Board tests need the throwaway redis-server `make test` starts (TOKENHUB_TEST_REDIS_URL), and
redis-server installed for the test's own; they skip without (fail with TOKENHUB_REQUIRE_REDIS=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_shares import RedisServer, redis_url  # noqa: F401 (a fixture)

sys.path.insert(0, str(Path(__file__).parent / "server"))

from harness import free_port, wait_until
from procs import Outcome, Procs, fire, mock_process, write_config

from tokenhub.gateway.limits import LimitSync, utc_day
from tokenhub.gateway.shares import (
    Entry,
    budget_cap,
    budget_targets,
    period_floor,
    quiet_share,
    static_share,
)
from tokenhub.meter import Meter
from tokenhub.quota import Quota, Refusal
from tokenhub.runtime.shares import ShareBoard, ShareKeeper
from tokenhub.store import LimitRow, Limits, open_store
from tokenhub.usage import UsageEvent

# --- the pure split ---------------------------------------------------------------------------


@settings(deadline=None)
@given(
    budget=st.integers(0, 10**9),
    hosts=st.integers(1, 8),
    board=st.dictionaries(
        st.sampled_from("ABCDEFGHIJ"),
        st.tuples(
            st.sampled_from(["reporting", "quiet", "away"]),
            st.integers(0, 10**6),  # demand
            st.none() | st.tuples(st.integers(0, 10**8), st.integers(0, 10**8)),  # entry
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_targets_with_what_the_others_may_hold_never_pass_the_budget(
    budget: int,
    hosts: int,
    board: dict[str, tuple[str, int, tuple[int, int] | None]],
) -> None:
    present = {h for h, (state, _, _) in board.items() if state != "away"}
    demands = {h: d for h, (state, d, _) in board.items() if state == "reporting"}
    entries = {h: Entry(*e) for h, (_, _, e) in board.items() if e is not None}
    away = [h for h in entries if h not in present]
    n = max(hosts, len(present))
    unseen = max(0, n - len(present) - len(away))
    split = budget_targets(budget, hosts, present, demands, entries)
    assert set(split.targets) == present
    used = {h: entries[h].used if h in entries else 0 for h in present}
    reserved = sum(entries[h].held for h in away) + unseen * static_share(budget, n)
    # Every present host at least keeps what it has used; the rest never passes the budget.
    for h in present:
        assert split.targets[h] >= used[h]
    spare = sum(split.targets[h] - used[h] for h in present)
    assert spare <= max(0, budget - sum(used.values()) - reserved)
    # A quiet host gets the floor; the floor is a power of two of the quiet share of the room.
    for h in present - demands.keys():
        assert split.targets[h] == used[h] + split.floor
    assert split.floor == 0 or split.floor & (split.floor - 1) == 0
    # The cap: B less what each other host may hold; a host within its cap while all the
    # others are within theirs keeps the sum at B.
    if present:
        me = min(present)
        cap = budget_cap(budget, hosts, present, entries, me)
        start = period_floor(budget, n)
        others = sum(
            entries[h].held if h in entries else start for h in (present | set(away)) - {me}
        )
        assert cap + others + unseen * static_share(budget, n) == budget


def test_period_floor_is_an_eighth_of_an_even_part_rounded_down_to_a_power_of_two() -> None:
    assert period_floor(120_000, 3) == 4096  # quiet share 5000
    assert quiet_share(120_000, 3) == 5000
    assert period_floor(23, 3) == 1
    assert period_floor(2, 3) == 0


# --- simulated hosts --------------------------------------------------------------------------

B = 120_000  # the tenant's tokens per day
TOKENS = 500  # each request's
ACCOUNT = "tenant:t"
ROWS = [LimitRow("tenant", "t", Limits(tokens_per_day=B))]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Host:
    """Worker 1 of a simulated host: its quota table, LimitSync (the tokens budget written
    through the keeper's hook) and ShareKeeper."""

    def __init__(
        self,
        name: str,
        clock: Clock,
        board: ShareBoard | None,
        *,
        hosts: Callable[[], int] = lambda: 3,
        usage: Callable[[int], dict[str, int]] | None = None,
    ) -> None:
        self.name = name
        self.quota = Quota.anonymous(accounts=64, reservations=4096)
        self.sync = LimitSync(
            self.quota, lambda: ROWS, lambda: 1, daily_reset=True, usage_since=usage
        )
        self.keeper = ShareKeeper(
            self.quota,
            lambda: self.sync.rate_totals,
            hosts,
            board,
            clock=clock,
            carried=lambda: self.sync.carried,
        )
        self.sync.rate_share = self.keeper.local_limit
        self.admitted = 0  # tokens, this incarnation

    async def boot(self) -> None:
        """LimitSync.start as worker 1 runs it (mirror, day, carry), without its timers."""
        await self.sync.start()
        await self.sync.close()

    def send(self, n: int) -> None:
        for _ in range(n):
            r = self.quota.reserve(ACCOUNT, tokens=TOKENS)
            if not isinstance(r, Refusal):
                self.quota.settle(r, tokens=TOKENS)
                self.admitted += TOKENS

    def local(self) -> int:
        v = self.quota.limits(ACCOUNT)["tokens"]
        assert v is not None, f"{self.name} left the budget unlimited"
        return v

    def offset(self) -> int:
        b = self.keeper._budgets[(ACCOUNT, "tokens")]
        return b.offset or 0


async def second(
    clock: Clock,
    hosts: Mapping[str, Host],
    traffic: Mapping[str, int],
    *,
    spent: int = 0,
) -> None:
    """One second: the traffic, then every host ticks; after EVERY tick the limits in force
    (this host's own spending: local - offset) sum to B at most, and so does what was admitted
    (`spent`: by earlier incarnations)."""
    for name, n in traffic.items():
        hosts[name].send(n)
    clock.t += 1.0
    for host in hosts.values():
        await host.keeper.tick()
        limits = {h.name: h.local() - h.offset() for h in hosts.values()}
        assert sum(limits.values()) <= B, limits
        assert spent + sum(h.admitted for h in hosts.values()) <= B


def admitted(hosts: Mapping[str, Host]) -> int:
    return sum(h.admitted for h in hosts.values())


Three = Callable[[Clock], Awaitable[dict[str, Host]]]


@pytest.fixture
async def three(redis_url: str) -> AsyncIterator[Three]:  # noqa: F811
    """Hosts A, B and C on boards under a prefix of this test's own, booted."""
    made: list[Host] = []
    prefix = f"tokenhub-test:{uuid.uuid4().hex}"

    async def make(clock: Clock) -> dict[str, Host]:
        hosts = {
            h: Host(h, clock, ShareBoard(redis_url, h, hosts=3, timeout=5.0, prefix=prefix))
            for h in "ABC"
        }
        for host in hosts.values():
            await host.boot()
        made.extend(hosts.values())
        return hosts

    yield make
    for host in made:
        await host.keeper.close()


async def test_the_busy_host_spends_nearly_all_of_the_budget_and_never_more(
    three: Three,
) -> None:
    clock = Clock()
    hosts = await three(clock)
    start = period_floor(B, 3)
    assert [h.local() for h in hosts.values()] == [start] * 3
    # All the traffic on A, 10 000 tokens a second: within a few ticks A holds nearly all of
    # the budget (B and C keep a floor), and spends it.
    for _ in range(20):
        await second(clock, hosts, {"A": 20})
    assert hosts["A"].admitted >= B * 0.95, [h.admitted for h in hosts.values()]
    assert hosts["B"].admitted == hosts["C"].admitted == 0
    assert all(h.keeper.coordinated for h in hosts.values())
    # The load balancer moves to C: C gets what is left (the floors and A's unused slice)
    # within a bounded number of ticks; A cuts to what it has used.
    for _ in range(15):
        await second(clock, hosts, {"C": 20})
    assert hosts["C"].admitted > 0
    assert admitted(hosts) >= B - 2 * TOKENS, [h.admitted for h in hosts.values()]
    assert admitted(hosts) <= B


async def test_an_even_load_spends_the_budget_evenly_and_exactly(
    three: Three,
) -> None:
    clock = Clock()
    hosts = await three(clock)
    for _ in range(20):
        await second(clock, hosts, {"A": 7, "B": 7, "C": 7})
    assert B - 3 * TOKENS <= admitted(hosts) <= B
    for h in hosts.values():  # each got about a third
        assert B / 3 * 0.8 <= h.admitted <= B / 3 * 1.2, [x.admitted for x in hosts.values()]


async def test_a_stalled_host_keeps_its_claim_and_nobody_spends_it_meanwhile(
    three: Three,
) -> None:
    """A host that stops ticking (SIGSTOP, a long GC) while the load moves elsewhere keeps
    its limit; the others raise only into what its entry leaves, so when it wakes and spends
    everything it holds before its next tick, the hosts together are still within B."""
    clock = Clock()
    hosts = await three(clock)
    for _ in range(4):
        await second(clock, hosts, {"A": 20})
    held = hosts["A"].local()
    assert held > B // 2
    awake = {h: hosts[h] for h in "BC"}
    for _ in range(8):  # A stalled: no tick, no traffic; the load on B
        await second(clock, awake, {"B": 20})
        assert hosts["A"].local() + sum(h.local() for h in awake.values()) <= B
    assert 0 < hosts["B"].admitted <= B - held
    hosts["A"].send(1000)  # wakes, and spends all its old limit lets it before it ticks
    assert hosts["A"].quota.state(ACCOUNT).tokens.used > held - TOKENS
    assert admitted(hosts) <= B
    for _ in range(3):
        await second(clock, hosts, {"A": 20, "B": 20})
    assert admitted(hosts) <= B


async def test_a_new_day_starts_every_host_over_from_the_floor(
    three: Three,
) -> None:
    clock = Clock()
    hosts = await three(clock)
    for _ in range(16):
        await second(clock, hosts, {"A": 20})
    assert hosts["A"].local() > B // 2
    today = utc_day()
    # Midnight reaches A first: its old day's share is gone at once (the limit cut before
    # the reset), the new day starts at the floor, on a board of its own.
    assert hosts["A"].sync.start_day(today + 1)
    assert hosts["A"].quota.state(ACCOUNT).tokens.used == 0
    assert hosts["A"].local() == period_floor(B, 3)
    for h in hosts.values():
        h.admitted = 0
    for h in "BC":
        assert hosts[h].sync.start_day(today + 1)
    # The new day: the traffic on C this time; it gets nearly all of it, never more.
    for _ in range(20):
        await second(clock, hosts, {"C": 20})
    assert hosts["C"].admitted >= B * 0.95
    assert admitted(hosts) <= B


async def test_redis_stopped_keeps_every_host_within_its_claim_and_restarted_empty_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    clock = Clock()
    prefix = f"tokenhub-test:{uuid.uuid4().hex}"
    hosts = {
        h: Host(h, clock, ShareBoard(server.url, h, hosts=3, timeout=2.0, prefix=prefix))
        for h in "ABC"
    }
    try:
        for host in hosts.values():
            await host.boot()
        for _ in range(4):
            await second(clock, hosts, {"A": 20})
        assert hosts["A"].local() > static_share(B, 3)  # the busy host: more than a third
        server.stop()
        # No board: a host that has an entry on it may be counted by the others at its claim
        # for the rest of the day, so it only cuts (to floor(B / 3) at most), never raises.
        for _ in range(8):
            await second(clock, hosts, {"A": 4, "B": 4, "C": 4})
        assert not any(h.keeper.coordinated for h in hosts.values())
        for h in hosts.values():
            assert h.local() <= max(static_share(B, 3), 0), h.name
        failures = {h.name: h.keeper.failures for h in hosts.values()}
        assert all(f >= 8 for f in failures.values()), failures
        # Restarted empty (the entries are gone): the hosts see a new board, send their
        # entries again at once, and share what is left.
        server.start()
        for _ in range(25):
            await second(clock, hosts, {"A": 20})
        assert all(h.keeper.coordinated for h in hosts.values())
        lost = [r for r in caplog.records if "board was lost" in r.getMessage()]
        assert len(lost) == 3  # each host saw the new generation once
        assert admitted(hosts) >= B * 0.9, [h.admitted for h in hosts.values()]
    finally:
        for host in hosts.values():
            await host.keeper.close()
        server.stop()


async def test_without_redis_each_host_takes_a_static_part_for_the_whole_day() -> None:
    clock = Clock()
    n = 3
    hosts = {h: Host(h, clock, None, hosts=lambda: n) for h in "ABC"}
    try:
        for host in hosts.values():
            await host.boot()
        assert [h.local() for h in hosts.values()] == [B // 3] * 3
        # Skewed: A is refused past its third (false 429s), the others' parts go unspent.
        for _ in range(8):
            await second(clock, hosts, {"A": 20})
        assert hosts["A"].admitted == B // 3 // TOKENS * TOKENS
        # C goes down: its third may be spent, so A and B do NOT take half each today.
        n = 2
        del hosts["C"]
        for _ in range(3):
            await second(clock, hosts, {"A": 20, "B": 1})
        assert [h.local() for h in hosts.values()] == [B // 3] * 2
        # Tomorrow, two hosts: half each.
        for h in hosts.values():
            h.sync.start_day(utc_day() + 1)
        assert [h.local() for h in hosts.values()] == [B // 2] * 2
    finally:
        for host in hosts.values():
            await host.keeper.close()


async def test_a_restarted_host_counts_only_its_own_usage_of_the_day(
    redis_url: str,  # noqa: F811
) -> None:
    clock = Clock()
    prefix = f"tokenhub-test:{uuid.uuid4().hex}"

    def board(h: str) -> ShareBoard:
        return ShareBoard(redis_url, h, hosts=3, timeout=5.0, prefix=prefix)

    hosts = {h: Host(h, clock, board(h)) for h in "ABC"}
    spent = 0
    try:
        for host in hosts.values():
            await host.boot()
        for _ in range(5):
            await second(clock, hosts, {"A": 6, "B": 6})
        a_spent, b_spent = hosts["A"].admitted, hosts["B"].admitted
        assert a_spent > 0 and b_spent > 0
        # What the board says A may have spent: its usage and its last slice beyond it.
        old = hosts["A"].keeper._budgets[(ACCOUNT, "tokens")]
        held = max(old.used, old.claimed)
        assert old.used == a_spent and held > a_spent
        # A restarts (kill -9: no goodbye): a new table, which LimitSync charges with the
        # tenant's usage since 00:00 by the database: everybody's, not only A's.
        await hosts["A"].keeper.close()
        spent = a_spent
        total = a_spent + b_spent + hosts["C"].admitted
        hosts["A"] = Host("A", clock, board("A"), usage=lambda ms: {"t": total})
        await hosts["A"].boot()
        assert hosts["A"].quota.state(ACCOUNT).tokens.used == total
        # The board still has A's entry: A counts what its earlier incarnation may have spent
        # (its held), not B's usage too: its table's units are offset by the difference.
        await second(clock, hosts, {}, spent=spent)
        assert hosts["A"].offset() == total - held
        for _ in range(25):
            await second(clock, hosts, {"A": 20}, spent=spent)
        got = spent + admitted(hosts)
        assert got <= B
        # Unspent at the end: A's stranded slice (held beyond what it had used), the quiet
        # hosts' floors and less than a request; counting B's usage twice would leave more.
        assert got >= B - (held - a_spent) - 2 * period_floor(B, 3) - TOKENS, (got, held)
    finally:
        for host in hosts.values():
            await host.keeper.close()


# --- real hosts ---------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Two hosts, one budget for the day."}]
MAX_TOKENS = 40  # above the mock's reply (32 tokens): each request reserves more than it uses


def test_two_real_hosts_never_admit_more_than_the_day_budget(
    pg_database: str, tmp_path: Path
) -> None:
    """`serve --host-id A|B` on one PostgreSQL and a Redis of the test's own, a tenant whose
    tokens per day hold about 30 requests, rounds of requests spread over both hosts: what
    the two bill together stays within the budget, and both hosts spend part of it."""
    prompt = Meter.load("cl100k_base").count_messages(MESSAGES)
    budget = 30 * (prompt + 32)
    store = open_store(pg_database)
    try:
        store.migrate()
        store.create_tenant("daily")
        _, secret = store.create_key("daily")
        store.set_limits("tenant", "daily", tokens_per_day=budget)
    finally:
        store.close()
    redis = RedisServer(tmp_path)
    redis.start()
    procs = Procs(tmp_path)
    with contextlib.ExitStack() as stack:
        stack.callback(redis.stop)
        stack.callback(procs.close)
        mock = stack.enter_context(mock_process(tmp_path, "--model", "gpt-4o-mini"))
        urls = {}
        for host in ("A", "B"):
            home = tmp_path / host
            home.mkdir()
            port = free_port()
            extra = f'heartbeat_s = 0.5\n[cluster]\nhosts = 2\nredis_url = "{redis.url}"'
            config = write_config(home, port, pg_database, mock, extra=extra)
            p = procs.start(f"serve-{host}", "serve", "--config", str(config), "--host-id", host)
            p.wait_serving()
            urls[host] = f"http://127.0.0.1:{port}/v1/chat/completions"

        async def round_() -> list[tuple[str, Outcome]]:
            out = await asyncio.gather(
                *(fire(url, secret, 8, MESSAGES, MAX_TOKENS) for url in urls.values())
            )
            return [(h, o) for h, outcomes in zip(urls, out, strict=True) for o in outcomes]

        sent: list[tuple[str, Outcome]] = []
        # Rounds until nothing has been admitted for 5 s (five ticks of the shares: the budget
        # is spent, not waiting for a raise); bounded by 60 s.
        started = last_admitted = time.monotonic()
        while time.monotonic() - last_admitted < 5:
            assert time.monotonic() - started < 60, "the budget was never spent"
            got = asyncio.run(round_())
            sent += got
            assert [o.error for _, o in got if o.error] == []
            statuses = {o.status for _, o in got}
            assert statuses <= {200, 429}, statuses
            if 200 in statuses:
                last_admitted = time.monotonic()
            time.sleep(0.3)
        for _, o in sent:
            if o.status == 429:
                assert o.body["error"]["code"] == "insufficient_quota", o.body

        ids = {o.request_id for _, o in sent}
        store = open_store(pg_database)

        def stored() -> list[UsageEvent] | None:
            events = list(store.iter_events())
            return events if {e.request_id for e in events} >= ids else None

        try:
            events = wait_until(stored, 30, interval=0.2, what="every event in PostgreSQL")
        finally:
            store.close()
        billed = {e.request_id: e.input_tokens + e.output_tokens for e in events if e.status == 200}
        spent = sum(billed.values())
        assert spent <= budget, (spent, budget)
        # And nearly all of it is spent: neither host's part was left idle.
        assert spent >= budget * 0.7, (spent, budget)
        per_host = {
            h: sum(billed.get(str(o.request_id), 0) for x, o in sent if x == h) for h in urls
        }
        assert all(v > 0 for v in per_host.values()), per_host
