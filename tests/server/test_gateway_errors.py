"""Every error a client can get, in OpenAI's shape and with the SDK's exception types. Bad
requests change nothing (no usage event, nothing sent upstream); upstream failures leave
exactly one event with the status and no output tokens."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from harness import (
    IGNORE_REQUEST_KEY_WARNING,
    MAX_BODY_BYTES,
    RETRY_AFTER_S,
    SLOW_READ_TIMEOUT_S,
    TENANT,
    Hub,
    overhead_ms,
    wait_until,
)

from tokenhub.gateway.protocol import ConnectionLimits, GatewayRunner

pytestmark = IGNORE_REQUEST_KEY_WARNING

MESSAGES: Any = [{"role": "user", "content": "hello"}]  # the SDK's message params


def check_error(body: Any, *, type: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, nothing else."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if type is not None:
        assert err["type"] == type
    if code is not None:
        assert err["code"] == code
    return dict(err)


def check_sdk_error(exc: openai.APIStatusError, status: int, code: str) -> dict[str, Any]:
    assert exc.status_code == status
    assert exc.code == code
    assert exc.response.headers["x-request-id"].startswith("req_")
    overhead_ms(exc.response.headers)
    return check_error(exc.response.json(), code=code)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class NothingHappens:
    """Asserts that requests made inside the block sent nothing to the healthy upstream and
    left no usage event, or with `refused` (the gateway refused them, with a known key) one
    refusal event each: its status, no tokens, no deployment (the tenant's log is complete)."""

    def __init__(self, hub: Hub, *, refused: bool = False) -> None:
        self.hub = hub
        self.refused = refused
        self.request_ids: list[str] = []

    def __enter__(self) -> NothingHappens:
        self.before = self.hub.settle()
        self.served = self.hub.ledger()["totals"]["requests"]
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        after = self.hub.settle()
        recorded = len(self.request_ids) if self.refused else 0
        assert after["events_received"] - self.before["events_received"] == recorded
        assert self.hub.ledger()["totals"]["requests"] == self.served
        events = self.hub.events()
        if not self.refused:
            assert not [r for r in self.request_ids if r in events]
        for r in self.request_ids if self.refused else ():
            ev = events[r]
            assert ev.status >= 400 and ev.error, ev
            assert (ev.input_tokens, ev.output_tokens, ev.deployment) == (0, 0, ""), ev


@pytest.fixture
def nothing_happens(hub: Hub) -> Iterator[NothingHappens]:
    with NothingHappens(hub) as n:
        yield n


# -- 401 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer th-not-a-key-of-ours-at-all"],
)
async def test_missing_or_malformed_key(
    hub: Hub, http: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with NothingHappens(hub) as n:
        for path, body in [
            ("/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES}),
            ("/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ]:
            async with http.post(hub.url + path, json=body, headers=headers) as resp:
                assert resp.status == 401
                assert resp.content_type == "application/json"
                n.request_ids.append(resp.headers["x-request-id"])
                check_error(await resp.json(), type="invalid_request_error", code="invalid_api_key")
        async with http.get(hub.url + "/models", headers=headers) as resp:
            assert resp.status == 401
            check_error(await resp.json(), code="invalid_api_key")


def test_wrong_key(hub: Hub, nothing_happens: NothingHappens) -> None:
    with hub.client(api_key=hub.secret + "x") as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        nothing_happens.request_ids.append(e.value.response.headers["x-request-id"])
        check_sdk_error(e.value, 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_revoked_key(hub: Hub) -> None:
    key, secret = hub.store.create_key(TENANT)
    with hub.client(api_key=secret) as c:

        def works() -> bool:
            try:
                c.models.list()
            except openai.AuthenticationError:
                return False
            return True

        wait_until(works, 3.0, what="the new key to work")
        hub.store.revoke_key(key.id)

        def refused() -> bool:
            return not works()

        wait_until(refused, 3.0, what="the revoked key to be refused")
        with NothingHappens(hub) as n:
            with pytest.raises(openai.AuthenticationError) as e:
                c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            n.request_ids.append(e.value.response.headers["x-request-id"])
            check_sdk_error(e.value, 401, "invalid_api_key")


# -- 400 ----------------------------------------------------------------------------------------

OK = {"model": "gpt-4o-mini", "messages": MESSAGES}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", b'{"model": "gpt-4o-mini", "messages": [', None),
        ("/chat/completions", b"", None),
        ("/chat/completions", json.dumps([OK]).encode(), None),
        ("/chat/completions", json.dumps("a string").encode(), None),
        ("/chat/completions", json.dumps({"messages": MESSAGES}).encode(), "model"),
        ("/chat/completions", json.dumps({**OK, "model": ""}).encode(), "model"),
        ("/chat/completions", json.dumps({**OK, "model": 4}).encode(), "model"),
        ("/chat/completions", json.dumps({"model": "gpt-4o-mini"}).encode(), "messages"),
        ("/chat/completions", json.dumps({**OK, "messages": []}).encode(), "messages"),
        ("/chat/completions", json.dumps({**OK, "messages": "hi"}).encode(), "messages"),
        ("/chat/completions", json.dumps({**OK, "stream": "yes"}).encode(), "stream"),
        ("/chat/completions", json.dumps({**OK, "stream": 1}).encode(), "stream"),
        (
            "/chat/completions",
            json.dumps({**OK, "stream": True, "stream_options": "usage"}).encode(),
            "stream_options",
        ),
        ("/completions", json.dumps({"model": "gpt-3.5-turbo-instruct"}).encode(), "prompt"),
        (
            "/embeddings",
            json.dumps({"model": "text-embedding-3-small", "input": "x", "stream": True}).encode(),
            "stream",
        ),
        ("/embeddings", json.dumps({"model": "text-embedding-3-small"}).encode(), "input"),
    ],
)
async def test_bad_request(
    hub: Hub, http: aiohttp.ClientSession, path: str, body: bytes, param: str | None
) -> None:
    headers = {**hub.auth, "Content-Type": "application/json"}
    with NothingHappens(hub, refused=True) as n:
        async with http.post(hub.url + path, data=body, headers=headers) as resp:
            assert resp.status == 400
            n.request_ids.append(resp.headers["x-request-id"])
            overhead_ms(resp.headers)
            err = check_error(await resp.json(), type="invalid_request_error")
            assert err["param"] == param


# -- 404, 405, 413 -------------------------------------------------------------------------------


def test_unknown_model(hub: Hub, client: openai.OpenAI) -> None:
    with NothingHappens(hub, refused=True) as n:
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-5-imaginary", messages=MESSAGES)
        n.request_ids.append(e.value.response.headers["x-request-id"])
        err = check_sdk_error(e.value, 404, "model_not_found")
        assert err["param"] == "model" and "gpt-5-imaginary" in err["message"]
        with pytest.raises(openai.NotFoundError) as e:
            client.embeddings.create(model="no-such-embedder", input="x")
        n.request_ids.append(e.value.response.headers["x-request-id"])


async def test_unknown_url_and_wrong_method(hub: Hub, http: aiohttp.ClientSession) -> None:
    with NothingHappens(hub) as n:
        for method, url, status, code in [
            ("GET", hub.url + "/nope", 404, "unknown_url"),
            ("POST", hub.base + "/v2/chat/completions", 404, "unknown_url"),
            ("GET", hub.url + "/chat/completions", 405, "method_not_allowed"),
        ]:
            async with http.request(method, url, json=OK, headers=hub.auth) as resp:
                assert resp.status == status, (method, url)
                n.request_ids.append(resp.headers["x-request-id"])
                check_error(await resp.json(), code=code)


async def test_oversized_body(hub: Hub, http: aiohttp.ClientSession) -> None:
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 20_000}]}
    with NothingHappens(hub, refused=True) as n:
        async with http.post(hub.url + "/chat/completions", json=big, headers=hub.auth) as resp:
            assert resp.status == 413
            n.request_ids.append(resp.headers["x-request-id"])
            err = check_error(await resp.json(), code="request_too_large")
            assert str(MAX_BODY_BYTES) in err["message"]


