"""The usage explorer (tokenhub.console.usage_pages) over plain HTTP on the seeded world: its
numbers against the rollups, filters and group-by, drill-down, exports against the CLI's."""

from __future__ import annotations

import ast
import csv
import html as htmllib
import io
import re
from pathlib import Path
from typing import Any

import pytest
from console_kit import DAY_MS, World, day_ms

from tokenhub.billing import io as bio
from tokenhub.billing.rollups import usage_summary
from tokenhub.billing.service import Billing
from tokenhub.cli.admin import write_csv, write_jsonl
from tokenhub.console import usage_pages
from tokenhub.console.core import load_catalogs
from tokenhub.db.database import open_database
from tokenhub.store import open_store
from tokenhub.usage import UsageEvent

_ROW = re.compile(r'<tr class="usage-row" ([^>]*)>')
_ATTR = re.compile(r'data-([a-z-]+)="([^"]*)"')


def usage_rows(page: str) -> list[dict[str, str]]:
    return [dict(_ATTR.findall(m.group(1))) for m in _ROW.finditer(page)]


def total_row(page: str) -> dict[str, str]:
    m = re.search(r'<tr id="usage-total" ([^>]*)>', page)
    assert m is not None, "no totals row"
    return dict(_ATTR.findall(m.group(1)))


def event_ids(page: str) -> list[str]:
    return re.findall(r'class="event-row" data-request-id="([^"]+)"', page)


def drill_links(page: str) -> list[str]:
    return [htmllib.unescape(u) for u in re.findall(r'<a href="([^"]+)" class="drill">', page)]


def window(world: World) -> tuple[int, int]:
    start = day_ms(world.day0)
    return start, start + 3 * DAY_MS


async def test_explorer_equals_the_rollups(console_client: Any, world: World) -> None:
    since, until = window(world)
    read = await console_client("read")
    resp = await read.get(f"/console/usage?since={since}&until={until}&period=day&group=model")
    assert resp.status == 200
    page = await resp.text()
    rows = usage_rows(page)
    db = await open_database(world.db)
    try:
        want = await db.read(
            lambda tx: usage_summary(tx, since=since, until=until, group_by=("day", "model"))
        )
    finally:
        await db.close()
    assert len(want) == 2  # day0: gpt-4o-mini (acme + bravo); day0 + 1: qwen-plus (2 events)
    got = [
        (int(r["bucket"]), r["group"], int(r["requests"]), int(r["ok"]), int(r["in"]),
         int(r["cached"]), int(r["out"]), r["cost"])
        for r in rows
    ]  # fmt: skip
    assert got == [
        (w.bucket_ms, w.group, w.requests, w.ok, w.input_tokens, w.cached_tokens,
         w.output_tokens, ";".join(f"{c}:{v}" for c, v in w.cost.items()))
        for w in want
    ]  # fmt: skip
    # Exact money: acme's 1M in at 2 CNY + 500k out at 8 CNY = 6 CNY; bravo's 7 in at
    # 0.30 USD and 3 out at 1.20 USD per 1M = 0.0000057 USD.
    gpt = next(r for r in rows if r["group"] == "gpt-4o-mini")
    assert gpt["cost"] == "CNY:6000000000;USD:5700"
    assert "6.000000000 CNY" in page or "6.00 CNY" in page
    total = total_row(page)
    assert int(total["requests"]) == 4 and int(total["ok"]) == 3
    assert int(total["in"]) == 1_000_000 + 100 + 7 and int(total["out"]) == 500_000 + 50 + 3
    assert "<svg" in page  # the chart beside the table


