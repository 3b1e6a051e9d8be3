"""Live routing state, for the web console: what the gateway's routers know right now.

The routers (tokenhub.router, one per model) live in the gateway's process; the admin app
(tokenhub.admin, with the console) only reads a snapshot of them through a provider, a
callable returning a :class:`RoutingSnapshot`. `tokenhub serve` gives the admin app a
:class:`LiveRouting` over its gateway's routers (runtime/serve._start_admin); an admin app
built without one (tests, benches) has no live state and its pages say so. This module sits
at the package's top level so that admin/ and console/ can import it without importing
runtime/ or gateway/ (tests/test_layout.py).

Router state is per process: under `tokenhub serve --workers N` each worker routes with its
own routers (its own circuits, cooldowns, in-flight counts), and the admin listener runs in
worker 1 only. So every worker publishes its snapshot every second into the server's shared
dir (`LiveRouting.publish_to`, a file per worker beside the metrics' snapshots), and worker
1's provider (:class:`MergedRouting`) merges its own with the fresh ones: a deployment shows
its worst circuit and in how many workers it is out of rotation, with the counts summed.
`merged` lists the workers a snapshot includes (a worker that is gone or stuck for more than
`STALE_MS` is left out); another worker's figures are at most `PUBLISH_MS` old.

The router keeps counters since it was built (started, successes, failures) and smoothed
latencies (EWMA). The recent request and error counts are differences of those counters
against a sample taken at least `window_ms` ago: `LiveRouting` samples every `every_ms`
(a timer on the event loop, `start()`), keeping one sample per tick of the last window.

Performance notes: a snapshot is one `Router.state` call per deployment (a small dict from
Rust) and a Struct: with 50 deployments it took 150 µs, a sample 94 µs (every 10 s), worker
1's merge of four workers' snapshots 0.87 ms (a 14 KB file per worker), on the shared 2-core
VM (2026-12-07). A worker's publication, a snapshot and a file replaced once a second, costs
it well under 0.1% of a core; nothing is done per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal, Protocol

import msgspec
from aiohttp import web

from tokenhub.router import Router

log = logging.getLogger("tokenhub.routing_state")

__all__ = [
    "ROUTING_STATE",
    "DeploymentLive",
    "LiveRouting",
    "MergedRouting",
    "RoutingProvider",
    "RoutingSnapshot",
    "snapshot_of",
]

Circuit = Literal["closed", "open", "half_open"]

WINDOW_MS = 300_000  # what the recent request and error counts cover
EVERY_MS = 10_000  # how often LiveRouting samples the routers' counters
PREFIX = "routing-worker-"  # + "<worker>-<pid>.json" in the server's shared dir
PUBLISH_MS = 1_000  # how often a worker publishes its snapshot for worker 1's console
STALE_MS = 5_000  # a published snapshot older than this is a dead (or stuck) worker's


class DeploymentLive(msgspec.Struct, kw_only=True, frozen=True):
    """One deployment of one model, as its router sees it now."""

    model: str
    deployment: str
    circuit: Circuit  # half_open: the cooldown is over, the next request probes it
    # Unix ms at which an open circuit lets a probe through (None: closed); in the past
    # for a half-open one.
    cooldown_until_ms: int | None
    cooldown_ms: int  # the current cooldown's length (doubles on each failed probe)
    consecutive_failures: int
    probing: bool  # a probe request is out
    in_flight: int
    latency_ms: float | None  # EWMA of successful requests' latency (None: none yet)
    ttft_ms: float | None  # EWMA of time to first token (None: none measured)
    recent_requests: int  # requests ended within the snapshot's window
    recent_errors: int  # of which failed
    successes: int  # since the router was built
    failures: int
    # Merged over workers: how many workers' routers have it out of rotation (open or
    # half-open), and how many workers' routers these figures sum up.
    cooling_in: int = 0
    seen_in: int = 1

    @property
    def in_cooldown(self) -> bool:
        """Out of normal rotation: open, or half-open awaiting (or running) its probe."""
        return self.circuit != "closed"

    @property
    def recent_error_pct(self) -> float | None:
        if not self.recent_requests:
            return None
        return 100.0 * self.recent_errors / self.recent_requests


class RoutingSnapshot(msgspec.Struct, kw_only=True, frozen=True):
    taken_ms: int  # Unix ms
    worker: int  # whose routers: 0 for a single-process server, else the worker's index
    workers: int  # how many workers route with routers of their own
    window_ms: int  # what recent_requests / recent_errors span (shorter after a start)
    deployments: list[DeploymentLive]
    merged: list[int] = msgspec.field(default_factory=list)  # workers whose routers are in it

    def in_cooldown(self) -> list[DeploymentLive]:
        return [d for d in self.deployments if d.in_cooldown]

    def by_deployment(self) -> dict[str, list[DeploymentLive]]:
        """Deployment name -> its entries (one per model that routes to a deployment of that
        name), to set beside the database's figures, which are per deployment name."""
        out: dict[str, list[DeploymentLive]] = {}
        for d in self.deployments:
            out.setdefault(d.deployment, []).append(d)
        return out


