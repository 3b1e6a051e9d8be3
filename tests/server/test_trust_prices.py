"""Prices in the config bill without `prices import` (issue 11, item 10): `tokenhub serve`
applies them at start (a model's first price from the epoch, a changed one from now), and an
event without a price says how to fix it. Real processes: the module's mock upstream, `tokenhub
serve --config`, and the billing CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from harness import wait_until
from procs import TOKENHUB, Procs, Site, no_traceback, open_site

from tokenhub.store import open_store
from tokenhub.usage import UsageEvent

sys.path.insert(0, str(Path(__file__).parents[1]))

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups")

TENANT = "priced"
MESSAGES = [{"role": "user", "content": "What does this cost?"}]


@pytest.fixture
def site(tmp_path: Path, mock: str) -> Iterator[Site]:
    with open_site(tmp_path, mock, TENANT) as s:
        yield s


def th(site: Site, *argv: str) -> subprocess.CompletedProcess[str]:
    db = str(site.tmp / "hub.db")
    return subprocess.run([TOKENHUB, *argv, "--db", db], capture_output=True, text=True, timeout=60)


def price(site: Site, input_per_1m: str, output_per_1m: str) -> None:
    """The config's gpt-4o-mini deployment gets this price (the deployment is the last table)."""
    text = site.config.read_text().split("\n  price = ")[0].rstrip("\n")
    text += (
        f'\n  price = {{ currency = "USD", input_per_1m = "{input_per_1m}", '
        f'output_per_1m = "{output_per_1m}" }}\n'
    )
    site.config.write_text(text)


def serve_once(site: Site, procs: Procs, requests: int) -> str:
    """Starts the gateway, sends `requests` chat completions, stops it; its stderr."""
    gw = procs.start("gateway", "serve", "--config", str(site.config))
    gw.wait_serving()
    for _ in range(requests):
        req = urllib.request.Request(
            site.url,
            data=json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode(),
            headers={"Authorization": f"Bearer {site.secret}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=20) as r:
            assert r.status == 200
    assert gw.stop() == 0
    no_traceback(gw)
    return gw.stderr()


def prices(site: Site) -> list[dict[str, object]]:
    r = th(site, "prices", "list", "--json")
    assert r.returncode == 0, r
    book: list[dict[str, object]] = json.loads(r.stdout)
    return book


def test_serve_applies_the_configs_prices(site: Site, procs: Procs) -> None:
    assert th(site, "wallet", "topup", TENANT, "100", "USD").returncode == 0
    price(site, "1000", "2000")
    err = serve_once(site, procs, 2)
    first = (
        "tokenhub: price gpt-4o-mini v1 from 1970-01-01T00:00:00Z (its first: from the epoch): "
        "input 1000, cached input 1000, output 2000, cache write 1000 USD per 1M tokens"
    )
    assert first in err, err
    wait_until(lambda: len(list(site.store.iter_events())) == 2, 10.0, what="both events")

    # No `prices import`: the events settle at the config's price.
    r = th(site, "billing", "settle")
    assert r.returncode == 0 and r.stdout.startswith("settled 2,"), r
    events = list(site.store.iter_events())
    tokens_in = sum(e.input_tokens for e in events)
    tokens_out = sum(e.output_tokens for e in events)
    nanos = (tokens_in * 1000 + tokens_out * 2000) * 1000  # USD per 1M tokens, in nanos
    wallet = json.loads(th(site, "wallet", "show", TENANT, "--json").stdout)["wallet"]
    assert Decimal(wallet["USD"]) == Decimal(100 * 10**9 - nanos).scaleb(-9), (wallet, nanos)

    # Unchanged: nothing written. Changed: a new version, in force from now on.
    assert "tokenhub: price" not in serve_once(site, procs, 0)
    price(site, "1000", "3000")
    err = serve_once(site, procs, 0)
    assert (
        "tokenhub: price gpt-4o-mini v2 from " in err and "changed in the config: from now" in err
    )
    book = prices(site)
    assert [(p["version"], p["output_per_1m"]) for p in book] == [(1, "2000"), (2, "3000")]
    assert book[0]["effective_ms"] == 0
    assert int(str(book[1]["effective_ms"])) > max(e.ts_ms for e in events)  # usage keeps v1


def test_no_price_says_how_to_fix_it(site: Site) -> None:
    # A price that starts after the usage: the settler says so, and what to run.
    assert th(site, "prices", "set", "late-model", "--currency", "USD", "--input", "1",
              "--output", "1", "--from", "2030-01-01").returncode == 0  # fmt: skip
    assert th(site, "wallet", "topup", TENANT, "10", "USD").returncode == 0
    store = open_store(str(site.tmp / "hub.db"))
    try:
        event = UsageEvent(
            request_id="req_late",
            ts_ms=1_700_000_000_000,
            tenant=TENANT,
            key_id=site.key_id,
            endpoint="chat.completions",
            model="late-model",
            deployment="late-model@mock",
            provider="mock",
            upstream_model="late-model",
            input_tokens=1000,
        )
        store.insert_events([event])
    finally:
        store.close()
    r = th(site, "billing", "settle")
    assert r.returncode == 1, r
    assert "its first is in force from 2030-01-01T00:00:00Z, after this usage" in r.stdout, r
    assert "tokenhub prices set late-model" in r.stdout and "--from DATE" in r.stdout
    assert "tokenhub prices import --config FILE --from DATE" in r.stdout
    assert "tokenhub billing settle --retry-failed" in r.stdout

    # Following the advice settles it.
    assert th(site, "prices", "set", "late-model", "--currency", "USD", "--input", "1",
              "--output", "1", "--from", "2020-01-01").returncode == 0  # fmt: skip
    r = th(site, "billing", "settle", "--retry-failed")
    assert r.returncode == 0 and r.stdout.startswith("settled 1,"), r
