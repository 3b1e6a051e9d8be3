"""`tokenhub serve --workers N`: the parent that forks N workers and supervises them."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from tokenhub.config import Config
from tokenhub.runtime import ServeError
from tokenhub.runtime.demo import ensure_demo_key, print_demo
from tokenhub.runtime.replay import (
    lock_journal_root,
    replay_journal_dir,
    replay_stale_worker_journals,
)
from tokenhub.runtime.serve import reuse_port_socket, run_loop, serve
from tokenhub.runtime.shared import (
    SharedState,
    Worker,
    before_fork,
    journal_dir,
    worker_journal_dir,
)

log = logging.getLogger("tokenhub.serve")

MAX_WORKERS = 64
# A crash loop: more than this many unexpected worker exits within CRASH_WINDOW_S seconds.
MAX_CRASHES = 5
CRASH_WINDOW_S = 30.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SUPERVISOR_SIGNALS = {*_STOP_SIGNALS, signal.SIGCHLD}


def _listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """One SO_REUSEPORT listening socket per worker, all bound here, before any fork.

    Why a socket per worker rather than one socket all workers accept from (Linux): on a shared
    socket every worker's loop polls the same accept queue (asyncio and uvloop do not ask for
    EPOLLEXCLUSIVE), each new connection wakes them all, and the first loop to run accepts
    until the queue is empty: a burst of connections goes to whichever worker woke first, not
    to the least busy one, and the other wake-ups are wasted. With a socket each, the kernel
    hashes every connection's 4-tuple over the group's sockets: an even spread, no herd. The
    price, a connection hashed to a busy worker waits even if another is idle, is small here:
    one worker's loop multiplexes thousands of I/O-bound requests.

    Measured (2-core VM, two forked uvloop/aiohttp workers, a client opening 64 keep-alive
    connections at once, 3000 requests): shared socket, one worker got all 64 connections in
    5 runs of 6 (the sixth: 44/56%); a socket each, 44-49% for the less loaded worker in all 6.

    The parent binds them (not each worker) and keeps them open: the port is known (also with
    port 0) and taken before anything forks, and a worker that dies leaves its socket, and the
    connections queued on it, to its replacement instead of resetting them."""
    first = reuse_port_socket(host, port)
    socks = [first]
    try:
        port = int(first.getsockname()[1])
        socks += [reuse_port_socket(host, port) for _ in range(count - 1)]
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _ignore_signal(signum: int, frame: object) -> None:
    """The supervisor's handler: the signal number reaches its loop through the wake-up fd."""


def serve_workers(cfg: Config, count: int, *, demo: bool, demo_key: str | None) -> int:
    """`tokenhub serve --workers N`: prepare once, fork N workers, supervise them."""
    # The app and the sink are imported once here, so that every fork (and restart) starts
    # with them in memory. Importing starts no thread and no loop; nothing here may
    # (vocabularies load in the workers: the meter's thread pool would not survive a fork).
    import tokenhub.gateway.app
    import tokenhub.runtime.resources
    import tokenhub.runtime.sink  # noqa: F401
    from tokenhub.store import open_store

    root = Path(journal_dir(cfg))
    store = open_store(cfg.server.database)
    lock_fd = -1
    try:
        store.migrate()
        secret = ensure_demo_key(store, demo_key) if demo else ""
        # A single-process run journals into root itself (JournalError if one still runs).
        replay_journal_dir(store, root, why="left by a single-process run")
        lock_fd = lock_journal_root(root)
        replay_stale_worker_journals(store, root, keep=count)
    except BaseException:
        if lock_fd >= 0:
            os.close(lock_fd)
        raise
    finally:
        store.close()  # no connection (nor the PostgreSQL store's thread) may cross a fork
    shared = SharedState()
    try:
        shared = before_fork(cfg)
        try:
            listeners = _listeners(cfg.server.host, cfg.server.port, count)
        except OSError as e:
            where = f"{cfg.server.host}:{cfg.server.port}"
            raise ServeError(f"cannot listen on {where}: {e.strerror or e}") from None
        sup = _Supervisor(
            cfg, count, listeners, root, lock_fd, demo=demo, secret=secret, shared=shared
        )
        return sup.run()
    finally:
        shared.close()
        os.close(lock_fd)


