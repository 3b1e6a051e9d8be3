"""Operator pages (tokenhub.console.operator_pages): overview, tenants, keys. Each form's
success and its bad input (a clear error flash, nothing changed), the one-time form token of
money moves, the key secret shown once, the audit rows."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from typing import Any

from console_kit import PASSWORD, World, event, flashes, parse, sign_in

from tokenhub.store import open_store


def q(world: World, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(world.db)
    try:
        return con.execute(statement, args).fetchall()
    finally:
        con.close()


def idem_of(html: str, form_id: str) -> str:
    form = html[html.index(f'id="{form_id}"') :]
    m = re.search(r'name="idem" value="([^"]+)"', form)
    assert m
    return m.group(1)


def wallet(world: World, tenant: str, cur: str) -> int:
    rows = q(world, "SELECT balance FROM accounts WHERE id = ?", f"t:{tenant}:wallet:{cur}")
    return -rows[0][0] if rows else 0


async def page(client: Any, path: str) -> str:
    resp = await client.get(path)
    assert resp.status == 200, (path, resp.status)
    return str(await resp.text())


async def follow(post_form: Any, client: Any, path: str, data: dict[str, Any]) -> str:
    """POSTs, checks the POST-redirect-GET, returns the next page's HTML."""
    resp = await post_form(client, path, data)
    assert resp.status == 303, (path, resp.status, await resp.text())
    return await page(client, resp.headers["Location"])


# -- overview ----------------------------------------------------------------------------------


async def test_overview_from_the_rollups(console_client: Any) -> None:
    read = await console_client("read")
    html = await page(read, "/console/")
    assert 'id="stat-week"' in html
    week = re.search(r'id="stat-week">.*?data-value="(\d+)"', html, re.S)
    assert week and week.group(1) == "4"  # acme 3 (one refused), bravo 1
    assert "success</span>" not in html and "75.0%" in html
    # Tokens in / cached / out over 7 days, revenue per currency.
    assert "1,000,107 / 20 / 500,053" in html
    assert 'data-currency="CNY"' in html and 'data-currency="USD"' in html
    # Exact: bravo's 10 tokens cost 0.0000057 USD, which rounding would show as 0.00.
    assert re.search(r'data-tenant="bravo">.*?0\.0000057 USD', html, re.S)
    tenants = re.findall(r'<tr data-tenant="([^"]+)"', html)
    assert tenants == ["acme", "bravo"]
    assert 'data-model="gpt-4o-mini"' in html and 'data-model="qwen-plus"' in html
    assert html.count("<tr data-day=") == 14
    assert "<svg" in html and "<title>" in html
    assert 'data-alert="none"' in html


async def test_overview_alerts_on_settler_lag(console_client: Any, world: World) -> None:
    store = open_store(world.db)
    try:
        old = time.time_ns() // 1_000_000 - 20 * 60_000
        store.insert_events([event("req_late", old, "acme", world.key_ids["acme"], "qwen-plus")])
    finally:
        store.close()
    html = await page(await console_client("read"), "/console/")
    assert 'data-alert="settler-lag"' in html
    lag = re.search(r'data-lag-ms="(\d+)"', html)
    assert lag and 20 * 60_000 <= int(lag.group(1)) < 25 * 60_000


# -- tenants -----------------------------------------------------------------------------------


async def test_tenants_list_shows_wallets_and_pages(console_client: Any, world: World) -> None:
    con = sqlite3.connect(world.db)
    con.executemany(
        "INSERT INTO tenants (id, name, created_ms) VALUES (?, ?, 0)",
        [(f"ten_zz{i:04d}", f"zz-{i:03d}") for i in range(55)],
    )
    con.commit()
    con.close()
    read = await console_client("read")
    html = await page(read, "/console/tenants")
    rows = re.findall(r'class="tenant-row" data-tenant="([^"]+)"', html)
    assert rows[:2] == ["acme", "bravo"] and len(rows) == 50
    assert re.search(r'data-tenant="acme".*?data-wallet="84000000000"', html, re.S)
    assert 'id="new-tenant"' not in html  # read-only: no create link
    nxt = re.search(r'rel="next" data-next href="([^"]+)"', html)
    assert nxt
    html2 = await page(read, nxt.group(1).replace("&amp;", "&"))
    rows2 = re.findall(r'class="tenant-row" data-tenant="([^"]+)"', html2)
    assert rows2 == [f"zz-{i:03d}" for i in range(48, 55)]
    assert "data-next" not in html2


