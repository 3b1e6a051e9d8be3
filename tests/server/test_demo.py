"""`tokenhub serve --demo`, the README's quick start: it serves, prints a working key, meters,
routes `auto` by complexity, and bills the demo tenant's wallet (money admission on)."""

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


def post(url: str, key: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
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
    store = open_store(str(db))
    try:
        wait_until(lambda: len(list(store.iter_events())) == 2, 10.0, what="both events")
        events = sorted(store.iter_events(), key=lambda e: e.ts_ms)
        assert [(e.model, e.tier) for e in events] == [
            ("gpt-4o-mini", ""), ("deepseek-chat", "strong")]  # fmt: skip
        assert all(e.holds for e in events)  # admitted against the wallet

        def settled() -> bool:
            import sqlite3

            with sqlite3.connect(db) as c:
                return c.execute("SELECT count(*) FROM settlements").fetchone()[0] == 2

        wait_until(settled, 10.0, what="the demo's settler")
    finally:
        store.close()
    assert gw.stop() == 0
