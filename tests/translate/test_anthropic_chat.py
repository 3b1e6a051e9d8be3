"""The Messages API over an OpenAI chat upstream and OpenAI chat over an Anthropic upstream:
requests, replies, streams and errors translated both ways, each checked by the official SDK
that will read it (parsed with its types, or served from a real aiohttp server on 127.0.0.1 to
the SDK's client), and round trips that must give back what went in."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.translate.anthropic_chat import ChatOverMessages, MessagesOverChat
from tokenhub.usage import UsageEvent

MOC = MessagesOverChat()
COM = ChatOverMessages()
TOOL = {
    "name": "read_file",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
}
CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file",
        "parameters": TOOL["input_schema"],
    },
}
PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


def event(**over: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "request_id": "req_1",
        "ts_ms": 1_765_000_000_123,
        "tenant": "t",
        "key_id": "k",
        "endpoint": "messages",
        "model": "claude-public",
        "input_tokens": 1000,
        "cached_input_tokens": 600,
        "cache_write_tokens": 100,
        "output_tokens": 50,
    }
    fields.update(over)
    return UsageEvent(**fields)


ANTHROPIC_USAGE = {
    "input_tokens": 300,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 600,
    "output_tokens": 50,
}
CHAT_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 50,
    "total_tokens": 1050,
    "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 100},
}


def chat_sse(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def anthropic_sse(events: list[dict[str, Any]]) -> list[bytes]:
    return [
        f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events
    ]  # fmt: skip


def events_of(data: bytes) -> list[dict[str, Any]]:
    """The data objects of an SSE byte string, checking each event's name matches its type."""
    out = []
    for raw in data.split(b"\n\n"):
        if not raw:
            continue
        lines = raw.split(b"\n")
        name = lines[0].removeprefix(b"event: ").decode()
        obj = json.loads(lines[1].removeprefix(b"data: "))
        assert obj["type"] == name
        out.append(obj)
    return out


def chunks_of(data: bytes) -> list[Any]:
    out: list[Any] = []
    for raw in data.split(b"\n\n"):
        if raw:
            assert raw.startswith(b"data: ")
            payload = raw.removeprefix(b"data: ")
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


async def serve(aiohttp_server: Any, path: str, body: bytes, *, status: int = 200) -> str:
    """A server answering POST `path` with `body` (an event stream when status is 200 and the
    body is SSE); its base URL."""
    stream = body.startswith((b"event:", b"data:"))

    async def handler(_: web.Request) -> web.Response:
        kind = "text/event-stream" if stream else "application/json"
        return web.Response(status=status, body=body, content_type=kind)

    app = web.Application()
    app.router.add_post(path, handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


# -- Messages API client, OpenAI chat upstream --------------------------------------------------

MESSAGES_REQUEST: dict[str, Any] = {
    "model": "claude-public",
    "max_tokens": 2048,
    "system": "You are a coder.",
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is in main.py?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "print(1)"},
                {"type": "text", "text": "And this image?"},
                {"type": "image", "source": PNG},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
            ],
        },
    ],
    "tools": [TOOL],
    "tool_choice": {"type": "any"},
    "stop_sequences": ["END"],
    "temperature": 0.2,
    "top_p": 0.9,
    "metadata": {"user_id": "u-1"},
    "stream": True,
}


def test_a_messages_request_as_a_chat_request() -> None:
    payload = {
        **MESSAGES_REQUEST,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "top_k": 5,
    }
    before = copy.deepcopy(payload)
    out = MOC.request(payload)
    assert payload == before  # the client's body is not changed (it is the event's record)
    assert out == {
        "model": "claude-public",
        "messages": [
            {"role": "system", "content": "You are a coder."},
            {"role": "user", "content": "What is in main.py?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": '{"path":"a"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "print(1)"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And this image?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                ],
            },
        ],
        "max_tokens": 2048,
        "stream": True,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END"],
        "tools": [CHAT_TOOL],
        "tool_choice": "required",
        "user": "u-1",
    }


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "none"}, "none", None),
        (
            {"type": "tool", "name": "read_file"},
            {"type": "function", "function": {"name": "read_file"}},
            None,
        ),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
    ],
)
def test_tool_choices(choice: dict[str, Any], expected: Any, parallel: bool | None) -> None:
    out = MOC.request({**MESSAGES_REQUEST, "tool_choice": choice})
    assert out["tool_choice"] == expected
    assert out.get("parallel_tool_calls") is parallel


