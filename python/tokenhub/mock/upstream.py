"""An OpenAI-compatible upstream simulator with exact token counts (`tokenhub mock-upstream`).

The demo, the gateway's correctness tests and its benchmarks run against this server, so it speaks
OpenAI's wire format faithfully (bodies, SSE chunks, the usage chunk, error bodies and statuses)
and its token counts are exact under a real vocabulary: ``prompt_tokens`` is the meter's
``count_messages`` of the messages (``count`` of a legacy prompt) and ``completion_tokens`` is the
meter's count of the text it returns. The text is deterministic: a seeded choice of one-token
words, so a request always gets the same reply, the streamed deltas concatenate to exactly the
non-streamed text, and a reply capped by ``max_tokens`` is a prefix of the uncapped one.

The same server speaks Anthropic's Messages API (``POST /v1/messages`` and its count_tokens,
see anthropic.py) with the same text, knobs and ledger. Chat requests that offer ``tools`` or
ask for reasoning (``reasoning_effort``, or a model in `REASONING_MODELS`) take a path of their
own (`_rich_chat`): tool calls when tool_choice forces one (or under ``tool_calls = "auto"``),
and DeepSeek-style ``reasoning_content`` before the content; plain requests never reach it.

Every request it serves goes to an in-memory ledger (``GET /mock/ledger``, ``POST /mock/reset``)
so a test can reconcile what the gateway billed against what was served, including streams the
client cut short (the ledger counts the tokens of the deltas actually written to the socket).

Behaviour is steered by :class:`MockOptions` (the CLI flags), and per request by ``x-mock-*``
headers named after the option fields (``x-mock-latency-ms: 200``, ``x-mock-status: 429``,
``x-mock-stall: 3``, ``x-mock-completion-tokens: 100``, ...); an unknown ``x-mock-*`` header is a
400, so a typo in a test fails loudly instead of silently testing nothing.

Performance notes: this is the "direct to the mock" baseline in gateway benchmarks, so the
per-request path does no generation and no tokenization of the reply. Replies are cached per
(vocabulary, model, length, seed, choice index) together with the running token count after
each delta, so a request costs a dict lookup plus the prompt count (the meter's per-message
cache makes repeated prompts nearly free); responses are encoded by module-level msgspec
encoders; a stream that is not paced is written in one ``write``. The ``x-mock-*`` headers are
found by one scan of the raw header tuples and parsed only when present. Measured with the
server pinned to one core (uvloop, 64 keep-alive connections from a raw-socket client on the other
core, 2-message prompt, 32-token reply): 15,000-16,000 non-streamed chat requests/s at 75-90% of
the core (about 50 us of CPU each), and 7,000-8,800 streams/s (35 SSE events each, include_usage)
at 55-70% (about 75 us each; 115 us before stream chunks were spliced from cached parts, see
`_framing`). An aiohttp client saturates its own core first, at about 4,800 and 3,300/s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import itertools
import logging
import math
import os
import random
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from tokenhub import vocabs
from tokenhub.meter import Meter
from tokenhub.mock import tools

__all__ = [
    "DEFAULT_MODELS",
    "LEDGER",
    "MOCK",
    "Ledger",
    "MockError",
    "MockOptions",
    "build_app",
]

log = logging.getLogger("tokenhub.mock")

DEFAULT_PORT: Final = 9999

# Model id -> vocabulary name; "" means the default vocabulary (`MockOptions.vocab`), so
# `--vocab` retargets the OpenAI-named models while Qwen and DeepSeek models keep their own.
# The demo (`tokenhub serve --demo`) relies on gpt-4o-mini, qwen-plus and deepseek-chat.
DEFAULT_MODELS: Final[Mapping[str, str]] = {
    "gpt-4o-mini": "",
    "gpt-4o": "",
    "gpt-4.1": "",
    "gpt-4.1-mini": "",
    "gpt-4.1-nano": "",
    "gpt-4-turbo": "",
    "gpt-4": "",
    "gpt-3.5-turbo": "",
    "gpt-3.5-turbo-instruct": "",
    "text-embedding-3-small": "",
    "text-embedding-3-large": "",
    "text-embedding-ada-002": "",
    "qwen-turbo": "qwen",
    "qwen-plus": "qwen",
    "qwen-max": "qwen",
    "qwen3.6-plus": "qwen3.6",
    "deepseek-chat": "deepseek-v4",
    "deepseek-reasoner": "deepseek-v4",
    # Claude model ids, for the Messages API (mock/anthropic.py) and the demo's Claude model.
    "claude-sonnet-4-5": "",
    "claude-haiku-4-5": "",
}
ANY_MODEL: Final = "*"  # a model-map key that serves every model id
# Chat models that think aloud without being asked (DeepSeek's reasoner sends
# `reasoning_content` on every reply); any other model does when `reasoning_effort` is set.
REASONING_MODELS: Final = frozenset({"deepseek-reasoner"})

NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Status = Annotated[int, msgspec.Meta(ge=400, le=599)]


def _default_models() -> dict[str, str]:
    return dict(DEFAULT_MODELS)


class MockOptions(msgspec.Struct, kw_only=True, frozen=True):
    """How the mock behaves. Fields marked "per request" can be overridden by an ``x-mock-*``
    header named after the field (``x-mock-latency-ms``, ``x-mock-error-rate-429``, ...)."""

    models: dict[str, str] = msgspec.field(default_factory=_default_models)
    """Model id -> vocabulary name ("" = ``vocab``); the key "*" serves any model id."""
    vocab: str = "cl100k_base"
    """Default vocabulary (per request)."""
    completion_tokens: Tokens = 32
    """Reply length in tokens before any ``max_tokens`` cap (per request)."""
    latency_ms: NonNegFloat = 0.0
    """Delay before answering a valid completion or embedding request, injected errors
    included; malformed requests are answered at once (per request)."""
    ttft_ms: NonNegFloat = 0.0
    """Further delay before the first token: after the headers for a stream (per request)."""
    tokens_per_second: NonNegFloat = 0.0
    """Stream pace per choice; 0 sends everything at once (per request)."""
    error_rate_429: Rate = 0.0
    """Share of requests answered with OpenAI's rate-limit error (per request)."""
    error_rate_500: Rate = 0.0
    """Share of requests answered with OpenAI's server error (per request)."""
    status: Status | None = None
    """Answer every request with this error status (per request)."""
    omit_usage: bool = False
    """Send no usage: no ``usage`` key, no usage chunk even if asked (per request)."""
    stream_error_after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """K: a stream sends its first K events, then a mid-stream error event instead of the rest
    (OpenAI: a ``data: {"error": ...}`` server_error chunk; Anthropic: ``event: error``,
    overloaded_error) and ends; a stream of K events or fewer is whole (per request)."""
    stall: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """0: accept and never send a byte; K: stall after K SSE events (for a JSON reply: after
    the headers); either way until the client gives up (per request)."""
    seed: int = 0
    """Seeds the error injection (once, at start) and the reply text (per request; a request's
    own ``seed`` field takes precedence for the text)."""
    require_key: str | None = None
    """If set, only ``Authorization: Bearer <require_key>`` is accepted (401 otherwise)."""
    embedding_dim: Annotated[int, msgspec.Meta(ge=1, le=8192)] = 8
    """Embedding length when the request has no ``dimensions``."""
    retry_after_s: Annotated[int, msgspec.Meta(ge=0)] = 1
    """The ``retry-after`` header on 429 responses."""
    ledger_size: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    """Ledger entries kept (the totals never drop)."""
    tool_calls: Literal["forced", "auto"] = "forced"
    """When a reply calls a tool: "forced" only when the request's tool_choice forces one;
    "auto" also calls the first tool whenever tools are offered, tool_choice does not say
    none and the last message is not a tool result, so an agent loop can be simulated (per
    request)."""
    min_cache_tokens: Tokens = 1024
    """Anthropic prompt caching: the smallest prefix a ``cache_control`` breakpoint caches
    (per request)."""
    cache_ttl_s: NonNegFloat = 300.0
    """Anthropic prompt caching: how long an entry lives after its write or last read; a
    breakpoint marked ``"ttl": "1h"`` lives 3600 s (per request)."""
    cache_lookback_blocks: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 20
    """Anthropic prompt caching: a breakpoint also reads an entry written at any of this many
    block boundaries before it, as Anthropic's API does (per request)."""
    cache_entries: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    """Anthropic prompt caching: entries kept over all keys and models (least recently used
    dropped first)."""


