"""The mock upstream's Anthropic Messages API (through the official anthropic SDK and at the
wire) and its OpenAI tool calls and reasoning (through the openai SDK): every figure is
recomputed here from the vocabulary, independently of the mock's own counting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from tokenhub import Meter
from tokenhub.mock import MockOptions, build_app, tools

MODEL = "gpt-4o-mini"  # cl100k_base on the mock
OVERHEAD = 3  # per message, documented in tokenhub.mock.anthropic
VERSION = {"anthropic-version": "2023-06-01"}
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "verbose": {"type": "boolean"},
        },
        "required": ["city", "days", "unit"],
    },
}
SEARCH: Any = {
    "name": "search",
    "input_schema": {
        "type": "object",
        "properties": {"terms": {"type": "array", "items": {"type": "string"}}},
        "required": ["terms"],
    },
}


def jtext(value: Any) -> str:
    """Compact JSON, as msgspec encodes (an independent encoder)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@pytest.fixture(scope="module")
def meter() -> Meter:
    return Meter.load("cl100k_base")


@pytest.fixture
async def mock(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(build_app(MockOptions(require_key="sk-ant")))
    return server


def base(server: TestServer) -> str:
    return f"http://{server.host}:{server.port}"


@pytest.fixture
async def client(mock: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=base(mock), api_key="sk-ant", max_retries=0) as c:
        yield c


@pytest.fixture
async def oai(mock: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=base(mock) + "/v1", api_key="sk-ant", max_retries=0
    ) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def raw(
    http: aiohttp.ClientSession,
    server: TestServer,
    body: Any,
    path: str = "/v1/messages",
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {**VERSION, **headers}
    if "Authorization" not in hdrs:
        hdrs.setdefault("x-api-key", "sk-ant")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(base(server) + path, data=data, headers=hdrs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def events(payload: bytes) -> list[tuple[str, Any]]:
    """An Anthropic SSE stream as (event name, data) pairs, checking the framing."""
    text = payload.decode()
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        parsed = json.loads(data.removeprefix("data: "))
        assert parsed["type"] == name.removeprefix("event: ")
        out.append((parsed["type"], parsed))
    return out


async def ledger(http: aiohttp.ClientSession, server: TestServer) -> Any:
    async with http.get(base(server) + "/mock/ledger") as resp:
        return await resp.json()


def ask(text: str = "Tell me about token meters.") -> list[Any]:
    return [{"role": "user", "content": text}]


# -- text ---------------------------------------------------------------------------------------


async def test_text_reply_usage_and_the_chat_text(
    client: anthropic.AsyncAnthropic, oai: openai.AsyncOpenAI, meter: Meter
) -> None:
    raw_resp = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=100, system="Be terse.", messages=ask()
    )
    m = await raw_resp.parse()
    assert raw_resp.headers["request-id"] == "req_" + m.id.removeprefix("msg_")
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert [b.type for b in m.content] == ["text"]
    text = m.content[0].text  # type: ignore[union-attr]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.output_tokens == meter.count(text) == 32
    prompt = meter.count("Be terse.") + OVERHEAD + meter.count("Tell me about token meters.")
    assert m.usage.input_tokens == prompt
    assert m.usage.cache_read_input_tokens == m.usage.cache_creation_input_tokens == 0
    # The same deterministic text as the chat route's for this model.
    chat = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}]
    )
    assert chat.choices[0].message.content == text


async def test_max_tokens_caps_the_text(client: anthropic.AsyncAnthropic, meter: Meter) -> None:
    full = await client.messages.create(model=MODEL, max_tokens=1000, messages=ask())
    capped = await client.messages.create(model=MODEL, max_tokens=9, messages=ask())
    text = capped.content[0].text  # type: ignore[union-attr]
    assert capped.stop_reason == "max_tokens"
    assert capped.usage.output_tokens == meter.count(text) == 9
    assert full.content[0].text.startswith(text)  # type: ignore[union-attr]


