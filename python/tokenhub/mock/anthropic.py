"""Anthropic's Messages API on the mock upstream (``POST /v1/messages``, ``/count_tokens``).

Same server, same ledger, same ``x-mock-*`` knobs as the OpenAI routes (upstream.py), so the
gateway's Anthropic wire is tested against a provider whose every figure is known: the reply
text is the chat routes' deterministic text (`ReplySource`), and usage follows Anthropic's
semantics, including prompt caching, simulated closely enough that a coding-agent session
gets the reads and writes it would get from the real API.

Requests are checked as the API checks them: an ``anthropic-version`` header, the key in
``x-api-key`` or ``Authorization: Bearer`` (when the mock requires one), ``model``,
``max_tokens`` and a non-empty ``messages`` list of user/assistant turns (consecutive turns of
one role are allowed, as the API merges them), known content blocks, at most 4
``cache_control`` breakpoints, thinking budgets of at least 1024 tokens below ``max_tokens``.
Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}}`` with a
``request-id`` header (``req_`` + the message id's suffix); forced and injected statuses too:
429 rate_limit_error (with ``retry-after``), 500 api_error, 529 overloaded_error.

The reply: with ``thinking: {"type": "enabled", "budget_tokens": B}`` first a thinking block
of ``min(completion_tokens, B - 1)`` tokens of deterministic text and a signature (``{"type":
"adaptive"}``: ``min(completion_tokens, max_tokens // 2)`` tokens); then either
a ``tool_use`` block (when tool_choice forces one, ``{"type": "any"}`` being the first tool, or
under ``tool_calls = "auto"`` when tools are offered, tool_choice is not none and the last
message carries no tool_result; input from `tools.generate`; stop_reason "tool_use") or the
text, ``completion_tokens`` tokens capped by what thinking left of ``max_tokens`` (stop_reason
"max_tokens" when capped, else "end_turn"), cut before the first stop sequence found in it
(stop_reason "stop_sequence"). A tool call that does not fit in what is left of max_tokens is
not made (the text is, capped). Output tokens: the meter's count of the thinking text, of the
text, and for a tool_use ``count(name) + count(JSON of input)``; the signature is not counted.

Prompt tokens: the request is rendered into ordered segments, each a *block*: each tool (its
JSON definition without ``cache_control``, as msgspec encodes it), each system text block (a
string system is one block), then each message's content blocks (string content is one text
block): text -> its text; tool_use -> ``count(name) + count(JSON of input)``; tool_result ->
its text content (images in it as below); thinking -> its thinking text; redacted_thinking ->
0; image and (non-text) document -> a fixed `IMAGE_TOKENS`; a text document -> its text. Each
message adds `MESSAGE_OVERHEAD` tokens on its first block. The prompt is the sum; count_tokens
answers it (``{"input_tokens": N}``) without the cache.

Prompt caching: a block carrying ``cache_control`` is a breakpoint; the prefix through it is
cacheable when it has at least `min_cache_tokens`. The cache is per (API key, model): prefix
hash -> tokens, least recently used first out beyond `cache_entries`, each entry living
`cache_ttl_s` (3600 s for ``"ttl": "1h"``) after its write or last read. A request reads the
longest cached prefix ending at a breakpoint or at any of the `cache_lookback_blocks` block
boundaries before one (as the API looks back ~20 blocks); it writes every cacheable
breakpoint's prefix longer than the read, and ``cache_creation_input_tokens`` = the last
cacheable breakpoint's prefix - the read (0 when that prefix was read). ``input_tokens`` is
the rest; ``cache_creation`` reports the writes as 5-minute or 1-hour by the last breakpoint's
ttl. Failed requests (forced errors, stalls before any byte) neither read nor write.

Streams follow the API's event sequence (``event: <type>`` lines): message_start (usage with
the input and cache figures and ``output_tokens: 1``), content_block_start, a ping after the
first, content_block_delta (text_delta and thinking_delta one token each, signature_delta,
input_json_delta in up to 3 fragments), content_block_stop, message_delta (stop_reason,
stop_sequence, the cumulative usage), message_stop; ``stream_error_after`` K ends a stream
after K events with ``event: error`` (overloaded_error), as the API does when it fails
mid-stream. ``omit_usage`` drops the ``usage`` key of
the message (non-streamed), of message_start and of message_delta. The ledger (endpoint
"messages") records prompt tokens (all of them) with ``cache_read_tokens`` and
``cache_creation_tokens``, and for a stream the output tokens of what reached the socket
(a tool_use's name counts with its content_block_start); ``usage_sent`` means message_delta's
usage (or the message's) went out. count_tokens requests are free: they are counted in the
ledger's totals (``count_tokens_requests``), not entered. ``POST /mock/reset`` clears the
ledger, not the prompt cache (use another API key for a cold cache).

Performance notes: measured on the shared 2-core test machine (aiohttp client in another
process, server CPU from /proc, so only the ratios mean much): a short non-streamed Messages
request costs about what a chat request does (~125 us of server CPU beside ~120 us), a
32-token stream ~215 us beside ~180 us for a chat stream. A 180k-token, 160-message
conversation with one breakpoint costs ~3.9 ms, mostly reading and decoding the 1 MB body and
hashing the prefix for the cache (blake2b over each block's JSON); so the hashes stop at the
last breakpoint, and the counts go through the meter's content-keyed cache, so a growing
conversation recounts only its new blocks.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from tokenhub.meter import Meter
from tokenhub.mock import tools
from tokenhub.mock.upstream import (
    _USAGE,
    ANY_MODEL,
    MOCK,
    LedgerEntry,
    Mock,
    MockError,
    MockOptions,
    Reply,
    ReplySource,
    _Event,
    _send_json,
    _Stalled,
    _stream,
)

__all__ = [
    "IMAGE_TOKENS",
    "MAX_BREAKPOINTS",
    "MESSAGE_OVERHEAD",
    "PROMPT_CACHE",
    "AnthropicError",
    "Prompt",
    "PromptCache",
    "add_routes",
    "count_prompt",
]

IMAGE_TOKENS: Final = 85
"""Tokens of an image or a non-text document block (a fixed small count)."""
MESSAGE_OVERHEAD: Final = 3
"""Tokens each message adds (its role framing), on its first block."""
MAX_BREAKPOINTS: Final = 4
MIN_THINKING_BUDGET: Final = 1024
_HOUR: Final = 3600.0

_encode = msgspec.json.Encoder().encode


# -- errors -------------------------------------------------------------------------------------

_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


class AnthropicError(MockError):
    """An error in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``,
    with the ``request-id`` header."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, type=error_type(status), headers=headers)

    def body(self) -> bytes:
        return _encode({"type": "error", "error": {"type": self.type, "message": self.message}})

    def response(self, request_id: str | None = None) -> web.Response:
        resp = web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=self.headers,
        )
        if request_id:
            resp.headers["request-id"] = request_id
        return resp

    @classmethod
    def forced(cls, status: int, model: str, retry_after_s: int) -> AnthropicError:
        """The error the API sends with each status, for injected and forced errors."""
        if status == 429:
            return cls(
                429,
                "This request would exceed the rate limit for your organization of 50 requests "
                "per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits.",
                headers={
                    "retry-after": str(retry_after_s),
                    "anthropic-ratelimit-requests-limit": "50",
                    "anthropic-ratelimit-requests-remaining": "0",
                },
            )
        if status == 529:
            return cls(529, "Overloaded")
        if status == 500:
            return cls(500, "Internal server error")
        if status == 401:
            return cls(401, "invalid x-api-key")
        if status == 404:
            return cls.model_not_found(model)
        return cls(status, f"Forced error status {status} (mock upstream).")

    @classmethod
    def model_not_found(cls, model: str) -> AnthropicError:
        return cls(404, f"model: {model}")

    @classmethod
    def of(cls, e: MockError, model: str) -> AnthropicError:
        """A shared helper's (OpenAI-shaped) error in Anthropic's shape."""
        if isinstance(e, AnthropicError):
            return e
        if e.status == 404 and e.code == "model_not_found":
            return cls.model_not_found(model)
        return cls(e.status, e.message, headers=e.headers)