@pytest.mark.parametrize(
    ("over", "param"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": None, "tool_choice": {"type": "any"}}, "tool_choice"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            "messages.0.content.0",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "search_result", "source": "s", "content": []}],
                    }
                ]
            },
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "document", "source": {"type": "url", "url": "https://x"}}
                        ],
                    }
                ]
            },
            "messages.0.content.0",
        ),
    ],
)
def test_what_a_chat_upstream_cannot_take_is_a_400(over: dict[str, Any], param: str) -> None:
    payload = {k: v for k, v in {**MESSAGES_REQUEST, **over}.items() if v is not None}
    with pytest.raises(ApiError) as e:
        MOC.request(payload)
    assert (e.value.status, e.value.param) == (400, param)


def completion(message: dict[str, Any], finish: str | None = "stop", **extra: Any) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
    choice.update(extra)
    return json.dumps(
        {
            "id": "chatcmpl-abc",
            "object": "chat.completion",
            "created": 1,
            "model": "upstream-model",
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


def test_a_chat_completion_as_a_message() -> None:
    body = completion({"content": "Hello there."})
    out = json.loads(MOC.reply(body, event()))
    assert out == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-public",
        "content": [{"type": "text", "text": "Hello there."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }
    message = anthropic.types.Message.model_validate(out)
    assert message.usage.cache_read_input_tokens == 600


def test_reasoning_text_and_tool_calls_become_blocks() -> None:
    body = completion(
        {
            "content": "Reading both.",
            "reasoning_content": "Two files.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "a.py"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": "{not json"},
                },
            ],
        },
        "tool_calls",
    )
    message = anthropic.types.Message.model_validate_json(MOC.reply(body, event()))
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    thinking, _, first, second = message.content
    assert isinstance(thinking, anthropic.types.ThinkingBlock)
    assert (thinking.thinking, thinking.signature) == ("Two files.", "")
    assert isinstance(first, anthropic.types.ToolUseBlock)
    assert (first.id, first.name, first.input) == ("call_1", "read_file", {"path": "a.py"})
    assert isinstance(second, anthropic.types.ToolUseBlock) and second.input == {}
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize(
    ("finish", "extra", "stop_reason", "stop_sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("tool_calls", {}, "tool_use", None),
        ("content_filter", {}, "refusal", None),
        (None, {}, "end_turn", None),
        ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),  # vLLM names the match
        ("stop", {"stop_reason": 128001}, "end_turn", None),  # vLLM: a stop token id
    ],
)
def test_every_finish_reason(
    finish: str | None, extra: dict[str, Any], stop_reason: str, stop_sequence: str | None
) -> None:
    body = completion({"content": "x"}, finish, **extra)
    message = anthropic.types.Message.model_validate_json(MOC.reply(body, event()))
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)


def test_a_refusal_is_text_with_the_refusal_stop_reason() -> None:
    body = completion({"content": None, "refusal": "I can't help with that."})
    message = anthropic.types.Message.model_validate_json(MOC.reply(body, event()))
    assert message.content[0].type == "text" and message.stop_reason == "refusal"


def test_a_message_id_is_made_when_the_upstream_sent_none() -> None:
    body = json.loads(completion({"content": "x"}))
    del body["id"]
    out = json.loads(MOC.reply(json.dumps(body).encode(), event(request_id="req_9")))
    assert out["id"] == "msg_req_9"


# A chat stream: reasoning, text, two parallel tool calls with fragmented arguments, the finish,
# the usage chunk. The non-streamed completion with the same output is COMPLETE below.
def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


CHAT_CHUNKS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"reasoning_content": "Need "}),
    _chunk({"reasoning_content": "two files."}),
    _chunk({"content": "Reading "}),
    _chunk({"content": "both."}),
    _chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": ""},
                }
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"pa'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'th": "a.py"}'}}]}),
    _chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "b.py"}'},
                }
            ]
        }
    ),
    _chunk({}, "tool_calls"),
    {**_chunk({}), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 9}},
]
COMPLETE = completion(
    {
        "content": "Reading both.",
        "reasoning_content": "Need two files.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "a.py"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "b.py"}'},
            },
        ],
    },
    "tool_calls",
)


