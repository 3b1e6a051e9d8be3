"""`tokenhub serve`: wire the store, journal, sink and key table to the app, and run it.

With `--workers N` (N > 1) the process started becomes a supervisor that serves nothing itself:

    parent: migrate, demo key, replay stale journals, before_fork(), bind N SO_REUSEPORT sockets
      ├─ fork ─> worker 1: serve() on socket 1, journal <journal dir>/worker-1 (+ the settler)
      ├─ fork ─> worker 2: serve() on socket 2, journal <journal dir>/worker-2
      └─ ...    then: forward SIGTERM/SIGINT, restart a worker that dies, give up on a crash loop

Each worker is the whole gateway (event loop, upstream pools, key cache, usage sink); they share
the database, the port and whatever `before_fork()` returns (the seam for the shared-memory
quota table). The parent creates no event loop and no thread, and closes its database connection
before the first fork, so a worker (and one restarted later) starts from a clean process. Every
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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import gc
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from aiohttp import web

from tokenhub.config import Config, ConfigError, from_mapping, load_config

if TYPE_CHECKING:
    from tokenhub.runtime.journal import Journal
    from tokenhub.quota import Quota
    from tokenhub.store import Store
    from tokenhub.usage import UsageEvent

log = logging.getLogger("tokenhub.serve")

DEMO_DB = "tokenhub-demo.db"
DEMO_TENANT = "demo"
# The demo's API key, when it is not to be a new random one: never on the command line, where
# any local user reads it (`ps`), but in this variable or a file (`--demo-key-file`).
DEMO_KEY_ENV = "TOKENHUB_DEMO_KEY"

MAX_WORKERS = 64
# A crash loop: more than this many unexpected worker exits within CRASH_WINDOW_S seconds.
MAX_CRASHES = 5
CRASH_WINDOW_S = 30.0
WORKER_HEADER = "x-tokenhub-worker"
_WORKER_DIR = re.compile(r"worker-(\d+)")


def demo_config(mock_port: int, database: str) -> Config:
    """Three models on the built-in mock upstream (gpt-4o-mini has two deployments, 3:1), and
    `auto`, which picks one of two of them by the prompt's complexity."""

    def price(cur: str, i: str, c: str, o: str) -> dict[str, Any]:
        return {
            "currency": cur,
            "input_per_1m": Decimal(i),
            "cached_input_per_1m": Decimal(c),
            "output_per_1m": Decimal(o),
        }

    base = f"http://127.0.0.1:{mock_port}/v1"
    data: dict[str, Any] = {
        "server": {"database": database},
        "providers": [
            {"name": "mock-a", "base_url": base},
            {"name": "mock-b", "base_url": base},
        ],
        "models": [
            {
                "id": "gpt-4o-mini",
                "deployments": [
                    {"provider": "mock-a", "upstream_model": "gpt-4o-mini", "weight": 3,
                     "vocab": "cl100k_base", "price": price("USD", "0.15", "0.075", "0.60")},
                    {"provider": "mock-b", "upstream_model": "gpt-4o-mini", "weight": 1,
                     "vocab": "cl100k_base", "price": price("USD", "0.15", "0.075", "0.60")},
                ],
            },
            {
                "id": "qwen-plus",
                "deployments": [
                    {"provider": "mock-a", "upstream_model": "qwen-plus", "vocab": "qwen",
                     "price": price("CNY", "0.8", "0.16", "2")},
                ],
            },
            {
                "id": "deepseek-chat",
                "deployments": [
                    {"provider": "mock-b", "upstream_model": "deepseek-chat",
                     "vocab": "deepseek-v4", "price": price("CNY", "2", "0.5", "8")},
                ],
            },
            # Routes by the prompt's complexity: small talk to gpt-4o-mini, code, math and
            # long prompts to deepseek-chat.
            {"id": "auto", "tiers": {"cheap": "gpt-4o-mini", "strong": "deepseek-chat"}},
        ],
    }  # fmt: skip
    return from_mapping(data, "<demo>")


def _journal_dir(cfg: Config) -> str:
    from tokenhub.runtime.journal import default_journal_dir

    return cfg.server.journal_dir or default_journal_dir(cfg.server.database)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
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


# -- what the parent prepares for its workers ----------------------------------------------------


@dataclass(frozen=True)
class SharedState:
    """What the serving process creates before any worker exists, for every worker (and every
    restarted one) to inherit: the seam for per-server shared memory. Workers find it under
    `SHARED_STATE` in their app."""

    # The quota table (tokenhub.quota): a file each worker attaches, so that the key and
    # tenant limits hold across all workers. "" = none (limits are not enforced).
    quota_path: str = ""
    # Where the workers publish their metrics for one another (tokenhub.gateway.telemetry.Share),
    # so that one scrape of /metrics describes the whole server. "" = each answers for itself.
    metrics_dir: str = ""

    def close(self) -> None:
        """The serving process's last step: the table goes with the server."""
        if self.quota_path:
            with contextlib.suppress(OSError):
                os.unlink(self.quota_path)
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


SHARED_STATE = web.AppKey("tokenhub_shared_state", SharedState)

