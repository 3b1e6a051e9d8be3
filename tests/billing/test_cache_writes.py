"""Prompt-cache writes, the fourth billed line (tokenhub.usage.billed_lines): priced at the
cache-write price (the input price when none is set), drawn from packages like any token,
reserved and settled by money admission with four lines, and carried by ingest, statements
and exports. Expected amounts are computed here with Decimal, one half-even rounding per line,
independently of tokenhub.money."""

from __future__ import annotations

import hashlib
import io
import json
import socket
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from ledger_kit import balance, ms, statement, txn_details

from tokenhub.billing import io as bio
from tokenhub.billing import ledger as L
from tokenhub.billing import statements
from tokenhub.billing.draw import four
from tokenhub.billing.leasing import LeaseAgent, want_path
from tokenhub.billing.pots import Contracts, Hold, new_epoch, replay
from tokenhub.billing.service import Billing, _payload_hash
from tokenhub.billing.terms import Terms
from tokenhub.db.database import open_database
from tokenhub.gateway.admission import money as admission_money
from tokenhub.quota import Quota
from tokenhub.runtime.demo import demo_config, seed_demo_billing
from tokenhub.usage import BILLED_FIELDS, MAX_TOKENS, UsageEvent, billed_lines, usage_problem

NOV = "2026-11"
T = "acme"
# The model's prices, USD per 1M tokens (Anthropic-like: reads a tenth, writes 1.25 x input).
CLAUDE = {"input": "3", "cached": "0.3", "output": "15", "write": "3.75"}
# A model with no cache-write (nor cached) price: both at the input price.
PLAIN = {"input": "2.5", "output": "10"}


def nanos(text: str) -> int:
    v = Decimal(text) * 10**9
    assert v == v.to_integral_value()
    return int(v)


def line(tokens: int, price: str) -> int:
    """One line's charge in nanos: tokens x price per 1M, rounded half to even once."""
    exact = Decimal(tokens) * Decimal(price) * 10**9 / 10**6
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def event(
    i: int,
    model: str,
    *,
    inp: int,
    cached: int = 0,
    writes: int = 0,
    out: int = 0,
    status: int = 200,
    tenant: str = T,
) -> UsageEvent:
    return UsageEvent(
        request_id=f"req_cw_{i:04d}",
        ts_ms=ms(2026, 11, 10, i % 24),
        tenant=tenant,
        key_id="k1",
        endpoint="messages",
        model=model,
        provider="anthropic",
        input_tokens=inp,
        cached_input_tokens=cached,
        cache_write_tokens=writes,
        output_tokens=out,
        status=status,
    )


# -- the billing rule ------------------------------------------------------------------------


def test_billed_lines_are_four_and_usage_problem_checks_writes() -> None:
    ev = event(1, "m", inp=1000, cached=300, writes=200, out=50)
    assert billed_lines(ev) == (500, 300, 50, 200)
    assert usage_problem(ev) is None
    # Not served: nothing billed, whatever the counts.
    assert billed_lines(event(2, "m", inp=1000, writes=200, out=5, status=502)) == (0, 0, 0, 0)
    # Writes alone, the whole prompt written.
    assert billed_lines(event(3, "m", inp=700, writes=700)) == (0, 0, 0, 700)

    def problem(**kw: Any) -> str | None:
        ev = event(9, "m", inp=1000, cached=300, writes=200, out=50)
        for k, v in kw.items():
            setattr(ev, k, v)
        return usage_problem(ev)

    assert problem(cache_write_tokens=-1) == "cache_write_tokens is negative (-1)"
    assert problem(cache_write_tokens="5") == "cache_write_tokens is not an integer"
    assert problem(cache_write_tokens=True) == "cache_write_tokens is not an integer"
    assert problem(cache_write_tokens=MAX_TOKENS + 1) == (
        f"cache_write_tokens is {MAX_TOKENS + 1}, above the ceiling of {MAX_TOKENS} tokens an "
        "event may count"
    )
    assert problem(cache_write_tokens=701) == (
        "cached_input_tokens + cache_write_tokens (300 + 701) is more than input_tokens (1000): "
        "both are part of the input"
    )
    assert problem(cache_write_tokens=700) is None
    # Counts out of order are clamped, never billed past the input: reads first, then writes.
    bad = event(4, "m", inp=100, cached=80, writes=50, out=1)
    assert billed_lines(bad) == (0, 80, 1, 20)


