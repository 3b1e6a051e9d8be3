"""The billing rule (tokenhub.usage.billed_lines): only what the upstream served is billed.

Settlement posts nothing for an event whose request failed (an upstream 4xx/5xx, a timeout, a
refusal) or was interrupted by a crash (status 0), though the event keeps the meter's prompt
count; 200 and 499 are billed their counts. The statement lists the unbilled requests apart."""

from __future__ import annotations

import msgspec
import pytest
from ledger_kit import balance, ms, statement, usage

from tokenhub.billing.service import Billing
from tokenhub.billing.statements import render_statement
from tokenhub.usage import BILLED_STATUSES, EVENT_FIELDS, UsageEvent, billed_lines

PROMPT = 100_000  # a 100k-token prompt: 10 USD at 100 USD per 1M


def _event(n: int, status: int, error: str = "", **kw: int) -> UsageEvent:
    ev = usage("acme", "gpt", ms(2026, 11, 2, 10, n), input_tokens=PROMPT,
               request_id=f"req_{n:04d}", **kw)  # fmt: skip
    return msgspec.structs.replace(ev, status=status, error=error)


FAILED = [
    (429, "rate_limit_exceeded"),
    (400, "invalid_request_error"),
    (500, "upstream_error"),
    (502, "upstream_error"),
    (504, "upstream_timeout"),
    (0, "interrupted"),
]


@pytest.mark.parametrize(("status", "error"), FAILED)
def test_failed_events_bill_nothing_served_ones_bill_their_counts(status: int, error: str) -> None:
    assert billed_lines(_event(1, status, error, output_tokens=7)) == (0, 0, 0, 0)
    served = _event(1, 200, cached_input_tokens=40, output_tokens=7)
    assert billed_lines(served) == (PROMPT - 40, 40, 7, 0)
    gone = _event(1, 499, "client_disconnected", output_tokens=9)
    assert billed_lines(gone) == (PROMPT, 0, 9, 0)
    assert {200, 499} == BILLED_STATUSES


async def _insert(b: Billing, events: list[UsageEvent]) -> None:
    rows = [msgspec.structs.astuple(e) for e in events]
    await b.db.transaction(lambda tx: tx.insert_rows("usage_events", EVENT_FIELDS, rows))


async def test_settlement_and_statement_follow_the_rule(billing: Billing) -> None:
    await billing.set_profile("acme", currency="USD", draw_order=["wallet"])
    await billing.set_price("gpt", currency="USD", input_per_1m="100", output_per_1m="100",
                            effective_ms=0)  # fmt: skip
    await billing.topup("acme", "30", "USD")
    # Nine failures with a 100k-token prompt each would have taken 90 USD (the 30 USD wallet,
    # the rest as overrun); then one served request and one whose client left (20.15 USD).
    failed = [_event(i, s, e) for i, (s, e) in enumerate(FAILED + FAILED[:3])]
    served = _event(20, 200, output_tokens=1_000)
    gone = _event(21, 499, "client_disconnected", output_tokens=500)
    events = [*failed, served, gone]
    await _insert(billing, events)

    res = await billing.settle(events)
    assert (res.settled, res.failed, res.conflicts) == (len(events), [], [])
    assert {eid for eid, tid in res.txn_ids.items() if tid} == {served.request_id,
                                                                gone.request_id}  # fmt: skip
    charged = (PROMPT + 1_000 + PROMPT + 500) * 100_000  # 100 USD per 1M = 100,000 nanos a token
    wallet = await balance(billing.db, "t:acme:wallet:USD")
    assert -wallet == 30_000_000_000 - charged
    assert await balance(billing.db, "t:acme:overrun:USD") == 0

    st = await statement(billing.db, "acme", "2026-11")
    assert st["usage"] == [
        {"model": "gpt", "tokens": 2 * PROMPT + 1_500, "package_tokens": 0,
         "amounts": {"USD": charged}},
    ]  # fmt: skip
    assert st["not_billed"] == [
        {"status": 0, "requests": 1, "prompt_tokens": PROMPT},
        {"status": 400, "requests": 2, "prompt_tokens": 2 * PROMPT},
        {"status": 429, "requests": 2, "prompt_tokens": 2 * PROMPT},
        {"status": 500, "requests": 2, "prompt_tokens": 2 * PROMPT},
        {"status": 502, "requests": 1, "prompt_tokens": PROMPT},
        {"status": 504, "requests": 1, "prompt_tokens": PROMPT},
    ]
    text = render_statement(st)
    assert "Not billed (the upstream did not serve them)" in text
    assert "interrupted" in text and "2 requests, 200,000 prompt tokens" in text

    # Settling them again is a no-op, as for any settled event.
    again = await billing.settle(events)
    assert (again.settled, again.duplicates) == (0, len(events))
