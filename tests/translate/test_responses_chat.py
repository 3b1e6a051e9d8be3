"""The Responses API over chat completions (`ResponsesOverChat`), checked with the openai SDK's
own parsers: `Response.model_validate`, and real `openai` clients (strict response validation
on) against a small aiohttp front that does what the gateway's pipeline does with the
translation: parse the body (`ResponsesRequest`), translate it, call a real upstream on
127.0.0.1 (the mock upstream, or a scripted chat server for tool calls and reasoning, whose
chunks are checked against the SDK's `ChatCompletionChunk`), and translate the reply or the
stream back, with a usage event made from the upstream's usage."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import (
    FunctionToolParam,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseReasoningItem,
    ResponseReasoningSummaryPartAddedEvent,
    ResponseReasoningSummaryPartDoneEvent,
    ResponseReasoningSummaryTextDeltaEvent,
    ResponseReasoningSummaryTextDoneEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from tokenhub.config import Model
from tokenhub.gateway.dialects.responses import DIALECT, ResponsesRequest
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.translate.responses_chat import MESSAGE_CHARS, ResponsesOverChat
from tokenhub.mock.upstream import MockOptions, build_app
from tokenhub.usage import UsageEvent

T = ResponsesOverChat()
CLIENT_MODEL = "coder"  # what the client names; the upstream is asked for UPSTREAM_MODEL
UPSTREAM_MODEL = "gpt-4o-mini"
MODELS = {CLIENT_MODEL: Model(id=CLIENT_MODEL)}
_ids = itertools.count(1)


def usage_event(usage: dict[str, Any] | None = None, **kw: Any) -> UsageEvent:
    """A usage event for one request, its counts the upstream's usage (OpenAI keys)."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    fields: dict[str, Any] = {
        "request_id": f"req_{next(_ids):032x}",
        "ts_ms": int(time.time() * 1000),
        "tenant": "t",
        "key_id": "k",
        "endpoint": "responses",
        "model": CLIENT_MODEL,
        "upstream_model": UPSTREAM_MODEL,
        "input_tokens": usage.get("prompt_tokens", 0),
        "cached_input_tokens": details.get("cached_tokens", 0),
        "cache_write_tokens": details.get("cache_write_tokens", 0),
        "output_tokens": usage.get("completion_tokens", 0),
    }
    return UsageEvent(**(fields | kw))


def _usage_in(events: bytes) -> dict[str, Any] | None:
    found = None
    for line in events.splitlines():
        if line.startswith(b"data: {"):
            usage = json.loads(line[6:]).get("usage")
            if usage:
                found = usage
    return found


# -- the front: what the gateway's pipeline does with a translation ------------------------------


@dataclass
class Front:
    """The test's stand-in for the gateway: one translated request at a time."""

    upstream: str = ""
    sent: list[dict[str, Any]] = field(default_factory=list)  # chat bodies sent upstream
    streams: list[bytes] = field(default_factory=list)  # the Responses streams written
    events: list[UsageEvent] = field(default_factory=list)


