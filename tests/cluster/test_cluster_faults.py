"""Three hosts, one budget, one ledger, under the faults of issue 13 (tests/cluster/cluster_kit.py).

Every scenario runs the same two loads on a fresh three-host cluster:

- a *slack* tenant (a wallet of 100 USD) under a steady stream of requests spread round-robin
  over A, B and C for the whole scenario, before, during and after the fault: the usage
  oracles (every request the mock served is a usage event, settled once and billed once,
  exactly; nothing refused is billed; `tokenhub billing check` passes; each live host's leased
  pool equals the coordinator's record of it; nothing unsettled and no lease open once the
  hosts stop cleanly) must hold whatever the fault;
- a *tight* tenant whose wallet covers about 50 requests, hit by 600 concurrent requests while
  the fault is on: on top of the usage oracles, the money oracles (no overdraw, the wallet paid
  exactly the charges, the budget pot equal to the ledger with nothing granted or unposted).

Without leased admission (issue 13's host side, `tokenhub.billing.leasing`) each host would
admit against the whole wallet: about three times what the tight tenant can pay, the rest
posted to overrun. With it the hosts lease slices of one budget pot in PostgreSQL.

The faults: kill -9 of host B (gateway and settler) mid-burst, then its restart (journal
replayed, its old instance's leases written off and reconciled); a 10 s SIGSTOP of PostgreSQL;
Redis stopped and restarted empty; host C cut off PostgreSQL for ~10 s by a silent DROP in its
own network namespace, at a random moment and inside a budget transaction. Figures are printed
per scenario (`pytest -s`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import pytest
from cluster_kit import (
    USD,
    Books,
    Cluster,
    Figures,
    Load,
    Netns,
    NotQuiescent,
    Shot,
    Tenant,
    money_problems,
    request_cost,
    usage_problems,
)

pytestmark = pytest.mark.cluster

COVERED = 50  # requests the tight wallet pays for, about
BURST = 600
STEADY_RATE = 40  # slack requests a second, over the three hosts
ROUND_ROBIN = {"A": 1, "B": 1, "C": 1}


def tight_wallet() -> str:
    """The smallest whole-cent wallet covering COVERED requests."""
    cents = math.ceil(COVERED * request_cost() * 100 / USD)
    return f"{cents // 100}.{cents % 100:02d}"


def at(load: Load, t: float) -> None:
    """Sleeps until `t` seconds into the load."""
    time.sleep(max(0.0, t - load.now()))


def run(
    cluster: Cluster,
    scenario: str,
    *,
    steady_s: float,
    burst_at: float,
    burst_weights: dict[str, int],
    fault: AbstractContextManager[object] | None = None,
    action: Callable[[Load], None] = lambda load: None,
    until: float = 0.0,
    settle_within: float = 90.0,
) -> tuple[Books, Figures, list[Shot]]:
    """The scenario: both loads; `fault` entered 0.5 s before the burst and left at `until`
    s into the load (or once `action`, run on the test thread when the burst is fired, and
    the burst are done); then quiescence and the oracles."""
    tight = cluster.add_tenant("tight", tight_wallet())
    slack = cluster.add_tenant("slack", "100.00")
    cluster.start()
    load = Load(cluster)
    try:
        steady = load.steady(slack, STEADY_RATE, steady_s, ROUND_ROBIN)
        at(load, burst_at - 0.5)
        with fault or nullcontext():
            at(load, burst_at)
            burst = load.burst(tight, BURST, burst_weights)
            action(load)
            at(load, until)
        burst.result(120)
        steady.result(180)
        ok = {s.request_id for s in load.shots if s.status == 200 and s.request_id}
        quiet_from = load.now()
        pools = cluster.quiesce(ok, settle_within)
        quiesced_s = load.now() - quiet_from
        books = cluster.books()
    finally:
        load.close()
    figures = Figures(scenario)
    for t in (tight, slack):
        figures.tenant(books, load.shots, t)
    figures.rows["tight_covers"] = tight.wallet // request_cost()
    figures.rows["quiesce_s"] = round(quiesced_s, 1)
    figures.show(books)
    problems = usage_problems(books, load.shots)
    assert not problems, "\n".join(problems[:40]) + "\n" + cluster.stderr()
    assert not pools, "\n".join(pools)
    return books, figures, load.shots


def money_ok(books: Books, tenants: list[Tenant]) -> None:
    problems = money_problems(books, tenants)
    assert not problems, "\n".join(problems)
    assert books.leases, "no host leased anything: cluster mode is off"


def tenants(cluster: Cluster) -> list[Tenant]:
    return [cluster.tenants["tight"], cluster.tenants["slack"]]


def test_burst_against_a_small_wallet(cluster: Cluster) -> None:
    books, fig, _ = run(cluster, "no fault", steady_s=4, burst_at=1.0, burst_weights=ROUND_ROBIN)
    money_ok(books, tenants(cluster))
    # Leased admission still admits about what the wallet covers: at most one request's worth
    # stranded per host (a slice too small for a request) when the pot has no room left.
    assert fig.rows["tight"]["admitted"] >= fig.rows["tight_covers"] - len(cluster.hosts)


def test_kill_9_of_a_host_mid_burst(cluster: Cluster) -> None:
    """B (gateway and settler) dies with requests in flight and comes back on the same
    journal: what it served before dying is replayed from its journal and billed once (a
    request cut off mid-flight is recorded as interrupted and billed nothing, though the mock
    served it: `served_not_billed` in the figures); its old instance's leases are written off
    and its usage reconciled from its events."""

    def kill_and_restart(load: Load) -> None:
        time.sleep(0.1)
        cluster.hosts["B"].kill9()
        time.sleep(1.5)
        cluster.restart("B")

    books, _, _ = run(cluster, "kill -9 B mid-burst", steady_s=7, burst_at=1.0,
                   burst_weights={"A": 1, "B": 2, "C": 1}, action=kill_and_restart)  # fmt: skip
    assert cluster.hosts["B"].starts == 2
    money_ok(books, tenants(cluster))


def test_postgres_stopped_10_s(cluster: Cluster) -> None:
    """SIGSTOP of PostgreSQL for 10 s with the burst in the middle: hosts spend what they
    hold, journals buffer the usage, settlement catches up after SIGCONT."""
    pg = cluster.services.pg

    @contextmanager
    def frozen() -> Iterator[None]:
        pg.freeze()
        try:
            yield
        finally:
            pg.thaw()

    books, _, _ = run(cluster, "PostgreSQL SIGSTOP 10 s", steady_s=13, burst_at=1.5,
                   burst_weights=ROUND_ROBIN, fault=frozen(), until=11.0)  # fmt: skip
    money_ok(books, tenants(cluster))


def test_redis_restarted_empty(cluster: Cluster) -> None:
    """Redis stopped under load and started again with nothing in it: rate shares fall back
    to static ones; money admission does not use Redis at all."""
    redis = cluster.services.redis

    @contextmanager
    def stopped() -> Iterator[None]:
        assert redis.command("SET", "tokenhub-test:marker", "1").startswith(b"+OK")
        redis.stop()
        assert not redis.ping()
        try:
            yield
        finally:
            redis.start()
        assert not redis.has("tokenhub-test:marker")  # empty, not restored

    books, _, _ = run(cluster, "Redis stopped, restarted empty", steady_s=5, burst_at=1.5,
                   burst_weights=ROUND_ROBIN, fault=stopped(), until=3.0)  # fmt: skip
    money_ok(books, tenants(cluster))


def test_host_partitioned_from_postgres(cluster: Cluster, partitionable: Netns) -> None:
    """Host C loses PostgreSQL silently (a DROP in its own namespace) for ~10 s, the burst
    skewed towards it: C keeps serving from what it holds, buffers its usage, and catches up
    once the rule is gone."""
    cut = partitionable.drop(partitionable.host_addr, cluster.services.pg.port)
    books, _, _ = run(cluster, "C partitioned from PostgreSQL ~10 s", steady_s=14, burst_at=1.5,
                   burst_weights={"A": 1, "B": 1, "C": 2}, fault=cut, until=11.5)  # fmt: skip
    assert not partitionable.rules
    money_ok(books, tenants(cluster))


class Stalled(AssertionError):
    """Hosts that can reach PostgreSQL refused requests, or settlement stopped, because
    another host could not reach it."""


# How long a host cut off PostgreSQL inside a transaction may hold that transaction's locks
# (pot rows, tenant locks) before PostgreSQL ends its session: a server-side timeout of at most
# 5 s (idle_in_transaction_session_timeout) plus a request's acquire wait (1 s):
# tokenhub.db.database.IDLE_IN_TRANSACTION_MS.
LOCK_RELEASE_S = 6.0


def test_partition_mid_transaction_does_not_stall_the_others(
    cluster: Cluster, partitionable: Netns
) -> None:
    """As above, but the cut lands while C is inside a transaction on the budget tables (the
    lease coordinator, or settlement posting to pots): the worst moment. The invariants hold,
    and A and B, which reach PostgreSQL, serve the slack tenant again within LOCK_RELEASE_S of
    the cut, for the rest of the partition. The rule is deleted 10 s after the cut (the heal,
    inside the scenario: quiescence needs C back) and C catches up, everything served recorded
    and settled within 20 s of the load's end."""
    cut_at: list[float] = []
    caught: list[tuple[str, str]] = []
    pg = cluster.services.pg

    with partitionable.armed_drop(partitionable.host_addr, pg.port) as cut:

        def cut_mid_transaction(load: Load) -> None:
            def now() -> None:
                cut.fire()
                cut_at.append(load.now())

            caught.append(cluster.when_in_transaction(partitionable.ns_addr, "%budget%", now))
            at(load, cut_at[0] + 10.0)
            cut.heal()

        try:
            books, _, shots = run(cluster, "C cut off mid-transaction ~10 s", steady_s=16,
                                  burst_at=1.5, burst_weights={"A": 1, "B": 1, "C": 2},
                                  action=cut_mid_transaction, settle_within=20)  # fmt: skip
        except NotQuiescent as e:
            raise Stalled(f"C was cut off inside {caught[0][0]!r}; after the heal, {e}") from e
    assert not partitionable.rules
    money_ok(books, tenants(cluster))
    statement, still = caught[0]
    healed = cut_at[0] + 10.0
    late = [
        s
        for s in shots
        if s.tenant == "slack"
        and s.host in ("A", "B")
        and cut_at[0] + LOCK_RELEASE_S <= s.sent <= healed - 1.0
    ]
    refused = [s for s in late if s.status != 200]
    print(f"[cluster figures] cut at {cut_at[0]:.2f} s inside {statement!r} (1 s later: "
          f"{still!r}); A and B slack requests {LOCK_RELEASE_S:g} s after the cut until the "
          f"heal: {len(late)}, refused {len(refused)}")  # fmt: skip
    assert late
    if refused:
        raise Stalled(
            f"{len(refused)} of {len(late)} requests on A and B refused {LOCK_RELEASE_S:g} s "
            f"and more after C was cut off inside {statement!r}"
        )
