"""The write-ahead journal: records, mapped segments and their zero tails, replay (torn records,
twice), rotation, release, locking, a full disk, kill -9."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
from factories import usage_event

from tokenhub.runtime import journal as journal_mod
from tokenhub.runtime.journal import (
    Journal,
    JournalError,
    JournalWriteError,
    default_journal_dir,
    interrupted_event,
)
from tokenhub.usage import UsageEvent


def event(i: int, **kw: object) -> UsageEvent:
    return usage_event(i, **{"stream": True, **kw})


def finished(i: int) -> UsageEvent:
    return msgspec.structs.replace(event(i), output_tokens=7, latency_ms=12.5, ttft_ms=3.0)


def test_default_dir_is_next_to_the_database() -> None:
    assert default_journal_dir(None) == "tokenhub-journal"
    assert default_journal_dir("data/usage.db") == "data/usage-journal"
    assert default_journal_dir("sqlite:///var/lib/th.db") == "/var/lib/th-journal"


def test_records_are_one_json_line_each(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.begin(event(1))
    assert j.end(finished(1)) == 1
    lines = j.current_segment.read_bytes().splitlines()
    j.close()
    begin = msgspec.json.decode(lines[0])
    assert begin == {
        "kind": "begin",
        "request_id": "req_00000001",
        "ts_ms": 1_700_000_000_001,
        "tenant": "acme",
        "key_id": "key_0123456789ab",
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "deployment": "gpt-4o-mini@mock-a",
        "provider": "mock-a",
        "upstream_model": "gpt-4o-mini",
        "stream": True,
        "input_tokens": 101,
    }
    end = msgspec.json.decode(lines[1])
    assert end["kind"] == "end"
    assert msgspec.convert(end["event"], UsageEvent) == finished(1)


def test_begin_end_replay(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.begin(event(1))
    j.end(finished(1))
    j.begin(event(2))  # never ends: the process "dies"
    j.begin(event(3, attempts=1, deployment="a"))
    j.begin(event(3, attempts=2, deployment="b", provider="mock-b"))  # a retry: latest wins
    j.begin(event(4))
    j.end(finished(4))
    assert j.open_requests == 2
    j.close()  # (like a crash, as far as replay is concerned: segments stay)

    j = Journal(tmp_path)
    got = j.replay()
    assert got == [
        finished(1),
        finished(4),
        interrupted_event(begin_of(event(2))),
        interrupted_event(begin_of(event(3, attempts=2, deployment="b", provider="mock-b"))),
    ]
    lost = got[2]
    assert (lost.status, lost.error, lost.source) == (0, "interrupted", "metered")
    assert (lost.input_tokens, lost.output_tokens, lost.stream) == (102, 0, True)
    assert (got[3].deployment, got[3].provider, got[3].attempts) == ("b", "mock-b", 2)
    assert j.replay_stats.finished == 2 and j.replay_stats.interrupted == 2

    # Crash during replay: the segments are still there and replay yields equal events.
    j.close()
    j = Journal(tmp_path)
    assert j.replay() == got
    j.discard_replayed()
    j.close()
    j = Journal(tmp_path)
    assert j.replay() == [] and not j.replay_pending
    j.close()


def begin_of(e: UsageEvent) -> journal_mod.Begin:
    """The begin record the journal writes for `e`."""
    fields = {n: getattr(e, n) for n in journal_mod.Begin.__struct_fields__}
    return msgspec.convert(fields, journal_mod.Begin)


def test_new_process_never_appends_to_old_segments(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.end(finished(1))
    first = j.current_segment
    j.close()
    j = Journal(tmp_path)
    assert j.current_segment != first
    j.end(finished(2))
    assert j.replay() == [finished(1)]  # only what was there at open
    j.discard_replayed()
    assert not first.exists() and j.current_segment.exists()
    j.close()


def test_torn_last_line_and_corrupt_lines(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.end(finished(1))
    j.begin(event(2))
    j.end(finished(2))
    seg = j.current_segment
    j.close()
    data = seg.read_bytes()
    lines = data.splitlines(keepends=True)
    # A crash in the middle of the last write: the record is cut short.
    seg.write_bytes(b"".join(lines[:2]) + lines[2][:40])
    j = Journal(tmp_path)
    assert j.replay() == [
        finished(1),
        interrupted_event(begin_of(event(2))),
    ]
    assert j.replay_stats.torn == 1 and j.replay_stats.corrupt == 0
    j.close()
    # The whole record but not its newline: the record counts.
    seg.write_bytes(data.rstrip(b"\n"))
    j = Journal(tmp_path)
    assert j.replay() == [finished(1), finished(2)]
    j.close()
    # Garbage inside a segment is skipped (and counted), the rest survives.
    seg.write_bytes(lines[0] + b'{"kind":"end","event":{"request_id"\n' + b"".join(lines[1:]))
    j = Journal(tmp_path)
    assert j.replay() == [finished(1), finished(2)]
    assert j.replay_stats.corrupt == 1
    j.close()


def crash_copy(j: Journal) -> dict[Path, bytes]:
    """The segment files as a kill -9 would leave them: not truncated, zeros after the
    records (a clean close truncates them)."""
    return {seg: seg.read_bytes() for seg in j.segments()}


def restore(files: dict[Path, bytes]) -> None:
    for seg, data in files.items():
        seg.write_bytes(data)


def test_segments_are_preallocated_and_replay_stops_at_the_zeros(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=64 * 1024)
    for i in range(1, 4):
        j.begin(event(i))
        j.end(finished(i))
    j.begin(event(4))
    files = crash_copy(j)
    assert [len(data) for data in files.values()] == [64 * 1024]
    data = next(iter(files.values()))
    used = len(data.rstrip(b"\0"))
    assert 0 < used < 4096 and data[used - 1 : used] == b"\n"
    j.close()
    assert j.current_segment.stat().st_size == used  # a clean close gives the tail back
    expected = [finished(1), finished(2), finished(3), interrupted_event(begin_of(event(4)))]
    for state in ("truncated", "zero tail"):
        if state == "zero tail":
            restore(files)
        j = Journal(tmp_path)
        assert j.replay() == expected, state
        assert (j.replay_stats.torn, j.replay_stats.corrupt) == (0, 0)
        j.close()


def test_a_record_torn_by_a_crash_mid_copy(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=8192)
    j.end(finished(1))
    j.begin(event(2))
    j.end(finished(2))
    ((seg, data),) = crash_copy(j).items()
    j.close()
    lines = data.rstrip(b"\0").splitlines(keepends=True)
    assert len(lines) == 3
    head, last = b"".join(lines[:2]), lines[2]
    zeros = bytes(len(data) - len(head) - len(last))
    # A memcpy need not go front to back: the last record's start only, its end only (with
    # its newline), both ends, or all of it but the newline.
    cut = {
        "start": last[:40] + bytes(len(last) - 40),
        "end": bytes(len(last) - 40) + last[-40:],
        "both ends": last[:40] + bytes(len(last) - 80) + last[-40:],
    }
    for name, torn in cut.items():
        seg.write_bytes(head + torn + zeros)
        j = Journal(tmp_path)
        assert j.replay() == [finished(1), interrupted_event(begin_of(event(2)))], name
        assert (j.replay_stats.torn, j.replay_stats.corrupt) == (1, 0), name
        j.close()
    seg.write_bytes(head + last[:-1] + b"\0" + zeros)  # all there but the newline: it counts
    j = Journal(tmp_path)
    assert j.replay() == [finished(1), finished(2)]
    assert (j.replay_stats.torn, j.replay_stats.corrupt) == (0, 0)
    j.close()
    # NULs in a line before the last one (a power loss can leave holes): skipped, counted.
    seg.write_bytes(lines[0][:30] + bytes(20) + lines[0][50:] + lines[1] + last + zeros)
    j = Journal(tmp_path)
    assert j.replay() == [finished(2)]
    assert (j.replay_stats.torn, j.replay_stats.corrupt) == (0, 1)
    j.close()


def decoded(seg: Path) -> list[dict[str, object]]:
    """Every record of a segment, each of which must decode."""
    return [msgspec.json.decode(x) for x in seg.read_bytes().rstrip(b"\0").splitlines()]


def test_a_record_that_does_not_fit_starts_the_next_segment(tmp_path: Path) -> None:
    """A begin keeps room for its end in its segment: the begin that does not fit with that
    room starts the next segment, and the end then always fits beside it."""
    j = Journal(tmp_path, segment_bytes=1000)
    first = j.current_segment
    j.begin(event(1))
    j.end(finished(1))
    j.begin(event(2))  # ~600 bytes used: no room left for this begin and its end
    second = j.current_segment
    assert second != first
    j.end(finished(2))
    assert j.current_segment == second
    files = crash_copy(j)
    assert [len(data) for data in files.values()] == [1000, 1000]  # nothing written past them
    assert [r["kind"] for r in decoded(first)] == ["begin", "end"]
    assert [r["kind"] for r in decoded(second)] == ["begin", "end"]
    j.close()
    restore(files)
    j = Journal(tmp_path)
    assert j.replay() == [finished(1), finished(2)]
    j.close()


def test_a_record_bigger_than_a_segment(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=256)
    huge = msgspec.structs.replace(finished(2), error="x" * 100_000)
    j.begin(event(1))  # ~280 bytes: already bigger than a segment
    j.begin(event(2))
    assert j.end(huge) == 1
    j.end(finished(1))
    files = crash_copy(j)
    sizes = [len(data) for data in files.values()]
    # The first segment stayed empty; then one per record, each sized to fit (with the begins
    # carried over): begin 1, begin 1 + begin 2, begin 1 + the huge end, the last end.
    assert len(sizes) == 5 and sizes[0] == 256 and max(sizes) > 100_000
    j.close()
    for state in ("truncated", "zero tail"):
        if state == "zero tail":
            restore(files)
        j = Journal(tmp_path)
        assert j.replay() == [huge, finished(1)], state
        j.close()


def test_disk_full_at_fallocate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails the creation of a segment, seen as a failed write: no SIGBUS later,
    no half-made segment left, and the journal carries on once there is room again."""
    real_fallocate = os.posix_fallocate
    disk_full = {"on": True}

    def fallocate(fd: int, offset: int, length: int) -> None:
        if disk_full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    j = Journal(tmp_path, segment_bytes=1000)  # starts all the same
    assert j.segments() == []
    with pytest.raises(OSError) as begin_error:
        j.begin(event(1))
    assert begin_error.value.errno == errno.ENOSPC
    with pytest.raises(JournalWriteError) as e:
        j.end(finished(1))
    assert e.value.ticket == 1 and e.value.errno == errno.ENOSPC
    assert j.write_errors == 2 and j.segments() == []

    assert j.failure is not None and "No space left" in j.failure
    assert not j.retry()
    disk_full["on"] = False
    assert j.retry() and j.failure is None  # recovers without a record having to come
    j.begin(event(2))
    assert j.end(finished(2)) == 2
    j.begin(event(3))  # admitted: room for its end is kept in its segment
    disk_full["on"] = True
    assert j.end(finished(3)) == 3  # so a full disk cannot lose the end of a served request
    with pytest.raises(OSError):  # no room left here for a begin and its end
        j.begin(event(4))
    assert j.failure is not None and j.write_errors == 3
    disk_full["on"] = False
    j.begin(event(5))
    assert j.end(finished(5)) == 4
    monkeypatch.undo()
    j.close()
    j = Journal(tmp_path)
    # The refused begin left nothing behind: that request never went upstream.
    assert j.replay() == [finished(2), finished(3), finished(5)]
    assert (j.replay_stats.torn, j.replay_stats.corrupt) == (0, 0)
    j.close()


