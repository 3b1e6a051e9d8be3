"""Money admission: a request goes upstream only if the tenant's contracts can pay for it.

The ledger (`tokenhub.billing`) is the bill; it settles usage after the fact, and what nothing
could pay for lands on the tenant's overrun account. This module keeps that account empty under
concurrency: before forwarding, the gateway prices the request's worst case and reserves it
against the tenant's contracts, in the tenant's draw order, in the shared quota table
(`tokenhub.quota`, one table for all workers), where each contract is a *pot*:

| pot (table account) | budget | holds | mirrors ledger account |
|---|---|---|---|
| `pot:t:<lot id>` | tokens | a package's tokens | `t:T:lot:<id>` (TOKENS) |
| `pot:p:<lot id>` | money | a point pack's nano-points | `t:T:lot:<id>` (POINTS) |
| `pot:m:<tenant>` | money | tenant currency nanos: wallet + credit headroom | wallet, receivable |

**Worst case.** The prompt (the Rust meter's count) as uncached input plus the output the request
may produce: n (or best_of) choices x the output cap, the smallest of max_tokens,
max_completion_tokens and the deployment's output cap (the assumption when it sets neither).
The gateway sends that cap upstream (`gateway._send_cap`), so an upstream that honours only one
of the two fields, or would write more than the assumed cap, cannot outrun the reservation.
Streams reserve their output in tranches (`TRANCHE` tokens, or less when the cap is smaller)
and extend as tokens flow (every kind of generated text counts: content, reasoning, tool calls,
legacy function calls); when the contracts can pay for no more, the stream ends cleanly: a final
SSE `error` event (insufficient_quota), then `[DONE]`, and the event is billed exactly the tokens
the client received (metered). A client that leaves is not reserved for any more: the gateway
drains the upstream (its cost, paid to the provider) but the event, status 499, bills at most
what was held when the client left. A failed request bills nothing (`usage.billed_lines`), so
its hold is given back whole.

**Draw order** mirrors settlement (`billing.service._settle_event`): package lots that cover the
model (tokens), then on exhaustion the last lot's rule (overage priced in its currency and
converted, or auto top-up at the lot's unit price, both paid from the money pot); point packs at
the model's points price; wallet and credit line at the model's price for the tenant (discount
and FX included). What no pot can pay: 429 insufficient_quota, saying how much is needed and
what is left.

**Keeping the pots equal to the ledger.** Each pot's limit is the ledger's available balance;
its `used` is what the gateway charged and the ledger has not posted yet. Only the server's
settler (`python -m tokenhub.billing.settler --quota`, a process that worker 1 starts when
`[billing] settle_interval_s` is set) writes pots, so the two never race:

- after each settled batch it sets the batch's tenants' pot limits from the ledger, *then*
  gives back (`release_used`) what those events had charged (their `UsageEvent.holds`); between
  the two steps a pot is conservative (it counts the events twice), never generous;
- after each pass it sets every pot from the ledger, which picks up top-ups, purchases, credit
  limit changes and expiries made elsewhere (the CLI) within one settle interval.

`holds` carries the table's epoch (a random id the server draws when it creates the table): a
table made by a restarted server never releases what an older one charged. On start, the
settler settles what is pending before it publishes the pots, and worker 1 waits for that before
it serves; other workers answer 503 until then. If the settler is replaced (it died, or its
worker did), the old one may settle a last batch while the new one starts: settlement is
idempotent, and a pot set from a stale read is corrected by the next pass.

Bounds, stated: a purchase paid from the wallet by another process can be admitted against for
up to one settle interval (the ledger still posts the difference to overrun, never loses it);
prices and FX are those loaded within the last `refresh_s`; an auto top-up is reserved at the
lot's unit price, while settlement buys whole blocks, so the wallet can pay up to one block more
than was reserved (it is refused when the wallet cannot, and the rest is drawn as usual).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tokenhub.billing.service import (
    PPM,
    PRICE_COLS,
    PROFILE_COLS,
    Lot,
    Price,
    Profile,
    fx_in,
    price_in,
    profile_from_row,
)
from tokenhub.db.database import Database, Tx
from tokenhub.money import convert, div_half_even, fmt, fmt_units, rate
from tokenhub.quota import UNLIMITED, Quota, Refusal, Reservation
from tokenhub.usage import UsageEvent

log = logging.getLogger("tokenhub.contracts")

EPOCH_ACCOUNT = "meta:epoch"  # its requests limit: the table's epoch
READY_ACCOUNT = "meta:contracts"  # its requests limit: 1 once worker 1 has published the pots
TRANCHE = 1024  # output tokens a stream reserves at a time
LINES = 3  # uncached input, cached input, output


def money_pot(tenant: str) -> str:
    return f"pot:m:{tenant}"


def lot_pot(lot: Lot) -> str:
    return f"pot:{'t' if lot.kind == 'package' else 'p'}:{lot.id}"


def pot_dim(pot: str) -> str:
    """The table budget a pot uses: tokens for packages, money for points and money."""
    return "tokens" if pot.startswith("pot:t:") else "money"


def _take_lines(remaining: list[int], n: int) -> list[int]:
    """Takes n tokens from the lines in order (uncached input, cached input, output)."""
    took = [0, 0, 0]
    for i in range(LINES):
        k = min(remaining[i], n)
        took[i] = k
        remaining[i] -= k
        n -= k
    return took


@dataclass(frozen=True, slots=True)
class Rule:
    """How tokens cost in a pot's unit: 1 per token (package), or priced per line."""

    kind: str  # package | points | price | overage | topup
    per_1m: tuple[int, int, int] = (0, 0, 0)
    discount_ppm: int = 0
    fx: Decimal | None = None  # into the tenant's currency
    whole: bool = False  # price the lines' sum at per_1m[0] (overage, as settlement does)

    def cost(self, lines: Sequence[int]) -> int:
        if self.kind == "package":
            return sum(lines)
        if self.whole:
            gross = rate(sum(lines), self.per_1m[0])
        else:
            gross = sum(rate(n, p) for n, p in zip(lines, self.per_1m, strict=True))
        if self.discount_ppm:
            gross -= div_half_even(gross * self.discount_ppm, PPM)
        return convert(gross, self.fx) if self.fx is not None else gross

    def afford(self, lines: Sequence[int], budget: int) -> tuple[int, int]:
        """The most tokens (taken from the lines in order) whose cost fits `budget`, and that
        cost."""
        total = sum(lines)
        if self.kind == "package":
            n = max(0, min(total, budget))
            return n, n
        whole = self.cost(lines)
        if whole <= budget:
            return total, whole  # the usual case: one pricing, no search
        lo, hi, cost_lo = 0, total, 0  # cost(lo) <= budget < cost(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = self.cost(_take_lines(list(lines), mid))
            if c <= budget:
                lo, cost_lo = mid, c
            else:
                hi = mid
        return lo, cost_lo