def test_events_settled_before_cache_writes_hash_as_they_did() -> None:
    """The settlement's payload hash leaves trailing later fields out while they hold their
    default, one by one: an event with a usage anomaly and no writes hashes as before."""
    n = len(BILLED_FIELDS)
    assert BILLED_FIELDS[n - 2 :] == ("usage_anomaly", "cache_write_tokens")
    ev = event(1, "m", inp=10, out=2)

    def sha(fields: tuple[Any, ...]) -> str:
        return hashlib.sha256(msgspec.json.encode(fields)).hexdigest()

    assert _payload_hash(ev) == sha(msgspec.structs.astuple(ev)[: n - 2])
    ev.usage_anomaly = "negative: -1"
    assert _payload_hash(ev) == sha(msgspec.structs.astuple(ev)[: n - 1])
    ev.cache_write_tokens = 4
    assert _payload_hash(ev) == sha(msgspec.structs.astuple(ev)[:n])
    ev.usage_anomaly = ""
    assert _payload_hash(ev) == sha(msgspec.structs.astuple(ev)[:n])


# -- settlement, statements, exports ---------------------------------------------------------


async def _prices(b: Billing) -> None:
    await b.set_price("claude", currency="USD", input_per_1m=CLAUDE["input"],
                      cached_input_per_1m=CLAUDE["cached"], output_per_1m=CLAUDE["output"],
                      cache_write_per_1m=CLAUDE["write"], effective_ms=0)  # fmt: skip
    await b.set_price("plain", currency="USD", input_per_1m=PLAIN["input"],
                      output_per_1m=PLAIN["output"], effective_ms=0)  # fmt: skip


def _claude_cost(inp: int, cached: int, writes: int, out: int) -> int:
    return (
        line(inp - cached - writes, CLAUDE["input"])
        + line(cached, CLAUDE["cached"])
        + line(out, CLAUDE["output"])
        + line(writes, CLAUDE["write"])
    )


def _plain_cost(inp: int, cached: int, writes: int, out: int) -> int:
    return (
        line(inp - cached - writes, PLAIN["input"])
        + line(cached, PLAIN["input"])
        + line(out, PLAIN["output"])
        + line(writes, PLAIN["input"])
    )


def _cloudevent(i: int, data: dict[str, Any], kind: str = "tokenhub.usage.v1") -> bytes:
    return json.dumps({
        "specversion": "1.0", "id": f"e{i}", "source": "gw-cw", "type": kind,
        "time": f"2026-11-{10 + i:02d}T08:00:00Z", "subject": T, "data": data,
    }).encode() + b"\n"  # fmt: skip


