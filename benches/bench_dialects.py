"""Dialect benchmark: the gateway's CPU per request for each client dialect over each upstream
wire, side by side in one run, as ratios against plain chat completions.

    .venv/bin/python benches/bench_dialects.py                 # full run, ~5 minutes on 2 cores
    .venv/bin/python benches/bench_dialects.py --quick         # smoke test, about 1 minute
    .venv/bin/python benches/bench_dialects.py --connections 64 --duration 10 --json out.json

One mock upstream (``tokenhub.mock``, any model id, its default 32-token reply) is reached by
one ``tokenhub serve --config`` through two providers: ``oai`` (``kind = "openai"``) and ``ant``
(``kind = "anthropic"``). Each case sends the same small conversation (a system prompt and one
user message) in its client's dialect:

* ``chat -> openai``: POST /v1/chat/completions, passed through (the reference: ratio 1.00);
* ``messages -> openai``: POST /v1/messages translated to chat completions;
* ``messages -> anthropic``: POST /v1/messages passed through to the Messages API;
* ``responses -> openai``: POST /v1/responses translated to chat completions;
* ``responses -> anthropic``: POST /v1/responses, Responses -> chat -> Messages (composed);
* ``chat -> anthropic``: POST /v1/chat/completions translated to the Messages API.

Each non-streamed (``json``) and streamed (``stream``; chat asks for ``include_usage``). Messages
requests carry ``x-api-key`` and ``anthropic-version`` as Claude Code's do; the others a Bearer
key.

Method (as benches/bench_gateway.py, whose process, CPU and load-generator helpers this file
imports): the mock is pinned to one core and tokenhub to the other with ``taskset``; the raw
keep-alive HTTP/1.1 load generator of bench_gateway runs unpinned in its own process. Cases
take turns (all cases of a mode, then again for ``--repeat`` rounds) so machine noise hits them
alike. Per run: a warm-up (``--warmup`` s), then a measured window (``--duration`` s); CPU per
request is the utime+stime delta of the tokenhub process over the window (all its threads: the
usage sink's writer included) divided by the requests the mock served in that window. The
ratio column divides by the ``chat -> openai`` figure of the same mode (medians over rounds).

Metering check: after every run the usage events recorded in that run (``store.iter_events``)
are compared with the mock's ledger (reset before each run): one event per upstream request,
the events' input and output tokens equal to what the mock served, every event's endpoint the
dialect's ("chat.completions", "messages", "responses"). A mismatch or a non-2xx response is
printed under Problems and the script exits with status 1. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway as bg

HOST = bg.HOST
OAI_MODEL = "bench-oai"  # on the openai-kind provider
ANT_MODEL = "bench-ant"  # on the anthropic-kind provider
SYSTEM = "You are a helpful assistant."
USER = "Say hello to the benchmark in one short sentence."
MAX_TOKENS = 1024  # above the mock's 32-token reply: the reply is never cut
MODES = ("json", "stream")


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    model: str
    dialect: str  # "openai" (chat), "anthropic" (messages), "responses"
    endpoint: str  # the usage event's endpoint


CASES = (
    Case("chat -> openai", "/v1/chat/completions", OAI_MODEL, "openai", "chat.completions"),
    Case("messages -> openai", "/v1/messages", OAI_MODEL, "anthropic", "messages"),
    Case("messages -> anthropic", "/v1/messages", ANT_MODEL, "anthropic", "messages"),
    Case("responses -> openai", "/v1/responses", OAI_MODEL, "responses", "responses"),
    Case("responses -> anthropic", "/v1/responses", ANT_MODEL, "responses", "responses"),
    Case("chat -> anthropic", "/v1/chat/completions", ANT_MODEL, "openai", "chat.completions"),
)
REFERENCE = CASES[0].name


def body_for(case: Case, mode: str) -> bytes:
    stream = mode == "stream"
    payload: dict[str, Any]
    if case.dialect == "openai":
        payload = {
            "model": case.model,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            "max_tokens": MAX_TOKENS,
        }
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
    elif case.dialect == "anthropic":
        payload = {
            "model": case.model,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": USER}],
            "max_tokens": MAX_TOKENS,
        }
        if stream:
            payload["stream"] = True
    else:
        payload = {
            "model": case.model,
            "instructions": SYSTEM,
            "input": USER,
            "max_output_tokens": MAX_TOKENS,
            "store": False,
        }
        if stream:
            payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


def headers_for(case: Case, key: str) -> dict[str, str]:
    if case.dialect == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {key}"}


# -- subprocesses: the mock and the load generator ------------------------------------------------


def serve_mock(port: int) -> None:
    """`tokenhub mock-upstream` serving any model id, as bench_gateway serves it."""
    from tokenhub import mock

    bg.serve_mock(port, mock.MockOptions(models={"*": ""}))


def loadgen_main(args: argparse.Namespace) -> None:
    """bench_gateway's raw keep-alive client, with this case's headers."""
    body = Path(args.body_file).read_bytes()
    hostport = args.url.split("//", 1)[1].split("/", 1)[0]
    path = "/" + args.url.split("//", 1)[1].split("/", 1)[1]
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {hostport}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *args.header,
    ]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    import uvloop

    result = uvloop.run(bg._loadgen(args.url, args.connections, args.duration, request))
    print("LOADJSON " + json.dumps(result), flush=True)


def run_load(
    tmp: Path, url: str, body: bytes, headers: dict[str, str], connections: int, duration: int
) -> dict[str, Any]:
    """One bounded load run in a subprocess; its result, with the generator's CPU seconds."""
    body_file = tmp / "body.json"
    body_file.write_bytes(body)
    argv = [sys.executable, __file__, "--loadgen-python", "--url", url]
    argv += ["--connections", str(connections), "--duration", str(duration)]
    argv += ["--body-file", str(body_file)]
    for k, v in headers.items():
        argv += ["--header", f"{k}: {v}"]
    return bg.run_loadgen(argv, tmp / "load.out", duration)