# -- upstream failures: exactly one event each ---------------------------------------------------


def one_failed_event(hub: Hub, rid: str, before: dict[str, float], status: int, error: str) -> Any:
    event = hub.event(rid)
    after = hub.settle()
    assert after["events_received"] - before["events_received"] == 1
    assert (event.status, event.error, event.output_tokens) == (status, error, 0)
    assert (event.tenant, event.key_id) == (TENANT, hub.key_id)
    assert event.latency_ms > 0
    # The only count on a failed request is the meter's estimate of the prompt.
    assert event.input_tokens > 0
    assert event.source == "metered"
    return event


def _create(client: openai.OpenAI, model: str, stream: bool) -> None:
    if stream:
        with client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            stream=True,
        ) as s:
            list(s)
    else:
        client.chat.completions.create(model=model, messages=MESSAGES)


@pytest.mark.parametrize("stream", [False, True])
def test_rate_limit_is_passed_through(hub: Hub, client: openai.OpenAI, stream: bool) -> None:
    before = hub.settle()
    with pytest.raises(openai.RateLimitError) as e:
        _create(client, "limited", stream)
    assert e.value.response.headers["retry-after"] == str(RETRY_AFTER_S)
    err = check_sdk_error(e.value, 429, "rate_limit_exceeded")
    assert err["type"] == "requests"  # the upstream's own body
    rid = e.value.response.headers["x-request-id"]
    event = one_failed_event(hub, rid, before, 429, "rate_limit_exceeded")
    assert (event.deployment, event.attempts) == ("limited/gpt-4o-mini", 1)
    assert hub.ledger_entry(rid, "limited")["status"] == 429


