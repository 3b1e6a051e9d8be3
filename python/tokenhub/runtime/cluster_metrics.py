"""The cluster's figures on /metrics, and the rate-limit share keeper's wiring (issue 13).

`attach(app, cfg, shared, limits=..., heartbeat=...)` is called by build_app in cluster mode
(`[server] host_id` set), in every worker. It registers the gauges (every worker has the
families; the sums over workers are the values set in worker 1, the process that beats) and, in
worker 1, runs two tasks from the app's cleanup context:

- the status refresh: `tokenhub.runtime.cluster.read_status` on a connection of its own, every
  [server] heartbeat_s, never per scrape; a scrape shows the last reading (its age is a gauge,
  and `tokenhub_cluster_coordinator_up` is 0 while the database cannot be read);
- the ShareKeeper (tokenhub.runtime.shares), which keeps this host's rate limits at its shares,
  with the Redis board of `[cluster] redis_url` (static shares without one). Its hook is given to
  the LimitSync of every worker here, before anything starts: worker 1's answers with the
  shares, the others' leave rate limits to worker 1.

And in every worker the lease agent's figures, read from `<shared dir>/leaser.json` (written by
the host's lease agent, fields in tokenhub.billing.leasing) at each collection, each worker for
itself (merge "self": a file every worker sees alike): every numeric field is a gauge
`tokenhub_lease_<field>`, every numeric field of its pots `tokenhub_lease_pot_<field>{pot}`, and
`tokenhub_lease_file_age_seconds` says how old the file is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from tokenhub.config import Config
from tokenhub.gateway.telemetry import Family, Registry
from tokenhub.runtime.cluster import ClusterStatus, is_down, live_hosts, now_ms, read_status

if TYPE_CHECKING:
    from tokenhub.db.database import Database
    from tokenhub.gateway.limits import LimitSync
    from tokenhub.runtime.cluster import Heartbeat
    from tokenhub.runtime.shared import SharedState
    from tokenhub.runtime.shares import ShareKeeper

log = logging.getLogger("tokenhub.cluster")

_FIELD = re.compile(r"[^a-zA-Z0-9_]")
_decode = msgspec.json.Decoder(dict[str, Any]).decode


class ClusterMetrics:
    """The gauges of one worker; `owner` (worker 1) refreshes the status and sets them."""

    def __init__(
        self,
        registry: Registry,
        cfg: Config,
        *,
        owner: bool,
        leaser_json: Path | None,
        keeper: ShareKeeper | None = None,
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.owner = owner
        self.leaser_json = leaser_json
        self.keeper = keeper
        self.interval_s = cfg.server.heartbeat_s
        self.status: ClusterStatus | None = None
        self.read_at: float | None = None  # monotonic time of the last good reading
        self.up = False
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._db: Database | None = None
        g = registry.gauge
        self.g: dict[str, Family] = {
            "up": g(
                "tokenhub_cluster_coordinator_up",
                "1 if this host's last status reading of the database (PostgreSQL: the "
                "coordinator) succeeded, else 0.",
            ),
            "query": g(
                "tokenhub_cluster_status_query_seconds",
                "How long the last status reading of the database took.",
            ),
            "age": g(
                "tokenhub_cluster_status_age_seconds",
                "How old the cluster figures are (read every [server] heartbeat_s).",
            ),
            "backlog": g(
                "tokenhub_cluster_journal_backlog",
                "Usage events each host has accepted and not yet written to the database, as "
                "its last heartbeat said.",
            ),
            "cap": g("tokenhub_cluster_pot_cap", "A budget pot's cap (its unit: tokens or nanos)."),
            "granted": g(
                "tokenhub_cluster_pot_granted", "What a budget pot's open leases hold (granted)."
            ),
            "unposted": g(
                "tokenhub_cluster_pot_spent_unposted",
                "What hosts spent from a budget pot that settlement has not posted yet.",
            ),
            "leases": g("tokenhub_cluster_pot_open_leases", "Open budget leases per pot and host."),
            "leased": g(
                "tokenhub_cluster_pot_leased", "The open leases' amounts per pot and host."
            ),
            "pending": g(
                "tokenhub_cluster_settler_pending",
                "Unsettled usage events per tenant partition (all: not partitioned).",
            ),
            "failed": g(
                "tokenhub_cluster_settler_failed",
                "Of the unsettled usage events, those that failed to settle, per partition.",
            ),
            "lag": g(
                "tokenhub_cluster_settler_lag_seconds",
                "Age of the oldest usage event a settler has yet to settle, per partition.",
            ),
            "holder": g(
                "tokenhub_cluster_settler_partition_held",
                "1 per tenant partition whose advisory lock a settler holds (its pid a label).",
            ),
            "settlers": g(
                "tokenhub_cluster_settlers", "Partitioned settlers holding their member lock."
            ),
            "shares": g(
                "tokenhub_rate_shares",
                "This host's rate-limit shares: coordinated (1: the Redis board was read at "
                "the last tick), hosts (the cluster size used), limits (rpm/tpm/concurrency "
                "limits split), reporting (near their share, on the board), syncs, failures.",
            ),
        }
        self._lease: dict[str, Family] = {}

    # -- worker 1: the refresh -----------------------------------------------------------------

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        if self.owner:
            self._task = asyncio.create_task(self._run(), name="tokenhub-cluster-metrics")
        if self.keeper is not None:
            await self.keeper.start()
        try:
            yield
        finally:
            if self.keeper is not None:
                await self.keeper.close()
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._db.close()

    async def _connect(self) -> Database:
        from tokenhub.db.database import PgDatabase, SqliteDatabase, is_postgres

        url = self.cfg.server.database
        if is_postgres(url):
            return await PgDatabase.connect(url, min_size=1, max_size=1)
        return SqliteDatabase(url)

    async def refresh(self) -> None:
        try:
            if self._db is None:
                self._db = await self._connect()
            self.status = await asyncio.wait_for(
                read_status(self._db, partitions=self.cfg.cluster.partitions),
                max(self.interval_s, 5.0),
            )
            self.read_at = time.monotonic()
            self.up = True
        except Exception as e:  # DatabaseError, a timeout: the next interval tries again
            self.up = False
            self.failures += 1
            log.warning("cluster status: cannot read the database: %s", e)
            db, self._db = self._db, None
            if db is not None:
                with contextlib.suppress(Exception):
                    await db.close()

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    def collect(self) -> None:
        """Worker 1's gauges from the last reading (no database call)."""
        g = self.g
        for fam in g.values():
            fam.values.clear()
        if self.keeper is not None:
            for name, value in self.keeper.stats().items():
                g["shares"].set(value, figure=name)
        if not self.owner:
            return
        g["up"].set(int(self.up))
        s = self.status
        if s is None or self.read_at is None:
            return
        g["age"].set(round(time.monotonic() - self.read_at, 3))
        g["query"].set(round(s.query_ms / 1000, 6))
        for b in s.hosts:
            g["backlog"].set(b.journal_backlog, host=b.host_id)
        for p in s.pots:
            # Only pots with something out: one per tenant and contract would be a lot.
            if not (p.open_leases or p.granted or p.spent_unposted):
                continue
            g["cap"].set(p.cap, pot=p.pot, unit=p.unit)
            g["granted"].set(p.granted, pot=p.pot, unit=p.unit)
            g["unposted"].set(p.spent_unposted, pot=p.pot, unit=p.unit)
            for host, (n, amount) in p.by_host.items():
                g["leases"].set(n, pot=p.pot, host=host)
                g["leased"].set(amount, pot=p.pot, host=host)
        now = s.taken_ms
        for lag in s.lag:
            part = "all" if lag.partition is None else str(lag.partition)
            g["pending"].set(lag.pending, partition=part)
            g["failed"].set(lag.failed, partition=part)
            g["lag"].set(
                0 if lag.oldest_ms is None else max(0, now - lag.oldest_ms) / 1000, partition=part
            )
            if lag.holder_backend is not None:
                pid = "" if lag.holder_pid is None else str(lag.holder_pid)
                g["holder"].set(1, partition=part, pid=pid)
        if s.settlers is not None:
            g["settlers"].set(s.settlers)

    # -- every worker: the lease agent's file ----------------------------------------------------

    def _lease_gauge(self, name: str) -> Family:
        fam = self._lease.get(name)
        if fam is None:
            fam = self._lease[name] = self.registry.gauge(
                name, "The host's lease agent's figure of that name (leaser.json).", merge="self"
            )
        return fam

    def collect_leaser(self) -> None:
        for fam in self._lease.values():
            fam.values.clear()
        if self.leaser_json is None:
            return
        try:
            raw = self.leaser_json.read_bytes()
            age = time.time() - os.stat(self.leaser_json).st_mtime
            data = _decode(raw)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return  # no agent (yet), or a file being replaced: the next scrape reads it
        self._lease_gauge("tokenhub_lease_file_age_seconds").set(round(max(age, 0.0), 3))
        for field, value in data.items():
            name = _FIELD.sub("_", field)
            if isinstance(value, bool):
                self._lease_gauge(f"tokenhub_lease_{name}").set(int(value))
            elif isinstance(value, int | float):
                self._lease_gauge(f"tokenhub_lease_{name}").set(value)
            elif isinstance(value, str) and field.endswith("error"):
                self._lease_gauge(f"tokenhub_lease_{name}").set(int(bool(value)))
            elif isinstance(value, dict):
                # {"pots": {"pot:m:acme": {"leases": 1, ...}}} -> tokenhub_lease_pot_leases{pot}
                label = name[:-1] if name.endswith("s") else name
                for key, inner in value.items():
                    if not isinstance(inner, dict):
                        continue
                    for sub, v in inner.items():
                        if isinstance(v, int | float) and not isinstance(v, bool):
                            fam = self._lease_gauge(
                                f"tokenhub_lease_{label}_{_FIELD.sub('_', sub)}"
                            )
                            fam.set(v, **{label: str(key)})


