"""The Responses API dialect: `ResponsesRequest` parses and checks a `POST /v1/responses` body
and sets what the pipeline reads (the conversation as chat messages, the output cap, the tool
definitions' text); `DIALECT` writes the gateway's errors in OpenAI's shape and as a Responses
`error` stream event that the openai SDK parses."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web
from openai.types.responses import ResponseErrorEvent

from tokenhub.config import Model
from tokenhub.gateway.dialects import DIALECTS
from tokenhub.gateway.dialects.responses import DIALECT, ResponsesRequest
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import MESSAGES, RESPONSES

MODELS = {"m": Model(id="m")}


def parse(body: dict[str, Any]) -> ResponsesRequest:
    req = ResponsesRequest()
    assert req.parse(json.dumps(body).encode(), MODELS) is MODELS["m"]
    return req


def refusal(body: bytes | dict[str, Any]) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as e:
        ResponsesRequest().parse(raw, MODELS)
    return e.value


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    req = parse({"model": "m", "input": "Hi there", "instructions": "Be brief."})
    assert req.endpoint is RESPONSES
    assert req.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert req.prompt_kind == MESSAGES
    assert (req.model_id, req.stream, req.include_usage, req.choices) == ("m", False, False, 1)
    assert (req.cap_keys, req.caps, req.tools_text) == ((), (), "")
    # What tiering and affinity read from the prompt.
    assert req.tier_input() == ("Hi there", 0, False)
    assert req.opening() == "Be brief.\x00Hi there"


def test_input_items_become_chat_messages() -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    req = parse(
        {
            "model": "m",
            "stream": True,
            "input": [
                {"role": "developer", "content": "Use tools."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is in"},
                        {"type": "input_text", "text": "this image?"},
                        {"type": "input_image", "image_url": image, "detail": "low"},
                    ],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
                },
                {"type": "function_call", "call_id": "c1", "name": "zoom", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "crop", "arguments": '{"x":1}'},
                {"type": "function_call_output", "call_id": "c1", "output": "zoomed"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "cropped"}],
                },
                {"type": "function_call", "call_id": "c3", "name": "zoom", "arguments": ""},
                {"type": "function_call_output", "call_id": "c3", "output": "again"},
                {"role": "user", "content": "So?"},
            ],
        }
    )
    assert req.stream is True
    assert req.include_usage is False  # usage is always sent to these clients
    assert req.prompt == [
        {"role": "system", "content": "Use tools."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in"},
                {"type": "text", "text": "this image?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": "{}"}},
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "crop", "arguments": '{"x":1}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "zoomed"},
        {"role": "tool", "tool_call_id": "c2", "content": "cropped"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c3", "type": "function", "function": {"name": "zoom", "arguments": ""}}
            ],
        },
        {"role": "tool", "tool_call_id": "c3", "content": "again"},
        {"role": "user", "content": "So?"},
    ]
    assert req.tier_input() == ("So?", 3, False)  # 4 user and assistant turns


def test_text_only_parts_are_joined_and_files_become_file_parts() -> None:
    req = parse(
        {
            "model": "m",
            "input": [
                {"role": "system", "content": [{"type": "input_text", "text": "a"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "b"},
                        {"type": "input_text", "text": "c"},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "input_file", "filename": "x.pdf", "file_data": "data:..."}
                    ],
                },
            ],
        }
    )
    assert req.prompt == [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "b\nc"},
        {
            "role": "user",
            "content": [{"type": "file", "file": {"file_data": "data:...", "filename": "x.pdf"}}],
        },
    ]


def test_tools_and_the_cap() -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    }
    req = parse(
        {
            "model": "m",
            "input": "weather?",
            "tools": [tool],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 300,
            "store": False,
            "temperature": 0.2,
            "top_p": 1,
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_object"}},
            "reasoning": {"effort": "low", "summary": "auto"},
            "metadata": {"k": "v"},
            "truncation": "auto",
            "user": "u1",
        }
    )
    assert (req.cap_keys, req.caps) == (("max_output_tokens",), (300,))
    assert req.output_cap(4096) == 300
    assert req.max_output(4096) == 300
    assert req.output_cap(100) == 100
    chat_tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": tool["parameters"],
            "strict": True,
        },
    }
    assert msgspec.json.decode(req.tools_text) == [chat_tool]
    assert req.tier_input() == ("weather?", 0, True)


@pytest.mark.parametrize("store", [True, False, None])
def test_store_is_accepted_whatever_its_value(store: bool | None) -> None:
    assert parse({"model": "m", "input": "x", "store": store}).prompt == [
        {"role": "user", "content": "x"}
    ]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"input": "x", "conversation": "conv_1"}, "conversation", "stateless"),
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
        ({"input": "x", "background": True}, "background", "not supported"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "stateless"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "not supported"),
        (
            {"input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "file_search"}]},
            "tools[1].type",
            "not supported by this gateway",
        ),
        ({"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice", "built-in"),
    ],
)
def test_what_needs_server_state_or_builtin_tools_is_a_clear_400(
    body: dict[str, Any], param: str, words: str
) -> None:
    err = refusal({"model": "m", **body})
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert words in err.message
    assert json.loads(DIALECT.error_body(err))["error"]["param"] == param


def test_previous_response_id_says_what_to_do_instead() -> None:
    err = refusal({"model": "m", "input": "x", "previous_response_id": "resp_1"})
    assert "send the whole conversation as 'input'" in err.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "", "input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": 3}, "input"),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "input": "x", "store": "no"}, "store"),
        ({"model": "m", "input": ["hi"]}, "input[0]"),
        ({"model": "m", "input": [{"content": "hi"}]}, "input[0].type"),
        ({"model": "m", "input": [{"role": "tool", "content": "hi"}]}, "input[0].role"),
        ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"model": "m", "input": [{"role": "user", "content": []}]}, "input[0].content"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
            "input[0].content[0]",
        ),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input[0].content[0].text",
        ),
        (
            {
                "model": "m",
                "input": [
                    {"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}
                ],
            },
            "input[0].content[0]",
        ),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {
                "model": "m",
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}
                ],
            },
            "input[0].content[0].file_id",
        ),
        (
            {
                "model": "m",
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "u", "detail": "max"}],
                    }
                ],
            },
            "input[0].content[0].detail",
        ),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0]",
        ),
        (
            {
                "model": "m",
                "input": [
                    {"role": "user", "content": [{"type": "input_file", "file_url": "https://x"}]}
                ],
            },
            "input[0].content[0].file_url",
        ),
        (
            {"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        (
            {"model": "m", "input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]},
            "input[0].name",
        ),
        (
            {"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            "input[0].arguments",
        ),
        (
            {"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]},
            "input[0].output",
        ),
        (
            {"model": "m", "input": [{"type": "function_call_output", "output": "o"}]},
            "input[0].call_id",
        ),
        ({"model": "m", "input": [{"type": "computer_call"}]}, "input[0].type"),
        (
            {"model": "m", "input": [{"role": "assistant", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        (
            {
                "model": "m",
                "input": [{"type": "function_call_output", "call_id": "c", "output": [1]}],
            },
            "input[0].output[0]",
        ),
        ({"model": "m", "input": "x", "instructions": ["a"]}, "instructions"),
        ({"model": "m", "input": "x", "tools": {"type": "function"}}, "tools"),
        ({"model": "m", "input": "x", "tools": ["f"]}, "tools[0]"),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        (
            {
                "model": "m",
                "input": "x",
                "tools": [{"type": "function", "name": "f", "parameters": 1}],
            },
            "tools[0].parameters",
        ),
        (
            {"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "strict": 1}]},
            "tools[0].strict",
        ),
        ({"model": "m", "input": "x", "tool_choice": "any"}, "tool_choice"),
        ({"model": "m", "input": "x", "tool_choice": {"type": "function"}}, "tool_choice.name"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "max_output_tokens": "9"}, "max_output_tokens"),
        ({"model": "m", "input": "x", "max_output_tokens": True}, "max_output_tokens"),
        ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "input": "x", "top_p": -0.5}, "top_p"),
        ({"model": "m", "input": "x", "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"model": "m", "input": "x", "text": "json"}, "text"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        (
            {"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format.name",
        ),
        (
            {"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
            "text.format.schema",
        ),
        ({"model": "m", "input": "x", "reasoning": "high"}, "reasoning"),
        ({"model": "m", "input": "x", "reasoning": {"effort": 3}}, "reasoning.effort"),
    ],
)
def test_malformed_bodies_are_400s_naming_the_field(body: dict[str, Any], param: str) -> None:
    err = refusal(body)
    assert (err.status, err.param) == (400, param)
    assert param.split("[")[0] in err.message


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'"x"', b"[" * 100_000])
def test_a_body_that_is_not_a_json_object_is_a_400(raw: bytes) -> None:
    err = refusal(raw)
    assert err.status == 400 and err.param is None


def test_an_unknown_model_is_a_404_and_the_name_is_kept() -> None:
    req = ResponsesRequest()
    with pytest.raises(ApiError) as e:
        req.parse(b'{"model": "nope", "input": "x"}', MODELS)
    assert (e.value.status, e.value.code) == (404, "model_not_found")
    assert req.named_model() == "nope"


def test_the_dialect_is_registered_and_writes_openai_errors() -> None:
    assert DIALECTS["responses"] is DIALECT
    assert DIALECT.name == "responses"
    req = DIALECT.request_class(RESPONSES)
    assert isinstance(req, ResponsesRequest) and req.endpoint is RESPONSES
    err = ApiError.bad_request("'input' is wrong.", param="input")
    assert json.loads(DIALECT.error_body(err)) == {
        "error": {
            "message": "'input' is wrong.",
            "type": "invalid_request_error",
            "param": "input",
            "code": None,
        }
    }


@pytest.mark.parametrize("end", [False, True])
async def test_a_stream_error_is_an_error_event_the_sdk_yields(
    end: bool, aiohttp_server: Any
) -> None:
    """The openai SDK's own stream decoder, served the event by a real HTTP server, reads it as
    a ResponseErrorEvent (strict validation on)."""
    err = ApiError.upstream_failed("the stream broke off")
    raw = DIALECT.stream_error(err, end=end)
    assert raw.startswith(b"event: error\ndata: ") and raw.endswith(b"\n\n")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=raw, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    server = await aiohttp_server(app)
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")),
        api_key="k",
        max_retries=0,
        _strict_response_validation=True,
    ) as client:
        events = [e async for e in await client.responses.create(model="m", input="x", stream=True)]
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, ResponseErrorEvent)
    assert (event.code, event.message, event.param) == ("upstream_error", err.message, None)
