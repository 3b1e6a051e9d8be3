"""Rate-limit shares across hosts: the Redis board, and the task that keeps this host's local
rpm, tpm and concurrency limits at its share (issue 13, ../shared/design/scaleout.md).

In cluster mode (`[server] host_id` set) a limit R of a key or tenant is split between the N
hosts: each host's local quota table holds its share r_i, not R, and the shares sum to R at
most. N is `[cluster] hosts`, else the live hosts in cluster_hosts (the heartbeat's last read),
at least 1, and never fewer than the hosts the board sees alive.

    worker 1, every TICK_S:  measure each limited account on the local table (admitted, refused,
                             tokens, in flight) -> demand per limit
      ── sync(present, [(limit, demand) for the limits near their share]) ──> one Lua script:
             stamp this host alive and its demands with an expiry (Redis's own clock), drop the
             expired, return the live hosts and each limit's live demands
      <── board_shares(R, N, present, demands)[this host]      (tokenhub.gateway.shares)
      write the share into the local table: cuts at once, raises 1.5 ticks later

Which limits are reported: only those near this host's share (demand at least half the quiet
share, or a request refused). A host quiet on a limit keeps `quiet_share(R, N)` (an eighth of
floor(R/N)) and sends nothing for it; after LEAVE_AFTER_S of quiet a reporting host first cuts
its limit to the quiet share, then leaves the limit's board. Every host is on the board's
presence set while it can reach Redis, so the others count it quiet (not unseen) on the limits
it does not report. A host the board does not see is counted at floor(R/N), which is what a
host that cannot reach Redis takes. Everything a host writes is keyed by its host id and
overwrites its previous word, so a write that redis-py retried or Redis applied late is
harmless.

Without Redis (`[cluster] redis_url` empty) every host takes floor(R / N). On any Redis error
(refused, timed out, a script error) a host keeps min(its share, floor(R / N)) while its last
presence stamp can still count (the board's TTL from the last sync it SENT, applied or not:
after a failure a ping goes first, so a Redis that cannot be reached is not written to), then
floor(R / N): never the whole R, so N hosts never admit over R.

The LimitSync (tokenhub.gateway.limits) mirrors the store's limits into the table; in cluster
mode it writes rate limits only through `ShareKeeper.local_limit` (worker 1: this host's share,
or the quiet share for a new or changed limit) and not at all in the other workers, so a reload
never overwrites a share with the whole R.

The share-shift bound. Each local rate limit is a GCRA (rust/quota): a bucket of r_i refilled at
r_i per minute, whose fill fraction is kept when r_i changes. So a host whose share rises by D
gains at most D of immediate room (less the emptier its bucket: a busy host, the one a
rebalance raises, gains almost nothing at once), and one whose share falls loses room at once.
Cuts apply at once; a raise waits RAISE_AFTER (1.5) ticks, by which time every other host has
ticked once (they tick every TICK_S) and cut what the same board told it to. The shares of one
board sum to R; the hosts read the board at different moments, so while demands move the
shares in force can exceed R by what the last rebalance moved, for less than a tick, and not
at all once demands have been steady for two ticks. Over any window of W seconds the hosts
together admit at most

    B0 + R * W / 60 + sum of D_k

B0 (<= R) being what their buckets held at the window's start (GCRA's burst, as one host with
the whole R has) and D_k the share moved onto a host by rebalance k within the window. In a
minute of steady overload (empty buckets, no moves) that is R; each rebalance adds at most the
share it moved. A host that stalls past a tick (SIGSTOP) while others raise adds D * stall / 60
per stall. Membership changes are the exception: a joining host is seen through the board's
presence set at the others' next tick (without Redis, at their next heartbeat read of
cluster_hosts: until then the sum can exceed R by the newcomer's floor(R / N)).

Skew without Redis: static shares give false 429s on the busy hosts when the load balancer
sends them more than 1/N of a limit's traffic; never an overrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tokenhub.gateway.shares import board_shares, quiet_share, static_share
from tokenhub.quota import Quota

log = logging.getLogger("tokenhub.shares")

RATE_KINDS = ("rpm", "tpm", "concurrent")
TICK_S = 1.0
LEAVE_AFTER_S = 10.0  # quiet this long on a limit: cut to the quiet share and leave its board
RAISE_AFTER = 1.5  # ticks a raise waits: every other host ticks (and cuts) in between
DECAY = 0.5  # a limit's demand at most halves per tick (it rises at once)
CHUNK = 500  # limits per script call: one call holds Redis for a few ms at most

# KEYS[1]: the live hosts (zset, score = expiry in ms). ARGV: host, ttl in ms, the key prefix,
# then per limit its name and this host's demand ('' = leave that limit's board). Per limit two
# keys, named here: its reporting hosts (zset) and their demands (hash). Returns one JSON text,
# [live hosts, [[host, demand, ...] per limit]] (an empty list comes out as {}): one bulk reply
# is parsed far faster than thousands of nested ones.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local host, ttl, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
-- the keys outlive the longest report in them, then vanish with their last host
local function keep(k)
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
local function prune(hosts, demand)
  local gone = redis.call('ZRANGEBYSCORE', hosts, '-inf', now)
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', hosts, '-inf', now)
    if demand then redis.call('HDEL', demand, unpack(gone)) end
  end
end
redis.call('ZADD', KEYS[1], now + ttl, host)
keep(KEYS[1])
prune(KEYS[1], nil)
local rows = {}
for i = 4, #ARGV, 2 do
  local tag = prefix .. ':{' .. ARGV[i] .. '}'
  local hosts, demand, d = tag .. ':hosts', tag .. ':demand', ARGV[i + 1]
  if d == '' then
    redis.call('ZREM', hosts, host)
    redis.call('HDEL', demand, host)
  else
    redis.call('ZADD', hosts, now + ttl, host)
    redis.call('HSET', demand, host, d)
    keep(hosts)
    keep(demand)
  end
  prune(hosts, demand)
  rows[#rows + 1] = redis.call('HGETALL', demand)
end
return cjson.encode({redis.call('ZRANGE', KEYS[1], 0, -1), rows})
"""
_Empty = dict[str, str]  # what cjson makes of an empty Lua table
_reply = msgspec.json.Decoder(tuple[list[str] | _Empty, list[list[str] | _Empty] | _Empty])


