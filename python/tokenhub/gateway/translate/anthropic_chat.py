"""Anthropic's Messages API over an OpenAI chat upstream, and OpenAI chat over an Anthropic
upstream (work in progress: the interfaces H1 integrates against; bodies follow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenhub.gateway.translate.base import StreamOut

if TYPE_CHECKING:
    from tokenhub.usage import UsageEvent


class MessagesOverChat:
    """A Messages API client, an OpenAI chat upstream."""

    client = "anthropic"
    upstream = "openai"

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        raise NotImplementedError

    def stream(self, event: UsageEvent, include_usage: bool) -> StreamOut:
        raise NotImplementedError

    def error(self, status: int, body: bytes) -> bytes:
        raise NotImplementedError


class ChatOverMessages:
    """An OpenAI chat client, an Anthropic upstream."""

    client = "openai"
    upstream = "anthropic"

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        raise NotImplementedError

    def stream(self, event: UsageEvent, include_usage: bool) -> StreamOut:
        raise NotImplementedError

    def error(self, status: int, body: bytes) -> bytes:
        raise NotImplementedError
