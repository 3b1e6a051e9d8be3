"""The lease agent: one per host, in the host's settler process, leasing budget for the host.

In cluster mode (`[server] host_id` set, PostgreSQL, `[billing] admission`; issue 13,
../shared/design/scaleout.md) the local quota table's pot accounts hold LEASED capacity: a pot's
limit is what this host leased from the coordinator (`tokenhub.billing.leases`) and has not
given back; its used and held are this host's charges (nobody releases them: the limit and
`used` only grow, less the give-backs from the limit). Workers admit against it exactly as on
one host (`tokenhub.billing.pots.Contracts`); a request that finds the pool short sends a *want*
and waits up to `[cluster] acquire_wait_ms`, retrying (`Contracts.acquire`), and this agent
leases more. The pool is fungible: charges belong to (pot, instance), never to one lease.

The agent (`LeaseAgent`), every tick (TICK_S, at once on a want), runs at most ONE coordinator
transaction, and only when something is due:

- *wants*: each is planned with the draw order (`tokenhub.billing.pots.plan`) over
  avail(pot) = local free + the pot's room (read under the pots' row locks, taken first in pot
  order), and each pot's shortfall is granted as the minimum of a lease whose `want` is the
  pot's slice; a want that cannot be met (no room, a refused grant) is marked refused for its
  tenant (REFUSAL below), so its request gets its 429 at once instead of at the deadline;
- *slices*: a pot in use whose local free is below ~1 s of this host's consumption gets a
  lease of slice = max(2 s of consumption, the largest recent worst case) (the coordinator
  grants at most half of what is left unless the minimum needs more);
- *give-backs*: the leases of a pot idle for IDLE_S (no change in its charges), and leases
  older than ttl/2 while the coordinator answers (renewal: the next slice replaces them);
- *local expiry*: a lease not given back by its first send + ttl - margin (monotonic clock)
  is taken out of the pool whatever the coordinator says (it may be unreachable), and given
  back once it answers;
- *retries*: lease ids ("<instance>:<seq>") are kept in memory before they are sent; a call
  that fails or times out leaves its grants and give-backs pending, retried next tick with the
  SAME ids and amounts (a replayed grant applies once: the pool grows only when an id is first
  seen granted, and one seen after its local deadline is given back unused); while a grant
  is unanswered, the wants it was asked for (their requests send them again as they wait)
  are not planned again, or a lost reply would lease twice for one request.

Giving back shrinks the pool first: the limit drops by the lease's amount; if it fell below
the pool's charges (held + used), the difference is added back; what stayed removed (g) is the
unused part, and the coordinator is told used = amount - g. Requests in flight are thus counted
used (conservative: a hold settled lower later leaves the pool that much free, unleased, and
the coordinator that much spent until the instance is reconciled).

On start the agent gives back whatever its own instance still has open (an agent restarted
in the same server: it cannot know which of those are in the pool, so it counts them all in and
gives them back the same way: safe either way), and once every worker of the server has its
replayed journal in the database (each sets REPLAYED_ACCOUNT.format(k) in the table), it
reconciles this host's earlier instances (`leases.reconcile`: their usage becomes exactly what
their events charged). On stop it gives everything back (retrying for STOP_S), so no lease
stays open after a clean shutdown.

Files in the server's shared directory (`SharedState.metrics_dir`, one per `tokenhub serve`):

- `want.sock` (WANT_SOCKET): a UNIX datagram socket the agent binds; each datagram is one want,
  JSON `[tenant, model, ts_ms, [uncached, cached, output, cache writes], want_id, wait_id]`
  (3 lines from a worker before cache writes: none) (want_id: the
  sender's wall clock in microseconds, which orders wants across workers; wait_id: the first
  want_id of the same waiting request). A full socket drops a want; the waiting request sends
  it again (`tokenhub.billing.pots.RESEND_S`), and a tick counts one request's wants once.
- `leaser.json` (LEASER_JSON): the agent's figures, rewritten (atomically: a temporary file
  renamed over it) after every tick that called the coordinator and at least every
  FILE_EVERY_S, for /metrics and `tokenhub cluster status`. Its fields (all present; times are
  wall-clock ms):

      {
        "host": "A",                  # [server] host_id
        "instance": "A/123456",       # "<host id>/<quota table epoch>": this incarnation
        "pid": 4242,                  # the settler process running the agent
        "started_ms": 0,              # when the agent started
        "updated_ms": 0,              # when this file was written
        "last_tick_ms": 0,            # the last coordinator call that succeeded (0: none yet)
        "calls": 0,                   # coordinator transactions tried (one per busy tick)
        "failures": 0,                # of those, failed or timed out (retried next tick)
        "grants": 0,                  # leases granted (amount > 0)
        "refusals": 0,                # grants refused (no room) and wants that could not be met
        "give_backs": 0,              # leases given back (acknowledged by the coordinator)
        "local_expiries": 0,          # leases shrunk locally at their deadline (no renewal)
        "wants": 0,                   # wants received from workers
        "pending": 0,                 # lease calls waiting for a (re)try: grants + give-backs
        "reconciled": ["A/99"],       # earlier instances of this host reconciled at start
        "last_error": "",             # the last failed call's error, "" once one succeeds
        "pots": {                     # every pot the agent has leased for
          "pot:m:acme": {
            "leases": 1,              # open leases (granted, not yet given back)
            "leased": 5000,           # their amounts together
            "limit": 5000,            # the local pool's limit (leased, less given back)
            "charged": 1200,          # the pool's used + held (this host's charges)
            "rate": 300.0             # consumption per second (last 2 s)
          }
        }
      }

REFUSAL: the agent's answer to a want it could not meet is the want's id written as the
`requests` limit of the tenant's money pot account (`pot:m:<tenant>`; pot accounts reserve no
requests, so that limit is free to carry it); a waiting request whose want id is not above it
stops waiting (`WantLink.refused`).

Performance notes: the request path pays nothing for the agent while the pool has room (the
same reservation as on one host, the hold's tag aside); a short pool costs one datagram and a
10 ms poll loop. Figures: benches/bench_lease_admission.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from tokenhub.billing import leases
from tokenhub.billing.draw import four, lot_pot, money_pot, pot_dim
from tokenhub.billing.pots import EPOCH_ACCOUNT, READY_ACCOUNT, holds, plan
from tokenhub.billing.terms import TermsCache
from tokenhub.db.database import Database, Tx
from tokenhub.quota import UNLIMITED, Quota

log = logging.getLogger("tokenhub.leasing")

WANT_SOCKET = "want.sock"
LEASER_JSON = "leaser.json"
REPLAYED_ACCOUNT = "meta:replayed:{}"  # its requests limit: 1 once worker k's replay is stored
TICK_S = 0.2
IDLE_S = 2.0  # a pot with no new charges for this long gives its leases back
CALL_TIMEOUT_S = 5.0  # a coordinator call slower than this counts as failed (and is retried)
RATE_WINDOW_S = 2.0
WORST_WINDOW_S = 30.0
FILE_EVERY_S = 5.0
STOP_S = 5.0  # how long a stopping agent tries to give everything back

ASKING = "asking"  # sent (or about to be), no answer yet
OPEN = "open"  # granted and in the pool
RETURNING = "returning"  # out of the pool; its give_back not acknowledged yet

_want_encoder = msgspec.json.Encoder()
_want_decoder = msgspec.json.Decoder(tuple[str, str, int, list[int], int, int])


def want_path(shared_dir: str | Path) -> Path:
    return Path(shared_dir) / WANT_SOCKET


def leaser_path(shared_dir: str | Path) -> Path:
    return Path(shared_dir) / LEASER_JSON


def instance_of(host: str, epoch: int) -> str:
    """This host's incarnation: a restarted host has a new quota table, so a new epoch."""
    return f"{host}/{epoch}"