SDK_EVENTS: dict[str, Any] = {
    "message_start": anthropic.types.RawMessageStartEvent,
    "content_block_start": anthropic.types.RawContentBlockStartEvent,
    "content_block_delta": anthropic.types.RawContentBlockDeltaEvent,
    "content_block_stop": anthropic.types.RawContentBlockStopEvent,
    "message_delta": anthropic.types.RawMessageDeltaEvent,
    "message_stop": anthropic.types.RawMessageStopEvent,
}


def blocks(message: anthropic.types.Message) -> list[dict[str, Any]]:
    """A message's content as plain data (the stream's accumulator uses its own block types)."""
    return [b.model_dump(exclude={"parsed_output"}, exclude_none=True) for b in message.content]


def translate_chat_stream(
    batches: list[bytes], ev: UsageEvent, settled: UsageEvent | None = None
) -> bytes:
    """The translated stream; `settled`: the event as settled at the end, when it differs from
    what was known at the start (the upstream's usage arrives last)."""
    out = MOC.stream(ev, False)
    return b"".join(out.feed(b) for b in batches) + out.end(settled or ev)


def test_a_chat_stream_as_messages_events() -> None:
    sse = chat_sse(CHAT_CHUNKS)
    # Whole events arrive in batches of any size: the output does not depend on the split.
    one_by_one = translate_chat_stream(sse, event())
    assert translate_chat_stream([b"".join(sse)], event()) == one_by_one
    events = events_of(one_by_one)
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("content_block_start", 3),
        ("content_block_delta", 3),
        ("content_block_stop", 3),
        ("message_delta", None),
        ("message_stop", None),
    ]
    start = events[0]["message"]
    assert start["id"] == "msg_s1" and start["model"] == "claude-public"
    assert start["usage"] == {**ANTHROPIC_USAGE, "output_tokens": 0}
    assert events[3]["delta"] == {"type": "thinking_delta", "thinking": "Need "}
    assert events[7]["delta"] == {"type": "text_delta", "text": "Reading "}
    assert events[10]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "read_file",
        "input": {},
    }
    assert events[11]["delta"] == {"type": "input_json_delta", "partial_json": '{"pa'}
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"] == ANTHROPIC_USAGE
    for e in events:  # each parses as the SDK's type for it
        if e["type"] != "ping":
            SDK_EVENTS[e["type"]].model_validate(e)


async def test_the_sdk_reads_the_translated_stream_as_the_translated_reply(
    aiohttp_server: Any,
) -> None:
    ev = event()
    # At the start only the metered prompt is known; the upstream's usage settles the event.
    metered = event(input_tokens=990, cached_input_tokens=0, cache_write_tokens=0, output_tokens=0)
    data = translate_chat_stream(chat_sse(CHAT_CHUNKS), metered, ev)
    assert events_of(data)[0]["message"]["usage"]["input_tokens"] == 990
    url = await serve(aiohttp_server, "/v1/messages", data)
    client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0)
    async with client.messages.stream(
        model="claude-public", max_tokens=100, messages=[{"role": "user", "content": "go"}]
    ) as stream:
        texts = [t async for t in stream.text_stream]
        streamed = await stream.get_final_message()
    await client.close()
    replied = anthropic.types.Message.model_validate_json(MOC.reply(COMPLETE, ev))
    assert texts == ["Reading ", "both."]
    assert blocks(streamed) == blocks(replied)
    assert streamed.usage == replied.usage
    assert (streamed.stop_reason, streamed.model) == ("tool_use", "claude-public")

    # The synchronous client reads the same stream (run in a thread: the server is on this loop).
    def read() -> anthropic.types.Message:
        sync = anthropic.Anthropic(api_key="k", base_url=url, max_retries=0)
        with sync.messages.stream(
            model="claude-public", max_tokens=100, messages=[{"role": "user", "content": "go"}]
        ) as s:
            return s.get_final_message()

    assert blocks(await asyncio.to_thread(read)) == blocks(replied)


def test_a_stop_sequence_and_an_empty_stream() -> None:
    chunks = [_chunk({"content": "a"}), {**_chunk({}, "stop"), "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}
    ]}]  # fmt: skip
    events = events_of(translate_chat_stream(chat_sse(chunks), event()))
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    # An upstream that sent nothing but [DONE]: still a whole, valid message.
    events = events_of(translate_chat_stream([b"data: [DONE]\n\n"], event(output_tokens=0)))
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[0]["message"]["id"] == "msg_req_1"
    assert events[2]["usage"]["output_tokens"] == 0


