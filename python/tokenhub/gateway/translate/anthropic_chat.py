"""Anthropic's Messages API over an OpenAI chat upstream, and OpenAI chat over an Anthropic one.

Coding agents speak the Messages API while many upstreams (DeepSeek, Qwen, vLLM, OpenAI itself)
speak chat completions, and OpenAI-SDK clients may be routed to a native Anthropic upstream.
The two APIs describe the same conversation with different shapes; this module maps each shape
onto the other, pure functions over dicts and bytes (the translations hold no state, a stream's
state lives in its `StreamOut`).

What has no counterpart, and what was chosen:

- Thinking. A Messages request's `thinking` setting and its thinking blocks are dropped on the way
  to a chat upstream (a chat upstream has no signature to check and may not reason at all; mapping
  `thinking` to `reasoning_effort` would break upstreams that refuse that field). A chat reply's
  `reasoning_content` (or `reasoning`, as some servers spell it) becomes a thinking block with an
  empty signature. Going the other way, a chat client's `reasoning_effort` is ignored and an
  Anthropic reply's thinking becomes `message.reasoning_content`.
- Tool results. A chat "tool" message holds text only, so a tool_result's images move to the user
  message that follows the tool messages; `is_error` has no chat field and is dropped (the result's
  text says what failed).
- Tool arguments. A chat upstream's `arguments` text that is not a JSON object becomes the input
  `{}` (an Anthropic client's tool input must be an object; its schema check then reports the
  failed call to the model, as a missing argument would). The same holds for a chat client's
  history sent to an Anthropic upstream.
- Stop sequences. Chat completions do not say which stop sequence ended the text; a server that
  does (vLLM's `stop_reason` string on the choice) gets `stop_reason: "stop_sequence"` with it,
  others `end_turn`.
- Options without a counterpart are dropped: `top_k`, `service_tier` and server tools
  (a chat upstream cannot run Anthropic's server tools: a server tool or block is a 400);
  `logprobs`, `response_format`, `seed` and the like from a chat client (Anthropic has none of
  them); `n` above 1 is a 400 (Anthropic returns one choice). `temperature` is passed as sent:
  OpenAI's range is 0-2, Anthropic's 0-1, and a value above 1 gets the upstream's 400 rather
  than a silently different sampling.

Usage shown to the client is the usage event's (what is billed), in the client's dialect:
Anthropic's `input_tokens` excludes the cache reads and writes that its `cache_read_input_tokens`
and `cache_creation_input_tokens` carry; OpenAI's `prompt_tokens` includes them.

Performance notes (one core): a stream costs ~6 us per upstream event either way (decode the
event, encode the client's: msgspec both), ~6 ms of gateway CPU for a 1,000-event reply. Requests
translate in ~0.2 ms for an 840 KB, 218k-token coding-agent turn in either direction.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

from tokenhub.gateway.dialects.messages import chat_messages, error_json
from tokenhub.gateway.errors import ApiError

if TYPE_CHECKING:
    from tokenhub.usage import UsageEvent

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

# OpenAI finish_reason -> Anthropic stop_reason.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Anthropic stop_reason -> OpenAI finish_reason.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI-style error type by status, for errors from an Anthropic upstream shown to a chat client.
OPENAI_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_DATA_URL = re.compile(r"data:([^;,]+);base64,(.*)", re.S)


def _json_text(value: Any) -> str:
    return _encode(value).decode()


def _object(text: Any) -> dict[str, Any]:
    """A tool call's arguments text as the object it encodes ({} when it is not one)."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = _decode(text)
    except (msgspec.DecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# -- reading an upstream's JSON: a field of the wrong type is a clear ValueError -----------------
# An upstream reply or stream event that is JSON but not of the shape its API documents (say
# `{"choices": [{"message": 7}]}`) cannot be translated: what it meant is unknown. The readers
# below raise ValueError naming the field, which the pipeline turns into a 502 (a reply: the
# next deployment's turn; a stream: a broken stream), never an AttributeError by accident.
# Fields that only label the output (ids, finish and stop reasons) are read leniently instead:
# one of the wrong type is taken as absent.


def _obj(value: Any, where: str) -> dict[str, Any]:
    """`value` if it is a JSON object, {} if it is absent (null); else ValueError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"the upstream's {where} is not a JSON object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    """`value` if it is a JSON array, [] if it is absent (null); else ValueError."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"the upstream's {where} is not a JSON array")
    return value


def _str(value: Any, where: str) -> str:
    """`value` if it is a string, "" if it is absent (null); else ValueError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"the upstream's {where} is not a string")
    return value


def _index(value: Any, default: int, where: str) -> int:
    """`value` if it is an integer, `default` if it is absent (null); else ValueError."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"the upstream's {where} is not an integer")
    return value


def _label(value: Any) -> str | None:
    """A label field (finish or stop reason, id): the string, or None for anything else."""
    return value if isinstance(value, str) and value else None


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def _data_events(events: bytes) -> list[tuple[str | None, bytes]]:
    """Whole SSE events as (event name or None, data payload); comments and empty events
    skipped."""
    out: list[tuple[str | None, bytes]] = []
    for raw in events.replace(b"\r\n", b"\n").split(b"\n\n"):
        name: str | None = None
        data: list[bytes] = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
        if data:
            out.append((name, b"\n".join(data)))
    return out


def _error_message(body: bytes) -> str | None:
    """The message of an error body in OpenAI's or Anthropic's shape (None: neither)."""
    try:
        data = _decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(data.get("message"), str):
            return str(data["message"])
    return None


def _upstream_message(status: int, body: bytes) -> str:
    # A body in no known shape is not quoted: it may echo what the client sent (credentials).
    return _error_message(body) or f"The upstream provider returned HTTP {status}."


# -- usage in each dialect ----------------------------------------------------------------------


def anthropic_usage(event: UsageEvent) -> dict[str, int]:
    """The event's counts as Anthropic's usage (input_tokens excludes cache reads and writes)."""
    cached, writes = event.cached_input_tokens, event.cache_write_tokens
    return {
        "input_tokens": max(0, event.input_tokens - cached - writes),
        "cache_creation_input_tokens": writes,
        "cache_read_input_tokens": cached,
        "output_tokens": event.output_tokens,
    }


def chat_usage(event: UsageEvent) -> dict[str, Any]:
    """The event's counts as OpenAI's usage (prompt_tokens includes cached and written)."""
    details: dict[str, int] = {"cached_tokens": event.cached_input_tokens}
    if event.cache_write_tokens:
        details["cache_write_tokens"] = event.cache_write_tokens
    return {
        "prompt_tokens": event.input_tokens,
        "completion_tokens": event.output_tokens,
        "total_tokens": event.input_tokens + event.output_tokens,
        "prompt_tokens_details": details,
    }


# -- Messages API client, OpenAI chat upstream --------------------------------------------------


def _chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            raise ApiError.bad_request(
                f"tools.{i}.type: the server tool '{tool['type']}' cannot be used with this "
                "model (its upstream runs only client tools)",
                param=f"tools.{i}.type",
            )
        fn: dict[str, Any] = {"name": tool["name"]}
        if "description" in tool:
            fn["description"] = tool["description"]
        fn["parameters"] = tool["input_schema"]
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: dict[str, Any]) -> Any:
    kind = choice["type"]
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


