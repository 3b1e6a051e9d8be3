"""The budget lease coordinator: gateway hosts lease slices of a budget from the database.

Several hosts enforce one budget (issue 13, ../shared/design/scaleout.md): each admits requests
locally, within the slices it holds, and leases more here. A *pot* (`budget_pots`) is one budget
in one unit (tokens or money nanos, integers), named as in the gateway's quota table
(`pot:m:<tenant>`, `pot:t:<lot>`, `pot:p:<lot>`: tokenhub.billing.pots). A host *instance* is
one incarnation of a host ("<host id>/<epoch>": a restarted host is a new instance). Per pot:

- `cap`: the ledger's available balance for the pot (`set_caps`, from settlement);
- `granted`: the sum of the amounts of its OPEN leases;
- `spent_unposted`: what hosts may have spent that settlement has not posted yet, from
  `budget_usage` (per pot and instance: `used`, what the instance's closed leases spent, and
  `posted`, what settlement posted of its events' charges): the sum over instances i of
  max(used_i - posted_i, -open_i), open_i being what i's open leases hold.

The invariant, checked by `check` and `tokenhub billing check`:

    granted + spent_unposted <= cap                       for every pot
    granted == the sum of its open leases' amounts
    spent_unposted == that sum over its instances

Why not max(0, used_i - posted_i): a host's pool is fungible, and settlement posts its charges
while the lease that paid for them is still open; the charge then leaves `cap` (the ledger
debited it) and sits in `granted` too. Instance i can still spend at most
open_i + used_i - posted_i (its local pool's limit minus what is posted), so that, floored at 0,
is its exposure, and granted + spent_unposted is the sum of the exposures. Clamping at 0 would
count the posted part of an open lease twice (a refused grant, and a pot reported broken at
every commit where a host had leased the whole budget). The floor at -open_i keeps an overrun
(a host that charged more than it leased, posted) from handing room to the others.

Calls (each one transaction's worth of work on a `Tx`; `Coordinator` runs each in its own):

- `grant(id, pot, host, want, minimum, ttl_ms, instance=)`: room = cap - granted -
  spent_unposted; grants min(want, max(minimum, room // 2)) if that is at least `minimum`, above
  0 and within room (a host takes at most half of what is left unless one request needs more),
  else 0 (a refusal, kept too). The lease id is the idempotency key: a known id returns the
  stored lease and changes nothing, so a grant whose reply was lost is retried with the same id
  and applied once.
- `give_back(id, used)`: idempotent; an open lease's `used` moves to the instance's usage, the
  rest is free again; an expired one (counted fully used) keeps only `used`. A written-off
  lease is returned as it is (its instance's usage was reconciled from its events).
- `expire(now_ms)`: an open lease past its `expires_at` counts as fully used until its host
  gives it back or it is written off: a dead host can strand capacity, never cause an overspend.
- `post(charges)`: settlement, in the transaction that posts a batch, adds each event's
  charges (pot, instance, amount) to `posted`; `set_caps(caps)`: the pots' caps from the ledger,
  in the same transaction, so that a pot equals the ledger at every commit.
- `reconcile(instance)`: an instance that is gone (a restarted host's previous incarnation, or
  one silent past the write-off window): its open and expired leases are written off and its
  usage becomes exactly what its events charged, posted + pending (its events not settled
  yet). `write_off(window_ms)`: reconciles every instance whose newest lease expired more than
  the window ago and that still has expired leases.
- `batch(grants, give_backs)`: a host's tick, one transaction: every pot locked first in pot
  order, give-backs then grants; an item refused as given (LeaseError) is reported in its
  place and changes nothing, the others apply.

Every change takes the row locks of the pots it touches first (`SELECT ... FOR UPDATE`, in pot
order when there are several), then the lease rows, so two calls never deadlock and never both
see the same room. Each call then recomputes the touched pots' `granted` and `spent_unposted`
from `budget_leases` and `budget_usage` in one statement (`_REFRESH`), so they cannot drift.
Settlement takes its tenants' ledger locks before the pots (tokenhub.billing.settler), and
nothing here takes a ledger lock. Concurrent hosts need PostgreSQL; on SQLite (one writer at a
time) the same code runs for one host and for `tokenhub billing check`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenhub.db.database import Database, Tx

OPEN = "open"
EXPIRED = "expired"
RETURNED = "returned"
REFUSED = "refused"
WRITTEN_OFF = "written_off"
WRITE_OFF_MS = 600_000  # default write-off window ([cluster] write_off_s)
_CHUNK = 500  # pots or ids per IN (...) list


class LeaseError(ValueError):
    """A lease call that cannot be applied as given (unknown pot or lease, an id reused with
    other arguments, amounts out of range). Nothing was changed."""


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    pot: str
    host: str
    amount: int
    used: int | None
    state: str
    expires_at: int
    instance: str = ""


@dataclass(frozen=True, slots=True)
class Pot:
    pot: str
    tenant: str
    unit: str
    cap: int
    granted: int
    spent_unposted: int


@dataclass(frozen=True, slots=True)
class Ask:
    """One grant of a `batch` (the arguments of `grant`)."""

    lease_id: str
    pot: str
    host: str
    want: int
    minimum: int
    ttl_ms: int
    instance: str


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _int(name: str, value: int) -> int:
    if type(value) is not int or value < 0:
        raise LeaseError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def _marks(n: int, start: int = 1) -> str:
    return ",".join(f"${i}" for i in range(start, start + n))


def _in(tx: Tx, column: str, values: Sequence[str], start: int = 1) -> tuple[str, list[Any]]:
    """`column` is one of `values`: one array parameter on PostgreSQL (one plan whatever the
    count), a list of them on SQLite."""
    if tx.dialect == "postgresql":
        return f"{column} = ANY(${start}::text[])", [list(values)]
    return f"{column} IN ({_marks(len(values), start)})", list(values)


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


_LEASE_COLS = "id, pot, host, amount, used, state, expires_at, instance"
_POT_COLS = "pot, tenant, unit, cap, granted, spent_unposted"
_POT = f"SELECT {_POT_COLS} FROM budget_pots WHERE pot = $1"

# What a pot's granted and spent_unposted are, from the leases and the usage (see the module
# docstring), for the budget_pots row in scope; `_REFRESH` stores them, `check` compares.
_OPEN_SUM = (
    "(SELECT COALESCE(SUM(l.amount), 0) FROM budget_leases l "
    "WHERE l.pot = budget_pots.pot AND l.state = 'open')"
)
_UNPOSTED_SUM = (
    "COALESCE((SELECT SUM(CASE WHEN d.owed + d.held > 0 THEN d.owed ELSE -d.held END) FROM "
    "(SELECT u.used - u.posted AS owed, COALESCE((SELECT SUM(l.amount) FROM budget_leases l "
    "WHERE l.pot = u.pot AND l.instance = u.instance AND l.state = 'open'), 0) AS held "
    "FROM budget_usage u WHERE u.pot = budget_pots.pot) d), 0)"
)
_REFRESH = (
    f"UPDATE budget_pots SET granted = {_OPEN_SUM}, spent_unposted = {_UNPOSTED_SUM}, "
    "updated_ms = $1 WHERE {where} RETURNING " + _POT_COLS
)
# Adds to an instance's usage of a pot (creating the row).
_USAGE_ADD = (
    "INSERT INTO budget_usage (pot, instance, host, used, posted, updated_ms) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (pot, instance) DO UPDATE SET "
    "used = budget_usage.used + excluded.used, posted = budget_usage.posted + excluded.posted, "
    "updated_ms = excluded.updated_ms"
)


def host_of(instance: str) -> str:
    """The host id of an instance "<host id>/<epoch>"."""
    return instance.split("/", 1)[0]


async def _pot(tx: Tx, pot: str, *, lock: bool = False) -> Pot | None:
    row = await tx.fetchrow(_POT + (tx.for_update if lock else ""), pot)
    return None if row is None else Pot(*row)


async def lock_pots(tx: Tx, pots: Iterable[str]) -> dict[str, Pot]:
    """Takes the row locks of these pots in pot order (those that exist); returns them. Every
    call here that touches several pots takes them so, first."""
    names = sorted(set(pots))
    out: dict[str, Pot] = {}
    for chunk in _chunks(names):
        where, args = _in(tx, "pot", chunk)
        for row in await tx.fetch(
            f"SELECT {_POT_COLS} FROM budget_pots WHERE {where} ORDER BY pot{tx.for_update}",
            *args,
        ):
            out[row[0]] = Pot(*row)
    return out


async def _refresh(tx: Tx, pots: Iterable[str], now: int) -> dict[str, Pot]:
    """Recomputes the pots' granted and spent_unposted (their locks are held); returns them."""
    out: dict[str, Pot] = {}
    for chunk in _chunks(sorted(set(pots))):
        where, args = _in(tx, "pot", chunk, 2)
        for row in await tx.fetch(_REFRESH.format(where=where), now, *args):
            out[row[0]] = Pot(*row)
    return out


