"""The Anthropic wire: the native Messages API (`POST {base_url}/messages`) as an upstream.

The one definition, in Python, of where an Anthropic reply keeps its usage and its output text
(the Rust `AnthropicRelay` holds the same for streams, as events pass). What differs from the
OpenAI wire, and why it is handled here rather than in the request path:

- credentials go in `x-api-key` with an `anthropic-version` header, not a bearer token;
- the output cap is `max_tokens`, which the Messages API requires: the gateway lowers it to what
  admission reserved, never raises it;
- usage has Anthropic's semantics: `input_tokens` EXCLUDES cache reads
  (`cache_read_input_tokens`) and cache writes (`cache_creation_input_tokens`). The gateway
  reads every wire's usage in one form, OpenAI's keys (`providers.base`), so the view adds them
  back: `prompt_tokens` = all three, `prompt_tokens_details.cached_tokens` = reads,
  `.cache_write_tokens` = writes. A figure that is not a non-negative integer is passed through
  as it came, so `usage_check` flags it instead of the sum hiding it;
- a stream carries its usage (message_start, then message_delta's cumulative figures) and ends
  at `message_stop`: nothing is asked for, stripped or held back, so `usage_tail` is empty.

Output text, counted when the upstream's usage is missing or not believed (the same texts the
mock upstream counts and the relay counts when streamed): per content block in order, a text
block's `text`, a thinking block's `thinking`, a tool call's `name` and then the JSON encoding
of its `input` (msgspec's, compact: what a stream's `input_json_delta`s join to when the
upstream encodes it the same way).
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeGuard

import msgspec

from tokenhub._core import AnthropicRelay
from tokenhub.config import Provider as ProviderConfig
from tokenhub.gateway.dialects.messages import DIALECT as MESSAGES_DIALECT
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import COMPLETIONS, EMBEDDINGS, Endpoint
from tokenhub.meter import Meter
from tokenhub.usage import UsageEvent

__all__ = ["ANTHROPIC", "COUNT_PATH", "PATH", "AnthropicWire", "Block", "Reply", "normalize_usage"]

PATH = "/messages"
# The token counting endpoint (free, not a completion) under the same base_url.
COUNT_PATH = "/messages/count_tokens"

_TOOL_CALLS = frozenset(("tool_use", "server_tool_use", "mcp_tool_use"))

_UNSET: Any = msgspec.UNSET


# -- reply shapes (lenient: only what metering needs) ------------------------------------------


class Block(msgspec.Struct, kw_only=True):
    """One content block of a reply; fields of other block kinds are ignored."""

    type: str = ""
    text: str | None = None
    thinking: str | None = None
    name: str | None = None
    input: Any = _UNSET

    def texts(self) -> list[str]:
        """The block's output texts, in the order they are counted (empty ones left out)."""
        out: list[str] = []
        if self.type == "text" and self.text:
            out.append(self.text)
        elif self.type == "thinking" and self.thinking:
            out.append(self.thinking)
        elif self.type in _TOOL_CALLS:
            if self.name:
                out.append(self.name)
            if self.input is not msgspec.UNSET:
                out.append(_encode(self.input).decode())
        return out


class Reply(msgspec.Struct, kw_only=True):
    """A Messages API reply as metering reads it: usage normalized to OpenAI's keys."""

    content: list[Block] = []
    # As the upstream sent it (any JSON): a malformed usage block must not cost the content
    # its decoding; `usage_check` judges the normalized form.
    raw_usage: Any = msgspec.field(default=None, name="usage")

    @property
    def usage(self) -> Any:
        return normalize_usage(self.raw_usage)

    def output_texts(self) -> list[str]:
        return [t for block in self.content for t in block.texts()]


class _Lenient(msgspec.Struct):
    """A reply whose content could not be decoded: its usage alone, if that decodes."""

    usage: Any = None


_decode_reply = msgspec.json.Decoder(Reply).decode
_decode_lenient = msgspec.json.Decoder(_Lenient).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

_NULL = msgspec.Raw(b"null")


class _Envelope(msgspec.Struct):
    """The top level of a reply, undecoded but for its type: what says whether it is one."""

    type: Any = None
    content: msgspec.Raw = _NULL
    error: msgspec.Raw = _NULL


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


