"""Anthropic's Messages API as a client dialect (POST /v1/messages, /v1/messages/count_tokens).

Claude Code and its kin speak this API. `MessagesRequest` validates the body strictly where the
gateway relies on it (the model, `max_tokens`, the messages and their content blocks, tools,
tool_choice, stop sequences, thinking) and passes everything else through untouched, because an
Anthropic upstream receives the body as the client wrote it (passthrough) and knows fields this
gateway does not. Each error names the field as a path (`messages.2.content.0.tool_use_id`), the
way Anthropic's own errors do, so a client can find what to fix.

The prompt the meter counts is the conversation as OpenAI-shaped chat messages
(`chat_messages`), the same function the translation to an OpenAI upstream uses
(`tokenhub.gateway.translate.anthropic_chat`): the tokens metered are those of what a chat
upstream is sent. Two choices follow Anthropic's billing rather than the text sent:

- thinking and redacted_thinking blocks of earlier assistant turns are left out (Anthropic strips
  them from the context and does not bill them as input);
- cache_control markers are ignored (they change the price of input tokens, not their number).

Block types this module does not know (server tool blocks such as web_search_tool_result, newer
block kinds) are accepted when they are objects with a string `type`: an Anthropic upstream
judges them. The meter counts their JSON text, an estimate; a chat upstream cannot take them and
the translation refuses them with a 400 (`strict=True`).

Errors on this route are Anthropic-shaped (`DIALECT`):
`{"type": "error", "error": {"type": "invalid_request_error", "message": "..."}}`, the type
chosen by HTTP status; a stream's error is an `event: error` carrying the same object.

Performance notes (one core, a coding-agent turn: 81 messages, 840 KB, 218k tokens): `parse`
takes 1.1 ms, of which 0.6 ms is msgspec's JSON decode and 0.2 ms `chat_messages`; validation
walks every block once, in Python, and stays below the decode. Building the chat-shaped prompt
again for the upstream (`MessagesOverChat.request`) costs the same 0.2 ms: the messages refer
to the client's strings, copying only what is joined (several text blocks of one message) or
reshaped (an image's base64 data into a data URL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

import msgspec

from tokenhub.config import Model
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import ANTHROPIC_MESSAGES, MESSAGES, Endpoint, ParsedRequest

_encode = msgspec.json.Encoder().encode

# Anthropic requires budget_tokens >= 1024 for manual extended thinking.
MIN_THINKING_BUDGET = 1024
ROLES = ("user", "assistant")
THINKING_TYPES = ("enabled", "disabled", "adaptive", "between_tools")
TOOL_CHOICES = ("auto", "any", "tool", "none")
# Block types validated here; any other object with a string "type" passes through.
KNOWN_BLOCKS = frozenset(
    ("text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking")
)


def _bad(message: str, param: str) -> ApiError:
    return ApiError.bad_request(f"{param}: {message}", param=param)


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


# -- validation ---------------------------------------------------------------------------------


def _check_text_block(block: Mapping[str, Any], where: str) -> None:
    if not isinstance(block.get("text"), str):
        raise _bad("a text block needs a string 'text'", f"{where}.text")


def _check_image(block: Mapping[str, Any], where: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad("an image block needs a 'source' object", f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        if not isinstance(source.get("media_type"), str):
            raise _bad("a base64 source needs a string 'media_type'", f"{where}.source.media_type")
        if not isinstance(source.get("data"), str):
            raise _bad("a base64 source needs a string 'data'", f"{where}.source.data")
    elif kind == "url":
        if not isinstance(source.get("url"), str):
            raise _bad("a url source needs a string 'url'", f"{where}.source.url")
    elif kind == "file":
        if not isinstance(source.get("file_id"), str):
            raise _bad("a file source needs a string 'file_id'", f"{where}.source.file_id")
    else:
        raise _bad(
            "an image source's type must be 'base64', 'url' or 'file'", f"{where}.source.type"
        )


def _check_document(block: Mapping[str, Any], where: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("type"), str):
        raise _bad("a document block needs a 'source' object with a 'type'", f"{where}.source")
    kind = source["type"]
    if kind == "text" and not isinstance(source.get("data"), str):
        raise _bad("a text source needs a string 'data'", f"{where}.source.data")
    if kind == "content":
        content = source.get("content")
        if isinstance(content, list):
            _check_blocks(content, f"{where}.source.content", allowed=("text", "image"))
        elif not isinstance(content, str):
            raise _bad(
                "a content source needs 'content': a string or a list of blocks",
                f"{where}.source.content",
            )


def _check_blocks(
    blocks: list[Any], where: str, *, role: str = "user", allowed: tuple[str, ...] | None = None
) -> None:
    for i, block in enumerate(blocks):
        at = f"{where}.{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad("each content block must be an object with a string 'type'", at)
        kind = block["type"]
        if allowed is not None and kind not in allowed:
            raise _bad(
                f"a block of type '{kind}' is not allowed here (allowed: {', '.join(allowed)})",
                f"{at}.type",
            )
        if kind == "text":
            _check_text_block(block, at)
        elif kind == "image":
            _check_image(block, at)
        elif kind == "document":
            _check_document(block, at)
        elif kind == "tool_use":
            if role != "assistant":
                raise _bad("tool_use blocks belong in assistant messages", f"{at}.type")
            for key in ("id", "name"):
                v = block.get(key)
                if not isinstance(v, str) or not v:
                    raise _bad(f"a tool_use block needs a non-empty string '{key}'", f"{at}.{key}")
            if not isinstance(block.get("input"), dict):
                raise _bad("a tool_use block's 'input' must be an object", f"{at}.input")
        elif kind == "tool_result":
            if role != "user":
                raise _bad("tool_result blocks belong in user messages", f"{at}.type")
            v = block.get("tool_use_id")
            if not isinstance(v, str) or not v:
                raise _bad(
                    "a tool_result block needs a non-empty string 'tool_use_id'",
                    f"{at}.tool_use_id",
                )
            content = block.get("content")
            if isinstance(content, list):
                _check_blocks(content, f"{at}.content")
            elif content is not None and not isinstance(content, str):
                raise _bad(
                    "a tool_result's 'content' must be a string or a list of blocks",
                    f"{at}.content",
                )
            if "is_error" in block and not isinstance(block["is_error"], bool):
                raise _bad("'is_error' must be a boolean", f"{at}.is_error")
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise _bad("a thinking block needs a string 'thinking'", f"{at}.thinking")
        elif kind == "redacted_thinking" and not isinstance(block.get("data"), str):
            raise _bad("a redacted_thinking block needs a string 'data'", f"{at}.data")


def check_messages(messages: Any) -> None:
    """Raises ApiError (400) unless `messages` is a non-empty list of well-formed messages."""
    if not isinstance(messages, list) or not messages:
        raise _bad("must be a non-empty array of messages", "messages")
    for i, m in enumerate(messages):
        at = f"messages.{i}"
        if not isinstance(m, dict):
            raise _bad("each message must be an object", at)
        role = m.get("role")
        if role not in ROLES:
            raise _bad("'role' must be 'user' or 'assistant'", f"{at}.role")
        content = m.get("content")
        if isinstance(content, list):
            _check_blocks(content, f"{at}.content", role=role)
        elif not isinstance(content, str):
            raise _bad("'content' must be a string or an array of content blocks", f"{at}.content")


def check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _bad("must be a string or an array of text blocks", "system")
    _check_blocks(system, "system", allowed=("text",))


def check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("must be an array of tool definitions", "tools")
    for i, tool in enumerate(tools):
        at = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad("each tool must be an object", at)
        kind = tool.get("type")
        if kind is not None and kind != "custom":
            # A server tool (web_search_20250305, bash_20250124, ...): the upstream judges it.
            if not isinstance(kind, str):
                raise _bad("a tool's 'type' must be a string", f"{at}.type")
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("a tool needs a non-empty string 'name'", f"{at}.name")
        if not isinstance(tool.get("input_schema"), dict):
            raise _bad("a tool needs an 'input_schema' object", f"{at}.input_schema")
        if "description" in tool and not isinstance(tool["description"], str):
            raise _bad("a tool's 'description' must be a string", f"{at}.description")


def check_tool_choice(choice: Any) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICES:
        raise _bad(
            "must be an object whose 'type' is 'auto', 'any', 'tool' or 'none'", "tool_choice"
        )
    if choice["type"] == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("a tool choice of type 'tool' needs a string 'name'", "tool_choice.name")
    flag = choice.get("disable_parallel_tool_use")
    if flag is not None and not isinstance(flag, bool):
        raise _bad("must be a boolean", "tool_choice.disable_parallel_tool_use")


def check_options(payload: Mapping[str, Any], max_tokens: int | None) -> None:
    """The scalar options: stop_sequences, thinking, temperature, top_p, top_k, metadata."""
    stops = payload.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        raise _bad("must be an array of strings", "stop_sequences")
    thinking = payload.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in THINKING_TYPES:
            raise _bad(
                "must be an object whose 'type' is one of " + ", ".join(THINKING_TYPES),
                "thinking",
            )
        if thinking["type"] == "enabled":
            budget = thinking.get("budget_tokens")
            if not _is_int(budget) or budget < MIN_THINKING_BUDGET:
                raise _bad(
                    f"must be an integer of at least {MIN_THINKING_BUDGET}",
                    "thinking.budget_tokens",
                )
            if max_tokens is not None and budget >= max_tokens:
                raise _bad(f"must be less than max_tokens ({max_tokens})", "thinking.budget_tokens")
    for key in ("temperature", "top_p"):
        v = payload.get(key)
        if v is not None and (not _is_number(v) or v < 0):
            raise _bad("must be a non-negative number", key)
    top_k = payload.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _bad("must be a non-negative integer", "top_k")
    metadata = payload.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("must be an object", "metadata")
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            raise _bad("must be a string", "metadata.user_id")


# -- the conversation as OpenAI chat messages -----------------------------------------------------


def image_part(block: Mapping[str, Any], *, strict: bool, where: str) -> dict[str, Any] | None:
    """An image block as an OpenAI image_url part: a base64 source as a data URL, a url source
    as its URL. A file source (Anthropic's Files API) has no chat equivalent: a 400 when
    `strict`, else None (the meter counts images as nothing anyway)."""
    source = block["source"]
    if source["type"] == "base64":
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif source["type"] == "url":
        url = source["url"]
    elif strict:
        raise _bad("an image from the Files API cannot be sent to this model", where)
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _document_parts(block: Mapping[str, Any], *, strict: bool, where: str) -> list[dict[str, Any]]:
    source = block["source"]
    kind = source["type"]
    if kind == "text":
        return [{"type": "text", "text": source["data"]}]
    if kind == "content":
        content = source["content"]
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        return _parts(content, strict=strict, where=f"{where}.source.content")
    if kind == "base64" and source.get("media_type") == "application/pdf":
        title = block.get("title")
        name = title if isinstance(title, str) and title else "document.pdf"
        data = source.get("data", "")
        return [
            {
                "type": "file",
                "file": {"filename": name, "file_data": f"data:application/pdf;base64,{data}"},
            }
        ]
    if strict:
        raise _bad(f"a document with a '{kind}' source cannot be sent to this model", where)
    return [{"type": "file", "file": {}}]  # counts as nothing, like an image


def _other_block(block: Mapping[str, Any], *, strict: bool, where: str) -> list[dict[str, Any]]:
    if strict:
        raise _bad(
            f"content blocks of type '{block['type']}' cannot be sent to this model",
            f"{where}.type",
        )
    return [{"type": "text", "text": _encode(block).decode()}]


def _block_parts(block: Mapping[str, Any], *, strict: bool, where: str) -> list[dict[str, Any]]:
    """A user-side block (text, image, document, other) as OpenAI content parts."""
    kind = block["type"]
    if kind == "text":
        return [{"type": "text", "text": block["text"]}]
    if kind == "image":
        part = image_part(block, strict=strict, where=where)
        return [] if part is None else [part]
    if kind == "document":
        return _document_parts(block, strict=strict, where=where)
    if kind in ("thinking", "redacted_thinking"):
        return []
    return _other_block(block, strict=strict, where=where)


def _parts(blocks: list[Any], *, strict: bool, where: str) -> list[dict[str, Any]]:
    return [
        p
        for i, block in enumerate(blocks)
        for p in _block_parts(block, strict=strict, where=f"{where}.{i}")
    ]


def _simplified(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string (every chat upstream takes it); parts otherwise."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _tool_result(
    block: Mapping[str, Any], *, strict: bool, where: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tool_result block as a "tool" message (its text) and the non-text parts (images) it
    carried, which chat tool messages cannot hold: they go to the user message after it."""
    content = block.get("content")
    rest: list[dict[str, Any]] = []
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = _parts(content, strict=strict, where=f"{where}.content")
        text = "\n".join(p["text"] for p in parts if p["type"] == "text")
        rest = [p for p in parts if p["type"] != "text"]
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}, rest


