"""The console's billing pages (tokenhub.console.billing_pages) over plain HTTP on the seeded
world: each page for its role, each write (success, refused input that changes nothing, the
audit entry), the once-only code batch, the once-only payment, the reconciliation diff."""

from __future__ import annotations

import ast
import hashlib
import html as htmllib
import io
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from console_kit import DAY_MS, World, day_ms, event, flashes

from tokenhub.billing.ledger import period_of
from tokenhub.billing.service import Billing
from tokenhub.console import billing_pages
from tokenhub.console.core import load_catalogs
from tokenhub.db.database import open_database
from tokenhub.store import open_store

PAGES = (
    "/console/billing/prices",
    "/console/billing/fx",
    "/console/billing/plans",
    "/console/billing/codes",
    "/console/billing/statements",
    "/console/billing/invoices",
    "/console/billing/settlements",
    "/console/billing/reconcile",
    "/console/billing/check",
    "/console/billing/overruns",
)


def q(world: World, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(world.db) as conn:
        return list(conn.execute(sql, args))


def audit(world: World, action: str) -> list[tuple[Any, ...]]:
    return q(world, "SELECT actor, target, after FROM admin_audit WHERE action = ?", action)


async def follow(client: Any, resp: Any) -> str:
    assert resp.status == 303, (resp.status, await resp.text())
    return str(await (await client.get(resp.headers["Location"])).text())


async def settle(world: World, *events: Any, profile: dict[str, Any] | None = None) -> None:
    db = await open_database(world.db)
    try:
        b = Billing(db)
        if profile:
            await b.set_profile(**profile)
        store = open_store(world.db)
        try:
            store.insert_events(list(events))
        finally:
            store.close()
        res = await b.settle(list(events))
        assert not res.failed, res.failed
    finally:
        await db.close()


async def test_every_page_renders_for_read(console_client: Any) -> None:
    read = await console_client("read")
    for path in PAGES:
        resp = await read.get(path)
        assert resp.status == 200, path
        page = await resp.text()
        assert 'class="subnav"' in page
        assert 'method="post"' not in page.split("</header>", 1)[1], path  # no write forms
    tenant = await console_client("tenant", tenant="acme")
    for path in PAGES:
        assert (await tenant.get(path)).status == 403, path


async def test_set_price(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    before = q(world, "SELECT COUNT(*) FROM prices")[0][0]
    bad = {"model": "gpt-4o", "currency": "USD", "input": "abc", "output": "10"}
    resp = await post_form(admin, "/console/billing/prices", bad)
    assert [k for k, _ in flashes(await follow(admin, resp))] == ["error"]
    assert q(world, "SELECT COUNT(*) FROM prices")[0][0] == before
    ok = {"model": "gpt-4o", "currency": "USD", "input": "2.5", "output": "10",
          "cached_input": "1.25"}  # fmt: skip
    page = await follow(admin, await post_form(admin, "/console/billing/prices", ok))
    assert [k for k, _ in flashes(page)] == ["ok"]
    assert 'data-model="gpt-4o" data-tenant="" data-version="1" data-input="2500000000" ' in page
    got = q(world, "SELECT input_per_1m, cached_input_per_1m, output_per_1m FROM prices "
            "WHERE model = 'gpt-4o'")  # fmt: skip
    assert got == [(2_500_000_000, 1_250_000_000, 10_000_000_000)]
    [(actor, target, _)] = audit(world, "price.set")
    assert (actor, target) == ("console:root", "gpt-4o")
    # A tenant override, then roles below admin are refused.
    override = {**ok, "tenant": "acme", "input": "2"}
    await follow(admin, await post_form(admin, "/console/billing/prices", override))
    assert q(world, "SELECT tenant FROM prices WHERE model = 'gpt-4o' ORDER BY tenant") == [
        ("",),
        ("acme",),
    ]
    for role in ("billing", "read"):
        c = await console_client(role)
        assert (await post_form(c, "/console/billing/prices", ok)).status == 403
    assert q(world, "SELECT COUNT(*) FROM prices WHERE model = 'gpt-4o'")[0][0] == 2
    # No cache-write price so far (NULL: the input price, shown as such); one of its own next,
    # and a bad one changes nothing.
    assert q(world, "SELECT cache_write_per_1m FROM prices WHERE model = 'gpt-4o'") == [
        (None,),
        (None,),
    ]
    bad = {**ok, "cache_write": "-3"}
    resp = await post_form(admin, "/console/billing/prices", bad)
    assert [k for k, _ in flashes(await follow(admin, resp))] == ["error"]
    assert q(world, "SELECT COUNT(*) FROM prices WHERE model = 'gpt-4o'")[0][0] == 2
    page = await follow(
        admin, await post_form(admin, "/console/billing/prices", {**ok, "cache_write": "3.125"})
    )
    assert [k for k, _ in flashes(page)] == ["ok"]
    assert 'data-version="2" data-input="2500000000" ' in page
    assert 'data-output="10000000000" data-cache-write="3125000000"' in page
    assert 'data-version="1" data-input="2500000000" data-output="10000000000" ' in page
    assert 'data-cache-write="2500000000"' in page  # version 1: the input price
    assert q(world, "SELECT version, cache_write_per_1m FROM prices WHERE model = 'gpt-4o' "
             "AND tenant = '' ORDER BY version") == [(1, None), (2, 3_125_000_000)]  # fmt: skip


async def test_set_fx_and_create_plan(console_client: Any, post_form: Any, world: World) -> None:
    admin = await console_client("admin")
    n_fx = q(world, "SELECT COUNT(*) FROM fx_rates")[0][0]
    same = {"base": "usd", "quote": "USD", "rate": "1"}
    resp = await post_form(admin, "/console/billing/fx", same)
    assert [k for k, _ in flashes(await follow(admin, resp))] == ["error"]
    assert q(world, "SELECT COUNT(*) FROM fx_rates")[0][0] == n_fx
    page = await follow(
        admin,
        await post_form(
            admin, "/console/billing/fx",
            {"base": "usd", "quote": "cny", "rate": "7.1234", "effective": "2026-11-01"},
        ),
    )  # fmt: skip
    assert 'data-base="USD" data-quote="CNY" data-rate="7.1234"' in page
    assert len(audit(world, "fx.set")) == 1

    plan = {"name": "starter", "price": "9.90", "currency": "CNY", "kind": "package",
            "quantity": "10000000", "period": "month", "exhaustion": "overage",
            "overage": "0.20", "overage_currency": "USD"}  # fmt: skip
    page = await follow(admin, await post_form(admin, "/console/billing/plans", plan))
    assert 'data-name="starter" data-price="9900000000" data-quantity="10000000"' in page
    again = await follow(admin, await post_form(admin, "/console/billing/plans", plan))
    assert [k for k, _ in flashes(again)] == ["error"]
    bad = {**plan, "name": "broken", "quantity": "-5"}
    assert [k for k, _ in flashes(await follow(admin, await post_form(
        admin, "/console/billing/plans", bad)))] == ["error"]  # fmt: skip
    assert q(world, "SELECT name FROM plans ORDER BY name") == [("qwen-1k",), ("starter",)]
    [(actor, target, after)] = audit(world, "plan.create")
    assert (actor, target) == ("console:root", "starter") and '"price":9900000000' in after


async def test_code_batch_shown_once(console_client: Any, post_form: Any, world: World) -> None:
    cashier = await console_client("billing")
    n = q(world, "SELECT COUNT(*) FROM redemption_codes")[0][0]
    for bad in ({"count": "0", "amount": "5", "currency": "CNY"},
                {"count": "3", "amount": "-5", "currency": "CNY"},
                {"count": "3", "amount": "5", "currency": "XX"}):  # fmt: skip
        page = await follow(cashier, await post_form(cashier, "/console/billing/codes", bad))
        assert [k for k, _ in flashes(page)] == ["error"], bad
    assert q(world, "SELECT COUNT(*) FROM redemption_codes")[0][0] == n
    good = {"count": "3", "amount": "5", "currency": "CNY"}
    page = await follow(cashier, await post_form(cashier, "/console/billing/codes", good))
    codes = re.findall(r'<code class="secret new-code">([^<]+)</code>', page)
    assert len(codes) == 3
    stored = {r[0] for r in q(world, "SELECT sha256 FROM redemption_codes WHERE amount = ?",
                                5_000_000_000)}  # fmt: skip
    assert {hashlib.sha256(c.encode()).hexdigest() for c in codes} == stored
    link = htmllib.unescape(re.search(r'href="([^"]+)" id="batch-csv"', page).group(1))  # type: ignore[union-attr]
    # Shown once: the next visit lists the codes by prefix only.
    again = await (await cashier.get("/console/billing/codes")).text()
    assert not any(c in again for c in codes)
    assert again.count('class="code-row"') == n + 3
    # Another session (even an admin) cannot take the batch's CSV; its creator once.
    admin = await console_client("admin")
    assert (await admin.get(link)).status == 400
    resp = await cashier.get(link)
    assert resp.status == 200
    body = (await resp.read()).decode()
    assert body.splitlines() == ["code,amount,currency"] + [f"{c},5,CNY" for c in codes]
    assert (await cashier.get(link)).status == 400
    [(actor, _, after)] = audit(world, "codes.create")
    assert actor == "console:cashier" and not any(c in after for c in codes)
    read = await console_client("read")
    assert (await post_form(read, "/console/billing/codes", good)).status == 403


async def test_statement_and_close(console_client: Any, post_form: Any, world: World) -> None:
    period = period_of(day_ms(world.day0))
    cashier = await console_client("billing")
    page = await (await cashier.get(f"/console/billing/statements?tenant=acme&period={period}"))\
        .text()  # fmt: skip
    assert 'id="statement" data-tenant="acme"' in page and 'data-closed="false"' in page
    assert 'data-model="gpt-4o-mini" data-tokens="1500000"' in page
    assert (await cashier.get("/console/billing/statements?tenant=nobody")).status == 404
    assert (await cashier.get("/console/billing/statements?tenant=acme&period=11-2026")).status \
        == 400  # fmt: skip
    form = {"tenant": "acme", "period": period}
    page = await follow(cashier, await post_form(cashier, "/console/billing/statements/close",
                                                 form))  # fmt: skip
    assert 'data-closed="true"' in page and [k for k, _ in flashes(page)] == ["ok"]
    assert q(world, "SELECT tenant, period FROM closed_periods") == [("acme", period)]
    again = await follow(cashier, await post_form(cashier, "/console/billing/statements/close",
                                                  form))  # fmt: skip
    assert [k for k, _ in flashes(again)] == ["error"]
    assert len(audit(world, "statement.close")) == 1
    read = await console_client("read")
    assert (await post_form(read, "/console/billing/statements/close", form)).status == 403


async def test_invoice_and_payment_recorded_once(
    console_client: Any, post_form: Any, world: World
) -> None:
    # acme on credit: 1M input tokens at 2 CNY go to its receivable.
    ts = day_ms(world.day0) + 2 * DAY_MS
    ev = event("req_p1", ts, "acme", world.key_ids["acme"], "gpt-4o-mini",
               input_tokens=1_000_000)  # fmt: skip
    await settle(world, ev, profile={"tenant": "acme", "draw_order": ["postpaid"]})
    cashier = await console_client("billing")
    page = await (await cashier.get("/console/billing/invoices")).text()
    assert 'data-tenant="acme" data-currency="CNY" data-owed="2000000000"' in page
    period = period_of(ts)
    page = await follow(cashier, await post_form(
        cashier, "/console/billing/invoices", {"tenant": "acme", "period": period}))  # fmt: skip
    assert f'data-tenant="acme" data-period="{period}" data-due="2000000000"' in page
    dup = await follow(cashier, await post_form(
        cashier, "/console/billing/invoices", {"tenant": "acme", "period": period}))  # fmt: skip
    assert [k for k, _ in flashes(dup)] == ["error"]

    token = re.search(r'name="token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    payments = "SELECT COUNT(*) FROM ledger_txns WHERE kind = 'payment'"
    too_much = {"tenant": "acme", "amount": "3", "currency": "CNY", "token": token}
    page = await follow(cashier, await post_form(cashier, "/console/billing/payments", too_much))
    assert [k for k, _ in flashes(page)] == ["error"]
    assert q(world, payments)[0][0] == 0
    bad = {"tenant": "acme", "amount": "1.234", "currency": "CNY", "token": token}
    page = await follow(cashier, await post_form(cashier, "/console/billing/payments", bad))
    assert [k for k, _ in flashes(page)] == ["error"] and q(world, payments)[0][0] == 0
    pay = {"tenant": "acme", "amount": "1.50", "currency": "CNY", "token": token}
    first = await follow(cashier, await post_form(cashier, "/console/billing/payments", pay))
    assert [k for k, _ in flashes(first)] == ["ok"]
    assert 'data-tenant="acme" data-currency="CNY" data-owed="500000000"' in first
    # The same form sent again (a double click, a reload): recorded once.
    second = await follow(cashier, await post_form(cashier, "/console/billing/payments", pay))
    assert [k for k, _ in flashes(second)] == ["ok"]
    assert "already" in flashes(second)[0][1]
    assert q(world, payments)[0][0] == 1
    assert 'data-tenant="acme" data-currency="CNY" data-owed="500000000"' in second
    other = {**pay, "amount": "0.50"}
    page = await follow(cashier, await post_form(cashier, "/console/billing/payments", other))
    assert [k for k, _ in flashes(page)] == ["error"] and q(world, payments)[0][0] == 1
    assert len(audit(world, "payment.create")) == 1
    assert len(audit(world, "invoice.create")) == 1


async def test_settlement_check_overruns(console_client: Any, world: World) -> None:
    read = await console_client("read")
    period = period_of(day_ms(world.day0))
    page = await (await read.get(f"/console/billing/settlements?provider=mock-a&period={period}"))\
        .text()  # fmt: skip
    assert 'class="settlement-row" data-model="gpt-4o-mini"' in page
    page = await (await read.get("/console/billing/check")).text()
    assert 'id="check-result" data-ok="true"' in page
    page = await (await read.get("/console/billing/overruns")).text()
    assert 'class="overrun-row"' not in page
    # bravo pays from its wallet only: 20M tokens at 0.30 USD = 6 USD against the 5 USD less
    # the seeded 0.0000057 USD in the wallet.
    ev = event("req_o1", day_ms(world.day0) + 2 * DAY_MS, "bravo", world.key_ids["bravo"],
               "gpt-4o-mini", input_tokens=20_000_000)  # fmt: skip
    await settle(world, ev, profile={"tenant": "bravo", "draw_order": ["wallet"]})
    page = await (await read.get("/console/billing/overruns")).text()
    owed = q(world, "SELECT SUM(amount) FROM postings WHERE account = 't:bravo:overrun:USD'")
    assert owed[0][0] == 1_000_005_700
    assert 'data-tenant="bravo" data-currency="USD" data-nanos="1000005700"' in page


def upload(client: Any, body: bytes, **fields: str) -> Any:
    data = aiohttp.FormData()
    data.add_field("csrf", client.csrf)
    for k, v in fields.items():
        data.add_field(k, v)
    data.add_field("file", io.BytesIO(body), filename="provider.csv", content_type="text/csv")
    return client.post("/console/billing/reconcile", data=data, allow_redirects=False)


RECON = (
    "request_id,input_tokens,output_tokens\n"
    "req_a1,1000000,500000\n"  # matches
    "req_a2,100,51\n"  # output differs
    "req_zz,5,5\n"  # tokenhub has no such request
)  # req_b1 (tokens) is tokenhub's only: missing in the file


async def test_reconcile_upload(console_client: Any, post_form: Any, world: World) -> None:
    cashier = await console_client("billing")
    resp = await upload(cashier, RECON.encode(), provider="mock-a")
    assert resp.status == 200
    page = await resp.text()
    assert 'id="reconcile-report" data-ok="false" data-rows="3" data-matched="2"' in page
    assert re.findall(r'class="recon-differing" data-request-id="([^"]+)" data-field="([^"]+)" '
                      r'data-file="(\d+)" data-tokenhub="(\d+)"', page) == [
        ("req_a2", "output_tokens", "51", "50")
    ]  # fmt: skip
    assert re.findall(r'class="recon-missing" data-request-id="([^"]+)"', page) == ["req_zz"]
    assert re.findall(r'class="recon-extra" data-request-id="([^"]+)"', page) == ["req_b1"]
    # Refused: too big, no file, no header; nothing is compared.
    big = b"request_id,input_tokens,output_tokens\n" + b"req_x,1,1\n" * 60_000
    assert len(big) > 512 * 1024
    resp = await upload(cashier, big, _back="/console/billing/reconcile")
    page = await follow(cashier, resp)
    [(kind, text)] = flashes(page)
    assert kind == "error" and "512 KiB" in text
    # Past the admin listener's body limit (1 MiB) the request is refused before any handler.
    resp = await upload(cashier, b"x" * (1024 * 1024 + 1))
    assert resp.status == 413
    resp = await upload(cashier, b"id,count\n1,2\n", _back="/console/billing/reconcile")
    assert [k for k, _ in flashes(await follow(cashier, resp))] == ["error"]
    read = await console_client("read")
    resp = await upload(read, RECON.encode())
    assert resp.status == 403


async def test_post_without_csrf_changes_nothing(console_client: Any, world: World) -> None:
    admin = await console_client("admin")
    n = q(world, "SELECT COUNT(*) FROM prices")[0][0]
    resp = await admin.post(
        "/console/billing/prices",
        data={"model": "m", "currency": "USD", "input": "1", "output": "1"},
    )
    assert resp.status == 403
    assert q(world, "SELECT COUNT(*) FROM prices")[0][0] == n


def untranslated(module: str) -> list[str]:
    """Strings of tokenhub.console.<module>_pages and its templates with no zh-CN entry."""
    here = Path(billing_pages.__file__).parent
    texts: list[str] = []
    tree = ast.parse((here / f"{module}_pages.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "gettext":
            arg = node.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                texts.append(arg.value)
    for t in sorted((here / "templates").glob(f"{module}_*.html")):
        texts += re.findall(r'_\("((?:[^"\\]|\\.)*)"', t.read_text())
    assert len(texts) > 20, texts
    catalog = load_catalogs()["zh-CN"]
    return [t for t in texts if not catalog.get(t)]


def test_every_string_has_a_zh_cn_entry() -> None:
    assert untranslated("billing") == []