async def test_stream_events_on_the_wire_and_through_the_sdk(
    client: anthropic.AsyncAnthropic,
    mock: TestServer,
    http: aiohttp.ClientSession,
    meter: Meter,
) -> None:
    body = {"model": MODEL, "max_tokens": 50, "messages": ask(), "stream": True}
    status, headers, payload = await raw(http, mock, body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    evs = events(payload)
    kinds = [k for k, _ in evs]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert headers["request-id"] == "req_" + start["id"].removeprefix("msg_")
    prompt = OVERHEAD + meter.count("Tell me about token meters.")
    assert start["usage"]["input_tokens"] == prompt and start["usage"]["output_tokens"] == 1
    assert start["content"] == [] and start["stop_reason"] is None
    deltas = [d["delta"]["text"] for k, d in evs if k == "content_block_delta"]
    assert all(meter.count(p) == 1 for p in deltas)  # one token per delta
    text = "".join(deltas)
    final = evs[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"] == {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": meter.count(text),
    }
    async with client.messages.stream(model=MODEL, max_tokens=50, messages=ask()) as s:
        streamed = "".join([t async for t in s.text_stream])
        message = await s.get_final_message()
    whole = await client.messages.create(model=MODEL, max_tokens=50, messages=ask())
    assert streamed == text == whole.content[0].text  # type: ignore[union-attr]
    assert message.usage.output_tokens == whole.usage.output_tokens == meter.count(text)
    assert message.usage.input_tokens == prompt
    entries = (await ledger(http, mock))["entries"]
    assert [(e["endpoint"], e["stream"], e["usage_sent"]) for e in entries] == [
        ("messages", True, True),
        ("messages", True, True),
        ("messages", False, True),
    ]
    assert all(e["completion_tokens"] == meter.count(text) for e in entries)
    assert all(e["prompt_tokens"] == prompt for e in entries)


async def test_stop_sequences_cut_the_text(client: anthropic.AsyncAnthropic, meter: Meter) -> None:
    full = await client.messages.create(model=MODEL, max_tokens=200, messages=ask())
    text = full.content[0].text  # type: ignore[union-attr]
    words = text.split(" ")
    stop = " " + words[6]
    at = text.find(stop)
    assert at > 0
    cut = await client.messages.create(
        model=MODEL, max_tokens=200, messages=ask(), stop_sequences=["zzz-never", stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:at]  # type: ignore[union-attr]
    assert cut.usage.output_tokens == meter.count(text[:at])
    async with client.messages.stream(
        model=MODEL, max_tokens=200, messages=ask(), stop_sequences=[stop]
    ) as s:
        streamed = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert streamed == text[:at] and final.stop_sequence == stop
    assert final.usage.output_tokens == meter.count(text[:at])
    miss = await client.messages.create(
        model=MODEL, max_tokens=200, messages=ask(), stop_sequences=["zzz-never"]
    )
    assert miss.stop_reason == "end_turn" and miss.content[0].text == text  # type: ignore[union-attr]


# -- thinking -----------------------------------------------------------------------------------


async def test_thinking_block_counted_in_output(
    client: anthropic.AsyncAnthropic, mock: TestServer, http: aiohttp.ClientSession, meter: Meter
) -> None:
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    m = await client.messages.create(
        model=MODEL,
        max_tokens=2000,
        messages=ask(),
        thinking=thinking,
    )
    assert [b.type for b in m.content] == ["thinking", "text"]
    th, tx = m.content[0], m.content[1]
    assert th.type == "thinking" and tx.type == "text"
    assert th.signature and meter.count(th.thinking) == 32 < 1024
    assert th.thinking != tx.text
    assert m.usage.output_tokens == meter.count(th.thinking) + meter.count(tx.text)
    # Streamed: thinking deltas, a signature delta, then text; the same blocks.
    async with client.messages.stream(
        model=MODEL,
        max_tokens=2000,
        messages=ask(),
        thinking=thinking,
    ) as s:
        kinds = [e.delta.type async for e in s if e.type == "content_block_delta"]
        final = await s.get_final_message()
    assert kinds == ["thinking_delta"] * 32 + ["signature_delta"] + ["text_delta"] * 32
    assert [b.model_dump(exclude={"parsed_output"}) for b in final.content] == [
        b.model_dump() for b in m.content
    ]
    assert final.usage.output_tokens == m.usage.output_tokens
    # Thinking leaves max_tokens - its tokens for the text.
    tight = await client.messages.create(
        model=MODEL,
        max_tokens=1030,
        messages=ask(),
        thinking=thinking,
        extra_headers={"x-mock-completion-tokens": "1200"},
    )
    t_tokens = meter.count(tight.content[0].thinking)  # type: ignore[union-attr]
    assert t_tokens == 1023
    assert tight.stop_reason == "max_tokens"
    assert tight.usage.output_tokens == 1030 == t_tokens + meter.count(tight.content[1].text)  # type: ignore[union-attr]
    adaptive = await client.messages.create(
        model=MODEL,
        max_tokens=20,
        messages=ask(),
        thinking={"type": "adaptive"},
        extra_headers={"x-mock-completion-tokens": "100"},
    )
    assert [meter.count(b.thinking) for b in adaptive.content if b.type == "thinking"] == [10]
    assert adaptive.usage.output_tokens == 20 and adaptive.stop_reason == "max_tokens"
    for bad, message in (
        ({"type": "sometimes"}, "thinking.type"),
        ({"type": "enabled", "budget_tokens": 500}, "greater than or equal to 1024"),
        ({"type": "enabled", "budget_tokens": 4000}, "must be greater than `thinking.budget"),
    ):
        status, _, body = await raw(
            http, mock, {"model": MODEL, "max_tokens": 2000, "messages": ask(), "thinking": bad}
        )
        err = json.loads(body)
        assert status == 400 and err["error"]["type"] == "invalid_request_error"
        assert message in err["error"]["message"]


# -- tools --------------------------------------------------------------------------------------


async def test_forced_tool_use(
    client: anthropic.AsyncAnthropic, mock: TestServer, http: aiohttp.ClientSession, meter: Meter
) -> None:
    m = await client.messages.create(
        model=MODEL,
        max_tokens=500,
        messages=ask("Weather in Paris?"),
        tools=[WEATHER, SEARCH],
        tool_choice={"type": "any"},
    )
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    use = m.content[0]
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert set(use.input) == {"city", "days", "unit"}
    assert isinstance(use.input["city"], str) and meter.count(use.input["city"]) == 1
    assert use.input["days"] == 1 and use.input["unit"] == "celsius"
    assert m.usage.output_tokens == meter.count("get_weather") + meter.count(jtext(use.input))
    tools_tokens = meter.count(jtext(WEATHER)) + meter.count(jtext(SEARCH))
    assert m.usage.input_tokens == tools_tokens + OVERHEAD + meter.count("Weather in Paris?")

    named = await client.messages.create(
        model=MODEL,
        max_tokens=500,
        messages=ask("Search"),
        tools=[WEATHER, SEARCH],
        tool_choice={"type": "tool", "name": "search"},
    )
    s_use = named.content[0]
    assert s_use.type == "tool_use" and s_use.name == "search"
    terms = s_use.input["terms"]
    assert isinstance(terms, list) and len(terms) == 1

    # Streamed: the name in content_block_start, the input JSON in fragments.
    body: Any = {
        "model": MODEL,
        "max_tokens": 500,
        "messages": ask("Weather in Paris?"),
        "tools": [WEATHER, SEARCH],
        "tool_choice": {"type": "any"},
        "stream": True,
    }
    _, _, payload = await raw(http, mock, body)
    evs = events(payload)
    start = next(d for k, d in evs if k == "content_block_start")
    assert start["content_block"]["name"] == "get_weather" and start["content_block"]["input"] == {}
    parts = [d["delta"]["partial_json"] for k, d in evs if k == "content_block_delta"]
    assert len(parts) == 3 and json.loads("".join(parts)) == use.input
    assert "".join(parts) == jtext(use.input)
    assert evs[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert evs[-2][1]["usage"]["output_tokens"] == m.usage.output_tokens
    async with client.messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as s:
        final = await s.get_final_message()
    assert final.content[0].input == use.input  # type: ignore[union-attr]

    # A tool call that does not fit in max_tokens is not made.
    small = await client.messages.create(
        model=MODEL,
        max_tokens=3,
        messages=ask(),
        tools=[WEATHER],
        tool_choice={"type": "any"},
    )
    assert small.stop_reason == "max_tokens" and small.content[0].type == "text"
    assert small.usage.output_tokens == 3


async def test_auto_tool_calls_make_an_agent_loop(
    client: anthropic.AsyncAnthropic, meter: Meter
) -> None:
    auto = {"x-mock-tool-calls": "auto"}
    tools: Any = [WEATHER]
    plain = await client.messages.create(model=MODEL, max_tokens=500, messages=ask(), tools=tools)
    assert plain.stop_reason == "end_turn"  # "forced" (the default) calls only when forced
    first = await client.messages.create(
        model=MODEL, max_tokens=500, messages=ask(), tools=tools, extra_headers=auto
    )
    assert first.stop_reason == "tool_use"
    use = first.content[0]
    assert use.type == "tool_use"
    history: list[Any] = [
        *ask(),
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}],
        },
    ]
    second = await client.messages.create(
        model=MODEL, max_tokens=500, messages=history, tools=tools, extra_headers=auto
    )
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    prompt = (
        meter.count(jtext(WEATHER))
        + OVERHEAD
        + meter.count("Tell me about token meters.")
        + OVERHEAD
        + meter.count("get_weather")
        + meter.count(jtext(use.input))
        + OVERHEAD
        + meter.count("Sunny, 21 C")
    )
    assert second.usage.input_tokens == prompt
    none = await client.messages.create(
        model=MODEL,
        max_tokens=500,
        messages=ask(),
        tools=tools,
        tool_choice={"type": "none"},
        extra_headers=auto,
    )
    assert none.stop_reason == "end_turn"


