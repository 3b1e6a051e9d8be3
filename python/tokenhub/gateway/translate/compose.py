"""Two translations in a row: a dialect pair without a module of its own.

The Responses API over an Anthropic upstream is Responses -> chat (`ResponsesOverChat`) then
chat -> Messages (`ChatOverMessages`): `Composed(outer, inner)` where `outer` is the client's
side and `inner` the upstream's, and the dialect between them (OpenAI chat) never leaves the
process. A request goes outer then inner; a reply, a stream and an error come back inner then
outer. The inner stream is made with `include_usage=True`, so the chat events the outer side
reads end with a usage chunk, as they would from an OpenAI upstream.

Cost: the reply is encoded once more, as chat JSON, and decoded again by the outer side; a
composed stream's events likewise. That is the price of one module per pair instead of one per
combination; a pair that becomes hot can get a module of its own.
"""

from __future__ import annotations

from typing import Any

from tokenhub.gateway.translate.base import StreamOut, Translation
from tokenhub.usage import UsageEvent


class ComposedStream:
    """One composed stream: the inner's client events are the outer's upstream events."""

    __slots__ = ("inner", "outer")

    def __init__(self, outer: StreamOut, inner: StreamOut) -> None:
        self.outer = outer
        self.inner = inner

    def feed(self, events: bytes) -> bytes:
        middle = self.inner.feed(events)
        return self.outer.feed(middle) if middle else b""

    def end(self, event: UsageEvent) -> bytes:
        """The inner's closing events (the chat usage chunk and [DONE]) go through the outer
        side before it closes the client's stream with the event's usage."""
        return self.outer.feed(self.inner.end(event)) + self.outer.end(event)


class Composed:
    """`outer` (client dialect -> middle) over `inner` (middle -> the upstream's wire)."""

    def __init__(self, outer: Translation, inner: Translation) -> None:
        if outer.upstream != inner.client:
            raise ValueError(
                f"cannot compose {outer.client}->{outer.upstream} over "
                f"{inner.client}->{inner.upstream}"
            )
        self.outer = outer
        self.inner = inner
        self.client = outer.client
        self.upstream = inner.upstream

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.inner.request(self.outer.request(payload))

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        return self.outer.reply(self.inner.reply(body, event), event)

    def stream(self, event: UsageEvent, include_usage: bool) -> ComposedStream:
        return ComposedStream(
            self.outer.stream(event, include_usage), self.inner.stream(event, True)
        )

    def error(self, status: int, body: bytes) -> bytes:
        return self.outer.error(status, self.inner.error(status, body))