def _message_id(upstream_id: Any, event: UsageEvent) -> str:
    if isinstance(upstream_id, str) and upstream_id:
        return "msg_" + upstream_id.removeprefix("chatcmpl-")
    return "msg_" + event.request_id


def _stop_reason(choice: dict[str, Any], has_tools: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a chat choice's finish."""
    finish = _label(choice.get("finish_reason"))
    matched = choice.get("stop_reason")  # vLLM: the stop string that matched
    if finish == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    if has_tools and finish in (None, "stop"):
        return "tool_use", None  # some servers finish a tool call with "stop"
    return STOP_REASONS.get(finish or "stop", "end_turn"), None


class MessagesOverChat:
    """A Messages API client, an OpenAI chat upstream."""

    client = "anthropic"
    upstream = "openai"

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The validated Messages request as a chat completions request (see the module
        docstring for what is dropped). Raises ApiError (400) for what a chat upstream cannot
        take: server tools, Files API sources, server tool blocks."""
        out: dict[str, Any] = {
            "model": payload["model"],
            "messages": chat_messages(payload, strict=True),
        }
        if "max_tokens" in payload:
            out["max_tokens"] = payload["max_tokens"]
        if payload.get("stream"):
            out["stream"] = True
        for key in ("temperature", "top_p"):
            if payload.get(key) is not None:
                out[key] = payload[key]
        stops = payload.get("stop_sequences")
        if stops:
            out["stop"] = stops
        tools = payload.get("tools")
        if tools:
            out["tools"] = _chat_tools(tools)
            choice = payload.get("tool_choice")
            if choice:
                out["tool_choice"] = _chat_tool_choice(choice)
                if choice.get("disable_parallel_tool_use") and choice["type"] != "none":
                    out["parallel_tool_calls"] = False
        elif (payload.get("tool_choice") or {}).get("type") in ("any", "tool"):
            raise ApiError.bad_request(
                "tool_choice: a tool is required but the request defines no tools",
                param="tool_choice",
            )
        user = (payload.get("metadata") or {}).get("user_id")
        if user:
            out["user"] = user
        return out

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        """A chat completion as a Messages API message. ValueError: a field is not of its
        type (see `_obj`)."""
        data = _obj(_decode(body), "reply")
        choices = _list(data.get("choices"), "choices")
        choice = _obj(choices[0] if choices else None, "choices[0]")
        message = _obj(choice.get("message"), "choices[0].message")
        content: list[dict[str, Any]] = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = message.get("content")
        if isinstance(text, list):  # some servers answer with content parts
            text = "".join(
                _str(p.get("text"), "message.content[].text") for p in text if isinstance(p, dict)
            )
        text = _str(text, "message.content")
        refusal = message.get("refusal")
        if text:
            content.append({"type": "text", "text": text})
        elif isinstance(refusal, str) and refusal:
            content.append({"type": "text", "text": refusal})
        calls = _list(message.get("tool_calls"), "message.tool_calls")
        for i, item in enumerate(calls):
            call = _obj(item, "message.tool_calls[]")
            fn = _obj(call.get("function"), "message.tool_calls[].function")
            content.append(
                {
                    "type": "tool_use",
                    "id": _label(call.get("id")) or f"toolu_{event.request_id}_{i}",
                    "name": _str(fn.get("name"), "message.tool_calls[].function.name"),
                    "input": _object(fn.get("arguments")),
                }
            )
        stop_reason, stop_sequence = _stop_reason(choice, bool(calls))
        if refusal and not text:
            stop_reason = "refusal"
        return _encode(
            {
                "id": _message_id(data.get("id"), event),
                "type": "message",
                "role": "assistant",
                "model": event.model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "usage": anthropic_usage(event),
            }
        )

    def stream(self, event: UsageEvent, include_usage: bool) -> MessagesStream:
        return MessagesStream(event)

    def error(self, status: int, body: bytes) -> bytes:
        """An OpenAI-shaped (or any) error body in Anthropic's shape, its message kept."""
        return error_json(status, _upstream_message(status, body))


class MessagesStream:
    """One chat completions stream as Messages API events: message_start and ping on the first
    chunk, a content block per kind of delta (thinking, text, each tool call), the blocks
    closed in order, and message_delta with the event's usage and message_stop at `end`."""

    __slots__ = (
        "block",
        "blocks",
        "event",
        "finish",
        "id",
        "open",
        "started",
        "stop_sequence",
        "tools",
    )

    def __init__(self, event: UsageEvent) -> None:
        self.event = event
        self.started = False
        self.id: str | None = None
        self.blocks = 0  # blocks started so far
        self.block = -1  # the open block's index (-1: none)
        self.open: Any = None  # its kind: "thinking", "text" or ("tool", chat index)
        self.tools: dict[int, int] = {}  # a chat tool call's index -> its block's index
        self.finish: str | None = None
        self.stop_sequence: str | None = None

    def _start(self) -> bytes:
        self.started = True
        usage = anthropic_usage(self.event)
        usage["output_tokens"] = 0
        message: dict[str, Any] = {
            "id": _message_id(self.id, self.event),
            "type": "message",
            "role": "assistant",
            "model": self.event.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return _sse("message_start", {"type": "message_start", "message": message}) + _sse(
            "ping", {"type": "ping"}
        )

    def _close(self) -> bytes:
        if self.block < 0:
            return b""
        out = _sse("content_block_stop", {"type": "content_block_stop", "index": self.block})
        self.block, self.open = -1, None
        return out

    def _open(self, kind: Any, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.block, self.open = self.blocks, kind
        self.blocks += 1
        return out + _sse(
            "content_block_start",
            {"type": "content_block_start", "index": self.block, "content_block": block},
        )

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return _sse(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )

    def _chunk(self, chunk: dict[str, Any]) -> bytes:
        out = b""
        if not self.started:
            self.id = chunk.get("id")
            out += self._start()
        for choice in _list(chunk.get("choices"), "chunk's choices"):
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue
            delta = _obj(choice.get("delta"), "chunk's delta")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                if self.open != "thinking":
                    out += self._open(
                        "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                    )
                out += self._delta(self.block, {"type": "thinking_delta", "thinking": reasoning})
            for key in ("content", "refusal"):
                text = _str(delta.get(key), f"chunk's delta.{key}")
                if text:
                    if self.open != "text":
                        out += self._open("text", {"type": "text", "text": ""})
                    out += self._delta(self.block, {"type": "text_delta", "text": text})
                    if key == "refusal":
                        self.finish = self.finish or "content_filter"
            for call in _list(delta.get("tool_calls"), "chunk's delta.tool_calls"):
                out += self._tool_call(_obj(call, "chunk's delta.tool_calls[]"))
            finish = _label(choice.get("finish_reason"))
            if finish:
                self.finish = finish
                matched = choice.get("stop_reason")
                if finish == "stop" and isinstance(matched, str) and matched:
                    self.stop_sequence = matched
        return out

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        out = b""
        n = _index(call.get("index"), len(self.tools), "tool call delta's index")
        fn = _obj(call.get("function"), "tool call delta's function")
        if n not in self.tools:
            block_id = _label(call.get("id")) or f"toolu_{self.event.request_id}_{n}"
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": block_id,
                "name": _str(fn.get("name"), "tool call delta's function.name"),
                "input": {},
            }
            out += self._open(("tool", n), block)
            self.tools[n] = self.block
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out += self._delta(self.tools[n], {"type": "input_json_delta", "partial_json": args})
        return out

    def feed(self, events: bytes) -> bytes:
        out = b""
        for _name, data in _data_events(events):
            if data.strip() == b"[DONE]":
                continue
            try:
                chunk = _decode(data)
            except (msgspec.DecodeError, RecursionError):
                continue  # not a chunk: nothing a Messages client could read
            if not isinstance(chunk, dict):
                continue
            err = chunk.get("error")
            if err is not None:
                message = err.get("message") if isinstance(err, dict) else err
                text = message if isinstance(message, str) else "The upstream stream failed."
                out += b"event: error\ndata: " + error_json(500, text) + b"\n\n"
                continue
            out += self._chunk(chunk)
        return out

    def end(self, event: UsageEvent) -> bytes:
        self.event = event
        out = b"" if self.started else self._start()
        out += self._close()
        if self.stop_sequence is not None:
            stop = "stop_sequence"
        elif self.tools and self.finish in (None, "stop"):
            stop = "tool_use"
        else:
            stop = STOP_REASONS.get(self.finish or "stop", "end_turn")
        out += _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": self.stop_sequence},
                "usage": anthropic_usage(event),
            },
        )
        return out + _sse("message_stop", {"type": "message_stop"})


# -- OpenAI chat client, Anthropic upstream -----------------------------------------------------


def _bad(message: str, param: str) -> ApiError:
    return ApiError.bad_request(f"{param}: {message}", param=param)


def _text_of(content: Any, where: str) -> str:
    """A system/developer/tool message's content as text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad("only text parts are allowed in this message", f"{where}.{i}")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise _bad("must be a string or an array of content parts", where)


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _bad("an image_url part needs a string 'url'", f"{where}.image_url.url")
    found = _DATA_URL.fullmatch(url)
    if found:
        source = {"type": "base64", "media_type": found.group(1), "data": found.group(2)}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}
    else:
        raise _bad("an image URL must be http(s) or a base64 data URL", f"{where}.image_url.url")
    return {"type": "image", "source": source}


def _file_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    file = part.get("file") if isinstance(part.get("file"), dict) else {}
    data = file.get("file_data") if isinstance(file, dict) else None
    found = _DATA_URL.fullmatch(data) if isinstance(data, str) else None
    if not found:
        raise _bad("only a base64 data URL file ('file_data') can be sent", f"{where}.file")
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": found.group(1), "data": found.group(2)},
    }


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A user or assistant message's content as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad("must be a string or an array of content parts", where)
    out = []
    for i, part in enumerate(content):
        at = f"{where}.{i}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or kind == "refusal":
            text = part.get(kind)
            if not isinstance(text, str):
                raise _bad(f"a {kind} part needs a string '{kind}'", f"{at}.{kind}")
            if text:
                out.append({"type": "text", "text": text})
        elif kind == "image_url":
            out.append(_image_block(part, at))
        elif kind == "file":
            out.append(_file_block(part, at))
        else:
            raise _bad(f"content parts of type '{kind}' cannot be sent to this model", at)
    return out


def _tool_uses(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise _bad("must be an array of tool calls", where)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("a tool call needs a function with a string 'name'", f"{where}.{i}")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise _bad("a tool call needs a string 'id'", f"{where}.{i}.id")
        out.append(
            {
                "type": "tool_use",
                "id": call_id,
                "name": fn["name"],
                "input": _object(fn.get("arguments")),
            }
        )
    return out


def _anthropic_conversation(
    messages: list[Any],
) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, Anthropic messages): system and developer messages lifted out, tool
    messages as tool_result blocks, consecutive messages of one role merged into one (Anthropic
    alternates user and assistant turns), empty messages left out (Anthropic refuses them)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:  # Anthropic refuses empty content; the neighbours merge instead
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise _bad("each message must be an object", where)
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            text = _text_of(content, f"{where}.content")
            if text:
                system.append(text)
        elif role == "user":
            add("user", _blocks(content, f"{where}.content"))
        elif role == "assistant":
            blocks = _blocks(content, f"{where}.content")
            if m.get("tool_calls"):
                blocks += _tool_uses(m["tool_calls"], f"{where}.tool_calls")
            add("assistant", blocks)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad("a tool message needs a string 'tool_call_id'", f"{where}.tool_call_id")
            result = {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": _text_of(content, f"{where}.content"),
            }
            add("user", [result])
        else:
            raise _bad("'role' must be system, developer, user, assistant or tool", f"{where}.role")
    return system, out


def _anthropic_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("must be an array of tools", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _bad("only function tools can be sent to this model", f"tools.{i}")
        if not isinstance(fn.get("name"), str):
            raise _bad("a function needs a string 'name'", f"tools.{i}.function.name")
        params = fn.get("parameters")
        schema = params if isinstance(params, dict) else {"type": "object", "properties": {}}
        entry: dict[str, Any] = {"name": fn["name"]}
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        entry["input_schema"] = schema
        out.append(entry)
    return out


def _anthropic_tool_choice(choice: Any) -> dict[str, Any]:
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"type": "tool", "name": fn["name"]}
    raise _bad(
        "must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}",
        "tool_choice",
    )


class ChatOverMessages:
    """An OpenAI chat client, an Anthropic upstream."""

    client = "openai"
    upstream = "anthropic"

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The chat completions request as a Messages request (see the module docstring for
        what is dropped). `max_tokens` is the smaller of the client's caps, absent when it set
        none: the Anthropic wire always sets it from the deployment's cap. Raises ApiError
        (400) for what Anthropic cannot take (n > 1, audio, non-function tools)."""
        n = payload.get("n")
        if n is not None and n != 1:
            raise _bad("Anthropic models return one choice: n must be 1", "n")
        system, messages = _anthropic_conversation(payload.get("messages") or [])
        out: dict[str, Any] = {"model": payload["model"], "messages": messages}
        if system:
            out["system"] = "\n\n".join(system)
        caps = [
            payload[k]
            for k in ("max_tokens", "max_completion_tokens")
            if isinstance(payload.get(k), int)
        ]
        if caps:
            out["max_tokens"] = min(caps)
        if payload.get("stream"):
            out["stream"] = True
        for key in ("temperature", "top_p"):
            if payload.get(key) is not None:
                out[key] = payload[key]
        stop = payload.get("stop")
        if isinstance(stop, str):
            out["stop_sequences"] = [stop]
        elif isinstance(stop, list) and stop:
            out["stop_sequences"] = stop
        tools = payload.get("tools")
        if tools:
            out["tools"] = _anthropic_tools(tools)
            choice = payload.get("tool_choice")
            tool_choice = _anthropic_tool_choice(choice) if choice is not None else None
            if payload.get("parallel_tool_calls") is False:
                tool_choice = tool_choice or {"type": "auto"}
                if tool_choice["type"] != "none":
                    tool_choice["disable_parallel_tool_use"] = True
            if tool_choice is not None:
                out["tool_choice"] = tool_choice
        user = payload.get("user")
        if isinstance(user, str) and user:
            out["metadata"] = {"user_id": user}
        return out

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        """An Anthropic message as a chat completion. ValueError: a field is not of its type
        (see `_obj`)."""
        data = _obj(_decode(body), "reply")
        texts: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in _list(data.get("content"), "content"):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(_str(block.get("text"), "text block's text"))
            elif kind == "thinking":
                thinking.append(_str(block.get("thinking"), "thinking block's thinking"))
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": _label(block.get("id")) or "",
                        "type": "function",
                        "function": {
                            "name": _str(block.get("name"), "tool_use block's name"),
                            "arguments": _json_text(block.get("input", {})),
                        },
                    }
                )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not calls else None,
            "refusal": None,
        }
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        if calls:
            message["tool_calls"] = calls
        finish = FINISH_REASONS.get(_label(data.get("stop_reason")) or "end_turn", "stop")
        return _encode(
            {
                "id": _completion_id(data.get("id"), event),
                "object": "chat.completion",
                "created": event.ts_ms // 1000,
                "model": event.model,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
                ],
                "usage": chat_usage(event),
            }
        )

    def stream(self, event: UsageEvent, include_usage: bool) -> ChunkStream:
        return ChunkStream(event, include_usage)

    def error(self, status: int, body: bytes) -> bytes:
        """An Anthropic-shaped (or any) error body in OpenAI's shape, its message kept."""
        kind = "invalid_request_error" if status < 500 else "api_error"
        return ApiError(
            status, _upstream_message(status, body), type=OPENAI_ERROR_TYPES.get(status, kind)
        ).body()