def table_instance(quota: Quota, host: str) -> str:
    return instance_of(host, quota.limits(EPOCH_ACCOUNT)["requests"] or 0)


def mark_replayed(quota: Quota, worker: int) -> None:
    """Worker `worker` has its replayed journal in the database (the agent reconciles the
    host's earlier instances only once every worker has)."""
    quota.set_limits(REPLAYED_ACCOUNT.format(worker), requests=1)


# -- the worker's side ------------------------------------------------------------------------


class WantLink:
    """A worker's line to its host's agent: sends wants, reads the agent's refusals."""

    __slots__ = ("dropped", "instance", "path", "quota", "sent", "sock", "wait_s")

    def __init__(self, quota: Quota, shared_dir: str | Path, host: str, *, wait_ms: int) -> None:
        self.quota = quota
        self.instance = table_instance(quota, host)
        self.path = str(want_path(shared_dir))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.wait_s = wait_ms / 1000
        self.sent = 0
        self.dropped = 0  # the agent's socket was full or not there

    def send(
        self, tenant: str, model: str, ts_ms: int, lines: Sequence[int], wait_id: int = 0
    ) -> int:
        """Sends a want (never blocks); returns its id. `wait_id`: the id of the request's
        first want, when this one repeats it."""
        want_id = time.time_ns() // 1000
        data = _want_encoder.encode(
            (tenant, model, ts_ms, list(lines), want_id, wait_id or want_id)
        )
        try:
            self.sock.sendto(data, self.path)
            self.sent += 1
        except OSError:
            self.dropped += 1
        return want_id

    def refused(self, tenant: str, want_id: int) -> bool:
        """The agent could not meet this want (or a later one of the tenant's)."""
        table = self.quota.table
        index = table.find_account(money_pot(tenant))
        if index is None:
            return False
        mark = table.get_limit(index, "requests")
        return bool(mark != UNLIMITED and mark >= want_id)

    def close(self) -> None:
        self.sock.close()


