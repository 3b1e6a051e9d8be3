"""The lease agent: one per host, in the host's settler process, leasing budget for the host.

In cluster mode (`[server] host_id` set, PostgreSQL, `[billing] admission`; issue 13,
../shared/design/scaleout.md) the local quota table's pot accounts hold LEASED capacity: a pot's
limit is what this host leased from the coordinator (`tokenhub.billing.leases`) and has not
given back, its used/held what this host's requests charged. Workers admit against it exactly as
on one host (`tokenhub.billing.pots.Contracts`); when a request finds the pool short, the worker
sends a *want* and waits (`[cluster] acquire_wait_ms`), and this agent leases more.

Files in the server's shared directory (`SharedState.metrics_dir`, one per `tokenhub serve`):

- `want.sock` (WANT_SOCKET): a UNIX datagram socket the agent binds; each datagram is one want,
  JSON `[tenant, model, ts_ms, [uncached, cached, output], want_id]` (want_id: the sender's
  wall clock in microseconds, which orders wants across workers).
- `leaser.json` (LEASER_JSON): the agent's figures, rewritten (atomically: a temporary file
  renamed over it) after every tick that changed something and at least every 5 s, for
  /metrics and `tokenhub cluster status`. Its fields (all present; times are wall-clock ms):

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

Not complete yet: the agent itself.
"""

from __future__ import annotations

from pathlib import Path

WANT_SOCKET = "want.sock"
LEASER_JSON = "leaser.json"


def want_path(shared_dir: str | Path) -> Path:
    return Path(shared_dir) / WANT_SOCKET


def leaser_path(shared_dir: str | Path) -> Path:
    return Path(shared_dir) / LEASER_JSON


def instance_of(host: str, epoch: int) -> str:
    """This host's incarnation: a restarted host has a new quota table, so a new epoch."""
    return f"{host}/{epoch}"
