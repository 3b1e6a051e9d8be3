"""One absurd usage event blocks no other: settlement quarantines it, `billing check` names it,
the CLI releases or voids it; amounts are checked, never wrapped; `events ingest` refuses counts
outside the bounds the gateway and settlement share (tokenhub.usage.MAX_TOKENS)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from ledger_kit import ms, usage

from tokenhub import cli
from tokenhub.billing import io as bio
from tokenhub.billing import settler as Q
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.db.database import open_database
from tokenhub.money import MAX_AMOUNT, AmountRangeError, convert, rate
from tokenhub.usage import MAX_TOKENS, UsageEvent

TS = ms(2026, 11, 3)


async def _store(b: Billing, events: list[UsageEvent]) -> None:
    await b.db.transaction(lambda tx: bio.store_events(tx, events))


async def _settled(b: Billing) -> dict[str, str]:
    rows = await b.db.transaction(lambda tx: tx.fetch("SELECT event_id, txn_id FROM settlements"))
    return {r[0]: r[1] for r in rows}


async def test_an_absurd_event_is_quarantined_and_the_others_settle(billing: Billing) -> None:
    await billing.set_price(
        "m", currency="USD", input_per_1m="1", output_per_1m="2", effective_ms=0
    )
    await billing.set_profile("acme", credit_limit="1000", currency="USD")
    await billing.set_profile("other", credit_limit="1000", currency="USD")
    good = [
        usage("acme", "m", TS, input_tokens=1000, output_tokens=10),
        usage("other", "m", TS + 1, input_tokens=500, output_tokens=5),
    ]
    # What an upstream's usage of 2^63 - 1 prompt tokens used to put in the database (the
    # gateway now replaces it with its meter's count; `events ingest` refuses it).
    bad = usage("acme", "m", TS, input_tokens=2**63 - 1, output_tokens=1)
    negative = usage("other", "m", TS, output_tokens=-5)
    await _store(billing, [*good, bad, negative])

    s = await settle_pending(billing, batch=10)
    assert (s.settled, s.failed, s.quarantined) == (2, 2, 2)
    settled = await _settled(billing)
    assert set(settled) == {e.request_id for e in good} and all(settled.values())
    found = await billing.db.transaction(Q.quarantined)
    assert {q.event_id for q in found} == {bad.request_id, negative.request_id}
    reasons = {q.event_id: q.reason for q in found}
    assert "input_tokens is 9223372036854775807" in reasons[bad.request_id]
    assert "output_tokens is negative" in reasons[negative.request_id]

    # Skipped by later passes, --retry-failed included: retrying as it is cannot succeed.
    again = await settle_pending(billing, retry_failed=True)
    assert (again.read, again.settled) == (0, 0)

    # Voided: settled with no charge (never billed), and recorded in the audit log.
    assert await billing.db.transaction(
        lambda tx: Q.void(tx, [bad.request_id, negative.request_id], "upstream bug")
    ) == [bad.request_id, negative.request_id]
    settled = await _settled(billing)
    assert settled[bad.request_id] == "" and settled[negative.request_id] == ""
    assert await billing.db.transaction(Q.quarantined) == []
    audit = await billing.db.transaction(
        lambda tx: tx.fetch("SELECT kind, tenant, details FROM audit_log ORDER BY id")
    )
    assert sorted((k, t) for k, t, _ in audit) == [
        ("usage_voided", "acme"),
        ("usage_voided", "other"),
    ]
    assert all(json.loads(d)["memo"] == "upstream bug" for _, _, d in audit)
    assert (await settle_pending(billing)).read == 0
    with pytest.raises(Exception, match="not quarantined"):
        await billing.db.transaction(lambda tx: Q.release(tx, [good[0].request_id]))


async def test_an_amount_beyond_the_ledger_is_quarantined_until_released(
    billing: Billing,
) -> None:
    # Within the token bounds, but at this price the charge does not fit a 64-bit amount.
    await billing.set_price(
        "m", currency="USD", input_per_1m="9000000000", output_per_1m="1", effective_ms=0
    )
    await billing.set_profile("acme", credit_limit="1000", currency="USD")
    big = usage("acme", "m", TS, input_tokens=MAX_TOKENS)
    small = usage("acme", "m", TS + 1, input_tokens=10)
    await _store(billing, [big, small])
    s = await settle_pending(billing)
    assert (s.settled, s.quarantined) == (1, 1)
    (q,) = await billing.db.transaction(Q.quarantined)
    assert q.event_id == big.request_id and "AmountRangeError" in q.reason
    # The operator fixes the price and releases the event: it settles.
    await billing.set_price(
        "m", currency="USD", input_per_1m="1", output_per_1m="1", effective_ms=0
    )
    assert await billing.db.transaction(lambda tx: Q.release(tx, [big.request_id])) == [
        big.request_id
    ]
    s = await settle_pending(billing)
    assert (s.settled, s.quarantined) == (1, 0)
    assert (await _settled(billing))[big.request_id] != ""


def test_rating_is_checked_never_wrapped() -> None:
    assert rate(10**9, 10**6) == 10**9
    with pytest.raises(AmountRangeError):
        rate(MAX_TOKENS, 9 * 10**18)
    with pytest.raises(AmountRangeError):
        convert(MAX_AMOUNT, bio.Decimal("2"))
    assert convert(-(10**9), bio.Decimal("1.5")) == -(15 * 10**8)


def test_ingest_refuses_counts_outside_the_shared_bounds() -> None:
    def line(**data: object) -> bytes:
        d = {"model": "m", "input_tokens": 10, "output_tokens": 5} | data
        return json.dumps(
            {
                "specversion": "1.0",
                "id": "1",
                "source": "s",
                "type": bio.TYPE_TOKENHUB,
                "time": "2026-11-03T00:00:00Z",
                "subject": "acme",
                "data": d,
            }
        ).encode()

    assert isinstance(bio.parse_event(line(input_tokens=MAX_TOKENS)), bio.Parsed)
    for bad in ({"input_tokens": MAX_TOKENS + 1}, {"output_tokens": 10**14},
                {"input_tokens": 2**63 - 1}, {"output_tokens": -1}):  # fmt: skip
        why = bio.parse_event(line(**bad))
        assert isinstance(why, str) and "$.data." in why, (bad, why)


def test_billing_check_names_quarantined_events_and_the_cli_resolves_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "q.db")

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main([*argv, "--db", db])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("prices", "set", "m", "--currency", "USD", "--input", "1", "--output", "2",
               "--from", "2020-01-01")[0] == 0  # fmt: skip
    bad = usage("acme", "m", TS, output_tokens=10**14)  # 60M USD at 0.60/1M, once upon a time
    ok = usage("acme", "m", TS, output_tokens=100)

    async def store() -> None:
        d = await open_database(f"sqlite:///{db}")
        try:
            await _store(Billing(d), [bad, ok])
        finally:
            await d.close()

    asyncio.run(store())
    code, out, _ = run("billing", "settle")
    assert code == 1 and "settled 1," in out and "1 quarantined" in out
    code, out, err = run("billing", "check")
    assert code == 1 and bad.request_id in out and "quarantined" in out, (out, err)
    code, out, _ = run("billing", "quarantine", "list")
    assert code == 0 and bad.request_id in out and "output_tokens is 100000000000000" in out
    code, out, _ = run("billing", "quarantine", "list", "--format", "json")
    assert [q["event_id"] for q in json.loads(out)] == [bad.request_id]
    code, _, err = run("billing", "quarantine", "void", ok.request_id)
    assert code == 2 and err.startswith("tokenhub: error: not quarantined")
    code, out, _ = run("billing", "quarantine", "void", bad.request_id, "--memo", "bug")
    assert code == 0 and "voided 1" in out
    code, out, _ = run("billing", "check")
    assert code == 0 and out.startswith("ledger OK")
    with sqlite3.connect(db) as c:
        (kind,) = c.execute("SELECT kind FROM audit_log").fetchone()
    assert kind == "usage_voided"
