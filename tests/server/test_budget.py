"""A tenant's daily token budget under a burst: `tokenhub serve` (one process and `--workers 2`)
admits what the budget holds, refuses the rest with 429 insufficient_quota, and bills exactly.

Each request reserves an upper bound, prompt tokens + max_tokens, and is settled with what the
upstream served. The budget covers about 50 of 200 concurrent requests; what reached the database
is checked against the budget and against the mock's ledger.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import http_json, wait_until
from procs import (
    Procs,
    Site,
    admitted_and_refused,
    children,
    event_ids,
    fire,
    no_traceback,
    open_site,
)

from tokenhub.meter import Meter

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing, /proc")

TENANT = "budget"
VOCAB = "cl100k_base"  # the deployment's and the mock's (for gpt-4o-mini)
MESSAGES = [{"role": "user", "content": "Spend the budget, but not a token more."}]
MAX_TOKENS = 40  # above the mock's reply length (32): what is billed is less than reserved
SERVED_OUTPUT = 32
TOTAL = 200
FIT = 50  # full upper-bound reservations the budget holds


@pytest.fixture
def site(tmp_path: Path, mock: str) -> Iterator[Site]:
    with open_site(tmp_path, mock, TENANT) as s:
        yield s


@pytest.mark.parametrize("workers", [1, 2])
def test_daily_budget_under_a_burst(site: Site, procs: Procs, workers: int) -> None:
    prompt = Meter.load(VOCAB).count_messages(MESSAGES)
    reservation = prompt + MAX_TOKENS  # the upper bound each request reserves
    budget = FIT * reservation + reservation // 2
    site.store.set_limits("tenant", TENANT, tokens_per_day=budget)

    args = ["serve", "--config", str(site.config)]
    if workers > 1:
        args += ["--workers", str(workers)]
    gw = procs.start("gateway", *args)
    gw.wait_serving()
    assert len(children(gw.pid)) == (workers if workers > 1 else 0)

    outcomes = asyncio.run(fire(site.url, site.secret, TOTAL, MESSAGES, MAX_TOKENS))
    admitted, refused = admitted_and_refused(outcomes, TOTAL)
    # No over-refusal: every full upper-bound reservation that fits is admitted.
    assert len(admitted) >= budget // reservation, (len(admitted), budget, reservation)
    for o in refused:
        assert f"tenant:{TENANT}" in o.body["error"]["message"], o.body

    ids = {str(o.request_id) for o in outcomes}
    wait_until(lambda: event_ids(site.store) >= ids, 10.0, what="every event")
    events = {e.request_id: e for e in site.store.iter_events()}
    assert set(events) == ids

    for o in refused:  # recorded, never billed
        e = events[str(o.request_id)]
        assert (e.status, e.error, e.input_tokens, e.output_tokens) == (
            429, "insufficient_quota", 0, 0,
        ), e  # fmt: skip

    # Billed exactly: each admitted event has what the upstream served for that request.
    ledger = http_json(site.mock + "/mock/ledger")
    served = {x["client_request_id"]: x for x in ledger["entries"]}
    assert len(served) == len(ledger["entries"]) == len(admitted)
    assert set(served) == {o.request_id for o in admitted}  # a refusal never went upstream
    used = 0
    for o in admitted:
        e, entry = events[str(o.request_id)], served[o.request_id]
        assert (e.status, e.source, e.tenant) == (200, "upstream", TENANT), e
        assert (e.input_tokens, e.output_tokens) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        ), (e, entry)
        assert (e.input_tokens, e.output_tokens) == (prompt, SERVED_OUTPUT), e
        usage = o.body["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, SERVED_OUTPUT)
        used += e.input_tokens + e.output_tokens
    # The budget is never exceeded by what was billed.
    assert used <= budget, (used, budget)

    assert gw.stop() == 0
    no_traceback(gw)
