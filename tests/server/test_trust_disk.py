"""A real `tokenhub serve` whose disk fills up or turns read-only: it refuses what it could not
record (503 journal_unavailable, nothing sent upstream, /healthz unhealthy), recovers by itself,
loses no served request to kill -9, and stops at once on a database it cannot write."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, http_json, wait_until
from procs import Procs, event_ids, open_site, write_config

from tokenhub.store import open_store


def _post(base: str, secret: str) -> tuple[int, dict[str, str], Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _mock_requests(mock: str) -> int:
    return int(http_json(mock + "/mock/ledger")["totals"]["requests"])


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a real disk that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    chunk = b"\xff" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    # The last bytes: the filesystem must be completely full.
    with open(path, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xff" * 512)


def test_a_full_disk_refuses_before_upstream_and_loses_nothing(
    small_disk: Path, mock: str, procs: Procs
) -> None:
    http_json(mock + "/mock/reset", method="POST")
    db = small_disk / "hub.db"
    store = open_store(str(db))
    store.migrate()
    store.create_tenant("acme")
    _, secret = store.create_key("acme")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Small segments, so that the next one is needed after a few dozen requests.
    config = write_config(small_disk, port, db, mock, extra="journal_segment_bytes = 16384")
    gw = procs.start("serve", "serve", "--config", str(config))
    gw.wait_serving()
    served: list[str] = []
    for _ in range(5):
        status, headers, _body = _post(base, secret)
        assert status == 200
        served.append(headers["x-request-id"])

    filler = small_disk / "filler"
    _fill(filler)
    refused: tuple[dict[str, str], Any] | None = None
    for _ in range(400):  # a 16 KiB segment holds a few dozen requests
        status, headers, body = _post(base, secret)
        if status == 200:
            served.append(headers["x-request-id"])  # its begin had room kept in the segment
            continue
        assert status == 503, body
        refused = (headers, body)
        break
    assert refused is not None, "the gateway never refused on a full disk"
    headers, body = refused
    assert body["error"]["code"] == "journal_unavailable", body
    assert body["error"]["type"] == "server_error"
    assert headers.get("Retry-After") == "1"
    upstream = _mock_requests(mock)
    assert upstream == len(served)  # the refused request never went upstream
    for _ in range(5):
        status, _, body = _post(base, secret)
        assert status == 503 and body["error"]["code"] == "journal_unavailable"
    assert _mock_requests(mock) == upstream
    status, raw = _get(base + "/healthz")
    health = json.loads(raw)
    assert status == 503 and health["status"] == "unavailable", health
    assert "journal" in health["reason"], health
    _, metrics = _get(base + "/metrics")
    assert re.search(rb'tokenhub_usage_sink\{[^}]*name="unavailable"[^}]*\} 1\b', metrics)
    assert re.search(rb'tokenhub_usage_sink\{[^}]*name="refused"[^}]*\} [1-9]', metrics)

    filler.unlink()  # space returns: no restart, no request needed to notice
    wait_until(lambda: _get(base + "/healthz")[0] == 200, 10.0, what="/healthz to recover")
    for _ in range(3):
        status, headers, _body = _post(base, secret)
        assert status == 200
        served.append(headers["x-request-id"])
    assert _mock_requests(mock) == len(served)

    gw.kill_group()  # kill -9: whatever was not in the database yet is in the journal
    gw = procs.start("serve-again", "serve", "--config", str(config))
    gw.wait_serving()
    wait_until(lambda: set(served) <= event_ids(store), 20.0, what="every served request's usage")
    stored = {e.request_id: e for e in store.iter_events() if e.request_id in set(served)}
    assert all(e.status == 200 for e in stored.values()), stored
    assert gw.stop() == 0
    store.close()


def _chattr(flag: str, path: Path) -> bool:
    r = subprocess.run(["chattr", flag, str(path)], capture_output=True)
    return r.returncode == 0


def test_a_read_only_database_recovers_and_stops_at_once(
    tmp_path: Path, mock: str, procs: Procs
) -> None:
    """The database file is immutable (chattr +i: read-only even for root): the gateway
    starts and serves (the journal holds the usage), writes resume by themselves when the
    file is writable again, and a stop while it is read-only does not wait for it."""
    with open_site(tmp_path, mock, "acme") as site:
        db = tmp_path / "hub.db"
        if not _chattr("+i", db):
            pytest.skip("chattr +i is not supported on this filesystem")
        try:
            gw = procs.start("serve", "serve", "--config", str(site.config))
            gw.wait_serving()
            first = []
            for _ in range(4):
                status, headers, _body = _post(site.base, site.secret)
                assert status == 200
                first.append(headers["x-request-id"])
            assert not set(first) & event_ids(site.store)
            assert _chattr("-i", db)
            wait_until(lambda: set(first) <= event_ids(site.store), 15.0, what="writes to resume")

            assert gw.stop() == 0

            # Read-only again, for a new process: a stop does not wait for the database.
            assert _chattr("+i", db)
            gw = procs.start("serve-ro", "serve", "--config", str(site.config))
            gw.wait_serving()
            second = []
            for _ in range(3):
                status, headers, _body = _post(site.base, site.secret)
                assert status == 200
                second.append(headers["x-request-id"])
            t = time.monotonic()
            assert gw.stop(timeout=30) == 0
            took = time.monotonic() - t
            assert took < 10, f"stopping took {took:.1f} s"
        finally:
            _chattr("-i", db)
        assert not set(second) & event_ids(site.store)
        gw = procs.start("serve-again", "serve", "--config", str(site.config))
        gw.wait_serving()
        wait_until(lambda: set(second) <= event_ids(site.store), 15.0, what="the replay")
        assert gw.stop() == 0


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_a_stopped_settler_never_blocks_the_gateways_writes(
    tmp_path: Path, mock: str, procs: Procs
) -> None:
    """A settler following a database with a long settled history is stopped (SIGSTOP): the
    gateway's usage writes go on, and it never logs "database is locked". (Before, every pass
    scanned the whole history under SQLite's write lock: a settler stopped then held it.)"""
    with open_site(tmp_path, mock, "acme") as site:
        db = tmp_path / "hub.db"
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 200000) "
            "INSERT INTO usage_events (request_id, ts_ms, tenant, key_id, endpoint, model, "
            "deployment, provider, upstream_model, stream, input_tokens, cached_input_tokens, "
            "output_tokens, source, status, error, latency_ms, attempts, settled_ms) "
            "SELECT printf('hist_%09d', i), i, 'acme', 'k', 'chat.completions', 'gpt-4o-mini', "
            "'', 'mock', 'gpt-4o-mini', 0, 10, 0, 10, 'upstream', 200, '', 1.0, 1, i FROM c"
        )
        conn.execute(
            "INSERT INTO settlements SELECT request_id, 'x', 'txn_' || request_id, ts_ms "
            "FROM usage_events"
        )
        conn.close()
        gw = procs.start("serve", "serve", "--config", str(site.config))
        gw.wait_serving()
        settler = procs.start("settler", "billing", "settle", "--follow", "0.05", "--db", str(db))
        wait_until(lambda: _cpu_ticks(settler.pid) >= 20, 30.0, what="the settler to run")
        os.kill(settler.pid, signal.SIGSTOP)
        try:
            ids = []
            for _ in range(10):
                status, headers, _body = _post(site.base, site.secret)
                assert status == 200
                ids.append(headers["x-request-id"])
            wait_until(lambda: set(ids) <= event_ids(site.store), 15.0, what="the usage")
        finally:
            os.kill(settler.pid, signal.SIGCONT)
        assert "database is locked" not in gw.stderr(), gw.stderr()
        assert gw.stop() == 0
