"""The draw order, once: which of a tenant's contracts pays for usage, and how much.

`draw` is a pure function over plain data (the tenant's profile, its lots, the model's price,
an FX lookup, what each contract has available) that returns the draws in order. Settlement
(`tokenhub.billing.service`) posts them to the ledger; money admission
(`tokenhub.billing.pots`) reserves them on the quota table's pots. Each contract is named by
its pot (`lot_pot`, `money_pot`), so both sides speak of the same thing:

1. **package** lots active at the usage's time whose model scope includes the model,
   soonest-expiring first, each up to its tokens. Tokens are taken from the lines in the order
   uncached input, cache writes, cached input, output (`TAKE_ORDER`; a token is a token: a package
   counts a prompt-cache write like any other). When they run out, the last one's exhaustion rule
   applies to the rest: `overage` prices the rest (the lines' sum at the plan's overage price,
   converted to the tenant's currency) and charges it to the money pot; `auto_topup` buys the plan's
   top-up block (pro rata of the lot's price, from the money pot, only in the tenant's currency)
   while the money pot can pay a whole block, drawing from each; `hard_stop` passes the rest on.
2. **points** lots: the model's points per 1M tokens, line by line (all four alike), as far as
   the points go.
3. **wallet** / **postpaid** (one money pot: the wallet and the credit line's headroom, as far
   as the draw order names them): the rest at the model's price for the tenant (its override,
   else the list price), each line at its own per-1M price (cache writes at the cache-write
   price, the input price when none is set) rounded once per line, less the tenant's discount,
   converted to the tenant's currency.
4. What nothing in the order takes is priced the same way as an **overrun** draw.

A money draw (overage, wallet, overrun) takes all the tokens left; what the money pot cannot
pay of it is its `unpaid` part. Settlement posts that part to the tenant's overrun account;
admission refuses the request when any part is unpaid (`Outcome.paid`). So admission admits
exactly the usage that settlement would post without an overrun, given the same balances
(tests/billing/test_draw_property.py drives both with random contracts and usage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from tokenhub.billing.terms import Lot, Price, Profile
from tokenhub.money import convert, div_half_even, rate

PPM = 1_000_000
LINES = 4  # uncached input, cached input, output, cache writes (usage.billed_lines)

Rates = Callable[[str, str], "tuple[Decimal, str] | None"]  # base -> quote at the usage's time


def money_pot(tenant: str) -> str:
    return f"pot:m:{tenant}"


def lot_pot(lot: Lot) -> str:
    return f"pot:{'t' if lot.kind == 'package' else 'p'}:{lot.id}"


def pot_dim(pot: str) -> str:
    """The table budget a pot uses: tokens for packages, money for points and money."""
    return "tokens" if pot.startswith("pot:t:") else "money"


# The order tokens are taken from the lines in (by packages, point packs, a money pot that can
# pay part): the prompt's uncached input and cache writes, its cache reads, then the output. With
# a prompt placed whole on its dearer line of the two first ones, a reservation's cost is then
# no less than that of any split of the same prompt into the three input lines
# (tokenhub.billing.pots.Contracts.worst), given that cache reads cost no more than input, as
# every provider prices them; a price book that says otherwise (nothing refuses it) can let a
# request cost more than was reserved by the difference, which the ledger then posts.
TAKE_ORDER = (0, 3, 1, 2)


def take_lines(remaining: list[int], n: int) -> list[int]:
    """Takes n tokens from the lines (uncached input, cached input, output, cache writes) in
    TAKE_ORDER."""
    took = [0] * LINES
    for i in TAKE_ORDER:
        k = min(remaining[i], n)
        took[i] = k
        remaining[i] -= k
        n -= k
    return took


def four(lines: Sequence[int]) -> list[int]:
    """The lines as a list of LINES: an older peer's 3 lines (from before cache writes) get a
    0 for cache writes. ValueError for any other length."""
    out = list(lines)
    if len(out) == LINES - 1:
        out.append(0)
    if len(out) != LINES:
        raise ValueError(f"{len(out)} token lines, expected {LINES} (or {LINES - 1})")
    return out


def _tup(x: Sequence[int]) -> tuple[int, int, int, int]:
    return x[0], x[1], x[2], x[3]


class NotPriced(Exception):
    """Usage that only money can pay for, of a model without a price for the tenant."""

    def __init__(self, model: str, tenant: str, message: str = "") -> None:
        super().__init__(
            message
            or f"The model '{model}' has no price for tenant {tenant} yet, so it cannot be "
            "charged; ask the operator to set one (tokenhub prices set)."
        )


class NoRate(NotPriced):
    """A money draw in a currency the tenant does not settle in, with no FX rate to it."""

    def __init__(self, base: str, quote: str, ts_ms: int) -> None:
        super().__init__(
            "", "", f"no FX rate {base}->{quote} effective at {ts_ms} (tokenhub fx set ...)"
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """How tokens cost in a pot's unit: 1 per token (package), or priced per line."""

    kind: str  # package | points | price | overage | topup
    per_1m: tuple[int, int, int, int] = (0, 0, 0, 0)
    discount_ppm: int = 0
    fx: Decimal | None = None  # into the tenant's currency
    whole: bool = False  # price the lines' sum at per_1m[0] (overage)

    def native(self, lines: Sequence[int]) -> int:
        """The cost before FX (in the price's currency), discount included. `lines`: LINES,
        or 3 (from before cache writes: none)."""
        if len(lines) != LINES:
            lines = four(lines)
        if self.kind == "package":
            return sum(lines)
        if self.whole:
            gross = rate(sum(lines), self.per_1m[0])
        else:
            gross = sum(rate(n, p) for n, p in zip(lines, self.per_1m, strict=True))
        if self.discount_ppm:
            gross -= div_half_even(gross * self.discount_ppm, PPM)
        return gross

    def cost(self, lines: Sequence[int]) -> int:
        n = self.native(lines)
        return convert(n, self.fx) if self.fx is not None and self.kind != "package" else n

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
            c = self.cost(take_lines(list(lines), mid))
            if c <= budget:
                lo, cost_lo = mid, c
            else:
                hi = mid
        return lo, cost_lo


