"""What cluster mode adds to a request's money admission when the budget is slack.

Two `Contracts` over two quota tables in one process, the same terms (a tenant paying from its
wallet in another currency at a discount, so admission prices and converts): **single-host**
(the pot's limit is the ledger's balance, holds tagged with the table's epoch) and **cluster**
(the pot's limit is what the host's lease agent leased, holds tagged "@<instance>", a
`WantLink` to an agent socket). With slack budgets no request waits for a lease, so the two do
the same work but for the tag; this measures that they cost the same. Measured in the same run,
interleaved in rounds so the machine's noise weighs on both alike:

- `admit+settle`: `Contracts.admit` (price the worst case, reserve it) and `Hold.settle`
  (charge the actual usage, build the hold string);
- `money step`: the gateway's admission step (`tokenhub.gateway.admission.money.reserve`,
  which returns a wait only when the pool is short) and the settle.

Reported: the median over rounds of each mode's mean µs per request, and cluster / single-host.

With `--pg URL` (an empty database, which it migrates and fills) it also runs a host's lease
agent (tokenhub.billing.leasing) on PostgreSQL under a steady load (`--rps` requests a second,
each settled 50 ms after its admission, for `--seconds`): coordinator calls per request after
the first 2 s (the issue's target: <= 0.1), and how many requests had to wait for a lease.

    .venv/bin/python benches/bench_lease_admission.py [--rounds 30] [--per-round 2000]
        [--pg postgresql://.../empty_db --rps 200 --seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from tokenhub.billing.draw import money_pot
from tokenhub.billing.leasing import WantLink
from tokenhub.billing.pots import READY_ACCOUNT, Contracts, Hold, Terms, new_epoch
from tokenhub.billing.service import Price, Profile
from tokenhub.gateway.admission import Admission
from tokenhub.gateway.admission.money import reserve
from tokenhub.quota import Quota
from tokenhub.usage import UsageEvent

TENANT = "acme"
MODEL = "m"
WORST = [1200, 0, 4096]
ACTUAL = [1200, 0, 300]


def contracts(cluster_dir: Path | None) -> Contracts:
    q = Quota.anonymous(accounts=64, reservations=4096)
    new_epoch(q)
    link = WantLink(q, cluster_dir, "A", wait_ms=1000) if cluster_dir is not None else None
    c = Contracts(q, db=None, cluster=link)  # type: ignore[arg-type]
    t = Terms()
    t.profiles[TENANT] = Profile(TENANT, "CNY", ("wallet",), 0, None, 50_000)
    t.prices[(MODEL, "")] = [
        Price(MODEL, "", 1, 0, "USD", 150_000_000, 75_000_000, 600_000_000, None)
    ]
    t.fx[("USD", "CNY")] = [(0, Decimal("7.1"))]
    c.terms = t
    if link is None:
        q.set_limits(money_pot(TENANT), money=10**17)  # the ledger's balance (PotSync)
    else:
        q.set_limits(money_pot(TENANT), money=0, requests=0)  # as the agent creates it
        q.add_budget(money_pot(TENANT), "money", 10**17)  # what it leased
    q.set_limits(READY_ACCOUNT, requests=1)
    return c


def admit_settle(c: Contracts, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        hold = c.admit(TENANT, MODEL, 1, list(WORST), 60_000)
        assert isinstance(hold, Hold)
        hold.settle(ACTUAL)
    return (time.perf_counter_ns() - t0) / n / 1000


def money_step(c: Contracts, n: int) -> float:
    event = UsageEvent(request_id="r", ts_ms=1, tenant=TENANT, key_id="k",
                       endpoint="chat.completions", model=MODEL)  # fmt: skip
    t0 = time.perf_counter_ns()
    for _ in range(n):
        adm = Admission()
        wait = reserve(c, event, adm, WORST[0], WORST[2], 60_000)
        assert wait is None and adm.hold is not None
        adm.hold.settle(ACTUAL)
    return (time.perf_counter_ns() - t0) / n / 1000


async def steady(url: str, rps: int, seconds: float) -> dict[str, Any]:
    """Coordinator calls per request of one host under a steady load (see the docstring)."""
    from tokenhub.billing.leasing import LeaseAgent
    from tokenhub.billing.service import Billing
    from tokenhub.billing.settler import settle_pending
    from tokenhub.db.database import open_database

    db = await open_database(url)
    b = Billing(db)
    await b.set_price(MODEL, currency="USD", input_per_1m="1", output_per_1m="2",
                      effective_ms=0)  # fmt: skip
    await b.set_profile(TENANT, currency="USD", draw_order=["wallet"])
    await b.topup(TENANT, "100000", "USD")
    await settle_pending(b, cluster=True)  # the pot's cap
    q = Quota.anonymous(accounts=64, reservations=16384)
    new_epoch(q)
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="tokenhub-bench-lease-") as tmp:
        agent = LeaseAgent(q, db, host="bench", shared_dir=tmp)
        await agent.start()
        link = WantLink(q, tmp, "bench", wait_ms=1000)
        c = Contracts(q, db, cluster=link)
        await c.start()
        requests = waited = refused = 0
        calls0 = 0
        start = loop.time()
        warm = start + 2.0
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            nonlocal waited, refused
            hold = c.admit(TENANT, MODEL, int(time.time() * 1000), list(WORST), 60_000)
            if not isinstance(hold, Hold):
                waited += 1
                hold = await c.acquire(TENANT, MODEL, int(time.time() * 1000), list(WORST),
                                       60_000)  # fmt: skip
            if not isinstance(hold, Hold):
                refused += 1
                return
            await asyncio.sleep(0.05)
            hold.settle(ACTUAL)

        i = 0
        while loop.time() < start + seconds:
            if loop.time() >= warm and not calls0:
                calls0, requests, waited = agent.counts["calls"], 0, 0
            t = asyncio.create_task(one())
            pending.add(t)
            t.add_done_callback(pending.discard)
            requests += 1
            i += 1
            await asyncio.sleep(max(0.0, start + i / rps - loop.time()))
        await asyncio.gather(*pending)
        calls = agent.counts["calls"] - calls0
        await c.close()
        link.close()
        await agent.close()
    await db.close()
    return {
        "rps": rps,
        "requests": requests,
        "calls": calls,
        "calls_per_request": round(calls / max(1, requests), 4),
        "waited": waited,
        "refused": refused,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--pg", metavar="URL", help="an empty PostgreSQL database: steady load")
    ap.add_argument("--rps", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenhub-bench-lease-") as tmp:
        modes = {"single-host": contracts(None), "cluster": contracts(Path(tmp))}
        out: dict[str, Any] = {}
        for name, fn in (("admit+settle", admit_settle), ("money step", money_step)):
            for c in modes.values():  # warm up
                fn(c, args.per_round)
            per: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode, c in modes.items():
                    per[mode].append(fn(c, args.per_round))
            med = {m: statistics.median(v) for m, v in per.items()}
            out[name] = {**{f"{m}_us": round(v, 3) for m, v in med.items()},
                         "ratio": round(med["cluster"] / med["single-host"], 4)}  # fmt: skip
            print(
                f"{name:14} single-host {med['single-host']:7.2f} µs  cluster "
                f"{med['cluster']:7.2f} µs  cluster/single {out[name]['ratio']:.3f}",
                flush=True,
            )
        tags = {m: c.tag for m, c in modes.items()}
        print(f"hold tags: {tags}", file=sys.stderr)
    if args.pg:
        out["steady"] = got = asyncio.run(steady(args.pg, args.rps, args.seconds))
        print(
            f"steady load   {got['rps']} req/s: {got['calls']} coordinator calls for "
            f"{got['requests']} requests ({got['calls_per_request']:.4f} per request), "
            f"{got['waited']} waited for a lease, {got['refused']} refused",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
