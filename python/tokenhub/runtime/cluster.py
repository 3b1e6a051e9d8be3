"""This host's heartbeat among the hosts that share one database (the first piece of scale-out,
issue 13; ../shared/design/scaleout.md).

Each `tokenhub serve` is a host named by `--host-id` (or [server] host_id; default the
machine's hostname). One of its processes (the one that serves alone, or worker 1) upserts the
host's row in `cluster_hosts` when it starts and then every [server] heartbeat_s seconds, from
a task of its own: the store call runs in a thread, never on the request path, and a failed
beat is logged and retried at the next tick (the gateway serves on). Each tick also reads every
host's row, for the `tokenhub_cluster_heartbeat_age_seconds` gauge on /metrics.

`tokenhub cluster status` (tokenhub.cli.cluster) reads the same rows: a host whose last beat is
more than DOWN_AFTER_BEATS of its own intervals old is down (killed, partitioned, or stopped:
the row stays after a clean stop too, as the last word of that host).

`read_status` is the rest of what the status and /metrics (tokenhub.runtime.cluster_metrics)
show, read in one transaction: the budget pots with their open leases (count and amount, per
host too), the settlers' lag per tenant partition (the pending usage events of each partition,
`partition_of` in SQL as the settler computes it, and the age of the oldest one a settler can
settle) and which settler holds each partition's advisory lock (pg_locks, and the settler's pid
from its connection's application_name), and how long the reading took. The pending events are
read through the settler's partial index: the cost is what is pending, not the history. Lock
holders and partitions need PostgreSQL; on SQLite the lag is one line for all tenants.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenhub import __version__
from tokenhub.config import Config, host_id_problem
from tokenhub.db.database import Database, Row, Tx
from tokenhub.store import HostBeat, Store

log = logging.getLogger("tokenhub.cluster")

DOWN_AFTER_BEATS = 3


class HostIdError(ValueError):
    """The host id (given, or the hostname taken by default) cannot name a host."""


def host_id(cfg: Config) -> str:
    """This host's id: [server] host_id (or --host-id), else the machine's hostname."""
    name = cfg.server.host_id or socket.gethostname()
    if problem := host_id_problem(name):
        where = "--host-id" if cfg.server.host_id else "the hostname (give --host-id)"
        raise HostIdError(f"{where}: {problem}")
    return name


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def age_ms(beat: HostBeat, now: int) -> int:
    """How long ago the host's last heartbeat was written (0 if its clock is ahead of ours)."""
    return max(0, now - beat.heartbeat_ms)


def is_down(beat: HostBeat, now: int) -> bool:
    return age_ms(beat, now) > DOWN_AFTER_BEATS * beat.interval_ms


def live_hosts(beats: list[HostBeat], now: int | None = None) -> int:
    """How many of these hosts are up (their beat is recent)."""
    at = now_ms() if now is None else now
    return sum(1 for b in beats if not is_down(b, at))


class Heartbeat:
    """Writes this host's row every `interval_s`; keeps the last read of every host's row."""

    def __init__(
        self,
        store: Store,
        host: str,
        *,
        interval_s: float,
        workers: int,
        backlog: Callable[[], int],
    ) -> None:
        self.store = store
        self.host = host
        self.interval_s = interval_s
        self.workers = workers
        self.backlog = backlog  # this process's usage events not yet in the database
        self.started_ms = now_ms()
        self.hosts: list[HostBeat] = []  # every host's row as of the last tick
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def _beat(self) -> list[HostBeat]:
        self.store.heartbeat(
            HostBeat(
                host_id=self.host,
                started_ms=self.started_ms,
                heartbeat_ms=now_ms(),
                interval_ms=max(1, round(self.interval_s * 1000)),
                pid=os.getpid(),
                workers=self.workers,
                version=__version__,
                journal_backlog=self.backlog(),
            )
        )
        return self.store.cluster_hosts()

    async def tick(self) -> None:
        try:
            self.hosts = await asyncio.to_thread(self._beat)
        except Exception as e:  # StoreError, or anything else: the next tick tries again
            self.failures += 1
            log.warning("heartbeat of host %s failed: %s", self.host, e)

    async def start(self) -> None:
        """The first beat (so the host is listed once it serves), then one per interval."""
        await self.tick()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.tick()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def ages_s(self) -> dict[str, float]:
        """Each host's heartbeat age in seconds, now, from the rows of the last tick."""
        now = now_ms()
        return {b.host_id: age_ms(b, now) / 1000 for b in self.hosts}


# -- the cluster's state, for `tokenhub cluster status` and /metrics -----------------------------