@dataclass(frozen=True, slots=True)
class Share:
    """This host's share of one limit, and what it was computed from."""

    amount: int
    coordinated: bool
    """False: Redis could not be reached and `amount` is the static floor(R / hosts)."""
    demands: Mapping[str, int] = field(default_factory=dict)
    """The live hosts' reported demands (empty when not coordinated)."""


@dataclass(frozen=True, slots=True)
class BoardView:
    """One sync's reading of the board: the live hosts, and per limit synced (in order) the
    demands of the hosts reporting on it (a left limit: the others, without this host)."""

    present: frozenset[str]
    demands: list[dict[str, int]]


class ShareBoard:
    """One host's view of the shared board at `url` (redis://...): per limit key, under
    `prefix`, `{key}:hosts` and `{key}:demand`, and `present` for the live hosts.

    `hosts` is the cluster's size, used by `report` (and its static fallback); the keeper passes
    its own. `ttl` (seconds) is how long a report and a presence stamp count; sync more often
    than that. `timeout` bounds each Redis call, connection included, and redis-py does not
    retry it: a slow coordinator means the fallback share, not a stalled tick. The script
    names the limits' keys itself (one argument per limit, not two keys): a single Redis (or
    a primary with replicas), not a Redis Cluster.
    """

    def __init__(
        self,
        url: str,
        host_id: str,
        *,
        hosts: int,
        ttl: float = 5.0,
        timeout: float = 0.5,
        prefix: str = "tokenhub:shares",
    ) -> None:
        if not host_id:
            raise ValueError("host_id must not be empty")
        if hosts < 1:
            raise ValueError(f"hosts must be at least 1, got {hosts}")
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.host_id = host_id
        self.hosts = hosts
        self.ttl_ms = max(1, math.ceil(ttl * 1000))
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        # Script.__call__ reloads the script when Redis answers NOSCRIPT (restarted empty).
        self._script = self._redis.register_script(_SYNC)

    @property
    def ttl_s(self) -> float:
        return self.ttl_ms / 1000

    async def sync(self, reports: Sequence[tuple[str, int | None]]) -> BoardView:
        """Stamps this host alive; reports its demand on each limit key (None: leaves that
        limit's board). Raises RedisError, OSError or TimeoutError when Redis fails (then any
        part of it may or may not have been applied)."""
        present: frozenset[str] = frozenset()
        demands: list[dict[str, int]] = []
        for start in range(0, max(len(reports), 1), CHUNK):
            args: list[str | int] = [self.host_id, self.ttl_ms, self.prefix]
            for key, demand in reports[start : start + CHUNK]:
                args += [key, "" if demand is None else max(int(demand), 0)]
            live, rows = _reply.decode(
                await self._script(keys=[f"{self.prefix}:present"], args=args)
            )
            present = frozenset(live)
            for row in rows if isinstance(rows, list) else ():
                flat = row if isinstance(row, list) else []
                demands.append({flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)})
        return BoardView(present, demands)

    async def ping(self) -> None:
        """Raises as `sync` does when Redis cannot be reached; writes nothing."""
        await self._redis.ping()

    async def report(self, key: str, limit: int, demand: int) -> Share:
        """Reports this host's demand on limit `key` (of total `limit`) alone and returns its
        share among `hosts`; the static share when Redis fails."""
        try:
            view = await self.sync([(key, demand)])
        except (RedisError, OSError, TimeoutError):
            return Share(static_share(limit, self.hosts), coordinated=False)
        demands = view.demands[0]
        # The script has just stamped this host, so it is among the reporting ones.
        shares = board_shares(limit, self.hosts, len(view.present), demands)
        return Share(shares[self.host_id], True, demands)

    async def close(self) -> None:
        await self._redis.aclose()