def tool_call(block: Mapping[str, Any]) -> dict[str, Any]:
    """A tool_use block as an OpenAI tool call: its input as JSON text (msgspec's encoding,
    what the mock and the Rust scanner count too)."""
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": _encode(block["input"]).decode()},
    }


def system_text(system: Any) -> str:
    """The system prompt as one string (text blocks joined by newlines)."""
    if isinstance(system, str):
        return system
    return "\n".join(b["text"] for b in system)


def chat_messages(payload: Mapping[str, Any], *, strict: bool = False) -> list[dict[str, Any]]:
    """The validated request's conversation as OpenAI chat messages: the system prompt first;
    a user message's tool_result blocks as "tool" messages, in order, before the user message
    holding the rest of its content; an assistant message's tool_use blocks as its
    `tool_calls`; text as a string when a message holds only text; thinking left out.
    `strict`: refuse (400) what a chat upstream cannot take (Files API sources, server tool
    blocks) instead of approximating it for the meter."""
    out: list[dict[str, Any]] = []
    system = payload.get("system")
    if system:
        text = system_text(system)
        if text:
            out.append({"role": "system", "content": text})
    for i, m in enumerate(payload["messages"]):
        role, content, where = m["role"], m["content"], f"messages.{i}.content"
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if role == "assistant":
            texts: list[str] = []
            calls: list[dict[str, Any]] = []
            for j, block in enumerate(content):
                kind = block["type"]
                if kind == "text":
                    texts.append(block["text"])
                elif kind == "tool_use":
                    calls.append(tool_call(block))
                elif kind in ("thinking", "redacted_thinking"):
                    continue
                else:
                    texts.extend(
                        p.get("text", "")
                        for p in _other_block(block, strict=strict, where=f"{where}.{j}")
                    )
            message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if calls:
                message["tool_calls"] = calls
                if not texts:
                    message["content"] = None
            out.append(message)
            continue
        pending: list[Any] = []
        moved: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            if block["type"] == "tool_result":
                tool, rest = _tool_result(block, strict=strict, where=f"{where}.{j}")
                out.append(tool)
                moved.extend(rest)
            else:
                pending.append((j, block))
        parts = moved + [
            p
            for j, block in pending
            for p in _block_parts(block, strict=strict, where=f"{where}.{j}")
        ]
        if parts or not any(b["type"] == "tool_result" for b in content):
            out.append({"role": "user", "content": _simplified(parts)})
    return out