async def test_filters_and_group_by_change_the_table(console_client: Any, world: World) -> None:
    since, until = window(world)
    read = await console_client("read")
    base = f"/console/usage?since={since}&until={until}"

    page = await (await read.get(base + "&group=tenant")).text()
    assert sorted(r["group"] for r in usage_rows(page)) == ["acme", "acme", "bravo"]

    page = await (await read.get(base + "&group=tenant&tenant=bravo")).text()
    rows = usage_rows(page)
    assert [(r["group"], r["requests"], r["in"], r["out"]) for r in rows] == [
        ("bravo", "1", "7", "3")
    ]
    assert rows[0]["cost"] == "USD:5700"

    page = await (await read.get(base + "&group=model&status=error")).text()
    rows = usage_rows(page)
    assert [(r["group"], r["requests"], r["ok"]) for r in rows] == [("qwen-plus", "1", "0")]

    key = world.key_ids["acme"]
    page = await (await read.get(base + f"&group=key&key={key}")).text()
    assert {r["group"] for r in usage_rows(page)} == {key}
    assert total_row(page)["requests"] == "3"

    page = await (await read.get(base + "&group=deployment&model=qwen-plus&period=hour")).text()
    rows = usage_rows(page)
    assert [r["group"] for r in rows] == ["mock-a/qwen-plus"]
    assert int(rows[0]["bucket"]) == day_ms(world.day0) + DAY_MS + 3_600_000  # the hour


async def test_presets_and_bad_input(console_client: Any, world: World) -> None:
    read = await console_client("read")
    page = await (await read.get("/console/usage?range=7d&group=tenant")).text()
    assert total_row(page)["requests"] == "4"
    assert (await read.get("/console/usage?range=7d&period=hour")).status == 200
    today = await (await read.get("/console/usage?range=today")).text()
    assert 'id="usage-total"' not in today  # nothing settled today
    for q in ("since=yesterday", "since=2026-11-02&until=2026-11-01", "group=colour",
              "period=week", "status=maybe", "stream=perhaps",
              "range=30d&period=hour"):  # fmt: skip
        resp = await read.get(f"/console/usage?{q}")
        assert resp.status == 400, q


async def test_drill_down_lists_exactly_the_bucket(console_client: Any, world: World) -> None:
    since, until = window(world)
    read = await console_client("read")
    page = await (await read.get(f"/console/usage?since={since}&until={until}&group=tenant")).text()
    links = drill_links(page)
    rows = usage_rows(page)
    found = {}
    for r, link in zip(rows, links, strict=True):
        resp = await read.get(link)
        assert resp.status == 200
        found[(int(r["bucket"]), r["group"])] = event_ids(await resp.text())
    d0 = day_ms(world.day0)
    assert found == {
        (d0, "acme"): ["req_a1"],
        (d0, "bravo"): ["req_b1"],
        (d0 + DAY_MS, "acme"): ["req_a2", "req_a3"],
    }
    # Metadata, never a prompt; the settled cost of each event.
    ev = await (await read.get(links[0])).text()
    assert "6.000000000 CNY" in ev or "6.00 CNY" in ev
    assert world.secrets["acme"] not in ev


