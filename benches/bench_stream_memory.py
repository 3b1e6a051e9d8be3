"""Stream memory benchmark: what each concurrent long stream costs the gateway in resident memory.

    .venv/bin/python benches/bench_stream_memory.py          # 200 streams x 20k tokens, ~1 min
    .venv/bin/python benches/bench_stream_memory.py --quick  # 20 streams x 2k tokens
    .venv/bin/python benches/bench_stream_memory.py --streams 100 --tokens 50000 --json mem.json

For each case a fresh mock upstream (``tokenhub mock-upstream --completion-tokens N``) and a fresh
gateway (``tokenhub serve --config``, one process, SQLite in a temp dir, a tenant and key made with
``tokenhub tenants create`` / ``keys create``) are started; then:

1. warm-up: one stream of the full length, read at full speed (its size in bytes sets the pace
   below), and a few short ones, so that lazily built state (meters, pools) is in place;
2. idle: the gateway's VmRSS (``/proc/PID/status``) after the warm-up, with nothing in flight;
3. load: ``--streams`` concurrent ``POST /v1/chat/completions`` with ``stream: true`` and
   ``stream_options.include_usage``, each ~``--tokens`` output tokens, over one aiohttp client.
   Each stream is read at a bounded pace (``--seconds``: a stream's bytes spread over that many
   seconds, in reads of at most 16 KiB), so TCP back-pressure holds every stream open at once;
   the mock writes each stream in one go, the gateway relays it as the client reads. VmRSS is
   sampled every 50 ms; the peak is the larger of the samples and VmHWM.

Reported per case: idle and peak RSS, (peak - idle) / streams (what one concurrent stream
costs), how many streams were in flight at once (all of them, or the pacing was too fast), the
wall time, and the bytes of one stream. Cases: ``usage`` (the upstream sends a usage chunk, the
gateway bills it) and ``no-usage`` (``mock-upstream --omit-usage``: the gateway meters each
choice's output itself and sends the client a usage chunk of its own).

The gateway's figure includes the I/O path's buffers, which a paced reader keeps full: unread
upstream bytes (up to the HTTP client's high-water mark plus one socket read), the client
transport's write buffer, and the copies in between. The ``relay`` case isolates the parser:
in this process, ``--streams`` ``SseRelay`` objects (with the cl100k_base meter, as the gateway
makes them) are fed a synthetic stream of ``--tokens`` chunks in 16 KiB reads, round-robin so
all are in flight, and the process's RSS growth per relay is reported (the output count is
checked against the meter's count of the text).

Correctness: every stream must be a 200 that ends with ``data: [DONE]`` after a usage chunk whose
``completion_tokens`` is the mock's exact count; anything else is printed and makes the script exit
with status 1. Memory figures are the kernel's resident set: allocator caching and page
granularity make them approximate (read differences below ~1 MB as noise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
CASES = ("relay", "usage", "no-usage")
WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog")
READ_BYTES = 16 * 1024
SAMPLE_S = 0.05


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tokenhub_argv() -> list[str]:
    exe = Path(sys.executable).with_name("tokenhub")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tokenhub.cli"]


def _die_with_parent() -> None:
    # If the bench is killed outright, the servers it started do not outlive it.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Processes:
    """The bench's subprocesses; stop_all() ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "TOKENHUB_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
        with open(self.tmp / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs.append((name, proc))
        return proc

    def tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.tmp / f"{name}.log").read_text().splitlines()[-20:])
        return ""

    def wait_ready(self, name: str, proc: subprocess.Popen[bytes], probe: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.tail(name)}")
            with contextlib.suppress(OSError):
                http("GET", probe)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after 60 s:\n{self.tail(name)}")

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()


def write_config(path: Path, port: int, mock_port: int, db: str, tokens: int) -> None:
    path.write_text(
        f"""\
[server]
host = "{HOST}"
port = {port}
database = "{db}"

[[providers]]
name = "mock"
base_url = "http://{HOST}:{mock_port}/v1"

[[models]]
id = "{MODEL}"

  [[models.deployments]]
  provider = "mock"
  upstream_model = "{MODEL}"
  vocab = "cl100k_base"
  context_window = {tokens + 4096}
  max_output_tokens = {tokens}
"""
    )


@dataclass
class Stream:
    status: int = 0
    nbytes: int = 0
    t_first: float = 0.0
    t_end: float = 0.0
    completion_tokens: int | None = None
    usage_source: str = ""
    error: str = ""


def body(tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long story."}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": tokens,
        }
    ).encode()