FRONT = web.AppKey("front", Front)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _respond(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    req = ResponsesRequest()
    try:
        req.parse(await request.read(), MODELS)
    except ApiError as e:
        return web.Response(
            status=e.status, body=DIALECT.error_body(e), content_type="application/json"
        )
    body = T.request(req.payload)
    body["model"] = UPSTREAM_MODEL
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    front.sent.append(body)
    url = front.upstream + "/chat/completions"
    async with request.app[SESSION].post(url, json=body) as up:
        if up.status >= 400:
            return web.Response(
                status=up.status,
                body=T.error(up.status, await up.read()),
                content_type="application/json",
            )
        if not req.stream:
            data = await up.read()
            event = usage_event(json.loads(data)["usage"])
            front.events.append(event)
            return web.Response(body=T.reply(data, event), content_type="application/json")
        event = usage_event()
        out = T.stream(event, False)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        written: list[bytes] = []
        buf, usage = b"", None
        async for piece in up.content.iter_any():
            buf += piece
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                continue
            whole, buf = buf[: cut + 2], buf[cut + 2 :]  # whole events, as the relay forwards
            usage = _usage_in(whole) or usage
            written.append(out.feed(whole))
            await resp.write(written[-1])
        final = msgspec.structs.replace(
            usage_event(usage), request_id=event.request_id, ts_ms=event.ts_ms
        )
        front.events.append(final)
        written.append(out.end(final))
        await resp.write(written[-1])
        await resp.write_eof()
        front.streams.append(b"".join(written))
        return resp


async def _session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession() as s:
        app[SESSION] = s
        yield


@pytest.fixture
async def front(aiohttp_server: Any) -> tuple[Front, TestServer]:
    app = web.Application()
    app[FRONT] = Front()
    app.router.add_post("/v1/responses", _respond)
    app.cleanup_ctx.append(_session)
    server: TestServer = await aiohttp_server(app)
    return app[FRONT], server


def clients(server: TestServer) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    url = str(server.make_url("/v1"))
    kw: dict[str, Any] = {
        "api_key": "th-key",
        "max_retries": 0,
        "_strict_response_validation": True,
    }
    return openai.OpenAI(base_url=url, **kw), openai.AsyncOpenAI(base_url=url, **kw)


# -- the upstreams ------------------------------------------------------------------------------


@pytest.fixture
async def mock(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(build_app(MockOptions()))
    return server


async def ledger(mock: TestServer) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(mock.make_url("/mock/ledger")) as r:
        entries: list[dict[str, Any]] = (await r.json())["entries"]
        return entries


@dataclass
class Script:
    """A chat completions server that answers each request with the next scripted reply: a
    completion (a dict) or a stream (a list of chunks)."""

    replies: list[dict[str, Any] | list[dict[str, Any]]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)


SCRIPT = web.AppKey("script", Script)


async def _scripted(request: web.Request) -> web.StreamResponse:
    script = request.app[SCRIPT]
    script.received.append(await request.json())
    reply = script.replies.pop(0)
    if isinstance(reply, dict):
        return web.json_response(reply)
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for c in reply:  # one write per chunk: the front sees them in many reads
        await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture
async def scripted(aiohttp_server: Any) -> tuple[Script, TestServer]:
    app = web.Application()
    app[SCRIPT] = Script()
    app.router.add_post("/v1/chat/completions", _scripted)
    server: TestServer = await aiohttp_server(app)
    return app[SCRIPT], server


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An OpenAI chat completion chunk (checked against the SDK's model)."""
    c: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": UPSTREAM_MODEL,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }
    ChatCompletionChunk.model_validate(c)
    return c


def completion(message: dict[str, Any], finish: str, usage: dict[str, Any]) -> dict[str, Any]:
    c = {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 1,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }
    ChatCompletion.model_validate(c)
    return c


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


WEATHER: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def tool_stream(u: dict[str, Any]) -> list[dict[str, Any]]:
    """Text, then two tool calls, as OpenAI streams them (arguments in pieces)."""

    def call(index: int, args: str, cid: str | None = None, name: str | None = None) -> Any:
        tc: dict[str, Any] = {"index": index, "function": {"arguments": args}}
        if cid:
            tc |= {"id": cid, "type": "function"}
            tc["function"]["name"] = name
        return chunk({"tool_calls": [tc]})

    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking "}),
        chunk({"content": "both."}),
        call(0, "", "call_a", "get_weather"),
        call(0, '{"city":'),
        call(0, '"Paris"}'),
        call(1, '{"city":"Oslo"}', "call_b", "get_weather"),
        chunk({}, "tool_calls"),
        chunk(usage=u),
    ]


# -- request ------------------------------------------------------------------------------------


def test_a_request_becomes_a_chat_completions_body() -> None:
    image = "https://example.com/cat.png"
    payload = {
        "model": CLIENT_MODEL,
        "instructions": "Be brief.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Describe"},
                    {"type": "input_image", "image_url": image},
                ],
            }
        ],
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_output_tokens": 123,
        "stream": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "parallel_tool_calls": False,
        "text": {
            "format": {
                "type": "json_schema",
                "name": "out",
                "schema": {"type": "object"},
                "strict": True,
            },
            "verbosity": "low",
        },
        "reasoning": {"effort": "high", "summary": "auto"},
        "user": "u1",
        "prompt_cache_key": "pk",
        "store": True,
        "metadata": {"a": "b"},
        "truncation": "auto",
        "include": ["reasoning.encrypted_content"],
        "unknown_field": 1,
    }
    assert T.request(payload) == {
        "model": CLIENT_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": WEATHER["parameters"],
                    "strict": True,
                },
            }
        ],
        "tool_choice": "required",
        "max_tokens": 123,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
        },
        "verbosity": "low",
        "reasoning_effort": "high",
        "temperature": 0.5,
        "top_p": 0.9,
        "parallel_tool_calls": False,
        "user": "u1",
        "prompt_cache_key": "pk",
        "stream": True,
    }
    # A named function; plain text.
    small = T.request(
        {
            "model": "m",
            "input": "x",
            "tools": [{"type": "function", "name": "f"}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "text"}},
        }
    )
    assert small == {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    # Chat completions refuse tools: [] and tool options without tools: left out.
    bare = T.request(
        {
            "model": "m",
            "input": "x",
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
        }
    )
    assert bare == {"model": "m", "messages": [{"role": "user", "content": "x"}]}


# -- reply --------------------------------------------------------------------------------------


def test_a_completion_becomes_a_response_the_sdk_validates() -> None:
    body = completion(
        {"role": "assistant", "content": "Hello there."},
        "stop",
        usage(100, 3, cached=40),
    )
    event = usage_event(body["usage"], cache_write_tokens=10)
    raw = T.reply(json.dumps(body).encode(), event)
    r = Response.model_validate_json(raw)
    assert r.id == "resp_" + event.request_id[4:]
    assert (r.object, r.status, r.model) == ("response", "completed", CLIENT_MODEL)
    assert json.loads(raw)["store"] is False  # nothing is kept
    assert r.created_at == event.ts_ms // 1000
    assert r.output_text == "Hello there."
    (msg,) = r.output
    assert isinstance(msg, ResponseOutputMessage)
    assert (msg.role, msg.status, msg.id) == (
        "assistant",
        "completed",
        "msg_" + event.request_id[4:],
    )
    assert r.usage is not None
    assert r.usage.model_dump() == {
        "input_tokens": 100,
        "input_tokens_details": {
            "cached_tokens": 40,
            "cache_write_tokens": 10,
            "cache_write_tokens_details": None,
        },
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 103,
    }
    assert r.incomplete_details is None


def test_tool_calls_and_reasoning_become_output_items() -> None:
    body = completion(
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "The user wants weather.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
            ],
        },
        "tool_calls",
        usage(50, 30, reasoning=12),
    )
    event = usage_event(body["usage"])
    r = Response.model_validate_json(T.reply(json.dumps(body).encode(), event))
    reasoning, call1, call2 = r.output  # no message item: the reply had no text
    assert isinstance(reasoning, ResponseReasoningItem)
    assert [s.text for s in reasoning.summary] == ["The user wants weather."]
    assert isinstance(call1, ResponseFunctionToolCall)
    assert isinstance(call2, ResponseFunctionToolCall)
    assert [(c.call_id, c.name, c.arguments, c.status) for c in (call1, call2)] == [
        ("call_1", "get_weather", '{"city":"Paris"}', "completed"),
        ("call_2", "get_weather", '{"city":"Oslo"}', "completed"),
    ]
    assert call1.id != call2.id
    assert r.output_text == ""
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 12
    # The upstream's reasoning figure is shown only when its usage was believed.
    metered = usage_event(body["usage"], source="metered")
    r = Response.model_validate_json(T.reply(json.dumps(body).encode(), metered))
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 0


