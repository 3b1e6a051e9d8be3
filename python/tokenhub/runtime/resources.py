"""The one composition root: what a gateway process is made of, wired in one place.

`build_app(cfg, shared, worker, store=..., journal=...)` returns the aiohttp application with
its resources (usage sink, heartbeat, key cache, limit sync, settler, pots) opened and closed in its
cleanup context, in that order and the reverse; `build_runner(app, cfg)` the runner that serves
it with the [server] connection limits. `tokenhub serve` (runtime/serve.py), every forked
worker, the tests' harness (tests/server/harness.py) and the benches build their gateway
through these two, never through a copy of the wiring.

Cluster mode (`settler_proc.cluster_mode`: a host id, PostgreSQL, money admission): the
settler that worker 1 starts runs the host's lease agent (tokenhub.billing.leasing), its want
socket in the server's shared dir (`SharedState.metrics_dir`); every worker's contracts send it
wants (`WantLink`), and every worker marks the table once its replayed journal is in the
database, after which the agent reconciles the host's earlier instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tokenhub.config import Config
from tokenhub.runtime.shared import SHARED_STATE, SharedState, Worker

if TYPE_CHECKING:
    from tokenhub.gateway.auth import KeyCache
    from tokenhub.gateway.limits import LimitSync
    from tokenhub.gateway.protocol import GatewayRunner
    from tokenhub.quota import Quota
    from tokenhub.runtime.cluster import Heartbeat
    from tokenhub.runtime.journal import Journal
    from tokenhub.runtime.settler_proc import ClusterHost
    from tokenhub.runtime.sink import UsageSink
    from tokenhub.store import Store

log = logging.getLogger("tokenhub.serve")

WORKER_HEADER = "x-tokenhub-worker"


@dataclass(frozen=True)
class Resources:
    """What `build_app` wired, for whoever runs the app (and the tests) to reach."""

    store: Store
    journal: Journal
    sink: UsageSink
    keys: KeyCache
    quota: Quota | None  # the shared quota table; None: limits are not enforced
    limits: LimitSync | None


RESOURCES = web.AppKey("tokenhub_resources", Resources)


def build_app(
    cfg: Config,
    shared: SharedState,
    worker: Worker | None = None,
    *,
    store: Store,
    journal: Journal,
    demo: bool = False,
    quota: Quota | None = None,
) -> web.Application:
    """The gateway app of one process. `store` (migrated) and `journal` are the caller's: it
    opened them, it closes the store after the app's cleanup. The quota table is `quota` if
    given (the tests pass an anonymous one), else the one `shared` names, else none. Worker 1
    (or a process serving alone) starts new days in the limits and runs the settler."""
    from tokenhub.billing.pots import Contracts
    from tokenhub.gateway.app import create_app
    from tokenhub.gateway.auth import KeyCache
    from tokenhub.gateway.limits import LimitSync
    from tokenhub.gateway.state import GATEWAY, METRICS
    from tokenhub.quota import Quota
    from tokenhub.runtime.sink import UsageSink

    sink = UsageSink(store, journal)
    keys = KeyCache(store.key_digests, store.change_marker, refresh_s=cfg.server.key_refresh_s)
    # Settling is idempotent, so N settlers would bill nothing twice, but they would race to
    # seed the demo's prices and wallet: one settler per server, in worker 1.
    settles = worker is None or worker.index == 1
    limits: LimitSync | None = None
    contracts: Contracts | None = None
    if quota is None and shared.quota_path:
        quota = Quota.attach(shared.quota_path)
    if quota is not None:
        limits = LimitSync(
            quota,
            store.all_limits,
            store.change_marker,
            refresh_s=cfg.server.key_refresh_s,
            daily_reset=settles,  # one process per server starts new days
            audit=store.add_audit,
            usage_since=store.tokens_since,
        )

    # One beat per host: from the process that serves alone, or worker 1.
    heartbeat = _heartbeat(cfg, store, sink, worker) if settles else None

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        nonlocal contracts
        await sink.start()
        if heartbeat is not None:
            await heartbeat.start()
        await keys.start()
        if limits is not None:
            await limits.start()
        admission = quota if cfg.billing.admission else None
        cluster = _cluster_host(cfg, shared, worker) if admission is not None else None
        replayed = None
        if cluster is not None:
            assert admission is not None
            index = worker.index if worker is not None else 1
            replayed = asyncio.create_task(_mark_replayed(sink, admission, index))
        # Worker 1 settles what is pending and publishes the pots before it serves.
        settler = (
            await _start_settler(cfg, demo=demo, quota=admission, cluster=cluster)
            if settles
            else None
        )
        contracts_db = None
        link = None
        if admission is not None:
            from tokenhub.db.database import open_database

            if cluster is not None:
                from tokenhub.billing.leasing import WantLink

                link = WantLink(
                    admission,
                    cluster.shared_dir,
                    cluster.host_id,
                    wait_ms=cfg.cluster.acquire_wait_ms,
                )
            contracts_db = await open_database(cfg.server.database)
            contracts = Contracts(
                admission, contracts_db, refresh_s=cfg.server.key_refresh_s, cluster=link
            )
            await contracts.start()
            app[GATEWAY].contracts = contracts
        yield
        if replayed is not None:
            replayed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replayed
        if contracts is not None:
            await contracts.close()
        if link is not None:
            link.close()
        if settler is not None:
            # This process's last events reach the database before the settler's last pass
            # (bounded: a database that cannot take them leaves them to the next start).
            await sink.flush(timeout=10)
            await settler()
        if contracts_db is not None:
            await contracts_db.close()
        if limits is not None:
            await limits.close()
        await keys.close()
        if heartbeat is not None:
            await heartbeat.close()
        # Bounded: whatever the database cannot take now stays in the journal for next start.
        await sink.close(timeout=30)

    app = create_app(cfg, keys=keys, sink=sink, limits=limits, extra_cleanup=[lifecycle])
    # The tenant's own API (balance, usage, keys, redeem, OpenAI's legacy billing endpoints):
    # more URLs on this listener, nothing on the completions' path; its database opens lazily.
    # Added here, the composition root, so that the gateway does not import tenant/.
    from tokenhub.tenant.routes import setup_tenant_routes

    setup_tenant_routes(app, cfg.server.database)
    app[SHARED_STATE] = shared
    app[RESOURCES] = Resources(
        store=store, journal=journal, sink=sink, keys=keys, quota=quota, limits=limits
    )
    stats = app[METRICS].gauge("tokenhub_usage_sink", "Usage sink counters by name.")

    def collect_sink_stats() -> None:
        for name, value in sink.stats().items():
            stats.set(value, name=name)

    app[METRICS].on_collect(collect_sink_stats)
    # Registered in every worker, set in the one that beats: the sum over workers is its value.
    beats = app[METRICS].gauge(
        "tokenhub_cluster_heartbeat_age_seconds",
        "Seconds since each host's last heartbeat in cluster_hosts (as of this host's last "
        "tick); a host is down past 3 of its heartbeat intervals.",
    )
    if heartbeat is not None:
        beating = heartbeat

        def collect_heartbeats() -> None:
            for host, age in beating.ages_s().items():
                beats.set(age, host=host)

        app[METRICS].on_collect(collect_heartbeats)
    if cfg.server.host_id:  # cluster mode: rate shares and the cluster's figures
        from tokenhub.runtime.cluster_metrics import attach

        attach(app, cfg, shared, registry=app[METRICS], limits=limits, heartbeat=heartbeat)
    if worker is not None and shared.metrics_dir:
        from tokenhub.gateway.telemetry import Share

        app.cleanup_ctx.append(Share(app[METRICS], shared.metrics_dir, worker.index).context)
    if worker is not None:
        tag = str(worker.index)

        async def tag_response(request: web.Request, response: web.StreamResponse) -> None:
            response.headers[WORKER_HEADER] = tag

        app.on_response_prepare.append(tag_response)
    return app


def _cluster_host(cfg: Config, shared: SharedState, worker: Worker | None) -> ClusterHost | None:
    from tokenhub.runtime.settler_proc import ClusterHost, cluster_mode

    if not cluster_mode(cfg):
        return None
    if not shared.metrics_dir:
        # Never one host's whole budget on each: a cluster host without its agent refuses.
        raise RuntimeError("cluster mode needs the server's shared dir (made by tokenhub serve)")
    return ClusterHost(cfg.server.host_id, shared.metrics_dir, worker.count if worker else 1)


async def _mark_replayed(sink: UsageSink, quota: Quota, worker: int) -> None:
    """Once this worker's replayed journal is in the database (its sink flushed), says so in
    the table: the lease agent reconciles the host's earlier instances after every worker
    has."""
    from tokenhub.billing.leasing import mark_replayed

    while not await sink.flush(timeout=5.0):
        log.info("worker %d: the replayed journal is not in the database yet", worker)
    mark_replayed(quota, worker)


def _heartbeat(cfg: Config, store: Store, sink: UsageSink, worker: Worker | None) -> Heartbeat:
    from tokenhub.runtime.cluster import Heartbeat, HostIdError, host_id

    try:
        host = host_id(cfg)
    except HostIdError:  # `tokenhub serve` refuses this before; an embedder gets a stand-in
        host = "unnamed"
    return Heartbeat(
        store,
        host,
        interval_s=cfg.server.heartbeat_s,
        workers=worker.count if worker is not None else 1,
        backlog=lambda: int(sink.backlog),
    )


def build_runner(app: web.Application, cfg: Config, **runner_kw: Any) -> GatewayRunner:
    """The runner that serves `app` (not set up yet) with the [server] connection limits, and
    its connection counts on /metrics."""
    from tokenhub.gateway.protocol import ConnectionLimits, GatewayRunner, connection_cap
    from tokenhub.gateway.state import METRICS

    upstream_fds = sum(p.max_connections for p in cfg.providers)
    conn_limits = ConnectionLimits(
        header_timeout_s=cfg.server.header_timeout_s,
        keepalive_timeout_s=cfg.server.keepalive_timeout_s,
        max_connections=connection_cap(cfg.server.max_connections, upstream_fds),
    )
    runner = GatewayRunner(
        app, conn_limits, access_log=None, handler_cancellation=False, **runner_kw
    )
    conns = app[METRICS].gauge(
        "tokenhub_connections",
        "Client connections: open now, and (counters) refused over server.max_connections "
        "and closed for headers that did not arrive within server.header_timeout_s.",
    )

    def collect_connections() -> None:
        if (ws := runner.web_server) is not None:
            conns.set(ws.open, state="open")
            conns.set(ws.refused, state="refused")
            conns.set(ws.head_timeouts, state="header_timeout")

    app[METRICS].on_collect(collect_connections)
    return runner


async def _start_settler(
    cfg: Config, *, demo: bool, quota: Quota | None, cluster: ClusterHost | None = None
) -> Any:
    """The settler process when `[billing] settle_interval_s` is set (the demo's prices and
    wallet seeded first); None otherwise. Returns the function that stops it."""
    if cfg.billing.settle_interval_s <= 0:
        return None
    from tokenhub.runtime.settler_proc import start_settler

    if demo:
        from tokenhub.billing.service import Billing
        from tokenhub.db.database import open_database
        from tokenhub.runtime.demo import seed_demo_billing

        db = await open_database(cfg.server.database)
        try:
            await seed_demo_billing(Billing(db), cfg)
        finally:
            await db.close()
    return await start_settler(cfg, quota=quota, cluster=cluster)