async def _add_usage(
    tx: Tx, pot: str, instance: str, now: int, *, used: int = 0, posted: int = 0
) -> None:
    await tx.execute(_USAGE_ADD, pot, instance, host_of(instance), used, posted, now)


async def set_pot(tx: Tx, pot: str, tenant: str, unit: str, cap: int) -> Pot:
    """Creates the pot or sets its cap (what settlement will recompute from the ledger)."""
    _int("cap", cap)
    now = _now_ms()
    current = await _pot(tx, pot, lock=True)
    if current is None:
        await tx.execute(
            "INSERT INTO budget_pots (pot, tenant, unit, cap, granted, spent_unposted, "
            "updated_ms) VALUES ($1, $2, $3, $4, 0, 0, $5)",
            pot,
            tenant,
            unit,
            cap,
            now,
        )
    elif (current.tenant, current.unit) != (tenant, unit):
        raise LeaseError(f"pot {pot!r} belongs to {current.tenant!r} in {current.unit!r}")
    else:
        await tx.execute(
            "UPDATE budget_pots SET cap = $2, updated_ms = $3 WHERE pot = $1", pot, cap, now
        )
    found = await _pot(tx, pot)
    assert found is not None
    return found


async def get_pot(tx: Tx, name: str) -> Pot | None:
    return await _pot(tx, name)