async def test_create_tenant(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    assert 'id="tenant-create-form"' in await page(admin, "/console/tenants/new")
    html = await follow(
        post_form, admin, "/console/tenants/new", {"name": "zeta", "currency": "EUR"}
    )
    assert ("ok", "Created tenant zeta.") in flashes(html)
    assert 'data-tenant="zeta"' in html and 'data-currency="EUR"' in html
    audit = q(world, "SELECT actor, action FROM admin_audit WHERE action = 'tenant.create'")
    assert audit == [("console:root", "tenant.create")]
    before = q(world, "SELECT COUNT(*) FROM tenants")
    for bad, msg in (
        ({"name": "zeta"}, "already exists"),
        ({"name": "bad name!"}, "invalid tenant name"),
        ({"name": "eta", "currency": "XXX"}, "unknown currency"),
    ):
        resp = await post_form(
            admin, "/console/tenants/new", {**bad, "_back": "/console/tenants/new"}
        )
        assert resp.status == 303 and resp.headers["Location"] == "/console/tenants/new"
        got = flashes(await page(admin, resp.headers["Location"]))
        assert got and got[0][0] == "error" and msg in got[0][1], (bad, got)
    assert q(world, "SELECT COUNT(*) FROM tenants") == before


async def test_tenant_page_shows_contracts_keys_usage(console_client: Any, world: World) -> None:
    read = await console_client("read")
    html = await page(read, f"/console/tenants/{world.tenant_ids['acme']}")
    assert re.search(rf'data-lot="{world.lot_id}" data-remaining="850"', html)
    assert 'data-wallet="84000000000"' in html
    assert f'data-key="{world.key_ids["acme"]}"' in html
    assert 'data-model="gpt-4o-mini"' in html and "<svg" in html
    assert 'id="tenant-usage"' in html and html.count('<tr data-day="') == 2
    assert 'data-user="acme-user"' in html
    # Read-only: no money forms, no limits button.
    assert 'id="topup-form"' not in html and 'id="plan-form"' not in html
    assert 'id="tenant-user-form"' not in html
    resp = await read.get("/console/tenants/ten_nope")
    assert resp.status == 404 and "ten_nope" in await resp.text()


async def test_topup_moves_money_once_per_form(
    console_client: Any, post_form: Any, world: World
) -> None:
    cashier = await console_client("billing")
    path = f"/console/tenants/{world.tenant_ids['acme']}"
    html = await page(cashier, path)
    token = idem_of(html, "topup-form")
    form = {"amount": "12.34", "currency": "CNY", "idem": token, "_back": path}
    html = await follow(post_form, cashier, f"{path}/topup", form)
    assert ("ok", "Added 12.34 CNY to acme's wallet.") in flashes(html)
    assert wallet(world, "acme", "CNY") == 96_340_000_000
    # The same form again (a double click, a replayed POST): nothing more moves.
    html = await follow(post_form, cashier, f"{path}/topup", form)
    assert flashes(html)[0][0] == "ok" and "already" in flashes(html)[0][1]
    assert wallet(world, "acme", "CNY") == 96_340_000_000
    # The same token on another amount is refused.
    html = await follow(post_form, cashier, f"{path}/topup", {**form, "amount": "50"})
    assert flashes(html)[0][0] == "error"
    assert wallet(world, "acme", "CNY") == 96_340_000_000
    audit = q(world, "SELECT actor, target, before, after FROM admin_audit "
                     "WHERE action = 'wallet.topup'")  # fmt: skip
    assert len(audit) == 1 and audit[0][0] == "console:cashier"
    assert '"84.000000000"' in audit[0][2] or '"84.00"' in audit[0][2]
    # A fresh page has a fresh token: a second top-up is a second move.
    token2 = idem_of(await page(cashier, path), "topup-form")
    assert token2 != token
    await follow(post_form, cashier, f"{path}/topup", {**form, "idem": token2, "amount": "1"})
    assert wallet(world, "acme", "CNY") == 97_340_000_000


async def test_topup_bad_input_changes_nothing(
    console_client: Any, post_form: Any, world: World
) -> None:
    cashier = await console_client("billing")
    path = f"/console/tenants/{world.tenant_ids['acme']}"
    token = idem_of(await page(cashier, path), "topup-form")
    cases = (
        ({"amount": "1.234", "currency": "CNY"}, "more decimals"),
        ({"amount": "-5", "currency": "CNY"}, "negative"),
        ({"amount": "0", "currency": "CNY"}, "positive"),
        ({"amount": "abc", "currency": "CNY"}, "amount"),
        ({"amount": "5", "currency": "cny"}, "unknown currency"),
        ({"amount": "5", "currency": "CNY", "idem": ""}, "one-time token"),
    )
    for data, msg in cases:
        html = await follow(
            post_form, cashier, f"{path}/topup", {"idem": token, "_back": path, **data}
        )
        got = flashes(html)
        assert got and got[0][0] == "error" and msg in got[0][1], (data, got)
    assert wallet(world, "acme", "CNY") == 84_000_000_000
    assert q(world, "SELECT COUNT(*) FROM admin_audit") == [(0,)]
    assert q(world, "SELECT COUNT(*) FROM idempotency_keys") == [(0,)]


async def test_assign_plan_once(console_client: Any, post_form: Any, world: World) -> None:
    cashier = await console_client("billing")
    path = f"/console/tenants/{world.tenant_ids['acme']}"
    html = await page(cashier, path)
    form = {"plan": "qwen-1k", "idem": idem_of(html, "plan-form"), "_back": path}
    html = await follow(post_form, cashier, f"{path}/plan", form)
    assert ("ok", "Assigned plan qwen-1k to acme.") in flashes(html)
    assert len(re.findall(r'class="lot-row"', html)) == 2
    await follow(post_form, cashier, f"{path}/plan", form)
    assert q(world, "SELECT COUNT(*) FROM lots WHERE tenant = 'acme'") == [(2,)]
    assert wallet(world, "acme", "CNY") == 74_000_000_000
    html = await follow(
        post_form, cashier, f"{path}/plan", {**form, "plan": "nope", "idem": "fresh-token-1"}
    )
    assert flashes(html)[0][0] == "error"
    assert q(world, "SELECT COUNT(*) FROM lots WHERE tenant = 'acme'") == [(2,)]


async def test_tenant_limits(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    path = f"/console/tenants/{world.tenant_ids['bravo']}"
    html = await follow(post_form, admin, f"{path}/limits", {"rpm": "60", "tpm": "", "_back": path})
    assert ("ok", "Limits saved.") in flashes(html)
    assert q(world, "SELECT rpm, tpm FROM limits WHERE scope = 'tenant' AND name = 'bravo'") == [
        (60, None)
    ]
    assert 'name="rpm" value="60"' in html
    for bad in ({"rpm": "abc"}, {"rpm": "-1"}, {"strong_share_pct": "101"}):
        html = await follow(post_form, admin, f"{path}/limits", {**bad, "_back": path})
        assert flashes(html)[0][0] == "error", bad
    assert q(world, "SELECT rpm, strong_share_pct FROM limits WHERE name = 'bravo'") == [(60, None)]
    html = await follow(post_form, admin, f"{path}/limits", {"rpm": "", "_back": path})
    assert q(world, "SELECT COUNT(*) FROM limits WHERE name = 'bravo'") == [(0,)]
    actions = q(world, "SELECT action FROM admin_audit ORDER BY ts_ms, id")
    assert actions == [("tenant.limits",), ("tenant.limits",)]


async def test_create_tenant_login(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    path = f"/console/tenants/{world.tenant_ids['bravo']}"
    html = await follow(
        post_form, admin, f"{path}/users", {"name": "bravo-2", "password": "short", "_back": path}
    )
    assert flashes(html)[0][0] == "error" and "8 to 1024" in flashes(html)[0][1]
    html = await follow(
        post_form,
        admin,
        f"{path}/users",
        {"name": "bravo-2", "password": "bravo password", "lang": "zh-CN", "_back": path},
    )
    assert flashes(html)[0][0] == "ok" and 'data-user="bravo-2"' in html
    assert q(world, "SELECT role, tenant, lang FROM console_users WHERE name = 'bravo-2'") == [
        ("tenant", "bravo", "zh-CN")
    ]
    assert "bravo password" not in str(q(world, "SELECT * FROM admin_audit"))
    client = await console_client(None)
    await sign_in(client, "bravo-2", "bravo password")
    resp = await client.get("/console/tenants", allow_redirects=False)
    assert resp.status == 403
    html = await follow(
        post_form, admin, f"{path}/users", {"name": "root", "password": PASSWORD, "_back": path}
    )
    assert flashes(html)[0][0] == "error" and "already exists" in flashes(html)[0][1]


# -- keys --------------------------------------------------------------------------------------


async def test_keys_list_and_filter(console_client: Any, world: World) -> None:
    read = await console_client("read")
    html = await page(read, "/console/keys")
    keys = re.findall(r'class="key-row" data-key="([^"]+)" data-tenant="([^"]+)"', html)
    assert sorted(keys) == sorted((v, k) for k, v in world.key_ids.items())
    assert 'id="key-create-form"' not in html
    html = await page(read, "/console/keys?tenant=bravo")
    keys = re.findall(r'class="key-row" data-key="([^"]+)"', html)
    assert keys == [world.key_ids["bravo"]]
    resp = await read.get("/console/keys?tenant=nope")
    assert resp.status == 404


async def test_key_secret_shown_once(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    resp = await post_form(admin, "/console/keys", {"tenant": "bravo", "rpm": "30"})
    assert resp.status == 303
    location = resp.headers["Location"]
    assert re.fullmatch(r"/console/keys/key_[0-9a-f]{12}", location)
    key_id = location.rsplit("/", 1)[1]
    html = await page(admin, location)
    assert "secret" in parse(html).ids
    m = re.search(r'id="secret" data-secret>([^<]+)<', html)
    assert m
    plain = m.group(1)
    digest = hashlib.sha256(plain.encode()).hexdigest()  # the gateway's own check of a key
    assert q(world, "SELECT COUNT(*) FROM api_keys WHERE id = ? AND sha256 = ?", key_id, digest) \
        == [(1,)]  # fmt: skip
    assert plain not in location
    # Never again: the same page, the list, the tenant's page, another session.
    assert plain not in await page(admin, location)
    assert 'id="secret"' not in await page(admin, location)
    assert plain not in await page(admin, "/console/keys")
    assert plain not in await page(admin, f"/console/tenants/{world.tenant_ids['bravo']}")
    other = await console_client("admin")
    assert plain not in await page(other, location)
    # Nor in the database's audit log.
    assert plain not in str(q(world, "SELECT * FROM admin_audit"))
    assert q(world, "SELECT rpm FROM limits WHERE scope = 'key' AND name = ?", key_id) == [(30,)]


async def test_key_create_bad_input(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    before = q(world, "SELECT COUNT(*) FROM api_keys")
    for data, msg in (
        ({"tenant": "nope"}, "no tenant"),
        ({"tenant": ""}, "choose"),
        ({"tenant": "acme", "rpm": "ten"}, "whole number"),
    ):
        html = await follow(post_form, admin, "/console/keys", {**data, "_back": "/console/keys"})
        got = flashes(html)
        assert got and got[0][0] == "error" and msg in got[0][1], (data, got)
        assert 'id="secret"' not in html
    assert q(world, "SELECT COUNT(*) FROM api_keys") == before


async def test_revoke_and_key_limits(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    key = world.key_ids["acme"]
    path = f"/console/keys/{key}"
    html = await follow(post_form, admin, f"{path}/limits", {"tpm": "1000", "_back": path})
    assert ("ok", "Limits saved.") in flashes(html)
    assert q(world, "SELECT tpm FROM limits WHERE scope = 'key' AND name = ?", key) == [(1000,)]
    html = await follow(post_form, admin, f"{path}/limits", {"tpm": "x", "_back": path})
    assert flashes(html)[0][0] == "error"
    html = await follow(post_form, admin, f"{path}/revoke", {"_back": path})
    assert 'data-revoked="true"' in html and 'id="key-revoke-form"' not in html
    assert q(world, "SELECT revoked_ms IS NOT NULL FROM api_keys WHERE id = ?", key) == [(1,)]
    html = await follow(post_form, admin, f"{path}/revoke", {"_back": path})
    assert flashes(html)[0][0] == "error" and "already revoked" in flashes(html)[0][1]
    actions = [a for (a,) in q(world, "SELECT action FROM admin_audit ORDER BY ts_ms, id")]
    assert actions == ["key.limits", "key.revoke"]
    assert (await admin.get("/console/keys/key_000000000000")).status == 404


async def test_overview_alerts_on_failing_settlements(console_client: Any, world: World) -> None:
    con = sqlite3.connect(world.db)
    con.execute(
        "INSERT INTO settlement_failures (event_id, reason, attempts, last_ms, quarantined) "
        "VALUES ('req_x', 'no price', 3, 0, 1)"
    )
    con.commit()
    con.close()
    html = await page(await console_client("read"), "/console/")
    assert 'data-alert="settlement-failures"' in html
    assert "1 usage events fail to settle (1 quarantined" in html


async def test_live_refresh_leaves_flashes_queued(
    console_client: Any, post_form: Any, world: World
) -> None:
    admin = await console_client("admin")
    resp = await post_form(admin, "/console/tenants/new", {"name": "theta"})
    location = resp.headers["Location"]
    # console.js re-reads the page for its data-refresh elements: the flash stays for the page.
    refreshed = await admin.get(location, headers={"X-Refresh": "1"})
    assert flashes(await refreshed.text()) == []
    assert ("ok", "Created tenant theta.") in flashes(await page(admin, location))
    html = await page(admin, "/console/")
    assert 'id="stats" data-refresh="30"' in html and 'id="alerts" data-refresh="30"' in html


async def test_tenant_page_links_and_other_wallets(
    console_client: Any, post_form: Any, world: World
) -> None:
    # A wallet in a currency that is no longer the tenant's billing currency (top-ups take
    # only the billing currency, so the ledger row is written here).
    con = sqlite3.connect(world.db)
    con.execute(
        "INSERT INTO accounts (id, tenant, kind, unit, balance, ceiling, created_ms) "
        "VALUES ('t:acme:wallet:USD', 'acme', 'wallet', 'USD', -3000000000, 0, 0)"
    )
    con.commit()
    con.close()
    html = await page(await console_client("read"), f"/console/tenants/{world.tenant_ids['acme']}")
    assert 'data-other-wallet="USD">3.00 USD<' in html
    assert 'data-wallet="84000000000"' in html  # the CNY wallet, the billing currency's
    assert 'href="/console/usage?tenant=acme"' in html
    assert 'href="/console/billing/statements?tenant=acme"' in html


async def test_key_page_shows_its_usage(console_client: Any, world: World) -> None:
    read = await console_client("read")
    html = await page(read, f"/console/keys/{world.key_ids['acme']}")
    assert 'id="key-usage" data-requests="3"' in html  # 2 ok, 1 refused
    assert html.count('<tr data-day="') == 2 and 'class="sparkline"' in html
    assert "7.50 CNY" in html
    html = await page(read, f"/console/keys/{world.key_ids['bravo']}")
    assert 'id="key-usage" data-requests="1"' in html and "0.0000057 USD" in html