@pytest.mark.parametrize("how", ["unsupported", "missing"])
def test_without_fallocate_the_zeros_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """musl on a filesystem without fallocate, or macOS (no posix_fallocate at all)."""
    if how == "missing":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:

        def unsupported(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", unsupported)
    j = Journal(tmp_path, segment_bytes=3 * 1024 * 1024 + 5)
    j.begin(event(1))
    j.end(finished(1))
    (data,) = crash_copy(j).values()
    assert len(data) == 3 * 1024 * 1024 + 5 and data.endswith(b"\0")
    j.close()
    monkeypatch.undo()
    j = Journal(tmp_path)
    assert j.replay() == [finished(1)]
    j.close()


KILLED_CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import msgspec
from factories import usage_event
from tokenhub.runtime.journal import Journal

j = Journal(sys.argv[1], segment_bytes=16384)  # a few rotations on the way
n = int(sys.argv[2])
for i in range(n):
    e = usage_event(i)
    j.begin(e)
    j.end(msgspec.structs.replace(e, output_tokens=7))
j.begin(usage_event(n))  # in flight
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush: only what the kernel has
"""


def test_kill_9_right_after_the_last_record_loses_nothing(tmp_path: Path) -> None:
    n = 500
    jdir = tmp_path / "j"
    script = tmp_path / "child.py"
    script.write_text(KILLED_CHILD)
    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, str(script), str(jdir), str(n), str(tests)], timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL
    segs = sorted(jdir.glob("journal-*.log"))
    assert len(segs) > 10 and all(p.stat().st_size >= 16384 for p in segs)  # not truncated
    j = Journal(jdir)
    got = j.replay()
    assert got[:n] == [msgspec.structs.replace(usage_event(i), output_tokens=7) for i in range(n)]
    assert got[n:] == [interrupted_event(begin_of(usage_event(n)))]
    assert j.replay_stats == (len(segs), n, 1, 0, 0)
    j.close()


def test_rotation_carries_open_begins_and_release_waits_for_commit(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=2000)
    j.begin(event(0))  # a long request: open across several rotations
    ticket = 0
    for i in range(1, 30):
        j.begin(event(i))
        ticket = j.end(finished(i))
    segs = j.segments()
    assert len(segs) >= 3
    # Every segment after the first starts with the still-open begin of request 0.
    for seg in segs[1:]:
        first = msgspec.json.decode(seg.read_bytes().splitlines()[0])
        assert (first["kind"], first["request_id"]) == ("begin", "req_00000000")

    assert j.release(0) == 0  # nothing committed yet
    assert j.release(ticket, durable=lambda: False) == 0  # the store is not durable yet
    assert j.segments() == segs
    half = ticket // 2
    deleted = j.release(half)
    assert 0 < deleted < len(segs) - 1
    remaining = j.segments()
    assert remaining == segs[deleted:]
    j.close()

    # What is left replays to the uncommitted ends and the open request: nothing was lost.
    j = Journal(tmp_path)
    got = {e.request_id: e for e in j.replay()}
    assert got["req_00000000"].error == "interrupted"
    assert {f"req_{i:08d}" for i in range(half + 1, 30)} <= set(got)
    assert all(got[f"req_{i:08d}"] == finished(i) for i in range(1, 30) if f"req_{i:08d}" in got)
    j.close()


def test_release_everything_then_close_leaves_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=1000)
    last = 0
    for i in range(20):
        j.begin(event(i))
        last = j.end(finished(i))
    j.sync()
    j.rotate()
    j.release(last)
    j.close()
    assert [p.name for p in tmp_path.iterdir()] == ["LOCK"]


def test_writers_on_many_threads_while_syncing(tmp_path: Path) -> None:
    """Rotations, syncs (which unmap the retired segments) and writes from four threads."""
    j = Journal(tmp_path, segment_bytes=4096)
    stop = threading.Event()

    def committer() -> None:
        while not stop.is_set():
            j.sync()
            j.release(j.tickets_issued // 2)

    def work(t: int) -> None:
        for i in range(300):
            j.begin(event(t * 1000 + i))
            j.end(finished(t * 1000 + i))

    sync_thread = threading.Thread(target=committer)
    sync_thread.start()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    sync_thread.join()
    assert j.tickets_issued == 1200 and j.open_requests == 0
    files = crash_copy(j)
    j.close()
    restore(files)
    j = Journal(tmp_path)
    got = j.replay()
    # Released segments are gone; what is left is every later end, each exactly once.
    assert len({e.request_id for e in got}) == len(got) > 0
    assert all(e == finished(int(e.request_id[4:])) for e in got)
    assert (j.replay_stats.torn, j.replay_stats.corrupt, j.replay_stats.interrupted) == (0, 0, 0)
    j.close()


def test_hot_path_keeps_every_record_and_reports_its_cost(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    evs = [finished(i) for i in range(40_000)]
    tb = te = 0.0
    for k in range(0, len(evs), 500):  # at most 500 requests open at a time
        chunk = evs[k : k + 500]
        t0 = time.perf_counter()
        for e in chunk:
            j.begin(e)
        t1 = time.perf_counter()
        for e in chunk:
            j.end(e)
        t2 = time.perf_counter()
        tb, te = tb + t1 - t0, te + t2 - t1
    j.close()
    begin_us, end_us = tb / len(evs) * 1e6, te / len(evs) * 1e6
    # Reported, not asserted (speed belongs in benches/): ~1.2 µs each here.
    print(f"journal.begin {begin_us:.2f} µs, journal.end {end_us:.2f} µs per call")
    again = Journal(tmp_path)
    assert again.replay() == evs  # every record the timed loop wrote is there, in order
    again.close()


def test_one_process_per_directory(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    with pytest.raises(JournalError, match="in use by another process"):
        Journal(tmp_path)
    j.close()
    Journal(tmp_path).close()


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.begin(event(1))
    with pytest.raises(JournalError, match="closed"):
        j.end(finished(1))
    j.sync()  # a no-op, not an error
    j.close()


def test_reject_keeps_the_event(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.reject(finished(5), "input_tokens is out of the 64-bit range")
    j.close()
    line = msgspec.json.decode((tmp_path / "rejected.jsonl").read_bytes())
    assert line["reason"] == "input_tokens is out of the 64-bit range"
    assert msgspec.convert(line["event"], UsageEvent) == finished(5)
