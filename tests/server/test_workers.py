"""`tokenhub serve --workers N`: real processes on loopback.

One `tokenhub mock-upstream` (100 ms per request, so requests overlap) for the module; each test
runs `tokenhub serve --config FILE` on a SQLite file of its own, prepared with the store API,
and checks what reached the database against the mock's ledger: every request the upstream
served has exactly one event, with the upstream's tokens (or "interrupted" when a kill cut it).
Which worker served a response is in its `x-tokenhub-worker` header; worker pids are found as
the children of the gateway process in /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import http_json, wait_until
from procs import (
    Procs,
    Site,
    children,
    event_ids,
    no_traceback,
    open_site,
)

from tokenhub.cli import build_parser, main
from tokenhub.runtime.journal import Journal
from tokenhub.store import open_store
from tokenhub.usage import UsageEvent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing, /proc")

MESSAGES = [{"role": "user", "content": "Say something worth metering."}]
TENANT = "workers"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, mock: str) -> Iterator[Site]:
    with open_site(tmp_path, mock, TENANT) as s:
        yield s


# -- requests ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int = 0
    request_id: str | None = None
    worker: str | None = None
    usage: dict[str, int] | None = None  # set only for a complete 200 response
    error: str = ""


async def burst(
    url: str,
    secret: str,
    total: int,
    *,
    concurrency: int = 32,
    after: int = 0,
    then: Callable[[], None] | None = None,
) -> list[Outcome]:
    """`total` chat completions (every fourth streamed), `concurrency` at a time, each on a new
    connection (so that the kernel spreads them over the workers' sockets); `then()` is
    called once `after` complete responses have arrived."""
    outcomes = [Outcome() for _ in range(total)]
    complete = 0
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {secret}"}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal complete
        stream = i % 4 == 3
        body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 8 + i}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        out = outcomes[i]
        async with sem:
            try:
                async with session.post(url, json=body, headers=headers) as resp:
                    out.status = resp.status
                    out.request_id = resp.headers.get("x-request-id")
                    out.worker = resp.headers.get("x-tokenhub-worker")
                    data = await resp.read()
                    if resp.status != 200:
                        out.error = f"status {resp.status}"
                        return
                    if stream:
                        lines = [x[6:] for x in data.split(b"\n") if x.startswith(b"data: ")]
                        if lines[-1] != b"[DONE]":
                            out.error = "stream cut"
                            return
                        out.usage = json.loads(lines[-2])["usage"]
                    else:
                        out.usage = json.loads(data)["usage"]
            except (aiohttp.ClientError, ValueError, IndexError) as e:
                out.error = type(e).__name__
                return
        complete += 1
        if then is not None and complete == after:
            then()

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(total)))
    return outcomes


def status_and_worker(url: str, secret: str) -> tuple[int, str | None]:
    """One request on a fresh connection."""

    async def go() -> tuple[int, str | None]:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.post(
                url,
                json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 4},
                headers={"Authorization": f"Bearer {secret}"},
            ) as resp,
        ):
            await resp.read()
            return resp.status, resp.headers.get("x-tokenhub-worker")

    return asyncio.run(go())


# -- checks ------------------------------------------------------------------------------------


def settled_ledger(mock: str, since: float = 0.0) -> dict[str, Any]:
    """The mock's ledger, once it stopped growing (requests a killed gateway left there finish
    later)."""

    def settled() -> dict[str, Any] | None:
        first = http_json(mock + "/mock/ledger")
        time.sleep(0.2)
        second = http_json(mock + "/mock/ledger")
        stable = first["totals"]["requests"] == second["totals"]["requests"]
        return dict(second) if stable and time.monotonic() - since > 0.3 else None

    return wait_until(settled, 15.0, what="the mock's ledger to settle")


def check_against_ledger(site: Site, ledger: dict[str, Any], outcomes: list[Outcome]) -> int:
    """No loss, no doubles, nothing invented: returns the number of interrupted events."""
    served = {e["client_request_id"]: e for e in ledger["entries"]}
    assert len(served) == len(ledger["entries"]), "the upstream saw a request id twice"
    events = list(site.store.iter_events())
    by_id = {e.request_id: e for e in events}
    assert len(by_id) == len(events)
    complete = {o.request_id: o.usage for o in outcomes if o.usage is not None}
    assert None not in complete
    cut = [o for o in outcomes if o.usage is None]
    # Every complete response: its event, with the tokens the client was told.
    for rid, usage in complete.items():
        e = by_id[rid]
        assert (e.status, e.source) == (200, "upstream"), e
        assert (e.input_tokens, e.output_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        ), e
    # Every request the upstream served: an event, finished or cut by a kill.
    interrupted = 0
    for rid, entry in served.items():
        e = by_id.get(rid)
        assert e is not None, f"the upstream served {rid} and the database has no event"
        assert (e.tenant, e.key_id, e.model) == (TENANT, site.key_id, "gpt-4o-mini")
        if e.status == 200:
            assert (e.input_tokens, e.output_tokens) == (
                entry["prompt_tokens"],
                entry["completion_tokens"],
            ), e
        else:
            assert (e.status, e.error, e.source, e.output_tokens) == (
                0,
                "interrupted",
                "metered",
                0,
            ), e
            assert e.request_id not in complete
            assert e.input_tokens == entry["prompt_tokens"]
            interrupted += 1
    # Nothing the upstream did not see, except requests that began just before a kill.
    for e in events:
        if e.request_id not in served:
            assert (e.status, e.error) == (0, "interrupted"), e
    assert sum(1 for e in events if e.status == 0) <= len(cut)
    return interrupted


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.log"))


# -- tests -------------------------------------------------------------------------------------


def test_help_and_invalid_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_help:
        build_parser().parse_args(["serve", "--help"])
    assert exit_help.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--workers N" in help_text
    assert "x-tokenhub-worker" in help_text
    for bad in ("0", "-1", "65"):
        assert main(["serve", "--workers", bad, "--config", "nonexistent.toml"]) == 2
        err = capsys.readouterr().err
        assert err == f"tokenhub: error: --workers must be between 1 and 64 (got {bad})\n"


def test_two_workers_serve_record_once_and_see_revocations(site: Site, procs: Procs) -> None:
    gw = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
    gw.wait_serving()
    assert "2 workers" in gw.stdout()
    assert len(children(gw.pid)) == 2

    outcomes = asyncio.run(burst(site.url, site.secret, 200))
    assert [o.error for o in outcomes if o.error] == []
    by_worker = {w: sum(o.worker == w for o in outcomes) for w in ("1", "2")}
    assert sum(by_worker.values()) == 200
    # 200 connections hashed over two sockets: far from an even split would mean one queue.
    assert min(by_worker.values()) >= 50, by_worker
    # Request ids are unique across workers, and so are their random parts: a worker that did
    # not reseed after the fork would repeat its sibling's sequence.
    ids = [o.request_id for o in outcomes]
    assert len({i[-20:] for i in ids if i}) == 200

    # Exactly once in the database: what the upstream served, with its tokens.
    ledger = http_json(site.mock + "/mock/ledger")
    assert len(ledger["entries"]) == 200
    wait_until(lambda: event_ids(site.store) >= set(ids), 10.0, what="every event")
    assert check_against_ledger(site, ledger, outcomes) == 0
    assert site.store.count_events() == 200

    # A new key, then its revocation, reach both workers (each has its own key cache).
    key, secret = site.store.create_key(TENANT)

    def seen_by_both(status: int) -> bool:
        seen = set()
        for _ in range(40):
            code, worker = status_and_worker(site.url, secret)
            if code != status:
                return False
            seen.add(worker)
            if seen == {"1", "2"}:
                return True
        return False

    wait_until(lambda: seen_by_both(200), 10.0, interval=0.1, what="the new key on both workers")
    site.store.revoke_key(key.id)
    wait_until(lambda: seen_by_both(401), 10.0, interval=0.1, what="the revocation on both")
    assert status_and_worker(site.url, site.secret)[0] == 200

    # SIGTERM: every worker flushes and stops, the parent exits 0 and frees the port.
    assert gw.stop() == 0
    assert children(gw.pid) == []
    assert "shutting down 2 workers" in gw.stderr()
    no_traceback(gw)
    ledger = http_json(site.mock + "/mock/ledger")
    assert {e["client_request_id"] for e in ledger["entries"]} == event_ids(site.store)
    for d in (site.journal / "worker-1", site.journal / "worker-2"):
        assert d.is_dir()
    with pytest.raises(OSError):
        http_json(site.base + "/healthz", timeout=1.0)


def test_two_workers_enforce_one_rpm_limit(site: Site, procs: Procs) -> None:
    """The quota table is shared: an rpm limit of 10 admits 10 requests across both workers,
    not 10 per worker."""
    site.store.set_limits("key", site.key_id, rpm=10)
    stale = Path("/dev/shm/tokenhub-quota-4194999")  # above pid_max's default: no such process
    if Path("/dev/shm").is_dir():
        stale.write_bytes(b"left by a server killed with SIGKILL")
    gw = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
    gw.wait_serving()
    table = Path(f"/dev/shm/tokenhub-quota-{gw.pid}")
    assert table.exists() or not Path("/dev/shm").is_dir()
    assert not stale.exists()  # swept when the server started

    outcomes = asyncio.run(burst(site.url, site.secret, 30, concurrency=30))
    statuses = sorted(o.status for o in outcomes)
    assert statuses == [200] * 10 + [429] * 20, statuses
    assert {o.worker for o in outcomes} == {"1", "2"}  # both workers answered, one limit
    refused = [o for o in outcomes if o.status == 429]
    wait_until(
        lambda: event_ids(site.store) >= {o.request_id for o in outcomes},
        10.0,
        what="every event",
    )
    events = {e.request_id: e for e in site.store.iter_events()}
    for o in refused:
        e = events[str(o.request_id)]
        assert (e.status, e.error, e.input_tokens, e.output_tokens) == (
            429, "rate_limit_exceeded", 0, 0,
        )  # fmt: skip
    assert gw.stop() == 0
    no_traceback(gw)
    assert not table.exists()  # the table goes with the server


def test_kill_9_of_a_worker_mid_burst(site: Site, procs: Procs) -> None:
    gw = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
    gw.wait_serving()
    workers = children(gw.pid)
    assert len(workers) == 2
    victim = workers[0]
    killed_at: list[float] = []

    def kill() -> None:
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())

    outcomes = asyncio.run(burst(site.url, site.secret, 200, after=48, then=kill))
    assert killed_at
    # Usually the kill cuts some requests short; when it happens to land between requests
    # there is nothing in flight, and what follows must hold all the same.
    cut = [o for o in outcomes if o.usage is None]

    # The parent restarts it; the new worker replays the journal its predecessor left.
    def replaced() -> bool:
        now = children(gw.pid)
        return len(now) == 2 and victim not in now and "serves again" in gw.stderr()

    wait_until(replaced, 15.0, what="the worker to be restarted")
    err = gw.stderr()
    assert f"(pid {victim}) was killed by SIGKILL; restarting it" in err
    if cut:
        assert "replaying" in err  # the requests it was in the middle of
    more = asyncio.run(burst(site.url, site.secret, 40))
    assert [o.error for o in more if o.error] == []
    assert {o.worker for o in more} == {"1", "2"}

    ledger = settled_ledger(site.mock, killed_at[0])
    assert gw.stop() == 0
    no_traceback(gw)
    interrupted = check_against_ledger(site, ledger, outcomes + more)
    assert interrupted <= len(cut)
    # Served requests all have events (checked above); and nothing else has one.
    served = {e["client_request_id"] for e in ledger["entries"]}
    assert {e.request_id for e in site.store.iter_events() if e.status == 200} <= served


def test_two_workers_then_one_loses_no_journaled_event(site: Site, procs: Procs) -> None:
    gw = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
    gw.wait_serving()
    killed_at: list[float] = []

    def kill_all() -> None:  # parent and workers at once: nobody flushes anything
        os.killpg(gw.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    outcomes = asyncio.run(burst(site.url, site.secret, 160, after=48, then=kill_all))
    assert gw.popen.wait(10) == -signal.SIGKILL
    wait_until(lambda: not children(gw.pid), 5.0, what="the workers to die")
    ledger = settled_ledger(site.mock, killed_at[0])
    served = {e["client_request_id"] for e in ledger["entries"]}
    # What only the workers' journals know: at least the requests they were in the middle of.
    assert served - event_ids(site.store)
    assert segments(site.journal / "worker-1") and segments(site.journal / "worker-2")

    one = procs.start("gateway", "serve", "--config", str(site.config))
    one.wait_serving()
    assert served <= event_ids(site.store)  # replayed before it served
    assert "worker-1" in one.stderr() and "worker-2" in one.stderr()
    assert not (site.journal / "worker-1").exists()
    assert not (site.journal / "worker-2").exists()
    assert one.stop() == 0
    no_traceback(one)
    check_against_ledger(site, ledger, outcomes)


def _event(site: Site, n: int, **kw: Any) -> UsageEvent:
    return UsageEvent(
        request_id=f"req_000000000000{n:020x}",
        ts_ms=1_700_000_000_000 + n,
        tenant=TENANT,
        key_id=site.key_id,
        endpoint="chat.completions",
        model="gpt-4o-mini",
        deployment="mock/gpt-4o-mini",
        provider="mock",
        upstream_model="gpt-4o-mini",
        input_tokens=10 + n,
        **kw,
    )


def test_the_parent_replays_journals_no_worker_owns(site: Site, procs: Procs) -> None:
    """Left by earlier runs: segments in the journal dir itself (a single-process run) and in
    worker-3 (a run with three workers); worker-1's own are replayed by worker 1."""
    ended, begun = _event(site, 1, output_tokens=5, latency_ms=3.0), _event(site, 2)
    with Journal(site.journal / "worker-3") as j:
        j.begin(ended)
        j.end(ended)
        j.begin(begun)
    with Journal(site.journal) as j:
        j.begin(_event(site, 3))
    with Journal(site.journal / "worker-1") as j:
        j.begin(_event(site, 4))
    (site.journal / "worker-7").mkdir()  # empty: removed
    (site.journal / "worker-8").mkdir()  # set-aside events: kept
    (site.journal / "worker-8" / "rejected.jsonl").write_text("{}\n")

    gw = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
    gw.wait_serving()
    # The parent's replays are done before it forks; worker 1 queues its own ahead of any
    # new event and writes them in the background.
    wait_until(lambda: site.store.count_events() == 4, 10.0, what="the replayed events")
    events = {e.request_id: e for e in site.store.iter_events()}
    assert events[ended.request_id] == ended
    for n in (2, 3, 4):
        e = events[_event(site, n).request_id]
        assert (e.status, e.error, e.input_tokens) == (0, "interrupted", 10 + n)
    assert len(events) == 4
    assert not (site.journal / "worker-3").exists()
    assert not (site.journal / "worker-7").exists()
    assert (site.journal / "worker-8" / "rejected.jsonl").exists()
    assert segments(site.journal) == []
    assert "left by a single-process run" in gw.stderr()
    assert gw.stop() == 0
    no_traceback(gw)


