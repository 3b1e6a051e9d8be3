"""A lease grant whose reply is lost, replayed after healing, is applied once (issue 13).

One real host, `tokenhub serve --host-id A`, on the session's PostgreSQL through `PgProxy`
(tests/cluster/pgproxy.py), armed to lose the reply of the next transaction that inserts a
lease: the lease agent's grant commits in PostgreSQL, the answer never reaches the agent. One
request needs a lease, waits its acquire wait and is refused (no request is in flight from
then on, so any lease granted later is the agent's own doing). HEAL_AFTER_S after the cut the
proxy resets the connection (before the agent's own call timeout, so the retry comes after the
heal): the agent's call fails, and its next tick retries the grant with the SAME id, which the
coordinator answers with the stored lease. Asserted:

- during the outage the lease is in budget_leases (open) and the host's pool holds none of it;
- once the agent has counted a failure and then a success (leaser.json: failures, grants,
  last_error cleared, last_tick_ms after the heal), its instance has exactly the lost lease
  ids, each once, open or given back (an agent that retried with a new id, or leased again
  for the want its waiting request sent again during the outage, would have a second lease
  here); its pool equals what PostgreSQL says it holds (`Cluster.pool_mismatches`: open
  amounts plus returned uses), and the pool's limit, watched every 5 ms (`PoolWatch`), went
  0 -> the lost amount (-> 0 once given back idle): applied once, not twice, not never;
- requests then succeed; after a clean stop the usage and money oracles hold, `tokenhub
  billing check` is clean and no lease is open.

Figures are printed (`pytest -s`): time to heal, time to the replay, the lease ids and amounts.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_kit import (
    SETTLE_INTERVAL_S,
    Cluster,
    Host,
    Load,
    money_problems,
    request_cost,
    usage_problems,
)
from harness import wait_until
from pgproxy import PgProxy
from procs import write_config

from tokenhub.billing.draw import money_pot, pot_dim
from tokenhub.billing.leasing import leaser_path
from tokenhub.quota import Quota

pytestmark = pytest.mark.cluster

HEAL_AFTER_S = 3.0  # under the agent's call timeout (leasing.CALL_TIMEOUT_S, 5 s)
TRIES = 10  # requests sent one by one until one's grant is cut (the pot may not exist yet)
AFTER = 12  # requests at once after the heal: all admitted
WATCH_S = 0.005


def leaser(host: Host) -> dict[str, Any]:
    assert host.proc is not None
    path = leaser_path(Path(f"/dev/shm/tokenhub-metrics-{host.proc.pid}"))
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def pool_limit(quota: Quota, pot: str) -> int:
    if quota.table.find_account(pot) is None:
        return 0
    return getattr(quota.state(pot), pot_dim(pot)).limit or 0


class PoolWatch:
    """The pot's pool limit read off the host's table every WATCH_S on a thread, until
    stopped: the values it took, in order (each change once). With no request in flight
    the pool only changes when the agent applies a grant or shrinks for a give-back, and it
    holds a grant for at least a tick (0.2 s) before an idle give-back: read every 5 ms, a
    grant applied once is seen once, twice or never shows."""

    def __init__(self, quota: Quota, pot: str) -> None:
        self.quota, self.pot = quota, pot
        self.values: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_S):
            v = pool_limit(self.quota, self.pot)
            if not self.values or self.values[-1] != v:
                self.values.append(v)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(5)
        return self.values


def test_lost_grant_reply_is_replayed_once(cluster: Cluster) -> None:
    tenant = cluster.add_tenant("replay", "1.00")
    pot = money_pot(tenant.name)
    cluster.hosts = {"A": cluster.hosts["A"]}  # one host: the harness's B and C stay unstarted
    a = cluster.hosts["A"]
    with PgProxy("127.0.0.1", cluster.services.pg.port) as proxy:
        extra = f"""heartbeat_s = 1.0

[billing]
settle_interval_s = {SETTLE_INTERVAL_S}
admission = true

