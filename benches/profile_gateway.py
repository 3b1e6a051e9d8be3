"""Issue 16's "profile first": tokenhub's CPU per request beside the bare proxy, py-spy profiles.

    .venv/bin/python benches/profile_gateway.py                       # figures, ~3 minutes
    .venv/bin/python benches/profile_gateway.py --profile /tmp/prof   # + py-spy raw stacks
    .venv/bin/python benches/profile_gateway.py --summarize /tmp/prof/long-new-plain.gw.txt

Targets, each pinned with the mock as bench_gateway pins them (mock on one core, the proxy under
test and its children on the other, the client unpinned):

* ``bare``: bench_gateway's aiohttp + uvloop pass-through proxy (the floor);
* ``plain``: ``tokenhub serve``, no billing (auth, metering, journal, sink);
* ``billing``: the same with ``[billing] settle_interval_s = 1`` and ``admission = true``, a
  priced, funded wallet and limits on key and tenant (bench_admission's setup): money admission
  in the gateway and the settler process it supervises.

Scenarios:

* ``long-known``: a ~200k-token chat request (bench_meter's conversation: ~200 messages of real
  text, ~800 KB of JSON), the same body every time, one request at a time;
* ``long-new``: the same conversation with every message made new (a per-request tag in front
  of each message), so nothing is cached;
* ``small-json`` / ``small-stream``: bench_gateway's 2-message request at 64 connections (its
  load generator: wrk when installed, else its raw asyncio client).

CPU per request = utime+stime from /proc of the gateway (and separately of its children: the
settler) over the window, divided by the requests the mock served in it. Targets take turns
within each of ``--repeat`` rounds; the medians are printed. Before the rounds each server's
idle CPU (timers, sweeps, the settler's polling) over IDLE_S seconds is logged. With
``--profile DIR`` a separate pass (after the timed rounds, so the sampler's cost is not in the
figures) records ``py-spy record --native -r 500 -f raw`` of each process under the same load;
``--summarize FILE`` prints a raw profile's top frames (inclusive and self) and its shares by
category.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_admission as BA
import bench_gateway as BG

TARGETS = ("bare", "plain", "billing")
IDLE_S = 5  # the idle servers' CPU (timers, sweeps, the settler's polling) is measured this long
SCENARIOS = ("long-known", "long-new", "small-json", "small-stream")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out + [g for c in out for g in children(c)]


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU s of pid itself, CPU s of its live descendants)."""
    kids = 0.0
    for c in children(pid):
        with contextlib.suppress(OSError):
            kids += BG.proc_cpu_s(c)
    return BG.proc_cpu_s(pid), kids


def conversation() -> list[dict[str, str]]:
    """bench_meter's ~200k-token conversation of real text, with a fresh user turn at the end."""
    import bench_meter as BM

    skipped: list[str] = []
    corpora = BM.load_corpora(["english", "chinese", "code", "json", "mixed"], skipped)
    conv, fresh = BM.build_conversation([c for c in corpora if c.name != "mixed"])
    return [*conv, {"role": "user", "content": fresh[0]}]


def body(conv: list[dict[str, str]], tag: int | None = None) -> bytes:
    """The chat request; with a tag, every message made new (the tag in front of each)."""
    if tag is not None:
        conv = [{"role": m["role"], "content": f"[{tag}:{j}] " + m["content"]}
                for j, m in enumerate(conv)]  # fmt: skip
    return json.dumps({"model": BG.MODEL, "messages": conv, "max_tokens": 32}).encode()


