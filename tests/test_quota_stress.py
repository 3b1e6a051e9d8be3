"""The quota table under concurrency: Python threads, and processes sharing one table file.

The processes are this file run as a script (``python test_quota_stress.py worker ...``), each
attaching the table the test created, as the gateway's workers will. Every worker reports what
it was admitted and what it settled; the table must agree exactly: used = the sum of the actual
usage settled, never above the limit (reservations are upper bounds here), and every reservation
ended settled, cancelled or expired.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from tokenhub._core import QuotaRefusal, QuotaTable

HERE = Path(__file__)
KEYS = ("key-a", "key-b")
TENANT = "tenant"
LONG_TTL_MS = 600_000
DOOMED_TTL_MS = 20  # a "crashed" request: reserved, never settled


def hammer(t: QuotaTable, seed: int, ops: int) -> dict[str, object]:
    """Random reserve/settle/cancel/abandon on KEYS x TENANT; returns what happened."""
    rnd = random.Random(seed)
    idx = {n: t.account(n) for n in (*KEYS, TENANT)}
    live: list[tuple[int, str, int]] = []
    used: Counter[str] = Counter()
    n = Counter[str]()
    for _ in range(ops):
        op = rnd.random()
        if op < 0.5 and len(live) < 16:
            key = rnd.choice(KEYS)
            tokens = rnd.randint(1, 500)
            doomed = rnd.random() < 0.02
            r = t.reserve(
                (idx[key], idx[TENANT]),
                tokens=tokens,
                money=tokens * 3,
                ttl_ms=DOOMED_TTL_MS if doomed else LONG_TTL_MS,
            )
            if isinstance(r, QuotaRefusal):
                n["refused"] += 1
                n[f"refused_{r.limit}"] += 1
                continue
            n["admitted"] += 1
            if doomed:
                n["doomed"] += 1
            else:
                live.append((r, key, tokens))
        elif op < 0.85 and live:
            rid, key, tokens = live.pop(rnd.randrange(len(live)))
            actual = rnd.randint(0, tokens)
            assert t.settle(rid, tokens=actual, money=actual * 3) == (0, 0, False)
            used[key] += actual
            used[TENANT] += actual
            n["settled"] += 1
        elif op < 0.95 and live:
            rid, _, _ = live.pop(rnd.randrange(len(live)))
            assert t.cancel(rid) is True
            n["cancelled"] += 1
        elif op < 0.96:
            n["swept"] += t.expire_due()
    for rid, key, tokens in live:
        t.settle(rid, tokens=tokens, money=tokens * 3)
        used[key] += tokens
        used[TENANT] += tokens
        n["settled"] += 1
    return {"n": dict(n), "used": dict(used)}


def setup_limits(t: QuotaTable, tenant_tokens: int) -> None:
    for k in KEYS:
        i = t.account(k)
        t.set_limit(i, "concurrent", 24)
        t.set_limit(i, "tokens", tenant_tokens // 2 + 20_000)
    i = t.account(TENANT)
    t.set_limit(i, "tokens", tenant_tokens)
    t.set_limit(i, "money", tenant_tokens * 3)


def check_totals(t: QuotaTable, reports: list[dict[str, object]], tenant_tokens: int) -> None:
    n: Counter[str] = Counter()
    used: Counter[str] = Counter()
    for r in reports:
        n.update(r["n"])  # type: ignore[arg-type]
        used.update(r["used"])  # type: ignore[arg-type]
    # Doomed reservations still held expire now.
    t.expire_due(now_ns=QuotaTable.clock_ns() + 3_600 * 10**9)
    for name in (*KEYS, TENANT):
        s = t.snapshot(t.account(name))
        assert s["tokens_used"] == used[name], name
        assert s["tokens_held"] == s["money_held"] == s["inflight"] == 0, name
        assert s["tokens_overrun"] == s["money_overrun"] == 0, name
        assert s["tokens_used"] <= s["tokens_limit"], name
    assert t.snapshot(t.account(TENANT))["money_used"] == 3 * used[TENANT]
    assert used[TENANT] <= tenant_tokens
    st = t.stats()
    assert st["reserved"] == n["admitted"]
    assert (st["held"], st["busy"], st["late"]) == (0, 0, 0)
    assert (st["settled"], st["cancelled"], st["expired"]) == (
        n["settled"],
        n["cancelled"],
        n["doomed"],
    )
    assert n["refused_tokens"] > 0 and n["refused_concurrent"] > 0, n


def test_threads_share_one_table(tmp_path: Path) -> None:
    t = QuotaTable.create(tmp_path / "q", accounts=8, reservations=4096)
    setup_limits(t, tenant_tokens=1_500_000)
    reports: list[dict[str, object]] = []
    stop = threading.Event()

    def sweeper() -> None:
        while not stop.wait(0.005):
            t.expire_due()

    def run(seed: int) -> None:
        reports.append(hammer(t, seed, 50_000))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    sw = threading.Thread(target=sweeper)
    sw.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    sw.join()
    assert len(reports) == 6
    check_totals(t, reports, 1_500_000)


def start_workers(path: Path, args: list[list[str]]) -> list[dict[str, object]]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), *a],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        # All attached: start them together, so they really contend.
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        return [json.loads(o) for o in outs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_processes_share_one_table(tmp_path: Path) -> None:
    path = tmp_path / "q"
    t = QuotaTable.create(path, accounts=8, reservations=4096)
    setup_limits(t, tenant_tokens=800_000)
    reports = start_workers(path, [["worker", str(path), str(seed), "25000"] for seed in range(4)])
    check_totals(t, reports, 800_000)


def test_processes_never_admit_more_than_the_limit(tmp_path: Path) -> None:
    # Four processes each try to hold 20,000 one-token reservations against a limit of 50,000:
    # exactly 50,000 are admitted, not 4 x 50,000 (per-process counters would).
    path = tmp_path / "q"
    t = QuotaTable.create(path, accounts=4, reservations=65_536)
    t.set_limit(t.account("shared"), "tokens", 50_000)
    reports = start_workers(path, [["hold", str(path), "20000"] for _ in range(4)])
    counts = [int(r["admitted"]) for r in reports]  # type: ignore[call-overload]
    assert sum(counts) == 50_000, counts
    assert t.snapshot(t.account("shared"))["tokens_held"] == 50_000
    assert t.stats()["held"] == 50_000


def _worker(argv: list[str]) -> None:
    t = QuotaTable.attach(argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    if argv[0] == "hold":
        k = t.account("shared")
        got = sum(isinstance(t.reserve(k, tokens=1), int) for _ in range(int(argv[2])))
        print(json.dumps({"admitted": got}), flush=True)
    else:
        print(json.dumps(hammer(t, int(argv[2]), int(argv[3]))), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