# -- the request ----------------------------------------------------------------------------------


class MessagesRequest(ParsedRequest):
    """A Messages API request (`count_only`: a /v1/messages/count_tokens body, where
    `max_tokens` is not required and `stream` is not read)."""

    __slots__ = ("count_only",)

    def __init__(self, endpoint: Endpoint = ANTHROPIC_MESSAGES, *, count_only: bool = False):
        super().__init__(endpoint)
        self.count_only = count_only

    def parse(self, body: bytes, models: Mapping[str, Model]) -> Model:
        """Decodes and checks `body`; the model it names. Raises ApiError (400, 404)."""
        payload = self.take_body(body)
        model = self.take_model(models, _bad("Field required: a string naming the model", "model"))
        max_tokens = payload.get("max_tokens")
        if self.count_only:
            max_tokens = None
        else:
            stream = payload.get("stream", False)
            if not isinstance(stream, bool):
                raise _bad("must be a boolean", "stream")
            if stream and not self.endpoint.streams:
                raise _bad("this endpoint does not stream", "stream")
            self.stream = stream
            if max_tokens is None:
                raise _bad("Field required", "max_tokens")
            if not _is_int(max_tokens) or max_tokens < 1:
                raise _bad("must be a positive integer", "max_tokens")
            self.cap_keys, self.caps = ("max_tokens",), (max_tokens,)
        self.include_usage = False  # a Messages stream always carries usage
        check_system(payload.get("system"))
        check_messages(payload.get("messages"))
        tools = payload.get("tools")
        check_tools(tools)
        check_tool_choice(payload.get("tool_choice"))
        check_options(payload, max_tokens)
        self.prompt, self.prompt_kind = chat_messages(payload), MESSAGES
        self.tools_text = _encode(tools).decode() if tools else ""
        self.choices = 1
        return model


