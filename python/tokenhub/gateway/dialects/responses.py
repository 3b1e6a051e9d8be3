"""OpenAI's Responses API (`POST /v1/responses`) as a client dialect.

No upstream wire speaks the Responses API, so a Responses request is always translated
(`tokenhub.gateway.translate.responses_chat`: to chat completions, and through them to the
Messages API). This module validates the body once and turns its conversation into OpenAI chat
messages (`chat_messages`): the same list is what the meter counts (`ParsedRequest.prompt`)
and what the translation sends upstream, so what admission reserved for is what was sent.

The gateway is stateless. Everything that needs state on the server is refused with a 400 that
says what to do instead: `previous_response_id`, `conversation` and `item_reference` items
(send the whole conversation as `input`), `prompt` (a stored prompt template), `background`
(polled later); and the built-in tools (web search, file search, code interpreter, ...) that
only OpenAI's own servers run. `store` is accepted whatever its value (Codex-style clients send
`store: false`, others leave the default `true`), nothing is stored, and replies say
`"store": false`.

Accepted and forwarded: `instructions` (the first, system, message), `tools` (function tools;
`tool_choice` and `parallel_tool_calls` go with them, as chat completions refuse them alone),
`max_output_tokens` (the output cap), `temperature`, `top_p`,
`text.format` (chat's `response_format`), `text.verbosity`,
`reasoning.effort` (`reasoning_effort`), `user`, `safety_identifier`, `prompt_cache_key`,
`service_tier`. Accepted and ignored: `metadata` (chat completions store it only with
`store`), `include`, `truncation` (there is no server-side context to truncate),
`stream_options`, `reasoning.summary`, `max_tool_calls`, `top_logprobs`; unknown fields are
ignored too, as the translation builds the upstream's body from the fields above only.

Roles: `developer` becomes `system` (OpenAI treats them alike, and many OpenAI-compatible
upstreams know only `system`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from tokenhub.config import Model
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import MESSAGES, RESPONSES, Endpoint, ParsedRequest

_encode = msgspec.json.Encoder().encode

STATELESS = (
    "tokenhub is stateless and stores no responses or conversations: "
    "send the whole conversation as 'input' instead"
)

# Request fields that need state kept on the server.
_STATEFUL = {
    "previous_response_id": STATELESS + " (with the earlier output items and your tool outputs).",
    "conversation": STATELESS + ".",
    "prompt": "Stored prompt templates ('prompt') are not supported by this gateway: "
    "send the prompt as 'instructions' and 'input'.",
}

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _bad(message: str, param: str) -> ApiError:
    return ApiError.bad_request(message, param=param)


def _text_parts(content: list[Any], where: str, kinds: tuple[str, ...]) -> str:
    """The text of a list of text parts (each `{"type": <one of kinds>, "text": str}`, or a
    refusal's `"refusal": str`), joined by newlines."""
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in kinds:
            at = f"{where}[{j}]"
            raise _bad(f"'{at}' must be a part of type {' or '.join(kinds)}.", at)
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise _bad(f"'{where}[{j}].text' must be a string.", f"{where}[{j}].text")
        texts.append(text)
    return "\n".join(texts)


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = part.get("image_url")
    if part.get("file_id") is not None and url is None:
        raise _bad(
            f"'{where}.file_id': uploaded files are not supported by this gateway; "
            "send the image as 'image_url' (a URL or a base64 data URL).",
            f"{where}.file_id",
        )
    if not isinstance(url, str) or not url:
        raise _bad(f"'{where}.image_url' must be a non-empty string.", f"{where}.image_url")
    image: dict[str, Any] = {"url": url}
    detail = part.get("detail")
    if detail is not None:
        if detail not in ("low", "high", "auto"):
            raise _bad(f"'{where}.detail' must be low, high or auto.", f"{where}.detail")
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _file_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    if part.get("file_url") is not None:
        raise _bad(
            f"'{where}.file_url' is not supported by this gateway; send 'file_data'.",
            f"{where}.file_url",
        )
    file: dict[str, Any] = {}
    for key in ("file_data", "file_id", "filename"):
        value = part.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _bad(f"'{where}.{key}' must be a string.", f"{where}.{key}")
        file[key] = value
    if "file_data" not in file and "file_id" not in file:
        raise _bad(f"'{where}' needs 'file_data' or 'file_id'.", where)
    return {"type": "file", "file": file}


def _message_content(content: Any, role: str, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: a string when it is all text (parts joined by a
    newline), else a list of chat content parts (text, image_url, file)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(f"'{where}' must be a string or a non-empty array of content parts.", where)
    if role == "assistant":
        return _text_parts(content, where, ("output_text", "refusal", "input_text"))
    parts: list[dict[str, Any]] = []
    plain = True
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"'{at}.text' must be a string.", f"{at}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and role == "user":
            parts.append(_image_part(part, at))
            plain = False
        elif kind == "input_file" and role == "user":
            parts.append(_file_part(part, at))
            plain = False
        else:
            allowed = "input_text, input_image or input_file" if role == "user" else "input_text"
            raise _bad(f"'{at}' must be a content part of type {allowed}.", at)
    if plain:
        return "\n".join(p["text"] for p in parts)
    return parts


def _tool_output(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return _text_parts(output, where, ("input_text", "output_text"))
    raise _bad(f"'{where}' must be a string or an array of input_text parts.", where)


def _string(item: dict[str, Any], key: str, where: str, *, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not value and not empty):
        raise _bad(f"'{where}.{key}' must be a non-empty string.", f"{where}.{key}")
    return value


def chat_messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` as OpenAI chat messages: instructions first (system), input
    messages in order, consecutive `function_call` items as the `tool_calls` of one assistant
    message (joined to the assistant message right before them), `function_call_output` items
    as `tool` messages; reasoning items are left out (an upstream cannot take them back).
    Raises ApiError (400) naming the first field that is wrong."""
    messages: list[dict[str, Any]] = []
    instructions = payload.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string.", "instructions")
        messages.append({"role": "system", "content": instructions})
    value = payload.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    if not isinstance(value, list) or not value:
        raise _bad("'input' must be a string or a non-empty array of input items.", "input")
    calls_open = False  # the last message is an assistant message that takes tool calls
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{where}' must be an object.", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise _bad(
                    f"'{where}.role' must be user, assistant, system or developer.",
                    f"{where}.role",
                )
            content = _message_content(item.get("content"), role, f"{where}.content")
            messages.append({"role": role, "content": content})
            calls_open = role == "assistant"
        elif kind == "function_call":
            call_id = _string(item, "call_id", where)
            name = _string(item, "name", where)
            arguments = _string(item, "arguments", where, empty=True)
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            if calls_open:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                calls_open = True
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            output = _tool_output(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            calls_open = False
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(f"'{where}': item references need stored items; {STATELESS}.", where)
        else:
            raise _bad(
                f"'{where}.type' {kind!r} is not supported by this gateway: input items are "
                "messages, function_call, function_call_output and reasoning.",
                f"{where}.type",
            )
    return messages


def chat_tools(payload: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """`tools` as chat completions tools (None without). Only function tools: the built-in
    ones run on OpenAI's servers. Raises ApiError (400)."""
    tools = payload.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array of tools.", "tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"'{where}' must be an object.", where)
        kind = tool.get("type")
        if kind != "function":
            raise _bad(
                f"'{where}': tools of type {kind!r} are not supported by this gateway "
                "(only function tools are).",
                f"{where}.type",
            )
        function: dict[str, Any] = {"name": _string(tool, "name", where)}
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise _bad(f"'{where}.description' must be a string.", f"{where}.description")
            function["description"] = description
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise _bad(f"'{where}.parameters' must be an object.", f"{where}.parameters")
            function["parameters"] = parameters
        strict = tool.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise _bad(f"'{where}.strict' must be a boolean.", f"{where}.strict")
            function["strict"] = strict
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(payload: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """`tool_choice` as chat's (None when absent). Raises ApiError (400)."""
    choice = payload.get("tool_choice")
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        return choice  # type: ignore[no-any-return]
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("'tool_choice.name' must be a non-empty string.", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    raise _bad(
        '\'tool_choice\' must be auto, none, required or {"type": "function", "name": ...} '
        "(built-in tools are not supported by this gateway).",
        "tool_choice",
    )


def chat_response_format(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None for plain text or when absent)."""
    text = payload.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        name = fmt.get("name")
        schema = fmt.get("schema")
        if not isinstance(name, str) or not name:
            raise _bad("'text.format.name' must be a non-empty string.", "text.format.name")
        if not isinstance(schema, dict):
            raise _bad("'text.format.schema' must be an object.", "text.format.schema")
        spec: dict[str, Any] = {"name": name, "schema": schema}
        for key in ("description", "strict"):
            if (v := fmt.get(key)) is not None:
                spec[key] = v
        return {"type": "json_schema", "json_schema": spec}
    raise _bad("'text.format.type' must be text, json_object or json_schema.", "text.format.type")


def _number(payload: Mapping[str, Any], key: str, low: float, high: float) -> None:
    v = payload.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
        raise _bad(f"'{key}' must be a number from {low:g} to {high:g}.", key)


class ResponsesRequest(ParsedRequest):
    """A `POST /v1/responses` body, checked in the order a client would fix it: the body,
    `model`, `stream`, what needs server state, the conversation, tools, the output cap and
    the sampling fields. Sets what the pipeline reads: `prompt` (chat messages, counted with
    the deployment's chat template), `cap_keys`/`caps` (`max_output_tokens`), `tools_text`;
    usage is always sent (`include_usage` stays False: that flag is OpenAI's chat opt-in)."""

    __slots__ = ()

    def __init__(self, endpoint: Endpoint = RESPONSES) -> None:
        super().__init__(endpoint)

    def parse(self, body: bytes, models: Mapping[str, Model]) -> Model:
        payload = self.take_body(body)
        model = self.take_model(
            models, ApiError.bad_request("You must provide a model parameter.", param="model")
        )
        stream = payload.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean.", "stream")
        self.stream = stream
        for key, message in _STATEFUL.items():
            if payload.get(key) is not None:
                raise _bad(f"'{key}': {message}", key)
        background = payload.get("background")
        if background not in (None, False):
            raise _bad(
                "'background': background responses are not supported by this gateway "
                "(it keeps no responses to poll); send the request without it.",
                "background",
            )
        store = payload.get("store")
        if store is not None and not isinstance(store, bool):
            raise _bad("'store' must be a boolean.", "store")
        self.prompt, self.prompt_kind = chat_messages(payload), MESSAGES
        tools = chat_tools(payload)
        chat_tool_choice(payload)
        self.tools_text = _encode(tools).decode() if tools else ""
        cap = payload.get("max_output_tokens")
        if cap is not None:
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
                raise _bad("'max_output_tokens' must be a positive integer.", "max_output_tokens")
            self.cap_keys, self.caps = ("max_output_tokens",), (cap,)
        self.choices = 1
        _number(payload, "temperature", 0, 2)
        _number(payload, "top_p", 0, 1)
        parallel = payload.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            raise _bad("'parallel_tool_calls' must be a boolean.", "parallel_tool_calls")
        chat_response_format(payload)
        reasoning = payload.get("reasoning")
        if reasoning is not None:
            if not isinstance(reasoning, dict):
                raise _bad("'reasoning' must be an object.", "reasoning")
            effort = reasoning.get("effort")
            if effort is not None and not isinstance(effort, str):
                raise _bad("'reasoning.effort' must be a string.", "reasoning.effort")
        return model


class ResponsesDialect:
    """Errors as OpenAI's `{"error": {...}}` body; in a stream, a Responses `error` event
    (`event: error`, data `{"type": "error", "code", "message", "param",
    "sequence_number"}`), which the openai SDK yields as a `ResponseErrorEvent`. The stream
    simply ends after it: `response.failed` would have to repeat the response's id, which only
    the stream's own state knows. The dialect is stateless, so the event's sequence_number is
    0 (the SDK does not check the order)."""

    name = "responses"
    request_class = ResponsesRequest

    def error_body(self, err: ApiError) -> bytes:
        return err.body()

    def stream_error(self, err: ApiError, *, end: bool) -> bytes:
        event = {
            "type": "error",
            "code": err.code or err.type,
            "message": err.message,
            "param": err.param,
            "sequence_number": 0,
        }
        return b"event: error\ndata: " + _encode(event) + b"\n\n"


DIALECT = ResponsesDialect()
