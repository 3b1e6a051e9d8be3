"""The Anthropic stream relay (``tokenhub._core.AnthropicRelay``) with real vocabularies: events
pass unchanged however the bytes are split, each content block's output is counted as the meter
counts its text (a tool call's name apart), the usage is message_start's merged with each
message_delta's, and the count agrees with what the wire's reply view counts for the message
the official ``anthropic`` SDK assembles from the same stream."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from typing import Any

import anthropic
import msgspec
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from textgen import texts

from tokenhub import Meter
from tokenhub._core import AnthropicRelay, SseRelay
from tokenhub.gateway.providers.anthropic import ANTHROPIC
from tokenhub.gateway.request import ANTHROPIC_MESSAGES

STREAMED = ["cl100k_base", "qwen"]
KINDS = ("text", "thinking", "tool")
START_USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 30,
    "cache_read_input_tokens": 2048,
    "output_tokens": 1,
}
END_USAGE = {"output_tokens": 57, "input_tokens": None}
MERGED = {**START_USAGE, "output_tokens": 57}


def sse(kind: str, data: dict[str, Any], crlf: bool, ascii_only: bool = True) -> str:
    sep = "\r\n" if crlf else "\n"
    payload = json.dumps({"type": kind, **data}, ensure_ascii=ascii_only)
    return f"event: {kind}{sep}data: {payload}{sep}{sep}"


def pieces(text: str, rng: random.Random) -> list[str]:
    """`text` cut at random character positions (possibly into one piece, or empty pieces)."""
    cuts = sorted(rng.randrange(len(text) + 1) for _ in range(rng.randrange(4)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def build_stream(
    blocks: list[tuple[str, str, str]], rng: random.Random, crlf: bool, ascii_only: bool
) -> tuple[bytes, dict[int, list[str]]]:
    """An Anthropic stream of the given blocks, and each block's texts as counted: a text or
    thinking block's text; a tool call's name, then its input's JSON (msgspec's encoding, sent
    as input_json_delta fragments)."""
    out = [
        sse(
            "message_start",
            {
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-test",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": START_USAGE,
                }
            },
            crlf,
        )
    ]
    counted: dict[int, list[str]] = {}
    for i, (kind, a, b) in enumerate(blocks):

        def ev(name: str, data: dict[str, Any], i: int = i) -> None:
            out.append(sse(name, {"index": i, **data}, crlf, ascii_only))

        if kind == "text":
            ev("content_block_start", {"content_block": {"type": "text", "text": ""}})
            for p in pieces(a, rng):
                ev("content_block_delta", {"delta": {"type": "text_delta", "text": p}})
            counted[i] = [a]
        elif kind == "thinking":
            ev(
                "content_block_start",
                {"content_block": {"type": "thinking", "thinking": "", "signature": ""}},
            )
            for p in pieces(a, rng):
                ev("content_block_delta", {"delta": {"type": "thinking_delta", "thinking": p}})
            ev("content_block_delta", {"delta": {"type": "signature_delta", "signature": "Eq=="}})
            counted[i] = [a]
        else:
            args = msgspec.json.encode({"query": a, "n": len(b)}).decode()
            block = {"type": "tool_use", "id": f"toolu_{i}", "name": b or "f", "input": {}}
            ev("content_block_start", {"content_block": block})
            for p in pieces(args, rng):
                ev(
                    "content_block_delta",
                    {"delta": {"type": "input_json_delta", "partial_json": p}},
                )
            counted[i] = [b or "f", args]
        ev("content_block_stop", {})
        if i % 3 == 1:
            out.append(sse("ping", {}, crlf))
    out.append(
        sse(
            "message_delta",
            {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": END_USAGE},
            crlf,
        )
    )
    out.append(sse("message_stop", {}, crlf))
    return "".join(out).encode(), counted


def relay_in_pieces(relay: AnthropicRelay, data: bytes, rng: random.Random) -> bytes:
    """Feeds `data` split at random byte positions (UTF-8 sequences cut too), now and then
    reading the count between reads as money admission does."""
    out = bytearray()
    at = 0
    while at < len(data):
        step = 1 + rng.randrange(rng.choice((4, 64, 4096)))
        out += relay.feed(data[at : at + step])
        if rng.random() < 0.1:
            _ = relay.output_tokens
        at += step
    out += relay.finish()
    return bytes(out)


block = st.tuples(st.sampled_from(KINDS), texts, texts)


@pytest.mark.parametrize("name", STREAMED)
@settings(deadline=None, max_examples=60)
@given(
    blocks=st.lists(block, max_size=8),
    crlf=st.booleans(),
    ascii_only=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_each_block_counts_like_the_meter_counts_its_texts(
    meters: dict[str, Meter], name: str, blocks: Any, crlf: bool, ascii_only: bool, seed: int
) -> None:
    meter = meters[name]
    rng = random.Random(seed)
    data, counted = build_stream(blocks, rng, crlf, ascii_only)
    relay = AnthropicRelay(meter.core)
    assert relay_in_pieces(relay, data, rng) == data
    # A tool call's name is counted on its own, its arguments' JSON joined across fragments.
    want = {i: sum(meter.count(t) for t in ts) for i, ts in counted.items()}
    assert relay.block_tokens() == want
    assert relay.output_tokens == sum(want.values())
    assert relay.done and not relay.held_done and relay.pending == 0
    assert json.loads(relay.usage or b"") == MERGED
    assert json.loads(relay.head or b"") == {"id": "msg_01", "model": "claude-test"}
    assert relay.first_token is any(kind == "tool" or a for kind, a, _ in blocks)


def test_first_token_and_done_wait_for_their_events(meters: dict[str, Meter]) -> None:
    relay = AnthropicRelay(meters["cl100k_base"].core)
    data, _ = build_stream([("text", "", "")], random.Random(1), False, True)
    relay.feed(data)
    assert not relay.first_token  # an empty text block streams no token
    assert relay.done and relay.output_tokens == 0
    relay = AnthropicRelay(meters["cl100k_base"].core)
    data, _ = build_stream([("thinking", "Hm.", "")], random.Random(1), False, True)
    *head, stop = data.split(b"event: message_stop")
    relay.feed(b"event: message_stop".join(head))
    assert relay.first_token and not relay.done
    relay.feed(b"event: message_stop" + stop)
    assert relay.done


def test_the_running_total_grows_as_events_pass(meters: dict[str, Meter]) -> None:
    """What money admission reads after each upstream read: the output so far."""
    meter = meters["cl100k_base"]
    text = "The quick brown fox jumps over the lazy dog. " * 20
    relay = AnthropicRelay(meter.core)
    sent = ""
    for k in range(0, len(text), 9):
        piece = text[k : k + 9]
        sent += piece
        relay.feed(
            sse("content_block_delta", {"index": 0, "delta": {"text": piece}}, False).encode()
        )
        assert relay.output_tokens == meter.count(sent)


def test_a_long_stream_keeps_nothing(meters: dict[str, Meter]) -> None:
    """50,000 events: nothing held back between events, every one counted."""
    meter = meters["cl100k_base"]
    relay = AnthropicRelay(meter.core)
    event = sse(
        "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": " word"}}, False
    ).encode()
    for _ in range(500):
        relay.feed(event * 100)
    assert relay.pending == 0 and relay.events == 50_000
    assert relay.output_tokens == meter.count(" word" * 50_000)


def test_an_event_past_max_event_is_refused(meters: dict[str, Meter]) -> None:
    relay = AnthropicRelay(meters["cl100k_base"].core, 1024)
    relay.feed(b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"')
    with pytest.raises(ValueError, match="exceeds 1024 bytes"):
        relay.feed(b"x" * 2048)
    assert relay.pending == 0


def test_without_a_meter_nothing_is_counted() -> None:
    relay = AnthropicRelay()
    data, _ = build_stream([("text", "hi there", "")], random.Random(2), True, True)
    assert relay.feed(data) == data
    assert relay.first_token and relay.done
    assert relay.output_tokens == 0 and relay.block_tokens() == {}
    assert json.loads(relay.usage or b"") == MERGED


def _message_of(data: bytes) -> Any:
    """The message the anthropic SDK assembles from a stream served on 127.0.0.1."""

    async def run() -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for k in range(0, len(data), 97):  # a few events per write, cut anywhere
                await resp.write(data[k : k + 97])
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/v1/messages", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            client = anthropic.AsyncAnthropic(
                api_key="sk-test", base_url=f"http://127.0.0.1:{port}", max_retries=0
            )
            async with client.messages.stream(
                model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                message = await stream.get_final_message()
            await client.close()
            return message
        finally:
            await runner.cleanup()

    return asyncio.run(run())


@settings(deadline=None, max_examples=15)
@given(blocks=st.lists(block, min_size=1, max_size=5), seed=st.integers(0, 2**32))
def test_the_stream_counts_what_the_reply_view_counts_for_the_sdks_message(
    meters: dict[str, Meter], blocks: Any, seed: int
) -> None:
    """Streamed or not, one reply costs the same: the relay's count of a stream equals the
    wire's reply view's count of the message the official SDK assembles from that stream, and
    the SDK's usage is the relay's merged usage."""
    meter = meters["cl100k_base"]
    data, _ = build_stream(blocks, random.Random(seed), False, False)
    relay = AnthropicRelay(meter.core)
    relay.feed(data)
    message = _message_of(data)
    body = msgspec.json.encode(message.model_dump(mode="json"))
    view = ANTHROPIC.reply(body)
    assert ANTHROPIC.not_a_completion(ANTHROPIC_MESSAGES, body) is None
    assert sum(meter.count(t) for t in view.output_texts()) == relay.output_tokens
    assert view.usage == ANTHROPIC.stream_usage(relay.usage or b"")
    assert message.usage.output_tokens == MERGED["output_tokens"]


def test_errored_is_an_error_event_and_the_openai_relays_an_error_chunk() -> None:
    """`errored`: the Anthropic relay has seen an `error` event (named by its event line or by
    its data, after the first token too), the OpenAI relay a chunk with a top-level `error`
    object; a text that quotes `"error"` is neither. Both forward the event unchanged."""
    relay = AnthropicRelay(Meter.load("cl100k_base").core)
    quoted = json.dumps({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": '{"error": {}}'}})  # fmt: skip
    relay.feed(f"data: {quoted}\n\n".encode())
    assert relay.first_token and not relay.errored
    err = b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    assert relay.feed(err) == err
    assert relay.errored and not relay.done
    chat = SseRelay(False)
    text = {"choices": [{"index": 0, "delta": {"content": '"error": {"x": 1}'}}]}
    chat.feed(b"data: " + json.dumps(text).encode() + b"\n\n")
    assert not chat.errored
    chunk = b'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
    assert chat.feed(chunk) == chunk
    assert chat.errored and not chat.done
