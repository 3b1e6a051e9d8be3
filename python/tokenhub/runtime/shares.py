"""Rate-limit and period-budget shares across hosts: the Redis board, and the task that keeps
this host's local rpm, tpm and concurrency limits, and its tenants' tokens per day, at its share
(issue 13, ../shared/design/scaleout.md). Rates first; period budgets below.

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

Period budgets. A tenant's tokens_per_day B is a stock: what a host spends stays spent until
the period (the UTC day the table is in, LimitSync's DAY_ACCOUNT) ends. The same keeper, the
same tick and the same script carry it, on a board of its own per period ("tenant:t:tokens@
<day>"), so a new day starts from nothing. Each host's local tokens limit is an absolute limit
on its own period usage (the table's used + held), and on the board each host has an entry,
kept for the whole period (not for a TTL): used (its usage now), claim (the most it will hold
in force until its next entry: its limit, or a raise it has due) and offset (below). Entries
carry a sequence number (wall-clock microseconds) and the script keeps only a newer one, so a
write Redis applies late cannot lower a claim.

    every tick, per budget this host uses, reports on, has a raise due on, has cut below its
    last claim, or has not read for QUIET_SYNC_S (a quiet one: so its floor follows the room):
      ── (demand: the tokens it wants in the next SLICE_S, when near its floor or refused;
          entry: seq used claim offset) ──> the script, in the rates' call
      <── every host's demand and entry of the period
      target = budget_targets(...)[me]: used + a fair share (by demand) of the room B - the
               present hosts' used - max(used, claim) of each absent host with an entry -
               floor(B/N) per unseen host; a quiet host gets used + period_floor(room, N); a
               reporting one takes min(target, used + max(its demand, that floor)): a slice at
               a time, so a host that dies strands at most SLICE_S of its demand
      cut at once; raise to min(target, the claim THIS sync sent, budget_cap(...)), the cap
               being B - what every other host may hold (its entry's max(used, claim); a
               present host without an entry, the start floor period_floor(B, N); an unseen
               one, floor(B/N))

The bound: the limits in force never sum over B, stalls included. A host's limit only rises to
a value its claim on the board already covers, and only up to what the others' claims leave,
read in the same atomic script call that stored its own; cuts are local first, claimed lower
after. Of two hosts raising, the one whose call ran second has seen the first's claim, so every
limit in force stays within the claims, and the claims with the unseen hosts' floor(B/N) within
B. A host that stops ticking (SIGSTOP) keeps its limit and its claim: the others cannot raise
into it, so when it wakes and spends all it holds, B still holds (the tables admit within their
limits; a stream's extension is checked too, so only a settle above its reservation, as on one
host, goes beyond). What it costs: a raise waits a tick (claimed, then applied); a reporting
host holds at most SLICE_S of its demand beyond its usage; quiet hosts keep a floor (an eighth
of an even split of what is left, rounded down to a power of two), so the last ~(N-1)/8N of the
room goes to whoever is busy only as the floors shrink with it. Membership changes are again
the exception: the floors a host counts the others at depend on N, so set `[cluster] hosts`;
while hosts disagree on N the sum can pass B by the difference in those floors.

Without Redis: floor(B / N) of the most hosts counted this period (a host going down does not
raise the others: it may have spent its part; the next day counts afresh). On any Redis error a
host whose entry the board may hold (it sent one this period, or found one) only cuts, to
min(its limit, floor(B / N)), for as long as the board is unreachable: the others may count it
at its claim. A host with no entry keeps min(its limit, floor(B / N)) while its presence stamp
counts (the others count it at the start floor), then floor(B / N) (they count it unseen). Redis
restarted empty loses the entries: the hosts notice the board's new generation and send theirs
again at the next tick; until then (about a tick) the others count them at the start floor or
floor(B / N), and a host that died before Redis restarted is counted at floor(B / N) instead of
what it spent. A host restarted while Redis is unreachable cannot read what it spent before: it
takes floor(B / N) on top of what its new table carried.

Restarts. A restarted server's table is charged by LimitSync with the tenant's usage since
00:00 by the database, everybody's (the database does not say which host served it). On its
first reading of the board the keeper sets the budget's offset (table units - its own units):
with its earlier incarnation's entry, offset = carried - max(used, claim) of that entry, so the
host counts what it may have spent before, not the others' usage; a restarted worker 1 (same
table) takes the offset its entry stored. Without an entry, the others' reported usage is taken
out of the carry (as much as the carry holds).

What an operator sees: with Redis, a busy host gets nearly all of what is left within a couple
of ticks and a budget is spent to within the quiet floors and a request; near the end a host can
see insufficient_quota for a tick or two while another host's slice or floor still holds the
last tokens. Without Redis (or while it is down) skewed load balancing gives false 429s on the
busy hosts once they have spent floor(B / N) (or their claim), with the other hosts' parts
unspent; never an overrun. A restarted host strands at most its last slice for the rest of the
day.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tokenhub.gateway.limits import DAY_ACCOUNT, utc_day
from tokenhub.gateway.shares import (
    Entry,
    board_shares,
    budget_cap,
    budget_targets,
    period_floor,
    quiet_share,
    static_share,
)
from tokenhub.quota import Quota

log = logging.getLogger("tokenhub.shares")

RATE_KINDS = ("rpm", "tpm", "concurrent")
BUDGET_KINDS = ("tokens",)  # the table's period budgets that are split (per UTC day)
TICK_S = 1.0
LEAVE_AFTER_S = 10.0  # quiet this long on a limit: cut to the quiet share and leave its board
RAISE_AFTER = 1.5  # ticks a raise waits: every other host ticks (and cuts) in between
DECAY = 0.5  # a limit's demand at most halves per tick (it rises at once)
CHUNK = 500  # limits per script call: one call holds Redis for a few ms at most
QUIET_SYNC_S = 10.0  # a budget this host neither uses nor reports on is read this often
SLICE_S = 10.0  # a host holds at most this long of its demand of a budget beyond its used

# KEYS[1]: the live hosts (zset, score = expiry in ms); KEYS[2]: the board's generation (a
# token set once: another one means Redis lost the board). ARGV: host, ttl in ms, the key
# prefix, the number of rate limits, a generation token to set if none is; then per rate limit
# its name and this host's demand ('' = leave that limit's board); then per period budget its
# name, demand ('' = not reporting), this host's entry ('' = unchanged; else "seq used claim
# offset", kept only if its seq is newer than the stored one's) and when the entries expire
# (ms since the epoch). Per limit two keys, named here: its reporting hosts (zset) and their
# demands (hash); a budget has a third, the entries (hash). Returns one JSON text, [live
# hosts, [[host, demand, ...] per rate limit], [[[host, demand, ...], [host, entry, ...]] per
# budget], generation] (an empty list comes out as {}): one bulk reply is parsed far faster
# than thousands of nested ones.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local host, ttl, prefix, nrates = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
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
local function report(tag, d)
  local hosts, demand = tag .. ':hosts', tag .. ':demand'
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
  return redis.call('HGETALL', demand)
end
redis.call('ZADD', KEYS[1], now + ttl, host)
keep(KEYS[1])
prune(KEYS[1], nil)
redis.call('SET', KEYS[2], ARGV[5], 'NX')
local rows, budgets = {}, {}
local i = 6
for _ = 1, nrates do
  rows[#rows + 1] = report(prefix .. ':{' .. ARGV[i] .. '}', ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  local tag = prefix .. ':{' .. ARGV[i] .. '}'
  local claims, entry = tag .. ':claims', ARGV[i + 2]
  local demands = report(tag, ARGV[i + 1])
  if entry ~= '' then
    local old = redis.call('HGET', claims, host)
    if not old or tonumber(string.match(old, '^%d+')) < tonumber(string.match(entry, '^%d+')) then
      redis.call('HSET', claims, host, entry)
    end
    redis.call('PEXPIREAT', claims, ARGV[i + 3])
  end
  budgets[#budgets + 1] = {demands, redis.call('HGETALL', claims)}
  i = i + 4
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
return cjson.encode({live, rows, budgets, redis.call('GET', KEYS[2])})
"""
# ARGV: the key prefix, then budget names. Reads each budget's entries, writes nothing.
_PEEK = """
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. ':{' .. ARGV[i] .. '}:claims')
end
return cjson.encode(out)
"""
_Empty = dict[str, str]  # what cjson makes of an empty Lua table
_Flat = list[str] | _Empty
_reply = msgspec.json.Decoder(
    tuple[_Flat, list[_Flat] | _Empty, list[tuple[_Flat, _Flat]] | _Empty, str]
)
_peeked = msgspec.json.Decoder(list[_Flat] | _Empty)