async def one_stream(session: Any, url: str, key: str, tokens: int, pace: float) -> Stream:
    """One streamed request, read at `pace` bytes/s at most (0: as fast as it comes). Keeps
    only the stream's tail: its usage chunk and [DONE] are checked."""
    s = Stream()
    tail = b""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        async with session.post(url, data=body(tokens), headers=headers) as resp:
            s.status = resp.status
            s.t_first = time.monotonic()
            while True:
                data = await resp.content.read(READ_BYTES)
                if not data:
                    break
                s.nbytes += len(data)
                tail = (tail + data)[-4096:]
                if pace:
                    ahead = s.t_first + s.nbytes / pace - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
    except Exception as e:
        s.error = f"{type(e).__name__}: {e}"
    s.t_end = time.monotonic()
    events = [ln[5:].strip() for ln in tail.split(b"\n") if ln.startswith(b"data:")]
    if s.status != 200 or not events or events[-1] != b"[DONE]" or len(events) < 2:
        s.error = s.error or f"status {s.status}, tail {tail[-300:]!r}"
        return s
    with contextlib.suppress(ValueError):
        last = json.loads(events[-2])
        s.completion_tokens = (last.get("usage") or {}).get("completion_tokens")
        s.usage_source = (last.get("tokenhub") or {}).get("usage_source", "upstream")
    return s


@dataclass
class Result:
    case: str
    streams: int
    tokens: int
    stream_bytes: int
    idle_rss_kb: int
    peak_rss_kb: int
    per_stream_kb: float
    max_in_flight: int
    wall_s: float
    usage_source: str
    errors: int


async def run_case(
    case: str, args: argparse.Namespace, procs: Processes, tmp: Path
) -> tuple[Result, list[str]]:
    import aiohttp

    mock_port, gw_port = free_port(), free_port()
    th = tokenhub_argv()
    mock_argv = [*th, "mock-upstream", "--host", HOST, "--port", str(mock_port),
                 "--completion-tokens", str(args.tokens)]  # fmt: skip
    if case == "no-usage":
        mock_argv.append("--omit-usage")
    mock = procs.start(f"mock-{case}", mock_argv)
    db = str(tmp / f"{case}.db")
    for argv in (["tenants", "create", "bench", "--db", db],
                 ["keys", "create", "--tenant", "bench", "--json", "--db", db]):  # fmt: skip
        out = subprocess.run([*th, *argv], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"tokenhub {' '.join(argv)}: {out.stderr.strip()}")
    key = json.loads(out.stdout)["secret"]
    cfg = tmp / f"{case}.toml"
    write_config(cfg, gw_port, mock_port, db, args.tokens)
    gw = procs.start(f"gateway-{case}", [*th, "serve", "--config", str(cfg)])
    procs.wait_ready(f"mock-{case}", mock, f"http://{HOST}:{mock_port}/v1/models")
    procs.wait_ready(f"gateway-{case}", gw, f"http://{HOST}:{gw_port}/healthz")
    url = f"http://{HOST}:{gw_port}/v1/chat/completions"
    problems: list[str] = []

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up: one full stream at full speed (its size sets the pace), a few short ones.
        full = await one_stream(session, url, key, args.tokens, 0)
        if full.error:
            raise RuntimeError(f"{case}: warm-up stream failed: {full.error}")
        await asyncio.gather(*(one_stream(session, url, key, 64, 0) for _ in range(8)))
        await asyncio.sleep(1.0)
        idle = status_kb(gw.pid)["VmRSS"]
        log(f"  {case}: gateway pid {gw.pid}, idle RSS {idle / 1024:.1f} MiB, "
            f"one stream = {full.nbytes / 1e6:.2f} MB")  # fmt: skip

        peak = idle
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, status_kb(gw.pid)["VmRSS"])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_S)

        sampler = asyncio.create_task(sample())
        pace = full.nbytes / args.seconds
        t0 = time.monotonic()
        streams = await asyncio.gather(
            *(one_stream(session, url, key, args.tokens, pace) for _ in range(args.streams))
        )
        wall = time.monotonic() - t0
        stop.set()
        await sampler
        peak = max(peak, status_kb(gw.pid)["VmHWM"])

    # In flight at once: the most streams whose [first byte, end] intervals overlap.
    marks = sorted([(s.t_first, 1) for s in streams] + [(s.t_end, -1) for s in streams])
    live = most = 0
    for _, d in marks:
        live += d
        most = max(most, live)
    sources = sorted({s.usage_source for s in streams if not s.error})
    for i, s in enumerate(streams):
        if s.error:
            problems.append(f"{case}: stream {i}: {s.error}")
        elif s.completion_tokens != full.completion_tokens or s.nbytes != full.nbytes:
            problems.append(
                f"{case}: stream {i}: {s.nbytes} bytes, completion_tokens "
                f"{s.completion_tokens} (the warm-up had {full.nbytes}, {full.completion_tokens})"
            )
    want = "upstream" if case == "usage" else "metered"
    if sources != [want]:
        problems.append(f"{case}: usage sources {sources}, expected [{want!r}]")
    procs.stop_all()
    res = Result(
        case=case,
        streams=args.streams,
        tokens=full.completion_tokens or 0,
        stream_bytes=full.nbytes,
        idle_rss_kb=idle,
        peak_rss_kb=peak,
        per_stream_kb=(peak - idle) / args.streams,
        max_in_flight=most,
        wall_s=wall,
        usage_source=",".join(sources),
        errors=sum(1 for s in streams if s.error),
    )
    return res, problems


