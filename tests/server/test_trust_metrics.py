"""One scrape of /metrics describes the whole server under `tokenhub serve --workers N` (issue
11, item 12): real processes, the module's mock upstream, scrapes on new connections (so that
both workers answer some), each checked against the number of requests sent."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_until
from procs import Proc, Procs, Site, children, fire, no_traceback, open_site

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing, /proc")

MESSAGES = [{"role": "user", "content": "Count me once, whoever serves me."}]


@pytest.fixture
def site(tmp_path: Path, mock: str) -> Iterator[Site]:
    with open_site(tmp_path, mock, "metrics") as s:
        yield s


def scrape(site: Site) -> tuple[str, dict[str, float]]:
    """(the worker that answered, {sample name with labels: value})."""
    with urllib.request.urlopen(site.base + "/metrics", timeout=10) as resp:
        worker = resp.headers["x-tokenhub-worker"]
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return worker, samples


def requests_total(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("tokenhub_requests_total{"))


def scrapes_from_both(site: Site, expected: int) -> None:
    """Scrapes until each worker answered twice (at most 60): every one sums to `expected`."""
    answered: dict[str, int] = {}
    for _ in range(60):
        worker, samples = scrape(site)
        assert requests_total(samples) == expected, (worker, samples)
        ok = samples.get('tokenhub_requests_total{model="gpt-4o-mini",status="200"}', 0.0)
        assert ok == expected
        assert samples["tokenhub_api_keys"] == 1  # the same in every worker: not summed
        answered[worker] = answered.get(worker, 0) + 1
        if len(answered) == 2 and min(answered.values()) >= 2:
            return
    raise AssertionError(f"scrapes did not reach both workers: {answered}")


def send(site: Site, total: int) -> None:
    outcomes = asyncio.run(fire(site.url, site.secret, total, MESSAGES, 8))
    assert [o.status for o in outcomes] == [200] * total, outcomes


def test_one_scrape_counts_every_workers_requests(site: Site, procs: Procs) -> None:
    gw: Proc = procs.start("gateway", "serve", "--config", str(site.config), "--workers", "2")
    gw.wait_serving()
    scrapes_from_both(site, 0)
    send(site, 40)
    scrapes_from_both(site, 40)

    # A worker killed with SIGKILL: its counts stay in the sum (counters never go down), and
    # its replacement's add to them.
    victim = children(gw.pid)[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = children(gw.pid)
        return len(now) == 2 and victim not in now and "serves again" in gw.stderr()

    wait_until(replaced, 15.0, what="the worker to be restarted")
    scrapes_from_both(site, 40)
    send(site, 24)
    scrapes_from_both(site, 64)
    assert gw.stop() == 0
    no_traceback(gw)
