"""The request path's dialect plumbing, end to end: each client dialect (OpenAI chat, Anthropic's
Messages API, OpenAI's Responses API) against each upstream wire (openai, anthropic), streamed
and not, through a real gateway to the real mock upstream; errors in each dialect's shape and
nothing billed for them; x-api-key auth; count_tokens from the meter and from an Anthropic
upstream; an Azure-style provider (the key in `api-key`, `api-version` in the query) against a
real server that checks both. Below those, the seams themselves: `translate.exchange`,
`Composed`, the Upstream's headers and paths, and the usage check's cache writes.

The official SDKs' own behaviour (helpers, tool round trips, the coding-agent replay) is
tested in test_sdk_anthropic.py, test_sdk_responses.py and test_coding_agent.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import msgspec
import openai
import pytest
from aiohttp import web
from dialect_hub import ANTHROPIC_MODEL, MODELS, OPENAI_MODEL, VOCAB, DialectHub
from harness import IGNORE_REQUEST_KEY_WARNING, TENANT, _serve, wait_until

from tokenhub.billing.draw import money_pot
from tokenhub.billing.pots import TRANCHE, Contracts, new_epoch
from tokenhub.billing.terms import Price, Profile, Terms
from tokenhub.config import Provider
from tokenhub.gateway import usage_check
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.providers import WIRES
from tokenhub.gateway.translate import exchange
from tokenhub.gateway.translate.compose import Composed
from tokenhub.gateway.translate.passthrough import Passthrough
from tokenhub.gateway.upstream import Upstream
from tokenhub.meter import Meter
from tokenhub.mock import MockOptions
from tokenhub.mock import build_app as mock_app
from tokenhub.money import rate
from tokenhub.quota import Quota
from tokenhub.usage import UsageEvent, billed_lines

pytestmark = IGNORE_REQUEST_KEY_WARNING

MAX_BODY = 64 * 1024
AZURE_MODEL = "azure-gpt"
AZURE_KEY_ENV = "TOKENHUB_TEST_AZURE_KEY"
AZURE_KEY = "azure-secret-0123456789"
AZURE_BAD_MODEL = "azure-bad"
AZURE_BAD_KEY_ENV = "TOKENHUB_TEST_AZURE_BAD_KEY"
AZURE_BAD_KEY = "azure-wrong-0123456789"
API_VERSION = "2024-10-21"
REC_MODEL = "rec-claude"  # an anthropic-kind provider whose server records what it is sent
REC_KEY_ENV = "TOKENHUB_TEST_REC_KEY"
REC_KEY = "rec-secret-0123456789"
# The recorder again, each kind with auth_header = Authorization (any case): a Bearer token.
PACED_MODEL = "paced-claude"  # the recorder's slow Anthropic stream with cache writes
PACED_DELTAS = 300  # its text deltas, PACED_GAP_S apart
PACED_GAP_S = 0.004
# Its usage: far more prompt (mostly cache reads and writes) and output than was held.
PACED_USAGE = {"input_tokens": 5, "cache_creation_input_tokens": 2000,
               "cache_read_input_tokens": 1000}  # fmt: skip
PACED_OUTPUT = 3000
HANG_MODEL = "hang-chat"  # the recorder's chat stream that errs, then keeps its connection open
HANG_S = 5.0  # how long it keeps it open at most
REC_BEARER_MODEL = "rec-bearer-claude"
BRK_BEARER_MODEL = "brk-bearer-chat"
BROKEN_MODEL = "broken-chat"  # an openai-kind provider whose streams break off
NOUSAGE_MODEL = "nousage-chat"  # an openai-kind mock that sends no usage
# Models on a mock whose streams fail after STREAM_ERROR_AFTER events with the wire's own
# mid-stream error event: an openai-kind provider and an anthropic-kind one.
ERR_CHAT = "err-chat"
ERR_CLAUDE = "err-claude"
STREAM_ERROR_AFTER = 4
WIRE_MODELS = [OPENAI_MODEL, ANTHROPIC_MODEL]
QUESTION = "Why is exact token metering worth the trouble?"


# -- the servers ---------------------------------------------------------------------------------


def azure_app(seen: list[dict[str, Any]]) -> web.Application:
    """Azure OpenAI's shape: /openai/deployments/<name>/chat/completions?api-version=..., the
    key in `api-key` (no Authorization). A request without both is a 401 in Azure's shape."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if (
            request.headers.get("api-key") != AZURE_KEY
            or "Authorization" in request.headers
            or request.query.get("api-version") != API_VERSION
        ):
            return web.json_response(
                {"error": {"code": "401", "message": "Access denied due to invalid key."}},
                status=401,
            )
        reply = {
            "id": "chatcmpl-azure",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "From Azure."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
        }
        return web.json_response(reply)

    app = web.Application()
    app.router.add_post("/openai/deployments/{name}/chat/completions", chat)
    return app


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def recorder_app(seen: list[dict[str, Any]]) -> web.Application:
    """An Anthropic Messages API that records each request's headers and answers "Hi" (7
    input tokens, 1 output token); and an OpenAI chat API whose streams break off after two
    chunks (no [DONE]) and whose completions are garbled."""

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"headers": dict(request.headers), "body": body})
        message = {
            "id": "msg_rec", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 0},
        }  # fmt: skip
        if not body.get("stream"):
            message["content"] = [{"type": "text", "text": "Hi"}]
            message["stop_reason"] = "end_turn"
            message["usage"] = {"input_tokens": 7, "output_tokens": 1}
            return web.json_response(message)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse("message_start", {"type": "message_start", "message": message}))
        block = {"type": "text", "text": ""}
        await resp.write(_sse("content_block_start",
                              {"type": "content_block_start", "index": 0,
                               "content_block": block}))  # fmt: skip
        await resp.write(_sse("content_block_delta",
                              {"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": "Hi"}}))  # fmt: skip
        await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        await resp.write(_sse("message_delta",
                              {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 1}}))  # fmt: skip
        await resp.write(_sse("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp

    async def broken_chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"headers": dict(request.headers), "body": body, "path": request.path})
        if not body.get("stream"):  # a completion no translation can read
            return web.json_response({"choices": [{"message": 7}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("Half ", "a reply"):
            chunk = {
                "id": "chatcmpl-broken", "object": "chat.completion.chunk", "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }  # fmt: skip
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write_eof()  # without [DONE]: the stream broke off
        return resp

    async def paced(request: web.Request) -> web.StreamResponse:
        """A slow Messages stream whose usage has cache writes and reads (PACED_*)."""
        body = await request.json()
        message = {
            "id": "msg_paced", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**PACED_USAGE, "output_tokens": 1},
        }  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse("message_start", {"type": "message_start", "message": message}))
        await resp.write(_sse("content_block_start",
                              {"type": "content_block_start", "index": 0,
                               "content_block": {"type": "text", "text": ""}}))  # fmt: skip
        for _ in range(PACED_DELTAS):
            await asyncio.sleep(PACED_GAP_S)
            await resp.write(_sse("content_block_delta",
                                  {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "tok "}}))  # fmt: skip
        await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        await resp.write(_sse("message_delta",
                              {"type": "message_delta",
                               "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                               "usage": {"output_tokens": PACED_OUTPUT}}))  # fmt: skip
        await resp.write(_sse("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp

    async def erring_chat(request: web.Request) -> web.StreamResponse:
        """One chunk, OpenAI's mid-stream error chunk, then the connection held open (up to
        HANG_S) until the client closes it."""
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {
            "id": "chatcmpl-hang", "object": "chat.completion.chunk", "created": 1,
            "model": body["model"],
            "choices": [{"index": 0, "delta": {"content": "Half"}, "finish_reason": None}],
        }  # fmt: skip
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        err = {"error": {"message": "Upstream fell over.", "type": "server_error"}}
        await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.02)
        return resp

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", broken_chat)
    app.router.add_post("/paced/v1/messages", paced)
    app.router.add_post("/hang/v1/chat/completions", erring_chat)
    return app


class PipelineHub(DialectHub):
    """The dialect hub (the mock behind both wires) plus an Azure-style provider."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.azure_seen: list[dict[str, Any]] = []
        self.rec_seen: list[dict[str, Any]] = []
        super().__init__(*args, **kw)

    async def _start(self) -> None:
        runner, azure = await _serve(azure_app(self.azure_seen))
        self._runners.append(runner)
        self.azure_base = azure
        runner, rec = await _serve(recorder_app(self.rec_seen))
        self._runners.append(runner)
        self.rec_base = rec
        options = MockOptions(models={"*": ""}, omit_usage=True)
        runner, nousage = await _serve(mock_app(options), handler_cancellation=False)
        self._runners.append(runner)
        self.nousage_base = nousage
        options = MockOptions(models={"*": ""}, stream_error_after=STREAM_ERROR_AFTER)
        runner, failing = await _serve(mock_app(options), handler_cancellation=False)
        self._runners.append(runner)
        self.failing_base = failing
        await super()._start()

    async def _start_gateway(self) -> None:
        # The Azure provider and its model join the dialect hub's configuration.
        data = msgspec.to_builtins(self.config)
        data["providers"].append(
            {
                "name": "azure",
                "base_url": self.azure_base + "/openai/deployments/gpt",
                "api_key_env": AZURE_KEY_ENV,
                "auth_header": "api-key",
                "query": {"api-version": API_VERSION},
                "headers": {"x-ms-client-tag": "tokenhub-test"},
            }
        )
        # The same server with a key it refuses.
        data["providers"].append(
            {**data["providers"][-1], "name": "azure-bad", "api_key_env": AZURE_BAD_KEY_ENV}
        )
        data["providers"] += [
            {"name": "rec", "base_url": self.rec_base + "/v1", "kind": "anthropic",
             "api_key_env": REC_KEY_ENV},
            {"name": "brk", "base_url": self.rec_base + "/v1"},
            {"name": "nousage", "base_url": self.nousage_base + "/v1"},
            {"name": "rec-bearer", "base_url": self.rec_base + "/v1", "kind": "anthropic",
             "api_key_env": REC_KEY_ENV, "auth_header": "authorization"},
            {"name": "brk-bearer", "base_url": self.rec_base + "/v1",
             "api_key_env": REC_KEY_ENV, "auth_header": "AUTHORIZATION"},
            {"name": "paced", "base_url": self.rec_base + "/paced/v1", "kind": "anthropic",
             "api_key_env": REC_KEY_ENV},
            {"name": "hang", "base_url": self.rec_base + "/hang/v1"},
            {"name": "err-oai", "base_url": self.failing_base + "/v1"},
            {"name": "err-ant", "base_url": self.failing_base + "/v1", "kind": "anthropic"},
        ]  # fmt: skip
        for model, provider in (
            (AZURE_MODEL, "azure"),
            (AZURE_BAD_MODEL, "azure-bad"),
            (REC_MODEL, "rec"),
            (BROKEN_MODEL, "brk"),
            (NOUSAGE_MODEL, "nousage"),
            (PACED_MODEL, "paced"),
            (HANG_MODEL, "hang"),
            (REC_BEARER_MODEL, "rec-bearer"),
            (BRK_BEARER_MODEL, "brk-bearer"),
            (ERR_CHAT, "err-oai"),
            (ERR_CLAUDE, "err-ant"),
        ):
            data["models"].append(
                {
                    "id": model,
                    "deployments": [
                        {"provider": provider, "upstream_model": "gpt-4o-mini", "vocab": VOCAB}
                    ],
                }
            )
        self.config = msgspec.convert(data, type(self.config))
        await super()._start_gateway()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineHub]:
    os.environ[AZURE_KEY_ENV] = AZURE_KEY
    os.environ[AZURE_BAD_KEY_ENV] = AZURE_BAD_KEY
    os.environ[REC_KEY_ENV] = REC_KEY
    h = PipelineHub(tmp_path_factory.mktemp("dialects"), max_body_bytes=MAX_BODY)
    try:
        yield h
    finally:
        h.close()
        os.environ.pop(AZURE_KEY_ENV, None)
        os.environ.pop(AZURE_BAD_KEY_ENV, None)
        os.environ.pop(REC_KEY_ENV, None)


@pytest.fixture(scope="module")
def meter() -> Meter:
    return Meter.load(VOCAB)


def post(
    hub: DialectHub, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A raw POST to the gateway (the body as JSON, or bytes as given)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        hub.base + path,
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def sse_events(data: bytes) -> list[tuple[str, Any]]:
    """(event name, decoded data) of each event of an SSE body ("" name: none given)."""
    out: list[tuple[str, Any]] = []
    for block in data.decode().split("\n\n"):
        name, payload = "", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                payload += line[5:].strip()
        if payload:
            out.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return out


def check_event(
    hub: DialectHub, rid: str, *, model: str, endpoint: str, stream: bool
) -> UsageEvent:
    """The served request's event: its dialect, where it went, and that it equals the mock's
    ledger entry (prompt and completion tokens)."""
    ev = hub.event(rid)
    provider, upstream, _ = MODELS[model]
    assert (ev.endpoint, ev.model, ev.provider, ev.upstream_model) == (
        endpoint,
        model,
        provider,
        upstream,
    )
    assert (ev.status, ev.source, ev.stream) == (200, "upstream", stream)
    entry = hub.entry(rid)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        ev.input_tokens,
        ev.output_tokens,
    )
    assert ev.output_tokens > 0
    return ev


# -- each dialect over each wire -------------------------------------------------------------


@pytest.mark.parametrize("model", WIRE_MODELS)
def test_chat_completions_over_each_wire(hub: PipelineHub, meter: Meter, model: str) -> None:
    with hub.client() as c:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=40
        )
        reply = raw.parse()
        ev = check_event(hub, raw.headers["x-request-id"], model=model,
                         endpoint="chat.completions", stream=False)  # fmt: skip
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            ev.input_tokens,
            ev.output_tokens,
        )
        assert meter.count(reply.choices[0].message.content or "") == ev.output_tokens
        with c.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=40,
            stream=True, stream_options={"include_usage": True},
        ) as resp:  # fmt: skip
            rid = resp.headers["x-request-id"]
            chunks = list(resp.parse())
    ev = check_event(hub, rid, model=model, endpoint="chat.completions", stream=True)
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert len(usage) == 1
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (
        ev.input_tokens,
        ev.output_tokens,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert meter.count(text) == ev.output_tokens


@pytest.mark.parametrize("model", WIRE_MODELS)
def test_messages_over_each_wire(hub: PipelineHub, meter: Meter, model: str) -> None:
    client = hub.anthropic()
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=40, messages=[{"role": "user", "content": QUESTION}]
    )
    msg = raw.parse()
    ev = check_event(hub, raw.headers["x-request-id"], model=model, endpoint="messages",
                     stream=False)  # fmt: skip
    u = msg.usage
    read, write = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    assert (u.input_tokens + read + write, u.output_tokens) == (ev.input_tokens, ev.output_tokens)
    assert (read, write) == (ev.cached_input_tokens, ev.cache_write_tokens)
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert meter.count(text) == ev.output_tokens
    with client.messages.with_streaming_response.create(
        model=model, max_tokens=40, messages=[{"role": "user", "content": QUESTION}],
        stream=True,
    ) as resp:  # fmt: skip
        rid = resp.headers["x-request-id"]
        body = resp.read()
    ev = check_event(hub, rid, model=model, endpoint="messages", stream=True)
    events = sse_events(body)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    deltas = [d for n, d in events if n == "message_delta"]
    assert deltas and deltas[-1]["usage"]["output_tokens"] == ev.output_tokens
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert meter.count(text) == ev.output_tokens


@pytest.mark.parametrize("model", WIRE_MODELS)
def test_responses_over_each_wire(hub: PipelineHub, meter: Meter, model: str) -> None:
    with hub.client() as c:
        raw = c.responses.with_raw_response.create(
            model=model, input=QUESTION, max_output_tokens=40
        )
        r = raw.parse()
        ev = check_event(hub, raw.headers["x-request-id"], model=model, endpoint="responses",
                         stream=False)  # fmt: skip
        assert r.usage is not None
        assert (r.usage.input_tokens, r.usage.output_tokens) == (
            ev.input_tokens,
            ev.output_tokens,
        )
        assert meter.count(r.output_text) == ev.output_tokens
        with c.responses.with_streaming_response.create(
            model=model, input=QUESTION, max_output_tokens=40, stream=True
        ) as resp:
            rid = resp.headers["x-request-id"]
            events = list(resp.parse())
    ev = check_event(hub, rid, model=model, endpoint="responses", stream=True)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    done = events[-1].response
    assert done.usage is not None and done.usage.output_tokens == ev.output_tokens
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert meter.count(text) == ev.output_tokens


def test_passthrough_is_byte_for_byte(hub: PipelineHub) -> None:
    """The Messages API over an anthropic upstream: the reply is the mock's body untouched
    (its id and the upstream model's name, which a translation would not keep)."""
    status, headers, body = post(
        hub, "/v1/messages",
        {"model": ANTHROPIC_MODEL, "max_tokens": 8, "messages": MSG["messages"]},
        {"x-api-key": hub.secret},
    )  # fmt: skip
    assert status == 200, body
    reply = json.loads(body)
    assert reply["type"] == "message" and reply["model"] == MODELS[ANTHROPIC_MODEL][1]
    assert headers["x-request-id"].startswith("req_")


# -- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_x_api_key_on_every_route(hub: PipelineHub, path: str) -> None:
    body: dict[str, Any] = {"model": OPENAI_MODEL, "max_tokens": 5}
    if path == "/v1/responses":
        body = {"model": OPENAI_MODEL, "input": "hi", "max_output_tokens": 5}
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    status, headers, reply = post(hub, path, body, {"x-api-key": hub.secret})
    assert status == 200, reply
    assert hub.event(headers["x-request-id"]).status == 200
    status, headers, reply = post(hub, path, body, {"x-api-key": "th-not-a-key"})
    assert status == 401
    hub.unbilled(headers["x-request-id"])


# -- errors in each dialect's shape, nothing billed --------------------------------------------


def anthropic_error(body: bytes, kind: str) -> str:
    err = json.loads(body)
    assert err["type"] == "error" and err["error"]["type"] == kind, err
    message: str = err["error"]["message"]
    assert message
    return message


def openai_error(body: bytes, kind: str) -> str:
    err = json.loads(body)["error"]
    assert err["type"] == kind, err
    message: str = err["message"]
    assert message
    return message


MSG = {"model": OPENAI_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
RESP = {"model": OPENAI_MODEL, "input": "hi"}


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "kind"),
    [
        ("bad key", MSG, {"x-api-key": "th-wrong"}, 401, "authentication_error"),
        ("no key", MSG, {}, 401, "authentication_error"),
        ("unknown model", {**MSG, "model": "nope"}, None, 404, "not_found_error"),
        ("malformed json", b"{not json", None, 400, "invalid_request_error"),
        ("no max_tokens", {"model": OPENAI_MODEL, "messages": MSG["messages"]}, None, 400,
         "invalid_request_error"),
        ("malformed block", {**MSG, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         None, 400, "invalid_request_error"),
        ("oversized", {**MSG, "system": "x" * (MAX_BODY + 10)}, None, 413, "request_too_large"),
    ],
)  # fmt: skip
def test_messages_errors_are_anthropic_shaped(
    hub: PipelineHub,
    case: str,
    body: Any,
    headers: dict[str, str] | None,
    status: int,
    kind: str,
) -> None:
    before = hub.totals()
    got, h, reply = post(hub, "/v1/messages", body, {"x-api-key": hub.secret} if headers is None
                         else headers)  # fmt: skip
    assert got == status, reply
    message = anthropic_error(reply, kind)
    assert hub.secret not in message
    hub.unbilled(h["x-request-id"])
    assert hub.totals() == before


def test_messages_errors_through_the_sdk(hub: PipelineHub) -> None:
    with pytest.raises(anthropic.AuthenticationError) as auth:
        hub.anthropic(api_key="th-wrong").messages.create(
            model=OPENAI_MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert auth.value.body["type"] == "error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        hub.anthropic().messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "kind"),
    [
        ("bad key", RESP, {"Authorization": "Bearer th-wrong"}, 401, "invalid_request_error"),
        ("unknown model", {**RESP, "model": "nope"}, None, 404, "invalid_request_error"),
        ("malformed json", b"[1,", None, 400, "invalid_request_error"),
        ("stateful", {**RESP, "previous_response_id": "resp_1"}, None, 400,
         "invalid_request_error"),
        ("oversized", {**RESP, "input": "x" * (MAX_BODY + 10)}, None, 413,
         "invalid_request_error"),
    ],
)  # fmt: skip
def test_responses_errors_are_openai_shaped(
    hub: PipelineHub,
    case: str,
    body: Any,
    headers: dict[str, str] | None,
    status: int,
    kind: str,
) -> None:
    before = hub.totals()
    got, h, reply = post(hub, "/v1/responses", body, hub.auth if headers is None else headers)
    assert got == status, reply
    openai_error(reply, kind)
    hub.unbilled(h["x-request-id"])
    assert hub.totals() == before


def test_aiohttp_errors_in_the_paths_dialect(hub: PipelineHub) -> None:
    """Errors no handler saw (an unknown path, a wrong method) in the dialect of the path."""
    status, _, reply = post(hub, "/v1/messages/nope", MSG, {"x-api-key": hub.secret})
    assert status == 404
    anthropic_error(reply, "not_found_error")
    req = urllib.request.Request(hub.base + "/v1/messages", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
    anthropic_error(e.value.read(), "invalid_request_error")
    status, _, reply = post(hub, "/v1/responses/nope", RESP, hub.auth)
    assert status == 404
    openai_error(reply, "invalid_request_error")
    status, _, reply = post(hub, "/v1/nope", RESP, hub.auth)
    assert status == 404 and json.loads(reply)["error"]["code"] == "unknown_url"


def test_legacy_endpoints_refuse_an_anthropic_model(hub: PipelineHub) -> None:
    with hub.client() as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=ANTHROPIC_MODEL, prompt="hi", max_tokens=5)
        assert "Anthropic Messages API" in str(e.value)
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model=ANTHROPIC_MODEL, input="hi")
    hub.unbilled(e.value.response.headers["x-request-id"])


def test_upstream_error_in_the_clients_dialect(hub: PipelineHub) -> None:
    """An upstream 4xx reaches a client of another dialect in the client's shape: the Azure
    server's 401 (OpenAI's shape: a key it refuses) to a Messages client, message kept."""
    status, h, reply = post(
        hub, "/v1/messages", {**MSG, "model": AZURE_BAD_MODEL}, {"x-api-key": hub.secret}
    )
    assert status == 401
    message = anthropic_error(reply, "authentication_error")
    assert "invalid key" in message and AZURE_BAD_KEY not in message
    ev = hub.event(h["x-request-id"])
    assert ev.status == 401 and ev.error == "401" and sum(billed_lines(ev)) == 0
    # The same to an OpenAI client: the upstream's body as it was.
    status, h, reply = post(
        hub, "/v1/chat/completions", {**MSG, "model": AZURE_BAD_MODEL}, hub.auth
    )
    assert status == 401
    assert json.loads(reply) == {
        "error": {"code": "401", "message": "Access denied due to invalid key."}
    }


# -- count_tokens ---------------------------------------------------------------------------


TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def test_count_tokens_from_the_meter(hub: PipelineHub, meter: Meter) -> None:
    hub.settle()
    before = len(hub.events())
    body = {"model": OPENAI_MODEL, "system": "Be terse.", "messages": MSG["messages"]}
    status, _, reply = post(hub, "/v1/messages/count_tokens", body, {"x-api-key": hub.secret})
    assert status == 200, reply
    prompt = meter.count_messages(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    )
    assert json.loads(reply) == {"input_tokens": prompt}
    status, _, reply = post(
        hub, "/v1/messages/count_tokens", {**body, "tools": TOOLS}, {"x-api-key": hub.secret}
    )
    tools_text = msgspec.json.encode(TOOLS).decode()
    assert json.loads(reply) == {"input_tokens": prompt + meter.count(tools_text)}
    hub.settle()
    assert len(hub.events()) == before  # nothing recorded, nothing billed


def test_count_tokens_forwarded_to_an_anthropic_upstream(hub: PipelineHub) -> None:
    client = hub.anthropic()
    counted = client.messages.count_tokens(
        model=ANTHROPIC_MODEL, messages=[{"role": "user", "content": QUESTION}]
    )
    # The mock's own count, as it would bill that prompt.
    served = client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=1, messages=[{"role": "user", "content": QUESTION}]
    )
    assert counted.input_tokens == served.usage.input_tokens > 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "kind"),
    [
        ({"model": OPENAI_MODEL, "messages": MSG["messages"]}, {"x-api-key": "th-x"}, 401,
         "authentication_error"),
        ({"model": "nope", "messages": MSG["messages"]}, None, 404, "not_found_error"),
        ({"model": OPENAI_MODEL}, None, 400, "invalid_request_error"),
    ],
)  # fmt: skip
def test_count_tokens_errors(
    hub: PipelineHub, body: Any, headers: dict[str, str] | None, status: int, kind: str
) -> None:
    got, _, reply = post(
        hub, "/v1/messages/count_tokens", body,
        {"x-api-key": hub.secret} if headers is None else headers,
    )  # fmt: skip
    assert got == status, reply
    anthropic_error(reply, kind)


# -- Azure: the key in api-key, api-version in the query --------------------------------------


def test_azure_style_provider(hub: PipelineHub) -> None:
    hub.azure_seen.clear()
    with hub.client() as c:
        raw = c.chat.completions.with_raw_response.create(
            model=AZURE_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert raw.parse().choices[0].message.content == "From Azure."
    (seen,) = hub.azure_seen
    assert seen["path"] == "/openai/deployments/gpt/chat/completions"
    assert seen["query"] == {"api-version": API_VERSION}
    assert seen["headers"]["api-key"] == AZURE_KEY
    assert "Authorization" not in seen["headers"]
    assert seen["headers"]["x-ms-client-tag"] == "tokenhub-test"
    ev = hub.event(raw.headers["x-request-id"])
    assert (ev.status, ev.input_tokens, ev.output_tokens, ev.provider) == (200, 11, 3, "azure")


# -- the seams -------------------------------------------------------------------------------


def test_upstream_headers_and_paths() -> None:
    os.environ["TOKENHUB_TEST_SEAM_KEY"] = "k-0123456789"
    try:
        plain = Upstream(
            Provider(name="p", base_url="http://x/v1", api_key_env="TOKENHUB_TEST_SEAM_KEY")
        )
        assert plain.headers["Authorization"] == "Bearer k-0123456789"
        assert plain.path("/chat/completions") == "/chat/completions"
        azure = Upstream(
            Provider(
                name="a", base_url="http://x", api_key_env="TOKENHUB_TEST_SEAM_KEY",
                auth_header="api-key", headers={"x-a": "1"},
                query={"api-version": "2024-10-21", "b": "x y"},
            )
        )  # fmt: skip
        assert azure.headers["api-key"] == "k-0123456789" and azure.headers["x-a"] == "1"
        assert "Authorization" not in azure.headers
        assert azure.path("/chat/completions") == "/chat/completions?api-version=2024-10-21&b=x+y"
        assert azure.path("/m?x=1") == "/m?x=1&api-version=2024-10-21&b=x+y"
        ant = Upstream(
            Provider(name="c", base_url="http://x/v1", kind="anthropic",
                     api_key_env="TOKENHUB_TEST_SEAM_KEY")
        )  # fmt: skip
        assert ant.headers["x-api-key"] == "k-0123456789"
        assert ant.headers["anthropic-version"] == "2023-06-01"
        assert "Authorization" not in ant.headers
        keyless = Upstream(Provider(name="n", base_url="http://x/v1"))
        assert set(keyless.headers) == {"Content-Type"}
    finally:
        del os.environ["TOKENHUB_TEST_SEAM_KEY"]
    with pytest.raises(ValueError, match="unknown kind"):
        Upstream(Provider(name="z", base_url="http://x/v1", kind="gopher"))


def test_exchange() -> None:
    for dialect, wire in (("openai", "openai"), ("anthropic", "anthropic")):
        ex = exchange(dialect, wire)
        assert ex.passthrough and ex.upstream_endpoint is None
        assert exchange(dialect, wire) is ex  # made once per pair
    ex = exchange("anthropic", "openai")
    assert not ex.passthrough and ex.upstream_endpoint is not None
    assert ex.upstream_endpoint.name == "chat.completions"
    composed = exchange("responses", "anthropic")
    assert isinstance(composed.translation, Composed)
    assert (composed.translation.client, composed.translation.upstream) == (
        "responses",
        "anthropic",
    )
    assert composed.upstream_endpoint is not None
    assert composed.upstream_endpoint.name == "messages"
    with pytest.raises(ApiError) as e:
        exchange("openai", "gopher")
    assert e.value.status == 400


class Tagging:
    """A translation that tags what passes (to see the composition's order)."""

    def __init__(self, client: str, upstream: str, tag: str) -> None:
        self.client, self.upstream, self.tag = client, upstream, tag
        self.usage_asked: list[bool] = []

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "path": [*payload.get("path", []), self.tag]}

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        return body + self.tag.encode()

    def stream(self, event: UsageEvent, include_usage: bool) -> Any:
        self.usage_asked.append(include_usage)
        tag = self.tag.encode()

        class Out:
            def feed(self, events: bytes) -> bytes:
                return events + tag if events else b""

            def end(self, event: UsageEvent) -> bytes:
                return b"end" + tag

        return Out()

    def error(self, status: int, body: bytes) -> bytes:
        return body + f"{status}{self.tag}".encode()


def test_composed_order() -> None:
    outer, inner = Tagging("responses", "openai", "O"), Tagging("openai", "anthropic", "I")
    c = Composed(outer, inner)
    ev = UsageEvent(request_id="r", ts_ms=0, tenant="t", key_id="k", endpoint="responses",
                    model="m")  # fmt: skip
    assert c.request({})["path"] == ["O", "I"]
    assert c.reply(b"x", ev) == b"xIO"
    s = c.stream(ev, False)
    assert outer.usage_asked == [False] and inner.usage_asked == [True]
    assert s.feed(b"e") == b"eIO" and s.feed(b"") == b""
    assert s.end(ev) == b"endIO" + b"endO"
    assert c.error(400, b"b") == b"b400I400O"
    with pytest.raises(ValueError, match="cannot compose"):
        Composed(inner, outer)
    p = Passthrough("openai")
    assert p.request({"a": 1}) == {"a": 1} and p.reply(b"x", ev) == b"x"
    assert p.stream(ev, True).feed(b"e") == b"e" and p.error(400, b"b") == b"b"


def test_usage_check_cache_writes() -> None:
    bounds = usage_check.Bounds(1000, 100)
    usage = {
        "prompt_tokens": 500,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 300, "cache_write_tokens": 150},
    }
    assert usage_check.check(usage, bounds) == usage_check.Counts(500, 300, 10, 150)
    over = {**usage, "prompt_tokens_details": {"cached_tokens": 300, "cache_write_tokens": 201}}
    verdict = usage_check.check(over, bounds)
    assert isinstance(verdict, usage_check.Anomaly) and verdict.kind == "cached_over_input"
    bad = {**usage, "prompt_tokens_details": {"cache_write_tokens": "150"}}
    verdict = usage_check.check(bad, bounds)
    assert isinstance(verdict, usage_check.Anomaly) and verdict.kind == "not_integer"
    neg = {**usage, "prompt_tokens_details": {"cache_write_tokens": -1}}
    verdict = usage_check.check(neg, bounds)
    assert isinstance(verdict, usage_check.Anomaly) and verdict.kind == "negative"


def test_the_wires_are_registered() -> None:
    assert set(WIRES) == {"openai", "anthropic"}


def test_translated_request_without_a_cap(hub: PipelineHub) -> None:
    """The Messages API requires max_tokens: a Responses (or chat) request without a cap goes
    to an anthropic upstream with the deployment's."""
    status, h, reply = post(hub, "/v1/responses", {**RESP, "model": ANTHROPIC_MODEL}, hub.auth)
    assert status == 200, reply
    assert json.loads(reply)["status"] == "completed"
    check_event(hub, h["x-request-id"], model=ANTHROPIC_MODEL, endpoint="responses",
                stream=False)  # fmt: skip
    chat = {"model": ANTHROPIC_MODEL, "messages": MSG["messages"]}
    status, h, reply = post(hub, "/v1/chat/completions", chat, hub.auth)
    assert status == 200, reply
    check_event(hub, h["x-request-id"], model=ANTHROPIC_MODEL, endpoint="chat.completions",
                stream=False)  # fmt: skip


def test_untranslatable_request_is_refused_unbilled(hub: PipelineHub) -> None:
    """A block the chat API cannot carry (an Anthropic server tool's result) is a 400 over the
    openai wire, recorded as a refusal, the upstream never called."""
    block = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}
    body = {**MSG, "messages": [{"role": "user", "content": [block]}]}
    status, h, reply = post(hub, "/v1/messages", body, {"x-api-key": hub.secret})
    assert status == 400, reply
    anthropic_error(reply, "invalid_request_error")
    hub.unbilled(h["x-request-id"])
    assert hub.event(h["x-request-id"]).status == 400


