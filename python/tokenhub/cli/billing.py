"""Operator commands for billing: `tokenhub plans|wallet|codes|fx|prices|billing ...`.

`add_cli(sub)` adds them to the `tokenhub` argparse subparsers. The database is chosen as for
the admin commands (`--db URL_OR_PATH`, else $TOKENHUB_DB, else ./tokenhub.db), and a
`postgresql://` URL selects PostgreSQL. Each command runs one async body under `asyncio.run`
and closes the database before it returns.

Every change a command makes is one `Billing` call, that is one database transaction, so a
refused request changes nothing. Two commands are deliberately made of several transactions,
and both are safe to run again: `billing settle` commits one batch at a time (an event is
settled once, whatever happens), and `prices import` checks every price first and then writes
one price-book version per model (a second run skips what the first one wrote).

Exit status: 0 done; 2 the request was refused as given (a bad amount or date, an unknown
currency, plan or code, the wrong currency for the tenant, not enough funds): nothing changed;
1 an operational failure (the database cannot be opened or a statement failed, the ledger
check found problems, some usage events could not be settled). Errors are one line
`tokenhub: error: ...` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal, InvalidOperation
from functools import wraps
from pathlib import Path
from typing import Any

import msgspec

from tokenhub.billing import ledger as L
from tokenhub.billing import rollups as R
from tokenhub.billing import settler as Q
from tokenhub.billing import statements as S
from tokenhub.billing import terms
from tokenhub.billing.check import ledger_check
from tokenhub.billing.ledger import LedgerError
from tokenhub.billing.service import (
    DRAW_ORDER,
    PERIODS,
    Billing,
    Lot,
    Plan,
    Price,
    Profile,
    wallet_view_in,
)
from tokenhub.billing.settler import MAX_PARTITIONS, SettleSummary, run_daemon, settle_pending
from tokenhub.cli import EXIT_FAILED, EXIT_REFUSED, Refused, billing_io, quiet_broken_pipe
from tokenhub.cli.admin import (
    AdminError,
    Command,
    db_url,
    group_help,
    iso_time,
    parse_time,
    print_table,
)
from tokenhub.config import Config, ConfigError, Model
from tokenhub.db.database import DatabaseError, Tx, open_database
from tokenhub.money import (
    POINTS,
    TOKENS,
    MoneyError,
    check_currency,
    decimal_str,
    fmt,
    fmt_units,
    parse_amount,
    parse_price,
)
from tokenhub.quota import QuotaFileError
from tokenhub.store import DEFAULT_DATABASE, ENV_DB, StoreError, database_path
from tokenhub.store.base import check_tenant_name

PROG = "tokenhub"

Body = Callable[[Billing], Awaitable[int]]

# -- help texts shared by several commands ------------------------------------------------------

AMOUNTS = (
    "Amounts are exact decimals in the currency's major unit (9.90 CNY, 1200 JPY) and must be "
    "whole minor units of the currency: 9.999 CNY is refused, never rounded. Currencies are "
    "ISO 4217 codes in capitals."
)
PRICES = "Prices are per 1M tokens, exact, with at most 9 decimals (finer ones are refused)."
ROUNDING = (
    "The ledger keeps integer nanos (10^-9 of the major unit), so usage is rated exactly. What "
    "rounds, always half-to-even: a usage line at a price with more than 3 decimals (to the "
    "nano, per line), a currency conversion (to the nano, per line, at the rate effective at "
    "the event's time), and amounts shown in minor units. Revenue splits use largest remainder: "
    "the parts always add up to the whole."
)
DATES = (
    "A DATE is YYYY-MM-DD (00:00 UTC) or an ISO 8601 timestamp (UTC unless it carries an "
    "offset), e.g. 2026-11-01 or 2026-11-01T08:00:00+08:00."
)
PERIOD = "A period is a calendar month in UTC: YYYY-MM."


class UsageError(Refused):
    """A bad argument found by the command line itself (exit status 2)."""


# Errors that mean "refused as given": nothing was changed, the request needs changing.
_BAD_INPUT: tuple[type[Exception], ...] = (
    MoneyError,
    LedgerError,  # BillingError and InsufficientFunds included
    StoreError,  # a malformed database URL
    AdminError,  # a malformed date
    ConfigError,
    UsageError,
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _command(fn: Command) -> Command:
    """Turns every error a billing command can meet into one line on stderr and an exit
    status (see the module docstring); programming errors still raise."""

    @wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            if getattr(args, "tenant", None) is not None:
                # The gateway's rule for tenant names. The ledger needs it too: account ids
                # are colon-separated paths, and a tenant 'a:b' would get unconstrained
                # accounts (a wallet that can go negative).
                check_tenant_name(args.tenant)
            return fn(args)
        except _BAD_INPUT as e:
            status, msg = EXIT_REFUSED, str(e)
        except DatabaseError as e:
            status, msg = EXIT_FAILED, str(e)
        except BrokenPipeError:  # `| head`: stop quietly, as other tools do
            return quiet_broken_pipe()
        except OSError as e:
            status = 1
            msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        except Exception as e:
            # asyncpg's errors are not wrapped in DatabaseError by the PostgreSQL layer; they
            # are still operational failures, not bugs in the command.
            if not type(e).__module__.startswith("asyncpg"):
                raise
            status, msg = 1, f"PostgreSQL: {e}"
        print(f"{PROG}: error: {_one_line(msg) or 'failed'}", file=sys.stderr)
        return status

    return run


def _database_url(args: argparse.Namespace, *, create: bool) -> str:
    url = db_url(args)
    if url.startswith(("postgresql://", "postgres://")):
        return url
    path = database_path(url)
    if not create and not os.path.exists(path):
        raise UsageError(f"no database at {path!r}")
    return url


def _run(args: argparse.Namespace, body: Body, *, create: bool = False) -> int:
    """Opens (and migrates) the database, runs `body`, closes the database. Only commands
    that record something may create a missing SQLite database."""
    url = _database_url(args, create=create)

    async def main() -> int:
        db = await open_database(url)
        try:
            return await body(Billing(db))
        finally:
            await db.close()

    return asyncio.run(main())


# -- argument parsing -------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PERIOD = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


def _time(value: str | None) -> int | None:
    return None if value is None else parse_time(value)


def _period(value: str) -> str:
    # Periods are compared as strings in the ledger, so '2026-1' must not get through.
    if not _PERIOD.fullmatch(value):
        raise UsageError(f"period must look like 2026-11 (got {value!r})")
    return value


def _pct(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    try:
        d = Decimal(value.strip().rstrip("%"))
    except InvalidOperation:
        d = Decimal("NaN")
    if not d.is_finite() or not 0 <= d <= 100:
        raise UsageError(f"{what} must be a percentage from 0 to 100 (got {value!r})")
    return str(d)


def _csv(value: str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [x.strip() for x in value.split(",")]
    if not all(items):
        raise UsageError(f"{what}: give a comma-separated list without empty items")
    return items


# -- formatting -------------------------------------------------------------------------------


def _money(nanos: int, currency: str) -> str:
    """Exact: every significant nano digit, never fewer decimals than the minor unit."""
    return fmt(nanos, currency, exact=True)


def _amount(nanos: int, currency: str) -> str:
    """The number of `_money` alone, for JSON."""
    return _money(nanos, currency).split()[0]


def _pct_text(ppm: int) -> str:
    return f"{Decimal(ppm).scaleb(-4).normalize():f}%"


def _json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _unit(kind: str) -> str:
    return TOKENS if kind == "package" else POINTS


def _exhaustion_text(
    exhaustion: str, overage: int | None, overage_cur: str, auto_topup: int | None
) -> str:
    if exhaustion == "overage" and overage is not None:
        return f"overage {decimal_str(overage)} {overage_cur} per 1M"
    if exhaustion == "auto_topup" and auto_topup:
        return f"auto top-up {auto_topup:,} tokens"
    return "hard stop"


def _plan_json(p: Plan) -> dict[str, Any]:
    return {
        "name": p.name,
        "kind": p.kind,
        "price": _amount(p.price, p.currency),
        "currency": p.currency,
        "quantity": p.quantity if p.kind == "package" else decimal_str(p.quantity),
        "unit": "tokens" if p.kind == "package" else "points",
        "period": p.period,
        "exhaustion": p.exhaustion,
        "overage_per_1m": None if p.overage_per_1m is None else decimal_str(p.overage_per_1m),
        "overage_currency": p.overage_currency,
        "auto_topup": p.auto_topup,
        "rollover": p.rollover,
        "models": list(p.models),
    }


def _price_json(p: Price) -> dict[str, Any]:
    return {
        "model": p.model,
        "tenant": p.tenant or None,
        "version": p.version,
        "effective": iso_time(p.effective_ms),
        "effective_ms": p.effective_ms,
        "currency": p.currency,
        "input_per_1m": decimal_str(p.input_per_1m),
        "cached_input_per_1m": decimal_str(p.cached_input_per_1m),
        "output_per_1m": decimal_str(p.output_per_1m),
        # The price in force (the input price when none was set), and whether one was.
        "cache_write_per_1m": decimal_str(p.write_per_1m),
        "cache_write_set": p.cache_write_per_1m is not None,
        "points_per_1m": None if p.points_per_1m is None else decimal_str(p.points_per_1m),
    }


def _price_text(p: Price) -> str:
    s = (
        f"input {decimal_str(p.input_per_1m)}, cached input "
        f"{decimal_str(p.cached_input_per_1m)}, output {decimal_str(p.output_per_1m)}, "
        f"cache write {decimal_str(p.write_per_1m)} {p.currency} per 1M tokens"
    )
    if p.points_per_1m is not None:
        s += f"; {decimal_str(p.points_per_1m)} points per 1M tokens"
    return s


async def _wallet_balance(b: Billing, tenant: str, currency: str) -> int:
    """The tenant's side of the wallet (what it holds)."""
    acc = L.wallet(tenant, currency)
    bals = await b.db.transaction(lambda tx: L.balances(tx, tenant=tenant, prefix=acc))
    return -bals.get(acc, 0)