async def test_a_stream_error_reaches_the_sdk(aiohttp_server: Any) -> None:
    ev = event()
    out = MOC.stream(ev, False)
    data = out.feed(chat_sse([_chunk({"content": "a"})])[0])
    data += out.feed(b'data: {"error": {"message": "upstream overloaded", "type": "server"}}\n\n')
    url = await serve(aiohttp_server, "/v1/messages", data)
    client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="upstream overloaded"):
        async with client.messages.stream(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "go"}]
        ) as stream:
            await stream.get_final_message()
    await client.close()


@pytest.mark.parametrize(
    ("status", "body", "sdk_error", "message"),
    [
        (
            400,
            b'{"error": {"message": "bad tools", "type": "invalid_request_error"}}',
            anthropic.BadRequestError,
            "bad tools",
        ),
        (429, b'{"error": {"message": "slow down"}}', anthropic.RateLimitError, "slow down"),
        (
            401,
            b"<html>key sk-secret rejected</html>",
            anthropic.AuthenticationError,
            "The upstream provider returned HTTP 401.",
        ),
    ],
)
async def test_chat_upstream_errors_in_anthropics_shape(
    status: int, body: bytes, sdk_error: type[Exception], message: str, aiohttp_server: Any
) -> None:
    out = MOC.error(status, body)
    assert json.loads(out)["error"]["message"] == message
    assert b"sk-secret" not in out  # a body in no known shape is not quoted
    url = await serve(aiohttp_server, "/v1/messages", out, status=status)
    client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0)
    with pytest.raises(sdk_error) as e:
        await client.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.body["error"]["message"] == message  # type: ignore[attr-defined]
    await client.close()


# -- OpenAI chat client, Anthropic upstream -----------------------------------------------------

CHAT_REQUEST: dict[str, Any] = {
    "model": "gpt-public",
    "messages": [
        {"role": "system", "content": "You are a coder."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "dropped",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "a"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "b"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
        {"role": "user", "content": "Summarise."},
    ],
    "max_tokens": 4000,
    "max_completion_tokens": 3000,
    "stop": "END",
    "temperature": 0.1,
    "tools": [CHAT_TOOL],
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "user": "u-2",
    "stream": True,
    "stream_options": {"include_usage": True},
    "reasoning_effort": "high",
    "n": 1,
}


def test_a_chat_request_as_a_messages_request() -> None:
    before = copy.deepcopy(CHAT_REQUEST)
    out = COM.request(CHAT_REQUEST)
    assert before == CHAT_REQUEST
    assert out == {
        "model": "gpt-public",
        "system": "You are a coder.\n\nBe brief.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image", "source": PNG},
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "read_file",
                        "input": {"path": "a"},
                    },
                    {
                        "type": "tool_use",
                        "id": "call_2",
                        "name": "read_file",
                        "input": {"path": "b"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "two"},
                    {"type": "text", "text": "Summarise."},
                ],
            },
        ],
        "max_tokens": 3000,
        "stream": True,
        "temperature": 0.1,
        "stop_sequences": ["END"],
        "tools": [TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-2"},
    }


def test_without_a_cap_max_tokens_is_left_to_the_wire() -> None:
    out = COM.request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert out == {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }


