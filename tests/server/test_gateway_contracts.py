"""Money admission end to end: `tokenhub serve` with `[billing] admission = true` admits a request
only if the tenant's contracts can pay for its worst case, ends a stream cleanly when they can
pay for no more, and the ledger (settled in-process) bills exactly what was served.

The pure parts (planning, replay) are tested in tests/test_contracts.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import free_port, http_json, wait_until
from procs import Proc, Procs, admitted_and_refused, children, fire, mock_process, write_config

from tokenhub.billing.ledger import balances
from tokenhub.billing.pots import money_pot
from tokenhub.billing.service import Billing
from tokenhub.db.database import open_database
from tokenhub.meter import Meter
from tokenhub.money import rate
from tokenhub.quota import Quota
from tokenhub.store import Store, open_store

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing, /proc")

TENANT = "payg"
VOCAB = "cl100k_base"
MESSAGES = [{"role": "user", "content": "Spend the wallet, but not a cent more."}]
MAX_TOKENS = 40  # the mock's replies are longer: it serves exactly max_tokens
TOTAL = 200
FIT = 50
PER_1M = 100_000_000_000  # 100 USD per 1M tokens, in and out: a request is ~0.006 USD
USD = 1_000_000_000


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("contracts-mock")
    # Long paced replies for the stream that runs out of money; the burst sets max_tokens.
    args = ["--latency-ms", "100", "--model", "gpt-4o-mini", "--model", "unpriced",
            "--completion-tokens", "3000", "--tokens-per-second", "20000"]  # fmt: skip
    with mock_process(tmp, *args) as base:
        yield base


@dataclass
class Site:
    config: Path
    base: str
    db: str
    store: Store
    secret: str

    @property
    def url(self) -> str:
        return self.base + "/v1/chat/completions"

    def billing(self, fn: Any) -> Any:
        """Runs `await fn(Billing)` on the site's database (as the CLI would)."""

        async def run() -> Any:
            db = await open_database(self.db)
            try:
                return await fn(Billing(db))
            finally:
                await db.close()

        return asyncio.run(run())


@pytest.fixture
def site_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The site's database: a SQLite file, or with `indirect` parameter "postgresql" a fresh
    PostgreSQL database (the burst runs on both)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield str(tmp_path / "hub.db")
    else:
        yield request.getfixturevalue("pg_database")


@pytest.fixture
def site(tmp_path: Path, mock: str, site_db: str) -> Iterator[Site]:
    http_json(mock + "/mock/reset", method="POST")
    port = free_port()
    db = site_db
    billing = "[billing]\nsettle_interval_s = 0.3\nadmission = true\n"
    models = {"gpt-4o-mini": VOCAB, "unpriced": VOCAB}
    config = write_config(tmp_path, port, db, mock, models=models, extra=billing)
    store = open_store(db)
    try:
        store.migrate()
        store.create_tenant(TENANT)
        _, secret = store.create_key(TENANT)
        s = Site(config, f"http://127.0.0.1:{port}", db, store, secret)

        async def setup(b: Billing) -> None:
            await b.set_price("gpt-4o-mini", currency="USD", input_per_1m="100",
                              output_per_1m="100", effective_ms=0)  # fmt: skip
            await b.set_profile(TENANT, currency="USD", draw_order=["wallet", "postpaid"])

        s.billing(setup)
        yield s
    finally:
        store.close()


# How the server starts its settler: the billing package's daemon, never the CLI.
SETTLER = b"-m\x00tokenhub.billing.settler\x00"


def _serve(site: Site, procs: Procs, workers: int = 1) -> Proc:
    args = ["serve", "--config", str(site.config)]
    if workers > 1:
        args += ["--workers", str(workers)]
    gw = procs.start("gateway", *args)
    gw.wait_serving()
    # The settler runs in a process of its own, a child of the serving process (worker 1).
    serving = children(gw.pid) if workers > 1 else [gw.pid]
    assert len(serving) == workers
    settlers = [c for c in children(serving[0]) if SETTLER in _cmdline(c)]
    assert len(settlers) == 1, [_cmdline(c) for c in children(serving[0])]
    assert b"--quota" in _cmdline(settlers[0])
    # The database (a PostgreSQL URL may carry a password) is not on its command line.
    assert site.db.encode() not in _cmdline(settlers[0])
    return gw


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # gone since it was listed


