"""Real servers for the gateway's end-to-end tests.

A `Hub` runs, in one background thread with its own (uvloop) event loop:

- several mock upstreams (`tokenhub.mock`) with different `MockOptions`: a healthy one,
  one answering 500, one omitting usage, one answering 429, a slow one (for timeouts), a paced
  one (streams that last ~1.5 s, for mid-stream disconnects) and a late one (a delay before any
  byte, for disconnects before the first chunk);
- a small scripted upstream whose usage blocks are fixed per model (explicit zero usage, cached
  tokens in OpenAI's and DeepSeek's spelling), which the mock cannot produce;
- the gateway, built by the composition root `tokenhub serve` uses
  (`tokenhub.runtime.resources.build_app` and `build_runner`) on a store (SQLite, or the
  PostgreSQL database given), a journal and an anonymous quota table, served on a SO_REUSEPORT
  socket (a test may swap the journal for a subclass, e.g. a stalling disk).

Because the servers have their own loop, the test thread can use the official synchronous
`openai.OpenAI` client, and async tests can use `openai.AsyncOpenAI` on theirs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import uvloop
from aiohttp import web

from tokenhub.config import Config, from_mapping
from tokenhub.gateway.state import GATEWAY
from tokenhub.mock import MockOptions
from tokenhub.mock import build_app as mock_app
from tokenhub.quota import Quota
from tokenhub.runtime.journal import Journal
from tokenhub.runtime.resources import RESOURCES, build_app, build_runner
from tokenhub.runtime.serve import reuse_port_socket
from tokenhub.runtime.shared import SharedState
from tokenhub.store import Store, open_store
from tokenhub.usage import UsageEvent

T = TypeVar("T")

# aiohttp 3.14 warns (NotAppKeyWarning, once per process) when request storage is keyed by a
# str, as app.py does with request["request_id"]; under the project's filterwarnings = error
# that warning is an exception in the middleware, and the first request a 500.
# test_gateway_strict.py shows that; every other module ignores just this warning, so that the
# outcome of a test does not depend on whether it made the process's first request.
IGNORE_REQUEST_KEY_WARNING = pytest.mark.filterwarnings(
    "ignore::aiohttp.web_exceptions.NotAppKeyWarning"
)

TENANT = "acme"
RETRY_AFTER_S = 7  # the 429 mock's retry-after, distinct from the default so the test sees ours
SLOW_READ_TIMEOUT_S = 0.3
MAX_BODY_BYTES = 8192

# The mock upstreams each hub runs, by provider name.
MOCKS: dict[str, MockOptions] = {
    "healthy": MockOptions(),
    "err500": MockOptions(status=500),
    "nousage": MockOptions(omit_usage=True),
    "limited": MockOptions(status=429, retry_after_s=RETRY_AFTER_S),
    "slow": MockOptions(latency_ms=1500),
    "paced": MockOptions(tokens_per_second=40, completion_tokens=60),  # ~1.5 s per stream
    "late": MockOptions(latency_ms=400),
}

# The scripted upstream's usage block per model: what a real provider may send, and the mock
# does not (its counts are always exact and its cache always cold).
SCRIPTED_TEXT = "Five words of scripted text."
SCRIPTED_USAGE: dict[str, dict[str, Any]] = {
    "zero-usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    "cached-openai": {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "total_tokens": 105,
        "prompt_tokens_details": {"cached_tokens": 40},
    },
    "cached-deepseek": {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "total_tokens": 105,
        "prompt_cache_hit_tokens": 30,
        "prompt_cache_miss_tokens": 70,
    },
}


def free_port() -> int:
    """A port nothing listens on (bound, then closed at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    fn: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> T:
    """Polls `fn` until it returns something truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}")
        time.sleep(interval)


def http_json(url: str, method: str = "GET", timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


# -- the scripted upstream ---------------------------------------------------------------------


def scripted_app() -> web.Application:
    """Chat completions with a fixed text and the usage block of SCRIPTED_USAGE[model]."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        usage = SCRIPTED_USAGE[model]
        base = {"id": "chatcmpl-scripted", "created": 1_700_000_000, "model": model}
        if not body.get("stream"):
            reply = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": SCRIPTED_TEXT},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            return web.json_response(reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        for piece in SCRIPTED_TEXT.split(" "):
            delta = {"index": 0, "delta": {"content": piece + " "}, "finish_reason": None}
            await resp.write(f"data: {json.dumps({**chunk, 'choices': [delta]})}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {**chunk, "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(final)}\n\n".encode())
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


# -- configuration -----------------------------------------------------------------------------


def gateway_config(
    mocks: dict[str, str], scripted: str, dead: str, database: str, journal: str
) -> Config:
    """The gateway's models. `mocks` maps provider name to base URL (…/v1)."""
    providers: list[dict[str, Any]] = [{"name": n, "base_url": u} for n, u in mocks.items()]
    for p in providers:
        if p["name"] == "slow":
            p["read_timeout_s"] = SLOW_READ_TIMEOUT_S
    providers.append({"name": "scripted", "base_url": scripted})
    providers.append({"name": "dead", "base_url": dead, "connect_timeout_s": 1.0})

    def dep(provider: str, upstream: str = "gpt-4o-mini", **kw: Any) -> dict[str, Any]:
        return {"provider": provider, "upstream_model": upstream, **kw}

    def one(model: str, provider: str, upstream: str = "", **kw: Any) -> dict[str, Any]:
        return {"id": model, "deployments": [dep(provider, upstream or model, **kw)]}

    models = [
        one("gpt-4o-mini", "healthy", vocab="cl100k_base"),
        one("qwen-plus", "healthy", vocab="qwen"),
        one("deepseek-chat", "healthy", vocab="deepseek-v4"),
        one("gpt-3.5-turbo-instruct", "healthy", vocab="cl100k_base"),
        one("text-embedding-3-small", "healthy", vocab="cl100k_base"),
        # The first deployment fails; the second (weight 0) is only ever a fallback.
        {
            "id": "failover",
            "deployments": [dep("err500", weight=1), dep("healthy", weight=0)],
        },
        {
            "id": "failover-dead",
            "deployments": [dep("dead", weight=1), dep("healthy", weight=0)],
        },
        {
            "id": "broken",
            "deployments": [dep("err500", weight=1), dep("dead", weight=1)],
        },
        one("nousage", "nousage", "gpt-4o-mini", vocab="cl100k_base"),
        one("limited", "limited", "gpt-4o-mini"),
        one("slow", "slow", "gpt-4o-mini"),
        one("paced", "paced", "gpt-4o-mini"),
        one("late", "late", "gpt-4o-mini"),
        {
            "id": "late-failover",
            "deployments": [dep("late", weight=1), dep("healthy", weight=0)],
        },
        # The mock counts gpt-4o-mini with cl100k_base; this deployment meters prompts with
        # another vocabulary, so an event that took the local count instead of the upstream's
        # usage would show it.
        one("vocab-mismatch", "healthy", "gpt-4o-mini", vocab="deepseek-v4"),
        *(one(m, "scripted") for m in SCRIPTED_USAGE),
        # As failover, for the circuit breaker's test alone (router state lives as long as the
        # hub, which other tests' failover requests would have tripped).
        {
            "id": "failover-cb",
            "deployments": [dep("err500", weight=1), dep("healthy", weight=0)],
        },
        # Two equal deployments: the router's choices, affinity and metrics are visible.
        {
            "id": "pair",
            "deployments": [dep("healthy", name="pair-a"), dep("healthy", name="pair-b")],
        },
        # A tiered model: small talk to gpt-4o-mini, hard prompts to qwen-plus.
        {
            "id": "auto",
            "tiers": {
                "cheap": "gpt-4o-mini",
                "strong": "qwen-plus",
                "threshold": 0.3,
                "keywords": ["refactor"],
            },
        },
    ]
    data = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "database": database,
            "journal_dir": journal,
            "max_body_bytes": MAX_BODY_BYTES,
            "key_refresh_s": 0.2,
        },
        "providers": providers,
        "models": models,
    }
    return from_mapping(data, "<tests/server harness>")


