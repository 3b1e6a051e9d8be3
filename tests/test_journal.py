"""The write-ahead journal: records, replay (torn lines, twice), rotation, release, locking."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgspec
import pytest
from factories import usage_event

from tokenhub import journal as journal_mod
from tokenhub.journal import (
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


def test_failed_write_leaves_a_fragment_that_replay_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path)
    j.end(finished(1))
    real_write = os.write
    calls = {"n": 0}

    def disk_full_once(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            real_write(fd, bytes(data[:25]))  # part of the record got out, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_full_once)
    with pytest.raises(JournalWriteError) as e:
        j.end(finished(2))
    assert e.value.ticket == 2 and e.value.errno == errno.ENOSPC
    assert j.write_errors == 1
    assert j.end(finished(3)) == 3  # starts on a fresh line
    monkeypatch.undo()
    j.close()
    j = Journal(tmp_path)
    assert j.replay() == [finished(1), finished(3)]
    assert j.replay_stats.corrupt == 1
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
