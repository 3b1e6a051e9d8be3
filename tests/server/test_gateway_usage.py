"""Usage that peers lose or get wrong: upstreams without usage, clients that hang up, failover,
explicit zero usage, cached tokens, and a local count that disagrees with the upstream's."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from harness import (
    IGNORE_REQUEST_KEY_WARNING,
    SCRIPTED_TEXT,
    SCRIPTED_USAGE,
    Hub,
    check_served,
    overhead_ms,
    wait_until,
)

from tokenhub import Meter

pytestmark = IGNORE_REQUEST_KEY_WARNING

MESSAGES = [{"role": "user", "content": "Tell me about usage records, at some length."}]


@pytest.fixture(scope="module")
def cl100k() -> Meter:
    return Meter.load("cl100k_base")


# -- an upstream without usage: the gateway meters what was served ---------------------------


def test_upstream_omits_usage(hub: Hub, client: openai.OpenAI, cl100k: Meter) -> None:
    raw = client.chat.completions.with_raw_response.create(model="nousage", messages=MESSAGES)
    rid = raw.headers["x-request-id"]
    completion = raw.parse()
    assert completion.usage is None
    text = completion.choices[0].message.content or ""
    entry = hub.ledger_entry(rid, "nousage")
    assert entry["usage_sent"] is False
    assert entry["completion_tokens"] == cl100k.count(text) > 0
    check_served(
        hub,
        hub.event(rid),
        model="nousage",
        provider="nousage",
        upstream_model="gpt-4o-mini",
        input_tokens=entry["prompt_tokens"],
        output_tokens=cl100k.count(text),
        source="metered",
    )


@pytest.mark.parametrize("include_usage", [True, False])
def test_upstream_omits_usage_stream(
    hub: Hub, client: openai.OpenAI, cl100k: Meter, include_usage: bool
) -> None:
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    with client.chat.completions.with_streaming_response.create(
        model="nousage", messages=MESSAGES, stream=True, n=2, **extra
    ) as resp:
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    # A client that asked for usage gets it all the same: the gateway's own, metered, in a
    # last chunk of OpenAI's shape (tests/server/test_trust_usage.py has the details).
    synthesized = chunks.pop() if include_usage else None
    assert all(c.usage is None for c in chunks)
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    counted = sum(cl100k.count(t) for t in texts)
    entry = hub.ledger_entry(rid, "nousage")
    assert entry["usage_sent"] is False
    assert entry["completion_tokens"] == counted > 0
    check_served(
        hub,
        hub.event(rid),
        model="nousage",
        provider="nousage",
        upstream_model="gpt-4o-mini",
        stream=True,
        input_tokens=entry["prompt_tokens"],
        output_tokens=counted,
        source="metered",
    )
    if synthesized is not None:
        assert synthesized.choices == [] and synthesized.usage is not None
        assert synthesized.usage.completion_tokens == counted
        assert synthesized.usage.prompt_tokens == entry["prompt_tokens"]


# -- clients that hang up ------------------------------------------------------------------------


async def _send_stream_request(
    hub: Hub, model: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streamed chat request on a raw connection, so the test decides when it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{hub.port}\r\n"
        f"Authorization: Bearer {hub.secret}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_client_disconnect_mid_stream(hub: Hub) -> None:
    """The client reads 3 chunks of a ~1.5 s stream and closes the connection: the gateway
    keeps reading the upstream, and the event bills what the upstream generated."""
    before = await hub.asettle()
    reader, writer = await _send_stream_request(hub, "paced")
    status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    rid = headers["x-request-id"]
    received = []
    while len(received) < 3:
        line = await reader.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data:"):
            received.append(json.loads(line[5:]))
    await _hang_up(writer)
    t_closed = time.monotonic()

    entry = await hub.aledger_entry(rid, "paced", timeout=10)
    event = await hub.aevent(rid)
    # The upstream wrote its whole reply to the gateway, which read it to the end.
    assert entry["disconnected"] is False
    assert entry["usage_sent"] is True
    assert entry["completion_tokens"] == 60
    assert time.monotonic() - t_closed > 0.5, "the stream should still have been running"
    check_served(
        hub,
        event,
        model="paced",
        provider="paced",
        upstream_model="gpt-4o-mini",
        stream=True,
        input_tokens=entry["prompt_tokens"],
        output_tokens=entry["completion_tokens"],
        status=499,
    )
    assert event.error == "client_disconnected"
    after = await hub.asettle()
    assert after["events_received"] - before["events_received"] == 1  # exactly one event
    assert after["duplicates"] == before["duplicates"]
    assert after["conflicts"] == before["conflicts"]


@pytest.mark.parametrize("model", ["late", "late-failover"])
async def test_client_disconnect_before_the_first_chunk(hub: Hub, model: str) -> None:
    """The client gives up while the upstream is still thinking (400 ms before any byte). The
    upstream then serves the whole reply, which it bills: the event must record it (499,
    the upstream's tokens), and the gateway must not send the request to a second
    deployment because its client went away."""
    before = await hub.asettle()
    seen = {e["client_request_id"] for e in hub.ledger("late")["entries"]}
    _, writer = await _send_stream_request(hub, model)
    await asyncio.sleep(0.1)
    await _hang_up(writer)

    def new_entries() -> list[dict[str, object]]:
        return [e for e in hub.ledger("late")["entries"] if e["client_request_id"] not in seen]

    (entry,) = await asyncio.to_thread(wait_until, new_entries, 5.0, what="the late mock")
    rid = str(entry["client_request_id"])
    assert entry["status"] == 200 and entry["completion_tokens"] == 32
    event = await hub.aevent(rid)
    assert (event.status, event.error) == (499, "client_disconnected")
    assert (event.input_tokens, event.output_tokens, event.source) == (
        entry["prompt_tokens"],
        entry["completion_tokens"],
        "upstream",
    )
    assert (event.deployment, event.attempts) == ("late/gpt-4o-mini", 1)
    assert hub.ledger_entries(rid, "healthy") == [], "the request was sent upstream twice"
    after = await hub.asettle()
    assert after["events_received"] - before["events_received"] == 1


# -- failover -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "first"), [("failover", "err500"), ("failover-dead", "dead")])
def test_failover(hub: Hub, client: openai.OpenAI, model: str, first: str, stream: bool) -> None:
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        ) as resp:
            assert resp.status_code == 200
            rid = resp.headers["x-request-id"]
            overhead_ms(resp.headers)
            usage = list(resp.parse())[-1].usage
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        assert raw.status_code == 200
        rid = raw.headers["x-request-id"]
        overhead_ms(raw.headers)
        usage = raw.parse().usage
    assert usage is not None
    check_served(
        hub,
        hub.event(rid),
        model=model,
        upstream_model="gpt-4o-mini",
        stream=stream,
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        attempts=2,
    )
    served = hub.ledger_entry(rid, "healthy")
    assert (served["prompt_tokens"], served["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    if first == "err500":
        failed = hub.ledger_entry(rid, "err500")
        assert (failed["status"], failed["completion_tokens"]) == (500, 0)


# -- usage blocks the mock never sends ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", list(SCRIPTED_USAGE))
def test_upstream_usage_is_taken_as_reported(
    hub: Hub, client: openai.OpenAI, cl100k: Meter, model: str, stream: bool
) -> None:
    """Explicit zero usage stays zero (not replaced by a local estimate of the text that
    was returned); cached input is counted once, inside input_tokens, in OpenAI's spelling
    and in DeepSeek's."""
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        ) as resp:
            rid = resp.headers["x-request-id"]
            chunks = list(resp.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        rid = raw.headers["x-request-id"]
        text = raw.parse().choices[0].message.content or ""
    assert text.strip() == SCRIPTED_TEXT and cl100k.count(text) > 0
    usage = SCRIPTED_USAGE[model]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or usage.get(
        "prompt_cache_hit_tokens", 0
    )
    check_served(
        hub,
        hub.event(rid),
        model=model,
        provider="scripted",
        stream=stream,
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        cached_input_tokens=cached,
    )


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_counts_win_over_the_local_meter(
    hub: Hub, client: openai.OpenAI, stream: bool
) -> None:
    """The deployment's vocabulary (deepseek-v4) counts this prompt differently from the
    upstream (cl100k_base): the event carries the upstream's numbers."""
    messages = [{"role": "user", "content": "计量每一个词元，精确无误。Tokens, exactly metered."}]
    local = Meter.load("deepseek-v4").count_messages(messages)
    upstream = Meter.load("cl100k_base").count_messages(messages)
    assert local != upstream
    kw = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    with client.chat.completions.with_streaming_response.create(
        model="vocab-mismatch", messages=messages, **kw
    ) as resp:
        rid = resp.headers["x-request-id"]
        resp.read()
    entry = hub.ledger_entry(rid)
    assert entry["prompt_tokens"] == upstream
    check_served(
        hub,
        hub.event(rid),
        model="vocab-mismatch",
        upstream_model="gpt-4o-mini",
        stream=stream,
        input_tokens=upstream,
        output_tokens=entry["completion_tokens"],
    )
