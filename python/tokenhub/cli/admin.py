"""Admin commands: `tokenhub tenants ...`, `tokenhub keys ...`, `tokenhub events export`.

`add_cli(sub)` adds them to the `tokenhub` argparse subparsers. Every command takes
`--db URL_OR_PATH` (a SQLite path or a postgresql:// URL; default: $TOKENHUB_DB, else
./tokenhub.db), returns an exit status, and
reports errors as one line `tokenhub: error: ...` on stderr with status 1 (2 for a bad limit
value, with nothing changed). Running gateways pick up new and revoked keys, and limits set with
`keys limit` / `tenants limit`, within about a second (they poll the store's change marker).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

import msgspec

from tokenhub.cli import EXIT_FAILED, EXIT_REFUSED, Refused, quiet_broken_pipe
from tokenhub.store import DEFAULT_DATABASE, ENV_DB, ApiKey, Limits, Store, StoreError, open_store
from tokenhub.usage import EVENT_FIELDS, UsageEvent, event_csv_row, event_jsonl

PROG = "tokenhub"

Command = Callable[[argparse.Namespace], int]


class AdminError(Refused):
    """A value the command line gets wrong (a bad argument, a bad limit): one line, exit
    status 2 (refused as given)."""


class UsageError(AdminError):
    """A value the command line itself gets wrong (a bad limit): one line, exit status 2."""


def _command(fn: Command) -> Command:
    """Turn the errors a user can cause into `tokenhub: error: ...` and the exit status of the
    table in tokenhub.cli: 2 for what is refused as given (a bad argument; the store refusing
    a name, a key or a database as given), 1 for what failed (a file that cannot be written)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        status = EXIT_FAILED
        try:
            return fn(args)
        except (AdminError, StoreError) as e:
            msg, status = str(e), EXIT_REFUSED
        except BrokenPipeError:  # `| head`: stop quietly, as other tools do
            return quiet_broken_pipe()
        except OSError as e:
            msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return status

    return run


def db_url(args: argparse.Namespace) -> str:
    """--db, else $TOKENHUB_DB, else ./tokenhub.db (the billing commands use the same rule)."""
    return str(args.db or os.environ.get(ENV_DB) or DEFAULT_DATABASE)


@contextmanager
def _store(args: argparse.Namespace, *, create: bool = False) -> Iterator[Store]:
    """The migrated store (SQLite or PostgreSQL); only commands that create something may
    create a SQLite file (a PostgreSQL database must exist: its tables are created)."""
    store = open_store(db_url(args), create=create)
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def iso_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


_MS = re.compile(r"-?\d+")


def parse_time(value: str) -> int:
    """Unix milliseconds from an ISO 8601 date or datetime (UTC unless it has an offset) or
    a plain integer of Unix milliseconds."""
    s = value.strip()
    if _MS.fullmatch(s):
        return int(s)
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        raise AdminError(
            f"bad time {value!r}: give an ISO 8601 date or datetime "
            "(2025-01-31, 2025-01-31T12:00:00Z, 2025-01-31T12:00+08:00) or Unix milliseconds"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


# -- limits ------------------------------------------------------------------------------

KEY_LIMIT_OPTIONS = ("rpm", "tpm", "max_concurrency")
TENANT_LIMIT_OPTIONS = (
    *KEY_LIMIT_OPTIONS,
    "tokens_per_day",
    "guard_tpm",
    "guard_jump",
    "strong_share_pct",
)


def _limit_changes(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, int | None]:
    """The limits given on the command line: a whole number >= 0, or `none` to remove one.
    Checked all before anything is written (UsageError: exit 2, nothing changed)."""
    out: dict[str, int | None] = {}
    for field in fields:
        raw: str | None = getattr(args, field, None)
        if raw is None:
            continue
        option = "--" + field.replace("_", "-")
        value = raw.strip().lower()
        if value == "none":
            out[field] = None
        elif value.isdigit() and value.isascii() and int(value) < 2**63:
            out[field] = int(value)
        else:
            raise UsageError(f"{option} must be a whole number >= 0 or 'none' (got {raw!r})")
    return out


def _add_limit_options(p: argparse.ArgumentParser, fields: Sequence[str], *, none: bool) -> None:
    helps = {
        "rpm": "requests per minute",
        "tpm": "tokens (prompt + max output, settled to actual) per minute",
        "max_concurrency": "requests in flight at once",
        "tokens_per_day": "tokens per UTC day (answered with insufficient_quota once spent)",
        "guard_tpm": "bulk-extraction guard: throttle a key whose smoothed tokens per minute "
        "pass N",
        "guard_jump": "bulk-extraction guard: throttle a key whose tokens per minute pass N "
        "times its own baseline (after 5 minutes of history)",
        "strong_share_pct": "tier routing (a model such as auto): at most N%% of the tenant's "
        "tiered requests go to the strong tier; 0 forbids it",
    }
    for field in fields:
        p.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            metavar="N|none" if none else "N",
            help=helps[field] + ("; 'none' removes the limit" if none else ""),
        )