# -- the gateway's config --------------------------------------------------------------------


def write_config(path: Path, port: int, mock_port: int, db: str) -> None:
    base = f"http://{HOST}:{mock_port}/v1"
    path.write_text(
        f"""\
[server]
host = "{HOST}"
port = {port}
database = "{db}"

[[providers]]
name = "oai"
base_url = "{base}"
kind = "openai"

[[providers]]
name = "ant"
base_url = "{base}"
kind = "anthropic"

[[models]]
id = "{OAI_MODEL}"

  [[models.deployments]]
  provider = "oai"
  upstream_model = "gpt-4o-mini"
  vocab = "cl100k_base"

[[models]]
id = "{ANT_MODEL}"

  [[models.deployments]]
  provider = "ant"
  upstream_model = "claude-sonnet-4-5"
  vocab = "cl100k_base"
"""
    )


# -- one measurement -------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    mode: str
    connections: int
    round: int
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    upstream_requests: int = 0
    cpu_ms_per_req: float | None = None
    mock_cpu_ms_per_req: float | None = None
    other_load_cores: float = 0.0
    ledger: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    url: str  # http://host:port of tokenhub
    mock_base: str
    mock_pid: int
    gateway_pid: int
    key: str
    store: Any
    results: list[Result] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def mock_totals(self) -> dict[str, int]:
        status, data = bg.http("GET", self.mock_base + "/mock/ledger?limit=0")
        if status != 200:
            raise RuntimeError(f"mock ledger: {status}")
        totals: dict[str, int] = json.loads(data)["totals"]
        return totals

    def check(self, case: Case, mode: str) -> None:
        """One request, before anything is timed: a 200 in the case's dialect."""
        status, data = http_with(
            self.url + case.path, body_for(case, mode), headers_for(case, self.key)
        )
        if status != 200:
            raise RuntimeError(f"{case.name} {mode}: {status} {data[:300]!r}")
        if mode == "json":
            json.loads(data)
        elif b"\n\n" not in data:
            raise RuntimeError(f"{case.name} {mode}: not an event stream: {data[:300]!r}")

    def measure(self, case: Case, mode: str, connections: int, rnd: int) -> Result:
        a = self.args
        url = self.url + case.path
        body, headers = body_for(case, mode), headers_for(case, self.key)
        bg.http("POST", self.mock_base + "/mock/reset", b"")
        start_ms = int(time.time() * 1000) - 1
        if a.warmup:
            warm = run_load(self.tmp, url, body, headers, connections, a.warmup)
        else:
            warm = {"requests": 0}
        time.sleep(bg.SETTLE_S)
        served0 = self.mock_totals()["requests"]
        cpu0, mock0 = bg.proc_cpu_s(self.gateway_pid), bg.proc_cpu_s(self.mock_pid)
        busy0, _ = bg.system_cpu()
        self0, t0 = time.process_time(), time.monotonic()
        r = run_load(self.tmp, url, body, headers, connections, a.duration)
        time.sleep(bg.SETTLE_S)
        served1 = self.mock_totals()["requests"]
        cpu1, mock1 = bg.proc_cpu_s(self.gateway_pid), bg.proc_cpu_s(self.mock_pid)
        busy1, _ = bg.system_cpu()
        self1, t1 = time.process_time(), time.monotonic()

        res = Result(case.name, mode, connections, rnd)
        res.requests, res.non_2xx = r["requests"], r["status"]
        res.socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
        window = r["duration_us"] / 1e6
        res.rps = res.requests / window if window else 0.0
        res.p50_ms, res.p99_ms = r["p50_us"] / 1000, r["p99_us"] / 1000
        served = served1 - served0
        res.upstream_requests = served
        if served:
            res.cpu_ms_per_req = (cpu1 - cpu0) / served * 1000
            res.mock_cpu_ms_per_req = (mock1 - mock0) / served * 1000
        ours = (cpu1 - cpu0) + (mock1 - mock0) + (self1 - self0) + r["cpu_s"]
        res.other_load_cores = max(0.0, (busy1 - busy0 - ours) / (t1 - t0))
        if res.non_2xx or res.socket_errors:
            self.problems.append(
                f"{case.name} {mode} c={connections}: {res.non_2xx} non-2xx responses, "
                f"{res.socket_errors} socket errors"
            )
        res.ledger = self.check_ledger(case, mode, start_ms, warm["requests"] + r["requests"])
        return res

    def check_ledger(self, case: Case, mode: str, start_ms: int, responses: int) -> dict[str, Any]:
        served = self.mock_totals()
        deadline = time.monotonic() + bg.LEDGER_WAIT_S
        events: list[Any] = []
        while time.monotonic() < deadline:
            events = list(self.store.iter_events(since_ms=start_ms))
            if len(events) >= served["requests"]:
                break
            time.sleep(0.05)
        led = {
            "rows": len(events),
            "upstream_served": served["requests"],
            "responses": responses,
            "input_tokens": sum(e.input_tokens for e in events),
            "output_tokens": sum(e.output_tokens for e in events),
            "upstream_prompt_tokens": served["prompt_tokens"],
            "upstream_completion_tokens": served["completion_tokens"],
            "endpoints": sorted({e.endpoint for e in events}),
            "statuses": sorted({e.status for e in events}),
        }
        bad = []
        if led["rows"] != led["upstream_served"]:
            bad.append(f"{led['rows']} events for {led['upstream_served']} upstream requests")
        if led["input_tokens"] != led["upstream_prompt_tokens"]:
            bad.append(f"input tokens {led['input_tokens']} != {led['upstream_prompt_tokens']}")
        if led["output_tokens"] != led["upstream_completion_tokens"]:
            bad.append(
                f"output tokens {led['output_tokens']} != {led['upstream_completion_tokens']}"
            )
        if events and led["endpoints"] != [case.endpoint]:
            bad.append(f"endpoints {led['endpoints']}, expected {case.endpoint}")
        led["ok"] = not bad
        if bad:
            self.problems.append(f"LEDGER MISMATCH {case.name} {mode}: " + "; ".join(bad))
        return led


