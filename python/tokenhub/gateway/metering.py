"""Prompt and reply metering with the Rust meter (`tokenhub.meter.Meter`)."""

from __future__ import annotations

from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import IDS, MESSAGES, TEXT, TEXTS, ParsedRequest
from tokenhub.meter import Meter


def prompt_tokens(meter: Meter, req: ParsedRequest) -> int:
    """The prompt's tokens in `meter`'s vocabulary (chat messages with the model's template).
    A message the template cannot render is a 400."""
    prompt, kind = req.prompt, req.prompt_kind
    try:
        if kind == MESSAGES:
            return meter.count_messages(prompt)
        if kind == TEXT:
            return meter.count(prompt)
        if kind == TEXTS:
            return sum(meter.count_batch(prompt))
        if kind == IDS:
            return len(prompt)  # already token ids
        return sum(len(v) for v in prompt)  # a batch of token-id arrays
    except (TypeError, ValueError) as e:
        raise ApiError.bad_request(f"Invalid messages: {e}", param="messages") from None


def output_tokens(meter: Meter, texts: list[str]) -> int:
    """A reply's output tokens: the sum over its generated texts."""
    return sum(meter.count_batch(texts)) if texts else 0