def test_a_reply_cut_at_the_cap_is_incomplete_and_a_refusal_is_kept() -> None:
    body = completion({"role": "assistant", "content": "Once upon"}, "length", usage(9, 2))
    r = Response.model_validate_json(T.reply(json.dumps(body).encode(), usage_event(body["usage"])))
    assert r.status == "incomplete"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "Once upon"
    assert isinstance(r.output[0], ResponseOutputMessage) and r.output[0].status == "incomplete"
    body = completion(
        {"role": "assistant", "content": None, "refusal": "I can't help with that."},
        "stop",
        usage(9, 6),
    )
    r = Response.model_validate_json(T.reply(json.dumps(body).encode(), usage_event(body["usage"])))
    (msg,) = r.output
    assert isinstance(msg, ResponseOutputMessage)
    assert [(p.type, getattr(p, "refusal", None)) for p in msg.content] == [
        ("refusal", "I can't help with that.")
    ]


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            400,
            b'{"error": {"message": "bad", "type": "invalid_request_error", '
            b'"param": "messages", "code": "x"}}',
            {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": "x"},
        ),
        (
            429,
            b'{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}',
            {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None},
        ),
        (
            404,
            b'{"message": "no such model"}',
            {
                "message": "no such model",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            },
        ),
        (
            400,
            b"<html>Bad Request</html>",
            {
                "message": "The upstream returned HTTP 400.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            },
        ),
        (
            503,
            b"",
            {
                "message": "The upstream returned HTTP 503.",
                "type": "api_error",
                "param": None,
                "code": None,
            },
        ),
    ],
)
def test_upstream_errors_in_openais_shape(
    status: int, body: bytes, expected: dict[str, Any]
) -> None:
    assert json.loads(T.error(status, body)) == {"error": expected}


