"""Host identity, heartbeats and `tokenhub cluster status` (issue 13): two real `tokenhub serve`
processes, hosts A and B, on one database (SQLite, and PostgreSQL when TOKENHUB_TEST_PG_DSN is
set) list as up; after kill -9 of A it is shown down (exit 1) while B stays up, and B's /metrics
carries each host's heartbeat age.

On PostgreSQL with leases granted through the coordinator, unsettled usage events of several
tenants (one failed) and a settler's partition locks held: the status's pots, open leases per
host, lag and lock holder per partition, as JSON and as tables; the same figures on a real
host's /metrics (whichever worker answers) with the lease agent's leaser.json; and two real
hosts without Redis each holding floor(R / 2) of a key's rpm, the whole R once the other is
down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).parent / "server"))

from factories import usage_event
from harness import free_port, wait_until
from procs import TOKENHUB, Procs, children, mock_process, write_config

from tokenhub.billing.leases import Coordinator, Lease, Pot
from tokenhub.billing.settler import PartitionLocks, partition_of
from tokenhub.db.database import open_database
from tokenhub.store import HostBeat, open_store

# Down after 3 silent beats: 3 s. Short for the test, long enough that a loaded machine's live
# host seldom misses 3 in a row; the assertions wait for the states they want, and the table's
# rows are checked against the states it shows, not against a moment's expectation.
BEAT_S = 1.0
NO_UPSTREAM = "http://127.0.0.1:9"  # the servers start and beat; no request is sent


def cluster(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOKENHUB, "cluster", "status", "--db", db, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def states(db: str) -> dict[str, dict[str, Any]]:
    out = cluster(db, "--json")
    assert out.returncode in (0, 1), out.stderr
    hosts = {h["host_id"]: h for h in json.loads(out.stdout)["hosts"]}
    assert out.returncode == (1 if any(h["state"] == "down" for h in hosts.values()) else 0)
    return hosts


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "hub.db")
    else:
        yield request.getfixturevalue("pg_database")


def test_two_hosts_then_one_killed(database: str, tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        started = {}
        for host in ("A", "B"):
            home = tmp_path / host
            home.mkdir()
            port = free_port()
            config = write_config(
                home, port, database, NO_UPSTREAM, extra=f"heartbeat_s = {BEAT_S}"
            )
            # B with two workers: worker 1 beats for the host, and any worker's /metrics shows it.
            workers = ["--workers", "2"] if host == "B" else []
            p = procs.start(
                f"serve-{host}", "serve", "--config", str(config), "--host-id", host, *workers
            )
            p.wait_serving()
            started[host] = (p, port)

        def both_up() -> dict[str, dict[str, Any]] | None:
            hosts = states(database)
            ok = set(hosts) == {"A", "B"} and all(h["state"] == "up" for h in hosts.values())
            return hosts if ok else None

        hosts = wait_until(both_up, 60, interval=0.2, what="hosts A and B up")
        assert hosts["A"]["pid"] == started["A"][0].pid
        assert hosts["B"]["pid"] in children(started["B"][0].pid)  # B's worker 1
        for host in started:
            assert hosts[host]["workers"] == (2 if host == "B" else 1)
            assert hosts[host]["journal_backlog"] == 0
            assert hosts[host]["interval_ms"] == BEAT_S * 1000
        table = cluster(database)
        lines = table.stdout.split("\n\n")[0].splitlines()  # the hosts' section
        assert lines[0].split()[:5] == [
            "HOST",
            "STATE",
            "HEARTBEAT_AGE",
            "WORKERS",
            "JOURNAL_BACKLOG",
        ]
        shown = [ln.split()[:2] for ln in lines[1:]]
        assert [host for host, _ in shown] == ["A", "B"]
        assert table.returncode == (1 if ["B", "down"] in shown or ["A", "down"] in shown else 0)

        started["A"][0].kill_group()  # kill -9: no last word from A

        def a_down() -> dict[str, dict[str, Any]] | None:
            hosts = states(database)
            return hosts if hosts["A"]["state"] == "down" and hosts["B"]["state"] == "up" else None

        hosts = wait_until(a_down, 60, interval=0.2, what="host A down, B up")
        assert hosts["A"]["heartbeat_age_ms"] > 3 * BEAT_S * 1000
        table = cluster(database)
        assert table.returncode == 1
        assert table.stdout.splitlines()[1].split()[:2] == ["A", "down"]

        port_b = started["B"][1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port_b}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        ages = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("tokenhub_cluster_heartbeat_age_seconds{")
        }
        assert set(ages) == {"A", "B"}
        assert ages["A"] > 3 * BEAT_S

        assert started["B"][0].stop() == 0
    finally:
        procs.close()


def test_usage_errors(tmp_path: Path) -> None:
    missing = cluster(str(tmp_path / "nothing.db"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("tokenhub: error: ") and missing.stderr.count("\n") == 1

    # A database that fails (nothing listens on port 1) is a failure, not a refusal.
    down = cluster("postgresql://nobody@127.0.0.1:1/none")
    assert down.returncode == 1
    assert down.stderr.startswith("tokenhub: error: ") and down.stderr.count("\n") == 1

    config = write_config(tmp_path, free_port(), tmp_path / "hub.db", NO_UPSTREAM)
    bad = subprocess.run(
        [TOKENHUB, "serve", "--config", str(config), "--host-id", "a b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("tokenhub: error: --host-id: 'a b' is not a host id")

    bad = subprocess.run(
        [TOKENHUB, "serve", "--config", str(config), "--host-id", "a", "--redis", "http://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("tokenhub: error: --redis must be a redis://")

    bad_config = write_config(
        tmp_path, free_port(), tmp_path / "hub.db", NO_UPSTREAM, extra='host_id = "x/y"'
    )
    bad = subprocess.run(
        [TOKENHUB, "serve", "--config", str(bad_config)], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert "server.host_id" in bad.stderr

    subprocess.run(
        [TOKENHUB, "tenants", "create", "t", "--db", str(tmp_path / "hub.db")], check=True
    )
    empty = cluster(str(tmp_path / "hub.db"), "--json")
    assert empty.returncode == 0
    status = json.loads(empty.stdout)
    assert status["hosts"] == [] and status["pots"] == []
    assert status["coordinator"]["reachable"] and status["coordinator"]["dialect"] == "sqlite"
    assert status["settlers"]["lag"] == [
        {
            "partition": None,
            "pending": 0,
            "failed": 0,
            "oldest_ms": None,
            "lag_ms": None,
            "holder_pid": None,
            "holder_backend_pid": None,
        }
    ]
    # A database that fails: with --json the coordinator says so too.
    down = cluster("postgresql://nobody@127.0.0.1:1/none", "--json")
    assert down.returncode == 1
    assert json.loads(down.stdout)["coordinator"]["reachable"] is False
    assert cluster(str(tmp_path / "hub.db"), "--partitions", "-1").returncode == 2


# --- the shared state: leases, settler lag, and the same figures on /metrics --------------------

PARTITIONS = 4
TENANTS = ("acme", "beta", "gamma", "delta", "eps")


class Seeded(NamedTuple):
    leases: list[Lease]
    pot: Pot
    pending: Counter[int]  # partition -> unsettled events
    failed_partition: int
    oldest_ms: dict[int, int]  # partition -> ts of its oldest event that is not failed


def seed(url: str) -> Seeded:
    """Host A's heartbeat, a pot with three open leases (A twice, B once) and a quiet pot, and
    unsettled usage events of several tenants, one of them failed to settle."""
    now = int(time.time() * 1000)
    store = open_store(url)
    try:
        store.migrate()
        store.heartbeat(HostBeat("A", now - 60_000, now, 3_600_000, 4242, 2, "x", 7))
        events = [
            usage_event(i, tenant=t, ts_ms=now - 10_000 - 1000 * i)
            for i, t in enumerate(TENANTS * 2)
        ]
        store.insert_events(events)
    finally:
        store.close()

    async def leases() -> tuple[list[Lease], Pot]:
        db = await open_database(url)
        try:
            c = Coordinator(db)
            await c.set_pot("pot:m:acme", "acme", "nanos", 1_000_000)
            await c.set_pot("pot:t:quiet", "quiet", "tokens", 500)
            got = [
                await c.grant(lid, "pot:m:acme", host, 300_000, 1, 3_600_000, instance=inst)
                for lid, host, inst in (
                    ("A/1:1", "A", "A/1"),
                    ("A/1:2", "A", "A/1"),
                    ("B/7:1", "B", "B/7"),
                )
            ]
            await db.transaction(
                lambda tx: tx.execute(
                    "INSERT INTO settlement_failures (event_id, reason, attempts, last_ms) "
                    "VALUES ($1, 'no price', 1, $2)",
                    events[0].request_id,
                    now,
                )
            )
            pot = await c.get_pot("pot:m:acme")
            assert pot is not None
            return got, pot
        finally:
            await db.close()

    got, pot = asyncio.run(leases())
    assert all(lease.amount > 0 for lease in got)
    pending = Counter(partition_of(e.tenant, PARTITIONS) for e in events)
    oldest: dict[int, int] = {}
    for e in events[1:]:
        p = partition_of(e.tenant, PARTITIONS)
        oldest[p] = min(oldest.get(p, e.ts_ms), e.ts_ms)
    return Seeded(got, pot, pending, partition_of(events[0].tenant, PARTITIONS), oldest)


@contextlib.contextmanager
def settler_locks(url: str) -> Iterator[None]:
    """This process holds every partition's advisory lock, as a partitioned settler does
    (PartitionLocks, on a loop in a thread of its own), until the block ends."""
    held = threading.Event()
    done = threading.Event()

    async def hold() -> None:
        locks = PartitionLocks(url, PARTITIONS)
        try:
            assert await locks.acquire() == tuple(range(PARTITIONS))
            held.set()
            while not done.is_set():
                await asyncio.sleep(0.02)
        finally:
            await locks.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    thread.start()
    try:
        assert held.wait(30), "the partition locks were not taken"
        yield
    finally:
        done.set()
        thread.join(30)


def test_status_shows_leases_lag_and_lock_holders(pg_database: str) -> None:
    seeded = seed(pg_database)
    with settler_locks(pg_database):
        out = cluster(pg_database, "--partitions", str(PARTITIONS), "--json")
        table = cluster(pg_database, "--partitions", str(PARTITIONS))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["coordinator"]["reachable"] is True
    assert status["coordinator"]["dialect"] == "postgresql"
    assert 0 < status["coordinator"]["query_ms"] < 30_000
    [host] = status["hosts"]
    assert (host["host_id"], host["state"], host["journal_backlog"]) == ("A", "up", 7)
    pots = {p["pot"]: p for p in status["pots"]}
    acme = pots["pot:m:acme"]
    amounts = [lease.amount for lease in seeded.leases]
    assert acme["open_leases"] == 3
    assert acme["leased"] == sum(amounts) == acme["granted"] == seeded.pot.granted
    assert (acme["cap"], acme["spent_unposted"]) == (seeded.pot.cap, seeded.pot.spent_unposted)
    assert acme["by_host"] == {
        "A": {"leases": 2, "amount": amounts[0] + amounts[1]},
        "B": {"leases": 1, "amount": amounts[2]},
    }
    assert pots["pot:t:quiet"]["open_leases"] == 0 and pots["pot:t:quiet"]["by_host"] == {}
    settlers = status["settlers"]
    assert (settlers["partitions"], settlers["live"]) == (PARTITIONS, 1)
    lags = {lag["partition"]: lag for lag in settlers["lag"]}
    assert set(lags) == set(range(PARTITIONS))
    for p, lag in lags.items():
        assert lag["pending"] == seeded.pending[p]
        assert lag["failed"] == (1 if p == seeded.failed_partition else 0)
        assert lag["oldest_ms"] == seeded.oldest_ms.get(p)
        if p in seeded.oldest_ms:  # events 10 s old and more
            assert lag["lag_ms"] >= status["taken_ms"] - seeded.oldest_ms[p] >= 10_000
        assert lag["holder_pid"] == os.getpid()  # the settler's own pid, not its backend's
        assert lag["holder_backend_pid"] not in (None, os.getpid())

    assert table.returncode == 0, table.stderr
    sections = table.stdout.split("\n\n")
    assert sections[0].splitlines()[1].split()[:2] == ["A", "up"]
    assert sections[1].startswith("coordinator: postgresql reachable, status read in ")
    pot_rows = {ln.split()[0]: ln.split() for ln in sections[2].splitlines()[1:]}
    assert pot_rows["pot:m:acme"][1:7] == [
        "nanos",
        str(seeded.pot.cap),
        str(seeded.pot.granted),
        str(seeded.pot.spent_unposted),
        "3",
        str(sum(amounts)),
    ]
    assert pot_rows["pot:m:acme"][7] == f"A:2/{amounts[0] + amounts[1]},B:1/{amounts[2]}"
    assert "budget pots with nothing leased or unposted: 1" in sections[2]
    lag_rows = [ln.split() for ln in sections[3].splitlines()]
    assert lag_rows[0] == ["PARTITION", "PENDING", "FAILED", "LAG", "SETTLER_PID"]
    assert [r[0] for r in lag_rows[1 : PARTITIONS + 1]] == [
        f"{p}/{PARTITIONS}" for p in range(PARTITIONS)
    ]
    assert all(r[4] == str(os.getpid()) for r in lag_rows[1 : PARTITIONS + 1])
    assert lag_rows[PARTITIONS + 1] == ["settlers", "holding", "partition", "locks:", "1"]


def scrape(port: int) -> dict[tuple[str, str], float]:
    """/metrics as {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            out[(name, labels.rstrip("}"))] = float(value)
    return out


def rpm_limit(port: int, secret: str) -> str:
    """The key's rpm limit on this host, as a chat completion's x-ratelimit header says (a
    refusal by that limit says it too)."""
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.headers.get("x-ratelimit-limit-requests", "")
    except urllib.error.HTTPError as e:
        return e.headers.get("x-ratelimit-limit-requests", "")


def test_metrics_show_the_cluster_and_hosts_share_a_rate_limit(
    pg_database: str, tmp_path: Path
) -> None:
    seeded = seed(pg_database)
    store = open_store(pg_database)
    try:
        store.create_tenant("rated")
        key, secret = store.create_key("rated")
        store.set_limits("key", key.id, rpm=10)
    finally:
        store.close()
    procs = Procs(tmp_path)
    with contextlib.ExitStack() as stack:
        stack.callback(procs.close)
        mock = stack.enter_context(mock_process(tmp_path, "--model", "gpt-4o-mini"))
        stack.enter_context(settler_locks(pg_database))
        started = {}
        for host in ("A", "B"):
            home = tmp_path / host
            home.mkdir()
            port = free_port()
            config = write_config(
                home,
                port,
                pg_database,
                mock,
                extra=f"heartbeat_s = 0.5\n[cluster]\npartitions = {PARTITIONS}",
            )
            workers = ["--workers", "2"] if host == "A" else []
            p = procs.start(
                f"serve-{host}", "serve", "--config", str(config), "--host-id", host, *workers
            )
            p.wait_serving()
            started[host] = (p, port)
        a, port_a = started["A"]
        # Two live hosts, no Redis: each holds floor(10 / 2) of the key's rpm.
        wait_until(lambda: rpm_limit(port_a, secret) == "5", 60, interval=0.2, what="A at 5")
        assert rpm_limit(started["B"][1], secret) == "5"

        # The lease agent's file in A's shared dir, as the agent would write it.
        shared = [
            d
            for d in (Path("/dev/shm"), home.parent / "A" / "journal")
            if (d / f"tokenhub-metrics-{a.pid}").is_dir()
        ]
        assert shared, "A's shared dir not found"
        leaser = shared[0] / f"tokenhub-metrics-{a.pid}" / "leaser.json"
        leaser.write_text(
            json.dumps(
                {"host": "A", "calls": 7, "failures": 1, "last_error": "boom",
                 "pots": {"pot:m:acme": {"leases": 2, "leased": 600000, "rate": 1.5}}}
            )
        )  # fmt: skip

        def figures() -> dict[tuple[str, str], float] | None:
            m = scrape(port_a)
            # A's own heartbeat (backlog 0 once its requests' events are stored) replaced the
            # seeded row; a beat taken while an event was still in the journal shows 1.
            backlog = m.get(("tokenhub_cluster_journal_backlog", 'host="A"'))
            return m if m.get(("tokenhub_cluster_settlers", "")) == 1 and backlog == 0 else None

        for _ in range(4):  # whichever worker answers, the same figures
            m = wait_until(figures, 30, interval=0.2, what="the cluster figures on /metrics")
            assert m[("tokenhub_cluster_coordinator_up", "")] == 1
            assert 0 < m[("tokenhub_cluster_status_query_seconds", "")] < 30
            assert m[("tokenhub_cluster_journal_backlog", 'host="A"')] == 0  # A beats anew
            amounts = [lease.amount for lease in seeded.leases]
            pot = 'pot="pot:m:acme"'
            assert m[("tokenhub_cluster_pot_open_leases", f'host="A",{pot}')] == 2
            assert m[("tokenhub_cluster_pot_leased", f'host="B",{pot}')] == amounts[2]
            assert m[("tokenhub_cluster_pot_cap", f'{pot},unit="nanos"')] == seeded.pot.cap
            assert m[("tokenhub_cluster_pot_granted", f'{pot},unit="nanos"')] == sum(amounts)
            for p in range(PARTITIONS):
                part = f'partition="{p}"'
                # (and the events of the requests above, of tenant "rated": no settler runs)
                assert m[("tokenhub_cluster_settler_pending", part)] >= seeded.pending[p]
                assert (
                    m[("tokenhub_cluster_settler_partition_held", f'{part},pid="{os.getpid()}"')]
                    == 1
                )
                if p in seeded.oldest_ms:
                    assert m[("tokenhub_cluster_settler_lag_seconds", part)] >= 10
            assert m[("tokenhub_rate_shares", 'figure="hosts"')] == 2
            assert m[("tokenhub_rate_shares", 'figure="limits"')] == 1
            assert m[("tokenhub_rate_shares", 'figure="coordinated"')] == 0
            assert m[("tokenhub_lease_calls", "")] == 7
            assert m[("tokenhub_lease_last_error", "")] == 1
            assert m[("tokenhub_lease_pot_leases", pot)] == 2
            assert m[("tokenhub_lease_pot_rate", pot)] == 1.5

        # B stops; once it is down (3 silent beats) A alone holds the whole limit.
        assert started["B"][0].stop() == 0
        wait_until(lambda: rpm_limit(port_a, secret) == "10", 60, interval=0.2, what="A at 10")
        assert a.stop() == 0