class RoutingProvider(Protocol):
    def __call__(self) -> RoutingSnapshot: ...


ROUTING_STATE: web.AppKey[RoutingProvider] = web.AppKey("routing_state")
"""Where the admin app keeps its provider (absent: no live state)."""


def snapshot_of(app: web.Application) -> RoutingSnapshot | None:
    """The live snapshot of `app`'s provider; None without one, or when it fails (logged: a
    page shows the database's figures rather than an error)."""
    provider = app.get(ROUTING_STATE)
    if provider is None:
        return None
    try:
        return provider()
    except Exception:
        log.exception("live routing state: the provider failed")
        return None


# (model, deployment) -> (id of the router read, successes, failures): a config reload
# replaces the routers, whose counters start again.
_Counts = dict[tuple[str, str], tuple[int, int, int]]


class LiveRouting:
    """The provider over one process's routers: `routers()` returns the current model id ->
    Router mapping (read at every call: the gateway may replace its routers), `now_ms()` is
    the routers' monotonic clock."""

    def __init__(
        self,
        routers: Callable[[], Mapping[str, Router]],
        now_ms: Callable[[], int],
        *,
        worker: int = 0,
        workers: int = 1,
        window_ms: int = WINDOW_MS,
        every_ms: int = EVERY_MS,
    ) -> None:
        if window_ms <= 0 or every_ms <= 0:
            raise ValueError("window_ms and every_ms must be positive")
        self._routers = routers
        self._now_ms = now_ms
        self.worker = worker
        self.workers = workers
        self.window_ms = window_ms
        self.every_ms = every_ms
        self._samples: deque[tuple[int, _Counts]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._publisher: asyncio.TimerHandle | None = None
        self.sample()

    # -- sampling ------------------------------------------------------------------------

    def _counts(self, states: Iterable[tuple[str, str, int, dict[str, object]]]) -> _Counts:
        return {
            (model, name): (rid, _int(st["successes"]), _int(st["failures"]))
            for model, name, rid, st in states
        }

    def _states(self, now: int) -> list[tuple[str, str, int, dict[str, object]]]:
        out = []
        for model, router in self._routers().items():
            for i, name in enumerate(router.names):
                out.append((model, name, id(router), router.state(i, now)))
        return out

    def sample(self) -> None:
        """Records the routers' counters now, and forgets samples no longer needed: the
        newest one at least a window old is kept as the baseline."""
        now = self._now_ms()
        self._samples.append((now, self._counts(self._states(now))))
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_ms:
            self._samples.popleft()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Samples every `every_ms` on `loop` (default: the running one) until `close()`."""
        loop = loop or asyncio.get_running_loop()

        def tick() -> None:
            try:
                self.sample()
            except Exception:  # the next tick tries again; the gateway serves on
                log.exception("live routing state: sampling failed")
            self._timer = loop.call_later(self.every_ms / 1000, tick)

        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(self.every_ms / 1000, tick)

    def close(self) -> None:
        """Stops the timers (sampling, and publishing if started)."""
        for timer in (self._timer, self._publisher):
            if timer is not None:
                timer.cancel()
        self._timer = self._publisher = None

    # -- the snapshot --------------------------------------------------------------------

    def __call__(self) -> RoutingSnapshot:
        now = self._now_ms()
        wall = int(time.time() * 1000)
        states = self._states(now)
        base_at, base = self._samples[0] if self._samples else (now, {})
        for at, counts in self._samples:  # the newest sample at least a window old
            if now - at >= self.window_ms:
                base_at, base = at, counts
        deployments = []
        for model, name, rid, st in states:
            ok, failed = _int(st["successes"]), _int(st["failures"])
            prev = base.get((model, name))
            if prev is not None and prev[0] == rid and prev[1] <= ok and prev[2] <= failed:
                d_ok, d_failed = ok - prev[1], failed - prev[2]
            else:  # new since the baseline (or its router was replaced): all of its counts
                d_ok, d_failed = ok, failed
            until = st["cooldown_until"]
            latency, ttft = _float(st["latency_ewma_ms"]), _float(st["ttft_ewma_ms"])
            deployments.append(
                DeploymentLive(
                    model=model,
                    deployment=name,
                    circuit=_circuit(st["circuit"]),
                    cooldown_until_ms=None if until is None else wall + (_int(until) - now),
                    cooldown_ms=_int(st["cooldown_ms"]),
                    consecutive_failures=_int(st["consecutive_failures"]),
                    probing=bool(st["probing"]),
                    in_flight=_int(st["outstanding"]),
                    latency_ms=latency if ok else None,
                    ttft_ms=ttft if ok and ttft > 0 else None,
                    recent_requests=d_ok + d_failed,
                    recent_errors=d_failed,
                    successes=ok,
                    failures=failed,
                    cooling_in=0 if st["circuit"] == "closed" else 1,
                )
            )
        return RoutingSnapshot(
            taken_ms=wall,
            worker=self.worker,
            workers=self.workers,
            window_ms=max(0, now - base_at),
            deployments=deployments,
            merged=[self.worker],
        )

    # -- several workers -----------------------------------------------------------------

    def publish_to(
        self,
        directory: str | os.PathLike[str],
        loop: asyncio.AbstractEventLoop | None = None,
        every_ms: int = PUBLISH_MS,
    ) -> Path:
        """Writes this process's snapshot to `directory` every `every_ms` (atomically: readers
        see a whole file) until `close()`, for the worker that serves the console
        (:class:`MergedRouting`); also starts the sampling timer. Returns the file's path."""
        loop = loop or asyncio.get_running_loop()
        path = Path(directory) / f"{PREFIX}{self.worker}-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")

        def tick() -> None:
            try:
                tmp.write_bytes(_encode(self()))
                os.replace(tmp, path)
            except OSError:  # a full disk must not take the worker down: worker 1 leaves
                pass  # this worker out once its last file is stale
            except Exception:
                log.exception("live routing state: publishing failed")
            self._publisher = loop.call_later(every_ms / 1000, tick)

        self.start(loop)
        tick()
        return path


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RoutingSnapshot).decode