def _pairs(flat: _Flat) -> list[tuple[str, str]]:
    if not isinstance(flat, list):
        return []
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _entries(flat: _Flat, me: str) -> tuple[dict[str, Entry], int | None]:
    """A budget's entries ({host: Entry}) and this host's stored offset (None: no entry)."""
    out: dict[str, Entry] = {}
    offset = None
    for host, text in _pairs(flat):
        _, used, claim, off = text.split()
        out[host] = Entry(int(used), int(claim))
        if host == me:
            offset = int(off)
    return out, offset


@dataclass(frozen=True, slots=True)
class Share:
    """This host's share of one limit, and what it was computed from."""

    amount: int
    coordinated: bool
    """False: Redis could not be reached and `amount` is the static floor(R / hosts)."""
    demands: Mapping[str, int] = field(default_factory=dict)
    """The live hosts' reported demands (empty when not coordinated)."""


@dataclass(frozen=True, slots=True)
class BudgetReport:
    """This host's word on one period budget (`name` includes the period)."""

    name: str
    demand: int | None
    """None: not reporting (quiet, or leaving)."""
    entry: tuple[int, int, int, int] | None
    """(seq, used, claim, offset): None leaves the stored entry as it is."""
    expire_at_ms: int
    """When the budget's entries may go (after the period's end)."""


