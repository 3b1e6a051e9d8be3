"""Rate-limit shares across gateway hosts: how one limit R is split between N hosts (issue 13).

Pure integer arithmetic, no I/O: the Redis board that collects each host's demand lives in
`tokenhub.runtime.shares`, and every host runs the same computation on the same snapshot, so the
shares of one snapshot sum to at most R. Hosts read at slightly different times; between two
snapshots a share can move, which is the "share moved in one rebalance" bound of the design note
(../shared/design/scaleout.md).

- `fair_shares(R, demands)`: max-min fairness on the reported demands. Each host first gets
  min(demand, its water level); the level starts at floor(R/N) and only rises as hosts that
  want less leave their part to the others, so every host gets at least
  min(demand, floor(R/N)). What nobody asked for is then spread evenly over all hosts as
  headroom (a quiet host must be able to admit before its next report). The sum is R exactly
  when there is at least one host.
- `static_share(R, N)`: floor(R/N), what every host takes when the coordinator is absent or
  down. Never the whole R per host: N hosts x floor(R/N) <= R. With skewed load balancing this
  gives false refusals on the busy hosts, never an overrun.
- `quiet_share(R, N)`: what a host keeps on a limit it does not report on (its traffic there is
  far below its share): an eighth of the static share, at least 1 when that is. Hosts report
  only on limits near their share, so most limits of most hosts cost no coordination at all.
- `board_shares(R, N, present, demands)`: the split of one limit as a host reads it off the
  board. Of the N hosts, `demands` holds those reporting on this limit; the other hosts the
  board knows to be alive (`present`) are quiet and keep `quiet_share`; the hosts it does not
  see at all (N - present: cut off from the board, or not started yet) are assumed to take the
  static share, as a host that cannot reach the board does. The reporters split what is left
  with `fair_shares`, so the shares of every host of a snapshot sum to R at most.

Period budgets (a tenant's tokens per UTC day, B) are a stock, not a flow: what a host has
spent this period stays spent. Each host's board entry for a budget holds its `used` (spent
this period, by its own table) and its `claim` (the most it may hold in force until its next
entry), and lives for the whole period, so a host that dies or cannot reach the board still
counts with what it spent and may spend.

- `budget_targets(B, N, present, demands, entries)`: where the shares should be, as absolute
  limits (used + share) of every present host, and the quiet floor. The room is B minus the
  used of the present hosts, minus what each absent host with an entry may hold (max(used,
  claim)), minus floor(B/N) for every other unseen host (what a host without the board
  takes). Quiet hosts (present, not reporting demand) get `period_floor(room, N)` above their
  used; the reporters split the rest with `fair_shares` on their demands.
- `budget_cap(B, N, present, entries, me)`: the most `me` may hold now: B minus what every
  other host may hold (its claim or used, the start floor for a present host without an
  entry, floor(B/N) for an unseen one). A host raises only up to it, and only up to a claim
  the board has taken before it reads the others' claims (one atomic script call), so the
  limits in force never sum over B (see tokenhub.runtime.shares for the argument).
- `period_floor(room, N)`: the quiet share of what is left, rounded down to a power of two
  (it changes rarely, so quiet hosts rarely need to write their entry).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import NamedTuple

QUIET_PART = 8


def static_share(limit: int, hosts: int) -> int:
    """floor(limit / hosts): each host's share without a coordinator (0 for a limit <= 0)."""
    if hosts < 1:
        raise ValueError(f"hosts must be at least 1, got {hosts}")
    return max(limit, 0) // hosts


