"""The translation seam: one client dialect over one upstream wire that speaks another.

A request whose dialect (`Endpoint.dialect`: "openai", "anthropic", "responses") is the wire's
own (`Provider.name`: "openai", "anthropic") is passed through untouched (`passthrough`).
Otherwise a `Translation` for the pair rewrites the request for the upstream, and the reply,
the stream and the upstream's errors for the client. There is one module per dialect pair
(`anthropic_chat`, `responses_chat`); a pair without its own module is the composition of two
(`compose`: the Responses API over an Anthropic upstream is Responses -> chat -> Messages).

Translations are stateless; `stream` returns the state of one stream. Usage shown to a client
of a translated request is the usage event's (what is billed), in the client's dialect, so the
client, the event and the upstream agree whenever the upstream's usage was believed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tokenhub.usage import UsageEvent


class StreamOut(Protocol):
    """One translated stream: the upstream's whole events in, the client's out."""

    def feed(self, events: bytes) -> bytes:
        """Whole upstream events (what the wire's scanner forwards; never a partial event)
        in; the client's events for them out (possibly empty). The upstream's end marker
        (`[DONE]`, `message_stop`) produces nothing: `end` closes the client's stream."""

    def end(self, event: UsageEvent) -> bytes:
        """The upstream's stream ended and the usage event is settled: the client's closing
        events, carrying the event's usage (OpenAI: the usage chunk when the client asked for
        it, then `[DONE]`; Anthropic: content_block_stop, message_delta, message_stop;
        Responses: the .done events and response.completed)."""


class Translation(Protocol):
    """The client's dialect `client` over an upstream speaking `upstream`."""

    client: str
    upstream: str

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The client's validated request body (`ParsedRequest.payload`) as the upstream's
        request body. `model`, the output cap and the stream's usage request are set by the
        upstream's wire afterwards (`Provider.request_body`)."""

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        """The upstream's non-streamed completion (checked to be one) as the client's reply,
        with the event's usage."""

    def stream(self, event: UsageEvent, include_usage: bool) -> StreamOut:
        """The state of one translated stream (`include_usage`: an OpenAI client asked for the
        usage chunk)."""

    def error(self, status: int, body: bytes) -> bytes:
        """An upstream error body (status 4xx, in the upstream's error shape or not) in the
        client's error shape, its message kept."""