class MergedRouting:
    """The provider of the worker that serves the console under --workers N: its own routers'
    snapshot merged with the ones the other workers publish in `directory` (the server's
    shared dir), each at most `stale_ms` old (older: a worker that is gone or whose loop is
    stuck, left out; `merged` says whose are in). Per deployment: the worst circuit (open >
    half-open > closed) with `cooling_in` workers out of rotation, the latest cooldown end,
    the most consecutive failures; in-flight and request counts summed; latencies averaged
    weighted by successes."""

    def __init__(
        self, own: LiveRouting, directory: str | os.PathLike[str], stale_ms: int = STALE_MS
    ) -> None:
        self.own = own
        self.dir = Path(directory)
        self.stale_ms = stale_ms

    def close(self) -> None:
        self.own.close()

    def __call__(self) -> RoutingSnapshot:
        mine = self.own()
        snaps = [mine]
        for path in sorted(self.dir.glob(f"{PREFIX}*.json")):
            try:
                snap = _decode(path.read_bytes())
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue
            fresh = mine.taken_ms - snap.taken_ms <= self.stale_ms
            if snap.worker != mine.worker and fresh:
                snaps.append(snap)
        return merge(snaps)


_RANK = {"closed": 0, "half_open": 1, "open": 2}


def merge(snaps: list[RoutingSnapshot]) -> RoutingSnapshot:
    """Several workers' snapshots as one (the first's time, worker and window); a worker that
    appears twice (a restarted one's old file) counts once, its newest snapshot."""
    newest: dict[int, RoutingSnapshot] = {}
    for s in snaps:
        if s.worker not in newest or s.taken_ms > newest[s.worker].taken_ms:
            newest[s.worker] = s
    first = snaps[0]
    newest[first.worker] = first
    groups: dict[tuple[str, str], list[DeploymentLive]] = {}
    for s in newest.values():
        for d in s.deployments:
            groups.setdefault((d.model, d.deployment), []).append(d)
    deployments = [_merge_one(ds) for ds in groups.values()]
    return RoutingSnapshot(
        taken_ms=first.taken_ms,
        worker=first.worker,
        workers=first.workers,
        window_ms=first.window_ms,
        deployments=deployments,
        merged=sorted({w for s in newest.values() for w in s.merged}),
    )


