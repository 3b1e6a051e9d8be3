"""`tokenhub cluster status`: the hosts serving on one database, from their heartbeats.

Each `tokenhub serve --host-id ID` writes its row in cluster_hosts every [server] heartbeat_s
seconds (tokenhub.runtime.cluster); a host silent for more than 3 of its own intervals is shown
`down`. Exit status as tokenhub.cli's table: 0 every host is up (or none has beaten yet), 1 a
host is down or the database failed, 2 refused as given (a bad option, no such database).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from typing import Any

import msgspec

from tokenhub.cli import EXIT_FAILED, EXIT_OK, CliError, Refused
from tokenhub.cli.admin import db_url, group_help
from tokenhub.db.database import is_postgres
from tokenhub.runtime.cluster import DOWN_AFTER_BEATS, age_ms, is_down, now_ms
from tokenhub.store import ENV_DB, HostBeat, StoreError, database_path, open_store


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


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_cluster_status(args: argparse.Namespace) -> int:
    url = db_url(args)
    try:
        # A SQLite file that is not there, or a URL that names none, is refused as given; a
        # database that fails (PostgreSQL down) is a failure.
        if not is_postgres(url) and not os.path.exists(database_path(url)):
            raise Refused(f"no database at {url!r}")
    except StoreError as e:
        raise Refused(str(e)) from None
    try:
        store = open_store(url, create=False)
    except StoreError as e:
        raise CliError(str(e)) from None
    try:
        store.migrate()
        hosts = store.cluster_hosts()
    except StoreError as e:
        raise CliError(str(e)) from None
    finally:
        store.close()
    now = now_ms()
    rows = [_host_json(b, now) for b in hosts]
    if args.json:
        print(msgspec.json.encode(rows).decode())
    elif not rows:
        print("no host has sent a heartbeat to this database yet", file=sys.stderr)
    else:
        head = ("HOST", "STATE", "HEARTBEAT_AGE", "WORKERS", "JOURNAL_BACKLOG", "PID", "STARTED")
        table = [head] + [
            (
                r["host_id"],
                r["state"],
                f"{r['heartbeat_age_ms'] / 1000:.1f}s",
                str(r["workers"]),
                str(r["journal_backlog"]),
                str(r["pid"]),
                _when(r["started_ms"]),
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_FAILED if any(r["state"] == "down" for r in rows) else EXIT_OK


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
        help="list the hosts, their heartbeats, workers and journal backlog",
        description="List every host that has sent a heartbeat to the database: up, or down "
        f"when silent for more than {DOWN_AFTER_BEATS} of its heartbeat intervals ([server] "
        "heartbeat_s), with its heartbeat's age, its workers, and its usage events not yet in "
        "the database (journal backlog, as its beating process saw it). Exit status 0 when "
        "every host is up (or none has sent a heartbeat), 1 when a host is down or the "
        "database failed, 2 for a bad option or a database that does not exist.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array, one object a host")
    p.add_argument(
        "--db",
        metavar="URL_OR_PATH",
        help=f"a SQLite path or a postgresql:// URL (default: ${ENV_DB}, else ./tokenhub.db)",
    )
    p.set_defaults(func=cmd_cluster_status)