class _Overrides(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The per-request subset of MockOptions, parsed from ``x-mock-*`` headers."""

    vocab: str | UnsetType = UNSET
    completion_tokens: Tokens | UnsetType = UNSET
    latency_ms: NonNegFloat | UnsetType = UNSET
    ttft_ms: NonNegFloat | UnsetType = UNSET
    tokens_per_second: NonNegFloat | UnsetType = UNSET
    error_rate_429: Rate | UnsetType = UNSET
    error_rate_500: Rate | UnsetType = UNSET
    status: Status | UnsetType | None = UNSET
    omit_usage: bool | UnsetType = UNSET
    stall: Annotated[int, msgspec.Meta(ge=0)] | UnsetType | None = UNSET
    stream_error_after: Annotated[int, msgspec.Meta(ge=0)] | UnsetType | None = UNSET
    seed: int | UnsetType = UNSET
    tool_calls: Literal["forced", "auto"] | UnsetType = UNSET
    min_cache_tokens: Tokens | UnsetType = UNSET
    cache_ttl_s: NonNegFloat | UnsetType = UNSET
    cache_lookback_blocks: Annotated[int, msgspec.Meta(ge=0, le=1000)] | UnsetType = UNSET


def _validated(options: MockOptions) -> MockOptions:
    """Constraints are only checked on conversion, so round-trip once at start-up."""
    try:
        checked = msgspec.convert(msgspec.to_builtins(options), MockOptions)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid mock options: {e}") from None
    for name in {checked.vocab, *checked.models.values()} - {""}:
        vocabs.spec_for(name)  # VocabNotFound (a ValueError) names the known vocabularies
    return checked


# -- errors: the one place they become OpenAI's error body -------------------------------------


class _ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class _ErrorEnvelope(msgspec.Struct, kw_only=True):
    error: _ErrorBody


_encode_error = msgspec.json.Encoder().encode


class MockError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``. Its
    own type, not the gateway's: the simulator stands for a provider and imports nothing of
    the gateway, so a test compares the gateway's error bodies with an independent source."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        err = _ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return _encode_error(_ErrorEnvelope(error=err))

    def response(self, request_id: str | None = None) -> web.Response:
        resp = web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=self.headers,
        )
        if request_id:
            resp.headers["x-request-id"] = request_id
        return resp

    @classmethod
    def forced(cls, status: int, model: str, retry_after_s: int) -> MockError:
        """The body OpenAI sends with each status, for injected and forced errors."""
        if status == 429:
            return cls(
                429,
                f"Rate limit reached for {model} on requests per min (RPM): Limit 60, Used 60, "
                f"Requested 1. Please try again in {retry_after_s}s. "
                "Visit https://platform.openai.com/account/rate-limits to learn more.",
                type="requests",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": str(retry_after_s),
                    "x-ratelimit-limit-requests": "60",
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{retry_after_s}s",
                },
            )
        if status == 500:
            return cls(
                500,
                "The server had an error while processing your request. Sorry about that!",
                type="server_error",
            )
        if status == 503:
            return cls(
                503,
                "The engine is currently overloaded, please try again later.",
                type="server_error",
            )
        if status == 401:
            return cls(401, "Incorrect API key provided.", code="invalid_api_key")
        if status == 404:
            return cls.model_not_found(model)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return cls(status, f"Forced error status {status} (mock upstream).", type=kind)

    @classmethod
    def model_not_found(cls, model: str) -> MockError:
        return cls(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )

    @classmethod
    def bad_json(cls) -> MockError:
        return cls(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
        )

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> MockError:
        return cls(400, message, param=param, code=code)


def _from_validation(e: msgspec.ValidationError) -> MockError:
    """msgspec's message, with OpenAI's wording for a missing parameter."""
    text = str(e)
    if text.startswith("Object missing required field `"):
        name = text.split("`")[1]
        if name == "model":
            return MockError.invalid("you must provide a model parameter")
        return MockError.invalid(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    param = text.rsplit("`$.", 1)[1].rstrip("`") if "`$." in text else None
    return MockError.invalid(f"Invalid request: {text}", param=param)


# -- wire format --------------------------------------------------------------------------------


# OpenAI's usage details, shared (never mutated) so a response allocates none of them.
class _PromptDetails(msgspec.Struct, frozen=True):
    cached_tokens: int = 0
    audio_tokens: int = 0


class _CompletionDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: int = 0
    audio_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


_PROMPT_DETAILS: Final = _PromptDetails()
_COMPLETION_DETAILS: Final = _CompletionDetails()


class ChatUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: _PromptDetails = _PROMPT_DETAILS
    completion_tokens_details: _CompletionDetails = _COMPLETION_DETAILS


class TextUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class _Message(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str
    refusal: None = None
    annotations: list[Any] = []


class _Choice(msgspec.Struct, kw_only=True):
    index: int
    message: _Message
    logprobs: None = None
    finish_reason: str


class _ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[_Choice] | list[_RichChoice]
    # UNSET fields are left out of the JSON: omit-usage sends no "usage" key at all.
    usage: ChatUsage | UnsetType = UNSET
    service_tier: str = "default"
    system_fingerprint: str


class _Delta(msgspec.Struct, kw_only=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


_EMPTY_DELTA: Final = _Delta()


class _ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: _Delta
    logprobs: None = None
    finish_reason: str | None = None


class _ChatChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    service_tier: str = "default"
    system_fingerprint: str
    choices: list[_ChunkChoice]
    # None is sent as "usage": null on every chunk when the client asked for usage, as OpenAI
    # does; UNSET leaves the key out.
    usage: ChatUsage | UnsetType | None = UNSET


# Replies with tool calls or reasoning (a path of their own, so plain replies stay as cheap).
class _Function(msgspec.Struct, kw_only=True):
    name: str | UnsetType = UNSET
    arguments: str


class _ToolCall(msgspec.Struct, kw_only=True):
    index: int | UnsetType = UNSET  # stream deltas only
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET
    function: _Function


class _RichMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[_ToolCall] | UnsetType = UNSET
    refusal: None = None
    annotations: list[Any] = []


class _RichChoice(msgspec.Struct, kw_only=True):
    index: int
    message: _RichMessage
    logprobs: None = None
    finish_reason: str


class _RichDelta(msgspec.Struct, kw_only=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType | None = UNSET
    reasoning_content: str | UnsetType | None = UNSET
    tool_calls: list[_ToolCall] | UnsetType = UNSET


class _RichChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: _RichDelta
    logprobs: None = None
    finish_reason: str | None = None


class _TextChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class _TextCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[_TextChoice]
    usage: TextUsage | UnsetType | None = UNSET
    system_fingerprint: str


class _Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str


class _EmbeddingList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[_Embedding]
    model: str
    usage: EmbeddingUsage | UnsetType = UNSET


class _Model(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 1_700_000_000
    owned_by: str = "tokenhub-mock"


class _ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[_Model]


# Requests: lenient towards fields the mock ignores (temperature, top_p, tools, ...).
class _StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


class _ChatRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    n: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning_effort: str | None = None


class _TextRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str | list[Any]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    n: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


class _EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]
    dimensions: int | None = None
    encoding_format: str | None = None


_encode = msgspec.json.Encoder().encode
_CHAT_DECODER: Final = msgspec.json.Decoder(_ChatRequest)
_TEXT_DECODER: Final = msgspec.json.Decoder(_TextRequest)
_EMBEDDING_DECODER: Final = msgspec.json.Decoder(_EmbeddingRequest)

SYSTEM_FINGERPRINT: Final = "fp_tokenhub_mock"
_SSE_DONE: Final = b"data: [DONE]\n\n"
# What OpenAI sends when a stream fails after it started.
_SSE_STREAM_ERROR: Final = (
    b'data: {"error":{"message":"The server had an error while processing your request. '
    b'Sorry about that!","type":"server_error","param":null,"code":null}}\n\n'
)
# Legacy completions default to 16 tokens when max_tokens is absent, as OpenAI's API does.
_LEGACY_DEFAULT_MAX_TOKENS: Final = 16
_MAX_N: Final = 128


# -- deterministic replies ----------------------------------------------------------------------

# Common words; each vocabulary keeps those that are one token with and without a leading
# space, so a reply grows by one token per word in every supported vocabulary.
_WORDS: Final = (  # noqa: SIM905 (reads better as prose than as a list)
    "the of and to in is that it for on was with as at by be this from or have an they which "
    "one you were all we when there can more if no out so said what up its about than into them "
    "only could new some time very may also after two where most over did just many before "
    "must through back years much way well down should because each people state good how "
    "make world still own see work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right used "
    "take three small large next early young important few public bad able local sure free "
    "better real best whole clear major open hard short low high simple full light true left "
    "model token count meter price stream quota route cache value data system reply answer "
    "question result number order level point case group part place fact water room line hand "
    "house city table paper river music story field power money market plan test code text"
).split()


@dataclass(slots=True)
class Reply:
    """A deterministic reply for one choice index: its stream deltas, the exact token count
    after each, and (built on first use) each delta's encoded stream choice."""

    text: str
    pieces: tuple[str, ...]  # the stream deltas, in order; they concatenate to `text`
    counts: tuple[int, ...]  # counts[k] = tokens of pieces[:k]; counts[-1] = tokens of text
    index: int
    _chat: tuple[bytes, ...] | None = None
    _text: tuple[bytes, ...] | None = None

    @property
    def tokens(self) -> int:
        return self.counts[-1]

    def chat_deltas(self) -> tuple[bytes, ...]:
        if self._chat is None:
            self._chat = tuple(
                _encode(_ChunkChoice(index=self.index, delta=_Delta(content=p)))
                for p in self.pieces
            )
        return self._chat

    def text_deltas(self) -> tuple[bytes, ...]:
        if self._text is None:
            self._text = tuple(
                _encode(_TextChoice(text=p, index=self.index, finish_reason=None))
                for p in self.pieces
            )
        return self._text


@functools.cache
def _load_meter(name: str) -> Meter:
    # Process-wide rather than per app: a Meter is immutable and thread-safe, and tests build
    # many apps; loading a vocabulary takes 40-200 ms.
    return Meter.load(name)


class ReplySource:
    """Deterministic replies in one vocabulary, cached by (model, length, seed, choice)."""

    CACHE_SIZE: Final = 4096

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.words = [w for w in _WORDS if meter.count(w) == 1 and meter.count(" " + w) == 1]
        if len(self.words) < 16:
            raise ValueError(f"vocabulary {meter.name!r} has too few one-token words for replies")
        self._cache: OrderedDict[tuple[str, int, int, int], Reply] = OrderedDict()

    def reply(self, model: str, length: int, seed: int, index: int) -> Reply:
        key = (model, length, seed, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        reply = self._generate(model, length, seed, index)
        self._cache[key] = reply
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return reply

    def _generate(self, model: str, length: int, seed: int, index: int) -> Reply:
        # The RNG is seeded without the length, so a capped reply is a prefix of the full one.
        digest = hashlib.blake2b(f"{model}\0{seed}\0{index}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        counter = self.meter.stream_counter()
        pieces: list[str] = []
        counts = [0]
        sentence = 0  # words in the current sentence
        while counts[-1] < length:
            if sentence >= 4 and rng.random() < 0.12:
                piece, sentence = ".", 0
            elif sentence >= 3 and rng.random() < 0.06:
                piece = ","
            else:
                word = rng.choice(self.words)
                piece = word if not pieces else " " + word
                sentence += 1
            # The stream counter is exact for the text fed so far, so counts[k] is the true
            # count of pieces[:k] even if a vocabulary were to merge across a piece boundary.
            total = counter.feed(piece)
            if total > length:
                # Not seen with the shipped vocabularies; stop short rather than exceed the
                # cap (the reported count stays exact).
                break
            pieces.append(piece)
            counts.append(total)
        return Reply("".join(pieces), tuple(pieces), tuple(counts), index)


# -- the ledger ---------------------------------------------------------------------------------


class LedgerEntry(msgspec.Struct, kw_only=True):
    """One request as served. Token fields are what was served (0 for an error response)."""

    # The response id ("chatcmpl-...", "msg_..."), also the x-request-id header (Anthropic's
    # request-id header: "req_" + the id's suffix).
    id: str
    endpoint: str  # "chat.completions", "completions", "embeddings" or "messages"
    model: str = ""
    status: int = 200  # the HTTP status sent; 0 if nothing was sent (stalled before headers)
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0  # for a stream: tokens of the deltas written to the socket
    usage_sent: bool = False  # a usage block (or usage chunk) reached the socket
    disconnected: bool = False  # the client went away before the response was complete
    stalled: bool = False
    stream_error: bool = False  # the stream ended with a mid-stream error event
    # Anthropic's prompt caching (both included in prompt_tokens): tokens read from the cache,
    # and tokens written to it.
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    client_request_id: str | None = None  # the client's x-request-id / x-client-request-id
    time: float = 0.0  # unix seconds when the request arrived


class ModelTotals(msgspec.Struct, kw_only=True):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0


class LedgerTotals(msgspec.Struct, kw_only=True):
    requests: int = 0
    ok: int = 0
    errors: int = 0
    streams: int = 0
    disconnected: int = 0
    prompt_tokens: int = 0  # served
    completion_tokens: int = 0  # served (written to the socket)
    total_tokens: int = 0
    reported_prompt_tokens: int = 0  # as reported in usage blocks that were sent
    reported_completion_tokens: int = 0
    cache_read_tokens: int = 0  # Anthropic prompt caching, served (part of prompt_tokens)
    cache_creation_tokens: int = 0
    count_tokens_requests: int = 0  # /v1/messages/count_tokens answered (free: no entries)


class LedgerView(msgspec.Struct, kw_only=True):
    totals: LedgerTotals
    by_model: dict[str, ModelTotals]
    entries: list[LedgerEntry]
    dropped: int  # entries evicted from the window (still in the totals)
    capacity: int


class Ledger:
    """Every request served: a bounded window of entries and running totals that never drop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: deque[LedgerEntry] = deque(maxlen=capacity)
        self.totals = LedgerTotals()
        self.by_model: dict[str, ModelTotals] = {}
        self.dropped = 0

    def record(self, e: LedgerEntry) -> None:
        if len(self.entries) == self.capacity:
            self.dropped += 1
        self.entries.append(e)
        t = self.totals
        t.requests += 1
        if 200 <= e.status < 300:
            t.ok += 1
        else:
            t.errors += 1
        t.streams += e.stream
        t.disconnected += e.disconnected
        t.prompt_tokens += e.prompt_tokens
        t.completion_tokens += e.completion_tokens
        t.total_tokens += e.prompt_tokens + e.completion_tokens
        t.cache_read_tokens += e.cache_read_tokens
        t.cache_creation_tokens += e.cache_creation_tokens
        if e.usage_sent:
            t.reported_prompt_tokens += e.prompt_tokens
            t.reported_completion_tokens += e.completion_tokens
        if e.model:
            m = self.by_model.get(e.model)
            if m is None:
                m = self.by_model[e.model] = ModelTotals()
            m.requests += 1
            m.prompt_tokens += e.prompt_tokens
            m.completion_tokens += e.completion_tokens
            m.cache_read_tokens += e.cache_read_tokens
            m.cache_creation_tokens += e.cache_creation_tokens

    def reset(self) -> None:
        self.entries.clear()
        self.totals = LedgerTotals()
        self.by_model = {}
        self.dropped = 0

    def view(self, limit: int | None = None) -> LedgerView:
        entries = list(self.entries)
        if limit is not None:
            entries = entries[len(entries) - limit :] if limit else []
        return LedgerView(
            totals=self.totals,
            by_model=self.by_model,
            entries=entries,
            dropped=self.dropped,
            capacity=self.capacity,
        )


# -- the service --------------------------------------------------------------------------------


class Mock:
    """Options, vocabularies, the ledger and the error-injection RNG of one mock server."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.ledger = Ledger(options.ledger_size)
        self._sources: dict[str, ReplySource] = {}
        # One draw per request from one seeded stream: the same request sequence gets the same
        # errors, whatever the per-request rates are.
        self._rng = random.Random(options.seed)
        self._ids = itertools.count(1)
        self._id_tag = os.urandom(3).hex()  # distinguishes ids across restarts

    def preload(self) -> None:
        """Loads the vocabularies the model map names, skipping any not installed."""
        installed = set(Meter.available())
        for name in {self.options.vocab, *self.options.models.values()} - {""}:
            if name in installed:
                self.source(name)
            else:
                log.warning("vocabulary %r is not installed; its models will answer 500", name)

    def source(self, vocab: str) -> ReplySource:
        src = self._sources.get(vocab)
        if src is None:
            try:
                meter = _load_meter(vocab)
            except ValueError as e:  # VocabNotFound / VocabError: unknown or not installed
                raise MockError(
                    500, f"Mock upstream cannot load vocabulary: {e}", type="server_error"
                ) from None
            src = self._sources[vocab] = ReplySource(meter)
        return src

    def begin(self, request: web.Request, endpoint: str, prefix: str) -> LedgerEntry:
        headers = request.headers
        return LedgerEntry(
            id=f"{prefix}{self._id_tag}{next(self._ids):09d}",
            endpoint=endpoint,
            client_request_id=headers.get("x-request-id") or headers.get("x-client-request-id"),
            time=time.time(),
        )

    def knobs(self, request: web.Request) -> MockOptions:
        """Checks the key (OpenAI's way), then applies any ``x-mock-*`` headers."""
        opts = self.options
        if opts.require_key is not None:
            auth = request.headers.get("Authorization")
            if auth is None:
                raise MockError(
                    401,
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    code="invalid_api_key",
                )
            if auth != f"Bearer {opts.require_key}":
                raise MockError(401, "Incorrect API key provided.", code="invalid_api_key")
        return self.overrides(request)

    def overrides(self, request: web.Request) -> MockOptions:
        """The options with any ``x-mock-*`` headers applied (no key check)."""
        opts = self.options
        raw: dict[str, str] | None = None
        for name, value in request.raw_headers:
            if name[:7].lower() == b"x-mock-":
                if raw is None:
                    raw = {}
                raw[name[7:].decode("latin-1").lower().replace("-", "_")] = value.decode("latin-1")
        if raw is None:
            return opts
        try:
            # Lax mode parses header strings as the fields' numbers, booleans and nulls.
            over = msgspec.convert(raw, _Overrides, strict=False)
        except msgspec.ValidationError as e:
            field = str(e).rsplit("`", 2)[-2] if "`" in str(e) else ""
            header = "x-mock-" + field.removeprefix("$.").replace("_", "-")
            raise MockError.invalid(f"Invalid mock header {header}: {e}") from None
        changes = {
            f: getattr(over, f) for f in over.__struct_fields__ if getattr(over, f) is not UNSET
        }
        if "vocab" in changes:
            # x-mock-vocab beats the model map for this request.
            changes["models"] = dict.fromkeys(opts.models, "")
        return msgspec.structs.replace(opts, **changes)

    def source_for(self, model: str, knobs: MockOptions) -> ReplySource:
        vocab = knobs.models.get(model)
        if vocab is None:
            vocab = knobs.models.get(ANY_MODEL)
            if vocab is None:
                raise MockError.model_not_found(model)
        return self.source(vocab or knobs.vocab)

    async def admit(
        self,
        request: web.Request,
        entry: LedgerEntry,
        knobs: MockOptions,
        forced: Callable[[int, str, int], MockError] = MockError.forced,
    ) -> None:
        """Latency, a stall before any byte, then forced or injected errors (`forced` makes
        the error of a status in the dialect's shape)."""
        if knobs.latency_ms:
            await asyncio.sleep(knobs.latency_ms / 1000)
        if knobs.stall == 0:
            entry.status = 0
            await _hold(request, entry)
            raise _Stalled
        draw = self._rng.random()
        status = knobs.status
        if status is None:
            if draw < knobs.error_rate_429:
                status = 429
            elif draw < knobs.error_rate_429 + knobs.error_rate_500:
                status = 500
        if status is not None:
            raise forced(status, entry.model, knobs.retry_after_s)


class _Stalled(Exception):
    """The client went away (from a stall, or mid-stream); there is nothing left to send.
    Carries the response already started, if any, for aiohttp to finish quietly."""

    def __init__(self, response: web.StreamResponse | None = None) -> None:
        super().__init__()
        self.response = response


async def _hold(request: web.Request, entry: LedgerEntry) -> None:
    """Sends nothing until the client closes the connection (or the server stops). aiohttp does
    not cancel handlers on disconnect by default, so this polls the transport."""
    entry.stalled = True
    try:
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(0.05)
    finally:
        # Also when cancelled: by a disconnect under handler_cancellation=True, or at shutdown.
        entry.disconnected = True


MOCK: Final = web.AppKey("mock", Mock)
LEDGER: Final = web.AppKey("mock_ledger", Ledger)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Mock, web.Request, LedgerEntry], Awaitable[web.StreamResponse]]


def _endpoint(endpoint: str, prefix: str, serve: Serve) -> Handler:
    """Wraps a completion-style handler: one ledger entry per request, errors rendered."""

    async def handler(request: web.Request) -> web.StreamResponse:
        mock = request.app[MOCK]
        entry = mock.begin(request, endpoint, prefix)
        try:
            return await serve(mock, request, entry)
        except MockError as e:
            entry.status = e.status
            entry.prompt_tokens = entry.completion_tokens = 0
            entry.usage_sent = False
            return e.response(entry.id)
        except _Stalled as e:
            # aiohttp's ConnectionError on finishing this is expected and handled quietly; 499
            # is nginx's "client closed request", for the access log.
            return e.response if e.response is not None else web.Response(status=499)
        finally:
            mock.ledger.record(entry)

    return handler


async def _read(request: web.Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    body = await request.read()
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise _from_validation(e) from None
    except msgspec.DecodeError:
        raise MockError.bad_json() from None


def _positive(name: str, value: int | None, maximum: int | None = None) -> None:
    if value is not None and value < 1:
        raise MockError.invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value is not None and maximum is not None and value > maximum:
        raise MockError.invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )


def _include_usage(stream: bool, options: _StreamOptions | None) -> bool:
    if options is not None and not stream:
        raise MockError.invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    return bool(options is not None and options.include_usage)


def _length(knobs: MockOptions, cap: int | None) -> tuple[int, str]:
    """Reply length and finish_reason: capped by max_tokens means "length"."""
    target = knobs.completion_tokens
    if cap is not None and cap < target:
        return cap, "length"
    return target, "stop"


async def _chat(mock: Mock, request: web.Request, entry: LedgerEntry) -> web.StreamResponse:
    knobs = mock.knobs(request)
    req: _ChatRequest = await _read(request, _CHAT_DECODER)
    entry.model = req.model
    stream = bool(req.stream)
    include_usage = _include_usage(stream, req.stream_options)
    if not req.messages:
        raise MockError.invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    n = req.n if req.n is not None else 1
    _positive("n", n, _MAX_N)
    _positive("max_tokens", req.max_tokens)
    _positive("max_completion_tokens", req.max_completion_tokens)
    caps = [c for c in (req.max_tokens, req.max_completion_tokens) if c is not None]
    source = mock.source_for(req.model, knobs)
    if req.tools is not None or req.reasoning_effort is not None or req.model in REASONING_MODELS:
        cap = min(caps) if caps else None
        return await _rich_chat(mock, request, entry, knobs, req, source, cap, include_usage)
    try:
        prompt_tokens = source.meter.count_messages(req.messages)
    except TypeError as e:
        raise MockError.invalid(f"Invalid 'messages': {e}", param="messages") from None
    length, finish = _length(knobs, min(caps) if caps else None)
    seed = req.seed if req.seed is not None else knobs.seed
    replies = [source.reply(req.model, length, seed, i) for i in range(n)]
    entry.prompt_tokens = prompt_tokens
    entry.stream = stream
    await mock.admit(request, entry, knobs)

    completion_tokens = sum(r.tokens for r in replies)
    usage = ChatUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    created = int(time.time())
    if not stream:
        body = _ChatCompletion(
            id=entry.id,
            created=created,
            model=req.model,
            choices=[
                _Choice(index=i, message=_Message(content=r.text), finish_reason=finish)
                for i, r in enumerate(replies)
            ],
            usage=UNSET if knobs.omit_usage else usage,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        entry.completion_tokens = completion_tokens
        return await _send_json(
            request, entry, knobs, _encode(body), usage_sent=not knobs.omit_usage
        )

    def chat_envelope(u: ChatUsage | UnsetType | None) -> _ChatChunk:
        return _ChatChunk(
            id=entry.id,
            created=created,
            model=req.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[],
            usage=u,
        )

    return await _stream_reply(
        request,
        entry,
        knobs,
        replies,
        usage if include_usage else None,
        chat_envelope,
        first=[_ChunkChoice(index=i, delta=_Delta(role="assistant", content="")) for i in range(n)],
        deltas=[r.chat_deltas() for r in replies],
        last=[_ChunkChoice(index=i, delta=_EMPTY_DELTA, finish_reason=finish) for i in range(n)],
    )


def _chat_tool(req: _ChatRequest, knobs: MockOptions) -> tuple[str, Any] | None:
    """The function a chat reply calls, as (name, parameters schema), or None for text."""
    defs: list[tuple[str, Any]] = []
    for i, t in enumerate(req.tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            param = f"tools[{i}].function.name"
            raise MockError.invalid(
                f"Missing required parameter: '{param}'.",
                param=param,
                code="missing_required_parameter",
            )
        defs.append((name, fn.get("parameters") if isinstance(fn, dict) else None))
    choice = req.tool_choice
    if choice is None or choice == "auto":
        last = req.messages[-1]
        if defs and knobs.tool_calls == "auto" and last.get("role") != "tool":
            return defs[0]
        return None
    if not defs:
        raise MockError.invalid(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            param="tool_choice",
        )
    if choice == "none":
        return None
    if choice == "required":
        return defs[0]
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name is None:
        raise MockError.invalid(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    for d in defs:
        if d[0] == name:
            return d
    raise MockError.invalid(
        f"Invalid 'tool_choice': no function named {name!r} in 'tools'.", param="tool_choice"
    )


async def _rich_chat(
    mock: Mock,
    request: web.Request,
    entry: LedgerEntry,
    knobs: MockOptions,
    req: _ChatRequest,
    source: ReplySource,
    cap: int | None,
    include_usage: bool,
) -> web.StreamResponse:
    """A chat reply with tool calls or reasoning.

    Reasoning (`reasoning_content`, DeepSeek's field) comes first in every choice: the
    deterministic text of ``completion_tokens`` tokens (capped by the output cap), counted in
    completion_tokens and in completion_tokens_details.reasoning_tokens. Then either a tool
    call (id ``call_...``, arguments from `tools.generate`, finish_reason "tool_calls",
    ``count(name) + count(arguments)`` tokens; a call that does not fit in what the cap leaves
    is not made) or the text, capped by what the reasoning left of the cap. With tools, the
    prompt also counts the JSON text of the `tools` list."""
    meter = source.meter
    stream = bool(req.stream)
    n = req.n if req.n is not None else 1
    try:
        prompt_tokens = meter.count_messages(req.messages)
    except TypeError as e:
        raise MockError.invalid(f"Invalid 'messages': {e}", param="messages") from None
    if req.tools:
        prompt_tokens += meter.count(_encode(req.tools).decode())
    call = _chat_tool(req, knobs)
    seed = req.seed if req.seed is not None else knobs.seed
    reasoning = req.model in REASONING_MODELS or req.reasoning_effort not in (None, "none")
    target = knobs.completion_tokens
    think = (target if cap is None else min(target, cap)) if reasoning else 0
    room = None if cap is None else cap - think
    name, args, frags, name_tokens, arg_counts = "", "", [], 0, [0]
    if call is not None:
        name = call[0]
        args = tools.arguments(tools.generate(call[1], source.words, name, seed))
        frags = tools.fragments(args)
        name_tokens = meter.count(name)
        counter = meter.stream_counter()
        arg_counts = [0, *(counter.feed(f) for f in frags)]
        if room is not None and name_tokens + arg_counts[-1] > room:
            call = None
    length, finish = _length(knobs, room)
    if call is not None:
        finish = "tool_calls"
    entry.prompt_tokens = prompt_tokens
    entry.stream = stream
    await mock.admit(request, entry, knobs)

    thoughts = [source.reply(req.model + "\0reasoning", think, seed, i) for i in range(n)]
    texts = [source.reply(req.model, length, seed, i) for i in range(n)] if call is None else []
    call_id = "call_" + entry.id.removeprefix("chatcmpl-")
    ids = [call_id if n == 1 else f"{call_id}_{i}" for i in range(n)]
    counts: list[Counts] = []
    for i, th in enumerate(thoughts):
        t = th.tokens
        tail = (
            [name_tokens, *(name_tokens + c for c in arg_counts[1:])]
            if call
            else texts[i].counts[1:]
        )
        counts.append(Counts((*th.counts, *(t + c for c in tail))))
    completion_tokens = sum(c.tokens for c in counts)
    usage = ChatUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        completion_tokens_details=_CompletionDetails(
            reasoning_tokens=sum(th.tokens for th in thoughts)
        ),
    )
    created = int(time.time())
    if not stream:
        choices = [
            _RichChoice(
                index=i,
                message=_RichMessage(
                    content=None if call else texts[i].text,
                    reasoning_content=thoughts[i].text if reasoning else UNSET,
                    tool_calls=[
                        _ToolCall(
                            id=ids[i],
                            type="function",
                            function=_Function(name=name, arguments=args),
                        )
                    ]
                    if call
                    else UNSET,
                ),
                finish_reason=finish,
            )
            for i in range(n)
        ]
        body = _ChatCompletion(
            id=entry.id,
            created=created,
            model=req.model,
            choices=choices,
            usage=UNSET if knobs.omit_usage else usage,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        entry.completion_tokens = completion_tokens
        return await _send_json(
            request, entry, knobs, _encode(body), usage_sent=not knobs.omit_usage
        )

    def delta(i: int, d: _RichDelta) -> bytes:
        return _encode(_RichChunkChoice(index=i, delta=d))

    deltas: list[tuple[bytes, ...]] = []
    for i in range(n):
        parts = [delta(i, _RichDelta(reasoning_content=p)) for p in thoughts[i].pieces]
        if call:
            start = _ToolCall(
                index=0, id=ids[i], type="function", function=_Function(name=name, arguments="")
            )
            parts.append(delta(i, _RichDelta(tool_calls=[start])))
            parts += [
                delta(
                    i, _RichDelta(tool_calls=[_ToolCall(index=0, function=_Function(arguments=f))])
                )
                for f in frags
            ]
        else:
            parts += [delta(i, _RichDelta(content=p)) for p in texts[i].pieces]
        deltas.append(tuple(parts))

    def chat_envelope(u: ChatUsage | UnsetType | None) -> _ChatChunk:
        return _ChatChunk(
            id=entry.id,
            created=created,
            model=req.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[],
            usage=u,
        )

    return await _stream_reply(
        request,
        entry,
        knobs,
        counts,
        usage if include_usage else None,
        chat_envelope,
        first=[
            _RichChunkChoice(
                index=i, delta=_RichDelta(role="assistant", content=None if call else "")
            )
            for i in range(n)
        ],
        deltas=deltas,
        last=[
            _RichChunkChoice(index=i, delta=_RichDelta(), finish_reason=finish) for i in range(n)
        ],
    )


async def _stream_reply(
    request: web.Request,
    entry: LedgerEntry,
    knobs: MockOptions,
    replies: Sequence[Counted],
    usage: Any,
    envelope: Callable[[Any], msgspec.Struct],
    *,
    first: list[Any],
    deltas: list[Any],
    last: list[Any],
) -> web.StreamResponse:
    """The SSE reply shared by chat and legacy completions: `first` choices (the role chunk),
    the text deltas, `last` choices (finish reasons), then the usage chunk when `usage` is
    given (the client asked for it) and the mock does not omit it, then [DONE]. `envelope(u)`
    is the chunk object with no choices and `usage=u`."""
    send_usage = usage is not None and not knobs.omit_usage
    pre, post = _framing(_encode(envelope(None if send_usage else UNSET)))
    events: list[_Event] = [(pre + _encode(c) + post, -1, 0) for c in first]
    _add_deltas(events, deltas, pre, post)
    events.extend((pre + _encode(c) + post, -1, -1) for c in last)
    if send_usage:
        events.append((b"data: " + _encode(envelope(usage)) + b"\n\n", _USAGE, -1))
    events.append((_SSE_DONE, -1, -1))
    return await _stream(request, entry, knobs, events, replies)


def _prompt_tokens(meter: Meter, prompt: str | list[Any]) -> tuple[int, int]:
    """(tokens, number of prompts) of a legacy prompt: a string, strings, or token arrays."""
    if isinstance(prompt, str):
        return meter.count(prompt), 1
    if not prompt:
        raise MockError.invalid("Invalid 'prompt': empty array.", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return sum(meter.count_batch(prompt)), len(prompt)
    if all(isinstance(p, int) for p in prompt):
        return len(prompt), 1
    if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        return sum(len(p) for p in prompt), len(prompt)
    raise MockError.invalid(
        "Invalid 'prompt': expected a string, an array of strings, an array of tokens, "
        "or an array of token arrays.",
        param="prompt",
    )


async def _text(mock: Mock, request: web.Request, entry: LedgerEntry) -> web.StreamResponse:
    knobs = mock.knobs(request)
    req: _TextRequest = await _read(request, _TEXT_DECODER)
    entry.model = req.model
    stream = bool(req.stream)
    include_usage = _include_usage(stream, req.stream_options)
    n = req.n if req.n is not None else 1
    _positive("n", n, _MAX_N)
    _positive("max_tokens", req.max_tokens)
    source = mock.source_for(req.model, knobs)
    prompt_tokens, prompts = _prompt_tokens(source.meter, req.prompt)
    cap = req.max_tokens if req.max_tokens is not None else _LEGACY_DEFAULT_MAX_TOKENS
    length, finish = _length(knobs, cap)
    seed = req.seed if req.seed is not None else knobs.seed
    # OpenAI returns n choices per prompt, indexed prompt-major.
    replies = [source.reply(req.model, length, seed, i) for i in range(prompts * n)]
    entry.prompt_tokens = prompt_tokens
    entry.stream = stream
    await mock.admit(request, entry, knobs)

    completion_tokens = sum(r.tokens for r in replies)
    usage = TextUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    created = int(time.time())
    if not stream:
        body = _TextCompletion(
            id=entry.id,
            created=created,
            model=req.model,
            choices=[
                _TextChoice(text=r.text, index=i, finish_reason=finish)
                for i, r in enumerate(replies)
            ],
            usage=UNSET if knobs.omit_usage else usage,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        entry.completion_tokens = completion_tokens
        return await _send_json(
            request, entry, knobs, _encode(body), usage_sent=not knobs.omit_usage
        )

    def text_envelope(u: TextUsage | UnsetType | None) -> _TextCompletion:
        return _TextCompletion(
            id=entry.id,
            created=created,
            model=req.model,
            choices=[],
            usage=u,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    return await _stream_reply(
        request,
        entry,
        knobs,
        replies,
        usage if include_usage else None,
        text_envelope,
        first=[],
        deltas=[r.text_deltas() for r in replies],
        last=[_TextChoice(text="", index=i, finish_reason=finish) for i in range(len(replies))],
    )


def _embedding(text: str, model: str, dim: int) -> list[float]:
    """A deterministic unit vector for (model, text)."""
    digest = hashlib.blake2b(f"{model}\0{text}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


async def _embeddings(mock: Mock, request: web.Request, entry: LedgerEntry) -> web.StreamResponse:
    knobs = mock.knobs(request)
    req: _EmbeddingRequest = await _read(request, _EMBEDDING_DECODER)
    entry.model = req.model
    _positive("dimensions", req.dimensions, 8192)
    fmt = req.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise MockError.invalid(
            f"Invalid 'encoding_format': expected 'float' or 'base64', got {fmt!r}.",
            param="encoding_format",
        )
    source = mock.source_for(req.model, knobs)
    inputs: list[Any] = [req.input] if isinstance(req.input, str) else req.input
    if not inputs:
        raise MockError.invalid("Invalid 'input': empty array.", param="input")
    if all(isinstance(x, int) for x in inputs):
        inputs = [inputs]  # one token array
    texts: list[str] = []
    tokens = 0
    for x in inputs:
        if isinstance(x, str):
            texts.append(x)
            tokens += source.meter.count(x)
        elif isinstance(x, list) and all(isinstance(t, int) for t in x):
            texts.append(" ".join(map(str, x)))
            tokens += len(x)
        else:
            raise MockError.invalid(
                "Invalid 'input': expected a string, an array of strings, an array of tokens, "
                "or an array of token arrays.",
                param="input",
            )
    entry.prompt_tokens = tokens
    await mock.admit(request, entry, knobs)

    dim = req.dimensions or knobs.embedding_dim
    data = []
    for i, text in enumerate(texts):
        vec = _embedding(text, req.model, dim)
        value: list[float] | str = vec
        if fmt == "base64":
            value = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode("ascii")
        data.append(_Embedding(index=i, embedding=value))
    body = _EmbeddingList(
        data=data,
        model=req.model,
        usage=UNSET
        if knobs.omit_usage
        else EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
    return await _send_json(request, entry, knobs, _encode(body), usage_sent=not knobs.omit_usage)


async def _send_json(
    request: web.Request,
    entry: LedgerEntry,
    knobs: MockOptions,
    body: bytes,
    *,
    usage_sent: bool,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """A JSON reply with the request id header (`headers`, default ``x-request-id``)."""
    if headers is None:
        headers = {"x-request-id": entry.id}
    if knobs.stall is None:
        entry.usage_sent = usage_sent
        return web.Response(body=body, content_type="application/json", headers=headers)
    # Stall after the headers: the client has a status and a Content-Length, never the body.
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/json"
    resp.content_length = len(body)
    entry.completion_tokens = 0
    with contextlib.suppress(ConnectionResetError):
        await resp.prepare(request)
    await _hold(request, entry)
    raise _Stalled(resp)


# A stream is a list of SSE events: (bytes, choice, step). `choice` >= 0 marks a content delta
# of that choice (its written deltas count towards the ledger), _USAGE the usage chunk, -1
# anything else; `step` is the token position of a delta, which paces the stream.
_Event = tuple[bytes, int, int]
_USAGE: Final = -2


def _framing(template: bytes) -> tuple[bytes, bytes]:
    """An encoded chunk with ``"choices":[]``, split into the SSE event's bytes before and after
    one choice: a chunk is then two concatenations around a cached choice, not an encode (a
    32-token stream took 32 us to encode chunk by chunk, under 8 us this way). JSON escapes quotes
    inside strings, so the first ``"choices":[`` is the key."""
    cut = template.index(b'"choices":[') + len(b'"choices":[')
    return b"data: " + template[:cut], template[cut:] + b"\n\n"


def _add_deltas(
    events: list[_Event], deltas: list[tuple[bytes, ...]], pre: bytes, post: bytes
) -> None:
    """Content deltas, interleaved across choices position by position, as OpenAI sends them."""
    longest = max((len(d) for d in deltas), default=0)
    for step in range(longest):
        for i, d in enumerate(deltas):
            if step < len(d):
                events.append((pre + d[step] + post, i, step))


_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}


class Counted(Protocol):
    """What the ledger needs of a choice (or an Anthropic content block) in a stream: the
    exact token count after each of its counted events."""

    @property
    def counts(self) -> tuple[int, ...]: ...

    @property
    def tokens(self) -> int: ...


@dataclass(slots=True, frozen=True)
class Counts:
    """Counted events' running token counts: counts[k] after k of them (counts[0] = 0)."""

    counts: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.counts[-1]


async def _stream(
    request: web.Request,
    entry: LedgerEntry,
    knobs: MockOptions,
    events: list[_Event],
    replies: Sequence[Counted],
    headers: Mapping[str, str] | None = None,
    error_event: bytes = b"",
) -> web.StreamResponse:
    """Writes the events, paced at `tokens_per_second` token positions per second and cut at
    `stall` (or at `stream_error_after`, with `error_event`, default OpenAI's); unpaced events
    go out in one write. The ledger gets what reached the socket. `headers` carry the request
    id (default ``x-request-id``)."""
    resp = web.StreamResponse(headers={**_SSE_HEADERS, **(headers or {"x-request-id": entry.id})})
    whole = True
    cut = knobs.stream_error_after
    if cut is not None and cut < len(events):
        events = [*events[:cut], (error_event or _SSE_STREAM_ERROR, -1, -1)]
        whole = False
        entry.stream_error = True
    sent = 0  # events written so far
    end = len(events) if knobs.stall is None else min(knobs.stall, len(events))
    tps = knobs.tokens_per_second
    try:
        await resp.prepare(request)
        if knobs.ttft_ms:
            await asyncio.sleep(knobs.ttft_ms / 1000)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        step = 0
        for k in range(end):
            s = events[k][2]
            if tps > 0 and s > step:
                step = s
                if k > sent:
                    await resp.write(b"".join(e[0] for e in events[sent:k]))
                    sent = k
                delay = t0 + s / tps - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        if end < len(events):
            if end > sent:
                await resp.write(b"".join(e[0] for e in events[sent:end]))
                sent = end
            await _hold(request, entry)
        else:
            # The rest and the terminating chunk in one write.
            await resp.write_eof(b"".join(e[0] for e in events[sent:]))
            sent = len(events)
    except ConnectionResetError:
        entry.disconnected = True
    except asyncio.CancelledError:
        # Only with handler_cancellation=True (or at shutdown): the stream is incomplete.
        entry.disconnected = True
        raise
    finally:
        _account(entry, events, sent, replies, whole)
    if entry.disconnected:
        raise _Stalled(resp)
    return resp


def _account(
    entry: LedgerEntry,
    events: list[_Event],
    sent: int,
    replies: Sequence[Counted],
    whole: bool = True,
) -> None:
    """The ledger's completion tokens: the exact count of each choice's written deltas."""
    if whole and sent == len(events):
        entry.completion_tokens = sum(r.tokens for r in replies)
        entry.usage_sent = any(e[1] == _USAGE for e in events)
        return
    written = [0] * len(replies)
    usage_sent = False
    for _, choice, _ in events[:sent]:
        if choice >= 0:
            written[choice] += 1
        elif choice == _USAGE:
            usage_sent = True
    entry.completion_tokens = sum(r.counts[w] for r, w in zip(replies, written, strict=True))
    entry.usage_sent = usage_sent


# -- routes -------------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    mock = request.app[MOCK]
    mock.knobs(request)  # the key check
    models = [_Model(id=m) for m in mock.options.models if m != ANY_MODEL]
    return web.Response(body=_encode(_ModelList(data=models)), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    mock = request.app[MOCK]
    mock.knobs(request)
    model = request.match_info["model"]
    if model not in mock.options.models and ANY_MODEL not in mock.options.models:
        raise MockError.model_not_found(model)
    return web.Response(body=_encode(_Model(id=model)), content_type="application/json")


async def ledger_get(request: web.Request) -> web.Response:
    limit_arg = request.query.get("limit")
    limit = None
    if limit_arg is not None:
        if not limit_arg.isdigit():
            raise MockError.invalid("'limit' must be a non-negative integer.", param="limit")
        limit = int(limit_arg)
    view = request.app[LEDGER].view(limit)
    return web.Response(body=_encode(view), content_type="application/json")


async def ledger_reset(request: web.Request) -> web.Response:
    request.app[LEDGER].reset()
    return web.Response(body=b'{"ok":true}', content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """MockError and aiohttp's own errors (unknown path, wrong method, too large) as OpenAI's
    error body."""
    try:
        return await handler(request)
    except MockError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            err = MockError(404, f"Invalid URL ({request.method} {request.path})")
        elif e.status == 413:
            err = MockError(413, "Request body too large.", code="request_too_large")
        else:
            err = MockError(e.status, e.reason or "HTTP error")
        return err.response()


def build_app(options: MockOptions | None = None) -> web.Application:
    """The mock upstream application. Raises ValueError for invalid options (an unknown
    vocabulary name, a rate outside [0, 1], ...)."""
    options = _validated(options or MockOptions())
    mock = Mock(options)
    # Long prompts are the point of some benchmarks; OpenAI itself accepts large bodies.
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_errors])
    app[MOCK] = mock
    app[LEDGER] = mock.ledger

    async def vocabularies(app: web.Application) -> Any:
        # Load before serving so the first request of a benchmark does not pay for it.
        await asyncio.get_running_loop().run_in_executor(None, mock.preload)
        yield

    app.cleanup_ctx.append(vocabularies)
    r = app.router
    r.add_post("/v1/chat/completions", _endpoint("chat.completions", "chatcmpl-", _chat))
    r.add_post("/v1/completions", _endpoint("completions", "cmpl-", _text))
    r.add_post("/v1/embeddings", _endpoint("embeddings", "emb-", _embeddings))
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
    r.add_get("/mock/ledger", ledger_get)
    r.add_post("/mock/reset", ledger_reset)
    # Imported here: the Messages module builds on this one's pieces.
    from tokenhub.mock import anthropic

    anthropic.add_routes(app)
    return app
