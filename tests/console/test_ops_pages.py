"""Routing health and the audit pages (tokenhub.console.ops_pages) over plain HTTP."""

from __future__ import annotations

import ast
import html as htmllib
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from console_kit import World, event

from tokenhub.billing.service import Billing
from tokenhub.console import ops_pages
from tokenhub.console.core import load_catalogs
from tokenhub.db.database import open_database
from tokenhub.store import open_store, sql

_ATTR = re.compile(r'data-([a-z0-9-]+)="([^"]*)"')


def deployment_rows(page: str) -> dict[str, dict[str, str]]:
    rows = [
        dict(_ATTR.findall(m)) for m in re.findall(r'<tr class="deployment-row" ([^>]*)>', page)
    ]
    return {r["deployment"]: r for r in rows}


async def test_routing_health_from_recent_traffic(console_client: Any, world: World) -> None:
    now = int(time.time() * 1000)
    key = world.key_ids["acme"]
    events = []
    for i in range(6):
        ev = event(f"req_r{i}", now - 60_000 - i * 1000, "acme", key, "gpt-4o-mini",
                   input_tokens=10, output_tokens=5, latency_ms=100.0 * (i + 1),
                   route="policy" if i < 4 else "fallback",
                   tier="cheap" if i % 2 else "strong")  # fmt: skip
        events.append(ev)
    err = event("req_r9", now - 30_000, "acme", key, "gpt-4o-mini", status=502,
                error="upstream_error", route="probe", latency_ms=50.0)  # fmt: skip
    events.append(err)
    store = open_store(world.db)
    try:
        store.insert_events(events)
    finally:
        store.close()
    db = await open_database(world.db)
    try:
        assert not (await Billing(db).settle(events)).failed
    finally:
        await db.close()
    read = await console_client("read")
    resp = await read.get("/console/routing")
    assert resp.status == 200
    page = await resp.text()
    rows = deployment_rows(page)
    d = rows["mock-a/gpt-4o-mini"]
    assert (d["requests-1h"], d["errors-1h"], d["requests-24h"], d["errors-24h"]) == (
        "7", "1", "7", "1"
    )  # fmt: skip
    assert d["sampled"] == "7"
    assert "14.3%" in page  # 1 error in 7
    # Decisions per reason and the tier share, as columns.
    for reason in ("fallback", "policy", "probe"):
        assert f">{reason}<" in page
    assert "<svg" in page
    tenant = await console_client("tenant", tenant="acme")
    assert (await tenant.get("/console/routing")).status == 403


async def test_routing_health_empty(console_client: Any) -> None:
    read = await console_client("read")
    page = await (await read.get("/console/routing")).text()
    assert deployment_rows(page) == {}  # the seeded usage is days old


async def test_admin_audit_filters_and_pages(
    console_client: Any, post_form: Any, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await console_client("admin")
    for quote in ("CNY", "EUR", "JPY"):
        resp = await post_form(
            admin, "/console/billing/fx", {"base": "USD", "quote": quote, "rate": "2"}
        )
        assert resp.status == 303
    db = await open_database(world.db)
    try:
        await db.transaction(
            lambda tx: sql.add_admin_audit(tx, "ops", "tenant.create", "ten_x", None, {"n": 1})
        )
    finally:
        await db.close()
    read = await console_client("read")
    page = await (await read.get("/console/audit")).text()
    actions = re.findall(r'data-actor="([^"]+)" data-action="([^"]+)" data-target="([^"]+)"', page)
    assert actions == [
        ("ops", "tenant.create", "ten_x"),
        ("console:root", "fx.set", "USD/JPY"),
        ("console:root", "fx.set", "USD/EUR"),
        ("console:root", "fx.set", "USD/CNY"),
    ]  # newest first
    assert "&#34;rate&#34;: &#34;2&#34;" in page or "&#34;rate&#34;:&#34;2&#34;" in page
    page = await (await read.get("/console/audit?actor=console:root&action=fx.")).text()
    assert page.count('class="audit-row"') == 3
    page = await (await read.get("/console/audit?target=USD/EUR")).text()
    assert page.count('class="audit-row"') == 1
    monkeypatch.setattr(ops_pages, "AUDIT_PAGE", 3)
    first = await (await read.get("/console/audit")).text()
    assert first.count('class="audit-row"') == 3
    nxt = htmllib.unescape(re.search(r'<a href="([^"]+)" rel="next"', first).group(1))  # type: ignore[union-attr]
    second = await (await read.get(nxt)).text()
    assert re.findall(r'data-action="([^"]+)" data-target="([^"]+)"', second) == [
        ("fx.set", "USD/CNY")
    ]
    assert 'rel="next"' not in second
    assert (await read.get("/console/audit?before=nonsense")).status == 400


async def test_guard_audit(console_client: Any, world: World) -> None:
    # Written as the guard writes them, then dated a second apart (ids within one
    # millisecond are not in writing order).
    store = open_store(world.db)
    try:
        for i in range(3):
            store.add_audit("guard_throttle", "acme" if i < 2 else "bravo", f"key_{i}", {"tpm": i})
    finally:
        store.close()
    with sqlite3.connect(world.db) as conn:
        for i in range(3):
            conn.execute(
                "UPDATE audit_log SET ts_ms = ? WHERE key_id = ?", (1000 * (i + 1), f"key_{i}")
            )
    read = await console_client("read")
    page = await (await read.get("/console/audit?log=guard")).text()
    assert re.findall(r'class="guard-row" data-id="[^"]+" data-kind="([^"]+)" '
                      r'data-tenant="([^"]+)"', page) == [
        ("guard_throttle", "bravo"), ("guard_throttle", "acme"), ("guard_throttle", "acme")
    ]  # fmt: skip
    page = await (await read.get("/console/audit?log=guard&tenant=acme")).text()
    assert page.count('class="guard-row"') == 2
    tenant = await console_client("tenant", tenant="acme")
    assert (await tenant.get("/console/audit?log=guard")).status == 403


def untranslated(module: str) -> list[str]:
    """Strings of tokenhub.console.<module>_pages and its templates with no zh-CN entry."""
    here = Path(ops_pages.__file__).parent
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
    assert untranslated("ops") == []
