"""Usage settlement throughput: events settled per second by `Billing.settle`, per transaction
size, on SQLite and PostgreSQL, against the rate the gateway produces events.

    .venv/bin/python benches/bench_settle.py                          # SQLite (+ PG if set), ~1 min
    .venv/bin/python benches/bench_settle.py --quick                  # smoke test, a few seconds
    .venv/bin/python benches/bench_settle.py --pg postgresql://tokenhub@127.0.0.1:54329/tokenhub_test
    .venv/bin/python benches/bench_settle.py --events 20000 --batches 1,100,1000 --json st.json

PostgreSQL runs when ``--pg DSN`` is given or ``TOKENHUB_TEST_PG_DSN`` is set (``scripts/test-
postgres start`` prints one); each run gets a database of its own, created and dropped here.

Workload (the same on both engines, seeded): 40 tenants. Half settle in CNY and hold a monthly
10M-token package with a USD overage (so most of their events draw a lot, and the ones past it
are converted at an effective-dated FX rate); a quarter are CNY wallets, a quarter USD wallets.
Four models: two priced in USD, one in CNY, one in EUR (converted too); three providers with
20/5/75 style revenue splits. Each event has 200-4000 input tokens (a third with cached input)
and 20-1200 output tokens, a random tenant and model, and a time in the current month.

Method: for each (engine, batch size) a fresh database is set up, ``--warmup`` events are
settled, then ``--events`` new events are settled in calls of ``batch`` events each, one call at
a time (the sink's settler is one writer), timed with the wall clock; CPU time is
``time.process_time`` (all threads of this process: SQLite's writer thread included;
PostgreSQL's server CPU is not in it). Batch 1 also runs with ``--concurrency`` calls in flight
(``1 x N``), which on PostgreSQL spreads over the pool. Every run is then checked: each event
settled exactly once, a replay posts nothing, ``check_invariants()`` empty; and once per run
the money charged for 400 wallet-paid events equals their prices recomputed here from the price
book (per line, half-to-even, FX by date). A failure prints MISMATCH and makes the script exit
with status 1. The last column is events/s divided by ``--gateway-rps`` (default
6000: what benches/bench_gateway.py measured at 64 connections), i.e. how many gateways'
traffic one settler keeps up with. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from tokenhub.billing import ledger as L
from tokenhub.billing.service import Billing
from tokenhub.db.database import Database, PgDatabase, open_database
from tokenhub.usage import UsageEvent

NANOS = 10**9
MONTH_START = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1000)
# model: (currency, input, cached input, output per 1M tokens, provider)
MODELS = {
    "gpt-4o-mini": ("USD", "0.15", "0.075", "0.60", "openai"),
    "gpt-4o": ("USD", "2.50", "1.25", "10.00", "openai"),
    "qwen-plus": ("CNY", "0.80", "0.20", "2.00", "dashscope"),
    "mistral-small": ("EUR", "0.20", "0.20", "0.60", "mistral"),
}
FX = [  # base, quote, rate, effective (days after MONTH_START)
    ("USD", "CNY", "7.10", -60),
    ("USD", "CNY", "7.25", 14),
    ("EUR", "CNY", "7.80", -60),
    ("EUR", "USD", "1.08", -60),
    ("CNY", "USD", "0.14", -60),
]
SPLITS = {"openai": ("20", "5"), "dashscope": ("15", "0"), "mistral": ("25", "5")}
N_TENANTS = 40


@dataclass
class Row:
    engine: str
    batch: str
    events: int
    seconds: float
    cpu_seconds: float
    events_per_s: float
    cpu_us_per_event: float
    gateways: float
    ok: bool


def tenants() -> list[tuple[str, str, bool]]:
    """(tenant, currency, has a package)."""
    out = []
    for i in range(N_TENANTS):
        if i < N_TENANTS // 2:
            out.append((f"tel{i:02d}", "CNY", True))
        elif i < 3 * N_TENANTS // 4:
            out.append((f"cny{i:02d}", "CNY", False))
        else:
            out.append((f"usd{i:02d}", "USD", False))
    return out


def make_events(n: int, rng: random.Random, prefix: str) -> list[UsageEvent]:
    ts = tenants()
    models = list(MODELS)
    out = []
    for i in range(n):
        tenant = rng.choice(ts)[0]
        model = rng.choice(models)
        inp = rng.randint(200, 4000)
        out.append(
            UsageEvent(
                request_id=f"{prefix}{i:08d}",
                ts_ms=MONTH_START + rng.randint(0, 27 * 86_400_000),
                tenant=tenant,
                key_id="k",
                endpoint="chat.completions",
                model=model,
                provider=MODELS[model][4],
                input_tokens=inp,
                cached_input_tokens=rng.randint(0, inp) if rng.random() < 0.33 else 0,
                output_tokens=rng.randint(20, 1200),
            )
        )
    return out


async def setup(b: Billing) -> None:
    for model, (cur, pin, pc, pout, _) in MODELS.items():
        await b.set_price(
            model,
            currency=cur,
            input_per_1m=pin,
            cached_input_per_1m=pc,
            output_per_1m=pout,
            effective_ms=MONTH_START - 90 * 86_400_000,
        )
    for base, quote, rate, days in FX:
        await b.set_fx(base, quote, rate, effective_ms=MONTH_START + days * 86_400_000)
    for prov, (pp, cp) in SPLITS.items():
        await b.set_split(prov, platform_pct=pp, channel_pct=cp, effective_ms=0)
    await b.create_plan(
        "pkg-10m",
        price="9.90",
        currency="CNY",
        tokens=10_000_000,
        overage_per_1m="0.50",
        overage_currency="USD",
    )
    for tenant, cur, package in tenants():
        await b.set_profile(tenant, currency=cur)
        await b.topup(tenant, "100000.00", cur, ts_ms=MONTH_START)
        if package:
            await b.assign(tenant, "pkg-10m", start_ms=MONTH_START)


async def check(b: Billing, events: list[UsageEvent], settled: int) -> list[str]:
    problems = list(await b.invariants())
    if settled != len(events):
        problems.append(f"settled {settled} of {len(events)}")

    async def count(tx: Any) -> int:
        return int(await tx.fetchval("SELECT COUNT(*) FROM settlements"))

    n = await b.db.transaction(count)
    if n != len(events):
        problems.append(f"{n} settlement rows for {len(events)} events")
    # A replay of the whole run is all duplicates and posts nothing.
    again = await b.settle(events[-1000:])
    if again.duplicates != len(events[-1000:]) or again.settled:
        problems.append(f"replay: {again.settled} settled, {again.duplicates} duplicates")
    return problems


async def open_engine(engine: str, pg_dsn: str, tmp: Path) -> tuple[Database, Any]:
    """A fresh database; returns it and a cleanup coroutine function."""
    if engine == "sqlite":
        path = tmp / f"settle-{uuid.uuid4().hex[:8]}.db"
        db = await open_database(f"sqlite:///{path}")

        async def drop() -> None:
            for p in tmp.glob(path.name + "*"):
                p.unlink()

        return db, drop
    import asyncpg  # type: ignore[import-untyped]

    name = f"tokenhub_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = pg_dsn.rpartition("/")
    pg = await PgDatabase.connect(f"{base}/{name}", max_size=32)
    await pg.migrate()

    async def drop_pg() -> None:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    return pg, drop_pg


async def run_one(
    engine: str, batch: int, concurrency: int, args: argparse.Namespace, tmp: Path
) -> Row:
    db, drop = await open_engine(engine, args.pg, tmp)
    b = Billing(db)
    label = f"1 x {concurrency}" if concurrency > 1 else str(batch)
    try:
        await setup(b)
        rng = random.Random(args.seed)
        warm = make_events(args.warmup, rng, "warm_")
        for i in range(0, len(warm), 100):
            await b.settle(warm[i : i + 100])
        n = args.events if batch > 1 else min(args.events, args.single_events)
        events = make_events(n, rng, "ev_")
        settled = 0
        t0, c0 = time.perf_counter(), time.process_time()
        if concurrency > 1:
            sem = asyncio.Semaphore(concurrency)

            async def one(ev: UsageEvent) -> int:
                async with sem:
                    return (await b.settle([ev])).settled

            settled = sum(await asyncio.gather(*(one(e) for e in events)))
        else:
            for i in range(0, n, batch):
                settled += (await b.settle(events[i : i + batch])).settled
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        problems = await check(b, warm + events, settled + len(warm))
        for p in problems:
            print(f"MISMATCH {engine} batch {label}: {p}", file=sys.stderr)
        eps = n / secs
        return Row(engine, label, n, secs, cpu, eps, cpu / n * 1e6, eps / args.gateway_rps,
                   not problems)  # fmt: skip
    finally:
        await db.close()
        await drop()


async def amounts_check(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Correctness beside speed: for wallet-only tenants, the money charged for a sample of
    events equals the list price recomputed here (line by line, half-to-even, FX by date)."""
    db, drop = await open_engine("sqlite", "", tmp)
    b = Billing(db)
    problems: list[str] = []
    try:
        await setup(b)
        rng = random.Random(args.seed + 1)
        events = [e for e in make_events(400, rng, "chk_") if not e.tenant.startswith("tel")]
        await b.settle(events)
        for e in events:
            cur, pin, pc, pout, _ = MODELS[e.model]
            tcur = "USD" if e.tenant.startswith("usd") else "CNY"
            lines = [
                (e.input_tokens - e.cached_input_tokens, pin),
                (e.cached_input_tokens, pc),
                (e.output_tokens, pout),
            ]
            price = sum(round(Fraction(n) * Fraction(p) * NANOS / 10**6) for n, p in lines)
            if cur != tcur:
                rates = sorted(
                    (d, r) for bq, qq, r, d in FX if (bq, qq) == (cur, tcur)
                    if MONTH_START + d * 86_400_000 <= e.ts_ms
                )  # fmt: skip
                price = round(price * Fraction(rates[-1][1]))

            async def legs(tx: Any, ev: UsageEvent = e, cur: str = tcur) -> int:
                v = await tx.fetchval(
                    "SELECT SUM(p.amount) FROM ledger_txns t JOIN postings p "
                    "ON p.txn_id = t.id WHERE t.kind = 'usage' AND t.ref = $1 "
                    "AND p.account = $2",
                    ev.request_id,
                    L.wallet(ev.tenant, cur),
                )
                return int(v)

            got = await db.transaction(legs)
            if got != price:
                problems.append(f"{e.request_id}: charged {got}, list price {price}")
    finally:
        await db.close()
        await drop()
    return problems