[cluster]
hosts = 1
"""
        write_config(a.home, a.port, proxy.url(cluster.database), cluster.services.mock,
                     extra=extra)  # fmt: skip
        a.launch(cluster.procs)
        a.wait_serving()
        cluster.wait_known(tenant)
        before = wait_until(lambda: leaser(a), 20, interval=0.05, what="A's leaser.json")
        instance = before["instance"]
        assert before["failures"] == 0, before
        assert a.proc is not None
        quota = Quota.attach(f"/dev/shm/tokenhub-quota-{a.proc.pid}")
        load = Load(cluster)
        watch = PoolWatch(quota, pot)
        try:
            proxy.arm()
            for _ in range(TRIES):
                load.burst(tenant, 1, {"A": 1}).result(30)
                if proxy.fired.is_set():
                    break
            assert proxy.fired.is_set(), f"no grant in {TRIES} requests\n{cluster.stderr()}"
            cut = proxy.cut
            assert cut is not None and cut.lease_ids, cut
            lost = list(cut.lease_ids)
            waiting = load.shots[-1]
            assert waiting.status == 429, waiting  # no lease reached the pool in its wait

            # The outage: committed in PostgreSQL, absent from the pool.
            rows = cluster.query(
                "SELECT id, state, amount FROM budget_leases WHERE instance = $1 ORDER BY id",
                instance,
            )
            assert [r[0] for r in rows] == sorted(lost), rows
            assert all(r[1] == "open" and r[2] > 0 for r in rows), rows
            amounts = {r[0]: int(r[2]) for r in rows}
            assert pool_limit(quota, pot) == 0

            time.sleep(max(0.0, cut.at + HEAL_AFTER_S - time.monotonic()))
            proxy.heal()

            def replayed() -> dict[str, Any] | None:
                f = leaser(a)
                ok = (
                    f.get("failures", 0) >= 1
                    and f.get("grants", 0) >= 1
                    and f.get("last_error") == ""
                    and f.get("last_tick_ms", 0) >= cut.healed_ms
                )
                return f if ok else None

            after = wait_until(replayed, 10, interval=0.02, what="the agent's retry to succeed")
            replay_s = time.monotonic() - cut.healed_at

            # Applied once: the instance has the lost ids, nothing more (no request is in
            # flight: a new id for the same grant would be a second lease here), and the pool
            # equals what PostgreSQL says it holds.
            rows = cluster.query(
                "SELECT id, state, amount, used FROM budget_leases WHERE instance = $1 ORDER BY id",
                instance,
            )
            assert [r[0] for r in rows] == sorted(lost), (
                f"leases of {instance} after the replay: {rows}; lost: {lost}"
            )
            assert all(r[1] in ("open", "returned") for r in rows), rows
            states = {r[0]: (r[1], r[3]) for r in rows}
            mismatches = cluster.pool_mismatches()
            assert not mismatches, "\n".join(mismatches)
            held = pool_limit(quota, pot)
            time.sleep(0.5)  # a tick or two more: an idle give-back shows too
            pool = watch.stop()
            total = sum(amounts.values())
            assert pool in ([0, total], [0, total, 0]), (
                f"the pool took {pool}; the lost grants total {total}"
            )
            assert after["grants"] == len(lost), after

            # Requests then succeed.
            load.burst(tenant, AFTER, {"A": 1}).result(60)
            later = load.shots[-AFTER:]
            assert all(s.status == 200 and not s.code and not s.error for s in later), [
                (s.status, s.code, s.error) for s in later
            ]
            ok = {s.request_id for s in load.shots if s.status == 200 and s.request_id}
            pools = cluster.quiesce(ok)
            books = cluster.books()
            closed = cluster.query(
                "SELECT id, state, used FROM budget_leases WHERE id = ANY($1::text[])", lost
            )
        finally:
            watch.stop()
            load.close()
    assert a.proc is not None
    failed = [x for x in a.proc.stderr().splitlines() if x.startswith(f"lease agent {instance}:")]

    print(
        "\n[cluster figures] lost grant reply: "
        + json.dumps(
            {
                "instance": instance,
                "lost_lease_ids": lost,
                "amounts_nanos": amounts,
                "request_cost_nanos": request_cost(),
                "states_after_replay": states,
                "pool_limit_after_replay": held,
                "pool_limits_seen": pool,
                "requests_until_cut": len(load.shots) - AFTER,
                "heal_after_s": round(cut.healed_at - cut.at, 2),
                "server_bytes_dropped": cut.dropped,
                "replay_after_heal_s": round(replay_s, 3),
                "leaser_after_replay": {k: after[k] for k in ("calls", "failures", "grants")},
                "leases": dict(books.leases),
                "lost_after_stop": {r[0]: (r[1], r[2]) for r in closed},
                "agent_failure": failed[0] if failed else "",
                "proxy_connections": proxy.connections,
            },
            sort_keys=True,
        )
    )
    assert failed, "the agent logged no failed call"
    assert sorted(r[0] for r in closed) == sorted(lost) and {r[1] for r in closed} == {"returned"}
    problems = usage_problems(books, load.shots) + money_problems(books, [tenant])
    assert not problems, "\n".join(problems[:40]) + "\n" + cluster.stderr()
    assert not pools, "\n".join(pools)
    assert books.check.returncode == 0, books.check.stdout + books.check.stderr
    assert not books.leases["open"], books.leases
