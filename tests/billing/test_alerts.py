"""Low-balance alerts (tokenhub.billing.alerts): real settlement drives the balance below the
threshold and queues exactly one webhook; a top-up re-arms it; a local receiver on 127.0.0.1
gets the signed POST; failures are retried with backoff; a restarted settler delivers what was
queued. On SQLite and PostgreSQL (the `billing` fixture)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from ledger_kit import ms, usage

from tokenhub.billing import alerts
from tokenhub.billing.io import store_events
from tokenhub.billing.service import Billing
from tokenhub.billing.settler import settle_pending
from tokenhub.db.database import Database, Tx
from tokenhub.money import NANOS
from tokenhub.store import ENV_DB
from tokenhub.usage import UsageEvent

# 1 CNY per 1M input tokens: an event of n M tokens costs n CNY.
PRICE = "1"


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers each POST with the next of `statuses`
    (then 200), records what it got."""

    port: int = 0
    statuses: list[int] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=abc"

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.got.append((dict(request.headers), await request.read()))
            return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def _priced(b: Billing, wallet: str = "10") -> None:
    await b.set_profile("acme", currency="CNY", draw_order=["wallet"])
    await b.set_price("gpt", currency="CNY", input_per_1m=PRICE, output_per_1m="0", effective_ms=0)
    await b.topup("acme", wallet, "CNY")


_minute = iter(range(10_000))