async def set_caps(
    tx: Tx, caps: Mapping[str, tuple[str, str, int]], *, now_ms: int | None = None
) -> int:
    """Sets each pot's cap: `caps` maps pot -> (tenant, unit, cap); a pot that does not exist
    yet is created with them (an existing one keeps its tenant and unit). Writes only what
    changed; returns how many pots it wrote. Settlement calls it after its ledger reads, under
    its tenants' ledger locks (tokenhub.billing.settler)."""
    for pot, (_, _, cap) in caps.items():
        _int(f"cap of {pot}", cap)
    now = _now_ms() if now_ms is None else now_ms
    current = await lock_pots(tx, caps)
    rows = [
        (pot, tenant, unit, cap, now)
        for pot, (tenant, unit, cap) in sorted(caps.items())
        if pot not in current or current[pot].cap != cap
    ]
    if rows:
        await tx.executemany(
            "INSERT INTO budget_pots (pot, tenant, unit, cap, granted, spent_unposted, "
            "updated_ms) VALUES ($1, $2, $3, $4, 0, 0, $5) ON CONFLICT (pot) DO UPDATE SET "
            "cap = excluded.cap, updated_ms = excluded.updated_ms",
            rows,
        )
    return len(rows)


async def grant(
    tx: Tx,
    lease_id: str,
    pot: str,
    host: str,
    want: int,
    minimum: int,
    ttl_ms: int,
    *,
    instance: str,
    now_ms: int | None = None,
) -> Lease:
    """Grants a lease of min(want, max(minimum, room // 2)) if that is >= `minimum`, > 0 and
    within the room, else a refusal (amount 0, state refused). A known `lease_id` returns the
    stored lease (replay-safe); reused for another pot, host or instance, it is refused with
    LeaseError."""
    ask = Ask(lease_id, pot, host, want, minimum, ttl_ms, instance)
    (out,), _ = await batch(tx, [ask], now_ms=now_ms)
    if isinstance(out, LeaseError):
        raise out
    return out


