"""Commands: `tokenhub events ingest`, `tokenhub billing reconcile`, `tokenhub billing export`.

The work is in `tokenhub.billing.io`; this module parses arguments and prints.

Wiring: `add_commands(events_subparsers, billing_subparsers)` adds `ingest` to the `events`
group and `reconcile` and `export` to the `billing` group, each with `func` set to a handler
`(args) -> int`. Pass the objects that `add_subparsers()` returned for the two groups, e.g. in
`tokenhub.cli.admin.add_cli`, after
`es = events.add_subparsers(dest="action", metavar="ACTION")` and wherever the `billing`
group's `bs = billing.add_subparsers(...)` is made:

    from tokenhub.cli import billing_io
    billing_io.add_commands(es, bs)

Either argument may be None to add only the other group's commands. Import this module lazily
or at the top of tokenhub.cli.admin as you like: it does not import it (no cycle).

Every command takes `--database URL` (alias `--db`; default $TOKENHUB_DB, else
./tokenhub.db): a SQLite path or `sqlite:///ABS/PATH`, or `postgresql://...`. Exit statuses
are the table of tokenhub.cli: 0 all good; 1 the run found something (a line not stored or
not settled, a discrepancy) or failed (the database, a file that cannot be read or written);
2 refused as given (bad arguments, an input that is not what the command takes), with one
line `tokenhub: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import msgspec

from tokenhub.billing import io as bio
from tokenhub.billing.ledger import LedgerError
from tokenhub.cli import EXIT_FAILED, EXIT_REFUSED, quiet_broken_pipe
from tokenhub.db.database import Database, DatabaseError, open_database
from tokenhub.money import MoneyError
from tokenhub.store import DEFAULT_DATABASE, ENV_DB, StoreError, database_path

PROG = "tokenhub"

Command = Callable[[argparse.Namespace], int]


def _command(fn: Command) -> Command:
    """Errors that stop a command become one line on stderr and the exit status of the table
    in tokenhub.cli (2 refused as given, 1 failed)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (bio.BillingIOError, StoreError, LedgerError, MoneyError) as e:
            msg, status = str(e), EXIT_REFUSED
        except DatabaseError as e:
            msg, status = str(e), EXIT_FAILED
        except BrokenPipeError:
            return _quiet_broken_pipe()
        except OSError as e:
            msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
            status = EXIT_FAILED
        except Exception as e:
            if not type(e).__module__.startswith("asyncpg"):
                raise
            msg = f"database: {' '.join(str(e).split()) or type(e).__name__}"
            status = EXIT_FAILED
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return status

    return run


def _url(args: argparse.Namespace) -> str:
    return str(args.database or os.environ.get(ENV_DB) or DEFAULT_DATABASE)