def test_anthropic_upstream_headers_and_beta(hub: PipelineHub) -> None:
    """An anthropic-kind provider gets its key as x-api-key and anthropic-version; the client's
    anthropic-beta is forwarded on passthrough only (a translated request has no use for it)."""
    hub.rec_seen.clear()
    beta = "prompt-caching-2024-07-31"
    status, _, reply = post(
        hub, "/v1/messages", {**MSG, "model": REC_MODEL},
        {"x-api-key": hub.secret, "anthropic-beta": beta},
    )  # fmt: skip
    assert status == 200, reply
    assert json.loads(reply)["id"] == "msg_rec"  # passed through as the upstream wrote it
    chat = {"model": REC_MODEL, "messages": MSG["messages"], "max_tokens": 5}
    status, _, reply = post(hub, "/v1/chat/completions", chat, {**hub.auth, "anthropic-beta": beta})
    assert status == 200, reply
    assert json.loads(reply)["choices"][0]["message"]["content"] == "Hi"
    passed, translated = hub.rec_seen
    for seen in (passed, translated):
        h = {k.lower(): v for k, v in seen["headers"].items()}
        assert h["x-api-key"] == REC_KEY and h["anthropic-version"] == "2023-06-01"
        assert "authorization" not in h and hub.secret not in json.dumps(h)
        assert seen["body"]["model"] == "gpt-4o-mini" and seen["body"]["max_tokens"] == 5
    assert {k.lower(): v for k, v in passed["headers"].items()}["anthropic-beta"] == beta
    assert "anthropic-beta" not in {k.lower() for k in translated["headers"]}


