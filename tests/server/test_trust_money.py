"""The money path against hostile upstreams and clients (issue 11): `tokenhub serve` with money
admission, its settler, and a scripted upstream that misbehaves on purpose, by model:

- failed requests (upstream 429, 400, 500, connection refused, timeout) bill nothing, and ten
  429s in a row leave no overrun;
- admission reserves the true worst case (n choices x the cap, the smaller of max_tokens and
  max_completion_tokens, the deployment's cap when neither is set) and sends that cap upstream;
  streamed legacy `function_call` deltas count;
- a client that leaves a stream gets status 499 and is billed no more than was reserved;
- replies that are not completions (invalid JSON, a 200 carrying an `error`, a redirect, JSON
  to a stream request) are 502 in OpenAI's shape and bill nothing.

One gateway serves the module; each test has a tenant (and wallet) of its own.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from harness import LoopThread, _serve, free_port, wait_until
from procs import Proc, Procs

from tokenhub.billing.ledger import balances
from tokenhub.billing.pots import TRANCHE, money_pot
from tokenhub.billing.service import Billing
from tokenhub.db.database import open_database
from tokenhub.meter import Meter
from tokenhub.money import rate
from tokenhub.quota import Quota
from tokenhub.store import Store, open_store
from tokenhub.usage import UsageEvent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/dev/shm quota table")

VOCAB = "cl100k_base"
PER_1M = 100_000_000_000  # 100 USD per 1M tokens, in and out: 0.0001 USD a token
USD = 1_000_000_000
WORD = " hello"  # one cl100k token, so a reply of k words is k tokens
DEFAULT_OUT = 3_000  # what the upstream writes per choice when it is asked for no cap
CAPPED = 500  # the "capped" deployment's max_output_tokens
PACED_OUT = 6_000  # the long stream a client walks away from
SECRET_IN_ERROR = "sk-upstream-secret-1234"
_tenants = count(1)


# -- the scripted upstream -------------------------------------------------------------------


@dataclass
class Seen:
    """What the upstream was asked, and what it generated (what the operator pays for)."""

    body: dict[str, Any]
    generated: int = 0
    finished: bool = False


class Upstream:
    """An OpenAI-compatible upstream whose behaviour is the requested model's name."""

    def __init__(self) -> None:
        self.seen: dict[str, Seen] = {}  # by the gateway's x-request-id
        self.meter = Meter.load(VOCAB)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen = self.seen[request.headers.get("x-request-id", "")] = Seen(body)
        model = body["model"]
        if model in ("e429", "e400", "e500"):
            status = int(model[1:])
            return web.json_response(
                {"error": {"message": f"scripted {status}", "type": "x", "code": f"c{status}"}},
                status=status,
            )
        if model == "hang":
            await asyncio.sleep(30)
        if model == "badjson":
            return web.Response(text="<html>upstream maintenance</html>", content_type="text/html")
        if model == "error200":
            err = {"message": f"quota exceeded for key {SECRET_IN_ERROR}", "type": "server_error"}
            return web.json_response({"error": err})
        if model == "redirect":
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
        prompt = self.meter.count_messages(body["messages"])
        # Honours max_tokens only (never max_completion_tokens), and n.
        per_choice = body.get("max_tokens") or (PACED_OUT if model == "paced" else DEFAULT_OUT)
        n = body.get("n") or 1
        usage = {"prompt_tokens": prompt, "completion_tokens": n * per_choice,
                 "total_tokens": prompt + n * per_choice}  # fmt: skip
        if not body.get("stream") or model == "jsonstream":
            seen.generated, seen.finished = n * per_choice, True
            choices = [
                {"index": i, "message": {"role": "assistant", "content": WORD * per_choice},
                 "finish_reason": "length"}
                for i in range(n)
            ]  # fmt: skip
            return web.json_response({"id": "c", "object": "chat.completion", "model": model,
                                      "choices": choices, "usage": usage})  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        step = 25 if model == "paced" else 200
        sent = 0
        first = True
        while sent < per_choice:
            k = min(step, per_choice - sent)
            if model == "fcall":  # the legacy (pre-tools) function call
                fc: dict[str, str] = {"arguments": WORD * k}
                if first:
                    fc["name"] = "f"
                delta: dict[str, Any] = {"function_call": fc}
            else:
                delta = {"content": WORD * k}
            first = False
            chunk = {"id": "c", "object": "chat.completion.chunk",
                     "choices": [{"index": i, "delta": delta} for i in range(n)]}  # fmt: skip
            try:
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            except ConnectionError:
                return resp  # the gateway went away: stop generating
            sent += k
            seen.generated = n * sent
            if model in ("paced", "fcall"):  # separate reads at the gateway, even on a slow box
                await asyncio.sleep(0.01)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        seen.finished = True
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp


