"""Quota admission: reserve+settle pairs per second, and what one admission adds to a request.

    .venv/bin/python benches/bench_quota.py                 # ~1.5 minutes
    .venv/bin/python benches/bench_quota.py --quick         # smoke test, ~20 s
    .venv/bin/python benches/bench_quota.py --duration 3 --json quota.json

A pair is one reservation (tokens 1,000, money 5,000 nano-units, one request, one concurrency
slot) and its settlement (700 tokens, 3,500 nano-units): the work a gateway does per request.
Every implementation runs on one account that every thread and process shares, in three ways:
one thread; two threads of one process (GIL and all); two processes started together, each
timing its own window. Implementations, side by side in one run:

* ``tokenhub Rust``: examples/quota_bench.rs (``cargo run --release --example quota_bench``),
  the core without Python; all six limits set (tokens, money, requests, concurrent, rpm, tpm).
* ``tokenhub._core``: ``QuotaTable.reserve``/``settle`` from Python, same limits, on a table in
  /dev/shm that the second process attaches.
* ``tokenhub.quota``: the wrapper the gateway will use (names, dataclass results).
* ``Python + threading.Lock``: a dict of accounts and reservations under one lock, checking
  tokens, money and concurrency (fewer limits than tokenhub). Across processes it cannot share
  a limit: each process would enforce its own, N times the limit (the LiteLLM failure mode), so
  its two-process cell is n/a.
* ``Python + multiprocessing.Lock``: the same over a shared-memory array and a process-shared
  lock: the plain-Python way to get one limit across processes.
* ``Redis Lua``: a private ``redis-server`` on a free loopback port (installed with apt-get when
  missing and the bench runs as root; started with no persistence and stopped afterwards), one
  EVALSHA per reserve (INCRBY the held amount, check it against the limit, roll back if over,
  record the reservation) and one per settle, through redis-py (``pip install redis``).

After each run the implementation's own counters are checked: used = pairs x 700, nothing held,
no concurrency slot left; a mismatch prints MISMATCH and makes the bench exit with status 1.

Admission latency: the time of one ``reserve`` call (wrapper, then core) measured call by call
in one thread, alone and while a second process hammers the same account, with p50/p99/p99.9;
the bar is under 50 µs. Nothing asserts on time: the bars are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tokenhub._core import QuotaTable
from tokenhub.quota import Quota, Reservation

ROOT = Path(__file__).resolve().parent.parent
TOKENS, MONEY, ACTUAL_TOKENS, ACTUAL_MONEY = 1_000, 5_000, 700, 3_500
BIG = 1 << 60
Pair = Callable[[], None]
PERCENTILES = (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- implementations: each makes a per-thread "pair" function and checks its totals ------------


def shm_path() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"tokenhub-bench-quota-{os.getpid()}"


class CoreImpl:
    name = "tokenhub._core (from Python)"
    cross_process = True

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            self.path = str(shm_path())
            self.t = QuotaTable.create(self.path, 16, 16_384)
            k = self.t.account("key")
            for limit, v in [
                ("tokens", BIG),
                ("money", BIG),
                ("requests", BIG),
                ("concurrent", 1 << 20),
                ("rpm", 1 << 40),
                ("tpm", 1 << 50),
            ]:
                self.t.set_limit(k, limit, v)
        else:
            self.path = path
            self.t = QuotaTable.attach(path)
        self.k = self.t.account("key")

    def spec(self) -> tuple[str, str]:
        return (type(self).__name__, self.path)

    def pair(self) -> Pair:
        reserve, settle, k = self.t.reserve, self.t.settle, self.k

        def run() -> None:
            r = reserve(k, TOKENS, MONEY)
            settle(r, ACTUAL_TOKENS, ACTUAL_MONEY)  # type: ignore[arg-type]

        return run

    def check(self, pairs: int) -> str | None:
        s, st = self.t.snapshot(self.k), self.t.stats()
        bad = s["tokens_used"] != pairs * ACTUAL_TOKENS or s["tokens_held"] or s["inflight"]
        if bad or st["held"] or st["settled"] - self.base_settled != pairs:
            return f"used {s['tokens_used']}, held {s['tokens_held']}, {st['settled']} settled"
        return None

    def reset(self) -> None:
        self.t.reset_used(self.k, "tokens")
        self.t.reset_used(self.k, "money")
        self.t.reset_used(self.k, "requests")
        self.base_settled = self.t.stats()["settled"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class WrapperImpl(CoreImpl):
    name = "tokenhub.quota.Quota (names, dataclasses)"

    def pair(self) -> Pair:
        q = Quota(self.t)
        reserve, settle = q.reserve, q.settle

        def run() -> None:
            r = reserve("key", tokens=TOKENS, money=MONEY)
            assert isinstance(r, Reservation)
            settle(r, tokens=ACTUAL_TOKENS, money=ACTUAL_MONEY)

        return run


class LockImpl:
    """Reserve/settle under a threading.Lock: tokens, money and concurrency."""

    name = "Python dict + threading.Lock"
    cross_process = False

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acct = {"limit": BIG, "money_limit": BIG, "held": 0, "used": 0}
        self.acct.update(money_held=0, money_used=0, inflight=0, conc_limit=1 << 20)
        self.res: dict[int, tuple[int, int]] = {}
        self.ids = itertools.count(1)

    def spec(self) -> tuple[str, str]:
        raise NotImplementedError

    def pair(self) -> Pair:
        lock, a, res, ids = self.lock, self.acct, self.res, self.ids

        def reserve(tokens: int, money: int) -> int:
            with lock:
                if a["held"] + a["used"] + tokens > a["limit"]:
                    return 0
                if a["money_held"] + a["money_used"] + money > a["money_limit"]:
                    return 0
                if a["inflight"] >= a["conc_limit"]:
                    return 0
                a["held"] += tokens
                a["money_held"] += money
                a["inflight"] += 1
                rid = next(ids)
                res[rid] = (tokens, money)
                return rid

        def settle(rid: int, tokens: int, money: int) -> None:
            with lock:
                held, held_money = res.pop(rid)
                a["held"] -= held
                a["used"] += tokens
                a["money_held"] -= held_money
                a["money_used"] += money
                a["inflight"] -= 1

        def run() -> None:
            settle(reserve(TOKENS, MONEY), ACTUAL_TOKENS, ACTUAL_MONEY)

        return run

    def check(self, pairs: int) -> str | None:
        a = self.acct
        if a["used"] != pairs * ACTUAL_TOKENS or a["held"] or a["inflight"] or self.res:
            return f"used {a['used']}, held {a['held']}"
        return None

    def reset(self) -> None:
        self.acct["used"] = self.acct["money_used"] = 0

    def close(self) -> None:
        pass


# Shared-array layout of the multiprocessing baseline.
LIMIT, HELD, USED, MLIMIT, MHELD, MUSED, INFLIGHT, CONC = range(8)


class MpLockImpl:
    """The same under a multiprocessing.Lock, over a shared-memory array (one limit for all)."""

    name = "Python + multiprocessing.Lock, shared memory"
    cross_process = True

    def __init__(self, shared: tuple[Any, Any] | None = None) -> None:
        if shared is None:
            ctx = mp.get_context("spawn")
            arr = ctx.RawArray("q", 8)
            arr[LIMIT] = arr[MLIMIT] = BIG
            arr[CONC] = 1 << 20
            shared = (ctx.Lock(), arr)
        self.lock, self.arr = shared

    def spec(self) -> tuple[str, Any]:
        return (type(self).__name__, (self.lock, self.arr))

    def pair(self) -> Pair:
        lock, a = self.lock, self.arr
        res: dict[int, tuple[int, int]] = {}
        ids = itertools.count(1)

        def run() -> None:
            with lock:
                if (
                    a[HELD] + a[USED] + TOKENS > a[LIMIT]
                    or a[MHELD] + a[MUSED] + MONEY > a[MLIMIT]
                    or a[INFLIGHT] >= a[CONC]
                ):
                    return
                a[HELD] += TOKENS
                a[MHELD] += MONEY
                a[INFLIGHT] += 1
                rid = next(ids)
                res[rid] = (TOKENS, MONEY)
            with lock:
                held, held_money = res.pop(rid)
                a[HELD] -= held
                a[USED] += ACTUAL_TOKENS
                a[MHELD] -= held_money
                a[MUSED] += ACTUAL_MONEY
                a[INFLIGHT] -= 1

        return run

    def check(self, pairs: int) -> str | None:
        a = self.arr
        if a[USED] != pairs * ACTUAL_TOKENS or a[HELD] or a[INFLIGHT]:
            return f"used {a[USED]}, held {a[HELD]}"
        return None

    def reset(self) -> None:
        self.arr[USED] = self.arr[MUSED] = 0

    def close(self) -> None:
        pass


RESERVE_LUA = """
local held = redis.call('INCRBY', KEYS[1], ARGV[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if held + used > tonumber(ARGV[3]) then
  redis.call('DECRBY', KEYS[1], ARGV[1])
  return 0
end
local mheld = redis.call('INCRBY', KEYS[3], ARGV[2])
local mused = tonumber(redis.call('GET', KEYS[4]) or '0')
if mheld + mused > tonumber(ARGV[4]) then
  redis.call('DECRBY', KEYS[3], ARGV[2])
  redis.call('DECRBY', KEYS[1], ARGV[1])
  return 0
end
local inflight = redis.call('INCR', KEYS[5])
if inflight > tonumber(ARGV[5]) then
  redis.call('DECR', KEYS[5])
  redis.call('DECRBY', KEYS[3], ARGV[2])
  redis.call('DECRBY', KEYS[1], ARGV[1])
  return 0
end
local id = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[7], id, ARGV[1] .. ':' .. ARGV[2])
return id
"""

SETTLE_LUA = """
local r = redis.call('HGET', KEYS[7], ARGV[1])
if not r then return -1 end
redis.call('HDEL', KEYS[7], ARGV[1])
local sep = string.find(r, ':')
redis.call('DECRBY', KEYS[1], tonumber(string.sub(r, 1, sep - 1)))
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('DECRBY', KEYS[3], tonumber(string.sub(r, sep + 1)))
redis.call('INCRBY', KEYS[4], ARGV[3])
redis.call('DECR', KEYS[5])
return 1
"""

REDIS_KEYS = ["q:held", "q:used", "q:mheld", "q:mused", "q:inflight", "q:ids", "q:res"]


class RedisImpl:
    name = "Redis 7 Lua scripts (INCRBY), local server"
    cross_process = True

    def __init__(self, port: int) -> None:
        import redis

        self.port = port
        self.r = redis.Redis(host="127.0.0.1", port=port)
        self.reserve_sha = self.r.script_load(RESERVE_LUA)
        self.settle_sha = self.r.script_load(SETTLE_LUA)

    def spec(self) -> tuple[str, int]:
        return (type(self).__name__, self.port)

    def pair(self) -> Pair:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port)
        rsha, ssha, keys = self.reserve_sha, self.settle_sha, REDIS_KEYS

        def run() -> None:
            rid = r.evalsha(rsha, 7, *keys, TOKENS, MONEY, BIG, BIG, 1 << 20)
            r.evalsha(ssha, 7, *keys, rid, ACTUAL_TOKENS, ACTUAL_MONEY)

        return run

    def check(self, pairs: int) -> str | None:
        held, used, inflight = (int(self.r.get(k) or 0) for k in REDIS_KEYS[:2] + REDIS_KEYS[4:5])
        if used != pairs * ACTUAL_TOKENS or held or inflight or self.r.hlen("q:res"):
            return f"used {used}, held {held}, inflight {inflight}"
        return None

    def reset(self) -> None:
        self.r.set("q:used", 0)
        self.r.set("q:mused", 0)

    def close(self) -> None:
        self.r.close()


def make_impl(spec: tuple[str, Any]) -> Any:
    kind, arg = spec
    return {"CoreImpl": CoreImpl, "WrapperImpl": WrapperImpl, "MpLockImpl": MpLockImpl}.get(
        kind, RedisImpl
    )(arg)


# -- runners -----------------------------------------------------------------------------------


def timed(pair: Pair, seconds: float) -> tuple[int, float]:
    """Pairs done in about `seconds` (checked every 256 pairs)."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(256):
            pair()
        n += 256
        now = time.perf_counter()
        if now >= deadline:
            return n, now - start


def run_threads(impl: Any, threads: int, seconds: float) -> tuple[float, int]:
    pairs = [impl.pair() for _ in range(threads)]
    for p in pairs:  # warm-up
        timed(p, 0.05)
    impl.reset()
    results: list[tuple[int, float]] = []
    go = threading.Barrier(threads)

    def work(p: Pair) -> None:
        go.wait()
        results.append(timed(p, seconds))

    ts = [threading.Thread(target=work, args=(p,)) for p in pairs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(n / el for n, el in results), sum(n for n, _ in results)


def _proc_worker(spec: tuple[str, Any], seconds: float, ready: Any, go: Any, out: Any) -> None:
    impl = make_impl(spec)
    pair = impl.pair()
    timed(pair, 0.05)
    ready.put(1)
    go.wait()
    out.put(timed(pair, seconds))


def run_processes(impl: Any, procs: int, seconds: float) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    ps = [
        ctx.Process(target=_proc_worker, args=(impl.spec(), seconds, ready, go, out))
        for _ in range(procs)
    ]
    for p in ps:
        p.start()
    try:
        for _ in ps:
            ready.get(timeout=60)
        # The workers' warm-up pairs are done: count from here.
        impl.reset()
        go.set()
        results = [out.get(timeout=seconds + 60) for _ in ps]
    finally:
        for p in ps:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sum(n / el for n, el in results), sum(n for n, _ in results)


def contracts_latency(samples: int) -> dict[str, dict[str, float]]:
    """µs per money admission (tokenhub.billing.pots): pricing the worst case over the
    tenant's contracts (a package, then the wallet at a discounted price in another currency)
    and reserving it, and the settle that charges the actual usage back."""
    from decimal import Decimal

    from tokenhub.billing.pots import Contracts, Terms, lot_pot, money_pot, new_epoch
    from tokenhub.billing.service import Lot, Price, Profile

    q = Quota.anonymous(accounts=64, reservations=1024)
    new_epoch(q)
    c = Contracts(q, db=None)  # type: ignore[arg-type]
    t = Terms()
    t.profiles["acme"] = Profile("acme", "CNY", ("package", "wallet"), 0, None, 50_000)
    lot = Lot("L1", "acme", "p", "package", 10**12, 10**10, "CNY", 0, None, "hard_stop", None,
              "CNY", None, False, (), 0, 0, "active")  # fmt: skip
    t.lots["acme"] = [lot]
    t.prices[("m", "")] = [Price("m", "", 1, 0, "USD", 150_000_000, 75_000_000, 600_000_000, None)]
    t.fx[("USD", "CNY")] = [(0, Decimal("7.1"))]
    c.terms = t
    q.set_limits(lot_pot(lot), tokens=10**15)
    q.set_limits(money_pot("acme"), money=10**15)
    q.set_limits("meta:contracts", requests=1)
    admit_ns: list[int] = []
    settle_ns: list[int] = []
    clock = time.perf_counter_ns
    for i in range(samples):
        # Every 4th request runs the package dry, so the wallet pays part of it.
        lines = [1200, 0, 4096]
        if i % 4 == 3:
            q.set_limits(lot_pot(lot), tokens=q.state(lot_pot(lot)).tokens.used + 2000)
        a = clock()
        hold = c.admit("acme", "m", 1, lines, 60_000)
        b = clock()
        assert not isinstance(hold, type(None)) and hasattr(hold, "settle"), hold
        hold.settle([1200, 0, 300])  # type: ignore[union-attr]
        admit_ns.append(b - a)
        settle_ns.append(clock() - b)
        if i % 4 == 3:
            q.set_limits(lot_pot(lot), tokens=10**15)
    out = {}
    for name, lat in (("admit", admit_ns), ("settle", settle_ns)):
        lat.sort()
        out[name] = {p: lat[min(len(lat) - 1, int(len(lat) * q_))] / 1000 for p, q_ in PERCENTILES}
    return out


def reserve_latency(impl: Any, samples: int) -> dict[str, float]:
    """µs per reserve call (the admission on a request's path), one call at a time."""
    lat: list[int] = []
    if isinstance(impl, WrapperImpl):
        q = Quota(impl.t)

        def one() -> Any:
            return q.reserve("key", tokens=TOKENS, money=MONEY)

        def end(r: Any) -> None:
            q.settle(r, tokens=ACTUAL_TOKENS, money=ACTUAL_MONEY)
    else:
        t, k = impl.t, impl.k

        def one() -> Any:
            return t.reserve(k, TOKENS, MONEY)

        def end(r: Any) -> None:
            t.settle(r, ACTUAL_TOKENS, ACTUAL_MONEY)

    clock = time.perf_counter_ns
    for _ in range(1000):
        end(one())
    for _ in range(samples):
        a = clock()
        r = one()
        lat.append(clock() - a)
        end(r)
    lat.sort()
    return {p: lat[min(len(lat) - 1, int(len(lat) * q))] / 1000 for p, q in PERCENTILES}


def redis_latency(impl: RedisImpl, samples: int) -> dict[str, float]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=impl.port)
    lat = []
    for _ in range(samples):
        a = time.perf_counter_ns()
        rid = r.evalsha(impl.reserve_sha, 7, *REDIS_KEYS, TOKENS, MONEY, BIG, BIG, 1 << 20)
        lat.append(time.perf_counter_ns() - a)
        r.evalsha(impl.settle_sha, 7, *REDIS_KEYS, rid, ACTUAL_TOKENS, ACTUAL_MONEY)
    lat.sort()
    return {p: lat[min(len(lat) - 1, int(len(lat) * q))] / 1000 for p, q in PERCENTILES}


# -- Redis and the Rust bench ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[int | None]:
    exe = shutil.which("redis-server")
    if exe is None and os.geteuid() == 0:
        log("installing redis-server (apt-get)...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "redis-server"],
            check=False,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        log("note: pip install redis (requirements-bench.txt) for the Redis baseline")
        yield None
        return
    if exe is None:
        log("note: apt-get install redis-server for the Redis baseline")
        yield None
        return
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tokenhub-bench-redis-")
    proc = subprocess.Popen(
        [
            *(exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", workdir, "--daemonize", "no", "--loglevel", "warning"),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    log("note: redis-server did not start; skipping the Redis baseline")
                    yield None
                    return
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def rust_bench(seconds: float) -> dict[str, Any] | None:
    if shutil.which("cargo") is None:
        log("note: no cargo; skipping the pure-Rust figures")
        return None
    log("building and running examples/quota_bench.rs (cargo run --release)...")
    p = subprocess.run(
        [
            *("cargo", "run", "--quiet", "--release", "--example", "quota_bench"),
            *("--", "--json", "--secs", str(seconds)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        log(f"quota_bench failed:\n{p.stderr[-2000:]}")
        return None
    log(p.stdout.rsplit("\n", 2)[0])
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


# -- main --------------------------------------------------------------------------------------


def fmt_rate(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measured cell")
    ap.add_argument("--quick", action="store_true", help="0.3 s cells, fewer latency samples")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--no-rust", action="store_true")
    args = ap.parse_args()
    seconds = 0.3 if args.quick else args.duration
    samples = 20_000 if args.quick else 200_000

    rows: list[dict[str, Any]] = []
    problems: list[str] = []

    rust = None if args.no_rust else rust_bench(min(seconds, 1.0))
    if rust is not None:
        pp = rust["pairs_per_s"]
        rows.append(
            {
                "implementation": "tokenhub, Rust only (examples/quota_bench.rs)",
                "1 thread": pp["1 thread, 1 account"],
                "2 threads": pp["2 threads, same account"],
                "2 processes": pp["2 processes, same account"],
                "one limit across processes": "yes",
                "check": "ok",
            }
        )

    def measure(impl: Any) -> None:
        row: dict[str, Any] = {"implementation": impl.name}
        for label, runner, n in [
            ("1 thread", run_threads, 1),
            ("2 threads", run_threads, 2),
            ("2 processes", run_processes, 2),
        ]:
            if runner is run_processes and not impl.cross_process:
                row[label] = None
                continue
            log(f"{impl.name}: {label}...")
            impl.reset()
            rate, pairs = runner(impl, n, seconds)
            row[label] = rate
            bad = impl.check(pairs)
            if bad is not None:
                problems.append(f"MISMATCH {impl.name} {label}: {bad} after {pairs} pairs")
                row["check"] = "MISMATCH"
        row.setdefault("check", "ok")
        row["one limit across processes"] = "yes" if impl.cross_process else "no (N x the limit)"
        rows.append(row)

    core = CoreImpl()
    latency: dict[str, Any] = {}
    try:
        measure(core)
        wrapper = WrapperImpl(core.path)
        measure(wrapper)
        log("admission latency...")
        latency["tokenhub.quota reserve, alone"] = reserve_latency(wrapper, samples)
        latency["tokenhub._core reserve, alone"] = reserve_latency(core, samples)
        money = contracts_latency(samples // 10)
        latency["tokenhub money admission: price + reserve (package, wallet, FX)"] = money["admit"]
        latency["tokenhub money admission: settle"] = money["settle"]
        # The same while another process hammers the same account.
        ctx = mp.get_context("spawn")
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        p = ctx.Process(target=_proc_worker, args=(core.spec(), 3600.0, ready, go, out))
        p.start()
        try:
            ready.get(timeout=60)
            go.set()
            time.sleep(0.2)
            latency["tokenhub.quota reserve, 2nd process hammering"] = reserve_latency(
                wrapper, samples
            )
        finally:
            p.kill()
            p.join()
        measure(LockImpl())
        measure(MpLockImpl())
        if not args.no_redis:
            with redis_server() as port:
                if port is not None:
                    redis_impl = RedisImpl(port)
                    measure(redis_impl)
                    latency["Redis Lua reserve, alone"] = redis_latency(
                        redis_impl, max(2_000, samples // 20)
                    )
                    redis_impl.close()
    finally:
        core.close()

    # -- report ------------------------------------------------------------------------------
    head = "| implementation | 1 thread | 2 threads | 2 processes | one limit across processes |"
    print(head + " check |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r['implementation']} | {fmt_rate(r['1 thread'])} | {fmt_rate(r['2 threads'])} "
            f"| {fmt_rate(r['2 processes'])} | {r['one limit across processes']} | {r['check']} |"
        )
    print("\nreserve+settle pairs per second; each process or thread times its own window.\n")
    print("| admission (one reserve call) | p50 µs | p99 µs | p99.9 µs |")
    print("|---|---:|---:|---:|")
    if rust is not None:
        rn = rust["reserve_ns"]
        latency["Rust reserve (key + tenant), no Python"] = {
            k: rn[k] / 1000 for k in ("p50", "p99", "p999")
        }
    for name, lat in latency.items():
        print(f"| {name} | {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['p999']:.2f} |")

    py1 = rows[1 if rust else 0]["1 thread"]
    print()
    if rust is not None:
        r1 = rust["pairs_per_s"]["1 thread, 1 account"]
        verdict = "PASS" if r1 >= 1e6 else "FAIL"
        print(
            f"Bar: >= 1,000,000 reserve+settle pairs/s in Rust, one thread: {r1:,.0f} ({verdict})"
        )
        per_call = (1e9 / py1 - 1e9 / r1) / 2
        print(
            f"Python call overhead: ~{per_call:.0f} ns per call (Python pair - Rust pair, halved)"
        )
        other = {k: v for k, v in rust["pairs_per_s"].items() if k != "1 thread, 1 account"}
        print("Rust, other shapes: " + ", ".join(f"{k}: {fmt_rate(v)}" for k, v in other.items()))
    p99 = max(v["p99"] for k, v in latency.items() if k.startswith("tokenhub"))
    verdict = "PASS" if p99 < 50 else "FAIL"
    print(f"Bar: admission adds < 50 µs: worst tokenhub p99 from Python {p99:.2f} µs ({verdict})")
    for prob in problems:
        print(prob)

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                    },
                    "seconds_per_cell": seconds,
                    "rows": rows,
                    "latency_us": latency,
                    "rust": rust,
                    "problems": problems,
                },
                indent=2,
            )
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