def quiet_share(limit: int, hosts: int) -> int:
    """A host's share of a limit it does not report on: static_share // QUIET_PART, at least 1
    when the static share is (0 for a limit under `hosts`)."""
    static = static_share(limit, hosts)
    return min(static, max(1, static // QUIET_PART))


def board_shares(
    limit: int, hosts: int, present: int, demands: Mapping[str, int]
) -> dict[str, int]:
    """The shares of the hosts in `demands` (those reporting on this limit) when the cluster
    has `hosts` hosts, `present` of which the board sees alive (reporters included).

    Quiet hosts (present, not reporting) keep `quiet_share`, unseen ones `static_share`; the
    reporters split the rest. Each reporter so gets at least min(demand, static share), and
    pool + quiet + unseen = `limit`. More reporters or present hosts than `hosts` (a wrong
    [cluster] hosts, or a host joining) count as hosts.
    """
    if not demands:
        return {}
    present = max(present, len(demands))
    hosts = max(hosts, present)
    pool = (
        max(limit, 0)
        - (present - len(demands)) * quiet_share(limit, hosts)
        - (hosts - present) * static_share(limit, hosts)
    )
    return fair_shares(pool, demands)


def fair_shares(limit: int, demands: Mapping[str, int]) -> dict[str, int]:
    """Each host's share of `limit` given the demand it reported (negative counts as 0).

    Deterministic in its inputs (ties go by host id), so hosts reading the same board agree.
    """
    if not demands:
        return {}
    limit = max(limit, 0)
    hosts = sorted(demands, key=lambda h: (max(demands[h], 0), h))
    shares: dict[str, int] = {}
    remaining = limit
    # Water-filling from the smallest demand up: the level remaining // left never falls.
    for i, host in enumerate(hosts):
        give = min(max(demands[host], 0), remaining // (len(hosts) - i))
        shares[host] = give
        remaining -= give
    # Headroom: what no host asked for, evenly, the odd units to the first hosts by id.
    each, odd = divmod(remaining, len(hosts))
    for i, host in enumerate(sorted(hosts)):
        shares[host] += each + (1 if i < odd else 0)
    return shares


# -- period budgets ------------------------------------------------------------------------------


class Entry(NamedTuple):
    """A host's word on one period budget: spent this period, and the most it may hold."""

    used: int
    claim: int

    @property
    def held(self) -> int:
        """What the host may have spent by the end of the period, as far as the board knows."""
        return max(self.used, self.claim, 0)


def period_floor(room: int, hosts: int) -> int:
    """`quiet_share(room, hosts)` rounded down to a power of two (0 for none)."""
    q = quiet_share(room, hosts)
    return 1 << (q.bit_length() - 1) if q > 0 else 0


def _census(
    budget: int, hosts: int, present: Collection[str], entries: Mapping[str, Entry]
) -> tuple[int, frozenset[str], list[str], int]:
    """(the cluster's size, the present hosts, the absent ones with an entry, the unseen
    hosts without one) of one budget's board."""
    seen = frozenset(present)
    away = sorted(h for h in entries if h not in seen)
    n = max(hosts, len(seen), 1)
    return n, seen, away, max(0, n - len(seen) - len(away))


class Split(NamedTuple):
    """One period budget's split as a host reads it off the board."""

    targets: dict[str, int]
    """The limits (used + share) the present hosts should hold."""
    floor: int
    """What a quiet host gets above its used (period_floor of the room)."""


def budget_targets(
    budget: int,
    hosts: int,
    present: Collection[str],
    demands: Mapping[str, int],
    entries: Mapping[str, Entry],
) -> Split:
    """Where the limits of the present hosts should be for a period budget of `budget`, when
    `demands` are the reporting hosts' demands (all present) and `entries` the board's entries
    of this period. With the absent hosts' `held` and floor(B/N) per unseen host they sum to
    `budget` at most (to what is already used, when that is more)."""
    n, seen, away, unseen = _census(budget, hosts, frozenset(present) | frozenset(demands), entries)
    total = max(budget, 0)

    def used(h: str) -> int:
        e = entries.get(h)
        return max(e.used, 0) if e is not None else 0

    room = (
        total
        - sum(used(h) for h in seen)
        - sum(entries[h].held for h in away)
        - unseen * static_share(total, n)
    )
    floor = period_floor(max(room, 0), n)
    quiet = [h for h in seen if h not in demands]
    pool = max(room - len(quiet) * floor, 0)
    out = {h: used(h) + floor for h in quiet}
    for h, share in fair_shares(pool, demands).items():
        out[h] = used(h) + share
    return Split(out, floor)


def budget_cap(
    budget: int,
    hosts: int,
    present: Collection[str],
    entries: Mapping[str, Entry],
    me: str,
) -> int:
    """The most host `me` may hold in force for a period budget: `budget` minus what every
    other host may (its entry's `held`; a present host without an entry holds at most the
    start floor, period_floor(B, N); an unseen one floor(B/N)). May be negative."""
    n, seen, away, unseen = _census(budget, hosts, frozenset(present) | {me}, entries)
    total = max(budget, 0)
    start = period_floor(total, n)
    others = 0
    for h in seen | frozenset(away):
        if h == me:
            continue
        e = entries.get(h)
        others += e.held if e is not None else start
    return total - others - unseen * static_share(total, n)
