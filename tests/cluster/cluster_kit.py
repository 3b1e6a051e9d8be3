"""Three gateway hosts on one machine, the faults of issue 13, and the oracles that judge them.

Session-wide (conftest.py), because they are slow to make and a test may break them on purpose:

- `Postgres`: a server of these tests' own (initdb in a temporary directory, port 54339, as
  scripts/test-postgres makes one), never the suite's shared server, so that a test may freeze
  it (SIGSTOP of the postmaster and every backend) without stalling anybody else's tests;
- `Redis`: a redis-server of their own (port 63799, no persistence), stopped and restarted
  empty by a test;
- `Netns` (root only): a network namespace joined to this one by a veth pair whose /30 the
  session picked from 10.213.0.0/16 (one not in use on the machine). Host C runs inside it,
  so an iptables DROP rule in the namespace's own OUTPUT chain partitions C from PostgreSQL
  silently (packets vanish: no RST, no ICMP) and leaves the machine's own tables alone.
  PostgreSQL and Redis listen on the veth's address too, the mock upstream only there;
- one mock upstream (`tokenhub mock-upstream`), whose ledger lists every request it served by
  the gateway's x-request-id.

Per test, a `Cluster`: a fresh database on that server, tenants with wallets (and keys with
limits), and three `tokenhub serve --host-id A|B|C` processes (one worker each; their own port,
journal directory and quota table) with money admission settled every 0.2 s and [cluster]
redis_url set. `Load` is the bounded client (aiohttp, on a loop thread of its own) that spreads
requests over the hosts by weight; `Books` is what the database holds after quiescence, and
`usage_problems` / `money_problems` are the oracles of the issue:

- every request the mock served is a usage event, settled once, and (if the gateway finished
  it: one cut off by a kill is recorded as interrupted and billed nothing) in the ledger
  exactly once, billed exactly its tokens;
- nothing the client saw refused (any non-200) is billed;
- no wallet overdrawn (no overrun), every budget pot equal to the ledger, no lease open;
- each live host's leased pool equals the coordinator's record of its instance
  (`Cluster.pool_mismatches`).

`RateSampler` reads a key's rpm share and bucket off every host's quota table, for the
share-shift bound of tokenhub.runtime.shares (test_cluster_rates.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from harness import LoopThread, free_port, http_json, wait_until
from procs import TOKENHUB, Proc, Procs, children, up, write_config

from tokenhub.meter import Meter
from tokenhub.money import rate

T = TypeVar("T")

PG_PORT = 54339
REDIS_PORT = 63799
SUBNET = "10.213"  # the veth pair's /30 is 10.213.K.0/30, K free on this machine
LOCK = Path("/tmp/tokenhub-cluster-tests.lock")  # one session at a time: the ports are fixed
ROLE = "tokenhub"

MODEL = "gpt-4o-mini"
VOCAB = "cl100k_base"
PER_1M = 100_000_000_000  # 100 USD per 1M tokens, in and out: 100,000 nanos a token, exactly
USD = 1_000_000_000
MAX_TOKENS = 16  # what every request asks for; the mock writes 32 uncapped, so 16 exactly
MESSAGES = [{"role": "user", "content": "Say hello to the cluster."}]
MOCK_LATENCY_MS = 200  # so that a burst's admitted requests are still in flight at a kill
SETTLE_INTERVAL_S = 0.2
HOSTS = ("A", "B", "C")


def prompt_tokens() -> int:
    return Meter.load(VOCAB).count_messages(MESSAGES)


def request_cost() -> int:
    """What one request costs, in nanos: its prompt and MAX_TOKENS of output."""
    return rate(prompt_tokens() + MAX_TOKENS, PER_1M)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """A coroutine to completion on a private loop in another thread (the tests are sync)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in {"", "0", "false", "no"}


def in_ci() -> bool:
    """TOKENHUB_REQUIRE_PG=1 (.ci/run) or CI: what is missing is a failure, not a skip."""
    return flag("TOKENHUB_REQUIRE_PG") or flag("CI")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


