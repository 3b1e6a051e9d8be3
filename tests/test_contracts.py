"""Planning money admission (tokenhub.billing.pots): which pots pay for a request's worst
case, in the tenant's draw order, priced as settlement prices it; and how the actual usage is
charged back to the pots. The gateway end of it is tests/server/test_gateway_contracts.py."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tokenhub.billing.pots import (
    Contracts,
    Draw,
    NotPriced,
    NotReady,
    PotSync,
    Rule,
    Shortfall,
    Terms,
    lot_pot,
    money_pot,
    new_epoch,
    plan,
    replay,
)
from tokenhub.billing.service import Lot, Price, Profile
from tokenhub.money import convert, rate
from tokenhub.quota import Quota
from tokenhub.usage import UsageEvent

T = "acme"
USD_1M = 1_000_000_000  # 1 unit per 1M tokens, in nanos


def lot(id: str, kind: str = "package", qty: int = 1000, **kw: object) -> Lot:
    base: dict[str, object] = dict(
        id=id, tenant=T, plan="p", kind=kind, quantity=qty, price=10 * USD_1M, currency="USD",
        start_ms=0, end_ms=None, exhaustion="hard_stop", overage_per_1m=None,
        overage_currency="USD", auto_topup=None, rollover=False, models=(), consumed=0,
        recognized=0, status="active",
    )  # fmt: skip
    base.update(kw)
    return Lot(**base)  # type: ignore[arg-type]


def price(model: str = "m", cur: str = "USD", i: int = 2, c: int = 1, o: int = 8,
          points: int | None = None, tenant: str = "") -> Price:  # fmt: skip
    return Price(model, tenant, 1, 0, cur, i * USD_1M, c * USD_1M, o * USD_1M, points)


def terms(*lots: Lot, order: tuple[str, ...] = ("package", "points", "wallet", "postpaid"),
          cur: str = "USD", discount: int = 0, prices: tuple[Price, ...] = (price(),),
          fx: dict[tuple[str, str], str] | None = None) -> Terms:  # fmt: skip
    t = Terms()
    t.profiles[T] = Profile(T, cur, order, 0, None, discount)
    t.lots[T] = list(lots)
    for p in prices:
        t.prices.setdefault((p.model, p.tenant), []).append(p)
    for (b, q), r in (fx or {}).items():
        t.fx[(b, q)] = [(0, Decimal(r))]
    return t


def test_packages_first_then_the_wallet_at_the_list_price() -> None:
    t = terms(lot("L1", qty=300), lot("L2", qty=200))
    avail = {lot_pot(t.lots[T][0]): 300, lot_pot(t.lots[T][1]): 150, money_pot(T): 10**12}
    lines = [400, 0, 600]
    o = plan(t, T, "m", 1, lines, avail.__getitem__)
    assert o.paid
    assert [(d.pot, d.amount) for d in o.draws] == [
        ("pot:t:L1", 300),
        ("pot:t:L2", 150),
        # The packages take the 400 input tokens and 50 output ones; 550 output tokens are
        # left, at 8 per 1M.
        ("pot:m:acme", rate(550, 8 * USD_1M)),
    ]


def test_exhausted_package_with_overage_in_another_currency() -> None:
    t = terms(
        lot("L1", qty=100, exhaustion="overage", overage_per_1m=3 * USD_1M, overage_currency="USD"),
        cur="CNY",
        fx={("USD", "CNY"): "7.1"},
    )
    o = plan(t, T, "m", 1, [50, 0, 250], {"pot:t:L1": 100, "pot:m:acme": 10**12}.get)
    draws = o.draws
    assert o.paid
    assert draws[0].amount == 100
    # Overage prices the lines' sum (as settlement does), converted at the FX rate.
    assert draws[1].amount == convert(rate(200, 3 * USD_1M), Decimal("7.1"))
    assert draws[1].rule.kind == "overage"


def test_points_then_discounted_wallet_and_what_is_short() -> None:
    pts = lot("P1", kind="points", qty=10**9)
    t = terms(pts, discount=100_000, prices=(price(points=4 * 10**9),))
    # 0.5 points: at 4 points per 1M tokens, 125,000 tokens.
    avail = {"pot:p:P1": 500_000_000, "pot:m:acme": 0}
    o = plan(t, T, "m", 1, [100_000, 0, 100_000], avail.get)
    gross = rate(75_000, 8 * USD_1M)
    assert [(d.pot, d.amount) for d in o.draws] == [
        ("pot:p:P1", 500_000_000),
        ("pot:m:acme", gross - gross // 10),
    ]
    # The wallet takes the 75,000 output tokens the points could not pay, and can pay none.
    assert o.draws[1].tokens == (0, 0, 75_000, 0)
    assert o.overrun == o.draws[1].unpaid == gross - gross // 10 and not o.paid
    # With money, the rest goes there at the discounted price.
    avail["pot:m:acme"] = 10**12
    o = plan(t, T, "m", 1, [100_000, 0, 100_000], avail.get)
    assert o.draws[1].amount == gross - gross // 10 and o.paid


def test_a_model_without_a_price_cannot_be_paid_from_money() -> None:
    t = terms(lot("L1", qty=100), prices=())
    o = plan(t, T, "m", 1, [60, 0, 40], {"pot:t:L1": 100}.get)
    assert o.paid and len(o.draws) == 1  # the package needs no price
    with pytest.raises(NotPriced, match="no price for tenant acme"):
        plan(t, T, "m", 1, [60, 0, 41], {"pot:t:L1": 100, "pot:m:acme": 10**9}.get)


def test_lots_outside_their_scope_or_window_are_not_drawn() -> None:
    t = terms(lot("L1", models=("other",)), lot("L2", start_ms=10), order=("package",))
    o = plan(t, T, "m", 5, [10, 0, 0], {"pot:t:L1": 100, "pot:t:L2": 100}.get)
    # Nothing in the order takes them: priced, and unpaid (what settlement posts as overrun).
    assert [(d.source, d.tokens, d.unpaid) for d in o.draws] == [
        ("overrun", (10, 0, 0, 0), rate(10, 2 * USD_1M))
    ]
    assert not o.paid
    t.prices.clear()  # without a price, the tokens are left as they are
    o = plan(t, T, "m", 5, [10, 0, 0], {"pot:t:L1": 100, "pot:t:L2": 100}.get)
    assert (o.draws, o.rest) == ([], [10, 0, 0, 0])


def test_replay_fills_the_draws_in_order_and_puts_overruns_on_the_last() -> None:
    money = Rule("price", (2 * USD_1M, 1 * USD_1M, 8 * USD_1M, 3 * USD_1M))
    draws = [Draw("pot:t:L1", Rule("package"), 300), Draw("pot:m:acme", money, 10_000)]
    # Less than reserved: the package first, the wallet pays the rest.
    assert replay(draws, [200, 0, 150]) == [300, rate(50, 8 * USD_1M)]
    # More than reserved (a stream past its hold): the wallet draw takes the excess.
    assert replay(draws, [300, 0, 5000]) == [300, money.cost([0, 0, 5000, 0])]
    # Cache writes come right after the uncached input (draw.TAKE_ORDER), at their price.
    assert replay(draws, [100, 0, 100, 150]) == [300, rate(50, 8 * USD_1M)]
    assert replay(draws, [300, 0, 0, 100]) == [300, rate(100, 3 * USD_1M)]
    assert replay(draws, [0, 0, 0]) == [0, 0]


def test_rule_afford_is_the_largest_prefix_that_fits() -> None:
    r = Rule("price", (2 * USD_1M, 1 * USD_1M, 8 * USD_1M, 3 * USD_1M))
    for budget in (0, 1, 1999, 2000, 123_456, 10**9):
        n, cost = r.afford([1000, 0, 1000, 0], budget)
        took = [min(1000, n), 0, max(0, n - 1000), 0]
        assert r.cost(took) == cost <= budget
        if n < 2000:
            more = [min(1000, n + 1), 0, max(0, n + 1 - 1000), 0]
            assert r.cost(more) > budget


async def test_admit_reserves_all_or_nothing_and_the_sync_gives_back() -> None:
    quota = Quota.anonymous(accounts=64, reservations=64)
    new_epoch(quota)
    c = Contracts(quota, db=None)  # type: ignore[arg-type]
    c.terms = terms(lot("L1", qty=100))
    with pytest.raises(NotReady):
        c.admit(T, "m", 1, [50, 0, 50], 10_000)
    quota.set_limits("pot:t:L1", tokens=100)
    quota.set_limits(money_pot(T), money=rate(40, 8 * USD_1M))
    quota.set_limits("meta:contracts", requests=1)
    hold = c.admit(T, "m", 1, [50, 0, 90], 10_000)
    assert not isinstance(hold, Shortfall)
    assert quota.state("pot:t:L1").tokens.held == 100
    assert quota.state(money_pot(T)).money.held == rate(40, 8 * USD_1M)
    # Nothing left: a second request is refused and takes nothing.
    short = c.admit(T, "m", 1, [1, 0, 0], 10_000)
    assert isinstance(short, Shortfall) and "package tokens left 0" in short.message
    assert quota.state("pot:t:L1").tokens.held == 100
    # A stream's next tranche cannot be paid; the hold is unchanged.
    assert not hold.extend(10)
    holds = hold.settle([50, 0, 60])
    assert holds == f"{c.epoch}|pot:t:L1=100;pot:m:acme={rate(10, 8 * USD_1M)}"
    assert quota.state(money_pot(T)).money.used == rate(10, 8 * USD_1M)

    sync = PotSync(quota, db=None)  # type: ignore[arg-type]
    ev = UsageEvent(request_id="r", ts_ms=1, tenant=T, key_id="k", endpoint="e", model="m",
                    holds=holds)  # fmt: skip
    assert sync.release([ev]) == 100 + rate(10, 8 * USD_1M)
    assert quota.state("pot:t:L1").tokens.used == 0
    # Another table's (or a restarted server's) holds are not ours to give back.
    assert sync.release([ev]) == 0
    other = UsageEvent(request_id="s", ts_ms=1, tenant=T, key_id="k", endpoint="e", model="m",
                       holds=f"{c.epoch + 1}|pot:t:L1=5")  # fmt: skip
    assert sync.release([other]) == 0


def test_the_first_pot_fast_path_never_reserves_on_an_unpublished_pot() -> None:
    quota = Quota.anonymous(accounts=64, reservations=64)
    new_epoch(quota)
    c = Contracts(quota, db=None)  # type: ignore[arg-type]
    c.terms = terms(order=("wallet",))
    quota.set_limits("meta:contracts", requests=1)
    # Not published yet: refused as unpaid, and no unlimited pot appears.
    short = c.admit(T, "m", 1, [1000, 0, 1000], 10_000)
    assert isinstance(short, Shortfall) and "wallet and credit left 0" in short.message
    assert quota.table.find_account(money_pot(T)) is None
    # Published: one reservation of the whole worst case on the wallet's pot.
    cost = rate(1000, 2 * USD_1M) + rate(1000, 8 * USD_1M)
    quota.set_limits(money_pot(T), money=cost)
    hold = c.admit(T, "m", 1, [1000, 0, 1000], 10_000)
    assert not isinstance(hold, Shortfall)
    assert [(d.pot, d.amount) for d in hold.draws] == [(money_pot(T), cost)]
    # The pot is now empty: the next is refused, reserving nothing.
    assert isinstance(c.admit(T, "m", 1, [1, 0, 0], 10_000), Shortfall)
    assert quota.state(money_pot(T)).money.held == cost
    hold.settle([1000, 0, 500])
    assert quota.state(money_pot(T)).money.used == rate(1000, 2 * USD_1M) + rate(500, 8 * USD_1M)
