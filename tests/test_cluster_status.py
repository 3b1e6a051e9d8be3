"""Host identity, heartbeats and `tokenhub cluster status` (issue 13's first piece): two real
`tokenhub serve` processes, hosts A and B, on one database (SQLite, and PostgreSQL when
TOKENHUB_TEST_PG_DSN is set) list as up; after kill -9 of A it is shown down (exit 1) while B
stays up, and B's /metrics carries each host's heartbeat age."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "server"))

from harness import free_port, wait_until
from procs import TOKENHUB, Procs, children, write_config

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
