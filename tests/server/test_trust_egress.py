"""Upstream TLS and egress (issue 11, item 9), through real `tokenhub serve` processes.

The mock upstream serves HTTPS on 127.0.0.1 with a certificate signed by a CA made here (the
openssl command); a small CONNECT proxy (asyncio, in this module) records what it is asked and
forwards bytes. The gateway reaches the upstream: without `ca_file` (a 502 that says TLS), with
it (200 through the openai client), through `proxy_url` (CONNECT for https, absolute form for
http, with basic auth), and through HTTPS_PROXY with NO_PROXY bypassing it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from aiohttp import web
from harness import LoopThread, free_port
from openai.types.chat import ChatCompletionMessageParam
from procs import Proc, Procs, no_traceback

from tokenhub.config import ConfigError, from_mapping
from tokenhub.gateway.providers.http import ClientProxyConnectionError, Pool, TLSError, find_proxy
from tokenhub.mock import MockOptions, build_app
from tokenhub.store import open_store

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say something over TLS."}
]
PROXY_PASSWORD = "pr0xy-s3cret"  # must appear in no output of the gateway


# -- a private CA and a server certificate ---------------------------------------------------


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=tokenhub test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
            "-out", "server.pem")  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key")


# -- the upstreams and the proxy, in a loop thread -------------------------------------------


@dataclass
class Proxy:
    """A forward proxy: CONNECT host:port tunnels; an absolute-form request is forwarded to
    the origin it names. Records each first line and its Proxy-Authorization header."""

    port: int = 0
    lines: list[str] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *headers = head.decode("latin-1").split("\r\n")
            self.lines.append(line)
            for h in headers:
                name, _, value = h.partition(":")
                if name.lower() == "proxy-authorization":
                    self.auth.append(value.strip())
            method, target, _ = line.split(" ", 2)
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                up_r, up_w = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # absolute form: http://host:port/path
                origin = target.split("/")[2]
                host, _, port = origin.rpartition(":")
                up_r, up_w = await asyncio.open_connection(host, int(port))
                up_w.write(head)  # the mock reads the path from the absolute URL
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.close()


@dataclass
class Net:
    https_port: int
    http_port: int
    proxy: Proxy


@pytest.fixture(scope="module")
def net(pki: Pki) -> Iterator[Net]:
    thread = LoopThread()
    runners: list[web.AppRunner] = []
    proxy = Proxy()

    async def start() -> tuple[int, int, asyncio.Server]:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki.cert, pki.key)
        ports = []
        for tls in (ctx, None):
            runner = web.AppRunner(build_app(MockOptions()), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
            runners.append(runner)
            ports.append(runner.addresses[0][1])
        return ports[0], ports[1], await proxy.start()

    https_port, http_port, server = thread.call(start())
    try:
        yield Net(https_port, http_port, proxy)
    finally:

        async def stop() -> None:
            server.close()
            for r in runners:
                await r.cleanup()

        thread.call(stop())
        thread.close()


# -- the gateway -----------------------------------------------------------------------------


def serve(tmp: Path, procs: Procs, providers: dict[str, dict[str, str]]) -> tuple[Proc, str, str]:
    """`tokenhub serve` with one model per provider (model id = provider name); returns the
    process, its base URL and an API key."""
    db = tmp / "hub.db"
    store = open_store(str(db))
    try:
        store.migrate()
        store.create_tenant("egress")
        _, secret = store.create_key("egress")
    finally:
        store.close()
    port = free_port()
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
database = "{db}"
journal_dir = "{tmp / "journal"}"
"""
    for name, options in providers.items():
        text += f'\n[[providers]]\nname = "{name}"\n'
        text += "".join(f'{k} = "{v}"\n' for k, v in options.items())
    for name in providers:
        text += f"""
[[models]]
id = "{name}"
  [[models.deployments]]
  provider = "{name}"
  upstream_model = "gpt-4o-mini"
"""
    config = tmp / "tokenhub.toml"
    config.write_text(text, encoding="utf-8")
    p = procs.start("serve", "serve", "--config", str(config))
    p.wait_serving()
    return p, f"http://127.0.0.1:{port}", secret