# -- prompt caching -----------------------------------------------------------------------------

LONG = " ".join(["the token meter counts every price in the cache"] * 130)


def cached_system() -> list[Any]:
    return [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]


def turn(text: str, cc: bool) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if cc:
        block["cache_control"] = {"type": "ephemeral"}
    return {"role": "user", "content": [block]}


async def test_prompt_cache_writes_then_reads(
    mock: TestServer, http: aiohttp.ClientSession, meter: Meter
) -> None:
    async def usage(messages: list[Any], key: str, **headers: str) -> dict[str, int]:
        body = {"model": MODEL, "max_tokens": 20, "system": cached_system(), "messages": messages}
        status, _, payload = await raw(http, mock, body, **{"x-api-key": key, **headers})
        assert status == 200, payload
        u = json.loads(payload)["usage"]
        return {
            k: u[k]
            for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
        }

    s = meter.count(LONG)
    assert s >= 1024
    u1 = OVERHEAD + meter.count("first question")
    assistant = {"role": "assistant", "content": "An answer."}
    a1 = OVERHEAD + meter.count("An answer.")
    u2 = OVERHEAD + meter.count("second question")

    def fig(inp: int, read: int, write: int) -> dict[str, int]:
        return {
            "input_tokens": inp,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": write,
        }

    # Only the system breakpoint: written once, then read.
    assert await usage([turn("first question", False)], "sk-ant") == fig(u1, 0, s)
    assert await usage([turn("first question", False)], "sk-ant") == fig(u1, s, 0)
    # A moving breakpoint on the last message, as coding agents send: turn 2 reads turn 1's
    # prefix through the block lookback, and writes its own growth. (The ledger is reset, the
    # prompt cache is not: the system prefix is still there.)
    await http.post(base(mock) + "/mock/reset")
    t1 = [turn("first question", True)]
    t2 = [turn("first question", False), assistant, turn("second question", True)]
    assert await usage(t1, "sk-ant") == fig(0, s, u1)
    assert await usage(t2, "sk-ant") == fig(0, s + u1, a1 + u2)
    assert await usage(t2, "sk-ant") == fig(0, s + u1 + a1 + u2, 0)
    led = await ledger(http, mock)
    assert led["totals"]["cache_read_tokens"] == s + (s + u1) + (s + u1 + a1 + u2)
    assert led["totals"]["cache_creation_tokens"] == u1 + a1 + u2
    entries = led["entries"]
    assert [e["prompt_tokens"] for e in entries] == [s + u1, s + u1 + a1 + u2, s + u1 + a1 + u2]
    assert [e["cache_read_tokens"] for e in entries] == [s, s + u1, s + u1 + a1 + u2]


