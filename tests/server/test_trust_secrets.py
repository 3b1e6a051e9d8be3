"""No secret leaves the gateway (issue 11, item 7), checked on a real `tokenhub serve` process:
a tenant's key followed by a control byte, a bare CR or bytes that are not UTF-8 (answered
by aiohttp's parser before any handler runs), and a provider's key quoted back by the upstream
in an error, reach no response body, no log line, no metric, no database or journal file and no
process's command line; the settler does not inherit the providers' keys; the demo key is
taken from a file or the environment, never argv. Every error is OpenAI-shaped JSON and the
Server header names no version."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import LoopThread, _serve, free_port, wait_until
from procs import Proc, Procs, children, mock_process, no_traceback

from tokenhub.store import open_store

UPSTREAM_ENV = "TOKENHUB_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-upstream-DO-NOT-LEAK-0123456789abcdef"


# -- a provider that quotes the key it was sent ----------------------------------------------


def echo_app() -> web.Application:
    """An upstream that refuses every request with a 401 quoting the credential it got, as
    some providers' error messages do."""

    async def chat(request: web.Request) -> web.StreamResponse:
        got = request.headers.get("Authorization", "").removeprefix("Bearer ")
        asked = await request.json()
        said = f"Your key {got} works."
        if asked.get("stream"):
            # A stream whose text, then whose error event, quote the key.
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "echo",
                     "choices": [{"index": 0, "delta": {"content": said}}]}  # fmt: skip
            await out.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            err = {"error": {"message": f"Quota gone for key {got}.", "type": "server_error"}}
            await out.write(b"data: " + json.dumps(err).encode() + b"\n\n")
            await out.write_eof(b"data: [DONE]\n\n")
            return out
        if asked["messages"][0]["content"] == "quote":
            # A completion that quotes the key (a 200, not an error).
            return web.json_response(
                {"id": "c2", "object": "chat.completion", "model": "echo",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": said},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}
            )  # fmt: skip
        body = {
            "error": {
                "message": f"Incorrect API key provided: {got}. Check it.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[str]:
    thread = LoopThread()
    runner, base = thread.call(_serve(echo_app()))
    try:
        yield base
    finally:
        thread.call(runner.cleanup())
        thread.close()


# -- raw HTTP ---------------------------------------------------------------------------------


def raw(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Everything the server sends back to `request` (with Connection: close) until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def parse(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def check_error(response: bytes, status: int, *secrets: str) -> dict[str, Any]:
    """An OpenAI-shaped error with this status, a request id, no version, no secret."""
    for s in secrets:
        assert s.encode() not in response, response
    got, headers, body = parse(response)
    assert got == status, response
    assert headers["content-type"].startswith("application/json"), headers
    assert headers["server"] == "tokenhub", headers
    assert headers["x-request-id"].startswith("req_"), headers
    err: dict[str, Any] = body["error"]
    assert {"message", "type", "code"} <= set(err), body
    return err


def assert_nowhere(secrets: list[str], files: list[Path]) -> None:
    for path in files:
        data = path.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"{s[:6]}... found in {path}"


def process_tree(pid: int) -> list[int]:
    tree = [pid]
    for p in children(pid):
        tree += process_tree(p)
    return tree


def proc_file(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone since
        return b""


# -- the tests --------------------------------------------------------------------------------


def write_config(tmp: Path, port: int, mock: str, echo: str) -> Path:
    config = tmp / "tokenhub.toml"
    config.write_text(
        f"""
[server]
port = {port}
database = "{tmp / "hub.db"}"
journal_dir = "{tmp / "journal"}"
key_refresh_s = 0.2

[billing]
settle_interval_s = 1

[[providers]]
name = "mock"
base_url = "{mock}/v1"

[[providers]]
name = "echo"
base_url = "{echo}/v1"
api_key_env = "{UPSTREAM_ENV}"

[[models]]
id = "gpt-4o-mini"
  [[models.deployments]]
  provider = "mock"
  upstream_model = "gpt-4o-mini"
  vocab = "cl100k_base"

[[models]]
id = "echo"
  [[models.deployments]]
  provider = "echo"
  upstream_model = "echo"
  vocab = "cl100k_base"
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mock_process(tmp_path_factory.mktemp("mock"), "--model", "gpt-4o-mini") as base:
        yield base


def test_no_secret_in_bodies_logs_metrics_database_or_process_list(
    tmp_path: Path, procs: Procs, mock: str, echo_upstream: str
) -> None:
    port = free_port()
    config = write_config(tmp_path, port, mock, echo_upstream)
    store = open_store(str(tmp_path / "hub.db"))
    store.migrate()
    store.create_tenant("acme")
    _, key = store.create_key("acme")
    store.close()
    gw = procs.start(
        "gateway",
        "serve",
        "--config",
        str(config),
        env={UPSTREAM_ENV: UPSTREAM_KEY, "TOKENHUB_LOG_LEVEL": "DEBUG"},
    )
    gw.wait_serving()
    secrets = [key, UPSTREAM_KEY]

    def chat(
        authorization: bytes, model: str = "gpt-4o-mini", text: str = "hi", stream: bool = False
    ) -> bytes:
        messages = [{"role": "user", "content": text}]
        body = json.dumps({"model": model, "messages": messages, "stream": stream})
        return raw(
            port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: " + authorization + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body.encode(),
        )

    # The key then a byte aiohttp's parser refuses: its 400 quoted the whole header line.
    for tail in (b"\x01", b"\x00abc", b"\rabc", b"\x7f\x01"):
        err = check_error(chat(b"Bearer " + key.encode() + tail), 400, *secrets)
        assert err["code"] == "invalid_http_request"
    # Bytes that are not UTF-8: not a key (401), not a 500.
    for tail in (b"\xff", b"\xc3\x28", b"\xed\xa0\x80"):
        err = check_error(chat(b"Bearer " + key.encode() + tail), 401, *secrets)
        assert err["code"] == "invalid_api_key"
    # A request line or header that is not HTTP at all.
    check_error(raw(port, b"GET /v1/models\x01 HTTP/1.1\r\nHost: x\r\n\r\n"), 400, *secrets)

    # The key works, and the provider's key, quoted back in its 401, is scrubbed.
    assert parse(chat(b"Bearer " + key.encode()))[0] == 200
    err = check_error(chat(b"Bearer " + key.encode(), model="echo"), 401, *secrets)
    assert err["code"] == "invalid_api_key"
    assert "[redacted]" in err["message"]
    # ...and so is it in a 200 that quotes it, and in a stream's text and error events.
    for reply in (
        chat(b"Bearer " + key.encode(), model="echo", text="quote"),
        chat(b"Bearer " + key.encode(), model="echo", stream=True),
    ):
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert b"[redacted]" in reply
        for s in secrets:
            assert s.encode() not in reply

    metrics = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"tokenhub_requests_total" in metrics
    for s in secrets:
        assert s.encode() not in metrics

    # Every process of the server: no secret on a command line; the settler has no
    # provider key in its environment (it calls no provider).
    tree = wait_until(
        lambda: t if len(t := process_tree(gw.pid)) > 1 else None, 20.0, what="the settler"
    )
    for pid in tree:
        cmdline = proc_file(pid, "cmdline")
        for s in secrets:
            assert s.encode() not in cmdline, (pid, cmdline)
    assert UPSTREAM_KEY.encode() in proc_file(gw.pid, "environ")  # the gateway needs it
    for pid in tree[1:]:
        environ = proc_file(pid, "environ")
        assert UPSTREAM_KEY.encode() not in environ
        assert UPSTREAM_ENV.encode() not in environ

    assert gw.stop() == 0
    no_traceback(gw)
    assert "refused a malformed request" in gw.stderr()  # the log has the refusals...
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".toml"]
    assert any(p.name.startswith("hub.db") for p in files)
    assert_nowhere(secrets, files)  # ...and no file (logs, database, journal) has a secret


def run_demo(procs: Procs, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    gw = procs.start(
        "demo", "serve", "--demo", "--port", str(port), "--db", str(tmp / "demo.db"), *args,
        env=env,
    )  # fmt: skip
    gw.wait_serving(60.0)
    return gw


def models_status(port: int, key: str) -> int:
    response = raw(
        port,
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {key}\r\n\r\n".encode(),
    )
    return parse(response)[0]


def demo_port(gw: Proc) -> int:
    line = next(x for x in gw.stdout().splitlines() if "serving on" in x)
    return int(line.split("127.0.0.1:")[1].split("/")[0])


def test_demo_key_from_a_file_or_the_environment_never_argv(tmp_path: Path, procs: Procs) -> None:
    key_file = tmp_path / "demo-key"
    file_key = "th-demo-from-a-file-0123456789abcdef"
    key_file.write_text(file_key + "\n", encoding="utf-8")
    gw = run_demo(procs, tmp_path, "--demo-key-file", str(key_file))
    assert models_status(demo_port(gw), file_key) == 200
    tree = wait_until(
        lambda: t if len(t := process_tree(gw.pid)) > 1 else None, 20.0, what="the settler"
    )
    for pid in tree:
        assert file_key.encode() not in proc_file(pid, "cmdline"), pid
    assert gw.stop() == 0

    env_key = "th-demo-from-the-environment-0123456789"
    gw = run_demo(procs, tmp_path, env={"TOKENHUB_DEMO_KEY": env_key})
    assert models_status(demo_port(gw), env_key) == 200
    tree = wait_until(
        lambda: t if len(t := process_tree(gw.pid)) > 1 else None, 20.0, what="the settler"
    )
    for pid in tree[1:]:  # the settler does not inherit it
        assert env_key.encode() not in proc_file(pid, "environ"), pid
    assert gw.stop() == 0


def test_demo_key_on_the_command_line_is_refused(tmp_path: Path, procs: Procs) -> None:
    gw = procs.start(
        "demo", "serve", "--demo", "--db", str(tmp_path / "demo.db"), "--demo-key", "th-x" * 10
    )
    assert gw.popen.wait(30) != 0
    err = gw.stderr().strip()
    assert len(err.splitlines()) == 1 and "TOKENHUB_DEMO_KEY" in err, err
    assert "th-x" not in err
    assert not os.path.exists(tmp_path / "demo.db")