@pytest.mark.parametrize(
    ("over", "param"),
    [
        ({"n": 2}, "n"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            },
            "messages.0.content.0",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                    }
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages.0.role"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0"),
        ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
            "messages.0.tool_calls.0.id",
        ),
    ],
)
def test_what_an_anthropic_upstream_cannot_take_is_a_400(over: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as e:
        COM.request({**CHAT_REQUEST, **over})
    assert (e.value.status, e.value.param) == (400, param)


def anthropic_message(content: list[dict[str, Any]], stop: str = "end_turn") -> bytes:
    return json.dumps(
        {
            "id": "msg_xyz",
            "type": "message",
            "role": "assistant",
            "model": "claude-upstream",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    ).encode()


MESSAGE = anthropic_message(
    [
        {"type": "thinking", "thinking": "Two files.", "signature": "sig"},
        {"type": "text", "text": "Reading both."},
        {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a.py"}},
        {"type": "tool_use", "id": "toolu_2", "name": "read_file", "input": {"path": "b.py"}},
    ],
    "tool_use",
)


def test_a_message_as_a_chat_completion() -> None:
    out = json.loads(COM.reply(MESSAGE, event(endpoint="chat.completions", model="gpt-public")))
    assert out == {
        "id": "chatcmpl-xyz",
        "object": "chat.completion",
        "created": 1_765_000_000,
        "model": "gpt-public",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Reading both.",
                    "refusal": None,
                    "reasoning_content": "Two files.",
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "read_file", "arguments": '{"path":"a.py"}'},
                        },
                        {
                            "id": "toolu_2",
                            "type": "function",
                            "function": {"name": "read_file", "arguments": '{"path":"b.py"}'},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": CHAT_USAGE,
    }
    parsed = ChatCompletion.model_validate(out)
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 600


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_every_stop_reason(stop: str, finish: str) -> None:
    body = anthropic_message([{"type": "text", "text": "x"}], stop)
    parsed = ChatCompletion.model_validate_json(COM.reply(body, event()))
    assert parsed.choices[0].finish_reason == finish
    assert parsed.choices[0].message.content == "x"


def test_tool_calls_alone_have_null_content_and_no_cache_writes_no_key() -> None:
    body = anthropic_message(
        [{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use"
    )
    out = json.loads(COM.reply(body, event(cache_write_tokens=0)))
    assert out["choices"][0]["message"]["content"] is None
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 600}


def delta(index: int, kind: str, **value: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": f"{kind}_delta", **value},
    }


ANTHROPIC_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_s2",
            "type": "message",
            "role": "assistant",
            "model": "claude-upstream",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        },
    },
    {"type": "ping"},
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
    delta(0, "thinking", thinking="Two "),
    delta(0, "thinking", thinking="files."),
    delta(0, "signature", signature="s"),
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    delta(1, "text", text="Reading "),
    delta(1, "text", text="both."),
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {}},
    },
    delta(2, "input_json", partial_json='{"path":'),
    delta(2, "input_json", partial_json='"a.py"}'),
    {"type": "content_block_stop", "index": 2},
    {
        "type": "content_block_start",
        "index": 3,
        "content_block": {"type": "tool_use", "id": "toolu_2", "name": "read_file", "input": {}},
    },
    delta(3, "input_json", partial_json='{"path":"b.py"}'),
    {"type": "content_block_stop", "index": 3},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 40},
    },
    {"type": "message_stop"},
]  # fmt: skip


def translate_messages_stream(
    batches: list[bytes], ev: UsageEvent, include_usage: bool = True
) -> bytes:
    out = COM.stream(ev, include_usage)
    return b"".join(out.feed(b) for b in batches) + out.end(ev)


def test_a_messages_stream_as_chat_chunks() -> None:
    ev = event(model="gpt-public")
    sse = anthropic_sse(ANTHROPIC_EVENTS)
    data = translate_messages_stream(sse, ev)
    assert translate_messages_stream([b"".join(sse)], ev) == data
    chunks = chunks_of(data)
    assert chunks[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks[:-1]]
    assert {c.id for c in parsed} == {"chatcmpl-s2"}
    assert {c.model for c in parsed} == {"gpt-public"}
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Two "},
        {"reasoning_content": "files."},
        {"content": "Reading "},
        {"content": "both."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"path":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"a.py"}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"path":"b.py"}'}}]},
        {},
        None,
    ]
    assert chunks[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-2]["usage"] == CHAT_USAGE and chunks[-2]["choices"] == []
    # Without include_usage: no usage chunk, the same chunks otherwise.
    bare = chunks_of(translate_messages_stream(sse, ev, include_usage=False))
    assert bare == [*chunks[:-2], "[DONE]"]