def _post(site: Site, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        site.url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {site.secret}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _ledger(site: Site) -> dict[str, int]:
    async def run(b: Billing) -> dict[str, int]:
        return await b.db.transaction(lambda tx: balances(tx, tenant=TENANT))

    return site.billing(lambda b: run(b))


def _settled(site: Site) -> dict[str, str]:
    async def run(b: Billing) -> dict[str, str]:
        rows = await b.db.transaction(
            lambda tx: tx.fetch("SELECT event_id, txn_id FROM settlements")
        )
        return dict(rows)

    return site.billing(lambda b: run(b))


def _usage_charges(site: Site) -> dict[str, int]:
    """The wallet debit of each usage transaction, by event id."""

    async def run(b: Billing) -> dict[str, int]:
        rows = await b.db.transaction(
            lambda tx: tx.fetch(
                "SELECT t.ref, SUM(p.amount) FROM ledger_txns t JOIN postings p ON p.txn_id = t.id "
                "WHERE t.kind = 'usage' AND p.account LIKE 't:%:wallet:%' GROUP BY t.ref"
            )
        )
        return {r: int(a) for r, a in rows}

    return site.billing(lambda b: run(b))


def _table(gw: Proc) -> Quota:
    return Quota.attach(f"/dev/shm/tokenhub-quota-{gw.pid}")


@pytest.mark.parametrize(
    "site_db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_wallet_under_a_burst_is_never_overdrawn(site: Site, procs: Procs, workers: int) -> None:
    prompt = Meter.load(VOCAB).count_messages(MESSAGES)
    reservation = rate(prompt, PER_1M) + rate(MAX_TOKENS, PER_1M)  # the worst case, priced
    wallet = FIT * reservation + reservation // 2
    wallet -= wallet % 10_000_000  # whole cents
    site.billing(lambda b: b.topup(TENANT, str(wallet / USD), "USD"))
    gw = _serve(site, procs, workers)

    outcomes = asyncio.run(fire(site.url, site.secret, TOTAL, MESSAGES, MAX_TOKENS))
    admitted, refused = admitted_and_refused(outcomes, TOTAL)
    assert len(admitted) >= wallet // reservation, (len(admitted), wallet, reservation)
    for o in refused:
        err = o.body["error"]
        assert f"tenant {TENANT}'s contracts cannot pay" in err["message"], err
        assert "wallet and credit left" in err["message"], err

    ids = {str(o.request_id) for o in outcomes}
    wait_until(lambda: set(_settled(site)) >= ids, 15.0, what="every event settled")
    events = {e.request_id: e for e in site.store.iter_events()}
    charges = _usage_charges(site)
    for o in refused:  # recorded, never billed
        ev = events[str(o.request_id)]
        assert (ev.status, ev.error, ev.input_tokens, ev.output_tokens) == (
            429, "insufficient_quota", 0, 0)  # fmt: skip
        assert str(o.request_id) not in charges
    for o in admitted:  # billed exactly what the mock served, at the list price
        ev = events[str(o.request_id)]
        assert (ev.input_tokens, ev.output_tokens) == (prompt, MAX_TOKENS), ev
        assert charges[ev.request_id] == rate(prompt, PER_1M) + rate(MAX_TOKENS, PER_1M)
        assert ev.holds.endswith(f"|{money_pot(TENANT)}={charges[ev.request_id]}"), ev.holds
    bal = _ledger(site)
    spent = sum(charges.values())
    assert spent <= wallet
    assert -bal[f"t:{TENANT}:wallet:USD"] == wallet - spent >= 0
    assert bal.get(f"t:{TENANT}:overrun:USD", 0) == 0

    # Once everything is posted, the table's pot holds exactly what the ledger does: every
    # charge was given back by the settler, nothing twice.
    table = _table(gw)

    def pot_matches() -> bool:
        s = table.state(money_pot(TENANT)).money
        return (s.limit, s.used, s.held) == (wallet - spent, 0, 0)

    wait_until(
        pot_matches, 5.0, what=f"the pot to equal the ledger: {table.state(money_pot(TENANT))}"
    )

    # A top-up made elsewhere (the CLI) is admitted against within a settle interval.
    status, body = _post(site, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 4000})
    assert status == 429 and body["error"]["code"] == "insufficient_quota", body
    site.billing(lambda b: b.topup(TENANT, "1.00", "USD"))
    wait_until(
        lambda: (
            _post(site, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 4000})[0]
            == 200
        ),
        5.0,
        what="the top-up to admit a request",
    )