SETTLER_READY_S = 60  # how long a server waits for its settler to publish the pots
SETTLER_STOP_S = 60  # how long the settler's last pass may take at shutdown
SWITCH_INTERVAL_S = 0.0005  # the GIL hand-over bound while a thread runs Python (default 5 ms)
QUOTA_ACCOUNTS = 4096  # keys and tenants with a limit (plus one for the day)
QUOTA_RESERVATIONS = 16_384  # requests with limits in flight at once (~3.4 MB in all)


def quota_path(cfg: Config) -> Path:
    """Where this server's quota table lives: /dev/shm (memory, never written back to a disk)
    when there is one, else the journal dir; named after the serving process, which is unique
    while it runs, so a second server (refused later for the journal's LOCK) cannot replace
    the table of a running one."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(_journal_dir(cfg))
    where.mkdir(parents=True, exist_ok=True)
    return where / f"tokenhub-quota-{os.getpid()}"


def remove_stale_quota_tables(directory: Path) -> int:
    """Deletes the tables (and metrics directories) of servers that are gone without cleaning
    up (SIGKILL): those whose process no longer exists. /dev/shm is memory, so they would
    otherwise add up."""
    removed = 0
    for p in [*directory.glob("tokenhub-quota-*"), *directory.glob("tokenhub-metrics-*")]:
        pid = p.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
        except OSError:  # EPERM: alive, someone else's
            pass
    return removed


def before_fork(cfg: Config) -> SharedState:
    """Called once per `tokenhub serve`, before the first worker is forked (with one worker
    too, where the one process is parent and worker both, so there is a single code path).
    Must not start threads or event loops: the children would inherit them broken."""
    from tokenhub.quota import Quota
    from tokenhub.billing.pots import new_epoch

    path = quota_path(cfg)
    remove_stale_quota_tables(path.parent)
    quota = Quota.create(path, accounts=QUOTA_ACCOUNTS, reservations=QUOTA_RESERVATIONS)
    new_epoch(quota)  # what this table holds is released only by this table's server
    # Beside the quota table, named after the serving process in the same way.
    metrics_dir = path.with_name(f"tokenhub-metrics-{os.getpid()}")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(mode=0o700)
    return SharedState(quota_path=str(path), metrics_dir=str(metrics_dir))


@dataclass(frozen=True)
class Worker:
    """One forked worker's place in the server (`serve(worker=...)`)."""

    index: int  # 1..count
    count: int
    sock: socket.socket  # its own SO_REUSEPORT listening socket, bound by the parent
    journal_dir: str
    ready_fd: int  # "<index> <pid>\n" goes here once it serves
    parent_pid: int


def worker_journal_dir(root: str | os.PathLike[str], index: int) -> Path:
    return Path(root) / f"worker-{index}"


# -- journals no process owns ------------------------------------------------------------------


def _insert_replayed(store: Store, journal: Journal, events: list[UsageEvent]) -> None:
    """Insert events from a replay; what the store refuses for good goes to rejected.jsonl,
    as the sink does. StoreError (locked for longer than busy_timeout) propagates."""
    from tokenhub.store import InvalidEvents

    for start in range(0, len(events), 1000):
        batch = events[start : start + 1000]
        while batch:
            try:
                store.insert_events(batch)
                break
            except InvalidEvents as e:
                for event, why in e.events:
                    journal.reject(event, why)
                    log.error(
                        "usage event %s cannot be stored (%s); set aside in %s",
                        getattr(event, "request_id", "?"),
                        why,
                        journal.directory / "rejected.jsonl",
                    )
                bad = {id(event) for event, _ in e.events}
                batch = [ev for ev in batch if id(ev) not in bad]


def replay_journal_dir(store: Store, directory: Path, *, why: str) -> int:
    """Insert what the journal in `directory` holds and delete its segments once durable.
    JournalError if another process holds it. Returns the number of events replayed."""
    from tokenhub.runtime.journal import Journal

    # Small segments: this journal only reads; its (empty) new segment is deleted on close.
    journal = Journal(directory, segment_bytes=4096)
    try:
        events = journal.replay()
        if events:
            _insert_replayed(store, journal, events)
            st = journal.replay_stats
            log.warning(
                "replayed %d usage events from %s (%s): %d finished, %d interrupted",
                len(events),
                directory,
                why,
                st.finished,
                st.interrupted,
            )
        # As the sink does: segments go only once a checkpoint made the rows durable (a
        # reader's snapshot can hold it back briefly); else they are replayed again next time.
        for _ in range(3):
            if not events or store.sync():
                journal.discard_replayed()
                break
            time.sleep(0.05)
        return len(events)
    finally:
        journal.close()


