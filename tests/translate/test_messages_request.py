"""The Messages API dialect: what MessagesRequest accepts and sets for the pipeline, what it
refuses (a 400 naming the field, in Anthropic's error shape), and the prompt the meter counts."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
from aiohttp import web

from tokenhub.config import Model
from tokenhub.gateway.dialects import DIALECTS
from tokenhub.gateway.dialects.messages import (
    DIALECT,
    CountTokensRequest,
    MessagesRequest,
    error_type,
)
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import ANTHROPIC_MESSAGES, MESSAGES
from tokenhub.meter import Meter

MODELS = {"claude": Model(id="claude")}
TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]


def body(**over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hi"}],
    }
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def parse(payload: dict[str, Any], cls: type[MessagesRequest] = MessagesRequest) -> MessagesRequest:
    req = cls(ANTHROPIC_MESSAGES)
    req.parse(json.dumps(payload).encode(), MODELS)
    return req


def refusal(raw: bytes | dict[str, Any]) -> ApiError:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with pytest.raises(ApiError) as e:
        MessagesRequest(ANTHROPIC_MESSAGES).parse(data, MODELS)
    return e.value


def test_a_coding_agent_turn_sets_what_the_pipeline_reads() -> None:
    payload = body(
        system=[
            {"type": "text", "text": "You are a coder.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be brief."},
        ],
        messages=[
            {"role": "user", "content": "Read main.py"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should read it.", "signature": "sig"},
                    {"type": "text", "text": "Reading."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "read_file",
                        "input": {"path": "main.py"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here:", "cache_control": {"type": "ephemeral"}},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "print(1)"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                ],
            },
        ],
        tools=TOOLS,
        tool_choice={"type": "auto"},
        stop_sequences=["END"],
        stream=True,
        thinking={"type": "enabled", "budget_tokens": 1024},
        max_tokens=2048,
        temperature=0.5,
        top_k=5,
        metadata={"user_id": "u1"},
        unknown_field={"kept": True},
    )
    req = parse(payload)
    assert req.payload == payload  # forwarded untouched on passthrough
    assert (req.model_id, req.stream, req.include_usage, req.choices) == ("claude", True, False, 1)
    assert (req.cap_keys, req.caps) == (("max_tokens",), (2048,))
    assert req.output_cap(4096) == 2048 and req.output_cap(100) == 100
    assert json.loads(req.tools_text) == TOOLS
    assert req.prompt_kind == MESSAGES
    assert req.prompt == [
        {"role": "system", "content": "You are a coder.\nBe brief."},
        {"role": "user", "content": "Read main.py"},
        {
            "role": "assistant",
            "content": "Reading.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path":"main.py"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "print(1)"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    # What the pipeline derives from it works on the chat-shaped prompt.
    assert req.tier_input() == ("Here:", 2, True)
    assert req.opening() == "You are a coder.\nBe brief.\x00Read main.py"


def test_the_meter_counts_text_tool_calls_and_results_not_thinking_or_cache_markers() -> None:
    meter = Meter.load("cl100k_base")
    turn = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "grep",
        "input": {"pattern": "def main"},
    }
    plain = parse(
        body(
            system="sys",
            messages=[
                {"role": "user", "content": "find main"},
                {"role": "assistant", "content": [turn]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}],
                },
            ],
        )
    )
    marked = parse(
        body(
            system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "find main"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "long " * 200, "signature": "s"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {**turn, "cache_control": {"type": "ephemeral"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "x"}],
                            "cache_control": {"type": "ephemeral"},
                        }
                    ],
                },
            ],
        )
    )
    assert plain.prompt == marked.prompt
    expected = meter.count_messages(
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "find main"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"function": {"name": "grep", "arguments": '{"pattern":"def main"}'}}
                ],
            },
            {"role": "tool", "content": "x"},
        ]
    )
    assert meter.count_messages(marked.prompt) == expected
    # Each part is counted: a longer tool result costs more.
    longer = json.loads(json.dumps(plain.payload))
    longer["messages"][2]["content"][0]["content"] = "x " * 50
    assert meter.count_messages(parse(longer).prompt) > expected


def test_tool_results_come_before_the_users_text_and_images_move_out_of_them() -> None:
    req = parse(
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "both done?"},
                        {"type": "tool_result", "tool_use_id": "a", "content": "one"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "b",
                            "is_error": True,
                            "content": [
                                {"type": "text", "text": "shot"},
                                {
                                    "type": "image",
                                    "source": {"type": "url", "url": "https://x/y.png"},
                                },
                            ],
                        },
                    ],
                }
            ]
        )
    )
    assert req.prompt == [
        {"role": "tool", "tool_call_id": "a", "content": "one"},
        {"role": "tool", "tool_call_id": "b", "content": "shot"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                {"type": "text", "text": "both done?"},
            ],
        },
    ]


def test_documents_and_unknown_blocks_are_metered_and_passed_through() -> None:
    web = {"type": "web_search_tool_result", "tool_use_id": "srv_1", "content": []}
    req = parse(
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "text", "data": "notes"}},
                        {
                            "type": "document",
                            "title": "spec.pdf",
                            "source": {
                                "type": "base64",
                                "media_type": "application/pdf",
                                "data": "JVBE",
                            },
                        },
                    ],
                },
                {"role": "assistant", "content": [web]},
            ],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    )
    assert req.prompt[0]["content"][0] == {"type": "text", "text": "notes"}
    assert req.prompt[0]["content"][1]["file"]["filename"] == "spec.pdf"
    assert json.loads(req.prompt[1]["content"]) == web
    assert req.payload["messages"][1]["content"] == [web]


def test_count_tokens_needs_no_max_tokens() -> None:
    req = parse(body(max_tokens=None, tools=TOOLS), CountTokensRequest)
    assert (req.cap_keys, req.caps, req.count_only) == ((), (), True)
    assert req.prompt == [{"role": "user", "content": "hi"}] and req.tools_text
    with pytest.raises(ApiError, match="max_tokens"):
        parse(body(max_tokens=None))


BAD_BLOCK = {"role": "user", "content": [{"type": "text"}]}


@pytest.mark.parametrize(
    ("over", "param"),
    [
        ({"model": None}, "model"),
        ({"model": 7}, "model"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": {"role": "user"}}, "messages"),
        ({"messages": ["hi"]}, "messages.0"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages.0.content.0"),
        ({"messages": [BAD_BLOCK]}, "messages.0.content.0.text"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "messages.0.content.0.source",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "ftp"}}]}
                ]
            },
            "messages.0.content.0.source.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "x"}}
                        ],
                    }
                ]
            },
            "messages.0.content.0.source.data",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}],
                    }
                ]
            },
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": "{}"}],
                    }
                ]
            },
            "messages.0.content.0.input",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]},
            "messages.0.content.0.id",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
            "messages.0.content.0.tool_use_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "a", "content": 3}],
                    }
                ]
            },
            "messages.0.content.0.content",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "a", "is_error": "yes"}],
                    }
                ]
            },
            "messages.0.content.0.is_error",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}
                ]
            },
            "messages.0.content.0.type",
        ),
        ({"messages": [{"role": "assistant", "content": [{"type": "thinking"}]}]}, None),
        ({"system": 5}, "system"),
        ({"system": [{"type": "image"}]}, "system.0.type"),
        ({"tools": {"name": "f"}}, "tools"),
        ({"tools": [{"input_schema": {}}]}, "tools.0.name"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"tools": [{"name": "f", "input_schema": {}, "description": 1}]}, "tools.0.description"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"stop_sequences": ["END", 1]}, "stop_sequences"),
        ({"thinking": {"type": "maybe"}}, "thinking"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 512}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking.budget_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"metadata": "me"}, "metadata"),
        ({"metadata": {"user_id": 5}}, "metadata.user_id"),
    ],
)
def test_malformed_requests_are_400s_naming_the_field(
    over: dict[str, Any], param: str | None
) -> None:
    payload = body()
    payload.update(over)
    payload = {k: v for k, v in payload.items() if v is not None}
    err = refusal(payload)
    assert err.status == 400
    if param is None:  # the thinking block without text
        param = "messages.0.content.0.thinking"
    assert err.param == param
    assert err.message.startswith(param)
    wire = json.loads(DIALECT.error_body(err))
    assert wire == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": err.message},
    }


@pytest.mark.parametrize(
    "raw", [b"{", b"[1]", b'"x"', b"[" * 100_000 + b"]" * 100_000], ids=lambda r: repr(r[:8])
)
def test_bodies_that_are_not_json_objects(raw: bytes) -> None:
    err = refusal(raw)
    assert err.status == 400 and "JSON" in err.message


def test_an_unknown_model_is_a_404_and_recorded() -> None:
    req = MessagesRequest(ANTHROPIC_MESSAGES)
    with pytest.raises(ApiError) as e:
        req.parse(json.dumps(body(model="gpt-9")).encode(), MODELS)
    assert (e.value.status, e.value.code, req.model_id) == (404, "model_not_found", "gpt-9")
    assert json.loads(DIALECT.error_body(e.value))["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("status", "kind", "sdk_error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (403, "permission_error", anthropic.PermissionDeniedError),
        (404, "not_found_error", anthropic.NotFoundError),
        (413, "request_too_large", anthropic.APIStatusError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (502, "api_error", anthropic.InternalServerError),
        (503, "overloaded_error", anthropic.InternalServerError),
        (504, "timeout_error", anthropic.InternalServerError),
    ],
)
async def test_gateway_errors_in_anthropics_shape(
    status: int, kind: str, sdk_error: type[Exception], aiohttp_server: Any
) -> None:
    err = ApiError(status, "what went wrong", type="whatever")
    assert error_type(status) == kind
    data = json.loads(DIALECT.error_body(err))
    assert data == {"type": "error", "error": {"type": kind, "message": "what went wrong"}}
    event = DIALECT.stream_error(err, end=True)
    assert event == DIALECT.stream_error(err, end=False)
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    assert json.loads(event.split(b"data: ", 1)[1]) == data

    # The official SDK maps the status to its exception and reads the message from the body.
    async def handler(_: web.Request) -> web.Response:
        return web.Response(
            status=status, body=DIALECT.error_body(err), content_type="application/json"
        )

    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    server = await aiohttp_server(app)
    client = anthropic.AsyncAnthropic(api_key="k", base_url=str(server.make_url("")), max_retries=0)
    with pytest.raises(sdk_error) as e:
        await client.messages.create(
            model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == status  # type: ignore[attr-defined]
    assert e.value.body == data  # type: ignore[attr-defined]
    await client.close()


def test_the_dialect_is_registered() -> None:
    assert DIALECTS["anthropic"] is DIALECT
    assert DIALECT.name == "anthropic"
    req = DIALECT.request_class(ANTHROPIC_MESSAGES)
    assert isinstance(req, MessagesRequest) and not req.count_only
