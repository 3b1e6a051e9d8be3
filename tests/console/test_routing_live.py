"""Live routing state in the console (tokenhub.routing_state): the routing page's live table and
the overview's cooldown alerts.

The end-to-end test runs a real `tokenhub serve` (a subprocess, with its admin listener) in
front of two mock upstreams in this test's loop, one of which fails until told otherwise: its
circuit opens, the console (signed in as read) shows it open with its cooldown and the
overview lists it as an alert; once the upstream recovers and the cooldown is over, a request
probes it and the page shows it closed. The other tests check the provider's arithmetic on a
real router with a fake clock, and the pages with a provider given and without one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from console_kit import PASSWORD, ROLE_USER, World, csrf_of

from tokenhub.admin.app import build_admin_app
from tokenhub.mock import MockOptions
from tokenhub.mock import build_app as mock_app
from tokenhub.router import DeploymentSpec, Router
from tokenhub.routing_state import DeploymentLive, LiveRouting, MergedRouting, RoutingSnapshot

TOKENHUB = str(Path(sys.executable).with_name("tokenhub"))
COOLDOWN_S = 5.0  # the router's default first cooldown (the gateway does not change it)
_ATTR = re.compile(r'data-([a-z0-9-]+)="([^"]*)"')


def live_rows(page: str) -> dict[tuple[str, str], dict[str, str]]:
    rows = [dict(_ATTR.findall(m)) for m in re.findall(r'<tr class="live-row" ([^>]*)>', page)]
    return {(r["model"], r["deployment"]): r for r in rows}


def alerts(page: str) -> list[tuple[str, str]]:
    """(kind, text) of the overview's alerts."""
    return [
        (m.group(1), unescape(re.sub(r"\s+", " ", m.group(2)).strip()))
        for m in re.finditer(r'<div class="alert[^"]*" data-alert="([^"]+)">(.*?)(?:<a |</div>)',
                             page, re.S)
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the provider on a real router ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000

    def __call__(self) -> int:
        return self.ms


def test_live_routing_counts_a_window_and_converts_the_cooldown() -> None:
    router = Router([DeploymentSpec(name="a"), DeploymentSpec(name="b")])
    clock = Clock()  # at 1 000: the first sample, taken at construction
    live = LiveRouting(lambda: {"m": router}, clock, window_ms=10_000, every_ms=1_000)
    for _ in range(4):  # old traffic: successes on a
        router.on_start(0, clock.ms)
        router.on_success(0, clock.ms, 120.0, 30.0)
    clock.ms = 12_000
    live.sample()
    clock.ms = 22_500
    for _ in range(3):  # three failures on b open its circuit (cooldown 5 s: until 27 500)
        router.on_start(1, clock.ms)
        router.on_failure(1, clock.ms)
    clock.ms = 23_000
    before = int(time.time() * 1000)
    snap = live()
    # The baseline: the newest sample a window old (12 000), not the first (1 000).
    assert snap.window_ms == 11_000
    a, b = snap.deployments
    assert (a.deployment, a.circuit, a.successes) == ("a", "closed", 4)
    assert (a.recent_requests, a.recent_errors, a.recent_error_pct) == (0, 0, None)
    assert a.latency_ms == 120.0 and a.ttft_ms == 30.0
    assert (b.circuit, b.consecutive_failures, b.recent_requests, b.recent_errors) == (
        "open", 3, 3, 3
    )  # fmt: skip
    assert b.recent_error_pct == 100.0 and b.latency_ms is None and b.in_cooldown
    # The cooldown's end as a wall-clock time: 4.5 s after the snapshot.
    assert b.cooldown_until_ms == snap.taken_ms + 4_500 and snap.taken_ms >= before
    assert [d.deployment for d in snap.in_cooldown()] == ["b"]
    assert list(snap.by_deployment()) == ["a", "b"]
    clock.ms = 27_500  # the cooldown is over: half-open, until a probe succeeds
    assert live().deployments[1].circuit == "half_open"
    # Samples older than the baseline are forgotten.
    live.sample()
    assert [at for at, _ in live._samples] == [12_000, 27_500]
    # A replaced router (the gateway's reset_routing) counts from its own start.
    router2 = Router([DeploymentSpec(name="a"), DeploymentSpec(name="b")])
    router2.on_start(0, clock.ms)
    router2.on_success(0, clock.ms, 10.0)
    live._routers = lambda: {"m": router2}
    a2 = live().deployments[0]
    assert (a2.successes, a2.recent_requests, a2.circuit, a2.ttft_ms) == (1, 1, "closed", None)


def test_live_routing_refuses_a_bad_window() -> None:
    with pytest.raises(ValueError):
        LiveRouting(lambda: {}, Clock(), window_ms=0)


def test_merged_routing_reads_the_other_workers_fresh_files(tmp_path: Path) -> None:
    """Worker 1's provider merges the snapshots workers 2 and 3 publish (3's too old: left
    out; an unreadable file: skipped). Worst circuit, counts summed, latency weighted."""
    clock = Clock()
    r1 = Router([DeploymentSpec(name="a"), DeploymentSpec(name="b")])
    r2 = Router([DeploymentSpec(name="a"), DeploymentSpec(name="b")])
    w1 = LiveRouting(lambda: {"m": r1}, clock, worker=1, workers=3)
    w2 = LiveRouting(lambda: {"m": r2}, clock, worker=2, workers=3)
    r1.on_start(0, clock.ms)
    r1.on_success(0, clock.ms, 100.0)
    for _ in range(3):
        r2.on_start(0, clock.ms)
        r2.on_success(0, clock.ms, 200.0)
    for _ in range(3):  # b opens in worker 2 only
        r2.on_start(1, clock.ms)
        r2.on_failure(1, clock.ms)
    r2.on_start(0, clock.ms)  # one in flight
    (tmp_path / "routing-worker-2-100.json").write_bytes(msgspec.json.encode(w2()))
    old = msgspec.structs.replace(w2(), worker=3, taken_ms=int(time.time() * 1000) - 60_000)
    (tmp_path / "routing-worker-3-101.json").write_bytes(msgspec.json.encode(old))
    (tmp_path / "routing-worker-4-102.json").write_bytes(b"{half a file")
    (tmp_path / "worker-2-100.json").write_bytes(b"{}")  # the metrics' snapshot: not ours
    snap = MergedRouting(w1, tmp_path)()
    assert (snap.worker, snap.workers, snap.merged) == (1, 3, [1, 2])
    a, b = sorted(snap.deployments, key=lambda d: d.deployment)
    assert (a.circuit, a.successes, a.in_flight, a.seen_in, a.cooling_in) == (
        "closed", 4, 1, 2, 0
    )  # fmt: skip
    assert a.latency_ms == pytest.approx((100.0 * 1 + 200.0 * 3) / 4)
    assert (b.circuit, b.cooling_in, b.seen_in, b.consecutive_failures, b.recent_errors) == (
        "open", 1, 2, 3, 3
    )  # fmt: skip
    assert b.cooldown_until_ms is not None
    # Alone (no other file) it is worker 1's own snapshot.
    assert MergedRouting(w1, tmp_path / "none")().merged == [1]


async def test_a_worker_publishes_until_closed(tmp_path: Path) -> None:
    import asyncio

    router = Router([DeploymentSpec(name="a")])
    live = LiveRouting(lambda: {"m": router}, Clock(), worker=2, workers=2)
    path = live.publish_to(tmp_path, every_ms=20)
    assert path.name == f"routing-worker-2-{os.getpid()}.json"
    first = msgspec.json.decode(path.read_bytes(), type=RoutingSnapshot)  # written at once
    assert (first.worker, [d.deployment for d in first.deployments]) == (2, ["a"])
    assert first.deployments[0].in_flight == 0
    router.on_start(0, 1_000)
    await asyncio.sleep(0.1)
    later = msgspec.json.decode(path.read_bytes(), type=RoutingSnapshot)
    assert later.deployments[0].in_flight == 1  # published again
    live.close()
    path.unlink()
    await asyncio.sleep(0.1)
    assert not path.exists() and live._timer is None and live._publisher is None


# -- the pages with a given snapshot, and without a provider -----------------------------------


def _snapshot(circuit: str) -> RoutingSnapshot:
    now = int(time.time() * 1000)
    return RoutingSnapshot(
        taken_ms=now,
        worker=1,
        workers=2,
        window_ms=300_000,
        deployments=[
            DeploymentLive(
                model="gpt-4o-mini", deployment="mock-a/gpt-4o-mini", circuit=circuit,  # type: ignore[arg-type]
                cooldown_until_ms=None if circuit == "closed" else now + 4_200,
                cooldown_ms=5_000, consecutive_failures=0 if circuit == "closed" else 3,
                probing=False, in_flight=2, latency_ms=812.4, ttft_ms=None,
                recent_requests=10, recent_errors=4, successes=6, failures=4,
                cooling_in=0 if circuit == "closed" else 1, seen_in=2,
            )
        ],
        merged=[1, 2],
    )  # fmt: skip


MakeClient = Callable[[str], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def with_provider(world: World) -> AsyncIterator[MakeClient]:
    """`await with_provider(circuit)`: a read client of an admin app whose provider returns
    `_snapshot(circuit)`."""
    state = {"circuit": "open"}
    app = build_admin_app(world.db, routing_state=lambda: _snapshot(state["circuit"]))
    server = TestServer(app)
    await server.start_server()
    clients: list[TestClient[Any, Any]] = []

    async def make(circuit: str) -> TestClient[Any, Any]:
        state["circuit"] = circuit
        c: TestClient[Any, Any] = TestClient(server)
        await c.start_server()
        clients.append(c)
        page = await c.get("/console/signin")
        resp = await c.post("/console/signin", allow_redirects=False, data={
            "csrf": csrf_of(await page.text()), "name": ROLE_USER["read"], "password": PASSWORD,
        })  # fmt: skip
        assert resp.status == 303
        return c

    try:
        yield make
    finally:
        for c in clients:
            await c._session.close()
        await server.close()


async def test_pages_with_a_live_snapshot(with_provider: Any) -> None:
    read = await with_provider("open")
    page = await (await read.get("/console/routing")).text()
    row = live_rows(page)[("gpt-4o-mini", "mock-a/gpt-4o-mini")]
    assert (row["circuit"], row["in-flight"], row["recent-requests"], row["recent-errors"]) == (
        "open", "2", "10", "4"
    )  # fmt: skip
    assert "open (cooling down)" in page and "(in 5 s)" in page  # 4.2 s, rounded up
    assert "40.0%" in page and ">812<" in page
    assert 'data-worker="1" data-workers="2" data-merged="1 2"' in page
    assert "Merged from the routers of 2 of 2 workers" in page and "in 1 of 2 workers" in page
    assert 'id="live-unavailable"' not in page
    assert '<section id="live-routing" data-refresh="5">' in page  # console.js refreshes it
    home = await (await read.get("/console/")).text()
    found = [t for k, t in alerts(home) if k == "cooldown"]
    assert len(found) == 1 and "mock-a/gpt-4o-mini" in found[0] and "3 consecutive" in found[0]
    assert found[0].endswith("In 1 of 2 workers.")
    assert 'href="/console/routing"' in home
    # Closed: no alert.
    read = await with_provider("closed")
    home = await (await read.get("/console/")).text()
    assert [k for k, _ in alerts(home) if k == "cooldown"] == []
    page = await (await read.get("/console/routing")).text()
    assert live_rows(page)[("gpt-4o-mini", "mock-a/gpt-4o-mini")]["circuit"] == "closed"


async def test_pages_in_chinese_with_a_live_snapshot(with_provider: Any, world: World) -> None:
    with sqlite3.connect(world.db) as conn:
        conn.execute("UPDATE console_users SET lang = 'zh-CN' WHERE name = ?", (ROLE_USER["read"],))
    read = await with_provider("half_open")
    home = await (await read.get("/console/")).text()
    assert "处于半开状态" in home
    page = await (await read.get("/console/routing")).text()
    assert "半开（下一个请求将探测）" in page and "实时状态" in page


async def test_without_a_provider_the_page_says_so(console_client: Any) -> None:
    read = await console_client("read")
    page = await (await read.get("/console/routing")).text()
    assert 'id="live-unavailable"' in page and "Live state not available" in page
    assert live_rows(page) == {}
    home = await (await read.get("/console/")).text()
    assert [k for k, _ in alerts(home) if k == "cooldown"] == []


async def test_a_failing_provider_is_no_error_page(world: World) -> None:
    def broken() -> RoutingSnapshot:
        raise RuntimeError("boom")

    server = TestServer(build_admin_app(world.db, routing_state=broken))
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    try:
        page = await client.get("/console/signin")
        resp = await client.post("/console/signin", data={
            "csrf": csrf_of(await page.text()), "name": ROLE_USER["read"], "password": PASSWORD,
        })  # fmt: skip
        assert resp.status == 200
        resp = await client.get("/console/routing")
        assert resp.status == 200 and 'id="live-unavailable"' in await resp.text()
        assert (await client.get("/console/")).status == 200
    finally:
        await client.close()


# -- end to end: tokenhub serve, a failing upstream, the console -------------------------------


class Flaky:
    """A mock upstream that answers 500 while `failing`."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    def app(self) -> web.Application:
        app = mock_app(MockOptions())

        @web.middleware
        async def fail(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path.startswith("/v1/chat"):
                self.calls += 1
                if self.failing:
                    return web.json_response({"error": {"message": "down"}}, status=500)
            return await handler(request)

        app.middlewares.append(fail)
        return app


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _config(tmp: Path, db: str, port: int, admin: int, flaky: str, steady: str) -> Path:
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
database = "{db}"
journal_dir = "{tmp / "journal"}"

[admin]
listen = "127.0.0.1:{admin}"

[[providers]]
name = "flaky"
base_url = "{flaky}/v1"

[[providers]]
name = "steady"
base_url = "{steady}/v1"

[[models]]
id = "gpt-4o-mini"
  [[models.deployments]]
  provider = "flaky"
  upstream_model = "gpt-4o-mini"
  name = "flaky"
  [[models.deployments]]
  provider = "steady"
  upstream_model = "gpt-4o-mini"
  name = "steady"
  weight = 0
"""
    path = tmp / "tokenhub.toml"
    path.write_text(text, encoding="utf-8")
    return path


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


class Served:
    """`tokenhub serve` (a subprocess) with its console: `web` is a client signed in as
    read, `chat()` a chat completion (a new opening each time: the model's prefix affinity
    would keep a repeated one on the deployment that answered it, ahead of any probe)."""

    def __init__(self, web_: aiohttp.ClientSession, gateway: str, secret: str) -> None:
        self.web = web_
        self.gateway = gateway
        self.secret = secret
        self.asked = 0

    async def chat(self) -> str:
        """The serving worker's number ("" for a single process)."""
        self.asked += 1
        # A connection per request: under --workers N the kernel spreads them (SO_REUSEPORT).
        body = {"model": "gpt-4o-mini", "max_tokens": 4,
                "messages": [{"role": "user", "content": f"question {self.asked}"}]}  # fmt: skip
        auth = {"Authorization": f"Bearer {self.secret}"}
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c,
            c.post(self.gateway + "/v1/chat/completions", headers=auth, json=body) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return resp.headers.get("x-tokenhub-worker", "")

    async def page(self, path: str) -> str:
        resp = await self.web.get(path)
        assert resp.status == 200, path
        return await resp.text()

    async def routing(self, deployment: str = "flaky") -> dict[str, str]:
        page = await self.page("/console/routing")
        assert 'id="live-unavailable"' not in page, page
        return live_rows(page)[("gpt-4o-mini", deployment)]


@contextlib.asynccontextmanager
async def served(
    world: World, tmp: Path, flaky: str, steady: str, *args: str
) -> AsyncIterator[Served]:
    port, admin_port = free_port(), free_port()
    config = _config(tmp, world.db, port, admin_port, flaky, steady)
    out, err = tmp / "serve.out", tmp / "serve.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [TOKENHUB, "serve", "--config", str(config), *args],
            stdout=o, stderr=e, start_new_session=True,
            env={**os.environ, "TOKENHUB_LOG_LEVEL": "WARNING"},
        )  # fmt: skip
    jar = aiohttp.CookieJar(unsafe=True)  # cookies from 127.0.0.1
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{admin_port}", cookie_jar=jar) as w:

            async def up() -> bool:
                assert proc.poll() is None, err.read_text()
                if "serving on" not in out.read_text():
                    return False
                try:
                    return (await w.get("/console/signin")).status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await _until(up, 20.0, "tokenhub serve and its console")
            page = await w.get("/console/signin")
            resp = await w.post("/console/signin", allow_redirects=False, data={
                "csrf": csrf_of(await page.text()), "name": ROLE_USER["read"],
                "password": PASSWORD,
            })  # fmt: skip
            assert resp.status == 303, await resp.text()
            yield Served(w, f"http://127.0.0.1:{port}", world.secrets["acme"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[Flaky, str, str]]:
    """The flaky upstream (failing until told otherwise) and a steady one: (flaky, urls)."""
    flaky = Flaky()
    r1, flaky_url = await _serve(flaky.app())
    r2, steady_url = await _serve(mock_app(MockOptions()))
    try:
        yield flaky, flaky_url, steady_url
    finally:
        await r1.cleanup()
        await r2.cleanup()


async def test_a_failing_deployment_opens_then_closes_in_the_console(
    world: World, tmp_path: Path, upstreams: tuple[Flaky, str, str]
) -> None:
    flaky, flaky_url, steady_url = upstreams
    async with served(world, tmp_path, flaky_url, steady_url) as s:
        assert (await s.routing())["circuit"] == "closed"
        for _ in range(3):  # each fails over to steady; the third failure opens flaky
            await s.chat()
        assert flaky.calls == 3
        row = await s.routing()
        assert (row["circuit"], row["consecutive-failures"]) == ("open", "3"), row
        assert (row["recent-requests"], row["recent-errors"]) == ("3", "3"), row
        until = int(row["cooldown-until-ms"])
        assert 0 < until - time.time() * 1000 <= COOLDOWN_S * 1000 + 500
        cooling = [t for k, t in alerts(await s.page("/console/")) if k == "cooldown"]
        assert len(cooling) == 1 and "flaky" in cooling[0] and "cooldown" in cooling[0]
        await s.chat()  # while open: straight to steady, flaky untouched
        assert flaky.calls == 3
        # The upstream recovers; once the cooldown is over the next request probes it.
        flaky.failing = False

        async def half_open() -> bool:
            return (await s.routing())["circuit"] == "half_open"

        await _until(half_open, COOLDOWN_S + 2.0, "the cooldown to end")
        await s.chat()
        assert flaky.calls == 4
        row = await s.routing()
        assert (row["circuit"], row["consecutive-failures"]) == ("closed", "0"), row
        assert [k for k, _ in alerts(await s.page("/console/")) if k == "cooldown"] == []


async def test_with_two_workers_the_console_merges_both_routers(
    world: World, tmp_path: Path, upstreams: tuple[Flaky, str, str]
) -> None:
    """Under --workers 2 the console (worker 1) counts the requests worker 2 routed too."""
    flaky, flaky_url, steady_url = upstreams
    flaky.failing = False
    async with served(world, tmp_path, flaky_url, steady_url, "--workers", "2") as s:
        seen: list[str] = []
        while len(set(seen)) < 2:  # until both workers served (each new connection: 1/2)
            assert len(seen) < 40, seen
            seen.append(await s.chat())
        assert set(seen) == {"1", "2"}

        async def merged() -> bool:
            page = await s.page("/console/routing")
            tag = re.search(r'<p [^>]*id="live-source"[^>]*>', page)
            assert tag is not None
            src = dict(_ATTR.findall(tag[0]))
            row = live_rows(page)[("gpt-4o-mini", "flaky")]
            return src["merged"] == "1 2" and row["recent-requests"] == str(len(seen))

        await _until(merged, 5.0, "worker 2's published state in worker 1's console")
        page = await s.page("/console/routing")
        assert "2 of 2 workers" in page
        assert live_rows(page)[("gpt-4o-mini", "flaky")]["seen-in"] == "2"
