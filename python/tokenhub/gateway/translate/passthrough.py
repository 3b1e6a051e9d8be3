"""Passthrough: a client dialect over an upstream that speaks it (OpenAI chat over an OpenAI
upstream, the Messages API over an Anthropic one).

The client's body goes upstream with only `model`, the output cap and (OpenAI streams) the
usage request changed (`Provider.request_body`); the reply and the stream's events go back byte
for byte, and the upstream's error bodies as it wrote them. `Passthrough` is that as a
`Translation` (the identity), for code that composes translations; the request path does not
call it: it checks `Exchange.passthrough` and skips the calls, so a passed-through request
costs what it cost before translations existed.
"""

from __future__ import annotations

from typing import Any

from tokenhub.usage import UsageEvent


class PassthroughStream:
    """A stream passed through: the upstream's events as they came."""

    __slots__ = ()

    def feed(self, events: bytes) -> bytes:
        return events

    def end(self, event: UsageEvent) -> bytes:
        return b""


class Passthrough:
    """The identity translation for a dialect its upstream speaks."""

    def __init__(self, dialect: str) -> None:
        self.client = self.upstream = dialect

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        return body

    def stream(self, event: UsageEvent, include_usage: bool) -> PassthroughStream:
        return PassthroughStream()

    def error(self, status: int, body: bytes) -> bytes:
        return body
