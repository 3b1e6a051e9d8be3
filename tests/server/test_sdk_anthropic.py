"""The official `anthropic` SDK against the gateway's /v1/messages, as Claude Code uses it
(ANTHROPIC_BASE_URL = the gateway): sync, async, streaming (`messages.stream` and
`create(stream=True)`), a tool-use round trip, count_tokens, stop sequences, extended
thinking, images and prompt-cache figures, each against the same mock upstream reached over
both wires (`gpt-wire`: an openai-kind provider, the request translated;
`claude-wire`: an anthropic-kind provider, passed through; tests/server/dialect_hub.py), with
the key sent as x-api-key (the SDK's `api_key`) and as a Bearer token (`auth_token`).

For every request three records agree: the usage the client saw, the usage event the gateway
recorded and what the mock served (its ledger). Anthropic's usage keeps its own semantics:
`input_tokens` excludes the cache reads and writes, which the event counts inside its
`input_tokens`. Errors (bad key, unknown model, malformed blocks, missing max_tokens, an
oversized body) raise the SDK's exception for the status, carry Anthropic's error body, and
bill nothing.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import anthropic
import msgspec
import pytest
from anthropic.types import Message, MessageParam, ToolParam
from dialect_hub import (
    ANTHROPIC_MODEL,
    ANTHROPIC_UPSTREAM,
    ENGINES,
    OPENAI_MODEL,
    VOCAB,
    DialectHub,
    cache_figures,
    check_three_way,
)
from harness import IGNORE_REQUEST_KEY_WARNING

from tokenhub import Meter

pytestmark = IGNORE_REQUEST_KEY_WARNING

MAX_BODY = 64 * 1024
WIRES = [OPENAI_MODEL, ANTHROPIC_MODEL]
AUTHS = ["x-api-key", "bearer"]
SYSTEM = "You are a terse assistant for a billing team."
MESSAGES: list[MessageParam] = [
    {"role": "user", "content": "What is exact token metering?"},
    {"role": "assistant", "content": "Counting every token with the provider's vocabulary."},
    {"role": "user", "content": [{"type": "text", "text": "And why does it matter for bills?"}]},
]
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


@pytest.fixture(scope="module", params=ENGINES)
def hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DialectHub]:
    """The module's hub on SQLite, then on a fresh PostgreSQL database (when the test server
    is there: dialect_hub.ENGINES): every test runs on both engines."""
    tmp = tmp_path_factory.mktemp("sdk-anthropic")
    if request.param == "sqlite":
        h = DialectHub(tmp, max_body_bytes=MAX_BODY)
    else:
        with request.getfixturevalue("pg_databases")() as url:
            h = DialectHub(tmp, max_body_bytes=MAX_BODY, database=url)
            try:
                yield h
            finally:
                h.close()
            return
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def meter() -> Meter:
    return Meter.load(VOCAB)


def client_for(hub: DialectHub, auth: str) -> anthropic.Anthropic:
    return hub.anthropic(bearer=auth == "bearer")


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# -- sync ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", AUTHS)
@pytest.mark.parametrize("model", WIRES)
def test_create(hub: DialectHub, meter: Meter, model: str, auth: str) -> None:
    with client_for(hub, auth) as client:
        raw = client.messages.with_raw_response.create(
            model=model, max_tokens=64, system=SYSTEM, messages=MESSAGES
        )
    rid = raw.headers["x-request-id"]
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    # Translated: the model the client asked for; passed through: the upstream's reply as
    # it came, byte for byte, so the upstream's model name.
    assert message.model == (model if model == OPENAI_MODEL else ANTHROPIC_UPSTREAM)
    assert message.stop_reason in ("end_turn", "max_tokens")
    text = text_of(message)
    assert text and message.usage.output_tokens == meter.count(text)
    assert message.usage.input_tokens > 0
    check_three_way(hub, rid, message.usage, model=model, stream=False)


@pytest.mark.parametrize("model", WIRES)
def test_max_tokens_caps_the_reply(hub: DialectHub, meter: Meter, model: str) -> None:
    with hub.anthropic() as client:
        raw = client.messages.with_raw_response.create(model=model, max_tokens=5, messages=MESSAGES)
    message = raw.parse()
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5 == meter.count(text_of(message))
    check_three_way(hub, raw.headers["x-request-id"], message.usage, model=model, stream=False)


# -- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", AUTHS)
@pytest.mark.parametrize("model", WIRES)
def test_stream_helper(hub: DialectHub, meter: Meter, model: str, auth: str) -> None:
    """`client.messages.stream`, as Claude Code streams every turn."""
    with (
        client_for(hub, auth) as client,
        client.messages.stream(
            model=model, max_tokens=64, system=SYSTEM, messages=MESSAGES
        ) as stream,
    ):
        rid = stream.response.headers["x-request-id"]
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    text = "".join(pieces)
    assert text == text_of(final) and text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens == meter.count(text)
    check_three_way(hub, rid, final.usage, model=model, stream=True)


@pytest.mark.parametrize("model", WIRES)
def test_create_stream_true(hub: DialectHub, meter: Meter, model: str) -> None:
    """`create(stream=True)`: the raw event sequence Anthropic documents."""
    with hub.anthropic() as client:
        stream = client.messages.create(model=model, max_tokens=64, messages=MESSAGES, stream=True)
        rid = stream.response.headers["x-request-id"]
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[-2] == "message_delta"
    body = [str(k) for k in kinds[1:-2] if str(k) != "ping"]  # the SDK may drop pings
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert set(body[1:-1]) == {"content_block_delta"}
    start = events[0]
    delta = events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert start.message.model == (model if model == OPENAI_MODEL else ANTHROPIC_UPSTREAM)
    assert delta.delta.stop_reason in ("end_turn", "max_tokens")
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    # The usage the client saw: message_start's, updated by message_delta's (the SDK's rule).
    seen = start.message.usage.model_copy()
    for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        value = getattr(delta.usage, name, None)
        if value is not None:
            setattr(seen, name, value)
    seen.output_tokens = delta.usage.output_tokens
    assert seen.output_tokens == meter.count(text) > 0
    check_three_way(hub, rid, seen, model=model, stream=True)


# -- async -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", WIRES)
async def test_async_create_and_stream(hub: DialectHub, meter: Meter, model: str) -> None:
    async with hub.aanthropic(bearer=True) as client:
        raw = await client.messages.with_raw_response.create(
            model=model, max_tokens=48, system=SYSTEM, messages=MESSAGES
        )
        message = await raw.parse()
        async with client.messages.stream(
            model=model, max_tokens=48, system=SYSTEM, messages=MESSAGES
        ) as stream:
            srid = stream.response.headers["x-request-id"]
            streamed = await stream.get_final_message()
    # The mock's text is deterministic: the stream says what the JSON reply said.
    assert text_of(streamed) == text_of(message)
    assert message.usage.output_tokens == meter.count(text_of(message))
    assert streamed.usage.input_tokens == message.usage.input_tokens
    rid = raw.headers["x-request-id"]
    for r, m, s in ((rid, message, False), (srid, streamed, True)):
        await asyncio.to_thread(check_three_way, hub, r, m.usage, model=model, stream=s)


# -- tools -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", WIRES)
def test_tool_use_round_trip(hub: DialectHub, meter: Meter, model: str, stream: bool) -> None:
    """A forced tool call, its result sent back, and the answer: both requests metered."""
    first: list[MessageParam] = [{"role": "user", "content": "Weather in Lisbon, please."}]
    tool_choice: Any = {"type": "tool", "name": "get_weather"}
    call: Message
    with hub.anthropic() as client:
        if stream:
            with client.messages.stream(
                model=model, max_tokens=200, messages=first, tools=[WEATHER],
                tool_choice=tool_choice,
            ) as s:  # fmt: skip
                rid = s.response.headers["x-request-id"]
                partial = "".join(e.partial_json for e in s if e.type == "input_json")
                call = s.get_final_message()
        else:
            raw = client.messages.with_raw_response.create(
                model=model, max_tokens=200, messages=first, tools=[WEATHER],
                tool_choice=tool_choice,
            )  # fmt: skip
            rid = raw.headers["x-request-id"]
            call = raw.parse()
        assert call.stop_reason == "tool_use"
        uses = [b for b in call.content if b.type == "tool_use"]
        assert len(uses) == 1
        use = uses[0]
        assert use.name == "get_weather" and use.id
        if model == ANTHROPIC_MODEL:  # passed through: Anthropic's own id
            assert use.id.startswith("toolu_")
        assert isinstance(use.input, dict) and set(use.input) >= {"city", "days"}
        assert isinstance(use.input["city"], str) and isinstance(use.input["days"], int)
        args = msgspec.json.encode(use.input).decode()
        if stream:
            assert msgspec.json.decode(partial) == use.input
        # Output counted as the design says: the tool's name, then its arguments' JSON text.
        assert call.usage.output_tokens == meter.count(use.name) + meter.count(args)
        check_three_way(hub, rid, call.usage, model=model, stream=stream)

        second: list[MessageParam] = [
            *first,
            {"role": "assistant", "content": call.content},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": use.id,
                        "content": "Sunny, 24 C, light wind from the north-west.",
                    }
                ],
            },
        ]
        raw2 = client.messages.with_raw_response.create(
            model=model, max_tokens=64, messages=second, tools=[WEATHER]
        )
    answer = raw2.parse()
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert text_of(answer) and not [b for b in answer.content if b.type == "tool_use"]
    # The conversation grew by the call and its result: the prompt did too.
    assert answer.usage.input_tokens > call.usage.input_tokens
    check_three_way(hub, raw2.headers["x-request-id"], answer.usage, model=model, stream=False)


# -- stop sequences, thinking, images ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence(hub: DialectHub, meter: Meter, stream: bool) -> None:
    """A stop sequence taken from the reply cuts it there (passed through: the mock's chat
    route has no stop sequences to translate to)."""
    model = ANTHROPIC_MODEL
    with hub.anthropic() as client:
        full = text_of(client.messages.create(model=model, max_tokens=64, messages=MESSAGES))
        stop = full.split()[3]
        kw: Any = {"model": model, "max_tokens": 64, "messages": MESSAGES, "stop_sequences": [stop]}
        if stream:
            with client.messages.stream(**kw) as s:
                rid = s.response.headers["x-request-id"]
                message: Message = s.get_final_message()
        else:
            raw = client.messages.with_raw_response.create(**kw)
            rid, message = raw.headers["x-request-id"], raw.parse()
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    text = text_of(message)
    assert text == full[: full.index(stop)]
    assert message.usage.output_tokens == meter.count(text)
    check_three_way(hub, rid, message.usage, model=model, stream=stream)


@pytest.mark.parametrize("stream", [False, True])
def test_thinking(hub: DialectHub, meter: Meter, stream: bool) -> None:
    """Extended thinking passed through: the thinking block (thinking_delta events when
    streamed) is output, counted with the text."""
    model = ANTHROPIC_MODEL
    kw: Any = {
        "model": model,
        "max_tokens": 2048,
        "messages": MESSAGES,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    with hub.anthropic() as client:
        if stream:
            with client.messages.stream(**kw) as s:
                rid = s.response.headers["x-request-id"]
                kinds = {e.type for e in s}
                message: Message = s.get_final_message()
            assert "thinking" in kinds and "text" in kinds
        else:
            raw = client.messages.with_raw_response.create(**kw)
            rid, message = raw.headers["x-request-id"], raw.parse()
    assert [b.type for b in message.content] == ["thinking", "text"]
    thinking = "".join(b.thinking for b in message.content if b.type == "thinking")
    assert thinking
    assert message.usage.output_tokens == meter.count(thinking) + meter.count(text_of(message))
    check_three_way(hub, rid, message.usage, model=model, stream=stream)


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()


@pytest.mark.parametrize("model", WIRES)
def test_image_block(hub: DialectHub, model: str) -> None:
    """An image block goes upstream (as an image_url part when translated) and its tokens
    are the upstream's count, whatever it is: the mock's Messages API counts an image as a
    fixed number of tokens, its chat route counts the text parts only."""
    text: MessageParam = {"role": "user", "content": [{"type": "text", "text": "What is it?"}]}
    image: MessageParam = {
        "role": "user",
        "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": "What is it?"},
        ],
    }
    with hub.anthropic() as client:
        plain = client.messages.create(model=model, max_tokens=8, messages=[text])
        raw = client.messages.with_raw_response.create(model=model, max_tokens=8, messages=[image])
    usage = raw.parse().usage
    if model == ANTHROPIC_MODEL:
        assert usage.input_tokens > plain.usage.input_tokens
    else:
        assert usage.input_tokens == plain.usage.input_tokens
    check_three_way(hub, raw.headers["x-request-id"], usage, model=model, stream=False)


# -- count_tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", WIRES)
def test_count_tokens(hub: DialectHub, model: str) -> None:
    """count_tokens (answered by the meter for the openai-kind upstream, forwarded to the
    anthropic one) says what the same request is then billed for, and bills nothing."""
    before = hub.totals()
    with hub.anthropic(bearer=True) as client:
        raw = client.messages.with_raw_response.count_tokens(
            model=model, system=SYSTEM, messages=MESSAGES
        )
        counted = raw.parse().input_tokens
        assert counted > 0
        sent = client.messages.with_raw_response.create(
            model=model, max_tokens=16, system=SYSTEM, messages=MESSAGES
        )
    usage = sent.parse().usage
    read, write = cache_figures(usage)
    assert usage.input_tokens + read + write == counted
    check_three_way(hub, sent.headers["x-request-id"], usage, model=model, stream=False)
    hub.settle()
    rid = raw.headers.get("x-request-id")
    if rid:
        assert hub.find_event(rid) is None
    after = hub.totals()
    # Only the create reached the mock as a completion; the count went to the anthropic
    # upstream's count_tokens, and was answered by the meter for the openai one.
    assert after["requests"] - before["requests"] == 1
    forwarded = after["count_tokens_requests"] - before["count_tokens_requests"]
    assert forwarded == (1 if model == ANTHROPIC_MODEL else 0)


def test_count_tokens_with_tools(hub: DialectHub) -> None:
    """Tool definitions are prompt tokens too, on both wires."""
    with hub.anthropic() as client:
        for model in WIRES:
            bare = client.messages.count_tokens(model=model, messages=MESSAGES).input_tokens
            tooled = client.messages.count_tokens(
                model=model, messages=MESSAGES, tools=[WEATHER]
            ).input_tokens
            assert tooled > bare, model


# -- errors: Anthropic's shape, the SDK's classes, nothing billed --------------------------------


def check_error(
    hub: DialectHub,
    exc: pytest.ExceptionInfo[anthropic.APIStatusError],
    status: int,
    kind: str,
    before: dict[str, Any],
    *,
    upstream_refuses: bool = False,
) -> None:
    """The SDK's exception for `status` with Anthropic's error body of type `kind`, and
    nothing billed (see DialectHub.unbilled for `upstream_refuses`)."""
    e = exc.value
    assert e.status_code == status
    body = e.body
    assert isinstance(body, dict), body
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert hub.secret not in body["error"]["message"]
    rid = e.response.headers.get("x-request-id")
    if rid:
        hub.unbilled(rid, upstream_refuses=upstream_refuses)
    else:
        hub.settle()
    after = hub.totals()
    tokens = ("prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_creation_tokens")
    assert {k: after[k] for k in tokens} == {k: before[k] for k in tokens}
    if not upstream_refuses:
        assert after == before, "the mock saw a request that failed at the gateway"


@pytest.mark.parametrize("auth", AUTHS)
def test_bad_key(hub: DialectHub, auth: str) -> None:
    before = hub.totals()
    bogus = "sk-th-" + "0" * 40
    client = hub.anthropic(bearer=auth == "bearer", api_key=bogus)
    with client, pytest.raises(anthropic.AuthenticationError) as exc:
        client.messages.create(model=ANTHROPIC_MODEL, max_tokens=8, messages=MESSAGES)
    assert bogus not in str(exc.value.body)
    check_error(hub, exc, 401, "authentication_error", before)


def test_unknown_model(hub: DialectHub) -> None:
    before = hub.totals()
    with hub.anthropic() as client, pytest.raises(anthropic.NotFoundError) as exc:
        client.messages.create(model="claude-nonesuch", max_tokens=8, messages=MESSAGES)
    assert "claude-nonesuch" in exc.value.body["error"]["message"]  # type: ignore[index]
    check_error(hub, exc, 404, "not_found_error", before)


MALFORMED: dict[str, list[Any]] = {
    "text block without text": [{"role": "user", "content": [{"type": "text"}]}],
    "unknown block type": [{"role": "user", "content": [{"type": "hologram", "x": 1}]}],
    "tool_result without tool_use_id": [
        {"role": "user", "content": [{"type": "tool_result", "content": "x"}]}
    ],
    "bad role": [{"role": "wizard", "content": "hello"}],
    "no messages": [],
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("model", WIRES)
def test_malformed_blocks(hub: DialectHub, model: str, case: str) -> None:
    before = hub.totals()
    with hub.anthropic() as client, pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=model, max_tokens=8, messages=MALFORMED[case])
    # A block type the gateway does not know is the upstream's to judge when the request is
    # passed through (Anthropic adds block types; a gateway that refused them would break
    # clients that use them): the mock refuses it, and its 400 comes back as it was.
    refuses = model == ANTHROPIC_MODEL and case == "unknown block type"
    check_error(hub, exc, 400, "invalid_request_error", before, upstream_refuses=refuses)


@pytest.mark.parametrize("max_tokens", [None, 0, -3, "many"])
@pytest.mark.parametrize("model", WIRES)
def test_max_tokens_required(hub: DialectHub, model: str, max_tokens: Any) -> None:
    """Anthropic requires a positive max_tokens; so does the gateway, on both wires."""
    before = hub.totals()
    value: Any = anthropic.omit if max_tokens is None else max_tokens
    with hub.anthropic() as client, pytest.raises(anthropic.BadRequestError) as exc:
        # An explicit timeout: the SDK derives the default one from max_tokens.
        client.messages.create(model=model, max_tokens=value, messages=MESSAGES, timeout=10)
    assert "max_tokens" in exc.value.body["error"]["message"]  # type: ignore[index]
    check_error(hub, exc, 400, "invalid_request_error", before)


@pytest.mark.parametrize("model", WIRES)
def test_oversized_body(hub: DialectHub, model: str) -> None:
    before = hub.totals()
    big = "token " * (MAX_BODY // 5)
    with hub.anthropic() as client, pytest.raises(anthropic.ContentTooLargeError) as exc:
        client.messages.create(
            model=model, max_tokens=8, messages=[{"role": "user", "content": big}]
        )
    check_error(hub, exc, 413, "request_too_large", before)


# -- prompt caching, passed through -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_cache_figures(hub: DialectHub, meter: Meter, stream: bool) -> None:
    """A cache_control breakpoint on a long system prompt: the first request writes it, the
    next reads it; the client, the event (cache writes and reads inside input_tokens) and the
    mock agree on all four figures, streamed (message_start's usage) or not."""
    long_system: Any = [
        {
            "type": "text",
            "text": f"Stream={stream}. " + "Bill every token exactly once. " * 300,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    seen = []
    with hub.anthropic() as client:
        for _ in range(2):
            if stream:
                with client.messages.stream(
                    model=ANTHROPIC_MODEL, max_tokens=32, system=long_system, messages=MESSAGES
                ) as s:
                    rid = s.response.headers["x-request-id"]
                    usage = s.get_final_message().usage
            else:
                raw = client.messages.with_raw_response.create(
                    model=ANTHROPIC_MODEL, max_tokens=32, system=long_system, messages=MESSAGES
                )
                rid, usage = raw.headers["x-request-id"], raw.parse().usage
            check_three_way(hub, rid, usage, model=ANTHROPIC_MODEL, stream=stream)
            seen.append((*cache_figures(usage), usage.input_tokens))
    (read1, write1, in1), (read2, write2, in2) = seen
    assert read1 == 0 and write1 > 1024
    assert read2 == write1 and write2 == 0
    assert in1 == in2  # the uncached rest (the messages) is the same