def test_auth_header_authorization_is_a_bearer_token_for_either_kind(hub: PipelineHub) -> None:
    """auth_header = "Authorization" (any case) sends `Authorization: Bearer <key>`, for an
    anthropic-kind provider (DeepSeek's and Kimi's Anthropic-compatible endpoints) and an
    openai-kind one alike; the anthropic kind sends no x-api-key then."""
    hub.rec_seen.clear()
    status, _, reply = post(
        hub, "/v1/messages", {**MSG, "model": REC_BEARER_MODEL}, {"x-api-key": hub.secret}
    )
    assert status == 200, reply
    chat = {"model": BRK_BEARER_MODEL, "messages": MSG["messages"], "stream": True}
    status, _, reply = post(hub, "/v1/chat/completions", chat, hub.auth)
    assert status == 200, reply
    messages, completions = hub.rec_seen
    assert completions["path"] == "/v1/chat/completions" and "path" not in messages
    for seen in (messages, completions):
        h = {k.lower(): v for k, v in seen["headers"].items()}
        assert h["authorization"] == f"Bearer {REC_KEY}"
        assert "x-api-key" not in h and hub.secret not in json.dumps(h)
    assert {k.lower(): v for k, v in messages["headers"].items()}["anthropic-version"]


def test_broken_stream_ends_in_the_clients_dialect(hub: PipelineHub) -> None:
    """An upstream stream that breaks off after some output: the client gets the gateway's
    error event in its own dialect, the event is a 502 and bills nothing."""
    body = {**MSG, "model": BROKEN_MODEL, "stream": True}
    status, h, reply = post(hub, "/v1/messages", body, {"x-api-key": hub.secret})
    assert status == 200
    events = sse_events(reply)
    assert events[0][0] == "message_start"
    name, err = events[-1]
    assert name == "error" and err["type"] == "error"
    assert err["error"]["type"] == "api_error" and "broke off" in err["error"]["message"]
    assert "message_stop" not in [n for n, _ in events]
    ev = hub.event(h["x-request-id"])
    assert ev.status == 502 and sum(billed_lines(ev)) == 0
    chat = {"model": BROKEN_MODEL, "messages": MSG["messages"], "stream": True}
    status, h, reply = post(hub, "/v1/chat/completions", chat, hub.auth)
    *_, (name, err) = sse_events(reply)
    assert err["error"]["code"] == "upstream_error" and "broke off" in err["error"]["message"]
    assert hub.event(h["x-request-id"]).status == 502


