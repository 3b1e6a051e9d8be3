"""Issue 14's browser scenario against a real `tokenhub serve --demo` (tests/browser/conftest.py):
an operator signs in with the login the demo printed, creates a tenant and a key (its secret
shown once, then on no page), tops up (a replayed form adds nothing), creates a code the
tenant's own user redeems, a request goes through /v1/chat/completions with the official
`openai` client and the new key, shows in the usage explorer with its tokens and cost, and the
console's CSV export equals `tokenhub events export`. The demo tenant's user sees its balance
and usage, creates and revokes a key, and a low-balance threshold fires a signed webhook to a
receiver here when usage drives the balance below it. zh-CN renders Chinese; the main pages
work with JavaScript disabled. Every browser request stays on 127.0.0.1 (conftest)."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import json
import re
import secrets
import threading
from collections.abc import Iterator
from decimal import ROUND_FLOOR, Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from browser_kit import (
    CJK,
    NANOS_IN,
    NANOS_OUT,
    SECRET,
    SETTLE_WAIT_S,
    Demo,
    chat,
    cost_nanos,
    events,
    flash,
    http_json,
    money,
    sign_in,
    submit,
    wait_until,
)

KEY_SYNC_WAIT_S = 10.0


def works(demo: Demo, key: str) -> None:
    """Waits until the gateway knows a new key (it polls the keys' change marker every
    [server] key_refresh_s, 0.5 s)."""
    wait_until(
        "the new key to work",
        lambda: http_json(f"{demo.api}/tokenhub/balance", token=key)[0] == 200,
        KEY_SYNC_WAIT_S,
    )


# -- the operator -------------------------------------------------------------------------------


def test_operator_journey(demo: Demo, new_context: Any) -> None:
    ctx = new_context()
    page = ctx.new_page()
    sign_in(page, demo, *demo.operator)  # the login `serve --demo` printed
    assert page.url == demo.console
    assert page.locator("h1").count() >= 1

    # A tenant, created through its form; we land on its page.
    tenant = f"acme-{secrets.token_hex(3)}"
    page.goto(demo.url("/console/tenants/new"))
    submit(page, "/console/tenants/new", {"name": tenant, "currency": "USD"})
    assert re.search(r"/console/tenants/[^/]+$", page.url), page.url
    tenant_url = page.url
    tenant_path = tenant_url[len(demo.base) :]
    assert tenant in page.content()

    # A key: its secret on the page right after creation, and never again.
    page.goto(demo.url("/console/keys"))
    submit(page, "/console/keys", {"tenant": tenant})
    shown = SECRET.findall(page.content())
    assert len(set(shown)) == 1, f"the new key's secret once on {page.url}: {shown}"
    key = shown[0]
    key_url = page.url
    page.reload()
    assert key not in page.content() and key[:12] not in page.content()
    for url in (key_url, demo.url("/console/keys"), tenant_url):
        page.goto(url)
        html = page.content()
        assert key not in html and key[:12] not in html, url
        assert key[:8] in html, url  # its prefix tells it apart
    for path in OPERATOR_PAGES:
        page.goto(demo.url(path))
        assert key[:12] not in page.content(), path

    # Top up 5 USD; the same form sent again (its one-time token with it) adds nothing.
    page.goto(tenant_url)
    action = f"{tenant_path}/topup"
    sent = submit(page, action, {"amount": "5.00", "currency": "USD"})
    assert page.locator("[data-flash=error]").count() == 0, flash(page)
    works(demo, key)
    status, bal = http_json(f"{demo.api}/tokenhub/balance", token=key)
    assert status == 200 and money(bal["wallet"]) == Decimal("5.00"), bal
    replay = ctx.request.post(demo.url(action), form=sent, max_redirects=0)
    assert replay.status in (200, 303, 409), replay.status
    status, bal = http_json(f"{demo.api}/tokenhub/balance", token=key)
    assert money(bal["wallet"]) == Decimal("5.00"), "a replayed top-up moved money"
    page.goto(tenant_url)
    assert "5.00 USD" in page.inner_text("main")

    # A redemption code worth 2 USD, redeemed by the tenant's own console user.
    page.goto(demo.url("/console/billing/codes"))
    submit(page, "/console/billing/codes", {"count": "1", "amount": "2.00", "currency": "USD"})
    codes = page.locator("code.new-code").all_inner_texts()
    assert len(codes) == 1, codes
    code = codes[0].strip()
    page.reload()
    assert code not in page.content()  # shown once
    user, password = f"{tenant}-user", secrets.token_urlsafe(12)
    page.goto(tenant_url)
    submit(page, f"{tenant_path}/users", {"name": user, "password": password})
    tenant_page = new_context().new_page()
    sign_in(tenant_page, demo, user, password)
    assert "/console/my/" in tenant_page.url
    tenant_page.goto(demo.url("/console/my/redeem"))
    sent = submit(tenant_page, "/console/my/redeem", {"code": code})
    status, bal = http_json(f"{demo.api}/tokenhub/balance", token=key)
    assert money(bal["wallet"]) == Decimal("7.00"), bal
    again = tenant_page.context.request.post(
        demo.url("/console/my/redeem"), form=sent, max_redirects=0
    )
    assert again.status in (200, 303, 409), again.status
    status, bal = http_json(f"{demo.api}/tokenhub/balance", token=key)
    assert money(bal["wallet"]) == Decimal("7.00"), "a replayed redemption moved money"

    # A request through the gateway with the official client and the new key.
    reply = chat(demo, key, "Hello from the browser test")
    assert reply.usage is not None and reply.usage.total_tokens > 0
    evs = wait_until("the request's usage event", lambda: events(demo, tenant), SETTLE_WAIT_S)
    assert len(evs) == 1
    ev = evs[0]
    assert ev["input_tokens"] == reply.usage.prompt_tokens
    assert ev["output_tokens"] == reply.usage.completion_tokens
    want_cost = cost_nanos(ev)
    assert want_cost > 0

    # The usage explorer, filtered to the tenant as a person would, within the settle interval.
    def explorer_total() -> dict[str, str] | None:
        page.goto(demo.url("/console/usage"))
        submit(
            page,
            "/console/usage",
            {"range": "today", "tenant": tenant, "period": "day", "group": "model"},
            method="get",
        )
        total = page.locator("#usage-total")
        if not total.count() or total.get_attribute("data-requests") != "1":
            return None
        return {
            k: total.get_attribute(f"data-{k}") or "" for k in ("requests", "in", "out", "cost")
        }

    total = wait_until("the request in the usage explorer", explorer_total, SETTLE_WAIT_S, 1.0)
    assert int(total["in"]) == ev["input_tokens"]
    assert int(total["out"]) == ev["output_tokens"]
    assert total["cost"] == f"USD:{want_cost}", total
    row = page.locator("tr.usage-row[data-group='gpt-4o-mini']")
    assert row.count() == 1 and row.get_attribute("data-requests") == "1"
    status, bal = http_json(f"{demo.api}/tokenhub/balance", token=key)
    assert money(bal["wallet"]) == Decimal("7.00") - Decimal(want_cost).scaleb(-9)

    # Its CSV export (the link on the explorer) equals `tokenhub events export --format csv`
    # for the same window, less the other tenants' rows (the CLI has no tenant filter).
    href = page.locator("#export-csv").get_attribute("href")
    assert href and f"tenant={tenant}" in href
    got = ctx.request.get(demo.url(href))
    assert got.status == 200
    window = parse_qs(urlsplit(href).query)
    bounds = [x for k in ("since", "until") for x in (f"--{k}", window[k][0]) if k in window]
    lines = demo.cli_bytes("events", "export", "--format", "csv", *bounds).splitlines(True)
    col = next(csv.reader([lines[0].decode()])).index("tenant")
    mine = [ln for ln in lines[1:] if next(csv.reader([ln.decode()]))[col] == tenant]
    assert len(mine) == 1
    assert got.body() == b"".join([lines[0], *mine])  # byte for byte

    # Sign out: the session is gone.
    with page.expect_navigation():
        page.locator("#signout-form button").click()
    page.goto(tenant_url)
    assert "/console/signin" in page.url


# -- the tenant ---------------------------------------------------------------------------------


class Receiver:
    """An aiohttp webhook receiver on 127.0.0.1, in a thread with its own event loop."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _hook(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/hook", self._hook)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()
        if self.runner is not None:
            self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self) -> Receiver:
        self.thread.start()
        assert self.ready.wait(10), "the webhook receiver did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_tenant_journey(demo: Demo, new_context: Any, receiver: Receiver) -> None:
    page = new_context().new_page()
    sign_in(page, demo, *demo.tenant)  # the demo tenant's login, as printed
    assert page.url == demo.url("/console/my/")
    status, bal = http_json(f"{demo.api}/tokenhub/balance", token=demo.key)
    assert status == 200
    card = page.locator("#bal-wallet")
    assert Decimal(card.get_attribute("data-amount") or "") == money(bal["wallet"])
    shown = re.search(r"([0-9][0-9,]*\.[0-9]+) USD", card.inner_text())
    assert shown and Decimal(shown.group(1).replace(",", "")) == money(bal["wallet"])

    # Usage: a request with the demo key shows on the usage page and in the request log.
    def requests_shown() -> int:
        page.goto(demo.url("/console/my/usage"))
        total = page.locator("#usage-total")  # only once there is usage
        return int(total.get_attribute("data-requests") or 0) if total.count() else 0

    before = requests_shown()
    known = {e["request_id"] for e in events(demo, "demo")}
    reply = chat(demo, demo.key, "Hi from the tenant test")
    assert reply.usage is not None
    new = wait_until(
        "the request's event",
        lambda: [e for e in events(demo, "demo") if e["request_id"] not in known],
        SETTLE_WAIT_S,
    )
    assert len(new) == 1 and new[0]["input_tokens"] == reply.usage.prompt_tokens

    wait_until(
        "the request on the tenant's usage page",
        lambda: requests_shown() == before + 1,
        SETTLE_WAIT_S,
        1.0,
    )
    page.goto(demo.url("/console/my/requests"))
    row = page.locator(f"tr.request-row[data-request-id='{new[0]['request_id']}']")
    assert row.count() == 1
    assert row.get_attribute("data-in") == str(new[0]["input_tokens"])
    assert "Hi from the tenant test" not in page.content()  # metadata only, no prompts

    # Its own key: created (secret once), works, revoked, refused.
    page.goto(demo.url("/console/my/keys"))
    submit(page, "/console/my/keys/new")
    key = page.locator("#new-key-secret").inner_text().strip()
    key_id = page.locator("#new-key").get_attribute("data-key-id")
    assert SECRET.fullmatch(key) and SECRET.findall(page.content()) == [key]
    works(demo, key)
    page.reload()
    assert key not in page.content() and page.locator("#new-key").count() == 0
    submit(page, f"/console/my/keys/{key_id}/revoke")
    assert page.locator(f"tr.key-row[data-key-id='{key_id}']").get_attribute("data-active") == (
        "false"
    )
    wait_until(
        "the revoked key to be refused",
        lambda: http_json(f"{demo.api}/tokenhub/balance", token=key)[0] == 401,
        KEY_SYNC_WAIT_S,
    )

    # A low-balance threshold at the spendable balance rounded down to the cent (thresholds
    # are in cents), webhook to our receiver; then one request big enough to cost more than
    # the distance drives the balance below it, and the webhook fires, signed with the secret
    # the page showed once.
    status, bal = http_json(f"{demo.api}/tokenhub/balance", token=demo.key)
    spendable = money(bal["spendable"])
    threshold = spendable.quantize(Decimal("0.01"), rounding=ROUND_FLOOR)
    gap = int((spendable - threshold).scaleb(9))  # nanos, < 0.01 USD
    # gpt-4o-mini: each " hello" is a token at 150 nanos; the mock answers 32 tokens
    words = max(0, (gap - 32 * NANOS_OUT) // NANOS_IN) + 200
    page.goto(demo.url("/console/my/"))
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    submit(page, "/console/my/alert", {"amount": f"{threshold}", "webhook_url": hook})
    assert page.locator("[data-flash=error]").count() == 0, flash(page)
    assert page.locator("#alert").get_attribute("data-armed") == "true"
    signing = page.locator("#alert-secret").inner_text().strip()
    assert signing
    page.reload()
    assert signing not in page.content()  # shown once
    assert receiver.got == []
    big = chat(demo, demo.key, "hello" + " hello" * words)
    assert big.usage is not None and big.usage.prompt_tokens * NANOS_IN > gap
    wait_until("the low-balance webhook", lambda: receiver.got, SETTLE_WAIT_S)
    headers, body = receiver.got[0]
    want = hmac.new(signing.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Tokenhub-Signature"] == f"sha256={want}"
    event = json.loads(body)
    assert event["tenant"] == "demo"
    page.goto(demo.url("/console/my/"))
    assert page.locator("#alert").get_attribute("data-armed") == "false"
    # Taken back, so that the session's other tests start from no alert.
    submit(page, "/console/my/alert/delete")
    assert page.locator("#alert").get_attribute("data-set") == "false"


# -- languages and JavaScript -------------------------------------------------------------------


def test_zh_cn(demo: Demo, new_context: Any) -> None:
    page = new_context().new_page()
    sign_in(page, demo, *demo.operator)
    try:
        with page.expect_navigation():
            page.locator("#lang-form button[value='zh-CN']").click()
        assert page.locator("html").get_attribute("lang") == "zh-CN"
        assert CJK.search(page.inner_text("nav")), page.inner_text("nav")
        assert CJK.search(page.inner_text("h1"))
        page.goto(demo.url("/console/usage"))
        assert CJK.search(page.inner_text("main"))
    finally:
        with page.expect_navigation():
            page.locator("#lang-form button[value='en']").click()
    assert page.locator("html").get_attribute("lang") == "en"


OPERATOR_PAGES = [
    "/console/",
    "/console/usage",
    "/console/usage/events",
    "/console/tenants",
    "/console/keys",
    "/console/billing/prices",
    "/console/billing/codes",
    "/console/billing/statements",
    "/console/routing",
    "/console/audit",
]
TENANT_PAGES = [
    "/console/my/",
    "/console/my/usage",
    "/console/my/requests",
    "/console/my/keys",
    "/console/my/redeem",
    "/console/my/statements",
    "/console/my/limits",
]


def test_main_pages_without_javascript(demo: Demo, new_context: Any) -> None:
    ctx = new_context(java_script_enabled=False)
    page = ctx.new_page()
    sign_in(page, demo, *demo.operator)
    for path in OPERATOR_PAGES:
        r = page.goto(demo.url(path))
        assert r is not None and r.status == 200, path
        assert page.locator("main h1").count() >= 1, path
    # A GET form (the explorer's filters) and a POST form (the language) work without JS.
    page.goto(demo.url("/console/usage"))
    submit(page, "/console/usage", {"group": "tenant"}, method="get")
    assert "group=tenant" in page.url
    assert page.locator("#usage-table").count() == 1
    with page.expect_navigation():
        page.locator("#signout-form button").click()
    assert "/console/signin" in page.url

    tenant = ctx.new_page()
    sign_in(tenant, demo, *demo.tenant)
    for path in TENANT_PAGES:
        r = tenant.goto(demo.url(path))
        assert r is not None and r.status == 200, path
        assert tenant.locator("main h1").count() >= 1, path
