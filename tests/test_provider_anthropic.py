"""The Anthropic wire (`tokenhub.gateway.providers.anthropic`): the request sent upstream and its
headers, what counts as a completion, the reply view (usage in the gateway's normalized form,
output texts as the meter counts them), the stream scanner through the wire, errors."""

from __future__ import annotations

import json
import random
from typing import Any

import aiohttp
import anthropic
import msgspec
import pytest

from tokenhub import Meter
from tokenhub._core import AnthropicRelay
from tokenhub.config import Provider
from tokenhub.gateway import usage_check
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.providers import WIRES
from tokenhub.gateway.providers.anthropic import (
    ANTHROPIC,
    COUNT_PATH,
    PATH,
    normalize_usage,
)
from tokenhub.gateway.request import (
    ANTHROPIC_MESSAGES,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
)
from tokenhub.mock import MockOptions, build_app

REPLY: dict[str, Any] = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-test",
    "content": [
        {"type": "thinking", "thinking": "First, the weather.", "signature": "EqQBCgIYAh=="},
        {"type": "redacted_thinking", "data": "c2VjcmV0"},
        {"type": "text", "text": "Let me check."},
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"city": "Zürich", "units": ["c", "f"], "days": 3},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 4000,
        "output_tokens": 77,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0},
        "service_tier": "standard",
    },
}


def enc(v: Any) -> bytes:
    return msgspec.json.encode(v)


def provider(**kw: Any) -> Provider:
    return Provider(name="claude", base_url="https://api.anthropic.com/v1", kind="anthropic", **kw)


def test_registered_as_the_anthropic_wire() -> None:
    assert WIRES["anthropic"] is ANTHROPIC and ANTHROPIC.name == "anthropic"


def test_paths() -> None:
    for endpoint in (ANTHROPIC_MESSAGES, CHAT, RESPONSES):
        assert ANTHROPIC.path(endpoint) == PATH == "/messages"
    assert COUNT_PATH == "/messages/count_tokens"
    for endpoint in (COMPLETIONS, EMBEDDINGS):
        with pytest.raises(ValueError, match=r"has no \w+ endpoint"):
            ANTHROPIC.path(endpoint)


def test_request_body_changes_only_the_model_the_cap_and_stream() -> None:
    payload = {
        "model": "claude",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "metadata": {"user_id": "u"},
    }
    original = json.loads(json.dumps(payload))

    def body(p: dict[str, Any], cap: int | None, stream: bool) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(
            ANTHROPIC.request_body(json.loads(json.dumps(p)), "claude-up", cap, stream)
        )
        return out

    # The cap lowers max_tokens, never raises it.
    assert body(payload, 1000, False) == {**original, "model": "claude-up", "max_tokens": 1000}
    assert body(payload, 10_000, False) == {**original, "model": "claude-up"}
    assert body(payload, None, False) == {**original, "model": "claude-up"}
    # Streamed as the gateway will read the reply.
    assert body(payload, None, True) == {**original, "model": "claude-up", "stream": True}
    assert body({**payload, "stream": True}, None, False)["stream"] is False
    # No usable max_tokens (a translation that sets none): the cap is sent.
    for bad in (None, 0, -5, "100", True):
        assert body({**payload, "max_tokens": bad}, 512, False)["max_tokens"] == 512


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({}, {"x-api-key": "sk-ant", "anthropic-version": "2023-06-01"}),
        (
            {"anthropic_version": "2024-01-01"},
            {"x-api-key": "sk-ant", "anthropic-version": "2024-01-01"},
        ),
        ({"auth_header": "api-key"}, {"api-key": "sk-ant", "anthropic-version": "2023-06-01"}),
        (
            {"headers": {"Anthropic-Version": "2099-01-01", "anthropic-beta": "x"}},
            {"x-api-key": "sk-ant", "Anthropic-Version": "2099-01-01", "anthropic-beta": "x"},
        ),
        (
            {"auth_header": "Authorization", "headers": {"x-extra": "1"}},
            {"Authorization": "Bearer sk-ant", "anthropic-version": "2023-06-01", "x-extra": "1"},
        ),
        (
            {"auth_header": "AUTHORIZATION"},
            {"Authorization": "Bearer sk-ant", "anthropic-version": "2023-06-01"},
        ),
    ],
)
def test_auth_headers(kw: dict[str, Any], want: dict[str, str]) -> None:
    assert ANTHROPIC.auth("sk-ant", provider(**kw)) == want