# -- the gateway -----------------------------------------------------------------------------

MODELS = ["served", "paced", "fcall", "e429", "e400", "e500", "badjson", "error200",
          "redirect", "jsonstream"]  # fmt: skip


def _config(tmp: Path, port: int, db: Path, upstream: str) -> Path:
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
database = "{db}"
journal_dir = "{tmp / "journal"}"
key_refresh_s = 0.2

[billing]
settle_interval_s = 0.3
admission = true

[[providers]]
name = "scripted"
base_url = "{upstream}/v1"

[[providers]]
name = "slow"
base_url = "{upstream}/v1"
read_timeout_s = 0.5

[[providers]]
name = "dead"
base_url = "http://127.0.0.1:{free_port()}/v1"
connect_timeout_s = 1.0
"""

    def model(mid: str, provider: str, upstream_model: str, extra: str = "") -> str:
        return f"""
[[models]]
id = "{mid}"
max_attempts = 1
  [[models.deployments]]
  provider = "{provider}"
  upstream_model = "{upstream_model}"
  vocab = "{VOCAB}"
  {extra}
"""

    for m in MODELS:
        text += model(m, "scripted", m)
    text += model("capped", "scripted", "served", f"max_output_tokens = {CAPPED}")
    text += model("hang", "slow", "hang")
    text += model("refused", "dead", "served")
    config = tmp / "tokenhub.toml"
    config.write_text(text, encoding="utf-8")
    return config


@dataclass
class Gateway:
    base: str
    db: str
    store: Store
    upstream: Upstream
    proc: Proc

    def billing(self, fn: Any) -> Any:
        """Runs `await fn(Billing)` on the gateway's database (as the CLI would)."""

        async def run() -> Any:
            db = await open_database(self.db)
            try:
                return await fn(Billing(db))
            finally:
                await db.close()

        return asyncio.run(run())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("trust-money")
    loop = LoopThread()
    upstream = Upstream()
    procs = Procs(tmp)
    store: Store | None = None
    try:
        runner, base = loop.call(_serve(upstream.app()))
        port = free_port()
        db = tmp / "hub.db"
        config = _config(tmp, port, db, base)
        store = open_store(str(db))
        store.migrate()
        gw = Gateway(f"http://127.0.0.1:{port}", str(db), store, upstream, procs.start(
            "gateway", "serve", "--config", str(config)))  # fmt: skip

        async def prices(b: Billing) -> None:
            for m in [*MODELS, "capped", "hang", "refused"]:
                await b.set_price(m, currency="USD", input_per_1m="100", output_per_1m="100",
                                  effective_ms=0)  # fmt: skip

        gw.billing(prices)
        gw.proc.wait_serving()
        yield gw
        loop.call(runner.cleanup())
    finally:
        procs.close()
        loop.close()
        if store is not None:
            store.close()