@dataclass(slots=True)
class PotState:
    """A budget pot (tokenhub.billing.leases) and the leases open on it."""

    pot: str
    tenant: str
    unit: str
    cap: int
    granted: int
    spent_unposted: int
    open_leases: int
    leased: int  # the open leases' amounts together (== granted when sound)
    by_host: dict[str, tuple[int, int]] = field(default_factory=dict)  # host -> (leases, amount)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """The unsettled usage events of one tenant partition (None: all tenants, unpartitioned)."""

    partition: int | None
    pending: int
    failed: int  # of the pending, those recorded in settlement_failures (skipped by passes)
    oldest_ms: int | None  # the oldest pending event not failed: what the settlers are behind
    holder_pid: int | None = None  # the settler holding its advisory lock (its process id)
    holder_backend: int | None = None  # that settler's PostgreSQL backend pid


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    taken_ms: int
    query_ms: float  # how long the reading took (connection excluded)
    dialect: str
    hosts: list[HostBeat]
    pots: list[PotState]
    partitions: int  # the N the lag is split by (0: not split)
    lag: list[PartitionLag]
    settlers: int | None  # live partitioned settlers (their member locks); None on SQLite


async def _status_rows(
    tx: Tx, dialect: str, partitions: int
) -> tuple[list[Row], list[Row], list[Row], list[Row]]:
    from tokenhub.billing import settler

    hosts = await tx.fetch(
        "SELECT host_id, started_ms, heartbeat_ms, interval_ms, pid, workers, version, "
        "journal_backlog FROM cluster_hosts ORDER BY host_id"
    )
    pots = await tx.fetch(
        "SELECT p.pot, p.tenant, p.unit, p.cap, p.granted, p.spent_unposted, l.host, "
        "COUNT(l.id), COALESCE(SUM(l.amount), 0) FROM budget_pots p "
        "LEFT JOIN budget_leases l ON l.pot = p.pot AND l.state = 'open' "
        "GROUP BY p.pot, p.tenant, p.unit, p.cap, p.granted, p.spent_unposted, l.host "
        "ORDER BY p.pot, l.host"
    )
    split = dialect == "postgresql" and partitions > 0
    part = settler._PARTITION_SQL.format(n=int(partitions)) if split else "NULL"
    # `settled_ms IS NULL` word for word as the pending index's predicate.
    lag = await tx.fetch(
        f"SELECT {part}, COUNT(*), COUNT(f.event_id), "
        "MIN(CASE WHEN f.event_id IS NULL THEN e.ts_ms END) "
        "FROM usage_events e LEFT JOIN settlement_failures f ON f.event_id = e.request_id "
        f"WHERE e.settled_ms IS NULL GROUP BY {part if split else '1'}"
    )
    locks: list[Row] = []
    if dialect == "postgresql":
        locks = await tx.fetch(
            "SELECT l.classid::bigint, l.objid::bigint, l.pid, "
            "COALESCE(a.application_name, '') FROM pg_locks l "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted "
            f"AND l.classid IN ({settler._PARTITION_LOCK}, {settler._MEMBER_LOCK}) "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    return hosts, pots, lag, locks


def _settler_pid(application: str) -> int | None:
    """The settler's process id from its lock connection's application_name."""
    name, _, pid = application.rpartition(" ")
    return int(pid) if name == "tokenhub-settler" and pid.isdigit() else None


async def read_status(db: Database, *, partitions: int = 0) -> ClusterStatus:
    """The cluster's state in one read transaction (see the module docstring). `partitions`:
    the settlers' N ([cluster] partitions), to split the lag by; 0 for one line."""
    from tokenhub.billing import settler

    dialect = db.dialect
    started = time.perf_counter()
    hosts, pot_rows, lag_rows, locks = await db.read(
        lambda tx: _status_rows(tx, dialect, partitions)
    )
    query_ms = (time.perf_counter() - started) * 1000
    pots: dict[str, PotState] = {}
    for name, tenant, unit, cap, granted, unposted, host, count, amount in pot_rows:
        p = pots.get(name)
        if p is None:
            p = pots[name] = PotState(name, tenant, unit, cap, granted, unposted, 0, 0)
        if host is not None and count:
            p.by_host[host] = (int(count), int(amount))
            p.open_leases += int(count)
            p.leased += int(amount)
    holders: dict[int, tuple[int | None, int]] = {}
    members: set[int] = set()
    for classid, objid, backend, app in locks:
        if classid == settler._PARTITION_LOCK:
            holders[int(objid)] = (_settler_pid(app), int(backend))
        else:
            members.add(int(backend))
    split = dialect == "postgresql" and partitions > 0
    found = {r[0]: r for r in lag_rows}
    lag = []
    numbers: list[int | None] = list(range(partitions)) if split else [None]
    for number in numbers:
        row = found.get(number)
        pending, failed, oldest = (int(row[1]), int(row[2]), row[3]) if row else (0, 0, None)
        pid, backend = (None, None) if number is None else holders.get(number, (None, None))
        lag.append(PartitionLag(number, pending, failed, oldest, pid, backend))
    return ClusterStatus(
        taken_ms=now_ms(),
        query_ms=query_ms,
        dialect=dialect,
        hosts=[HostBeat(*r) for r in hosts],
        pots=list(pots.values()),
        partitions=partitions if split else 0,
        lag=lag,
        settlers=len(members) if dialect == "postgresql" else None,
    )
