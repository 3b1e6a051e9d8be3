"""The billing core end to end, on SQLite and on PostgreSQL (`ledger_url`).

Every expected figure is derived in the test from the inputs it sets up (prices, FX rates,
token counts), with integer or `Fraction` arithmetic; `check_invariants()` must be empty after
every scenario (the `billing` fixture checks it on the way out, the tests at their end).
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest
from ledger_kit import (
    balance,
    closing,
    ms,
    opening,
    per_1m,
    posting_count,
    postings_sum,
    statement,
    stored_balance,
    tx,
    txn_details,
    txn_legs,
    usage,
    wallet_held,
)

from tokenhub.billing import ledger as L
from tokenhub.billing import statements
from tokenhub.billing.ledger import InsufficientFunds, LedgerError
from tokenhub.billing.service import Billing, BillingError

NANOS = 10**9
M = 1_000_000
NOV, DEC = "2026-11", "2026-12"


def nanos(text: str) -> int:
    """A decimal string in nanos, exactly (the test's own conversion, not the code's)."""
    v = Fraction(text) * NANOS
    assert v.denominator == 1
    return int(v)


def fx(amount: int, rate: str) -> int:
    """amount x rate, which the tests choose to be exact."""
    v = amount * Fraction(rate)
    assert v.denominator == 1, "choose test inputs whose conversion is exact"
    return int(v)


def half_even(x: Fraction) -> int:
    return round(x)  # Fraction rounds half to even


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """The split the revenue rules promise (the parts of `total` by weight, the units left over
    to the largest remainders, ties to the earlier share), computed with fractions."""
    exact = [Fraction(total * w, sum(weights)) for w in weights]
    parts = [int(e) for e in exact]  # floor: everything here is >= 0
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def strip_txn(purchases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if k != "txn"} for p in purchases]


# -- the telecom case ----------------------------------------------------------------------------

QWEN_CNY = {"input": "0.80", "output": "2.00"}  # CNY per 1M tokens
GPT_USD = {"input": "0.15", "cached": "0.075", "output": "0.60"}  # USD per 1M tokens
RATE_OCT, RATE_NOV15, RATE_2027 = "7.10", "7.25", "7.40"  # USD -> CNY, effective-dated
PLAN_PRICE, PLAN_TOKENS = "9.90", 10_000_000
OVERAGE = {"CNY": "3.60", "USD": "0.50"}  # per 1M tokens


async def price_book(b: Billing) -> None:
    await b.set_price(
        "qwen-plus",
        currency="CNY",
        input_per_1m=QWEN_CNY["input"],
        output_per_1m=QWEN_CNY["output"],
        effective_ms=ms(2026, 1, 1),
    )
    await b.set_price(
        "gpt-4o-mini",
        currency="USD",
        input_per_1m=GPT_USD["input"],
        cached_input_per_1m=GPT_USD["cached"],
        output_per_1m=GPT_USD["output"],
        effective_ms=ms(2026, 1, 1),
    )
    # Set out of order on purpose: the rate effective at each event's time must be found by
    # date, not by insertion order; the 2027 one is never effective here.
    await b.set_fx("USD", "CNY", RATE_2027, effective_ms=ms(2027, 1, 1))
    await b.set_fx("USD", "CNY", RATE_NOV15, effective_ms=ms(2026, 11, 15))
    await b.set_fx("USD", "CNY", RATE_OCT, effective_ms=ms(2026, 10, 1))
    await b.set_split("dashscope", platform_pct="20", channel_pct="5", effective_ms=0)


def rate_at(ts: int) -> str:
    return RATE_NOV15 if ts >= ms(2026, 11, 15) else RATE_OCT


@pytest.mark.parametrize("overage_currency", ["CNY", "USD"])
async def test_telecom_package_with_overage(billing: Billing, overage_currency: str) -> None:
    b, db = billing, billing.db
    await price_book(b)
    await b.set_profile("unicom", currency="CNY")
    await b.create_plan(
        "unicom-10m",
        price=PLAN_PRICE,
        currency="CNY",
        tokens=PLAN_TOKENS,
        overage_per_1m=OVERAGE[overage_currency],
        overage_currency=overage_currency,
    )
    topup = "30.00"
    await b.topup("unicom", topup, "CNY", ts_ms=ms(2026, 11, 1))
    lot = await b.assign("unicom", "unicom-10m", start_ms=ms(2026, 11, 1))
    assert lot.end_ms == ms(2026, 12, 1)

    e1 = usage(
        "unicom",
        "qwen-plus",
        ms(2026, 11, 3),
        input_tokens=4 * M,
        cached_input_tokens=1 * M,
        output_tokens=2 * M,
    )
    e2 = usage(
        "unicom",
        "gpt-4o-mini",
        ms(2026, 11, 10),
        input_tokens=3 * M,
        output_tokens=2 * M,
        provider="openai",
    )
    e3 = usage("unicom", "qwen-plus", ms(2026, 11, 20), input_tokens=1 * M, output_tokens=M // 2)
    events = [e1, e2, e3]
    res = await b.settle(events)
    assert (res.settled, res.duplicates, res.conflicts, res.failed) == (3, 0, [], [])

    def total(e: Any) -> int:
        return int(e.input_tokens + e.output_tokens)

    assert sum(map(total, events)) == 12_500_000  # the 12.5M tokens
    # The package covers the first 10M tokens in settlement order; the rest is overage, each
    # event's part rated at the plan's overage price and converted at the rate of its date.
    left = PLAN_TOKENS
    over_tokens, over_cny, over_native = {}, {}, {}
    for e in events:
        from_pkg = min(left, total(e))
        left -= from_pkg
        n = total(e) - from_pkg
        over_tokens[e.request_id] = n
        amount = per_1m(n, nanos(OVERAGE[overage_currency]))
        over_native[e.request_id] = amount
        over_cny[e.request_id] = (
            amount if overage_currency == "CNY" else fx(amount, rate_at(e.ts_ms))
        )
    assert over_tokens == {e1.request_id: 0, e2.request_id: 1 * M, e3.request_id: 3 * M // 2}
    overage_total = sum(over_cny.values())
    wallet_left = nanos(topup) - nanos(PLAN_PRICE) - overage_total

    st = await statement(db, "unicom", NOV)
    assert st["opening"] == []
    assert strip_txn(st["purchases"]) == [
        {
            "memo": "plan unicom-10m",
            "plan": "unicom-10m",
            "price": nanos(PLAN_PRICE),
            "currency": "CNY",
        }
    ]
    assert st["usage"] == [
        {
            "model": "gpt-4o-mini",
            "tokens": total(e2),
            "package_tokens": total(e2) - 1 * M,
            "amounts": {"CNY": over_cny[e2.request_id]},
        },
        {
            "model": "qwen-plus",
            "tokens": total(e1) + total(e3),
            "package_tokens": total(e1),
            "amounts": {"CNY": over_cny[e3.request_id]},
        },
    ]
    assert st["overage"] == {"CNY": overage_total}
    assert st["breakage"] == []
    assert st["other"] == {"topup": {"CNY": nanos(topup)}}
    assert closing(st) == {
        L.lot_units("unicom", lot.id): 0,
        L.wallet("unicom", "CNY"): wallet_left,
    }
    assert await wallet_held(db, "unicom", "CNY") == wallet_left
    text = statements.render_statement(st)
    assert "Overage (included above)" in text and "plan unicom-10m" in text

    # Each overage line records the rate it used (the one effective at the event's date).
    for e in (e2, e3):
        draws = (await txn_details(db, res.txn_ids[e.request_id]))["draws"]
        over = [d for d in draws if d["from"] == "overage"]
        assert len(over) == 1
        assert over[0]["amount"] == over_native[e.request_id]
        if overage_currency == "USD":
            assert Fraction(over[0]["fx_rate"]) == Fraction(rate_at(e.ts_ms))
            assert over[0]["converted"] == over_cny[e.request_id]

    # The package is used up: all of its price is earned, nothing is left deferred.
    [lot_now] = await b.lots("unicom")
    assert (lot_now.consumed, lot_now.recognized) == (PLAN_TOKENS, nanos(PLAN_PRICE))
    assert await balance(db, L.lot_deferred("unicom", lot.id)) == 0

    # Provider settlement: the package revenue each event earned (tokens x price / quantity,
    # exact here) plus its overage, split 20/5/75 for dashscope and all to openai (no split).
    earned = {e1.request_id: fx(nanos(PLAN_PRICE), f"{total(e1)}/{PLAN_TOKENS}")}
    earned[e2.request_id] = nanos(PLAN_PRICE) - earned[e1.request_id]
    dash = await tx(db, statements.provider_settlement, "dashscope", NOV)
    opena = await tx(db, statements.provider_settlement, "openai", NOV)
    dash_cny = largest_remainder(earned[e1.request_id], [20, 5, 75])[2]
    dash_over = largest_remainder(over_native[e3.request_id], [20, 5, 75])[2]
    if overage_currency == "CNY":
        assert {c: v["owed"] for c, v in dash["totals"].items()} == {"CNY": dash_cny + dash_over}
        assert {c: v["owed"] for c, v in opena["totals"].items()} == {
            "CNY": earned[e2.request_id] + over_native[e2.request_id]
        }
    else:
        assert {c: v["owed"] for c, v in dash["totals"].items()} == {
            "CNY": dash_cny,
            "USD": dash_over,
        }
        assert {c: v["owed"] for c, v in opena["totals"].items()} == {
            "CNY": earned[e2.request_id],
            "USD": over_native[e2.request_id],
        }
    assert await b.invariants() == []


async def test_wallet_usage_priced_per_model_and_converted_at_the_effective_rate(
    billing: Billing,
) -> None:
    """Without a package, each model is priced from the price book in its own currency: the
    USD model converted at the rate effective at the event's time, the CNY one not at all."""
    b, db = billing, billing.db
    await price_book(b)
    await b.set_profile("mobile", currency="CNY")
    await b.topup("mobile", "10.00", "CNY", ts_ms=ms(2026, 11, 1))
    g1 = usage(
        "mobile",
        "gpt-4o-mini",
        ms(2026, 11, 10),
        input_tokens=1 * M,
        cached_input_tokens=400_000,
        output_tokens=200_000,
        provider="openai",
    )
    q1 = usage(
        "mobile",
        "qwen-plus",
        ms(2026, 11, 12),
        input_tokens=2 * M,
        cached_input_tokens=500_000,
        output_tokens=1 * M,
    )
    g2 = usage(
        "mobile",
        "gpt-4o-mini",
        ms(2026, 11, 20),
        input_tokens=1 * M,
        cached_input_tokens=400_000,
        output_tokens=200_000,
        provider="openai",
    )
    res = await b.settle([g1, q1, g2])
    assert res.settled == 3

    def gpt_usd(e: Any) -> int:
        return (
            per_1m(e.input_tokens - e.cached_input_tokens, nanos(GPT_USD["input"]))
            + per_1m(e.cached_input_tokens, nanos(GPT_USD["cached"]))
            + per_1m(e.output_tokens, nanos(GPT_USD["output"]))
        )

    # qwen-plus has no cached price: cached input is billed at the input price.
    qwen = per_1m(q1.input_tokens, nanos(QWEN_CNY["input"])) + per_1m(
        q1.output_tokens, nanos(QWEN_CNY["output"])
    )
    g1_cny, g2_cny = fx(gpt_usd(g1), RATE_OCT), fx(gpt_usd(g2), RATE_NOV15)
    assert g1_cny != fx(gpt_usd(g1), RATE_NOV15)  # the rates really differ for this amount
    st = await statement(db, "mobile", NOV)
    assert st["usage"] == [
        {
            "model": "gpt-4o-mini",
            "tokens": 2 * (g1.input_tokens + g1.output_tokens),
            "package_tokens": 0,
            "amounts": {"CNY": g1_cny + g2_cny},
        },
        {
            "model": "qwen-plus",
            "tokens": q1.input_tokens + q1.output_tokens,
            "package_tokens": 0,
            "amounts": {"CNY": qwen},
        },
    ]
    assert st["overage"] == {}
    assert closing(st) == {L.wallet("mobile", "CNY"): nanos("10.00") - g1_cny - g2_cny - qwen}
    # The FX position: the operator received CNY and owes the USD it priced in.
    assert await postings_sum(db, L.op("fx", "USD")) == gpt_usd(g1) + gpt_usd(g2)
    assert await postings_sum(db, L.op("fx", "CNY")) == -(g1_cny + g2_cny)
    assert await b.invariants() == []


