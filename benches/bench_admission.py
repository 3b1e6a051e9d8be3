"""What admission adds to a request, measured on a running gateway.

Three `tokenhub serve` processes side by side, on the same mock upstream and the same model, one
request at a time over one keep-alive connection each, interleaved (one to each in turn) so that
the machine's noise weighs on all three alike:

- **plain**: no limits, no billing in the process (what `bench_gateway.py` measures);
- **billing**: with `[billing] settle_interval_s = 1` the server's settler (a process of its
  own, `tokenhub billing settle --follow`) posts every request to the ledger, as the demo runs
  it;
- **admission**: the same, and the key and its tenant have rpm, tpm, concurrency and
  tokens-per-day limits (a reservation on both accounts in the shared quota table), and
  `[billing] admission = true` prices each request's worst case and reserves it on the
  tenant's wallet (`tokenhub.billing.pots`), settling both when the request ends.

Reported per server: the gateway's own time (`x-tokenhub-overhead-ms`, which covers admission but
not the settle after the reply is built) and the client-observed latency (which covers
everything), p50 and p99. Admission's cost is admission - billing at p50 (bar, issue 5: < 50 µs);
billing - plain is what settling alongside costs a request. The gateway's own account of it
(`tokenhub_admission_seconds_total` / `tokenhub_admission_requests_total`) is printed too.

    .venv/bin/python benches/bench_admission.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "gpt-4o-mini"
BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}
).encode()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tokenhub(*args: str, out: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("tokenhub")
    with open(out, "wb") as f:
        return subprocess.Popen([str(exe), *args], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench_admission: nothing listens on {port}")


def prepare(db: Path, billing: bool, admission: bool) -> str:
    """A tenant and key in `db`; with billing a priced, funded wallet; with admission, limits
    on the key and the tenant too."""
    from tokenhub.store import open_store

    store = open_store(str(db))
    try:
        store.migrate()
        store.create_tenant("bench")
        key, secret = store.create_key("bench")
        if admission:
            big = 10**12
            store.set_limits("key", key.id, rpm=big, tpm=big, max_concurrency=10_000)
            store.set_limits("tenant", "bench", rpm=big, tpm=big, tokens_per_day=big)
    finally:
        store.close()
    if billing:
        from tokenhub.billing.service import Billing
        from tokenhub.db.database import open_database

        async def fund() -> None:
            d = await open_database(str(db))
            try:
                b = Billing(d)
                await b.set_price(MODEL, currency="USD", input_per_1m="0.15",
                                  output_per_1m="0.60", effective_ms=0)  # fmt: skip
                await b.set_profile("bench", currency="USD", draw_order=["wallet", "postpaid"])
                await b.topup("bench", "1000000", "USD")
            finally:
                await d.close()

        asyncio.run(fund())
    return secret


def config(path: Path, port: int, mock_port: int, db: Path, billing: bool, admission: bool) -> None:
    table = "[billing]\nsettle_interval_s = 1.0\n" if billing else ""
    if admission:
        table += "admission = true\n"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
database = "{db}"
{table}
[[providers]]
name = "mock"
base_url = "http://127.0.0.1:{mock_port}/v1"

[[models]]
id = "{MODEL}"
  [[models.deployments]]
  provider = "mock"
  upstream_model = "{MODEL}"
  vocab = "cl100k_base"
""",
        encoding="utf-8",
    )


