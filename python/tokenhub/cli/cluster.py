"""`tokenhub cluster status`: the hosts serving on one database, and the state they share.

Each `tokenhub serve --host-id ID` writes its row in cluster_hosts every [server] heartbeat_s
seconds (tokenhub.runtime.cluster); a host silent for more than 3 of its own intervals is shown
`down`. Beside the hosts (heartbeat, workers, journal backlog) the status shows the coordinator
(the database: reachable, and how long the status query took), the budget pots with their open
leases, and the settlers' lag per tenant partition with the settler holding each partition
(`--partitions N`: the settlers' [cluster] partitions). All of it is read in one transaction
(tokenhub.runtime.cluster.read_status).

Exit status as tokenhub.cli's table: 0 every host is up (or none has beaten yet), 1 a host is
down or the database failed (with --json, the JSON still says which: its coordinator is not
reachable), 2 refused as given (a bad option, no such database).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from tokenhub.cli import EXIT_FAILED, EXIT_OK, CliError, Refused
from tokenhub.cli.admin import db_url, group_help
from tokenhub.db.database import DatabaseError, is_postgres, open_database, redacted
from tokenhub.runtime.cluster import (
    DOWN_AFTER_BEATS,
    ClusterStatus,
    age_ms,
    is_down,
    read_status,
)
from tokenhub.store import ENV_DB, HostBeat, StoreError, database_path

STATUS_TIMEOUT_S = 30.0  # connecting and reading, together


def _host_json(b: HostBeat, now: int) -> dict[str, Any]:
    return {
        "host_id": b.host_id,
        "state": "down" if is_down(b, now) else "up",
        "heartbeat_age_ms": age_ms(b, now),
        "heartbeat_ms": b.heartbeat_ms,
        "interval_ms": b.interval_ms,
        "started_ms": b.started_ms,
        "pid": b.pid,
        "workers": b.workers,
        "version": b.version,
        "journal_backlog": b.journal_backlog,
    }


def status_json(s: ClusterStatus) -> dict[str, Any]:
    """What `--json` prints for a status that could be read."""
    now = s.taken_ms
    return {
        "taken_ms": now,
        "coordinator": {
            "reachable": True,
            "dialect": s.dialect,
            "query_ms": round(s.query_ms, 3),
        },
        "hosts": [_host_json(b, now) for b in s.hosts],
        "pots": [
            {
                "pot": p.pot,
                "tenant": p.tenant,
                "unit": p.unit,
                "cap": p.cap,
                "granted": p.granted,
                "spent_unposted": p.spent_unposted,
                "open_leases": p.open_leases,
                "leased": p.leased,
                "by_host": {h: {"leases": n, "amount": a} for h, (n, a) in p.by_host.items()},
            }
            for p in s.pots
        ],
        "settlers": {
            "partitions": s.partitions,
            "live": s.settlers,
            "lag": [
                {
                    "partition": lag.partition,
                    "pending": lag.pending,
                    "failed": lag.failed,
                    "oldest_ms": lag.oldest_ms,
                    "lag_ms": None if lag.oldest_ms is None else max(0, now - lag.oldest_ms),
                    "holder_pid": lag.holder_pid,
                    "holder_backend_pid": lag.holder_backend,
                }
                for lag in s.lag
            ],
        },
    }


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _human(out: dict[str, Any]) -> None:
    """The tables: hosts first (as before the rest existed), then one blank line before each
    further section."""
    hosts = out["hosts"]
    if not hosts:
        print("no host has sent a heartbeat to this database yet", file=sys.stderr)
    else:
        head = ("HOST", "STATE", "HEARTBEAT_AGE", "WORKERS", "JOURNAL_BACKLOG", "PID", "STARTED")
        _table(
            [head]
            + [
                (
                    h["host_id"],
                    h["state"],
                    f"{h['heartbeat_age_ms'] / 1000:.1f}s",
                    str(h["workers"]),
                    str(h["journal_backlog"]),
                    str(h["pid"]),
                    _when(h["started_ms"]),
                )
                for h in hosts
            ]
        )
    c = out["coordinator"]
    print(f"\ncoordinator: {c['dialect']} reachable, status read in {c['query_ms']:.1f} ms")
    # Pots with nothing leased or unposted are many (one per tenant and contract) and dull.
    active = [p for p in out["pots"] if p["open_leases"] or p["granted"] or p["spent_unposted"]]
    quiet = len(out["pots"]) - len(active)
    print()
    if active:
        pot_head = (
            "POT",
            "UNIT",
            "CAP",
            "GRANTED",
            "SPENT_UNPOSTED",
            "OPEN_LEASES",
            "LEASED",
            "BY_HOST",
        )
        _table(
            [pot_head]
            + [
                (
                    p["pot"],
                    p["unit"],
                    str(p["cap"]),
                    str(p["granted"]),
                    str(p["spent_unposted"]),
                    str(p["open_leases"]),
                    str(p["leased"]),
                    ",".join(f"{h}:{v['leases']}/{v['amount']}" for h, v in p["by_host"].items())
                    or "-",
                )
                for p in active
            ]
        )
    if quiet or not active:
        print(f"budget pots with nothing leased or unposted: {quiet}")
    st = out["settlers"]
    print()
    _table(
        [("PARTITION", "PENDING", "FAILED", "LAG", "SETTLER_PID")]
        + [
            (
                "all" if lag["partition"] is None else f"{lag['partition']}/{st['partitions']}",
                str(lag["pending"]),
                str(lag["failed"]),
                "-" if lag["lag_ms"] is None else f"{lag['lag_ms'] / 1000:.1f}s",
                "-" if lag["holder_pid"] is None else str(lag["holder_pid"]),
            )
            for lag in st["lag"]
        ]
    )
    if st["live"] is not None:
        print(f"settlers holding partition locks: {st['live']}")


async def _read(url: str, partitions: int) -> ClusterStatus:
    db = await open_database(url)
    try:
        return await read_status(db, partitions=partitions)
    finally:
        await db.close()


def cmd_cluster_status(args: argparse.Namespace) -> int:
    url = db_url(args)
    if not 0 <= args.partitions <= 1024:
        raise Refused(f"--partitions must be from 0 to 1024 (got {args.partitions})")
    try:
        # A SQLite file that is not there, or a URL that names none, is refused as given; a
        # database that fails (PostgreSQL down) is a failure.
        if not is_postgres(url) and not os.path.exists(database_path(url)):
            raise Refused(f"no database at {url!r}")
    except StoreError as e:
        raise Refused(str(e)) from None
    started = time.perf_counter()
    try:
        status = asyncio.run(asyncio.wait_for(_read(url, args.partitions), STATUS_TIMEOUT_S))
    except (DatabaseError, StoreError, OSError, TimeoutError) as e:
        why = str(e) or f"no answer from {redacted(url)} within {STATUS_TIMEOUT_S:g} s"
        if args.json:
            waited = round((time.perf_counter() - started) * 1000, 3)
            down = {"reachable": False, "error": why, "query_ms": waited}
            print(msgspec.json.encode({"coordinator": down}).decode())
        raise CliError(why) from None
    out = status_json(status)
    if args.json:
        print(msgspec.json.encode(out).decode())
    else:
        _human(out)
    return EXIT_FAILED if any(h["state"] == "down" for h in out["hosts"]) else EXIT_OK


def add_cli(sub: Any) -> None:
    cluster = sub.add_parser(
        "cluster",
        help="the hosts serving on one database",
        description="The hosts (tokenhub serve --host-id) that serve on one database.",
    )
    cluster.set_defaults(func=group_help(cluster))
    actions = cluster.add_subparsers(dest="action", metavar="ACTION")
    p = actions.add_parser(
        "status",
        help="the hosts, their heartbeats and journal backlog, the leases and the settlers",
        description="List every host that has sent a heartbeat to the database: up, or down "
        f"when silent for more than {DOWN_AFTER_BEATS} of its heartbeat intervals ([server] "
        "heartbeat_s), with its heartbeat's age, its workers, and its usage events not yet in "
        "the database (journal backlog, as its beating process saw it). Then the coordinator "
        "(the database: reachable, and how long the status query took), the budget pots "
        "with anything leased or unposted (cap, granted, spent_unposted, open leases and "
        "their amount, per host), and the settlers' lag per tenant partition: the pending "
        "usage events, those that failed to settle, the age of the oldest one to settle, and "
        "the settler process holding the partition's lock. Exit status 0 when every host is "
        "up (or none has sent a heartbeat), 1 when a host is down or the database failed, 2 "
        "for a bad option or a database that does not exist.",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: taken_ms, coordinator, hosts, pots, settlers (on a "
        "database failure: the coordinator alone, reachable false)",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=0,
        metavar="N",
        help="split the settlers' lag by N tenant partitions, as the settlers do ([cluster] "
        "partitions; PostgreSQL only; default 0: one line for all tenants)",
    )
    p.add_argument(
        "--db",
        metavar="URL_OR_PATH",
        help=f"a SQLite path or a postgresql:// URL (default: ${ENV_DB}, else ./tokenhub.db)",
    )
    p.set_defaults(func=cmd_cluster_status)