# -- month end: breakage and rollover -----------------------------------------------------------


async def test_expiry_sends_the_unused_part_to_breakage(billing: Billing) -> None:
    b, db = billing, billing.db
    await price_book(b)
    await b.set_profile("telecom-b", currency="CNY")
    await b.create_plan("pkg", price=PLAN_PRICE, currency="CNY", tokens=PLAN_TOKENS, hard_stop=True)
    await b.topup("telecom-b", "20.00", "CNY", ts_ms=ms(2026, 11, 1))
    lot = await b.assign("telecom-b", "pkg", start_ms=ms(2026, 11, 1))
    used = 3 * M
    await b.settle([usage("telecom-b", "qwen-plus", ms(2026, 11, 5), input_tokens=used)])
    issued_before = await postings_sum(db, L.op("issued", "TOKENS"))
    breakage_before = await postings_sum(db, L.op("breakage", "CNY"))

    assert await b.expire(now=ms(2026, 11, 30, 23, 59)) == []  # not over yet
    [expiry_txn] = await b.expire(now=ms(2026, 12, 1))
    assert await b.expire(now=ms(2026, 12, 2)) == []  # once

    unused = PLAN_TOKENS - used
    earned = fx(nanos(PLAN_PRICE), f"{used}/{PLAN_TOKENS}")
    unearned = nanos(PLAN_PRICE) - earned
    # The tokens go back to op:issued (no longer outstanding), the unearned money to breakage.
    assert await postings_sum(db, L.op("issued", "TOKENS")) - issued_before == -unused
    assert await postings_sum(db, L.op("breakage", "CNY")) - breakage_before == -unearned
    assert await balance(db, L.lot_units("telecom-b", lot.id)) == 0
    assert await balance(db, L.lot_deferred("telecom-b", lot.id)) == 0
    assert sorted(await txn_legs(db, expiry_txn)) == sorted(
        [
            (L.lot_units("telecom-b", lot.id), "TOKENS", unused),
            (L.op("issued", "TOKENS"), "TOKENS", -unused),
            (L.lot_deferred("telecom-b", lot.id), "CNY", unearned),
            (L.op("breakage", "CNY"), "CNY", -unearned),
        ]
    )
    [expired] = await b.lots("telecom-b")
    assert expired.status == "expired"

    # The month the package covered shows its breakage, and ends with the lot empty.
    st = await statement(db, "telecom-b", NOV)
    assert st["breakage"] == [{"lot": lot.id, "TOKENS": unused, "CNY": unearned}]
    assert closing(st)[L.lot_units("telecom-b", lot.id)] == 0
    assert "Breakage (expired, unused)" in statements.render_statement(st)

    # Usage dated inside the window but settled after expiry is not drawn from the dead lot.
    late = usage("telecom-b", "qwen-plus", ms(2026, 11, 29), input_tokens=1 * M)
    await b.settle([late])
    assert await balance(db, L.lot_units("telecom-b", lot.id)) == 0
    assert await wallet_held(db, "telecom-b", "CNY") == (
        nanos("20.00") - nanos(PLAN_PRICE) - per_1m(1 * M, nanos(QWEN_CNY["input"]))
    )
    assert await b.invariants() == []