def measure(targets: dict[str, tuple[int, str]], n: int, warmup: int) -> dict[str, Any]:
    """`n` requests to each target, interleaved (one to each in turn, in a rotating order),
    so that whatever else the machine does weighs on all of them alike."""
    conns = {
        name: http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for name, (port, _) in targets.items()
    }
    names = list(targets)
    overhead: dict[str, list[float]] = {k: [] for k in names}
    latency: dict[str, list[float]] = {k: [] for k in names}
    statuses: dict[str, dict[int, int]] = {k: {} for k in names}
    for i in range(warmup + n):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            headers = {"Authorization": f"Bearer {targets[name][1]}",
                       "Content-Type": "application/json"}  # fmt: skip
            conn = conns[name]
            t = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", BODY, headers)
            r = conn.getresponse()
            r.read()
            took = time.perf_counter() - t
            statuses[name][r.status] = statuses[name].get(r.status, 0) + 1
            if i >= warmup:
                latency[name].append(took * 1e6)
                overhead[name].append(float(r.getheader("x-tokenhub-overhead-ms") or "nan") * 1e3)
    for c in conns.values():
        c.close()

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(len(xs) * q))]

    return {
        name: {
            "statuses": statuses[name],
            "overhead_us": {"p50": pct(overhead[name], 0.5), "p99": pct(overhead[name], 0.99)},
            "latency_us": {"p50": pct(latency[name], 0.5), "p99": pct(latency[name], 0.99)},
        }
        for name in names
    }


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: unlike wall time, what other
    processes do on the machine does not show in it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admission_us(port: int) -> float | None:
    """The gateway's own account of admission (its metrics): µs per admitted request spent
    reserving and settling limits and contracts, GIL waits and other threads left out."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            ("tokenhub_admission_seconds_total", "tokenhub_admission_requests_total")
        ):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    n = values.get("tokenhub_admission_requests_total")
    return values["tokenhub_admission_seconds_total"] / n * 1e6 if n else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="measured requests per server")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--only", help="measure only this server (plain, billing, admission)")
    ap.add_argument("--profile", type=Path, help="py-spy record each server to DIR/NAME.txt")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    mock_port = free_port()
    mock = tokenhub("mock-upstream", "--port", str(mock_port), "--model", MODEL,
                    out=tmp / "mock.log")  # fmt: skip
    results: dict[str, Any] = {}
    servers: dict[str, subprocess.Popen[bytes]] = {}
    spies: list[subprocess.Popen[bytes]] = []
    try:
        wait_port(mock_port)
        targets: dict[str, tuple[int, str]] = {}
        for name, billing, admission in (
            ("plain", False, False),
            ("billing", True, False),
            ("admission", True, True),
        ):
            if args.only and name != args.only:
                continue
            db = tmp / f"{name}.db"
            secret = prepare(db, billing, admission)
            port = free_port()
            cfg = tmp / f"{name}.toml"
            config(cfg, port, mock_port, db, billing, admission)
            servers[name] = tokenhub("serve", "--config", str(cfg), out=tmp / f"{name}.log")
            wait_port(port)
            targets[name] = (port, secret)
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                spies.append(subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "-r", "2000",
                     "-p", str(servers[name].pid), "-f", "raw", "-o",
                     str(args.profile / f"{name}.txt"), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))  # fmt: skip
        if spies:
            time.sleep(1.0)
        log(f"{', '.join(targets)}: {args.requests} requests each, one at a time, interleaved...")
        cpu0 = {name: cpu_s(servers[name].pid) for name in targets}
        results = measure(targets, args.requests, args.warmup)
        for name in targets:
            used = cpu_s(servers[name].pid) - cpu0[name]
            results[name]["cpu_us_per_request"] = used / (args.requests + args.warmup) * 1e6
        for name, (port, _) in targets.items():
            results[name]["admission_us"] = admission_us(port)
            bad = {s: c for s, c in results[name]["statuses"].items() if s != 200}
            if bad:
                log(f"{name}: non-200 answers {bad}; see {tmp / (name + '.log')}")
                return 1
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        for gw in servers.values():
            os.killpg(gw.pid, signal.SIGTERM)
        for gw in servers.values():
            gw.wait(60)
        os.killpg(mock.pid, signal.SIGKILL)
        mock.wait(10)

    if set(results) != {"plain", "billing", "admission"}:
        print(json.dumps(results, indent=2))
        return 0
    print("| gateway | CPU µs/req | own p50 µs | own p99 µs | client p50 µs | client p99 µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        o, c, cpu = r["overhead_us"], r["latency_us"], r["cpu_us_per_request"]
        print(
            f"| {name} | {cpu:.0f} | {o['p50']:.0f} | {o['p99']:.0f} | {c['p50']:.0f} "
            f"| {c['p99']:.0f} |"
        )
    d_cpu = results["admission"]["cpu_us_per_request"] - results["billing"]["cpu_us_per_request"]
    print(
        f"\nAdmission costs the server {d_cpu:.0f} µs of CPU per request (admission - billing; "
        "the servers' own CPU time, which the machine's other load does not inflate)."
    )

    def p50(name: str, what: str) -> float:
        return float(results[name][what]["p50"])

    d_over = p50("admission", "overhead_us") - p50("billing", "overhead_us")
    d_lat = p50("admission", "latency_us") - p50("billing", "latency_us")
    verdict = "PASS" if max(d_over, d_lat) < 50 else "FAIL"
    print(
        f"Admission (rate limits on key and tenant + money on the wallet) adds {d_over:.0f} µs "
        f"to the gateway's own time and {d_lat:.0f} µs to the client's latency at p50 "
        f"(bar < 50 µs: {verdict})."
    )
    own = results["admission"]["admission_us"]
    if own is not None:
        print(
            f"The gateway's own account (tokenhub_admission_seconds_total / _requests_total): "
            f"{own:.1f} µs per request reserving and settling, a mean (tails, GIL waits and "
            "preemption included)."
        )
    s_lat = p50("billing", "latency_us") - p50("plain", "latency_us")
    print(f"Settling alongside (the settler process) adds {s_lat:.0f} µs at p50.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
