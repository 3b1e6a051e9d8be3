"""The budget lease coordinator: gateway hosts lease slices of a budget from the database.

Several hosts enforce one budget (issue 13, ../shared/design/scaleout.md): each admits requests
locally, within the slices it holds, and leases more here. A *pot* (`budget_pots`) is one budget
in one unit (tokens or nanos, integers): `cap` is what may be spent, `granted` what open leases
hold, `spent_unposted` what hosts have spent (or may have: an expired lease) that settlement has
not yet posted to the ledger. The invariant, checked by `check` and `tokenhub billing check`:

    granted + spent_unposted <= cap            for every pot
    granted == the sum of its open leases' amounts

- `grant(id, pot, host, want, minimum, ttl_ms)`: one transaction holding the pot's row lock;
  grants min(want, cap - granted - spent_unposted) if that is at least `minimum` (and above 0),
  else 0 (a refusal, kept too). The lease id is the idempotency key: a known id returns the
  stored grant and changes nothing, so a grant whose reply was lost is retried with the same id
  and applied once.
- `give_back(id, used)`: idempotent; `used` moves to `spent_unposted`, the rest is free again.
- `expire(now_ms)`: an open lease past its `expires_at` counts as fully spent (its amount moves
  from `granted` to `spent_unposted`) until its host gives it back (then only `used` stays
  spent) or it is written off: a dead host can strand capacity but never cause an overspend.

Every change takes the pot's row lock first (`SELECT ... FOR UPDATE`; `expire` takes them in
pot order), then the lease rows, so two calls never deadlock and never both see the same room.
Concurrent hosts need PostgreSQL; on SQLite (one writer at a time) the same code runs for one
host and for `tokenhub billing check`.

Not here yet: settlement reducing `spent_unposted` and recomputing `cap` from the ledger in the
posting's transaction, write-off of expired leases, batched grants per tick.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tokenhub.db.database import Database, Tx

OPEN = "open"
EXPIRED = "expired"
RETURNED = "returned"
REFUSED = "refused"


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


@dataclass(frozen=True, slots=True)
class Pot:
    pot: str
    tenant: str
    unit: str
    cap: int
    granted: int
    spent_unposted: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _int(name: str, value: int) -> int:
    if type(value) is not int or value < 0:
        raise LeaseError(f"{name} must be a non-negative integer, not {value!r}")
    return value


_LEASE = "SELECT id, pot, host, amount, used, state, expires_at FROM budget_leases WHERE id = $1"
_POT = "SELECT pot, tenant, unit, cap, granted, spent_unposted FROM budget_pots WHERE pot = $1"


async def _lease(tx: Tx, lease_id: str, *, lock: bool = False) -> Lease | None:
    row = await tx.fetchrow(_LEASE + (tx.for_update if lock else ""), lease_id)
    return None if row is None else Lease(*row)


async def _pot(tx: Tx, pot: str, *, lock: bool = False) -> Pot | None:
    row = await tx.fetchrow(_POT + (tx.for_update if lock else ""), pot)
    return None if row is None else Pot(*row)


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


async def grant(
    tx: Tx,
    lease_id: str,
    pot: str,
    host: str,
    want: int,
    minimum: int,
    ttl_ms: int,
    *,
    now_ms: int | None = None,
) -> Lease:
    """Grants a lease of min(want, room) if that is >= `minimum` and > 0, else a refusal
    (amount 0, state refused). A known `lease_id` returns the stored lease (replay-safe);
    reused for another pot or host, it is refused with LeaseError."""
    _int("want", want)
    _int("minimum", minimum)
    _int("ttl_ms", ttl_ms)
    if minimum > want:
        raise LeaseError(f"minimum ({minimum}) is more than want ({want})")
    locked = await _pot(tx, pot, lock=True)
    # Read after the pot's lock: a concurrent grant of the same id has committed or not started.
    known = await _lease(tx, lease_id)
    if known is not None:
        if (known.pot, known.host) != (pot, host):
            raise LeaseError(
                f"lease {lease_id!r} was asked for by {known.host!r} on pot {known.pot!r}"
            )
        return known
    if locked is None:
        raise LeaseError(f"no pot {pot!r}")
    now = _now_ms() if now_ms is None else now_ms
    room = locked.cap - locked.granted - locked.spent_unposted
    amount = min(want, max(room, 0))
    if amount == 0 or amount < minimum:
        amount, state = 0, REFUSED
    else:
        state = OPEN
    await tx.execute(
        "INSERT INTO budget_leases (id, pot, host, amount, used, state, expires_at, created_ms, "
        "closed_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        lease_id,
        pot,
        host,
        amount,
        None if state == OPEN else 0,
        state,
        now + ttl_ms,
        now,
        None if state == OPEN else now,
    )
    if amount:
        await tx.execute(
            "UPDATE budget_pots SET granted = granted + $2, updated_ms = $3 WHERE pot = $1",
            pot,
            amount,
            now,
        )
    return Lease(lease_id, pot, host, amount, None if state == OPEN else 0, state, now + ttl_ms)


async def give_back(tx: Tx, lease_id: str, used: int, *, now_ms: int | None = None) -> Lease:
    """Closes a lease: `used` stays spent (unposted), the rest is free again. Giving back a
    returned lease with the same `used` changes nothing and returns it; another `used` is
    refused (LeaseError)."""
    _int("used", used)
    first = await _lease(tx, lease_id)
    if first is None:
        raise LeaseError(f"no lease {lease_id!r}")
    await _pot(tx, first.pot, lock=True)
    lease = await _lease(tx, lease_id, lock=True)
    assert lease is not None
    if lease.state in (RETURNED, REFUSED):
        if lease.used != used:
            raise LeaseError(
                f"lease {lease_id!r} was already given back with used={lease.used}, not {used}"
            )
        return lease
    if used > lease.amount:
        raise LeaseError(f"used ({used}) is more than lease {lease_id!r} holds ({lease.amount})")
    now = _now_ms() if now_ms is None else now_ms
    if lease.state == OPEN:
        await tx.execute(
            "UPDATE budget_pots SET granted = granted - $2, spent_unposted = spent_unposted + $3, "
            "updated_ms = $4 WHERE pot = $1",
            lease.pot,
            lease.amount,
            used,
            now,
        )
    else:  # expired: all of it was counted spent, only `used` stays so
        await tx.execute(
            "UPDATE budget_pots SET spent_unposted = spent_unposted - $2, updated_ms = $3 "
            "WHERE pot = $1",
            lease.pot,
            lease.amount - used,
            now,
        )
    await tx.execute(
        "UPDATE budget_leases SET state = $2, used = $3, closed_ms = $4 WHERE id = $1",
        lease_id,
        RETURNED,
        used,
        now,
    )
    return Lease(lease.id, lease.pot, lease.host, lease.amount, used, RETURNED, lease.expires_at)


async def expire(tx: Tx, now_ms: int | None = None) -> int:
    """Marks every open lease whose `expires_at` <= now expired and counts its whole amount
    as spent. Returns how many leases expired."""
    now = _now_ms() if now_ms is None else now_ms
    pots = await tx.fetch(
        "SELECT DISTINCT pot FROM budget_leases WHERE state = 'open' AND expires_at <= $1 "
        "ORDER BY pot",
        now,
    )
    n = 0
    for (name,) in pots:
        await _pot(tx, name, lock=True)
        row = await tx.fetchrow(
            "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM budget_leases "
            "WHERE pot = $1 AND state = 'open' AND expires_at <= $2",
            name,
            now,
        )
        assert row is not None
        count, total = int(row[0]), int(row[1])
        if not count:
            continue
        await tx.execute(
            "UPDATE budget_leases SET state = 'expired' "
            "WHERE pot = $1 AND state = 'open' AND expires_at <= $2",
            name,
            now,
        )
        await tx.execute(
            "UPDATE budget_pots SET granted = granted - $2, spent_unposted = spent_unposted + $2, "
            "updated_ms = $3 WHERE pot = $1",
            name,
            total,
            now,
        )
        n += count
    return n


async def check(tx: Tx) -> list[str]:
    """The lease invariant's violations, one line each (empty: every pot is sound)."""
    problems = []
    for name, cap, granted, unposted in await tx.fetch(
        "SELECT pot, cap, granted, spent_unposted FROM budget_pots "
        "WHERE granted + spent_unposted > cap OR granted < 0 OR spent_unposted < 0 ORDER BY pot"
    ):
        problems.append(
            f"budget pot {name}: granted {granted} + spent_unposted {unposted} = "
            f"{granted + unposted} exceeds cap {cap}"
            if granted >= 0 and unposted >= 0
            else f"budget pot {name}: negative granted {granted} or spent_unposted {unposted}"
        )
    for name, granted, held in await tx.fetch(
        "SELECT p.pot, p.granted, COALESCE(SUM(l.amount), 0) FROM budget_pots p "
        "LEFT JOIN budget_leases l ON l.pot = p.pot AND l.state = 'open' "
        "GROUP BY p.pot, p.granted HAVING p.granted <> COALESCE(SUM(l.amount), 0) ORDER BY p.pot"
    ):
        problems.append(f"budget pot {name}: granted {granted} but its open leases hold {held}")
    return problems


class Coordinator:
    """The calls above, each in its own transaction on `db`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def set_pot(self, pot: str, tenant: str, unit: str, cap: int) -> Pot:
        return await self.db.transaction(lambda tx: set_pot(tx, pot, tenant, unit, cap))

    async def get_pot(self, name: str) -> Pot | None:
        return await self.db.read(lambda tx: get_pot(tx, name))

    async def grant(
        self,
        lease_id: str,
        pot: str,
        host: str,
        want: int,
        minimum: int,
        ttl_ms: int,
        *,
        now_ms: int | None = None,
    ) -> Lease:
        return await self.db.transaction(
            lambda tx: grant(tx, lease_id, pot, host, want, minimum, ttl_ms, now_ms=now_ms)
        )

    async def give_back(self, lease_id: str, used: int, *, now_ms: int | None = None) -> Lease:
        return await self.db.transaction(lambda tx: give_back(tx, lease_id, used, now_ms=now_ms))

    async def expire(self, now_ms: int | None = None) -> int:
        return await self.db.transaction(lambda tx: expire(tx, now_ms))

    async def check(self) -> list[str]:
        return await self.db.read(check)