# -- the agent ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Lease:
    """One lease as the agent knows it."""

    id: str
    pot: str
    want: int
    minimum: int
    sent: float  # monotonic, first send
    deadline: float  # monotonic: out of the pool by then, whatever the coordinator says
    state: str = ASKING
    amount: int = 0
    used: int = 0  # fixed when it leaves the pool (the give_back's argument)
    expired: bool = False  # it left the pool at its local deadline
    waits: frozenset[int] = frozenset()  # the waiting requests (wait ids) it was asked for


@dataclass(slots=True)
class PotStat:
    dim: str
    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    charged: int = -1
    active_at: float = 0.0  # the last change of its charges (or want)
    worst: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    quiet_until: float = 0.0  # no slice asked before (the last found no room)

    def rate(self) -> float:
        """Charges per second over the last RATE_WINDOW_S."""
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return max(0, c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def largest(self, now: float) -> int:
        while self.worst and self.worst[0][0] < now - WORST_WINDOW_S:
            self.worst.popleft()
        return max((w for _, w in self.worst), default=0)


@dataclass(slots=True)
class Want:
    tenant: str
    model: str
    ts_ms: int
    lines: list[int]
    want_id: int
    wait_id: int = 0  # the request's first want (0: this one)


@dataclass(slots=True)
class _Call:
    """What one coordinator transaction decided and got (applied after it commits)."""

    new: list[str] = field(default_factory=list)  # lease ids it created
    asked: list[str] = field(default_factory=list)  # lease ids of its grants, in order
    granted: list[leases.Lease | leases.LeaseError] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)
    backs: list[leases.Lease | leases.LeaseError] = field(default_factory=list)
    unmet: list[Want] = field(default_factory=list)  # wants it could not plan
    needs: dict[str, list[Want]] = field(default_factory=dict)  # pot -> wants short on it
    adopted: list[tuple[str, str, int]] = field(default_factory=list)
    reconciling: bool = False
    reconciled: list[str] = field(default_factory=list)
    dropped_after: list[str] = field(default_factory=list)  # replayed grants given back unused


def _wait_of(w: Want) -> int:
    return w.wait_id or w.want_id


def _once(wants: list[Want]) -> list[Want]:
    """One want per waiting request (its latest), in the order they came."""
    latest: dict[int, Want] = {}
    for w in wants:
        latest[_wait_of(w)] = w
    return list(latest.values())


