"""The settler as a process of the server: `python -m tokenhub.billing.settler`, started by
worker 1 (or the single process), restarted if it dies, stopped (after a last pass) with the
server, and stopping by itself if the server is killed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenhub.config import Config
from tokenhub.runtime.demo import DEMO_KEY_ENV
from tokenhub.store import ENV_DB

if TYPE_CHECKING:
    from tokenhub.quota import Quota

log = logging.getLogger("tokenhub.serve")

SETTLER_READY_S = 60  # how long a server waits for its settler to publish the pots
SETTLER_STOP_S = 60  # how long the settler's last pass may take at shutdown


@dataclass(frozen=True)
class ClusterHost:
    """Cluster mode: what the settler's lease agent needs (tokenhub.billing.leasing)."""

    host_id: str
    shared_dir: str  # the server's shared dir (want.sock, leaser.json)
    workers: int  # the server's workers, each of which marks its journal replayed


def cluster_mode(cfg: Config) -> bool:
    """Several hosts share one budget (issue 13): `[server] host_id` set (`serve --host-id`),
    the database PostgreSQL and `[billing] admission` on."""
    from tokenhub.db.database import is_postgres

    return bool(cfg.server.host_id) and is_postgres(cfg.server.database) and cfg.billing.admission


async def start_settler(
    cfg: Config, *, quota: Quota | None = None, cluster: ClusterHost | None = None
) -> Callable[[], Awaitable[None]] | None:
    """Settles usage into the ledger when `[billing] settle_interval_s` is set (the demo sets
    it, and prices its models): in a process of its own, `python -m tokenhub.billing.settler`,
    so that settlement's Python work never holds the serving loop's GIL. It is restarted if it
    dies, and stopped (after a last pass) with the server; it stops by itself if the server
    is killed. With admission (`quota`) it also keeps the table's pots equal to the ledger, and
    this returns once it has settled what was pending and published them
    (tokenhub.billing.pots). With `cluster` (and `quota`) it runs the host's lease agent
    instead, which makes admission ready once it runs. `[cluster] partitions` > 0: the settlers
    of all hosts share the tenants by partition. Returns the function that stops it."""
    interval = cfg.billing.settle_interval_s
    if interval <= 0:
        return None
    argv = [
        sys.executable, "-m", "tokenhub.billing.settler", "--interval", f"{interval:g}",
        "--batch", str(cfg.billing.settle_batch), "--parent", str(os.getpid()),
    ]  # fmt: skip
    if quota is not None and quota.table.path:
        argv += ["--quota", quota.table.path]
        if cluster is not None:
            c = cfg.cluster
            argv += [
                "--host-id", cluster.host_id, "--shared-dir", cluster.shared_dir,
                "--workers", str(cluster.workers), "--lease-ttl", f"{c.lease_ttl_s:g}",
                "--write-off", f"{c.write_off_s:g}",
            ]  # fmt: skip
    if cfg.cluster.partitions > 0:
        argv += ["--partitions", str(cfg.cluster.partitions)]
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