async def give_back(tx: Tx, lease_id: str, used: int, *, now_ms: int | None = None) -> Lease:
    """Closes a lease: `used` stays spent (unposted, on its instance's usage), the rest is free
    again. Giving back a returned lease with the same `used` changes nothing and returns it;
    another `used` is refused (LeaseError). A written-off lease is returned unchanged."""
    _, (out,) = await batch(tx, give_backs=[(lease_id, used)], now_ms=now_ms)
    if isinstance(out, LeaseError):
        raise out
    return out


async def expire(tx: Tx, now_ms: int | None = None) -> int:
    """Marks every open lease whose `expires_at` <= now expired and counts its whole amount
    as used by its instance. Returns how many leases expired."""
    now = _now_ms() if now_ms is None else now_ms
    due = [
        name
        for (name,) in await tx.fetch(
            "SELECT DISTINCT pot FROM budget_leases WHERE state = 'open' AND expires_at <= $1",
            now,
        )
    ]
    if not due:
        return 0
    await lock_pots(tx, due)
    n = 0
    for name in sorted(due):
        rows = await tx.fetch(
            "SELECT instance, COUNT(*), SUM(amount) FROM budget_leases "
            "WHERE pot = $1 AND state = 'open' AND expires_at <= $2 GROUP BY instance",
            name,
            now,
        )
        if not rows:
            continue
        await tx.execute(
            "UPDATE budget_leases SET state = 'expired' "
            "WHERE pot = $1 AND state = 'open' AND expires_at <= $2",
            name,
            now,
        )
        for instance, count, total in rows:
            await _add_usage(tx, name, instance, now, used=int(total))
            n += int(count)
    await _refresh(tx, due, now)
    return n


async def post(
    tx: Tx, charges: Iterable[tuple[str, str, int]], *, now_ms: int | None = None
) -> int:
    """Settlement posted these charges (pot, instance, amount): each adds to the instance's
    `posted` on the pot. Pots that do not exist are skipped (no host leases them: nothing to
    account). Returns the total posted. Call it in the transaction that posts the events."""
    sums: dict[tuple[str, str], int] = {}
    for pot, instance, amount in charges:
        _int(f"charge on {pot}", amount)
        if amount:
            sums[(pot, instance)] = sums.get((pot, instance), 0) + amount
    if not sums:
        return 0
    now = _now_ms() if now_ms is None else now_ms
    found = await lock_pots(tx, (pot for pot, _ in sums))
    total = 0
    for (pot, instance), amount in sorted(sums.items()):
        if pot in found:
            await _add_usage(tx, pot, instance, now, posted=amount)
            total += amount
    await _refresh(tx, found, now)
    return total


def parse_holds(holds: str) -> tuple[str, list[tuple[str, int]]] | None:
    """A cluster hold "@<instance>|pot=amount;..." as (instance, [(pot, amount), ...]); None
    for any other (a single host's "<epoch>|...", or nothing held)."""
    if not holds.startswith("@"):
        return None
    instance, sep, rest = holds[1:].partition("|")
    if not sep:
        return None
    out: list[tuple[str, int]] = []
    for part in rest.split(";"):
        pot, _, amount = part.rpartition("=")
        if pot and amount.isdigit():
            out.append((pot, int(amount)))
    return instance, out


async def _instance_pots(tx: Tx, instance: str) -> set[str]:
    """The pots an instance can have charged: a charge needs a lease on its pot, so those of
    its leases (any state) and of its usage rows."""
    return {
        p
        for (p,) in await tx.fetch(
            "SELECT DISTINCT pot FROM budget_leases WHERE instance = $1 UNION "
            "SELECT pot FROM budget_usage WHERE instance = $1",
            instance,
        )
    }


