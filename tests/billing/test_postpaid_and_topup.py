"""Postpaid invoices and payments, and packages that top themselves up."""

from __future__ import annotations

import pytest
from ledger_kit import balance, ms, statement, usage

from tokenhub.billing import ledger as L
from tokenhub.billing.service import Billing, BillingError
from tokenhub.money import NANOS, rate

IN, OUT = 150_000_000, 600_000_000  # 0.15 / 0.60 USD per 1M tokens, in nanos


async def _postpaid(b: Billing) -> None:
    await b.set_profile("acme", currency="USD", draw_order=["postpaid"], credit_limit="100")
    await b.set_price("gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60",
                      effective_ms=0)  # fmt: skip


async def test_invoice_rounds_the_amount_owed_down_and_writes_off_the_fraction(
    billing: Billing,
) -> None:
    await _postpaid(billing)
    evs = [
        usage("acme", "gpt", ms(2026, 11, 2 + i), input_tokens=12_345 * (i + 1),
              output_tokens=678 * (i + 1))
        for i in range(5)
    ]  # fmt: skip
    assert (await billing.settle(evs)).settled == 5
    owed = sum(rate(e.input_tokens, IN) + rate(e.output_tokens, OUT) for e in evs)
    cent = NANOS // 100
    assert owed % cent, "inputs chosen so that the amount owed is not whole cents"
    inv = await billing.invoice("acme", "2026-11")
    assert (inv["owed"], inv["due"], inv["rounding"]) == (owed, owed // cent * cent, owed % cent)
    assert await balance(billing.db, L.receivable("acme", "USD")) == inv["due"]
    assert await balance(billing.db, L.op("rounding", "USD")) == owed % cent
    with pytest.raises(BillingError, match="invoiced for 2026-11 already"):
        await billing.invoice("acme", "2026-11")
    # Paying more than is owed is refused; paying the invoice clears the receivable.
    cents = inv["due"] // cent
    due_text = f"{cents // 100}.{cents % 100:02d}"
    with pytest.raises(BillingError, match="more than that"):
        await billing.pay("acme", "100.00", "USD")
    await billing.pay("acme", due_text, "USD", ts_ms=ms(2026, 12, 5))
    assert await balance(billing.db, L.receivable("acme", "USD")) == 0
    st = await statement(billing.db, "acme", "2026-12")
    assert st["other"]["payment"]["USD"] == -inv["due"]


async def test_invoice_with_nothing_owed_is_zero(billing: Billing) -> None:
    await _postpaid(billing)
    inv = await billing.invoice("acme", "2026-11")
    assert (inv["owed"], inv["due"], inv["rounding"]) == (0, 0, 0)


async def test_auto_topup_buys_blocks_while_the_wallet_can_pay(billing: Billing) -> None:
    await billing.set_profile("acme", currency="USD", draw_order=["package", "wallet"])
    await billing.set_price("gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60",
                            effective_ms=0)  # fmt: skip
    await billing.create_plan("p", price="1.00", currency="USD", tokens=1_000_000,
                              auto_topup=250_000)  # fmt: skip
    await billing.topup("acme", "1.60", "USD", ts_ms=ms(2026, 11, 1))
    lot = await billing.assign("acme", "p", start_ms=ms(2026, 11, 1))
    # 1.0M from the package, then blocks of 250k at 0.25 USD: the wallet (0.60 left) pays two
    # blocks; the third block is unaffordable, so the rest is priced from the wallet's 0.10.
    ev = usage("acme", "gpt", ms(2026, 11, 2), input_tokens=1_600_000)
    res = await billing.settle([ev])
    assert res.settled == 1
    lots = {x.id: x for x in await billing.lots("acme")}
    assert lots[lot.id].quantity == 1_500_000 and lots[lot.id].price == 1_500_000_000
    assert lots[lot.id].consumed == 1_500_000
    rest = rate(100_000, IN)  # the last 100k tokens at list price
    wallet = -await balance(billing.db, L.wallet("acme", "USD"))
    assert wallet == 1_600_000_000 - 1_000_000_000 - 2 * 250_000_000 - rest
    assert await balance(billing.db, L.overrun("acme", "USD")) == 0