def test_a_long_upstream_message_is_bounded() -> None:
    body = json.dumps({"error": {"message": "x" * 10_000}}).encode()
    assert len(json.loads(T.error(400, body))["error"]["message"]) == MESSAGE_CHARS


# -- streams (unit) -----------------------------------------------------------------------------


def sse(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    """Each SSE event: its `event:` name must equal its data's type."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        event = json.loads(data[6:])
        assert event["type"] == name[7:].decode()
        out.append(event)
    return out


def test_a_stream_fed_in_any_grouping_of_whole_events_is_the_same() -> None:
    events = sse(tool_stream(usage(20, 15)))
    ev = usage_event()
    final = msgspec.structs.replace(ev, input_tokens=20, output_tokens=15)
    one = T.stream(ev, False)
    together = one.feed(b"".join(events)) + one.end(final)
    apart = T.stream(ev, False)
    pieces = b"".join(apart.feed(e) for e in events) + apart.end(final)
    assert together == pieces
    parsed = parse_events(together)
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    for e in parsed:
        assert isinstance(_adapter().validate_python(e), _CLASSES[e["type"]])
    assert [e["type"] for e in parsed] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = parsed[-1]["response"]
    assert done["usage"]["input_tokens"] == 20 and done["usage"]["output_tokens"] == 15
    assert [o["type"] for o in done["output"]] == ["message", "function_call", "function_call"]
    assert [o["output_index"] for o in parsed if o["type"] == "response.output_item.done"] == [
        0,
        1,
        2,
    ]


def test_calls_numbered_alike_but_with_their_own_ids_are_separate_items() -> None:
    """Some OpenAI-compatible upstreams give every tool call index 0; a new id is a new call.
    A name sent after the call's first delta is kept."""
    s = T.stream(usage_event(), False)
    raw = b"".join(
        s.feed(e)
        for e in sse(
            [
                chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"arguments": ""}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}),
                chunk(
                    {
                        "tool_calls": [
                            {"index": 0, "id": "c2", "function": {"name": "g", "arguments": "[]"}}
                        ]
                    }
                ),
                chunk({}, "tool_calls"),
            ]
        )
    )
    parsed = parse_events(raw + s.end(usage_event()))
    final = Response.model_validate(parsed[-1]["response"])
    assert [(o.type, o.call_id, o.name, o.arguments) for o in final.output] == [  # type: ignore[union-attr]
        ("function_call", "c1", "f", "{}"),
        ("function_call", "c2", "g", "[]"),
    ]
    dones = [e["item"] for e in parsed if e["type"] == "response.output_item.done"]
    assert dones == final.model_dump(exclude_none=True)["output"]


