"""The admin listener of a real `tokenhub serve`: on its own address (127.0.0.1 by default),
in the single process or worker 1 only, with tokens made by `tokenhub admin-tokens`, over the
same database as the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tokenhub.config import AdminSettings, ConfigError, from_mapping

TOKENHUB = str(Path(sys.executable).with_name("tokenhub"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKENHUB, *args], capture_output=True, text=True, timeout=60)


def _config(tmp: Path, db: Path, admin: str | None) -> Path:
    text = f"""
[server]
host = "127.0.0.1"
port = {_free_port()}
database = "{db}"
journal_dir = "{tmp / "journal"}"
"""
    if admin is not None:
        text += f'\n[admin]\nlisten = "{admin}"\n'
    text += """
[[providers]]
name = "mock"
base_url = "http://127.0.0.1:9/v1"

[[models]]
id = "m"
  [[models.deployments]]
  provider = "mock"
  upstream_model = "m"
  vocab = "cl100k_base"
"""
    path = tmp / "tokenhub.toml"
    path.write_text(text, encoding="utf-8")
    return path


class Server:
    def __init__(self, tmp: Path, config: Path, *extra: str) -> None:
        self.out, self.err = tmp / "serve.out", tmp / "serve.err"
        env = {**os.environ, "TOKENHUB_LOG_LEVEL": "WARNING"}
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen(
                [TOKENHUB, "serve", "--config", str(config), *extra],
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )

    def wait(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out.read_text(errors="replace"):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r}:\n{self.err.read_text(errors='replace')}")
            time.sleep(0.05)

    def wait_serving(self) -> None:
        """Until the gateway answers a request: it has then installed its SIGTERM handler
        (it prints "serving on" just before), so stop() is a clean shutdown."""
        self.wait("serving on")
        found = re.search(r"serving on (http://\S+/v1)", self.out.read_text())
        assert found is not None
        with contextlib.suppress(urllib.error.HTTPError):  # any answer will do
            urllib.request.urlopen(f"{found.group(1)}/models", timeout=10).close()

    def stop(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(30)
        finally:
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


def _request(
    url: str, token: str | None = None, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _listeners(port: int) -> set[str]:
    """The local addresses something listens on at `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                if name == "tcp":
                    found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.add(addr)
    return found


def test_the_default_listener_is_loopback_and_bad_addresses_are_refused() -> None:
    assert AdminSettings().listen == "127.0.0.1:8081"
    assert from_mapping({}).admin.listen == "127.0.0.1:8081"
    assert from_mapping({"admin": {"listen": ""}}).admin.listen == ""  # off
    assert from_mapping({"admin": {"listen": "[::1]:9"}}).admin.listen == "[::1]:9"
    for bad in ("8081", "localhost", "127.0.0.1:99999", "::1:80", ":80"):
        with pytest.raises(ConfigError, match=r"admin\.listen"):
            from_mapping({"admin": {"listen": bad}})


def test_serve_runs_the_admin_api_on_loopback_over_the_clis_database(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    made = _cli("admin-tokens", "create", "ops", "--scope", "admin", "--json", "--db", str(db))
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert "cannot show it again" in made.stderr
    listed = _cli("admin-tokens", "list", "--db", str(db))
    assert token["id"] in listed.stdout and token["secret"] not in listed.stdout
    port = _free_port()
    server = Server(tmp_path, _config(tmp_path, db, f"127.0.0.1:{port}"))
    try:
        server.wait_serving()
        assert f"admin API on http://127.0.0.1:{port}/admin/v1" in server.out.read_text()
        assert _listeners(port) == {"127.0.0.1"}
        base = f"http://127.0.0.1:{port}/admin/v1"
        assert _request(f"{base}/health")[0] == 200
        status, tenant = _request(f"{base}/tenants", token["secret"], {"name": "acme"})
        assert status == 201, tenant
        # The CLI sees what the API made (one database, one service layer).
        cli = _cli("tenants", "list", "--json", "--db", str(db))
        assert [t["id"] for t in json.loads(cli.stdout)] == [tenant["id"]]
        # Revoked with the CLI: refused at once (tokens are checked on every request).
        assert _cli("admin-tokens", "revoke", token["id"], "--db", str(db)).returncode == 0
        status, body = _request(f"{base}/tenants", token["secret"])
        assert status == 401 and body["error"]["code"] == "invalid_admin_token"
        again = _cli("admin-tokens", "revoke", token["id"], "--db", str(db))
        assert again.returncode == 2 and "already revoked" in again.stderr
    finally:
        assert server.stop() == 0


def test_with_workers_only_worker_1_listens_and_empty_listen_turns_it_off(
    tmp_path: Path,
) -> None:
    db = tmp_path / "hub.db"
    port = _free_port()
    server = Server(tmp_path, _config(tmp_path, db, f"127.0.0.1:{port}"), "--workers", "2")
    try:
        server.wait_serving()
        deadline = time.monotonic() + 10
        while not _listeners(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _listeners(port) == {"127.0.0.1"}
        assert _request(f"http://127.0.0.1:{port}/admin/v1/health")[0] == 200
    finally:
        assert server.stop() == 0
    # A second worker binding the same address would have warned that it could not.
    assert "admin API not started" not in server.err.read_text()

    off = tmp_path / "off"
    off.mkdir()
    port = _free_port()
    config = _config(off, off / "hub.db", "")
    server = Server(off, config)
    try:
        server.wait_serving()
        assert "admin API" not in server.out.read_text()
    finally:
        assert server.stop() == 0