def table(rows: list[Row], gateway_rps: int) -> str:
    out = [
        f"| engine | events per transaction | events | events/s | CPU µs/event "
        f"| × gateway ({gateway_rps:,} req/s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r.ok else " MISMATCH"
        out.append(
            f"| {r.engine} | {r.batch}{flag} | {r.events:,} | {r.events_per_s:,.0f} "
            f"| {r.cpu_us_per_event:,.0f} | {r.gateways:.2f} |"
        )
    return "\n".join(out)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pg", default=os.environ.get("TOKENHUB_TEST_PG_DSN", ""),
                    help="PostgreSQL DSN (a role that may create databases)")  # fmt: skip
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--single-events", type=int, default=3_000,
                    help="events for the one-event-per-transaction runs (1 and 1 x N)")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--batches", default="1,100,1000")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--gateway-rps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.events, args.single_events, args.warmup = 2_000, 300, 100
    engines = ["sqlite"] + (["postgresql"] if args.pg else [])
    batches = [int(x) for x in args.batches.split(",")]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-settle-") as d:
        tmp = Path(d)
        problems = await amounts_check(args, tmp)
        for p in problems:
            print(f"MISMATCH amounts: {p}", file=sys.stderr)
        for engine in engines:
            for batch in batches:
                print(f"{engine}: batch {batch} ...", file=sys.stderr, flush=True)
                rows.append(await run_one(engine, batch, 1, args, tmp))
                if batch == 1 and args.concurrency > 1:
                    print(f"{engine}: 1 x {args.concurrency} ...", file=sys.stderr, flush=True)
                    rows.append(await run_one(engine, 1, args.concurrency, args, tmp))
    print(table(rows, args.gateway_rps))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "platform": platform.platform()},
                    "gateway_rps": args.gateway_rps,
                    "rows": [asdict(r) for r in rows],
                    "amount_mismatches": problems,
                },
                indent=2,
            )
        )  # fmt: skip
    return 1 if problems or not all(r.ok for r in rows) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