def _limits_json(limits: Limits, fields: Sequence[str]) -> dict[str, int | None]:
    return {f: getattr(limits, f) for f in fields}


@_command
def cmd_tenants_limit(args: argparse.Namespace) -> int:
    changes = _limit_changes(args, TENANT_LIMIT_OPTIONS)
    if not changes:
        raise UsageError(
            "give at least one of --rpm, --tpm, --max-concurrency, --tokens-per-day, "
            "--guard-tpm, --guard-jump, --strong-share-pct"
        )
    with _store(args) as store:
        limits = store.set_limits("tenant", args.name, **changes)
    print(f"tenant '{args.name}' limits: {limits.describe()}")
    return 0


@_command
def cmd_keys_limit(args: argparse.Namespace) -> int:
    changes = _limit_changes(args, KEY_LIMIT_OPTIONS)
    if not changes:
        raise UsageError("give at least one of --rpm, --tpm, --max-concurrency")
    with _store(args) as store:
        limits = store.set_limits("key", args.key_id, **changes)
    print(f"API key {args.key_id} limits: {limits.describe()}")
    return 0


# -- tenants -----------------------------------------------------------------------------


@_command
def cmd_tenants_create(args: argparse.Namespace) -> int:
    with _store(args, create=True) as store:
        t = store.create_tenant(args.name)
    print(f"created tenant '{t.name}' ({t.id})")
    return 0


@_command
def cmd_tenants_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        tenants = store.list_tenants()
        active: dict[str, int] = {}
        for k in store.list_keys():
            if k.active:
                active[k.tenant] = active.get(k.tenant, 0) + 1
        limits = {r.name: r.limits for r in store.all_limits() if r.scope == "tenant"}
    if args.json:
        out = [
            {
                **msgspec.structs.asdict(t),
                "active_keys": active.get(t.name, 0),
                "limits": _limits_json(limits.get(t.name, Limits()), TENANT_LIMIT_OPTIONS),
            }
            for t in tenants
        ]
        print(msgspec.json.encode(out).decode())
        return 0
    if not tenants:
        print("no tenants (create one with: tokenhub tenants create NAME)", file=sys.stderr)
        return 0
    rows = [
        [
            t.name,
            t.id,
            iso_time(t.created_ms),
            str(active.get(t.name, 0)),
            limits.get(t.name, Limits()).describe(),
        ]
        for t in tenants
    ]
    print_table(["NAME", "ID", "CREATED", "ACTIVE KEYS", "LIMITS"], rows)
    return 0


# -- keys --------------------------------------------------------------------------------


def _key_json(k: ApiKey, limits: Limits | None = None) -> dict[str, Any]:
    return {
        "id": k.id,
        "tenant": k.tenant,
        "prefix": k.prefix,
        "created_ms": k.created_ms,
        "revoked_ms": k.revoked_ms,
        "limits": _limits_json(limits or Limits(), KEY_LIMIT_OPTIONS),
    }


@_command
def cmd_keys_create(args: argparse.Namespace) -> int:
    changes = _limit_changes(args, KEY_LIMIT_OPTIONS)
    if any(v is None for v in changes.values()):
        raise UsageError("a new key has no limits to remove: give numbers, not 'none'")
    with _store(args) as store:
        key, secret = store.create_key(args.tenant)
        # Two transactions: a crash between them leaves a key without limits, which the
        # operator sees in `keys list` (and the secret was never printed).
        limits = store.set_limits("key", key.id, **changes) if changes else Limits()
    if args.json:
        print(msgspec.json.encode({**_key_json(key, limits), "secret": secret}).decode())
    else:
        print(f"created API key {key.id} for tenant '{key.tenant}'")
        print(f"  prefix: {key.prefix}")
        print(f"  secret: {secret}")
        if limits.any():
            print(f"  limits: {limits.describe()}")
    print(
        "Save the secret now: tokenhub keeps only its SHA-256 hash and cannot show it again.",
        file=sys.stderr,
    )
    return 0


