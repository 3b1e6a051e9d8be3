"""Billing operations: profiles, price books, FX, revenue splits, plans and lots, wallets,
redemption codes, usage settlement, expiry, refunds.

`Billing(db)` wraps a `tokenhub.db.database.Database`; every method is one database transaction.
Usage settlement (`settle`) rates each event and draws it down from the tenant's contracts in
the tenant's order (default: package, points, wallet, postpaid), as `tokenhub.billing.draw`
(the function money admission reserves by too) decides, and posts the draws:

1. **package** lots (token packages) active at the event's time whose model scope includes the
   event's model, soonest-expiring first. Tokens are taken from the event's lines in the order
   uncached input, prompt-cache writes, cached input, output (`draw.TAKE_ORDER`). Each consumed
   token earns its share of the lot's price (deferred revenue -> revenue split); cumulative rounding
   makes a fully used lot earn exactly its price. When the lots in scope run out, the last one's
   exhaustion rule applies to the rest: `overage` bills the remaining tokens at the plan's overage
   price, `auto_topup` adds the plan's top-up block to the lot (paid pro rata from the wallet and
   credit line, as far as the draw order names them, while they can pay a whole block) and keeps
   drawing, and `hard_stop` passes the rest on to the next contract (admission stops such traffic
   earlier; see the quota issue).
2. **points** lots: the model's points per 1M tokens (price book) are drawn from point packs.
3. **wallet**: the rest is priced from the price book (tenant override first, then the model's list
   price, each the latest version effective at the event's time), each line at its own price rounded
   once (uncached input, cached input, output, and prompt-cache writes at the cache-write price, the
   input price when none is set), less the tenant's discount, converted to the tenant's currency at
   the FX rate effective at the event's time, and debited from the prepaid wallet as far as it goes.
4. **postpaid**: what the wallet could not pay goes to the receivable, up to the credit limit.
5. anything left is posted to the tenant's `overrun` account: usage that happened and that no
   contract covered is never dropped, it shows as debt.

Money received for usage is split per provider (revenue split effective at the event's time:
platform %, channel %, the rest to the provider) by largest remainder. Every usage transaction
records the price version, lots, rates and split it used, so it can be re-derived.

Idempotency: an event id is settled once. The same id with the same payload is a duplicate
(nothing posted); with a different payload it is a conflict (reported, nothing posted).

Only what the upstream served is billed (`tokenhub.usage.billed_lines`: status 200 or 499); an
event of a failed, refused or interrupted request settles as posting nothing.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

import msgspec

from tokenhub.billing import ledger as L
from tokenhub.billing import rollups
from tokenhub.billing import terms as terms_sql
from tokenhub.billing.draw import PPM, Draw, NoRate, draw, lot_pot, money_pot
from tokenhub.billing.ledger import AccountSpec, Book, LedgerError, Txn
from tokenhub.billing.terms import (
    DRAW_ORDER,
    LOT_COLS,
    PROFILE_COLS,
    Lot,
    Price,
    Profile,
    bump,
    fx_in,
    lot_from_row,
    price_in,
    profile_from_row,
)
from tokenhub.db.database import Database, DatabaseError, Tx
from tokenhub.money import (
    NANOS,
    POINTS,
    TOKENS,
    AmountRangeError,
    MoneyError,
    allocate,
    check_currency,
    div_half_even,
    fmt,
    minor_units,
    parse_amount,
    parse_price,
    parse_rate,
)
from tokenhub.usage import BILLED_FIELDS, LATER_FIELDS, UsageEvent, billed_lines, usage_problem

PERIODS = ("month", "week", "day", "none")
EXHAUSTION = ("overage", "hard_stop", "auto_topup")


class BillingError(LedgerError):
    """A billing request that cannot be carried out (the message says why)."""


class Quarantine(BillingError):
    """A usage event whose settlement cannot succeed as it is, whatever is configured: counts
    out of bounds (`tokenhub.usage.usage_problem`), an amount beyond the ledger's range, an
    unexpected error. It is set aside (`settlement_failures.quarantined`) so that it blocks no
    other event, until `tokenhub billing quarantine release` or `void`."""


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    name: str
    kind: str  # package | points
    price: int
    currency: str
    quantity: int  # tokens, or nano-points
    period: str
    exhaustion: str
    overage_per_1m: int | None
    overage_currency: str
    auto_topup: int | None
    rollover: bool
    models: tuple[str, ...]  # empty: every model


_PLAN_COLS = (
    "name, kind, price, currency, quantity, period, exhaustion, overage_per_1m, "
    "overage_currency, auto_topup, rollover, models"
)


@dataclass
class SettleResult:
    settled: int = 0
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (event id, reason)
    txn_ids: dict[str, str] = field(default_factory=dict)
    quarantined: set[str] = field(default_factory=set)  # of the failed: set aside (Quarantine)


# Work done in a settling transaction after its postings: (tx, its events, its result).
AlsoInTx = Callable[[Tx, list[UsageEvent], SettleResult], Awaitable[None]]


def now_ms() -> int:
    return int(time.time() * 1000)


def _payload_hash(ev: UsageEvent) -> str:
    """Canonical: every billing field in declaration order (defaults included), so equal events
    hash equal however they were built (msgspec's omit_defaults depends on object identity).
    `holds` (the gateway's admission bookkeeping) is not billing data and is left out, as are
    LATER_FIELDS at the end while they hold their default (events settled before they existed
    hash as they did then: one settled with a `usage_anomaly` before `cache_write_tokens`
    existed hashes with the first and without the second)."""
    fields = msgspec.structs.astuple(ev)[:_HASHED]
    n = _HASHED
    while n > _OLD_HASHED and not fields[n - 1]:
        n -= 1
    if n < _HASHED:
        fields = fields[:n]
    return hashlib.sha256(msgspec.json.encode(fields)).hexdigest()


_HASHED = len(BILLED_FIELDS)
_OLD_HASHED = _HASHED - len(LATER_FIELDS)
assert BILLED_FIELDS[_OLD_HASHED:] == LATER_FIELDS


def _check_tenant(tenant: str) -> str:
    """Tenant names follow the gateway's rule (A-Z a-z 0-9 . _ -, 1-64 characters): account
    ids are built from them, so a ':' must never get through."""
    from tokenhub.store.base import StoreError, check_tenant_name

    try:
        check_tenant_name(tenant)
    except StoreError as e:
        raise BillingError(str(e)) from None
    return tenant


def _pct_ppm(value: str | Decimal, what: str) -> int:
    try:
        d = Decimal(str(value))
    except Exception:
        raise BillingError(f"{what} must be a number (got {value!r})") from None
    if not d.is_finite():
        raise BillingError(f"{what} must be a finite number (got {value!r})")
    ppm = d * 10_000
    if ppm != int(ppm):
        raise BillingError(f"{what} has more than 4 decimals")
    return int(ppm)


def _split_ppm(platform_pct: str | Decimal, channel_pct: str | Decimal) -> tuple[int, int]:
    pp = _pct_ppm(platform_pct, "platform percentage")
    cp = _pct_ppm(channel_pct, "channel percentage")
    if pp < 0 or cp < 0 or pp + cp > PPM:
        raise BillingError("platform and channel percentages must be >= 0 and sum to at most 100")
    return pp, cp


def add_period(start_ms: int, period: str) -> int | None:
    """The end of a validity window that starts at `start_ms` (UTC calendar months)."""
    import datetime as dt

    if period == "none":
        return None
    if period == "day":
        return start_ms + 86_400_000
    if period == "week":
        return start_ms + 7 * 86_400_000
    d = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC)
    y, m = (d.year + (d.month == 12), d.month % 12 + 1)
    import calendar

    day = min(d.day, calendar.monthrange(y, m)[1])
    return int(d.replace(year=y, month=m, day=day).timestamp() * 1000)


# -- the service ------------------------------------------------------------------------------


class Billing:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- profiles --------------------------------------------------------------------------

    async def set_profile(
        self,
        tenant: str,
        *,
        currency: str | None = None,
        draw_order: Sequence[str] | None = None,
        credit_limit: str | None = None,
        low_balance: str | None = None,
        discount_pct: str | None = None,
    ) -> Profile:
        return await self.db.transaction(
            partial(
                set_profile_in,
                tenant=tenant,
                currency=currency,
                draw_order=draw_order,
                credit_limit=credit_limit,
                low_balance=low_balance,
                discount_pct=discount_pct,
            )
        )

    async def profile(self, tenant: str) -> Profile:
        return await self.db.transaction(lambda tx: get_profile(tx, tenant))

    # -- prices, FX, splits ------------------------------------------------------------------

    async def set_price(
        self,
        model: str,
        *,
        currency: str,
        input_per_1m: str | Decimal,
        output_per_1m: str | Decimal,
        cached_input_per_1m: str | Decimal | None = None,
        points_per_1m: str | Decimal | None = None,
        effective_ms: int | None = None,
        tenant: str = "",
        cache_write_per_1m: str | Decimal | None = None,
    ) -> Price:
        """A new price-book version for `model` (a tenant override when `tenant` is given),
        effective from `effective_ms` (default now). Cached input defaults to the input
        price (stored as such); prompt-cache writes to it too (stored as NULL, read as the
        input price: `Price.write_per_1m`)."""
        return await self.db.transaction(
            partial(
                set_price_in,
                model=model,
                currency=currency,
                input_per_1m=input_per_1m,
                output_per_1m=output_per_1m,
                cached_input_per_1m=cached_input_per_1m,
                points_per_1m=points_per_1m,
                effective_ms=effective_ms,
                tenant=tenant,
                cache_write_per_1m=cache_write_per_1m,
            )
        )

    async def prices(self) -> list[Price]:
        return await self.db.transaction(terms_sql.all_prices)

    async def set_fx(
        self, base: str, quote: str, fx_rate: str | Decimal, *, effective_ms: int | None = None
    ) -> Decimal:
        return await self.db.transaction(
            partial(set_fx_in, base=base, quote=quote, fx_rate=fx_rate, effective_ms=effective_ms)
        )

    async def set_split(
        self,
        provider: str,
        *,
        platform_pct: str | Decimal,
        channel_pct: str | Decimal = "0",
        effective_ms: int | None = None,
    ) -> tuple[int, int]:
        return await self.db.transaction(
            partial(
                set_split_in,
                provider=provider,
                platform_pct=platform_pct,
                channel_pct=channel_pct,
                effective_ms=effective_ms,
            )
        )

    # -- plans, lots, wallets, codes -----------------------------------------------------------

    async def create_plan(
        self,
        name: str,
        *,
        price: str,
        currency: str,
        tokens: int | None = None,
        points: str | None = None,
        period: str = "month",
        overage_per_1m: str | None = None,
        overage_currency: str | None = None,
        hard_stop: bool = False,
        auto_topup: int | None = None,
        rollover: bool = False,
        models: Sequence[str] = (),
    ) -> Plan:
        return await self.db.transaction(
            partial(
                create_plan_in,
                name=name,
                price=price,
                currency=currency,
                tokens=tokens,
                points=points,
                period=period,
                overage_per_1m=overage_per_1m,
                overage_currency=overage_currency,
                hard_stop=hard_stop,
                auto_topup=auto_topup,
                rollover=rollover,
                models=models,
            )
        )

    async def plans(self) -> list[Plan]:
        async def run(tx: Tx) -> list[Plan]:
            return [
                _plan(r) for r in await tx.fetch(f"SELECT {_PLAN_COLS} FROM plans ORDER BY name")
            ]

        return await self.db.transaction(run)

    async def assign(self, tenant: str, plan_name: str, *, start_ms: int | None = None) -> Lot:
        """Sells a plan to a tenant: a new lot valid from `start_ms` for the plan's period,
        paid from the wallet (else the credit line) in the plan's currency."""
        return await self.db.transaction(
            lambda tx: assign_in(tx, tenant, plan_name, start_ms=start_ms)
        )

    async def lots(self, tenant: str | None = None) -> list[Lot]:
        async def run(tx: Tx) -> list[Lot]:
            if tenant is None:
                rows = await tx.fetch(f"SELECT {LOT_COLS} FROM lots ORDER BY start_ms, id")
            else:
                rows = await tx.fetch(
                    f"SELECT {LOT_COLS} FROM lots WHERE tenant = $1 ORDER BY start_ms, id",
                    tenant,
                )
            return [lot_from_row(r) for r in rows]

        return await self.db.transaction(run)

    async def topup(
        self, tenant: str, amount: str, currency: str, *, ts_ms: int | None = None, ref: str = ""
    ) -> str:
        """Money received into the tenant's wallet; returns the transaction id."""
        return await self.db.transaction(
            lambda tx: topup_in(tx, tenant, amount, currency, ts_ms=ts_ms, ref=ref)
        )

    async def create_codes(
        self, count: int, amount: str, currency: str, *, expires_ms: int | None = None
    ) -> list[str]:
        """Single-use redemption codes worth `amount` each; the codes are returned once and
        stored only as SHA-256."""
        return await self.db.transaction(
            partial(
                create_codes_in, count=count, amount=amount, currency=currency,
                expires_ms=expires_ms,
            )
        )  # fmt: skip

    async def redeem(self, tenant: str, code: str, *, ts_ms: int | None = None) -> str:
        return await self.db.transaction(lambda tx: redeem_in(tx, tenant, code, ts_ms=ts_ms))

    async def adjust(
        self, tenant: str, amount: str, currency: str, memo: str, *, ts_ms: int | None = None
    ) -> str:
        """An operator's correction to a wallet (`adjust_in`)."""
        return await self.db.transaction(
            partial(adjust_in, tenant=tenant, amount=amount, currency=currency, memo=memo,
                    ts_ms=ts_ms)
        )  # fmt: skip

    async def invoice(
        self, tenant: str, period: str, *, ts_ms: int | None = None
    ) -> dict[str, Any]:
        """The postpaid invoice for a month (`invoice_in`)."""
        return await self.db.transaction(
            partial(invoice_in, tenant=tenant, period=period, ts_ms=ts_ms)
        )

    async def pay(
        self, tenant: str, amount: str, currency: str, *, ts_ms: int | None = None, ref: str = ""
    ) -> str:
        """A payment received against the postpaid receivable (at most what is owed)."""
        return await self.db.transaction(
            partial(pay_in, tenant=tenant, amount=amount, currency=currency, ts_ms=ts_ms, ref=ref)
        )

    # -- usage ------------------------------------------------------------------------------

    async def settle(
        self, events: Iterable[UsageEvent], *, also: AlsoInTx | None = None
    ) -> SettleResult:
        """Settles a batch of usage events in one transaction (see the module docstring). An
        event that cannot be rated (no price, no FX rate) is reported in `failed` and left
        unsettled, to be settled again once the price exists; the rest go on. Each settling
        transaction also adds what it settled to the hourly rollups (tokenhub.billing.rollups)
        and then runs `also`, with its events and result (the lease coordinator's accounting:
        tokenhub.billing.settler)."""
        evs = list(events)

        async def run(tx: Tx, events: list[UsageEvent]) -> SettleResult:
            res = await _settle(tx, events)
            # The hourly rollups, in the same transaction (tokenhub.billing.rollups).
            await rollups.apply_settled(tx, events, res.txn_ids)
            if also is not None:
                await also(tx, events, res)
            return res

        try:
            return await self.db.transaction(partial(run, events=evs))
        except LedgerError:
            if len(evs) == 1:
                raise
        except Exception:
            # Not one of billing's own errors: an event the checks did not foresee (a value
            # the database refuses, a bug). One by one, so that only that event is set aside;
            # an operational failure (the database gone) fails every event and is raised.
            pass
        # One event's postings broke a constraint the batch could not foresee: settle them
        # one by one, so only that event fails.
        total = SettleResult()
        for ev in evs:
            try:
                r = await self.db.transaction(partial(run, events=[ev]))
            except LedgerError as e:
                total.failed.append((ev.request_id, str(e)))
                if isinstance(e, Quarantine):
                    total.quarantined.add(ev.request_id)
                continue
            except Exception as e:
                if await self._unreachable():
                    raise
                total.failed.append((ev.request_id, f"{type(e).__name__}: {e}"[:500]))
                total.quarantined.add(ev.request_id)
                continue
            total.settled += r.settled
            total.duplicates += r.duplicates
            total.conflicts += r.conflicts
            total.failed += r.failed
            total.txn_ids |= r.txn_ids
            total.quarantined |= r.quarantined
        return total

    async def _unreachable(self) -> bool:
        """The database cannot run a trivial query (an operational failure, not an event's)."""
        try:
            await self.db.transaction(lambda tx: tx.fetchval("SELECT 1"))
        except Exception:
            return True
        return False

    async def refund(self, event_id: str, *, memo: str = "", ts_ms: int | None = None) -> str:
        """Reverses a settled usage event's postings (`refund_in`)."""
        return await self.db.transaction(
            partial(refund_in, event_id=event_id, memo=memo, ts_ms=ts_ms)
        )

    async def expire(self, *, now: int | None = None) -> list[str]:
        """Ends every lot whose window closed by `now` (`expire_in`)."""
        return await self.db.transaction(partial(expire_in, now=now))

    async def invariants(self) -> list[str]:
        return await self.db.transaction(L.check_invariants)


# -- helpers used inside transactions ---------------------------------------------------------


async def topup_in(
    tx: Tx, tenant: str, amount: str, currency: str, *, ts_ms: int | None = None, ref: str = ""
) -> str:
    """`Billing.topup` inside the caller's transaction (the admin API records its
    Idempotency-Key and audit entry in the same one); returns the transaction id."""
    cur = check_currency(currency)
    value = parse_amount(amount, cur)
    if value <= 0:
        raise BillingError("a top-up must be positive")
    ts = now_ms() if ts_ms is None else ts_ms
    prof = await _locked_profile(tx, tenant, cur, "top up")
    book = Book(tx)
    await book.load(_tenant_specs(prof, cur))
    txn = Txn("topup", tenant, ts, ref=ref, memo=f"top-up {amount} {cur}")
    txn.move(L.op("cash", cur), L.wallet(tenant, cur), cur, value)
    book.post(txn)
    await book.flush()
    return txn.id


async def assign_in(tx: Tx, tenant: str, plan_name: str, *, start_ms: int | None = None) -> Lot:
    """`Billing.assign` inside the caller's transaction (the admin API's plan assignment)."""
    start = now_ms() if start_ms is None else start_ms
    row = await tx.fetchrow(
        f"SELECT {_PLAN_COLS} FROM plans WHERE name = $1",
        plan_name,
    )
    if row is None:
        raise BillingError(f"no plan named {plan_name!r}")
    plan = _plan(row)
    await L.lock_tenants(tx, [tenant])
    prof = await get_profile(tx, tenant)
    lot = Lot(
        L.new_id("lot"), tenant, plan.name, plan.kind, plan.quantity, plan.price,
        plan.currency, start, add_period(start, plan.period), plan.exhaustion,
        plan.overage_per_1m, plan.overage_currency, plan.auto_topup, plan.rollover,
        plan.models, 0, 0, "active",
    )  # fmt: skip
    book = Book(tx)
    unit = TOKENS if plan.kind == "package" else POINTS
    await book.load(_tenant_specs(prof, plan.currency) | _lot_specs(lot))
    txn = Txn("purchase", tenant, start, ref=lot.id, memo=f"plan {plan.name}")
    txn.details = {"plan": plan.name, "price": plan.price, "currency": plan.currency}
    _pay(book, txn, prof, plan.currency, plan.price, L.lot_deferred(tenant, lot.id))
    txn.move(L.op("issued", unit), L.lot_units(tenant, lot.id), unit, plan.quantity)
    book.post(txn)
    await _insert_lot(tx, lot)
    await bump(tx)
    await book.flush()
    return lot


async def redeem_in(tx: Tx, tenant: str, code: str, *, ts_ms: int | None = None) -> str:
    """`Billing.redeem` inside the caller's transaction: the code's amount into the tenant's
    wallet, once; returns the transaction id."""
    digest = hashlib.sha256(code.strip().encode()).hexdigest()
    ts = now_ms() if ts_ms is None else ts_ms
    row = await tx.fetchrow(
        "SELECT amount, currency, expires_ms, redeemed_by FROM redemption_codes "
        f"WHERE sha256 = $1{tx.for_update}",
        digest,
    )
    if row is None:
        raise BillingError("unknown redemption code")
    value, cur, expires, used = row
    await L.lock_tenants(tx, [tenant])
    if used is not None:
        raise BillingError("this redemption code has already been used")
    if expires is not None and ts >= expires:
        raise BillingError("this redemption code has expired")
    prof = await get_profile(tx, tenant)
    if cur != prof.currency:
        raise BillingError(f"this code is in {cur}; tenant {tenant} settles in "
                           f"{prof.currency}")  # fmt: skip
    book = Book(tx)
    await book.load(_tenant_specs(prof, cur))
    txn = Txn("redeem", tenant, ts, ref=digest[:16], memo="redemption code")
    txn.move(L.op("promotions", cur), L.wallet(tenant, cur), cur, value)
    book.post(txn)
    n = await tx.execute(
        "UPDATE redemption_codes SET redeemed_by = $1, redeemed_ms = $2, txn_id = $3 "
        "WHERE sha256 = $4 AND redeemed_by IS NULL",
        tenant, ts, txn.id, digest,
    )  # fmt: skip
    if n != 1:
        raise BillingError("this redemption code has already been used")
    await book.flush()
    return txn.id


# -- the other writes, inside the caller's transaction ------------------------------------------
# The Billing methods above run these in a transaction of their own; the admin API runs them in
# the transaction that also writes its audit entry (and Idempotency-Key record).


async def set_profile_in(
    tx: Tx,
    tenant: str,
    *,
    currency: str | None = None,
    draw_order: Sequence[str] | None = None,
    credit_limit: str | None = None,
    low_balance: str | None = None,
    discount_pct: str | None = None,
) -> Profile:
    """Changes the fields given of a tenant's billing profile; returns the new profile."""
    old = await get_profile(tx, tenant)
    cur = check_currency(currency) if currency else old.currency
    if currency and cur != old.currency and await _has_money(tx, tenant, old.currency):
        raise BillingError(
            f"tenant {tenant} already holds {old.currency} balances; its settlement "
            f"currency cannot change to {cur}"
        )
    order = tuple(draw_order) if draw_order is not None else old.draw_order
    bad = [x for x in order if x not in DRAW_ORDER] or (len(set(order)) != len(order))
    if bad or not order:
        raise BillingError(f"draw order must be distinct names from {', '.join(DRAW_ORDER)}")
    limit = parse_amount(credit_limit, cur) if credit_limit is not None else None
    low = parse_amount(low_balance, cur) if low_balance is not None else old.low_balance
    disc = old.discount_ppm
    if discount_pct is not None:
        disc = _pct_ppm(discount_pct, "discount")
        if not 0 <= disc <= PPM:
            raise BillingError("discount must be a percentage from 0 to 100")
    new = Profile(tenant, cur, order, limit if limit is not None else old.credit_limit, low, disc)
    await tx.execute("DELETE FROM billing_profiles WHERE tenant = $1", tenant)
    await tx.execute(
        "INSERT INTO billing_profiles (tenant, currency, draw_order, credit_limit, "
        "low_balance, discount_ppm, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        tenant, new.currency, ",".join(new.draw_order), new.credit_limit,
        new.low_balance, new.discount_ppm, now_ms(),
    )  # fmt: skip
    if limit is not None:
        await tx.execute(
            "UPDATE accounts SET ceiling = $1 WHERE id = $2",
            limit,
            L.receivable(tenant, new.currency),
        )
    await bump(tx)
    return new


async def set_price_in(
    tx: Tx,
    model: str,
    *,
    currency: str,
    input_per_1m: str | Decimal,
    output_per_1m: str | Decimal,
    cached_input_per_1m: str | Decimal | None = None,
    points_per_1m: str | Decimal | None = None,
    effective_ms: int | None = None,
    tenant: str = "",
    cache_write_per_1m: str | Decimal | None = None,
) -> Price:
    """`Billing.set_price` inside the caller's transaction."""
    cur = check_currency(currency)
    inp = parse_price(input_per_1m, "input price")
    out = parse_price(output_per_1m, "output price")
    cached = (
        parse_price(cached_input_per_1m, "cached-input price")
        if cached_input_per_1m is not None
        else inp
    )
    write = (
        parse_price(cache_write_per_1m, "cache-write price")
        if cache_write_per_1m is not None
        else None
    )
    pts = parse_price(points_per_1m, "points") if points_per_1m is not None else None
    if tenant:
        _check_tenant(tenant)
    eff = now_ms() if effective_ms is None else effective_ms
    return await terms_sql.insert_price(
        tx, model, tenant, eff, cur, inp, cached, out, pts, now_ms(), write
    )


async def set_fx_in(
    tx: Tx, base: str, quote: str, fx_rate: str | Decimal, *, effective_ms: int | None = None
) -> Decimal:
    """An FX rate (units of `quote` per 1 `base`) effective from `effective_ms` (default now)."""
    b, q = check_currency(base), check_currency(quote)
    if b == q:
        raise BillingError("an FX rate needs two different currencies")
    r = parse_rate(fx_rate)
    eff = now_ms() if effective_ms is None else effective_ms
    await terms_sql.set_fx_rate(tx, b, q, eff, r, now_ms())
    return r


async def set_split_in(
    tx: Tx,
    provider: str,
    *,
    platform_pct: str | Decimal,
    channel_pct: str | Decimal = "0",
    effective_ms: int | None = None,
) -> tuple[int, int]:
    """A provider's revenue split (platform and channel, in ppm) from `effective_ms`."""
    pp, cp = _split_ppm(platform_pct, channel_pct)
    eff = now_ms() if effective_ms is None else effective_ms
    await tx.execute(
        "DELETE FROM revenue_splits WHERE provider = $1 AND effective_ms = $2", provider, eff
    )
    await tx.execute(
        "INSERT INTO revenue_splits (provider, effective_ms, platform_ppm, channel_ppm, "
        "created_ms) VALUES ($1, $2, $3, $4, $5)",
        provider, eff, pp, cp, now_ms(),
    )  # fmt: skip
    return pp, cp


async def create_plan_in(
    tx: Tx,
    name: str,
    *,
    price: str,
    currency: str,
    tokens: int | None = None,
    points: str | None = None,
    period: str = "month",
    overage_per_1m: str | None = None,
    overage_currency: str | None = None,
    hard_stop: bool = False,
    auto_topup: int | None = None,
    rollover: bool = False,
    models: Sequence[str] = (),
) -> Plan:
    """`Billing.create_plan` inside the caller's transaction."""
    cur = check_currency(currency)
    amount = parse_amount(price, cur)
    if (tokens is None) == (points is None):
        raise BillingError("a plan sells either --tokens or --points")
    if tokens is not None and tokens <= 0:
        raise BillingError("--tokens must be positive")
    kind = "package" if tokens is not None else "points"
    qty = tokens if tokens is not None else parse_price(points or "0", "points")
    if qty <= 0:
        raise BillingError("the plan's quantity must be positive")
    if period not in PERIODS:
        raise BillingError(f"period must be one of {', '.join(PERIODS)}")
    modes = [overage_per_1m is not None, hard_stop, auto_topup is not None]
    if sum(modes) > 1:
        raise BillingError("choose one of --overage-per-1m, --hard-stop, --auto-topup")
    exhaustion = "overage" if modes[0] else "auto_topup" if modes[2] else "hard_stop"
    if auto_topup is not None and auto_topup <= 0:
        raise BillingError("--auto-topup must be a positive number of tokens")
    over = parse_price(overage_per_1m, "overage price") if overage_per_1m else None
    over_cur = check_currency(overage_currency) if overage_currency else cur
    plan = Plan(
        name, kind, amount, cur, qty, period, exhaustion, over, over_cur, auto_topup,
        rollover, tuple(models),
    )  # fmt: skip
    if await tx.fetchval("SELECT 1 FROM plans WHERE name = $1", name):
        raise BillingError(f"plan {name!r} already exists")
    await tx.execute(
        f"INSERT INTO plans ({_PLAN_COLS}, created_ms) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        plan.name, plan.kind, plan.price, plan.currency, plan.quantity, plan.period,
        plan.exhaustion, plan.overage_per_1m, plan.overage_currency, plan.auto_topup,
        int(plan.rollover), ",".join(plan.models), now_ms(),
    )  # fmt: skip
    return plan


async def create_codes_in(
    tx: Tx, count: int, amount: str, currency: str, *, expires_ms: int | None = None
) -> list[str]:
    """Single-use redemption codes worth `amount` each, returned once (stored as SHA-256)."""
    cur = check_currency(currency)
    value = parse_amount(amount, cur)
    if value <= 0 or count <= 0:
        raise BillingError("codes need a positive amount and count")
    codes = [f"thc-{secrets.token_urlsafe(15)}" for _ in range(count)]
    await tx.executemany(
        "INSERT INTO redemption_codes (sha256, prefix, amount, currency, expires_ms, "
        "created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (hashlib.sha256(c.encode()).hexdigest(), c[:8], value, cur, expires_ms, now_ms())
            for c in codes
        ],
    )
    return codes


async def adjust_in(
    tx: Tx,
    tenant: str,
    amount: str,
    currency: str,
    memo: str,
    *,
    ts_ms: int | None = None,
    ref: str = "",
) -> str:
    """An operator's correction to a wallet: positive credits it, negative debits it
    (never below zero). Balanced against the promotions account; `memo` is required. Returns
    the transaction id."""
    if not memo.strip():
        raise BillingError("an adjustment needs a memo saying why")
    cur = check_currency(currency)
    value = parse_amount(amount, cur, allow_negative=True)
    if value == 0:
        raise BillingError("an adjustment of zero changes nothing")
    ts = now_ms() if ts_ms is None else ts_ms
    prof = await _locked_profile(tx, tenant, cur, "adjust")
    book = Book(tx)
    await book.load(_tenant_specs(prof, cur))
    txn = Txn("adjustment", tenant, ts, ref=ref, memo=memo)
    txn.move(L.op("promotions", cur), L.wallet(tenant, cur), cur, value)
    book.post(txn)
    await book.flush()
    return txn.id


@dataclass
class WalletView:
    """What `tokenhub wallet show` shows: the profile, money from the tenant's side (what a
    wallet holds; what the receivable and overrun are owed) per kind and currency (the
    settlement currency always present), and the active lots with what each has left."""

    profile: Profile
    money: dict[str, dict[str, int]]  # "wallet" | "receivable" | "overrun" -> currency -> nanos
    lots: list[tuple[Lot, str, int]]  # (lot, TOKENS or POINTS, left)

    @property
    def low(self) -> bool:
        """The wallet is below the low-balance threshold."""
        p = self.profile
        return p.low_balance is not None and self.money["wallet"][p.currency] < p.low_balance


async def wallet_view_in(tx: Tx, tenant: str) -> WalletView:
    prof = await get_profile(tx, tenant)
    bals = await L.balances(tx, tenant=tenant)
    rows = await tx.fetch(
        f"SELECT {LOT_COLS} FROM lots WHERE tenant = $1 AND status = 'active' "
        "ORDER BY start_ms, id",
        tenant,
    )
    money: dict[str, dict[str, int]] = {k: {prof.currency: 0} for k in _VIEW_KINDS}
    for acc, bal in bals.items():
        _, _, kind, unit = acc.split(":", 3)
        if kind in money:
            money[kind][unit] = -bal if kind == "wallet" else bal
    lots = []
    for lot in map(lot_from_row, rows):
        unit = TOKENS if lot.kind == "package" else POINTS
        lots.append((lot, unit, -bals.get(L.lot_units(tenant, lot.id), 0)))
    return WalletView(prof, money, lots)


_VIEW_KINDS = ("wallet", "receivable", "overrun")


async def invoice_in(
    tx: Tx, tenant: str, period: str, *, ts_ms: int | None = None
) -> dict[str, Any]:
    """The postpaid invoice for a month: what the tenant owes on its receivable for
    everything posted up to that period, in whole minor units. Usage is rated to the nano,
    so the amount owed is rounded **down** to the minor unit (in the tenant's favour, so the
    credit line can never be pushed over its limit by rounding) and the fraction is
    written off to `op:rounding`. One invoice per tenant and month."""
    _, end = L.period_bounds(period)
    ts = end - 1 if ts_ms is None else ts_ms
    await L.lock_tenants(tx, [tenant])
    prof = await get_profile(tx, tenant)
    cur = prof.currency
    ref = f"invoice:{period}"
    if await tx.fetchval(
        "SELECT 1 FROM ledger_txns WHERE tenant = $1 AND kind = 'invoice' AND ref = $2",
        tenant,
        ref,
    ):
        raise BillingError(f"{tenant} has been invoiced for {period} already")
    acc = L.receivable(tenant, cur)
    owed = int(
        await tx.fetchval(
            "SELECT COALESCE(SUM(p.amount), 0) FROM postings p "
            "JOIN ledger_txns t ON t.id = p.txn_id WHERE p.account = $1 AND t.period <= $2",
            acc,
            period,
        )
    )
    step = 10 ** (9 - minor_units(cur))
    due = (owed // step) * step if owed > 0 else 0
    book = Book(tx)
    await book.load(_tenant_specs(prof, cur))
    txn = Txn("invoice", tenant, ts, ref=ref, memo=f"invoice {period}")
    txn.details = {"period": period, "owed": owed, "due": due, "currency": cur}
    txn.move(L.op("rounding", cur), acc, cur, owed - due)
    txn.period = await book.period_for(tenant, ts)
    book.post(txn)
    await book.flush()
    return {"tenant": tenant, "period": period, "currency": cur, "owed": owed,
            "due": due, "rounding": owed - due, "txn": txn.id}  # fmt: skip


async def pay_in(
    tx: Tx,
    tenant: str,
    amount: str,
    currency: str,
    *,
    ts_ms: int | None = None,
    ref: str = "",
) -> str:
    """A payment received against the postpaid receivable (at most what is owed); returns
    the transaction id."""
    cur = check_currency(currency)
    value = parse_amount(amount, cur)
    if value <= 0:
        raise BillingError("a payment must be positive")
    ts = now_ms() if ts_ms is None else ts_ms
    prof = await _locked_profile(tx, tenant, cur, "pay")
    book = Book(tx)
    await book.load(_tenant_specs(prof, cur))
    acc = L.receivable(tenant, cur)
    if value > book.balance[acc]:
        raise BillingError(
            f"{tenant} owes {fmt(max(book.balance[acc], 0), cur, exact=True)}; "
            f"a payment of {amount} {cur} is more than that (top up the wallet instead)"
        )
    txn = Txn("payment", tenant, ts, ref=ref, memo=f"payment {amount} {cur}")
    txn.move(L.op("cash", cur), acc, cur, value)
    book.post(txn)
    await book.flush()
    return txn.id


async def refund_in(tx: Tx, event_id: str, *, memo: str = "", ts_ms: int | None = None) -> str:
    """Reverses a settled usage event's postings (one refund per event); its cost leaves
    the hourly rollups in the same transaction. Returns the refund's transaction id."""
    ts = now_ms() if ts_ms is None else ts_ms
    row = await tx.fetchrow("SELECT txn_id FROM settlements WHERE event_id = $1", event_id)
    if row is None or not row[0]:
        raise BillingError(f"event {event_id} has not been settled (or had no charge)")
    txn_row = await tx.fetchrow("SELECT tenant FROM ledger_txns WHERE id = $1", row[0])
    assert txn_row is not None
    # Under the lock: two concurrent refunds of one event must not both pass the check.
    await L.lock_tenants(tx, [txn_row[0]])
    if await tx.fetchval("SELECT 1 FROM ledger_txns WHERE kind = 'refund' AND ref = $1", event_id):
        raise BillingError(f"event {event_id} has already been refunded")
    legs = await tx.fetch(
        "SELECT account, unit, amount FROM postings WHERE txn_id = $1 ORDER BY leg",
        row[0],
    )
    prof = await get_profile(tx, txn_row[0])
    book = Book(tx)
    await book.load({a: L.spec_for(a, u, credit_limit=prof.credit_limit) for a, u, _ in legs})
    txn = Txn("refund", txn_row[0], ts, ref=event_id, memo=memo or "refund")
    txn.details = {"reverses": row[0]}
    for a, u, amt in legs:
        txn.add(a, u, -amt)
    expired = await _restore_lots(tx, txn_row[0], legs)
    for lot_id, units, unit, unearned, cur in expired:
        # The lot has ended: what the refund gives back to it is broken again at once
        # (units to op:issued, unearned price to breakage), as its expiry did.
        txn.move(L.lot_units(txn_row[0], lot_id), L.op("issued", unit), unit, units)
        txn.move(L.lot_deferred(txn_row[0], lot_id), L.op("breakage", cur), cur, unearned)
        txn.details.setdefault("to_breakage", []).append(lot_id)
    book.post(txn)
    await book.flush()
    await rollups.apply_refund(tx, event_id, row[0])
    return txn.id


async def expire_in(tx: Tx, *, now: int | None = None) -> list[str]:
    """Ends every lot whose window closed by `now`: unused tokens/points and the price
    not yet earned go to breakage, or roll over into a new lot when the plan says so.
    Returns the expiry transaction ids."""
    at = now_ms() if now is None else now
    due = "FROM lots WHERE status = 'active' AND end_ms IS NOT NULL AND end_ms <= $1"
    await L.lock_tenants(tx, [r[0] for r in await tx.fetch(f"SELECT tenant {due}", at)])
    rows = await tx.fetch(f"SELECT {LOT_COLS} {due} ORDER BY end_ms, id", at)
    out = []
    for lot in map(lot_from_row, rows):
        out.append(await _expire_lot(tx, lot))
    if out:
        await bump(tx)
    return out


def _plan(r: Sequence[Any]) -> Plan:
    x = list(r)
    x[10] = bool(x[10])
    x[11] = tuple(m for m in x[11].split(",") if m)
    return Plan(*x)


async def get_profile(tx: Tx, tenant: str) -> Profile:
    _check_tenant(tenant)
    row = await tx.fetchrow(
        f"SELECT {PROFILE_COLS} FROM billing_profiles WHERE tenant = $1", tenant
    )
    return Profile(tenant) if row is None else profile_from_row(row)


async def _locked_profile(tx: Tx, tenant: str, cur: str, verb: str) -> Profile:
    """Takes the tenant's lock and returns its profile, refusing money in another currency
    than the one the tenant settles in (`verb`: what the caller should do in that currency)."""
    await L.lock_tenants(tx, [tenant])
    prof = await get_profile(tx, tenant)
    if cur != prof.currency:
        raise BillingError(f"tenant {tenant} settles in {prof.currency}; {verb} in {prof.currency}")
    return prof


async def _has_money(tx: Tx, tenant: str, cur: str) -> bool:
    return bool(
        await tx.fetchval(
            "SELECT 1 FROM postings p JOIN accounts a ON a.id = p.account "
            "WHERE a.tenant = $1 AND p.unit = $2 LIMIT 1",
            tenant,
            cur,
        )
    )


def _tenant_specs(prof: Profile, cur: str) -> dict[str, AccountSpec]:
    t = prof.tenant
    return {
        a: L.spec_for(a, cur, credit_limit=prof.credit_limit)
        for a in (L.wallet(t, cur), L.receivable(t, cur), L.overrun(t, cur))
    } | {
        a: L.spec_for(a, cur)
        for a in (L.op("cash", cur), L.op("promotions", cur), L.op("revenue", cur),
                  L.op("channel", cur), L.op("breakage", cur), L.op("fx", cur))
    }  # fmt: skip


def _lot_specs(lot: Lot) -> dict[str, AccountSpec]:
    unit = TOKENS if lot.kind == "package" else POINTS
    return {
        L.lot_units(lot.tenant, lot.id): L.spec_for(L.lot_units(lot.tenant, lot.id), unit),
        L.lot_deferred(lot.tenant, lot.id): L.spec_for(
            L.lot_deferred(lot.tenant, lot.id), lot.currency
        ),
        L.op("issued", unit): L.spec_for(L.op("issued", unit), unit),
        L.op("breakage", lot.currency): L.spec_for(L.op("breakage", lot.currency), lot.currency),
    }


async def _insert_lot(tx: Tx, lot: Lot) -> None:
    await tx.execute(
        f"INSERT INTO lots ({LOT_COLS}, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
        "$10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        lot.id, lot.tenant, lot.plan, lot.kind, lot.quantity, lot.price, lot.currency,
        lot.start_ms, lot.end_ms, lot.exhaustion, lot.overage_per_1m, lot.overage_currency,
        lot.auto_topup, int(lot.rollover), ",".join(lot.models), lot.consumed, lot.recognized,
        lot.status, now_ms(),
    )  # fmt: skip


def _pay(
    book: Book,
    txn: Txn,
    prof: Profile,
    cur: str,
    amount: int,
    credit: str,
    *,
    order: Sequence[str] = ("wallet", "postpaid"),
) -> list[tuple[str, int]]:
    """Debits `amount` (in `cur`, the tenant's currency) from the wallet, then the credit
    line (`order`: an automatic top-up pays from those the usage draw order names); credits
    `credit`. Raises InsufficientFunds when they cannot cover it (purchases are refused rather
    than overrun)."""
    if cur != prof.currency:
        raise BillingError(
            f"tenant {prof.tenant} settles in {prof.currency}; this costs {cur} "
            "(set the plan's currency to the tenant's)"
        )
    legs = _draw_money(book, prof, cur, amount, allow_overrun=False, order=order)
    for acc, x in legs:
        txn.add(acc, cur, x)
    txn.add(credit, cur, -amount)
    return legs


def _draw_money(
    book: Book,
    prof: Profile,
    cur: str,
    amount: int,
    *,
    allow_overrun: bool,
    order: Sequence[str] | None = None,
) -> list[tuple[str, int]]:
    """Which money accounts pay `amount`, in draw order (purchases: wallet, then the credit
    line, whatever the usage draw order): [(account, debit)]."""
    t = prof.tenant
    rest = amount
    legs: list[tuple[str, int]] = []
    for source in prof.draw_order if order is None else order:
        if rest <= 0:
            break
        acc = {"wallet": L.wallet(t, cur), "postpaid": L.receivable(t, cur)}.get(source)
        if acc is None:
            continue
        avail = book.available(acc)
        take = rest if avail is None else max(0, min(rest, avail))
        if take:
            legs.append((acc, take))
            rest -= take
    if rest > 0:
        if not allow_overrun:
            have = amount - rest
            raise L.InsufficientFunds(L.wallet(t, cur), cur, amount, have)
        legs.append((L.overrun(t, cur), rest))
    return legs


@dataclass
class _Ctx:
    """Per-transaction caches for a settlement batch."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    lots: dict[str, list[Lot]] = field(default_factory=dict)
    dirty_lots: dict[str, Lot] = field(default_factory=dict)
    prices: dict[tuple[str, str], list[Price]] = field(default_factory=dict)
    fx: dict[tuple[str, str], list[tuple[int, Decimal]]] = field(default_factory=dict)
    splits: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    topped_up: bool = False  # an automatic top-up grew a lot: the terms changed


async def _split_at(tx: Tx, ctx: _Ctx, provider: str, ts: int) -> tuple[int, int]:
    if provider not in ctx.splits:
        rows = await tx.fetch(
            "SELECT effective_ms, platform_ppm, channel_ppm FROM revenue_splits "
            "WHERE provider = $1 ORDER BY effective_ms DESC",
            provider,
        )
        ctx.splits[provider] = [tuple(r) for r in rows]
    for eff, pp, cp in ctx.splits[provider]:
        if eff <= ts:
            return pp, cp
    return 0, 0  # no split agreed: everything is the provider's (the operator resells at cost)


def _split_legs(
    txn: Txn, cur: str, amount: int, provider: str, split: tuple[int, int]
) -> dict[str, int]:
    """Credits `amount` to platform revenue, channel and provider by largest remainder."""
    pp, cp = split
    platform, channel, prov = allocate(amount, [pp, cp, PPM - pp - cp])
    txn.add(L.op("revenue", cur), cur, -platform)
    txn.add(L.op("channel", cur), cur, -channel)
    txn.add(L.op("provider", cur, provider or "unknown"), cur, -prov)
    return {"platform": platform, "channel": channel, "provider": prov}


# The billed lines' names in a usage transaction's details (`tokens`): tokenhub.usage.billed_lines.
# Transactions posted before cache writes existed have the first three only.
_LINES = ("input", "cached_input", "output", "cache_write")


async def _settle(tx: Tx, events: list[UsageEvent]) -> SettleResult:
    res = SettleResult()
    if not events:
        return res
    # The tenant locks come first: on PostgreSQL, what is settled already must be read under
    # them, or a concurrent settlement of the same event fails on the settlements key.
    await L.lock_tenants(tx, [ev.tenant for ev in events])
    # Idempotency first: what of this batch is settled already?
    ids = sorted({e.request_id for e in events})
    known: dict[str, str] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join(f"${j + 1}" for j in range(len(chunk)))
        for eid, h in await tx.fetch(
            f"SELECT event_id, payload_sha256 FROM settlements WHERE event_id IN ({marks})",
            *chunk,
        ):
            known[eid] = h
    todo: list[tuple[UsageEvent, str]] = []
    first_time = set(ids) - set(known)
    repeats: dict[str, list[str]] = {}  # in-batch repeats of events new to the ledger
    for ev in events:
        h = _payload_hash(ev)
        if ev.request_id in known:
            if ev.request_id in first_time:
                repeats.setdefault(ev.request_id, []).append(h)
            elif known[ev.request_id] == h:
                res.duplicates += 1
            else:
                res.conflicts.append(ev.request_id)
            continue
        known[ev.request_id] = h
        todo.append((ev, h))
    if not todo:
        return res

    valid: list[tuple[UsageEvent, str]] = []
    for ev, h in todo:
        try:
            _check_tenant(ev.tenant)
            if (problem := usage_problem(ev)) is not None:
                raise Quarantine(f"usage out of bounds: {problem}")
        except BillingError as e:
            del known[ev.request_id]
            res.failed.append((ev.request_id, str(e)))
            if isinstance(e, Quarantine):
                res.quarantined.add(ev.request_id)
            continue
        valid.append((ev, h))
    todo = valid
    ctx = _Ctx()
    book = Book(tx)
    await _prefetch(tx, ctx, todo)
    specs: dict[str, AccountSpec] = {}
    for tenant, prof in ctx.profiles.items():
        specs |= _tenant_specs(prof, prof.currency)
        for lot in ctx.lots[tenant]:
            specs |= _lot_specs(lot) | _tenant_specs(prof, lot.currency)
    await book.load(specs)

    settled_rows: list[tuple[str, str, str, int]] = []
    for ev, h in todo:
        lots = ctx.lots[ev.tenant]
        saved = [(x.quantity, x.price, x.consumed, x.recognized) for x in lots]
        dirty, posted = set(ctx.dirty_lots), len(book.txns)
        try:
            txn = await _settle_event(tx, ctx, book, ev)
        except DatabaseError:
            raise  # the database's failure, not the event's
        except Exception as e:
            # Undo what the event drew in memory before it failed (lot counters, auto top-ups),
            # or its retry would draw the same lot again.
            for x, v in zip(lots, saved, strict=True):
                x.quantity, x.price, x.consumed, x.recognized = v
            for lot_id in set(ctx.dirty_lots) - dirty:
                del ctx.dirty_lots[lot_id]
            for t in book.txns[posted:]:
                for p in t.postings:
                    book.balance[p.account] -= p.amount
            del book.txns[posted:]
            del known[ev.request_id]
            kept = (BillingError, MoneyError)
            if isinstance(e, kept) and not isinstance(e, (AmountRangeError, Quarantine)):
                res.failed.append((ev.request_id, str(e)))
            else:
                # Nothing configurable fixes it: an amount beyond the ledger's range, or an
                # error settlement did not expect. Set aside, so the others go on.
                res.failed.append((ev.request_id, f"{type(e).__name__}: {e}"[:500]))
                res.quarantined.add(ev.request_id)
            continue
        tid = txn.id if txn is not None else ""
        settled_rows.append((ev.request_id, h, tid, now_ms()))
        res.txn_ids[ev.request_id] = tid
        res.settled += 1
    # Repeats within the batch count against their first copy, once its fate is known (a
    # repeat of a failed event is not a duplicate of anything settled).
    failed_ids = {eid for eid, _ in res.failed}
    for eid, hashes in repeats.items():
        first = next(h for ev, h in todo if ev.request_id == eid)
        for h in hashes:
            if eid in failed_ids:
                continue
            if h == first:
                res.duplicates += 1
            else:
                res.conflicts.append(eid)
    await book.flush()
    if ctx.topped_up:
        await bump(tx)
    for lot in ctx.dirty_lots.values():
        await tx.execute(
            "UPDATE lots SET quantity = $1, price = $2, consumed = $3, recognized = $4, "
            "status = $5 WHERE id = $6",
            lot.quantity, lot.price, lot.consumed, lot.recognized, lot.status, lot.id,
        )  # fmt: skip
    if settled_rows:
        await tx.insert_rows(
            "settlements", ("event_id", "payload_sha256", "txn_id", "settled_ms"), settled_rows
        )
    return res


def _marks(n: int, start: int = 1) -> str:
    return ",".join(f"${i}" for i in range(start, start + n))


async def _prefetch(tx: Tx, ctx: _Ctx, todo: Sequence[tuple[UsageEvent, str]]) -> None:
    """Profiles, active lots, prices and FX rates of the whole batch in a few queries (not a
    few per tenant and model: on PostgreSQL every statement is a round trip)."""
    tenants = sorted({ev.tenant for ev, _ in todo})
    models = sorted({ev.model for ev, _ in todo})
    ctx.profiles = {t: Profile(t) for t in tenants} | await terms_sql.profiles_of(tx, tenants)
    ctx.lots = {t: [] for t in tenants} | await terms_sql.active_lots(tx, tenants)
    ctx.prices = await terms_sql.prices_of(tx, models)
    ctx.fx = await terms_sql.fx_rates(tx)


def _no_price(ctx: _Ctx, ev: UsageEvent) -> str:
    """Why an event has no price, and the fix. " at <ms>" is the part that settler.reason_kind
    drops when it groups failures by cause."""
    known = [*ctx.prices.get((ev.model, ev.tenant), []), *ctx.prices.get((ev.model, ""), [])]
    first = min((p.effective_ms for p in known), default=None)
    if first is None:
        cause = "it has none"
    else:
        day = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first / 1000))
        cause = f"its first is in force from {day}, after this usage"
    return (
        f"no price for model {ev.model!r} at {ev.ts_ms} ({cause}): set one in force by then "
        f"with `tokenhub prices set {ev.model} --currency CUR --input N --output N --from DATE` "
        "or `tokenhub prices import --config FILE --from DATE`, then run "
        "`tokenhub billing settle --retry-failed`"
    )


def _recognize(lot: Lot, used: int) -> int:
    """The lot price earned by `used` more units: cumulative, so a fully used lot earns
    exactly its price."""
    before = lot.recognized
    lot.consumed += used
    lot.recognized = div_half_even(lot.consumed * lot.price, lot.quantity)
    return lot.recognized - before


def _money_accounts(prof: Profile) -> list[str]:
    """The money pot's ledger accounts, in the draw order: the wallet, the receivable."""
    t, cur = prof.tenant, prof.currency
    names = {"wallet": L.wallet(t, cur), "postpaid": L.receivable(t, cur)}
    return [names[s] for s in prof.draw_order if s in names]


def ledger_avail(book: Book, prof: Profile, lots: Sequence[Lot]) -> Any:
    """What each of the tenant's pots has available in the ledger (`book`), as the draw order
    reads it: a lot's units left; the money pot's wallet and credit headroom (as far as the
    draw order names them)."""
    by_pot = {lot_pot(lot): lot for lot in lots}
    mpot = money_pot(prof.tenant)

    def avail(pot: str) -> int:
        if pot == mpot:
            total = 0
            for acc in _money_accounts(prof):
                a = book.available(acc)
                total += 1 << 62 if a is None else max(0, a)
            return total
        lot = by_pot[pot]
        return -book.balance[L.lot_units(lot.tenant, lot.id)]

    return avail


async def _settle_event(tx: Tx, ctx: _Ctx, book: Book, ev: UsageEvent) -> Txn | None:
    prof = ctx.profiles[ev.tenant]
    # Only what the upstream served (tokenhub.usage.billed_lines): a failed or interrupted
    # request is settled as posting nothing.
    lines = list(billed_lines(ev))
    if not sum(lines):
        return None
    price = price_in(ctx.prices, ev.model, ev.tenant, ev.ts_ms)
    if price is None:
        raise BillingError(_no_price(ctx, ev))
    split = await _split_at(tx, ctx, ev.provider, ev.ts_ms)
    txn = Txn("usage", ev.tenant, ev.ts_ms, ref=ev.request_id, memo=ev.model)
    d: dict[str, Any] = {
        "model": ev.model,
        "provider": ev.provider,
        "tokens": dict(zip(_LINES, lines, strict=True)),
        "price": {"version": price.version, "tenant_override": bool(price.tenant),
                  "currency": price.currency},
        "split_ppm": list(split),
        "draws": [],
    }  # fmt: skip
    txn.details = d
    lots = ctx.lots[ev.tenant]
    try:
        # The draw order (tokenhub.billing.draw), the same code money admission reserves by.
        outcome = draw(
            prof,
            lots,
            price,
            lambda b, q: fx_in(ctx.fx, b, q, ev.ts_ms),
            ev.model,
            ev.ts_ms,
            lines,
            ledger_avail(book, prof, lots),
        )
    except NoRate as e:
        raise BillingError(str(e)) from None
    for dr in outcome.draws:
        if dr.source == "package":
            _post_lot(ctx, txn, dr, ev, split, d)
        elif dr.source == "points":
            _post_points(ctx, txn, dr, ev, split, d)
        elif dr.source == "topup":
            _post_topup(book, ctx, prof, dr, ev, d)
        elif dr.source == "overage":
            assert dr.lot is not None and dr.lot.overage_per_1m is not None
            d["overage"] = {"lot": dr.lot.id, "tokens": sum(dr.tokens),
                            "per_1m": dr.lot.overage_per_1m, "amount": dr.native,
                            "currency": dr.currency}  # fmt: skip
            _charge(book, txn, prof, dr, ev, split, d, "overage")
        else:  # wallet (and postpaid), or what nothing in the order could pay
            d["priced"] = {"tokens": list(dr.tokens), "amounts": list(dr.lines),
                           "gross": dr.gross, "net": dr.native}  # fmt: skip
            _charge(book, txn, prof, dr, ev, split, d, dr.source)
    book.post(txn)
    return txn


def _post_lot(
    ctx: _Ctx, txn: Txn, dr: Draw, ev: UsageEvent, split: tuple[int, int], d: dict[str, Any]
) -> None:
    lot = dr.lot
    assert lot is not None
    take = dr.amount
    txn.move(L.lot_units(lot.tenant, lot.id), L.op("issued", TOKENS), TOKENS, take)
    earned = _recognize(lot, take)
    ctx.dirty_lots[lot.id] = lot
    txn.add(L.lot_deferred(lot.tenant, lot.id), lot.currency, earned)
    legs = _split_legs(txn, lot.currency, earned, ev.provider, split)
    d["draws"].append({"from": "package", "lot": lot.id, "tokens": list(dr.tokens),
                       "earned": earned, "currency": lot.currency, "split": legs})  # fmt: skip


def _pending(txn: Txn, account: str) -> int:
    """What this not-yet-posted transaction already moves on `account`."""
    return sum(p.amount for p in txn.postings if p.account == account)


def _post_points(
    ctx: _Ctx, txn: Txn, dr: Draw, ev: UsageEvent, split: tuple[int, int], d: dict[str, Any]
) -> None:
    lot = dr.lot
    assert lot is not None
    points = dr.amount
    txn.move(L.lot_units(lot.tenant, lot.id), L.op("issued", POINTS), POINTS, points)
    earned = _recognize(lot, points)
    ctx.dirty_lots[lot.id] = lot
    txn.add(L.lot_deferred(lot.tenant, lot.id), lot.currency, earned)
    legs = _split_legs(txn, lot.currency, earned, ev.provider, split)
    d["draws"].append({"from": "points", "lot": lot.id, "tokens": list(dr.tokens),
                       "points": points, "earned": earned, "currency": lot.currency,
                       "split": legs})  # fmt: skip


def _charge(
    book: Book, txn: Txn, prof: Profile, dr: Draw, ev: UsageEvent, split: tuple[int, int],
    d: dict[str, Any], what: str,
) -> None:  # fmt: skip
    """A money draw: `dr.native` in `dr.currency`, `dr.amount` in the tenant's currency, paid
    from the money accounts in the draw order, its `unpaid` part posted to the overrun
    account; split as revenue in `dr.currency`."""
    if dr.native <= 0:
        return
    tc = prof.currency
    cur = dr.currency
    rec: dict[str, Any] = {"from": what, "amount": dr.native, "currency": cur}
    if dr.fx is not None:
        fx_rate, how = dr.fx
        rec |= {"fx_rate": str(fx_rate), "fx": how, "converted": dr.amount,
                "tenant_currency": tc}  # fmt: skip
        txn.add(L.op("fx", tc), tc, -dr.amount)
        txn.add(L.op("fx", cur), cur, dr.native)
    accounts = _money_accounts(prof)
    # Debit what this transaction has not already taken.
    pending = {a: _pending(txn, a) for a in accounts}
    for a, p in pending.items():
        book.balance[a] += p
    try:
        legs = _draw_money(book, prof, tc, dr.amount - dr.unpaid, allow_overrun=False)
    finally:
        for a, p in pending.items():
            book.balance[a] -= p
    if dr.unpaid:
        legs.append((L.overrun(prof.tenant, tc), dr.unpaid))
        if what != "overrun":
            rec["overrun"] = dr.unpaid
    for acc, x in legs:
        txn.add(acc, tc, x)
    rec["paid_by"] = legs
    rec["split"] = _split_legs(txn, cur, dr.native, ev.provider, split)
    d["draws"].append(rec)


def _post_topup(
    book: Book, ctx: _Ctx, prof: Profile, dr: Draw, ev: UsageEvent, d: dict[str, Any]
) -> None:
    """An automatic top-up: the lot's block bought from the money pot; the tokens drawn from
    it are the next draw's. The lot grows; its deferred revenue is earned at the blended
    rate."""
    lot = dr.lot
    assert lot is not None
    block, cost = dr.bought, dr.amount
    t = Txn("purchase", prof.tenant, ev.ts_ms, ref=lot.id, memo="auto top-up")
    t.details = {"lot": lot.id, "tokens": block, "price": cost, "currency": lot.currency}
    order = [s for s in prof.draw_order if s in ("wallet", "postpaid")]
    _pay(book, t, prof, lot.currency, cost, L.lot_deferred(lot.tenant, lot.id), order=order)
    t.move(L.op("issued", TOKENS), L.lot_units(lot.tenant, lot.id), TOKENS, block)
    book.post(t)
    lot.quantity += block
    lot.price += cost
    ctx.dirty_lots[lot.id] = lot
    ctx.topped_up = True
    d.setdefault("auto_topups", []).append({"lot": lot.id, "tokens": block, "price": cost})


async def _restore_lots(
    tx: Tx, tenant: str, legs: Sequence[tuple[str, str, int]]
) -> list[tuple[str, int, str, int, str]]:
    """A refund gives consumed lot units back (and un-earns their revenue). Returns, for lots
    that have already expired, (lot id, units, unit, unearned amount, currency): those go
    straight to breakage instead."""
    expired: list[tuple[str, int, str, int, str]] = []
    used: dict[str, int] = {}
    for acc, unit, amt in legs:
        if unit in (TOKENS, POINTS) and acc.startswith(f"t:{tenant}:lot:") and amt > 0:
            lot_id = acc.rsplit(":", 1)[1]
            used[lot_id] = used.get(lot_id, 0) + amt
    for lot_id, amt in used.items():
        row = await tx.fetchrow(f"SELECT {LOT_COLS} FROM lots WHERE id = $1", lot_id)
        if row is None:
            continue
        lot = lot_from_row(row)
        deferred_legs = sum(x for a, _, x in legs if a == L.lot_deferred(tenant, lot_id))
        if lot.status != "active":
            unit = TOKENS if lot.kind == "package" else POINTS
            expired.append((lot_id, amt, unit, deferred_legs, lot.currency))
            continue
        lot.consumed -= amt
        # Un-earn exactly what the event earned (its deferred legs): recomputing from
        # `consumed` would round differently, and a fully used lot would earn its price +- 1.
        deferred = L.lot_deferred(tenant, lot_id)
        lot.recognized -= sum(x for a, _, x in legs if a == deferred)
        await tx.execute(
            "UPDATE lots SET consumed = $1, recognized = $2 WHERE id = $3",
            lot.consumed, lot.recognized, lot.id,
        )  # fmt: skip
    return expired


async def _expire_lot(tx: Tx, lot: Lot) -> str:
    prof = await get_profile(tx, lot.tenant)
    unit = TOKENS if lot.kind == "package" else POINTS
    book = Book(tx)
    specs = _lot_specs(lot)
    new_lot: Lot | None = None
    if lot.rollover:
        new_lot = Lot(
            L.new_id("lot"), lot.tenant, lot.plan, lot.kind, 0, 0, lot.currency,
            lot.end_ms or now_ms(), None, lot.exhaustion, lot.overage_per_1m,
            lot.overage_currency, lot.auto_topup, False, lot.models, 0, 0, "active",
        )  # fmt: skip
        specs |= _lot_specs(new_lot)
    await book.load(specs | _tenant_specs(prof, prof.currency))
    # The lot's last moment (its window is [start, end)): breakage belongs to the period the
    # lot covered, not to the next one.
    ts = lot.end_ms - 1 if lot.end_ms else now_ms()
    held = -book.balance[L.lot_units(lot.tenant, lot.id)]
    unearned = lot.price - lot.recognized
    txn = Txn("expiry", lot.tenant, ts, ref=lot.id, memo=f"plan {lot.plan} ended")
    txn.details = {"lot": lot.id, "unused": held, "unearned": unearned,
                   "rollover": new_lot.id if new_lot else None}  # fmt: skip
    if new_lot is not None:
        # Roll the unused units and their unearned price into a lot with no end date.
        txn.move(L.lot_units(lot.tenant, lot.id), L.lot_units(lot.tenant, new_lot.id), unit, held)
        txn.move(L.lot_deferred(lot.tenant, lot.id), L.lot_deferred(lot.tenant, new_lot.id),
                 lot.currency, unearned)  # fmt: skip
        new_lot.quantity, new_lot.price = held, unearned
        if held:
            await _insert_lot(tx, new_lot)
    else:
        txn.move(L.lot_units(lot.tenant, lot.id), L.op("issued", unit), unit, held)
        txn.move(L.lot_deferred(lot.tenant, lot.id), L.op("breakage", lot.currency),
                 lot.currency, unearned)  # fmt: skip
    book.post(txn)
    await tx.execute(
        "UPDATE lots SET status = 'expired', recognized = $1 WHERE id = $2", lot.price, lot.id
    )
    await book.flush()
    return txn.id


def as_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


__all__ = [
    "DRAW_ORDER",
    "NANOS",
    "Billing",
    "BillingError",
    "Lot",
    "Plan",
    "Price",
    "Profile",
    "SettleResult",
]