# -- the keeper: this host's local rate limits at its shares -------------------------------------


@dataclass(slots=True)
class _Limit:
    """One (account, kind) limit as this host holds it."""

    total: int  # R, from the store
    local: int  # what this host's table holds (written by the keeper)
    demand: float = 0.0  # smoothed: per minute (rpm, tpm) or in flight (concurrent)
    reporting: bool = False
    quiet_since: float | None = None
    raise_to: int | None = None  # a raise due (the lowest target since raise_since)
    raise_since: float = 0.0


@dataclass(slots=True)
class _Seen:
    admitted: int
    refused: int
    tokens: int


@dataclass(slots=True)
class _Use:
    """What an account did since the last tick, in demand units."""

    refused: int
    demand: dict[str, float]


class ShareKeeper:
    """Keeps this host's local rate limits at its shares (one per host: worker 1's).

    `totals()` gives every limited account's rate limits R ({account: {kind: R}}, the
    LimitSync's `rate_totals`); `hosts()` the cluster's size N (>= 1); `board` is None without
    Redis (static shares). `local_limit` is the LimitSync's hook (called from its reload thread).
    """

    def __init__(
        self,
        quota: Quota,
        totals: Callable[[], Mapping[str, Mapping[str, int]]],
        hosts: Callable[[], int],
        board: ShareBoard | None,
        *,
        tick_s: float = TICK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quota = quota
        self.totals = totals
        self.hosts = hosts
        self.board = board
        self.tick_s = tick_s
        self.clock = clock
        self._lock = threading.Lock()
        self._limits: dict[tuple[str, str], _Limit] = {}
        self._seen: dict[str, _Seen] = {}
        self._seen_at: float | None = None
        # Until when the board may count this host present (the last sync sent + its TTL).
        self._counted_until = -math.inf
        self.coordinated = False  # the last tick read the board
        self.n = max(1, hosts())
        self.syncs = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    # -- the LimitSync's hook ----------------------------------------------------------------

    def _fallback(self, total: int, n: int) -> int:
        """What a limit starts at before the board is read: the quiet share while the board
        may count this host present (or will: a first sync is due), else the static one."""
        if self.board is not None and (self._seen_at is None or self.clock() < self._counted_until):
            return quiet_share(total, n)
        return static_share(total, n)

    def local_limit(self, account: str, kind: str, total: int) -> int:
        """The local limit to write for `account`'s `kind` of total `total`: this host's
        current share, or for a new or changed total a safe start (the quiet share, or the
        static one without a board)."""
        with self._lock:
            return self._admit(account, kind, total).local

    def _admit(self, account: str, kind: str, total: int) -> _Limit:
        key = (account, kind)
        cur = self._limits.get(key)
        if cur is not None and cur.total == total:
            return cur
        self.n = max(self.n, self.hosts())  # before the first tick too (the heartbeat's read)
        start = self._fallback(total, self.n)
        if cur is None:
            cur = self._limits[key] = _Limit(total, start)
        else:  # a changed total: never above the safe start until the next ticks say so
            cur.total, cur.local, cur.raise_to = total, min(cur.local, start), None
        return cur

    # -- the periodic task ---------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tokenhub-shares")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.board is not None:
            await self.board.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug must not end the task: the limits stay as they are
                log.exception("rate-limit shares: tick failed")
            await asyncio.sleep(self.tick_s)

    def _measure(self, accounts: Sequence[str], now: float) -> dict[str, _Use]:
        dt = None if self._seen_at is None else max(now - self._seen_at, 1e-3)
        self._seen_at = now
        out: dict[str, _Use] = {}
        seen: dict[str, _Seen] = {}
        table = self.quota.table
        for name in accounts:
            s = table.snapshot(self.quota.account(name))  # the raw figures: no dataclasses
            inflight = s["inflight"]
            cur = seen[name] = _Seen(
                s["admitted"], s["refused"], s["tokens_used"] + s["tokens_held"]
            )
            prev = self._seen.get(name)
            if prev is None or dt is None:
                out[name] = _Use(0, {"rpm": 0.0, "tpm": 0.0, "concurrent": float(inflight)})
                continue
            admitted = max(0, cur.admitted - prev.admitted)
            refused = max(0, cur.refused - prev.refused)
            tokens = max(0, cur.tokens - prev.tokens)  # a new day resets it: counts 0
            per_min = 60.0 / dt
            out[name] = _Use(
                refused,
                {
                    "rpm": (admitted + refused) * per_min,
                    # The refused requests wanted as many tokens as the admitted, on average.
                    "tpm": tokens * (admitted + refused) / admitted * per_min if admitted else 0.0,
                    "concurrent": float(inflight),
                },
            )
        self._seen = seen
        return out

    async def tick(self) -> None:
        """One round: measure, sync with the board (or not), write the shares."""
        now = self.clock()
        self.n = n = max(1, self.hosts())
        with self._lock:
            # Read under the lock: the hook admits a limit only once its total is published.
            totals = {a: dict(k) for a, k in self.totals().items()}
            for key in [k for k in self._limits if totals.get(k[0], {}).get(k[1]) is None]:
                del self._limits[key]  # removed: the LimitSync unset it, and so does this
                self.quota.set_limits(key[0], **{key[1]: None})
            for account, kinds in totals.items():
                for kind, total in kinds.items():
                    lim = self._limits.get((account, kind))
                    if lim is None or lim.total != total:  # not through the hook (yet)
                        self._write((account, kind), self._admit(account, kind, total).local)
            use = self._measure(sorted(totals), now)
            limits = {k: (lim, lim.total) for k, lim in self._limits.items()}
        refused: set[tuple[str, str]] = set()
        for key, (lim, _) in limits.items():
            u = use.get(key[0])
            if u is None:
                continue
            lim.demand = max(u.demand[key[1]], lim.demand * DECAY)
            if u.refused:  # refused (by any of its limits): it wants a quarter more than it has
                refused.add(key)
                lim.demand = max(lim.demand, lim.local * 1.25 + 1)
        board = self.board
        if board is None:
            self.coordinated = False
            for lim, _ in limits.values():
                lim.reporting, lim.quiet_since = False, None
            self._apply({k: (t, static_share(t, n)) for k, (_, t) in limits.items()})
            return
        reports: dict[tuple[str, str], int | None] = {}
        for key, (lim, total) in limits.items():
            if key in refused or lim.demand * 2 >= quiet_share(total, n):
                lim.quiet_since = None
                lim.reporting = True
                reports[key] = math.ceil(lim.demand)
            elif lim.reporting:
                lim.quiet_since = now if lim.quiet_since is None else lim.quiet_since
                if now - lim.quiet_since < LEAVE_AFTER_S:
                    reports[key] = math.ceil(lim.demand)
                else:
                    reports[key] = None
        # A limit left is cut to the quiet share before the board hears of it, so the others
        # (who count it quiet from their next read on) never count it lower than it is.
        leaving = [k for k, d in reports.items() if d is None]
        self._apply(
            {
                k: (limits[k][1], min(limits[k][0].local, quiet_share(limits[k][1], n)))
                for k in leaving
            }
        )
        try:
            if not self.coordinated:
                # After a failure, a ping first: a sync that cannot reach Redis stamps nothing,
                # and only a sync that may have been applied extends how long it counts.
                await board.ping()
            self._counted_until = self.clock() + board.ttl_s  # applied or not, it may count
            view = await board.sync([(f"{a}:{k}", d) for (a, k), d in reports.items()])
        except (RedisError, OSError, TimeoutError) as e:
            self.failures += 1
            if self.coordinated:
                log.warning("rate-limit shares: Redis failed (%s); static shares", e)
            self.coordinated = False
            # The board may count this host quiet or reporting until its last stamp expires:
            # no raise until then.
            counted = self.clock() < self._counted_until
            self._apply(
                {
                    k: (t, min(lim.local, static_share(t, n)) if counted else static_share(t, n))
                    for k, (lim, t) in limits.items()
                }
            )
            return
        self.syncs += 1
        self.coordinated = True
        self.n = n = max(n, len(view.present))
        targets: dict[tuple[str, str], tuple[int, int]] = {}
        order = {key: i for i, key in enumerate(reports)}
        for key, (lim, total) in limits.items():
            i = order.get(key)
            if i is None or reports[key] is None:
                lim.reporting = False
                targets[key] = (total, quiet_share(total, n))
            else:
                shares = board_shares(total, n, len(view.present), view.demands[i])
                targets[key] = (total, shares[board.host_id])
        self._apply(targets)

    def _apply(self, targets: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """Writes each (total, target) into the table: a cut at once, a raise once it has been
        due for RAISE_AFTER ticks (the lowest target seen meanwhile), so that every other host
        has ticked, and cut, since the board said so. A target computed for a total changed
        since is dropped."""
        now = self.clock()
        with self._lock:
            for key, (total, target) in targets.items():
                lim = self._limits.get(key)
                if lim is None or lim.total != total:
                    continue  # removed or changed meanwhile: the next tick decides
                if target < lim.local:
                    lim.raise_to = None
                    self._write(key, target)
                elif target > lim.local:
                    if lim.raise_to is None:
                        lim.raise_to, lim.raise_since = target, now
                        continue
                    lim.raise_to = min(lim.raise_to, target)
                    if now - lim.raise_since >= RAISE_AFTER * self.tick_s:
                        self._write(key, lim.raise_to)
                        lim.raise_to = None
                else:
                    lim.raise_to = None

    def _write(self, key: tuple[str, str], value: int) -> None:
        self._limits[key].local = value
        self.quota.set_limits(key[0], **{key[1]: value})

    # -- figures -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            limits = list(self._limits.values())
        reporting = sum(1 for lim in limits if lim.reporting)
        return {
            "coordinated": int(self.coordinated),
            "hosts": self.n,
            "limits": len(limits),
            "reporting": reporting,
            "syncs": self.syncs,
            "failures": self.failures,
        }

    def shares(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(account, kind) -> (total R, this host's local limit)."""
        with self._lock:
            return {k: (lim.total, lim.local) for k, lim in self._limits.items()}