def _invalid(message: str) -> AnthropicError:
    return AnthropicError(400, message)


# -- requests -----------------------------------------------------------------------------------


class _MessagesRequest(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int
    messages: list[Any]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None


class _CountRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Any]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


_MESSAGES_DECODER: Final = msgspec.json.Decoder(_MessagesRequest)
_COUNT_DECODER: Final = msgspec.json.Decoder(_CountRequest)


async def _read(request: web.Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise AnthropicError(413, "Request exceeds the maximum allowed number of bytes.") from None
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        if text.startswith("Object missing required field `"):
            raise _invalid(f"{text.split('`')[1]}: Field required") from None
        if "`$." in text:
            where = text.rsplit("`$.", 1)[1].rstrip("`").replace("[", ".").replace("]", "")
            raise _invalid(f"{where}: {text.split(' - at ')[0]}") from None
        raise _invalid(text) from None
    except msgspec.DecodeError:
        raise _invalid("There was an issue with your request body: invalid JSON") from None


# -- the prompt: segments, counts, breakpoints ----------------------------------------------------


@dataclass(slots=True)
class _Segment:
    texts: list[str]
    extra: int  # fixed tokens (images, the message overhead)
    tag: bytes  # where the block is: tools, system, a user or an assistant message
    block: Mapping[str, Any]  # the block; with the tag, what identifies it for the cache
    ttl: str | None = None  # the cache_control's ttl ("5m" default) when a breakpoint
    breakpoint: bool = False


@dataclass(slots=True)
class Prompt:
    """A request's prompt as counted: per block, the tokens of the prefix through it and (as
    far as the last breakpoint) the prefix's hash; the breakpoints (block indices) and each
    one's ttl in seconds ("1h" -> 3600, else None for the default)."""

    total: int
    prefix_tokens: list[int] = field(default_factory=list)
    prefix_hashes: list[bytes] = field(default_factory=list)
    breakpoints: list[tuple[int, float | None]] = field(default_factory=list)


def _cache_control(value: Any, where: str) -> str | None:
    if not isinstance(value, Mapping) or value.get("type") != "ephemeral":
        raise _invalid(f"{where}.cache_control: Input tag must be 'ephemeral'")
    ttl = value.get("ttl", "5m")
    if ttl not in ("5m", "1h"):
        raise _invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    return str(ttl)


def _without_cc(block: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


def _text_of(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{where}: Input should be a valid string")
    return value


def _block_texts(block: Mapping[str, Any], role: str, where: str) -> tuple[list[str], int]:
    """(texts to count, fixed tokens) of one content block; 400 for a malformed one."""
    kind = block.get("type")
    if kind == "text":
        return [_text_of(block.get("text"), f"{where}.text")], 0
    if kind in ("image", "document"):
        if role != "user":
            raise _invalid(f"{where}: {kind} blocks are only allowed in user messages")
        source = block.get("source")
        if not isinstance(source, Mapping):
            raise _invalid(f"{where}.source: Field required")
        if kind == "document" and source.get("type") == "text":
            return [_text_of(source.get("data"), f"{where}.source.data")], 0
        return [], IMAGE_TOKENS
    if kind == "tool_use":
        if role != "assistant":
            raise _invalid(f"{where}: tool_use blocks are only allowed in assistant messages")
        name = _text_of(block.get("name"), f"{where}.name")
        _text_of(block.get("id"), f"{where}.id")
        value = block.get("input")
        if not isinstance(value, Mapping):
            raise _invalid(f"{where}.input: Input should be a valid dictionary")
        return [name, tools.arguments(value)], 0
    if kind == "tool_result":
        if role != "user":
            raise _invalid(f"{where}: tool_result blocks are only allowed in user messages")
        _text_of(block.get("tool_use_id"), f"{where}.tool_use_id")
        content = block.get("content", "")
        if isinstance(content, str):
            return [content], 0
        if not isinstance(content, list):
            raise _invalid(f"{where}.content: Input should be a valid string or list")
        texts: list[str] = []
        extra = 0
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
                raise _invalid(f"{where}.content.{j}: expected a text or image block")
            t, x = _block_texts(part, "user", f"{where}.content.{j}")
            texts += t
            extra += x
        return texts, extra
    if kind == "thinking":
        return [_text_of(block.get("thinking"), f"{where}.thinking")], 0
    if kind == "redacted_thinking":
        return [], 0
    raise _invalid(
        f"{where}: Input tag '{kind}' found using 'type' does not match any of the expected "
        "tags: 'text', 'image', 'document', 'tool_use', 'tool_result', 'thinking', "
        "'redacted_thinking'"
    )


def _segments(
    system: str | list[Any] | None, tools_: list[Any] | None, messages: list[Any]
) -> list[_Segment]:
    segs: list[_Segment] = []

    def add(texts: list[str], extra: int, tag: bytes, block: Mapping[str, Any], where: str) -> None:
        seg = _Segment(texts, extra, tag, block)
        if "cache_control" in block:
            seg.ttl = _cache_control(block["cache_control"], where)
            seg.breakpoint = True
        segs.append(seg)

    for i, tool in enumerate(tools_ or []):
        if not isinstance(tool, Mapping):
            raise _invalid(f"tools.{i}: Input should be a valid dictionary")
        _text_of(tool.get("name"), f"tools.{i}.name")
        text = tools.arguments(_without_cc(tool))
        add([text], 0, b"T", tool, f"tools.{i}")
    if isinstance(system, str):
        if system:
            # Keyed as the text block it stands for, so either spelling hits the same entry.
            add([system], 0, b"S", {"type": "text", "text": system}, "system")
    elif system is not None:
        for i, block in enumerate(system):
            where = f"system.{i}"
            if not isinstance(block, Mapping) or block.get("type") != "text":
                raise _invalid(f"{where}: system blocks must be text blocks")
            text = _text_of(block.get("text"), f"{where}.text")
            add([text], 0, b"S", block, where)
    if not messages:
        raise _invalid("messages: at least one message is required")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, Mapping):
            raise _invalid(f"{where}: Input should be a valid dictionary")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _invalid(
                f'{where}.role: Unexpected role "{role}". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role; allowed roles '
                'are "user" and "assistant".'
                if role == "system"
                else f"{where}.role: Input should be 'user' or 'assistant'"
            )
        tag = b"U" if role == "user" else b"A"
        content = m.get("content")
        if isinstance(content, str):
            add([content], MESSAGE_OVERHEAD, tag, {"type": "text", "text": content}, where)
            continue
        if not isinstance(content, list):
            raise _invalid(f"{where}.content: Field required")
        if not content:
            raise _invalid(f"{where}.content: messages must have non-empty content")
        for j, block in enumerate(content):
            bw = f"{where}.content.{j}"
            if not isinstance(block, Mapping):
                raise _invalid(f"{bw}: Input should be a valid dictionary")
            texts, extra = _block_texts(block, str(role), bw)
            overhead = MESSAGE_OVERHEAD if j == 0 else 0
            add(texts, extra + overhead, tag, block, bw)
    if sum(s.breakpoint for s in segs) > MAX_BREAKPOINTS:
        found = sum(s.breakpoint for s in segs)
        raise _invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {found}."
        )
    return segs


def count_prompt(
    meter: Meter,
    messages: list[Any],
    system: str | list[Any] | None = None,
    tools_: list[Any] | None = None,
) -> Prompt:
    """The prompt of a Messages request as the mock counts it (see the module docstring);
    raises AnthropicError (400) for a malformed one."""
    segs = _segments(system, tools_, messages)
    flat = [t for s in segs for t in s.texts]
    counts = iter(meter.core.count_cached_many(flat))
    prompt = Prompt(total=0)
    running = 0
    for i, s in enumerate(segs):
        running += s.extra + sum(next(counts) for _ in s.texts)
        prompt.prefix_tokens.append(running)
        if s.breakpoint:
            prompt.breakpoints.append((i, _HOUR if s.ttl == "1h" else None))
    prompt.total = running
    # Prefix hashes only as far as the last breakpoint: nothing after it is ever looked up
    # (hashing is most of the cost of a long conversation: ~3 ms for 180k tokens).
    h = hashlib.blake2b(digest_size=16)
    for s in segs[: prompt.breakpoints[-1][0] + 1 if prompt.breakpoints else 0]:
        key = s.tag + _encode(_without_cc(s.block))
        # Length-prefixed so that no two block sequences hash the same.
        h.update(len(key).to_bytes(8, "little"))
        h.update(key)
        prompt.prefix_hashes.append(h.digest())
    return prompt


# -- the prompt cache -----------------------------------------------------------------------------


@dataclass(slots=True)
class CacheFigures:
    read: int = 0
    creation: int = 0
    one_hour: bool = False  # the writes live an hour


class PromptCache:
    """Prefix hash -> tokens per (API key, model), bounded, entries expiring `ttl` after their
    write or last read."""

    def __init__(self, capacity: int, clock: Any = time.monotonic) -> None:
        self.capacity = capacity
        self.clock = clock
        # (key, model, prefix hash) -> (tokens, expiry, ttl)
        self._entries: OrderedDict[tuple[str, str, bytes], tuple[int, float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, k: tuple[str, str, bytes], now: float) -> int | None:
        hit = self._entries.get(k)
        if hit is None:
            return None
        tokens, expiry, ttl = hit
        if expiry <= now:
            del self._entries[k]
            return None
        self._entries[k] = (tokens, now + ttl, ttl)
        self._entries.move_to_end(k)
        return tokens

    def _put(self, k: tuple[str, str, bytes], tokens: int, ttl: float, now: float) -> None:
        self._entries[k] = (tokens, now + ttl, ttl)
        self._entries.move_to_end(k)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def apply(self, key: str, model: str, prompt: Prompt, knobs: MockOptions) -> CacheFigures:
        """Reads the longest cached prefix, writes the breakpoints' prefixes beyond it."""
        fig = CacheFigures()
        minimum = max(knobs.min_cache_tokens, 1)
        cacheable = [(i, t) for i, t in prompt.breakpoints if prompt.prefix_tokens[i] >= minimum]
        if not cacheable:
            return fig
        now = self.clock()
        look = knobs.cache_lookback_blocks
        candidates: set[int] = set()
        for i, _ in cacheable:
            candidates.update(range(max(0, i - look), i + 1))
        read_at = -1
        for j in sorted(candidates, reverse=True):
            if prompt.prefix_tokens[j] < minimum:
                break
            if self._get((key, model, prompt.prefix_hashes[j]), now) is not None:
                read_at = j
                break
        fig.read = prompt.prefix_tokens[read_at] if read_at >= 0 else 0
        last, last_ttl = cacheable[-1]
        for i, ttl in cacheable:
            if i > read_at:
                life = ttl if ttl is not None else knobs.cache_ttl_s
                self._put((key, model, prompt.prefix_hashes[i]), prompt.prefix_tokens[i], life, now)
        if last > read_at:
            fig.creation = prompt.prefix_tokens[last] - fig.read
            fig.one_hour = last_ttl is not None
        return fig


PROMPT_CACHE: Final = web.AppKey("mock_prompt_cache", PromptCache)


# -- wire format ----------------------------------------------------------------------------------


class _CacheCreation(msgspec.Struct, kw_only=True):
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int


class _Usage(msgspec.Struct, kw_only=True):
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cache_creation: _CacheCreation
    output_tokens: int
    service_tier: str = "standard"


class _DeltaUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    output_tokens: int


class _Message(msgspec.Struct, kw_only=True):
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: _Usage | UnsetType = UNSET


@dataclass(slots=True)
class _Block:
    """One content block of the reply: its final form, its stream start, and its stream
    deltas with the output tokens after each counted event."""

    final: dict[str, Any]
    start: dict[str, Any]
    deltas: list[dict[str, Any]]
    counted_start: bool  # the start event carries tokens (a tool_use's name)
    counts: tuple[int, ...]  # after 0, 1, ... counted events (start if counted, then deltas)
    signature: str | None = None

    @property
    def tokens(self) -> int:
        return self.counts[-1]


def _text_block(reply: Reply) -> _Block:
    return _Block(
        final={"type": "text", "text": reply.text},
        start={"type": "text", "text": ""},
        deltas=[{"type": "text_delta", "text": p} for p in reply.pieces],
        counted_start=False,
        counts=reply.counts,
    )


def _thinking_block(reply: Reply) -> _Block:
    digest = hashlib.blake2b(reply.text.encode(), digest_size=48).digest()
    signature = "mock" + base64.b64encode(digest).decode("ascii")
    return _Block(
        final={"type": "thinking", "thinking": reply.text, "signature": signature},
        start={"type": "thinking", "thinking": "", "signature": ""},
        deltas=[{"type": "thinking_delta", "thinking": p} for p in reply.pieces],
        counted_start=False,
        counts=reply.counts,
        signature=signature,
    )


def _tool_block(meter: Meter, tool_id: str, name: str, value: dict[str, Any]) -> _Block:
    text = tools.arguments(value)
    frags = tools.fragments(text)
    base = meter.count(name)
    counter = meter.stream_counter()
    return _Block(
        final={"type": "tool_use", "id": tool_id, "name": name, "input": value},
        start={"type": "tool_use", "id": tool_id, "name": name, "input": {}},
        deltas=[{"type": "input_json_delta", "partial_json": f} for f in frags],
        counted_start=True,
        counts=(0, base, *(base + counter.feed(f) for f in frags)),
    )


def _cut(meter: Meter, reply: Reply, stops: list[str]) -> tuple[Reply, str] | None:
    """The reply cut before the first stop sequence in it, and that sequence."""
    best: tuple[int, str] | None = None
    for s in stops:
        at = reply.text.find(s) if s else -1
        if at >= 0 and (best is None or at < best[0]):
            best = (at, s)
    if best is None:
        return None
    at, seq = best
    pieces: list[str] = []
    done = 0
    for p in reply.pieces:
        if done + len(p) <= at:
            pieces.append(p)
            done += len(p)
            continue
        if at > done:
            pieces.append(p[: at - done])
        break
    counter = meter.stream_counter()
    counts = (0, *(counter.feed(p) for p in pieces))
    return Reply("".join(pieces), tuple(pieces), counts, 0), seq


def _tool_defs(req_tools: list[Any] | None) -> list[tuple[str, Any]]:
    out = []
    for t in req_tools or []:
        # Server tools (web search, ...) have no input_schema: an empty object then.
        out.append((str(t.get("name")), t.get("input_schema")))
    return out


def _chosen_tool(
    req: _MessagesRequest, defs: list[tuple[str, Any]], knobs: MockOptions
) -> tuple[tuple[str, Any] | None, bool]:
    """(the tool the reply calls or None, whether tool_choice forced it)."""
    choice = req.tool_choice
    kind = choice.get("type") if choice is not None else "auto"
    if choice is not None and not defs:
        raise _invalid("tool_choice: may only be specified while providing tools")
    if kind == "any":
        return defs[0], True
    if kind == "tool":
        name = choice.get("name") if choice is not None else None
        for d in defs:
            if d[0] == name:
                return d, True
        raise _invalid(f"tool_choice.name: Tool '{name}' not found in tools")
    if kind not in ("auto", "none"):
        raise _invalid(
            f"tool_choice.type: Input tag '{kind}' found using 'type' does not match any of the "
            "expected tags: 'auto', 'any', 'tool', 'none'"
        )
    if kind == "none" or not defs or knobs.tool_calls != "auto":
        return None, False
    last = req.messages[-1]
    content = last.get("content") if isinstance(last, Mapping) else None
    if isinstance(content, list) and any(
        isinstance(b, Mapping) and b.get("type") == "tool_result" for b in content
    ):
        return None, False
    return defs[0], False


def _thinking_limit(req: _MessagesRequest) -> int | None:
    """The most tokens the thinking block may have, None without one: an enabled budget B
    allows B - 1, adaptive thinking half of max_tokens."""
    t = req.thinking
    if t is None or t.get("type") == "disabled":
        return None
    if t.get("type") == "adaptive":
        return req.max_tokens // 2 or None
    if t.get("type") != "enabled":
        raise _invalid("thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'")
    budget = t.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise _invalid("thinking.enabled.budget_tokens: Field required")
    if budget < MIN_THINKING_BUDGET:
        raise _invalid(
            f"thinking.enabled.budget_tokens: Input should be greater than or equal to "
            f"{MIN_THINKING_BUDGET}"
        )
    if budget >= req.max_tokens:
        raise _invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    return budget - 1


# -- the handlers ---------------------------------------------------------------------------------


def _api_key(request: web.Request, mock: Mock) -> str:
    """The key the client sent (x-api-key or a bearer token); 401 when the mock requires one
    and it is missing or wrong."""
    key = request.headers.get("x-api-key")
    if key is None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            key = auth[7:]
    required = mock.options.require_key
    if required is not None:
        if key is None:
            raise AnthropicError(401, "x-api-key header is required")
        if key != required:
            raise AnthropicError(401, "invalid x-api-key")
    return key or ""


def _check_version(request: web.Request) -> None:
    if not request.headers.get("anthropic-version"):
        raise _invalid("anthropic-version: header is required")


def _source(mock: Mock, model: str, knobs: MockOptions) -> ReplySource:
    if model not in knobs.models and ANY_MODEL not in knobs.models:
        raise AnthropicError.model_not_found(model)
    return mock.source_for(model, knobs)


def _sse(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode(data) + b"\n\n"


# What the API sends when a stream fails after it started (x-mock-stream-error-after).
_STREAM_ERROR: Final = _sse(
    "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
)


async def _serve(mock: Mock, request: web.Request, entry: LedgerEntry) -> web.StreamResponse:
    _check_version(request)
    key = _api_key(request, mock)
    knobs = mock.overrides(request)
    req: _MessagesRequest = await _read(request, _MESSAGES_DECODER)
    entry.model = req.model
    if req.max_tokens < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    source = _source(mock, req.model, knobs)
    meter = source.meter
    prompt = count_prompt(meter, req.messages, req.system, req.tools)
    defs = _tool_defs(req.tools)
    call, forced = _chosen_tool(req, defs, knobs)
    thinking = _thinking_limit(req)
    if thinking is not None and forced:
        raise _invalid("Thinking may not be enabled when tool_choice forces tool use.")
    stream = bool(req.stream)
    entry.prompt_tokens = prompt.total
    entry.stream = stream
    await mock.admit(request, entry, knobs, AnthropicError.forced)

    seed = knobs.seed
    target = knobs.completion_tokens
    blocks: list[_Block] = []
    room = req.max_tokens
    if thinking is not None:
        thought = source.reply(req.model + "\0thinking", min(target, thinking), seed, 0)
        blocks.append(_thinking_block(thought))
        room -= thought.tokens
    stop_reason, stop_sequence = "end_turn", None
    if call is not None:
        tool_id = "toolu_" + entry.id.removeprefix("msg_")
        block = _tool_block(
            meter, tool_id, call[0], tools.generate(call[1], source.words, call[0], seed)
        )
        if block.tokens <= room:
            blocks.append(block)
            stop_reason = "tool_use"
        else:
            call = None
    if call is None:
        length = min(target, room)
        if length < target:
            stop_reason = "max_tokens"
        reply = source.reply(req.model, length, seed, 0)
        cut = _cut(meter, reply, req.stop_sequences) if req.stop_sequences else None
        if cut is not None:
            reply, stop_sequence = cut
            stop_reason = "stop_sequence"
        blocks.append(_text_block(reply))

    fig = request.app[PROMPT_CACHE].apply(key, req.model, prompt, knobs)
    entry.cache_read_tokens = fig.read
    entry.cache_creation_tokens = fig.creation
    input_tokens = prompt.total - fig.read - fig.creation
    output_tokens = sum(b.tokens for b in blocks)
    headers = {"request-id": "req_" + entry.id.removeprefix("msg_")}

    def usage(output: int) -> _Usage:
        return _Usage(
            input_tokens=input_tokens,
            cache_creation_input_tokens=fig.creation,
            cache_read_input_tokens=fig.read,
            cache_creation=_CacheCreation(
                ephemeral_5m_input_tokens=0 if fig.one_hour else fig.creation,
                ephemeral_1h_input_tokens=fig.creation if fig.one_hour else 0,
            ),
            output_tokens=output,
        )

    if not stream:
        body = _Message(
            id=entry.id,
            model=req.model,
            content=[b.final for b in blocks],
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            usage=UNSET if knobs.omit_usage else usage(output_tokens),
        )
        entry.completion_tokens = output_tokens
        return await _send_json(
            request,
            entry,
            knobs,
            _encode(body),
            usage_sent=not knobs.omit_usage,
            headers=headers,
        )

    start = _Message(
        id=entry.id,
        model=req.model,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=UNSET if knobs.omit_usage else usage(1),
    )
    events: list[_Event] = [
        (_sse("message_start", {"type": "message_start", "message": start}), -1, 0)
    ]
    step = 0  # output tokens before the event: the stream's pace
    for i, b in enumerate(blocks):
        counted = 0
        head = {"type": "content_block_start", "index": i, "content_block": b.start}
        if b.counted_start:
            events.append((_sse("content_block_start", head), i, step))
            counted = 1
        else:
            events.append((_sse("content_block_start", head), -1, step))
        if i == 0:
            events.append((_sse("ping", {"type": "ping"}), -1, step))
        for d in b.deltas:
            at = step + b.counts[counted]
            events.append(
                (
                    _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": d},
                    ),
                    i,
                    at,
                )
            )
            counted += 1
        if b.signature is not None:
            sig = {"type": "signature_delta", "signature": b.signature}
            events.append(
                (
                    _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": sig},
                    ),
                    -1,
                    -1,
                )
            )
        events.append(
            (_sse("content_block_stop", {"type": "content_block_stop", "index": i}), -1, -1)
        )
        step += b.tokens
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
    }
    if not knobs.omit_usage:
        delta["usage"] = _DeltaUsage(
            input_tokens=input_tokens,
            cache_creation_input_tokens=fig.creation,
            cache_read_input_tokens=fig.read,
            output_tokens=output_tokens,
        )
    events.append((_sse("message_delta", delta), -1 if knobs.omit_usage else _USAGE, -1))
    events.append((_sse("message_stop", {"type": "message_stop"}), -1, -1))
    return await _stream(request, entry, knobs, events, blocks, headers, _STREAM_ERROR)


