"""The terms usage is drawn under: billing profiles, prices, FX rates and lots.

Everything that prices a request or an event reads them from here: the records, their SQL (the
price book and the FX table are read and written in this file only), the two lookups that pick
the version in force at a moment (`price_in`, `fx_in`), and `Terms`, one snapshot of them all
that money admission prices with (`tokenhub.billing.pots`).

**The change marker.** `terms_version` is one row whose value every write to profiles, prices,
FX rates or lots bumps in the same transaction (`bump`). A worker keeps its snapshot and polls
the marker (`marker`, one tiny read); it reloads the snapshot only when the marker moved
(`TermsCache`). An idle server reads one row per poll, not every price, lot and rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tokenhub.db.database import Database, Row, Tx

log = logging.getLogger("tokenhub.terms")

DRAW_ORDER = ("package", "points", "wallet", "postpaid")


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    tenant: str
    currency: str = "USD"
    draw_order: tuple[str, ...] = DRAW_ORDER
    credit_limit: int = 0
    low_balance: int | None = None
    discount_ppm: int = 0


@dataclass(frozen=True)
class Price:
    model: str
    tenant: str
    version: int
    effective_ms: int
    currency: str
    input_per_1m: int
    cached_input_per_1m: int
    output_per_1m: int
    points_per_1m: int | None
    # Prompt tokens written to a provider's cache (migration 18); None: the input price.
    cache_write_per_1m: int | None = None

    @property
    def write_per_1m(self) -> int:
        """The cache-write price in force: its own, else the input price."""
        w = self.cache_write_per_1m
        return self.input_per_1m if w is None else w

    @property
    def per_1m(self) -> tuple[int, int, int, int]:
        """Per-1M prices of the billed lines (tokenhub.usage.billed_lines): uncached input,
        cached input, output, cache writes."""
        return self.input_per_1m, self.cached_input_per_1m, self.output_per_1m, self.write_per_1m


@dataclass
class Lot:
    id: str
    tenant: str
    plan: str
    kind: str
    quantity: int
    price: int
    currency: str
    start_ms: int
    end_ms: int | None
    exhaustion: str
    overage_per_1m: int | None
    overage_currency: str
    auto_topup: int | None
    rollover: bool
    models: tuple[str, ...]
    consumed: int
    recognized: int
    status: str

    def covers(self, model: str, ts_ms: int) -> bool:
        return (
            self.status == "active"
            and self.start_ms <= ts_ms
            and (self.end_ms is None or ts_ms < self.end_ms)
            and (not self.models or model in self.models)
        )


LOT_COLS = (
    "id, tenant, plan, kind, quantity, price, currency, start_ms, end_ms, exhaustion, "
    "overage_per_1m, overage_currency, auto_topup, rollover, models, consumed, recognized, status"
)
PROFILE_COLS = "tenant, currency, draw_order, credit_limit, low_balance, discount_ppm"
PRICE_COLS = (
    "model, tenant, version, effective_ms, currency, input_per_1m, cached_input_per_1m, "
    "output_per_1m, points_per_1m, cache_write_per_1m"
)
# Active lots in draw order: soonest-expiring first.
LOT_ORDER = "ORDER BY end_ms IS NULL, end_ms, start_ms, id"

PriceBook = Mapping[tuple[str, str], Sequence[Price]]  # (model, tenant) -> newest first
FxBook = Mapping[tuple[str, str], Sequence[tuple[int, Decimal]]]  # (base, quote) -> newest first


def lot_from_row(row: Sequence[Any]) -> Lot:
    """A lots row, columns in LOT_COLS order."""
    r = list(row)
    r[13] = bool(r[13])
    r[14] = tuple(m for m in r[14].split(",") if m)
    return Lot(*r)


def profile_from_row(row: Sequence[Any]) -> Profile:
    """A billing_profiles row, columns in PROFILE_COLS order."""
    tenant, cur, order, limit, low, disc = row
    return Profile(tenant, cur, tuple(order.split(",")), limit, low, disc)


# -- lookups -----------------------------------------------------------------------------------


def price_in(prices: PriceBook, model: str, tenant: str, ts: int) -> Price | None:
    """The price of `model` for `tenant` at `ts`: the tenant's own, else the list price (each
    list newest first)."""
    for who in (tenant, ""):
        for p in prices.get((model, who), ()):
            if p.effective_ms <= ts:
                return p
    return None


def fx_in(fx: FxBook, base: str, quote: str, ts: int) -> tuple[Decimal, str] | None:
    """The rate converting base -> quote at `ts` from the rates set (each list newest first),
    and how it was found (for the record); the inverse of quote -> base when only that is
    set. None: no rate."""
    for b, q, inverse in ((base, quote, False), (quote, base, True)):
        for eff, r in fx.get((b, q), ()):
            if eff <= ts:
                if not inverse:
                    return r, f"{b}/{q} {r} from {eff}"
                # Only the opposite direction is set: 1/r, to 12 significant decimals.
                inv = (Decimal(1) / r).quantize(Decimal("1e-12"))
                return inv, f"1/({b}/{q} {r}) from {eff}"
    return None


# -- the change marker -------------------------------------------------------------------------


async def bump(tx: Tx) -> None:
    """Marks the terms changed (in the writer's transaction): workers reload them."""
    await tx.execute("UPDATE terms_version SET value = value + 1 WHERE id = 1")


async def marker(tx: Tx) -> int:
    return int(await tx.fetchval("SELECT value FROM terms_version WHERE id = 1") or 0)


# -- the price book and FX: every statement over `prices` and `fx_rates` -----------------------


def _marks(n: int) -> str:
    return ",".join(f"${i + 1}" for i in range(n))


async def insert_price(
    tx: Tx,
    model: str,
    tenant: str,
    effective_ms: int,
    currency: str,
    inp: int,
    cached: int,
    out: int,
    points: int | None,
    created_ms: int,
    cache_write: int | None = None,
) -> Price:
    """The next version of (model, tenant)'s price (`cache_write` None: the input price)."""
    v = await tx.fetchval(
        "SELECT MAX(version) FROM prices WHERE model = $1 AND tenant = $2", model, tenant
    )
    p = Price(
        model, tenant, (v or 0) + 1, effective_ms, currency, inp, cached, out, points, cache_write
    )
    await tx.execute(
        "INSERT INTO prices (model, tenant, version, effective_ms, currency, "
        "input_per_1m, cached_input_per_1m, output_per_1m, points_per_1m, created_ms, "
        "cache_write_per_1m) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        p.model, p.tenant, p.version, p.effective_ms, p.currency, p.input_per_1m,
        p.cached_input_per_1m, p.output_per_1m, p.points_per_1m, created_ms,
        p.cache_write_per_1m,
    )  # fmt: skip
    await bump(tx)
    return p


async def all_prices(tx: Tx) -> list[Price]:
    rows = await tx.fetch(f"SELECT {PRICE_COLS} FROM prices ORDER BY model, tenant, version")
    return [Price(*r) for r in rows]


async def prices_of(
    tx: Tx, models: Sequence[str] | None = None
) -> dict[tuple[str, str], list[Price]]:
    """The price book of `models` (every model when None), (model, tenant) -> newest first."""
    out: dict[tuple[str, str], list[Price]] = {}
    order = "ORDER BY effective_ms DESC, version DESC"
    if models is None:
        chunks: list[Sequence[str] | None] = [None]
    else:
        chunks = [models[i : i + 500] for i in range(0, len(models), 500)]
    for chunk in chunks:
        if chunk is None:
            rows = await tx.fetch(f"SELECT {PRICE_COLS} FROM prices {order}")
        elif not chunk:
            continue
        else:
            rows = await tx.fetch(
                f"SELECT {PRICE_COLS} FROM prices WHERE model IN ({_marks(len(chunk))}) {order}",
                *chunk,
            )
        for r in rows:
            p = Price(*r)
            out.setdefault((p.model, p.tenant), []).append(p)
    return out


async def price_version(tx: Tx, model: str, tenant: str, version: int) -> Row | None:
    """(currency, input, cached input, output, cache write per 1M) of one price-book version
    (cache write: the input price when not set)."""
    return await tx.fetchrow(
        "SELECT currency, input_per_1m, cached_input_per_1m, output_per_1m, "
        "COALESCE(cache_write_per_1m, input_per_1m) FROM prices "
        "WHERE model = $1 AND tenant = $2 AND version = $3",
        model,
        tenant,
        version,
    )


async def list_prices(tx: Tx, model: str) -> list[Row]:
    """The public (not a tenant's) prices of `model`, newest first: (effective_ms, currency,
    input, cached input, output, cache write per 1M; cache write: the input price when not set)."""
    return await tx.fetch(
        "SELECT effective_ms, currency, input_per_1m, cached_input_per_1m, "
        "output_per_1m, COALESCE(cache_write_per_1m, input_per_1m) FROM prices "
        "WHERE model = $1 AND tenant = '' "
        "ORDER BY effective_ms DESC, version DESC",
        model,
    )


async def list_price_at(tx: Tx, model: str, at: int) -> tuple[tuple[Any, ...] | None, bool]:
    """The public price of `model` in force at `at` as (currency, input, cached input,
    output, points, cache write per 1M (None: the input price)), and whether the model ever
    had a public price."""
    row = await tx.fetchrow(
        "SELECT currency, input_per_1m, cached_input_per_1m, output_per_1m, "
        "points_per_1m, cache_write_per_1m FROM prices WHERE model = $1 AND tenant = '' "
        "AND effective_ms <= $2 ORDER BY effective_ms DESC, version DESC LIMIT 1",
        model,
        at,
    )
    ever = await tx.fetchval("SELECT count(*) FROM prices WHERE model = $1 AND tenant = ''", model)
    return (None if row is None else tuple(row)), bool(ever)


async def set_fx_rate(
    tx: Tx, base: str, quote: str, effective_ms: int, rate: Decimal, created_ms: int
) -> None:
    """Sets base -> quote from `effective_ms` (replacing a rate set for that very moment)."""
    await tx.execute(
        "DELETE FROM fx_rates WHERE base = $1 AND quote = $2 AND effective_ms = $3",
        base, quote, effective_ms,
    )  # fmt: skip
    await tx.execute(
        "INSERT INTO fx_rates (base, quote, effective_ms, rate, created_ms) "
        "VALUES ($1, $2, $3, $4, $5)",
        base, quote, effective_ms, str(rate), created_ms,
    )  # fmt: skip
    await bump(tx)


async def fx_rates(tx: Tx) -> dict[tuple[str, str], list[tuple[int, Decimal]]]:
    """Every FX rate, (base, quote) -> [(effective_ms, rate)] newest first."""
    out: dict[tuple[str, str], list[tuple[int, Decimal]]] = {}
    for base, quote, eff, r in await tx.fetch(
        "SELECT base, quote, effective_ms, rate FROM fx_rates ORDER BY effective_ms DESC"
    ):
        out.setdefault((base, quote), []).append((int(eff), Decimal(r)))
    return out


async def fx_list(tx: Tx) -> list[Row]:
    """Every FX rate as (base, quote, effective_ms, rate), for listing."""
    return await tx.fetch(
        "SELECT base, quote, effective_ms, rate FROM fx_rates ORDER BY base, quote, effective_ms"
    )


# -- profiles and lots -------------------------------------------------------------------------


async def profiles_of(tx: Tx, tenants: Sequence[str] | None = None) -> dict[str, Profile]:
    """The billing profiles of `tenants` (every tenant with one when None)."""
    out: dict[str, Profile] = {}
    if tenants is None:
        for row in await tx.fetch(f"SELECT {PROFILE_COLS} FROM billing_profiles"):
            out[row[0]] = profile_from_row(row)
        return out
    for i in range(0, len(tenants), 500):
        chunk = tenants[i : i + 500]
        for row in await tx.fetch(
            f"SELECT {PROFILE_COLS} FROM billing_profiles WHERE tenant IN ({_marks(len(chunk))})",
            *chunk,
        ):
            out[row[0]] = profile_from_row(row)
    return out


async def active_lots(tx: Tx, tenants: Sequence[str] | None = None) -> dict[str, list[Lot]]:
    """The active lots of `tenants` (every tenant when None) in draw order."""
    out: dict[str, list[Lot]] = {}
    if tenants is None:
        for r in await tx.fetch(f"SELECT {LOT_COLS} FROM lots WHERE status = 'active' {LOT_ORDER}"):
            out.setdefault(r[1], []).append(lot_from_row(r))
        return out
    for i in range(0, len(tenants), 500):
        chunk = tenants[i : i + 500]
        for r in await tx.fetch(
            f"SELECT {LOT_COLS} FROM lots WHERE status = 'active' AND tenant IN "
            f"({_marks(len(chunk))}) {LOT_ORDER}",
            *chunk,
        ):
            out.setdefault(r[1], []).append(lot_from_row(r))
    return out


# -- one snapshot ------------------------------------------------------------------------------


@dataclass
class Terms:
    """Profiles, active lots, prices and FX rates: everything pricing needs, as of `version`
    (the change marker when it was loaded)."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    lots: dict[str, list[Lot]] = field(default_factory=dict)
    prices: dict[tuple[str, str], list[Price]] = field(default_factory=dict)
    fx: dict[tuple[str, str], list[tuple[int, Decimal]]] = field(default_factory=dict)
    version: int = -1

    def profile(self, tenant: str) -> Profile:
        return self.profiles.get(tenant) or Profile(tenant)

    def price(self, model: str, tenant: str, ts_ms: int) -> Price | None:
        return price_in(self.prices, model, tenant, ts_ms)

    def rate(self, base: str, quote: str, ts_ms: int) -> tuple[Decimal, str] | None:
        return fx_in(self.fx, base, quote, ts_ms)


async def load_terms_tx(tx: Tx) -> Terms:
    version = await marker(tx)  # first: a write after it shows as a newer marker
    return Terms(
        profiles=await profiles_of(tx),
        lots=await active_lots(tx),
        prices=await prices_of(tx),
        fx=await fx_rates(tx),
        version=version,
    )


async def load_terms(db: Database) -> Terms:
    return await db.read(load_terms_tx)


class TermsCache:
    """A worker's snapshot of the terms, reloaded when the change marker moves (polled every
    `refresh_s`). `reloads` counts the loads after the first."""

    def __init__(self, db: Database, *, refresh_s: float = 0.5) -> None:
        self.db = db
        self.refresh_s = refresh_s
        self.terms = Terms()
        self.reloads = 0
        self.polls = 0
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Any] = []

    def on_change(self, fn: Any) -> None:
        """Calls `fn(terms)` after each load."""
        self._listeners.append(fn)

    def _set(self, terms: Terms) -> None:
        self.terms = terms
        for fn in self._listeners:
            fn(terms)

    async def start(self) -> None:
        self._set(await load_terms(self.db))
        self._task = asyncio.create_task(self._poll(), name="tokenhub-terms-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> bool:
        """One poll: reloads when the marker moved; True when it did."""
        self.polls += 1
        if await self.db.read(marker) == self.terms.version:
            return False
        self._set(await load_terms(self.db))
        self.reloads += 1
        log.info("billing terms changed (marker %d): reloaded", self.terms.version)
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.check()
            except Exception:  # keep pricing with the last good terms
                log.exception("reloading billing terms failed; keeping the previous ones")


__all__ = [
    "DRAW_ORDER",
    "Lot",
    "Price",
    "Profile",
    "Terms",
    "TermsCache",
    "bump",
    "fx_in",
    "load_terms",
    "marker",
    "price_in",
]
