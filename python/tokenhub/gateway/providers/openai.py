"""The OpenAI wire: paths, the request sent upstream, the reply and stream shapes.

The one definition, in Python, of where an OpenAI-shaped reply keeps its usage and its output
text (the Rust `SseRelay` holds the same for streams, as events pass). Decoding is lenient
towards upstreams: unknown fields are ignored, and a malformed usage block does not cost the
choices their decoding (`tokenhub.gateway.usage_check` judges it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import msgspec

from tokenhub._core import SseRelay
from tokenhub.config import Provider as ProviderConfig
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint
from tokenhub.meter import Meter
from tokenhub.usage import UsageEvent

# -- reply shapes (lenient: only what metering needs) ------------------------------------------


class FunctionDelta(msgspec.Struct, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True):
    function: FunctionDelta | None = None


class Message(msgspec.Struct, kw_only=True):
    content: str | None = None
    reasoning_content: str | None = None  # DeepSeek's (and others') reasoning tokens
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionDelta | None = None  # the legacy (pre-tools) function call


class Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: Message | None = None  # chat, non-streamed
    delta: Message | None = None  # chat, streamed
    text: str | None = None  # legacy completions


class Reply(msgspec.Struct, kw_only=True):
    choices: list[Choice] = []
    # As the upstream sent it (any JSON): a malformed usage block must not cost the choices
    # their decoding; `usage_check` judges it.
    usage: Any = None

    def output_texts(self) -> list[str]:
        return [t for c in self.choices for t in _choice_texts(c, c.message)]


def _choice_texts(choice: Choice, part: Message | None) -> Iterator[str]:
    if choice.text:
        yield choice.text
    if part is not None:
        if part.reasoning_content:
            yield part.reasoning_content
        if part.content:
            yield part.content
        functions = [c.function for c in part.tool_calls or () if c.function]
        if part.function_call is not None:
            functions.append(part.function_call)
        for f in functions:
            if f.name:
                yield f.name
            if f.arguments:
                yield f.arguments


_decode_reply = msgspec.json.Decoder(Reply).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

_NULL = msgspec.Raw(b"null")


class _Envelope(msgspec.Struct):
    """The top level of a non-streamed reply, undecoded: what says whether it is one."""

    choices: msgspec.Raw = _NULL
    data: msgspec.Raw = _NULL
    error: msgspec.Raw = _NULL


_decode_envelope = msgspec.json.Decoder(_Envelope).decode

_PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions", EMBEDDINGS: "/embeddings"}
_CAP_KEYS = ("max_tokens", "max_completion_tokens")


class OpenAIWire:
    """The OpenAI wire (see `tokenhub.gateway.providers.base.Provider`)."""

    name = "openai"

    def path(self, endpoint: Endpoint) -> str:
        return _PATHS[endpoint]

    def request_body(
        self, payload: dict[str, Any], upstream_model: str, cap: int | None, stream: bool
    ) -> bytes:
        """`payload` for `upstream_model`. A stream always asks for the usage chunk (stripped
        again for a client that did not ask). The cap goes in each of max_tokens and
        max_completion_tokens the payload has, else in max_tokens (the field every
        OpenAI-compatible server knows), so no upstream is asked for more than was reserved,
        whichever of the two it honours."""
        payload["model"] = upstream_model
        if stream:
            options = payload.get("stream_options")
            payload["stream_options"] = (
                {**options, "include_usage": True}
                if isinstance(options, dict)
                else {"include_usage": True}
            )
        if cap is not None:
            sent = False
            for key in _CAP_KEYS:
                if payload.get(key) is not None:
                    payload[key] = cap
                    sent = True
            if not sent:
                payload["max_tokens"] = cap
        return _encode(payload)

    def auth(self, key: str, provider: ProviderConfig) -> dict[str, str]:
        """`Authorization: Bearer <key>`, or the bare key in `provider.auth_header` (Azure
        OpenAI's `api-key`; an auth_header of Authorization, in any case, is the Bearer
        form); then the provider's extra headers."""
        headers: dict[str, str] = {}
        if key:
            name = provider.auth_header
            if not name or name.lower() == "authorization":
                headers["Authorization"] = f"Bearer {key}"
            else:
                headers[name] = key
        headers.update(provider.headers)
        return headers

    def not_a_completion(self, endpoint: Endpoint, data: bytes) -> str | None:
        """Not a JSON object, an `error` object, no `choices` (`data` for embeddings)."""
        try:
            env = _decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return "its reply was not a JSON object"
        if bytes(env.error).strip() != b"null":
            return "it answered 200 with an error object"
        field = env.data if endpoint is EMBEDDINGS else env.choices
        if not bytes(field).lstrip().startswith(b"["):
            return f"its reply had no {'data' if endpoint is EMBEDDINGS else 'choices'}"
        return None

    def reply(self, data: bytes) -> Reply:
        try:
            return _decode_reply(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return Reply()

    def scanner(self, keep_usage: bool, meter: Meter) -> SseRelay:
        return SseRelay(keep_usage, meter.core)

    def stream_usage(self, chunk: bytes) -> Any:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            return _decode_reply(chunk).usage
        return None

    def usage_tail(self, scanner: Any, event: UsageEvent) -> bytes:
        """A usage chunk in OpenAI's shape (`choices: []`) with the event's metered counts,
        marked so (`tokenhub.usage_source`), with the first chunk's id, object, created and
        model (the relay's `head`), then `[DONE]`."""
        if not scanner.held_done:
            return b""
        chunk: dict[str, Any] = {"id": event.request_id, "object": "chat.completion.chunk"}
        if (head := scanner.head) is not None:
            chunk |= _decode_any(head)
        chunk.setdefault("created", event.ts_ms // 1000)
        chunk.setdefault("model", event.upstream_model)
        chunk["choices"] = []
        chunk["usage"] = {
            "prompt_tokens": event.input_tokens,
            "completion_tokens": event.output_tokens,
            "total_tokens": event.input_tokens + event.output_tokens,
        }
        chunk["tokenhub"] = {"usage_source": event.source}
        return b"data: " + _encode(chunk) + b"\n\ndata: [DONE]\n\n"

    def stream_error(self, err: ApiError, *, end: bool) -> bytes:
        return b"data: " + err.body() + (b"\n\ndata: [DONE]\n\n" if end else b"\n\n")

    def error_code(self, data: bytes) -> str:
        try:
            err = _decode_any(data).get("error", {})
            return str(err.get("code") or err.get("type") or "")
        except Exception:
            return ""


OPENAI = OpenAIWire()