def synthetic_stream(tokens: int) -> tuple[bytes, str]:
    """A chat completion stream of `tokens` one-token deltas (cl100k_base) with a usage chunk,
    shaped like the mock's, and its text."""
    head = (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-4o-mini","system_fingerprint":"fp_bench","choices":[{"index":0,'
        b'"delta":{"content":"'
    )
    tail = b'"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    words = [WORDS[k % len(WORDS)] for k in range(tokens)]
    body = b"".join(head + w.encode() + tail for w in words)
    usage = (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[],'
        b'"usage":{"prompt_tokens":9,"completion_tokens":%d,"total_tokens":%d}}\n\n'
        % (tokens, tokens + 9)
    )
    return body + usage + b"data: [DONE]\n\n", "".join(words)


def relay_case(args: argparse.Namespace) -> tuple[Result, list[str]]:
    """The parser alone: RSS growth of this process per SseRelay fed a whole stream."""
    import gc

    from tokenhub import Meter
    from tokenhub._core import SseRelay

    meter = Meter.load("cl100k_base")
    data, text = synthetic_stream(args.tokens)

    def make() -> Any:
        try:
            return SseRelay(True, meter.core)
        except TypeError:  # a relay from before it counted output (it kept the payloads)
            return SseRelay(True)

    make().feed(data)  # warm-up: lazily built state
    gc.collect()
    me = os.getpid()
    idle = status_kb(me)["VmRSS"]
    t0 = time.monotonic()
    relays = [make() for _ in range(args.streams)]
    peak = idle
    for k, at in enumerate(range(0, len(data), READ_BYTES)):
        piece = data[at : at + READ_BYTES]
        for r in relays:
            r.feed(piece)
        if k % 64 == 0:
            peak = max(peak, status_kb(me)["VmRSS"])
    peak = max(peak, status_kb(me)["VmRSS"])
    wall = time.monotonic() - t0
    problems = []
    want = meter.count(text)
    for i, r in enumerate(relays):
        counted = getattr(r, "output_tokens", want)
        if not r.done or r.usage is None or counted != want:
            problems.append(f"relay: relay {i}: done {r.done}, output_tokens {counted} != {want}")
    del relays
    res = Result(
        case="relay",
        streams=args.streams,
        tokens=want,
        stream_bytes=len(data),
        idle_rss_kb=idle,
        peak_rss_kb=peak,
        per_stream_kb=(peak - idle) / args.streams,
        max_in_flight=args.streams,
        wall_s=wall,
        usage_source="",
        errors=len(problems),
    )
    return res, problems


def render(results: list[Result]) -> str:
    rows = [
        "| case | streams | tokens/stream | MB/stream | in flight | idle RSS MiB | peak RSS MiB "
        "| KiB per stream | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.case} | {r.streams} | {r.tokens:,} | {r.stream_bytes / 1e6:.2f} "
            f"| {r.max_in_flight} | {r.idle_rss_kb / 1024:.1f} | {r.peak_rss_kb / 1024:.1f} "
            f"| {r.per_stream_kb:,.1f} | {r.wall_s:.1f} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--streams", type=int, default=200, help="concurrent streams (default: 200)")
    p.add_argument("--tokens", type=int, default=20_000, help="output tokens per stream")
    p.add_argument(
        "--seconds", type=float, default=20.0, help="how long the client takes to read a stream"
    )
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: relay,usage,no-usage")
    p.add_argument("--quick", action="store_true", help="20 streams x 2,000 tokens over 5 s")
    p.add_argument("--json", metavar="PATH", help="write every result as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.tokens, args.seconds = 20, 2_000, 5.0
    args.cases = [c for c in args.cases.split(",") if c]
    if bad := [c for c in args.cases if c not in CASES]:
        p.error(f"unknown case(s) {bad}; known: {', '.join(CASES)}")
    if args.streams < 1 or args.tokens < 1 or args.seconds <= 0:
        p.error("--streams, --tokens and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[Result] = []
    problems: list[str] = []
    log(f"bench_stream_memory: {args.streams} streams x {args.tokens} tokens, "
        f"each read over {args.seconds:.0f} s")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tokenhub-bench-mem-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp)
        try:
            for case in args.cases:
                if case == "relay":
                    res, found = relay_case(args)
                else:
                    res, found = asyncio.run(run_case(case, args, procs, tmp))
                results.append(res)
                problems += found
        finally:
            procs.stop_all()
    print(render(results))
    for p in problems[:20]:
        print(f"ERROR {p}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "args": {k: v for k, v in vars(args).items() if k != "json"},
                    "results": [asdict(r) for r in results],
                    "problems": problems,
                },
                indent=2,
            )
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