def test_admission_reserves_the_tool_definitions(hub: PipelineHub, meter: Meter) -> None:
    """A tenant's tokens-per-minute limit that fits the prompt and max_tokens, but not the tool
    definitions too: with tools the request is refused (Anthropic's rate_limit_error), without
    them it is served."""
    tenant = f"tools-{time.monotonic_ns() % 10**9}"
    hub.store.create_tenant(tenant)
    _, secret = hub.store.create_key(tenant)
    prompt = meter.count_messages([{"role": "user", "content": "hi"}])
    tools = meter.count(msgspec.json.encode(TOOLS).decode())
    assert tools > 1
    hub.store.set_limits("tenant", tenant, tpm=prompt + 5 + tools - 1)
    wait_until(
        lambda: hub.knows(secret) and f"tenant:{tenant}" in hub.limits.limited,
        3.0,
        what="the key and its limit in the gateway",
    )
    status, h, reply = post(hub, "/v1/messages", {**MSG, "tools": TOOLS}, {"x-api-key": secret})
    assert status == 429, reply
    anthropic_error(reply, "rate_limit_error")
    hub.unbilled(h["x-request-id"])
    status, _, reply = post(hub, "/v1/messages", MSG, {"x-api-key": secret})
    assert status == 200, reply


def test_chat_admission_reserves_the_tool_definitions(hub: PipelineHub, meter: Meter) -> None:
    """The same for OpenAI chat: its `tools` are reserved beside the messages."""
    tenant = f"chat-tools-{time.monotonic_ns() % 10**9}"
    hub.store.create_tenant(tenant)
    _, secret = hub.store.create_key(tenant)
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                               "parameters": t["input_schema"]}}
             for t in TOOLS]  # fmt: skip
    prompt = meter.count_messages([{"role": "user", "content": "hi"}])
    tools_tokens = meter.count(msgspec.json.encode(tools).decode())
    hub.store.set_limits("tenant", tenant, tpm=prompt + 5 + tools_tokens - 1)
    wait_until(
        lambda: hub.knows(secret) and f"tenant:{tenant}" in hub.limits.limited,
        3.0,
        what="the key and its limit in the gateway",
    )
    auth = {"Authorization": f"Bearer {secret}"}
    chat = {"model": OPENAI_MODEL, "messages": MSG["messages"], "max_tokens": 5}
    status, h, reply = post(hub, "/v1/chat/completions", {**chat, "tools": tools}, auth)
    assert status == 429, reply
    hub.unbilled(h["x-request-id"])
    status, _, reply = post(hub, "/v1/chat/completions", chat, auth)
    assert status == 200, reply


