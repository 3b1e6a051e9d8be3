"""What the console tests share (tests/console/conftest.py builds it): the seeded world, signed-in
clients and `post_form`. Imported as `from console_kit import ...` (not from conftest, which
another directory's conftest could shadow when the whole suite runs)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.console.passwords import hash_password
from tokenhub.db.database import open_database
from tokenhub.store import console as cstore
from tokenhub.store import open_store, sql
from tokenhub.usage import UsageEvent

DAY_MS = 86_400_000
PASSWORD = "correct horse battery"  # every seeded user's
FAST_N = 2**10  # scrypt cost for test users: fast, still the real code path

# name -> (role, tenant)
USERS: dict[str, tuple[str, str | None]] = {
    "root": ("admin", None),
    "cashier": ("billing", None),
    "viewer": ("read", None),
    "acme-user": ("tenant", "acme"),
    "bravo-user": ("tenant", "bravo"),
}
ROLE_USER = {"admin": "root", "billing": "cashier", "read": "viewer"}
TENANT_USER = {"acme": "acme-user", "bravo": "bravo-user"}


@dataclass
class World:
    """The seeded database: tenants acme (CNY, wallet 100, credit 50, a qwen-1k package) and
    bravo (USD, wallet 5), one key each, prices for gpt-4o-mini and qwen-plus, usage settled
    3 and 2 days ago (so the rollups have it), and the console users of USERS."""

    db: str  # SQLite path of this test's copy
    tenant_ids: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    lot_id: str = ""
    day0: dt.date = field(default_factory=lambda: dt.datetime.now(dt.UTC).date())
    codes: list[str] = field(default_factory=list)


def day_ms(d: dt.date) -> int:
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp() * 1000)


def event(rid: str, ts: int, tenant: str, key: str, model: str, **kw: Any) -> UsageEvent:
    return UsageEvent(
        request_id=rid, ts_ms=ts, tenant=tenant, key_id=key, endpoint="chat.completions",
        model=model, deployment=f"mock-a/{model}", provider="mock-a", upstream_model=model,
        **kw,
    )  # fmt: skip


async def seed(path: str) -> World:
    """Seeds a fresh database through the real service functions: a SQLite file at `path`,
    or the PostgreSQL database of a postgresql:// URL."""
    db = await open_database(path if "://" in path else f"sqlite:///{path}")
    w = World(db=path)
    w.day0 = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=3)
    try:

        async def base(tx: Any) -> None:
            for t in ("acme", "bravo"):
                ten = await sql.create_tenant_in(tx, t)
                w.tenant_ids[t] = ten.id
                secret = sql.new_key_secret()
                key = await sql.create_key_in(tx, t, secret)
                w.key_ids[t], w.secrets[t] = key.id, secret

        await db.transaction(base)
        b = Billing(db)
        await b.set_profile("acme", currency="CNY", credit_limit="50")
        await b.set_fx("CNY", "USD", "0.14", effective_ms=0)
        await b.set_price(
            "gpt-4o-mini", currency="CNY", input_per_1m="2", output_per_1m="8", effective_ms=0
        )
        await b.set_price(
            "qwen-plus", currency="CNY", input_per_1m="1", output_per_1m="1", effective_ms=0
        )
        await b.set_price(
            "gpt-4o-mini", currency="USD", input_per_1m="0.3", output_per_1m="1.2",
            effective_ms=0, tenant="bravo",
        )  # fmt: skip
        await b.topup("acme", "100", "CNY")
        await b.create_plan(
            "qwen-1k", price="10", currency="CNY", tokens=1000, models=("qwen-plus",)
        )
        lot = await b.assign("acme", "qwen-1k", start_ms=day_ms(w.day0) - DAY_MS)
        w.lot_id = lot.id
        await b.set_profile("bravo", currency="USD")
        await b.topup("bravo", "5", "USD")
        w.codes = await b.create_codes(2, "3", "CNY")
        t0 = day_ms(w.day0) + 3_600_000
        acme, bravo = w.key_ids["acme"], w.key_ids["bravo"]
        events = [
            event("req_a1", t0, "acme", acme, "gpt-4o-mini",
                  input_tokens=1_000_000, output_tokens=500_000),
            event("req_a2", t0 + DAY_MS, "acme", acme, "qwen-plus",
                  input_tokens=100, cached_input_tokens=20, output_tokens=50),
            event("req_a3", t0 + DAY_MS + 1000, "acme", acme, "qwen-plus",
                  status=429, error="rate_limit_exceeded"),
            event("req_b1", t0, "bravo", bravo, "gpt-4o-mini", input_tokens=7, output_tokens=3),
        ]  # fmt: skip

        store = open_store(path)  # the gateway's own writer of usage events
        try:
            store.insert_events(events)
        finally:
            store.close()
        # The settler's own pass (it marks the events settled, as the gateway's settler does).
        summary = await settle_pending(b)
        assert summary.settled == len(events) and not summary.failed, summary

        async def users(tx: Any) -> None:
            for name, (role, tenant) in USERS.items():
                pw = hash_password(PASSWORD, n=FAST_N)
                await cstore.create_user_in(tx, name, pw, role, tenant)

        await db.transaction(users)
    finally:
        await db.close()
    return w


# -- clients -----------------------------------------------------------------------------------

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(html: str) -> str:
    m = _CSRF.search(html)
    assert m is not None, "no csrf field on the page"
    return m.group(1)


async def sign_in(client: TestClient[Any, Any], name: str, password: str = PASSWORD) -> str:
    """Signs `client` in as `name`; returns the session's CSRF token (also `client.csrf`)."""
    page = await client.get("/console/signin")
    pre = csrf_of(await page.text())
    resp = await client.post(
        "/console/signin",
        data={"csrf": pre, "name": name, "password": password},
        allow_redirects=False,
    )
    assert resp.status == 303, (resp.status, await resp.text())
    home = await client.get(resp.headers["Location"])  # the role's home page (its menu's forms)
    token = csrf_of(await home.text())
    assert token and token != pre, "not signed in"
    client.csrf = token  # type: ignore[attr-defined]
    return token


async def post_form(
    client: TestClient[Any, Any],
    path: str,
    data: dict[str, Any] | list[tuple[str, Any]],
    *,
    follow: bool = False,
) -> ClientResponse:
    """POSTs a form with the client's CSRF token. Not followed by default: a success is a 303
    whose Location is the next page (`follow=True` returns that page instead)."""
    items = list(data.items()) if isinstance(data, dict) else list(data)
    items.append(("csrf", getattr(client, "csrf", "")))
    return await client.post(path, data=items, allow_redirects=follow)


# -- reading pages -----------------------------------------------------------------------------


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, dict[str, str | None]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids[str(a["id"])] = a


def parse(html: str) -> _Ids:
    p = _Ids()
    p.feed(html)
    return p


def flashes(html: str) -> list[tuple[str, str]]:
    """(kind, text) of every flash message on the page."""
    return [
        (m.group(1), unescape(re.sub(r"\s+", " ", m.group(2)).strip()))
        for m in re.finditer(r'data-flash="(ok|error)"[^>]*>(.*?)</', html, re.S)
    ]