async def test_ingest_settle_statement_and_exports_with_cache_writes(billing: Billing) -> None:
    """Events with cache reads and writes go in through ingest (both CloudEvents types), settle
    at their prices (writes at the cache-write price; the input price where none is set), and
    come out in the statement, the event log and the FOCUS export, every amount exact."""
    b, db = billing, billing.db
    await _prices(b)
    await b.set_profile(T, currency="USD", draw_order=["wallet"])
    await b.topup(T, "100", "USD", ts_ms=ms(2026, 11, 1))
    # Odd counts, so that per-line rounding shows.
    c1 = {"inp": 123_457, "cached": 40_001, "writes": 20_003, "out": 7_777}
    c2 = {"inp": 5_001, "cached": 0, "writes": 5_001, "out": 333}  # the whole prompt written
    p1 = {"inp": 98_765, "cached": 1_111, "writes": 33_333, "out": 4_321}
    lines = _cloudevent(1, {"model": "claude", "input_tokens": c1["inp"],
                            "cached_input_tokens": c1["cached"],
                            "cache_write_tokens": c1["writes"], "output_tokens": c1["out"],
                            "endpoint": "messages", "provider": "anthropic"})  # fmt: skip
    lines += _cloudevent(2, {"model": "claude", "prompt_tokens": c2["inp"],
                             "completion_tokens": c2["out"],
                             "prompt_tokens_details": {"cache_write_tokens": c2["writes"]}},
                         "com.openai.usage")  # fmt: skip
    lines += _cloudevent(3, {"model": "plain", "input_tokens": p1["inp"],
                             "cached_input_tokens": p1["cached"],
                             "cache_write_tokens": p1["writes"],
                             "output_tokens": p1["out"]})  # fmt: skip
    # Refused, nothing stored: writes and reads above the input, a negative count.
    lines += _cloudevent(4, {"model": "claude", "input_tokens": 10, "cached_input_tokens": 6,
                             "cache_write_tokens": 5, "output_tokens": 1})  # fmt: skip
    lines += _cloudevent(5, {"model": "claude", "input_tokens": 10, "cache_write_tokens": -1,
                             "output_tokens": 1})  # fmt: skip
    results: list[Any] = []
    summary = await bio.ingest(db, io.BytesIO(lines), settle=True, on_result=results.append)
    assert (summary.ingested, summary.invalid, summary.settled) == (3, 2, 3)
    bad = {r.line: r.reason for r in results if r.status == "invalid"}
    assert bad[4] == (
        "cached input tokens + cache write tokens (6 + 5) exceed input tokens (10): both are "
        "part of the input"
    )
    assert "cache_write_tokens" in bad[5] and ">= 0" in bad[5]

    costs = [_claude_cost(**c1), _claude_cost(**c2), _plain_cost(**p1)]
    # The test's own arithmetic differs from pricing the writes as input: the price matters.
    assert _claude_cost(**c1) != _claude_cost(c1["inp"], c1["cached"], 0, c1["out"])
    assert await balance(db, L.wallet(T, "USD")) == -(nanos("100") - sum(costs))

    # The usage transaction says what it billed, line by line.
    rid1 = bio.request_id_for("gw-cw", "e1")
    [(txn1,)] = await db.read(
        lambda tx: tx.fetch("SELECT txn_id FROM settlements WHERE event_id = $1", rid1)
    )
    d = await txn_details(db, txn1)
    assert d["tokens"] == {"input": c1["inp"] - c1["cached"] - c1["writes"],
                           "cached_input": c1["cached"], "output": c1["out"],
                           "cache_write": c1["writes"]}  # fmt: skip
    assert d["priced"]["amounts"] == [
        line(c1["inp"] - c1["cached"] - c1["writes"], CLAUDE["input"]),
        line(c1["cached"], CLAUDE["cached"]),
        line(c1["out"], CLAUDE["output"]),
        line(c1["writes"], CLAUDE["write"]),
    ]

    # The statement: the tokens (writes included) and, of them, the writes; fast == full.
    st = await statement(db, T, NOV)
    assert st["usage"] == [
        {"model": "claude", "tokens": c1["inp"] + c1["out"] + c2["inp"] + c2["out"],
         "cache_write_tokens": c1["writes"] + c2["writes"], "package_tokens": 0,
         "amounts": {"USD": costs[0] + costs[1]}},
        {"model": "plain", "tokens": p1["inp"] + p1["out"], "cache_write_tokens": p1["writes"],
         "package_tokens": 0, "amounts": {"USD": costs[2]}},
    ]  # fmt: skip
    full = await db.read(lambda tx: statements.tenant_statement(tx, T, NOV, full=True))
    assert full["usage"] == st["usage"]
    text = statements.render_statement(st)
    assert f"{c1['writes'] + c2['writes']:,} of them cache writes" in text

    # The event log carries the writes.
    log = [e async for e in bio.iter_event_log(db, tenant=T)]
    assert [(e["cache_write_tokens"], e["charged"]) for e in log] == [
        (c["writes"], str(Decimal(cost).scaleb(-9).normalize()))
        for c, cost in zip((c1, c2, p1), costs, strict=True)
    ]

    # FOCUS: cache writes are a token kind of their own (a row per day and model), at their
    # unit price; billed exactly.
    rows = await bio.focus_rows(db, period=NOV, tenant=T)
    usage = [r for r in rows if r["ChargeCategory"] == "Usage"]
    writes = [r for r in usage if r["x_TokenKind"] == "cache_write"]
    assert sorted(
        (r["SkuId"], r["ConsumedQuantity"], r["ContractedUnitPrice"]) for r in writes
    ) == [
        ("claude/cache_write", str(c1["writes"]), CLAUDE["write"]),
        ("claude/cache_write", str(c2["writes"]), CLAUDE["write"]),
        ("plain/cache_write", str(p1["writes"]), PLAIN["input"]),
    ]
    assert sum(Decimal(r["BilledCost"]) for r in usage) == Decimal(sum(costs)).scaleb(-9)
    assert sum(Decimal(r["BilledCost"]) for r in writes) == Decimal(
        line(c1["writes"], CLAUDE["write"])
        + line(c2["writes"], CLAUDE["write"])
        + line(p1["writes"], PLAIN["input"])
    ).scaleb(-9)

    # Reconciling a provider's file that reports cache writes compares them too.
    rid2, rid3 = bio.request_id_for("gw-cw", "e2"), bio.request_id_for("gw-cw", "e3")
    csv_text = (
        "request_id,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens\n"
        f"{rid1},{c1['inp']},{c1['cached']},{c1['writes']},{c1['out']}\n"
        f"{rid2},{c2['inp']},0,{c2['writes'] - 1},{c2['out']}\n"
        f"{rid3},10,5,6,1\n"
    )
    report = await bio.reconcile(db, io.StringIO(csv_text))
    assert "cache_write_tokens" in report.compared
    assert [(x["request_id"], x["fields"]) for x in report.differing] == [
        (rid2, ["cache_write_tokens"])
    ]
    assert [(x["line"], x["reason"]) for x in report.malformed] == [
        (4, "cached_input_tokens + cache_write_tokens exceed input_tokens")
    ]
    assert (
        report.tokenhub_totals["cache_write_tokens"] == c1["writes"] + c2["writes"] + p1["writes"]
    )