@_command
def cmd_keys_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        keys = store.list_keys(args.tenant)
        limits = {r.name: r.limits for r in store.all_limits() if r.scope == "key"}
    if args.json:
        print(msgspec.json.encode([_key_json(k, limits.get(k.id)) for k in keys]).decode())
        return 0
    if not keys:
        print("no API keys (create one with: tokenhub keys create --tenant NAME)", file=sys.stderr)
        return 0
    rows = [
        [
            k.id,
            k.tenant,
            k.prefix,
            iso_time(k.created_ms),
            iso_time(k.revoked_ms),
            limits.get(k.id, Limits()).describe(),
        ]
        for k in keys
    ]
    print_table(["ID", "TENANT", "PREFIX", "CREATED", "REVOKED", "LIMITS"], rows)
    return 0


@_command
def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _store(args) as store:
        key = store.revoke_key(args.key_id)
    print(
        f"revoked API key {key.id} (tenant '{key.tenant}', prefix {key.prefix}); "
        "running gateways refuse it within about a second"
    )
    return 0


# -- events ------------------------------------------------------------------------------


def write_jsonl(events: Iterator[UsageEvent], out: IO[bytes]) -> int:
    """One JSON object per line with every field (defaults included, unlike the wire form)."""
    n = 0
    for e in events:
        out.write(event_jsonl(e))
        n += 1
    return n


def write_csv(events: Iterator[UsageEvent], out: IO[str]) -> int:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EVENT_FIELDS)
    n = 0
    for e in events:
        w.writerow(event_csv_row(e))
        n += 1
    return n


@_command
def cmd_events_export(args: argparse.Namespace) -> int:
    since = parse_time(args.since) if args.since is not None else None
    until = parse_time(args.until) if args.until is not None else None
    if since is not None and until is not None and until <= since:
        raise AdminError("--until must be later than --since")
    with _store(args) as store:
        events = store.iter_events(since, until)
        try:
            if args.format == "jsonl":
                if args.output:
                    with open(args.output, "wb") as f:
                        n = write_jsonl(events, f)
                else:
                    n = write_jsonl(events, sys.stdout.buffer)
                    sys.stdout.buffer.flush()
            elif args.output:
                with open(args.output, "w", encoding="utf-8", newline="") as f:
                    n = write_csv(events, f)
            else:
                n = write_csv(events, sys.stdout)
                sys.stdout.flush()
        except BrokenPipeError:  # `| head`: stop quietly, as other tools do
            return quiet_broken_pipe()
        finally:
            # An unfinished stream ends while its database is open (left to the garbage
            # collector, it would end after the store closed, with a traceback).
            close = getattr(events, "close", None)
            if close is not None:
                close()
    print(f"exported {n} usage events", file=sys.stderr)
    return 0


# -- wiring ------------------------------------------------------------------------------


@_command
def cmd_audit(args: argparse.Namespace) -> int:
    since = parse_time(args.since) if args.since else None
    if args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    with _store(args) as store:
        entries = store.audit_entries(since, args.limit)
    for e in entries:
        if args.json:
            print(msgspec.json.encode(e._asdict()).decode())
        else:
            details = " ".join(
                f"{k}={v}" for k, v in e.details.items() if k not in ("tenant", "key_id")
            )
            print(f"{iso_time(e.ts_ms)}  {e.kind}  {e.tenant}  {e.key_id}  {details}")
    if not entries and not args.json:
        print("the audit log is empty", file=sys.stderr)
    return 0


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        metavar="URL_OR_PATH",
        help="database: a SQLite path or sqlite:///ABSOLUTE/PATH, or a PostgreSQL URL "
        f"postgresql://USER@HOST/DB (default: ${ENV_DB}, else ./{DEFAULT_DATABASE})",
    )