@pytest.mark.parametrize("stream", [False, True])
def test_translated_usage_is_the_events_when_the_upstream_sends_none(
    hub: PipelineHub, meter: Meter, stream: bool
) -> None:
    """Over an OpenAI upstream that sends no usage, the meter's counts are billed, and they are
    what a Messages client is shown: the client and the event agree, whoever counted."""
    client = hub.anthropic()
    kw: dict[str, Any] = {"model": NOUSAGE_MODEL, "max_tokens": 30,
                          "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
    if stream:
        with client.messages.stream(**kw) as s:
            msg = s.get_final_message()
            rid = s.response.headers["x-request-id"]
    else:
        raw = client.messages.with_raw_response.create(**kw)
        msg, rid = raw.parse(), raw.headers["x-request-id"]
    ev = hub.event(rid)
    assert (ev.status, ev.source, ev.endpoint) == (200, "metered", "messages")
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert ev.output_tokens == meter.count(text) == msg.usage.output_tokens > 0
    assert ev.input_tokens == meter.count_messages([{"role": "user", "content": QUESTION}])
    assert msg.usage.input_tokens == ev.input_tokens


def test_untranslatable_reply_is_a_502(hub: PipelineHub) -> None:
    """A completion the translation cannot read (the upstream's fault) is a 502 in the client's
    shape, recorded and unbilled, like any reply that is not a completion."""
    status, h, reply = post(
        hub, "/v1/messages", {**MSG, "model": BROKEN_MODEL}, {"x-api-key": hub.secret}
    )
    assert status == 502, reply
    assert "could not be translated" in anthropic_error(reply, "api_error")
    ev = hub.event(h["x-request-id"])
    assert ev.status == 502 and sum(billed_lines(ev)) == 0


def _error_events(path: str, events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The error events of a stream in the dialect of `path`."""
    if path == "/v1/messages":
        return [data for name, data in events if name == "error"]
    if path == "/v1/responses":
        return [data for _, data in events if isinstance(data, dict) and data["type"] == "error"]
    return [data for _, data in events if isinstance(data, dict) and "error" in data]


@pytest.mark.parametrize("model", [ERR_CHAT, ERR_CLAUDE])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/responses"])
def test_upstream_error_event_mid_stream_is_the_clients_only_error(
    hub: PipelineHub, path: str, model: str
) -> None:
    """An upstream that fails mid-stream with its own error event (OpenAI's error chunk,
    Anthropic's `event: error` overloaded_error): the client gets exactly one error event, in
    its dialect, carrying the upstream's message (not the gateway's "broke off" after it), no
    end marker; the event is a 502 upstream_stream_broken and bills nothing. Passthrough and
    translated, both wires."""
    if path == "/v1/messages":
        body: dict[str, Any] = {**MSG, "model": model, "max_tokens": 40, "stream": True}
        headers = {"x-api-key": hub.secret}
    elif path == "/v1/responses":
        body = {"model": model, "input": QUESTION, "max_output_tokens": 40, "stream": True}
        headers = hub.auth
    else:
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 40, "stream": True}  # fmt: skip
        headers = hub.auth
    status, h, reply = post(hub, path, body, headers)
    assert status == 200, reply
    events = sse_events(reply)
    errors = _error_events(path, events)
    assert len(errors) == 1, events
    (err,) = errors
    message = err["message"] if path == "/v1/responses" else err["error"]["message"]
    upstream_message = "Overloaded" if model == ERR_CLAUDE else "The server had an error"
    assert message.startswith(upstream_message) and "broke off" not in message
    if path == "/v1/messages":
        assert err["type"] == "error" and events[-1][0] == "error"
        assert "message_stop" not in [n for n, _ in events]
    elif path == "/v1/chat/completions":
        assert events[-1][1] is err and "[DONE]" not in [d for _, d in events]
    else:
        assert events[-1][1] is err
        assert "response.completed" not in [d["type"] for _, d in events]
    ev = hub.event(h["x-request-id"])
    assert (ev.status, ev.error) == (502, "upstream_stream_broken")
    assert sum(billed_lines(ev)) == 0


def test_a_client_that_leaves_a_messages_stream_pays_at_most_what_was_held(
    hub: PipelineHub, meter: Meter
) -> None:
    """Money admission, a Messages stream passed through from an anthropic upstream whose usage
    has cache reads and writes far beyond what was held: the client leaves mid-way, the gateway
    drains the upstream to its end (499), and the event is capped at the hold: input at the
    held prompt, cache reads and writes within it (reads first, writes with what is left: never
    more cached than input), output at the tranche held when the client left; the money pot is
    charged that, no more than was reserved."""
    q = Quota.anonymous(accounts=64, reservations=64)
    new_epoch(q)
    contracts = Contracts(q, db=None)  # type: ignore[arg-type]
    usd = 1_000_000_000  # nanos
    price = Price(PACED_MODEL, "", 1, 0, "USD", 3 * usd, 3 * usd // 10, 15 * usd, None,
                  375 * usd // 100)  # fmt: skip
    contracts.terms = Terms(
        profiles={TENANT: Profile(TENANT, "USD", ("wallet",))}, lots={},
        prices={(PACED_MODEL, ""): [price]}, fx={},
    )  # fmt: skip
    q.set_limits(money_pot(TENANT), money=usd)
    q.set_limits("meta:contracts", requests=1)
    body = {"model": PACED_MODEL, "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip

    async def walk_away() -> tuple[str, int]:
        deltas = 0
        headers = {"x-api-key": hub.secret}
        async with (
            aiohttp.ClientSession() as s,
            s.post(hub.base + "/v1/messages", json=body, headers=headers) as r,
        ):
            assert r.status == 200, await r.text()
            rid = r.headers["x-request-id"]
            async for line in r.content:
                deltas += line.startswith(b"event: content_block_delta")
                if deltas >= 20:
                    break  # the connection is closed mid-stream
        return rid, deltas

    hub.gateway.contracts = contracts
    try:
        rid, deltas = asyncio.run(walk_away())
        ev = hub.event(rid, timeout=10.0)
    finally:
        hub.gateway.contracts = None
    assert 20 <= deltas < PACED_DELTAS
    assert (ev.status, ev.error, ev.source) == (499, "client_disconnected", "upstream")
    prompt = meter.count_messages([{"role": "user", "content": "hi"}])
    # The upstream said 3,005 prompt tokens (1,000 read, 2,000 written) and 3,000 output: the
    # hold had the meter's prompt and one output tranche (the client left before using it).
    assert 0 < prompt < PACED_USAGE["cache_read_input_tokens"] and PACED_OUTPUT > TRANCHE
    assert (ev.input_tokens, ev.cached_input_tokens, ev.cache_write_tokens) == (prompt, prompt, 0)
    assert ev.output_tokens == TRANCHE
    lines = billed_lines(ev)
    assert lines == (0, prompt, TRANCHE, 0)
    charged = q.state(money_pot(TENANT)).money.used
    assert charged == rate(prompt, price.cached_input_per_1m) + rate(TRANCHE, price.output_per_1m)
    # No more than was reserved: the prompt at the dearer of input and cache write, a tranche.
    assert charged <= rate(prompt, price.write_per_1m) + rate(TRANCHE, price.output_per_1m)
    assert ev.holds.endswith(f"|{money_pot(TENANT)}={charged}")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_the_stream_ends_at_the_upstreams_error_event(hub: PipelineHub, path: str) -> None:
    """An upstream that sends its error chunk and keeps the connection open: the client's
    stream ends at once with that one error (not after the upstream's silence, nor with a
    second error of the gateway's), a 502 that bills nothing."""
    body: dict[str, Any] = {"model": HANG_MODEL, "messages": MSG["messages"], "stream": True,
                            "max_tokens": 20}  # fmt: skip
    t0 = time.monotonic()
    status, h, reply = post(hub, path, body, {"x-api-key": hub.secret})
    elapsed = time.monotonic() - t0
    assert status == 200, reply
    assert elapsed < HANG_S / 2, elapsed
    errors = _error_events(path, sse_events(reply))
    assert [e["error"]["message"] for e in errors] == ["Upstream fell over."]
    ev = hub.event(h["x-request-id"])
    assert (ev.status, ev.error, sum(billed_lines(ev))) == (502, "upstream_stream_broken", 0)