async def test_packages_draw_cache_writes_like_input(billing: Billing) -> None:
    """A token is a token: a package pays for writes; tokens are taken uncached input, writes,
    cached input, output; what it cannot pay is priced per line."""
    b, db = billing, billing.db
    await _prices(b)
    await b.set_profile(T, currency="USD", draw_order=["package", "wallet"])
    await b.topup(T, "10", "USD", ts_ms=ms(2026, 11, 1))
    await b.create_plan("pk", price="1.00", currency="USD", tokens=1000, hard_stop=True)
    await b.assign(T, "pk", start_ms=ms(2026, 11, 1))
    ev = event(1, "claude", inp=900, cached=200, writes=400, out=300)
    res = await b.settle([ev])
    assert res.settled == 1
    # The package's price came out of the wallet; its 1000 tokens pay the 300 uncached, 400
    # written, 200 cached and 100 of the output tokens; the wallet the other 200 output tokens.
    paid = nanos("1.00") + line(200, CLAUDE["output"])
    assert await balance(db, L.wallet(T, "USD")) == -(nanos("10") - paid)
    d = await txn_details(db, res.txn_ids[ev.request_id])
    # Lines as billed_lines orders them: uncached, cached, output, writes.
    assert [(x["from"], x["tokens"]) for x in d["draws"] if x["from"] == "package"] == [
        ("package", [300, 200, 100, 400])
    ]
    assert d["priced"]["tokens"] == [0, 0, 200, 0]
    st = await statement(db, T, NOV)
    assert st["usage"][0] | {"amounts": None} == {
        "model": "claude", "tokens": 1200, "cache_write_tokens": 400, "package_tokens": 1000,
        "amounts": None,
    }  # fmt: skip


# -- money admission -------------------------------------------------------------------------