def chat(base: str, secret: str, model: str, stream: bool = False) -> str:
    with openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0) as client:
        if stream:
            chunks = client.chat.completions.create(
                model=model,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client.chat.completions.create(model=model, messages=MESSAGES)
        return r.choices[0].message.content or ""


def test_tls_private_ca_and_proxy_url(tmp_path: Path, procs: Procs, net: Net, pki: Pki) -> None:
    https = f"https://127.0.0.1:{net.https_port}/v1"
    proxy_url = f"http://tokenhub:{PROXY_PASSWORD}@127.0.0.1:{net.proxy.port}"
    p, base, secret = serve(
        tmp_path,
        procs,
        {
            "system-cas": {"base_url": https, "proxy_url": "direct"},
            "private-ca": {"base_url": https, "ca_file": str(pki.ca), "proxy_url": "direct"},
            "tunneled": {
                "base_url": f"https://localhost:{net.https_port}/v1",
                "ca_file": str(pki.ca),
                "proxy_url": proxy_url,
            },
            "forwarded": {
                "base_url": f"http://127.0.0.1:{net.http_port}/v1",
                "proxy_url": proxy_url,
            },
        },
    )
    # The system's CAs do not know the private CA: a 502 that says it is TLS, and why.
    with pytest.raises(openai.APIStatusError) as e:
        chat(base, secret, "system-cas")
    assert e.value.status_code == 502
    message = e.value.message
    assert "TLS" in message and "certificate verify failed" in message, message
    assert str(net.https_port) not in message  # the reason, not where the upstream is

    assert chat(base, secret, "private-ca")
    assert chat(base, secret, "private-ca", stream=True)
    assert net.proxy.lines == []

    # proxy_url: https through a CONNECT tunnel (TLS with the origin inside it) ...
    assert chat(base, secret, "tunneled")
    assert chat(base, secret, "tunneled", stream=True)
    connects = [line for line in net.proxy.lines if line.startswith("CONNECT ")]
    assert connects and connects[0] == f"CONNECT localhost:{net.https_port} HTTP/1.1"
    # ... and http in absolute form.
    assert chat(base, secret, "forwarded")
    forwarded = f"POST http://127.0.0.1:{net.http_port}/v1/chat/completions HTTP/1.1"
    assert forwarded in net.proxy.lines
    expected = "Basic " + base64.b64encode(f"tokenhub:{PROXY_PASSWORD}".encode()).decode()
    assert net.proxy.auth and set(net.proxy.auth) == {expected}

    p.stop()
    no_traceback(p)
    assert PROXY_PASSWORD not in p.stdout() + p.stderr()


def test_https_proxy_from_environment_and_no_proxy(
    tmp_path: Path, procs: Procs, net: Net, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{net.proxy.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    before = len(net.proxy.lines)
    ca = str(pki.ca)
    p, base, secret = serve(
        tmp_path,
        procs,
        {
            "via-env": {"base_url": f"https://localhost:{net.https_port}/v1", "ca_file": ca},
            "bypassed": {"base_url": f"https://127.0.0.1:{net.https_port}/v1", "ca_file": ca},
        },
    )
    assert chat(base, secret, "bypassed")
    assert net.proxy.lines[before:] == []  # NO_PROXY=127.0.0.1: straight to the upstream
    assert chat(base, secret, "via-env")
    assert net.proxy.lines[before:] == [f"CONNECT localhost:{net.https_port} HTTP/1.1"]
    p.stop()
    no_traceback(p)


def test_find_proxy_rules() -> None:
    env = {"HTTPS_PROXY": "http://u:p%40ss@proxy:3128", "no_proxy": "internal.example, .corp"}
    up = find_proxy("https://api.example.com/v1", "", env)
    assert up is not None and (up.host, up.port) == ("proxy", 3128)
    assert up.auth == "Basic " + base64.b64encode(b"u:p@ss").decode()
    assert find_proxy("http://api.example.com/v1", "", env) is None  # no HTTP_PROXY
    assert find_proxy("https://internal.example/v1", "", env) is None
    assert find_proxy("https://llm.corp:8443/v1", "", env) is None
    assert find_proxy("https://api.example.com/v1", "direct", env) is None
    lower_wins = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"}
    assert find_proxy("https://x/v1", "", lower_wins) == ("lower", 2, "")
    # Errors never repeat the proxy URL (it may carry a password).
    with pytest.raises(ValueError) as e:
        find_proxy("https://x/v1", "", {"HTTPS_PROXY": "https://u:hunter2@proxy:443"})
    assert "HTTPS_PROXY" in str(e.value) and "hunter2" not in str(e.value)


def test_config_checks_ca_file_and_proxy(tmp_path: Path, pki: Pki) -> None:
    def provider(**kw: str) -> dict[str, object]:
        return {"providers": [{"name": "p", "base_url": "https://x.example/v1", **kw}]}

    from_mapping(provider(ca_file=str(pki.ca), proxy_url="http://proxy:3128"))
    with pytest.raises(ConfigError, match=r"providers\[0\]\.ca_file: cannot load CA"):
        from_mapping(provider(ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="only http://") as e:
        from_mapping(provider(proxy_url="socks5://u:hunter2@proxy:1080"))
    assert "hunter2" not in str(e.value)


# -- the client's errors, without a gateway ----------------------------------------------------


async def test_pool_reports_tls_and_proxy_failures(net: Net, pki: Pki) -> None:
    # A certificate from a CA the system does not know; an http server spoken to in TLS.
    for url, reason in (
        (f"https://127.0.0.1:{net.https_port}/v1", "certificate verify failed"),
        (f"https://127.0.0.1:{net.http_port}/v1", "wrong version number"),
    ):
        pool = Pool(url, proxy_url="direct")
        try:
            with pytest.raises(TLSError) as e:
                await pool.post("/chat/completions", b"{}")
            assert reason in e.value.reason and str(net.https_port) not in e.value.reason
        finally:
            await pool.close()

    # A proxy that refuses the tunnel (407): a proxy error that repeats no credentials.
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(
        f"https://localhost:{net.https_port}/v1",
        ca_file=str(pki.ca),
        proxy_url=f"http://me:{PROXY_PASSWORD}@127.0.0.1:{port}",
    )
    try:
        with pytest.raises(ClientProxyConnectionError) as pe:
            await pool.post("/chat/completions", b"{}")
        assert "status 407" in str(pe.value) and PROXY_PASSWORD not in str(pe.value)
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
