"""The SSE relay (``tokenhub._core.SseRelay``) with a meter: each choice's output is counted as
events pass (in batches of at most 32 KiB of payloads, and whenever a count is read), equal to
the meter's count of the choice's texts joined, however the stream's bytes are split."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from textgen import texts

from tokenhub import Meter
from tokenhub._core import SseRelay

STREAMED = ["cl100k_base", "qwen", "deepseek-v4", "deepseek-v4-fallback"]
# "beside": content with a usage object beside the choices (LiteLLM's shape), mid-stream.
KINDS = ("content", "reasoning", "both", "tool", "function_call", "text", "beside")


@pytest.fixture(scope="session")
def stream_meters(meters: dict[str, Meter], fallback_meter: Meter) -> dict[str, Meter]:
    return {**meters, "deepseek-v4-fallback": fallback_meter}


def choice(index: int, kind: str, a: str, b: str) -> tuple[dict[str, Any], str]:
    """One chunk choice of the given kind, and its output text in the order it is counted."""
    if kind in ("content", "beside"):
        return {"index": index, "delta": {"content": a}}, a
    if kind == "reasoning":
        return {"index": index, "delta": {"reasoning_content": a}}, a
    if kind == "both":  # reasoning is counted before content
        return {"index": index, "delta": {"content": a, "reasoning_content": b}}, b + a
    if kind == "tool":
        call = {"index": 0, "id": "call_1", "function": {"name": a, "arguments": b}}
        return {"index": index, "delta": {"tool_calls": [call]}}, a + b
    if kind == "function_call":
        return {"index": index, "delta": {"function_call": {"name": a, "arguments": b}}}, a + b
    return {"index": index, "text": a, "finish_reason": None}, a  # legacy completions


def build_stream(
    steps: list[tuple[int, str, str, str]], usage: bool, ascii_only: bool, crlf: bool
) -> tuple[bytes, dict[int, str]]:
    """An upstream stream of the given deltas (with a role chunk, keep-alives, a usage chunk
    when asked and [DONE]), and each choice's joined text."""
    u = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    joined: dict[int, str] = {}
    sep = "\r\n\r\n" if crlf else "\n\n"
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    events = [json.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    for i, (index, kind, a, b) in enumerate(steps):
        c, text = choice(index, kind, a, b)
        joined[index] = joined.get(index, "") + text
        extra = {"usage": u} if kind == "beside" else {}
        events.append(json.dumps({**head, "choices": [c], **extra}, ensure_ascii=ascii_only))
        if i % 7 == 3:
            events.append(": keep-alive")
    if usage:
        events.append(json.dumps({**head, "choices": [], "usage": u}))
    events.append("[DONE]")
    body = "".join(e + sep if e.startswith(":") else f"data: {e}{sep}" for e in events)
    return body.encode(), joined


def relay_in_pieces(relay: SseRelay, data: bytes, rng: random.Random) -> bytes:
    """Feeds `data` split at random byte positions (UTF-8 sequences cut too)."""
    out = bytearray()
    at = 0
    while at < len(data):
        step = 1 + rng.randrange(rng.choice((4, 64, 4096)))
        out += relay.feed(data[at : at + step])
        at += step
    out += relay.finish()
    return bytes(out)


step = st.tuples(st.integers(0, 3), st.sampled_from(KINDS), texts, texts)


@pytest.mark.parametrize("name", STREAMED)
@settings(deadline=None, max_examples=150)
@given(
    steps=st.lists(step, max_size=30),
    usage=st.booleans(),
    ascii_only=st.booleans(),
    crlf=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_each_choice_counts_like_its_joined_text(
    stream_meters, name, steps, usage, ascii_only, crlf, seed
):
    meter = stream_meters[name]
    data, joined = build_stream(steps, usage, ascii_only, crlf)
    relay = SseRelay(True, meter.core)
    out = relay_in_pieces(relay, data, random.Random(seed))
    want = {i: meter.count(t) for i, t in joined.items()}
    want.setdefault(0, 0)  # the role chunk's choice
    assert relay.choice_tokens() == want
    assert relay.output_tokens == sum(want.values())
    usage = usage or any(kind == "beside" for _, kind, _, _ in steps)
    assert relay.done and relay.held_done is not usage
    assert json.loads(relay.head or b"") == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
    }
    # The client gets the stream as it came, less a held-back [DONE] when usage was missing.
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    assert out == (data if usage else data.removesuffix(b"data: [DONE]" + sep))


def test_the_running_total_grows_as_events_pass(meters):
    """What money admission reads after each upstream read: the output so far."""
    meter = meters["cl100k_base"]
    text = "The quick brown fox jumps over the lazy dog. " * 20
    relay = SseRelay(False, meter.core)
    sent = ""
    for k in range(0, len(text), 9):
        piece = text[k : k + 9]
        sent += piece
        chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
        relay.feed(f"data: {json.dumps(chunk)}\n\n".encode())
        assert relay.output_tokens == meter.count(sent)


def test_a_long_stream_keeps_nothing(meters):
    """50,000 events: nothing held back between events, every one counted."""
    meter = meters["cl100k_base"]
    relay = SseRelay(True, meter.core)
    event = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" word"}}]}\n\n'
    for _ in range(500):
        relay.feed(event * 100)
    assert relay.pending == 0 and relay.events == 50_000
    assert relay.output_tokens == meter.count(" word" * 50_000)


def test_an_event_past_max_event_is_refused(meters):
    relay = SseRelay(False, meters["cl100k_base"].core, 1024)
    relay.feed(b'data: {"choices":[{"index":0,"delta":{"content":"')
    with pytest.raises(ValueError, match="exceeds 1024 bytes"):
        relay.feed(b"x" * 2048)
    assert relay.pending == 0


def test_without_a_meter_nothing_is_counted():
    relay = SseRelay(False)
    relay.feed(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n')
    assert relay.first_token and relay.done
    assert relay.output_tokens == 0 and relay.choice_tokens() == {}
