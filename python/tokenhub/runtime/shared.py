"""What one `tokenhub serve` prepares before any worker exists, for every worker to inherit
(the quota table, the metrics directory), and each worker's place in the server."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tokenhub.config import Config

QUOTA_ACCOUNTS = 4096  # keys and tenants with a limit (plus one for the day)
QUOTA_RESERVATIONS = 16_384  # requests with limits in flight at once (~3.4 MB in all)


def journal_dir(cfg: Config) -> str:
    from tokenhub.runtime.journal import default_journal_dir

    return cfg.server.journal_dir or default_journal_dir(cfg.server.database)


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


def quota_path(cfg: Config) -> Path:
    """Where this server's quota table lives: /dev/shm (memory, never written back to a disk)
    when there is one, else the journal dir; named after the serving process, which is unique
    while it runs, so a second server (refused later for the journal's LOCK) cannot replace
    the table of a running one."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(journal_dir(cfg))
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
    from tokenhub.billing.pots import new_epoch
    from tokenhub.quota import Quota

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
