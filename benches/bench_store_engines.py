"""Usage-event writes on both engines: `insert_events` through `open_store`, SQLite and PostgreSQL
side by side, CPU of this process (every thread: the PostgreSQL store's loop thread included)
and wall time per event, in batches of the sink's sizes.

    .venv/bin/python benches/bench_store_engines.py --pg postgresql://tokenhub@127.0.0.1:54329/x
    .venv/bin/python benches/bench_store_engines.py --pg "$(scripts/test-postgres dsn)" --quick

`--pg` names a server where the role may create databases: a fresh database is created for the
run and dropped after. The PostgreSQL server's own CPU is not in the figure (it is another
process; on one machine it competes for the same cores). Each run checks its counts: a
mismatch prints MISMATCH and exits 1. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tokenhub.store import open_store
from tokenhub.usage import UsageEvent


def events(n: int, start: int) -> list[UsageEvent]:
    t0 = time.time_ns() // 1_000_000
    return [
        UsageEvent(
            request_id=f"req_{t0 + i:012x}{uuid.uuid4().hex[:20]}",
            ts_ms=t0 + i,
            tenant=f"tenant-{i % 20}",
            key_id=f"key_{i % 50:012x}",
            endpoint="chat.completions",
            model=f"model-{i % 5}",
            deployment="mock/gpt-4o-mini",
            provider="mock",
            upstream_model="gpt-4o-mini",
            stream=i % 5 < 3,
            input_tokens=200 + i % 700,
            output_tokens=50 + i % 300,
            latency_ms=123.5,
            ttft_ms=20.25 if i % 5 < 3 else None,
        )
        for i in range(start, start + n)
    ]


def run(url: str, total: int, batch: int) -> tuple[float, float]:
    """(CPU µs per event, wall µs per event) of inserting `total` events in `batch`es."""
    store = open_store(url)
    store.migrate()
    try:
        store.insert_events(events(batch, 10**9))  # warm-up: connections, statements
        evs = events(total, 0)
        cpu, wall = time.process_time(), time.perf_counter()
        inserted = 0
        for i in range(0, total, batch):
            inserted += store.insert_events(evs[i : i + batch]).inserted
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        replay = store.insert_events(evs[:batch])
        if inserted != total or replay.duplicates != batch:
            print(f"MISMATCH on {url}: {inserted} of {total}, replay {replay}")
            sys.exit(1)
    finally:
        store.close()
    return cpu / total * 1e6, wall / total * 1e6


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pg", required=True, help="PostgreSQL DSN (a role that may create databases)")
    ap.add_argument("--events", type=int, default=20_000, help="events timed per run")
    ap.add_argument("--batches", default="50,1000", help="batch sizes, comma-separated")
    ap.add_argument("--quick", action="store_true", help="2,000 events: a smoke test")
    args = ap.parse_args()
    total = 2_000 if args.quick else args.events
    name = f"tokenhub_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(args.pg, f'CREATE DATABASE "{name}"'))
    pg = urlunsplit(urlsplit(args.pg)._replace(path=f"/{name}"))
    print("| engine | batch | CPU µs/event | wall µs/event |\n|---|---:|---:|---:|")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for batch in map(int, args.batches.split(",")):
                for engine, url in (
                    ("SQLite", str(Path(tmp) / f"b{batch}.db")),
                    ("PostgreSQL", pg),
                ):
                    cpu, wall = run(url, total, batch)
                    print(f"| {engine} | {batch} | {cpu:.1f} | {wall:.1f} |", flush=True)
    finally:
        asyncio.run(_admin(args.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