async def test_the_openai_sdk_reads_the_translated_stream_as_the_translated_reply(
    aiohttp_server: Any,
) -> None:
    ev = event(model="gpt-public")
    data = translate_messages_stream(anthropic_sse(ANTHROPIC_EVENTS), ev)
    url = await serve(aiohttp_server, "/v1/chat/completions", data)
    client = openai.AsyncOpenAI(api_key="k", base_url=url + "v1", max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-public",
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reasoning, finish, usage = "", "", None, None
    calls: dict[int, dict[str, str]] = {}
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                if call.id:
                    entry["id"] = call.id
                if call.function and call.function.name:
                    entry["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
    await client.close()
    replied = ChatCompletion.model_validate_json(COM.reply(MESSAGE, ev))
    message = replied.choices[0].message
    assert text == message.content
    assert reasoning == getattr(message, "reasoning_content", None)
    assert finish == replied.choices[0].finish_reason
    assert usage == replied.usage
    assert message.tool_calls is not None
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (t.id, t.function.name, json.loads(t.function.arguments))  # type: ignore[union-attr]
        for t in message.tool_calls
    ]


def test_a_messages_stream_error_and_an_unfinished_stream() -> None:
    ev = event()
    out = COM.stream(ev, False)
    data = out.feed(anthropic_sse(ANTHROPIC_EVENTS[:1])[0])
    data += out.feed(
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
        b'"message": "Overloaded"}}\n\n'
    )
    chunks = chunks_of(data)
    assert chunks[-1] == {
        "error": {"message": "Overloaded", "type": "api_error", "param": None, "code": None}
    }
    # A stream that ended without message_delta still finishes its choice.
    out = COM.stream(ev, False)
    data = out.feed(b"".join(anthropic_sse(ANTHROPIC_EVENTS[:10]))) + out.end(ev)
    chunks = chunks_of(data)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("status", "body", "sdk_error", "message"),
    [
        (
            400,
            b'{"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}',
            openai.BadRequestError,
            "bad",
        ),
        (
            529,
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
            openai.InternalServerError,
            "Overloaded",
        ),
        (404, b"not json at all", openai.NotFoundError, "The upstream provider returned HTTP 404."),
    ],
)
async def test_anthropic_upstream_errors_in_openais_shape(
    status: int, body: bytes, sdk_error: type[Exception], message: str, aiohttp_server: Any
) -> None:
    out = COM.error(status, body)
    assert json.loads(out)["error"]["message"] == message
    url = await serve(aiohttp_server, "/v1/chat/completions", out, status=status)
    client = openai.AsyncOpenAI(api_key="k", base_url=url + "v1", max_retries=0)
    with pytest.raises(sdk_error) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["message"] == message  # type: ignore[attr-defined]
    assert e.value.message.endswith(message)  # type: ignore[attr-defined]
    await client.close()


# -- round trips --------------------------------------------------------------------------------


def test_messages_to_chat_and_back_is_the_same_request() -> None:
    payload = {**MESSAGES_REQUEST, "tool_choice": {"type": "tool", "name": "read_file"}}
    back = COM.request(MOC.request(payload))
    expected = json.loads(json.dumps(payload))
    # A text-only user message comes back as one text block; the rest is as it went.
    assert back == expected


def test_chat_to_messages_and_back_is_the_same_request() -> None:
    payload = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": '{"path":"a"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "user", "content": "next"},
        ],
        "max_tokens": 100,
        "stop": ["END"],
        "tools": [CHAT_TOOL],
        "tool_choice": "auto",
    }
    assert MOC.request(COM.request(payload)) == payload


