"""The local write-ahead journal of usage: nothing the gateway metered is lost to a crash.

Two records, one msgspec-JSON line each, in segment files `journal-000001.log`, ...:

- `begin`: written just before a request goes upstream (again for each retry: the latest
  wins). If the process dies before the request finishes, replay turns it into an event with
  status 0, error "interrupted", source "metered" and the meter's input-token estimate
  (recorded, not billed: `tokenhub.usage.billed_lines`).
- `end`: the finished `UsageEvent`, written when the request is done.

Durability: a record is copied into its segment through a shared mapping (mmap, MAP_SHARED).
The mapped pages are the file's page cache, the very pages write(2) would fill, so a record is
in the kernel (and survives kill -9) as soon as the copy is done, without a system call.
`sync()` fdatasyncs in the background (the sink's group commit) against power loss. Segments
are created at full size with their blocks reserved (posix_fallocate): a store into a mapping
cannot fail with ENOSPC, on a full disk the kernel would kill the process with SIGBUS, so it
is the creation of the next segment that fails, which the caller sees as a failed write, as
before. (Copy-on-write filesystems such as ZFS cannot truly reserve blocks: there a full disk
may still end the process with SIGBUS, which replay recovers from like from any crash.) A
segment thus ends in zeros up to its reserved size, until a clean close truncates it; replay
stops at them (JSON never holds a NUL byte). A crash mid-copy leaves a torn last record, cut
short or with NULs where the copy had not reached: replay counts it and decodes none of it.

Room for the end: a `begin` also reserves room in its segment for the request's `end`
(the begin's size plus 384 bytes: an end holds the same fields and ~110 bytes more), so once
a request is admitted its end fits without a new segment, which a full disk could refuse: a
served request is never journaled by its begin alone. A begin that does not fit with its
reservation starts the next segment, and if that fails (ENOSPC, EDQUOT, EROFS) the begin
fails: the caller refuses the request. `failure` then says why, until a rotation succeeds
(`retry()`, called periodically by the sink, or the next record).

Lifecycle: a new `Journal` never appends to the segments it finds: those are replayed
(`replay()`), inserted by the caller (idempotent by request_id), then `discard_replayed()`.
New records go to a fresh segment of `segment_bytes`; a record that does not fit in the rest
of it starts the next one (sized to fit, for a record bigger than that), and so does
`rotate()`. Rotation copies the begins still open into the new segment, so an old segment can
be deleted as soon as every `end` in it is committed: `end()` returns a ticket (1, 2, ...), and
`release(ticket)` deletes the closed segments whose ends all have tickets <= it. A segment
whose deletion was interrupted is replayed again: harmless, inserts are idempotent and replay
is deterministic.

One process per directory: a `LOCK` file is flock()ed (released by the kernel on any exit), so
a second gateway process on the same directory fails at start instead of replaying (and
deleting) segments that are still being written. Multi-process set-ups need one directory each.

Performance notes (2-core VM, ext4; tests/test_journal.py::test_hot_path_cost prints the first
figures): in a tight loop begin ~1.15 µs and end ~1.3 µs, down from ~2.15 and ~2.25 µs with one
write(2) per record. Paced like a busy gateway (20k requests/s, fsync every 50 ms in a thread,
caches cold between batches) a begin + end pair costs ~3.5 µs of CPU, down from ~6 µs, and the
fsync thread ~0.1-0.3 µs more per pair than before: writeback has to write-protect the mapped
pages again. (A writer that never pauses while the fsync runs gains less: ~3.7 instead of
~4.9 µs on its thread, ~1 µs more per pair in the fsync thread.) Of a pair, building and
encoding the records is ~1.25 µs (module-level msgspec encoder), the calls, the lock and the
copies ~0.8 µs, and the rest page faults: the first store to each fresh 4 KiB page goes through
ext4's page_mkwrite (~4 µs a page). A userspace buffer would save that too but lose records on
kill -9, which is the case the journal exists for. MADV_RANDOM, because the first store would
otherwise read around (zero-fill) read_ahead_kb of the file, all 8 MiB and ~2 ms here, under
the lock. `with lock` costs twice `acquire()`/`release()` on CPython 3.11 (~0.1 µs a call).
Tried and dropped: zero-filling segments (stores to written blocks fault ~5x cheaper, but the
zeroing, 2-7 ms per 8 MiB, costs about what it saves, would have to run ahead in a thread to
stay off the lock, and writes every segment twice), and mmap.flush() in `sync()` (CPython holds
the GIL through the msync: the event loop stalled ~40 ms on an 8 MiB flush).
Rotation (create, fallocate and map 8 MiB, copy the open begins: 100 of them here) is
~120-150 µs, once per 8 MiB (was ~40-90 µs).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgspec

from tokenhub.usage import UsageEvent

log = logging.getLogger("tokenhub.runtime.journal")

SEGMENT_BYTES = 8 * 1024 * 1024
DEFAULT_DIR = "tokenhub-journal"  # next to the default ./tokenhub.db
_SEGMENT = re.compile(r"journal-(\d{6,})\.log")
REJECTED_FILE = "rejected.jsonl"
_END_SLACK = 384


def _end_room(begin_len: int) -> int:
    """Bytes a begin of `begin_len` reserves for its end (see the module docstring)."""
    return begin_len + _END_SLACK


class Begin(msgspec.Struct, tag="begin", tag_field="kind", kw_only=True, omit_defaults=True):
    """A request about to go upstream: what an interrupted request's event is made from."""

    request_id: str
    ts_ms: int
    tenant: str
    key_id: str
    endpoint: str
    model: str
    deployment: str = ""
    provider: str = ""
    upstream_model: str = ""
    stream: bool = False
    input_tokens: int = 0  # the meter's count of the prompt
    attempts: int = 1