def test_a_stream_is_cut_cleanly_and_billed_what_the_client_received(
    site: Site, procs: Procs
) -> None:
    prompt = Meter.load(VOCAB).count_messages(MESSAGES)
    site.billing(lambda b: b.topup(TENANT, "0.20", "USD"))  # ~2,000 tokens at 100 USD / 1M
    _serve(site, procs)

    async def read() -> tuple[int, str, list[dict[str, Any]], bytes]:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        async with (
            aiohttp.ClientSession() as s,
            s.post(site.url, json=body, headers={"Authorization": f"Bearer {site.secret}"}) as r,
        ):
            data = await r.read()
            rid = r.headers["x-request-id"]
        payloads = [x[6:] for x in data.split(b"\n\n") if x.startswith(b"data: ")]
        chunks = [json.loads(p) for p in payloads[:-1]]
        return r.status, rid, chunks, payloads[-1]

    status, rid, chunks, last = asyncio.run(read())
    assert (status, last) == (200, b"[DONE]")
    error = chunks[-1]["error"]
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    text = "".join(
        c["delta"].get("content") or "" for ch in chunks[:-1] for c in ch.get("choices", ())
    )
    received = Meter.load(VOCAB).count(text)
    assert 1024 < received < 2100, received  # past the first tranche, short of the 3,000

    wait_until(lambda: rid in _settled(site), 10.0, what="the event settled")
    ev = next(e for e in site.store.iter_events() if e.request_id == rid)
    assert (ev.status, ev.error, ev.source) == (200, "insufficient_quota", "metered")
    assert (ev.input_tokens, ev.output_tokens) == (prompt, received)
    charged = _usage_charges(site)[rid]
    assert charged == rate(prompt, PER_1M) + rate(received, PER_1M)
    bal = _ledger(site)
    assert -bal[f"t:{TENANT}:wallet:USD"] == 200_000_000 - charged >= 0
    assert bal.get(f"t:{TENANT}:overrun:USD", 0) == 0


def test_a_translated_stream_is_cut_in_the_clients_dialect(site: Site, procs: Procs) -> None:
    """The same cut for a Messages API client over the OpenAI-wire mock: the stream ends with
    Anthropic's error event, billed what the client received (its text deltas)."""
    prompt = Meter.load(VOCAB).count_messages(MESSAGES)
    site.billing(lambda b: b.topup(TENANT, "0.20", "USD"))
    _serve(site, procs)

    async def read() -> tuple[int, str, bytes]:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 4096}
        async with (
            aiohttp.ClientSession() as s,
            s.post(site.base + "/v1/messages", json=body, headers={"x-api-key": site.secret}) as r,
        ):
            return r.status, r.headers["x-request-id"], await r.read()

    status, rid, data = asyncio.run(read())
    assert status == 200
    events = [e.split("\n", 1) for e in data.decode().split("\n\n") if e]
    names = [head.removeprefix("event: ") for head, _ in events]
    assert names[0] == "message_start" and names[-1] == "error"
    error = json.loads(events[-1][1].removeprefix("data: "))
    assert error["error"]["type"] == "rate_limit_error"
    assert f"tenant {TENANT} cannot pay" in error["error"]["message"]
    deltas = [json.loads(d.removeprefix("data: ")) for h, d in events if h.endswith("_delta")]
    text = "".join(d["delta"].get("text", "") for d in deltas if d["type"] == "content_block_delta")
    received = Meter.load(VOCAB).count(text)
    assert 1024 < received < 2100, received

    wait_until(lambda: rid in _settled(site), 10.0, what="the event settled")
    ev = next(e for e in site.store.iter_events() if e.request_id == rid)
    assert (ev.endpoint, ev.status, ev.error) == ("messages", 200, "insufficient_quota")
    assert (ev.input_tokens, ev.output_tokens) == (prompt, received)
    assert _usage_charges(site)[rid] == rate(prompt, PER_1M) + rate(received, PER_1M)


def test_packages_then_refusal_and_the_other_refusals(site: Site, procs: Procs) -> None:
    """A package-only tenant (hard stop) is served from its package, then refused with what
    is left; an unpriced model is 403; nothing refused is billed."""
    prompt = Meter.load(VOCAB).count_messages(MESSAGES)

    async def setup(b: Billing) -> None:
        await b.set_profile(TENANT, draw_order=["package"])
        await b.create_plan("starter", price="1.00", currency="USD", tokens=3 * (prompt + 40) + 24,
                            hard_stop=True)  # fmt: skip
        await b.topup(TENANT, "5.00", "USD")  # pays the plan; not in the usage draw order
        await b.assign(TENANT, "starter")

    site.billing(setup)
    _serve(site, procs)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 40}
    statuses = [_post(site, body) for _ in range(5)]
    # Each reserves and uses prompt + 40: three fit, 24 tokens are left for the fourth.
    assert [s for s, _ in statuses] == [200, 200, 200, 429, 429]
    msg = statuses[3][1]["error"]["message"]
    short = prompt + 40 - 24
    assert f"needs up to {short * 100 / 1e6:.4f} USD ({short} tokens) more" in msg, msg
    assert "package tokens left 24" in msg, msg

    status, err = _post(site, {"model": "unpriced", "messages": MESSAGES})
    # The package covers every model, so only the tokens beyond it would need a price.
    assert status == 429, err
    site.billing(lambda b: b.set_profile(TENANT, draw_order=["package", "wallet"]))
    wait_until(
        lambda: (
            _post(site, {"model": "unpriced", "messages": MESSAGES, "max_tokens": 40})[0] == 403
        ),
        5.0,
        what="the unpriced model to be refused as such",
    )
    status, err = _post(site, {"model": "unpriced", "messages": MESSAGES, "max_tokens": 40})
    assert (status, err["error"]["code"]) == (403, "model_not_priced"), err
    # Priced, and now paid from the wallet (once the settler has published its pot).
    wait_until(lambda: _post(site, body)[0] == 200, 5.0, what="the wallet to pay")
    rows = [e for e in site.store.iter_events() if e.status != 200]
    assert rows and all(e.input_tokens == e.output_tokens == 0 for e in rows)