def replay_stale_worker_journals(store: Store, root: str | os.PathLike[str], keep: int) -> int:
    """Replay `root/worker-k` for every k > `keep` (every one with keep=0: a single-process
    server), left by an earlier run with more workers, and remove those left empty. The
    caller holds root's LOCK, so no other server is doing the same. Returns events replayed."""
    from tokenhub.runtime.journal import JournalError

    root = Path(root)
    if not root.is_dir():
        return 0
    replayed = 0
    for d in sorted(root.iterdir()):
        m = _WORKER_DIR.fullmatch(d.name)
        if m is None or not d.is_dir() or int(m.group(1)) <= keep:
            continue
        try:
            replayed += replay_journal_dir(store, d, why="left by an earlier run with more workers")
        except JournalError as e:  # a worker of a gone parent, still flushing: it finishes
            log.warning("%s; not replayed now", e)
            continue
        # Nothing else may own a directory under a locked root, so removing LOCK is safe; a
        # rejected.jsonl keeps the directory.
        if [p.name for p in d.iterdir()] == ["LOCK"]:
            with contextlib.suppress(OSError):
                (d / "LOCK").unlink()
                d.rmdir()
    return replayed


# -- one gateway process -----------------------------------------------------------------------


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
    journal dir from `worker`, and the parent has created the demo key (`demo_key`) already."""
    from tokenhub import mock as mock_upstream
    from tokenhub.runtime.journal import Journal
    from tokenhub.quota import Quota
    from tokenhub.gateway.app import create_app
    from tokenhub.gateway.auth import KeyCache
    from tokenhub.billing.pots import Contracts
    from tokenhub.gateway.limits import LimitSync
    from tokenhub.gateway.protocol import ConnectionLimits, GatewayRunner, connection_cap
    from tokenhub.gateway.state import GATEWAY, METRICS
    from tokenhub.runtime.sink import UsageSink
    from tokenhub.store import open_store

    mock_runner: web.AppRunner | None = None
    if demo:
        # Each worker runs its own mock upstream on its own port: simpler than sharing one
        # across processes, and the mock's state (its ledger) is not part of the demo.
        mock_app = mock_upstream.build_app(mock_upstream.MockOptions())
        mock_runner = web.AppRunner(mock_app, access_log=None)
        await mock_runner.setup()
        mock_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        mock_sock.bind(("127.0.0.1", 0))
        mock_sock.listen(1024)
        mock_sock.setblocking(False)
        await web.SockSite(mock_runner, mock_sock).start()
        mock_port = mock_sock.getsockname()[1]
        demo_cfg = demo_config(mock_port, cfg.server.database)
        demo_cfg.server = cfg.server
        demo_cfg.billing = cfg.billing
        cfg = demo_cfg

    store = open_store(cfg.server.database)
    store.migrate()
    secret = ""
    if demo:
        # A worker's parent has created the key (once, before forking) and passed its secret.
        secret = _ensure_demo_key(store, demo_key) if worker is None else demo_key or ""
    if worker is None:
        root = _journal_dir(cfg)
        # holds root's LOCK from here on
        journal = Journal(root, segment_bytes=cfg.server.journal_segment_bytes)
        await asyncio.to_thread(replay_stale_worker_journals, store, root, 0)
    else:
        journal = Journal(worker.journal_dir, segment_bytes=cfg.server.journal_segment_bytes)
    sink = UsageSink(store, journal)
    keys = KeyCache(store.key_digests, store.change_marker, refresh_s=cfg.server.key_refresh_s)
    # Settling is idempotent, so N settlers would bill nothing twice, but they would race to
    # seed the demo's prices and wallet: one settler per server, in worker 1.
    settles = worker is None or worker.index == 1
    limits: LimitSync | None = None
    contracts: Contracts | None = None
    quota: Quota | None = None
    if shared is not None and shared.quota_path:
        quota = Quota.attach(shared.quota_path)
        limits = LimitSync(
            quota,
            store.all_limits,
            store.change_marker,
            refresh_s=cfg.server.key_refresh_s,
            daily_reset=settles,  # one process per server starts new days
            audit=store.add_audit,
            usage_since=store.tokens_since,
        )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        nonlocal contracts
        await sink.start()
        await keys.start()
        if limits is not None:
            await limits.start()
        admission = quota if cfg.billing.admission else None
        # Worker 1 settles what is pending and publishes the pots before it serves.
        settler = await _start_settler(cfg, demo=demo, quota=admission) if settles else None
        contracts_db = None
        if admission is not None:
            from tokenhub.db.database import open_database

            contracts_db = await open_database(cfg.server.database)
            contracts = Contracts(admission, contracts_db, refresh_s=cfg.server.key_refresh_s)
            await contracts.start()
            app[GATEWAY].contracts = contracts
        yield
        if contracts is not None:
            await contracts.close()
        if settler is not None:
            await settler()
        if contracts_db is not None:
            await contracts_db.close()
        if limits is not None:
            await limits.close()
        await keys.close()
        # Bounded: whatever the database cannot take now stays in the journal for next start.
        await sink.close(timeout=30)

    app = create_app(cfg, keys=keys, sink=sink, limits=limits, extra_cleanup=[lifecycle])
    app[SHARED_STATE] = shared if shared is not None else SharedState()
    stats = app[METRICS].gauge("tokenhub_usage_sink", "Usage sink counters by name.")

    def collect_sink_stats() -> None:
        for name, value in sink.stats().items():
            stats.set(value, name=name)

    app[METRICS].on_collect(collect_sink_stats)
    if worker is not None and shared is not None and shared.metrics_dir:
        from tokenhub.gateway.telemetry import Share

        app.cleanup_ctx.append(Share(app[METRICS], shared.metrics_dir, worker.index).context)
    if worker is not None:
        tag = str(worker.index)

        async def tag_response(request: web.Request, response: web.StreamResponse) -> None:
            response.headers[WORKER_HEADER] = tag

        app.on_response_prepare.append(tag_response)
    upstream_fds = sum(p.max_connections for p in cfg.providers)
    conn_limits = ConnectionLimits(
        header_timeout_s=cfg.server.header_timeout_s,
        keepalive_timeout_s=cfg.server.keepalive_timeout_s,
        max_connections=connection_cap(cfg.server.max_connections, upstream_fds),
    )
    runner = GatewayRunner(app, conn_limits, access_log=None, handler_cancellation=False)
    await runner.setup()
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
    sock = worker.sock if worker else _reuse_port_socket(cfg.server.host, cfg.server.port)
    site = web.SockSite(runner, sock, backlog=4096)  # aiohttp's default 128 drops bursts
    await site.start()
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
    host, port = sock.getsockname()[:2]
    if worker is None:
        print(
            f"tokenhub: serving on http://{host}:{port}/v1 (database {cfg.server.database})",
            flush=True,
        )
        if demo:
            _print_demo(host, port, secret, cfg.server.database)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
        if mock_runner is not None:
            await mock_runner.cleanup()
        store.close()


async def _watch_parent(worker: Worker, stop: asyncio.Event) -> None:
    """A worker whose parent is gone (kill -9) has no supervisor: shut down cleanly (and
    flush) rather than serve on unsupervised, holding the port and its journal."""
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != worker.parent_pid:
            log.error("the tokenhub parent process is gone; worker %d shuts down", worker.index)
            stop.set()


async def _start_settler(
    cfg: Config, *, demo: bool, quota: Quota | None = None
) -> Callable[[], Awaitable[None]] | None:
    """Settles usage into the ledger when `[billing] settle_interval_s` is set (the demo sets
    it, and prices its models): in a process of its own, `tokenhub billing settle --follow`,
    so that settlement's Python work never holds the serving loop's GIL. It is restarted if it
    dies, and stopped (after a last pass) with the server; it stops by itself if the server
    is killed. With admission (`quota`) it also keeps the table's pots equal to the ledger, and
    this returns once it has settled what was pending and published them
    (tokenhub.billing.pots). Returns the function that stops it."""
    interval = cfg.billing.settle_interval_s
    if interval <= 0:
        return None
    if demo:
        from tokenhub.db.database import open_database
        from tokenhub.billing.service import Billing

        db = await open_database(cfg.server.database)
        try:
            await _seed_demo_billing(Billing(db), cfg)
        finally:
            await db.close()
    argv = [
        sys.executable, "-m", "tokenhub.cli", "billing", "settle", "--follow", f"{interval:g}",
        "--batch", str(cfg.billing.settle_batch), "--parent", str(os.getpid()),
    ]  # fmt: skip
    if quota is not None and quota.table.path:
        argv += ["--quota", quota.table.path]
    stopping = False
    secret_vars = [p.api_key_env for p in cfg.providers if p.api_key_env]
    proc = await _spawn_settler(argv, cfg.server.database, secret_vars)

    async def supervise() -> None:
        nonlocal proc
        while True:
            code = await proc.wait()
            if stopping:
                return
            log.error("the settler (pid %d) exited with %s; restarting it in 1 s", proc.pid, code)
            await asyncio.sleep(1.0)
            proc = await _spawn_settler(argv, cfg.server.database, secret_vars)

    task = asyncio.create_task(supervise(), name="tokenhub-settler")
    if quota is not None:
        from tokenhub.billing.pots import READY_ACCOUNT

        deadline = time.monotonic() + SETTLER_READY_S
        while not quota.limits(READY_ACCOUNT)["requests"]:
            if time.monotonic() > deadline:
                log.error(
                    "the settler has not published the billing balances after %d s; money "
                    "admission answers 503 until it has",
                    SETTLER_READY_S,
                )
                break
            await asyncio.sleep(0.05)

    async def close() -> None:
        nonlocal stopping
        stopping = True
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), SETTLER_STOP_S)
            except TimeoutError:
                log.error("the settler did not stop within %d s; killing it", SETTLER_STOP_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return close


async def _spawn_settler(
    argv: list[str], database: str, secret_vars: Iterable[str]
) -> asyncio.subprocess.Process:
    # A session of its own: a Ctrl-C at the terminal reaches the server, which stops the
    # settler itself (after its last pass), not both at once. The database goes in the
    # environment, not the command line, which any local user can read (a PostgreSQL URL
    # may carry a password).
    from tokenhub.cli.admin import ENV_DB

    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True,
        env={**settler_environ(os.environ, secret_vars), ENV_DB: database},
    )


def settler_environ(environ: Mapping[str, str], secret_vars: Iterable[str]) -> dict[str, str]:
    """The server's environment less what the settler must not hold: the providers' API keys
    (`secret_vars`, their api_key_env) and the demo key. It bills; it calls no provider."""
    drop = {*secret_vars, DEMO_KEY_ENV}
    return {k: v for k, v in environ.items() if k not in drop}


async def _seed_demo_billing(billing: Any, cfg: Config) -> None:
    """The demo tenant settles in USD with a 10 USD wallet; each demo model gets a price-book
    entry from its first deployment's price (once)."""
    prices = {p.model for p in await billing.prices()}
    for m in cfg.models:
        price = m.deployments[0].price if m.deployments else None  # a tiered model: none
        if price is None or m.id in prices:
            continue
        await billing.set_price(
            m.id,
            currency=price.currency,
            input_per_1m=price.input_per_1m,
            cached_input_per_1m=price.cached_input_per_1m,
            output_per_1m=price.output_per_1m,
            effective_ms=0,
        )
    if not await billing.lots(DEMO_TENANT) and not prices:
        await billing.set_profile(DEMO_TENANT, currency="USD", draw_order=["wallet", "postpaid"])
        await billing.set_fx("CNY", "USD", "0.14", effective_ms=0)
        await billing.topup(DEMO_TENANT, "10.00", "USD")


