"""Server time per web-console page (tokenhub.console) at p50/p99 with N settled usage events
(default 1M) in the database, on SQLite and, with --pg (or $TOKENHUB_TEST_PG_DSN), PostgreSQL.

    .venv/bin/python benches/bench_console_pages.py
    .venv/bin/python benches/bench_console_pages.py --events 200000 --repeat 20

The events are benches/bench_rollups.py's (50 tenants with 3 keys each, 6 models x 2
deployments, 3% errors), spread over the 30 days that end at this hour, bulk-loaded, then
settled through billing as the settler does (Billing.settle in batches of 1000: postings,
wallet draws, the rollups with their costs), so that revenue, balances and statements are
real; the tenants and their keys (under the events' key ids), USD prices, and a wallet top-up
per tenant go in through the service functions. Building takes a few minutes at 1M (the
settling mostly); the SQLite database is cached (--db, default under $TMPDIR, named by the
event count and the window's first day) so that a rerun the same day starts at once;
PostgreSQL gets a fresh database per run, dropped after.

The admin app (tokenhub.admin.app.build_admin_app, which mounts /console) runs in this process
on 127.0.0.1; an operator (admin) and a tenant user sign in through the sign-in form, then each
page is requested --repeat times after one warm-up request. Reported per page: the console's
own `Server-Timing: app;dur=` (handler and rendering) at p50/p99, the client-side time (the
whole HTTP exchange on loopback) at p50, and the page's size (a page that renders next to
nothing is not measured as fast). A page that does not answer 200 is reported and makes
the run exit 1. Nothing asserts on time; the target is p50 under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))
import bench_rollups as BR  # the events' generator and bulk loader

from tokenhub.admin.app import build_admin_app
from tokenhub.billing.service import Billing
from tokenhub.db.database import Database, Tx, open_database
from tokenhub.store import sql as S
from tokenhub.usage import UsageEvent

HOUR = 3_600_000
DAY = 86_400_000
PASSWORD = "bench-console-password"  # a throwaway database's users
COLS = BR.COLS
SETTLE_BATCH = 1000
TENANT = "tenant-00"  # the busiest tenant (the generator's weights are 1/(i+1))
TOKENHUB = str(Path(sys.executable).with_name("tokenhub"))


def _window_start(now_ms: int) -> int:
    """30 days ending at the next hour: every page's "last 30 days" sees all of them."""
    return (now_ms // HOUR + 1) * HOUR - 30 * DAY


def _month(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m")


async def build(url: str, n: int, start: int) -> None:
    """Tenants, keys, prices and wallets through the service functions, then N events
    bulk-loaded and settled through billing (postings, wallets, rollups)."""
    BR.START = start  # rows() spreads the events over the 30 days from START
    data = BR.rows(n)
    db = await open_database(url)
    try:
        tenants = sorted({r[2] for r in data})
        keys = sorted({(r[2], r[3]) for r in data})

        async def setup(tx: Tx) -> None:
            for name in tenants:
                await S.create_tenant_in(tx, name)
            ids = {t.name: t.id for t in await S.tenants_in(tx)}
            for tenant, key_id in keys:
                # under the events' own key ids, so that keys pages and usage by key agree
                await tx.execute(
                    "INSERT INTO api_keys (id, tenant_id, prefix, sha256, created_ms, "
                    "updated_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                    key_id,
                    ids[tenant],
                    f"th-{key_id[-5:]}",
                    S.digest(f"bench-{key_id}"),
                    start,
                    start,
                )

        await db.transaction(setup)
        billing = Billing(db)
        for model in BR.MODELS:
            await billing.set_price(
                model,
                currency="USD",
                input_per_1m="0.15",
                cached_input_per_1m="0.075",
                output_per_1m="0.60",
                effective_ms=0,
            )
        for name in tenants:
            await billing.set_profile(name, currency="USD", draw_order=["wallet", "postpaid"])
            await billing.topup(name, "1000.00", "USD")  # more than the busiest one spends
        t = time.perf_counter()
        await load_events(db, url, data)
        loaded = time.perf_counter() - t
        # Settled for real (Billing.settle, the settler's batches of 1000): postings, wallet
        # draws and the rollups' costs, as the gateway's settler leaves them.
        fields = COLS[: COLS.index("attempts") + 1]
        t = time.perf_counter()
        for i in range(0, len(data), SETTLE_BATCH):
            await billing.settle(
                UsageEvent(**dict(zip(fields, r, strict=False))) for r in data[i : i + SETTLE_BATCH]
            )
            if i and i % 100_000 == 0:
                print(f"  settled {i} events", file=sys.stderr, flush=True)
        settled = time.perf_counter() - t
        await db.transaction(lambda tx: tx.execute("ANALYZE"))
        print(
            f"  loaded {len(data)} events in {loaded:.0f} s, settled them in {settled:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    finally:
        await db.close()


async def load_events(db: Database, url: str, data: list[tuple[Any, ...]]) -> None:
    """The events' rows (bench_rollups.load without its settlements: Billing.settle writes
    them); settled_ms is set as the settler sets it after settling."""
    if db.dialect == "postgresql":
        conn = await asyncpg.connect(url)
        try:
            await conn.copy_records_to_table("usage_events", records=data, columns=COLS)
        finally:
            await conn.close()
        return
    marks = ",".join(f"${i + 1}" for i in range(len(COLS)))

    async def run(tx: Tx) -> None:
        for i in range(0, len(data), 50_000):
            await tx.executemany(
                f"INSERT INTO usage_events ({', '.join(COLS)}) VALUES ({marks})",
                data[i : i + 50_000],
            )

    await db.transaction(run)


def add_users(db_arg: str) -> None:
    """An operator (admin) and the busiest tenant's user, by the CLI (password from the
    environment, never argv)."""
    env = {**os.environ, "TOKENHUB_CONSOLE_PASSWORD": PASSWORD}
    users = (
        ["bench-admin", "--role", "admin"],
        ["bench-tenant", "--role", "tenant", "--tenant", TENANT],
    )
    for args in users:
        r = subprocess.run(
            [TOKENHUB, "console-users", "create", *args, "--db", db_arg],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0 and "already exists" not in r.stderr:
            raise SystemExit(f"console-users create {args[0]}: {r.stderr.strip()}")


class _Forms(HTMLParser):
    """The inputs of a page's forms: (form action, {name: value}) in order, and every href."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag in ("input", "button", "select") and self.forms and a.get("name"):
            self.forms[-1][1].setdefault(a["name"], a.get("value", ""))
        elif tag == "a" and "href" in a:
            self.hrefs.append(a["href"])


def parse(html: str) -> _Forms:
    p = _Forms()
    p.feed(html)
    return p


async def sign_in(http: aiohttp.ClientSession, base: str, user: str) -> None:
    async with http.get(f"{base}/console/signin") as r:
        page = parse(await r.text())
    action, fields = next((f for f in page.forms if "password" in f[1]), ("", {}))
    if not fields:
        raise SystemExit("no sign-in form on /console/signin")
    name_field = next(k for k in fields if k not in ("password", "csrf", "next", "_csrf"))
    fields.update({name_field: user, "password": PASSWORD})
    async with http.post(
        f"{base}{action or '/console/signin'}", data=fields, allow_redirects=False
    ) as r:
        if r.status != 303:
            raise SystemExit(f"sign-in as {user}: HTTP {r.status}: {(await r.text())[:300]}")


_APP_DUR = re.compile(r"\bapp;dur=([0-9.]+)")


async def measure(
    http: aiohttp.ClientSession, url: str, repeat: int
) -> tuple[list[float], list[float], int, int]:
    """(server ms, client ms, status, page bytes) over `repeat` requests after one warm-up."""
    server, client = [], []
    status = size = 0
    for i in range(repeat + 1):
        t = time.perf_counter()
        async with http.get(url, allow_redirects=False) as r:
            size = len(await r.read())
            status = r.status
            timing = r.headers.get("Server-Timing", "")
        if i == 0:
            continue
        client.append((time.perf_counter() - t) * 1000)
        found = _APP_DUR.search(timing)
        if found:
            server.append(float(found.group(1)))
    return server, client, status, size


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def pages(start: int, tenant_href: str | None) -> list[tuple[str, str, str]]:
    """(who, label, path) of the main pages."""
    now = start + 30 * DAY
    day, next_day = (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")
        for ms in (now - 3 * DAY, now - 2 * DAY)
    )
    out = [
        ("operator", "overview", "/console/"),
        ("operator", "usage 30 d, day x model", "/console/usage?range=30d&period=day&group=model"),
        (
            "operator",
            "usage drill-down (one day x model)",
            f"/console/usage/events?since={day}&until={next_day}&model=gpt-4o&tenant={TENANT}",
        ),
        (
            "operator",
            "usage drill-down (one day x model, all tenants)",
            f"/console/usage/events?since={day}&until={next_day}&model=gpt-4o",
        ),
        (
            "operator",
            "usage drill-down (one day, a fallback deployment's errors, all tenants)",
            f"/console/usage/events?since={day}&until={next_day}&deployment=glm-4@1&status=error",
        ),
        ("operator", "usage 7 d (default)", "/console/usage"),
        (
            "operator",
            "usage 30 d, day x tenant",
            "/console/usage?range=30d&period=day&group=tenant",
        ),
        (
            "operator",
            "usage today, hour x deployment",
            "/console/usage?range=today&period=hour&group=deployment",
        ),
        ("operator", "tenants", "/console/tenants"),
        ("operator", "tenant detail", tenant_href or "/console/tenants"),
        ("operator", "keys", "/console/keys"),
        (
            "operator",
            "billing statements",
            f"/console/billing/statements?tenant={TENANT}&period={_month(now - DAY)}",
        ),
        ("operator", "billing overruns", "/console/billing/overruns"),
        ("operator", "billing invoices", "/console/billing/invoices"),
        ("operator", "billing codes", "/console/billing/codes"),
        ("operator", "routing health", "/console/routing"),
        ("operator", "audit", "/console/audit"),
        ("tenant", "balance", "/console/my/"),
        ("tenant", "usage", "/console/my/usage"),
        ("tenant", "request log", "/console/my/requests"),
        ("tenant", "statements", "/console/my/statements"),
        ("tenant", "limits", "/console/my/limits"),
        ("tenant", "keys", "/console/my/keys"),
    ]
    return out


async def run_pages(engine: str, url: str, start: int, repeat: int) -> bool:
    # A cached database made by an older tree gets the migrations since (the admin app opens
    # its database without migrating).
    await (await open_database(url)).close()
    app = build_admin_app(url)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    ok = True
    try:
        jars = {who: aiohttp.CookieJar(unsafe=True) for who in ("operator", "tenant")}
        async with (
            aiohttp.ClientSession(cookie_jar=jars["operator"]) as op,
            aiohttp.ClientSession(cookie_jar=jars["tenant"]) as ten,
        ):
            await sign_in(op, base, "bench-admin")
            await sign_in(ten, base, "bench-tenant")
            async with op.get(f"{base}/console/tenants") as r:
                hrefs = parse(await r.text()).hrefs
            # the busiest tenant's detail page, by its name or its id
            db = await open_database(url)
            try:
                tid = (await db.read(lambda tx: S.tenant_in(tx, TENANT))).id
            finally:
                await db.close()
            tenant_href = next(
                (h for h in hrefs if h.rstrip("/").endswith((f"/{TENANT}", f"/{tid}"))), None
            )
            print(f"\n{engine}, {repeat} requests per page after a warm-up:\n")
            print("| page | server p50 ms | server p99 ms | client p50 ms | KiB |")
            print("|---|---:|---:|---:|---:|")
            for who, label, path in pages(start, tenant_href):
                http = op if who == "operator" else ten
                server, client, status, size = await measure(http, base + path, repeat)
                if status != 200:
                    print(f"| {who}: {label} (`{path}`) | HTTP {status} | | | |")
                    ok = False
                    continue
                print(
                    f"| {who}: {label} | {pct(server, 50):.1f} | {pct(server, 99):.1f} | "
                    f"{pct(client, 50):.1f} | {size / 1024:.0f} |",
                    flush=True,
                )
    finally:
        await runner.cleanup()
    return ok


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _sqlite_db(path: Path, n: int, start: int) -> str:
    url = f"sqlite:///{path}"
    done = path.with_name(path.name + ".done")
    if done.exists() and path.exists():
        print(f"  using the cached {path}", file=sys.stderr)
        return url
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"), done):
        p.unlink(missing_ok=True)
    print(f"  building {path} ({n} events; a few minutes at 1M)", file=sys.stderr, flush=True)
    asyncio.run(build(url, n, start))
    done.touch()
    return url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=50, help="requests per page (after a warm-up)")
    ap.add_argument("--db", type=Path, help="the cached SQLite database (default: under $TMPDIR)")
    ap.add_argument("--pg", default=os.environ.get("TOKENHUB_TEST_PG_DSN"), help="PostgreSQL DSN")
    ap.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    ap.add_argument("--build-only", action="store_true", help="build the SQLite cache, then stop")
    args = ap.parse_args()
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    start = _window_start(time.time_ns() // 1_000_000)
    day = dt.datetime.fromtimestamp(start / 1000, dt.UTC).strftime("%Y%m%d")
    ok = True
    if not args.no_sqlite:
        path = (
            args.db
            or Path(tempfile.gettempdir())
            / f"tokenhub-bench-console-{args.events}-{day}-settled.db"
        )
        url = _sqlite_db(path, args.events, start)
        if args.build_only:
            return 0
        add_users(str(path))
        ok &= asyncio.run(run_pages(f"SQLite, {args.events:,} events", url, start, args.repeat))
    if args.pg:
        name = f"tokenhub_bench_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(args.pg, f'CREATE DATABASE "{name}"'))
        pg = urlunsplit(urlsplit(args.pg)._replace(path=f"/{name}"))
        try:
            asyncio.run(build(pg, args.events, start))
            add_users(pg)
            ok &= asyncio.run(
                run_pages(f"PostgreSQL, {args.events:,} events", pg, start, args.repeat)
            )
        finally:
            asyncio.run(_admin(args.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