PACKAGE = Rule("package")


@dataclass(slots=True)
class Draw:
    """One contract's part: `amount` in its pot's unit (tokens, nano-points, or nanos of the
    tenant's currency) for the `tokens` it pays for."""

    source: str  # package | points | topup | overage | wallet | overrun
    pot: str
    rule: Rule
    amount: int
    tokens: tuple[int, int, int, int] = (0, 0, 0, 0)
    lot: Lot | None = None
    # Money draws: the part of `amount` the money pot could not pay (settlement posts it to
    # the overrun account), the amount before FX in `currency`, the rate and how it was found.
    unpaid: int = 0
    native: int = 0
    currency: str = ""
    fx: tuple[Decimal, str] | None = None
    gross: int = 0  # priced draws: before the discount
    lines: tuple[int, int, int, int] = (0, 0, 0, 0)  # priced draws: each line's amount
    bought: int = 0  # topup: the tokens of the block bought
    held: bool = True  # False: tokens of a block this usage buys (the topup draw pays them)


@dataclass(slots=True)
class Outcome:
    draws: list[Draw] = field(default_factory=list)
    rest: list[int] = field(default_factory=lambda: [0] * LINES)  # nothing could price these

    @property
    def overrun(self) -> int:
        """What the money pot could not pay, in the tenant's currency."""
        return sum(d.unpaid for d in self.draws)

    @property
    def paid(self) -> bool:
        """Every token is paid by a contract: nothing overruns."""
        return not self.overrun and not sum(self.rest)