class Client:
    """One keep-alive connection, one request at a time."""

    def __init__(self, port: int, key: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def post(self, body: bytes) -> None:
        self.conn.request("POST", "/v1/chat/completions", body, self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data[:300]!r}")


def measure_long(
    port: int, key: str, pid: int, bodies: list[bytes], mock_url: str
) -> dict[str, float]:
    c = Client(port, key)
    c.post(bodies[0])  # warm: connections, caches (known: the conversation is now seen)
    time.sleep(0.2)
    served0 = BG.http("GET", mock_url + "/mock/ledger?limit=0")[1]
    n0 = json.loads(served0)["totals"]["requests"]
    g0, k0 = tree_cpu(pid)
    t0 = time.monotonic()
    for b in bodies[1:]:
        c.post(b)
    wall = time.monotonic() - t0
    time.sleep(0.3)
    g1, k1 = tree_cpu(pid)
    n = json.loads(BG.http("GET", mock_url + "/mock/ledger?limit=0")[1])["totals"]["requests"] - n0
    return {"gw_ms": (g1 - g0) / n * 1000, "settler_ms": (k1 - k0) / n * 1000, "n": n,
            "wall_ms": wall / n * 1000}  # fmt: skip


def measure_small(
    load: BG.LoadGen, port: int, key: str, pid: int, mode: str, secs: int, mock_url: str
) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    load.run(url, mode, key, 64, 1)
    time.sleep(0.3)
    n0 = json.loads(BG.http("GET", mock_url + "/mock/ledger?limit=0")[1])["totals"]["requests"]
    g0, k0 = tree_cpu(pid)
    r = load.run(url, mode, key, 64, secs)
    time.sleep(1.5)  # the settler's next pass settles the window's events
    g1, k1 = tree_cpu(pid)
    n = json.loads(BG.http("GET", mock_url + "/mock/ledger?limit=0")[1])["totals"]["requests"] - n0
    if r["status"] or r["connect"] + r["read"] + r["write"] + r["timeout"]:
        log(f"  errors: {r}")
    return {"gw_us": (g1 - g0) / n * 1e6, "settler_us": (k1 - k0) / n * 1e6, "n": n,
            "rps": r["requests"] / (r["duration_us"] / 1e6)}  # fmt: skip


def spy(pid: int, out: Path, secs: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("py-spy")
    argv = [str(exe), "record", "--native", "-r", "500", "-f", "raw", "-d", str(secs),
            "-o", str(out), "--pid", str(pid)]  # fmt: skip
    with open(out.with_suffix(".log"), "wb") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)


# A sample is idle (a thread waiting, the loop in epoll) when a frame of it matches IDLE: py-spy
# --native samples waiting threads too, so these are dropped and the shares are of busy samples.
IDLE = ("epoll_pwait", "epoll_wait", "_queue_SimpleQueue_get", "PyThread_acquire_lock_timed",
        "Condition.wait", "select (selectors", "sem_timedwait", "pthread_cond_")  # fmt: skip

# Categories: the first rule of SPECIFIC (in order) that any frame of a sample matches names its
# category; a sample matching none of them is FALLBACK's if it matches, else "other".
SPECIFIC: list[tuple[str, tuple[str, ...]]] = [
    ("JSON decode (msgspec)", ("json_decode", "JSONDecoder_decode")),
    ("JSON encode (msgspec)", ("json_encode", "JSONEncoder_encode")),
    ("meter: Rust BPE count (cache misses)", ("Bpe::merge", "Meter::count::", "pretok")),
    ("meter: Rust hash-table get (BPE ranks or count cache)", ("hashbrown",)),
    ("meter: Rust xxh3 + cache (other)", ("_core::meter", "xxhash", "_core::py")),
    ("meter: template plan (Python)", ("tokenhub/templates.py",)),
    ("meter: Python + libc under it", ("tokenhub/meter.py", "gateway/metering.py")),
    ("admission: money (plan/reserve/settle)", ("billing/pots.py", "admission/money.py",
                                                 "billing/terms.py", "billing/draw.py")),
    ("admission: guard + limits + quota", ("gateway/admission", "gateway/limits.py",
                                           "gateway/guard.py", "_core::quota",
                                           "tokenhub/quota.py")),
    ("settler: ledger posting", ("billing/ledger.py",)),
    ("settler: rollups", ("billing/rollups.py",)),
    ("settler: statements", ("billing/statements.py",)),
    ("settler: alerts", ("billing/alerts.py",)),
    ("settler: service.settle (other)", ("billing/service.py",)),
    ("settler: pass, fetch, mark settled", ("billing/settler.py", "runtime/settler_proc.py")),
    ("sqlite (driver + engine)", ("sqlite3", "_sqlite", "aiosqlite")),
    ("database layer (tokenhub.db)", ("tokenhub/db/",)),
    ("usage event: sink + journal", ("runtime/sink.py", "runtime/journal.py", "tokenhub/usage.py",
                                     "store/")),
    ("request context (usage, finish)", ("gateway/context.py", "gateway/usage_check.py")),
    ("auth", ("gateway/auth.py",)),
    ("routing", ("tokenhub/router.py", "_core::router")),
    ("stream relay (SSE)", ("gateway/stream.py", "_core::relay")),
    ("upstream client (providers/http.py)", ("gateway/providers/http.py",)),
    ("aiohttp client (bare proxy's upstream)", ("aiohttp/client", "aiohttp/connector")),
    ("forward + provider wire (tokenhub)", ("gateway/forward.py", "gateway/providers",
                                            "gateway/upstream.py", "gateway/translate")),
    ("request path (service, parse, routes)", ("gateway/service.py", "gateway/request.py",
                                               "gateway/routes.py", "gateway/app.py",
                                               "gateway/dialects", "gateway/telemetry.py",
                                               "gateway/errors.py")),
    ("bare proxy handler", ("relay (bench_gateway.py",)),
    ("aiohttp server (protocol, parser, writer)", ("aiohttp/", "gateway/protocol.py",
                                                   "_http_parser")),
]  # fmt: skip
FALLBACK: list[tuple[str, tuple[str, ...]]] = [
    ("event loop, sockets (uvloop, asyncio)", ("uv_", "loop.c", "asyncio", "uvloop",
                                               "_asynciomodule")),
]  # fmt: skip


def _category(frames: list[str]) -> str:
    for rules in (SPECIFIC, FALLBACK):
        for name, pats in rules:
            if any(p in f for f in frames for p in pats):
                return name
    return "other"


def summarize(path: Path, top: int = 25, cpu: float = 0.0) -> str:
    """`path`'s top frames and categories; with `cpu` (the measured CPU per request, any unit)
    each category's share of it too."""
    stacks: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks[stack] += int(n)
    total = sum(stacks.values()) or 1
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    busy = 0
    for stack, n in stacks.items():
        frames = stack.split(";")
        if any(p in f for f in frames for p in IDLE):
            continue
        busy += n
        for f in set(frames):
            incl[f] += n
        self_[frames[-1]] += n
        cats[_category(frames)] += n
    b = busy or 1
    lines = [f"{path.name}: {total} samples, {busy} busy (shares below are of busy samples)"]
    lines.append("  by category:")
    lines += [f"  {n / b:6.1%}  {f'{n / b * cpu:8.3f}  ' if cpu else ''}{c}"
              for c, n in cats.most_common()]  # fmt: skip
    lines.append("  inclusive (tokenhub, aiohttp, msgspec, Rust frames):")
    keep = ("tokenhub/", "aiohttp/", "msgspec", "_core::", "bench_gateway", "sqlite")
    ours = [(f, n) for f, n in incl.most_common() if any(k in f for k in keep)]
    lines += [f"  {n / b:6.1%}  {f}" for f, n in ours[:top]]
    lines.append("  self:")
    lines += [f"  {n / b:6.1%}  {f}" for f, n in self_.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--requests", type=int, default=40, help="long requests per window")
    ap.add_argument("--duration", type=int, default=5, help="small-request window, s")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="also record py-spy profiles")
    ap.add_argument("--profile-s", type=int, default=10, help="seconds per profile")
    ap.add_argument("--summarize", type=Path, nargs="+", help="summarize raw profiles and exit")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--cpu-per-request", type=float, default=0.0, help="with --summarize: apportion this"
    )
    a = ap.parse_args()
    if a.summarize:
        for p in a.summarize:
            print(summarize(p, cpu=a.cpu_per_request))
        return 0
    scenarios = a.scenarios.split(",")
    targets = a.targets.split(",")
    mock_cpu, proxy_cpu, placement = BG.pick_cpus()
    load_kind = "wrk" if shutil.which("wrk") else "python"
    log(f"profile_gateway: {placement}; load generator {load_kind}")
    conv = conversation()
    known = body(conv)
    tags = iter(range(10**9))
    log(f"long body: {len(known) / 1e3:.0f} KB")
    with tempfile.TemporaryDirectory(prefix="tokenhub-prof-") as tmpdir:
        tmp = Path(tmpdir)
        procs = BG.Processes(tmp)
        try:
            mock_port = BG.free_port()
            mock = procs.start("mock", [sys.executable, BG.__file__, "--serve-mock",
                               str(mock_port)], "", mock_cpu)  # fmt: skip
            mock_url = f"http://127.0.0.1:{mock_port}"
            BG.wait_ready(mock, mock_url + "/mock/ledger?limit=0")
            servers: dict[str, tuple[BG.Server, int, str]] = {}
            for t in targets:
                port = BG.free_port()
                if t == "bare":
                    s = procs.start(t, [sys.executable, BG.__file__, "--serve-bare-proxy",
                                    str(port), "--upstream", mock_url], "", proxy_cpu)  # fmt: skip
                    key = ""
                else:
                    db, cfg = tmp / f"{t}.db", tmp / f"{t}.toml"
                    key = BA.prepare(db, t == "billing", t == "billing")
                    BA.config(cfg, port, mock_port, db, t == "billing", t == "billing")
                    s = procs.start(t, [*BG.tokenhub_argv(), "serve", "--config", str(cfg)], "",
                                    proxy_cpu)  # fmt: skip
                BG.wait_ready(s, f"http://127.0.0.1:{port}/healthz")
                servers[t] = (s, port, key)
            time.sleep(2)
            idle0 = {t: tree_cpu(srv.pid) for t, (srv, _, _) in servers.items()}
            time.sleep(IDLE_S)
            for t, (srv, _, _) in servers.items():
                g, k = tree_cpu(srv.pid)
                log(f"idle {t}: gateway {(g - idle0[t][0]) / IDLE_S * 1000:.1f} ms/s, "
                    f"children {(k - idle0[t][1]) / IDLE_S * 1000:.1f} ms/s")  # fmt: skip
            load = BG.LoadGen(load_kind, tmp)
            res: dict[str, dict[str, list[dict[str, float]]]] = {}

            def one(sc: str, t: str) -> dict[str, float]:
                s, port, key = servers[t]
                if sc == "long-known":
                    return measure_long(port, key, s.pid, [known] * (a.requests + 1), mock_url)
                if sc == "long-new":
                    new = [body(conv, next(tags)) for _ in range(a.requests + 1)]
                    return measure_long(port, key, s.pid, new, mock_url)
                mode = sc.split("-")[1]
                return measure_small(load, port, key, s.pid, mode, a.duration, mock_url)

            for rnd in range(a.repeat):
                for sc in scenarios:
                    for t in targets:
                        m = one(sc, t)
                        res.setdefault(sc, {}).setdefault(t, []).append(m)
                        log(f"round {rnd + 1} {sc} {t}: " +
                            " ".join(f"{k}={v:.3f}" for k, v in m.items()))  # fmt: skip
            print(f"\n{placement}; load generator {load_kind}; long body {len(known)} bytes")
            print(f"medians of {a.repeat} rounds\n")
            print("| scenario | target | gateway CPU | settler CPU | total | other |")
            print("|---|---|---:|---:|---:|---|")
            for sc, by_t in res.items():
                for t, ms in by_t.items():
                    unit = "ms" if sc.startswith("long") else "us"
                    g = statistics.median(m[f"gw_{unit}"] for m in ms)
                    k = statistics.median(m[f"settler_{unit}"] for m in ms)
                    tot = statistics.median(m[f"gw_{unit}"] + m[f"settler_{unit}"] for m in ms)
                    if "rps" in ms[0]:
                        extra = f"rps {statistics.median(m['rps'] for m in ms):.0f}"
                    else:
                        extra = f"wall {statistics.median(m['wall_ms'] for m in ms):.1f} ms"
                    print(f"| {sc} | {t} | {g:.3f} {unit} | {k:.3f} {unit} | {tot:.3f} {unit} "
                          f"| {extra} |")  # fmt: skip
            if a.json:
                a.json.write_text(json.dumps(res, indent=1))
            if a.profile:
                a.profile.mkdir(parents=True, exist_ok=True)
                for sc in scenarios:
                    for t in targets:
                        s, port, key = servers[t]
                        if sc == "long-known":  # seen before the profile starts
                            measure_long(port, key, s.pid, [known] * 2, mock_url)
                        pids = {"gw": s.pid, **{f"ch{i}": c for i, c in
                                                enumerate(children(s.pid))}}  # fmt: skip
                        spies = [spy(p, a.profile / f"{sc}-{t}.{n}.txt", a.profile_s)
                                 for n, p in pids.items()]  # fmt: skip
                        time.sleep(0.5)
                        end = time.monotonic() + a.profile_s
                        while time.monotonic() < end:
                            if sc.startswith("long"):
                                bs = ([known] * 4 if sc == "long-known"
                                      else [body(conv, next(tags)) for _ in range(4)])  # fmt: skip
                                measure_long(port, key, s.pid, bs, mock_url)
                            else:
                                left = max(1, int(end - time.monotonic()))
                                mode = sc.split("-")[1]
                                measure_small(load, port, key, s.pid, mode, left, mock_url)
                        for p in spies:
                            p.wait(60)
                        log(f"profiled {sc} {t}: {sorted(pids)}")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
