"""Clients that hold connections without sending requests (issue 11, item 8), against a real
`tokenhub serve` process and raw sockets: 2,000 connections that stop halfway through their
headers are answered 408 and closed after server.header_timeout_s while a real request is
served; an idle connection is closed after server.keepalive_timeout_s; past
server.max_connections a new connection gets a 503 at once, and requests are served again as
soon as connections close."""

from __future__ import annotations

import json
import resource
import selectors
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_until
from procs import Proc, Procs, Site, no_traceback, open_site, write_config

PARTIAL = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer th-"
SLOW_CLIENTS = 2000


@pytest.fixture
def site(tmp_path: Path, mock: str) -> Iterator[Site]:
    with open_site(tmp_path, mock, "acme") as s:
        yield s


def start(procs: Procs, site: Site, server: str) -> Proc:
    """The gateway of `site` with `server` lines added to its [server] table."""
    port = int(site.base.rsplit(":", 1)[1])
    write_config(site.tmp, port, site.tmp / "hub.db", site.mock, extra=server)
    gw = procs.start("gateway", "serve", "--config", str(site.config))
    gw.wait_serving()
    return gw


def chat(site: Site, timeout: float = 10.0) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(
        site.url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {site.secret}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        json.loads(resp.read())
        return int(resp.status)


def metric(site: Site, state: str) -> float:
    with urllib.request.urlopen(site.base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    line = f'tokenhub_connections{{state="{state}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


def connect(site: Site) -> socket.socket:
    port = int(site.base.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(socks: list[socket.socket], timeout: float) -> dict[socket.socket, bytes]:
    """What each socket receives until the server closes it (then it is closed here too);
    AssertionError on `timeout`."""
    got = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            assert left > 0, f"{len(sel.get_map())} of {len(socks)} connections still open"
            for key, _ in sel.select(min(left, 1.0)):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    got[s] += chunk
                else:
                    sel.unregister(s)
                    s.close()
    finally:
        sel.close()
    return got


def test_slow_headers_are_cut_off_without_denying_service(procs: Procs, site: Site) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(hard, 1 << 20) < SLOW_CLIENTS + 200:
        pytest.skip(f"needs {SLOW_CLIENTS + 200} file descriptors (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, SLOW_CLIENTS + 200), hard))
    gw = start(procs, site, "header_timeout_s = 2\nkeepalive_timeout_s = 30\n")
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW_CLIENTS):
            s = connect(site)
            s.sendall(PARTIAL)
            slow.append(s)
        t0 = time.perf_counter()
        assert chat(site) == 200  # served beside 2,000 half-open requests
        served_s = time.perf_counter() - t0
        got = read_until_closed(slow, timeout=60.0)
        # Each was answered 408 (the header timeout, not the 30 s keep-alive's silent close),
        # with a request id of its own.
        ids = set()
        for data in got.values():
            assert data.startswith(b"HTTP/1.1 408 "), data
            head, _, body = data.partition(b"\r\n\r\n")
            assert json.loads(body)["error"]["code"] == "request_timeout"
            ids.add(head.partition(b"x-request-id: ")[2].partition(b"\r\n")[0])
        assert len(ids) == SLOW_CLIENTS
        assert metric(site, "header_timeout") == SLOW_CLIENTS
        print(f"a request beside {SLOW_CLIENTS} slow clients: {served_s * 1000:.0f} ms")
    finally:
        for s in slow:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert chat(site) == 200
    assert gw.stop() == 0
    no_traceback(gw)


def test_idle_connections_are_closed_after_the_keepalive_timeout(procs: Procs, site: Site) -> None:
    gw = start(procs, site, "keepalive_timeout_s = 1\n")
    silent = connect(site)  # connects and never sends
    served = connect(site)  # one request, then idle on a keep-alive connection
    served.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    got = read_until_closed([silent, served], timeout=8.0)
    assert got[silent] == b""
    assert got[served].startswith(b"HTTP/1.1 200 "), got[served]
    assert b"connection: close" not in got[served].lower()  # kept alive, then timed out
    assert gw.stop() == 0


def test_connections_over_the_cap_are_refused_at_once(procs: Procs, site: Site) -> None:
    cap = 20
    gw = start(procs, site, f"max_connections = {cap}\n")
    held = [connect(site) for _ in range(cap)]
    try:
        extra = connect(site)
        extra.settimeout(5.0)  # no waiting: the answer comes with the accept
        data = b""
        while chunk := extra.recv(65536):
            data += chunk
        extra.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), data
        assert b"\r\nServer: tokenhub\r\n" in head and b"\r\nretry-after: 1\r\n" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for s in held[: cap // 2]:
            s.close()
    # Room again as soon as connections close.
    assert wait_until(lambda: _served(site), 10.0, what="a request after connections closed")
    assert metric(site, "refused") >= 1
    for s in held[cap // 2 :]:
        s.close()
    assert gw.stop() == 0
    no_traceback(gw)


def _served(site: Site) -> bool:
    try:
        return chat(site, timeout=5.0) == 200
    except OSError:
        return False