@contextlib.contextmanager
def session_lock(timeout: float = 900.0) -> Iterator[None]:
    """Serializes test sessions of this directory: their servers' ports are fixed."""
    with open(LOCK, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"another cluster test session holds {LOCK}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive (our own child not reaped yet).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- PostgreSQL ---------------------------------------------------------------------------------


def pg_bindir() -> Path | None:
    """The newest server Debian installed, else whatever initdb is on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    with contextlib.suppress(subprocess.CalledProcessError):
        return Path(sh("sh", "-c", "command -v initdb").stdout.strip()).parent
    return None


class Postgres:
    """A private PostgreSQL server: data in `root`, listening on `addresses`, trusting only
    loopback and `clients` (the namespace's address). As root it runs as the `postgres` user
    (initdb refuses root), like scripts/test-postgres."""

    def __init__(
        self,
        bindir: Path,
        root: Path,
        port: int,
        addresses: Sequence[str],
        clients: Sequence[str] = (),
    ) -> None:
        self.bindir, self.root, self.port = bindir, root, port
        self.data = root / "data"
        self.addresses, self.clients = list(addresses), list(clients)
        self.frozen: list[int] = []

    def _as_owner(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if os.getuid() == 0:
            argv = ("runuser", "-u", "postgres", "--", *argv)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=True, cwd="/"
        )

    def _stop_leftover(self) -> None:
        """A server a crashed session left on this directory: ours, stop it."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                               "immediate", "-w", "stop")  # fmt: skip

    def start(self) -> None:
        self._stop_leftover()
        sh("rm", "-rf", str(self.root))
        self.root.mkdir(mode=0o700, parents=True)
        run = self.root / "run"
        run.mkdir(mode=0o700)
        if os.getuid() == 0:
            sh("chown", "-R", "postgres:", str(self.root))
        self._as_owner(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                       "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")  # fmt: skip
        hba = ["local all all trust", "host all all 127.0.0.1/32 trust"]
        hba += [f"host all all {c}/32 trust" for c in self.clients]
        conf = (
            f"\nlisten_addresses = '{','.join(self.addresses)}'\nport = {self.port}\n"
            f"unix_socket_directories = '{run}'\nmax_connections = 300\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(conf)
        self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                       str(self.root / "server.log"), "-w", "-t", "60", "start")  # fmt: skip

        async def role() -> None:
            conn = await asyncpg.connect(self.url("postgres", user="postgres"), timeout=10)
            try:
                await conn.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER")
            finally:
                await conn.close()

        run_async(role())

    def stop(self) -> None:
        self.thaw()
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                           "-w", "stop")  # fmt: skip
        sh("rm", "-rf", str(self.root), check=False)

    def url(self, database: str, *, address: str = "127.0.0.1", user: str = ROLE) -> str:
        return f"postgresql://{user}@{address}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        async def make() -> None:
            conn = await asyncpg.connect(self.url("postgres"), timeout=10)
            try:
                await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
            finally:
                await conn.close()

        run_async(make())

    def drop_database(self, name: str) -> None:
        async def drop() -> None:
            conn = await asyncpg.connect(self.url("postgres"), timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        run_async(drop())

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def freeze(self) -> None:
        """SIGSTOP the postmaster (first: it forks no new backend then) and every process it
        started: a stall, not a crash; connections stay open and hang."""
        pm = self.postmaster()
        os.kill(pm, signal.SIGSTOP)
        self.frozen = [pm]
        for pid in children(pm):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self.frozen.append(pid)

    def thaw(self) -> None:
        for pid in reversed(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []


# -- Redis --------------------------------------------------------------------------------------


class Redis:
    """A private redis-server without persistence: stopping it loses everything, by design."""

    def __init__(self, root: Path, port: int, addresses: Sequence[str]) -> None:
        self.root, self.port, self.addresses = root, port, list(addresses)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfile = root / "redis.pid"

    def _stop_leftover(self) -> None:
        if self.pidfile.exists():
            with contextlib.suppress(ValueError, OSError):
                pid = int(self.pidfile.read_text().strip())
                if "redis-server" in cmdline(pid) and f":{self.port}" in cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
                    wait_until(lambda: not alive(pid), 10, what="the old redis-server to exit")

    def start(self) -> None:
        self._stop_leftover()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--bind", *self.addresses, "--port", str(self.port),
                 "--save", "", "--appendonly", "no", "--protected-mode", "no",
                 "--dir", str(self.root), "--pidfile", str(self.pidfile)],
                stdout=log, stderr=log, start_new_session=True, cwd=self.root,
            )  # fmt: skip
        wait_until(self.ping, 20, interval=0.05, what="redis-server to answer")

    def command(self, *args: str) -> bytes:
        """One command in RESP, its raw reply (enough for PING, SET, EXISTS)."""
        req = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(req.encode())
            return s.recv(256)

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (no save configured: nothing is kept) and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def has(self, key: str) -> bool:
        return self.command("EXISTS", key).strip() == b":1"


# -- the network namespace ----------------------------------------------------------------------


def netns_problem() -> str | None:
    """Why this machine cannot give host C a network namespace (None: it can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if os.getuid() != 0:
        return "creating a network namespace needs root"
    try:
        sh("ip", "-V")
    except (OSError, subprocess.CalledProcessError):
        return "iproute2 (ip) is not installed"
    return None


class Netns:
    """A network namespace `thc-<pid>` and a veth pair: this side SUBNET.K.1/30, the
    namespace's side SUBNET.K.2/30 (K one no address of this machine is in)."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.name = f"thc-{tag}"
        self.outer, self.inner = f"thc{tag}o", f"thc{tag}i"
        used = sh("ip", "-o", "-4", "addr", "show").stdout
        k = next(
            k for k in ((tag + i) % 250 + 1 for i in range(250)) if f" {SUBNET}.{k}." not in used
        )
        self.host_addr, self.ns_addr = f"{SUBNET}.{k}.1", f"{SUBNET}.{k}.2"
        self.iptables = ""
        self.rules: list[list[str]] = []
        self._remove_stale()
        try:
            sh("ip", "netns", "add", self.name)
            sh("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            sh("ip", "link", "set", self.inner, "netns", self.name)
            sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.outer)
            sh("ip", "link", "set", self.outer, "up")
            self.run("ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.inner)
            self.run("ip", "link", "set", self.inner, "up")
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _remove_stale() -> None:
        """Namespaces an earlier session of these tests made and could not remove (killed):
        named thc-<pid> after a process that is gone."""
        for line in sh("ip", "netns", "list").stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith("thc-") and name[4:].isdigit() and not alive(int(name[4:])):
                sh("ip", "netns", "del", name, check=False)
                sh("ip", "link", "del", f"thc{name[4:]}o", check=False)

    @property
    def prefix(self) -> list[str]:
        """Runs a command inside the namespace (`ip netns exec` execs it in place)."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return sh(*self.prefix, *argv)

    @contextlib.contextmanager
    def drop(self, address: str, port: int) -> Iterator[None]:
        """Inside the namespace only: TCP to address:port is dropped silently until the block
        ends (the rule is deleted even if the block fails)."""
        assert self.iptables, "iptables was not set up (scripts/test-iptables ensure)"
        rule = ["OUTPUT", "-d", address, "-p", "tcp", "--dport", str(port), "-j", "DROP"]
        self.run(self.iptables, "-w", "5", "-A", *rule)
        self.rules.append(rule)
        try:
            yield
        finally:
            self.run(self.iptables, "-w", "5", "-D", *rule)
            self.rules.remove(rule)

    @contextlib.contextmanager
    def armed_drop(self, address: str, port: int) -> Iterator[ArmedDrop]:
        """The rule of `drop`, loaded into an iptables-restore ahead of time and committed by
        the `fire` of what this yields, so that the cut lands within a millisecond or so of
        the moment a test chooses; its `heal` deletes the rule (the partition is over); the
        block's end deletes it if it was committed and not healed yet."""
        assert self.iptables, "iptables was not set up (scripts/test-iptables ensure)"
        rule = ["OUTPUT", "-d", address, "-p", "tcp", "--dport", str(port), "-j", "DROP"]
        restore = subprocess.Popen(
            [*self.prefix, self.iptables + "-restore", "--noflush", "-w", "5"],
            stdin=subprocess.PIPE,
            text=True,
        )
        assert restore.stdin is not None
        restore.stdin.write("*filter\n" + " ".join(["-A", *rule]) + "\n")
        restore.stdin.flush()
        armed = ArmedDrop(self, rule, restore)
        try:
            yield armed
        finally:
            if armed.fired:
                armed.heal()
            elif restore.poll() is None:
                restore.kill()
                restore.wait(10)

    def close(self) -> None:
        for rule in list(self.rules):
            sh(*self.prefix, self.iptables, "-w", "5", "-D", *rule, check=False)
        self.rules.clear()
        sh("ip", "netns", "del", self.name, check=False)  # takes the inner end with it
        sh("ip", "link", "del", self.outer, check=False)


class ArmedDrop:
    """`Netns.armed_drop`'s rule: `fire()` commits it (the cut), `heal()` deletes it."""

    def __init__(self, netns: Netns, rule: list[str], restore: subprocess.Popen[str]) -> None:
        self.netns = netns
        self.rule = rule
        self.restore = restore
        self.fired = False
        self.healed = False

    def fire(self) -> None:
        assert self.restore.stdin is not None and not self.fired
        self.restore.stdin.write("COMMIT\n")
        self.restore.stdin.close()
        assert self.restore.wait(10) == 0, "iptables-restore failed"
        self.fired = True
        self.netns.rules.append(self.rule)

    def heal(self) -> None:
        if self.fired and not self.healed:
            self.netns.run(self.netns.iptables, "-w", "5", "-D", *self.rule)
            self.netns.rules.remove(self.rule)
            self.healed = True


# -- the session's servers ----------------------------------------------------------------------


@dataclass
class Services:
    """What the whole session shares: the servers above and the mock upstream."""

    tmp: Path
    pg: Postgres
    redis: Redis
    mock: str  # the mock's base URL (on the veth's address when there is a namespace)
    netns: Netns | None
    procs: Procs

    @property
    def address(self) -> str:
        """Where the servers listen for host C (and where every host finds them)."""
        return self.netns.host_addr if self.netns else "127.0.0.1"

    def mock_ledger(self) -> list[dict[str, Any]]:
        view = http_json(self.mock + "/mock/ledger", timeout=30)
        assert view["dropped"] == 0, "the mock's ledger window overflowed"
        return list(view["entries"])


def start_mock(procs: Procs, address: str) -> str:
    port = free_port()
    procs.start("mock", "mock-upstream", "--host", address, "--port", str(port),
                "--latency-ms", str(MOCK_LATENCY_MS), "--model", MODEL)  # fmt: skip
    base = f"http://{address}:{port}"
    wait_until(lambda: up(base + "/mock/ledger"), 20, interval=0.05, what="the mock upstream")
    return base


# -- the hosts ----------------------------------------------------------------------------------


class NotQuiescent(AssertionError):
    """What the clients were served did not all get recorded and settled in time."""


@dataclass
class Tenant:
    name: str
    secret: str
    key_id: str
    wallet: int  # nanos topped up


@dataclass
class Host:
    """One `tokenhub serve --host-id NAME` (one worker) with its own home: config, journal."""

    name: str
    address: str  # where it listens (and where the load client finds it)
    port: int
    home: Path
    prefix: list[str]  # `ip netns exec NS` for host C when there is a namespace
    proc: Proc | None = None
    settlers: set[int] = field(default_factory=set)  # its settler processes, seen so far
    starts: int = 0

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"

    def launch(self, procs: Procs) -> None:
        self.starts += 1
        argv = ["serve", "--config", str(self.home / "tokenhub.toml"), "--host-id", self.name,
                "--host", self.address]  # fmt: skip
        self.proc = Proc(procs.tmp, f"{self.name}-{self.starts}", argv, prefix=self.prefix)
        procs.all.append(self.proc)

    def wait_serving(self) -> None:
        assert self.proc is not None
        self.proc.wait_serving(timeout=90)
        self.note_settlers()

    def note_settlers(self) -> None:
        if self.proc is not None:
            for pid in children(self.proc.pid):
                if "tokenhub.billing.settler" in cmdline(pid):
                    self.settlers.add(pid)

    def kill9(self) -> None:
        """kill -9 of the whole host: the gateway's process group and its settler (in a
        session of its own, where the lease agent lives), as when the machine dies: nothing
        is given back, nothing flushed."""
        assert self.proc is not None
        self.note_settlers()
        for pid in self.settlers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill_group()

    def reap_settlers(self, timeout: float = 15.0) -> list[int]:
        """Waits for its settlers to stop by themselves; kills (by pid) and returns those
        that did not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in self.settlers):
            time.sleep(0.1)
        stuck = [p for p in self.settlers if alive(p)]
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return stuck


class Cluster:
    """A fresh database and three hosts on it (not started until `start`)."""

    def __init__(self, services: Services, tmp: Path, database: str) -> None:
        self.services = services
        self.tmp = tmp
        self.database = database
        self.url = services.pg.url(database)
        self.procs = Procs(tmp)
        self.tenants: dict[str, Tenant] = {}
        self.hosts: dict[str, Host] = {}
        netns = services.netns
        for name in HOSTS:
            inside = name == "C" and netns is not None
            address = netns.ns_addr if inside and netns else "127.0.0.1"
            home = tmp / name
            home.mkdir()
            self.hosts[name] = Host(name, address, free_port(), home,
                                    netns.prefix if inside and netns else [])  # fmt: skip
        from tokenhub.store import open_store

        self.store = open_store(self.url)
        self.store.migrate()
        self.billing(lambda b: b.set_price(MODEL, currency="USD", input_per_1m="100",
                                           output_per_1m="100", effective_ms=0))  # fmt: skip
        http_json(services.mock + "/mock/reset", method="POST")

    # -- set-up ------------------------------------------------------------------------------

    def billing(self, fn: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """`await fn(Billing)` on the cluster's database, as the CLI would."""
        from tokenhub.billing.service import Billing
        from tokenhub.db.database import open_database

        async def run() -> T:
            db = await open_database(self.url)
            try:
                return await fn(Billing(db))
            finally:
                await db.close()

        return run_async(run())

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.url, timeout=10)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return run_async(run())

    def add_tenant(self, name: str, wallet_usd: str, *, key_rpm: int | None = None) -> Tenant:
        """A tenant paying from its wallet only (no credit line), topped up by `wallet_usd`,
        with one key (limited to `key_rpm` requests a minute if given)."""
        self.store.create_tenant(name)
        key, secret = self.store.create_key(name)
        if key_rpm is not None:
            self.store.set_limits("key", key.id, rpm=key_rpm)

        async def fund(b: Any) -> None:
            await b.set_profile(name, currency="USD", draw_order=["wallet"])
            await b.topup(name, wallet_usd, "USD")

        self.billing(fund)
        cents = round(float(wallet_usd) * 100)
        t = Tenant(name, secret, key.id, cents * USD // 100)
        self.tenants[name] = t
        return t

    def config(self, host: Host) -> None:
        # PostgreSQL and Redis on loopback, but host C in its namespace reaches them (and
        # every host the mock) on this side's veth address.
        address = self.services.address if host.prefix else "127.0.0.1"
        database = self.services.pg.url(self.database, address=address)
        extra = f"""heartbeat_s = 1.0

[billing]
settle_interval_s = {SETTLE_INTERVAL_S}
admission = true

[cluster]
redis_url = "redis://{address}:{self.services.redis.port}/0"
hosts = {len(HOSTS)}
"""
        write_config(host.home, host.port, database, self.services.mock, extra=extra)

    # -- the hosts ---------------------------------------------------------------------------

    def start(self) -> None:
        for h in self.hosts.values():
            self.config(h)
            h.launch(self.procs)
        for h in self.hosts.values():
            h.wait_serving()
        for t in self.tenants.values():
            self.wait_known(t)

    def wait_known(self, t: Tenant) -> None:
        """Every host knows the tenant's key (key caches refresh every 0.2 s)."""
        import urllib.error
        import urllib.request

        def known(h: Host) -> bool:
            req = urllib.request.Request(
                h.base + "/v1/models", headers={"Authorization": f"Bearer {t.secret}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=5):
                    return True
            except (urllib.error.URLError, OSError):
                return False

        for h in self.hosts.values():
            wait_until(lambda h=h: known(h), 20, interval=0.05, what=f"host {h.name} to know {t}")

    def restart(self, name: str) -> None:
        h = self.hosts[name]
        h.launch(self.procs)
        h.wait_serving()

    def stop(self) -> dict[str, int]:
        """SIGTERM to every live host at once (each drains, flushes its journal, and its
        settler makes a last pass); their exit statuses."""
        live = [h for h in self.hosts.values() if h.proc and h.proc.popen.poll() is None]
        for h in live:
            h.note_settlers()
            h.proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        codes = {h.name: h.proc.popen.wait(90) for h in live}  # type: ignore[union-attr]
        for h in self.hosts.values():
            stuck = h.reap_settlers()
            assert not stuck, f"host {h.name}'s settlers {stuck} did not stop by themselves"
        return codes

    def close(self) -> None:
        self.procs.close()
        for h in self.hosts.values():
            h.reap_settlers(timeout=5)
        self.store.close()

    def stderr(self) -> str:
        return "\n".join(f"--- {p.err.name}\n{p.stderr()[-3000:]}" for p in self.procs.all)

    # -- quiescence --------------------------------------------------------------------------

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TOKENHUB, *argv, "--db", self.url], capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    def wait_recorded(self, ids: set[str], timeout: float = 90.0) -> None:
        """Until every id is a usage event and no event is left unsettled."""

        def done() -> bool:
            have = {r[0] for r in self.query("SELECT request_id FROM usage_events")}
            pending = self.query("SELECT COUNT(*) FROM usage_events WHERE settled_ms IS NULL")
            return ids <= have and pending[0][0] == 0

        try:
            wait_until(done, timeout, interval=0.2, what=f"{len(ids)} events recorded, settled")
        except AssertionError as e:
            raise NotQuiescent(f"{e}\n{self.diagnosis(ids)}") from None

    def diagnosis(self, ids: set[str]) -> str:
        """What is missing, what PostgreSQL is doing, and what the hosts said."""
        have = {r[0] for r in self.query("SELECT request_id FROM usage_events")}
        pending = self.query(
            "SELECT tenant, status, COUNT(*) FROM usage_events WHERE settled_ms IS NULL "
            "GROUP BY tenant, status"
        )
        activity = self.query(
            "SELECT client_addr::text, state, wait_event_type, wait_event, now() - xact_start, "
            "left(query, 100) FROM pg_stat_activity WHERE datname = current_database() AND "
            "state <> 'idle' AND pid <> pg_backend_pid()"
        )
        failures = self.query("SELECT event_id, reason, attempts FROM settlement_failures")
        return (
            f"not recorded: {len(ids - have)}; unsettled: {pending}; failures: {failures[:5]}\n"
            f"sessions: " + "\n  ".join(map(str, activity)) + "\n" + self.stderr()
        )

    def quiesce(self, served_ok: set[str], timeout: float = 90.0) -> list[str]:
        """Everything served is recorded and settled by the live hosts (within `timeout`);
        their leased pools are compared with the coordinator (`pool_mismatches`); then the
        hosts stop cleanly (their leases go back, each flushes its journal before its
        settler's last pass), leaving nothing unsettled. Returns the pools' mismatches."""
        netns = self.services.netns
        assert not (netns and netns.rules), f"a partition is still on: {netns and netns.rules}"
        self.wait_recorded(served_ok, timeout)
        mismatches = self.pool_mismatches()
        codes = self.stop()
        assert set(codes.values()) <= {0}, codes
        pending = self.query("SELECT request_id FROM usage_events WHERE settled_ms IS NULL")
        assert not pending, f"{len(pending)} events left unsettled by a clean stop"
        return mismatches

    def pool_mismatches(self, settle_s: float = 10.0) -> list[str]:
        """Each live host's leased pool (its quota table's pot limits) against what the
        coordinator holds for its instance: the amounts of its open leases plus what its
        returned leases used (a give-back keeps in the pool what its charges still need). A
        grant applied twice (a lost reply, replayed) or a give-back lost shows here. Read
        until two reads of a table agree with the database in between (the agent ticks every
        0.2 s), for at most `settle_s`; the mismatches of the last read."""
        from tokenhub.billing.draw import pot_dim
        from tokenhub.billing.leasing import table_instance
        from tokenhub.quota import Quota

        def local(q: Quota, pots: Sequence[str]) -> dict[str, int]:
            out = {}
            for pot in pots:
                if q.table.find_account(pot) is None:
                    out[pot] = 0
                else:
                    out[pot] = getattr(q.state(pot), pot_dim(pot)).limit or 0
            return out

        problems: list[str] = []
        deadline = time.monotonic() + settle_s
        for h in self.hosts.values():
            if h.proc is None or h.proc.popen.poll() is not None:
                continue
            q = Quota.attach(f"/dev/shm/tokenhub-quota-{h.proc.pid}")
            instance = table_instance(q, h.name)
            while True:
                coord = {
                    r[0]: int(r[1])
                    for r in self.query(
                        "SELECT pot, SUM(CASE state WHEN 'open' THEN amount WHEN 'returned' "
                        "THEN COALESCE(used, 0) ELSE 0 END) FROM budget_leases "
                        "WHERE instance = $1 AND state <> 'refused' GROUP BY pot",
                        instance,
                    )
                }
                before = local(q, list(coord))
                after = local(q, list(coord))
                bad = [
                    f"host {h.name} ({instance}) {pot}: pool limit {before[pot]}, the "
                    f"coordinator's open amounts and returned uses {want}"
                    for pot, want in coord.items()
                    if before[pot] != want or after[pot] != want
                ]
                if not bad or time.monotonic() > deadline:
                    problems += bad
                    break
                time.sleep(0.2)
        return problems

    def books(self) -> Books:
        return Books.read(self)

    def when_in_transaction(
        self, client: str, like: str, then: Callable[[], None], timeout: float = 20.0
    ) -> tuple[str, str]:
        """Polls pg_stat_activity until a backend of `client` (an address) is inside a
        transaction whose current statement matches `like`, calls `then` at once, and
        returns (that statement, the statement the same backend is in 1 s later, still inside
        the transaction, or "" if it is not)."""

        async def watch() -> tuple[str, str]:
            conn = await asyncpg.connect(self.url, timeout=10)
            sql = (
                "SELECT pid, left(query, 100) FROM pg_stat_activity WHERE datname = "
                "current_database() AND client_addr = $1::inet AND xact_start IS NOT NULL"
            )
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    rows = await conn.fetch(sql + " AND query ILIKE $2", client, like)
                    if rows:
                        then()
                        await asyncio.sleep(1.0)
                        pid, caught = rows[0]
                        later = {r[0]: r[1] for r in await conn.fetch(sql, client)}
                        return caught, later.get(pid, "")
                raise AssertionError(f"no transaction of {client} matched {like!r}")
            finally:
                await conn.close()

        return run_async(watch())


# -- the load client ----------------------------------------------------------------------------


@dataclass
class Shot:
    """One request as the client saw it."""

    host: str
    tenant: str
    stream: bool
    sent: float  # seconds since the load client started (monotonic)
    done: float = 0.0
    status: int = 0  # 0: no HTTP response at all (refused, reset)
    request_id: str | None = None
    code: str = ""  # the error code of a refusal (or of a stream's final error event)
    error: str = ""  # the client-side exception, if any


def spread(weights: Mapping[str, int]) -> list[str]:
    """One period of smooth weighted round-robin over the hosts (6:3:1 -> A B A C A B ...)."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    out = []
    for _ in range(total):
        for h, w in weights.items():
            current[h] += w
        best = max(current, key=lambda h: current[h])
        current[best] -= total
        out.append(best)
    return out


class Load:
    """The load client: bounded bursts and paced streams of chat completions, spread over the
    hosts by weight, on an event loop thread of its own so that the test thread can inject
    faults meanwhile. Every loop is bounded by a count or a duration."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.loop = LoopThread()
        self.t0 = time.monotonic()
        self.shots: list[Shot] = []
        self._session: aiohttp.ClientSession | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            timeout = aiohttp.ClientTimeout(total=60)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    async def _one(self, host: str, tenant: Tenant, stream: bool) -> None:
        shot = Shot(host, tenant.name, stream, self.now())
        self.shots.append(shot)
        body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        url = self.cluster.hosts[host].base + "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {tenant.secret}"}
        session = await self._sess()
        try:
            async with session.post(url, json=body, headers=headers) as resp:
                shot.request_id = resp.headers.get("x-request-id")
                data = await resp.read()
                shot.status = resp.status
                if resp.status != 200:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        shot.code = json.loads(data)["error"]["code"] or ""
                elif stream:
                    lines = [x[6:] for x in data.split(b"\n") if x.startswith(b"data: ")]
                    if not lines or lines[-1] != b"[DONE]":
                        shot.error = "stream cut short"
                    for x in lines[:-1]:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            shot.code = json.loads(x)["error"]["code"] or shot.code
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            shot.error = type(e).__name__
        shot.done = self.now()

    def burst(
        self, tenant: Tenant, total: int, weights: Mapping[str, int], *, every_stream: int = 4
    ) -> Future[None]:
        """`total` requests at once (all in flight together), every `every_stream`-th a
        stream; returns when all are answered."""
        order = spread(weights)

        async def run() -> None:
            await asyncio.gather(
                *(
                    self._one(order[i % len(order)], tenant, i % every_stream == every_stream - 1)
                    for i in range(total)
                )
            )

        return asyncio.run_coroutine_threadsafe(run(), self.loop.loop)

    def steady(
        self,
        tenant: Tenant,
        rate_per_s: float,
        duration_s: float,
        weights: Mapping[str, int],
        *,
        max_in_flight: int = 64,
        every_stream: int = 4,
    ) -> Future[None]:
        """Open-loop: a request every 1/rate s for `duration_s`, at most `max_in_flight`
        unanswered (beyond that the schedule waits)."""
        order = spread(weights)

        async def run() -> None:
            gate = asyncio.Semaphore(max_in_flight)
            tasks = []
            start = time.monotonic()
            n = int(rate_per_s * duration_s)

            async def one(i: int) -> None:
                try:
                    await self._one(order[i % len(order)], tenant, i % every_stream == 1)
                finally:
                    gate.release()

            for i in range(n):
                delay = start + i / rate_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await gate.acquire()
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

        return asyncio.run_coroutine_threadsafe(run(), self.loop.loop)

    def close(self) -> None:
        async def shut() -> None:
            if self._session is not None:
                await self._session.close()

        with contextlib.suppress(Exception):
            self.loop.call(shut(), timeout=30)
        self.loop.close()

    def of(self, tenant: Tenant) -> list[Shot]:
        return [s for s in self.shots if s.tenant == tenant.name]


# -- the oracles --------------------------------------------------------------------------------


@dataclass
class Event:
    tenant: str
    status: int
    error: str
    input_tokens: int
    output_tokens: int
    settled: bool


@dataclass
class Books:
    """What the mock served and what the database holds, read once after quiescence."""

    served: Counter[str]  # request id -> times the mock served it in full (status 200)
    served_tokens: dict[str, tuple[int, int]]  # request id -> (prompt, completion) served
    events: dict[str, Event]
    settled: set[str]  # settlements' event ids
    usage_txns: Counter[str]  # ref (request id) -> usage transactions
    charges: dict[str, int]  # ref -> nanos charged (wallet and overrun legs)
    balances: dict[str, dict[str, int]]  # tenant -> account -> balance
    leases: Counter[str]  # state -> leases
    pots: dict[str, tuple[str, int, int, int]]  # pot -> (tenant, cap, granted, spent_unposted)
    ledger_pots: dict[str, int]  # pot -> the ledger's available balance
    check: subprocess.CompletedProcess[str]  # tokenhub billing check

    @classmethod
    def read(cls, c: Cluster) -> Books:
        from tokenhub.billing.ledger import balances
        from tokenhub.billing.pots import _ledger_pots

        served: Counter[str] = Counter()
        tokens: dict[str, tuple[int, int]] = {}
        for e in c.services.mock_ledger():
            rid = e.get("client_request_id")
            if rid and e["status"] == 200:
                served[rid] += 1
                tokens[rid] = (e["prompt_tokens"], e["completion_tokens"])
        events = {
            r[0]: Event(r[1], r[2], r[3], r[4], r[5], r[6] is not None)
            for r in c.query(
                "SELECT request_id, tenant, status, error, input_tokens, output_tokens, "
                "settled_ms FROM usage_events"
            )
        }
        settled = {r[0] for r in c.query("SELECT event_id FROM settlements")}
        txns = Counter(
            {r[0]: r[1] for r in c.query(
                "SELECT ref, COUNT(*) FROM ledger_txns WHERE kind = 'usage' GROUP BY ref")}
        )  # fmt: skip
        charges = {
            r[0]: abs(int(r[1]))
            for r in c.query(
                "SELECT t.ref, SUM(p.amount) FROM ledger_txns t JOIN postings p "
                "ON p.txn_id = t.id WHERE t.kind = 'usage' AND (p.account LIKE 't:%:wallet:%' "
                "OR p.account LIKE 't:%:overrun:%') GROUP BY t.ref"
            )
        }
        leases = Counter({r[0]: r[1] for r in c.query(
            "SELECT state, COUNT(*) FROM budget_leases GROUP BY state")})  # fmt: skip
        pots = {
            r[0]: (r[1], r[2], r[3], r[4])
            for r in c.query("SELECT pot, tenant, cap, granted, spent_unposted FROM budget_pots")
        }

        async def ledger(b: Any) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
            async def run(tx: Any) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
                bal = {t: await balances(tx, tenant=t) for t in c.tenants}
                return bal, await _ledger_pots(tx, list(c.tenants))

            return await b.db.transaction(run)  # type: ignore[no-any-return]

        bal, lpots = c.billing(ledger)
        return cls(served, tokens, events, settled, txns, charges, bal, leases, pots, lpots,
                   c.cli("billing", "check"))  # fmt: skip

    def overrun(self, tenant: str) -> int:
        return self.balances[tenant].get(f"t:{tenant}:overrun:USD", 0)

    def wallet_left(self, tenant: str) -> int:
        return -self.balances[tenant].get(f"t:{tenant}:wallet:USD", 0)


def usage_problems(books: Books, shots: Sequence[Shot]) -> list[str]:
    """Usage exactly once, whatever the fault: what the mock served is recorded, settled once
    and billed once, exactly; what the client saw refused is not billed; nothing is billed
    that the mock did not serve; the books check."""
    out: list[str] = []
    twice = [r for r, n in books.served.items() if n > 1]
    if twice:
        out.append(f"the mock served {len(twice)} request ids more than once: {twice[:3]}")
    for rid in books.served:
        ev = books.events.get(rid)
        if ev is None:
            out.append(f"{rid}: served by the mock, no usage event")
            continue
        if rid not in books.settled or not ev.settled:
            out.append(f"{rid}: served, not settled")
        if ev.status == 200:
            if books.usage_txns[rid] != 1:
                out.append(f"{rid}: served, in the ledger {books.usage_txns[rid]} times")
            if (ev.input_tokens, ev.output_tokens) != books.served_tokens[rid]:
                out.append(f"{rid}: event tokens {(ev.input_tokens, ev.output_tokens)} != "
                           f"served {books.served_tokens[rid]}")  # fmt: skip
            expected = rate(ev.input_tokens + ev.output_tokens, PER_1M)
            if books.charges.get(rid) != expected:
                out.append(f"{rid}: charged {books.charges.get(rid)}, its tokens cost {expected}")
        elif books.usage_txns[rid]:
            out.append(f"{rid}: event status {ev.status} ({ev.error}) yet billed")
    for rid, n in books.usage_txns.items():
        if rid not in books.served:
            out.append(f"{rid}: billed {n} times, never served by the mock")
    for ev_id, ev in books.events.items():
        if ev_id not in books.settled:
            out.append(f"{ev_id}: usage event ({ev.status}) not settled")
    for s in shots:
        if s.status == 200 and not s.error and not s.code:
            if s.request_id not in books.served:
                out.append(f"{s.request_id}: the client got 200 from {s.host}, the mock has "
                           "no record")  # fmt: skip
        elif s.request_id and books.usage_txns[s.request_id]:
            out.append(f"{s.request_id}: refused ({s.status} {s.code or s.error}) yet billed")
    if books.check.returncode != 0:
        out.append("tokenhub billing check: " + (books.check.stdout + books.check.stderr)[-2000:])
    if books.leases["open"]:
        out.append(f"{books.leases['open']} leases still open after the hosts stopped")
    return out


def money_problems(books: Books, tenants: Sequence[Tenant]) -> list[str]:
    """Leased money admission (binding once the host side of cluster mode is installed): no
    overdraw (nothing posted to overrun), the wallet paid exactly what was charged, and every
    money pot exists and equals the ledger with nothing granted or unposted left."""
    out = []
    for t in tenants:
        if books.overrun(t.name):
            out.append(f"{t.name}: overdrawn by {books.overrun(t.name)} nanos (overrun)")
        charged = sum(
            books.charges.get(r, 0) for r, ev in books.events.items() if ev.tenant == t.name
        )
        if t.wallet - books.wallet_left(t.name) != charged - books.overrun(t.name):
            out.append(f"{t.name}: the wallet paid {t.wallet - books.wallet_left(t.name)}, "
                       f"charges less overrun are {charged - books.overrun(t.name)}")  # fmt: skip
        pot = f"pot:m:{t.name}"
        if pot not in books.pots:
            out.append(f"{pot}: no budget pot (money admission did not lease)")
            continue
        _, cap, granted, unposted = books.pots[pot]
        if (cap, granted, unposted) != (books.ledger_pots.get(pot), 0, 0):
            out.append(f"{pot}: cap {cap} granted {granted} unposted {unposted}, the ledger "
                       f"has {books.ledger_pots.get(pot)}")  # fmt: skip
    return out


@dataclass
class Figures:
    """What one scenario measured, for the report (printed; `pytest -s` shows it)."""

    scenario: str
    rows: dict[str, Any] = field(default_factory=dict)

    def tenant(self, books: Books, shots: Sequence[Shot], t: Tenant) -> None:
        mine = [s for s in shots if s.tenant == t.name]
        ok = [s for s in mine if s.status == 200 and not s.code and not s.error]
        statuses = Counter(s.status for s in mine)
        billed = [
            r for r, ev in books.events.items() if ev.tenant == t.name and books.usage_txns[r]
        ]
        self.rows[t.name] = {
            "requests": len(mine),
            "admitted": len(ok),
            "refused_429": statuses[429],
            "other_non200": len(mine) - len(ok) - statuses[429],
            "billed": len(billed),
            "served_not_billed": sum(
                1 for r in books.served if books.events.get(r) and books.events[r].tenant
                == t.name and not books.usage_txns[r]
            ),
            "overrun_nanos": books.overrun(t.name),
            "wallet_spent_nanos": t.wallet - books.wallet_left(t.name),
        }  # fmt: skip

    def show(self, books: Books | None = None) -> None:
        if books is not None:
            self.rows["leases"] = dict(books.leases)
            self.rows["pots"] = {p: v[1:] for p, v in books.pots.items()}
        print(f"\n[cluster figures] {self.scenario}: {json.dumps(self.rows, sort_keys=True)}")


# -- rate limits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateSample:
    t: float  # on the load client's clock
    limit: dict[str, int]  # host -> its local rpm limit (its share)
    remaining: dict[str, int]  # host -> what its bucket held (GCRA remaining)


class RateSampler:
    """Reads one account's rpm limit and remaining on every host's quota table every
    `interval` s, on a thread, until stopped: the shares in force and the buckets' contents,
    for the share-shift bound (tokenhub.runtime.shares)."""

    def __init__(self, cluster: Cluster, load: Load, account: str, interval: float = 0.2):
        from tokenhub.quota import Quota

        self.samples: list[RateSample] = []
        self._stop = False
        self._tables: dict[str, Any] = {}
        for h in cluster.hosts.values():
            assert h.proc is not None
            path = Path(f"/dev/shm/tokenhub-quota-{h.proc.pid}")
            wait_until(path.exists, 10, what=f"host {h.name}'s quota table")
            self._tables[h.name] = Quota.attach(str(path))
        self.account, self.load, self.interval = account, load, interval
        self.thread = threading.Thread(target=self._run, name="rate-sampler", daemon=True)

    def start(self) -> RateSampler:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            t = self.load.now()
            limit, remaining = {}, {}
            for host, table in self._tables.items():
                s = table.state(self.account).rpm
                limit[host] = s.limit if s.limit is not None else UNLIMITED_RPM
                remaining[host] = s.remaining if s.remaining is not None else UNLIMITED_RPM
            self.samples.append(RateSample(t, limit, remaining))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop = True
        self.thread.join(10)


UNLIMITED_RPM = 1 << 62  # an unlimited local limit: any bound with it in is no bound


@dataclass(frozen=True)
class Window:
    start: float
    admitted: int  # 200s sent within [start, start + 60)
    bucket: int  # B0: what the hosts' buckets held at the start
    moved: int  # sum of D_k: share raised onto hosts by rebalances within the window

    def bound(self, rpm: int, slack: int) -> int:
        return self.bucket + rpm + self.moved + slack


def windows(samples: Sequence[RateSample], shots: Sequence[Shot], start: float,
            end: float) -> list[Window]:  # fmt: skip
    """Every 60 s window [a, a + 60) with a a sample time in [start, end - 60]: the requests
    admitted in it (by the client's send time), the buckets' contents at a, and the share
    moved onto hosts within it (each host's rises of its local limit between samples)."""
    sent = sorted(s.sent for s in shots if s.status == 200 and not s.code and not s.error)
    out = []
    for j, a in enumerate(samples):
        if not start <= a.t <= end - 60:
            continue
        admitted = sum(1 for t in sent if a.t <= t < a.t + 60)
        moved = 0
        prev = a
        for b in samples[j + 1 :]:
            if b.t >= a.t + 60:
                break
            moved += sum(max(0, b.limit[h] - prev.limit[h]) for h in b.limit)
            prev = b
        out.append(Window(a.t, admitted, sum(a.remaining.values()), moved))
    return out