@dataclass(slots=True)
class Draw:
    pot: str
    rule: Rule
    amount: int  # reserved, in the pot's unit
    res: Reservation | None = None


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why the contracts cannot pay: for the 429's message."""

    tenant: str
    needed: str  # what the uncovered part costs, or the tokens
    left: str  # what the pots have left

    @property
    def message(self) -> str:
        return (
            f"You exceeded your current quota: tenant {self.tenant}'s contracts cannot pay for "
            f"this request (it needs up to {self.needed} more; {self.left}). Top up the wallet, "
            "buy a package or lower max_tokens."
        )


class NotReady(Exception):
    """Worker 1 has not published the pots yet (the server is starting)."""


class NotPriced(Exception):
    def __init__(self, model: str, tenant: str) -> None:
        super().__init__(
            f"The model '{model}' has no price for tenant {tenant} yet, so it cannot be "
            "charged; ask the operator to set one (tokenhub prices set)."
        )


# -- what the contracts are (loaded from the billing database) --------------------------------


@dataclass
class Terms:
    """Profiles, active lots, prices and FX rates: everything pricing needs, per worker."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    lots: dict[str, list[Lot]] = field(default_factory=dict)
    prices: dict[tuple[str, str], list[Price]] = field(default_factory=dict)
    fx: dict[tuple[str, str], list[tuple[int, Decimal]]] = field(default_factory=dict)

    def profile(self, tenant: str) -> Profile:
        return self.profiles.get(tenant) or Profile(tenant)

    def price(self, model: str, tenant: str, ts_ms: int) -> Price | None:
        return price_in(self.prices, model, tenant, ts_ms)

    def rate(self, base: str, quote: str, ts_ms: int) -> Decimal | None:
        """base -> quote as settlement finds it (None: the same currency)."""
        if base == quote:
            return None
        found = fx_in(self.fx, base, quote, ts_ms)
        if found is None:
            raise LookupError(f"no FX rate {base}->{quote}")
        return found[0]


async def load_terms(db: Database) -> Terms:
    from tokenhub.billing.service import _LOT_COLS, _lot

    async def run(tx: Tx) -> Terms:
        t = Terms()
        for row in await tx.fetch(f"SELECT {PROFILE_COLS} FROM billing_profiles"):
            t.profiles[row[0]] = profile_from_row(row)
        for r in await tx.fetch(
            f"SELECT {_LOT_COLS} FROM lots WHERE status = 'active' "
            "ORDER BY end_ms IS NULL, end_ms, start_ms, id"
        ):
            lot = _lot(r)
            t.lots.setdefault(lot.tenant, []).append(lot)
        for r in await tx.fetch(
            f"SELECT {PRICE_COLS} FROM prices ORDER BY effective_ms DESC, version DESC"
        ):
            p = Price(*r)
            t.prices.setdefault((p.model, p.tenant), []).append(p)
        for base, quote, eff, r in await tx.fetch(
            "SELECT base, quote, effective_ms, rate FROM fx_rates ORDER BY effective_ms DESC"
        ):
            t.fx.setdefault((base, quote), []).append((eff, Decimal(r)))
        return t

    return await db.transaction(run)


# -- planning: which pots pay for how much ----------------------------------------------------


def _avail(quota: Quota, pot: str) -> int:
    """What a published pot has free; an unpublished one (not synced yet) has nothing."""
    index = quota.table.find_account(pot)
    if index is None:
        return 0
    free = quota.table.available(index, pot_dim(pot))
    return 0 if free == UNLIMITED else free


def plan(
    terms: Terms,
    tenant: str,
    model: str,
    ts_ms: int,
    lines: list[int],
    avail: Any,
) -> tuple[list[Draw], list[int]]:
    """Splits `lines` over the tenant's pots in its draw order, each up to `avail(pot)`.
    Returns the draws and what is left uncovered (all zero when the contracts can pay).
    `lines` is consumed."""
    prof = terms.profile(tenant)
    cur = prof.currency
    lots = [x for x in terms.lots.get(tenant, ()) if x.covers(model, ts_ms)]
    draws: list[Draw] = []
    spent: dict[str, int] = {}

    def left(pot: str) -> int:
        return int(avail(pot)) - spent.get(pot, 0)

    def take(pot: str, rule: Rule) -> None:
        budget = left(pot)
        if budget <= 0 or not sum(lines):
            return
        n, cost = rule.afford(lines, budget)
        if not n:
            return
        _take_lines(lines, n)
        spent[pot] = spent.get(pot, 0) + cost
        if cost or rule.kind == "package":
            draws.append(Draw(pot, rule, cost))

    price: Price | None = None
    priced = False
    uses_money = any(s in ("wallet", "postpaid") for s in prof.draw_order)
    for source in prof.draw_order:
        if not sum(lines):
            break
        if source == "package":
            last: Lot | None = None
            for lot in (x for x in lots if x.kind == "package"):
                last = lot
                take(lot_pot(lot), Rule("package"))
            if last is None or not sum(lines) or not uses_money:
                continue
            if last.exhaustion == "overage" and last.overage_per_1m is not None:
                o = last.overage_per_1m
                fx = terms.rate(last.overage_currency, cur, ts_ms)
                take(money_pot(tenant), Rule("overage", (o, o, o), fx=fx, whole=True))
            elif last.exhaustion == "auto_topup" and last.auto_topup and last.currency == cur:
                unit = div_half_even(last.price * 1_000_000, max(1, last.quantity))
                take(money_pot(tenant), Rule("topup", (unit, unit, unit)))
        elif source == "points":
            if not priced:
                price, priced = terms.price(model, tenant, ts_ms), True
            if price is not None and price.points_per_1m:
                pp = price.points_per_1m
                for lot in (x for x in lots if x.kind == "points"):
                    take(lot_pot(lot), Rule("points", (pp, pp, pp)))
        elif source in ("wallet", "postpaid"):
            if any(d.rule.kind == "price" for d in draws):
                continue  # one money pot serves both
            if not priced:
                price, priced = terms.price(model, tenant, ts_ms), True
            if price is None:
                raise NotPriced(model, tenant)
            rule = Rule(
                "price",
                (price.input_per_1m, price.cached_input_per_1m, price.output_per_1m),
                prof.discount_ppm,
                terms.rate(price.currency, cur, ts_ms),
            )
            take(money_pot(tenant), rule)
    return draws, lines


def replay(draws: Sequence[Draw], lines: Sequence[int]) -> list[int]:
    """What each draw is charged for the actual `lines`: the draws fill in order, each up to
    what it reserved; usage beyond every reservation goes to the last draw (an overrun the
    table records, and the ledger posts as it finds it)."""
    rest = list(lines)
    out = [0] * len(draws)
    for i, d in enumerate(draws):
        if not sum(rest):
            break
        n, out[i] = d.rule.afford(rest, d.amount)
        _take_lines(rest, n)
    if sum(rest) and draws:
        last = len(draws) - 1
        out[last] += draws[last].rule.cost(rest)
    return out


# -- the request's hold ----------------------------------------------------------------------


class Hold:
    """One request's reservations on its tenant's pots (`Contracts.admit`)."""

    __slots__ = ("contracts", "draws", "lines", "model", "tenant", "ts_ms", "ttl_ms")

    def __init__(
        self,
        contracts: Contracts,
        tenant: str,
        model: str,
        ts_ms: int,
        lines: list[int],
        ttl_ms: int,
    ) -> None:
        self.contracts = contracts
        self.tenant = tenant
        self.model = model
        self.ts_ms = ts_ms
        self.lines = lines  # reserved: [uncached input, cached input, output]
        self.ttl_ms = ttl_ms
        self.draws: list[Draw] = []

    @property
    def output_reserved(self) -> int:
        return self.lines[2]

    def extend(self, tokens: int) -> bool:
        """Reserves `tokens` more output (a stream's next tranche), all or nothing as far as
        the client can tell: False when the contracts cannot pay for them. Parts taken before
        a refusal stay on the hold and are released when it settles."""
        c = self.contracts
        draws, rest = plan(
            c.terms, self.tenant, self.model, self.ts_ms, [0, 0, tokens], c.available
        )
        if sum(rest):
            return False
        for d in draws:
            mine = next((x for x in self.draws if x.pot == d.pot and x.rule == d.rule), None)
            if mine is not None and mine.res is not None:
                extra = {pot_dim(d.pot): d.amount}
                if c.quota.extend(mine.res, **extra, ttl_ms=self.ttl_ms) is not None:
                    return False
                mine.amount += d.amount
            else:
                d.res = c.reserve(d.pot, d.amount, self.ttl_ms)
                if d.res is None:
                    return False
                self.draws.append(d)
        self.lines[2] += tokens
        return True

    def settle(self, lines: Sequence[int]) -> str:
        """Charges the actual usage and releases the rest; returns `UsageEvent.holds`."""
        charged = replay(self.draws, lines)
        parts: list[str] = []
        for d, amount in zip(self.draws, charged, strict=True):
            if d.res is None:
                continue
            try:
                if pot_dim(d.pot) == "tokens":
                    self.contracts.quota.settle(d.res, tokens=amount, requests=0)
                else:
                    self.contracts.quota.settle(d.res, tokens=0, money=amount, requests=0)
            except Exception:
                log.exception("settling pot %s failed", d.pot)
                continue
            if amount:
                parts.append(f"{d.pot}={amount}")
        return f"{self.contracts.epoch}|{';'.join(parts)}" if parts else ""

    def cancel(self) -> None:
        for d in self.draws:
            if d.res is not None:
                self.contracts.quota.cancel(d.res)


class Contracts:
    """Admission against the tenants' contracts for one worker; the pot sync runs in the
    settling worker only (`PotSync`)."""

    def __init__(self, quota: Quota, db: Database, *, refresh_s: float = 1.0) -> None:
        self.quota = quota
        self.db = db
        self.refresh_s = refresh_s
        self._terms = Terms()
        self.epoch = quota.limits(EPOCH_ACCOUNT)["requests"] or 0
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        # The fast path's first pot per (tenant, model) under the current terms: (pot, rule,
        # until_ms), the pot the draw order reaches first, usable until its lot ends.
        self._first: dict[tuple[str, str], tuple[str, Rule, int | None]] = {}
        self._published: set[str] = set()

    @property
    def terms(self) -> Terms:
        return self._terms

    @terms.setter
    def terms(self, terms: Terms) -> None:
        self._terms = terms
        self._first = {}

    async def start(self) -> None:
        self.terms = await load_terms(self.db)
        self._task = asyncio.create_task(self._refresh(), name="tokenhub-contracts-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                self.terms = await load_terms(self.db)
            except Exception:  # keep pricing with the last good terms
                log.exception("reloading billing terms failed; keeping the previous ones")

    def available(self, pot: str) -> int:
        return _avail(self.quota, pot)

    def reserve(self, pot: str, amount: int, ttl_ms: int) -> Reservation | None:
        r = self.quota.reserve(
            pot, requests=0, concurrent=False, ttl_ms=ttl_ms, **{pot_dim(pot): amount}
        )
        return None if isinstance(r, Refusal) else r

    def ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.quota.limits(READY_ACCOUNT)["requests"])
        return self._ready

    def admit(
        self, tenant: str, model: str, ts_ms: int, lines: list[int], ttl_ms: int
    ) -> Hold | Shortfall:
        """Reserves `lines` (the worst case) on the tenant's pots, all or nothing. Raises
        NotReady before the pots are published, NotPriced for a model without a price."""
        if not self.ready():
            raise NotReady
        hold = self._admit_first(tenant, model, ts_ms, lines, ttl_ms)
        if hold is not None:
            return hold
        for _ in range(3):  # a concurrent request can take a pot between plan and reserve
            draws, rest = plan(self.terms, tenant, model, ts_ms, list(lines), self.available)
            if sum(rest):
                return self._shortfall(tenant, model, ts_ms, lines, rest, draws)
            hold = Hold(self, tenant, model, ts_ms, list(lines), ttl_ms)
            for d in draws:
                d.res = self.reserve(d.pot, d.amount, ttl_ms)
                if d.res is None:
                    hold.cancel()
                    break
                hold.draws.append(d)
            else:
                return hold
        draws, rest = plan(self.terms, tenant, model, ts_ms, list(lines), self.available)
        return self._shortfall(tenant, model, ts_ms, lines, rest or list(lines), draws)

    def _admit_first(
        self, tenant: str, model: str, ts_ms: int, lines: list[int], ttl_ms: int
    ) -> Hold | None:
        """The usual case in one reservation: the first pot of the draw order pays for all of
        it. The reservation itself is the check (it is refused, with no side effect, when the
        pot cannot pay), so nothing is read first. None: not so, plan it in full."""
        key = (tenant, model)
        first = self._first.get(key)
        if first is None:
            draws, _ = plan(self.terms, tenant, model, ts_ms, [1, 0, 0], lambda pot: 1 << 62)
            if not draws:
                return None
            lot_end = next(
                (x.end_ms for x in self.terms.lots.get(tenant, ()) if lot_pot(x) == draws[0].pot),
                None,
            )
            first = self._first[key] = (draws[0].pot, draws[0].rule, lot_end)
        pot, rule, until = first
        if until is not None and ts_ms >= until:
            return None
        if pot not in self._published:
            # An account the table does not have yet would be made, unlimited, by a reserve.
            if self.quota.table.find_account(pot) is None:
                return None
            self._published.add(pot)
        amount = rule.cost(lines)
        res = self.reserve(pot, amount, ttl_ms)
        if res is None:
            return None
        hold = Hold(self, tenant, model, ts_ms, list(lines), ttl_ms)
        hold.draws.append(Draw(pot, rule, amount, res))
        return hold

    def _shortfall(
        self,
        tenant: str,
        model: str,
        ts_ms: int,
        lines: Sequence[int],
        rest: Sequence[int],
        draws: Sequence[Draw],
    ) -> Shortfall:
        prof = self.terms.profile(tenant)
        price = self.terms.price(model, tenant, ts_ms)
        uncovered = f"{sum(rest):,} tokens"
        if price is not None:
            with contextlib.suppress(LookupError):
                fx = self.terms.rate(price.currency, prof.currency, ts_ms)
                rule = Rule(
                    "price",
                    (price.input_per_1m, price.cached_input_per_1m, price.output_per_1m),
                    prof.discount_ppm,
                    fx,
                )
                uncovered = (
                    f"{fmt(rule.cost(rest), prof.currency, exact=True)} ({sum(rest):,} tokens)"
                )
        parts: list[str] = []
        pkg = sum(
            self.available(lot_pot(x))
            for x in self.terms.lots.get(tenant, ())
            if x.kind == "package" and x.covers(model, ts_ms)
        )
        if any(x.kind == "package" for x in self.terms.lots.get(tenant, ())):
            parts.append(f"package tokens left {pkg:,}")
        pts = [x for x in self.terms.lots.get(tenant, ()) if x.kind == "points"]
        if pts:
            left = sum(self.available(lot_pot(x)) for x in pts)
            parts.append(f"points left {fmt_units(left, 'POINTS')}")
        if any(s in ("wallet", "postpaid") for s in prof.draw_order):
            money = self.available(money_pot(tenant))
            parts.append(f"wallet and credit left {fmt(money, prof.currency, exact=True)}")
        if not parts:
            parts.append("no package, points, wallet or credit line")
        return Shortfall(tenant, uncovered, ", ".join(parts))


# -- keeping the pots equal to the ledger (the settling worker) ------------------------------


def new_epoch(quota: Quota) -> int:
    """Draws the table's epoch (its creator does, once)."""
    epoch = int.from_bytes(os.urandom(6), "big") or 1
    quota.set_limits(EPOCH_ACCOUNT, requests=epoch)
    return epoch


async def _ledger_pots(tx: Tx, tenants: Sequence[str] | None) -> dict[str, int]:
    """Each pot's available balance in the ledger (for `tenants`, or every tenant with a
    profile or a balance)."""
    from tokenhub.billing.service import _LOT_COLS, _lot

    where: str = ""
    args: tuple[str, ...] = ()
    if tenants is not None:
        marks = ",".join(f"${i + 1}" for i in range(len(tenants)))
        where, args = f" AND tenant IN ({marks})", tuple(tenants)
    bal: dict[str, int] = {}
    names: set[str] = set(tenants or ())
    for acc, tenant, b in await tx.fetch(
        "SELECT id, tenant, balance FROM accounts "
        "WHERE kind IN ('wallet', 'receivable', 'lot')" + where,
        *args,
    ):
        bal[acc] = int(b)
        names.add(tenant)
    out: dict[str, int] = {}
    for r in await tx.fetch(f"SELECT {_LOT_COLS} FROM lots WHERE status = 'active'{where}", *args):
        lot = _lot(r)
        out[lot_pot(lot)] = max(0, -bal.get(f"t:{lot.tenant}:lot:{lot.id}", 0))
    profiles: dict[str, Profile] = {}
    for row in await tx.fetch(
        f"SELECT {PROFILE_COLS} FROM billing_profiles WHERE 1 = 1" + where, *args
    ):
        profiles[row[0]] = profile_from_row(row)
        names.add(row[0])
    for t in names:
        prof = profiles.get(t) or Profile(t)
        cur = prof.currency
        money = 0
        if "wallet" in prof.draw_order:
            money += max(0, -bal.get(f"t:{t}:wallet:{cur}", 0))
        if "postpaid" in prof.draw_order:
            money += max(0, prof.credit_limit - bal.get(f"t:{t}:receivable:{cur}", 0))
        out[money_pot(t)] = money
    return out


class PotSync:
    """Sets the pots from the ledger and gives back what settled events charged. One per
    server, in the process that settles (see the module docstring for the order of steps)."""

    def __init__(self, quota: Quota, db: Database) -> None:
        self.quota = quota
        self.db = db
        self.epoch = quota.limits(EPOCH_ACCOUNT)["requests"] or 0
        self._known: set[str] = set()  # pots published by this process

    async def publish(self, tenants: Sequence[str] | None = None) -> int:
        """Sets pot limits from the ledger (for `tenants`, or every pot); returns how many."""
        pots = await self.db.transaction(lambda tx: _ledger_pots(tx, tenants))
        if tenants is None:
            for gone in self._known - pots.keys():  # expired lots, deleted tenants
                pots[gone] = 0
        for pot, avail in pots.items():
            self.quota.set_limits(pot, **{pot_dim(pot): avail})
        self._known |= pots.keys()
        return len(pots)

    def release(self, events: Iterable[UsageEvent]) -> int:
        """Gives back what these (now posted) events charged; returns how much."""
        total = 0
        prefix = f"{self.epoch}|"
        for ev in events:
            if not ev.holds.startswith(prefix):
                continue  # nothing held, or held in an older table
            for part in ev.holds[len(prefix) :].split(";"):
                pot, _, amount = part.rpartition("=")
                if pot and amount.isdigit():
                    total += self.quota.release_used(pot, pot_dim(pot), int(amount))
        return total

    async def after_batch(self, events: Sequence[UsageEvent], settled: Iterable[str]) -> None:
        done = set(settled)
        posted = [e for e in events if e.request_id in done]
        if not posted:
            return
        await self.publish(sorted({e.tenant for e in posted}))
        self.release(posted)

    async def after_pass(self) -> None:
        await self.publish()
        self.quota.set_limits(READY_ACCOUNT, requests=1)


def now_ms() -> int:
    return int(time.time() * 1000)


__all__ = [
    "TRANCHE",
    "Contracts",
    "Draw",
    "Hold",
    "NotPriced",
    "NotReady",
    "PotSync",
    "Rule",
    "Shortfall",
    "Terms",
    "load_terms",
    "new_epoch",
    "plan",
    "replay",
]