async def test_prompt_cache_lookback_min_size_ttl_and_keys(
    aiohttp_server: Any, http: aiohttp.ClientSession, meter: Meter
) -> None:
    server: TestServer = await aiohttp_server(build_app(MockOptions()))

    async def usage(messages: list[Any], system: Any, **headers: str) -> tuple[int, int, int]:
        body = {"model": MODEL, "max_tokens": 20, "system": system, "messages": messages}
        status, _, payload = await raw(http, server, body, **headers)
        assert status == 200, payload
        u = json.loads(payload)["usage"]
        return u["input_tokens"], u["cache_read_input_tokens"], u["cache_creation_input_tokens"]

    s = meter.count(LONG)
    u1 = OVERHEAD + meter.count("first question")
    a1 = OVERHEAD + meter.count("An answer.")
    u2 = OVERHEAD + meter.count("second question")
    plain = [{"type": "text", "text": LONG}]
    t1 = [turn("first question", True)]
    t2 = [
        turn("first question", False),
        {"role": "assistant", "content": "An answer."},
        turn("second question", True),
    ]
    # Without lookback only breakpoints are read: turn 1's prefix is not one in turn 2.
    no_look = {"x-api-key": "key-b", "x-mock-cache-lookback-blocks": "0"}
    assert await usage(t1, plain, **no_look) == (0, 0, s + u1)
    assert await usage(t2, plain, **no_look) == (0, 0, s + u1 + a1 + u2)
    # With the default lookback, another key starts cold, then reads through it.
    assert await usage(t1, plain, **{"x-api-key": "key-c"}) == (0, 0, s + u1)
    assert await usage(t2, plain, **{"Authorization": "Bearer key-c"}) == (0, s + u1, a1 + u2)
    # Below min_cache_tokens nothing is cached; the knob lowers the bar.
    short = [turn("first question", True)]
    assert await usage(short, "Be terse.", **{"x-api-key": "key-d"}) == (
        meter.count("Be terse.") + u1,
        0,
        0,
    )
    low = {"x-api-key": "key-d", "x-mock-min-cache-tokens": "5"}
    expected = meter.count("Be terse.") + u1
    assert await usage(short, "Be terse.", **low) == (0, 0, expected)
    assert await usage(short, "Be terse.", **low) == (0, expected, 0)
    # Entries expire cache_ttl_s after the write (or last read).
    ttl = {"x-api-key": "key-e", "x-mock-cache-ttl-s": "0.2"}
    assert await usage(t1, plain, **ttl) == (0, 0, s + u1)
    assert await usage(t1, plain, **ttl) == (0, s + u1, 0)
    await asyncio.sleep(0.3)
    assert await usage(t1, plain, **ttl) == (0, 0, s + u1)
    # A 1-hour breakpoint is reported as such.
    hour = [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "first question",
                    "cache_control": {"type": "ephemeral", "ttl": "1h"},
                }
            ],
        }
    ]
    body = {"model": MODEL, "max_tokens": 20, "system": plain, "messages": hour}
    _, _, payload = await raw(http, server, body, **{"x-api-key": "key-f"})
    creation = json.loads(payload)["usage"]["cache_creation"]
    assert creation == {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": s + u1}
    # At most 4 breakpoints.
    many = [turn(f"q{i}", True) for i in range(5)]
    status, _, payload = await raw(
        http, server, {"model": MODEL, "max_tokens": 20, "messages": many}
    )
    assert status == 400
    assert "A maximum of 4 blocks with cache_control" in json.loads(payload)["error"]["message"]


async def test_count_tokens(
    client: anthropic.AsyncAnthropic, mock: TestServer, http: aiohttp.ClientSession, meter: Meter
) -> None:
    tools: Any = [WEATHER]
    history: Any = [
        *ask("Weather?"),
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [
                        {"type": "text", "text": "Rain."},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        },
                    ],
                }
            ],
        },
    ]
    counted = await client.messages.count_tokens(
        model=MODEL, system="Be terse.", messages=history, tools=tools
    )
    expected = (
        meter.count(jtext(WEATHER))
        + meter.count("Be terse.")
        + OVERHEAD
        + meter.count("Weather?")
        + OVERHEAD
        + meter.count("Let me check.")
        + meter.count("get_weather")
        + meter.count(jtext({"city": "Oslo"}))
        + OVERHEAD
        + meter.count("Rain.")
        + 85  # an image, documented as IMAGE_TOKENS
    )
    assert counted.input_tokens == expected
    m = await client.messages.create(
        model=MODEL, max_tokens=10, system="Be terse.", messages=history, tools=tools
    )
    assert m.usage.input_tokens == expected
    led = await ledger(http, mock)
    assert led["totals"]["count_tokens_requests"] == 1
    assert [e["endpoint"] for e in led["entries"]] == ["messages"]  # count_tokens is free
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.count_tokens(model="no-such-model", messages=ask())


