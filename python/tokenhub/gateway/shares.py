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
"""

from __future__ import annotations

from collections.abc import Mapping

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