def _contracts(write: str, wallet: int) -> Contracts:
    q = Quota.anonymous(accounts=64, reservations=64)
    new_epoch(q)
    c = Contracts(q, db=None)  # type: ignore[arg-type]
    prices = {("m", ""): [_price(write)]}
    from tokenhub.billing.terms import Profile

    c.terms = Terms(profiles={T: Profile(T, "USD", ("wallet",))}, lots={}, prices=prices, fx={})
    q.set_limits(f"pot:m:{T}", money=wallet)
    q.set_limits("meta:contracts", requests=1)
    return c


def _price(write: str) -> Any:
    from tokenhub.billing.terms import Price

    w = None if write == "" else nanos(write)
    return Price("m", "", 1, 0, "USD", nanos("3"), nanos("0.3"), nanos("15"), None, w)


@pytest.mark.parametrize("write", ["", "2", "3.75"])
def test_admission_reserves_the_dearer_prompt_line_and_settles_four(write: str) -> None:
    """`money.reserve` holds [prompt, 0, cap, 0], the prompt priced at the dearer of input and
    cache write (a provider may write it all); settling the actual four lines charges their
    cost and gives the rest back."""
    c = _contracts(write, nanos("1"))
    dearer = max(Decimal("3"), Decimal(write or "3"))
    ev = event(1, "m", inp=0)
    adm = SimpleNamespace(hold=None)
    assert admission_money.reserve(c, ev, adm, 1000, 500, 10_000) is None  # type: ignore[arg-type]
    hold = adm.hold
    assert isinstance(hold, Hold) and hold.lines == [1000, 0, 500, 0]
    reserved = line(1000, str(dearer)) + line(500, "15")
    assert sum(d.amount for d in hold.draws) == reserved
    # The actual usage: some read, some written.
    actual = billed_lines(event(2, "m", inp=1000, cached=300, writes=600, out=200))
    cost = line(100, "3") + line(300, "0.3") + line(200, "15") + line(600, write or "3")
    assert cost <= reserved
    assert replay(hold.draws, actual) == [cost]
    spec = hold.settle(actual)
    assert spec.endswith(f"|pot:m:{T}={cost}")
    assert c.quota.state(f"pot:m:{T}").money.used == cost


def test_an_old_three_line_hold_or_want_is_read_as_no_writes() -> None:
    c = _contracts("3.75", nanos("1"))
    hold = c.admit(T, "m", 1, [1000, 0, 500], 10_000)
    assert isinstance(hold, Hold) and hold.lines == [1000, 0, 500, 0]
    assert replay(hold.draws, [100, 0, 50]) == replay(hold.draws, [100, 0, 50, 0])
    assert four([1, 2, 3]) == [1, 2, 3, 0] and four((1, 2, 3, 4)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="2 token lines"):
        four([1, 2])


async def test_the_lease_agent_takes_wants_of_three_or_four_lines(tmp_path: Path) -> None:
    db = await open_database(f"sqlite:///{tmp_path / 'l.db'}")
    q = Quota.anonymous(accounts=16, reservations=16)
    new_epoch(q)
    agent = LeaseAgent(q, db, host="A", shared_dir=tmp_path, refresh_s=60)
    try:
        await agent.start(run=False)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            for lines in ([1, 2, 3], [1, 2, 3, 4], [1, 2], [1, 2, 3, 4, 5], [1, -2, 3, 4]):
                s.sendto(json.dumps([T, "m", 5, lines, 7, 7]).encode(), str(want_path(tmp_path)))
        finally:
            s.close()
        agent._receive()
        assert [w.lines for w in agent.wants] == [[1, 2, 3, 0], [1, 2, 3, 4]]
    finally:
        await agent.close()
        await db.close()


async def test_demo_seeds_the_cache_write_price(tmp_path: Path) -> None:
    cfg = demo_config(1, str(tmp_path / "d.db"))
    first = cfg.models[0].deployments[0].price
    assert first is not None
    first.cache_write_per_1m = Decimal("0.1875")
    db = await open_database(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        b = Billing(db)
        await seed_demo_billing(b, cfg)
        got = {p.model: p for p in await b.prices()}
        assert got[cfg.models[0].id].cache_write_per_1m == nanos("0.1875")
        other = got[cfg.models[1].id]
        assert other.cache_write_per_1m is None and other.write_per_1m == other.input_per_1m
    finally:
        await db.close()
