"""The provider seam: what the request path needs from an upstream's wire format.

The gateway speaks several dialects to its clients (`tokenhub.gateway.dialects`); a provider
turns a request body already in its own wire's shape (the client's, passed through, or a
translation's: `tokenhub.gateway.translate`) into the upstream's request (path, body and
credentials), gives a view of its non-streamed reply (usage as sent, the output text to meter
when usage is missing or not believed) and a scanner for its event stream (whole events out,
output counted per choice as they pass, the usage chunk kept). Nothing else in the gateway
reads an upstream's bytes.
`providers/openai.py` is the OpenAI wire, which every OpenAI-compatible server speaks;
`providers/anthropic.py` the native Anthropic Messages API. Usage is read into one normalized
form, OpenAI's keys (`tokenhub.gateway.usage_check` reads it): `prompt_tokens` all prompt
tokens, `prompt_tokens_details.cached_tokens` cache reads, `.cache_write_tokens` cache writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tokenhub.config import Provider as ProviderConfig
    from tokenhub.gateway.errors import ApiError
    from tokenhub.gateway.request import Endpoint
    from tokenhub.meter import Meter
    from tokenhub.usage import UsageEvent


class ReplyView(Protocol):
    """A non-streamed reply as metering reads it."""

    @property
    def usage(self) -> Any:
        """The upstream's usage block as it sent it (any JSON; None: it sent none)."""

    def output_texts(self) -> list[str]:
        """Every generated text of every choice, for the meter."""


class StreamScanner(Protocol):
    """One stream's events as they pass (the OpenAI wire's is the Rust `SseRelay`): constant
    memory, output counted as events pass."""

    def feed(self, data: bytes) -> bytes:
        """One upstream read in; the whole events to forward out (ValueError: an event past
        the scanner's bound, not a token stream)."""

    def finish(self) -> bytes:
        """The upstream closed: what was held back, as a last event."""

    @property
    def done(self) -> bool:
        """The stream's end marker was seen."""

    @property
    def first_token(self) -> bool:
        """Generated text was seen (time to first token)."""

    @property
    def errored(self) -> bool:
        """The upstream's mid-stream error event was seen (forwarded; no end marker follows)."""

    @property
    def usage(self) -> bytes | None:
        """The last usage chunk, undecoded (`Provider.stream_usage` reads it)."""

    @property
    def output_tokens(self) -> int:
        """Output tokens so far, all choices together."""

    @property
    def held_done(self) -> bool:
        """The client asked for usage, none came, and the end marker was held back for the
        gateway's own usage chunk (`Provider.usage_tail`)."""


class Provider(Protocol):
    """One wire format (stateless: the pool and credentials are the gateway's `Upstream`)."""

    name: str

    def path(self, endpoint: Endpoint) -> str:
        """The endpoint's path under the provider's base_url."""

    def request_body(
        self, payload: dict[str, Any], upstream_model: str, cap: int | None, stream: bool
    ) -> bytes:
        """The body sent upstream: `payload` (a request body in this wire's shape; it may be
        changed in place) for `upstream_model`, asking for a usage chunk when it streams, its
        output capped at `cap` per choice (None: as asked)."""

    def auth(self, key: str, provider: ProviderConfig) -> dict[str, str]:
        """The headers sent with every request to `provider`: the credential `key` (none when
        empty) in the wire's own header, or bare in `provider.auth_header` when set; the wire's
        fixed headers; then `provider.headers`."""

    def not_a_completion(self, endpoint: Endpoint, data: bytes) -> str | None:
        """Why a 2xx reply is not a completion (None: it is). Such a reply is a 502, unbilled;
        the reason never quotes the upstream (it may quote credentials)."""

    def reply(self, data: bytes) -> ReplyView:
        """A completion's view for metering (lenient: an undecodable reply has no choices)."""

    def scanner(self, keep_usage: bool, meter: Meter) -> StreamScanner:
        """A scanner for one stream; `keep_usage`: the client asked for the usage chunk."""

    def stream_usage(self, chunk: bytes) -> Any:
        """The usage block of a stream's usage chunk (None when it has none)."""

    def usage_tail(self, scanner: StreamScanner, event: UsageEvent) -> bytes:
        """What ends a stream whose client asked for usage and got none: a usage chunk of the
        gateway's own with the event's counts, then the end marker (empty: none held back)."""

    def stream_error(self, err: ApiError, *, end: bool) -> bytes:
        """An error as a stream event (and the end marker after it when `end`)."""

    def error_code(self, data: bytes) -> str:
        """The code of an upstream error body ("" when it is not in the wire's error shape)."""
