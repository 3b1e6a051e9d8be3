"""Journals no running process owns: replayed into the store before anything serves (by the
supervisor, or by a single-process server itself), under the journal dir's LOCK."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenhub.runtime.journal import Journal
    from tokenhub.store import Store
    from tokenhub.usage import UsageEvent

log = logging.getLogger("tokenhub.serve")

_WORKER_DIR = re.compile(r"worker-(\d+)")


def _insert_replayed(store: Store, journal: Journal, events: list[UsageEvent]) -> None:
    """Insert events from a replay; what the store refuses for good goes to rejected.jsonl,
    as the sink does. StoreError (locked for longer than busy_timeout) propagates."""
    from tokenhub.store import InvalidEvents

    for start in range(0, len(events), 1000):
        batch = events[start : start + 1000]
        while batch:
            try:
                store.insert_events(batch)
                break
            except InvalidEvents as e:
                for event, why in e.events:
                    journal.reject(event, why)
                    log.error(
                        "usage event %s cannot be stored (%s); set aside in %s",
                        getattr(event, "request_id", "?"),
                        why,
                        journal.directory / "rejected.jsonl",
                    )
                bad = {id(event) for event, _ in e.events}
                batch = [ev for ev in batch if id(ev) not in bad]


def replay_journal_dir(store: Store, directory: Path, *, why: str) -> int:
    """Insert what the journal in `directory` holds and delete its segments once durable.
    JournalError if another process holds it. Returns the number of events replayed."""
    from tokenhub.runtime.journal import Journal

    # Small segments: this journal only reads; its (empty) new segment is deleted on close.
    journal = Journal(directory, segment_bytes=4096)
    try:
        events = journal.replay()
        if events:
            _insert_replayed(store, journal, events)
            st = journal.replay_stats
            log.warning(
                "replayed %d usage events from %s (%s): %d finished, %d interrupted",
                len(events),
                directory,
                why,
                st.finished,
                st.interrupted,
            )
        # As the sink does: segments go only once a checkpoint made the rows durable (a
        # reader's snapshot can hold it back briefly); else they are replayed again next time.
        for _ in range(3):
            if not events or store.sync():
                journal.discard_replayed()
                break
            time.sleep(0.05)
        return len(events)
    finally:
        journal.close()


def replay_stale_worker_journals(store: Store, root: str | os.PathLike[str], keep: int) -> int:
    """Replay `root/worker-k` for every k > `keep` (every one with keep=0: a single-process
    server), left by an earlier run with more workers, and remove those left empty. The
    caller holds root's LOCK, so no other server is doing the same. Returns events replayed."""
    from tokenhub.runtime.journal import JournalError

    root = Path(root)
    if not root.is_dir():
        return 0
    replayed = 0
    for d in sorted(root.iterdir()):
        m = _WORKER_DIR.fullmatch(d.name)
        if m is None or not d.is_dir() or int(m.group(1)) <= keep:
            continue
        try:
            replayed += replay_journal_dir(store, d, why="left by an earlier run with more workers")
        except JournalError as e:  # a worker of a gone parent, still flushing: it finishes
            log.warning("%s; not replayed now", e)
            continue
        # Nothing else may own a directory under a locked root, so removing LOCK is safe; a
        # rejected.jsonl keeps the directory.
        if [p.name for p in d.iterdir()] == ["LOCK"]:
            with contextlib.suppress(OSError):
                (d / "LOCK").unlink()
                d.rmdir()
    return replayed


def lock_journal_root(root: Path) -> int:
    """Hold `root/LOCK` (the journal's own lock file) for the server's lifetime: a second
    server on the same journal dir fails to start, whether it runs one worker or many."""
    from tokenhub.runtime.journal import JournalError

    fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JournalError(
            f"journal {str(root)!r} is in use by another process (another tokenhub serve?)"
        ) from None
    return fd