def test_a_chunk_of_another_shape_is_read_for_what_it_has() -> None:
    """Content given as parts, a null index, a tool call that is not an object, a usage of
    another type: what has the expected type is kept, the rest is skipped."""
    s = T.stream(usage_event(), False)
    odd = [
        b'data: {"choices": [{"index": null, "delta": {"content": [{"type": "text", "text": "He"},'
        b' {"type": "text", "text": "llo"}]}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": 7, "tool_calls": ["x", '
        b'{"index": 0, "id": "c9", "function": {"name": "f", "arguments": 5}}]}}]}\n\n',
        b'data: {"choices": [{"index": 1, "delta": {"content": "other choice"}}]}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{}"}}]},'
        b' "finish_reason": "tool_calls"}], "usage": "n/a"}\n\n',
        b"data: not json\n\n",
        b": a comment\n\n",
    ]
    parsed = parse_events(b"".join(s.feed(e) for e in odd) + s.end(usage_event()))
    final = Response.model_validate(parsed[-1]["response"])
    assert final.output_text == "Hello"
    assert [(o.type, getattr(o, "call_id", None)) for o in final.output] == [
        ("message", None),
        ("function_call", "c9"),
    ]
    assert getattr(final.output[1], "arguments", None) == "{}"


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"choices": "x"}', b'{"choices": [3]}', b'{"choices": [{"message": [1]}]}'],
)
def test_a_reply_of_an_unexpected_shape_is_still_a_valid_response(body: bytes) -> None:
    r = Response.model_validate_json(T.reply(body, usage_event(usage(5, 0))))
    assert r.output_text == "" and r.usage is not None and r.usage.input_tokens == 5


def test_an_upstream_error_mid_stream_is_an_error_event_and_ends_it() -> None:
    s = T.stream(usage_event(), False)
    raw = s.feed(sse([chunk({"content": "Hi"})])[0])
    raw += s.feed(b'data: {"error": {"message": "overloaded", "code": "server_error"}}\n\n')
    raw += s.end(usage_event())
    parsed = parse_events(raw)
    assert parsed[-1] == {
        "type": "error",
        "code": "server_error",
        "message": "overloaded",
        "param": None,
        "sequence_number": len(parsed) - 1,
    }
    assert not any(e["type"] == "response.completed" for e in parsed)


def test_an_empty_stream_still_completes() -> None:
    s = T.stream(usage_event(), False)
    parsed = parse_events(s.feed(b"data: [DONE]\n\n") + s.end(usage_event()))
    assert [e["type"] for e in parsed] == [
        "response.created",
        "response.in_progress",
        "response.completed",
    ]
    assert Response.model_validate(parsed[-1]["response"]).output == []


_CLASSES: dict[str, type] = {
    "response.created": ResponseCreatedEvent,
    "response.in_progress": ResponseInProgressEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "response.function_call_arguments.delta": ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": ResponseFunctionCallArgumentsDoneEvent,
    "response.reasoning_summary_part.added": ResponseReasoningSummaryPartAddedEvent,
    "response.reasoning_summary_part.done": ResponseReasoningSummaryPartDoneEvent,
    "response.reasoning_summary_text.delta": ResponseReasoningSummaryTextDeltaEvent,
    "response.reasoning_summary_text.done": ResponseReasoningSummaryTextDoneEvent,
    "response.completed": ResponseCompletedEvent,
    "response.incomplete": ResponseIncompleteEvent,
    "error": ResponseErrorEvent,
}


def _adapter() -> Any:
    import pydantic

    return pydantic.TypeAdapter(ResponseStreamEvent)


# -- through the SDK: the mock upstream -----------------------------------------------------------