async def reconcile(tx: Tx, instance: str, *, now_ms: int | None = None) -> int:
    """Settles the accounts of an instance that is gone: its open and expired leases become
    written off (what they hold is no longer out), and its usage of every pot becomes posted +
    pending, pending being what its events not settled yet charged on the pot (their holds).
    Idempotent; returns how many leases it wrote off. Only for an instance that will charge no
    more: a live one's open leases would be taken from under it."""
    now = _now_ms() if now_ms is None else now_ms
    pots = await _instance_pots(tx, instance)
    if not pots:
        return 0
    found = await lock_pots(tx, pots)
    written = await tx.execute(
        "UPDATE budget_leases SET state = $2, closed_ms = $3 "
        "WHERE instance = $1 AND state IN ('open', 'expired')",
        instance,
        WRITTEN_OFF,
        now,
    )
    # Read under the pot locks: a settlement posting this instance's charges has either
    # committed (posted, and its events are settled) or not (they are pending here, and it
    # adds them to `posted` once it has the locks).
    pending: dict[str, int] = {}
    prefix = f"@{instance}|"
    for (holds,) in await tx.fetch(
        "SELECT e.holds FROM usage_events e WHERE e.settled_ms IS NULL "
        "AND substr(e.holds, 1, $2) = $1 "
        "AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.event_id = e.request_id)",
        prefix,
        len(prefix),
    ):
        parsed = parse_holds(holds)
        if parsed is not None and parsed[0] == instance:
            for pot, amount in parsed[1]:
                pending[pot] = pending.get(pot, 0) + amount
    for pot in sorted(found):
        await tx.execute(
            "INSERT INTO budget_usage (pot, instance, host, used, posted, updated_ms) "
            "VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (pot, instance) DO UPDATE SET "
            "used = budget_usage.posted + excluded.used, updated_ms = excluded.updated_ms",
            pot,
            instance,
            host_of(instance),
            pending.get(pot, 0),
            now,
        )
    await _refresh(tx, found, now)
    # What it charged is all posted: its rows count 0 now and forever (a late posting makes a
    # row again, floored at 0), and every refresh of their pots would read them.
    await tx.execute("DELETE FROM budget_usage WHERE instance = $1 AND used = posted", instance)
    return written


async def write_off(tx: Tx, window_ms: int = WRITE_OFF_MS, now_ms: int | None = None) -> list[str]:
    """Reconciles every instance that still has expired leases and whose newest lease (any
    state) expired more than `window_ms` ago: a host silent that long is taken as gone.
    Returns those instances."""
    now = _now_ms() if now_ms is None else now_ms
    # Every instance with an expired lease has a usage row (expire made it): the usage table
    # is small, the leases table grows with every renewal.
    gone: list[str] = []
    for (instance,) in await tx.fetch(
        "SELECT DISTINCT u.instance FROM budget_usage u WHERE EXISTS (SELECT 1 FROM "
        "budget_leases l WHERE l.instance = u.instance AND l.state = 'expired') ORDER BY 1"
    ):
        newest = await tx.fetchval(
            "SELECT MAX(expires_at) FROM budget_leases WHERE instance = $1", instance
        )
        if newest is not None and int(newest) <= now - window_ms:
            gone.append(instance)
    if gone:
        # All their pots locked first, in pot order (each reconcile would lock only its own).
        await lock_pots(tx, [p for instance in gone for p in await _instance_pots(tx, instance)])
    for instance in gone:
        await reconcile(tx, instance, now_ms=now)
    return gone


