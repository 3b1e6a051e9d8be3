"""A process that settles usage events against a shared SQLite ledger (test_concurrency.py).

    python settle_worker.py DB_PATH FIRST COUNT

Opens the database, prints `ready`, waits for a line on stdin, then settles events FIRST ..
FIRST+COUNT-1 (see `event`) one per transaction and prints a JSON summary (with the time
window it settled in).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from tokenhub.billing.service import Billing
from tokenhub.db.database import open_database
from tokenhub.usage import UsageEvent

TENANT = "shared"
MODEL = "flat"
PRICE_PER_1M = "1.00"  # CNY, output tokens
TS = 1_793_577_600_000  # 2026-11-02


def event(i: int) -> UsageEvent:
    """Event i costs (1 + i % 7) x 0.1 CNY at PRICE_PER_1M."""
    return UsageEvent(
        request_id=f"mp_{i:05d}",
        ts_ms=TS + i,
        tenant=TENANT,
        key_id="k",
        endpoint="chat.completions",
        model=MODEL,
        provider="prov",
        output_tokens=100_000 * (1 + i % 7),
    )


async def main(path: str, first: int, count: int) -> None:
    db = await open_database(f"sqlite:///{path}", migrate=False)
    b = Billing(db)
    print("ready", flush=True)
    sys.stdin.readline()
    settled = failed = 0
    start = time.time()
    for i in range(first, first + count):
        r = await b.settle([event(i)])
        settled += r.settled
        failed += len(r.failed) + len(r.conflicts)
    end = time.time()
    await db.close()
    print(json.dumps({"settled": settled, "failed": failed, "window": [start, end]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