async def test_text_over_the_mock_upstream_not_streamed_and_streamed(
    front: tuple[Front, TestServer], mock: TestServer
) -> None:
    state, server = front
    state.upstream = str(mock.make_url("/v1"))
    _, aclient = clients(server)
    async with aclient:
        r = await aclient.responses.create(
            model=CLIENT_MODEL, input="Tell me about meters.", instructions="Be terse."
        )
        assert isinstance(r, Response)
        assert r.status == "completed" and r.model == CLIENT_MODEL and r.output_text
        events: list[Any] = [
            e
            async for e in await aclient.responses.create(
                model=CLIENT_MODEL,
                input="Tell me about meters.",
                instructions="Be terse.",
                stream=True,
            )
        ]
    # The instructions went first, as the system message.
    assert state.sent[0]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Tell me about meters."},
    ]
    for e in events:
        assert isinstance(e, _CLASSES[e.type])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert len(deltas) > 1
    done = events[-1].response
    # The mock's reply is deterministic: the stream says what the reply said.
    assert "".join(deltas) == events[-4].text == done.output_text == r.output_text
    assert done.id == events[0].response.id != r.id
    # Usage: what the mock served, what the event bills, what the client saw.
    served = await ledger(mock)
    assert len(served) == 2
    for entry, response, event in zip(served, (r, done), state.events, strict=True):
        assert response.usage is not None
        assert (response.usage.input_tokens, response.usage.output_tokens) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        )
        assert (event.input_tokens, event.output_tokens) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        )
        assert response.usage.total_tokens == entry["prompt_tokens"] + entry["completion_tokens"]


async def test_max_output_tokens_makes_an_incomplete_response(
    front: tuple[Front, TestServer], mock: TestServer
) -> None:
    state, server = front
    state.upstream = str(mock.make_url("/v1"))
    _, aclient = clients(server)
    async with aclient:
        r = await aclient.responses.create(
            model=CLIENT_MODEL, input="Write a long story.", max_output_tokens=5
        )
        events: list[Any] = [
            e
            async for e in await aclient.responses.create(
                model=CLIENT_MODEL, input="Write a long story.", max_output_tokens=5, stream=True
            )
        ]
    assert [b["max_tokens"] for b in state.sent] == [5, 5]
    assert r.status == "incomplete"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 5
    last = events[-1]
    assert isinstance(last, ResponseIncompleteEvent)
    assert last.response.status == "incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == r.output_text
    assert last.response.usage is not None and last.response.usage.output_tokens == 5


async def test_the_gateways_400s_reach_the_sdk_and_nothing_goes_upstream(
    front: tuple[Front, TestServer], mock: TestServer
) -> None:
    state, server = front
    state.upstream = str(mock.make_url("/v1"))
    _, aclient = clients(server)
    async with aclient:
        with pytest.raises(openai.BadRequestError) as e:
            await aclient.responses.create(
                model=CLIENT_MODEL, input="again", previous_response_id="resp_123"
            )
        assert "send the whole conversation" in e.value.message
        assert e.value.body == {
            "message": e.value.body["message"],  # type: ignore[index]
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": None,
        }
        with pytest.raises(openai.BadRequestError) as e:
            await aclient.responses.create(
                model=CLIENT_MODEL, input="news?", tools=[{"type": "web_search"}]
            )
        assert "not supported by this gateway" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            await aclient.responses.create(
                model=CLIENT_MODEL,
                input=[{"type": "function_call_output", "output": "x"}],
            )
        assert "input[0].call_id" in e.value.message
        with pytest.raises(openai.NotFoundError):
            await aclient.responses.create(model="nope", input="x")
    assert state.sent == [] and await ledger(mock) == []


