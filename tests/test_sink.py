"""The usage sink: hot-path cost, draining, store failures, replay, and kill -9 of a writer."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import pytest
from factories import usage_event

from tokenhub.runtime.journal import Journal
from tokenhub.runtime.sink import UsageSink
from tokenhub.store import InsertResult, StoreError
from tokenhub.store.sqlite import SQLiteStore
from tokenhub.usage import UsageEvent


def event(i: int, **kw: object) -> UsageEvent:
    return usage_event(i, **{"output_tokens": 7, "latency_ms": 12.5, **kw})


def writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tokenhub-usage-writer")]


@pytest.fixture(autouse=True)
def no_writer_thread_left() -> Iterator[None]:
    """close() ends the sink's writer thread."""
    before = set(writer_threads())
    yield
    assert set(writer_threads()) <= before


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "t.db"))
    s.migrate()
    yield s
    s.close()


async def until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def segments(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("journal-*.log"))


class FlakyStore:
    """A store whose insert_events fails `failures` times first (like "database is locked")."""

    def __init__(self, inner: SQLiteStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.calls = 0

    def insert_events(self, events: Sequence[UsageEvent]) -> InsertResult:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise StoreError("database 't.db': database is locked")
        return self.inner.insert_events(events)

    def sync(self) -> bool:
        return self.inner.sync()


async def test_events_reach_the_store(store: SQLiteStore, tmp_path: Path) -> None:
    sink = UsageSink(store, Journal(tmp_path / "j"), flush_interval=0.01)
    await sink.start()
    for i in range(10):
        sink.begin(event(i))
        sink.end(event(i))
    assert await sink.flush(timeout=10)
    assert [e.request_id for e in store.iter_events()] == [f"req_{i:08d}" for i in range(10)]
    assert sink.events_written == 10 and sink.backlog == 0 and sink.batches >= 1
    assert sink.last_batch_ms > 0 and sink.write_errors == 0 and sink.journal_errors == 0
    await sink.close()


async def test_close_drains_everything(store: SQLiteStore, tmp_path: Path) -> None:
    jdir = tmp_path / "j"
    sink = UsageSink(
        store, Journal(jdir, segment_bytes=64 * 1024), flush_interval=10, max_batch=300
    )
    await sink.start()
    for i in range(5000):
        sink.begin(event(i))
        sink.end(event(i))
    assert sink.backlog > 0  # the 10 s interval has not passed: close() must not wait for it
    t0 = time.monotonic()
    await sink.close()
    assert time.monotonic() - t0 < 5
    assert store.count_events() == 5000 and sink.backlog == 0
    assert segments(jdir) == []  # a clean shutdown leaves nothing to replay
    sink.end(event(9999))  # after close: logged, never raised


async def test_the_sink_keeps_its_own_copy(store: SQLiteStore, tmp_path: Path) -> None:
    sink = UsageSink(store, Journal(tmp_path / "j"))
    await sink.start()
    e = event(1)
    sink.end(e)
    e.output_tokens = 12345  # the handler reuses its object
    await sink.close()
    assert next(store.iter_events()).output_tokens == 7


async def test_store_failures_keep_a_backlog_and_retry(store: SQLiteStore, tmp_path: Path) -> None:
    flaky = FlakyStore(store, failures=4)
    jdir = tmp_path / "j"
    sink = UsageSink(flaky, Journal(jdir), flush_interval=0.01, retry_initial=0.02)  # type: ignore[arg-type]
    await sink.start()
    for i in range(100):
        sink.end(event(i))
    await until(lambda: sink.write_errors >= 1)
    assert sink.backlog == 100
    assert segments(jdir)  # meanwhile the events are safe in the journal
    assert await sink.flush(timeout=10)
    assert sink.write_errors == 4 and sink.backlog == 0
    assert store.count_events() == 100
    await sink.close()


async def test_real_lock_contention(tmp_path: Path) -> None:
    """Another process holding the write lock longer than busy_timeout: retried, not lost."""
    db = str(tmp_path / "t.db")
    store = SQLiteStore(db, busy_timeout_ms=20)
    store.migrate()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    sink = UsageSink(store, Journal(tmp_path / "j"), flush_interval=0.01, retry_initial=0.02)
    await sink.start()
    for i in range(50):
        sink.end(event(i))
    await until(lambda: sink.write_errors >= 2)
    assert sink.backlog == 50
    blocker.execute("ROLLBACK")
    blocker.close()
    assert await sink.flush(timeout=10)
    assert store.count_events() == 50
    await sink.close()
    store.close()


async def test_close_gives_up_on_a_dead_store_and_the_journal_keeps_all(
    store: SQLiteStore, tmp_path: Path
) -> None:
    jdir = tmp_path / "j"
    dead = FlakyStore(store, failures=10**9)
    sink = UsageSink(dead, Journal(jdir), flush_interval=0.01, retry_initial=0.02)  # type: ignore[arg-type]
    await sink.start()
    for i in range(30):
        sink.begin(event(i))
        sink.end(event(i))
    sink.begin(event(30))  # in flight at shutdown
    await sink.close(timeout=0.2)
    assert store.count_events() == 0 and sink.backlog == 31 - 1

    # The next start replays them into a healthy store.
    sink = UsageSink(store, Journal(jdir))
    await sink.start()
    await sink.close()
    got = list(store.iter_events())
    assert got[:30] == [event(i) for i in range(30)]
    assert (got[30].request_id, got[30].error, got[30].status) == ("req_00000030", "interrupted", 0)
    assert sink.replayed == 31 and segments(jdir) == []


async def test_replay_on_start_is_idempotent(store: SQLiteStore, tmp_path: Path) -> None:
    jdir = tmp_path / "j"
    j = Journal(jdir)
    for i in range(20):
        j.begin(event(i))
        j.end(event(i))
    j.begin(event(20))
    j.close()
    store.insert_events([event(i) for i in range(10)])  # committed before the "crash"

    sink = UsageSink(store, Journal(jdir), flush_interval=0.01)
    sink.end(event(100))  # a new event before start(): written after the replayed ones
    await sink.start()
    await sink.close()
    assert sink.replayed == 21
    assert (sink.events_written, sink.duplicates, sink.conflicts) == (12, 10, 0)
    assert store.count_events() == 22
    assert segments(jdir) == []


async def test_unstorable_events_are_set_aside(store: SQLiteStore, tmp_path: Path) -> None:
    jdir = tmp_path / "j"
    sink = UsageSink(store, Journal(jdir), flush_interval=0.01)
    await sink.start()
    sink.end(event(1))
    sink.end(event(2, input_tokens=2**70))  # would fail every retry
    sink.end(event(3))
    assert await sink.flush(timeout=10)
    await sink.close()
    assert [e.request_id for e in store.iter_events()] == ["req_00000001", "req_00000003"]
    assert sink.rejected == 1 and sink.write_errors == 0
    rejected = msgspec.json.decode((jdir / "rejected.jsonl").read_bytes())
    assert rejected["event"]["request_id"] == "req_00000002"
    assert "64-bit" in rejected["reason"]


async def test_journal_failures_never_reach_the_handler(store: SQLiteStore, tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    sink = UsageSink(store, j, flush_interval=0.01)
    await sink.start()
    j.close()  # the journal is gone (as if its disk failed)
    sink.begin(event(1))
    sink.end(event(1))
    assert sink.journal_errors == 2
    await sink.close()
    assert [e.request_id for e in store.iter_events()] == ["req_00000001"]  # still delivered


async def test_committed_segments_are_deleted_while_running(
    store: SQLiteStore, tmp_path: Path
) -> None:
    jdir = tmp_path / "j"
    sink = UsageSink(store, Journal(jdir, segment_bytes=4096), flush_interval=0.005)
    await sink.start()
    for i in range(400):
        sink.begin(event(i))
        sink.end(event(i))
        if i % 50 == 0:
            await asyncio.sleep(0)
    assert await sink.flush(timeout=10)
    sink.end(event(1000))  # one more commit, after which every closed segment is releasable
    assert await sink.flush(timeout=10)
    assert len(segments(jdir)) == 1  # only the live segment is left (was ~40)
    assert sink.journal.segments_deleted > 20
    await sink.close()


async def test_hot_path_writes_every_event_and_reports_its_cost(
    store: SQLiteStore, tmp_path: Path
) -> None:
    sink = UsageSink(store, Journal(tmp_path / "j"))
    await sink.start()
    evs = [event(i) for i in range(4000)]
    tb = te = 0.0
    for k in range(0, len(evs), 500):
        chunk = evs[k : k + 500]
        t0 = time.perf_counter()
        for e in chunk:
            sink.begin(e)
        t1 = time.perf_counter()
        for e in chunk:
            sink.end(e)
        t2 = time.perf_counter()
        tb, te = tb + t1 - t0, te + t2 - t1
        await asyncio.sleep(0)
    begin_us, end_us = tb / len(evs) * 1e6, te / len(evs) * 1e6
    # Reported, not asserted (speed belongs in benches/): ~1.4 and ~2.4 µs here.
    print(f"sink.begin {begin_us:.1f} µs, sink.end {end_us:.1f} µs per call")
    await sink.close()
    assert sink.stats()["events_written"] == len(evs)
    assert {e.request_id for e in store.iter_events()} == {e.request_id for e in evs}


async def test_end_is_safe_from_other_threads(store: SQLiteStore, tmp_path: Path) -> None:
    sink = UsageSink(store, Journal(tmp_path / "j", segment_bytes=8192), flush_interval=0.005)
    await sink.start()

    def work(t: int) -> None:
        for i in range(300):
            e = event(t * 1000 + i)
            sink.begin(e)
            sink.end(e)

    await asyncio.gather(*(asyncio.to_thread(work, t) for t in range(4)))
    await sink.close()
    assert store.count_events() == 1200 and sink.conflicts == 0


# -- kill -9 -----------------------------------------------------------------------------

CHILD = """
import asyncio, os, sys
from tokenhub.runtime.journal import Journal
from tokenhub.runtime.sink import UsageSink
from tokenhub.store import open_store
from tokenhub.usage import UsageEvent

async def main() -> None:
    store = open_store(sys.argv[1])
    store.migrate()
    sink = UsageSink(store, Journal(sys.argv[2], segment_bytes=32768), flush_interval=0.003)
    await sink.start()  # replays what an earlier child left
    i = int(sys.argv[3])
    while True:
        e = UsageEvent(request_id=f"req_{i:08d}", ts_ms=1_700_000_000_000 + i, tenant="acme",
                       key_id="key_0123456789ab", endpoint="chat.completions", model="m",
                       deployment="d", input_tokens=i % 1000 + 1)
        sink.begin(e)
        if i % 97 == 5:
            os.write(1, b"h%d\\n" % i)  # a request that hangs: begun, never ended
        else:
            e.output_tokens = 7
            e.latency_ms = 1.5
            sink.end(e)
            os.write(1, b"e%d\\n" % i)  # written only after end() returned
        i += 1
        if i % 64 == 0:
            await asyncio.sleep(0)  # let the group commit run

asyncio.run(main())
"""


def run_and_kill(script: Path, db: Path, jdir: Path, first: int, lines: int) -> list[str]:
    """Run the child until it reported `lines` progress lines, then SIGKILL it."""
    with subprocess.Popen(
        [sys.executable, str(script), str(db), str(jdir), str(first)], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 60
        while out.count(b"\n") < lines and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        os.kill(proc.pid, signal.SIGKILL)
        out += proc.stdout.read()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    reported = out.decode().split("\n")
    reported.pop()  # "" or a progress line cut by the kill (which tells nothing)
    return reported


def test_kill_9_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    """Three writers killed in turn (the second one early, while it may still be replaying the
    first one's journal), then a clean restart: every event whose end() returned is stored
    exactly once, every hung request as interrupted, nothing else but the requests in flight."""
    db, jdir = tmp_path / "k.db", tmp_path / "k-journal"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ended: set[int] = set()
    hung: set[int] = set()
    in_flight: set[int] = set()
    for first, lines in [(0, 5000), (1_000_000, 1), (2_000_000, 3000)]:
        reported = run_and_kill(script, db, jdir, first, lines)
        ended |= {int(x[1:]) for x in reported if x.startswith("e")}
        hung |= {int(x[1:]) for x in reported if x.startswith("h")}
        in_flight.add(first + len(reported))
    assert len(ended) > 5000 and len(hung) > 50

    store = SQLiteStore(str(db))
    store.migrate()
    assert store.count_events() > 0  # batches were committed before the kills

    async def restart() -> UsageSink:
        sink = UsageSink(store, Journal(jdir))
        await sink.start()
        await sink.close()
        return sink

    sink = asyncio.run(restart())
    assert sink.conflicts == 0 and sink.rejected == 0 and sink.replayed > 0
    rows = {e.request_id: e for e in store.iter_events()}
    assert len(rows) == store.count_events()
    for i in ended:
        e = rows.pop(f"req_{i:08d}")
        assert (e.status, e.output_tokens, e.source) == (200, 7, "upstream"), e
    for i in hung:
        e = rows.pop(f"req_{i:08d}")
        assert (e.status, e.error, e.source) == (0, "interrupted", "metered"), e
        assert (e.input_tokens, e.output_tokens) == (i % 1000 + 1, 0)
    # Left: at most the request each child had in flight (begun, maybe ended) when killed.
    assert set(rows) <= {f"req_{i:08d}" for i in in_flight}
    assert segments(jdir) == []

    # Nothing is left to replay a second time.
    count = store.count_events()
    j = Journal(jdir)
    assert j.replay() == []
    j.close()
    assert store.count_events() == count
    store.close()