# -- errors -------------------------------------------------------------------------------------


async def test_errors_in_anthropics_shape(
    client: anthropic.AsyncAnthropic, mock: TestServer, http: aiohttp.ClientSession
) -> None:
    ok = {"model": MODEL, "max_tokens": 10, "messages": ask()}
    cases: list[tuple[dict[str, Any], dict[str, str], int, str, str]] = [
        (ok, {"anthropic-version": ""}, 400, "invalid_request_error", "anthropic-version"),
        (
            {"model": MODEL, "messages": ask()},
            {},
            400,
            "invalid_request_error",
            "max_tokens: Field required",
        ),
        ({**ok, "max_tokens": 0}, {}, 400, "invalid_request_error", "max_tokens"),
        ({**ok, "messages": []}, {}, 400, "invalid_request_error", "messages"),
        (
            {**ok, "messages": [{"role": "system", "content": "x"}]},
            {},
            400,
            "invalid_request_error",
            "top-level `system`",
        ),
        (
            {**ok, "messages": [{"role": "user", "content": [{"type": "nope"}]}]},
            {},
            400,
            "invalid_request_error",
            "messages.0.content.0",
        ),
        (
            {**ok, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
            {},
            400,
            "invalid_request_error",
            "Tool 'nope' not found",
        ),
        (
            {
                **ok,
                "max_tokens": 2000,
                "tools": [WEATHER],
                "tool_choice": {"type": "any"},
                "thinking": {"type": "enabled", "budget_tokens": 1024},
            },
            {},
            400,
            "invalid_request_error",
            "Thinking may not be enabled when tool_choice forces tool use",
        ),
        ({**ok, "tool_choice": {"type": "any"}}, {}, 400, "invalid_request_error", "tools"),
        ({**ok, "model": "claude-nope"}, {}, 404, "not_found_error", "model: claude-nope"),
        (ok, {"x-api-key": "wrong"}, 401, "authentication_error", "invalid x-api-key"),
        (ok, {"x-mock-status": "529"}, 529, "overloaded_error", "Overloaded"),
        (ok, {"x-mock-status": "500"}, 500, "api_error", "Internal server error"),
        (ok, {"x-mock-bogus": "1"}, 400, "invalid_request_error", "x-mock-"),
    ]
    for body, headers, status, kind, message in cases:
        got, hdrs, payload = await raw(http, mock, body, **headers)
        err = json.loads(payload)
        assert (got, err["type"], err["error"]["type"]) == (status, "error", kind), (body, err)
        assert message in err["error"]["message"], err
        assert hdrs["request-id"].startswith("req_")
    # aiohttp's own errors on these paths.
    async with http.get(base(mock) + "/v1/messages", headers=VERSION) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with http.post(base(mock) + "/v1/messages/nope", json=ok, headers=VERSION) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
    # No key at all.
    async with http.post(base(mock) + "/v1/messages", json=ok, headers=VERSION) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == "x-api-key header is required"
    # The SDK's exception classes.
    with pytest.raises(anthropic.RateLimitError) as rl:
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=ask(), extra_headers={"x-mock-status": "429"}
        )
    assert rl.value.response.headers["retry-after"] == "1"
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=ask(), extra_headers={"x-mock-status": "529"}
        )
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="nope", max_tokens=10, messages=ask())
    async with anthropic.AsyncAnthropic(base_url=base(mock), api_key="bad", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            await bad.messages.create(model=MODEL, max_tokens=10, messages=ask())
    # Bearer auth is accepted as well as x-api-key.
    async with anthropic.AsyncAnthropic(
        base_url=base(mock), auth_token="sk-ant", max_retries=0
    ) as bearer:
        assert (await bearer.messages.create(model=MODEL, max_tokens=5, messages=ask())).usage
    # Errors serve nothing: the ledger has them with zero tokens.
    led = await ledger(http, mock)
    failed = [e for e in led["entries"] if e["status"] != 200]
    assert failed and all(e["prompt_tokens"] == e["completion_tokens"] == 0 for e in failed)
    assert led["totals"]["ok"] == 1


async def test_omit_usage_and_stall(
    mock: TestServer, http: aiohttp.ClientSession, meter: Meter
) -> None:
    body = {"model": MODEL, "max_tokens": 50, "messages": ask()}
    _, _, payload = await raw(http, mock, body, **{"x-mock-omit-usage": "true"})
    assert "usage" not in json.loads(payload)
    _, _, payload = await raw(http, mock, {**body, "stream": True}, **{"x-mock-omit-usage": "1"})
    evs = events(payload)
    assert "usage" not in evs[0][1]["message"] and "usage" not in evs[-2][1]
    # A stream stalled after 10 events: the ledger has the deltas written (7: after
    # message_start, content_block_start and ping).
    hdrs = {"x-api-key": "sk-ant", **VERSION, "x-mock-stall": "10"}
    async with http.post(
        base(mock) + "/v1/messages", json={**body, "stream": True}, headers=hdrs
    ) as resp:
        got = b""
        while got.count(b"\n\n") < 10:
            got += await asyncio.wait_for(resp.content.readany(), 5)
    texts = [d["delta"]["text"] for k, d in events(got) if k == "content_block_delta"]
    assert len(texts) == 7
    for _ in range(100):
        entries = (await ledger(http, mock))["entries"]
        if entries[-1]["disconnected"]:
            break
        await asyncio.sleep(0.05)
    last = entries[-1]
    assert last["stalled"] and last["completion_tokens"] == meter.count("".join(texts)) == 7
    assert not last["usage_sent"]
    assert [e["usage_sent"] for e in entries[:2]] == [False, False]


# -- OpenAI chat: tool calls and reasoning -------------------------------------------------------

FN: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]},
}