async def test_an_upstream_4xx_reaches_the_sdk_in_openais_shape(
    front: tuple[Front, TestServer], aiohttp_server: Any
) -> None:
    state, server = front

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(
            {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
            status=429,
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    upstream = await aiohttp_server(app)
    state.upstream = str(upstream.make_url("/v1"))
    _, aclient = clients(server)
    async with aclient:
        with pytest.raises(openai.RateLimitError) as e:
            await aclient.responses.create(model=CLIENT_MODEL, input="x")
    assert e.value.message.endswith("slow down")
    assert e.value.body == {
        "message": "slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": None,
    }


# -- through the SDK: tool calls, the round trip, reasoning, images -------------------------------


async def test_function_calls_and_the_round_trip(
    front: tuple[Front, TestServer], scripted: tuple[Script, TestServer]
) -> None:
    state, server = front
    script, upstream = scripted
    state.upstream = str(upstream.make_url("/v1"))
    script.replies = [
        tool_stream(usage(80, 25, cached=64)),
        completion({"role": "assistant", "content": "Paris 18C, Oslo 9C."}, "stop", usage(140, 9)),
    ]
    client, _ = clients(server)

    def first_turn() -> tuple[Any, list[Any]]:
        with client.responses.stream(
            model=CLIENT_MODEL, input="Weather in Paris and Oslo?", tools=[WEATHER]
        ) as stream:
            seen = list(stream)
            return stream.get_final_response(), seen

    final, seen = await asyncio.to_thread(first_turn)
    assert final.output_text == "Checking both."
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city":"Paris"}'),
        ("call_b", "get_weather", '{"city":"Oslo"}'),
    ]
    # The SDK parsed the strict tool's arguments against the client's tool definition.
    assert [c.parsed_arguments for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (
        80,
        25,
        105,
    )
    assert final.usage.input_tokens_details.cached_tokens == 64
    snapshots = [e.snapshot for e in seen if e.type == "response.function_call_arguments.delta"]
    assert snapshots == ['{"city":', '{"city":"Paris"}', '{"city":"Oslo"}']
    assert script.received[0]["tools"][0]["function"]["name"] == "get_weather"
    assert script.received[0]["stream_options"] == {"include_usage": True}

    # Second turn: the client sends the whole conversation back with its tool outputs.
    second_input: list[Any] = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        *[o.model_dump(exclude_none=True, exclude={"parsed_arguments"}) for o in final.output],
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_b", "output": "9C"},
    ]
    r = await asyncio.to_thread(
        lambda: client.responses.create(model=CLIENT_MODEL, input=second_input, tools=[WEATHER])
    )
    assert r.output_text == "Paris 18C, Oslo 9C."
    assert r.usage is not None and r.usage.input_tokens == 140
    assert script.received[1]["messages"] == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "9C"},
    ]
    client.close()


async def test_reasoning_streams_as_a_summary(
    front: tuple[Front, TestServer], scripted: tuple[Script, TestServer]
) -> None:
    state, server = front
    script, upstream = scripted
    state.upstream = str(upstream.make_url("/v1"))
    script.replies = [
        [
            chunk({"role": "assistant", "content": None, "reasoning_content": "Think"}),
            chunk({"reasoning_content": "ing hard."}),
            chunk({"content": "42"}),
            chunk({}, "stop"),
            chunk(usage=usage(12, 20, reasoning=17)),
        ]
    ]
    _, aclient = clients(server)
    async with (
        aclient,
        aclient.responses.stream(
            model=CLIENT_MODEL, input="The answer?", reasoning={"effort": "high"}
        ) as stream,
    ):
        seen = [e async for e in stream]
        final = await stream.get_final_response()
    assert script.received[0]["reasoning_effort"] == "high"
    assert [e.delta for e in seen if e.type == "response.reasoning_summary_text.delta"] == [
        "Think",
        "ing hard.",
    ]
    reasoning, message = final.output
    assert isinstance(reasoning, ResponseReasoningItem)
    assert reasoning.summary[0].text == "Thinking hard."
    assert message.type == "message" and final.output_text == "42"
    assert reasoning.id != message.id
    assert final.usage is not None
    assert final.usage.output_tokens_details.reasoning_tokens == 17
    assert final.usage.output_tokens == 20


async def test_an_image_reaches_the_upstream_as_an_image_url_part(
    front: tuple[Front, TestServer], scripted: tuple[Script, TestServer]
) -> None:
    state, server = front
    script, upstream = scripted
    state.upstream = str(upstream.make_url("/v1"))
    script.replies = [completion({"role": "assistant", "content": "A cat."}, "stop", usage(90, 3))]
    image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    _, aclient = clients(server)
    async with aclient:
        r = await aclient.responses.create(
            model=CLIENT_MODEL,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": image, "detail": "auto"},
                    ],
                }
            ],
        )
    assert r.output_text == "A cat."
    assert script.received[0]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "auto"}},
            ],
        }
    ]
