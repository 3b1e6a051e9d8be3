"""Client dialects: the APIs tokenhub speaks to its clients, one object each.

A dialect is what differs between the client APIs at the gateway's edge: how a request body is
parsed and validated (`request_class`, a `ParsedRequest` subclass that sets everything the
pipeline reads) and how the gateway's own errors are written, as a body and as a stream event.
Everything between (metering, routing, admission, forwarding) is the same for all of them; the
upstream's replies reach a client of another dialect through `tokenhub.gateway.translate`.

- "openai": chat completions, completions, embeddings (`OPENAI`, here);
- "anthropic": the Messages API (`dialects.messages`);
- "responses": OpenAI's Responses API (`dialects.responses`).

The error middleware (`tokenhub.gateway.app`) renders an `ApiError` in the dialect the handler
stored on the request (`state.DIALECT`), so an Anthropic client gets Anthropic's error shape
for a bad key as much as for a bad body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import Endpoint, ParsedRequest

if TYPE_CHECKING:
    from collections.abc import Callable


class Dialect(Protocol):
    """One client API (stateless)."""

    name: str

    @property
    def request_class(self) -> Callable[[Endpoint], ParsedRequest]:
        """Makes the request object that parses this dialect's bodies."""

    def error_body(self, err: ApiError) -> bytes:
        """`err` as this dialect's JSON error body."""

    def stream_error(self, err: ApiError, *, end: bool) -> bytes:
        """`err` as this dialect's stream event (and the end marker after it when `end`)."""


class OpenAIDialect:
    """OpenAI's API: `{"error": {"message", "type", "param", "code"}}`; in a stream, a
    `data:` event with that body (then `data: [DONE]`)."""

    name = "openai"
    request_class = ParsedRequest

    def error_body(self, err: ApiError) -> bytes:
        return err.body()

    def stream_error(self, err: ApiError, *, end: bool) -> bytes:
        return b"data: " + err.body() + (b"\n\ndata: [DONE]\n\n" if end else b"\n\n")


OPENAI = OpenAIDialect()

DIALECTS: dict[str, Dialect] = {"openai": OPENAI}


def _register() -> None:
    """Adds the dialects whose modules are present (each lands as its own module)."""
    import importlib

    for name, module in (("anthropic", "messages"), ("responses", "responses")):
        try:
            mod = importlib.import_module(f"tokenhub.gateway.dialects.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"tokenhub.gateway.dialects.{module}":
                raise
            continue
        DIALECTS[name] = mod.DIALECT


_register()

__all__ = ["DIALECTS", "OPENAI", "Dialect", "OpenAIDialect"]