async def test_rollover_plan_rolls_over_instead(billing: Billing) -> None:
    b, db = billing, billing.db
    await price_book(b)
    await b.set_profile("roller", currency="CNY")
    await b.create_plan(
        "roll", price=PLAN_PRICE, currency="CNY", tokens=PLAN_TOKENS, hard_stop=True, rollover=True
    )
    await b.topup("roller", "30.00", "CNY", ts_ms=ms(2026, 11, 1))
    nov = await b.assign("roller", "roll", start_ms=ms(2026, 11, 1))
    used = 3 * M
    await b.settle([usage("roller", "qwen-plus", ms(2026, 11, 5), input_tokens=used)])
    breakage_before = await postings_sum(db, L.op("breakage", "CNY"))
    assert len(await b.expire(now=ms(2026, 12, 1))) == 1

    unused = PLAN_TOKENS - used
    unearned = nanos(PLAN_PRICE) - fx(nanos(PLAN_PRICE), f"{used}/{PLAN_TOKENS}")
    lots = {x.id: x for x in await b.lots("roller")}
    [rolled] = [x for x in lots.values() if x.id != nov.id]
    assert lots[nov.id].status == "expired"
    assert (rolled.status, rolled.end_ms, rolled.quantity, rolled.price) == (
        "active",
        None,
        unused,
        unearned,
    )
    assert await postings_sum(db, L.op("breakage", "CNY")) == breakage_before  # no breakage
    assert await balance(db, L.lot_units("roller", rolled.id)) == -unused
    assert await balance(db, L.lot_deferred("roller", rolled.id)) == -unearned

    st = await statement(db, "roller", NOV)
    assert st["breakage"] == []
    assert closing(st)[L.lot_units("roller", nov.id)] == 0
    assert closing(st)[L.lot_units("roller", rolled.id)] == unused

    # December's package expires first, so it is drawn first; the rolled-over tokens (no end)
    # only once it is used up. Same order on SQLite and PostgreSQL.
    dec = await b.assign("roller", "roll", start_ms=ms(2026, 12, 1))
    await b.settle([usage("roller", "qwen-plus", ms(2026, 12, 5), input_tokens=2 * M)])
    assert await balance(db, L.lot_units("roller", dec.id)) == -(PLAN_TOKENS - 2 * M)
    assert await balance(db, L.lot_units("roller", rolled.id)) == -unused
    await b.settle([usage("roller", "qwen-plus", ms(2026, 12, 6), input_tokens=9 * M)])
    from_rolled = 9 * M - (PLAN_TOKENS - 2 * M)
    assert await balance(db, L.lot_units("roller", dec.id)) == 0
    assert await balance(db, L.lot_units("roller", rolled.id)) == -(unused - from_rolled)
    # The rolled-over lot earns its (unearned) price pro rata, as any lot.
    [rolled_now] = [x for x in await b.lots("roller") if x.id == rolled.id]
    assert rolled_now.recognized == half_even(Fraction(from_rolled * unearned, unused))
    assert await b.invariants() == []