async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages: one ledger entry per request, errors in Anthropic's shape."""
    mock = request.app[MOCK]
    entry = mock.begin(request, "messages", "msg_")
    try:
        return await _serve(mock, request, entry)
    except MockError as e:
        err = AnthropicError.of(e, entry.model)
        entry.status = err.status
        entry.prompt_tokens = entry.completion_tokens = 0
        entry.cache_read_tokens = entry.cache_creation_tokens = 0
        entry.usage_sent = False
        return err.response("req_" + entry.id.removeprefix("msg_"))
    except _Stalled as e:
        return e.response if e.response is not None else web.Response(status=499)
    finally:
        mock.ledger.record(entry)


async def count_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: the prompt as /v1/messages counts it, no cache, free."""
    mock = request.app[MOCK]
    model = ""
    try:
        _check_version(request)
        _api_key(request, mock)
        knobs = mock.overrides(request)
        req: _CountRequest = await _read(request, _COUNT_DECODER)
        model = req.model
        source = _source(mock, req.model, knobs)
        prompt = count_prompt(source.meter, req.messages, req.system, req.tools)
    except MockError as e:
        return AnthropicError.of(e, model).response()
    mock.ledger.totals.count_tokens_requests += 1
    return web.Response(
        body=_encode({"input_tokens": prompt.total}), content_type="application/json"
    )


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own errors under /v1/messages (an unknown sub-path, a wrong method) in
    Anthropic's shape; the app's outer middleware renders the others OpenAI's way."""
    try:
        result: web.StreamResponse = await handler(request)
        return result
    except web.HTTPException as e:
        if e.status < 400 or not request.path.startswith("/v1/messages"):
            raise
        if e.status == 404:
            return AnthropicError(404, f"Not found: {request.method} {request.path}").response()
        return AnthropicError(e.status, e.reason or "HTTP error").response()


def add_routes(app: web.Application) -> None:
    """The Messages routes, their error shape and the prompt cache, on the mock's app."""
    app.middlewares.append(_errors)
    app[PROMPT_CACHE] = PromptCache(app[MOCK].options.cache_entries)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