def _count(v: Any) -> TypeGuard[int]:
    """A token count: a non-negative int (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def normalize_usage(usage: Any) -> Any:
    """Anthropic's usage object in OpenAI's keys (see the module docstring); anything that is
    not an object is returned as it came (None: no usage)."""
    if not isinstance(usage, dict):
        return usage
    parts = [usage.get(k) for k in ("input_tokens", "cache_read_input_tokens")]
    parts.append(usage.get("cache_creation_input_tokens"))
    uncached, reads, writes = (0 if v is None else v for v in parts)
    output = usage.get("output_tokens")
    output = 0 if output is None else output
    odd = [v for v in (uncached, reads, writes) if not _count(v)]
    prompt = odd[0] if odd else uncached + reads + writes
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "prompt_tokens_details": {"cached_tokens": reads, "cache_write_tokens": writes},
    }
    if not odd and _count(output):
        out["total_tokens"] = prompt + output
    return out


# -- the wire ----------------------------------------------------------------------------------


class AnthropicWire:
    """The Anthropic Messages wire (see `tokenhub.gateway.providers.base.Provider`)."""

    name = "anthropic"

    def path(self, endpoint: Endpoint) -> str:
        """`/messages` for every completion endpoint (chat completions and Responses reach it
        translated); legacy completions and embeddings have no Messages form."""
        if endpoint is COMPLETIONS or endpoint is EMBEDDINGS:
            raise ValueError(f"the Anthropic wire has no {endpoint.name} endpoint")
        return PATH

    def request_body(
        self, payload: dict[str, Any], upstream_model: str, cap: int | None, stream: bool
    ) -> bytes:
        """`payload` (a Messages API body) for `upstream_model`, with `max_tokens` lowered to
        `cap` (set to it when the payload has no usable one) and `stream` as the gateway will
        read the reply; nothing else is changed."""
        payload["model"] = upstream_model
        if cap is not None:
            asked = payload.get("max_tokens")
            payload["max_tokens"] = min(asked, cap) if _count(asked) and asked > 0 else cap
        if stream:
            payload["stream"] = True
        elif "stream" in payload:
            payload["stream"] = False
        return _encode(payload)

    def auth(self, key: str, provider: ProviderConfig) -> dict[str, str]:
        """`x-api-key: <key>` (or the bare key in `provider.auth_header`; an auth_header of
        Authorization, in any case, sends `Authorization: Bearer <key>`, as DeepSeek's and
        Kimi's Anthropic-compatible endpoints take it), `anthropic-version` (the provider's,
        unless its headers set one), then the provider's extra headers."""
        headers: dict[str, str] = {}
        if key:
            name = provider.auth_header or "x-api-key"
            if name.lower() == "authorization":
                headers["Authorization"] = f"Bearer {key}"
            else:
                headers[name] = key
        if not any(h.lower() == "anthropic-version" for h in provider.headers):
            headers["anthropic-version"] = provider.anthropic_version
        headers.update(provider.headers)
        return headers

    def not_a_completion(self, endpoint: Endpoint, data: bytes) -> str | None:
        """Not a JSON object, an error object, not `"type": "message"`, no `content` list."""
        try:
            env = _decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return "its reply was not a JSON object"
        if env.type == "error" or bytes(env.error).strip() != b"null":
            return "it answered 200 with an error object"
        if env.type != "message":
            return "its reply was not a message"
        if not bytes(env.content).lstrip().startswith(b"["):
            return "its reply had no content"
        return None

    def reply(self, data: bytes) -> Reply:
        """The reply's view; lenient: undecodable content leaves the usage, if that decodes."""
        try:
            return _decode_reply(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            return Reply(raw_usage=_decode_lenient(data).usage)
        return Reply()

    def scanner(self, keep_usage: bool, meter: Meter) -> AnthropicRelay:
        """The Rust `AnthropicRelay` (`keep_usage` does not apply: events pass unchanged)."""
        return AnthropicRelay(meter.core)

    def stream_usage(self, chunk: bytes) -> Any:
        """The relay's merged usage object (JSON), normalized."""
        with contextlib.suppress(msgspec.DecodeError):
            return normalize_usage(_decode_any(chunk))
        return None

    def usage_tail(self, scanner: Any, event: UsageEvent) -> bytes:
        """Nothing: an Anthropic stream carries its own usage and nothing is held back."""
        return b""

    def stream_error(self, err: ApiError, *, end: bool) -> bytes:
        """An `event: error` in Anthropic's error shape (it ends the stream by itself)."""
        return MESSAGES_DIALECT.stream_error(err, end=end)

    def error_code(self, data: bytes) -> str:
        """The error body's `error.type` ("overloaded_error", ...)."""
        try:
            err = _decode_any(data).get("error", {})
            return str(err.get("type") or "") if isinstance(err, dict) else ""
        except Exception:
            return ""


ANTHROPIC = AnthropicWire()