def draw(
    profile: Profile,
    lots: Sequence[Lot],
    price: Price | None,
    rates: Rates,
    model: str,
    ts_ms: int,
    lines: Sequence[int],
    avail: Callable[[str], int],
) -> Outcome:
    """Splits `lines` over the tenant's contracts in its draw order (the module docstring),
    each pot up to `avail(pot)` (read once per pot). `lots`: the tenant's active lots,
    soonest-expiring first. `lines`: (uncached input, cached input, output, cache writes); a
    3-line sequence (an older peer's, before cache writes) reads as no cache writes. Raises
    NotPriced when money must pay and the model has no price, NoRate when a money draw needs
    an FX rate that is not set."""
    cur = profile.currency
    tenant = profile.tenant
    mpot = money_pot(tenant)
    rest = four(lines)
    out = Outcome(rest=rest)
    draws = out.draws
    left: dict[str, int] = {}

    def free(pot: str) -> int:
        if pot not in left:
            left[pot] = max(0, int(avail(pot)))
        return left[pot]

    def fx(base: str, native: int) -> tuple[Decimal, str] | None:
        if base == cur:
            return None
        found = rates(base, cur)
        if found is None and native:
            raise NoRate(base, cur, ts_ms)
        return found

    def from_lot(lot: Lot, *, held: bool = True) -> None:
        pot = lot_pot(lot)
        n = min(free(pot), sum(rest))
        if n <= 0:
            return
        took = take_lines(rest, n)
        left[pot] -= n
        draws.append(Draw("package", pot, PACKAGE, n, _tup(took), lot, held=held))

    def from_points(lot: Lot, pp: int) -> None:
        pot = lot_pot(lot)
        held = free(pot)
        if held <= 0:
            return
        took = [0] * LINES
        points = 0
        for i in TAKE_ORDER:
            n = rest[i]
            need = rate(n, pp)
            if need > held - points:
                # As many tokens as the points left can pay for.
                n = (held - points) * 1_000_000 // pp
                while n > 0 and rate(n, pp) > held - points:
                    n -= 1
                need = rate(n, pp)
            took[i] = n
            rest[i] -= n
            points += need
            if rest[i]:
                break
        if not points and not sum(took):
            return
        left[pot] -= points
        rule = Rule("points", (pp, pp, pp, pp))
        draws.append(Draw("points", pot, rule, points, _tup(took), lot))

    def from_money(source: str, rule: Rule, currency: str, d: Draw) -> None:
        """A money draw of every token left, its cost `d.native` in `currency`."""
        found = fx(currency, d.native)
        amount = convert(d.native, found[0]) if found is not None else d.native
        # The overrun draw is what nothing in the order pays (the money pot is not in it).
        paid = 0 if source == "overrun" else min(amount, free(mpot))
        if paid:
            left[mpot] -= paid
        d.tokens = _tup(rest)
        rest[:] = [0] * LINES
        d.source, d.pot, d.amount, d.unpaid, d.currency, d.fx = (
            source, mpot, amount, amount - paid, currency, found,
        )  # fmt: skip
        d.rule = Rule(rule.kind, rule.per_1m, rule.discount_ppm,
                      found[0] if found is not None else None, rule.whole)  # fmt: skip
        draws.append(d)

    def priced(source: str) -> None:
        if price is None:
            raise NotPriced(model, tenant)
        per = price.per_1m
        amounts = [rate(n, p) for n, p in zip(rest, per, strict=True)]
        gross = sum(amounts)
        disc = profile.discount_ppm
        net = gross - div_half_even(gross * disc, PPM) if disc else gross
        d = Draw(source, mpot, PACKAGE, 0, native=net, gross=gross,
                 lines=_tup(amounts))  # fmt: skip
        from_money(source, Rule("price", per, disc), price.currency, d)

    def exhausted(lot: Lot) -> None:
        if lot.exhaustion == "overage" and lot.overage_per_1m is not None:
            o = lot.overage_per_1m
            d = Draw("overage", mpot, PACKAGE, 0, lot=lot, native=rate(sum(rest), o))
            rule = Rule("overage", (o, o, o, o), whole=True)
            from_money("overage", rule, lot.overage_currency, d)
        elif lot.exhaustion == "auto_topup" and lot.auto_topup:
            block = lot.auto_topup
            cost = div_half_even(lot.price * block, lot.quantity)
            unit = div_half_even(lot.price * 1_000_000, max(1, lot.quantity))
            rule = Rule("topup", (unit, unit, unit, unit))
            pot = lot_pot(lot)
            while sum(rest) and lot.currency == cur and free(mpot) >= cost:
                left[mpot] -= cost
                left[pot] = free(pot) + block
                draws.append(Draw("topup", mpot, rule, cost, lot=lot, native=cost,
                                  currency=lot.currency, bought=block))  # fmt: skip
                from_lot(lot, held=False)

    in_scope = [x for x in lots if x.covers(model, ts_ms)]
    for source in profile.draw_order:
        if not sum(rest):
            break
        if source == "package":
            last: Lot | None = None
            for lot in (x for x in in_scope if x.kind == "package"):
                last = lot
                from_lot(lot)
                if not sum(rest):
                    break
            if last is not None and sum(rest) > 0:
                exhausted(last)
        elif source == "points":
            if price is not None and price.points_per_1m:
                for lot in (x for x in in_scope if x.kind == "points"):
                    from_points(lot, price.points_per_1m)
                    if not sum(rest):
                        break
        elif source in ("wallet", "postpaid"):
            priced("wallet")
    if sum(rest) and price is not None:
        # Nothing in the draw order could pay (packages only, a hard stop): priced, unpaid.
        priced("overrun")
    return out


__all__ = [
    "LINES",
    "PPM",
    "TAKE_ORDER",
    "Draw",
    "NoRate",
    "NotPriced",
    "Outcome",
    "Rule",
    "draw",
    "four",
    "lot_pot",
    "money_pot",
    "pot_dim",
    "take_lines",
]