def test_no_key_no_credential_header() -> None:
    assert ANTHROPIC.auth("", provider()) == {"anthropic-version": "2023-06-01"}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (enc(REPLY), None),
        (enc({**REPLY, "content": []}), None),
        (b"not json", "its reply was not a JSON object"),
        (b"[1, 2]", "its reply was not a JSON object"),
        (
            enc({"type": "error", "error": {"type": "overloaded_error", "message": "sk-ant-x"}}),
            "it answered 200 with an error object",
        ),
        (enc({**REPLY, "error": {"type": "api_error"}}), "it answered 200 with an error object"),
        (enc({**REPLY, "type": "completion"}), "its reply was not a message"),
        (enc({k: v for k, v in REPLY.items() if k != "type"}), "its reply was not a message"),
        (enc({**REPLY, "content": "hello"}), "its reply had no content"),
        (enc({k: v for k, v in REPLY.items() if k != "content"}), "its reply had no content"),
        # An OpenAI-shaped reply on the Anthropic wire is not a message either.
        (enc({"object": "chat.completion", "choices": []}), "its reply was not a message"),
    ],
)
def test_not_a_completion(data: bytes, why: str | None) -> None:
    got = ANTHROPIC.not_a_completion(ANTHROPIC_MESSAGES, data)
    assert got == why
    assert got is None or "sk-ant" not in got


def test_reply_view_normalizes_usage_and_lists_the_output_texts() -> None:
    view = ANTHROPIC.reply(enc(REPLY))
    assert view.usage == {
        "prompt_tokens": 21 + 4000 + 1000,
        "completion_tokens": 77,
        "total_tokens": 21 + 4000 + 1000 + 77,
        "prompt_tokens_details": {"cached_tokens": 4000, "cache_write_tokens": 1000},
    }
    # Thinking, text, then the tool's name and its input's JSON (msgspec's, compact, keys in
    # order); a signature and redacted thinking are not output text.
    assert view.output_texts() == [
        "First, the weather.",
        "Let me check.",
        "get_weather",
        '{"city":"Zürich","units":["c","f"],"days":3}',
    ]
    # What the gateway's check makes of it: all prompt tokens, reads and writes within them.
    counts = usage_check.check(view.usage, usage_check.Bounds(context_window=200_000, output=100))
    assert counts == usage_check.Counts(5021, 4000, 77, 1000)


def test_usage_normalization_edges() -> None:
    assert normalize_usage(None) is None
    assert normalize_usage("12") == "12"
    assert normalize_usage([1]) == [1]
    assert normalize_usage({}) == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    }
    # Missing and null cache figures are 0.
    got = normalize_usage({"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": None})
    assert got["prompt_tokens"] == 5 and got["total_tokens"] == 7


@pytest.mark.parametrize(
    ("usage", "prompt", "kind"),
    [
        ({"input_tokens": "12", "output_tokens": 3}, "12", "not_integer"),
        ({"input_tokens": 12.0, "output_tokens": 3}, 12.0, "not_integer"),
        ({"input_tokens": True, "output_tokens": 3}, True, "not_integer"),
        ({"input_tokens": 10, "cache_read_input_tokens": -4, "output_tokens": 3}, -4, "negative"),
        (
            {"input_tokens": 10, "cache_creation_input_tokens": "x", "output_tokens": 3},
            "x",
            "not_integer",
        ),
        ({"input_tokens": 10, "output_tokens": "3"}, 10, "not_integer"),
        ({"input_tokens": 10, "output_tokens": -3}, 10, "negative"),
    ],
)
def test_a_figure_that_is_not_a_count_is_passed_through_for_the_check(
    usage: dict[str, Any], prompt: Any, kind: str
) -> None:
    """The sum is not taken over a bad figure (it would hide it or raise): it goes through as
    it came, and the gateway's check flags the usage."""
    got = ANTHROPIC.reply(enc({**REPLY, "usage": usage})).usage
    assert got["prompt_tokens"] == prompt and "total_tokens" not in got
    assert got["completion_tokens"] == usage["output_tokens"]
    anomaly = usage_check.check(got, usage_check.Bounds(context_window=0, output=100))
    assert isinstance(anomaly, usage_check.Anomaly) and anomaly.kind == kind


def test_a_reply_whose_content_does_not_decode_keeps_its_usage() -> None:
    view = ANTHROPIC.reply(enc({**REPLY, "content": [{"type": 7}]}))
    assert view.output_texts() == []
    assert view.usage["completion_tokens"] == 77
    assert ANTHROPIC.reply(b"garbage").usage is None
    assert ANTHROPIC.reply(b"garbage").output_texts() == []
    # A tool call with null input still counts its name and "null".
    view = ANTHROPIC.reply(
        enc({**REPLY, "content": [{"type": "tool_use", "name": "f", "input": None}]})
    )
    assert view.output_texts() == ["f", "null"]