class End(msgspec.Struct, tag="end", tag_field="kind"):
    event: UsageEvent


class Rejected(msgspec.Struct):
    """A line of rejected.jsonl: an event the store refused for good, kept for repair."""

    reason: str
    event: msgspec.Raw


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Begin | End).decode


def _decode_line(line: bytes) -> Begin | End | None:
    try:
        rec: Begin | End = _decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return rec


class JournalError(Exception):
    """The journal cannot be used (directory in use, closed, unreadable)."""


class JournalWriteError(OSError):
    """An `end` record could not be written; `ticket` was issued all the same."""

    def __init__(self, ticket: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.ticket = ticket


class ReplayStats(NamedTuple):
    segments: int
    finished: int
    interrupted: int
    torn: int  # segments whose last line was cut short (a crash mid-write)
    corrupt: int  # complete lines that did not decode (skipped)


class _Closed(NamedTuple):
    number: int
    last_ticket: int  # tickets issued when the segment was closed


class _Segment(NamedTuple):
    """A segment file, preallocated and mapped (MAP_SHARED) for writing."""

    number: int
    fd: int
    map: mmap.mmap


def _reserve(fd: int, size: int) -> None:
    """Allocate the segment's blocks now: a store into the mapping then never needs disk
    space (it cannot report ENOSPC: on a full disk the kernel would kill us with SIGBUS)."""
    fallocate = getattr(os, "posix_fallocate", None)  # not on macOS
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as e:  # musl does not emulate it where the filesystem cannot
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    zeros = bytes(min(size, 1 << 20))  # writing the zeros allocates the blocks too
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, zeros[: size - offset], offset)


def default_journal_dir(database: str | None) -> str:
    """`<database path without suffix>-journal`, e.g. ./tokenhub.db -> ./tokenhub-journal;
    for a PostgreSQL URL `./<database name>-journal` (postgresql://h/billing ->
    ./billing-journal), in the working directory, as it names no file."""
    from tokenhub.db.database import is_postgres
    from tokenhub.store import database_path

    if database is not None and is_postgres(database):
        from urllib.parse import unquote, urlsplit

        name = unquote(urlsplit(database).path.lstrip("/")) or "tokenhub"
        return name.replace("/", "_") + "-journal"
    return str(Path(database_path(database)).with_suffix("")) + "-journal"


def interrupted_event(b: Begin) -> UsageEvent:
    """The event for a request that began but never ended (deterministic: replaying the same
    journal twice yields equal events, so the second insert is a no-op)."""
    return UsageEvent(
        request_id=b.request_id,
        ts_ms=b.ts_ms,
        tenant=b.tenant,
        key_id=b.key_id,
        endpoint=b.endpoint,
        model=b.model,
        deployment=b.deployment,
        provider=b.provider,
        upstream_model=b.upstream_model,
        stream=b.stream,
        input_tokens=b.input_tokens,
        output_tokens=0,
        source="metered",
        status=0,
        error="interrupted",
        attempts=b.attempts,
    )