@dataclass(frozen=True, slots=True)
class BudgetView:
    """One budget as a sync read it: the reporting hosts' demands, every host's entry of the
    period, and this host's stored offset (None: it has no entry)."""

    demands: dict[str, int]
    entries: dict[str, Entry]
    offset: int | None


@dataclass(frozen=True, slots=True)
class BoardView:
    """One sync's reading of the board: the live hosts, per rate limit synced (in order) the
    demands of the hosts reporting on it (a left limit: the others, without this host), per
    budget synced (in order) its view, and the board's generation."""

    present: frozenset[str]
    demands: list[dict[str, int]]
    budgets: list[BudgetView] = field(default_factory=list)
    generation: str = ""


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
        self._peek = self._redis.register_script(_PEEK)

    @property
    def ttl_s(self) -> float:
        return self.ttl_ms / 1000

    async def sync(
        self,
        reports: Sequence[tuple[str, int | None]],
        budgets: Sequence[BudgetReport] = (),
    ) -> BoardView:
        """Stamps this host alive; reports its demand on each limit key (None: leaves that
        limit's board) and its word on each period budget. Raises RedisError, OSError or
        TimeoutError when Redis fails (then any part of it may or may not have been
        applied)."""
        present: frozenset[str] = frozenset()
        demands: list[dict[str, int]] = []
        views: list[BudgetView] = []
        generation = ""
        r = b = 0
        first = True
        while first or r < len(reports) or b < len(budgets):
            first = False
            rates = reports[r : r + CHUNK]
            these = budgets[b : b + CHUNK - len(rates)]
            r, b = r + len(rates), b + len(these)
            args: list[str | int] = [self.host_id, self.ttl_ms, self.prefix, len(rates)]
            # A generation of its own for the board, if none is: a new one every call, so
            # the board's changes only when Redis lost it (whoever wrote first, and when).
            args.append(uuid.uuid4().hex)
            for key, demand in rates:
                args += [key, "" if demand is None else max(int(demand), 0)]
            for rep in these:
                args += [
                    rep.name,
                    "" if rep.demand is None else max(int(rep.demand), 0),
                    "" if rep.entry is None else " ".join(map(str, rep.entry)),
                    rep.expire_at_ms,
                ]
            keys = [f"{self.prefix}:present", f"{self.prefix}:generation"]
            live, rows, brows, generation = _reply.decode(await self._script(keys=keys, args=args))
            present = frozenset(live)
            for row in rows if isinstance(rows, list) else ():
                demands.append({h: int(d) for h, d in _pairs(row)})
            for dflat, eflat in brows if isinstance(brows, list) else ():
                entries, offset = _entries(eflat, self.host_id)
                views.append(BudgetView({h: int(d) for h, d in _pairs(dflat)}, entries, offset))
        return BoardView(present, demands, views, generation)

    async def peek(self, names: Sequence[str]) -> list[BudgetView]:
        """Reads the entries of these period budgets (in order; no demands), writing
        nothing. Raises as `sync` does."""
        out: list[BudgetView] = []
        for start in range(0, len(names), CHUNK):
            args = [self.prefix, *names[start : start + CHUNK]]
            rows = _peeked.decode(await self._peek(args=args))
            for flat in rows if isinstance(rows, list) else ():
                entries, offset = _entries(flat, self.host_id)
                out.append(BudgetView({}, entries, offset))
        return out

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