def test_the_settler_process_is_restarted_and_follows_its_server(site: Site, procs: Procs) -> None:
    """The settler is a process of its own: killed, the server starts another (and admission
    keeps working); the server killed, the settler stops by itself after a last pass."""
    site.billing(lambda b: b.topup(TENANT, "1.00", "USD"))
    gw = _serve(site, procs)

    def settlers() -> list[int]:
        return [c for c in children(gw.pid) if SETTLER in _cmdline(c)]

    (first,) = settlers()
    os.kill(first, signal.SIGKILL)

    def replaced() -> bool:
        now = settlers()
        return len(now) == 1 and now[0] != first

    wait_until(replaced, 10.0, what="a new settler")
    status, body = _post(site, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 10})
    assert status == 200, body
    wait_until(lambda: len(_settled(site)) == 1, 10.0, what="the new settler to settle it")
    (second,) = settlers()
    gw.kill_group()  # kill -9 of the server (the settler has a session of its own)
    wait_until(lambda: not Path(f"/proc/{second}").exists() or _zombie(second), 10.0,
               what="the orphaned settler to stop")  # fmt: skip


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_admission_reloads_the_terms_only_when_their_marker_moves(site: Site, procs: Procs) -> None:
    """A price set through the CLI reaches a running gateway's admission within the poll
    interval (`server.key_refresh_s`, 0.5 s): the unpriced model goes from 403 to served. An
    idle gateway polls the terms' change marker and reloads nothing."""
    import subprocess
    import time

    from procs import TOKENHUB

    site.billing(lambda b: b.topup(TENANT, "5.00", "USD"))
    gw = procs.start("gateway", "serve", "--config", str(site.config),
                     env={"TOKENHUB_LOG_LEVEL": "INFO"})  # fmt: skip
    gw.wait_serving()

    def reloads() -> int:
        return gw.stderr().count("billing terms changed")

    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}
    wait_until(lambda: _post(site, body)[0] == 200, 10.0, what="the pots published")
    unpriced = {**body, "model": "unpriced"}
    status, err = _post(site, unpriced)
    assert (status, err["error"]["code"]) == (403, "model_not_priced"), err
    # Idle (and serving): six polls of the marker, and no reload.
    time.sleep(3.0)
    assert _post(site, body)[0] == 200
    assert reloads() == 0, gw.stderr()

    r = subprocess.run(
        [TOKENHUB, "prices", "set", "unpriced", "--currency", "USD", "--input", "1",
         "--output", "1", "--db", site.db],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    wait_until(lambda: _post(site, unpriced)[0] == 200, 5.0, interval=0.05, what="the new price")
    seen = time.monotonic() - t0
    assert seen < 1.5, seen  # one poll interval (0.5 s), plus requests on a busy machine
    assert reloads() == 1, gw.stderr()
    time.sleep(2.0)
    assert reloads() == 1, gw.stderr()


def test_a_clean_stop_settles_its_last_requests(site: Site, procs: Procs) -> None:
    """SIGTERM right after a burst: the server's last events reach the database before its
    settler's last pass, so the stop leaves nothing unsettled (it used to leave the events of
    its last moments for the next start)."""
    site.billing(lambda b: b.topup(TENANT, "100.00", "USD"))
    gw = _serve(site, procs)
    outcomes = asyncio.run(fire(site.url, site.secret, 60, MESSAGES, MAX_TOKENS))
    assert all(o.status == 200 for o in outcomes), [o.status for o in outcomes]
    assert gw.stop() == 0, gw.stderr()
    ids = {str(o.request_id) for o in outcomes}
    assert {e.request_id for e in site.store.iter_events()} >= ids
    assert set(_settled(site)) >= ids, len(ids - set(_settled(site)))