class Journal:
    """See the module docstring. `begin`, `end`, `rotate` and `release` may be called from
    any thread (one lock, held only for the copy, or a rotation); `sync` runs outside it."""

    def __init__(
        self,
        directory: str | os.PathLike[str] = DEFAULT_DIR,
        *,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(
                self.directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise JournalError(f"cannot open journal {str(self.directory)!r}: {e.strerror}") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            raise JournalError(
                f"journal {str(self.directory)!r} is in use by another process "
                "(each gateway process needs its own journal directory)"
            ) from e
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._replay_segments = self._numbers()
        self._open: dict[str, bytes] = {}  # request_id -> latest begin line
        self._reserved = 0  # sum of _end_room over _open: room kept free for their ends
        self.failure: str | None = None  # why the last segment could not be created
        self._closed_segments: collections.deque[_Closed] = collections.deque()
        # Rotated out, with the bytes used: unmapped and closed after their next fsync.
        self._retired: list[tuple[_Segment, int]] = []
        self._tickets = 0
        self._dir_dirty = True
        self._closed = False
        self.write_errors = 0
        self.segments_deleted = 0
        self.replay_stats = ReplayStats(0, 0, 0, 0, 0)
        self._number = max(self._replay_segments, default=0) + 1
        # The segment being written: records go to _map[_pos:], and _cap is its size (0
        # while there is none, or once closed, so that the next record asks for room).
        self._seg: _Segment | None = None
        self._map: mmap.mmap | bytearray = bytearray()
        self._pos = 0
        self._cap = 0
        try:
            with self._lock:
                self._rotate_locked()
        except OSError as e:  # a full disk: start anyway, every record retries (and fails)
            self.failure = f"cannot create a journal segment: {e.strerror or e}"
            log.warning("cannot create a journal segment (%s); will retry", e.strerror or e)

    # -- files -----------------------------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self.directory / f"journal-{number:06d}.log"

    def _numbers(self) -> list[int]:
        found = (_SEGMENT.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _create(self, number: int, size: int) -> _Segment:
        path = self._path(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _reserve(fd, size)
            mapped = mmap.mmap(fd, size)
            # No read-around: the first store would read in (zero-fill) up to read_ahead_kb
            # of the file, 8 MiB and ~2 ms here, under the lock.
            with contextlib.suppress(OSError):
                mapped.madvise(mmap.MADV_RANDOM)
            return _Segment(number, fd, mapped)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    @staticmethod
    def _close_segment(seg: _Segment, used: int, *, sync: bool = False) -> None:
        try:
            seg.map.close()
            # Give back the unused preallocated tail (replay copes with it either way).
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, used)
            if sync:
                os.fdatasync(seg.fd)
        finally:
            os.close(seg.fd)

    def segments(self) -> list[Path]:
        """Segment files on disk now, oldest first."""
        return [self._path(n) for n in self._numbers()]

    @property
    def current_segment(self) -> Path:
        return self._path(self._number)

    # -- writing (hot path) ----------------------------------------------------------------

    def _make_room(self, n: int) -> int:
        """Under self._lock, when `n` bytes do not fit: start a segment with room for them.
        Returns the position to write at."""
        if self._closed:
            raise JournalError("the journal is closed")
        try:
            self._rotate_locked(n)
        except OSError as e:
            self.write_errors += 1
            self.failure = f"cannot create a journal segment: {e.strerror or e}"
            raise
        return self._pos

    def retry(self) -> bool:
        """After a failure, try to start a segment again (the sink calls this periodically,
        so that the journal recovers when space returns even with no records coming).
        Returns whether the journal can write."""
        with self._lock:
            if self.failure is None:
                return True
            if self._closed:
                return False
            try:
                self._rotate_locked()
            except OSError as e:
                self.failure = f"cannot create a journal segment: {e.strerror or e}"
                return False
            return True

    def begin(self, event: UsageEvent) -> None:
        """Record that `event`'s request is about to go upstream, with room kept for its end.
        Raises OSError (no segment could be started: the request must not go upstream)."""
        line = (
            _encode(
                Begin(
                    request_id=event.request_id,
                    ts_ms=event.ts_ms,
                    tenant=event.tenant,
                    key_id=event.key_id,
                    endpoint=event.endpoint,
                    model=event.model,
                    deployment=event.deployment,
                    provider=event.provider,
                    upstream_model=event.upstream_model,
                    stream=event.stream,
                    input_tokens=event.input_tokens,
                    attempts=event.attempts,
                )
            )
            + b"\n"
        )
        n = len(line)
        room = _end_room(n)
        self._lock.acquire()  # not `with`: see the performance notes
        try:
            old = self._open.get(event.request_id)  # a retry's begin replaces the first
            reserved = self._reserved + room - (0 if old is None else _end_room(len(old)))
            pos = self._pos
            if pos + n + reserved > self._cap:
                pos = self._make_room(n + reserved)
            self._open[event.request_id] = line
            self._reserved = reserved
            self._map[pos : pos + n] = line
            self._pos = pos + n
        finally:
            self._lock.release()

    def end(self, event: UsageEvent) -> int:
        """Record the finished event; returns its ticket for `release`. Raises
        JournalWriteError (with the ticket) if the record could not be written."""
        line = _encode(End(event)) + b"\n"
        n = len(line)
        self._lock.acquire()
        try:
            began = self._open.pop(event.request_id, None)  # not to be carried over
            if began is not None:
                self._reserved -= _end_room(len(began))  # this end uses (part of) it
            pos = self._pos
            if pos + n > self._cap:
                try:
                    pos = self._make_room(n)  # JournalError if closed: no ticket
                except OSError as e:
                    self._tickets += 1
                    raise JournalWriteError(self._tickets, e) from e
            self._tickets += 1
            self._map[pos : pos + n] = line
            self._pos = pos + n
            return self._tickets
        finally:
            self._lock.release()

    @property
    def tickets_issued(self) -> int:
        return self._tickets

    @property
    def open_requests(self) -> int:
        """Requests with a `begin` and no `end` yet."""
        return len(self._open)

    def rotate(self) -> None:
        """Close the current segment and start a new one (carrying the open begins over)."""
        with self._lock:
            if self._closed:
                raise JournalError("the journal is closed")
            self._rotate_locked()

    def _rotate_locked(self, need: int = 0) -> None:
        """Start a new segment with room for `need` more bytes (all or nothing: on OSError
        the current segment stays)."""
        carried = b"".join(self._open.values())
        current = self._seg
        number = self._number if current is None else self._number + 1
        # Count only new records towards the segment size: with many long-open requests the
        # carried begins alone could fill a segment, and every write would rotate again.
        size = len(carried) + max(self.segment_bytes, need, self._reserved, 1)
        seg = self._create(number, size)
        seg.map[: len(carried)] = carried
        if current is not None:
            self._closed_segments.append(_Closed(current.number, self._tickets))
            self._retired.append((current, self._pos))
        self._seg, self._map, self._number = seg, seg.map, number
        self._pos, self._cap = len(carried), size
        self._dir_dirty = True
        self.failure = None

    # -- durability and clean-up (background threads) --------------------------------------

    def sync(self) -> None:
        """fsync everything written so far (and the directory, if segments were created).

        fdatasync writes back the pages stored to through the mapping as well (on Linux
        msync(MS_SYNC) is the same call on a range). mmap.flush() is not used: CPython holds
        the GIL for the whole msync, which would stall the event loop for the disk flush."""
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                retired = list(self._retired)
                fds = [seg.fd for seg, _ in retired]
                if self._seg is not None:
                    fds.append(self._seg.fd)
                dir_dirty, self._dir_dirty = self._dir_dirty, False
            try:
                for fd in fds:
                    os.fdatasync(fd)
                if dir_dirty:
                    os.fsync(self._dir_fd)
            except OSError:
                self._dir_dirty = self._dir_dirty or dir_dirty
                raise
            with self._lock:
                for r in retired:
                    self._retired.remove(r)
            for seg, used in retired:  # nothing writes there any more; close() waits for us
                self._close_segment(seg, used)

    def releasable(self, ticket: int) -> bool:
        """Whether `release(ticket)` would delete a segment."""
        with self._lock:
            return bool(self._closed_segments) and self._closed_segments[0].last_ticket <= ticket

    def release(self, ticket: int, durable: Callable[[], bool] | None = None) -> int:
        """Every `end` with a ticket <= `ticket` is committed to the store: delete the closed
        segments that hold nothing else. `durable()` is asked first (the store's `sync`); if it
        returns False nothing is deleted this time. Returns the number of segments deleted."""
        if not self.releasable(ticket):
            return 0
        if durable is not None and not durable():
            return 0
        self.sync()  # the begins carried out of these segments must be on disk first
        with self._lock:
            doomed = []
            while self._closed_segments and self._closed_segments[0].last_ticket <= ticket:
                doomed.append(self._closed_segments.popleft().number)
        for number in doomed:
            try:
                self._path(number).unlink(missing_ok=True)
            except OSError as e:  # replayed (idempotently) after a restart
                log.warning("cannot delete journal segment %s: %s", number, e.strerror or e)
        self.segments_deleted += len(doomed)
        return len(doomed)

    # -- replay ----------------------------------------------------------------------------

    def replay(self) -> list[UsageEvent]:
        """Events from the segments found at open: every `end` in journal order, then an
        "interrupted" event for each request with a `begin` and no `end`."""
        ended: list[UsageEvent] = []
        ended_ids: set[str] = set()
        begins: dict[str, Begin] = {}
        torn = corrupt = 0
        for number in self._replay_segments:
            path = self._path(number)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise JournalError(f"cannot read journal segment {path}: {e.strerror}") from e
            # A segment ends in the zeros it was preallocated with (none once truncated by a
            # clean close). JSON never holds a NUL byte, so the records end before them.
            lines = data.rstrip(b"\0").split(b"\n")
            unterminated = len(lines) - 1
            last = unterminated - 1 if unterminated and not lines[unterminated] else unterminated
            bad = 0
            for i, line in enumerate(lines):
                if not line:
                    continue
                # NULs inside a line are bytes never stored: a record cut short by the crash
                # (a memcpy need not go front to back, so its newline may be there already).
                nul = b"\0" in line
                rec = None if nul else _decode_line(line)
                if rec is None:
                    if i == unterminated or (nul and i == last):
                        torn += 1  # cut short by the crash: its call never returned
                    else:
                        bad += 1
                    continue
                if isinstance(rec, End):
                    ended.append(rec.event)
                    ended_ids.add(rec.event.request_id)
                    begins.pop(rec.event.request_id, None)
                elif rec.request_id not in ended_ids:
                    begins[rec.request_id] = rec
            if bad:
                corrupt += bad
                log.warning("journal segment %s: skipped %d corrupt line(s)", path.name, bad)
        self.replay_stats = ReplayStats(
            len(self._replay_segments), len(ended), len(begins), torn, corrupt
        )
        return ended + [interrupted_event(b) for b in begins.values()]

    @property
    def replay_pending(self) -> bool:
        return bool(self._replay_segments)

    def discard_replayed(self) -> None:
        """Delete the replayed segments: call once their events are durably in the store."""
        for number in self._replay_segments:
            self._path(number).unlink(missing_ok=True)
        self.segments_deleted += len(self._replay_segments)
        self._replay_segments = []
        os.fsync(self._dir_fd)

    def reject(self, event: object, reason: str) -> None:
        """Set aside an event the store refuses for good (rejected.jsonl, never deleted)."""
        try:
            raw = msgspec.Raw(_encode(event))
        except (TypeError, msgspec.EncodeError):
            raw = msgspec.Raw(_encode(repr(event)))
        line = _encode(Rejected(reason, raw)) + b"\n"
        fd = os.open(
            self.directory / REJECTED_FILE,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """fsync and close. Segments stay for the next start's replay, except an empty
        current one."""
        with self._sync_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            self._cap = 0  # the next record asks _make_room, which refuses
            segs = self._retired
            if self._seg is not None:
                segs.append((self._seg, self._pos))
            self._retired, self._seg, self._map = [], None, bytearray()
            for seg, used in segs:
                self._close_segment(seg, used, sync=True)
            if self._pos == 0:
                self._path(self._number).unlink(missing_ok=True)
            os.fsync(self._dir_fd)
            os.close(self._dir_fd)
            os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