# -- the keeper: this host's local rate limits and period budgets at its shares ----------------


@dataclass(slots=True)
class _Limit:
    """One (account, kind) rate limit as this host holds it."""

    total: int  # R, from the store
    local: int  # what this host's table holds (written by the keeper)
    demand: float = 0.0  # smoothed: per minute (rpm, tpm) or in flight (concurrent)
    reporting: bool = False
    quiet_since: float | None = None
    raise_to: int | None = None  # a raise due (the lowest target since raise_since)
    raise_since: float = 0.0


@dataclass(slots=True)
class _Budget:
    """One (account, kind) period budget as this host holds it. Board units count this host's
    own spending; the table's (local) units may count more: a restarted server's table is
    charged with the tenant's usage since the period began by every host (LimitSync's carry).
    local = board + offset."""

    total: int  # B, from the store
    period: int  # the table's day these figures are for
    local: int  # what this host's table holds (written by the keeper), local units
    n_max: int  # the most hosts counted this period: a static share never rises as hosts go
    offset: int | None = None  # local - board units; None until the board has been read
    on_board: bool = False  # the board may hold an entry of this host for this period
    want: int | None = None  # board units: a raise due, claimed at the next sync
    claimed: int = 0  # board units: the claim the last sync sent (or stood for)
    demand: float = 0.0  # smoothed: the tokens it wants in the next SLICE_S
    used: int = 0  # board units, at the last sync
    reporting: bool = False
    quiet_since: float | None = None
    synced_at: float = -math.inf
    charged: int = -1  # the table's used + held at the last sync, local units
    floor: int | None = None  # the quiet floor the last sync gave


@dataclass(slots=True)
class _Seen:
    admitted: int
    refused: int
    tokens: int


@dataclass(slots=True)
class _Use:
    """What an account did since the last tick, in demand units, and its tokens charged now
    (used + held: what its period budget counts)."""

    refused: int
    demand: dict[str, float]
    charged: int = 0


Carried = tuple[int, Mapping[str, int]]
"""(day, {account: tokens}): what LimitSync charged a fresh table with at start."""


