"""`tokenhub serve`: wire the store, journal, sink and key table to the app, and run it.

With `--workers N` (N > 1) the process started becomes a supervisor that serves nothing itself:

    parent: migrate, demo key, replay stale journals, before_fork(), bind N SO_REUSEPORT sockets
      ├─ fork ─> worker 1: serve() on socket 1, journal <journal dir>/worker-1 (+ the settler)
      ├─ fork ─> worker 2: serve() on socket 2, journal <journal dir>/worker-2
      └─ ...    then: forward SIGTERM/SIGINT, restart a worker that dies, give up on a crash loop

Each worker is the whole gateway (event loop, upstream pools, key cache, usage sink); they share
the database (a SQLite file or PostgreSQL), the port and whatever `before_fork()` returns (the
seam for the shared-memory quota table). The parent creates no event loop and no thread that
outlives its preparation (the PostgreSQL store's loop thread stops when the store closes), and
closes its database connections before the first fork, so a worker (and one restarted later)
starts from a clean process. Every
response of a worker carries `x-tokenhub-worker: k`. The parent exits 0 when every worker shut
down cleanly after SIGTERM/SIGINT (a second one kills them: their journals keep the rest); 1 when
a worker failed to start or to shut down, or when workers exit more than MAX_CRASHES times in
CRASH_WINDOW_S.

Journals: one process per directory (journal.py), so worker k writes `<journal dir>/worker-k`
and replays it when it starts (also after a restart: a worker killed mid-request loses nothing).
Directories no current process owns are replayed before anything serves: by the parent (the
journal dir's own segments, left by a single-process run, and `worker-k` for k > N) or, with one
worker, by the process itself (every `worker-k`). Whoever does it holds the journal dir's LOCK,
so two servers on one journal dir still refuse to start.

The admin API (tokenhub.admin, [admin] listen) is served by the single process or worker 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from tokenhub.config import Config
from tokenhub.runtime.shared import SHARED_STATE, SharedState, Worker, journal_dir

log = logging.getLogger("tokenhub.serve")

SWITCH_INTERVAL_S = 0.0005  # the GIL hand-over bound while a thread runs Python (default 5 ms)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so several worker processes can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(
    cfg: Config,
    *,
    demo: bool = False,
    demo_key: str | None = None,
    shared: SharedState | None = None,
    worker: Worker | None = None,
) -> None:
    """Run the gateway until SIGTERM/SIGINT. Alone (`worker` None) it binds its socket, uses
    the journal dir itself and prints where it serves; as a worker it takes its socket and
    journal dir from `worker`, and the parent has created the demo key (`demo_key`) already.
    What the app is made of is tokenhub.runtime.resources.build_app's business."""
    from tokenhub.runtime.demo import ensure_demo_key, print_demo, start_demo_upstream
    from tokenhub.runtime.journal import Journal
    from tokenhub.runtime.replay import replay_stale_worker_journals
    from tokenhub.runtime.resources import build_app, build_runner
    from tokenhub.store import open_store

    mock_runner: web.AppRunner | None = None
    if demo:
        mock_runner, cfg = await start_demo_upstream(cfg)

    store = open_store(cfg.server.database)
    store.migrate()
    secret = ""
    if demo:
        # A worker's parent has created the key (once, before forking) and passed its secret.
        secret = ensure_demo_key(store, demo_key) if worker is None else demo_key or ""
    if worker is None:
        root = journal_dir(cfg)
        # holds root's LOCK from here on
        journal = Journal(root, segment_bytes=cfg.server.journal_segment_bytes)
        await asyncio.to_thread(replay_stale_worker_journals, store, root, 0)
    else:
        journal = Journal(worker.journal_dir, segment_bytes=cfg.server.journal_segment_bytes)
    app = build_app(cfg, shared or SharedState(), worker, store=store, journal=journal, demo=demo)
    runner = build_runner(app, cfg)
    await runner.setup()
    sock = worker.sock if worker else reuse_port_socket(cfg.server.host, cfg.server.port)
    site = web.SockSite(runner, sock, backlog=4096)  # aiohttp's default 128 drops bursts
    await site.start()
    admin_runner = await _start_admin(cfg, worker, app)
    # Everything loaded so far (vocabularies' Python side, config, aiohttp internals) lives for
    # the whole run: move it out of the cyclic collector's sight so collections stay short.
    gc.collect()
    gc.freeze()
    # Requests make short-lived, acyclic garbage that reference counting frees; a youngest
    # generation of 700 objects (the default) runs the collector every few requests.
    gc.set_threshold(20_000, 20, 20)
    # The event loop shares the GIL with the database threads (the SQLite writer, the billing
    # settler's): after a socket call the loop waits for the GIL, by default up to 5 ms while a
    # thread runs Python (the convoy effect). A shorter switch interval bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Before "serving on": whoever reads that line may stop the server at once, cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = sock.getsockname()[:2]
    if worker is None:
        from tokenhub.db.database import redacted

        print(
            f"tokenhub: serving on http://{host}:{port}/v1 "
            f"(database {redacted(cfg.server.database)})",
            flush=True,
        )
        if admin_runner is not None:
            print(f"tokenhub: admin API on http://{cfg.admin.listen}/admin/v1", flush=True)
        if demo:
            print_demo(host, port, secret, cfg.server.database)

    watcher: asyncio.Task[None] | None = None
    if worker is not None:
        # Blocked since the fork, so that a stop asked for during start-up waits for the
        # handlers above instead of killing the worker halfway: delivered now, if pending.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        watcher = asyncio.create_task(_watch_parent(worker, stop))
        with contextlib.suppress(OSError):  # EPIPE: the parent is gone (the watcher stops us)
            os.write(worker.ready_fd, f"{worker.index} {os.getpid()}\n".encode())
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        if worker is None:
            print("tokenhub: shutting down (flushing usage events)", file=sys.stderr, flush=True)
        await runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        if mock_runner is not None:
            await mock_runner.cleanup()
        store.close()


