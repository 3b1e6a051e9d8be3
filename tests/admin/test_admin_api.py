"""The admin API (/admin/v1) over HTTP against a real SQLite database: scopes and their
refusals, the Idempotency-Key on top-ups, malformed bodies, 404s, the audit log, pagination."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

from admin_kit import Admin
from factories import usage_event

from tokenhub.admin.routes import ROUTES
from tokenhub.store.sql import digest

V1 = "/admin/v1"


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x_unknown", path)


async def _json(
    admin: Admin, method: str, path: str, scope: str | None = "admin", **kw: Any
) -> tuple[int, Any]:
    headers = {**(admin.auth(scope) if scope else {}), **kw.pop("headers", {})}
    async with admin.client.request(method, path, headers=headers, **kw) as r:
        return r.status, await r.json()


async def _tenant(admin: Admin, name: str = "acme") -> dict[str, Any]:
    status, body = await _json(admin, "POST", f"{V1}/tenants", json={"name": name})
    assert status == 201, body
    return dict(body)


async def _wallet(admin: Admin, tenant_id: str) -> str:
    status, body = await _json(admin, "GET", f"{V1}/tenants/{tenant_id}", scope="read")
    assert status == 200, body
    return str(body["billing"]["wallet"]["amount"])


def _is_openai_error(body: Any, code: str | None = None) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    ok = isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err
    return bool(ok and (code is None or err.get("code") == code))


async def test_every_guarded_route_refuses_no_token_bad_token_and_revoked_token(
    admin: Admin,
) -> None:
    revoked = admin.store.create_admin_token("gone", "admin")
    admin.store.revoke_admin_token(revoked[0].id)
    guarded = [r for r in ROUTES if r.scope is not None]
    assert len(guarded) >= 9
    for r in guarded:
        path = _concrete(r.path)
        for headers in (
            {},
            {"Authorization": "Bearer tha-not-a-token-at-all"},
            {"Authorization": f"Basic {admin.tokens['admin']}"},
            {"Authorization": f"Bearer {revoked[1]}"},
        ):
            async with admin.client.request(r.method, path, headers=headers, json={}) as resp:
                assert resp.status == 401, (r.method, path, headers)
                assert _is_openai_error(await resp.json(), "invalid_admin_token")
    # Health needs no token (a load balancer's probe).
    status, body = await _json(admin, "GET", f"{V1}/health", scope=None)
    assert (status, body["status"]) == (200, "ok")


async def test_scopes_read_below_billing_below_admin(admin: Admin) -> None:
    t = await _tenant(admin)
    topup = f"{V1}/tenants/{t['id']}/topups"
    # read: every GET but the admin tokens', no write.
    for r in ROUTES:
        if r.method == "GET" and r.scope == "read" and "{" not in r.path:
            if r.path.endswith(("/export", "/focus", "/log")):
                async with admin.client.get(
                    f"{r.path}?format=csv", headers=admin.auth("read")
                ) as resp:
                    head = (await resp.read()).split(b",", 1)[0]
                    assert (resp.status, head) == (
                        200,
                        b"BilledCost" if "focus" in r.path else b"request_id",
                    )
                continue
            status, body = await _json(admin, "GET", r.path, scope="read")
            assert status == 200, (r.path, body)
    for path, body in (
        (f"{V1}/tenants", {"name": "other"}),
        (f"{V1}/keys", {"tenant": "acme"}),
        (topup, {"amount": "1.00", "currency": "USD"}),
    ):
        status, resp = await _json(
            admin, "POST", path, scope="read", json=body, headers={"Idempotency-Key": "k-r"}
        )
        assert status == 403 and _is_openai_error(resp, "insufficient_scope"), path
    # billing: money, not tenants or keys.
    status, resp = await _json(
        admin, "POST", topup, scope="billing", json={"amount": "1.00", "currency": "USD"},
        headers={"Idempotency-Key": "k-b"},
    )  # fmt: skip
    assert status == 201, resp
    for path, body in ((f"{V1}/tenants", {"name": "other"}), (f"{V1}/keys", {"tenant": "acme"})):
        status, resp = await _json(admin, "POST", path, scope="billing", json=body)
        assert status == 403 and _is_openai_error(resp, "insufficient_scope"), path
    # Nothing the refusals asked for exists.
    assert [x.name for x in admin.store.list_tenants()] == ["acme"]
    assert admin.store.list_keys() == []
    assert await _wallet(admin, t["id"]) == "1.00"


async def test_topup_replay_adds_once_and_another_body_under_the_key_is_409(admin: Admin) -> None:
    t = await _tenant(admin)
    path = f"{V1}/tenants/{t['id']}/topups"
    hdr = {"Idempotency-Key": "topup-0001"}
    async with admin.client.post(
        path, json={"amount": "12.34", "currency": "USD"}, headers={**admin.auth("billing"), **hdr}
    ) as r:
        assert r.status == 201
        first = await r.read()
        assert "Idempotent-Replayed" not in r.headers
    # The same request again, its keys in another order: the first response, nothing added.
    async with admin.client.post(
        path,
        data=b'{"currency": "USD",   "amount": "12.34"}',
        headers={**admin.auth("billing"), **hdr, "Content-Type": "application/json"},
    ) as r:
        assert r.status == 201 and await r.read() == first
        assert r.headers["Idempotent-Replayed"] == "true"
    assert await _wallet(admin, t["id"]) == "12.34"
    # Another body under the same key: 409, nothing added.
    status, body = await _json(
        admin, "POST", path, scope="billing", json={"amount": "99.00", "currency": "USD"},
        headers=hdr,
    )  # fmt: skip
    assert status == 409 and _is_openai_error(body, "idempotency_key_reused")
    # No key at all: refused, nothing added. A new key: added once more.
    status, body = await _json(
        admin, "POST", path, scope="billing", json={"amount": "1.00", "currency": "USD"}
    )
    assert status == 400 and body["error"]["param"] == "Idempotency-Key"
    status, body = await _json(
        admin, "POST", path, scope="billing", json={"amount": "0.66", "currency": "USD"},
        headers={"Idempotency-Key": "topup-0002"},
    )  # fmt: skip
    assert status == 201
    assert body["amount"] == {"amount": "0.66", "currency": "USD"}
    assert body["wallet"] == {"amount": "13.00", "currency": "USD"}
    assert await _wallet(admin, t["id"]) == "13.00"
    topups = [e for e in await _audit(admin) if e["action"] == "wallet.topup"]
    assert len(topups) == 2


async def test_malformed_json_is_400_and_changes_nothing(admin: Admin) -> None:
    t = await _tenant(admin)
    before_audit = await _audit(admin)
    cases = [
        (f"{V1}/tenants", b'{"name": "x"'),
        (f"{V1}/tenants", b'{"name": 5}'),
        (f"{V1}/tenants", b'{"name": "x", "extra": 1}'),
        (f"{V1}/keys", b"[not json"),
        (f"{V1}/tenants/{t['id']}/topups", b'{"amount": 12.34, "currency": "USD"}'),  # a float
        (f"{V1}/tenants/{t['id']}/topups", b'{"amount": "1.00", "currency": "USD",'),
        (f"{V1}/tenants/{t['id']}/topups", b'{"amount": "1.001", "currency": "USD"}'),
    ]
    for i, (path, raw) in enumerate(cases):
        headers = {
            **admin.auth("admin"),
            "Content-Type": "application/json",
            "Idempotency-Key": f"bad-{i}",
        }
        async with admin.client.post(path, data=raw, headers=headers) as r:
            body = await r.json()
            assert r.status == 400 and _is_openai_error(body), (path, raw, body)
    assert [x.name for x in admin.store.list_tenants()] == ["acme"]
    assert admin.store.list_keys() == []
    assert await _wallet(admin, t["id"]) == "0.00"
    assert await _audit(admin) == before_audit
    # A refused request does not use up its Idempotency-Key.
    status, _ = await _json(
        admin, "POST", f"{V1}/tenants/{t['id']}/topups", json={"amount": "1.00", "currency": "USD"},
        headers={"Idempotency-Key": "bad-6"},
    )  # fmt: skip
    assert status == 201


async def test_unknown_tenant_and_key_are_404(admin: Admin) -> None:
    for method, path, body in (
        ("GET", f"{V1}/tenants/ten_000000000000", None),
        ("POST", f"{V1}/tenants/ten_000000000000/topups", {"amount": "1.00", "currency": "USD"}),
        ("POST", f"{V1}/keys/key_000000000000/revoke", None),
        ("POST", f"{V1}/keys", {"tenant": "nobody"}),
    ):
        status, resp = await _json(
            admin, method, path, json=body, headers={"Idempotency-Key": "k404"}
        )
        assert status == 404 and _is_openai_error(resp, "not_found"), (path, resp)
    status, resp = await _json(admin, "GET", f"{V1}/no/such/route")
    assert status == 404 and _is_openai_error(resp, "unknown_url")
    assert [e["action"] for e in await _audit(admin)] == ["admin_token.create"] * 3


async def _audit(admin: Admin) -> list[dict[str, Any]]:
    status, body = await _json(admin, "GET", f"{V1}/audit?limit=1000", scope="read")
    assert status == 200
    return list(body["data"])


async def test_every_write_is_audited_with_actor_before_and_after(admin: Admin) -> None:
    t = await _tenant(admin)
    status, key = await _json(admin, "POST", f"{V1}/keys", json={"tenant": "acme", "rpm": 60})
    assert status == 201 and key["secret"].startswith("th-") and key["limits"]["rpm"] == 60
    status, revoked = await _json(admin, "POST", f"{V1}/keys/{key['id']}/revoke")
    assert status == 200 and revoked["revoked_ms"] is not None
    status, _ = await _json(
        admin, "POST", f"{V1}/tenants/{t['id']}/topups", scope="billing",
        json={"amount": "5", "currency": "USD"}, headers={"Idempotency-Key": "a1"},
    )  # fmt: skip
    assert status == 201
    entries = [e for e in await _audit(admin) if e["actor"] != "cli"]  # the fixture's tokens
    got = [(e["actor"], e["action"], e["target"]) for e in entries]
    assert got == [
        ("ops-admin", "tenant.create", t["id"]),
        ("ops-admin", "key.create", key["id"]),
        ("ops-admin", "key.revoke", key["id"]),
        ("ops-billing", "wallet.topup", t["id"]),
    ]
    create, made, revoke, topup = entries
    assert create["before"] is None and create["after"]["name"] == "acme"
    assert made["before"] is None and made["after"]["prefix"] == key["prefix"]
    assert revoke["before"]["revoked_ms"] is None
    assert revoke["after"]["revoked_ms"] == revoked["revoked_ms"]
    assert topup["before"] == {"wallet": {"amount": "0.00", "currency": "USD"}}
    assert topup["after"]["wallet"] == {"amount": "5.00", "currency": "USD"}
    # The key's secret is in the create response only: not in the audit log, not in listings.
    status, listing = await _json(admin, "GET", f"{V1}/keys", scope="read")
    assert key["secret"] not in str(entries) and key["secret"] not in str(listing)
    # Only the secret's SHA-256 is stored, and it is the one the gateway authenticates by.
    assert digest(key["secret"]) == hashlib.sha256(key["secret"].encode()).hexdigest()
    assert admin.store.list_keys()[0].id == key["id"]
    # The CLI's admin-token writes are in the same log (actor cli).
    admin.store.create_admin_token("late", "read")
    assert (await _audit(admin))[-1]["action"] == "admin_token.create"


async def _walk(admin: Admin, path: str, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        sep = "&" if "?" in path else "?"
        url = f"{path}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, body = await _json(admin, "GET", url, scope="read")
        assert status == 200, body
        assert len(body["data"]) <= limit
        out += body["data"]
        pages += 1
        assert pages < 1000
        if not body["has_more"]:
            assert body["next_cursor"] is None
            return out
        cursor = body["next_cursor"]


async def test_pagination_walks_every_row_exactly_once(admin: Admin) -> None:
    # 301 events, several sharing a millisecond (the cursor breaks ties by request id), two
    # tenants, so that the tenant and time filters have something to leave out.
    events = [
        usage_event(i, ts_ms=1_700_000_000_000 + i // 3, tenant="acme" if i % 4 else "beta")
        for i in range(301)
    ]
    admin.store.insert_events(events)
    for limit in (1, 7, 100, 1000):
        got = await _walk(admin, f"{V1}/usage/events", limit)
        assert [e["request_id"] for e in got] == [e.request_id for e in events]
    acme = await _walk(
        admin, f"{V1}/usage/events?tenant=acme&since=1700000000010&until=1700000000090", 9
    )
    want = [
        e.request_id
        for e in events
        if e.tenant == "acme" and 10 <= e.ts_ms - 1_700_000_000_000 < 90
    ]
    assert [e["request_id"] for e in acme] == want and len(want) > 100
    assert (
        acme[0]["input_tokens"] == next(e for e in events if e.request_id == want[0]).input_tokens
    )
    # Tenants (by name), keys (by id) and the audit log page the same way.
    names = [f"t{i:03d}" for i in range(23)]
    for n in names:
        await _tenant(admin, n)
        admin.store.create_key(n)
    assert [t["name"] for t in await _walk(admin, f"{V1}/tenants", 4)] == names
    keys = await _walk(admin, f"{V1}/keys", 5)
    assert sorted(k["id"] for k in keys) == sorted(k.id for k in admin.store.list_keys())
    assert len({k["id"] for k in keys}) == 23
    assert [a["target"] for a in await _walk(admin, f"{V1}/audit", 6)] == [
        e["target"] for e in await _audit(admin)
    ]
    # Cursors are opaque, and only this API's are accepted; limit is 1..1000.
    for bad in ("cursor=nonsense", "cursor=WyJ4Il0", "limit=0", "limit=1001", "limit=x"):
        status, body = await _json(admin, "GET", f"{V1}/usage/events?{bad}", scope="read")
        assert status == 400 and _is_openai_error(body), bad


async def test_tenant_detail_and_billing_check(admin: Admin) -> None:
    t = await _tenant(admin)
    status, body = await _json(admin, "GET", f"{V1}/tenants/{t['id']}", scope="read")
    assert status == 200
    assert body["name"] == "acme" and body["active_keys"] == 0
    assert body["billing"]["wallet"] == {"amount": "0.00", "currency": "USD"}
    status, body = await _json(admin, "GET", f"{V1}/billing/check", scope="read")
    assert status == 200 and body["ok"] is True and body["problems"] == []
    status, _ = await _json(
        admin, "POST", f"{V1}/tenants/{t['id']}/topups", scope="billing",
        json={"amount": "3", "currency": "USD"}, headers={"Idempotency-Key": "c1"},
    )  # fmt: skip
    status, body = await _json(admin, "GET", f"{V1}/billing/check", scope="read")
    assert body["ok"] is True and body["transactions"] == 1 and body["postings"] >= 2
    # A top-up in another currency than the tenant's is refused, as the CLI refuses it.
    status, body = await _json(
        admin, "POST", f"{V1}/tenants/{t['id']}/topups", scope="billing",
        json={"amount": "3", "currency": "CNY"}, headers={"Idempotency-Key": "c2"},
    )  # fmt: skip
    assert status == 400 and "settles in USD" in body["error"]["message"]


async def test_concurrent_twins_under_one_key_top_up_once(admin: Admin) -> None:
    t = await _tenant(admin)
    path = f"{V1}/tenants/{t['id']}/topups"
    headers = {**admin.auth("billing"), "Idempotency-Key": "twin"}

    async def post() -> tuple[int, bytes]:
        async with admin.client.post(
            path, json={"amount": "7.00", "currency": "USD"}, headers=headers
        ) as r:
            return r.status, await r.read()

    results = await asyncio.gather(*(post() for _ in range(8)))
    assert {s for s, _ in results} == {201}
    assert len({body for _, body in results}) == 1  # every twin got the first response
    assert await _wallet(admin, t["id"]) == "7.00"
