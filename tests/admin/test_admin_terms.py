"""Limits (PATCH, audited), the price book, FX, plans, the guard's audit log and the usage
export through the admin API: the same rows the CLI's service functions write, read back
exactly, and the export byte for byte the CLI's."""

from __future__ import annotations

from typing import Any

import pytest
from admin_kit import Admin
from factories import usage_event

from tokenhub.admin.routes import EXPORT_PAGE
from tokenhub.billing.service import Billing
from tokenhub.cli import main
from tokenhub.db.database import open_database

V1 = "/admin/v1"


async def _call(admin: Admin, method: str, path: str, scope: str = "admin", **kw: Any) -> Any:
    async with admin.client.request(method, path, headers=admin.auth(scope), **kw) as r:
        return r.status, await r.json()


async def test_limits_set_remove_refuse_and_audit(admin: Admin) -> None:
    tenant = admin.store.create_tenant("acme")
    key, _ = admin.store.create_key("acme")
    path = f"{V1}/tenants/{tenant.id}/limits"
    status, body = await _call(admin, "PATCH", path, json={"rpm": 60, "tokens_per_day": 10_000})
    assert status == 200 and body["limits"]["rpm"] == 60
    status, body = await _call(admin, "PATCH", path, json={"rpm": None, "tpm": 5000})
    assert status == 200
    assert (body["limits"]["rpm"], body["limits"]["tpm"], body["limits"]["tokens_per_day"]) == (
        None,
        5000,
        10_000,
    )
    # What the gateway reads (the store) is what the API wrote.
    limits = admin.store.get_limits("tenant", "acme")
    assert (limits.rpm, limits.tpm, limits.tokens_per_day) == (None, 5000, 10_000)
    kpath = f"{V1}/keys/{key.id}/limits"
    status, body = await _call(admin, "PATCH", kpath, json={"max_concurrency": 3})
    assert status == 200 and body["limits"] == {"rpm": None, "tpm": None, "max_concurrency": 3}
    # Refused as given, nothing changed: a tenant-only limit on a key, a negative number, a
    # percentage over 100, nothing to change; read and billing tokens; unknown ids.
    for p, payload in (
        (kpath, {"tokens_per_day": 5}),
        (path, {"rpm": -1}),
        (path, {"strong_share_pct": 101}),
        (path, {}),
        (path, {"rpm": "60"}),
    ):
        status, body = await _call(admin, "PATCH", p, json=payload)
        assert status == 400 and "error" in body, payload
    for scope in ("read", "billing"):
        status, _ = await _call(admin, "PATCH", path, scope=scope, json={"rpm": 1})
        assert status == 403
    assert (await _call(admin, "PATCH", f"{V1}/keys/key_000000000000/limits", json={"rpm": 1}))[
        0
    ] == 404
    assert admin.store.get_limits("tenant", "acme") == limits
    assert admin.store.get_limits("key", key.id).max_concurrency == 3
    status, audit = await _call(admin, "GET", f"{V1}/audit", scope="read")
    changes = [e for e in audit["data"] if e["action"].endswith(".limits")]
    assert [(e["action"], e["target"]) for e in changes] == [
        ("tenant.limits", tenant.id),
        ("tenant.limits", tenant.id),
        ("key.limits", key.id),
    ]
    assert changes[1]["before"]["rpm"] == 60 and changes[1]["after"]["rpm"] is None