async def test_events_filters_and_keyset_pages(
    console_client: Any, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    since, until = window(world)
    read = await console_client("read")
    q = f"/console/usage/events?since={since}&until={until}"
    assert event_ids(await (await read.get(q)).text()) == ["req_a1", "req_b1", "req_a2", "req_a3"]
    assert event_ids(await (await read.get(q + "&status=error")).text()) == ["req_a3"]
    assert event_ids(await (await read.get(q + "&stream=true")).text()) == []
    assert len(event_ids(await (await read.get(q + "&stream=false")).text())) == 4
    monkeypatch.setattr(usage_pages, "EVENTS_PAGE", 1)
    seen: list[str] = []
    url: str | None = q
    for _ in range(10):
        assert url is not None
        page = await (await read.get(url)).text()
        seen += event_ids(page)
        m = re.search(r'<a href="([^"]+)" id="next-page"', page)
        url = htmllib.unescape(m.group(1)) if m else None
        if url is None:
            break
    assert seen == ["req_a1", "req_b1", "req_a2", "req_a3"]
    assert (await read.get(q + "&cursor=bogus")).status == 400


async def test_csv_and_jsonl_exports_equal_the_cli(console_client: Any, world: World) -> None:
    since, until = window(world)
    read = await console_client("read")
    store = open_store(world.db)
    try:
        want_csv = io.StringIO()
        write_csv(store.iter_events(since, until), want_csv)
        want_jsonl = io.BytesIO()
        write_jsonl(store.iter_events(since, until), want_jsonl)
        want_all = io.StringIO()
        write_csv(store.iter_events(None, None), want_all)
    finally:
        store.close()
    resp = await read.get(f"/console/usage/export.csv?since={since}&until={until}")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert (await resp.read()).decode() == want_csv.getvalue()
    resp = await read.get(f"/console/usage/export.jsonl?since={since}&until={until}")
    assert await resp.read() == want_jsonl.getvalue()
    assert len(want_jsonl.getvalue().splitlines()) == 4
    # No window: every event, as `tokenhub events export` with no --since/--until.
    assert (await (await read.get("/console/usage/export.csv")).read()).decode() == (
        want_all.getvalue()
    )
    # A filter narrows it to the matching rows of the same export.
    resp = await read.get(f"/console/usage/export.csv?since={since}&until={until}&tenant=bravo")
    got = list(csv.reader(io.StringIO((await resp.read()).decode())))
    want = list(csv.reader(io.StringIO(want_csv.getvalue())))
    assert got == [want[0]] + [r for r in want[1:] if r[want[0].index("tenant")] == "bravo"]


async def test_focus_export_equals_the_cli(console_client: Any, world: World) -> None:
    since, until = window(world)
    read = await console_client("read")
    db = await open_database(world.db)
    try:
        rows = await bio.focus_rows(db, since=since, until=until)
    finally:
        await db.close()
    want = io.StringIO()
    w = csv.DictWriter(want, bio.FOCUS_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    resp = await read.get(f"/console/usage/export.focus.csv?since={since}&until={until}")
    assert resp.status == 200
    assert (await resp.read()).decode() == want.getvalue()
    assert len(rows) > 0


async def test_roles(console_client: Any) -> None:
    tenant = await console_client("tenant", tenant="acme")
    assert (await tenant.get("/console/usage")).status == 403
    assert (await tenant.get("/console/usage/export.csv")).status == 403
    anon = await console_client(None)
    resp = await anon.get("/console/usage", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/console/signin")


def untranslated(module: str) -> list[str]:
    """Strings of tokenhub.console.<module>_pages and its templates with no zh-CN entry."""
    here = Path(usage_pages.__file__).parent
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
    assert untranslated("usage") == []


async def test_explorer_in_chinese(console_client: Any, world: World) -> None:
    read = await console_client("read")
    resp = await read.post(
        "/console/lang", data={"csrf": read.csrf, "lang": "zh-CN", "_back": "/console/usage"}
    )
    assert resp.status == 200
    page = await resp.text()
    assert "用量分析" in page and "导出 CSV" in page and "合计" in page


async def test_drill_down_to_the_empty_group(console_client: Any, world: World) -> None:
    """A request that reached no deployment groups under "": its drill-down asks for exactly
    that (none=deployment), not for every deployment."""
    ts = day_ms(world.day0) + 2 * DAY_MS + 60_000
    refused = UsageEvent(
        request_id="req_x1", ts_ms=ts, tenant="acme", key_id=world.key_ids["acme"],
        endpoint="chat.completions", model="gpt-4o-mini", status=429, error="rate_limited",
    )  # fmt: skip
    store = open_store(world.db)
    try:
        store.insert_events([refused])
    finally:
        store.close()
    db = await open_database(world.db)
    try:
        assert not (await Billing(db).settle([refused])).failed
    finally:
        await db.close()
    since, until = day_ms(world.day0), day_ms(world.day0) + 3 * DAY_MS
    read = await console_client("read")
    page = await (
        await read.get(f"/console/usage?since={since}&until={until}&group=deployment")
    ).text()
    rows = usage_rows(page)
    links = dict(zip([(r["bucket"], r["group"]) for r in rows], drill_links(page), strict=True))
    link = links[(str(day_ms(world.day0) + 2 * DAY_MS), "")]
    assert "none=deployment" in link
    events = await (await read.get(link)).text()
    assert event_ids(events) == ["req_x1"]
    assert "(none)" in events


async def test_partial_days_drill_to_their_part(console_client: Any, world: World) -> None:
    """A custom range from mid-day: the range is rounded out to whole hours (the rollups'
    grain) and the first day's drill-down covers only the hours the summary counted."""
    d0 = day_ms(world.day0)
    late = UsageEvent(
        request_id="req_late", ts_ms=d0 + 5 * 3_600_000, tenant="acme",
        key_id=world.key_ids["acme"], endpoint="chat.completions", model="gpt-4o-mini",
        deployment="mock-a/gpt-4o-mini", input_tokens=10, output_tokens=1,
    )  # fmt: skip
    store = open_store(world.db)
    try:
        store.insert_events([late])
    finally:
        store.close()
    db = await open_database(world.db)
    try:
        assert not (await Billing(db).settle([late])).failed
    finally:
        await db.close()
    read = await console_client("read")
    since = d0 + 2 * 3_600_000 + 123  # 02:00:00.123: from 02:00
    page = await (await read.get(f"/console/usage?since={since}&until={d0 + DAY_MS}")).text()
    assert re.search(rf'id="usage-window" data-since="{d0 + 2 * 3_600_000}"', page)
    [row] = usage_rows(page)
    assert (row["bucket"], row["requests"], row["in"]) == (str(d0), "1", "10")
    [link] = drill_links(page)
    assert event_ids(await (await read.get(link)).text()) == ["req_late"]


# -- the same pages on PostgreSQL ----------------------------------------------------------------


@pytest.mark.postgres
async def test_operator_pages_on_postgresql(pg_database: str) -> None:
    """The usage, billing and ops pages' SQL on PostgreSQL: every page answers, the explorer's
    rows and a drill-down, the CSV export against the CLI's, a payment once, a code batch, a
    statement closed, a reconciliation."""
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer
    from console_kit import seed, sign_in

    from tokenhub.admin.app import build_admin_app

    world = await seed(pg_database)
    server = TestServer(build_admin_app(pg_database))
    await server.start_server()
    clients: list[TestClient[Any, Any]] = []
    try:
        root: TestClient[Any, Any] = TestClient(server)
        await root.start_server()
        clients.append(root)
        csrf = await sign_in(root, "root")
        since, until = window(world)
        for path in (
            "/console/usage", "/console/usage/events", "/console/routing", "/console/audit",
            "/console/audit?log=guard", "/console/billing/prices", "/console/billing/fx",
            "/console/billing/plans", "/console/billing/codes", "/console/billing/invoices",
            "/console/billing/settlements?provider=mock-a", "/console/billing/reconcile",
            "/console/billing/check", "/console/billing/overruns",
            "/console/billing/statements?tenant=acme",
        ):  # fmt: skip
            assert (await root.get(path)).status == 200, path
        page = await (await root.get(f"/console/usage?since={since}&until={until}&group=tenant"))\
            .text()  # fmt: skip
        rows = usage_rows(page)
        assert [(r["group"], r["requests"], r["cost"]) for r in rows] == [
            ("acme", "1", "CNY:6000000000"), ("bravo", "1", "USD:5700"),
            ("acme", "2", "CNY:1500000000"),
        ]  # fmt: skip
        drill = await (await root.get(drill_links(page)[2])).text()
        assert event_ids(drill) == ["req_a2", "req_a3"]
        page = await (await root.get(f"/console/usage?since={since}&until={until}&status=error"))\
            .text()  # fmt: skip
        assert [r["requests"] for r in usage_rows(page)] == ["1"]
        store = open_store(pg_database)
        try:
            want = io.StringIO()
            write_csv(store.iter_events(since, until), want)
        finally:
            store.close()
        got = await (await root.get(f"/console/usage/export.csv?since={since}&until={until}"))\
            .read()  # fmt: skip
        assert got.decode() == want.getvalue()
        listed = await (await root.get(f"/console/usage/events?since={since}&until={until}"
                                    "&stream=false&status=ok")).text()  # fmt: skip
        assert event_ids(listed) == ["req_a1", "req_b1", "req_a2"]

        async def post(path: str, data: dict[str, str]) -> str:
            resp = await root.post(path, data={**data, "csrf": csrf}, allow_redirects=False)
            assert resp.status == 303, (path, resp.status)
            return str(await (await root.get(resp.headers["Location"])).text())

        page = await post(
            "/console/billing/codes", {"count": "2", "amount": "1", "currency": "CNY"}
        )
        assert len(re.findall(r'class="secret new-code"', page)) == 2
        await post("/console/billing/fx", {"base": "USD", "quote": "EUR", "rate": "0.9"})
        await post("/console/billing/prices", {"model": "m", "currency": "USD", "input": "1",
                                               "output": "2"})  # fmt: skip
        await post("/console/billing/plans", {"name": "p", "price": "1", "currency": "USD",
                                              "quantity": "1000"})  # fmt: skip
        # acme's usage on credit, invoiced, paid once by a form sent twice.
        db = await open_database(pg_database)
        try:
            b = Billing(db)
            await b.set_profile("acme", draw_order=["postpaid"])
            ev = UsageEvent(request_id="req_p1", ts_ms=until - 1000, tenant="acme",
                            key_id=world.key_ids["acme"], endpoint="chat.completions",
                            model="gpt-4o-mini", input_tokens=1_000_000)  # fmt: skip
            store = open_store(pg_database)
            try:
                store.insert_events([ev])
            finally:
                store.close()
            assert not (await b.settle([ev])).failed
        finally:
            await db.close()
        from tokenhub.billing.ledger import period_of

        period = period_of(until - 1000)
        page = await post("/console/billing/invoices", {"tenant": "acme", "period": period})
        assert f'data-tenant="acme" data-period="{period}" data-due="2000000000"' in page
        token = re.search(r'name="token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        pay = {"tenant": "acme", "amount": "0.5", "currency": "CNY", "token": token}
        await post("/console/billing/payments", pay)
        page = await post("/console/billing/payments", pay)
        assert 'data-tenant="acme" data-currency="CNY" data-owed="1500000000"' in page
        page = await post("/console/billing/statements/close",
                          {"tenant": "bravo", "period": period_of(since)})  # fmt: skip
        assert 'data-closed="true"' in page
        form = aiohttp.FormData()
        form.add_field("csrf", csrf)
        form.add_field("file", io.BytesIO(b"request_id,input_tokens,output_tokens\n"
                                          b"req_a1,1000000,500000\n"),
                       filename="p.csv", content_type="text/csv")  # fmt: skip
        page = await (await root.post("/console/billing/reconcile", data=form)).text()
        assert 'data-rows="1" data-matched="1"' in page
        page = await (await root.get("/console/audit?action=payment.")).text()
        assert page.count('class="audit-row"') == 1
    finally:
        for c in clients:
            await c._session.close()
        await server.close()


async def test_summary_csv_has_every_row_and_the_table_is_capped(
    console_client: Any, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    since, until = window(world)
    q = f"since={since}&until={until}&period=day&group=tenant"
    read = await console_client("read")
    full = usage_rows(await (await read.get(f"/console/usage?{q}")).text())
    assert len(full) >= 3
    resp = await read.get(f"/console/usage/summary.csv?{q}")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/csv")
    lines = list(csv.reader(io.StringIO(await resp.text())))
    assert lines[0][:7] == [
        "time", "tenant", "requests", "ok", "input_tokens", "cached_tokens", "output_tokens",
    ]  # fmt: skip
    assert [(r[1], int(r[2]), int(r[4]), int(r[6])) for r in lines[1:]] == [
        (r["group"], int(r["requests"]), int(r["in"]), int(r["out"])) for r in full
    ]
    # Capped: the latest rows are shown, the rest counted in the totals and named.
    monkeypatch.setattr(usage_pages, "MAX_TABLE_ROWS", 2)
    page = await (await read.get(f"/console/usage?{q}")).text()
    assert usage_rows(page) == full[-2:]
    assert f'data-hidden="{len(full) - 2}"' in page
    assert int(total_row(page)["requests"]) == sum(int(r["requests"]) for r in full)