def test_replies_round_trip() -> None:
    ev = event()
    chat = json.loads(COM.reply(MOC.reply(COMPLETE, ev), ev))
    original = json.loads(COMPLETE)["choices"][0]
    message = chat["choices"][0]["message"]
    assert chat["choices"][0]["finish_reason"] == original["finish_reason"]
    assert message["content"] == original["message"]["content"]
    assert message["reasoning_content"] == original["message"]["reasoning_content"]
    assert [(c["id"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        (c["id"], json.loads(c["function"]["arguments"])) for c in original["message"]["tool_calls"]
    ]


# -- hostile upstream JSON: a clear ValueError, never an accident ---------------------------------

WRONG_SHAPE = r"the upstream's .* is not a"
HOSTILE_CHAT_REPLIES = [
    [1],
    "a string",
    {"choices": 7},
    {"choices": [{"message": 7}]},
    {"choices": [7]},
    {"choices": [{"message": {"content": 7}}]},
    {"choices": [{"message": {"content": [{"type": "text", "text": 5}]}}]},
    {"choices": [{"message": {"tool_calls": 7}}]},
    {"choices": [{"message": {"tool_calls": [7]}}]},
    {"choices": [{"message": {"tool_calls": [{"function": "f"}]}}]},
    {"choices": [{"message": {"tool_calls": [{"function": {"name": 3}}]}}]},
]
HOSTILE_MESSAGES_REPLIES = [
    [1],
    7,
    {"content": 7},
    {"content": {"type": "text"}},
    {"content": [{"type": "text", "text": 5}]},
    {"content": [{"type": "thinking", "thinking": ["x"]}]},
    {"content": [{"type": "tool_use", "name": {"n": 1}}]},
]


@pytest.mark.parametrize("body", HOSTILE_CHAT_REPLIES)
def test_a_chat_reply_of_the_wrong_shape_is_a_value_error(body: Any) -> None:
    """`{"choices": [{"message": 7}]}` and kin: a ValueError naming the upstream's field (the
    pipeline's 502), not an AttributeError or TypeError by accident."""
    with pytest.raises(ValueError, match=WRONG_SHAPE):
        MessagesOverChat().reply(json.dumps(body).encode(), event())


@pytest.mark.parametrize("body", HOSTILE_MESSAGES_REPLIES)
def test_a_messages_reply_of_the_wrong_shape_is_a_value_error(body: Any) -> None:
    with pytest.raises(ValueError, match=WRONG_SHAPE):
        ChatOverMessages().reply(json.dumps(body).encode(), event())


def test_labels_of_the_wrong_type_are_read_as_absent() -> None:
    """Fields that only label the output (ids, finish and stop reasons) of the wrong type are
    taken as absent: the reply still translates."""
    chat = {"id": 5, "choices": [{"message": {"content": "Hi", "tool_calls": None},
                                  "finish_reason": ["stop"]}]}  # fmt: skip
    msg = json.loads(MessagesOverChat().reply(json.dumps(chat).encode(), event()))
    assert msg["content"] == [{"type": "text", "text": "Hi"}] and msg["stop_reason"] == "end_turn"
    assert msg["id"] == "msg_req_1"
    reply = {"id": [], "content": [{"type": "text", "text": "Hi"}], "stop_reason": {"x": 1}}
    completion = json.loads(ChatOverMessages().reply(json.dumps(reply).encode(), event()))
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["choices"][0]["message"]["content"] == "Hi"


@pytest.mark.parametrize(
    ("translation", "event_text"),
    [
        (MessagesOverChat(), b'data: {"choices": [{"delta": 7}]}\n\n'),
        (
            MessagesOverChat(),
            b'data: {"choices": [{"delta": {"tool_calls": [{"index": []}]}}]}\n\n',
        ),
        (MessagesOverChat(), b'data: {"choices": [{"delta": {"content": {"a": 1}}}]}\n\n'),
        (ChatOverMessages(), b'data: {"type": "content_block_start", "content_block": 7}\n\n'),
        (
            ChatOverMessages(),
            b'data: {"type": "content_block_start", "index": {}, '
            b'"content_block": {"type": "tool_use", "name": "f"}}\n\n',
        ),
        (ChatOverMessages(), b'data: {"type": "content_block_delta", "delta": []}\n\n'),
        (
            ChatOverMessages(),
            b'data: {"type": "content_block_delta", "index": 0, '
            b'"delta": {"type": "text_delta", "text": 9}}\n\n',
        ),
        (ChatOverMessages(), b'data: {"type": "message_delta", "delta": "end_turn"}\n\n'),
    ],
)
def test_a_stream_event_of_the_wrong_shape_is_a_value_error(
    translation: Any, event_text: bytes
) -> None:
    out = translation.stream(event(), True)
    with pytest.raises(ValueError, match=WRONG_SHAPE):
        out.feed(event_text)


_KEYS = st.sampled_from(
    ["choices", "message", "delta", "content", "text", "tool_calls", "function", "name",
     "arguments", "id", "index", "type", "finish_reason", "stop_reason", "content_block",
     "partial_json", "thinking", "input", "reasoning_content", "refusal", "error", "usage"]
)  # fmt: skip
_TYPES = st.sampled_from(
    ["message_start", "content_block_start", "content_block_delta", "message_delta", "error",
     "text", "tool_use", "thinking", "text_delta", "input_json_delta", "thinking_delta"]
)  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4) | _TYPES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(value=_JSON)
def test_any_json_translates_or_is_a_value_error(value: Any) -> None:
    """Any JSON value (objects keyed as the wires' fields are), as a reply and as a stream
    event to either translation: bytes out, or a ValueError; nothing else escapes."""
    data = json.dumps(value).encode()
    for translation in (MessagesOverChat(), ChatOverMessages()):
        with contextlib.suppress(ValueError):
            assert isinstance(translation.reply(data, event()), bytes)
        out = translation.stream(event(), True)
        with contextlib.suppress(ValueError):
            assert isinstance(out.feed(b"data: " + data + b"\n\n"), bytes)
            assert isinstance(out.end(event()), bytes)