def _weighted(
    ds: list[DeploymentLive], value: Callable[[DeploymentLive], float | None]
) -> float | None:
    pairs = [(v, d.successes) for d in ds if (v := value(d)) is not None]
    total = sum(w for _, w in pairs)
    if not pairs or not total:
        return None
    return sum(v * w for v, w in pairs) / total


def _merge_one(ds: list[DeploymentLive]) -> DeploymentLive:
    if len(ds) == 1:
        return ds[0]
    worst = max(ds, key=lambda d: _RANK[d.circuit])
    ends = [d.cooldown_until_ms for d in ds if d.cooldown_until_ms is not None and d.in_cooldown]
    return DeploymentLive(
        model=worst.model,
        deployment=worst.deployment,
        circuit=worst.circuit,
        cooldown_until_ms=max(ends) if ends else None,
        cooldown_ms=max(d.cooldown_ms for d in ds),
        consecutive_failures=max(d.consecutive_failures for d in ds),
        probing=any(d.probing for d in ds),
        in_flight=sum(d.in_flight for d in ds),
        latency_ms=_weighted(ds, lambda d: d.latency_ms),
        ttft_ms=_weighted(ds, lambda d: d.ttft_ms),
        recent_requests=sum(d.recent_requests for d in ds),
        recent_errors=sum(d.recent_errors for d in ds),
        successes=sum(d.successes for d in ds),
        failures=sum(d.failures for d in ds),
        cooling_in=sum(d.cooling_in for d in ds),
        seen_in=sum(d.seen_in for d in ds),
    )


def _int(v: object) -> int:
    if not isinstance(v, int):
        raise TypeError(f"expected an int from the router's state, got {v!r}")
    return v


def _float(v: object) -> float:
    if not isinstance(v, (int, float)):
        raise TypeError(f"expected a number from the router's state, got {v!r}")
    return float(v)


def _circuit(v: object) -> Circuit:
    if v == "open":
        return "open"
    if v == "half_open":
        return "half_open"
    if v == "closed":
        return "closed"
    raise ValueError(f"unknown circuit state {v!r}")