@dataclass
class Tenant:
    gw: Gateway
    name: str
    secret: str
    wallet: int  # nanos

    def post(self, body: dict[str, Any]) -> tuple[int, str, Any]:
        """(status, x-request-id, JSON body) of a chat completion."""
        req = urllib.request.Request(
            self.gw.base + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, resp.headers["x-request-id"], json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers["x-request-id"], json.loads(e.read() or b"{}")

    def events(self) -> dict[str, UsageEvent]:
        return {e.request_id: e for e in self.gw.store.iter_events() if e.tenant == self.name}

    def settled(self, ids: set[str], timeout: float = 15.0) -> dict[str, UsageEvent]:
        """Waits until the settler has settled these events; the tenant's events."""

        def done() -> bool:
            rows = self.gw.billing(
                lambda b: b.db.transaction(lambda tx: tx.fetch("SELECT event_id FROM settlements"))
            )
            return ids <= {r[0] for r in rows}

        wait_until(done, timeout, interval=0.1, what=f"{len(ids)} events settled")
        return self.events()

    def ledger(self) -> dict[str, int]:
        return dict(
            self.gw.billing(lambda b: b.db.transaction(lambda tx: balances(tx, tenant=self.name)))
        )

    def charges(self) -> dict[str, int]:
        """Each usage transaction's money (wallet and overrun together), by event id."""
        rows = self.gw.billing(
            lambda b: b.db.transaction(
                lambda tx: tx.fetch(
                    "SELECT t.ref, SUM(p.amount) FROM ledger_txns t "
                    "JOIN postings p ON p.txn_id = t.id WHERE t.kind = 'usage' AND t.tenant = $1 "
                    "AND (p.account LIKE 't:%:wallet:%' OR p.account LIKE 't:%:overrun:%') "
                    "GROUP BY t.ref",
                    self.name,
                )
            )
        )
        return {r: abs(int(a)) for r, a in rows}

    def check_books(self, spent: int) -> None:
        """The wallet paid exactly `spent`, nothing went to overrun, and the admission pot
        ends equal to the ledger."""
        bal = self.ledger()
        assert bal.get(f"t:{self.name}:overrun:USD", 0) == 0, bal
        assert -bal[f"t:{self.name}:wallet:USD"] == self.wallet - spent, bal
        table = Quota.attach(f"/dev/shm/tokenhub-quota-{self.gw.proc.pid}")

        def pot_matches() -> bool:
            s = table.state(money_pot(self.name)).money
            return (s.limit, s.used, s.held) == (self.wallet - spent, 0, 0)

        wait_until(pot_matches, 5.0, what="the pot to equal the ledger")


@pytest.fixture
def tenant(gateway: Gateway) -> Any:
    def make(wallet_usd: str) -> Tenant:
        name = f"t{next(_tenants)}"
        gateway.store.create_tenant(name)
        _, secret = gateway.store.create_key(name)

        async def setup(b: Billing) -> None:
            await b.set_profile(name, currency="USD", draw_order=["wallet", "postpaid"])
            await b.topup(name, wallet_usd, "USD")

        gateway.billing(setup)
        t = Tenant(gateway, name, secret, int(float(wallet_usd) * 100) * USD // 100)
        table = Quota.attach(f"/dev/shm/tokenhub-quota-{gateway.proc.pid}")

        def ready() -> bool:  # the key is known and the settler has published the wallet
            if table.state(money_pot(name)).money.limit != t.wallet:
                return False
            req = urllib.request.Request(
                gateway.base + "/v1/models", headers={"Authorization": f"Bearer {secret}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=5):
                    return True
            except urllib.error.HTTPError:
                return False

        wait_until(ready, 10.0, interval=0.05, what="the tenant to be known and funded")
        return t

    return make


def _messages(words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "hello" + WORD * (words - 1)}]


def _price(tokens: int) -> int:
    return rate(tokens, PER_1M)


# -- item 1: failed requests are billed nothing ----------------------------------------------


def test_failed_requests_bill_nothing_and_429s_leave_no_overrun(
    gateway: Gateway, tenant: Any
) -> None:
    t = tenant("1.00")  # 10,000 tokens
    messages = _messages(2_000)  # ~0.2 USD of prompt each: ten such 429s once left 1 USD overrun
    prompt = Meter.load(VOCAB).count_messages(messages)
    expected: dict[str, tuple[int, str]] = {}
    for _ in range(10):
        status, rid, body = t.post({"model": "e429", "messages": messages, "max_tokens": 10})
        assert status == 429 and body["error"]["code"] == "c429", body
        expected[rid] = (429, "c429")
    for model, status, code in [
        ("e400", 400, "c400"),
        ("e500", 502, "upstream_error"),
        ("refused", 502, "upstream_error"),
        ("hang", 504, "upstream_timeout"),
    ]:
        got, rid, body = t.post({"model": model, "messages": messages, "max_tokens": 10})
        assert (got, body["error"]["code"]) == (status, code), (model, body)
        expected[rid] = (status, code)
    events = t.settled(set(expected))
    for rid, (status, code) in expected.items():
        ev = events[rid]
        # The event keeps the metered prompt (telemetry); nothing of it is billed.
        assert (ev.status, ev.error, ev.input_tokens, ev.output_tokens) == (
            status, code, prompt, 0)  # fmt: skip
    assert t.charges() == {}
    t.check_books(0)

    # What is served is still billed, exactly.
    status, rid, body = t.post({"model": "served", "messages": messages, "max_tokens": 10})
    assert status == 200, body
    t.settled({rid})
    assert t.charges() == {rid: _price(prompt + 10)}
    t.check_books(_price(prompt + 10))


# -- item 3: the worst case is reserved, and its cap sent upstream ---------------------------


def test_n_choices_are_reserved(gateway: Gateway, tenant: Any) -> None:
    t = tenant("0.50")  # 5,000 tokens
    messages = _messages(10)
    prompt = Meter.load(VOCAB).count_messages(messages)
    # 8 x 1,000 cannot be paid: refused (admitting it reserved one choice and overran).
    status, rid, body = t.post({"model": "served", "messages": messages, "max_tokens": 1000,
                                "n": 8})  # fmt: skip
    assert (status, body["error"]["code"]) == (429, "insufficient_quota"), body
    assert rid not in gateway.upstream.seen
    # 4 x 1,000 can: served, and billed all four choices.
    status, rid, body = t.post({"model": "served", "messages": messages, "max_tokens": 1000,
                                "n": 4})  # fmt: skip
    assert status == 200 and len(body["choices"]) == 4, body
    assert body["usage"]["completion_tokens"] == 4_000
    t.settled({rid})
    t.check_books(_price(prompt + 4_000))
    status, _, body = t.post({"model": "served", "messages": messages, "n": 0})
    assert (status, body["error"]["param"]) == (400, "n"), body


@pytest.mark.parametrize(
    ("model", "asked", "sent"),
    [
        # The smaller of the two is the cap, sent in both fields (this upstream reads max_tokens).
        ("served", {"max_completion_tokens": 100, "max_tokens": 20_000},
         {"max_completion_tokens": 100, "max_tokens": 100}),
        ("served", {"max_completion_tokens": 100}, {"max_completion_tokens": 100}),
        # No cap asked: the deployment's, sent as max_tokens.
        ("capped", {}, {"max_tokens": CAPPED}),
        ("capped", {"max_tokens": 20_000}, {"max_tokens": CAPPED}),
    ],
)  # fmt: skip
def test_the_reserved_cap_is_sent_upstream(
    gateway: Gateway, tenant: Any, model: str, asked: dict[str, int], sent: dict[str, int]
) -> None:
    t = tenant("1.00")
    messages = _messages(10)
    prompt = Meter.load(VOCAB).count_messages(messages)
    status, rid, body = t.post({"model": model, "messages": messages, **asked})
    assert status == 200, body
    upstream_body = gateway.upstream.seen[rid].body
    got = {
        k: upstream_body[k] for k in ("max_tokens", "max_completion_tokens") if k in upstream_body
    }
    assert got == sent
    out = body["usage"]["completion_tokens"]
    assert out == sent.get("max_tokens", DEFAULT_OUT), body["usage"]
    t.settled({rid})
    t.check_books(_price(prompt + out))


def test_streamed_legacy_function_call_is_counted(gateway: Gateway, tenant: Any) -> None:
    t = tenant("0.20")  # 2,000 tokens: the 3,000-token call cannot be paid in full
    messages = _messages(10)
    prompt = Meter.load(VOCAB).count_messages(messages)

    async def read() -> tuple[str, list[dict[str, Any]]]:
        body = {"model": "fcall", "messages": messages, "stream": True, "max_tokens": 3_000}
        headers = {"Authorization": f"Bearer {t.secret}"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(gateway.base + "/v1/chat/completions", json=body, headers=headers) as r,
        ):
            assert r.status == 200
            data = await r.read()
            return r.headers["x-request-id"], [
                json.loads(x[6:]) for x in data.split(b"\n\n") if x.startswith(b"data: {")
            ]

    rid, chunks = asyncio.run(read())
    assert chunks[-1]["error"]["code"] == "insufficient_quota", chunks[-1]
    args = "".join(
        c["delta"]["function_call"].get("arguments", "")
        for ch in chunks[:-1]
        for c in ch["choices"]
    )
    # The name arrives with the first chunk; nothing at all if the first read was already too big.
    received = Meter.load(VOCAB).count("f" + args) if chunks[:-1] else 0
    # Cut short (uncounted, the call ran to its 3,000 tokens and the wallet into overrun), at
    # a read boundary: a read the contracts cannot pay for in full is not sent.
    assert 0 < received < 2_000, received
    events = t.settled({rid})
    ev = events[rid]
    assert (ev.status, ev.error, ev.output_tokens) == (200, "insufficient_quota", received)
    assert ev.ttft_ms is not None  # the relay sees the call's text as the first token, too
    t.check_books(_price(prompt + received))


# -- item 4: a client that leaves ------------------------------------------------------------


def test_a_client_that_leaves_is_499_and_billed_within_its_reservation(
    gateway: Gateway, tenant: Any
) -> None:
    t = tenant("0.50")  # 5,000 tokens; the upstream generates 6,000 whatever happens
    messages = _messages(10)
    prompt = Meter.load(VOCAB).count_messages(messages)

    async def walk_away() -> tuple[str, int]:
        body = {"model": "paced", "messages": messages, "stream": True, "max_tokens": PACED_OUT}
        headers = {"Authorization": f"Bearer {t.secret}"}
        received = 0
        async with (
            aiohttp.ClientSession() as s,
            s.post(gateway.base + "/v1/chat/completions", json=body, headers=headers) as r,
        ):
            assert r.status == 200
            rid = r.headers["x-request-id"]
            async for line in r.content:
                if line.startswith(b"data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        received += Meter.load(VOCAB).count(c["delta"].get("content") or "")
                if received >= 100:
                    break  # and the connection is closed, mid-stream
        return rid, received

    rid, received = asyncio.run(walk_away())
    assert 100 <= received < TRANCHE
    # The gateway drains the upstream to its end: the operator pays for all of it.
    wait_until(lambda: gateway.upstream.seen[rid].finished, 15.0, what="the upstream to finish")
    assert gateway.upstream.seen[rid].generated == PACED_OUT
    ev = t.settled({rid})[rid]
    assert (ev.status, ev.error) == (499, "client_disconnected"), ev
    # Billed what was held when the client left (whole tranches), not the 6,000 generated.
    # How many tranches were held by then depends on how soon the gateway saw the client go
    # (one or two on an idle machine; more on a loaded one), never on what the drain read.
    assert ev.input_tokens == prompt
    assert ev.output_tokens % TRANCHE == 0 and TRANCHE <= ev.output_tokens < PACED_OUT, ev
    t.check_books(_price(prompt + ev.output_tokens))


# -- item 5: replies that are not completions ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "stream"),
    [("badjson", False), ("error200", False), ("redirect", False), ("jsonstream", True)],
)
def test_replies_that_are_not_completions_are_502_and_not_billed(
    gateway: Gateway, tenant: Any, model: str, stream: bool
) -> None:
    t = tenant("1.00")
    body: dict[str, Any] = {"model": model, "messages": _messages(10), "max_tokens": 10}
    if stream:
        body["stream"] = True
    status, rid, reply = t.post(body)
    assert status == 502, reply
    err = reply["error"]
    assert (err["type"], err["code"]) == ("api_error", "upstream_error"), err
    assert err["message"].startswith("The upstream provider failed: "), err
    assert SECRET_IN_ERROR not in json.dumps(reply)
    assert rid in gateway.upstream.seen  # it did go upstream
    ev = t.settled({rid})[rid]
    assert (ev.status, ev.error, ev.output_tokens) == (502, "upstream_error", 0), ev
    assert t.charges() == {}
    t.check_books(0)
