"""Usage summaries from the rollups (tokenhub.billing.rollups.usage_summary) against the same
GROUP BY over the raw settled events, with N settled events (default 1M) over 30 days, on
SQLite and, with --pg (or $TOKENHUB_TEST_PG_DSN), PostgreSQL; and against the same summary
from the by-key rollups only (what a summary that does not group by key read before the daily
totals, migration 17).

    .venv/bin/python benches/bench_rollups.py
    .venv/bin/python benches/bench_rollups.py --pg "$TOKENHUB_TEST_PG_DSN" --events 1000000

Events and their settlements are bulk-loaded (no charge: the ledger is not what is measured),
then the rollups are built by `rebuild` (the backfill `tokenhub billing rollups rebuild` runs;
its time is reported). Each query runs --repeat times; the median is shown. The raw query is
the cheapest raw form (counts and tokens only, no join to postings for cost), so its figure is
a lower bound. Every three are checked to return the same counts: a mismatch prints MISMATCH and
exits 1. At 1M events a run takes ~3 min on a 2-core VM (loading and rebuilding, mostly);
--events 200000 is ~40 s. `--pg` names a server where the role may create databases: a fresh
database is created for the run and dropped after. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]

from tokenhub.billing import rollups as R
from tokenhub.db.database import Database, Tx, open_database
from tokenhub.usage import EVENT_FIELDS

DAY = 86_400_000
START = 1_793_577_600_000  # 2026-11-02T00:00Z
COLS = (*EVENT_FIELDS[: EVENT_FIELDS.index("attempts") + 1], "settled_ms")
MODELS = ("gpt-4o", "gpt-4o-mini", "qwen-max", "qwen-plus", "deepseek-v3", "glm-4")


def rows(n: int, seed: int = 1) -> list[tuple[Any, ...]]:
    """Skewed like traffic: 50 tenants with 3 keys each (a few busy ones), 6 models each
    served by a primary deployment (90%) and a fallback, 3% errors."""
    rng = random.Random(seed)
    tenants = [f"tenant-{i:02d}" for i in range(50)]
    tw = [1 / (i + 1) for i in range(50)]
    out = []
    for i in range(n):
        t = rng.choices(range(50), tw)[0]
        m = rng.choices(range(6), (5, 4, 3, 2, 1, 1))[0]
        ok = rng.random() > 0.03
        inp = rng.randrange(100, 4000)
        out.append((
            f"req_{i:010d}", START + rng.randrange(30 * DAY), tenants[t],
            f"key-{t:02d}-{rng.choices((0, 1, 2), (6, 3, 1))[0]}", "chat.completions",
            MODELS[m], f"{MODELS[m]}@{int(rng.random() < 0.1)}", "mock", MODELS[m], False, inp,
            inp // 4, rng.randrange(10, 800) if ok else 0, "upstream", 200 if ok else 502, "",
            100.0, None, 1, START,
        ))  # fmt: skip
    return out


async def load(db: Database, url: str, data: list[tuple[Any, ...]]) -> None:
    settlements = [(r[0], "x", "", START) for r in data]
    if db.dialect == "postgresql":
        conn = await asyncpg.connect(url)
        try:
            await conn.copy_records_to_table("usage_events", records=data, columns=COLS)
            await conn.copy_records_to_table(
                "settlements",
                records=settlements,
                columns=("event_id", "payload_sha256", "txn_id", "settled_ms"),
            )
            await conn.execute("ANALYZE")
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
            await tx.executemany(
                "INSERT INTO settlements (event_id, payload_sha256, txn_id, settled_ms) "
                "VALUES ($1, $2, $3, $4)",
                settlements[i : i + 50_000],
            )

    await db.transaction(run)
    await db.transaction(lambda tx: tx.execute("ANALYZE"))


_BUCKET = {"hour": "(e.ts_ms / 3600000) * 3600000", "day": f"(e.ts_ms / {DAY}) * {DAY}"}


async def raw(
    tx: Tx, *, since: int, until: int, group_by: tuple[str, str], tenant: str | None
) -> list[tuple[int, str, int, int]]:
    b, g = _BUCKET[group_by[0]], f"e.{R.DIMENSIONS[group_by[1]]}"
    args: list[Any] = [since, until]
    where = "e.ts_ms >= $1 AND e.ts_ms < $2"
    if tenant is not None:
        args.append(tenant)
        where += " AND e.tenant = $3"
    rs = await tx.fetch(
        f"SELECT {b} AS b, {g} AS g, COUNT(*), "
        "SUM(CASE WHEN e.status >= 200 AND e.status < 300 THEN 1 ELSE 0 END), "
        "SUM(e.input_tokens), SUM(e.cached_input_tokens), SUM(e.output_tokens) "
        "FROM usage_events e JOIN settlements s ON s.event_id = e.request_id "
        f"WHERE {where} GROUP BY b, g ORDER BY b, g",
        *args,
    )
    return [(int(r[0]), r[1], int(r[2]), int(r[4])) for r in rs]


async def rolled(
    tx: Tx, *, since: int, until: int, group_by: tuple[str, str], tenant: str | None
) -> list[tuple[int, str, int, int]]:
    s = await R.usage_summary(tx, since=since, until=until, group_by=group_by, tenant=tenant)
    return [(r.bucket_ms, r.group, r.requests, r.input_tokens) for r in s]


async def by_key(
    tx: Tx, *, since: int, until: int, group_by: tuple[str, str], tenant: str | None
) -> list[tuple[int, str, int, int]]:
    """`rolled` from the by-key rollups only (what it read before usage_totals_daily)."""
    tables_for = R.tables_for
    R.tables_for = lambda dimension, *, by_key: R.TABLES  # type: ignore[assignment]
    try:
        return await rolled(tx, since=since, until=until, group_by=group_by, tenant=tenant)
    finally:
        R.tables_for = tables_for  # type: ignore[assignment]


QUERIES = [
    ("30 days, day x model, all tenants", (START, START + 30 * DAY), ("day", "model"), None),
    ("30 days, day x key, one tenant", (START, START + 30 * DAY), ("day", "key"), "tenant-00"),
    ("24 h, hour x deployment, all", (START + 10 * DAY, START + 11 * DAY), ("hour", "deployment"),
     None),
    ("7 days, day x tenant, all", (START, START + 7 * DAY), ("day", "tenant"), None),
]  # fmt: skip


async def timed(db: Database, fn: Callable[[Tx], Awaitable[Any]], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = await db.read(fn)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), out


async def bench(engine: str, url: str, n: int, repeat: int, data: list[tuple[Any, ...]]) -> bool:
    db = await open_database(url)
    ok = True
    try:
        t = time.perf_counter()
        await load(db, url, data)
        loaded = time.perf_counter() - t
        t = time.perf_counter()

        def progress(k: int) -> None:
            print(f"  rollups rebuild: {k} events read", file=sys.stderr, flush=True)

        n_ev, n_rows = await db.transaction(
            lambda tx: R.rebuild(tx, dialect=db.dialect, progress=progress)
        )
        rebuilt = time.perf_counter() - t
        if db.dialect == "postgresql":
            await db.transaction(lambda tx: tx.execute("ANALYZE"))
        print(
            f"\n{engine}: {n_ev} settled events loaded in {loaded:.1f} s; rebuild "
            f"{rebuilt:.1f} s ({n_ev / rebuilt:,.0f} events/s) -> {n_rows} rollup rows\n"
        )
        print(
            "| query | raw GROUP BY ms | rollups ms | speed-up | by-key rollups only ms |\n"
            "|---|---:|---:|---:|---:|"
        )
        for name, (since, until), group_by, tenant in QUERIES:
            kw: dict[str, Any] = {
                "since": since, "until": until, "group_by": group_by, "tenant": tenant
            }  # fmt: skip
            raw_ms, a = await timed(db, partial(raw, **kw), repeat)
            roll_ms, b = await timed(db, partial(rolled, **kw), repeat)
            key_ms, c = await timed(db, partial(by_key, **kw), repeat)
            if not a == b == c:
                print(f"MISMATCH: {name}: raw {len(a)} rows, rollups {len(b)}, by key {len(c)}")
                ok = False
            print(
                f"| {name} | {raw_ms:.1f} | {roll_ms:.2f} | {raw_ms / roll_ms:.1f}x | "
                f"{key_ms:.2f} |"
            )
    finally:
        await db.close()
    return ok


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per query (median shown)")
    ap.add_argument("--pg", default=os.environ.get("TOKENHUB_TEST_PG_DSN"), help="PostgreSQL DSN")
    args = ap.parse_args()
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    data = rows(args.events)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        ok &= asyncio.run(bench("SQLite", url, args.events, args.repeat, data))
    if args.pg:
        name = f"tokenhub_bench_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(args.pg, f'CREATE DATABASE "{name}"'))
        pg = urlunsplit(urlsplit(args.pg)._replace(path=f"/{name}"))
        try:
            ok &= asyncio.run(bench("PostgreSQL", pg, args.events, args.repeat, data))
        finally:
            asyncio.run(_admin(args.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