async def _start_admin(
    cfg: Config, worker: Worker | None, gateway_app: web.Application | None = None
) -> web.AppRunner | None:
    """The admin API (tokenhub.admin) on [admin] listen, in the single process or worker 1
    only (one listener per host; "" turns it off). A port taken is a warning, not a failure:
    the gateway serves on without it.

    With `gateway_app` (this process's gateway), the console sees the live routing state
    (tokenhub.routing_state): this process's routers; under --workers N, worker 1's merged
    with the snapshots the other workers publish in the server's shared dir, which is what
    this function has every other worker do (they serve no admin listener)."""
    if not cfg.admin.listen:
        return None
    from tokenhub.gateway.state import GATEWAY
    from tokenhub.routing_state import LiveRouting, MergedRouting, RoutingProvider

    gw = None if gateway_app is None else gateway_app.get(GATEWAY)
    live = None
    if gw is not None:
        live = LiveRouting(
            lambda: gw.routers,
            gw.now_ms,
            worker=0 if worker is None else worker.index,
            workers=1 if worker is None else worker.count,
        )
    shared_dir = ""
    if gateway_app is not None and worker is not None and worker.count > 1:
        shared_dir = gateway_app[SHARED_STATE].metrics_dir
    if worker is not None and worker.index != 1:
        if live is not None and shared_dir:
            live.publish_to(shared_dir)  # for worker 1's console; lives as long as the loop
        return None
    from tokenhub.admin.app import start_admin_listener
    from tokenhub.config import split_listen

    provider: RoutingProvider | None = live
    if live is not None:
        live.start()
        if shared_dir:
            provider = MergedRouting(live, shared_dir)
    host, port = split_listen(cfg.admin.listen)
    return await start_admin_listener(
        cfg.server.database,
        host,
        port,
        max_body_bytes=cfg.admin.max_body_bytes,
        routing_state=provider,
    )


async def _watch_parent(worker: Worker, stop: asyncio.Event) -> None:
    """A worker whose parent is gone (kill -9) has no supervisor: shut down cleanly (and
    flush) rather than serve on unsupervised, holding the port and its journal."""
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != worker.parent_pid:
            log.error("the tokenhub parent process is gone; worker %d shuts down", worker.index)
            stop.set()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(main)