# -- the servers -------------------------------------------------------------------------------


class LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="tokenhub-test-servers", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _serve(app: web.Application, **runner_kw: Any) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, **runner_kw)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


class Hub:
    """Mock upstreams plus a gateway on ephemeral ports, and what tests need to inspect them."""

    def __init__(
        self, tmp: Path, *, journal_cls: type[Journal] = Journal, database: str | None = None
    ) -> None:
        """`database`: a PostgreSQL URL (an empty database) for a hub on PostgreSQL; by
        default a SQLite file in `tmp`."""
        self.tmp = tmp
        self.journal_cls = journal_cls
        self.db_path = tmp / "tokenhub.db"
        self.database = database or str(self.db_path)
        self.journal_dir = tmp / "journal"
        self._thread = LoopThread()
        self._runners: list[web.AppRunner] = []
        self.mock_base: dict[str, str] = {}  # provider name -> http://127.0.0.1:port
        self.dead_port = free_port()
        self.store: Store = open_store(self.database)
        self.store.migrate()
        self.store.create_tenant(TENANT)
        api_key, self.secret = self.store.create_key(TENANT)
        self.key_id = api_key.id
        try:
            self._thread.call(self._start())
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        for name, options in MOCKS.items():
            runner, base = await _serve(mock_app(options), handler_cancellation=False)
            self._runners.append(runner)
            self.mock_base[name] = base
        runner, scripted = await _serve(scripted_app())
        self._runners.append(runner)
        self.config = gateway_config(
            {n: b + "/v1" for n, b in self.mock_base.items()},
            scripted + "/v1",
            f"http://127.0.0.1:{self.dead_port}/v1",
            self.database,
            str(self.journal_dir),
        )
        await self._start_gateway()

    async def _start_gateway(self) -> None:
        # Through the composition root `tokenhub serve` uses (the store is opened in __init__).
        cfg = self.config
        self.journal = self.journal_cls(cfg.server.journal_dir)
        # An anonymous quota table: one process, so nothing needs to attach it.
        app = build_app(
            cfg, SharedState(), None, store=self.store, journal=self.journal,
            quota=Quota.anonymous(),
        )  # fmt: skip
        res = app[RESOURCES]
        self.sink, self.keys = res.sink, res.keys
        assert res.quota is not None and res.limits is not None
        self.quota, self.limits = res.quota, res.limits
        self.gateway = app[GATEWAY]
        # shutdown_timeout only bounds the teardown of a test run.
        self.gateway_runner = build_runner(app, cfg, shutdown_timeout=5.0)
        await self.gateway_runner.setup()
        sock = reuse_port_socket("127.0.0.1", 0)
        await web.SockSite(self.gateway_runner, sock).start()
        self.port = int(sock.getsockname()[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"

    def close(self) -> None:
        async def stop() -> None:
            runner = getattr(self, "gateway_runner", None)
            if runner is not None:
                await runner.cleanup()
            for r in reversed(self._runners):
                await r.cleanup()

        try:
            self._thread.call(stop())
        finally:
            self._thread.close()
            self.store.close()

    # -- clients ---------------------------------------------------------------------------

    def client(self, api_key: str | None = None, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key or self.secret, max_retries=0, **kw)

    def aclient(self, api_key: str | None = None, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url, api_key=api_key or self.secret, max_retries=0, **kw
        )

    def knows(self, secret: str) -> bool:
        """The gateway's key cache has this key (created keys take up to ~0.2 s)."""
        try:
            self.keys.authenticate(f"Bearer {secret}")
        except Exception:
            return False
        return True

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    # -- usage events ----------------------------------------------------------------------

    def events(self) -> dict[str, UsageEvent]:
        return {e.request_id: e for e in self.store.iter_events()}

    def find_event(self, request_id: str) -> UsageEvent | None:
        return self.events().get(request_id)

    def event(self, request_id: str, timeout: float = 5.0) -> UsageEvent:
        """The request's usage event, once the sink has written it."""
        return wait_until(
            lambda: self.find_event(request_id), timeout, what=f"the event of {request_id}"
        )

    async def aevent(self, request_id: str, timeout: float = 5.0) -> UsageEvent:
        return await asyncio.to_thread(self.event, request_id, timeout)

    def settle(self, timeout: float = 5.0) -> dict[str, float]:
        """Waits until every event handed to the sink so far is in the database; its stats."""
        assert self._thread.call(self.sink.flush(timeout)), "the usage sink did not drain"
        return self.sink.stats()

    async def asettle(self, timeout: float = 5.0) -> dict[str, float]:
        return await asyncio.to_thread(self.settle, timeout)

    # -- the mocks' ledgers ----------------------------------------------------------------

    def ledger(self, mock: str = "healthy") -> dict[str, Any]:
        """GET /mock/ledger of one mock upstream: totals, by_model, entries."""
        return dict(http_json(self.mock_base[mock] + "/mock/ledger"))

    def reset_ledger(self, mock: str = "healthy") -> None:
        http_json(self.mock_base[mock] + "/mock/reset", method="POST")

    def ledger_entries(self, request_id: str, mock: str = "healthy") -> list[dict[str, Any]]:
        return [e for e in self.ledger(mock)["entries"] if e["client_request_id"] == request_id]

    def ledger_entry(
        self, request_id: str, mock: str = "healthy", timeout: float = 5.0
    ) -> dict[str, Any]:
        """The mock's record of the request the gateway sent it (recorded when the mock's
        handler finishes, so a stream the gateway is still draining appears later)."""
        found = wait_until(
            lambda: self.ledger_entries(request_id, mock),
            timeout,
            what=f"{mock}'s ledger entry for {request_id}",
        )
        assert len(found) == 1, found
        return found[0]

    async def aledger_entry(
        self, request_id: str, mock: str = "healthy", timeout: float = 5.0
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.ledger_entry, request_id, mock, timeout)


def overhead_ms(headers: Any) -> float:
    """The x-tokenhub-overhead-ms header: present, a float, not negative."""
    value = float(headers["x-tokenhub-overhead-ms"])
    assert value >= 0, value
    return value


def check_served(
    hub: Hub,
    event: UsageEvent,
    *,
    model: str,
    endpoint: str = "chat.completions",
    stream: bool = False,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    source: str = "upstream",
    provider: str = "healthy",
    upstream_model: str | None = None,
    attempts: int = 1,
    status: int = 200,
) -> None:
    """A served request's event: the tokens given, who called, where it went, and timings."""
    upstream_model = upstream_model or model
    expected = {
        "tenant": TENANT,
        "key_id": hub.key_id,
        "endpoint": endpoint,
        "model": model,
        "deployment": f"{provider}/{upstream_model}",
        "provider": provider,
        "upstream_model": upstream_model,
        "stream": stream,
        "input_tokens": input_tokens,
        "cached_input_tokens": cached_input_tokens,
        "output_tokens": output_tokens,
        "source": source,
        "status": status,
        "error": "" if status == 200 else event.error,
        "attempts": attempts,
    }
    actual = {k: getattr(event, k) for k in expected}
    assert actual == expected
    assert event.latency_ms > 0
    assert event.ts_ms > 0
    if stream and output_tokens:
        assert event.ttft_ms is not None
        assert 0 < event.ttft_ms <= event.latency_ms
    if not stream:
        assert event.ttft_ms is None