def test_a_worker_that_cannot_start_stops_the_server(site: Site, procs: Procs) -> None:
    with Journal(site.journal / "worker-2"):  # as if another server's worker 2 ran
        gw = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
        assert gw.popen.wait(20) == 1
    err = gw.stderr()
    assert "worker-2' is in use by another process" in err
    assert "tokenhub: error: worker 2 (pid" in err and "while starting" in err
    assert err.count("\n") < 6, err
    assert "serving on" not in gw.stdout()


def test_a_crash_loop_stops_the_server(site: Site, procs: Procs) -> None:
    gw = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
    gw.wait_serving()
    killed: set[int] = set()
    deadline = time.monotonic() + 20
    while gw.popen.poll() is None and time.monotonic() < deadline:
        for pid in children(gw.pid):
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.02)
    assert gw.popen.wait(10) == 1
    assert len(killed) >= 6
    err = gw.stderr()
    assert "restarting it" in err
    assert "times within 30 s" in err and "not restarting them again" in err
    assert err.rstrip().splitlines()[-1].startswith("tokenhub: error: workers exited 6 times")


# -- SQLite with several writer processes --------------------------------------------------------

WRITER = """
import asyncio, json, sys
from tokenhub.runtime.journal import Journal
from tokenhub.runtime.sink import UsageSink
from tokenhub.store.sqlite import SQLiteStore
from tokenhub.usage import UsageEvent

db, journal, index, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main():
    store = SQLiteStore(db, busy_timeout_ms=50)
    sink = UsageSink(store, Journal(journal), flush_interval=0.01, retry_initial=0.02,
                     retry_max=0.2)
    await sink.start()
    for i in range(n):
        sink.end(UsageEvent(request_id=f"req_{index:02d}_{i:06d}", ts_ms=1_700_000_000_000 + i,
                            tenant="t", key_id="k", endpoint="chat.completions", model="m",
                            output_tokens=i))
        if i % 20 == 0:
            await asyncio.sleep(0.005)
    while not sink.write_errors:
        await asyncio.sleep(0.01)
    print("blocked", flush=True)
    assert await sink.flush(timeout=30)
    await sink.close()
    store.close()
    print(json.dumps(sink.stats()))

asyncio.run(main())
"""


def test_sink_retries_database_is_locked_under_several_writer_processes(tmp_path: Path) -> None:
    """Four processes write usage while another holds the write lock for longer than their
    busy_timeout: every write that failed with 'database is locked' is retried, none lost,
    none doubled."""
    db = tmp_path / "w.db"
    setup = open_store(str(db))
    setup.migrate()
    setup.close()
    n, writers = 400, 4
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(tmp_path / f"j{k}"), str(k), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(writers)
    ]
    try:
        for p in procs:  # every writer has failed against the lock at least once
            assert p.stdout is not None
            assert p.stdout.readline() == b"blocked\n"
        blocker.execute("ROLLBACK")
        blocker.close()
        results = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    stats = []
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()
        stats.append(json.loads(out.splitlines()[-1]))
        assert b"database is locked" in err  # the sink's retry warning
    assert all(s["write_errors"] >= 1 for s in stats), stats
    assert [s["events_written"] for s in stats] == [n] * writers
    assert all(s["backlog"] == 0 and s["duplicates"] == 0 for s in stats)
    check = open_store(str(db))
    try:
        assert check.count_events() == n * writers
    finally:
        check.close()
