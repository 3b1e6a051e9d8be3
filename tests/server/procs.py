"""Real `tokenhub` processes for the server tests that need them (`--workers`, budgets, money
admission): a subprocess in its own process group with its output in files, the mock upstream
as a process, process-tree helpers, and a concurrent burst of chat completions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from harness import free_port, http_json, wait_until

from tokenhub.store import Store, open_store

TOKENHUB = str(Path(sys.executable).with_name("tokenhub"))


# -- processes ---------------------------------------------------------------------------------


class Proc:
    """A subprocess in a process group of its own, with its output in files."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """`tokenhub ARGS`, run through `prefix` if given (e.g. `ip netns exec NS`, which execs
        it in place: the pid is tokenhub's)."""
        self.out = tmp / f"{name}.out"
        self.err = tmp / f"{name}.err"
        env = {**os.environ, "TOKENHUB_LOG_LEVEL": "WARNING", **(env or {})}
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen(
                [*prefix, TOKENHUB, *args],
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Until it prints "serving on" (with several workers: once every worker serves)."""

        def serving() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"exited with {self.popen.returncode}:\n{self.stderr()}")
            return "tokenhub: serving on" in self.stdout()

        wait_until(serving, timeout, interval=0.05, what="the gateway to serve")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and its exit status."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        """`tokenhub ARGS`; `env`: variables added to (or replacing) the test's environment."""
        p = Proc(self.tmp, f"{len(self.all)}-{name}", list(args), env)
        self.all.append(p)
        return p

    def close(self) -> None:
        for p in self.all:
            p.kill_group()


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc/*/stat)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(d))
    return sorted(found)


def write_config(
    tmp: Path,
    port: int,
    database: str | Path,
    mock: str,
    *,
    models: dict[str, str] | None = None,
    extra: str = "",
) -> Path:
    """`tmp/tokenhub.toml`: a server on `port` with `database`, the `mock` upstream as provider
    "mock", one deployment on it per model (model id -> vocabulary; default gpt-4o-mini with
    cl100k_base) and `extra` TOML (e.g. a [billing] table) after the [server] table."""
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
database = "{database}"
journal_dir = "{tmp / "journal"}"
key_refresh_s = 0.2
{extra}
[[providers]]
name = "mock"
base_url = "{mock}/v1"
"""
    for model, vocab in (models or {"gpt-4o-mini": "cl100k_base"}).items():
        text += f"""
[[models]]
id = "{model}"
  [[models.deployments]]
  provider = "mock"
  upstream_model = "{model}"
  vocab = "{vocab}"
"""
    config = tmp / "tokenhub.toml"
    config.write_text(text, encoding="utf-8")
    return config


@dataclass
class Site:
    """A database with a tenant and a key, and a config for a gateway on it (not started)."""

    tmp: Path
    config: Path
    base: str
    mock: str
    store: Store
    secret: str
    key_id: str

    @property
    def journal(self) -> Path:
        return self.tmp / "journal"

    @property
    def url(self) -> str:
        return self.base + "/v1/chat/completions"


@contextlib.contextmanager
def open_site(tmp: Path, mock: str, tenant: str) -> Iterator[Site]:
    """A Site on `mock` (its ledger reset) with one tenant and key: the gpt-4o-mini model on
    the mock, a free port, SQLite in `tmp`."""
    http_json(mock + "/mock/reset", method="POST")
    port = free_port()
    db = tmp / "hub.db"
    config = write_config(tmp, port, db, mock)
    store = open_store(str(db))
    try:
        store.migrate()
        store.create_tenant(tenant)
        key, secret = store.create_key(tenant)
        yield Site(tmp, config, f"http://127.0.0.1:{port}", mock, store, secret, key.id)
    finally:
        store.close()


def up(url: str) -> bool:
    """The URL answers (a GET of JSON)."""
    try:
        http_json(url, timeout=1.0)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def mock_process(tmp: Path, *args: str) -> Iterator[str]:
    """`tokenhub mock-upstream ARGS` on a free port until the block ends; yields its base URL."""
    port = free_port()
    p = Proc(tmp, "mock", ["mock-upstream", "--port", str(port), *args])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: up(base + "/mock/ledger"), 20.0, interval=0.05, what="the mock")
        yield base
    finally:
        p.kill_group()


def event_ids(store: Store) -> set[str]:
    return {e.request_id for e in store.iter_events()}


def no_traceback(p: Proc) -> None:
    assert "Traceback" not in p.stderr(), p.stderr()


@dataclass
class Outcome:
    status: int = 0
    request_id: str | None = None
    body: Any = None  # the JSON body; for a stream, its last chunk before [DONE]
    error: str = ""


async def fire(
    url: str, secret: str, total: int, messages: list[dict[str, str]], max_tokens: int
) -> list[Outcome]:
    """`total` chat completions at once (every fourth streamed, with usage), each on its own
    connection."""
    outcomes = [Outcome() for _ in range(total)]
    headers = {"Authorization": f"Bearer {secret}"}
    start = asyncio.Event()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        stream = i % 4 == 3
        body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": messages}
        body["max_tokens"] = max_tokens
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        out = outcomes[i]
        await start.wait()
        try:
            async with session.post(url, json=body, headers=headers) as resp:
                out.status = resp.status
                out.request_id = resp.headers.get("x-request-id")
                data = await resp.read()
                if stream and resp.status == 200:
                    lines = [x[6:] for x in data.split(b"\n") if x.startswith(b"data: ")]
                    assert lines[-1] == b"[DONE]", data
                    out.body = json.loads(lines[-2])
                else:
                    out.body = json.loads(data)
        except (aiohttp.ClientError, ValueError, IndexError) as e:
            out.error = type(e).__name__

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(one(session, i)) for i in range(total)]
        await asyncio.sleep(0)
        start.set()
        await asyncio.gather(*tasks)
    return outcomes


def admitted_and_refused(
    outcomes: list[Outcome], total: int
) -> tuple[list[Outcome], list[Outcome]]:
    """The 200s and the 429s of a burst, checking that every request got one or the other,
    with its own request id, and that some were refused."""
    assert [o.error for o in outcomes if o.error] == []
    admitted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    assert len(admitted) + len(refused) == total, sorted({o.status for o in outcomes})
    ids = {o.request_id for o in outcomes}
    assert None not in ids and len(ids) == total
    assert refused, "the burst was not limited at all"
    for o in refused:
        err = o.body["error"]
        assert (err["code"], err["type"]) == ("insufficient_quota", "insufficient_quota"), err
    return admitted, refused
