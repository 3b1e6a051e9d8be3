"""Settlement throughput of 1 vs K partitioned settlers on PostgreSQL: events settled per second
by real settler processes (`python -m tokenhub.billing.settler --partitions N`) sharing a
backlog by tenant partition.

    .venv/bin/python benches/bench_settle_partitions.py         # PG of TOKENHUB_TEST_PG_DSN
    .venv/bin/python benches/bench_settle_partitions.py --quick # smoke test
    .venv/bin/python benches/bench_settle_partitions.py --events 40000 --settlers 1,2,4
    .venv/bin/python benches/bench_settle_partitions.py --cluster   # the cluster posting path

Workload: bench_settle.py's (40 tenants, packages, wallets, FX, splits). Method: for each K, a
fresh database (created and dropped here), K settler processes started with `--partitions N`
and waited for until they hold all N partitions between them; then `--events` events are
stored in one transaction and the wall time until none is pending is measured (the settlers
poll every 0.2 s, so up to that much of it is waiting for the next pass). Every run is
checked: one settlement row per event, `check_invariants()` empty. On a machine with few
cores the settlers and the PostgreSQL server share them, which bounds what K > 1 gains.
Nothing asserts on time.

`--cluster`: the settlers run in cluster mode as a `serve --host-id` host's settler does
(`--quota` a table of their own, `--host-id S<k>`, `--shared-dir`: `settle_pending(cluster=
True)` and an idle lease agent), and every event carries a gateway host's cluster hold
("@G1/1|pot:m:<tenant>=<amount>"), so each settling transaction also posts the batch's
charges to the budget pots and sets its tenants' caps from the ledger, and every pass syncs
the held partitions' pots, expires leases and writes off silent instances. Also checked:
the pots' `posted` for that instance is the holds' total, `leases.check` empty.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from bench_settle import make_events, open_engine, setup

from tokenhub.billing import leases
from tokenhub.billing.io import store_events
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import _PARTITION_LOCK
from tokenhub.db.database import Database
from tokenhub.usage import UsageEvent

GATEWAY = "G1/1"  # the gateway instance whose holds the events carry (--cluster)


async def held_partitions(url: str) -> dict[int, int]:
    """Backend pid -> partitions held, in this database."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' "
            f"AND classid = {_PARTITION_LOCK} AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) GROUP BY pid"
        )
    finally:
        await conn.close()
    return {r[0]: int(r[1]) for r in rows}


async def run(k: int, args: argparse.Namespace, tmp: Path) -> tuple[float, list[str]]:
    db, drop = await open_engine("postgresql", args.pg, tmp)
    url: str = db.url
    procs: list[subprocess.Popen[bytes]] = []
    try:
        b = Billing(db)
        await setup(b)
        events = make_events(args.events, random.Random(args.seed), f"p{k}_")
        cluster = getattr(args, "cluster", False)
        if cluster:
            for e in events:
                amount = (e.input_tokens + e.output_tokens) * 150
                e.holds = f"@{GATEWAY}|pot:m:{e.tenant}={amount}"
        env = {**os.environ, "TOKENHUB_DB": url}
        cmd = [sys.executable, "-m", "tokenhub.billing.settler", "--interval", "0.2"]
        cmd += ["--batch", str(args.batch), "--partitions", str(args.partitions)]
        procs += [subprocess.Popen(cmd + cluster_args(i, tmp) if cluster else cmd, env=env)
                  for i in range(k)]  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            h = await held_partitions(url)
            share = -(-args.partitions // k)
            if len(h) == k and sum(h.values()) == args.partitions and max(h.values()) <= share:
                break
            if time.monotonic() > deadline:
                return 0.0, [f"settlers did not share the partitions: {h}"]
            await asyncio.sleep(0.1)

        async def store(tx: Any) -> None:
            await store_events(tx, events)

        async def pending(tx: Any) -> int:
            return int(
                await tx.fetchval("SELECT count(*) FROM usage_events WHERE settled_ms IS NULL")
            )

        await db.transaction(store)
        t0 = time.monotonic()
        while await db.transaction(pending):
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0

        async def count(tx: Any) -> int:
            return int(await tx.fetchval("SELECT count(*) FROM settlements"))

        problems = list(await b.invariants())
        n = await db.transaction(count)
        if n != len(events):
            problems.append(f"{n} settlement rows for {len(events)} events")
        if cluster:
            problems += await cluster_check(db, events)
        return elapsed, problems
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        await db.close()
        await drop()


def cluster_args(i: int, tmp: Path) -> list[str]:
    """A host's settler in cluster mode: its own quota table and shared dir (what `tokenhub
    serve` makes before its workers), host id S<i>."""
    from tokenhub.billing.pots import new_epoch
    from tokenhub.quota import Quota

    home = Path(tempfile.mkdtemp(prefix=f"settler{i}-", dir=tmp))
    quota = Quota.create(str(home / "quota"), accounts=1024, reservations=1024)
    new_epoch(quota)
    (home / "shared").mkdir()
    return ["--quota", str(home / "quota"), "--host-id", f"S{i}", "--shared-dir",
            str(home / "shared")]  # fmt: skip


async def cluster_check(db: Database, events: list[UsageEvent]) -> list[str]:
    """The cluster posting path posted every hold once and the pots are sound."""

    async def read(tx: Any) -> tuple[int, list[str]]:
        posted = await tx.fetchval(
            "SELECT COALESCE(SUM(posted), 0) FROM budget_usage WHERE instance = $1", GATEWAY
        )
        return int(posted), await leases.check(tx)

    posted, problems = await db.transaction(read)
    want = sum(int(e.holds.rpartition("=")[2]) for e in events)
    if posted != want:
        problems.append(f"pots posted {posted} for {GATEWAY}, its holds say {want}")
    return problems


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pg", default=os.environ.get("TOKENHUB_TEST_PG_DSN", ""))
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--settlers", default="1,2")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cluster", action="store_true", help="settle_pending(cluster=True)")
    args = ap.parse_args()
    if not args.pg:
        print("needs --pg DSN or TOKENHUB_TEST_PG_DSN (scripts/test-postgres start)")
        return 2
    if args.quick:
        args.events = 2000
    print(f"{args.events} events, {args.partitions} partitions, batch {args.batch}, "
          f"{os.cpu_count()} cores{', cluster mode' if args.cluster else ''}")  # fmt: skip
    print(f"{'settlers':>8} {'seconds':>8} {'events/s':>9}  check")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.settlers.split(",")):
            elapsed, problems = await run(k, args, Path(tmp))
            ok = ok and not problems
            rate = args.events / elapsed if elapsed else 0.0
            verdict = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
            print(f"{k:>8} {elapsed:>8.2f} {rate:>9,.0f}  {verdict}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