async def test_chat_tool_calls(
    oai: openai.AsyncOpenAI, mock: TestServer, http: aiohttp.ClientSession, meter: Meter
) -> None:
    msgs: Any = [{"role": "user", "content": "Weather in Paris?"}]
    r = await oai.chat.completions.create(
        model=MODEL, messages=msgs, tools=[FN], tool_choice="required"
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert (
        args["unit"] == "celsius" and args["days"] == 1 and jtext(args) == call.function.arguments
    )
    assert r.usage is not None
    assert r.usage.completion_tokens == meter.count("get_weather") + meter.count(
        call.function.arguments
    )
    assert r.usage.prompt_tokens == meter.count_messages(msgs) + meter.count(jtext([FN]))
    named = await oai.chat.completions.create(
        model=MODEL,
        messages=msgs,
        tools=[FN],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert named.choices[0].message.tool_calls is not None
    # Streamed: id and name first with empty arguments, then argument fragments.
    stream = await oai.chat.completions.create(
        model=MODEL,
        messages=msgs,
        tools=[FN],
        tool_choice="required",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    deltas = [
        c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls
    ]
    assert deltas[0] is not None and deltas[0][0].function is not None
    assert deltas[0][0].id and deltas[0][0].function.name == "get_weather"
    assert deltas[0][0].function.arguments == ""
    joined = "".join(d[0].function.arguments or "" for d in deltas if d[0].function)
    assert joined == call.function.arguments
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # tool_calls="auto": an agent loop ends once a tool result is the last message.
    auto = {"x-mock-tool-calls": "auto"}
    first = await oai.chat.completions.create(
        model=MODEL, messages=msgs, tools=[FN], extra_headers=auto
    )
    assert first.choices[0].finish_reason == "tool_calls"
    loop: Any = [
        *msgs,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny."},
    ]
    second = await oai.chat.completions.create(
        model=MODEL, messages=loop, tools=[FN], extra_headers=auto
    )
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content
    plain = await oai.chat.completions.create(model=MODEL, messages=msgs, tools=[FN])
    assert plain.choices[0].finish_reason == "stop"  # the default calls only when forced
    status, _, payload = await raw(
        http,
        mock,
        {
            "model": MODEL,
            "messages": msgs,
            "tools": [FN],
            "tool_choice": {"type": "function", "function": {"name": "x"}},
        },
        path="/v1/chat/completions",
        Authorization="Bearer sk-ant",
    )
    assert status == 400 and json.loads(payload)["error"]["param"] == "tool_choice"
    led = await ledger(http, mock)
    served = [e for e in led["entries"] if e["status"] == 200]
    assert served[0]["completion_tokens"] == r.usage.completion_tokens
    assert served[2]["completion_tokens"] == r.usage.completion_tokens  # the stream


async def test_chat_reasoning_content(oai: openai.AsyncOpenAI, meter: Meter) -> None:
    msgs: Any = [{"role": "user", "content": "Think about it."}]
    r = await oai.chat.completions.create(model="deepseek-reasoner", messages=msgs)
    ds = Meter.load("deepseek-v4")
    message: Any = r.choices[0].message
    reasoning, content = message.reasoning_content, message.content
    assert reasoning and content and reasoning != content
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == ds.count(reasoning) == 32
    assert r.usage.completion_tokens == ds.count(reasoning) + ds.count(content)
    stream = await oai.chat.completions.create(
        model="deepseek-reasoner",
        messages=msgs,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    got_r = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    got_c = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (got_r, got_c) == (reasoning, content)
    # reasoning_effort asks any model; the cap covers reasoning first.
    capped = await oai.chat.completions.create(
        model=MODEL, messages=msgs, reasoning_effort="low", max_tokens=40
    )
    m2: Any = capped.choices[0].message
    assert meter.count(m2.reasoning_content) == 32 and meter.count(m2.content) == 8
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None and capped.usage.completion_tokens == 40
    # Without either, the reply is the plain one (no reasoning_content key at all).
    plain = await oai.chat.completions.create(model=MODEL, messages=msgs)
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None


async def test_stream_pace_and_ttft(mock: TestServer, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "max_tokens": 10, "messages": ask(), "stream": True}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, _, payload = await raw(
        http, mock, body, **{"x-mock-tokens-per-second": "100", "x-mock-ttft-ms": "50"}
    )
    elapsed = loop.time() - t0
    assert status == 200
    # 50 ms to the first token, then 9 more token positions at 10 ms each.
    assert 0.13 <= elapsed < 2.0
    deltas = [d for k, d in events(payload) if k == "content_block_delta"]
    assert len(deltas) == 10


def test_tool_arguments_follow_the_schema() -> None:
    words = ["alpha", "beta", "gamma"]
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": ["null", "string"]},
            "score": {"type": "number"},
            "flag": {"type": "boolean"},
            "pick": {"anyOf": [{"type": "integer", "minimum": 7}, {"type": "string"}]},
            "nested": {
                "properties": {"inner": {"type": "array", "items": {"const": "x"}}},
                "required": ["inner", "missing"],
            },
            "optional": {"type": "string"},
        },
        "required": ["name", "score", "flag", "pick", "nested"],
    }
    value = tools.generate(schema, words, "t", 0)
    assert list(value) == ["name", "score", "flag", "pick", "nested"]  # required only, in order
    assert value["name"] in words and value["flag"] is True and value["pick"] == 7
    assert isinstance(value["score"], float) and value["score"] % 1 == 0.5
    assert value["nested"] == {"inner": ["x"], "missing": value["nested"]["missing"]}
    assert value["nested"]["missing"] in words  # no schema: a string
    assert tools.generate(schema, words, "t", 0) == value  # deterministic
    assert (
        tools.generate(None, words, "t", 0)
        == {}
        == tools.generate({"type": "string"}, words, "t", 0)
    )
    deep: Any = {"type": "object", "properties": {}, "required": ["a"]}
    node = deep
    for _ in range(20):
        child: Any = {"type": "object", "properties": {}, "required": ["a"]}
        node["properties"]["a"] = child
        node = child
    depth, v = 0, tools.generate(deep, words, "t", 0)
    while isinstance(v, dict):
        v, depth = v["a"], depth + 1
    assert v is None and depth == tools.MAX_DEPTH + 1  # levels 0..8 are objects
    text = tools.arguments(value)
    assert text == jtext(value)
    parts = tools.fragments(text)
    assert len(parts) == 3 and "".join(parts) == text and all(parts)
    assert tools.fragments("{}") == ["{", "}"] and tools.fragments("") == []


async def test_mid_stream_errors(
    client: anthropic.AsyncAnthropic,
    oai: openai.AsyncOpenAI,
    mock: TestServer,
    http: aiohttp.ClientSession,
    meter: Meter,
) -> None:
    cut = {"x-mock-stream-error-after": "8"}
    body = {"model": MODEL, "max_tokens": 50, "messages": ask(), "stream": True}
    status, _, payload = await raw(http, mock, body, **cut)
    evs = events(payload)
    assert status == 200 and len(evs) == 9  # start, block start, ping, 5 deltas, error
    assert evs[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    texts = [d["delta"]["text"] for k, d in evs if k == "content_block_delta"]
    with pytest.raises(anthropic.APIStatusError):
        async with client.messages.stream(
            model=MODEL, max_tokens=50, messages=ask(), extra_headers=cut
        ) as s:
            async for _ in s:
                pass
    # OpenAI chat: 1 role chunk and 7 deltas, then the error chunk.
    stream = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True, extra_headers=cut
    )
    got = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert len(got) == 8
    entries = (await ledger(http, mock))["entries"]
    assert all(e["stream_error"] and not e["usage_sent"] for e in entries)
    assert entries[0]["completion_tokens"] == meter.count("".join(texts)) == 5
    assert entries[1]["completion_tokens"] == 5
    assert entries[2]["completion_tokens"] == meter.count("".join(got)) == 7
    # A stream no longer than K events is whole.
    status, _, payload = await raw(http, mock, body, **{"x-mock-stream-error-after": "500"})
    assert events(payload)[-1][0] == "message_stop"
    assert not (await ledger(http, mock))["entries"][-1]["stream_error"]