def _is_pg(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


async def _open(url: str, *, create: bool) -> Database:
    """The migrated database; only ingest may create a missing SQLite file."""
    if not create and not _is_pg(url) and not os.path.exists(database_path(url)):
        raise bio.BillingIOError(f"no database at {database_path(url)!r}")
    return await open_database(url)


@contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8", newline="") as f:
        yield f


def _quiet_broken_pipe() -> int:
    """`... | head`: stop quietly, as other tools do."""
    return quiet_broken_pipe()


# -- events ingest ------------------------------------------------------------------------------


def _result_text(r: bio.LineResult) -> str:
    status = r.status.replace("_", " ")
    if r.status == "invalid":
        return f"line {r.line}: invalid: {r.reason}"
    head = f"line {r.line}: {status} {r.request_id}"
    if r.id and r.request_id != r.id:
        head += f" (id {r.id!r} from {r.source!r})"
    return f"{head}: {r.reason}" if r.reason else head


@_command
def cmd_events_ingest(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.max_line_bytes < 1:
        raise bio.BillingIOError("--batch-size and --max-line-bytes must be positive")
    encode = msgspec.json.Encoder().encode
    jsonl = args.format == "jsonl"

    def show(r: bio.LineResult) -> None:
        if args.verbose or r.status in bio.PROBLEMS:
            print(encode(r).decode() if jsonl else _result_text(r))

    def progress(lines: int, read: int) -> None:
        pct = f", {100 * read // size}%" if size else ""
        print(f"{PROG}: ingest: {lines:,} lines{pct}", file=sys.stderr, flush=True)

    async def run(f: IO[bytes]) -> bio.IngestSummary:
        db = await _open(_url(args), create=True)
        try:
            return await bio.ingest(
                db,
                f,
                settle=args.settle,
                batch_size=args.batch_size,
                max_line_bytes=args.max_line_bytes,
                on_result=show,
                progress=progress,
            )
        finally:
            await db.close()

    if args.file == "-":
        size = 0
        summary = asyncio.run(run(sys.stdin.buffer))
    else:
        with open(args.file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            summary = asyncio.run(run(f))
    if jsonl:
        print(encode({"summary": summary.as_dict()}).decode())
    else:
        print(f"ingest: {summary.text()}")
    return 0 if summary.ok else 1


# -- billing reconcile --------------------------------------------------------------------------


def _counts(d: dict[str, Any], fields: tuple[str, ...]) -> str:
    return " ".join(f"{k}={d[k]}" for k in fields)


def render_reconcile(rep: bio.ReconcileReport) -> str:
    f = rep.compared
    out = [f"missing in tokenhub ({len(rep.missing)}):"]
    out += [f"  line {m['line']}  {m['request_id']}  {_counts(m, f)}" for m in rep.missing]
    out.append(f"extra in tokenhub ({len(rep.extra)}):")
    out += [
        f"  {x['request_id']}  {x['ts']}  {x['provider'] or '-'}  {x['model']}  {_counts(x, f)}"
        for x in rep.extra
    ]
    out.append(f"differing ({len(rep.differing)}):")
    for d in rep.differing:
        parts = [
            f"{k} file {d['file'].get(k, '-')} tokenhub {d['tokenhub'].get(k, '-')}"
            for k in d["fields"]
        ]
        out.append(f"  line {d['line']}  {d['request_id']}  " + "; ".join(parts))
    out.append(f"malformed rows ({len(rep.malformed)}):")
    out += [f"  line {m['line']}: {m['reason']}" for m in rep.malformed]
    diff = rep.difference
    header = ("totals", "file", "tokenhub", "difference")
    rows = [
        (k, f"{rep.file_totals[k]:,}", f"{rep.tokenhub_totals[k]:,}", f"{diff[k]:+,}") for k in f
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]
    for r in (header, *rows):
        out.append(
            "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        )
    problems = len(rep.missing) + len(rep.extra) + len(rep.differing) + len(rep.malformed)
    verdict = "everything matches" if rep.ok else f"{problems} discrepancies"
    out.append(
        f"{rep.rows} rows, {rep.matched} matched ({rep.matched_out_of_scope} outside the "
        f"provider/time scope), {rep.ignored_empty} tokenhub events without tokens ignored: "
        f"{verdict}"
    )
    return "\n".join(out)


@_command
def cmd_billing_reconcile(args: argparse.Namespace) -> int:
    since, until = bio.time_window(args.period, args.since, args.until)

    async def run(f: IO[str]) -> bio.ReconcileReport:
        db = await _open(_url(args), create=False)
        try:
            return await bio.reconcile(db, f, provider=args.provider, since=since, until=until)
        finally:
            await db.close()

    # Invalid UTF-8 becomes U+FFFD, and such a row is reported as malformed.
    with open(args.file, encoding="utf-8-sig", errors="replace", newline="") as f:
        report = asyncio.run(run(f))
    if args.format == "json":
        print(msgspec.json.encode(report.as_dict()).decode())
    else:
        print(render_reconcile(report))
    return 0 if report.ok else 1


# -- billing export -----------------------------------------------------------------------------


@_command
def cmd_billing_export(args: argparse.Namespace) -> int:
    since, until = bio.time_window(args.period, args.since, args.until)
    n = 0

    async def run(out: IO[str]) -> int:
        db = await _open(_url(args), create=False)
        try:
            if args.format == "focus":
                rows = await bio.focus_rows(
                    db,
                    period=args.period,
                    since=None if args.period else since,
                    until=None if args.period else until,
                    tenant=args.tenant,
                    issuer=args.issuer,
                )
                w = csv.DictWriter(out, bio.FOCUS_COLUMNS, lineterminator="\n")
                w.writeheader()
                w.writerows(rows)
                return len(rows)
            count = 0
            events = bio.iter_event_log(db, since=since, until=until, tenant=args.tenant)
            if args.format == "jsonl":
                encode = msgspec.json.Encoder().encode
                async for ev in events:
                    out.write(encode(ev).decode())
                    out.write("\n")
                    count += 1
            else:
                cw = csv.writer(out, lineterminator="\n")
                cw.writerow(bio.EVENT_LOG_FIELDS)
                async for ev in events:
                    cw.writerow([bio.csv_cell(ev[k]) for k in bio.EVENT_LOG_FIELDS])
                    count += 1
            return count
        finally:
            await db.close()

    try:
        with _output(args.output) as out:
            n = asyncio.run(run(out))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    what = "FOCUS rows" if args.format == "focus" else "usage events"
    print(f"exported {n} {what}", file=sys.stderr)
    return 0


# -- wiring -------------------------------------------------------------------------------------


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database",
        "--db",
        dest="database",
        metavar="URL",
        help=f"SQLite path or sqlite:///ABS/PATH, or postgresql://... (default: ${ENV_DB}, "
        f"else ./{DEFAULT_DATABASE})",
    )


def _add_window(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--period", metavar="YYYY-MM", help=f"{what} in this calendar month (UTC)")
    p.add_argument(
        "--since", metavar="T", help="first time to include (with --until, not --period)"
    )
    p.add_argument("--until", metavar="T", help="first time to leave out")


_TIMES = (
    "A time T is an ISO 8601 date or datetime (UTC unless it carries an offset) or Unix "
    "milliseconds; --since is inclusive, --until exclusive."
)


def add_commands(events_subparsers: Any, billing_subparsers: Any) -> None:
    """Adds `ingest` to the events group and `reconcile`, `export` to the billing group (the
    objects their `add_subparsers()` returned; either may be None)."""
    if events_subparsers is not None:
        p = events_subparsers.add_parser(
            "ingest",
            help="ingest usage events from a CloudEvents JSON-lines file",
            description="Store usage events from outside (other gateways' token logs): one "
            "CloudEvents 1.0 JSON object per line, type tokenhub.usage.v1 (data: model, "
            "input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, provider, "
            "...; cache reads and writes are part of input_tokens) or com.openai.usage (data: "
            "model, prompt_tokens, completion_tokens, prompt_tokens_details.cached_tokens and "
            ".cache_write_tokens, provider). subject is the tenant, time the "
            "request time (RFC 3339). The request_id is the CloudEvent id when it is a "
            "tokenhub request id, a UUID or a ULID, else SOURCE#ID (hashed when long). "
            "Idempotent: an id stored with the same payload is a duplicate, with another "
            "payload a conflict (the stored event is kept). One bad line never stops the "
            "rest. Prints the lines that were not stored (all lines with -v) and a summary.",
            epilog="Exit status: 0 when every non-blank line was stored (ingested or "
            "duplicate) and, with --settle, settled; 1 when the file was processed but some "
            "line was invalid or conflicting, or could not be settled (valid lines are "
            "stored regardless); 2 when it could not be processed (unreadable file, "
            "database error). Example: tokenhub events ingest usage.jsonl --settle",
        )
        p.add_argument("file", metavar="FILE.jsonl", help="the events file ('-' for stdin)")
        p.add_argument(
            "--settle",
            action="store_true",
            help="settle the file's events through billing (prices, wallets, packages) after "
            "storing them; already settled ones are left alone",
        )
        p.add_argument(
            "--format",
            choices=["text", "jsonl"],
            default="text",
            help="the per-line report: text, or one JSON object per line then a summary object",
        )
        p.add_argument(
            "-v", "--verbose", action="store_true", help="report every line, not only problems"
        )
        p.add_argument(
            "--batch-size", type=int, default=1000, metavar="N", help="events per transaction"
        )
        p.add_argument(
            "--max-line-bytes",
            type=int,
            default=bio.DEFAULT_MAX_LINE_BYTES,
            metavar="N",
            help="longer lines are invalid (default: 1 MiB)",
        )
        _add_db(p)
        p.set_defaults(func=cmd_events_ingest)

    if billing_subparsers is None:
        return
    p = billing_subparsers.add_parser(
        "reconcile",
        help="compare a provider's per-request token counts with tokenhub's usage events",
        description="Compare a provider's usage CSV (a header with request_id, input_tokens "
        "or prompt_tokens, output_tokens or completion_tokens, optionally cached_input_tokens "
        "or cached_tokens, cache_write_tokens, and model) with tokenhub's usage events: rows "
        "tokenhub lacks (missing), events in scope the file lacks (extra; --provider and "
        "the time window set the scope), the same request with other counts (differing), "
        "and token totals on both sides. The file is streamed; malformed rows are reported "
        "with their line. " + _TIMES,
        epilog="Exit status: 0 when everything matches, 1 when there are discrepancies "
        "(including malformed rows), 2 on errors. Example: tokenhub billing reconcile "
        "openai-2026-11.csv --provider openai --period 2026-11",
    )
    p.add_argument("file", metavar="PROVIDER_USAGE.csv")
    p.add_argument("--provider", metavar="NAME", help="only this provider's events are in scope")
    _add_window(p, "events in scope")
    p.add_argument("--format", choices=["text", "json"], default="text")
    _add_db(p)
    p.set_defaults(func=cmd_billing_reconcile)

    p = billing_subparsers.add_parser(
        "export",
        help="export the token event log with settlements, or a FOCUS cost file",
        description="jsonl/csv: usage events in time order with every field, each with its "
        "settlement (txn_id, the amount charged in the tenant's currency as an exact "
        "decimal, package tokens, points; or unsettled). focus: a FinOps FOCUS 1.0 cost CSV "
        "(with PricingCurrency and x_ columns) from the ledger: usage per day, model, token "
        "kind and payment source, purchases, credits, adjustments; wallet top-ups are "
        "payments, not charges, and are left out. --period selects usage times for "
        "jsonl/csv and billing periods for focus. " + _TIMES,
        epilog="Examples: tokenhub billing export --format focus --period 2026-11 > "
        "focus.csv; tokenhub billing export --format csv --tenant acme --since 2026-11-01",
    )
    p.add_argument("--format", required=True, choices=["jsonl", "csv", "focus"])
    _add_window(p, "what to export")
    p.add_argument("--tenant", metavar="NAME", help="only this tenant")
    p.add_argument(
        "--issuer",
        default="tokenhub",
        metavar="NAME",
        help="focus: ProviderName and InvoiceIssuerName (default: tokenhub)",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    _add_db(p)
    p.set_defaults(func=cmd_billing_export)