async def test_prices_fx_plans_and_guard_audit(admin: Admin) -> None:
    db = await open_database(admin.db)
    try:
        b = Billing(db)
        await b.set_price(
            "gpt-4o-mini",
            currency="CNY",
            input_per_1m="1.5",
            output_per_1m="6.000000001",
            effective_ms=1_700_000_000_000,
        )
        await b.set_fx("USD", "CNY", "7.1234", effective_ms=1_700_000_000_000)
        await b.create_plan("starter", price="9.90", currency="CNY", tokens=1_000_000)
    finally:
        await db.close()
    status, prices = await _call(admin, "GET", f"{V1}/prices", scope="read")
    assert status == 200
    [p] = prices["data"]
    assert p["model"] == "gpt-4o-mini" and p["effective_ms"] == 1_700_000_000_000
    assert p["input_per_1m"] == {"amount": "1.50", "currency": "CNY"}
    assert p["cached_input_per_1m"] == {"amount": "1.50", "currency": "CNY"}
    assert p["output_per_1m"] == {"amount": "6.000000001", "currency": "CNY"}  # never rounded
    status, fx = await _call(admin, "GET", f"{V1}/fx", scope="read")
    assert [(r["base"], r["quote"], r["rate"]) for r in fx["data"]] == [("USD", "CNY", "7.1234")]
    status, plans = await _call(admin, "GET", f"{V1}/plans", scope="read")
    [plan] = plans["data"]
    assert plan["price"] == {"amount": "9.90", "currency": "CNY"}
    assert (plan["quantity"], plan["unit"]) == (1_000_000, "tokens")
    # The gateway's own audit log (guard throttles), paged like the admin log.
    for i in range(5):
        admin.store.add_audit("guard_throttle", "acme", f"key_{i:012x}", {"tpm": 1000 + i})
    seen: list[str] = []
    cursor = ""
    while True:
        url = f"{V1}/audit/guard?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, page = await _call(admin, "GET", url, scope="read")
        assert status == 200
        seen += [e["key_id"] for e in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    # In the log's order (time, then id), each once: the order `tokenhub audit` prints.
    assert seen == [e.key_id for e in admin.store.audit_entries()]
    assert sorted(seen) == [f"key_{i:012x}" for i in range(5)]
    last = admin.store.audit_entries()[-1]
    assert page["data"][-1]["details"] == last.details


async def test_export_streams_what_the_cli_exports(
    admin: Admin, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    # More than two export pages, with ties in time, odd characters and a None (ttft_ms).
    events = [
        usage_event(
            i,
            ts_ms=1_700_000_000_000 + i // 5,
            tenant="acme" if i % 3 else "beta",
            model='gpt "4o", mini\n' if i % 7 == 0 else "gpt-4o-mini",
            stream=i % 2 == 0,
            ttft_ms=None if i % 2 else 12.5,
        )
        for i in range(2 * EXPORT_PAGE + 17)
    ]
    admin.store.insert_events(events)
    since, until = "1700000000003", "2023-11-14T22:13:20.400Z"  # ms and ISO 8601
    for fmt in ("jsonl", "csv"):
        assert main(["events", "export", "--format", fmt, "--db", admin.db,
                     "--since", since, "--until", until]) == 0  # fmt: skip
        cli = capsysbinary.readouterr().out
        url = f"{V1}/usage/events/export?format={fmt}&since={since}&until={until}"
        async with admin.client.get(url, headers=admin.auth("read")) as r:
            assert r.status == 200
            api = await r.read()
        assert api == cli and len(cli.splitlines()) > EXPORT_PAGE + 300, fmt
    # A tenant's events only; the filters are checked.
    async with admin.client.get(
        f"{V1}/usage/events/export?format=jsonl&tenant=beta", headers=admin.auth("read")
    ) as r:
        lines = (await r.read()).splitlines()
    assert len(lines) == sum(e.tenant == "beta" for e in events)
    for bad in ("format=xml", "format=csv&since=yesterday", "format=csv&since=5&until=5"):
        async with admin.client.get(
            f"{V1}/usage/events/export?{bad}", headers=admin.auth("read")
        ) as r:
            assert r.status == 400, bad


async def _post(admin: Admin, path: str, key: str, payload: Any) -> tuple[int, bytes, Any]:
    headers = {**admin.auth("billing"), "Idempotency-Key": key}
    async with admin.client.post(path, json=payload, headers=headers) as r:
        raw = await r.read()
        return r.status, raw, r.headers.get("Idempotent-Replayed")


async def test_redeem_and_plan_assign_are_idempotent(admin: Admin) -> None:
    tenant = admin.store.create_tenant("acme")
    db = await open_database(admin.db)
    try:
        b = Billing(db)
        code_a, code_b = await b.create_codes(2, "5.00", "USD")
        await b.topup("acme", "20.00", "USD")
        await b.create_plan("starter", price="9.90", currency="USD", tokens=1_000_000)
        redeem = f"{V1}/tenants/{tenant.id}/redemptions"
        first = await _post(admin, redeem, "r1", {"code": code_a})
        assert first[0] == 201 and first[2] is None
        again = await _post(admin, redeem, "r1", {"code": code_a})
        assert again == (201, first[1], "true")  # the first response, nothing redeemed twice
        assert (await _post(admin, redeem, "r1", {"code": code_b}))[0] == 409
        used = await _post(admin, redeem, "r2", {"code": code_a})  # a new key, a used code
        assert used[0] == 400 and b"already been used" in used[1]
        assert (await _post(admin, redeem, "r3", {"code": "nope"}))[0] == 400
        plans = f"{V1}/tenants/{tenant.id}/plans"
        sold = await _post(admin, plans, "p1", {"plan": "starter"})
        assert sold[0] == 201
        again = await _post(admin, plans, "p1", {"plan": "starter"})
        assert again == (201, sold[1], "true")
        lots = await b.lots("acme")
        assert len(lots) == 1 and lots[0].quantity == 1_000_000
        # 20 topped up + 5 redeemed once - 9.90 for one plan.
        async with admin.client.get(f"{V1}/tenants/{tenant.id}", headers=admin.auth("read")) as r:
            assert (await r.json())["billing"]["wallet"] == {"amount": "15.10", "currency": "USD"}
        assert (await _post(admin, plans, "p2", {"plan": "gold"}))[0] == 400  # no such plan
        async with admin.client.get(f"{V1}/billing/check", headers=admin.auth("read")) as r:
            assert (await r.json())["ok"] is True
        async with admin.client.get(f"{V1}/audit", headers=admin.auth("read")) as r:
            audit = [e for e in (await r.json())["data"] if e["actor"] == "ops-billing"]
        assert [e["action"] for e in audit] == ["code.redeem", "plan.assign"]
        assert code_a not in str(audit)  # a code is a bearer secret
    finally:
        await db.close()