async def batch(
    tx: Tx,
    grants: Sequence[Ask] = (),
    give_backs: Sequence[tuple[str, int]] = (),
    *,
    now_ms: int | None = None,
) -> tuple[list[Lease | LeaseError], list[Lease | LeaseError]]:
    """A host's tick in one transaction: the give-backs (lease id, used), then the grants
    (`grant` and `give_back` are a batch of one). Each item's result in its place: the lease,
    or the LeaseError that refused it (which changed nothing); the others apply.

    A handful of statements whatever the size: the pots locked in pot order, then the leases
    named (read after the pots' locks: a concurrent call with the same id has committed or
    not started), the give-backs written, their pots refreshed, the grants decided in order
    against each pot's room as the batch leaves it, written, their pots refreshed."""
    now = _now_ms() if now_ms is None else now_ms
    back_ids = sorted({lease_id for lease_id, _ in give_backs})
    pots = {a.pot for a in grants}
    for chunk in _chunks(back_ids):
        where, args = _in(tx, "id", chunk)
        pots.update(
            p for (p,) in await tx.fetch(f"SELECT pot FROM budget_leases WHERE {where}", *args)
        )
    locked = await lock_pots(tx, pots)
    known: dict[str, Lease] = {}
    for chunk in _chunks(sorted({*back_ids, *(a.lease_id for a in grants)})):
        where, args = _in(tx, "id", chunk)
        for row in await tx.fetch(
            f"SELECT {_LEASE_COLS} FROM budget_leases WHERE {where}{tx.for_update}", *args
        ):
            known[row[0]] = Lease(*row)

    backs: list[Lease | LeaseError] = []
    closes: list[tuple[str, int, int]] = []
    usage: dict[tuple[str, str], int] = {}
    for lease_id, used in give_backs:
        try:
            lease = _give_back_one(known.get(lease_id), lease_id, used)
        except LeaseError as e:
            backs.append(e)
            continue
        if lease is not known[lease_id]:  # it closes now
            old = known[lease_id]
            # Open: `used` becomes usage. Expired: all of it was counted used, only `used`
            # stays so.
            delta = used if old.state == OPEN else used - old.amount
            key = (lease.pot, lease.instance)
            usage[key] = usage.get(key, 0) + delta
            closes.append((lease_id, used, now))
            known[lease_id] = lease
        backs.append(lease)
    if closes:
        await tx.executemany(
            f"UPDATE budget_leases SET state = '{RETURNED}', used = $2, closed_ms = $3 "
            "WHERE id = $1",
            closes,
        )
        await tx.executemany(
            _USAGE_ADD,
            [(p, i, host_of(i), d, 0, now) for (p, i), d in sorted(usage.items())],
        )
        locked.update(await _refresh(tx, {p for p, _ in usage}, now))

    granted: list[Lease | LeaseError] = []
    inserts: list[tuple[Any, ...]] = []
    for a in grants:
        try:
            lease = _grant_one(known.get(a.lease_id), locked.get(a.pot), a, now)
        except LeaseError as e:
            granted.append(e)
            continue
        if a.lease_id not in known:
            known[a.lease_id] = lease
            inserts.append(
                (lease.id, lease.pot, lease.host, lease.amount, lease.used, lease.state,
                 lease.expires_at, now, None if lease.state == OPEN else now, lease.instance)
            )  # fmt: skip
            if lease.amount:
                p = locked[a.pot]
                locked[a.pot] = Pot(p.pot, p.tenant, p.unit, p.cap, p.granted + lease.amount,
                                    p.spent_unposted)  # fmt: skip
        granted.append(lease)
    if inserts:
        await tx.executemany(
            "INSERT INTO budget_leases (id, pot, host, amount, used, state, expires_at, "
            "created_ms, closed_ms, instance) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            inserts,
        )
        opened = {row[1] for row in inserts if row[3]}
        if opened:
            await _refresh(tx, opened, now)
    return granted, backs


def _give_back_one(lease: Lease | None, lease_id: str, used: int) -> Lease:
    """The lease once given back (the same object: nothing to change), or LeaseError."""
    _int("used", used)
    if lease is None:
        raise LeaseError(f"no lease {lease_id!r}")
    if lease.state == WRITTEN_OFF:
        return lease
    if lease.state in (RETURNED, REFUSED):
        if lease.used != used:
            raise LeaseError(
                f"lease {lease_id!r} was already given back with used={lease.used}, not {used}"
            )
        return lease
    if used > lease.amount:
        raise LeaseError(f"used ({used}) is more than lease {lease_id!r} holds ({lease.amount})")
    return Lease(lease.id, lease.pot, lease.host, lease.amount, used, RETURNED,
                 lease.expires_at, lease.instance)  # fmt: skip