class _Supervisor:
    """The parent of `--workers N`: forks the workers, restarts one that dies, forwards stop
    signals. A plain loop on one selector (signals arrive through `signal.set_wakeup_fd`,
    readiness through a pipe): no event loop, no thread, so forking again later is safe."""

    def __init__(
        self,
        cfg: Config,
        count: int,
        listeners: list[socket.socket],
        root: Path,
        lock_fd: int,
        *,
        demo: bool,
        secret: str,
        shared: SharedState,
    ) -> None:
        self.cfg = cfg
        self.count = count
        self.listeners = listeners
        self.root = root
        self.lock_fd = lock_fd
        self.demo = demo
        self.secret = secret
        self.shared = shared
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> worker index
        self.ready: set[int] = set()  # pids that serve
        self.announced = False  # every worker has served once: exits are crashes from now on
        self.stopping = False
        self.killed = False
        self.fatal = ""
        self.failed: list[str] = []
        self.crashes: collections.deque[float] = collections.deque()
        self._ready_buf = b""
        self._ready_r, self._ready_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._ready_r, self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._sel = selectors.DefaultSelector()

    def run(self) -> int:
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, _ignore_signal) for s in _SUPERVISOR_SIGNALS}
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._sel.register(self._ready_r, selectors.EVENT_READ)
        try:
            for index in range(1, self.count + 1):
                self._spawn(index)
            while self.children:
                self._sel.select()
                self._signals()
                self._reap()
                self._read_ready()
        except BaseException:
            for pid in self.children:  # e.g. fork failed: leave no worker behind
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            for pid in self.children:
                with contextlib.suppress(OSError):
                    os.waitpid(pid, 0)
            raise
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self._sel.close()
            for fd in (self._ready_r, self._ready_w, self._wake_r, self._wake_w):
                os.close(fd)
            for sock in self.listeners:
                sock.close()
        if self.fatal:
            raise ServeError(self.fatal)
        if self.failed:
            raise ServeError("; ".join(self.failed))
        return 0

    # -- the parent's side ---------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        sys.stdout.flush()  # or the child would print the parent's buffered output again
        sys.stderr.flush()
        # Blocked across the fork: the child keeps SIGINT/SIGTERM blocked until its loop
        # handles them, so a stop asked for while it starts is not lost, nor fatal to it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(index)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def _signals(self) -> None:
        while True:
            try:
                received = os.read(self._wake_r, 512)
            except BlockingIOError:
                return
            for signum in received:
                if signum in _STOP_SIGNALS:
                    self._stop(signal.Signals(signum).name)

    def _stop(self, why: str) -> None:
        if self.stopping:
            if why in ("SIGINT", "SIGTERM") and not self.killed:
                # A second Ctrl-C: no more waiting. Nothing is lost: the journals keep every
                # event the workers had not written, for the next start to replay.
                self.killed = True
                self.fatal = (
                    f"{why} again: killed the workers; the usage events they had not written "
                    "are replayed from their journals at the next start"
                )
                for pid in self.children:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            return
        self.stopping = True
        n = len(self.children)
        print(
            f"tokenhub: shutting down {n} worker{'s' * (n != 1)} (flushing usage events)",
            file=sys.stderr,
            flush=True,
        )
        # The workers close their copies as they stop: then the port is closed.
        for sock in self.listeners:
            sock.close()
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            self.ready.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            what = _describe_exit(code)
            if self.stopping:
                if code != 0 and not self.killed:
                    self.failed.append(f"worker {index} (pid {pid}) {what} while shutting down")
                continue
            if not self.announced:
                self.fatal = f"worker {index} (pid {pid}) {what} while starting"
                self._stop("start-up failed")
                continue
            now = time.monotonic()
            self.crashes.append(now)
            while self.crashes[0] < now - CRASH_WINDOW_S:
                self.crashes.popleft()
            if len(self.crashes) > MAX_CRASHES:
                self.fatal = (
                    f"workers exited {len(self.crashes)} times within {CRASH_WINDOW_S:g} s "
                    f"(last: worker {index}, pid {pid}, {what}); not restarting them again"
                )
                log.error("%s; stopping the server", self.fatal)
                self._stop("crash loop")
                continue
            log.error("worker %d (pid %d) %s; restarting it", index, pid, what)
            self._spawn(index)

    def _read_ready(self) -> None:
        while True:
            try:
                data = os.read(self._ready_r, 4096)
            except BlockingIOError:
                break
            if not data:
                break
            self._ready_buf += data
        *lines, self._ready_buf = self._ready_buf.split(b"\n")
        for line in lines:
            index, pid = map(int, line.split())
            if pid not in self.children:
                continue  # it died since
            self.ready.add(pid)
            if self.announced:
                log.warning("worker %d (pid %d) serves again", index, pid)
        if not self.announced and not self.stopping and len(self.ready) == self.count:
            self.announced = True
            host, port = self.listeners[0].getsockname()[:2]
            print(
                f"tokenhub: serving on http://{host}:{port}/v1 (database "
                f"{self.cfg.server.database}, {self.count} workers)",
                flush=True,
            )
            if self.demo:
                print_demo(host, port, self.secret, self.cfg.server.database)

    # -- the child's side ----------------------------------------------------------------------

    def _child(self, index: int) -> NoReturn:
        from tokenhub.runtime.journal import JournalError
        from tokenhub.store import StoreError

        status = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            self._sel.close()
            for fd in (self._ready_r, self._wake_r, self._wake_w, self.lock_fd):
                os.close(fd)
            sock = self.listeners[index - 1]
            for other in self.listeners:
                if other is not sock:
                    other.close()
            fmt = f"%(asctime)s %(levelname)s %(name)s [worker {index}]: %(message)s"
            for h in logging.getLogger().handlers:
                h.setFormatter(logging.Formatter(fmt))
            worker = Worker(
                index=index,
                count=self.count,
                sock=sock,
                journal_dir=str(worker_journal_dir(self.root, index)),
                ready_fd=self._ready_w,
                parent_pid=self.pid,
            )
            run_loop(
                serve(
                    self.cfg,
                    demo=self.demo,
                    demo_key=self.secret,
                    shared=self.shared,
                    worker=worker,
                )
            )
            status = 0
        except (StoreError, JournalError, OSError) as e:
            print(f"tokenhub: worker {index}: error: {e}", file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
