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
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from tokenhub import __version__
from tokenhub.config import Config, host_id_problem
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