@pytest.mark.parametrize("stream", [False, True])
def test_every_deployment_fails(hub: Hub, client: openai.OpenAI, stream: bool) -> None:
    before = hub.settle()
    with pytest.raises(openai.InternalServerError) as e:
        _create(client, "broken", stream)
    err = check_sdk_error(e.value, 502, "upstream_error")
    assert err["type"] == "api_error"
    rid = e.value.response.headers["x-request-id"]
    event = one_failed_event(hub, rid, before, 502, "upstream_error")
    assert event.attempts == 2
    assert hub.ledger_entry(rid, "err500")["status"] == 500


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_timeout(hub: Hub, client: openai.OpenAI, stream: bool) -> None:
    before = hub.settle()
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        _create(client, "slow", stream)
    elapsed = time.monotonic() - t0
    assert SLOW_READ_TIMEOUT_S <= elapsed < 1.2  # the provider's read timeout, not the mock's
    err = check_sdk_error(e.value, 504, "upstream_timeout")
    assert err["type"] == "api_error"
    event = one_failed_event(
        hub, e.value.response.headers["x-request-id"], before, 504, "upstream_timeout"
    )
    assert (event.deployment, event.attempts) == ("slow/gpt-4o-mini", 1)


@pytest.mark.parametrize(
    ("target", "anthropic_shape"),
    [
        (b"/v1/messages", True),
        (b"/v1/messages/count_tokens?beta=true", True),
        (b"/v1/chat/completions", False),
        (b"/v1/responses", False),
    ],
)
@pytest.mark.parametrize("bad", [b"x-api-key: sk-secret-123\x01", b"Authorization: Bearer \x00k"])
async def test_malformed_http_is_answered_in_the_paths_dialect(
    target: bytes, anthropic_shape: bool, bad: bytes
) -> None:
    """A request head aiohttp cannot parse (a control byte in a header) gets a 400 in the
    dialect of its path, as the error middleware renders errors (Anthropic's shape under
    /v1/messages, OpenAI's elsewhere), quoting none of the request's bytes; the connection is
    closed."""
    runner = GatewayRunner(web.Application(), ConnectionLimits())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + bad + b"\r\n")
        writer.write(b"Content-Length: 2\r\n\r\n{}")
        raw = await asyncio.wait_for(reader.read(), 5.0)  # to EOF: the connection is closed
        writer.close()
    finally:
        await runner.cleanup()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", raw
    assert b"x-request-id:" in head.lower()
    assert b"secret" not in raw and b"\x00" not in body and b"\x01" not in body
    err = json.loads(body)
    if anthropic_shape:
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
        assert "not valid HTTP/1.1" in err["error"]["message"]
    else:
        assert err["error"]["code"] == "invalid_http_request" and "type" not in err