# -- plans ------------------------------------------------------------------------------------


@_command
def cmd_plans_create(args: argparse.Namespace) -> int:
    if not _NAME.fullmatch(args.name):
        raise UsageError(
            f"invalid plan name {args.name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )
    if args.overage_currency is not None and args.overage_per_1m is None:
        raise UsageError("--overage-currency goes with --overage-per-1m")
    models = _csv(args.models, "--models") or []

    async def body(b: Billing) -> int:
        p = await b.create_plan(
            args.name,
            price=args.price,
            currency=args.currency,
            tokens=args.tokens,
            points=args.points,
            period=args.period,
            overage_per_1m=args.overage_per_1m,
            overage_currency=args.overage_currency,
            hard_stop=args.hard_stop,
            auto_topup=args.auto_topup,
            rollover=args.rollover,
            models=models,
        )
        what = fmt_units(p.quantity, _unit(p.kind))
        ex = _exhaustion_text(p.exhaustion, p.overage_per_1m, p.overage_currency, p.auto_topup)
        print(
            f"created plan {p.name!r}: {what} for {fmt(p.price, p.currency)}, "
            f"period {p.period}, when used up: {ex}"
            f"{', rollover' if p.rollover else ''}"
            f"{', models ' + ','.join(p.models) if p.models else ''}"
        )
        return 0

    return _run(args, body, create=True)


@_command
def cmd_plans_list(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        plans = await b.plans()
        if args.json:
            _json([_plan_json(p) for p in plans])
            return 0
        if not plans:
            print("no plans (create one with: tokenhub plans create NAME ...)", file=sys.stderr)
            return 0
        rows = [
            [
                p.name,
                p.kind,
                fmt(p.price, p.currency),
                fmt_units(p.quantity, _unit(p.kind)),
                p.period,
                _exhaustion_text(p.exhaustion, p.overage_per_1m, p.overage_currency, p.auto_topup),
                "yes" if p.rollover else "no",
                ",".join(p.models) or "all",
            ]
            for p in plans
        ]
        print_table(
            ["NAME", "KIND", "PRICE", "QUANTITY", "PERIOD", "WHEN USED UP", "ROLLOVER", "MODELS"],
            rows,
        )
        return 0

    return _run(args, body)


@_command
def cmd_plans_assign(args: argparse.Namespace) -> int:
    start = _time(args.start)

    async def body(b: Billing) -> int:
        lot = await b.assign(args.tenant, args.plan, start_ms=start)
        until = iso_time(lot.end_ms) if lot.end_ms is not None else "no end"
        print(
            f"assigned plan {lot.plan!r} to {lot.tenant}: lot {lot.id}, "
            f"{fmt_units(lot.quantity, _unit(lot.kind))} for {fmt(lot.price, lot.currency)}, "
            f"valid from {iso_time(lot.start_ms)} until {until}"
        )
        return 0

    return _run(args, body)


# -- wallet -----------------------------------------------------------------------------------


@_command
def cmd_wallet_topup(args: argparse.Namespace) -> int:
    value = parse_amount(args.amount, args.currency)

    async def body(b: Billing) -> int:
        tid = await b.topup(args.tenant, args.amount, args.currency)
        bal = await _wallet_balance(b, args.tenant, args.currency)
        print(
            f"topped up {args.tenant}'s wallet with {fmt(value, args.currency)} ({tid}); "
            f"wallet now {_money(bal, args.currency)}"
        )
        return 0

    return _run(args, body, create=True)


@_command
def cmd_wallet_adjust(args: argparse.Namespace) -> int:
    value = parse_amount(args.amount, args.currency, allow_negative=True)
    if value == 0:
        raise UsageError("an adjustment must not be zero")

    async def body(b: Billing) -> int:
        prof = await b.profile(args.tenant)
        if prof.currency != args.currency:
            # Billing.adjust would open a wallet in a second currency (top-ups refuse that).
            raise UsageError(
                f"tenant {args.tenant} settles in {prof.currency}; adjust in {prof.currency}"
            )
        tid = await b.adjust(args.tenant, args.amount, args.currency, args.memo)
        bal = await _wallet_balance(b, args.tenant, args.currency)
        sign = "+" if value > 0 else ""
        print(
            f"adjusted {args.tenant}'s wallet by {sign}{fmt(value, args.currency)} ({tid}); "
            f"wallet now {_money(bal, args.currency)}"
        )
        return 0

    return _run(args, body)


def _lot_status(lot: Lot, now: int) -> str:
    if lot.end_ms is not None and lot.end_ms <= now:
        return "ended (tokenhub billing expire)"
    if lot.start_ms > now:
        return "not started"
    return "active"


@_command
def cmd_wallet_show(args: argparse.Namespace) -> int:
    tenant = args.tenant

    async def body(b: Billing) -> int:
        view = await b.db.transaction(lambda tx: wallet_view_in(tx, tenant))
        prof, money, lot_rows, low = view.profile, view.money, view.lots, view.low
        now = int(time.time() * 1000)
        cur = prof.currency
        wallet = money["wallet"][cur]

        if args.json:
            _json(
                {
                    "tenant": tenant,
                    "currency": cur,
                    "draw_order": list(prof.draw_order),
                    "discount_pct": _pct_text(prof.discount_ppm)[:-1],
                    "credit_limit": _amount(prof.credit_limit, cur),
                    "low_balance": (
                        None if prof.low_balance is None else _amount(prof.low_balance, cur)
                    ),
                    "low_balance_warning": low,
                    **{
                        kind: {c: _amount(v, c) for c, v in sorted(by_cur.items())}
                        for kind, by_cur in money.items()
                    },
                    "lots": [
                        {
                            "id": lot.id,
                            "plan": lot.plan,
                            "kind": lot.kind,
                            "unit": "tokens" if unit == TOKENS else "points",
                            "left": left if unit == TOKENS else decimal_str(left),
                            "quantity": (
                                lot.quantity if unit == TOKENS else decimal_str(lot.quantity)
                            ),
                            "valid_from": iso_time(lot.start_ms),
                            "valid_until": None if lot.end_ms is None else iso_time(lot.end_ms),
                            "models": list(lot.models),
                            "status": _lot_status(lot, now),
                        }
                        for lot, unit, left in lot_rows
                    ],
                }
            )
            return 0

        print(
            f"{tenant}: settles in {cur}; draw order {', '.join(prof.draw_order)}; "
            f"discount {_pct_text(prof.discount_ppm)}"
        )
        for kind, by_cur in money.items():
            for c, v in sorted(by_cur.items()):
                extra = ""
                if kind == "receivable" and c == cur:
                    avail = max(0, prof.credit_limit - v)
                    extra = (
                        f"  (credit limit {fmt(prof.credit_limit, c)}, {_money(avail, c)} "
                        "available)"
                    )
                print(f"  {kind:<11} {_money(v, c):>24}{extra}")
        if lot_rows:
            print("lots:")
            print_table(
                ["  LOT", "PLAN", "LEFT", "OF", "VALID FROM", "UNTIL", "MODELS", "STATUS"],
                [
                    [
                        f"  {lot.id}",
                        lot.plan,
                        fmt_units(left, unit),
                        fmt_units(lot.quantity, unit),
                        iso_time(lot.start_ms),
                        iso_time(lot.end_ms) if lot.end_ms is not None else "no end",
                        ",".join(lot.models) or "all",
                        _lot_status(lot, now),
                    ]
                    for lot, unit, left in lot_rows
                ],
            )
        else:
            print("lots: none")
        if low and prof.low_balance is not None:
            print(
                f"warning: the wallet holds {_money(wallet, cur)}, below the low-balance "
                f"threshold of {fmt(prof.low_balance, cur)}"
            )
        return 0

    return _run(args, body)


# -- codes ------------------------------------------------------------------------------------


@_command
def cmd_codes_create(args: argparse.Namespace) -> int:
    expires = _time(args.expires)
    value = parse_amount(args.amount, args.currency)
    if not 1 <= args.count <= 100_000:
        raise UsageError("--count must be from 1 to 100000")

    async def body(b: Billing) -> int:
        codes = await b.create_codes(args.count, args.amount, args.currency, expires_ms=expires)
        for c in codes:
            print(c)
        sys.stdout.flush()
        until = f", valid until {iso_time(expires)}" if expires is not None else ""
        print(
            f"created {len(codes)} single-use codes worth {fmt(value, args.currency)} each"
            f"{until}. They are shown only once: tokenhub keeps only their SHA-256 hashes.",
            file=sys.stderr,
        )
        return 0

    return _run(args, body, create=True)


@_command
def cmd_codes_redeem(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        tid = await b.redeem(args.tenant, args.code)
        prof = await b.profile(args.tenant)
        cur = prof.currency
        acc = L.wallet(args.tenant, cur)
        credited = await b.db.transaction(
            lambda tx: tx.fetchval(
                "SELECT SUM(amount) FROM postings WHERE txn_id = $1 AND account = $2", tid, acc
            )
        )
        bal = await _wallet_balance(b, args.tenant, cur)
        print(
            f"redeemed a code for {args.tenant}: {fmt(-int(credited or 0), cur)} into the "
            f"wallet ({tid}); wallet now {_money(bal, cur)}"
        )
        return 0

    return _run(args, body)


# -- fx ---------------------------------------------------------------------------------------


@_command
def cmd_fx_set(args: argparse.Namespace) -> int:
    eff = parse_time(args.effective)

    async def body(b: Billing) -> int:
        r = await b.set_fx(args.base, args.quote, args.rate, effective_ms=eff)
        print(
            f"FX {args.base}/{args.quote} = {r:f} from {iso_time(eff)} "
            f"(1 {args.base} = {r:f} {args.quote})"
        )
        return 0

    return _run(args, body, create=True)


@_command
def cmd_fx_list(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        rows = await b.db.transaction(terms.fx_list)
        if args.json:
            _json(
                [
                    {
                        "base": base,
                        "quote": q,
                        "rate": r,
                        "effective": iso_time(e),
                        "effective_ms": e,
                    }
                    for base, q, e, r in rows
                ]
            )
            return 0
        if not rows:
            print(
                "no FX rates (set one with: tokenhub fx set BASE QUOTE RATE --from DATE)",
                file=sys.stderr,
            )
            return 0
        print_table(
            ["BASE", "QUOTE", "RATE", "FROM"], [[base, q, r, iso_time(e)] for base, q, e, r in rows]
        )
        return 0

    return _run(args, body)


# -- prices -----------------------------------------------------------------------------------


@_command
def cmd_prices_set(args: argparse.Namespace) -> int:
    eff = _time(args.effective)

    async def body(b: Billing) -> int:
        p = await b.set_price(
            args.model,
            currency=args.currency,
            input_per_1m=args.input,
            output_per_1m=args.output,
            cached_input_per_1m=args.cached_input,
            cache_write_per_1m=args.cache_write,
            points_per_1m=args.points,
            effective_ms=eff,
            tenant=args.tenant or "",
        )
        who = f" for tenant {p.tenant}" if p.tenant else ""
        print(
            f"price {p.model} v{p.version}{who} from {iso_time(p.effective_ms)}: {_price_text(p)}"
        )
        return 0

    return _run(args, body, create=True)


@_command
def cmd_prices_list(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        prices = await b.prices()
        if args.json:
            _json([_price_json(p) for p in prices])
            return 0
        if not prices:
            print("no prices (set one with: tokenhub prices set MODEL ...)", file=sys.stderr)
            return 0
        print_table(
            [
                "MODEL",
                "TENANT",
                "VERSION",
                "FROM",
                "CURRENCY",
                "INPUT",
                "CACHED",
                "OUTPUT",
                "CACHE WRITE",
                "POINTS",
            ],
            [
                [
                    p.model,
                    p.tenant or "-",
                    str(p.version),
                    iso_time(p.effective_ms),
                    p.currency,
                    decimal_str(p.input_per_1m),
                    decimal_str(p.cached_input_per_1m),
                    decimal_str(p.output_per_1m),
                    decimal_str(p.write_per_1m),
                    "-" if p.points_per_1m is None else decimal_str(p.points_per_1m),
                ]
                for p in prices
            ],
        )
        print("(prices per 1M tokens)", file=sys.stderr)
        return 0

    return _run(args, body)


def _config_models(path: str) -> list[Model]:
    """The [[models]] of a gateway config file. Only the models are read and checked: the full
    `load_config` would also demand every provider's API key in the environment, which a
    billing host need not have."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return msgspec.convert(data.get("models", []), list[Model], strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{p}: models: {e}") from None


# model, currency, input, cached input, output, cache write (None: the input price), in nanos
Wanted = tuple[str, str, int, int, int, int | None]


def config_prices(models: Sequence[Model], source: str) -> tuple[list[Wanted], list[str]]:
    """The price each model's first deployment gives (checked, in nanos), and the models
    without one. Raises ConfigError naming `source` and the model."""
    wanted: list[Wanted] = []
    no_price: list[str] = []
    for m in models:
        price = m.deployments[0].price if m.deployments else None
        if price is None:
            no_price.append(m.id)
            continue
        where = f"{source}: model {m.id}"
        try:
            cur = check_currency(price.currency)
            # As written (0.0000000001), not as Decimal prints it (1E-10), in messages.
            inp = parse_price(f"{price.input_per_1m:f}", "input price")
            out = parse_price(f"{price.output_per_1m:f}", "output price")
            cached = (
                inp
                if price.cached_input_per_1m is None
                else parse_price(f"{price.cached_input_per_1m:f}", "cached-input price")
            )
            write = (
                None
                if price.cache_write_per_1m is None
                else parse_price(f"{price.cache_write_per_1m:f}", "cache-write price")
            )
        except MoneyError as e:
            raise ConfigError(f"{where}: {e}") from None
        wanted.append((m.id, cur, inp, cached, out, write))
    return wanted, no_price


async def apply_prices(
    b: Billing, wanted: Sequence[Wanted], *, at: int, new_from: int | None = None
) -> tuple[list[tuple[Price, bool]], list[str]]:
    """Writes each wanted price that differs from the price book's global price in force at
    `at`, effective from `at`; a model that never had a global price gets its first from
    `new_from` instead, when given. Returns the written prices (each with True when it was the
    model's first) and the models left unchanged."""

    async def current(tx: Tx) -> dict[str, tuple[tuple[Any, ...] | None, bool]]:
        out: dict[str, tuple[tuple[Any, ...] | None, bool]] = {}
        for model, *_ in wanted:
            out[model] = await terms.list_price_at(tx, model, at)
        return out

    now = await b.db.transaction(current)
    written: list[tuple[Price, bool]] = []
    same: list[str] = []
    for model, cur, inp, cached, out, write in wanted:
        old, ever = now[model]
        if old is not None and (*old[:4], old[5]) == (cur, inp, cached, out, write):
            same.append(model)
            continue
        # A config has no points price: keep the one in force, if any.
        points = None if old is None or old[4] is None else decimal_str(old[4])
        first = not ever
        p = await b.set_price(
            model,
            currency=cur,
            input_per_1m=decimal_str(inp),
            output_per_1m=decimal_str(out),
            cached_input_per_1m=decimal_str(cached),
            cache_write_per_1m=None if write is None else decimal_str(write),
            points_per_1m=points,
            effective_ms=new_from if first and new_from is not None else at,
        )
        written.append((p, first))
    return written, same


def apply_config_prices(config: Config) -> list[str]:
    """`tokenhub serve`'s first step: the config's prices into the price book, where they
    differ from the global price in force now. A model's first price is in force from the
    epoch (its usage recorded before, failed for want of a price, is billed at it); a changed
    price from now (usage before keeps the price it had). Returns one line per price written.
    Raises ConfigError for a price the ledger cannot take, DatabaseError."""
    wanted, _ = config_prices(config.models, config.source or "<config>")
    if not wanted:
        return []

    async def main() -> list[str]:
        db = await open_database(config.server.database)
        try:
            at = int(time.time() * 1000)
            written, _ = await apply_prices(Billing(db), wanted, at=at, new_from=0)
        finally:
            await db.close()
        return [
            f"price {p.model} v{p.version} from {iso_time(p.effective_ms)} "
            f"({'its first: from the epoch' if first else 'changed in the config: from now'})"
            f": {_price_text(p)}"
            for p, first in written
        ]

    return asyncio.run(main())


@_command
def cmd_prices_import(args: argparse.Namespace) -> int:
    models = _config_models(args.config)
    eff = _time(args.effective)
    # Every price is checked before anything is written.
    wanted, no_price = config_prices(models, args.config)

    async def body(b: Billing) -> int:
        at = eff if eff is not None else int(time.time() * 1000)
        written, same = await apply_prices(b, wanted, at=at)
        for p, _ in written:
            print(f"price {p.model} v{p.version} from {iso_time(p.effective_ms)}: {_price_text(p)}")
        print(
            f"imported {len(written)} prices from {args.config}; {len(same)} unchanged"
            + (f", {len(no_price)} without a price ({', '.join(no_price)})" if no_price else ""),
            file=sys.stderr,
        )
        return 0

    return _run(args, body, create=True)


# -- billing: profiles, splits ------------------------------------------------------------------


def _print_profile(p: Profile) -> None:
    cur = p.currency
    print(f"billing profile of {p.tenant}")
    print(f"  currency      {cur}")
    print(f"  draw order    {', '.join(p.draw_order)}")
    print(f"  credit limit  {fmt(p.credit_limit, cur)}")
    low = "none" if p.low_balance is None else fmt(p.low_balance, cur)
    print(f"  low balance   {low}")
    print(f"  discount      {_pct_text(p.discount_ppm)}")


@_command
def cmd_billing_profile(args: argparse.Namespace) -> int:
    order = _csv(args.order, "--order")
    # Checked here: the service turns a non-number into decimal.InvalidOperation (a traceback).
    discount = _pct(args.discount, "--discount")
    change = any(
        x is not None for x in (args.currency, order, args.credit_limit, args.low_balance, discount)
    )

    async def body(b: Billing) -> int:
        if change:
            p = await b.set_profile(
                args.tenant,
                currency=args.currency,
                draw_order=order,
                credit_limit=args.credit_limit,
                low_balance=args.low_balance,
                discount_pct=discount,
            )
        else:
            p = await b.profile(args.tenant)
        _print_profile(p)
        return 0

    return _run(args, body, create=change)


@_command
def cmd_billing_split(args: argparse.Namespace) -> int:
    eff = _time(args.effective)
    # Checked here too: the service lets NaN and Infinity through to int() (a traceback).
    platform = _pct(args.platform, "--platform") or "0"
    channel = _pct(args.channel, "--channel") or "0"

    async def body(b: Billing) -> int:
        at = eff if eff is not None else int(time.time() * 1000)
        pp, cp = await b.set_split(
            args.provider, platform_pct=platform, channel_pct=channel, effective_ms=at
        )
        print(
            f"revenue split for provider {args.provider} from {iso_time(at)}: platform "
            f"{_pct_text(pp)}, channel {_pct_text(cp)}, provider {_pct_text(1_000_000 - pp - cp)}"
        )
        return 0

    return _run(args, body, create=True)


# -- billing: settle ----------------------------------------------------------------------------


PROGRESS_EVERY_S = 2.0  # a progress line on stderr at most this often


@_command
def cmd_billing_settle(args: argparse.Namespace) -> int:
    if not 1 <= args.batch <= 100_000:
        raise UsageError("--batch must be from 1 to 100000")
    if args.follow is not None and args.follow <= 0:
        raise UsageError("--follow needs a positive interval in seconds")

    if (args.quota or args.parent) and args.follow is None:
        raise UsageError("--quota and --parent go with --follow")
    if args.partitions and args.follow is None:
        raise UsageError("--partitions goes with --follow")
    if not 0 <= args.partitions <= MAX_PARTITIONS:
        raise UsageError(f"--partitions must be from 0 to {MAX_PARTITIONS}")

    async def body(b: Billing) -> int:
        if args.follow is not None:

            def started() -> None:
                if args.parent is None:
                    print(f"{PROG} billing settle: settling every {args.follow:g} s "
                          "(Ctrl-C stops)", file=sys.stderr, flush=True)  # fmt: skip

            try:
                await run_daemon(
                    b,
                    interval_s=args.follow,
                    batch=args.batch,
                    quota_path=args.quota,
                    parent=args.parent,
                    started=started,
                    partitions=args.partitions,
                )
            except QuotaFileError as e:
                raise UsageError(f"--quota: {e}") from None
            return 0
        last = [time.monotonic()]

        def progress(s: SettleSummary) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                rate = s.read / s.elapsed_s if s.elapsed_s else 0.0
                print(
                    f"{PROG} billing settle: {s.read:,} events read, {s.settled:,} settled, "
                    f"{s.failed + len(s.conflicts):,} not settled ({rate:,.0f}/s)",
                    file=sys.stderr,
                    flush=True,
                )

        s = await settle_pending(b, batch=args.batch, retry_failed=args.retry_failed,
                                 progress=progress)  # fmt: skip
        skipped = 0
        if not args.retry_failed:
            skipped = int(
                await b.db.transaction(
                    lambda tx: tx.fetchval(
                        "SELECT COUNT(*) FROM settlement_failures f WHERE NOT EXISTS "
                        "(SELECT 1 FROM settlements s WHERE s.event_id = f.event_id)"
                    )
                )
                or 0
            )
            skipped -= s.failed  # this run's failures are not "earlier" ones
        line = (
            f"settled {s.settled}, duplicates {s.duplicates}, conflicts {len(s.conflicts)}, "
            f"failed {s.failed}"
        )
        if s.quarantined:
            line += f" ({s.quarantined} quarantined: tokenhub billing quarantine list)"
        if s.reasons:
            top = "; ".join(f"{r}: {n}" for r, n in s.reasons.most_common(3))
            more = len(s.reasons) - 3
            line += f" ({top}{f'; {more} more reasons' if more > 0 else ''})"
        if skipped > 0:
            line += f"; {skipped} earlier failures skipped (--retry-failed retries them)"
        print(line)
        return 1 if s.failed or s.conflicts else 0

    return _run(args, body)


# -- billing: expire, refund ----------------------------------------------------------------


@_command
def cmd_billing_expire(args: argparse.Namespace) -> int:
    now = _time(args.now)

    async def body(b: Billing) -> int:
        txns = await b.expire(now=now)
        at = iso_time(now if now is not None else int(time.time() * 1000))
        print(f"expired {len(txns)} lots ended by {at}")
        for t in txns:
            print(f"  {t}")
        return 0

    return _run(args, body)


@_command
def cmd_billing_refund(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        tid = await b.refund(args.event_id, memo=args.memo or "")
        print(f"refunded usage event {args.event_id} ({tid})")
        return 0

    return _run(args, body)


# -- billing: statements, settlements, check ------------------------------------------------


@_command
def cmd_billing_statement(args: argparse.Namespace) -> int:
    period = _period(args.period)

    async def body(b: Billing) -> int:
        st = await b.db.transaction(lambda tx: S.tenant_statement(tx, args.tenant, period))
        if args.format == "json":
            _json(st)
        else:
            print(S.render_statement(st))
        return 0

    return _run(args, body)


@_command
def cmd_billing_invoice(args: argparse.Namespace) -> int:
    period = _period(args.period)

    async def body(b: Billing) -> int:
        inv = await b.invoice(args.tenant, period)
        if args.format == "json":
            _json(inv)
            return 0
        cur = inv["currency"]
        print(
            f"invoice {args.tenant} {period}: due {_money(inv['due'], cur)} "
            f"(owed {_amount(inv['owed'], cur)}; {_amount(inv['rounding'], cur)} rounded off "
            f"to op:rounding)"
        )
        return 0

    return _run(args, body)


@_command
def cmd_billing_pay(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        tid = await b.pay(args.tenant, args.amount, args.currency)
        print(f"payment of {args.amount} {args.currency} from {args.tenant} recorded ({tid})")
        return 0

    return _run(args, body)


@_command
def cmd_billing_close(args: argparse.Namespace) -> int:
    period = _period(args.period)

    async def body(b: Billing) -> int:
        st = await b.db.transaction(lambda tx: S.close_period(tx, args.tenant, period))
        closing = ", ".join(r["text"] for r in st["closing"] if r["unit"] not in (TOKENS, POINTS))
        print(
            f"closed {args.tenant}'s statement for {period}"
            f"{f' (closing {closing})' if closing else ''}; postings dated in it now go to "
            f"{L.next_period(period)}"
        )
        return 0

    return _run(args, body)


@_command
def cmd_billing_settlement(args: argparse.Namespace) -> int:
    period = _period(args.period)

    async def body(b: Billing) -> int:
        st = await b.db.transaction(lambda tx: S.provider_settlement(tx, args.provider, period))
        if args.format == "json":
            _json(st)
            return 0
        print(f"Settlement for provider {args.provider}, {period}")
        if not st["lines"]:
            print("  nothing owed")
            return 0
        print_table(
            ["MODEL", "CURRENCY", "OWED", "POSTINGS"],
            [[x["model"], x["currency"], x["text"], str(x["postings"])] for x in st["lines"]],
        )
        for cur, t in sorted(st["totals"].items()):
            print(f"total owed: {t['text']} (invoice: {fmt(t['owed'], cur)})")
        return 0

    return _run(args, body)


@_command
def cmd_billing_check(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        problems, n_txns, n_postings = await b.db.transaction(ledger_check)
        if not problems:
            print(
                f"ledger OK: {n_txns} transactions, {n_postings} postings; every transaction "
                "balances per unit and every constrained account matches its postings and "
                "stays within its limit; every budget pot within its cap"
            )
            return 0
        for p in problems:
            print(p)
        print(f"{PROG}: error: the ledger check found {len(problems)} problems", file=sys.stderr)
        return 1

    return _run(args, body)


# -- billing: quarantine --------------------------------------------------------------------


@_command
def cmd_quarantine_list(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        found = await b.db.transaction(Q.quarantined)
        if args.format == "json":
            _json([q.__dict__ for q in found])
            return 0
        if not found:
            print("no usage event is quarantined")
            return 0
        print_table(
            ["EVENT", "TENANT", "MODEL", "TIME", "ATTEMPTS", "REASON"],
            [
                [q.event_id, q.tenant, q.model, iso_time(q.ts_ms), str(q.attempts), q.reason]
                for q in found
            ],
        )
        return 0

    return _run(args, body)


@_command
def cmd_quarantine_release(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        done = await b.db.transaction(lambda tx: Q.release(tx, args.event_ids))
        print(f"released {len(done)} events: the next settlement pass settles them again")
        return 0

    return _run(args, body)


@_command
def cmd_quarantine_void(args: argparse.Namespace) -> int:
    async def body(b: Billing) -> int:
        done = await b.db.transaction(lambda tx: Q.void(tx, args.event_ids, args.memo or ""))
        print(f"voided {len(done)} events: settled with no charge, recorded in the audit log")
        return 0

    return _run(args, body)


# -- billing: rollups -----------------------------------------------------------------------


@_command
def cmd_rollups_rebuild(args: argparse.Namespace) -> int:
    since = _time(args.since)

    def progress(n: int) -> None:
        print(f"rollups rebuild: {n} events read", file=sys.stderr, flush=True)

    async def body(b: Billing) -> int:
        n, rows = await b.db.transaction(
            lambda tx: R.rebuild(tx, dialect=b.db.dialect, since=since, progress=progress)
        )
        print(f"rebuilt usage rollups from {n} settled events ({rows} rows)")
        return 0

    return _run(args, body)


# -- wiring -----------------------------------------------------------------------------------


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        metavar="URL_OR_PATH",
        help=f"database: a path, sqlite:///ABSOLUTE/PATH or postgresql://USER@HOST/DB "
        f"(default: ${ENV_DB}, else ./{DEFAULT_DATABASE})",
    )


def _group(sub: Any, name: str, help: str, description: str) -> Any:
    g = sub.add_parser(name, help=help, description=description)
    g.set_defaults(func=group_help(g))
    return g.add_subparsers(dest="action", metavar="ACTION")


def _cmd(
    sub: Any, name: str, fn: Command, help: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, epilog=epilog or None
    )
    p.set_defaults(func=fn)
    return p


def add_cli(sub: Any) -> None:
    """Add `plans`, `wallet`, `codes`, `fx`, `prices` and `billing` to `sub`."""
    _add_plans(sub)
    _add_wallet(sub)
    _add_codes(sub)
    _add_fx(sub)
    _add_prices(sub)
    _add_billing(sub)


def _add_plans(sub: Any) -> None:
    g = _group(
        sub,
        "plans",
        "create, list and sell plans (token packages and point packs)",
        "A plan is a product: a number of tokens (a package) or points (a point pack) for a "
        "price, valid for a period. Selling it to a tenant makes a lot, paid from the "
        "tenant's wallet (else its credit line).",
    )
    p = _cmd(
        g,
        "create",
        cmd_plans_create,
        "create a plan",
        "Create a plan. A package (--tokens) is drawn by usage of the models it covers; when "
        "a tenant's packages in scope are used up, the rest of the usage is billed at "
        "--overage-per-1m (in --overage-currency, default the plan's, converted at the FX rate "
        "of the event's time), or more tokens are bought with --auto-topup (the same block "
        "at the plan's price pro rata, from the wallet or credit line), or it goes on to the "
        "next source of the tenant's draw order (--hard-stop, the default). A point pack "
        "(--points) pays for usage at each model's points per 1M tokens (tokenhub prices set "
        "--points). The lot's price is earned as its tokens or points are used; what is left "
        "at the end of the period is breakage, or carries over with --rollover.",
        f"{AMOUNTS} {PRICES} {ROUNDING}",
    )
    p.add_argument("name", metavar="NAME", help="1-64 characters from A-Z a-z 0-9 . _ -")
    p.add_argument(
        "--price",
        required=True,
        metavar="AMOUNT",
        help="what the plan costs, e.g. 9.90 (whole minor units)",
    )
    p.add_argument(
        "--currency",
        required=True,
        metavar="CUR",
        help="currency of the price; a tenant buys it only in its own currency",
    )
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--tokens", type=int, metavar="N", help="a package of N tokens")
    q.add_argument("--points", metavar="P", help="a point pack of P points (up to 9 decimals)")
    p.add_argument(
        "--period",
        required=True,
        choices=PERIODS,
        help="validity from the start: a calendar month (same day next month, UTC), "
        "7 days, 1 day, or none (no end)",
    )
    e = p.add_mutually_exclusive_group()
    e.add_argument(
        "--overage-per-1m",
        metavar="PRICE",
        help="when used up: bill further tokens at PRICE per 1M tokens",
    )
    e.add_argument(
        "--hard-stop",
        action="store_true",
        help="when used up: no overage; further usage goes to the next source of "
        "the tenant's draw order (the default)",
    )
    e.add_argument(
        "--auto-topup",
        type=int,
        metavar="TOKENS",
        help="when used up: add TOKENS to the lot at the plan's price pro rata",
    )
    p.add_argument(
        "--overage-currency",
        metavar="CUR",
        help="currency of --overage-per-1m (default: the plan's)",
    )
    p.add_argument(
        "--rollover",
        action="store_true",
        help="at the end of the period, carry what is left into a lot with no end",
    )
    p.add_argument(
        "--models", metavar="A,B", help="comma-separated model ids the plan covers (default: all)"
    )
    _add_db(p)

    p = _cmd(
        g,
        "list",
        cmd_plans_list,
        "list plans",
        "List plans: price, quantity, period, what happens when used up, models.",
        AMOUNTS,
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array (amounts and prices as exact decimal strings)",
    )
    _add_db(p)

    p = _cmd(
        g,
        "assign",
        cmd_plans_assign,
        "sell a plan to a tenant",
        "Sell a plan to a tenant: a new lot of the plan's tokens or points, valid from --start "
        "for the plan's period, paid now from the tenant's wallet, then its credit line. "
        "Refused (nothing changes) when they cannot cover the price, or when the plan's "
        "currency is not the tenant's. Prints the lot id and its validity window.",
        DATES,
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("plan", metavar="NAME", help="the plan's name")
    p.add_argument("--start", metavar="DATE", help="start of validity (default: now)")
    _add_db(p)


def _add_wallet(sub: Any) -> None:
    g = _group(
        sub,
        "wallet",
        "top up, show and adjust tenant wallets",
        "A tenant's wallet holds prepaid money in its settlement currency (tokenhub billing "
        "profile). Usage that no package or point pack covers is paid from it, then from the "
        "credit line (receivable); what neither covers is recorded as overrun (debt).",
    )
    p = _cmd(
        g,
        "topup",
        cmd_wallet_topup,
        "add money received to a tenant's wallet",
        "Record money received from a tenant into its wallet. The currency must be the "
        "tenant's settlement currency.",
        AMOUNTS,
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("amount", metavar="AMOUNT", help="a positive amount, e.g. 100.00")
    p.add_argument("currency", metavar="CURRENCY")
    _add_db(p)

    p = _cmd(
        g,
        "show",
        cmd_wallet_show,
        "show a tenant's balances",
        "Show a tenant's balances from its side: what the wallet holds, what it owes on its "
        "credit line (receivable) and as overrun, and each active lot's tokens or points left "
        "with its validity. Money is shown exactly (usage is rated to the nano); warns when "
        "the wallet is below the profile's low-balance threshold.",
        ROUNDING,
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument(
        "--json", action="store_true", help="print a JSON object (amounts as exact decimal strings)"
    )
    _add_db(p)

    p = _cmd(
        g,
        "adjust",
        cmd_wallet_adjust,
        "correct a tenant's wallet",
        "An operator's correction to a tenant's wallet, with a memo saying why: a positive "
        "amount credits it, a negative one debits it (never below zero). Balanced against "
        "the operator's promotions account; shows in the statement under adjustments.",
        AMOUNTS,
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("amount", metavar="AMOUNT", help="e.g. 5.00 or -5.00")
    p.add_argument("currency", metavar="CURRENCY")
    p.add_argument("--memo", required=True, metavar="TEXT", help="why (kept in the ledger)")
    _add_db(p)


def _add_codes(sub: Any) -> None:
    g = _group(
        sub,
        "codes",
        "create and redeem single-use redemption codes",
        "Redemption codes credit a tenant's wallet once. tokenhub keeps only their "
        "SHA-256 hashes, so codes are shown once, when created.",
    )
    p = _cmd(
        g,
        "create",
        cmd_codes_create,
        "create codes and print them (once)",
        "Create single-use codes, each worth --amount, and print them one per line. They "
        "are shown only once: save them now.",
        f"{AMOUNTS} {DATES}",
    )
    p.add_argument("--count", required=True, type=int, metavar="N", help="how many (1-100000)")
    p.add_argument("--amount", required=True, metavar="AMOUNT", help="value of each code")
    p.add_argument(
        "--currency",
        required=True,
        metavar="CUR",
        help="a code is redeemable only by tenants settling in this currency",
    )
    p.add_argument("--expires", metavar="DATE", help="not redeemable from then on")
    _add_db(p)
    p = _cmd(
        g,
        "redeem",
        cmd_codes_redeem,
        "redeem a code into a tenant's wallet",
        "Credit a code's value to a tenant's wallet. A code works once, before it "
        "expires, for a tenant settling in the code's currency.",
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("code", metavar="CODE")
    _add_db(p)


def _add_fx(sub: Any) -> None:
    g = _group(
        sub,
        "fx",
        "set and list exchange rates",
        "Effective-dated exchange rates. A charge in another currency than the "
        "tenant's (a USD list price, a USD overage) is converted at the rate in force "
        "at the usage event's time.",
    )
    p = _cmd(
        g,
        "set",
        cmd_fx_set,
        "set an exchange rate from a date",
        "Set 1 BASE = RATE QUOTE from --from on (replacing a rate set for the same instant). "
        "When only QUOTE/BASE is set, its inverse is used (12 decimals).",
        f"{DATES} Rates are exact decimals (> 0, at most 12 decimals). {ROUNDING}",
    )
    p.add_argument("base", metavar="BASE")
    p.add_argument("quote", metavar="QUOTE")
    p.add_argument("rate", metavar="RATE", help="units of QUOTE per 1 BASE, e.g. 7.1")
    p.add_argument(
        "--from", dest="effective", required=True, metavar="DATE", help="in force from this time"
    )
    _add_db(p)
    p = _cmd(g, "list", cmd_fx_list, "list exchange rates", "List every rate and when it starts.")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    _add_db(p)


def _add_prices(sub: Any) -> None:
    g = _group(
        sub,
        "prices",
        "the price book: list prices and tenant overrides",
        "The price book prices usage that no package or point pack covers. Each change "
        "is a new version, effective from a time, so past usage keeps the price it "
        "had.",
    )
    p = _cmd(
        g,
        "set",
        cmd_prices_set,
        "add a price-book version for a model",
        "Add a price-book version for MODEL (for one tenant with --tenant: an override that "
        "wins over the list price). Usage is rated per line: uncached input, cached input, "
        "output and prompt-cache write tokens each times their price per 1M; then the "
        "tenant's discount, then FX into the tenant's currency.",
        f"{PRICES} {DATES} {ROUNDING}",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--currency", required=True, metavar="CUR")
    p.add_argument("--input", required=True, metavar="PRICE", help="per 1M input tokens")
    p.add_argument("--output", required=True, metavar="PRICE", help="per 1M output tokens")
    p.add_argument(
        "--cached-input",
        metavar="PRICE",
        help="per 1M cached input tokens (default: the input price)",
    )
    p.add_argument(
        "--cache-write",
        "--cache-write-per-1m",
        dest="cache_write",
        metavar="PRICE",
        help="per 1M input tokens written to the provider's prompt cache (Anthropic's "
        "cache_creation_input_tokens; default: the input price)",
    )
    p.add_argument(
        "--points",
        metavar="P",
        help="points per 1M tokens drawn from point packs (default: none: point "
        "packs do not pay for this model)",
    )
    p.add_argument(
        "--from", dest="effective", metavar="DATE", help="in force from this time (default: now)"
    )
    p.add_argument("--tenant", metavar="T", help="an override for this tenant only")
    _add_db(p)
    p = _cmd(
        g,
        "list",
        cmd_prices_list,
        "list the price book",
        "List every price-book version (prices per 1M tokens).",
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON array (prices as exact decimal strings)"
    )
    _add_db(p)
    p = _cmd(
        g,
        "import",
        cmd_prices_import,
        "import list prices from a gateway config",
        "Add one price-book version per model of a gateway config file, from the price of its "
        "first deployment. Models whose price in force is the same are skipped, so importing "
        "twice adds nothing; models without a price are listed. A model's points per 1M "
        "tokens (not part of the config) are kept. Every price is checked before any is "
        "written.",
        f"{PRICES} {DATES}",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the TOML config")
    p.add_argument(
        "--from", dest="effective", metavar="DATE", help="in force from this time (default: now)"
    )
    _add_db(p)


def _add_billing(sub: Any) -> None:
    g = _group(
        sub,
        "billing",
        "profiles, splits, settlement, statements and ledger checks",
        "Billing operations on the double-entry ledger: tenant profiles, provider revenue "
        "splits, settling usage events, expiry, refunds, statements, provider settlements, "
        "and a consistency check. Exit status: 0 done, 2 refused as given (nothing changed), "
        "1 operational failure.",
    )
    billing_io.add_commands(None, g)  # reconcile, export
    p = _cmd(
        g,
        "profile",
        cmd_billing_profile,
        "show or change a tenant's billing profile",
        "Show a tenant's billing profile, changing the given fields first. A tenant without "
        "one settles in USD, draws package, points, wallet, postpaid, with no credit. The "
        "currency cannot change once the tenant holds money.",
        AMOUNTS,
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--currency", metavar="CUR", help="settlement currency")
    p.add_argument(
        "--order",
        metavar="SOURCES",
        help=f"draw order, comma-separated, from {','.join(DRAW_ORDER)}",
    )
    p.add_argument(
        "--credit-limit", metavar="AMOUNT", help="how much postpaid usage the tenant may owe"
    )
    p.add_argument(
        "--low-balance", metavar="AMOUNT", help="warn (wallet show) when the wallet holds less"
    )
    p.add_argument(
        "--discount",
        metavar="PCT",
        help="percent off list prices for usage paid in money (up to 4 decimals)",
    )
    _add_db(p)

    p = _cmd(
        g,
        "split",
        cmd_billing_split,
        "set a provider's revenue split from a date",
        "Set how money earned on a provider's usage is split: --platform percent to platform "
        "revenue, --channel percent to the channel, the rest owed to the provider. Without a "
        "split, everything is owed to the provider.",
        f"Percentages have at most 4 decimals. {DATES} {ROUNDING}",
    )
    p.add_argument("provider", metavar="PROVIDER")
    p.add_argument("--platform", required=True, metavar="PCT", help="platform share, percent")
    p.add_argument("--channel", default="0", metavar="PCT", help="channel share, percent")
    p.add_argument(
        "--from", dest="effective", metavar="DATE", help="in force from this time (default: now)"
    )
    _add_db(p)

    p = _cmd(
        g,
        "settle",
        cmd_billing_settle,
        "settle the usage events not yet settled",
        "Settle every usage event of the database that is not settled yet, in batches (one "
        "transaction each; an event is settled once, so running again settles only what is "
        "new). Events that cannot be rated yet (no price, no FX rate) are recorded as "
        "failures and skipped by later runs until --retry-failed; an event that cannot settle "
        "as it is (usage out of bounds, an amount beyond the ledger's range) is quarantined "
        "(tokenhub billing quarantine) and blocks no other. Prints one summary line; "
        "progress goes to stderr. Exit status 1 when some events were not settled.",
        ROUNDING,
    )
    p.add_argument(
        "--retry-failed", action="store_true", help="also retry events that failed before"
    )
    p.add_argument(
        "--follow",
        type=float,
        metavar="SECONDS",
        help="keep running: settle new events every SECONDS until Ctrl-C (a settlement worker)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1000,
        metavar="N",
        help="events per transaction (default: 1000)",
    )
    p.add_argument(
        "--quota",
        metavar="PATH",
        help="with --follow: also keep this quota table's money pots equal to the ledger, for "
        "a gateway's money admission (tokenhub serve's settler process runs this loop so)",
    )
    p.add_argument(
        "--parent",
        type=int,
        metavar="PID",
        help="with --follow: stop (after a last pass) when process PID is no longer the parent",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=0,
        metavar="N",
        help="with --follow, on PostgreSQL: share the work with the other settlers given the "
        "same N (one per host), each settling the tenant partitions it holds through advisory "
        "locks; a dead settler's partitions go to the others on their next pass (no-op on "
        "SQLite)",
    )
    _add_db(p)

    p = _cmd(
        g,
        "expire",
        cmd_billing_expire,
        "end lots whose validity is over",
        "End every lot whose validity ended by --now: its unused tokens or points and the part "
        "of its price not yet earned go to breakage, or roll over into a lot with no end "
        "when its plan says so.",
        DATES,
    )
    p.add_argument("--now", metavar="DATE", help="the time to expire at (default: now)")
    _add_db(p)

    p = _cmd(
        g,
        "refund",
        cmd_billing_refund,
        "reverse a settled usage event",
        "Reverse every posting of a settled usage event (money back to where it came "
        "from, tokens and points back into their lots). Once per event.",
    )
    p.add_argument("event_id", metavar="EVENT_ID", help="the usage event's request id")
    p.add_argument("--memo", metavar="TEXT", help="why")
    _add_db(p)

    p = _cmd(
        g,
        "statement",
        cmd_billing_statement,
        "a tenant's statement for a month",
        "A tenant's statement for a period: opening balances, purchases, usage by model, "
        "overage, breakage, top-ups and adjustments, closing balances. Computed from the "
        "postings (or as stored, once the period is closed). Money is shown exactly, purchases "
        "in minor units.",
        f"{PERIOD} {ROUNDING}",
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--period", required=True, metavar="YYYY-MM")
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text (default) or JSON (amounts in integer nanos)",
    )
    _add_db(p)

    p = _cmd(
        g,
        "invoice",
        cmd_billing_invoice,
        "invoice a postpaid tenant for a month",
        "The postpaid invoice for a period: the receivable owed for everything posted up to "
        "that month. Usage is rated to the nano; the invoice rounds the amount owed DOWN to "
        "the currency's minor unit (in the tenant's favour) and writes the fraction off to "
        "the operator's rounding account. One invoice per tenant and month.",
        PERIOD,
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--period", required=True, metavar="YYYY-MM")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _add_db(p)

    p = _cmd(
        g,
        "pay",
        cmd_billing_pay,
        "record a payment against a postpaid receivable",
        "Money received from a postpaid tenant, credited to its receivable (at most what it "
        "owes). AMOUNT in whole minor units of the tenant's currency.",
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("amount", metavar="AMOUNT")
    p.add_argument("currency", metavar="CURRENCY")
    _add_db(p)

    p = _cmd(
        g,
        "close",
        cmd_billing_close,
        "close a tenant's statement for a month",
        "Freeze a tenant's statement for a period. Periods close in order; postings dated "
        "in a closed period go to the next open one, so a closed statement never changes.",
        PERIOD,
    )
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--period", required=True, metavar="YYYY-MM")
    _add_db(p)

    p = _cmd(
        g,
        "settlement",
        cmd_billing_settlement,
        "what the operator owes a provider for a month",
        "What the operator owes a provider for a period, by model and currency: its share "
        "of the money earned on its usage (after the revenue split). Amounts are exact; the "
        "total is also shown in minor units (half-to-even) for the invoice.",
        f"{PERIOD} {ROUNDING}",
    )
    p.add_argument("provider", metavar="PROVIDER")
    p.add_argument("--period", required=True, metavar="YYYY-MM")
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text table (default) or JSON (amounts in integer nanos)",
    )
    _add_db(p)

    p = _cmd(
        g,
        "check",
        cmd_billing_check,
        "check the ledger's invariants",
        "Check the books: every transaction sums to zero per unit, every constrained "
        "account's balance equals the sum of its postings and is within its limit (no "
        "negative wallet or lot, no receivable over the credit limit), and no usage event is "
        "quarantined (tokenhub billing quarantine). Lists the problems and exits 1 if there "
        "are any.",
    )
    _add_db(p)

    q = g.add_parser(
        "quarantine",
        help="usage events set aside by settlement: list, release, void",
        description="Usage events whose settlement cannot succeed as they are (token counts "
        "out of bounds, an amount beyond the ledger's 64-bit range, an unexpected error) are "
        "quarantined: set aside so that they block no other event, skipped even by settle "
        "--retry-failed, and named by billing check. Release one to settle it again (after a "
        "fix), or void it (never billed: settled with no charge, and recorded in the audit "
        "log).",
    )
    q.set_defaults(func=group_help(q))
    qs = q.add_subparsers(dest="quarantine_action", metavar="ACTION")
    p = _cmd(qs, "list", cmd_quarantine_list, "list quarantined events", "List the "
             "quarantined usage events with the reason each one failed.")  # fmt: skip
    p.add_argument("--format", choices=("text", "json"), default="text")
    _add_db(p)
    p = _cmd(qs, "release", cmd_quarantine_release, "settle events again", "Take events "
             "out of quarantine: the next settlement pass tries them again.")  # fmt: skip
    p.add_argument("event_ids", nargs="+", metavar="EVENT_ID")
    _add_db(p)
    p = _cmd(qs, "void", cmd_quarantine_void, "never bill events", "Settle quarantined "
             "events with no charge: they are never billed. Each is recorded in the audit log "
             "(tokenhub audit) with its quarantine reason and --memo.")  # fmt: skip
    p.add_argument("event_ids", nargs="+", metavar="EVENT_ID")
    p.add_argument("--memo", metavar="TEXT", help="why (kept in the audit log)")
    _add_db(p)

    r = g.add_parser(
        "rollups",
        help="the hourly usage rollups: rebuild",
        description="The hourly usage rollups (tokenhub.billing.rollups) are kept by the "
        "transaction that settles usage; rebuild recomputes them from the settled events "
        "(the backfill of a database settled before they existed).",
    )
    r.set_defaults(func=group_help(r))
    rs = r.add_subparsers(dest="rollups_action", metavar="ACTION")
    p = _cmd(rs, "rebuild", cmd_rollups_rebuild, "recompute from the settled events",
             "Recompute the usage rollups of the hours from --since (all when absent) from "
             "the settled events, in one transaction; one progress line per 100000 events on "
             "stderr.")  # fmt: skip
    p.add_argument("--since", metavar="TIME", help="ISO date/time or Unix ms (default: all)")
    _add_db(p)
