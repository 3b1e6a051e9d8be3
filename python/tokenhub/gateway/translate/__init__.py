"""Which translation a request needs: its client dialect against its upstream's wire.

`exchange(dialect, wire)` is the request path's one question about dialects: a dict lookup
after the first request of each pair. The answer, an `Exchange`, is either passthrough (the
client's dialect is the wire's: nothing is translated, and the request path skips every call)
or a `Translation` (`translate.base`), one module per dialect pair:

- ("anthropic", "openai"): `anthropic_chat.MessagesOverChat`;
- ("openai", "anthropic"): `anthropic_chat.ChatOverMessages` (chat completions only: the
  legacy completions and embeddings have no Messages API counterpart, a 400);
- ("responses", "openai"): `responses_chat.ResponsesOverChat`;
- ("responses", "anthropic"): `compose.Composed(ResponsesOverChat(), ChatOverMessages())`.

No upstream wire speaks the Responses API, so a Responses request is always translated.
The translation modules are imported on first use of their pair, so a gateway serving only
OpenAI chat never loads them.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import ANTHROPIC_MESSAGES, CHAT, Endpoint
from tokenhub.gateway.translate.base import StreamOut, Translation
from tokenhub.gateway.translate.compose import Composed
from tokenhub.gateway.translate.passthrough import Passthrough
from tokenhub.usage import UsageEvent

# The endpoint a translated request is sent to, by the upstream's wire.
_UPSTREAM_ENDPOINT = {"openai": CHAT, "anthropic": ANTHROPIC_MESSAGES}


class Exchange:
    """One (client dialect, upstream wire) pair: passthrough, or its translation."""

    __slots__ = ("client", "passthrough", "translation", "upstream", "upstream_endpoint")

    def __init__(self, client: str, upstream: str, translation: Translation | None) -> None:
        self.client = client
        self.upstream = upstream
        self.passthrough = translation is None
        self.translation: Translation = translation or Passthrough(client)
        # Where a translated request goes (None: the client's own endpoint).
        self.upstream_endpoint: Endpoint | None = (
            None if translation is None else _UPSTREAM_ENDPOINT[upstream]
        )

    def endpoint(self, client_endpoint: Endpoint) -> Endpoint:
        """The upstream endpoint a request to `client_endpoint` is sent to."""
        return self.upstream_endpoint or client_endpoint

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.translation.request(payload)

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        return self.translation.reply(body, event)

    def stream(self, event: UsageEvent, include_usage: bool) -> StreamOut:
        return self.translation.stream(event, include_usage)

    def error(self, status: int, body: bytes) -> bytes:
        return self.translation.error(status, body)


def _load(module: str, name: str) -> Translation:
    cls = getattr(importlib.import_module(f"tokenhub.gateway.translate.{module}"), name)
    translation: Translation = cls()
    return translation


def _make(client: str, upstream: str) -> Exchange:
    if client == upstream:
        return Exchange(client, upstream, None)
    pair = (client, upstream)
    if pair == ("anthropic", "openai"):
        t = _load("anthropic_chat", "MessagesOverChat")
    elif pair == ("openai", "anthropic"):
        t = _load("anthropic_chat", "ChatOverMessages")
    elif pair == ("responses", "openai"):
        t = _load("responses_chat", "ResponsesOverChat")
    elif pair == ("responses", "anthropic"):
        t = Composed(
            _load("responses_chat", "ResponsesOverChat"),
            _load("anthropic_chat", "ChatOverMessages"),
        )
    else:
        raise ApiError(
            400,
            f"Requests in the {client} dialect cannot be sent to an upstream speaking {upstream}.",
        )
    return Exchange(client, upstream, t)


_EXCHANGES: dict[tuple[str, str], Exchange] = {}


def exchange(dialect: str, wire: str) -> Exchange:
    """The exchange of a client `dialect` with an upstream `wire` (made once per pair)."""
    ex = _EXCHANGES.get((dialect, wire))
    if ex is None:
        ex = _EXCHANGES[(dialect, wire)] = _make(dialect, wire)
    return ex


__all__ = ["Exchange", "StreamOut", "Translation", "exchange"]