class CountTokensRequest(MessagesRequest):
    """A /v1/messages/count_tokens body: a Messages request without max_tokens."""

    __slots__ = ()

    def __init__(self, endpoint: Endpoint = ANTHROPIC_MESSAGES) -> None:
        super().__init__(endpoint, count_only=True)


# -- the dialect ----------------------------------------------------------------------------------


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    if status == 400:
        return "invalid_request_error"
    if status == 401:
        return "authentication_error"
    if status == 402:
        return "billing_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "request_too_large"
    if status == 429:
        return "rate_limit_error"
    if status in (503, 529):
        return "overloaded_error"
    if status == 504:
        return "timeout_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


class ErrorDetail(msgspec.Struct, kw_only=True):
    type: str
    message: str


class ErrorEnvelope(msgspec.Struct, kw_only=True, tag="error", tag_field="type"):
    error: ErrorDetail


def error_json(status: int, message: str) -> bytes:
    """Anthropic's error body: {"type": "error", "error": {"type": ..., "message": ...}}."""
    return _encode(ErrorEnvelope(error=ErrorDetail(type=error_type(status), message=message)))


class MessagesDialect:
    """How the gateway writes errors to a Messages API client."""

    name = "anthropic"
    request_class = MessagesRequest

    def error_body(self, err: ApiError) -> bytes:
        return error_json(err.status, err.message)

    def stream_error(self, err: ApiError, *, end: bool) -> bytes:
        """An `error` event. It ends a Messages stream by itself (clients stop reading at it),
        so `end` adds nothing."""
        return b"event: error\ndata: " + error_json(err.status, err.message) + b"\n\n"


DIALECT = MessagesDialect()