def hosts_counter(cfg: Config, heartbeat: Heartbeat | None) -> Callable[[], int]:
    """The cluster's size N for static shares: [cluster] hosts, else the live hosts of the
    heartbeat's last read (the last non-empty one: a failed read keeps the count), at least 1."""
    last = 1

    def count() -> int:
        nonlocal last
        if cfg.cluster.hosts:
            return cfg.cluster.hosts
        if heartbeat is not None and heartbeat.hosts:
            now = now_ms()
            # This host counts even when its own row is stale (the database was down).
            mine = any(b.host_id == heartbeat.host and not is_down(b, now) for b in heartbeat.hosts)
            last = max(1, live_hosts(heartbeat.hosts, now) + (0 if mine else 1))
        return last

    return count


def attach(
    app: web.Application,
    cfg: Config,
    shared: SharedState,
    *,
    registry: Registry,
    limits: LimitSync | None,
    heartbeat: Heartbeat | None,
) -> ClusterMetrics:
    """Cluster mode's parts of one worker (see the module docstring); `heartbeat` is set in
    the process that beats (worker 1), which owns the figures and the shares."""
    owner = heartbeat is not None
    keeper: ShareKeeper | None = None
    if limits is not None:
        if owner:
            keeper = _keeper(cfg, limits, heartbeat)
            limits.rate_share = keeper.local_limit
        else:
            limits.rate_share = _elsewhere
    leaser = None
    if shared.metrics_dir:
        from tokenhub.billing.leasing import leaser_path

        leaser = leaser_path(shared.metrics_dir)
    metrics = ClusterMetrics(registry, cfg, owner=owner, leaser_json=leaser, keeper=keeper)
    registry.on_collect(metrics.collect)
    registry.on_collect(metrics.collect_leaser)
    app.cleanup_ctx.append(metrics.context)
    return metrics


def _elsewhere(account: str, kind: str, total: int) -> None:
    """The other workers' hook: worker 1 writes the shares."""
    return None


def _keeper(cfg: Config, limits: LimitSync, heartbeat: Heartbeat | None) -> ShareKeeper:
    from tokenhub.runtime.shares import ShareBoard, ShareKeeper

    hosts = hosts_counter(cfg, heartbeat)
    board = None
    if cfg.cluster.redis_url:
        host = heartbeat.host if heartbeat is not None else cfg.server.host_id
        board = ShareBoard(cfg.cluster.redis_url, host, hosts=hosts())
    return ShareKeeper(
        limits.quota, lambda: limits.rate_totals, hosts, board, carried=lambda: limits.carried
    )
