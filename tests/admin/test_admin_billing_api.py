"""The admin API's billing resources over HTTP on SQLite and PostgreSQL: the catalogue writes,
settle, the usage summary, the exports against the CLI's bytes, statements, invoices, payments
and refunds (Idempotency-Key), profiles, splits, provider settlements, codes, the quarantine,
overruns, expiry, reconciliation; each write's scope, its audit entry, and bad input that
changes nothing."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from admin_kit import Admin
from factories import usage_event

from tokenhub.admin import usage_routes
from tokenhub.billing import io as bio
from tokenhub.cli import main as cli_main
from tokenhub.db.database import open_database
from tokenhub.usage import UsageEvent

V1 = "/admin/v1"
TS = int(dt.datetime(2026, 11, 3, 10, tzinfo=dt.UTC).timestamp() * 1000)
HOUR = 3_600_000


async def _call(
    admin: Admin, method: str, path: str, scope: str = "admin", **kw: Any
) -> tuple[int, Any]:
    headers = {**admin.auth(scope), **kw.pop("headers", {})}
    async with admin.client.request(method, path, headers=headers, **kw) as r:
        return r.status, await r.json()


async def _ok(admin: Admin, method: str, path: str, scope: str = "admin", **kw: Any) -> Any:
    status, body = await _call(admin, method, path, scope, **kw)
    assert status in (200, 201), (method, path, status, body)
    return body


async def _store_events(admin: Admin, events: list[UsageEvent]) -> None:
    db = await open_database(admin.db)
    try:
        await db.transaction(lambda tx: bio.store_events(tx, events))
    finally:
        await db.close()


async def _audit_actions(admin: Admin) -> list[str]:
    body = await _ok(admin, "GET", f"{V1}/audit?limit=1000", "read")
    return [e["action"] for e in body["data"]]


async def _setup(admin: Admin, *, postpaid: bool = False) -> dict[str, Any]:
    """Tenant acme (USD), a price for gpt-4o-mini from the epoch, 4 usage events, settled."""
    t = await _ok(admin, "POST", f"{V1}/tenants", json={"name": "acme"})
    await _ok(
        admin,
        "POST",
        f"{V1}/prices",
        json={"model": "gpt-4o-mini", "currency": "USD", "input_per_1m": "0.15",
              "output_per_1m": "0.60", "effective_ms": 0},
    )  # fmt: skip
    if postpaid:
        await _ok(
            admin,
            "PATCH",
            f"{V1}/tenants/{t['id']}/profile",
            "billing",
            json={"draw_order": ["postpaid"], "credit_limit": "100.00"},
        )
    else:
        await _ok(
            admin,
            "POST",
            f"{V1}/tenants/{t['id']}/topups",
            "billing",
            json={"amount": "10.00", "currency": "USD"},
            headers={"Idempotency-Key": "setup-topup"},
        )
    events = [
        usage_event(i, ts_ms=TS + i * HOUR, output_tokens=1000 * (i + 1), input_tokens=10_000)
        for i in range(4)
    ]
    await _store_events(admin, events)
    run = await _ok(admin, "POST", f"{V1}/billing/settle", "billing")
    assert (run["settled"], run["failed"]) == (4, 0), run
    return t


# -- catalogue ----------------------------------------------------------------------------------


async def test_catalogue_writes_need_admin_refuse_bad_input_and_are_audited(admin: Admin) -> None:
    price = {"model": "m1", "currency": "USD", "input_per_1m": "1.5", "output_per_1m": "2"}
    fx = {"base": "USD", "quote": "CNY", "rate": "7.1234", "effective_ms": 0}
    plan = {"name": "p10", "price": "9.90", "currency": "USD", "tokens": 10_000_000}
    for scope in ("read", "billing"):
        for path, body in (("prices", price), ("fx", fx), ("plans", plan)):
            status, resp = await _call(admin, "POST", f"{V1}/{path}", scope, json=body)
            assert status == 403, (scope, path, resp)
    # Refused values: nothing written.
    for path, body in (
        ("prices", {**price, "input_per_1m": "1.5.0"}),
        ("prices", {**price, "currency": "XXXX"}),
        ("prices", {**price, "extra": 1}),
        ("prices", {**price, "cache_write_per_1m": "-1"}),
        ("prices", {**price, "cache_write_per_1m": "x"}),
        ("fx", {**fx, "quote": "USD"}),
        ("fx", {**fx, "rate": "-1"}),
        ("plans", {**plan, "points": "5"}),  # tokens and points
        ("plans", {**plan, "name": "bad name"}),
        ("plans", {**plan, "price": "9.999"}),  # finer than USD's cents
    ):
        status, resp = await _call(admin, "POST", f"{V1}/{path}", json=body)
        assert status == 400 and "error" in resp, (path, body, resp)
    for path in ("prices", "fx", "plans"):
        assert (await _ok(admin, "GET", f"{V1}/{path}", "read"))["data"] == []
    status, resp = await _call(admin, "POST", f"{V1}/prices", json={**price, "tenant": "nobody"})
    assert status == 404

    p1 = await _ok(admin, "POST", f"{V1}/prices", json=price)
    p2 = await _ok(admin, "POST", f"{V1}/prices", json={**price, "input_per_1m": "1.25"})
    assert (p1["version"], p2["version"]) == (1, 2)
    assert p2["input_per_1m"] == {"amount": "1.25", "currency": "USD"}
    assert p2["cached_input_per_1m"] == {"amount": "1.25", "currency": "USD"}
    # No cache-write price: the input price, said so.
    assert (p2["cache_write_per_1m"], p2["cache_write_set"]) == (
        {"amount": "1.25", "currency": "USD"},
        False,
    )
    p3 = await _ok(admin, "POST", f"{V1}/prices", json={**price, "cache_write_per_1m": "1.875"})
    assert (p3["version"], p3["cache_write_per_1m"], p3["cache_write_set"]) == (
        3,
        {"amount": "1.875", "currency": "USD"},
        True,
    )
    listed = (await _ok(admin, "GET", f"{V1}/prices", "read"))["data"]
    assert [(x["version"], x["cache_write_per_1m"]["amount"], x["cache_write_set"])
            for x in listed] == [
        (1, "1.50", False), (2, "1.25", False), (3, "1.875", True),
    ]  # fmt: skip
    r = await _ok(admin, "POST", f"{V1}/fx", json=fx)
    assert r["rate"] == "7.1234"
    pl = await _ok(admin, "POST", f"{V1}/plans", json=plan)
    assert pl["price"] == {"amount": "9.90", "currency": "USD"} and pl["quantity"] == 10_000_000
    status, resp = await _call(admin, "POST", f"{V1}/plans", json=plan)
    assert status == 400 and "already exists" in resp["error"]["message"]
    assert len((await _ok(admin, "GET", f"{V1}/prices", "read"))["data"]) == 3
    assert [p["name"] for p in (await _ok(admin, "GET", f"{V1}/plans", "read"))["data"]] == ["p10"]

    audit = (await _ok(admin, "GET", f"{V1}/audit?limit=1000", "read"))["data"]
    prices = [e for e in audit if e["action"] == "price.set"]
    assert [(e["actor"], e["target"]) for e in prices] == [("ops-admin", "m1")] * 3
    assert prices[0]["before"] is None and prices[1]["before"] == p1 and prices[1]["after"] == p2
    assert [e["action"] for e in audit if e["action"] in ("fx.set", "plan.create")] == [
        "fx.set",
        "plan.create",
    ]


async def test_codes_are_shown_once_listed_by_prefix_and_redeemable(admin: Admin) -> None:
    t = await _ok(admin, "POST", f"{V1}/tenants", json={"name": "acme"})
    for body in (
        {"count": 1001, "amount": "5", "currency": "USD"},
        {"count": 0, "amount": "5", "currency": "USD"},
        {"count": 2, "amount": "-5", "currency": "USD"},
    ):
        status, _ = await _call(admin, "POST", f"{V1}/codes", json=body)
        assert status == 400, body
    status, _ = await _call(
        admin, "POST", f"{V1}/codes", "billing", json={"count": 1, "amount": "5", "currency": "USD"}
    )
    assert status == 403
    assert (await _ok(admin, "GET", f"{V1}/codes", "read"))["data"] == []

    batch = await _ok(
        admin, "POST", f"{V1}/codes", json={"count": 3, "amount": "5.00", "currency": "USD"}
    )
    codes = batch["codes"]
    assert len(set(codes)) == 3 and batch["amount"] == {"amount": "5.00", "currency": "USD"}
    await _ok(
        admin,
        "POST",
        f"{V1}/tenants/{t['id']}/redemptions",
        "billing",
        json={"code": codes[0]},
        headers={"Idempotency-Key": "r1"},
    )
    # Paged one at a time: every code once, none revealed, the redeemed one marked.
    seen: list[dict[str, Any]] = []
    url = f"{V1}/codes?limit=1"
    for _ in range(5):
        page = await _ok(admin, "GET", url, "read")
        seen += page["data"]
        if not page["has_more"]:
            break
        url = f"{V1}/codes?limit=1&cursor={page['next_cursor']}"
    assert len(seen) == 3 and len({c["id"] for c in seen}) == 3
    listing = json.dumps(seen) + json.dumps(await _ok(admin, "GET", f"{V1}/audit", "read"))
    assert not any(c in listing for c in codes)
    assert sorted(c["redeemed_by"] or "" for c in seen) == ["", "", "acme"]
    assert {c["prefix"] for c in seen} == {c[:8] for c in codes}


# -- settle, summary, exports -------------------------------------------------------------------


async def test_usage_summary_groups_the_rollups_and_refuses_bad_ranges(admin: Admin) -> None:
    await _setup(admin)
    since, until = TS - HOUR, TS + 10 * HOUR
    body = await _ok(
        admin, "GET", f"{V1}/usage/summary?since={since}&until={until}&group_by=hour,model", "read"
    )
    rows = body["data"]
    assert [r["bucket_ms"] for r in rows] == [TS + i * HOUR for i in range(4)]
    assert [r["output_tokens"] for r in rows] == [1000, 2000, 3000, 4000]
    assert all(r["model"] == "gpt-4o-mini" and r["requests"] == 1 for r in rows)
    # 10,000 input at 0.15 + 1,000 output at 0.60 per 1M = 0.0015 + 0.0006 USD.
    assert rows[0]["cost"] == [{"amount": "0.0021", "currency": "USD"}]
    day = await _ok(
        admin, "GET", f"{V1}/usage/summary?since=2026-11-01&until=2026-12-01&group_by=day,tenant",
        "read",
    )  # fmt: skip
    assert [(r["tenant"], r["output_tokens"], r["requests"]) for r in day["data"]] == [
        ("acme", 10_000, 4)
    ]
    other = await _ok(admin, "GET", f"{V1}/usage/summary?since={since}&tenant=beta", "read")
    assert other["data"] == []
    for query in (
        "group_by=week,model",
        "group_by=day",
        "group_by=day,colour",
        "since=2026-11-02&until=2026-11-01",
        "since=2025-01-01&until=2026-11-01",  # > 366 days
        "since=2026-10-01&until=2026-11-05&group_by=hour,model",  # > 31 days by hour
        "since=yesterday",
    ):
        status, resp = await _call(admin, "GET", f"{V1}/usage/summary?{query}", "read")
        assert status == 400 and "error" in resp, (query, resp)


async def _cli(tmp_path: Path, admin: Admin, *args: str) -> bytes:
    out = tmp_path / f"cli-{abs(hash(args))}.out"
    argv = ["billing", "export", *args, "--db", admin.db, "-o", str(out)]
    code = await asyncio.to_thread(cli_main, argv)
    assert code == 0
    return out.read_bytes()


async def _get_bytes(admin: Admin, path: str) -> tuple[int, bytes]:
    async with admin.client.get(path, headers=admin.auth("read")) as r:
        return r.status, await r.read()


async def test_exports_are_byte_for_byte_the_clis(admin: Admin, tmp_path: Path) -> None:
    t = await _setup(admin)
    # A refund, so that the event log has every settlement state.
    await _ok(
        admin, "POST", f"{V1}/usage/events/req_00000001/refund", "billing",
        headers={"Idempotency-Key": "rf"},
    )  # fmt: skip
    await _store_events(admin, [usage_event(9, ts_ms=TS + 9 * HOUR)])  # unsettled
    for query, cli_args in (
        ("format=csv", ["--format", "csv"]),
        ("format=jsonl", ["--format", "jsonl"]),
        ("format=csv&tenant=acme&since=2026-11-03T11:00:00Z", ["--format", "csv", "--tenant",
         "acme", "--since", "2026-11-03T11:00:00Z"]),
    ):  # fmt: skip
        status, got = await _get_bytes(admin, f"{V1}/usage/log?{query}")
        assert status == 200
        assert got == await _cli(tmp_path, admin, *cli_args), query
    lines = (await _get_bytes(admin, f"{V1}/usage/log?format=jsonl"))[1].splitlines()
    states = [json.loads(x)["settlement"] for x in lines]
    assert states == ["settled", "refunded", "settled", "settled", "unsettled"]
    for query, cli_args in (
        ("period=2026-11", ["--format", "focus", "--period", "2026-11"]),
        ("tenant=acme&issuer=acme-cloud", ["--format", "focus", "--tenant", "acme", "--issuer",
         "acme-cloud"]),
    ):  # fmt: skip
        status, got = await _get_bytes(admin, f"{V1}/usage/focus?{query}")
        assert status == 200 and got.startswith(b"BilledCost,")
        assert got == await _cli(tmp_path, admin, *cli_args), query
    assert len(got.splitlines()) > 2
    for path in (
        f"{V1}/usage/log",
        f"{V1}/usage/log?format=xml",
        f"{V1}/usage/log?format=csv&period=2026-13",
        f"{V1}/usage/log?format=csv&period=2026-11&since=2026-11-01",
        f"{V1}/usage/focus?since=2026-11-05&until=2026-11-01",
        f"{V1}/usage/focus?period=nov",
    ):
        status, body = await _get_bytes(admin, path)
        assert status == 400 and b'"error"' in body, (path, body)
    assert t["name"] == "acme"


# -- money documents ---------------------------------------------------------------------------


async def test_invoice_and_payment_are_idempotent_and_move_money_once(admin: Admin) -> None:
    t = await _setup(admin, postpaid=True)
    base = f"{V1}/tenants/{t['id']}"
    # Usage: 4 x 0.0015 input + 10,000 output x 0.60 / 1M = 0.006 + 0.006 = 0.012 USD owed.
    status, resp = await _call(
        admin, "POST", f"{base}/invoices", "read", json={"period": "2026-11"},
        headers={"Idempotency-Key": "inv"},
    )  # fmt: skip
    assert status == 403
    status, resp = await _call(admin, "POST", f"{base}/invoices", "billing",
                               json={"period": "2026-11"})  # fmt: skip
    assert status == 400 and "Idempotency-Key" in resp["error"]["message"]
    status, resp = await _call(
        admin, "POST", f"{base}/invoices", "billing", json={"period": "2026-1"},
        headers={"Idempotency-Key": "inv"},
    )  # fmt: skip
    assert status == 400
    inv = await _ok(
        admin, "POST", f"{base}/invoices", "billing", json={"period": "2026-11"},
        headers={"Idempotency-Key": "inv"},
    )  # fmt: skip
    assert inv["owed"] == {"amount": "0.012", "currency": "USD"}
    assert inv["due"] == {"amount": "0.01", "currency": "USD"}
    again = await _ok(
        admin, "POST", f"{base}/invoices", "billing", json={"period": "2026-11"},
        headers={"Idempotency-Key": "inv"},
    )  # fmt: skip
    assert again == inv
    status, resp = await _call(
        admin, "POST", f"{base}/invoices", "billing", json={"period": "2026-11"},
        headers={"Idempotency-Key": "inv-2"},
    )  # fmt: skip
    assert status == 400 and "invoiced" in resp["error"]["message"]

    pay = {"amount": "0.01", "currency": "USD"}
    p1 = await _ok(admin, "POST", f"{base}/payments", "billing", json=pay,
                   headers={"Idempotency-Key": "pay"})  # fmt: skip
    assert p1["receivable"] == {"amount": "0.00", "currency": "USD"}
    p2 = await _ok(admin, "POST", f"{base}/payments", "billing", json=pay,
                   headers={"Idempotency-Key": "pay"})  # fmt: skip
    assert p2 == p1
    status, resp = await _call(
        admin, "POST", f"{base}/payments", "billing", json={**pay, "amount": "0.02"},
        headers={"Idempotency-Key": "pay"},
    )  # fmt: skip
    assert status == 409 and resp["error"]["code"] == "idempotency_key_reused"
    status, resp = await _call(admin, "POST", f"{base}/payments", "billing", json=pay,
                               headers={"Idempotency-Key": "pay-2"})  # fmt: skip
    assert status == 400 and "owes" in resp["error"]["message"]  # nothing left owed
    actions = await _audit_actions(admin)
    assert actions.count("invoice.create") == 1 and actions.count("payment.create") == 1
    check = await _ok(admin, "GET", f"{V1}/billing/check", "read")
    assert check["ok"], check


async def test_refund_once_and_statements_close_once(admin: Admin) -> None:
    t = await _setup(admin)
    base = f"{V1}/tenants/{t['id']}"
    before = await _ok(admin, "GET", f"{base}", "read")
    url = f"{V1}/usage/events/req_00000002/refund"
    status, _ = await _call(admin, "POST", url, "read", headers={"Idempotency-Key": "rf"})
    assert status == 403
    r1 = await _ok(admin, "POST", url, "billing", json={"memo": "bad answer"},
                   headers={"Idempotency-Key": "rf"})  # fmt: skip
    r2 = await _ok(admin, "POST", url, "billing", json={"memo": "bad answer"},
                   headers={"Idempotency-Key": "rf"})  # fmt: skip
    assert r1 == r2 and r1["tenant"] == "acme"
    status, resp = await _call(admin, "POST", url, "billing", headers={"Idempotency-Key": "rf2"})
    assert status == 400 and "already been refunded" in resp["error"]["message"]
    status, resp = await _call(
        admin, "POST", f"{V1}/usage/events/req_nope/refund", "billing",
        headers={"Idempotency-Key": "rf3"},
    )  # fmt: skip
    assert status == 400
    after = await _ok(admin, "GET", f"{base}", "read")
    # Event 2: 10,000 input x 0.15 + 3,000 output x 0.60 per 1M = 0.0033 back in the wallet.
    got = float(after["billing"]["wallet"]["amount"]) - float(before["billing"]["wallet"]["amount"])
    assert abs(got - 0.0033) < 1e-12

    st = await _ok(admin, "GET", f"{base}/statements/2026-11", "read")
    assert st["object"] == "statement" and st["tenant"] == "acme" and st["period"] == "2026-11"
    status, _ = await _call(admin, "POST", f"{base}/statements/2026-11/close", "read")
    assert status == 403
    closed = await _ok(admin, "POST", f"{base}/statements/2026-11/close", "billing")
    assert closed["closed"] is True
    status, resp = await _call(admin, "POST", f"{base}/statements/2026-11/close", "billing")
    assert status == 400 and "already closed" in resp["error"]["message"]
    for bad in ("2026-13", "2026-1", "latest"):
        status, _ = await _call(admin, "GET", f"{base}/statements/{bad}", "read")
        assert status == 400, bad
    status, _ = await _call(admin, "GET", f"{V1}/tenants/ten_000000000000/statements/2026-11",
                            "read")  # fmt: skip
    assert status == 404
    actions = await _audit_actions(admin)
    assert actions.count("usage.refund") == 1 and actions.count("statement.close") == 1


async def test_profile_split_settlement_overruns(admin: Admin) -> None:
    t = await _ok(admin, "POST", f"{V1}/tenants", json={"name": "acme"})
    prof_url = f"{V1}/tenants/{t['id']}/profile"
    prof = await _ok(admin, "GET", prof_url, "read")
    assert prof["currency"] == "USD" and prof["credit_limit"]["amount"] == "0.00"
    for body in (
        {},
        {"draw_order": ["wallet", "wallet"]},
        {"currency": "XX"},
        {"discount_pct": "120"},
        {"discount_pct": "NaN"},
        {"discount_pct": "abc"},
        {"credit_limit": "1.001"},
    ):
        status, resp = await _call(admin, "PATCH", prof_url, "billing", json=body)
        assert status == 400, (body, resp)
    status, _ = await _call(admin, "PATCH", prof_url, "read", json={"credit_limit": "5"})
    assert status == 403
    assert await _ok(admin, "GET", prof_url, "read") == prof
    new = await _ok(
        admin, "PATCH", prof_url, "billing",
        json={"draw_order": ["wallet"], "low_balance": "2.50", "discount_pct": "12.5"},
    )  # fmt: skip
    assert new["draw_order"] == ["wallet"] and new["discount_pct"] == "12.5"
    assert new["low_balance"] == {"amount": "2.50", "currency": "USD"}

    # Split: admin only; a bad percentage changes nothing.
    split_url = f"{V1}/providers/mock-a/split"
    status, _ = await _call(admin, "PUT", split_url, "billing", json={"platform_pct": "20"})
    assert status == 403
    for bad in (
        {"platform_pct": "90", "channel_pct": "20"},
        {"platform_pct": "NaN"},
        {"platform_pct": "Infinity"},
        {"platform_pct": "twenty"},
        {"platform_pct": "-1"},
    ):
        status, _ = await _call(admin, "PUT", split_url, json=bad)
        assert status == 400, bad
    assert [e for e in await _audit_actions(admin) if e == "split.set"] == []
    s = await _ok(admin, "PUT", split_url, json={"platform_pct": "20", "channel_pct": "5",
                                                 "effective_ms": 0})  # fmt: skip
    assert (s["platform_pct"], s["channel_pct"], s["provider_pct"]) == ("20", "5", "75")

    # A wallet-only tenant with an empty wallet: its usage is overrun.
    await _ok(admin, "POST", f"{V1}/prices", json={"model": "gpt-4o-mini", "currency": "USD",
              "input_per_1m": "1", "output_per_1m": "2", "effective_ms": 0})  # fmt: skip
    await _store_events(admin, [usage_event(1, ts_ms=TS, input_tokens=1_000_000)])
    await _ok(admin, "POST", f"{V1}/billing/settle", "billing", json={"batch": 10})
    over = await _ok(admin, "GET", f"{V1}/billing/overruns", "read")
    # 1M input at 1 USD less 12.5 % discount.
    assert over["data"] == [
        {"object": "overrun", "tenant": "acme", "owed": {"amount": "0.875", "currency": "USD"}}
    ]
    st = await _ok(admin, "GET", f"{V1}/providers/mock-a/settlements/2026-11", "read")
    # Settled usage owes the provider its share (75 %), whoever pays the operator.
    assert st["totals"] == [{"amount": "0.65625", "currency": "USD"}]
    status, _ = await _call(admin, "GET", f"{V1}/providers/mock-a/settlements/11-2026", "read")
    assert status == 400


async def test_provider_settlement_from_paid_usage(admin: Admin) -> None:
    await _setup(admin)
    st = await _ok(admin, "GET", f"{V1}/providers/mock-a/settlements/2026-11", "read")
    # No split set: the whole 0.012 USD the usage took goes to the provider.
    assert st["totals"] == [{"amount": "0.012", "currency": "USD"}]
    assert [x["model"] for x in st["lines"]] == ["gpt-4o-mini"]


# -- quarantine, expire -------------------------------------------------------------------------


async def test_quarantine_list_release_void(admin: Admin) -> None:
    await _setup(admin)
    bad = [
        usage_event(20, ts_ms=TS, output_tokens=-5),
        usage_event(21, ts_ms=TS, output_tokens=-6),
    ]
    await _store_events(admin, bad)
    run = await _ok(admin, "POST", f"{V1}/billing/settle", "billing")
    assert (run["settled"], run["quarantined"]) == (0, 2), run
    q = await _ok(admin, "GET", f"{V1}/billing/quarantine", "read")
    assert sorted(x["event_id"] for x in q["data"]) == ["req_00000020", "req_00000021"]
    for body in ({"event_ids": []}, {"event_ids": ["req_00000020", "req_nope"]},
                 {"event_ids": ["req_00000020"], "memo": "x"}):  # fmt: skip
        status, _ = await _call(admin, "POST", f"{V1}/billing/quarantine/release", "billing",
                                json=body)  # fmt: skip
        assert status == 400, body
    status, _ = await _call(
        admin, "POST", f"{V1}/billing/quarantine/void", "read", json={"event_ids": ["req_00000020"]}
    )
    assert status == 403
    assert len((await _ok(admin, "GET", f"{V1}/billing/quarantine", "read"))["data"]) == 2
    v = await _ok(admin, "POST", f"{V1}/billing/quarantine/void", "billing",
                  json={"event_ids": ["req_00000020"], "memo": "negative count"})  # fmt: skip
    assert v["event_ids"] == ["req_00000020"]
    r = await _ok(admin, "POST", f"{V1}/billing/quarantine/release", "billing",
                  json={"event_ids": ["req_00000021"]})  # fmt: skip
    assert r["event_ids"] == ["req_00000021"]
    assert (await _ok(admin, "GET", f"{V1}/billing/quarantine", "read"))["data"] == []
    audit = (await _ok(admin, "GET", f"{V1}/audit?limit=1000", "read"))["data"]
    voided = [e for e in audit if e["action"] == "quarantine.void"]
    assert voided[0]["before"][0]["event_id"] == "req_00000020"
    assert voided[0]["after"] == {"event_ids": ["req_00000020"], "memo": "negative count"}


async def test_expire_ends_lots_once(admin: Admin) -> None:
    t = await _ok(admin, "POST", f"{V1}/tenants", json={"name": "acme"})
    await _ok(admin, "POST", f"{V1}/plans",
              json={"name": "d1", "price": "1.00", "currency": "USD", "tokens": 1000,
                    "period": "day"})  # fmt: skip
    await _ok(
        admin, "POST", f"{V1}/tenants/{t['id']}/topups", "billing",
        json={"amount": "5.00", "currency": "USD"}, headers={"Idempotency-Key": "t"},
    )  # fmt: skip
    await _ok(admin, "POST", f"{V1}/tenants/{t['id']}/plans", "billing",
              json={"plan": "d1", "start_ms": TS}, headers={"Idempotency-Key": "a"})  # fmt: skip
    status, _ = await _call(admin, "POST", f"{V1}/billing/expire", "read")
    assert status == 403
    status, _ = await _call(admin, "POST", f"{V1}/billing/expire", "billing",
                            json={"now_ms": "soon"})  # fmt: skip
    assert status == 400
    early = await _ok(admin, "POST", f"{V1}/billing/expire", "billing", json={"now_ms": TS})
    assert early["transactions"] == []
    first = await _ok(admin, "POST", f"{V1}/billing/expire", "billing")
    assert len(first["transactions"]) == 1
    again = await _ok(admin, "POST", f"{V1}/billing/expire", "billing")
    assert again["transactions"] == []
    assert (await _ok(admin, "GET", f"{V1}/billing/check", "read"))["ok"]


# -- reconciliation -----------------------------------------------------------------------------


async def test_reconciliation_is_the_clis_report_and_bounded(admin: Admin) -> None:
    await _setup(admin)
    csv_text = (
        "request_id,prompt_tokens,completion_tokens,model\n"
        "req_00000000,10000,1000,gpt-4o-mini\n"  # matches
        "req_00000001,10000,2500,gpt-4o-mini\n"  # differs
        "req_99999999,5,5,gpt-4o-mini\n"  # missing in tokenhub
        "req_00000002,ten,3000,gpt-4o-mini\n"  # malformed
    )
    url = f"{V1}/reconciliations?provider=mock-a&period=2026-11"
    async with admin.client.post(
        url, data=csv_text.encode(), headers={**admin.auth("read"), "Content-Type": "text/csv"}
    ) as r:
        assert r.status == 200
        got = await r.json()
    db = await open_database(admin.db)
    try:
        since, until = bio.time_window("2026-11", None, None)
        want = await bio.reconcile(
            db, io.StringIO(csv_text, newline=""), provider="mock-a", since=since, until=until
        )
    finally:
        await db.close()
    assert got == {"object": "reconciliation", "provider": "mock-a",
                   **msgspec.json.decode(msgspec.json.encode(want.as_dict()))}  # fmt: skip
    assert got["matched"] == 2 and got["ok"] is False
    assert [d["request_id"] for d in got["differing"]] == ["req_00000001"]
    assert got["differing"][0]["file"]["output_tokens"] == 2500
    assert got["differing"][0]["tokenhub"]["output_tokens"] == 2000
    assert [m["request_id"] for m in got["missing"]] == ["req_99999999"]
    assert [x["request_id"] for x in got["extra"]] == ["req_00000003"]
    assert len(got["malformed"]) == 1

    for headers, data in (
        ({"Content-Type": "application/json"}, b"{}"),
        ({"Content-Type": "text/csv"}, b"id,tokens\n1,2\n"),  # no needed columns
        ({"Content-Type": "text/csv"}, b""),
    ):
        async with admin.client.post(
            url, data=data, headers={**admin.auth("read"), **headers}
        ) as r:
            assert r.status == 400, (headers, data)
    for query in ("provider=mock-a", "since=2026-11-01", "since=2025-01-01&until=2026-11-01"):
        async with admin.client.post(
            f"{V1}/reconciliations?{query}", data=csv_text.encode(),
            headers={**admin.auth("read"), "Content-Type": "text/csv"},
        ) as r:  # fmt: skip
            assert r.status == 400, query
    big = b"request_id,input_tokens,output_tokens\n" + b"r,1,1\n" * 200_000  # 1.2 MB
    async with admin.client.post(
        url, data=io.BytesIO(big), headers={**admin.auth("read"), "Content-Type": "text/csv"}
    ) as r:
        assert r.status == 413


# -- wallet adjustments, wallet view, ingest, rollups ------------------------------------------


async def test_adjustment_is_idempotent_and_never_takes_the_wallet_below_zero(
    admin: Admin,
) -> None:
    t = await _ok(admin, "POST", f"{V1}/tenants", json={"name": "acme"})
    url = f"{V1}/tenants/{t['id']}/adjustments"
    await _ok(
        admin, "POST", f"{V1}/tenants/{t['id']}/topups", "billing",
        json={"amount": "3.00", "currency": "USD"}, headers={"Idempotency-Key": "t"},
    )  # fmt: skip
    body = {"amount": "-1.25", "currency": "USD", "memo": "double charge"}
    status, _ = await _call(admin, "POST", url, "read", json=body, headers={"Idempotency-Key": "a"})
    assert status == 403
    for bad in (
        {**body, "memo": " "},
        {**body, "amount": "0"},
        {**body, "currency": "CNY"},  # acme settles in USD
        {**body, "amount": "-3.01"},  # more than the wallet holds
        {**body, "amount": "1.001"},
    ):
        key = f"bad-{bad['amount']}-{bad['currency']}-{bad['memo']}"
        status, resp = await _call(
            admin, "POST", url, "billing", json=bad, headers={"Idempotency-Key": key}
        )
        assert status == 400, (bad, resp)
    a1 = await _ok(admin, "POST", url, "billing", json=body, headers={"Idempotency-Key": "a"})
    a2 = await _ok(admin, "POST", url, "billing", json=body, headers={"Idempotency-Key": "a"})
    assert a1 == a2 and a1["wallet"] == {"amount": "1.75", "currency": "USD"}
    assert a1["amount"] == {"amount": "-1.25", "currency": "USD"}
    status, resp = await _call(admin, "POST", url, "billing", json={**body, "amount": "-1.00"},
                               headers={"Idempotency-Key": "a"})  # fmt: skip
    assert status == 409
    w = await _ok(admin, "GET", f"{V1}/tenants/{t['id']}/wallet", "read")
    assert w["wallet"] == [{"amount": "1.75", "currency": "USD"}]
    assert w["receivable"] == [{"amount": "0.00", "currency": "USD"}] and w["lots"] == []
    audit = (await _ok(admin, "GET", f"{V1}/audit?limit=1000", "read"))["data"]
    adj = [e for e in audit if e["action"] == "wallet.adjust"]
    assert len(adj) == 1 and adj[0]["before"]["wallet"]["amount"] == "3.00"
    assert adj[0]["after"]["wallet"]["amount"] == "1.75"


async def test_wallet_view_shows_lots_and_the_low_balance_warning(admin: Admin) -> None:
    t = await _ok(admin, "POST", f"{V1}/tenants", json={"name": "acme"})
    await _ok(admin, "POST", f"{V1}/plans",
              json={"name": "m1", "price": "1.00", "currency": "USD", "tokens": 5000})  # fmt: skip
    await _ok(admin, "PATCH", f"{V1}/tenants/{t['id']}/profile", "billing",
              json={"low_balance": "2.00"})  # fmt: skip
    await _ok(
        admin, "POST", f"{V1}/tenants/{t['id']}/topups", "billing",
        json={"amount": "2.50", "currency": "USD"}, headers={"Idempotency-Key": "t"},
    )  # fmt: skip
    w = await _ok(admin, "GET", f"{V1}/tenants/{t['id']}/wallet", "read")
    assert w["low_balance_warning"] is False
    await _ok(admin, "POST", f"{V1}/tenants/{t['id']}/plans", "billing",
              json={"plan": "m1"}, headers={"Idempotency-Key": "p"})  # fmt: skip
    w = await _ok(admin, "GET", f"{V1}/tenants/{t['id']}/wallet", "read")
    assert w["wallet"] == [{"amount": "1.50", "currency": "USD"}]
    assert w["low_balance_warning"] is True
    assert [(x["plan"], x["left"], x["quantity"]) for x in w["lots"]] == [("m1", 5000, 5000)]
    status, _ = await _call(admin, "GET", f"{V1}/tenants/ten_000000000000/wallet", "read")
    assert status == 404


def _cloudevent(i: int, **data: Any) -> bytes:
    return json.dumps({
        "specversion": "1.0", "id": f"ev-{i}", "source": "other-gateway",
        "type": "tokenhub.usage.v1", "subject": "acme", "time": "2026-11-03T10:00:00Z",
        "data": {"model": "gpt-4o-mini", "input_tokens": 1000, "output_tokens": 100, **data},
    }).encode()  # fmt: skip


async def test_ingest_stores_settles_and_counts_every_line(admin: Admin) -> None:
    await _setup(admin)
    body = b"\n".join([_cloudevent(1), b"not json", _cloudevent(2), b"", _cloudevent(3)]) + b"\n"
    url = f"{V1}/usage/events?settle=true"
    nd = {"Content-Type": "application/x-ndjson"}
    status, _ = await _call(admin, "POST", url, "read", data=body, headers=nd)
    assert status == 403
    for query, headers in (("settle=maybe", nd), ("settle=true", {"Content-Type": "text/csv"})):
        status, _ = await _call(admin, "POST", f"{V1}/usage/events?{query}", "billing",
                                data=body, headers=headers)  # fmt: skip
        assert status == 400
    r = await _ok(admin, "POST", url, "billing", data=body, headers=nd)
    assert (r["lines"], r["ingested"], r["invalid"], r["blank"], r["settled"]) == (5, 3, 1, 1, 3)
    assert r["ok"] is False and [p["line"] for p in r["problems"]] == [2]
    again = await _ok(admin, "POST", url, "billing", data=_cloudevent(1), headers=nd)
    assert (again["duplicate"], again["ingested"], again["ok"]) == (1, 0, True)
    conflict = await _ok(admin, "POST", url, "billing", data=_cloudevent(2, output_tokens=7),
                         headers=nd)  # fmt: skip
    assert conflict["conflict"] == 1 and conflict["problems"][0]["status"] == "conflict"
    big = _cloudevent(9) + b"\n" + b" " * (1024 * 1024)
    async with admin.client.post(
        url, data=io.BytesIO(big), headers={**admin.auth("billing"), **nd}
    ) as resp:
        assert resp.status == 413
    events = await _ok(admin, "GET", f"{V1}/usage/events?limit=1000", "read")
    assert len(events["data"]) == 4 + 3


async def test_rollups_rebuild_keeps_the_summary(admin: Admin) -> None:
    await _setup(admin)
    url = f"{V1}/usage/summary?since=2026-11-01&until=2026-12-01&group_by=day,model"
    before = await _ok(admin, "GET", url, "read")
    status, _ = await _call(admin, "POST", f"{V1}/billing/rollups/rebuild", "billing")
    assert status == 403
    status, _ = await _call(admin, "POST", f"{V1}/billing/rollups/rebuild", json={"since": 1})
    assert status == 400
    r = await _ok(admin, "POST", f"{V1}/billing/rollups/rebuild")
    assert r["events"] == 4 and r["rows"] > 0
    r = await _ok(admin, "POST", f"{V1}/billing/rollups/rebuild", json={"since_ms": TS + HOUR})
    assert r["events"] == 4  # from since's UTC day
    assert await _ok(admin, "GET", url, "read") == before


async def test_concurrent_refunds_and_payment_twins_move_money_once(admin: Admin) -> None:
    t = await _setup(admin, postpaid=True)  # owes 0.012 USD
    pay_url = f"{V1}/tenants/{t['id']}/payments"
    status, _ = await _call(admin, "POST", pay_url, "billing",
                               json={"amount": "0.005", "currency": "USD"},
                               headers={"Idempotency-Key": "p"})  # fmt: skip
    assert status == 400  # finer than the cent
    pay = {"amount": "0.01", "currency": "USD"}
    got = await asyncio.gather(
        *(_call(admin, "POST", pay_url, "billing", json=pay, headers={"Idempotency-Key": "p"})
          for _ in range(8))
    )  # fmt: skip
    assert {s for s, _ in got} == {201} and len({b["transaction"] for _, b in got}) == 1, got
    url = f"{V1}/usage/events/req_00000003/refund"
    got = await asyncio.gather(
        *(_call(admin, "POST", url, "billing", headers={"Idempotency-Key": f"k{i}"})
          for i in range(8))
    )  # fmt: skip
    assert sorted(s for s, _ in got) == [201] + [400] * 7, got
    wallet = await _ok(admin, "GET", f"{V1}/tenants/{t['id']}/wallet", "read")
    # 0.012 owed, 0.01 paid once, event 3 (10,000 in, 4,000 out: 0.0039) refunded once.
    assert wallet["receivable"] == [{"amount": "-0.0019", "currency": "USD"}], wallet
    assert (await _ok(admin, "GET", f"{V1}/billing/check", "read"))["ok"]


async def test_an_export_that_fails_midway_is_cut_never_complete(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _setup(admin)
    real = bio.iter_event_log

    async def broken(db: Any, **kw: Any) -> AsyncIterator[dict[str, Any]]:
        n = 0
        async for ev in real(db, **kw):
            yield ev
            n += 1
            if n == 2:
                raise RuntimeError("the database went away")

    monkeypatch.setattr(bio, "iter_event_log", broken)
    monkeypatch.setattr(usage_routes, "EXPORT_CHUNK", 1)
    async with admin.client.get(f"{V1}/usage/log?format=csv", headers=admin.auth("read")) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()

    async def fails(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("the database went away")

    # Before the first byte: a clean error, not a 200 with an empty body.
    monkeypatch.setattr(bio, "focus_rows", fails)
    status, body = await _call(admin, "GET", f"{V1}/usage/focus", "read")
    assert status == 500 and body["error"]["code"] == "internal_error"


async def test_admin_tokens_over_the_api(admin: Admin) -> None:
    url = f"{V1}/admin-tokens"
    for scope in ("read", "billing"):
        status, _ = await _call(admin, "GET", url, scope)
        assert status == 403
        status, _ = await _call(admin, "POST", url, scope, json={"name": "x", "scope": "read"})
        assert status == 403
    for bad in ({"name": "a b", "scope": "read"}, {"name": "ok", "scope": "root"}, {"name": "ok"}):
        status, _ = await _call(admin, "POST", url, json=bad)
        assert status == 400, bad
    made = await _ok(admin, "POST", url, json={"name": "ci", "scope": "read"})
    secret = made["secret"]
    assert made["scope"] == "read" and secret.startswith(made["prefix"])
    listed = await _ok(admin, "GET", url)
    assert sorted(t["name"] for t in listed["data"]) == [
        "ci",
        "ops-admin",
        "ops-billing",
        "ops-read",
    ]
    assert secret not in json.dumps(listed)
    async with admin.client.get(
        f"{V1}/tenants", headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        assert r.status == 200
    revoked = await _ok(admin, "POST", f"{url}/{made['id']}/revoke")
    assert revoked["revoked_ms"] is not None
    async with admin.client.get(
        f"{V1}/tenants", headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        assert r.status == 401
    status, _ = await _call(admin, "POST", f"{url}/{made['id']}/revoke")
    assert status == 400
    status, _ = await _call(admin, "POST", f"{url}/adm_nope/revoke")
    assert status == 404
    audit = (await _ok(admin, "GET", f"{V1}/audit?limit=1000", "read"))["data"]
    mine = [e for e in audit if e["actor"] == "ops-admin"]
    assert [e["action"] for e in mine] == ["admin_token.create", "admin_token.revoke"]
    assert secret not in json.dumps(audit)
