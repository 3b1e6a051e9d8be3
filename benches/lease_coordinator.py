"""The lease coordinator's throughput on PostgreSQL: grant + give_back pairs per second
(tokenhub.billing.leases), one call per transaction and batched 50 pots per transaction (a
host's tick: `batch` gives back the last tick's leases and grants new ones).

    .venv/bin/python benches/lease_coordinator.py           # PG of TOKENHUB_TEST_PG_DSN
    .venv/bin/python benches/lease_coordinator.py --quick   # 1 s per row
    .venv/bin/python benches/lease_coordinator.py --seconds 10 --pots 1000 --json lc.json

Workload: `--pots` money pots with room for every grant; "hosts" are concurrent asyncio tasks
on one connection pool, each its own instance. Unbatched: each host grants a lease on a random
pot, then gives it back (used: a random part), two transactions per pair. Batched: each host's
tick is one transaction giving back the previous tick's 50 leases and granting 50 new ones on
50 random pots (50 pairs per transaction). The "1 pot" rows put every host on one pot (its row
lock serialises them). Each row runs on a fresh database (created and dropped here) for
`--seconds` and is checked afterwards: `check()` finds nothing and the pots' granted matches the
open leases (exit status 1 otherwise). The client and the server share this machine's cores.
Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import asyncpg  # type: ignore[import-untyped]

from tokenhub.billing.leases import Ask, Coordinator, LeaseError
from tokenhub.db.database import PgDatabase

BATCH = 50


@dataclass
class Row:
    mode: str
    hosts: int
    pots: int
    pairs: int
    transactions: int
    seconds: float
    problems: list[str]

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    @property
    def ms_per_txn(self) -> float:
        return 1000 * self.seconds / self.transactions * self.hosts if self.transactions else 0.0


async def fresh(dsn: str) -> tuple[PgDatabase, str]:
    name = f"tokenhub_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = dsn.rpartition("/")
    db = await PgDatabase.connect(f"{base}/{name}", max_size=16)
    await db.migrate()
    return db, name


async def drop(dsn: str, name: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def run(dsn: str, mode: str, hosts: int, pots: int, seconds: float, seed: int) -> Row:
    db, name = await fresh(dsn)
    try:
        c = Coordinator(db)
        names = [f"pot:m:t{i:05d}" for i in range(pots)]
        await c.set_caps({p: (p[6:], "money", 10**15) for p in names})
        pairs = txns = 0
        deadline = time.monotonic() + seconds

        async def unbatched(h: int) -> None:
            nonlocal pairs, txns
            rng = random.Random(seed + h)
            inst, n = f"H{h}/1", 0
            while time.monotonic() < deadline:
                n += 1
                lease = await c.grant(
                    f"{inst}:{n}", rng.choice(names), f"H{h}", 1_000, 1, 30_000, instance=inst
                )
                await c.give_back(lease.id, rng.randint(0, lease.amount))
                pairs += 1
                txns += 2

        async def batched(h: int) -> None:
            nonlocal pairs, txns
            rng = random.Random(seed + h)
            inst, n = f"H{h}/1", 0
            prev: list[tuple[str, int]] = []
            while time.monotonic() < deadline:
                n += 1
                picks = rng.sample(names, BATCH) if len(names) >= BATCH else names * BATCH
                asks = [
                    Ask(f"{inst}:{n}:{i}", p, f"H{h}", 1_000, 1, 30_000, inst)
                    for i, p in enumerate(picks[:BATCH])
                ]
                granted, backs = await c.batch(asks, prev)
                if any(isinstance(x, LeaseError) for x in [*granted, *backs]):
                    raise RuntimeError("a batch item was refused")
                pairs += len(backs)
                txns += 1
                prev = [(a.lease_id, rng.randint(0, 1_000)) for a in asks]
            await c.batch((), prev)  # the last tick's leases back
            pairs += len(prev)
            txns += 1

        started = time.monotonic()
        work = unbatched if mode == "unbatched" else batched
        await asyncio.gather(*(work(h) for h in range(hosts)))
        elapsed = time.monotonic() - started
        problems = await c.check()
        open_left = await db.read(
            lambda tx: tx.fetchval("SELECT count(*) FROM budget_leases WHERE state = 'open'")
        )
        if open_left:
            problems.append(f"{open_left} leases left open")
        return Row(mode, hosts, pots, pairs, txns, elapsed, problems)
    finally:
        await db.close()
        await drop(dsn, name)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pg", default=os.environ.get("TOKENHUB_TEST_PG_DSN", ""))
    ap.add_argument("--seconds", type=float, default=4.0, help="per row")
    ap.add_argument("--pots", type=int, default=500)
    ap.add_argument("--hosts", default="1,8", help="concurrent hosts per row, comma-separated")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--quick", action="store_true", help="1 s per row")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if not args.pg:
        print("needs a PostgreSQL DSN: --pg or TOKENHUB_TEST_PG_DSN", file=sys.stderr)
        return 2
    seconds = 1.0 if args.quick else args.seconds
    hosts = [int(h) for h in args.hosts.split(",")]
    rows: list[Row] = []
    for mode in ("unbatched", "batched"):
        for pots in (args.pots, 1):
            for h in hosts:
                if pots == 1 and h == 1:
                    continue  # the same as many pots for one host
                print(f"{mode}, {h} hosts, {pots} pots ...", file=sys.stderr)
                rows.append(await run(args.pg, mode, h, pots, seconds, args.seed))
    print("| mode | hosts | pots | pairs/s | transactions | ms per transaction | check |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        per = f"{BATCH} pots" if r.mode == "batched" else "1 call"
        print(
            f"| {r.mode} ({per}) | {r.hosts} | {r.pots} | {r.pairs_per_s:,.0f} | "
            f"{r.transactions:,} | {r.ms_per_txn:.2f} | "
            f"{'ok' if not r.problems else '; '.join(r.problems[:3])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": {"python": sys.version, "platform": platform.platform(),
                                "cpus": os.cpu_count()},
                    "rows": [asdict(r) | {"pairs_per_s": r.pairs_per_s} for r in rows],
                },
                f,
                indent=2,
            )  # fmt: skip
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