def http_with(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- the run -----------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    from tokenhub.store import open_store

    mock_cpu, proxy_cpu, placement = bg.pick_cpus()
    info: dict[str, Any] = {
        "machine": bg.machine(),
        "versions": bg.versions("python"),
        "placement": placement,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "modes": args.modes,
        "repeat": args.repeat,
        "tree": bg.tree_info(Path(__file__).resolve().parent.parent),
    }
    bg.log(f"bench_dialects: {placement}; {len(args.cases)} cases x {len(args.modes)} modes")
    cases = [c for c in CASES if c.name in args.cases]
    with tempfile.TemporaryDirectory(prefix="tokenhub-bench-dialects-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bg.Processes(tmp)
        store = None
        bench = None
        try:
            mock_port, port = bg.free_port(), bg.free_port()
            mock = procs.start(
                "mock", [sys.executable, __file__, "--serve-mock", str(mock_port)],
                f"http://{HOST}:{mock_port}/v1/chat/completions", mock_cpu,
            )  # fmt: skip
            db = str(tmp / "tokenhub.db")
            store = open_store(db)
            store.migrate()
            store.create_tenant("bench")
            key = str(store.create_key("bench")[1])
            cfg = tmp / "tokenhub.toml"
            write_config(cfg, port, mock_port, db)
            gw = procs.start(
                "tokenhub", [*bg.tokenhub_argv(), "serve", "--config", str(cfg)],
                f"http://{HOST}:{port}/v1/chat/completions", proxy_cpu,
            )  # fmt: skip
            bg.wait_ready(mock, f"http://{HOST}:{mock_port}/v1/models")
            bg.wait_ready(gw, f"http://{HOST}:{port}/healthz")
            bench = Bench(
                args, tmp, f"http://{HOST}:{port}", f"http://{HOST}:{mock_port}",
                mock.pid, gw.pid, key, store,
            )  # fmt: skip
            for case in cases:
                for mode in args.modes:
                    bench.check(case, mode)
            total = len(cases) * len(args.modes) * len(args.connections) * args.repeat
            n = 0
            for mode in args.modes:
                for c in args.connections:
                    for rnd in range(args.repeat):
                        for case in cases:
                            n += 1
                            bg.log(f"[{n}/{total}] {case.name} {mode} c={c} ...")
                            res = bench.measure(case, mode, c, rnd)
                            bench.results.append(res)
                            cpu = f"{res.cpu_ms_per_req:.3f}" if res.cpu_ms_per_req else "-"
                            bg.log(
                                f"         {res.rps:8.0f} req/s  p50 {res.p50_ms:.2f} ms  "
                                f"CPU {cpu} ms/req  other load {res.other_load_cores:.2f} cores"
                            )
        except KeyboardInterrupt:
            bg.log("interrupted: stopping the servers")
            return 130
        finally:
            procs.stop_all()
            if store is not None:
                with contextlib.suppress(Exception):
                    store.close()
    assert bench is not None
    print(render(info, bench.results, bench.problems, [c.name for c in cases]))
    if args.json:
        data = {**info, "results": [asdict(r) for r in bench.results], "problems": bench.problems}
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
        bg.log(f"wrote {args.json}")
    return 1 if bench.problems else 0


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def render(
    info: dict[str, Any], results: list[Result], problems: list[str], cases: list[str]
) -> str:
    out = [
        "## Gateway CPU per request by client dialect and upstream wire",
        "",
        *bg.machine_lines(info),
        f"Placement: {info['placement']}. {info['warmup_s']} s warm-up then a "
        f"{info['duration_s']} s window per row, {info['repeat']} round(s), medians shown.",
        "Request: a system prompt and one user message, the mock's 32-token reply; "
        "stream = SSE (chat with include_usage).",
        "",
        "| case | mode | conns | req/s | p50 ms | p99 ms | tokenhub CPU ms/req | vs chat "
        "| paired | mock CPU ms/req | ledger |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode in info["modes"]:
        for c in info["connections"]:
            rows = {
                name: [r for r in results if (r.case, r.mode, r.connections) == (name, mode, c)]
                for name in cases
            }
            ref = _median([r.cpu_ms_per_req for r in rows.get(REFERENCE, []) if r.cpu_ms_per_req])
            for name in cases:
                rs = rows[name]
                if not rs:
                    continue
                cpu = _median([r.cpu_ms_per_req for r in rs if r.cpu_ms_per_req])
                mock = _median([r.mock_cpu_ms_per_req for r in rs if r.mock_cpu_ms_per_req])
                rps = _median([r.rps for r in rs]) or 0.0
                p50 = _median([r.p50_ms for r in rs]) or 0.0
                p99 = _median([r.p99_ms for r in rs]) or 0.0
                ratio = f"{cpu / ref:.2f}x" if cpu and ref else "-"
                # Each round's ratio to that round's chat run (they ran minutes apart at most).
                refs = {
                    r.round: r.cpu_ms_per_req for r in rows.get(REFERENCE, []) if r.cpu_ms_per_req
                }
                pairs = [
                    r.cpu_ms_per_req / refs[r.round]
                    for r in rs
                    if r.cpu_ms_per_req and r.round in refs
                ]
                paired = _median(pairs)
                paired_s = f"{paired:.2f}x" if paired else "-"
                ok = "ok" if all(r.ledger.get("ok") for r in rs) else "MISMATCH"
                out.append(
                    f"| {name} | {mode} | {c} | {rps:,.0f} | {p50:.2f} | {p99:.2f} "
                    f"| {bg._f(cpu, 3)} | {ratio} | {paired_s} | {bg._f(mock, 3)} | {ok} |"
                )
    noisy = [r for r in results if r.other_load_cores > 0.2]
    out += [
        "",
        "CPU per request = the tokenhub process's utime+stime over the window / requests the "
        "mock served in it. vs chat: the ratio of the medians to chat -> openai's; paired: the "
        "median of each round's ratio to that round's chat -> openai. Ledger: the run's usage "
        "events equal the mock's ledger (count, input and output tokens) and carry the "
        "dialect's endpoint.",
    ]
    if noisy:
        out.append(
            f"Noise: {len(noisy)} of {len(results)} windows saw more than 0.2 core of work "
            f"that is none of the bench's (worst {max(r.other_load_cores for r in noisy):.2f}); "
            "read absolute figures as rough, ratios as the result."
        )
    if problems:
        out += ["", "### Problems", ""] + [f"- {p}" for p in problems]
    return "\n".join(out)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 16 connections, 2 s windows, 1 round"
    )
    p.add_argument(
        "--connections", default=None, help="comma-separated connection counts (default 32)"
    )
    p.add_argument("--duration", type=int, default=None, help="measured window, s (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up per row, s (default 1)")
    p.add_argument("--repeat", type=int, default=None, help="rounds (default 3; --quick 1)")
    p.add_argument("--modes", default="json,stream", help="json,stream (default: both)")
    p.add_argument(
        "--cases",
        default=",".join(c.name.replace(" ", "") for c in CASES),
        help="comma-separated cases, spaces removed (default: all):\n"
        + ", ".join(c.name.replace(" ", "") for c in CASES),
    )
    p.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    # Internal: the bench's own subprocesses.
    p.add_argument("--serve-mock", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--loadgen-python", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--body-file", help=argparse.SUPPRESS)
    p.add_argument("--header", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loadgen_python:
        args.connections = int(args.connections)
        return args
    conns = args.connections or ("16" if args.quick else "32")
    try:
        args.connections = [int(c) for c in conns.split(",") if c.strip()]
    except ValueError:
        p.error(f"--connections: expected numbers like 1,16,64, got {conns!r}")
    if not args.connections or min(args.connections) < 1 or max(args.connections) > 1024:
        p.error("--connections: between 1 and 1024")
    args.duration = args.duration or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.repeat = args.repeat or (1 if args.quick else 3)
    if not 1 <= args.duration <= 600 or not 0 <= args.warmup <= 60 or not 1 <= args.repeat <= 20:
        p.error("--duration: 1-600 s, --warmup: 0-60 s, --repeat: 1-20")
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes: a comma-separated subset of {','.join(MODES)}")
    names = {c.name.replace(" ", ""): c.name for c in CASES}
    wanted = [x for x in args.cases.split(",") if x]
    unknown = [x for x in wanted if x not in names]
    if unknown or not wanted:
        p.error(f"--cases: unknown {unknown}; known: {', '.join(names)}")
    args.cases = [names[x] for x in wanted]
    if REFERENCE not in args.cases:
        args.cases.insert(0, REFERENCE)  # the ratios need it
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_mock is not None:
        serve_mock(args.serve_mock)
        return 0
    if args.loadgen_python:
        loadgen_main(args)
        return 0
    os.environ.setdefault("TOKENHUB_LOG_LEVEL", "WARNING")
    with bg.stopped_on_sigterm():
        return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