def _demo_key(args: argparse.Namespace) -> str | None:
    """The demo's key from --demo-key-file or TOKENHUB_DEMO_KEY (None: a new random one)."""
    from tokenhub.cli import CliError

    if args.demo_key is not None:
        raise CliError(
            f"--demo-key puts the key in the process list; set {DEMO_KEY_ENV} or use "
            "--demo-key-file FILE"
        )
    if args.demo_key_file:
        try:
            with open(args.demo_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise CliError(f"cannot read --demo-key-file: {why}") from None
        if not key:
            raise CliError(f"--demo-key-file {args.demo_key_file!r} holds no key")
        return key
    return os.environ.get(DEMO_KEY_ENV) or None


def _ensure_demo_key(store: Any, demo_key: str | None) -> str:
    from tokenhub.store import AlreadyExists

    with contextlib.suppress(AlreadyExists):
        store.create_tenant(DEMO_TENANT)
    if demo_key:
        # A malformed key raises StoreError here, before anything is printed.
        with contextlib.suppress(AlreadyExists):
            store.create_key(DEMO_TENANT, secret=demo_key)
        return demo_key
    _, secret = store.create_key(DEMO_TENANT)
    return str(secret)


def _print_demo(host: str, port: int, key: str, database: str) -> None:
    """How to call the demo: commands that work as printed, pasted into another shell (the
    venv's tokenhub by its path, the database in TOKENHUB_DB)."""
    url = f"http://{host}:{port}/v1"
    body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'
    exe, where = _tokenhub_command()
    lines = [
        "",
        f"Demo ready: tenant '{DEMO_TENANT}', models gpt-4o-mini, qwen-plus and deepseek-chat",
        "on the built-in mock upstream, and auto (picks gpt-4o-mini or deepseek-chat by the",
        "prompt's complexity). Try:",
        "",
        f"  curl -s {url}/chat/completions \\",
        f'    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
        f"    -d '{body}'",
        "",
        f"  {shlex.quote(sys.executable)} - <<'EOF'",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{url}", api_key="{key}")',
        "r = client.chat.completions.create(",
        '    model="qwen-plus", messages=[{"role": "user", "content": "Hi"}])',
        "print(r.choices[0].message.content)",
        "print(r.usage)",
        "EOF",
        "",
        f"Keys, usage events and billing ({where}):",
        "",
        f"  export TOKENHUB_DB={_shell_database(database)}",
        f"  {exe} keys list",
        f"  {exe} events export --format jsonl | head -3",
        f"  {exe} wallet show {DEMO_TENANT}",
        f"  {exe} billing statement {DEMO_TENANT} --period {_this_month()}",
        "",
        f"Metrics:      curl -s http://{host}:{port}/metrics",
        "Stop:         Ctrl-C",
    ]
    print("\n".join(lines), flush=True)


def _tokenhub_command() -> tuple[str, str]:
    """The `tokenhub` command as a plain shell finds it, and where it works: the bare name
    when PATH has this one outside a virtual environment (make puts .venv/bin on its own
    PATH only), else the script beside this Python (relative to the working directory when
    under it), else `python -m tokenhub.cli`."""
    script = Path(sys.executable).with_name("tokenhub")
    in_venv = sys.prefix != sys.base_prefix
    found = shutil.which("tokenhub")
    if not in_venv and found and script.exists() and Path(found).samefile(script):
        return "tokenhub", "in any shell"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m tokenhub.cli", "in any shell"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd()))), "in a shell in this directory"
    except ValueError:
        return shlex.quote(str(script)), "in any shell"


def _shell_database(database: str) -> str:
    """The demo's database for TOKENHUB_DB: a path made absolute; a URL with a password is not
    printed (stdout is often a log)."""
    if "://" not in database:
        return shlex.quote(os.path.abspath(database))
    from urllib.parse import urlsplit

    if urlsplit(database).password:
        return "'<the --db URL>'"
    return shlex.quote(database)


def _this_month() -> str:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    return f"{now.year:04d}-{now.month:02d}"


# -- several workers ---------------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SUPERVISOR_SIGNALS = {*_STOP_SIGNALS, signal.SIGCHLD}


def _listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """One SO_REUSEPORT listening socket per worker, all bound here, before any fork.

    Why a socket per worker rather than one socket all workers accept from (Linux): on a shared
    socket every worker's loop polls the same accept queue (asyncio and uvloop do not ask for
    EPOLLEXCLUSIVE), each new connection wakes them all, and the first loop to run accepts
    until the queue is empty: a burst of connections goes to whichever worker woke first, not
    to the least busy one, and the other wake-ups are wasted. With a socket each, the kernel
    hashes every connection's 4-tuple over the group's sockets: an even spread, no herd. The
    price, a connection hashed to a busy worker waits even if another is idle, is small here:
    one worker's loop multiplexes thousands of I/O-bound requests.

    Measured (2-core VM, two forked uvloop/aiohttp workers, a client opening 64 keep-alive
    connections at once, 3000 requests): shared socket, one worker got all 64 connections in
    5 runs of 6 (the sixth: 44/56%); a socket each, 44-49% for the less loaded worker in all 6.

    The parent binds them (not each worker) and keeps them open: the port is known (also with
    port 0) and taken before anything forks, and a worker that dies leaves its socket, and the
    connections queued on it, to its replacement instead of resetting them."""
    first = _reuse_port_socket(host, port)
    socks = [first]
    try:
        port = int(first.getsockname()[1])
        socks += [_reuse_port_socket(host, port) for _ in range(count - 1)]
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _lock_journal_root(root: Path) -> int:
    """Hold `root/LOCK` (the journal's own lock file) for the server's lifetime: a second
    server on the same journal dir fails to start, whether it runs one worker or many."""
    from tokenhub.runtime.journal import JournalError

    fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JournalError(
            f"journal {str(root)!r} is in use by another process (another tokenhub serve?)"
        ) from None
    return fd


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _ignore_signal(signum: int, frame: object) -> None:
    """The supervisor's handler: the signal number reaches its loop through the wake-up fd."""


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(main)


def serve_workers(cfg: Config, count: int, *, demo: bool, demo_key: str | None) -> int:
    """`tokenhub serve --workers N`: prepare once, fork N workers, supervise them."""
    # The app and the sink are imported once here, so that every fork (and restart) starts
    # with them in memory. Importing starts no thread and no loop; nothing here may
    # (vocabularies load in the workers: the meter's thread pool would not survive a fork).
    import tokenhub.gateway.app
    import tokenhub.runtime.sink  # noqa: F401
    from tokenhub.cli import CliError
    from tokenhub.store import open_store

    root = Path(_journal_dir(cfg))
    store = open_store(cfg.server.database)
    lock_fd = -1
    try:
        store.migrate()
        secret = _ensure_demo_key(store, demo_key) if demo else ""
        # A single-process run journals into root itself (JournalError if one still runs).
        replay_journal_dir(store, root, why="left by a single-process run")
        lock_fd = _lock_journal_root(root)
        replay_stale_worker_journals(store, root, keep=count)
    except BaseException:
        if lock_fd >= 0:
            os.close(lock_fd)
        raise
    finally:
        store.close()  # an SQLite connection must not cross a fork
    shared = SharedState()
    try:
        shared = before_fork(cfg)
        try:
            listeners = _listeners(cfg.server.host, cfg.server.port, count)
        except OSError as e:
            where = f"{cfg.server.host}:{cfg.server.port}"
            raise CliError(f"cannot listen on {where}: {e.strerror or e}") from None
        sup = _Supervisor(
            cfg, count, listeners, root, lock_fd, demo=demo, secret=secret, shared=shared
        )
        return sup.run()
    finally:
        shared.close()
        os.close(lock_fd)


class _Supervisor:
    """The parent of `--workers N`: forks the workers, restarts one that dies, forwards stop
    signals. A plain loop on one selector (signals arrive through `signal.set_wakeup_fd`,
    readiness through a pipe): no event loop, no thread, so forking again later is safe."""

    def __init__(
        self,
        cfg: Config,
        count: int,
        listeners: list[socket.socket],
        root: Path,
        lock_fd: int,
        *,
        demo: bool,
        secret: str,
        shared: SharedState,
    ) -> None:
        self.cfg = cfg
        self.count = count
        self.listeners = listeners
        self.root = root
        self.lock_fd = lock_fd
        self.demo = demo
        self.secret = secret
        self.shared = shared
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> worker index
        self.ready: set[int] = set()  # pids that serve
        self.announced = False  # every worker has served once: exits are crashes from now on
        self.stopping = False
        self.killed = False
        self.fatal = ""
        self.failed: list[str] = []
        self.crashes: collections.deque[float] = collections.deque()
        self._ready_buf = b""
        self._ready_r, self._ready_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._ready_r, self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._sel = selectors.DefaultSelector()

    def run(self) -> int:
        from tokenhub.cli import CliError

        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, _ignore_signal) for s in _SUPERVISOR_SIGNALS}
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._sel.register(self._ready_r, selectors.EVENT_READ)
        try:
            for index in range(1, self.count + 1):
                self._spawn(index)
            while self.children:
                self._sel.select()
                self._signals()
                self._reap()
                self._read_ready()
        except BaseException:
            for pid in self.children:  # e.g. fork failed: leave no worker behind
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            for pid in self.children:
                with contextlib.suppress(OSError):
                    os.waitpid(pid, 0)
            raise
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self._sel.close()
            for fd in (self._ready_r, self._ready_w, self._wake_r, self._wake_w):
                os.close(fd)
            for sock in self.listeners:
                sock.close()
        if self.fatal:
            raise CliError(self.fatal)
        if self.failed:
            raise CliError("; ".join(self.failed))
        return 0

    # -- the parent's side ---------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        sys.stdout.flush()  # or the child would print the parent's buffered output again
        sys.stderr.flush()
        # Blocked across the fork: the child keeps SIGINT/SIGTERM blocked until its loop
        # handles them, so a stop asked for while it starts is not lost, nor fatal to it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(index)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def _signals(self) -> None:
        while True:
            try:
                received = os.read(self._wake_r, 512)
            except BlockingIOError:
                return
            for signum in received:
                if signum in _STOP_SIGNALS:
                    self._stop(signal.Signals(signum).name)

    def _stop(self, why: str) -> None:
        if self.stopping:
            if why in ("SIGINT", "SIGTERM") and not self.killed:
                # A second Ctrl-C: no more waiting. Nothing is lost: the journals keep every
                # event the workers had not written, for the next start to replay.
                self.killed = True
                self.fatal = (
                    f"{why} again: killed the workers; the usage events they had not written "
                    "are replayed from their journals at the next start"
                )
                for pid in self.children:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            return
        self.stopping = True
        n = len(self.children)
        print(
            f"tokenhub: shutting down {n} worker{'s' * (n != 1)} (flushing usage events)",
            file=sys.stderr,
            flush=True,
        )
        # The workers close their copies as they stop: then the port is closed.
        for sock in self.listeners:
            sock.close()
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            self.ready.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            what = _describe_exit(code)
            if self.stopping:
                if code != 0 and not self.killed:
                    self.failed.append(f"worker {index} (pid {pid}) {what} while shutting down")
                continue
            if not self.announced:
                self.fatal = f"worker {index} (pid {pid}) {what} while starting"
                self._stop("start-up failed")
                continue
            now = time.monotonic()
            self.crashes.append(now)
            while self.crashes[0] < now - CRASH_WINDOW_S:
                self.crashes.popleft()
            if len(self.crashes) > MAX_CRASHES:
                self.fatal = (
                    f"workers exited {len(self.crashes)} times within {CRASH_WINDOW_S:g} s "
                    f"(last: worker {index}, pid {pid}, {what}); not restarting them again"
                )
                log.error("%s; stopping the server", self.fatal)
                self._stop("crash loop")
                continue
            log.error("worker %d (pid %d) %s; restarting it", index, pid, what)
            self._spawn(index)

    def _read_ready(self) -> None:
        while True:
            try:
                data = os.read(self._ready_r, 4096)
            except BlockingIOError:
                break
            if not data:
                break
            self._ready_buf += data
        *lines, self._ready_buf = self._ready_buf.split(b"\n")
        for line in lines:
            index, pid = map(int, line.split())
            if pid not in self.children:
                continue  # it died since
            self.ready.add(pid)
            if self.announced:
                log.warning("worker %d (pid %d) serves again", index, pid)
        if not self.announced and not self.stopping and len(self.ready) == self.count:
            self.announced = True
            host, port = self.listeners[0].getsockname()[:2]
            print(
                f"tokenhub: serving on http://{host}:{port}/v1 (database "
                f"{self.cfg.server.database}, {self.count} workers)",
                flush=True,
            )
            if self.demo:
                _print_demo(host, port, self.secret, self.cfg.server.database)

    # -- the child's side ----------------------------------------------------------------------

    def _child(self, index: int) -> NoReturn:
        from tokenhub.runtime.journal import JournalError
        from tokenhub.store import StoreError

        status = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            self._sel.close()
            for fd in (self._ready_r, self._wake_r, self._wake_w, self.lock_fd):
                os.close(fd)
            sock = self.listeners[index - 1]
            for other in self.listeners:
                if other is not sock:
                    other.close()
            fmt = f"%(asctime)s %(levelname)s %(name)s [worker {index}]: %(message)s"
            for h in logging.getLogger().handlers:
                h.setFormatter(logging.Formatter(fmt))
            worker = Worker(
                index=index,
                count=self.count,
                sock=sock,
                journal_dir=str(worker_journal_dir(self.root, index)),
                ready_fd=self._ready_w,
                parent_pid=self.pid,
            )
            _run_loop(
                serve(
                    self.cfg,
                    demo=self.demo,
                    demo_key=self.secret,
                    shared=self.shared,
                    worker=worker,
                )
            )
            status = 0
        except (StoreError, JournalError, OSError) as e:
            print(f"tokenhub: worker {index}: error: {e}", file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)