def _completion_id(upstream_id: Any, event: UsageEvent) -> str:
    if isinstance(upstream_id, str) and upstream_id:
        return "chatcmpl-" + upstream_id.removeprefix("msg_")
    return "chatcmpl-" + event.request_id


class ChunkStream:
    """One Messages API stream as chat completion chunks: the role chunk at message_start,
    text, reasoning_content and tool call deltas (a tool call's index counts tool_use blocks),
    the finish_reason chunk at message_delta; at `end`, the usage chunk (when the client asked
    for it) and `[DONE]`."""

    __slots__ = ("created", "event", "finished", "id", "include_usage", "started", "tools")

    def __init__(self, event: UsageEvent, include_usage: bool) -> None:
        self.event = event
        self.include_usage = include_usage
        self.id = _completion_id(None, event)
        self.created = event.ts_ms // 1000
        self.started = False
        self.finished = False
        self.tools: dict[int, int] = {}  # a tool_use block's index -> its tool call index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.event.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return b"data: " + _encode(chunk) + b"\n\n"

    def _role(self) -> bytes:
        self.started = True
        return self._chunk({"role": "assistant", "content": ""})

    def _event(self, name: str | None, data: dict[str, Any]) -> bytes:
        kind = data.get("type", name)
        if kind == "message_start":
            message = _obj(data.get("message"), "message_start's message")
            self.id = _completion_id(message.get("id"), self.event)
            return b"" if self.started else self._role()
        out = b"" if self.started or kind in ("ping", "error") else self._role()
        if kind == "content_block_start":
            block = _obj(data.get("content_block"), "content_block_start's content_block")
            if block.get("type") == "tool_use":
                n = len(self.tools)
                self.tools[_index(data.get("index"), n, "content_block_start's index")] = n
                call = {
                    "index": n,
                    "id": _label(block.get("id")) or "",
                    "type": "function",
                    "function": {
                        "name": _str(block.get("name"), "tool_use block's name"),
                        "arguments": "",
                    },
                }
                out += self._chunk({"tool_calls": [call]})
            elif block.get("type") == "text" and (text := _str(block.get("text"), "text's text")):
                out += self._chunk({"content": text})
        elif kind == "content_block_delta":
            delta = _obj(data.get("delta"), "content_block_delta's delta")
            dtype = delta.get("type")
            if dtype == "text_delta":
                out += self._chunk({"content": _str(delta.get("text"), "text_delta's text")})
            elif dtype == "thinking_delta":
                thinking = _str(delta.get("thinking"), "thinking_delta's thinking")
                out += self._chunk({"reasoning_content": thinking})
            elif dtype == "input_json_delta":
                index = _index(data.get("index"), -1, "content_block_delta's index")
                at = self.tools.get(index)
                if at is not None:
                    partial = _str(delta.get("partial_json"), "input_json_delta's partial_json")
                    args = {"arguments": partial}
                    out += self._chunk({"tool_calls": [{"index": at, "function": args}]})
        elif kind == "message_delta":
            stop = _obj(data.get("delta"), "message_delta's delta").get("stop_reason")
            if stop is not None and not self.finished:
                self.finished = True
                out += self._chunk({}, FINISH_REASONS.get(_label(stop) or "end_turn", "stop"))
        elif kind == "error":
            err = data.get("error") or {}
            said = err.get("message") if isinstance(err, dict) else None
            text = said if isinstance(said, str) else "The upstream stream failed."
            out += b"data: " + ApiError(500, text, type="api_error").body() + b"\n\n"
        return out

    def feed(self, events: bytes) -> bytes:
        out = b""
        for name, data in _data_events(events):
            try:
                parsed = _decode(data)
            except (msgspec.DecodeError, RecursionError):
                continue
            if isinstance(parsed, dict):
                out += self._event(name, parsed)
        return out

    def end(self, event: UsageEvent) -> bytes:
        self.event = event
        out = b"" if self.started else self._role()
        if not self.finished:
            self.finished = True
            out += self._chunk({}, "tool_calls" if self.tools else "stop")
        if self.include_usage:
            chunk = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": event.model,
                "choices": [],
                "usage": chat_usage(event),
            }
            out += b"data: " + _encode(chunk) + b"\n\n"
        return out + b"data: [DONE]\n\n"
