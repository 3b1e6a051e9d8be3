"""Edge cases found in review: each test fails on the core as it was before its fix."""

from __future__ import annotations

import pytest
from ledger_kit import balance, ms, tx, usage

from tokenhub.billing import ledger as L
from tokenhub.billing.ledger import LedgerError, new_id, period_bounds
from tokenhub.billing.service import Billing, BillingError
from tokenhub.billing.statements import provider_settlement

USD_IN = 150_000_000  # 0.15 USD per 1M, in nanos


async def _priced(b: Billing) -> None:
    await b.set_profile("acme", currency="USD", draw_order=["package", "wallet"])
    await b.set_price(
        "gpt", currency="USD", input_per_1m="0.15", output_per_1m="0.60", effective_ms=0
    )


async def test_tenant_names_that_would_break_account_ids_are_refused(billing: Billing) -> None:
    await billing.create_plan("p", price="5", currency="USD", tokens=100)
    with pytest.raises(BillingError, match="invalid tenant name"):
        await billing.assign("a:b", "p")
    with pytest.raises(BillingError, match="invalid tenant name"):
        await billing.topup("a:b", "5", "USD")
    await _priced(billing)
    res = await billing.settle([usage("x:y", "gpt", ms(2026, 11, 2), input_tokens=10)])
    assert res.settled == 0 and "invalid tenant name" in res.failed[0][1]


async def test_equal_events_hash_equal_however_built(billing: Billing) -> None:
    await _priced(billing)
    await billing.topup("acme", "10", "USD")
    ev = usage("acme", "gpt", ms(2026, 11, 2), input_tokens=1000, request_id="r1")
    assert (await billing.settle([ev])).settled == 1
    # An equal event whose default string is a different (equal) object, as read back from a
    # database: a duplicate, not a conflict.
    import msgspec

    again = msgspec.structs.replace(ev, source="".join(["up", "stream"]))
    res = await billing.settle([again])
    assert (res.duplicates, res.conflicts) == (1, [])
    # The gateway's admission bookkeeping is not billing data: still a duplicate.
    res = await billing.settle([msgspec.structs.replace(ev, holds="1|m:acme=5")])
    assert (res.duplicates, res.conflicts) == (1, [])
    res = await billing.settle([msgspec.structs.replace(ev, output_tokens=1)])
    assert (res.duplicates, res.conflicts) == (0, ["r1"])


async def test_a_repeat_of_a_failing_event_in_one_batch_is_not_a_duplicate(
    billing: Billing,
) -> None:
    await billing.set_profile("acme", currency="USD")
    ev = usage("acme", "no-price", ms(2026, 11, 2), input_tokens=10, request_id="r1")
    res = await billing.settle([ev, ev])
    assert res.settled == 0 and res.duplicates == 0
    assert [eid for eid, _ in res.failed] == ["r1"]


async def test_provider_settlement_lists_refunds_apart_from_models(billing: Billing) -> None:
    await _priced(billing)
    await billing.topup("acme", "10", "USD")
    ev = usage("acme", "gpt", ms(2026, 11, 2), input_tokens=1_000_000, request_id="r1")
    await billing.settle([ev])
    await billing.refund("r1", memo="customer complaint", ts_ms=ms(2026, 11, 3))
    st = await tx(billing.db, provider_settlement, "dashscope", "2026-11")
    lines = {(x["model"], x["currency"]): x["owed"] for x in st["lines"]}
    assert lines == {("gpt", "USD"): USD_IN, ("(refunds)", "USD"): -USD_IN}
    assert st["totals"]["USD"]["owed"] == 0


@pytest.mark.parametrize("bad", ["2026-1", "2026-13", "26-11", "2026-11-01", "x"])
def test_malformed_periods_are_refused(bad: str) -> None:
    with pytest.raises(LedgerError, match="period must look like"):
        period_bounds(bad)


@pytest.mark.parametrize("bad", ["abc", "NaN", "Infinity", "1e400x"])
async def test_non_numeric_percentages_are_billing_errors(billing: Billing, bad: str) -> None:
    with pytest.raises(BillingError):
        await billing.set_profile("acme", discount_pct=bad)
    with pytest.raises(BillingError):
        await billing.set_split("p", platform_pct=bad)


async def test_adjustments_refuse_zero_and_a_foreign_currency(billing: Billing) -> None:
    await billing.set_profile("acme", currency="USD")
    with pytest.raises(BillingError, match="zero"):
        await billing.adjust("acme", "0", "USD", memo="nothing")
    with pytest.raises(BillingError, match="settles in USD"):
        await billing.adjust("acme", "5", "EUR", memo="wrong wallet")
    assert await balance(billing.db, L.wallet("acme", "EUR")) == 0


async def test_a_package_only_tenant_can_still_buy_a_package(billing: Billing) -> None:
    await billing.set_profile("acme", currency="USD", draw_order=["package"])
    await billing.topup("acme", "10", "USD")
    await billing.create_plan("p", price="5", currency="USD", tokens=1000)
    lot = await billing.assign("acme", "p", start_ms=ms(2026, 11, 1))
    assert lot.quantity == 1000
    assert await balance(billing.db, L.wallet("acme", "USD")) == -5 * 10**9


async def test_a_refund_after_expiry_goes_to_breakage(billing: Billing) -> None:
    await _priced(billing)
    await billing.topup("acme", "10", "USD")
    await billing.create_plan("p", price="1", currency="USD", tokens=1000, hard_stop=True)
    lot = await billing.assign("acme", "p", start_ms=ms(2026, 11, 1))
    await billing.settle([usage("acme", "gpt", ms(2026, 11, 2), input_tokens=400, request_id="r1")])
    await billing.expire(now=ms(2026, 12, 1))
    await billing.refund("r1", ts_ms=ms(2026, 12, 2))
    # Nothing is stranded on the dead lot: its tokens and deferred price are all gone.
    assert await balance(billing.db, L.lot_units("acme", lot.id)) == 0
    assert await balance(billing.db, L.lot_deferred("acme", lot.id)) == 0
    # The whole price ends as breakage: 0.60 at expiry, the refunded 0.40 now.
    assert await balance(billing.db, L.op("breakage", "USD")) == -1 * 10**9


def test_ids_are_in_creation_order_within_a_process() -> None:
    ids = [new_id("txn") for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