class ShareKeeper:
    """Keeps this host's local rate limits and period budgets at its shares (one per host:
    worker 1's).

    `totals()` gives every limited account's rate limits R and period budgets B ({account:
    {kind: total}}, the LimitSync's `rate_totals`); `hosts()` the cluster's size N (>= 1);
    `board` is None without Redis (static shares). `local_limit` is the LimitSync's hook
    (called from its reload thread, and at a new day). `carried()` is LimitSync's `carried`
    (None: this process did not start the table); `period()` the day the table's budgets are
    in (default: the table's own mark, LimitSync's DAY_ACCOUNT).
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
        carried: Callable[[], Carried | None] | None = None,
        period: Callable[[], int] | None = None,
    ) -> None:
        self.quota = quota
        self.totals = totals
        self.hosts = hosts
        self.board = board
        self.tick_s = tick_s
        self.clock = clock
        self.carried = carried
        self.period = period or self._table_day
        self._lock = threading.Lock()
        self._limits: dict[tuple[str, str], _Limit] = {}
        self._budgets: dict[tuple[str, str], _Budget] = {}
        self._seen: dict[str, _Seen] = {}
        self._seen_at: float | None = None
        # Until when the board may count this host present (the last sync sent + its TTL).
        self._counted_until = -math.inf
        self._seq = 0  # budget entries' sequence: wall-clock microseconds, never repeated
        self._generation: str | None = None
        self.coordinated = False  # the last tick read the board
        self.n = max(1, hosts())
        self.syncs = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def _table_day(self) -> int:
        day = self.quota.limits(DAY_ACCOUNT)["requests"]
        return utc_day() if day is None else day

    # -- the LimitSync's hook ----------------------------------------------------------------

    def _counted(self) -> bool:
        """Whether the board may count this host present (or will: a first sync is due)."""
        return self.board is not None and (
            self._seen_at is None or self.clock() < self._counted_until
        )

    def _fallback(self, total: int, n: int) -> int:
        """What a limit starts at before the board is read: the quiet share while the board
        may count this host present (or will: a first sync is due), else the static one."""
        return quiet_share(total, n) if self._counted() else static_share(total, n)

    def local_limit(self, account: str, kind: str, total: int) -> int:
        """The local limit to write for `account`'s `kind` of total `total`: this host's
        current share, or for a new or changed total (or a budget's new period) a safe start
        (the quiet share, or the static one without a board)."""
        with self._lock:
            if kind in BUDGET_KINDS:
                return self._admit_budget(account, kind, total, self.period()).local
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

    def _budget_start(self, total: int, n: int, offset: int | None) -> int:
        """Where a budget starts (local units) before the board says more: the start floor
        period_floor(B, N) while the board may count this host, else floor(B / N)."""
        part = period_floor(total, n) if self._counted() else static_share(total, n)
        return max(part + (offset or 0), 0)

    def _admit_budget(self, account: str, kind: str, total: int, period: int) -> _Budget:
        key = (account, kind)
        cur = self._budgets.get(key)
        if cur is not None and cur.total == total and cur.period == period:
            return cur
        self.n = max(self.n, self.hosts())
        if cur is None or cur.period != period:  # new, or a new period: the shares start over
            start = self._budget_start(total, self.n, None)
            cur = self._budgets[key] = _Budget(total, period, start, self.n)
        else:  # a changed total: never above the safe start until the next ticks say so
            cur.total, cur.want = total, None
            cur.local = min(cur.local, self._budget_start(total, cur.n_max, cur.offset))
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
            charged = s["tokens_used"] + s["tokens_held"]
            cur = seen[name] = _Seen(s["admitted"], s["refused"], charged)
            prev = self._seen.get(name)
            if prev is None or dt is None:
                out[name] = _Use(
                    0, {"rpm": 0.0, "tpm": 0.0, "concurrent": float(inflight)}, charged
                )
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
                charged,
            )
        self._seen = seen
        return out

    async def tick(self) -> None:
        """One round: measure, sync with the board (or not), write the shares."""
        now = self.clock()
        self.n = n = max(1, self.hosts())
        period = self.period()
        with self._lock:
            # Read under the lock: the hook admits a limit only once its total is published.
            totals = {a: dict(k) for a, k in self.totals().items()}
            for key in [k for k in self._limits if totals.get(k[0], {}).get(k[1]) is None]:
                del self._limits[key]  # removed: the LimitSync unset it, and so does this
                self.quota.set_limits(key[0], **{key[1]: None})
            for key in [k for k in self._budgets if totals.get(k[0], {}).get(k[1]) is None]:
                del self._budgets[key]
                self.quota.set_limits(key[0], **{key[1]: None})
            for account, kinds in totals.items():
                for kind, total in kinds.items():
                    if kind in BUDGET_KINDS:
                        b = self._admit_budget(account, kind, total, period)
                        b.n_max = max(b.n_max, n)
                        # Every tick, not only on a change: a reload that raced a new day's
                        # start cannot leave the old period's share in the table.
                        self._write_budget((account, kind), b.local)
                        continue
                    lim = self._limits.get((account, kind))
                    if lim is None or lim.total != total:  # not through the hook (yet)
                        self._write((account, kind), self._admit(account, kind, total).local)
            use = self._measure(sorted(totals), now)
            limits = {k: (lim, lim.total) for k, lim in self._limits.items()}
            budgets = dict(self._budgets)
        refused: set[tuple[str, str]] = set()
        for key, (lim, _) in limits.items():
            u = use.get(key[0])
            if u is None:
                continue
            lim.demand = max(u.demand[key[1]], lim.demand * DECAY)
            if u.refused:  # refused (by any of its limits): it wants a quarter more than it has
                refused.add(key)
                lim.demand = max(lim.demand, lim.local * 1.25 + 1)
        charged: dict[tuple[str, str], int] = {}
        for key, b in budgets.items():
            u = use.get(key[0])
            charged[key] = u.charged if u is not None else 0
            if u is None:
                continue
            measured = u.demand["tpm"] * SLICE_S / 60
            b.demand = max(measured, b.demand * DECAY)
            if u.refused:  # refused (by any of its limits): it wants twice what it had
                refused.add(key)
                floor = b.floor if b.floor is not None else period_floor(b.total, n)
                b.demand = max(b.demand * 2, measured, floor)
        board = self.board
        if board is None:
            self.coordinated = False
            for lim, _ in limits.values():
                lim.reporting, lim.quiet_since = False, None
            self._apply({k: (t, static_share(t, n)) for k, (_, t) in limits.items()})
            self._static_budgets(budgets, keep=False)
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
        due = self._due_budgets(budgets, charged, refused, now, n)
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
            unread = [(k, b) for k, b, _ in due if b.offset is None]
            if unread:  # the board's word on them first: what this host had spent before
                peeked = await board.peek([_budget_name(k, b) for k, b in unread])
                self._settle_offsets(unread, peeked, n)
            breports = [self._budget_report(k, b, d, charged[k], n) for k, b, d in due]
            self._counted_until = self.clock() + board.ttl_s  # applied or not, it may count
            view = await board.sync([(f"{a}:{k}", d) for (a, k), d in reports.items()], breports)
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
            self._static_budgets(budgets, keep=counted)
            return
        self.syncs += 1
        self.coordinated = True
        self.n = n = max(n, len(view.present))
        if self._generation is not None and view.generation != self._generation:
            log.warning("rate-limit shares: the Redis board was lost; every entry is re-sent")
            for b in budgets.values():
                b.synced_at = -math.inf  # due at the next tick
        self._generation = view.generation
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
        self._apply_budgets(due, breports, view, now, n)

    # -- period budgets ------------------------------------------------------------------------

    def _due_budgets(
        self,
        budgets: Mapping[tuple[str, str], _Budget],
        charged: Mapping[tuple[str, str], int],
        refused: set[tuple[str, str]],
        now: float,
        n: int,
    ) -> list[tuple[tuple[str, str], _Budget, int | None]]:
        """The budgets to sync this tick, with the demand to report on each (None: none):
        those this host uses or reports on, has a raise due on, has cut below its last claim,
        or has not read yet; a quiet one every QUIET_SYNC_S, so that its floor follows what is
        left."""
        due = []
        for key, b in budgets.items():
            floor = b.floor if b.floor is not None else period_floor(b.total, n)
            demand: int | None = None
            leaving = False
            if key in refused or (b.demand > 0 and b.demand * 2 >= floor):
                b.quiet_since = None
                b.reporting = True
                demand = math.ceil(b.demand)
            elif b.reporting:
                b.quiet_since = now if b.quiet_since is None else b.quiet_since
                if now - b.quiet_since < LEAVE_AFTER_S:
                    demand = math.ceil(b.demand)
                else:
                    b.reporting, leaving = False, True
            if (
                b.reporting
                or leaving
                or charged[key] != b.charged
                or b.want is not None
                or b.offset is None
                or b.local - b.offset < b.claimed  # cut since: tell the others at once
                or now - b.synced_at >= QUIET_SYNC_S
            ):
                due.append((key, b, demand))
        return due

    def _settle_offsets(
        self, unread: Sequence[tuple[tuple[str, str], _Budget]], views: Sequence[BudgetView], n: int
    ) -> None:
        """Sets each budget's offset from its first reading of the board this period.

        - This host has an entry and the table is the one this process carried into: a
          restarted server. Its earlier incarnation spent at most that entry's `held`; the
          table counts what LimitSync carried (everybody's usage in the database) instead.
        - It has an entry, the table is older (worker 1 restarted): the entry's own offset.
        - No entry, a carried table: the carry counts the others' usage, which the board has
          in their entries: as much of it as they report is not this host's.
        - Otherwise the table counts only this host's usage: 0.
        Then a budget below the start floor (its table counts more than this host spent) claims
        the floor, to be raised to it at once."""
        assert self.board is not None
        me = self.board.host_id
        carried = self.carried() if self.carried is not None else None
        with self._lock:
            for (key, b), view in zip(unread, views, strict=True):
                fresh = carried is not None and carried[0] == b.period
                x = max(carried[1].get(key[0], 0), 0) if carried is not None and fresh else 0
                own = view.entries.get(me)
                if own is not None:
                    o = x - own.held if fresh else (view.offset or 0)
                    b.on_board = True
                elif fresh:
                    o = min(x, sum(max(e.used, 0) for h, e in view.entries.items() if h != me))
                else:
                    o = 0
                b.offset = o
                start = period_floor(b.total, n)
                if b.local - o < start:
                    b.want = max(b.want or 0, start)

    def _budget_report(
        self, key: tuple[str, str], b: _Budget, demand: int | None, charged: int, n: int
    ) -> BudgetReport:
        """This host's word on a budget: its demand, and (when it has anything to say beyond
        'untouched, at the start floor') its entry: used, claim (the most it will hold in force
        until its next entry: its limit, or the raise it has due) and offset."""
        o = b.offset or 0
        used = b.used = max(charged - o, 0)
        local = b.local - o
        b.claimed = max(local, b.want if b.want is not None else local)
        entry = None
        if b.on_board or used > 0 or o != 0 or b.claimed != period_floor(b.total, n):
            self._seq = max(self._seq + 1, time.time_ns() // 1000)
            entry = (self._seq, used, b.claimed, o)
            b.on_board = True  # sent: it may be applied
        # Kept a day past the period's end: a late host still reads the whole period.
        return BudgetReport(_budget_name(key, b), demand, entry, (b.period + 2) * 86_400_000)

    def _apply_budgets(
        self,
        due: Sequence[tuple[tuple[str, str], _Budget, int | None]],
        sent: Sequence[BudgetReport],
        view: BoardView,
        now: float,
        n: int,
    ) -> None:
        """Moves each synced budget toward its target: a cut at once; a raise only up to the
        claim this sync sent and to what the others' entries leave (budget_cap)."""
        assert self.board is not None
        me = self.board.host_id
        with self._lock:
            for (key, b, _), rep, bv in zip(due, sent, view.budgets, strict=True):
                b.synced_at = now
                b.charged = self._seen[key[0]].tokens if key[0] in self._seen else 0
                if self._budgets.get(key) is not b or b.offset is None:
                    continue  # a new period or total meanwhile: the next tick decides
                split = budget_targets(b.total, n, view.present, bv.demands, bv.entries)
                target = split.targets.get(me, 0)
                if rep.demand is not None:  # a reporter takes its share a slice at a time
                    target = min(target, b.used + max(rep.demand, split.floor))
                cap = budget_cap(b.total, n, view.present, bv.entries, me)
                local = b.local - b.offset
                new = local
                if target < local:
                    new = target
                elif target > local:
                    new = max(local, min(target, b.claimed, cap))
                b.want = target if target > new else None
                b.floor = split.floor
                self._write_budget(key, max(new + b.offset, 0))

    def _static_budgets(self, budgets: Mapping[tuple[str, str], _Budget], *, keep: bool) -> None:
        """Without the board: floor(B / N) of the most hosts seen this period (a host going
        does not raise the others: it may have spent its part). A budget the board may count
        (this host's entry is there, or its stamp has not expired: `keep`) is only cut."""
        with self._lock:
            for key, b in budgets.items():
                if self._budgets.get(key) is not b:
                    continue
                static = max(static_share(b.total, b.n_max) + (b.offset or 0), 0)
                b.want = None
                self._write_budget(key, min(b.local, static) if keep or b.on_board else static)

    def _write_budget(self, key: tuple[str, str], value: int) -> None:
        self._budgets[key].local = value
        self.quota.set_limits(key[0], **{key[1]: value})

    # -- rates ---------------------------------------------------------------------------------

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
            budgets = list(self._budgets.values())
        reporting = sum(1 for lim in limits if lim.reporting)
        return {
            "coordinated": int(self.coordinated),
            "hosts": self.n,
            "limits": len(limits),
            "reporting": reporting,
            "budgets": len(budgets),
            "budgets_reporting": sum(1 for b in budgets if b.reporting),
            "syncs": self.syncs,
            "failures": self.failures,
        }

    def shares(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(account, kind) -> (total R, this host's local limit), rates only."""
        with self._lock:
            return {k: (lim.total, lim.local) for k, lim in self._limits.items()}

    def budget_shares(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(account, kind) -> (total B, this host's local limit for the current period)."""
        with self._lock:
            return {k: (b.total, b.local) for k, b in self._budgets.items()}


def _budget_name(key: tuple[str, str], b: _Budget) -> str:
    """A budget's board name: one board per period, so a new period starts from nothing."""
    return f"{key[0]}:{key[1]}@{b.period}"