def test_the_scanner_through_the_wire(meters: dict[str, Meter]) -> None:
    meter = meters["cl100k_base"]
    relay = ANTHROPIC.scanner(True, meter)
    assert isinstance(relay, AnthropicRelay)
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_9",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [],
            "usage": {
                "input_tokens": 7,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    }
    events = [
        ("message_start", start),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello there, "},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "world."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 4},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    data = b"".join(f"event: {k}\r\ndata: {json.dumps(v)}\r\n\r\n".encode() for k, v in events)
    assert relay.feed(data[:50]) + relay.feed(data[50:]) + relay.finish() == data
    assert relay.done and relay.first_token and not relay.held_done
    assert relay.output_tokens == meter.count("Hello there, world.")
    assert ANTHROPIC.stream_usage(relay.usage or b"") == {
        "prompt_tokens": 107,
        "completion_tokens": 4,
        "total_tokens": 111,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
    }
    assert ANTHROPIC.usage_tail(relay, None) == b""  # type: ignore[arg-type]
    assert ANTHROPIC.stream_usage(b"not json") is None


def test_stream_error_is_an_anthropic_error_event_the_sdk_reads() -> None:
    err = ApiError(502, "the upstream failed", type="upstream_error")
    out = ANTHROPIC.stream_error(err, end=True)
    assert out == ANTHROPIC.stream_error(err, end=False)
    event, data, *rest = out.split(b"\n")
    assert event == b"event: error" and rest == [b"", b""]
    body = json.loads(data.removeprefix(b"data: "))
    assert body == {
        "type": "error",
        "error": {"type": "api_error", "message": "the upstream failed"},
    }
    overloaded = json.loads(
        ANTHROPIC.stream_error(ApiError(529, "busy"), end=True).split(b"\n")[1][6:]
    )
    assert overloaded["error"]["type"] == "overloaded_error"
    # The official SDK's error type for that body.
    assert anthropic.types.ErrorResponse.model_validate(body).error.type == "api_error"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (
            enc({"type": "error", "error": {"type": "overloaded_error", "message": "m"}}),
            "overloaded_error",
        ),
        (enc({"type": "error", "error": {"type": "rate_limit_error"}}), "rate_limit_error"),
        (enc({"error": "flat"}), ""),
        (enc([1]), ""),
        (b"<html>", ""),
    ],
)
def test_error_code(data: bytes, code: str) -> None:
    assert ANTHROPIC.error_code(data) == code


# -- against the mock upstream's Anthropic wire ---------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}
ASKS: dict[str, dict[str, Any]] = {
    "text": {},
    "thinking": {"thinking": {"type": "enabled", "budget_tokens": 1024}},
    "tool": {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}},
    "cached": {
        "system": [
            {
                "type": "text",
                "text": "You are terse. " * 400,
                "cache_control": {"type": "ephemeral"},
            }
        ]
    },
}


@pytest.mark.parametrize("ask", sorted(ASKS))
async def test_the_wire_against_the_mock_upstream(
    aiohttp_server: Any, meters: dict[str, Meter], ask: str
) -> None:
    """The request the wire builds (body and headers) is one the mock accepts, with the cap
    applied; the reply view and the relay, streamed or not, count exactly what the mock served,
    and read its usage (cache reads and writes included) as the mock's ledger has it."""
    meter = meters["cl100k_base"]
    server = await aiohttp_server(build_app(MockOptions(require_key="sk-ant")))
    url = f"http://{server.host}:{server.port}/v1{ANTHROPIC.path(ANTHROPIC_MESSAGES)}"
    headers = ANTHROPIC.auth("sk-ant", provider())
    rng = random.Random(ask)
    async with aiohttp.ClientSession() as http:
        for stream in (False, True, False, True):  # "cached": a write, then reads
            payload = {
                "model": "client-model",
                "max_tokens": 5000,
                "messages": [{"role": "user", "content": "Weather in Oslo, please."}],
                **ASKS[ask],
            }
            body = ANTHROPIC.request_body(payload, "gpt-4o-mini", 1500, stream)
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                data = await resp.read()
            async with http.get(f"http://{server.host}:{server.port}/mock/ledger") as resp:
                entry = (await resp.json())["entries"][-1]
            assert entry["stream"] is stream and entry["model"] == "gpt-4o-mini"
            if stream:
                relay = ANTHROPIC.scanner(False, meter)
                out = bytearray()
                at = 0
                while at < len(data):
                    step = 1 + rng.randrange(200)
                    out += relay.feed(data[at : at + step])
                    at += step
                out += relay.finish()
                assert out == data and relay.done
                output = relay.output_tokens
                usage = ANTHROPIC.stream_usage(relay.usage or b"")
            else:
                assert ANTHROPIC.not_a_completion(ANTHROPIC_MESSAGES, data) is None
                view = ANTHROPIC.reply(data)
                output = sum(meter.count(t) for t in view.output_texts())
                usage = view.usage
                if ask == "tool":
                    assert json.loads(data)["content"][0]["type"] == "tool_use"
            assert 0 < output == entry["completion_tokens"] <= 1500
            counts = usage_check.check(usage, usage_check.Bounds(200_000, 1500))
            assert counts == usage_check.Counts(
                entry["prompt_tokens"],
                entry["cache_read_tokens"],
                entry["completion_tokens"],
                entry["cache_creation_tokens"],
            )
            if ask == "cached":
                assert entry["cache_read_tokens"] + entry["cache_creation_tokens"] > 0
