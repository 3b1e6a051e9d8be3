"""Random sequences of billing operations against a small reference model (SQLite).

The machine tops up wallets, sells token packages (one that expires into breakage, one that
rolls over), settles batches of usage events (random tenants, models, token counts, dates a
little out of order), replays settled events shuffled among new ones, sends conflicting
payloads, refunds, advances the clock and expires lots. The reference model below re-derives
every balance from the rules in the service's docstring with `Fraction` arithmetic; after each
step the books must agree with it, and:

- every transaction sums to zero per unit, no constrained account is past its ceiling, and the
  stored balances equal the postings (`check_invariants`);
- each lot's deferred revenue is exactly its price less what it has earned;
- the statements' closing balances and usage totals equal the postings (and the model).
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from ledger_kit import ms, statement

from tokenhub.billing import ledger as L
from tokenhub.billing.ledger import InsufficientFunds, period_of
from tokenhub.billing.service import Billing, BillingError
from tokenhub.db.database import open_database
from tokenhub.usage import UsageEvent

NANOS = 10**9
CUR = "CNY"
# Prices per 1M tokens (input, cached input, output), large enough that a few thousand tokens
# cost about as much as a top-up, and with digits that make rating round.
PRICES = {"m1": ("300.00", "100.00", "700.00"), "m2": ("123.456789", "50.000001", "456.000001")}
PLANS = {  # name: (price, tokens, period, rollover); price / tokens is not whole nanos
    "pkg": ("0.70", 3_000, "month", False),
    "roll": ("0.50", 2_000, "week", True),
}
HOUR = 3_600_000
TENANTS = {"a": ("0", "0"), "b": ("0.50", "7.5")}  # credit limit, discount %


def nanos(text: str) -> int:
    v = Fraction(text) * NANOS
    assert v.denominator == 1
    return int(v)


def half_even(x: Fraction) -> int:
    return round(x)


def period_end(ts: int, period: str) -> int:
    if period == "week":
        return ts + 7 * 24 * HOUR
    d = dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
    y, m = d.year + (d.month == 12), d.month % 12 + 1
    d2 = d.replace(year=y, month=m, day=min(d.day, calendar.monthrange(y, m)[1]))
    return int(d2.timestamp() * 1000)


@dataclass
class RefLot:
    id: str
    tenant: str
    quantity: int
    price: int
    start: int
    end: int | None
    rollover: bool
    held: int
    consumed: int = 0
    recognized: int = 0
    active: bool = True

    def covers(self, ts: int) -> bool:
        return self.active and self.start <= ts and (self.end is None or ts < self.end)


@dataclass
class RefEvent:
    ev: UsageEvent
    wallet: int = 0
    receivable: int = 0
    overrun: int = 0
    draws: dict[str, tuple[int, int]] = field(default_factory=dict)  # lot -> (tokens, earned)
    charged: bool = False  # posted anything
    refunded: bool = False


@dataclass
class RefTenant:
    credit_limit: int
    discount_ppm: int
    wallet: int = 0  # held by the tenant
    receivable: int = 0
    overrun: int = 0


class Reference:
    def __init__(self) -> None:
        self.tenants = {
            t: RefTenant(nanos(limit), int(Fraction(disc) * 10_000))
            for t, (limit, disc) in TENANTS.items()
        }
        self.lots: dict[str, RefLot] = {}
        self.events: dict[str, RefEvent] = {}
        self.breakage = 0
        # per (tenant, period): usage money charged, tokens, tokens from packages
        self.usage: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])

    def pay(self, tenant: str, amount: int, *, overrun: bool) -> tuple[int, int, int] | None:
        t = self.tenants[tenant]
        w = min(amount, t.wallet)
        r = min(amount - w, t.credit_limit - t.receivable)
        o = amount - w - r
        if o and not overrun:
            return None
        t.wallet -= w
        t.receivable += r
        t.overrun += o
        return w, r, o

    def settle(self, ev: UsageEvent) -> None:
        rec = RefEvent(ev)
        self.events[ev.request_id] = rec
        remaining = [
            max(0, ev.input_tokens - ev.cached_input_tokens),
            min(ev.cached_input_tokens, ev.input_tokens),
            ev.output_tokens,
        ]
        total = sum(remaining)
        key = (ev.tenant, period_of(ev.ts_ms))
        self.usage[key][1] += total
        if not total:
            return
        rec.charged = True
        lots = sorted(
            (x for x in self.lots.values() if x.tenant == ev.tenant and x.covers(ev.ts_ms)),
            key=lambda x: (x.end is None, x.end or 0, x.start, x.id),
        )
        for lot in lots:
            take = min(lot.held, sum(remaining))
            if take <= 0:
                continue
            n = take
            for i in range(3):
                k = min(remaining[i], n)
                remaining[i] -= k
                n -= k
            lot.held -= take
            before = lot.recognized
            lot.consumed += take
            lot.recognized = half_even(Fraction(lot.consumed * lot.price, lot.quantity))
            rec.draws[lot.id] = (take, lot.recognized - before)
            event("draw: rolled-over lot" if lot.end is None else "draw: package")
            self.usage[key][2] += take
            if not sum(remaining):
                break
        if sum(remaining):
            prices = [nanos(p) for p in PRICES[ev.model]]
            gross = sum(
                half_even(Fraction(n * p, 1_000_000))
                for n, p in zip(remaining, prices, strict=True)
            )
            disc = self.tenants[ev.tenant].discount_ppm
            net = gross - half_even(Fraction(gross * disc, 1_000_000))
            paid = self.pay(ev.tenant, net, overrun=True)
            assert paid is not None
            rec.wallet, rec.receivable, rec.overrun = paid
            self.usage[key][0] += net

    def refund(self, event_id: str) -> None:
        rec = self.events[event_id]
        t = self.tenants[rec.ev.tenant]
        t.wallet += rec.wallet
        t.receivable -= rec.receivable
        t.overrun -= rec.overrun
        for lot_id, (tokens, earned) in rec.draws.items():
            lot = self.lots[lot_id]
            if not lot.active:
                # The lot has ended: what the refund gives back goes straight to breakage.
                self.breakage += earned
                continue
            lot.held += tokens
            lot.consumed -= tokens
            lot.recognized -= earned
        rec.refunded = True


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.now = ms(2026, 11, 1)
        self.seq = 0
        self.ref = Reference()
        self.periods: set[str] = set()
        self.b = self.run(self._setup())

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    async def _setup(self) -> Billing:
        b = Billing(await open_database(":memory:"))
        for t, (limit, disc) in TENANTS.items():
            await b.set_profile(t, currency=CUR, credit_limit=limit, discount_pct=disc)
        for model, (pin, pc, pout) in PRICES.items():
            await b.set_price(
                model,
                currency=CUR,
                input_per_1m=pin,
                cached_input_per_1m=pc,
                output_per_1m=pout,
                effective_ms=0,
            )
        for name, (price, tokens, period, rollover) in PLANS.items():
            await b.create_plan(
                name,
                price=price,
                currency=CUR,
                tokens=tokens,
                period=period,
                hard_stop=True,
                rollover=rollover,
            )
        return b

    def teardown(self) -> None:
        self.run(self.b.db.close())
        self.runner.close()

    def new_event(self, tenant: str, model: str, tokens: tuple[int, int, int], back: int) -> Any:
        self.seq += 1
        inp, cached, out = tokens
        ts = self.now - back
        self.periods.add(period_of(ts))
        return UsageEvent(
            request_id=f"ev{self.seq}",
            ts_ms=ts,
            tenant=tenant,
            key_id="k",
            endpoint="chat.completions",
            model=model,
            provider="prov",
            input_tokens=inp,
            cached_input_tokens=min(cached, inp),
            output_tokens=out,
        )

    # -- rules ------------------------------------------------------------------------------

    @initialize(plans=st.lists(st.sampled_from(sorted(PLANS)), max_size=3))
    def funded(self, plans: list[str]) -> None:
        """Both tenants start with money, and each with the same packages."""
        for tenant in TENANTS:
            self.topup(tenant, 500)
            for plan in plans:
                self.buy(tenant, plan)

    @rule(tenant=st.sampled_from(sorted(TENANTS)), fen=st.integers(1, 300))
    def topup(self, tenant: str, fen: int) -> None:
        amount = f"{fen // 100}.{fen % 100:02d}"
        self.run(self.b.topup(tenant, amount, CUR, ts_ms=self.now))
        self.ref.tenants[tenant].wallet += nanos(amount)
        self.periods.add(period_of(self.now))

    @rule(tenant=st.sampled_from(sorted(TENANTS)), plan=st.sampled_from(sorted(PLANS)))
    def buy(self, tenant: str, plan: str) -> None:
        price, tokens, period, rollover = PLANS[plan]
        t = self.ref.tenants[tenant]
        can_pay = t.wallet + (t.credit_limit - t.receivable) >= nanos(price)
        start = self.now - 6 * HOUR  # so that the latest events fall in it
        try:
            lot = self.run(self.b.assign(tenant, plan, start_ms=start))
        except InsufficientFunds:
            assert not can_pay
            return
        assert can_pay
        assert self.ref.pay(tenant, nanos(price), overrun=False) is not None
        assert lot.end_ms == period_end(start, period)
        self.ref.lots[lot.id] = RefLot(
            lot.id, tenant, tokens, nanos(price), start, lot.end_ms, rollover, tokens
        )
        self.periods.add(period_of(start))

    events_st = st.lists(
        st.tuples(
            st.sampled_from(sorted(TENANTS)),
            st.sampled_from(sorted(PRICES)),
            st.tuples(st.integers(0, 4000), st.integers(0, 2000), st.integers(0, 4000)),
            st.integers(0, 12 * HOUR),  # up to 12 hours before now: out of order
        ),
        min_size=1,
        max_size=6,
    )

    @rule(specs=events_st, repeat=st.booleans())
    def settle_new(self, specs: list[Any], repeat: bool) -> None:
        evs = [self.new_event(*s) for s in specs]
        batch = evs + evs[:1] if repeat else evs  # a duplicate inside the batch
        res = self.run(self.b.settle(batch))
        assert (res.settled, res.duplicates, res.conflicts, res.failed) == (
            len(evs),
            len(batch) - len(evs),
            [],
            [],
        )
        for e in evs:
            self.ref.settle(e)

    @precondition(lambda self: self.ref.events)
    @rule(data=st.data(), specs=events_st)
    def replay_shuffled(self, data: st.DataObject, specs: list[Any]) -> None:
        """Replays of settled events, re-ordered among new ones."""
        old = data.draw(st.lists(st.sampled_from(sorted(self.ref.events)), min_size=1, max_size=5))
        new = [self.new_event(*s) for s in specs]
        batch = data.draw(st.permutations([self.ref.events[i].ev for i in old] + new))
        res = self.run(self.b.settle(batch))
        assert (res.settled, res.duplicates, res.conflicts) == (len(new), len(old), [])
        for e in batch:
            if e in new:
                self.ref.settle(e)

    @precondition(lambda self: self.ref.events)
    @rule(data=st.data())
    def conflicting_payload(self, data: st.DataObject) -> None:
        ev = self.ref.events[data.draw(st.sampled_from(sorted(self.ref.events)))].ev
        changed = UsageEvent(
            **{
                **{f: getattr(ev, f) for f in ev.__struct_fields__},
                "output_tokens": ev.output_tokens + 1,
            }
        )
        res = self.run(self.b.settle([changed]))
        assert (res.settled, res.duplicates, res.conflicts) == (0, 0, [ev.request_id])

    @precondition(lambda self: self.ref.events)
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        rec = self.ref.events[data.draw(st.sampled_from(sorted(self.ref.events)))]
        if rec.refunded or not rec.charged:
            match = "already been refunded" if rec.refunded else "has not been settled"
            with pytest.raises(BillingError, match=match):
                self.run(self.b.refund(rec.ev.request_id, ts_ms=self.now))
            return
        self.run(self.b.refund(rec.ev.request_id, ts_ms=self.now))
        event("refund: " + ("package" if rec.draws else "money"))
        self.ref.refund(rec.ev.request_id)
        self.periods.add(period_of(self.now))

    @rule(hours=st.one_of(st.integers(1, 48), st.integers(6 * 24, 35 * 24)))
    def advance(self, hours: int) -> None:
        self.now += hours * HOUR

    @precondition(lambda self: any(x.active and x.end for x in self.ref.lots.values()))
    @rule()
    def month_end(self) -> None:
        """Straight to the end of the next lot to expire, and expire it."""
        self.now = min(x.end for x in self.ref.lots.values() if x.active and x.end)
        self.expire()

    @rule()
    def expire(self) -> None:
        due = sorted(
            (x for x in self.ref.lots.values() if x.active and x.end and x.end <= self.now),
            key=lambda x: (x.end or 0, x.id),
        )
        self.run(self.b.expire(now=self.now))
        rolled: list[RefLot] = []
        for lot in due:
            self.periods.add(period_of(lot.end - 1 if lot.end else self.now))
            unearned = lot.price - lot.recognized
            if lot.rollover:
                if lot.held:
                    rolled.append(
                        RefLot(
                            "?", lot.tenant, lot.held, unearned, lot.end or 0, None, False, lot.held
                        )
                    )
            else:
                self.ref.breakage += unearned
            lot.active, lot.held, lot.recognized = False, 0, lot.price
        # The new lots' ids are the service's: match them by what they must hold.
        fresh = [x for x in self.run(self.b.lots()) if x.id not in self.ref.lots]
        assert len(fresh) == len(rolled)
        for x in fresh:
            match = next(
                r
                for r in rolled
                if r.id == "?"
                and (r.tenant, r.quantity, r.price, r.start)
                == (x.tenant, x.quantity, x.price, x.start_ms)
            )
            assert x.end_ms is None and x.status == "active"
            match.id = x.id
            self.ref.lots[x.id] = match

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def books_agree_with_the_model(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        b, db = self.b, self.b.db
        assert await b.invariants() == []

        async def fetch(sql: str, *args: Any) -> list[Any]:
            return await db.transaction(lambda t: t.fetch(sql, *args))

        over = await fetch(
            "SELECT id FROM accounts WHERE ceiling IS NOT NULL AND balance > ceiling"
        )
        assert over == []
        sums = dict(await fetch("SELECT account, SUM(amount) FROM postings GROUP BY account"))

        def bal(acc: str) -> int:
            return int(sums.get(acc, 0))

        for name, t in self.ref.tenants.items():
            assert -bal(L.wallet(name, CUR)) == t.wallet >= 0
            assert bal(L.receivable(name, CUR)) == t.receivable <= t.credit_limit
            assert bal(L.overrun(name, CUR)) == t.overrun
        stored = {x.id: x for x in await b.lots()}
        assert set(stored) == set(self.ref.lots)
        for lot in self.ref.lots.values():
            s = stored[lot.id]
            assert -bal(L.lot_units(lot.tenant, lot.id)) == lot.held >= 0
            assert (s.consumed, s.recognized) == (lot.consumed, lot.recognized)
            assert s.status == ("active" if lot.active else "expired")
            # What a lot has not earned yet is exactly what sits in its deferred account.
            assert -bal(L.lot_deferred(lot.tenant, lot.id)) == lot.price - lot.recognized
        assert -bal(L.op("breakage", CUR)) == self.ref.breakage

        # Statements: closing balances equal the postings; usage totals equal the model.
        for tenant in self.ref.tenants:
            for period in sorted(self.periods):
                stt = await statement(db, tenant, period)
                money = sum(u["amounts"].get(CUR, 0) for u in stt["usage"])
                tokens = sum(u["tokens"] for u in stt["usage"])
                pkg = sum(u["package_tokens"] for u in stt["usage"])
                assert [money, tokens, pkg] == self.ref.usage[(tenant, period)]
            if self.periods:
                last = await statement(db, tenant, max(self.periods))
                side = {"wallet": -1, "lot": -1, "receivable": 1, "overrun": 1}
                assert {r["account"]: r["balance"] for r in last["closing"]} == {
                    acc: side[acc.split(":")[2]] * int(v)
                    for acc, v in sums.items()
                    if acc.startswith(f"t:{tenant}:") and acc.split(":")[2] != "deferred"
                }


LedgerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase
