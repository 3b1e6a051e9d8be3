"""The client's request, decoded and validated once.

`ParsedRequest.parse` reads the body (JSON, via msgspec) and checks every field the gateway
relies on, in the order a client would fix them: the body, `model`, `stream` and
`stream_options`, the prompt (`messages`, `prompt` or `input`), then the output cap and the
number of choices. Everything downstream (tier scoring, affinity, metering, admission, what is
sent upstream) reads this object, never the payload dict; the payload itself is kept only to be
forwarded (`providers`). Unknown fields are passed through as the client sent them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from tokenhub.config import Model
from tokenhub.gateway.errors import ApiError


@dataclass(frozen=True, eq=False)
class Endpoint:
    name: str  # as recorded on usage events
    streams: bool
    # The client's dialect (tokenhub.gateway.dialects): "openai" (chat completions,
    # completions, embeddings), "anthropic" (the Messages API), "responses" (OpenAI's
    # Responses API). Errors and streams are written to the client in it.
    dialect: str = "openai"


CHAT = Endpoint("chat.completions", True)
COMPLETIONS = Endpoint("completions", True)
EMBEDDINGS = Endpoint("embeddings", False)
ANTHROPIC_MESSAGES = Endpoint("messages", True, "anthropic")
RESPONSES = Endpoint("responses", True, "responses")

MAX_CHOICES = 128  # OpenAI's bound on n (and best_of)
MODEL_ID_CHARS = 256  # of an unknown model's name, as recorded on its refusal's event
PREFIX_CHARS = 4096  # of the opening messages that identify a conversation

# How the prompt is given (what metering counts): chat messages, one text, a batch of texts,
# token ids, a batch of token-id arrays.
MESSAGES, TEXT, TEXTS, IDS, ID_BATCHES = range(5)

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class ParsedRequest:
    """One request. `model_id` and `stream` are set as soon as they are read, so a request
    refused part-way still records what it named (`RequestContext.refuse`)."""

    __slots__ = (
        "cap_keys",
        "caps",
        "choices",
        "endpoint",
        "include_usage",
        "model_id",
        "options",
        "payload",
        "prompt",
        "prompt_kind",
        "prompts",
        "stream",
        "tools_text",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.payload: dict[str, Any] = {}
        self.model_id: str | None = None  # as the client named it (when a string)
        self.stream = False
        self.options: dict[str, Any] | None = None  # stream_options
        self.include_usage = False  # a stream whose client asked for the usage chunk
        self.prompt: Any = None  # messages, or the prompt/input value
        self.prompt_kind = MESSAGES
        self.prompts = 1  # prompts in a legacy completions batch (n choices for each)
        self.cap_keys: tuple[str, ...] = ()  # max_tokens, max_completion_tokens: those sent
        self.caps: tuple[int, ...] = ()  # their values
        self.choices = 1  # n, or best_of when larger (0 for embeddings)
        # The request's tool definitions as JSON text ("" without tools): what they add to
        # the prompt, for admission's worst case.
        self.tools_text = ""

    def parse(self, body: bytes, models: Mapping[str, Model]) -> Model:
        """Decodes and checks `body`; the model it names. Raises ApiError (400, 404)."""
        payload = self.take_body(body)
        model = self.take_model(
            models, ApiError.bad_request("You must provide a model parameter.", param="model")
        )
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError.bad_request("'stream' must be a boolean.", param="stream")
        self.stream = stream
        endpoint = self.endpoint
        if stream and not endpoint.streams:
            raise ApiError.bad_request("This endpoint does not stream.", param="stream")
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError.bad_request(
                "'stream_options' must be an object.", param="stream_options"
            )
        self.options = options
        self.include_usage = bool(stream and options and options.get("include_usage"))
        self._parse_prompt(payload)
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            self.prompts = len(prompt)
        if endpoint is EMBEDDINGS:
            self.choices = 0  # embeddings produce no output; their caps are not read
        else:
            self._parse_caps(payload)
        return model

    # -- what every dialect's parse starts with ----------------------------------------------

    def take_body(self, body: bytes) -> dict[str, Any]:
        """The body as a JSON object, kept as `payload`; else the 400 every dialect gives."""
        try:
            payload = _decode(body)
        except RecursionError:
            raise ApiError.bad_request(
                "The JSON body of your request is nested too deeply."
            ) from None
        except msgspec.DecodeError:
            raise ApiError.bad_request(
                "We could not parse the JSON body of your request. The body must be valid JSON."
            ) from None
        if not isinstance(payload, dict):
            raise ApiError.bad_request("The request body must be a JSON object.")
        self.payload = payload
        return payload

    def take_model(self, models: Mapping[str, Model], missing: ApiError) -> Model:
        """The configured model the payload names (`model_id` set as soon as it is a string,
        for a refusal's event); `missing` when it names none, 404 when it is not configured."""
        model_id = self.payload.get("model")
        if isinstance(model_id, str):
            self.model_id = model_id
        if not isinstance(model_id, str) or not model_id:
            raise missing
        model = models.get(model_id)
        if model is None:
            raise ApiError.model_not_found(model_id)
        return model

    def _parse_prompt(self, payload: dict[str, Any]) -> None:
        if self.endpoint is CHAT:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError.bad_request(
                    "'messages' must be a non-empty array of message objects.", param="messages"
                )
            self.prompt, self.prompt_kind = messages, MESSAGES
            # The tool definitions join the prompt upstream: admission reserves them too.
            tools = payload.get("tools") or payload.get("functions")
            if tools:
                self.tools_text = _encode(tools).decode()
            return
        key = "prompt" if self.endpoint is COMPLETIONS else "input"
        value = payload.get(key)
        if isinstance(value, str):
            kind = TEXT
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            kind = TEXTS
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            kind = IDS
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value)
        ):
            kind = ID_BATCHES
        else:
            raise ApiError.bad_request(
                f"'{key}' must be a string or an array of strings.", param=key
            )
        self.prompt, self.prompt_kind = value, kind

    def _parse_caps(self, payload: dict[str, Any]) -> None:
        keys: list[str] = []
        caps: list[int] = []
        for key in ("max_tokens", "max_completion_tokens"):
            asked = payload.get(key)
            if asked is None:
                continue
            if not isinstance(asked, int) or isinstance(asked, bool) or asked < 0:
                raise ApiError.bad_request(f"'{key}' must be a non-negative integer.", param=key)
            keys.append(key)
            caps.append(asked)
        self.cap_keys, self.caps = tuple(keys), tuple(caps)
        choices = 1
        for key in ("n", "best_of"):
            asked = payload.get(key)
            if asked is None:
                continue
            if (
                not isinstance(asked, int)
                or isinstance(asked, bool)
                or not 1 <= asked <= MAX_CHOICES
            ):
                raise ApiError.bad_request(
                    f"'{key}' must be an integer from 1 to {MAX_CHOICES}.", param=key
                )
            choices = max(choices, asked)
        self.choices = choices

    # -- what the gateway derives from it -------------------------------------------------------

    def output_cap(self, default: int) -> int:
        """The most output one choice may produce: the smallest of max_tokens,
        max_completion_tokens and `default` (a deployment's max_output_tokens, the assumption
        when the request sets neither)."""
        return min(default, *self.caps) if self.caps else default

    def max_output(self, default: int) -> int:
        """The most output the request may produce, all choices together (the worst case
        admission reserves): the choices are n, or best_of when larger (the upstream
        generates, and bills, all of them). Embeddings produce none."""
        return self.output_cap(default) * self.choices

    def output_bound(self, sent_cap: int | None, default: int) -> int:
        """The most output the request as sent upstream allows (what its usage is checked
        against): prompts x choices x the cap sent (`sent_cap`), else the larger of the
        client's caps (an upstream honours one), else `default`."""
        if self.endpoint is EMBEDDINGS:
            return 0
        if sent_cap is None:
            sent_cap = max(self.caps) if self.caps else default
        return self.prompts * self.choices * sent_cap

    def tier_input(self) -> tuple[str, int, bool]:
        """What the tier scorer reads: the latest user turn's text, the prior turns, tool use."""
        payload = self.payload
        tools = bool(payload.get("tools") or payload.get("functions"))
        if self.prompt_kind != MESSAGES:
            prompt = payload.get("prompt", payload.get("input"))
            return (prompt if isinstance(prompt, str) else ""), 0, tools
        turns = [
            m for m in self.prompt if isinstance(m, dict) and m.get("role") in ("user", "assistant")
        ]
        text = ""
        for m in reversed(turns):
            if m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, str):
                    text = c
                elif isinstance(c, list):
                    text = " ".join(
                        p.get("text", "")
                        for p in c
                        if isinstance(p, dict) and p.get("type") == "text"
                    )
                break
        return text, max(0, len(turns) - 1), tools

    def opening(self) -> str | None:
        """The conversation's opening (the system prompt and first user turn, which every
        later turn repeats), for prefix affinity; None for a request without messages."""
        if self.prompt_kind != MESSAGES:
            return None
        parts: list[str] = []
        for m in self.prompt[:2]:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
        opening = "\x00".join(parts)
        return opening[:PREFIX_CHARS] if opening else None

    def named_model(self) -> str:
        """The model as the client named it, bounded, for a refused request's event."""
        return self.model_id[:MODEL_ID_CHARS] if self.model_id else ""