class LeaseAgent:
    """Leases budget for one host (see the module docstring). `start`/`close` around it; the
    settle daemon runs it (tokenhub.billing.settler.run_daemon). `tick` is one round, for the
    tests to drive by hand (with `run=False`)."""

    def __init__(
        self,
        quota: Quota,
        db: Database,
        *,
        host: str,
        shared_dir: str | Path | None = None,
        ttl_s: float = 30.0,
        tick_s: float = TICK_S,
        idle_s: float = IDLE_S,
        call_timeout_s: float = CALL_TIMEOUT_S,
        workers: int = 0,
        refresh_s: float = 0.5,
    ) -> None:
        self.quota = quota
        self.db = db
        self.host = host
        self.instance = table_instance(quota, host)
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.ttl_ms = int(ttl_s * 1000)
        self.ttl_s = ttl_s
        self.margin_s = max(0.5, ttl_s / 10)
        self.tick_s = tick_s
        self.idle_s = idle_s
        self.call_timeout_s = call_timeout_s
        self.workers = workers
        self.terms = TermsCache(db, refresh_s=refresh_s)
        self.leases: dict[str, Lease] = {}
        self.pots: dict[str, PotStat] = {}
        self.wants: list[Want] = []
        self.reconciled: list[str] = []
        self.counts = dict.fromkeys(
            ("calls", "failures", "grants", "refusals", "give_backs", "local_expiries", "wants"),
            0,
        )
        self.last_error = ""
        self.started_ms = time.time_ns() // 1_000_000
        self.last_tick_ms = 0
        self._seq = itertools.count(time.time_ns() // 1000)
        self._terms_loaded = False
        self._adopted = False
        self._reconcile_done = False
        self._healthy = True
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._written = 0.0

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, *, run: bool = True) -> None:
        """Binds the want socket, loads the terms, makes admission ready, and (with `run`)
        starts the tick loop."""
        if self.shared_dir is not None:
            path = want_path(self.shared_dir)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
            sock.setblocking(False)
            self._sock = sock
            asyncio.get_running_loop().add_reader(sock.fileno(), self._receive)
        await self._load_terms()
        self.quota.set_limits(READY_ACCOUNT, requests=1)
        if run:
            self._task = asyncio.create_task(self._run(), name="tokenhub-lease-agent")

    async def close(self) -> None:
        """Stops the loop and gives every lease back (retrying for up to STOP_S)."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            if self.shared_dir is not None:
                with contextlib.suppress(OSError):
                    want_path(self.shared_dir).unlink()
        for lease in list(self.leases.values()):
            if lease.state == OPEN:
                self._shrink(lease)
        deadline = time.monotonic() + STOP_S
        while self.leases and time.monotonic() < deadline:
            if not await self._call(final=True):
                await asyncio.sleep(0.2)
        if self.leases:
            log.error(
                "lease agent %s stops with %d lease calls not acknowledged; the coordinator "
                "expires them, and the next start of this host reconciles this instance",
                self.instance,
                len(self.leases),
            )
        await self.terms.close()
        self._write_file(force=True)

    async def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a want that comes during the tick wakes the next one
            try:
                await self.tick()
            except Exception:
                log.exception("lease agent tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)

    async def _load_terms(self) -> None:
        if self._terms_loaded:
            return
        try:
            await self.terms.start()
            self._terms_loaded = True
        except Exception as e:
            self._error(e)

    # -- wants -----------------------------------------------------------------------------

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                tenant, model, ts_ms, lines, want_id, wait_id = _want_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                continue
            # 4 lines (uncached, cached, output, cache writes); 3 from a worker of a version
            # before cache writes, read as none.
            if len(lines) not in (3, 4) or min(lines) < 0:
                continue
            self.want(Want(tenant, model, ts_ms, four(lines), want_id, wait_id))

    def want(self, w: Want) -> None:
        """A worker's want (from the socket, or a test): handled at the next tick, at once."""
        self.counts["wants"] += 1
        self.wants.append(w)
        self._wake.set()

    # -- the pool --------------------------------------------------------------------------

    def _stat(self, pot: str) -> PotStat:
        st = self.pots.get(pot)
        if st is None:
            st = self.pots[pot] = PotStat(pot_dim(pot), active_at=time.monotonic())
        return st

    def _ensure(self, pot: str) -> None:
        """Creates the pot's local account at limit 0 (a reserve would create it unlimited)."""
        if self.quota.table.find_account(pot) is None:
            self.quota.set_limits(pot, **{pot_dim(pot): 0}, requests=0)

    def _charged(self, pot: str) -> tuple[int, int]:
        """(limit, used + held) of the pool; (0, 0) before it exists."""
        index = self.quota.table.find_account(pot)
        if index is None:
            return 0, 0
        b = getattr(self.quota.state(pot), pot_dim(pot))
        return (b.limit if b.limit is not None else 0), b.used + b.held

    def free(self, pot: str) -> int:
        index = self.quota.table.find_account(pot)
        if index is None:
            return 0
        free = self.quota.table.available(index, pot_dim(pot))
        return 0 if free == UNLIMITED else int(free)

    def _shrink(self, lease: Lease) -> None:
        """Takes an open lease out of the pool: RETURNING with used = the part the pool's
        charges still need."""
        dim = pot_dim(lease.pot)
        self._ensure(lease.pot)
        new = self.quota.add_budget(lease.pot, dim, -lease.amount) or 0
        _, charged = self._charged(lease.pot)
        restore = min(lease.amount, max(0, charged - new))
        if restore:
            self.quota.add_budget(lease.pot, dim, restore)
        lease.used = restore
        lease.state = RETURNING

    def _sample(self, now: float) -> None:
        leased = {x.pot for x in self.leases.values()}
        for pot, st in list(self.pots.items()):
            if pot not in leased and now - st.active_at > WORST_WINDOW_S:
                del self.pots[pot]  # long idle, nothing leased: forgotten until wanted again
                continue
            _, charged = self._charged(pot)
            if charged != st.charged:
                if st.charged >= 0:
                    st.active_at = now
                st.charged = charged
            st.samples.append((now, charged))
            while st.samples and st.samples[0][0] < now - RATE_WINDOW_S:
                st.samples.popleft()

    def _slice(self, pot: str, now: float) -> int:
        st = self._stat(pot)
        return max(int(2 * st.rate()), st.largest(now), 1)

    def _due_back(self, now: float) -> None:
        """Idle pots, renewals and local expiries leave the pool now."""
        for lease in self.leases.values():
            if lease.state != OPEN:
                continue
            st = self._stat(lease.pot)
            if now >= lease.deadline:
                lease.expired = True
                self.counts["local_expiries"] += 1
            elif not (
                now - st.active_at >= self.idle_s
                or (self._healthy and now - lease.sent >= self.ttl_s / 2)
            ):
                continue
            self._shrink(lease)

    def _by_pot(self) -> dict[str, dict[str, list[Lease]]]:
        """The leases by pot and state."""
        out: dict[str, dict[str, list[Lease]]] = {}
        for x in self.leases.values():
            out.setdefault(x.pot, {}).setdefault(x.state, []).append(x)
        return out

    def _short(self, now: float) -> set[str]:
        """Pots in use whose free is below ~1 s of consumption (or the largest recent worst
        case), with no grant on the way. Only pots with an open lease: a pot is leased on
        demand (wants) first, and slices keep it going."""
        out = set()
        for pot, states in self._by_pot().items():
            st = self.pots.get(pot)
            if (
                st is None
                or ASKING in states
                or OPEN not in states
                or now < st.quiet_until
                or now - st.active_at >= self.idle_s
            ):
                continue
            if self.free(pot) < max(st.rate(), st.largest(now), 1):
                out.add(pot)
        return out

    def _replayed(self) -> bool:
        table = self.quota.table
        for k in range(1, self.workers + 1):
            index = table.find_account(REPLAYED_ACCOUNT.format(k))
            if index is None or table.get_limit(index, "requests") != 1:
                return False
        return True

    # -- the tick --------------------------------------------------------------------------

    async def tick(self) -> bool:
        """One round: what is due leaves the pool, and at most one coordinator call asks for
        and gives back what is due. Returns whether it called the coordinator."""
        now = time.monotonic()
        await self._load_terms()
        self._sample(now)
        self._due_back(now)
        called = False
        if (
            self.wants
            or not self._adopted
            or (not self._reconcile_done and self._replayed())
            or any(x.state != OPEN for x in self.leases.values())
            or self._short(now)
        ):
            called = True
            await self._call()
        self._write_file(force=called)
        return called

    async def _call(self, *, final: bool = False) -> bool:
        """One coordinator transaction; False when it failed (what it carried stays pending)."""
        now = time.monotonic()
        wants, self.wants = ([], self.wants) if final else (_once(self.wants), [])
        short = set() if final else self._short(now)
        adopt = not self._adopted and not final
        reconcile = not final and not self._reconcile_done and self._replayed()
        attempt = _Call()

        async def run(tx: Tx) -> _Call:
            nonlocal attempt
            for lease_id in attempt.new:  # an earlier attempt, rolled back (a deadlock)
                self.leases.pop(lease_id, None)
            attempt = _Call()
            await self._transaction(tx, attempt, wants, short, adopt, reconcile, final)
            return attempt

        self.counts["calls"] += 1
        try:
            done = await asyncio.wait_for(self.db.transaction(run), self.call_timeout_s)
        except Exception as e:  # DatabaseError, a timeout: all of it is retried next tick
            self.counts["failures"] += 1
            self._healthy = False
            self._error(e)
            # Wants planned into grants are in those grants (pending); the rest is asked again
            # by their requests.
            return False
        self._healthy = True
        self.last_error = ""
        self.last_tick_ms = time.time_ns() // 1_000_000
        self._apply(done, time.monotonic())
        return True

    async def _transaction(
        self,
        tx: Tx,
        call: _Call,
        wants: list[Want],
        short: set[str],
        adopt: bool,
        reconcile: bool,
        final: bool,
    ) -> None:
        if reconcile:
            call.reconciling = True
            for (instance,) in await tx.fetch(
                "SELECT DISTINCT instance FROM budget_leases WHERE host = $1 AND instance <> $2 "
                "AND state IN ('open', 'expired') UNION SELECT DISTINCT instance FROM "
                "budget_usage WHERE host = $1 AND instance <> $2 AND used <> posted ORDER BY 1",
                self.host,
                self.instance,
            ):
                await leases.reconcile(tx, instance)
                call.reconciled.append(instance)
        if adopt:
            for lease_id, pot, amount in await tx.fetch(
                "SELECT id, pot, amount FROM budget_leases WHERE instance = $1 "
                "AND state IN ('open', 'expired') ORDER BY id",
                self.instance,
            ):
                if lease_id not in self.leases:
                    call.adopted.append((lease_id, pot, int(amount)))
        now = time.monotonic()
        terms = self.terms.terms
        pots = set(short)
        for w in wants:  # every pot a want's draw order can take from
            pots.add(money_pot(w.tenant))
            pots.update(lot_pot(x) for x in terms.lots.get(w.tenant, ()))
        pending = [x for x in self.leases.values() if x.state != OPEN]
        pots |= {x.pot for x in pending}
        # A request whose want is in a grant still unanswered (a lost reply, retried below
        # with its id) sends it again meanwhile: planned again, it would be leased twice.
        asked_for = {i for x in pending if x.state == ASKING for i in x.waits}
        wants = [w for w in wants if _wait_of(w) not in asked_for]
        found = await leases.lock_pots(tx, pots)
        room = {p: max(0, r.cap - r.granted - r.spent_unposted) for p, r in found.items()}
        left = dict(room)
        local = {p: self.free(p) for p in pots}
        needs: dict[str, int] = {}
        for w in wants:
            try:
                outcome = plan(
                    terms,
                    w.tenant,
                    w.model,
                    w.ts_ms,
                    w.lines,
                    lambda p: local.get(p, 0) + left.get(p, 0),
                )
            except Exception:  # NotPriced: its request is refused by the worker's own plan
                call.unmet.append(w)
                continue
            if not outcome.paid:
                call.unmet.append(w)
                continue
            for d in holds(outcome):
                take = min(d.amount, local.get(d.pot, 0))
                local[d.pot] = local.get(d.pot, 0) - take
                self._stat(d.pot).worst.append((now, d.amount))
                if d.amount > take:
                    needs[d.pot] = needs.get(d.pot, 0) + d.amount - take
                    left[d.pot] = left.get(d.pot, 0) - (d.amount - take)
                    call.needs.setdefault(d.pot, []).append(w)
        asks: list[leases.Ask] = []
        retried = [x for x in pending if x.state == ASKING]
        for x in retried:
            asks.append(self._ask(x))
            call.asked.append(x.id)
        for pot in sorted(set(needs) | short):
            need = needs.get(pot, 0)
            r = room.get(pot, 0)
            want = max(self._slice(pot, now), need)
            amount = min(want, max(need, r // 2))
            if pot not in found or amount <= 0 or amount < need or amount > r:
                self._stat(pot).quiet_until = now + 1.0
                call.unmet.extend(call.needs.pop(pot, []))
                continue
            lease = Lease(
                f"{self.instance}:{next(self._seq)}",
                pot,
                want,
                need,
                sent=now,
                deadline=now + self.ttl_s - self.margin_s,
                waits=frozenset(_wait_of(w) for w in call.needs.get(pot, ())),
            )
            # Known before it is sent: a lost reply is asked again with this id.
            self.leases[lease.id] = lease
            call.new.append(lease.id)
            asks.append(self._ask(lease))
            call.asked.append(lease.id)
        backs = [(x.id, x.used) for x in pending if x.state == RETURNING]
        call.returned = [x for x, _ in backs]
        call.granted, call.backs = await leases.batch(tx, asks, backs)
        if final:
            # Replayed grants that did apply: given back unused, in the same transaction.
            for lease_id, got in zip(call.asked, call.granted, strict=True):
                if isinstance(got, leases.Lease) and got.state == leases.OPEN:
                    await leases.give_back(tx, lease_id, 0)
                    call.dropped_after.append(lease_id)

    def _ask(self, lease: Lease) -> leases.Ask:
        return leases.Ask(
            lease.id, lease.pot, self.host, lease.want, lease.minimum, self.ttl_ms, self.instance
        )

    def _apply(self, call: _Call, now: float) -> None:
        if call.reconciling:
            self.reconciled += call.reconciled
            self._reconcile_done = True
        for lease_id, pot, amount in call.adopted:
            # Perhaps in the pool (an agent of this instance before this one): counted in,
            # and given back the usual way.
            self.leases[lease_id] = Lease(
                lease_id, pot, amount, 0, now, now, state=OPEN, amount=amount
            )
            self._stat(pot)
            self._shrink(self.leases[lease_id])
        self._adopted = True
        refused_pots: set[str] = set()
        for lease_id, got in zip(call.asked, call.granted, strict=True):
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            if isinstance(got, leases.LeaseError):
                log.error("lease %s refused as asked: %s", lease_id, got)
                del self.leases[lease_id]
                refused_pots.add(lease.pot)
                continue
            if lease_id in call.dropped_after:
                del self.leases[lease_id]
                continue
            if got.state == leases.OPEN and got.amount > 0:
                if lease.state != ASKING:
                    continue  # seen granted before: in the pool already
                lease.amount = got.amount
                if now >= lease.deadline:  # too late to use: back, unused
                    lease.state, lease.used = RETURNING, 0
                    continue
                self._ensure(lease.pot)
                self.quota.add_budget(lease.pot, pot_dim(lease.pot), got.amount)
                lease.state = OPEN
                self.counts["grants"] += 1
                if got.amount < lease.want:
                    self._stat(lease.pot).quiet_until = now + 1.0
            elif got.state == leases.EXPIRED and lease.state == ASKING:
                lease.amount, lease.state, lease.used = got.amount, RETURNING, 0
            else:  # refused, or closed by the coordinator (written off)
                del self.leases[lease_id]
                if got.state == leases.REFUSED:
                    self.counts["refusals"] += 1
                    refused_pots.add(lease.pot)
                    self._stat(lease.pot).quiet_until = now + 1.0
        for lease_id, back in zip(call.returned, call.backs, strict=True):
            if isinstance(back, leases.LeaseError):
                log.error("give-back of lease %s refused: %s", lease_id, back)
            else:
                self.counts["give_backs"] += 1
            self.leases.pop(lease_id, None)
        unmet = list(call.unmet)
        for pot in refused_pots:
            unmet += call.needs.get(pot, [])
        marks: dict[str, int] = {}
        for w in unmet:
            marks[w.tenant] = max(marks.get(w.tenant, 0), w.want_id)
        for tenant, want_id in marks.items():
            self.counts["refusals"] += 1
            pot = money_pot(tenant)
            self._ensure(pot)
            mark = self.quota.limits(pot)["requests"] or 0
            if want_id > mark:
                self.quota.set_limits(pot, requests=want_id)

    def _error(self, e: BaseException) -> None:
        msg = " ".join(str(e).split()) or type(e).__name__
        if msg != self.last_error:
            log.warning("lease agent %s: %s", self.instance, msg)
        self.last_error = msg

    # -- figures ---------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """What leaser.json holds (the module docstring)."""
        pots: dict[str, dict[str, Any]] = {}
        by_pot = self._by_pot()
        for pot, st in sorted(self.pots.items()):
            mine = by_pot.get(pot, {}).get(OPEN, [])
            limit, charged = self._charged(pot)
            pots[pot] = {
                "leases": len(mine),
                "leased": sum(x.amount for x in mine),
                "limit": limit,
                "charged": charged,
                "rate": round(st.rate(), 3),
            }
        return {
            "host": self.host,
            "instance": self.instance,
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "updated_ms": time.time_ns() // 1_000_000,
            "last_tick_ms": self.last_tick_ms,
            **self.counts,
            "pending": sum(1 for x in self.leases.values() if x.state != OPEN),
            "reconciled": list(self.reconciled),
            "last_error": self.last_error,
            "pots": pots,
        }

    def _write_file(self, *, force: bool = False) -> None:
        if self.shared_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._written < FILE_EVERY_S:
            return
        self._written = now
        path = leaser_path(self.shared_dir)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.figures(), sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:
            self._error(e)