async def _spend(b: Billing, cny: int) -> None:
    """Stores one event costing `cny` CNY; the pass settles it (then checks the alerts)."""
    i = next(_minute)
    ev = usage("acme", "gpt", ms(2026, 11, 2, i // 60, i % 60), input_tokens=cny * 1_000_000)
    await _store(b.db, [ev])


async def _store(db: Database, events: list[UsageEvent]) -> None:
    async def run(tx: Tx) -> None:
        await store_events(tx, events)

    await db.transaction(run)


async def _set(db: Database, url: str, threshold: str = "5") -> str | None:
    async def run(tx: Tx) -> str | None:
        _, secret = await alerts.set_alert(tx, "acme", threshold, "CNY", url, allow_private=True)
        return secret

    return await db.transaction(run)


async def _rows(db: Database) -> list[alerts.Delivery]:
    return await db.read(lambda tx: alerts.deliveries(tx, "acme", 100))


async def _alert(db: Database) -> alerts.Alert:
    found = await db.read(lambda tx: alerts.get_alert(tx, "acme"))
    assert found is not None
    return found


async def test_fires_once_below_rearms_on_topup(billing: Billing, receiver: Receiver) -> None:
    db = billing.db
    await _priced(billing, wallet="10")
    secret = await _set(db, receiver.url, threshold="5")
    assert secret is not None and secret.startswith("whsec_")
    # Setting it again keeps the secret (shown once); rotating makes a new one.
    assert await _set(db, receiver.url, threshold="5") is None

    await _spend(billing, 4)  # 10 -> 6: above 5
    s = await settle_pending(billing)
    assert (s.settled, s.alerts_fired) == (1, 0)
    assert await _rows(db) == [] and (await _alert(db)).armed

    await _spend(billing, 2)  # 6 -> 4: below
    s = await settle_pending(billing)
    assert (s.settled, s.alerts_fired) == (1, 1)
    [first] = await _rows(db)
    body = json.loads(first.body)
    assert body["type"] == "balance.low" and body["tenant"] == "acme"
    assert body["balance"] == {"amount": "4", "currency": "CNY"}
    assert body["threshold"] == {"amount": "5", "currency": "CNY"}
    assert body["id"] == first.id and first.url == receiver.url
    assert not (await _alert(db)).armed

    await _spend(billing, 1)  # 4 -> 3: still below, already fired
    s = await settle_pending(billing)
    assert (s.settled, s.alerts_fired) == (1, 0)
    assert len(await _rows(db)) == 1
    assert (await settle_pending(billing)).alerts_fired == 0  # an idle pass: nothing either

    await billing.topup("acme", "10", "CNY")  # 3 -> 13: armed again on the next pass
    s = await settle_pending(billing)
    assert (s.read, s.alerts_rearmed, s.alerts_fired) == (0, 1, 0)
    assert (await _alert(db)).armed

    await _spend(billing, 9)  # 13 -> 4: a second alert
    s = await settle_pending(billing)
    assert s.alerts_fired == 1
    rows = await _rows(db)
    assert len(rows) == 2 and json.loads(rows[0].body)["balance"]["amount"] == "4"

    # A real delivery: both POSTs, each with a valid signature over its body.
    worker = alerts.DeliveryWorker(db, allow_private=True)
    try:
        assert await worker.deliver_due() == 2
    finally:
        await worker.close()
    assert len(receiver.got) == 2
    for headers, raw in receiver.got:
        assert alerts.verify(secret, raw, headers["X-Tokenhub-Signature"])
        assert headers["X-Tokenhub-Event"] == "balance.low"
        assert headers["X-Tokenhub-Delivery"] == json.loads(raw)["id"]
        assert headers["Content-Type"] == "application/json"
        assert not alerts.verify("whsec_other", raw, headers["X-Tokenhub-Signature"])
    assert {r.state for r in await _rows(db)} == {"delivered"}
    # Delivered once: the next pass sends nothing.
    worker = alerts.DeliveryWorker(db, allow_private=True)
    try:
        assert await worker.deliver_due() == 0
    finally:
        await worker.close()
    assert len(receiver.got) == 2


async def test_credit_headroom_counts_and_no_alert_costs_nothing(billing: Billing) -> None:
    """Spendable = wallet + credit headroom (as /v1/tokenhub/balance's `spendable`); a pass
    with no alert set fires nothing."""
    db = billing.db
    await billing.set_profile("acme", currency="CNY", credit_limit="20")
    await billing.set_price(
        "gpt", currency="CNY", input_per_1m=PRICE, output_per_1m="0", effective_ms=0
    )
    await billing.topup("acme", "3", "CNY")
    s = await settle_pending(billing)
    assert (s.alerts_fired, s.alerts_rearmed) == (0, 0)
    assert await db.read(lambda tx: alerts.spendable_in(tx, "acme", "CNY")) == 23 * NANOS
    await _set(db, "http://127.0.0.1:9/x", threshold="21")
    await _spend(billing, 1)  # wallet 2 + headroom 20 = 22: above 21
    assert (await settle_pending(billing)).alerts_fired == 0
    await _spend(billing, 4)  # wallet 0, owes 2: 18 < 21
    assert (await settle_pending(billing)).alerts_fired == 1
    assert await db.read(lambda tx: alerts.spendable_in(tx, "acme", "CNY")) == 18 * NANOS


async def test_refused_values_change_nothing(billing: Billing) -> None:
    db = billing.db
    await _priced(billing)
    ok_url = "https://hooks.example.com/tokenhub"

    async def attempt(**kw: Any) -> None:
        args: dict[str, Any] = {"amount": "5", "currency": "CNY", "webhook_url": ok_url} | kw

        async def run(tx: Tx) -> None:
            await alerts.set_alert(tx, "acme", allow_private=False, **args)

        with pytest.raises(alerts.AlertError):
            await db.transaction(run)

    await attempt(amount="-1")
    await attempt(amount="0")
    await attempt(amount="1.2.3")
    await attempt(amount="0.0000000001")  # finer than a nano
    await attempt(currency="USD")  # acme settles in CNY
    await attempt(currency="C1Y")
    await attempt(webhook_url="ftp://hooks.example.com/x")
    await attempt(webhook_url="http://hooks.example.com/x")  # https only by default
    await attempt(webhook_url="https://127.0.0.1/x")
    await attempt(webhook_url="https://10.1.2.3/x")
    await attempt(webhook_url="https://[::1]/x")
    await attempt(webhook_url="https://169.254.169.254/latest/meta-data")
    await attempt(webhook_url="https://localhost/x")
    await attempt(webhook_url="https://user:pw@hooks.example.com/x")
    await attempt(webhook_url="https://hooks.example.com/" + "a" * alerts.MAX_URL_CHARS)
    await attempt(webhook_url="https:///nohost")
    await attempt(webhook_url="https://hooks.example.com/a b")
    assert await db.read(lambda tx: alerts.get_alert(tx, "acme")) is None
    # What an operator allows (TOKENHUB_WEBHOOKS_ALLOW_PRIVATE=1): http and local addresses.
    assert alerts.check_url("http://127.0.0.1:8080/x", allow_private=True)
    assert alerts.check_url(ok_url, allow_private=False) == ok_url


async def test_failures_are_retried_with_backoff(billing: Billing, receiver: Receiver) -> None:
    """500, then connection refused, then delivered: attempts and waits grow, the error is
    kept (no URL in it), and a delivery that never succeeds is given up after max_attempts."""
    db = billing.db
    await _priced(billing)
    secret = await _set(db, receiver.url, threshold="50")
    assert (await settle_pending(billing)).alerts_fired == 1  # 10 < 50 from the start
    now = [int(time.time() * 1000)]
    worker = alerts.DeliveryWorker(
        db, allow_private=True, base_backoff_s=2.0, max_backoff_s=60.0, clock=lambda: now[0]
    )
    try:
        receiver.statuses = [500]
        assert await worker.deliver_due() == 0
        [d] = await _rows(db)
        assert (d.attempts, d.last_error, d.state) == (1, "HTTP 500", "pending")
        assert 2000 <= d.next_ms - now[0] <= 2500
        assert await worker.deliver_due() == 0  # not due yet: not sent
        assert len(receiver.got) == 1

        await receiver.stop()  # refusing connections
        now[0] = d.next_ms
        assert await worker.deliver_due() == 0
        [d] = await _rows(db)
        assert d.attempts == 2 and d.last_error is not None
        assert d.last_error.startswith("cannot connect") and "127.0.0.1" not in d.last_error
        assert 4000 <= d.next_ms - now[0] <= 5000  # doubled

        await receiver.start()  # the same port again
        now[0] = d.next_ms
        assert await worker.deliver_due() == 1
        [d] = await _rows(db)
        assert (d.attempts, d.state, d.last_error) == (3, "delivered", None)
        assert len(receiver.got) == 2
        assert alerts.verify(
            secret or "", receiver.got[-1][1], receiver.got[-1][0]["X-Tokenhub-Signature"]
        )
    finally:
        await worker.close()

    # Given up after max_attempts: never due again.
    await billing.topup("acme", "100", "CNY")
    assert (await settle_pending(billing)).alerts_rearmed == 1
    await _spend(billing, 100)
    assert (await settle_pending(billing)).alerts_fired == 1
    receiver.statuses = [503, 503]
    worker = alerts.DeliveryWorker(db, allow_private=True, max_attempts=2, clock=lambda: now[0])
    try:
        assert await worker.deliver_due() == 0
        now[0] += 3_600_000
        assert await worker.deliver_due() == 0
        now[0] += 3_600_000
        assert await worker.deliver_due() == 0
    finally:
        await worker.close()
    newest = (await _rows(db))[0]
    assert newest.state == "failed" and newest.attempts == 2
    assert newest.last_error == "gave up after 2 attempts: HTTP 503"
    assert len(receiver.got) == 4


async def test_private_addresses_refused_at_delivery(billing: Billing, receiver: Receiver) -> None:
    """A worker that does not allow private webhooks does not call 127.0.0.1 even if a row
    names it (allowed when the alert was set, the operator's policy changed since)."""
    db = billing.db
    await _priced(billing)
    await _set(db, receiver.url, threshold="50")
    assert (await settle_pending(billing)).alerts_fired == 1
    worker = alerts.DeliveryWorker(db, allow_private=False, max_attempts=1)
    try:
        assert await worker.deliver_due() == 0
    finally:
        await worker.close()
    [d] = await _rows(db)
    assert d.state == "failed" and "refused" in (d.last_error or "")
    assert receiver.got == []


async def test_removed_alert_drops_its_queued_delivery(
    billing: Billing, receiver: Receiver
) -> None:
    db = billing.db
    await _priced(billing)
    await _set(db, receiver.url, threshold="50")
    assert (await settle_pending(billing)).alerts_fired == 1
    assert await db.transaction(lambda tx: alerts.delete_alert(tx, "acme"))
    worker = alerts.DeliveryWorker(db, allow_private=True)
    try:
        assert await worker.deliver_due() == 0
    finally:
        await worker.close()
    assert receiver.got == []
    [d] = await _rows(db)
    assert d.state == "failed" and d.last_error == "dropped: the alert was removed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_restarted_settler_delivers_what_was_queued(
    billing: Billing, ledger_url: str
) -> None:
    """A pass queues the webhook while no receiver listens; the settle daemon (a real
    `python -m tokenhub.billing.settler`) is killed before it could deliver; the next one
    delivers it, signed, once the receiver is up."""
    db = billing.db
    await _priced(billing)
    rec = Receiver(port=_free_port())
    secret = await _set(db, rec.url, threshold="50")
    env = {**os.environ, ENV_DB: ledger_url, alerts.ALLOW_PRIVATE_ENV: "1"}
    argv = [sys.executable, "-m", "tokenhub.billing.settler", "--interval", "0.2"]

    async def settler_runs_until(done: Any, timeout_s: float) -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not await done():
                assert time.monotonic() < deadline, "timed out"
                await asyncio.sleep(0.05)
        finally:
            proc.kill()  # no last pass, no goodbye: a crash
            await proc.wait()

    async def queued_and_tried() -> bool:
        rows = await _rows(db)
        return bool(rows) and rows[0].attempts >= 1

    await settler_runs_until(queued_and_tried, 30)
    [d] = await _rows(db)
    assert d.state == "pending" and (d.last_error or "").startswith("cannot connect")
    await db.transaction(
        lambda tx: tx.execute("UPDATE webhook_deliveries SET next_ms = 0 WHERE id = $1", d.id)
    )  # due now, rather than after its backoff
    await rec.start()
    try:

        async def delivered() -> bool:
            return (await _rows(db))[0].state == "delivered"

        await settler_runs_until(delivered, 30)
        assert len(rec.got) == 1
        headers, raw = rec.got[0]
        assert json.loads(raw)["id"] == d.id
        assert alerts.verify(secret or "", raw, headers["X-Tokenhub-Signature"])
    finally:
        await rec.stop()
