"""Tenant self-service pages (tokenhub.console.tenant_pages) over plain HTTP (no JavaScript) on
the seeded console database (console_kit.seed): each page renders for the tenant with the
seeded numbers; keys (secret once, revoke, the policy); redeem once; the low-balance form; and
isolation: bravo's user tries every /console/my route and acme's ids and never sees acme."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from console_kit import DAY_MS, World, day_ms, flashes, parse

from tokenhub.billing import alerts
from tokenhub.billing.ledger import period_of
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.billing.tenant_service import MAX_KEYS_PER_TENANT
from tokenhub.console import tenant_pages
from tokenhub.db.database import open_database
from tokenhub.store import sql

GETS = [
    "/console/my/",
    "/console/my/usage",
    "/console/my/usage?group=model",
    "/console/my/usage?group=key",
    "/console/my/usage.csv",
    "/console/my/requests",
    "/console/my/keys",
    "/console/my/redeem",
    "/console/my/statements",
    "/console/my/limits",
]


async def _get(client: TestClient[Any, Any], path: str, status: int = 200) -> str:
    r = await client.get(path, allow_redirects=False)
    text = await r.text()
    assert r.status == status, (path, r.status, text[:500])
    return text


async def _db_read(world: World, fn: Any) -> Any:
    db = await open_database(f"sqlite:///{world.db}")
    try:
        return await db.read(fn)
    finally:
        await db.close()


def _rows(html: str, cls: str) -> list[dict[str, str | None]]:
    return [a for tag, a in parse(html).tags if (a.get("class") or "").split()[:1] == [cls]]


async def test_every_page_renders_for_the_tenant(console_client: Any) -> None:
    acme = await console_client("tenant", tenant="acme")
    for path in GETS:
        html = await _get(acme, path)
        if not path.endswith(".csv"):
            assert 'href="/console/my/keys"' in html  # the tenant's menu
            assert "/console/tenants" not in html  # never the operators'


async def test_balance_card(console_client: Any, world: World) -> None:
    acme = await console_client("tenant", tenant="acme")
    p = parse(await _get(acme, "/console/my/"))
    # 100 topped up - 10 for the package - 6 for 1M in + 500k out of gpt-4o-mini at 2/8.
    assert p.ids["bal-wallet"]["data-amount"] == "84.00"
    assert p.ids["bal-credit"]["data-available"] == "50.00"
    assert p.ids["bal-spendable"]["data-amount"] == "134.00"
    assert p.ids["balance"]["data-currency"] == "CNY"
    [pkg] = _rows(await _get(acme, "/console/my/"), "package")
    assert (pkg["data-lot"], pkg["data-left"], pkg["data-total"]) == (world.lot_id, "850", "1000")
    assert p.ids["alert"]["data-set"] == "false"


async def test_usage_equals_the_seeded_usage(console_client: Any, world: World) -> None:
    acme = await console_client("tenant", tenant="acme")
    days = [
        (
            world.day0.isoformat(),
            {"requests": "1", "ok": "1", "in": "1000000", "out": "500000",
             "cost": "CNY:6000000000"},
        ),
        (
            (world.day0.fromordinal(world.day0.toordinal() + 1)).isoformat(),
            {"requests": "2", "ok": "1", "in": "100", "cached": "20", "out": "50",
             "cost": "CNY:1500000000"},
        ),
    ]  # fmt: skip
    html = await _get(acme, "/console/my/usage?range=30d")
    rows = _rows(html, "usage-row")
    assert [r["data-group"] for r in rows] == [d for d, _ in days]
    for r, (_, want) in zip(rows, days, strict=True):
        for k, v in want.items():
            assert r[f"data-{k}"] == v, (k, r)
    total = parse(html).ids["usage-total"]
    assert (total["data-requests"], total["data-cost"]) == ("3", "CNY:7500000000")
    assert "<svg" in html and "<title>" in html  # the chart, with tooltips
    # By model, and by key (its prefix shown, the id in data-group).
    by_model = _rows(await _get(acme, "/console/my/usage?range=30d&group=model"), "usage-row")
    assert [(r["data-group"], r["data-requests"]) for r in by_model] == [
        ("gpt-4o-mini", "1"),
        ("qwen-plus", "2"),
    ]
    by_key = _rows(await _get(acme, "/console/my/usage?range=30d&group=key"), "usage-row")
    assert [(r["data-group"], r["data-requests"]) for r in by_key] == [(world.key_ids["acme"], "3")]
    # A custom range with only day0: one row.
    one = f"/console/my/usage?range=custom&since={world.day0}&until={_next(world)}"
    assert [r["data-group"] for r in _rows(await _get(acme, one), "usage-row")] == [days[0][0]]
    # The CSV holds the table's numbers, exact decimals.
    r = await acme.get("/console/my/usage.csv?range=30d&group=model")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    got = list(csv.reader(io.StringIO(await r.text())))
    assert got == [
        ["model", "requests", "ok", "input_tokens", "cached_input_tokens", "output_tokens",
         "cost_CNY"],
        ["gpt-4o-mini", "1", "1", "1000000", "0", "500000", "6.00"],
        ["qwen-plus", "2", "1", "100", "20", "50", "1.50"],
    ]  # fmt: skip
    bad = await _get(acme, "/console/my/usage?range=custom&since=2026-13-01", status=400)
    assert "2026-11-01" in bad
    await _get(acme, "/console/my/usage?group=tenant", status=400)


def _next(world: World) -> str:
    return world.day0.fromordinal(world.day0.toordinal() + 1).isoformat()


async def test_request_log_keyset_paged(
    console_client: Any, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = await console_client("tenant", tenant="acme")
    html = await _get(acme, "/console/my/requests")
    rows = _rows(html, "request-row")
    assert [r["data-request-id"] for r in rows] == ["req_a3", "req_a2", "req_a1"]
    assert "req_b1" not in html
    assert rows[2]["data-in"] == "1000000" and rows[0]["data-status"] == "429"
    assert "6.00 CNY" in html  # req_a1's cost
    monkeypatch.setattr(tenant_pages, "REQUESTS_PAGE", 2)
    first = await _get(acme, "/console/my/requests")
    assert [r["data-request-id"] for r in _rows(first, "request-row")] == ["req_a3", "req_a2"]
    nxt = parse(first).tags
    link = next(a["href"] for t, a in nxt if t == "a" and "data-next" in a)
    assert link is not None
    second = await _get(acme, link if link.startswith("/") else "/console/my/requests" + link)
    assert [r["data-request-id"] for r in _rows(second, "request-row")] == ["req_a1"]
    assert "data-next" not in second
    await _get(acme, "/console/my/requests?cursor=not-a-cursor", status=400)
    detail = parse(await _get(acme, "/console/my/requests/req_a1"))
    assert detail.ids["request"]["data-request-id"] == "req_a1"


async def test_keys_secret_once_and_revoke(
    console_client: Any, post_form: Any, world: World
) -> None:
    acme = await console_client("tenant", tenant="acme")
    r = await post_form(acme, "/console/my/keys/new", {})
    assert r.status == 303 and r.headers["Location"] == "/console/my/keys"
    page = await _get(acme, "/console/my/keys")
    p = parse(page)
    new_id = str(p.ids["new-key"]["data-key-id"])
    secret = re.search(r'id="new-key-secret">([^<]+)<', page)
    assert secret is not None
    key = await _db_read(world, lambda tx: sql.key_in(tx, new_id))
    assert key.tenant == "acme" and secret.group(1).startswith(key.prefix)
    # The store keeps only the secret's SHA-256: the shown secret is the key's.
    stored = await _db_read(
        world, lambda tx: tx.fetchval("SELECT sha256 FROM api_keys WHERE id = $1", new_id)
    )
    assert stored == hashlib.sha256(secret.group(1).encode()).hexdigest()
    again = await _get(acme, "/console/my/keys")
    assert secret.group(1) not in again and "new-key-secret" not in again  # shown once
    assert {r["data-key-id"] for r in _rows(again, "key-row")} == {world.key_ids["acme"], new_id}
    r = await post_form(acme, f"/console/my/keys/{new_id}/revoke", {})
    assert r.status == 303
    assert flashes(await _get(acme, "/console/my/keys"))[0][0] == "ok"
    assert (await _db_read(world, lambda tx: sql.key_in(tx, new_id))).revoked_ms is not None


async def test_key_policy(console_client: Any, post_form: Any, world: World) -> None:
    acme = await console_client("tenant", tenant="acme")
    for _ in range(MAX_KEYS_PER_TENANT - 1):
        assert (await post_form(acme, "/console/my/keys/new", {})).status == 303
    refused = await post_form(acme, "/console/my/keys/new", {}, follow=True)
    kind, text = flashes(await refused.text())[-1]
    assert kind == "error" and "revoke one first" in text
    keys = await _db_read(world, lambda tx: sql.keys_in(tx, "acme"))
    assert sum(k.active for k in keys) == MAX_KEYS_PER_TENANT


async def _wallet(client: TestClient[Any, Any]) -> str:
    return str(parse(await _get(client, "/console/my/")).ids["bal-wallet"]["data-amount"])


def _form_token(html: str) -> str:
    m = re.search(r'name="form_token" value="([^"]+)"', html)
    assert m is not None
    return m.group(1)


async def test_redeem_once(console_client: Any, post_form: Any, world: World) -> None:
    acme = await console_client("tenant", tenant="acme")
    code = world.codes[0]
    token = _form_token(await _get(acme, "/console/my/redeem"))
    r = await post_form(acme, "/console/my/redeem", {"code": code, "form_token": token})
    assert r.status == 303
    [(kind, text)] = flashes(await _get(acme, r.headers["Location"]))
    assert kind == "ok" and "87.00" in text
    assert await _wallet(acme) == "87.00"
    # The same form again (a reload, a double click): nothing more.
    r = await post_form(acme, "/console/my/redeem", {"code": code, "form_token": token})
    [(kind, text)] = flashes(await _get(acme, r.headers["Location"]))
    assert kind == "ok" and "once" in text
    assert await _wallet(acme) == "87.00"
    # A new form with the used code: a clear error.
    token2 = _form_token(await _get(acme, "/console/my/redeem"))
    assert token2 != token
    r = await post_form(
        acme, "/console/my/redeem", {"code": code, "form_token": token2}, follow=True
    )
    [(kind, text)] = flashes(await r.text())
    assert kind == "error" and "already been used" in text
    for bad in ({"code": "nope", "form_token": token2}, {"code": "", "form_token": token2},
                {"code": world.codes[1], "form_token": ""}):  # fmt: skip
        r = await post_form(acme, "/console/my/redeem", bad, follow=True)
        assert [k for k, _ in flashes(await r.text())] == ["error"], bad
    assert await _wallet(acme) == "87.00"
    # Without the CSRF token: refused before anything runs.
    r = await acme.post("/console/my/redeem", data={"code": world.codes[1], "form_token": "x"})
    assert r.status == 403
    assert await _wallet(acme) == "87.00"


async def test_threshold_form(console_client: Any, post_form: Any, world: World) -> None:
    acme = await console_client("tenant", tenant="acme")
    url = "https://hooks.example.com/tokenhub"
    r = await post_form(acme, "/console/my/alert", {"amount": "200", "webhook_url": url})
    assert r.status == 303
    page = await _get(acme, "/console/my/")
    p = parse(page)
    assert p.ids["alert"]["data-set"] == "true" and p.ids["alert"]["data-armed"] == "true"
    assert p.ids["alert"]["data-threshold"] == str(200 * 10**9)
    m = re.search(r'id="alert-secret">([^<]+)<', page)
    assert m is not None and m.group(1).startswith("whsec_")
    secret = m.group(1)
    assert secret not in await _get(acme, "/console/my/")  # shown once
    # Refused values: an error, nothing changes.
    for bad in (
        {"amount": "-1", "webhook_url": url},
        {"amount": "abc", "webhook_url": url},
        {"amount": "5", "webhook_url": "http://hooks.example.com/x"},
        {"amount": "5", "webhook_url": "https://10.0.0.1/x"},
        {"amount": "5", "webhook_url": ""},
    ):
        r = await post_form(acme, "/console/my/alert", bad, follow=True)
        assert [k for k, _ in flashes(await r.text())] == ["error"], bad
    a = await _db_read(world, lambda tx: alerts.get_alert(tx, "acme"))
    assert a is not None and a.threshold == 200 * 10**9 and a.webhook_url == url

    # Spendable 134 < 200: the next settlement pass queues one webhook, shown on the page.
    db = await open_database(f"sqlite:///{world.db}")
    try:
        assert (await settle_pending(Billing(db))).alerts_fired == 1
    finally:
        await db.close()
    page = await _get(acme, "/console/my/")
    [d] = _rows(page, "delivery")
    assert d["data-state"] == "pending"
    assert parse(page).ids["alert"]["data-armed"] == "false"
    # Rotating shows a new secret once; removing clears it.
    r = await post_form(
        acme, "/console/my/alert", {"amount": "1", "webhook_url": url, "rotate": "1"}
    )
    m2 = re.search(r'id="alert-secret">([^<]+)<', await _get(acme, "/console/my/"))
    assert m2 is not None and m2.group(1) != secret
    r = await post_form(acme, "/console/my/alert/delete", {})
    assert r.status == 303
    assert parse(await _get(acme, "/console/my/")).ids["alert"]["data-set"] == "false"


async def test_statements(console_client: Any, world: World) -> None:
    acme = await console_client("tenant", tenant="acme")
    period = period_of(day_ms(world.day0) + 3_600_000)
    html = await _get(acme, f"/console/my/statements?period={period}")
    assert parse(html).ids["statement"]["data-period"] == period
    models = {r["data-model"]: r["data-tokens"] for r in _rows(html, "statement-usage")}
    assert models["gpt-4o-mini"] == "1500000"
    accounts = [r["data-account"] for r in _rows(html, "closing")]
    assert accounts and all(str(a).startswith("t:acme:") for a in accounts)
    await _get(acme, "/console/my/statements")  # this month
    await _get(acme, "/console/my/statements?period=2026-13", status=400)
    await _get(acme, "/console/my/statements?period=last", status=400)


async def test_limits(console_client: Any, world: World) -> None:
    db = await open_database(f"sqlite:///{world.db}")
    try:
        await db.transaction(
            lambda tx: sql.set_limits_in(tx, "tenant", "acme", tokens_per_day=9000)
        )
        await db.transaction(lambda tx: sql.set_limits_in(tx, "key", world.key_ids["acme"], rpm=60))
    finally:
        await db.close()
    acme = await console_client("tenant", tenant="acme")
    p = parse(await _get(acme, "/console/my/limits"))
    assert p.ids["tokens-today"]["data-budget"] == "9000"
    assert p.ids["tokens-today"]["data-used"] == "0"  # the seeded usage is days old
    assert p.ids["tokens-today"]["data-left"] == "9000"
    html = await _get(acme, "/console/my/limits")
    lim = {r["data-limit"]: r["data-value"] for r in _rows(html, "limit")}
    assert lim == {"rpm": "", "tpm": "", "max_concurrency": "", "tokens_per_day": "9000"}
    [k] = _rows(html, "key-limit")
    assert k["data-key-id"] == world.key_ids["acme"] and ">60<" in html


# -- isolation --------------------------------------------------------------------------------


def _acme_marks(world: World) -> list[str]:
    return [
        "acme",
        world.key_ids["acme"],
        world.secrets["acme"][:12],
        world.lot_id,
        "req_a1",
        "req_a2",
        "req_a3",
        "qwen-1k",
    ]


async def test_a_tenant_never_sees_another_tenants_anything(
    console_client: Any, post_form: Any, world: World
) -> None:
    acme_key = world.key_ids["acme"]
    acme_prefix = (await _db_read(world, lambda tx: sql.key_in(tx, acme_key))).prefix
    bravo = await console_client("tenant", tenant="bravo")
    marks = [*_acme_marks(world), acme_prefix]
    cursor = base64.urlsafe_b64encode(
        msgspec.json.encode([day_ms(world.day0) + 10 * DAY_MS, "req_zzz"])
    ).decode()
    tries = [
        *GETS,
        *(f"{p}{'&' if '?' in p else '?'}tenant=acme" for p in GETS),
        f"/console/my/requests?cursor={cursor}",
        f"/console/my/statements?period={period_of(day_ms(world.day0))}&tenant=acme",
        f"/console/my/usage.csv?group=key&tenant=acme&key={acme_key}",
    ]
    seen: list[str] = []
    for path in tries:
        html = await _get(bravo, path)
        seen.append(html)
    # Another tenant's ids in the URL: 404, as ids that do not exist.
    for rid in ("req_a1", "req_a3", "req_missing"):
        seen.append(await _get(bravo, f"/console/my/requests/{rid}", status=404))
    # Another tenant's key: the revoke is refused (as a key that does not exist), and acme's
    # key stays active.
    r = await post_form(bravo, f"/console/my/keys/{acme_key}/revoke", {}, follow=True)
    text = await r.text()
    [(kind, msg)] = flashes(text)
    r = await post_form(bravo, "/console/my/keys/key_doesnotexist/revoke", {}, follow=True)
    [(_, missing)] = flashes(await r.text())
    assert kind == "error" and msg == missing.replace("key_doesnotexist", acme_key)
    # (the message names the id bravo sent, no more)
    seen.append(re.sub(r'data-flash="error"[^>]*>.*?</div>', "", text, flags=re.S))
    assert (await _db_read(world, lambda tx: sql.key_in(tx, acme_key))).revoked_ms is None
    # bravo's own pages show bravo's things.
    assert "req_b1" in await _get(bravo, "/console/my/requests")
    for page in seen:
        # (the language form echoes the URL asked for, ?tenant=acme included: not data)
        html = re.sub(r'name="_back" value="[^"]*"', "", page)
        for mark in marks:
            i = html.find(mark)
            assert i < 0, (mark, html[max(0, i - 300) : i + 100])
    # acme's alert is not bravo's to see or clear.
    acme = await console_client("tenant", tenant="acme")
    await post_form(
        acme, "/console/my/alert", {"amount": "5", "webhook_url": "https://h.example.com/a"}
    )
    r = await post_form(bravo, "/console/my/alert/delete", {}, follow=True)
    assert [k for k, _ in flashes(await r.text())] == ["error"]
    assert parse(await _get(bravo, "/console/my/")).ids["alert"]["data-set"] == "false"
    assert await _db_read(world, lambda tx: alerts.get_alert(tx, "acme")) is not None


async def test_roles(console_client: Any) -> None:
    """Operators cannot open the tenant pages; a tenant cannot open operators' pages; a
    visitor is sent to sign in."""
    admin = await console_client("admin")
    for path in ("/console/my/", "/console/my/keys"):
        await _get(admin, path, status=403)
    acme = await console_client("tenant", tenant="acme")
    await _get(acme, "/console/usage", status=403)
    anon = await console_client(None)
    r = await anon.get("/console/my/usage", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/console/signin")


# -- zh-CN --------------------------------------------------------------------------------------

HERE = Path(tenant_pages.__file__).parent
_LITERAL = re.compile(r'''_\(\s*"((?:[^"\\]|\\.)*)"''')
_GETTEXT = re.compile(r'''gettext\(\s*request,\s*"((?:[^"\\]|\\.)*)"''', re.S)
_DICT_LABELS = re.compile(r"""_\(\{([^}]*)\}\[""")


def _visible_strings() -> set[str]:
    found: set[str] = set()
    for path in sorted((HERE / "templates").glob("tenant_*.html")):
        text = path.read_text("utf-8")
        found |= set(_LITERAL.findall(text))
        for inner in _DICT_LABELS.findall(text):
            found |= set(re.findall(r':\s*"([^"]+)"', inner))
    src = (HERE / "tenant_pages.py").read_text("utf-8")
    found |= {m.replace('" "', "") for m in _GETTEXT.findall(src)}
    return found


def test_every_visible_string_has_a_zh_cn_entry() -> None:
    catalog = json.loads((HERE / "locale" / "zh-CN" / "tenant.json").read_text("utf-8"))
    strings = _visible_strings()
    assert len(strings) > 60
    missing = sorted(s for s in strings if s not in catalog)
    assert missing == []
    for en, zh in catalog.items():  # placeholders kept
        assert set(re.findall(r"\{\w+\}", en)) == set(re.findall(r"\{\w+\}", zh)), en


async def test_pages_in_chinese(console_client: Any, post_form: Any) -> None:
    acme = await console_client("tenant", tenant="acme")
    r = await post_form(acme, "/console/lang", {"lang": "zh-CN", "_back": "/console/my/"})
    assert r.status == 303
    html = await _get(acme, "/console/my/")
    assert "钱包" in html and "低余额提醒" in html
    assert "余额" in await _get(acme, "/console/my/usage")