def _grant_one(known: Lease | None, pot: Pot | None, a: Ask, now: int) -> Lease:
    """The stored lease of a known id, or the new lease (or refusal) from `pot`'s room."""
    _int("want", a.want)
    _int("minimum", a.minimum)
    _int("ttl_ms", a.ttl_ms)
    if a.minimum > a.want:
        raise LeaseError(f"minimum ({a.minimum}) is more than want ({a.want})")
    if known is not None:
        if (known.pot, known.host, known.instance) != (a.pot, a.host, a.instance):
            raise LeaseError(
                f"lease {a.lease_id!r} was asked for by {known.host!r} ({known.instance!r}) "
                f"on pot {known.pot!r}"
            )
        return known
    if pot is None:
        raise LeaseError(f"no pot {a.pot!r}")
    # A grant may lower spent_unposted (an instance's overrun is covered first), never raise
    # it: the room read before this batch's grants is never too large.
    room = pot.cap - pot.granted - pot.spent_unposted
    amount = min(a.want, max(a.minimum, room // 2))
    if amount <= 0 or amount < a.minimum or amount > room:
        return Lease(a.lease_id, a.pot, a.host, 0, 0, REFUSED, now + a.ttl_ms, a.instance)
    return Lease(a.lease_id, a.pot, a.host, amount, None, OPEN, now + a.ttl_ms, a.instance)


async def check(tx: Tx) -> list[str]:
    """The lease invariant's violations, one line each (empty: every pot is sound)."""
    problems = []
    for name, cap, granted, unposted in await tx.fetch(
        "SELECT pot, cap, granted, spent_unposted FROM budget_pots "
        "WHERE granted + spent_unposted > cap OR granted < 0 OR granted + spent_unposted < 0 "
        "ORDER BY pot"
    ):
        problems.append(
            f"budget pot {name}: granted {granted} + spent_unposted {unposted} = "
            f"{granted + unposted} exceeds cap {cap}"
            if granted >= 0 and granted + unposted >= 0
            else f"budget pot {name}: negative granted {granted} or granted + spent_unposted "
            f"{granted + unposted}"
        )
    for name, granted, held in await tx.fetch(
        f"SELECT pot, granted, {_OPEN_SUM} FROM budget_pots "
        f"WHERE granted <> {_OPEN_SUM} ORDER BY pot"
    ):
        problems.append(f"budget pot {name}: granted {granted} but its open leases hold {held}")
    for name, unposted, owed in await tx.fetch(
        f"SELECT pot, spent_unposted, {_UNPOSTED_SUM} FROM budget_pots "
        f"WHERE spent_unposted <> {_UNPOSTED_SUM} ORDER BY pot"
    ):
        problems.append(
            f"budget pot {name}: spent_unposted {unposted} but its hosts' usage says {owed}"
        )
    return problems


class Coordinator:
    """The calls above, each in its own transaction on `db`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def set_pot(self, pot: str, tenant: str, unit: str, cap: int) -> Pot:
        return await self.db.transaction(lambda tx: set_pot(tx, pot, tenant, unit, cap))

    async def get_pot(self, name: str) -> Pot | None:
        return await self.db.read(lambda tx: get_pot(tx, name))

    async def set_caps(self, caps: Mapping[str, tuple[str, str, int]]) -> int:
        return await self.db.transaction(lambda tx: set_caps(tx, caps))

    async def grant(
        self,
        lease_id: str,
        pot: str,
        host: str,
        want: int,
        minimum: int,
        ttl_ms: int,
        *,
        instance: str,
        now_ms: int | None = None,
    ) -> Lease:
        return await self.db.transaction(
            lambda tx: grant(
                tx, lease_id, pot, host, want, minimum, ttl_ms, instance=instance, now_ms=now_ms
            )
        )

    async def give_back(self, lease_id: str, used: int, *, now_ms: int | None = None) -> Lease:
        return await self.db.transaction(lambda tx: give_back(tx, lease_id, used, now_ms=now_ms))

    async def batch(
        self,
        grants: Sequence[Ask] = (),
        give_backs: Sequence[tuple[str, int]] = (),
        *,
        now_ms: int | None = None,
    ) -> tuple[list[Lease | LeaseError], list[Lease | LeaseError]]:
        return await self.db.transaction(lambda tx: batch(tx, grants, give_backs, now_ms=now_ms))

    async def expire(self, now_ms: int | None = None) -> int:
        return await self.db.transaction(lambda tx: expire(tx, now_ms))

    async def post(
        self, charges: Iterable[tuple[str, str, int]], *, now_ms: int | None = None
    ) -> int:
        items = list(charges)
        return await self.db.transaction(lambda tx: post(tx, items, now_ms=now_ms))

    async def reconcile(self, instance: str, *, now_ms: int | None = None) -> int:
        return await self.db.transaction(lambda tx: reconcile(tx, instance, now_ms=now_ms))

    async def write_off(
        self, window_ms: int = WRITE_OFF_MS, now_ms: int | None = None
    ) -> list[str]:
        return await self.db.transaction(lambda tx: write_off(tx, window_ms, now_ms))

    async def check(self) -> list[str]:
        return await self.db.read(check)
