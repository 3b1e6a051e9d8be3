"""Admission reserves what settlement posts: random contracts, prices, FX and usage, driven
through both with the same balances.

Each example builds a tenant through `Billing` on a real SQLite ledger (profile: currency, draw
order, credit line, discount; a price, maybe in another currency, maybe with points; an FX rate
set directly, inversely or not at all; a wallet top-up; package lots with hard stop, overage or
automatic top-up, point packs, some outside the model's scope), publishes the pots from that
ledger into a real quota table (`PotSync`), and then:

- admits the usage's lines through `Contracts.admit` (the gateway's money admission);
- settles the same usage as an event through `Billing.settle` (the ledger): as admitted, or,
  when the price writes to a prompt cache dearer than it inputs, with the uncached input
  written (admission reserves that worst case: `Contracts.worst`).

Both must agree: admission admits exactly when settlement posts no overrun (and both refuse a
money draw with no FX rate); when admitted, each pot holds what the ledger drew from that
contract (lot tokens, points, money in the tenant's currency, automatic top-up blocks
included), and the contracts come in the same order.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tokenhub.billing.draw import NotPriced, lot_pot, money_pot
from tokenhub.billing.pots import READY_ACCOUNT, Contracts, Hold, PotSync, new_epoch
from tokenhub.billing.service import DRAW_ORDER, Billing, now_ms
from tokenhub.billing.terms import load_terms
from tokenhub.db.database import open_database
from tokenhub.quota import Quota
from tokenhub.usage import UsageEvent

T = "acme"
MODEL = "m"


@dataclass
class Plan:
    kind: str  # package | points
    size: int  # tokens, or whole points
    exhaustion: str  # hard_stop | overage | auto_topup
    overage: str
    overage_cur: str
    block: int
    scope: tuple[str, ...]
    used: int  # tokens drawn before the usage under test


def _price() -> st.SearchStrategy[str]:
    return st.sampled_from(["0", "0.15", "1", "2.5", "7.123", "60", "150.001"])


plans = st.builds(
    Plan,
    kind=st.sampled_from(["package", "package", "points"]),
    size=st.integers(1, 8_000),
    exhaustion=st.sampled_from(["hard_stop", "overage", "auto_topup"]),
    overage=_price(),
    overage_cur=st.sampled_from(["USD", "CNY"]),
    block=st.integers(1, 2_000),
    scope=st.sampled_from([(), (), (MODEL,), ("other",)]),
    used=st.sampled_from([0, 0, 1, 500, 3_000]),
)


@dataclass
class Case:
    cur: str
    order: list[str]
    credit: str
    discount: str
    price_cur: str
    prices: tuple[str, str, str, str | None]  # input, cached, output, cache write
    points: str | None
    fx: str  # none | direct | inverse
    wallet: str
    plans: list[Plan]
    lines: tuple[int, int, int, int]  # input (reads, writes included), reads, output, writes


cases = st.builds(
    Case,
    cur=st.sampled_from(["USD", "CNY"]),
    order=st.one_of(
        st.permutations(DRAW_ORDER).map(list),
        st.lists(st.sampled_from(DRAW_ORDER), min_size=1, max_size=4, unique=True),
    ),
    credit=st.sampled_from(["0", "0.01", "0.5", "3"]),
    discount=st.sampled_from(["0", "10", "33.3333"]),
    price_cur=st.sampled_from(["USD", "CNY"]),
    prices=st.tuples(_price(), _price(), _price(), st.one_of(st.none(), _price())),
    points=st.one_of(st.none(), st.sampled_from(["1", "3.5", "250"])),
    fx=st.sampled_from(["none", "direct", "inverse"]),
    wallet=st.sampled_from(["0", "0.01", "0.2", "1", "20"]),
    plans=st.one_of(st.lists(plans, min_size=1, max_size=3), st.lists(plans, max_size=1)),
    lines=st.tuples(
        st.integers(0, 8_000), st.integers(0, 4_000), st.integers(0, 8_000), st.integers(0, 4_000)
    ),
)


async def _setup(b: Billing, c: Case, start: int) -> None:
    await b.set_profile(T, currency=c.cur, draw_order=c.order, credit_limit=c.credit,
                        discount_pct=c.discount)  # fmt: skip
    inp, cached, out, write = c.prices
    await b.set_price(MODEL, currency=c.price_cur, input_per_1m=inp, cached_input_per_1m=cached,
                      output_per_1m=out, cache_write_per_1m=write, points_per_1m=c.points,
                      effective_ms=0)  # fmt: skip
    if c.fx == "direct":
        await b.set_fx("USD", "CNY", "7.1234", effective_ms=0)
    elif c.fx == "inverse":
        await b.set_fx("CNY", "USD", "0.1404", effective_ms=0)
    # The plans are paid from money put in for them (so the wallet under test is c.wallet).
    for i, p in enumerate(c.plans):
        name = f"p{i}"
        kw: dict[str, Any] = {}
        if p.kind == "package":
            kw["tokens"] = p.size
            if p.exhaustion == "overage":
                kw |= {"overage_per_1m": p.overage, "overage_currency": p.overage_cur}
            elif p.exhaustion == "auto_topup":
                kw["auto_topup"] = p.block
            else:
                kw["hard_stop"] = True
        else:
            kw["points"] = str(p.size)
        await b.create_plan(name, price="0.70", currency=c.cur, period="month",
                            models=p.scope, **kw)  # fmt: skip
        await b.topup(T, "0.70", c.cur, ts_ms=start)
        await b.assign(T, name, start_ms=start + i)
    if c.wallet != "0":
        await b.topup(T, c.wallet, c.cur, ts_ms=start)


async def _consume(b: Billing, c: Case, start: int) -> None:
    """Some of the contracts used before: an earlier event, settled by the same settlement
    (whatever it draws, the pots are published from the ledger after it)."""
    used = sum(p.used for p in c.plans)
    if used:
        ev = UsageEvent(request_id="r0", ts_ms=start + 500, tenant=T, key_id="k", endpoint="e",
                        model=MODEL, provider="p", input_tokens=used)  # fmt: skip
        await b.settle([ev])


def _settled(details: dict[str, Any], topups: list[dict[str, Any]], avail: dict[str, int]) -> (
    tuple[dict[str, int], list[str], int]
):  # fmt: skip
    """What settlement drew per pot (money: what the wallet and credit line paid, in the
    tenant's currency; a lot: the units it had before, not those of a block bought now), the
    pots in order, and the overrun."""
    per: dict[str, int] = {}
    order: list[str] = []
    overrun = 0
    mpot = money_pot(T)

    def add(pot: str, n: int) -> None:
        if n <= 0:
            return
        per[pot] = per.get(pot, 0) + n
        if pot not in order:
            order.append(pot)

    left = dict(avail)
    for d in details["draws"]:
        if d["from"] in ("package", "points"):
            pot = f"pot:{'t' if d['from'] == 'package' else 'p'}:{d['lot']}"
            n = sum(d["tokens"]) if d["from"] == "package" else d["points"]
            own = min(n, left.get(pot, 0))  # the rest came from a block bought now
            left[pot] = left.get(pot, 0) - own
            if own < n:
                add(mpot, sum(t["price"] for t in topups if t["lot"] == d["lot"]))
                topups = [t for t in topups if t["lot"] != d["lot"]]
            add(pot, own)
        else:
            for acc, x in d["paid_by"]:
                if ":overrun:" in acc:
                    overrun += x
                else:
                    add(mpot, x)
    return per, order, overrun


async def _run(c: Case, root: Path) -> None:
    db = await open_database(f"sqlite:///{root / 'ledger.db'}")
    try:
        b = Billing(db)
        start = now_ms() - 60_000
        await _setup(b, c, start)
        await _consume(b, c, start)
        ts = start + 1_000

        quota = Quota.anonymous(accounts=64, reservations=64)
        new_epoch(quota)
        sync = PotSync(quota, db)
        await sync.publish()
        quota.set_limits(READY_ACCOUNT, requests=1)
        contracts = Contracts(quota, db)
        contracts.terms = await load_terms(db)
        pots = [money_pot(T)] + [lot_pot(x) for x in contracts.terms.lots.get(T, ())]
        avail = {p: contracts.available(p) for p in pots}

        inp, cached, out, writes = c.lines
        cached = min(cached, inp)
        writes = min(writes, inp - cached)
        lines = [inp - cached - writes, cached, out, writes]
        try:
            admitted: Hold | Any = contracts.admit(T, MODEL, ts, list(lines), 60_000)
        except NotPriced as e:
            admitted = e
        write_price = c.prices[3]
        if write_price is not None and Decimal(write_price) > Decimal(c.prices[0]):
            writes = inp - cached  # the worst case admission reserved: the prompt written

        ev = UsageEvent(request_id="r1", ts_ms=ts, tenant=T, key_id="k", endpoint="e",
                        model=MODEL, provider="p", input_tokens=inp, cached_input_tokens=cached,
                        output_tokens=out, cache_write_tokens=writes)  # fmt: skip
        res = await b.settle([ev])

        if isinstance(admitted, NotPriced):
            # Only a missing FX rate refuses so: settlement cannot post the event either.
            assert c.fx == "none", admitted
            event("refused: no FX rate")
            assert [e for e, _ in res.failed] == ["r1"], res
            assert "no FX rate" in res.failed[0][1]
            return
        assert res.settled == 1 and not res.failed, res
        txn_id = res.txn_ids["r1"]
        if not txn_id:
            assert sum(lines) == 0 and isinstance(admitted, Hold)
            return
        rows = await db.transaction(
            lambda tx: tx.fetch("SELECT details FROM ledger_txns WHERE id = $1", txn_id)
        )
        details = json.loads(rows[0][0])
        per, order, overrun = _settled(details, list(details.get("auto_topups", [])), avail)
        assert isinstance(admitted, Hold) == (overrun == 0), (admitted, details)
        event("admitted" if isinstance(admitted, Hold) else "refused: would overrun")
        for d in details["draws"]:
            event(f"drew from {d['from']}" + (" via FX" if "fx" in d else ""))
        if details.get("auto_topups"):
            event("auto top-up")
        if isinstance(admitted, Hold):
            held: dict[str, int] = {}
            seq: list[str] = []
            for d in admitted.draws:
                if d.amount:
                    held[d.pot] = held.get(d.pot, 0) + d.amount
                    if d.pot not in seq:
                        seq.append(d.pot)
            assert held == per, (held, per, details)
            assert seq == order, (seq, order, details)
            # And the table holds exactly that.
            for pot, n in held.items():
                dim = "tokens" if pot.startswith("pot:t:") else "money"
                assert getattr(quota.state(pot), dim).held == n
        else:
            # Refused: nothing is held.
            for pot in pots:
                if quota.table.find_account(pot) is not None:
                    s = quota.state(pot)
                    assert s.tokens.held == 0 and s.money.held == 0
        assert await b.invariants() == []
    finally:
        await db.close()


def _case(**kw: Any) -> Case:
    base: dict[str, Any] = dict(
        cur="USD", order=list(DRAW_ORDER), credit="0", discount="0", price_cur="USD",
        prices=("2.5", "1", "7.123", None), points=None, fx="direct", wallet="1", plans=[],
        lines=(3_000, 500, 2_000, 0),
    )  # fmt: skip
    base.update(kw)
    return Case(**base)


def _plan(**kw: Any) -> Plan:
    base: dict[str, Any] = dict(kind="package", size=1_000, exhaustion="hard_stop", overage="60",
                                overage_cur="USD", block=700, scope=(), used=0)  # fmt: skip
    base.update(kw)
    return Plan(**base)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases)
# An automatic top-up buying blocks while the wallet can pay them, then the wallet.
@example(c=_case(plans=[_plan(exhaustion="auto_topup", used=500)], wallet="1.2"))
@example(c=_case(plans=[_plan(exhaustion="auto_topup")], wallet="0.01", credit="0.5"))
# Overage in another currency than the tenant's, paid from a credit line, short of it.
@example(c=_case(cur="CNY", plans=[_plan(exhaustion="overage")], wallet="0", credit="0.5"))
@example(c=_case(cur="CNY", plans=[_plan(exhaustion="overage")], wallet="20", fx="inverse"))
# Points part-paying, then a discounted wallet in another currency.
@example(c=_case(cur="CNY", points="250", discount="10", plans=[_plan(kind="points", size=1)]))
# Packages first in scope only, a hard stop, nothing else in the order: refused.
@example(c=_case(order=["package"], plans=[_plan(scope=("other",)), _plan(size=100)]))
# Prompt-cache writes dearer than input: admission reserves the prompt as written; a package
# pays for writes like any token (then the wallet at the write price).
@example(c=_case(prices=("2.5", "1", "7.123", "3.125"), lines=(3_000, 500, 2_000, 700)))
@example(c=_case(prices=("2.5", "1", "7.123", "3.125"), lines=(3_000, 500, 2_000, 700),
                 plans=[_plan(size=2_800)]))  # fmt: skip
# Writes cheaper than input: reserved and settled as they come.
@example(c=_case(prices=("2.5", "1", "7.123", "0.15"), lines=(3_000, 500, 2_000, 700)))
# The wallet before the packages: it takes everything.
@example(c=_case(order=["wallet", "package"], plans=[_plan()], wallet="20"))
def test_admission_reserves_what_settlement_posts(c: Case) -> None:
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(_run(c, Path(d)))