# -- points -------------------------------------------------------------------------------------


async def test_points_pack_drawn_by_points_per_1m(billing: Billing) -> None:
    b, db = billing, billing.db
    await b.set_profile("pts", currency="CNY")
    points_per_1m = "2"
    await b.set_price(
        "qwen-plus",
        currency="CNY",
        input_per_1m=QWEN_CNY["input"],
        output_per_1m=QWEN_CNY["output"],
        points_per_1m=points_per_1m,
        effective_ms=0,
    )
    await b.set_price(
        "no-points", currency="CNY", input_per_1m="1.00", output_per_1m="1.00", effective_ms=0
    )
    pack_points, pack_price = "10", "1.00"
    await b.create_plan("points-10", price=pack_price, currency="CNY", points=pack_points)
    await b.topup("pts", "20.00", "CNY", ts_ms=ms(2026, 11, 1))
    lot = await b.assign("pts", "points-10", start_ms=ms(2026, 11, 1))
    lot_acc = L.lot_units("pts", lot.id)
    pack = nanos(pack_points)  # nano-points
    pp = nanos(points_per_1m)

    a = usage("pts", "qwen-plus", ms(2026, 11, 2), input_tokens=1 * M, output_tokens=M // 2)
    await b.settle([a])
    a_points = per_1m(a.input_tokens + a.output_tokens, pp)
    assert await balance(db, lot_acc) == -(pack - a_points)

    # A model without a points price skips the pack and pays from the wallet.
    np = usage("pts", "no-points", ms(2026, 11, 3), input_tokens=1 * M)
    await b.settle([np])
    assert await balance(db, lot_acc) == -(pack - a_points)

    # More than the pack holds: input first, then as much output as the points left pay for;
    # the rest of the output is priced from the wallet.
    big = usage("pts", "qwen-plus", ms(2026, 11, 4), input_tokens=2 * M, output_tokens=3 * M)
    await b.settle([big])
    left = pack - a_points - per_1m(big.input_tokens, pp)
    out_on_points = left * M // pp
    assert per_1m(out_on_points, pp) == left
    out_on_wallet = big.output_tokens - out_on_points
    assert await balance(db, lot_acc) == 0
    [used_up] = await b.lots("pts")
    assert (used_up.consumed, used_up.recognized) == (pack, nanos(pack_price))

    wallet_paid = per_1m(np.input_tokens, nanos("1.00")) + per_1m(
        out_on_wallet, nanos(QWEN_CNY["output"])
    )
    st = await statement(db, "pts", NOV)
    assert st["usage"] == [
        {
            "model": "no-points",
            "tokens": np.input_tokens,
            "package_tokens": 0,
            "amounts": {"CNY": per_1m(np.input_tokens, nanos("1.00"))},
        },
        {
            "model": "qwen-plus",
            "tokens": 1 * M + M // 2 + 5 * M,
            "package_tokens": 0,
            "amounts": {
                "POINTS": pack,
                "CNY": wallet_paid - per_1m(np.input_tokens, nanos("1.00")),
            },
        },
    ]
    assert closing(st) == {
        lot_acc: 0,
        L.wallet("pts", "CNY"): nanos("20.00") - nanos(pack_price) - wallet_paid,
    }
    assert await b.invariants() == []


# -- postpaid -------------------------------------------------------------------------------------


async def test_postpaid_credit_limit_then_overrun(billing: Billing) -> None:
    b, db = billing, billing.db
    await price_book(b)
    limit, topup = "50.00", "10.00"
    await b.set_profile(
        "corp", currency="CNY", draw_order=["wallet", "postpaid"], credit_limit=limit
    )
    await b.topup("corp", topup, "CNY", ts_ms=ms(2026, 11, 1))
    out_price = nanos(QWEN_CNY["output"])
    # Output-only events cost 20, 20, 30 and 5 CNY.
    charges = [nanos("20"), nanos("20"), nanos("30"), nanos("5")]
    events = [
        usage("corp", "qwen-plus", ms(2026, 11, 2 + i), output_tokens=c * M // out_price)
        for i, c in enumerate(charges)
    ]
    assert [per_1m(e.output_tokens, out_price) for e in events] == charges

    wallet_left, credit_left = nanos(topup), nanos(limit)
    expected_overrun = 0
    for e, c in zip(events, charges, strict=True):
        res = await b.settle([e])
        assert res.settled == 1
        overrun_before = expected_overrun
        from_wallet = min(c, wallet_left)
        from_credit = min(c - from_wallet, credit_left)
        wallet_left -= from_wallet
        credit_left -= from_credit
        expected_overrun += c - from_wallet - from_credit
        # Never past the ceiling, after every event: the accounts table and the postings.
        rec = await stored_balance(db, L.receivable("corp", "CNY"))
        assert rec == await postings_sum(db, L.receivable("corp", "CNY"))
        assert rec is not None and rec <= nanos(limit)
        assert rec == nanos(limit) - credit_left
        assert await wallet_held(db, "corp", "CNY") == wallet_left >= 0
        assert await balance(db, L.overrun("corp", "CNY")) == expected_overrun
        # The usage record says which accounts paid, and how much went to overrun.
        [draw] = (await txn_details(db, res.txn_ids[e.request_id]))["draws"]
        paid = {acc: x for acc, x in draw["paid_by"]}
        assert sum(paid.values()) == c
        assert paid.get(L.overrun("corp", "CNY"), 0) == expected_overrun - overrun_before
        assert draw.get("overrun", 0) == expected_overrun - overrun_before
    assert (wallet_left, credit_left) == (0, 0)
    assert expected_overrun == sum(charges) - nanos(topup) - nanos(limit)
    ceiling = await tx(
        db,
        lambda t: t.fetchval(
            "SELECT ceiling FROM accounts WHERE id = $1", L.receivable("corp", "CNY")
        ),
    )
    assert ceiling == nanos(limit)

    st = await statement(db, "corp", NOV)
    assert closing(st) == {
        L.wallet("corp", "CNY"): 0,
        L.receivable("corp", "CNY"): nanos(limit),
        L.overrun("corp", "CNY"): expected_overrun,
    }
    assert st["usage"][0]["amounts"] == {"CNY": sum(charges)}

    # A purchase is refused, not overrun, when neither wallet nor credit can pay it.
    await b.create_plan("small", price="1.00", currency="CNY", tokens=1000)
    n = await posting_count(db)
    with pytest.raises(InsufficientFunds):
        await b.assign("corp", "small", start_ms=ms(2026, 11, 20))
    assert await posting_count(db) == n
    assert await b.lots("corp") == []
    assert await b.invariants() == []


async def test_purchase_uses_credit_when_the_wallet_is_short(billing: Billing) -> None:
    b, db = billing, billing.db
    await b.set_profile("corp2", currency="CNY", credit_limit="5.00")
    await b.topup("corp2", "3.00", "CNY", ts_ms=ms(2026, 11, 1))
    await b.create_plan("p", price="7.00", currency="CNY", tokens=1000)
    await b.assign("corp2", "p", start_ms=ms(2026, 11, 1))
    assert await wallet_held(db, "corp2", "CNY") == 0
    assert await balance(db, L.receivable("corp2", "CNY")) == nanos("7.00") - nanos("3.00")
    with pytest.raises(InsufficientFunds):  # 1 CNY of credit left
        await b.assign("corp2", "p", start_ms=ms(2026, 11, 2))
    assert await b.invariants() == []


# -- revenue split ------------------------------------------------------------------------------


async def test_revenue_split_20_5_75_by_largest_remainder(billing: Billing) -> None:
    b, db = billing, billing.db
    await b.set_profile("splitco", currency="USD")
    await b.topup("splitco", "100.00", "USD", ts_ms=ms(2026, 11, 1))
    await b.set_price(
        "m", currency="USD", input_per_1m="0.15", output_per_1m="0.60", effective_ms=0
    )
    await b.set_split("dashscope", platform_pct="20", channel_pct="5", effective_ms=0)
    # Token counts whose charges are not whole nanos (rounded half-even per line) and whose
    # 20/5/75 shares leave remainders to distribute.
    counts = [(1_234_567, 0), (1, 1), (7, 13), (999_999, 333_333), (3, 0)]
    events = [
        usage("splitco", "m", ms(2026, 11, 2, i), input_tokens=i_, output_tokens=o_)
        for i, (i_, o_) in enumerate(counts)
    ]
    res = await b.settle(events)
    assert res.settled == len(events)
    totals = [0, 0, 0]
    needed_remainders = 0
    for e in events:
        charge = half_even(Fraction(e.input_tokens * nanos("0.15"), M)) + half_even(
            Fraction(e.output_tokens * nanos("0.60"), M)
        )
        want = largest_remainder(charge, [20, 5, 75])
        assert sum(want) == charge
        needed_remainders += sum(charge * w // 100 for w in (20, 5, 75)) < charge
        legs = {a: x for a, _, x in await txn_legs(db, res.txn_ids[e.request_id])}
        got = [
            -legs.get(L.op("revenue", "USD"), 0),
            -legs.get(L.op("channel", "USD"), 0),
            -legs.get(L.op("provider", "USD", "dashscope"), 0),
        ]
        assert got == want
        assert legs[L.wallet("splitco", "USD")] == charge
        totals = [t + w for t, w in zip(totals, want, strict=True)]
    assert await postings_sum(db, L.op("revenue", "USD")) == -totals[0]
    assert await postings_sum(db, L.op("channel", "USD")) == -totals[1]
    assert await postings_sum(db, L.op("provider", "USD", "dashscope")) == -totals[2]
    assert needed_remainders >= 3  # the inputs really exercise the remainder rule
    assert await b.invariants() == []


# -- price book: overrides, versions, discount ------------------------------------------------


async def test_tenant_override_price_versions_and_discount(billing: Billing) -> None:
    b, db = billing, billing.db
    for t in ("vip", "std"):
        await b.set_profile(t, currency="CNY")
        await b.topup(t, "100.00", "CNY", ts_ms=ms(2026, 10, 1))
    await b.set_profile("vip", discount_pct="12.5")
    list_v1 = ("0.80", "2.00")
    list_v2 = ("0.90", "2.20")
    vip = ("0.61", "1.53")
    await b.set_price(
        "qwen-plus",
        currency="CNY",
        input_per_1m=list_v1[0],
        output_per_1m=list_v1[1],
        effective_ms=ms(2026, 10, 1),
    )
    await b.set_price(
        "qwen-plus",
        currency="CNY",
        input_per_1m=list_v2[0],
        output_per_1m=list_v2[1],
        effective_ms=ms(2026, 11, 20),
    )
    await b.set_price(
        "qwen-plus",
        tenant="vip",
        currency="CNY",
        input_per_1m=vip[0],
        output_per_1m=vip[1],
        effective_ms=ms(2026, 11, 1),
    )
    cases = [
        ("std", ms(2026, 11, 10), list_v1, False, 0),
        ("std", ms(2026, 11, 25), list_v2, False, 0),
        ("vip", ms(2026, 10, 30), list_v1, False, 125_000),  # override not effective yet
        ("vip", ms(2026, 11, 10), vip, True, 125_000),
        ("vip", ms(2026, 11, 25), vip, True, 125_000),  # override wins over the newer list
    ]
    for tenant, ts, (pin, pout), override, disc_ppm in cases:
        e = usage(tenant, "qwen-plus", ts, input_tokens=1_234_567, output_tokens=7_654_321)
        before = await wallet_held(db, tenant, "CNY")
        res = await b.settle([e])
        gross = half_even(Fraction(e.input_tokens * nanos(pin), M)) + half_even(
            Fraction(e.output_tokens * nanos(pout), M)
        )
        net = gross - half_even(Fraction(gross * disc_ppm, M))
        assert before - await wallet_held(db, tenant, "CNY") == net
        d = await txn_details(db, res.txn_ids[e.request_id])
        assert d["price"]["tenant_override"] is override
        assert d["priced"]["gross"] == gross and d["priced"]["net"] == net
    versions = {(p.tenant, p.version) for p in await b.prices()}
    assert versions == {("", 1), ("", 2), ("vip", 1)}
    assert await b.invariants() == []


async def test_unpriced_event_fails_and_settles_once_priced(billing: Billing) -> None:
    b, db = billing, billing.db
    await b.set_profile("late", currency="CNY")
    await b.topup("late", "5.00", "CNY", ts_ms=ms(2026, 11, 1))
    e = usage("late", "new-model", ms(2026, 11, 3), input_tokens=1 * M)
    res = await b.settle([e])
    assert res.settled == 0 and [x for x, _ in res.failed] == [e.request_id]
    assert "no price for model 'new-model'" in res.failed[0][1]
    await b.set_price(
        "new-model",
        currency="CNY",
        input_per_1m="1.00",
        output_per_1m="1.00",
        effective_ms=ms(2026, 11, 1),
    )
    res = await b.settle([e])
    assert res.settled == 1
    assert await wallet_held(db, "late", "CNY") == nanos("5.00") - nanos("1.00")


async def test_failed_event_leaves_the_package_untouched(billing: Billing) -> None:
    """An event that draws a package and then cannot be rated (no FX rate for its overage)
    fails as a whole: the next event in the same batch sees the package as it was, and when
    the failed one is settled again it draws the package once, not twice."""
    b, db = billing, billing.db
    await b.set_profile("nofx", currency="CNY")
    await b.topup("nofx", "20.00", "CNY", ts_ms=ms(2026, 11, 1))
    price, qty = "9.90", 1000
    await b.create_plan(
        "usd-over",
        price=price,
        currency="CNY",
        tokens=qty,
        overage_per_1m="1.00",
        overage_currency="USD",
    )
    lot = await b.assign("nofx", "usd-over", start_ms=ms(2026, 11, 1))
    await b.set_price("any", currency="CNY", input_per_1m="1", output_per_1m="1", effective_ms=0)
    bad = usage("nofx", "any", ms(2026, 11, 2), input_tokens=1500)  # 500 past the package
    good = usage("nofx", "any", ms(2026, 11, 3), input_tokens=400)
    res = await b.settle([bad, good])
    assert [x for x, _ in res.failed] == [bad.request_id]
    assert res.settled == 1
    [lot1] = await b.lots("nofx")
    assert (lot1.consumed, lot1.recognized) == (400, fx(nanos(price), f"400/{qty}"))
    assert await balance(db, L.lot_units("nofx", lot.id)) == -(qty - 400)

    await b.set_fx("USD", "CNY", "7", effective_ms=0)
    assert (await b.settle([bad])).settled == 1
    [lot2] = await b.lots("nofx")
    assert (lot2.consumed, lot2.recognized) == (qty, nanos(price))
    assert await balance(db, L.lot_deferred("nofx", lot.id)) == 0
    over_tokens = 1500 - (qty - 400)
    over_cny = fx(per_1m(over_tokens, nanos("1.00")), "7")
    assert await wallet_held(db, "nofx", "CNY") == nanos("20.00") - nanos(price) - over_cny
    # Expiring the used-up lot breaks nothing off: all of its price was earned.
    breakage = await postings_sum(db, L.op("breakage", "CNY"))
    await b.expire(now=ms(2026, 12, 1))
    assert await postings_sum(db, L.op("breakage", "CNY")) == breakage
    assert await b.invariants() == []


# -- idempotency and refunds ---------------------------------------------------------------------


async def test_idempotent_settlement_conflicts_and_refunds(billing: Billing) -> None:
    b, db = billing, billing.db
    await price_book(b)
    await b.set_profile("idem", currency="CNY")
    await b.topup("idem", "10.00", "CNY", ts_ms=ms(2026, 11, 1))
    e = usage("idem", "qwen-plus", ms(2026, 11, 2), input_tokens=1 * M, output_tokens=1 * M)
    charge = per_1m(1 * M, nanos(QWEN_CNY["input"])) + per_1m(1 * M, nanos(QWEN_CNY["output"]))

    first = await b.settle([e])
    assert (first.settled, first.duplicates) == (1, 0)
    n, w = await posting_count(db), await wallet_held(db, "idem", "CNY")
    assert w == nanos("10.00") - charge

    again = await b.settle([e])
    assert (again.settled, again.duplicates, again.conflicts) == (0, 1, [])
    assert (await posting_count(db), await wallet_held(db, "idem", "CNY")) == (n, w)

    changed = usage(
        "idem",
        "qwen-plus",
        e.ts_ms,
        input_tokens=1 * M,
        output_tokens=1 * M + 1,
        request_id=e.request_id,
    )
    conflict = await b.settle([changed])
    assert (conflict.settled, conflict.duplicates, conflict.conflicts) == (0, 0, [e.request_id])
    assert (await posting_count(db), await wallet_held(db, "idem", "CNY")) == (n, w)

    # In one batch: a replay of e, a new event twice, and a conflicting e.
    e2 = usage("idem", "qwen-plus", ms(2026, 11, 3), input_tokens=M // 2)
    mixed = await b.settle([e, e2, e2, changed])
    assert (mixed.settled, mixed.duplicates, mixed.conflicts) == (1, 2, [e.request_id])
    charge2 = per_1m(M // 2, nanos(QWEN_CNY["input"]))
    assert await wallet_held(db, "idem", "CNY") == w - charge2

    # A refund is the exact negation of the event's postings, once.
    legs = await txn_legs(db, first.txn_ids[e.request_id])
    refund_id = await b.refund(e.request_id, memo="customer complaint", ts_ms=ms(2026, 11, 4))
    assert sorted(await txn_legs(db, refund_id)) == sorted((a, u, -x) for a, u, x in legs)
    assert await wallet_held(db, "idem", "CNY") == w - charge2 + charge
    with pytest.raises(BillingError, match="already been refunded"):
        await b.refund(e.request_id)
    with pytest.raises(BillingError, match="has not been settled"):
        await b.refund("req_never_seen")
    assert await wallet_held(db, "idem", "CNY") == w - charge2 + charge
    # Refunded is still settled: a replay of the event does not charge it again.
    assert (await b.settle([e])).duplicates == 1
    assert await wallet_held(db, "idem", "CNY") == w - charge2 + charge
    st = await statement(db, "idem", NOV)
    assert st["other"]["refund"] == {"CNY": charge}
    assert await b.invariants() == []


async def test_refund_of_package_usage_returns_tokens_and_keeps_revenue_exact(
    billing: Billing,
) -> None:
    """A lot of 3 tokens for 0.10 CNY earns 1/3 of its price per token, rounded: after a
    refund and the rest of the lot used, it must still have earned exactly its price."""
    b, db = billing, billing.db
    await b.set_profile("r", currency="CNY")
    await b.topup("r", "1.00", "CNY", ts_ms=ms(2026, 11, 1))
    await b.set_price("m", currency="CNY", input_per_1m="1", output_per_1m="1", effective_ms=0)
    price, qty = "0.10", 3
    await b.create_plan("three", price=price, currency="CNY", tokens=qty, hard_stop=True)
    lot = await b.assign("r", "three", start_ms=ms(2026, 11, 1))
    a = usage("r", "m", ms(2026, 11, 2), input_tokens=1)
    c = usage("r", "m", ms(2026, 11, 3), input_tokens=1)
    await b.settle([a])
    await b.settle([c])
    await b.refund(a.request_id)
    assert await balance(db, L.lot_units("r", lot.id)) == -2  # a's token is back
    await b.settle([usage("r", "m", ms(2026, 11, 4), input_tokens=2)])
    assert await balance(db, L.lot_units("r", lot.id)) == 0
    [used] = await b.lots("r")
    assert (used.consumed, used.recognized) == (qty, nanos(price))
    # Fully used: nothing deferred, and the revenue legs of all its draws sum to its price.
    assert await balance(db, L.lot_deferred("r", lot.id)) == 0
    earned = -sum(
        [
            await postings_sum(db, L.op("revenue", "CNY")),
            await postings_sum(db, L.op("channel", "CNY")),
            await postings_sum(db, L.op("provider", "CNY", "dashscope")),
        ]
    )
    assert earned == nanos(price)
    assert await b.invariants() == []


# -- closing a period ------------------------------------------------------------------------------


async def test_closed_period_never_changes(billing: Billing) -> None:
    b, db = billing, billing.db
    await price_book(b)
    await b.set_profile("closer", currency="CNY")
    await b.topup("closer", "50.00", "CNY", ts_ms=ms(2026, 11, 1))
    await b.settle(
        [
            usage("closer", "qwen-plus", ms(2026, 11, 5), input_tokens=2 * M),
            usage(
                "closer", "gpt-4o-mini", ms(2026, 11, 20), output_tokens=1 * M, provider="openai"
            ),
        ]
    )
    closed = await tx(db, statements.close_period, "closer", NOV)
    frozen = json.dumps(closed, sort_keys=True)
    assert closed["closed"] is True

    # Usage dated in November but settled after the close lands in December.
    late = usage("closer", "qwen-plus", ms(2026, 11, 28), input_tokens=1 * M)
    res = await b.settle([late])
    period = await tx(
        db,
        lambda t: t.fetchval(
            "SELECT period FROM ledger_txns WHERE id = $1", res.txn_ids[late.request_id]
        ),
    )
    assert period == DEC
    late_topup = await b.topup("closer", "1.00", "CNY", ts_ms=ms(2026, 11, 29))
    assert (
        await tx(
            db, lambda t: t.fetchval("SELECT period FROM ledger_txns WHERE id = $1", late_topup)
        )
        == DEC
    )

    assert json.dumps(await statement(db, "closer", NOV), sort_keys=True) == frozen
    dec = await statement(db, "closer", DEC)
    assert opening(dec) == closing(closed)
    assert [u["model"] for u in dec["usage"]] == ["qwen-plus"]
    assert dec["usage"][0]["amounts"] == {"CNY": per_1m(1 * M, nanos(QWEN_CNY["input"]))}
    assert closing(dec)[L.wallet("closer", "CNY")] == (
        closing(closed)[L.wallet("closer", "CNY")]
        + nanos("1.00")
        - per_1m(1 * M, nanos(QWEN_CNY["input"]))
    )
    with pytest.raises(LedgerError, match="already closed"):
        await tx(db, statements.close_period, "closer", NOV)
    with pytest.raises(LedgerError, match="periods close in order"):
        await tx(db, statements.close_period, "closer", "2026-10")
    assert await b.invariants() == []


# -- provider settlement ------------------------------------------------------------------------


async def test_provider_settlement_equals_provider_legs(billing: Billing) -> None:
    b, db = billing, billing.db
    await price_book(b)
    await b.set_split("openai", platform_pct="10", channel_pct="2.5", effective_ms=0)
    for t in ("p1", "p2"):
        await b.set_profile(t, currency="CNY")
        await b.topup(t, "100.00", "CNY", ts_ms=ms(2026, 10, 1))
    await b.create_plan("pk", price="9.90", currency="CNY", tokens=5 * M, hard_stop=True)
    await b.assign("p1", "pk", start_ms=ms(2026, 11, 1))
    events = []
    for i in range(12):
        t = ("p1", "p2")[i % 2]
        model, prov = (("qwen-plus", "dashscope"), ("gpt-4o-mini", "openai"))[i % 3 % 2]
        month = 10 + i % 3  # October, November, December
        events.append(
            usage(
                t,
                model,
                ms(2026, month, 10 + i),
                input_tokens=(i + 1) * 777_777,
                output_tokens=i * 123_457,
                provider=prov,
            )
        )
    assert (await b.settle(events)).settled == len(events)
    for provider in ("dashscope", "openai"):
        for period in ("2026-10", NOV, DEC):
            ps = await tx(db, statements.provider_settlement, provider, period)
            rows = await tx(
                db,
                lambda t, p=period, pr=provider: t.fetch(
                    "SELECT p.unit, t.memo, p.amount FROM postings p JOIN ledger_txns t "
                    "ON t.id = p.txn_id WHERE t.period = $1 AND p.account LIKE $2",
                    p,
                    f"op:provider:{pr}:%",
                ),
            )
            by_cur: dict[str, int] = {}
            for unit, _, amount in rows:
                by_cur[unit] = by_cur.get(unit, 0) - int(amount)
            assert {c: v["owed"] for c, v in ps["totals"].items()} == by_cur
            assert sum(line["owed"] for line in ps["lines"]) == sum(by_cur.values())
            assert {line["model"] for line in ps["lines"]} == {m for _, m, _ in rows}
            assert all(v >= 0 for v in by_cur.values())
    assert await b.invariants() == []
