"""`tokenhub serve --demo`, the README's quick start: it serves, prints a working key, meters,
routes `auto` by complexity, answers the Messages and Responses APIs, and bills the demo
tenant's wallet (money admission on)."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, wait_until
from procs import Procs

from tokenhub.store import open_store

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups")


def post(url: str, key: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """POSTs JSON with the key as a Bearer token, or with `headers` instead."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}
        | (headers if headers is not None else {"Authorization": f"Bearer {key}"}),
    )
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def test_the_demo_serves_routes_and_bills(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    db = tmp_path / "demo.db"
    gw = procs.start("demo", "serve", "--demo", "--port", str(port), "--db", str(db))
    gw.wait_serving()
    key = re.search(r"Bearer (th-[A-Za-z0-9_-]+)", gw.stdout())
    assert key, gw.stdout()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    msg = [{"role": "user", "content": "Hello!"}]
    hello = post(url, key[1], {"model": "gpt-4o-mini", "messages": msg})
    assert hello["usage"]["total_tokens"] > 0
    hard = "Prove the bound and refactor:\n```python\n" + "def f(x):\n    return x*x\n" * 60
    msg = [{"role": "user", "content": hard + "```"}]
    routed = post(url, key[1], {"model": "auto", "messages": msg})
    assert routed["model"] == "deepseek-chat", routed["model"]
    # The Messages API, passed through to the mock's native Messages API (x-api-key, as the
    # printed curl sends it), and the Responses API.
    claude = post(
        f"http://127.0.0.1:{port}/v1/messages",
        key[1],
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        {"x-api-key": key[1], "anthropic-version": "2023-06-01"},
    )
    assert claude["type"] == "message" and claude["usage"]["output_tokens"] > 0, claude
    resp = post(f"http://127.0.0.1:{port}/v1/responses", key[1], {"model": "gpt-4o-mini",
                                                                   "input": "Hi"})  # fmt: skip
    assert resp["object"] == "response" and resp["status"] == "completed", resp
    store = open_store(str(db))
    try:
        wait_until(lambda: len(list(store.iter_events())) == 4, 10.0, what="the four events")
        events = sorted(store.iter_events(), key=lambda e: e.ts_ms)
        assert [(e.model, e.tier, e.endpoint) for e in events] == [
            ("gpt-4o-mini", "", "chat.completions"),
            ("deepseek-chat", "strong", "chat.completions"),
            ("claude-sonnet-4-5", "", "messages"),
            ("gpt-4o-mini", "", "responses"),
        ]
        assert events[2].provider == "mock-claude"
        assert events[2].input_tokens == claude["usage"]["input_tokens"]
        assert events[3].output_tokens == resp["usage"]["output_tokens"]
        assert all(e.holds for e in events)  # admitted against the wallet

        def settled() -> bool:
            import sqlite3

            with sqlite3.connect(db) as c:
                return c.execute("SELECT count(*) FROM settlements").fetchone()[0] == 4

        wait_until(settled, 10.0, what="the demo's settler")
    finally:
        store.close()
    assert gw.stop() == 0