# -- the command -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenhub.cli import PROG, CliError
    from tokenhub.runtime.journal import JournalError
    from tokenhub.gateway.protocol import raise_fd_limit
    from tokenhub.store import StoreError

    workers: int = args.workers
    if not 1 <= workers <= MAX_WORKERS:
        print(
            f"{PROG}: error: --workers must be between 1 and {MAX_WORKERS} (got {workers})",
            file=sys.stderr,
        )
        return 2
    if args.demo:
        cfg = from_mapping(
            {
                # The admin commands' rule too: --db, else $TOKENHUB_DB, else the demo's file.
                "server": {"database": args.db or os.environ.get("TOKENHUB_DB") or DEMO_DB},
                "billing": {"settle_interval_s": 1.0, "admission": True},
            },
            "<demo>",
        )
    elif not args.config:
        raise CliError("give --config FILE (or --demo for the built-in demo)")
    else:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise CliError(str(e)) from None
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    if args.db and not args.demo:
        cfg.server.database = args.db
    demo_key = _demo_key(args) if args.demo else None
    if not args.demo:  # the demo seeds its own prices (and the wallet that goes with them)
        _apply_config_prices(cfg)
    logging.basicConfig(
        level=os.environ.get("TOKENHUB_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Each client connection is a descriptor: the default soft limit (often 1024) would make
    # a few hundred idle clients deny service. Before any fork: workers inherit it.
    raise_fd_limit()
    try:
        if workers > 1:
            return serve_workers(cfg, workers, demo=args.demo, demo_key=demo_key)
        shared = before_fork(cfg)
        try:
            _run_loop(serve(cfg, demo=args.demo, demo_key=demo_key, shared=shared))
        except OSError as e:
            where = f"{cfg.server.host}:{cfg.server.port}"
            raise CliError(f"cannot listen on {where}: {e.strerror or e}") from None
        finally:
            shared.close()
    except (StoreError, JournalError) as e:
        raise CliError(str(e)) from None
    return 0


def _apply_config_prices(cfg: Config) -> None:
    """The config's prices bill without a `prices import`: a model's first price is in force
    from the epoch, a changed one from now (tokenhub.cli.billing.apply_config_prices); each
    price written is said on stderr."""
    from tokenhub.cli.billing import apply_config_prices
    from tokenhub.db.database import DatabaseError
    from tokenhub.cli import CliError

    try:
        lines = apply_config_prices(cfg)
    except (ConfigError, DatabaseError) as e:
        raise CliError(str(e)) from None
    for line in lines:
        print(f"tokenhub: {line}", file=sys.stderr, flush=True)


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway",
        description="Run the gateway: an OpenAI-compatible API in front of the providers and "
        "models of the config file, routing each request (the models' policies, health and "
        "affinity), enforcing the keys' and tenants' limits, and metering every request into "
        "the database. With [billing] settle_interval_s it also starts a settler process that "
        "bills the usage into the ledger, and with [billing] admission = true it admits a "
        "request only if the tenant's contracts can pay for it. The deployments' prices in "
        "the config go into the price book at start where they differ from it (a model's "
        "first price in force from the epoch, a changed one from now; each said on stderr). "
        "Tenants, keys and limits are managed with 'tokenhub tenants' and 'tokenhub keys'.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config: server, providers, models")
    p.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default from config: 8080)")
    p.add_argument("--db", metavar="URL_OR_PATH", help="database (overrides server.database)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help=f"serve with N processes, 1 to {MAX_WORKERS} (default 1: this process serves). "
        "With N > 1 this process supervises N workers, each a whole gateway on its own "
        "SO_REUSEPORT socket of the port, with its own usage journal (JOURNAL_DIR/worker-K); "
        "it restarts a worker that dies, stops them all on SIGTERM or SIGINT, and gives up "
        f"when workers exit more than {MAX_CRASHES} times in {CRASH_WINDOW_S:g} s. Responses "
        f"then carry '{WORKER_HEADER}: K'. About one worker per CPU core",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"run the demo: built-in mock upstream, three models and 'auto', SQLite {DEMO_DB} "
        "here (or --db, or $TOKENHUB_DB), a demo tenant with a 10 USD wallet and a key, the "
        "settler with money admission, and printed commands that work as printed (curl, the "
        "openai client, and tokenhub's own with TOKENHUB_DB set to the demo's database)",
    )
    p.add_argument(
        "--demo-key-file",
        metavar="FILE",
        help=f"with --demo: use the API key in FILE (its first line) instead of a new random "
        f"one; or set {DEMO_KEY_ENV}. Not a key on the command line: any local user can read "
        "a process's arguments",
    )
    # Gone (the key was in `ps`); explicit, so that argparse does not take it for an
    # abbreviation of --demo-key-file and read a "file" named by the key.
    p.add_argument("--demo-key", metavar="KEY", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