def group_help(p: argparse.ArgumentParser) -> Command:
    """A command group's own action: its help on stderr, exit status 2."""

    def show(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    return show


def add_cli(sub: Any) -> None:
    """Add `tenants`, `keys` and `events` to `sub` (from `parser.add_subparsers()`)."""
    # tenants
    tenants = sub.add_parser(
        "tenants",
        help="create and list tenants",
        description="Tenants own API keys; every usage event records its tenant.",
    )
    tenants.set_defaults(func=group_help(tenants))
    ts = tenants.add_subparsers(dest="action", metavar="ACTION")
    p = ts.add_parser(
        "create",
        help="create a tenant",
        description="Create a tenant (the database is created if it does not exist).",
    )
    p.add_argument("name", metavar="NAME", help="1-64 characters from A-Z a-z 0-9 . _ -")
    _add_db(p)
    p.set_defaults(func=cmd_tenants_create)
    p = ts.add_parser(
        "list",
        help="list tenants",
        description="List tenants with their creation time and number of active API keys.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array")
    _add_db(p)
    p.set_defaults(func=cmd_tenants_list)
    p = ts.add_parser(
        "limit",
        help="set or remove a tenant's limits",
        description="Set (N) or remove (none) a tenant's limits, shared by all its keys; the "
        "others are left as they are. Running gateways apply them within about a second. "
        "tokens_per_day is spent by prompt + output tokens and starts again at 00:00 UTC. "
        "The guard throttles one key (60 s, 429) when it trips and writes the event to the "
        "audit log (tokenhub audit).",
    )
    p.add_argument("name", metavar="NAME", help="the tenant")
    _add_limit_options(p, TENANT_LIMIT_OPTIONS, none=True)
    _add_db(p)
    p.set_defaults(func=cmd_tenants_limit)

    # keys
    keys = sub.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys authenticate clients of the gateway. tokenhub stores only a "
        "SHA-256 hash of each key, so a key's secret is shown once, when it is created. "
        "Running gateways see new and revoked keys within about a second.",
    )
    keys.set_defaults(func=group_help(keys))
    ks = keys.add_subparsers(dest="action", metavar="ACTION")
    p = ks.add_parser(
        "create",
        help="create an API key and print its secret (once)",
        description="Create an API key for a tenant and print its id, display prefix and "
        "secret. The secret cannot be shown again: store it now.",
    )
    p.add_argument("--tenant", required=True, metavar="NAME", help="the tenant that owns it")
    p.add_argument("--json", action="store_true", help="print id, tenant, prefix, secret as JSON")
    _add_limit_options(p, KEY_LIMIT_OPTIONS, none=False)
    _add_db(p)
    p.set_defaults(func=cmd_keys_create)
    p = ks.add_parser(
        "list",
        help="list API keys (never their secrets)",
        description="List API keys: id, tenant, display prefix, created and revoked times.",
    )
    p.add_argument("--tenant", metavar="NAME", help="only this tenant's keys")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    _add_db(p)
    p.set_defaults(func=cmd_keys_list)
    p = ks.add_parser(
        "revoke",
        help="revoke an API key",
        description="Revoke an API key for good; running gateways refuse it within about a "
        "second. Usage already recorded with the key is kept.",
    )
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id (key_ and 12 hex digits)")
    _add_db(p)
    p.set_defaults(func=cmd_keys_revoke)
    p = ks.add_parser(
        "limit",
        help="set or remove an API key's limits",
        description="Set (N) or remove (none) an API key's limits; the others are left as "
        "they are. A request must fit both its key's and its tenant's limits. Running "
        "gateways apply them within about a second.",
    )
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id (key_ and 12 hex digits)")
    _add_limit_options(p, KEY_LIMIT_OPTIONS, none=True)
    _add_db(p)
    p.set_defaults(func=cmd_keys_limit)

    # events
    events = sub.add_parser(
        "events",
        help="export usage events",
        description="Usage events: one per gateway request, with its token counts.",
    )
    events.set_defaults(func=group_help(events))
    es = events.add_subparsers(dest="action", metavar="ACTION")
    from tokenhub.cli import billing_io

    billing_io.add_commands(es, None)  # ingest
    p = es.add_parser(
        "export",
        help="export usage events as JSON lines or CSV",
        description="Write usage events ordered by time, streaming (any size). --since is "
        "inclusive, --until exclusive. A time is an ISO 8601 date or datetime (UTC unless it "
        "carries an offset) or Unix time in milliseconds.",
        epilog="Examples: tokenhub events export --format csv --since 2025-01-01 "
        "--until 2025-02-01 > jan.csv; tokenhub events export --format jsonl | jq .model",
    )
    p.add_argument("--since", metavar="T", help="first time to include")
    p.add_argument("--until", metavar="T", help="first time to leave out")
    p.add_argument(
        "--format",
        required=True,
        choices=["jsonl", "csv"],
        help="jsonl: one event object per line; csv: a header of all fields, then one row each",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    _add_db(p)
    p.set_defaults(func=cmd_events_export)

    p = sub.add_parser(
        "audit",
        help="show the audit log (keys throttled by the bulk-extraction guard, ...)",
        description="The audit log, oldest first: security-relevant events the gateway "
        "recorded, such as a key throttled by the bulk-extraction guard (its velocity, "
        "baseline and the rule it tripped).",
    )
    p.add_argument("--since", metavar="T", help="first time to include (ISO 8601 or Unix ms)")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N entries")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_db(p)
    p.set_defaults(func=cmd_audit)


def main(argv: Sequence[str] | None = None) -> int:
    """The admin commands on their own (`python -m tokenhub.cli.admin ...`)."""
    parser = argparse.ArgumentParser(prog=PROG)
    add_cli(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
