"""The mock upstream, through the official openai SDK and at the wire: exact usage under real
vocabularies, OpenAI's stream and error shapes, the knobs, and the ledger."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai.types.chat import ChatCompletionMessageParam

from tokenhub import Meter
from tokenhub.cli.mock import add_cli, options_from_args
from tokenhub.mock import DEFAULT_MODELS, MockOptions, build_app

CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Tell me about token meters, briefly."},
]
MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def meters() -> dict[str, Meter]:
    return {name: Meter.load(name) for name in ("cl100k_base", "qwen", "deepseek-v4")}


@pytest.fixture
async def mock(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(build_app(MockOptions()))
    return server


@pytest.fixture
async def client(mock: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=str(mock.make_url("/v1")), api_key="sk-test", max_retries=0
    ) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Served:
    """A mock on a plain AppRunner, where the handler cancellation setting is ours to choose
    (aiohttp's TestServer always cancels handlers on disconnect; `web.run_app` does not)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def make_url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(params=[False, True], ids=["no-cancel", "cancel"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    runner = web.AppRunner(
        build_app(MockOptions()), handler_cancellation=request.param, shutdown_timeout=0.5
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield Served(f"http://127.0.0.1:{runner.addresses[0][1]}")
    await runner.cleanup()


Server = TestServer | Served


def url(server: Server, path: str) -> str:
    return str(server.make_url(path))


async def post(
    http: aiohttp.ClientSession, server: Server, path: str, body: Any, **headers: str
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url(server, path), data=data, headers=headers) as resp:
        return resp.status, await resp.json()


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """The stream's events: decoded JSON chunks, then the string "[DONE]"."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events: list[Any] = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def ledger(http: aiohttp.ClientSession, server: Server) -> Any:
    async with http.get(url(server, "/mock/ledger")) as resp:
        assert resp.status == 200
        return await resp.json()


async def wait_for_entry(http: aiohttp.ClientSession, server: Server, rid: str) -> Any:
    """The ledger entry of `rid`; a stream cut short is recorded once the mock notices."""
    for _ in range(100):
        for e in (await ledger(http, server))["entries"]:
            if e["id"] == rid:
                return e
        await asyncio.sleep(0.05)
    raise AssertionError(f"{rid} never reached the ledger")


# -- exact usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "vocab"),
    [("gpt-4o-mini", "cl100k_base"), ("qwen-plus", "qwen"), ("deepseek-chat", "deepseek-v4")],
)
async def test_chat_usage_is_the_meters_count(
    client: openai.AsyncOpenAI, meters: dict[str, Meter], model: str, vocab: str
) -> None:
    r = await client.chat.completions.create(model=model, messages=CHAT, temperature=0.2)
    meter = meters[vocab]
    text = r.choices[0].message.content
    assert text
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == model
    assert r.system_fingerprint
    assert r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].logprobs is None
    assert r.usage is not None
    assert r.usage.prompt_tokens == meter.count_messages(CHAT)
    assert r.usage.completion_tokens == meter.count(text) == 32  # the default length
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


async def test_replies_are_deterministic_and_seeded(client: openai.AsyncOpenAI) -> None:
    async def text(seed: int | None = None, headers: dict[str, str] | None = None) -> str:
        r = await client.chat.completions.create(
            model=MODEL, messages=CHAT, seed=seed, extra_headers=headers
        )
        content = r.choices[0].message.content
        assert content
        return content

    first = await text()
    assert await text() == first
    assert await text(seed=1) != first
    assert await text(headers={"x-mock-seed": "1"}) == await text(seed=1)


async def test_completion_tokens_header_and_vocab_header(
    client: openai.AsyncOpenAI, meters: dict[str, Meter]
) -> None:
    r = await client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        extra_headers={"x-mock-completion-tokens": "300", "x-mock-vocab": "qwen"},
    )
    assert r.usage is not None
    assert (
        r.usage.completion_tokens == 300 == meters["qwen"].count(r.choices[0].message.content or "")
    )
    assert r.usage.prompt_tokens == meters["qwen"].count_messages(CHAT)


# -- streaming ------------------------------------------------------------------------------------


async def test_stream_with_usage_matches_the_non_streamed_reply(
    mock: TestServer, http: aiohttp.ClientSession
) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT}
    status, whole = await post(http, mock, "/v1/chat/completions", body)
    assert status == 200

    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url(mock, "/v1/chat/completions"), json=body) as resp:
        assert resp.status == 200
        events = await sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, finish, final = chunks
    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    # OpenAI's include_usage shape: "usage": null on every chunk, then one chunk with no
    # choices and the usage block.
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert final["choices"] == []
    assert final["usage"] == whole["usage"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert len(content) == 1 + whole["usage"]["completion_tokens"]  # one delta per token


async def test_stream_without_include_usage_has_no_usage_chunk(
    mock: TestServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "messages": CHAT, "stream": True}
    async with http.post(url(mock, "/v1/chat/completions"), json=body) as resp:
        events = await sse(resp)
    assert events[-1] == "[DONE]"
    assert all(c["choices"] and c.get("usage") is None for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_sdk_stream(client: openai.AsyncOpenAI, meters: dict[str, Meter]) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    text = "".join(parts)
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == meters["cl100k_base"].count(text)
    assert usage.prompt_tokens == meters["cl100k_base"].count_messages(CHAT)


async def test_n_choices(
    mock: TestServer, http: aiohttp.ClientSession, meters: dict[str, Meter]
) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT, "n": 3}
    _, whole = await post(http, mock, "/v1/chat/completions", body)
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3
    cl = meters["cl100k_base"]
    assert whole["usage"]["completion_tokens"] == sum(cl.count(t) for t in texts) == 96
    assert whole["usage"]["prompt_tokens"] == cl.count_messages(CHAT)

    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url(mock, "/v1/chat/completions"), json=body) as resp:
        events = await sse(resp)
    streamed = ["", "", ""]
    finishes: dict[int, str] = {}
    for c in events[:-2]:
        (choice,) = c["choices"]
        streamed[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert streamed == texts
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert events[-2]["usage"] == whole["usage"]


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_caps_the_reply(
    client: openai.AsyncOpenAI, meters: dict[str, Meter], cap_field: str
) -> None:
    full = await client.chat.completions.create(model=MODEL, messages=CHAT)
    capped = await client.chat.completions.create(
        model=MODEL, messages=CHAT, extra_body={cap_field: 5}
    )
    text = capped.choices[0].message.content or ""
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 5 == meters["cl100k_base"].count(text)
    assert (full.choices[0].message.content or "").startswith(text)
    roomy = await client.chat.completions.create(
        model=MODEL, messages=CHAT, extra_body={cap_field: 32}
    )
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.usage is not None
    assert roomy.usage.completion_tokens == 32

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        stream=True,
        extra_body={cap_field: 5},
    )
    parts: list[str] = []
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == text
    assert finish == "length"


async def test_omit_usage(mock: TestServer, http: aiohttp.ClientSession) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT}
    status, whole = await post(
        http, mock, "/v1/chat/completions", body, **{"x-mock-omit-usage": "true"}
    )
    assert status == 200
    assert "usage" not in whole
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"x-mock-omit-usage": "1"}
    async with http.post(url(mock, "/v1/chat/completions"), json=body, headers=headers) as resp:
        events = await sse(resp)
    assert events[-1] == "[DONE]"
    assert all(c["choices"] and c.get("usage") is None for c in events[:-1])


# -- errors ---------------------------------------------------------------------------------------


async def test_rate_limit_and_server_errors_as_the_sdk_sees_them(
    client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.RateLimitError) as rl:
        await client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            extra_headers={"x-mock-status": "429"},
        )
    assert rl.value.status_code == 429
    assert rl.value.code == "rate_limit_exceeded"
    assert rl.value.type == "requests"
    assert rl.value.param is None
    assert rl.value.response.headers["retry-after"] == "1"

    with pytest.raises(openai.InternalServerError) as se:
        await client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            extra_headers={"x-mock-error-rate-500": "1"},
        )
    assert se.value.status_code == 500
    assert se.value.type == "server_error"
    assert "error" in se.value.message

    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="gpt-9", messages=CHAT)
    assert nf.value.code == "model_not_found"
    assert nf.value.type == "invalid_request_error"
    assert isinstance(nf.value.body, dict)
    assert nf.value.body["message"] == (
        "The model `gpt-9` does not exist or you do not have access to it."
    )


async def test_error_bodies_on_the_wire(mock: TestServer, http: aiohttp.ClientSession) -> None:
    status, body = await post(
        http,
        mock,
        "/v1/chat/completions",
        {"model": MODEL, "messages": CHAT},
        **{"x-mock-status": "429"},
    )
    assert status == 429
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["param"] is None
    assert body["error"]["message"]

    status, body = await post(http, mock, "/v1/chat/completions", b'{"model": "gpt-4o-mini", ')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "parse the JSON" in body["error"]["message"]

    status, body = await post(http, mock, "/v1/chat/completions", {"model": MODEL})
    assert status == 400
    assert body["error"]["param"] == "messages"

    status, body = await post(http, mock, "/v1/chat/completions", {"messages": CHAT})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"

    status, body = await post(
        http,
        mock,
        "/v1/chat/completions",
        {"model": MODEL, "messages": CHAT},
        **{"x-mock-nope": "1"},
    )
    assert status == 400
    assert "x-mock-nope" in body["error"]["message"]

    status, body = await post(
        http, mock, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 0}
    )
    assert status == 400
    assert body["error"]["param"] == "max_tokens"


async def test_error_injection_is_reproducible(
    aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    async def statuses() -> list[int]:
        opts = MockOptions(error_rate_429=0.3, error_rate_500=0.2, seed=7)
        server = await aiohttp_server(build_app(opts))
        out = []
        for _ in range(40):
            status, _ = await post(
                http, server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT}
            )
            out.append(status)
        await server.close()
        return out

    first = await statuses()
    assert first == await statuses()
    assert {200, 429, 500} == set(first)


async def test_required_key(aiohttp_server: Any) -> None:
    server = await aiohttp_server(build_app(MockOptions(require_key="sk-right")))
    base = str(server.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            await c.chat.completions.create(model=MODEL, messages=CHAT)
        assert e.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-right", max_retries=0) as c:
        r = await c.chat.completions.create(model=MODEL, messages=CHAT)
        assert r.usage is not None


# -- other endpoints ------------------------------------------------------------------------------


async def test_embeddings(
    client: openai.AsyncOpenAI,
    mock: TestServer,
    http: aiohttp.ClientSession,
    meters: dict[str, Meter],
) -> None:
    inputs = ["hello world", "token hub", "hello world"]
    # The SDK asks for base64 by default and decodes it.
    r = await client.embeddings.create(model="text-embedding-3-small", input=inputs)
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(v) == 8 for v in vecs)
    assert vecs[0] == pytest.approx(vecs[2])
    assert vecs[0] != pytest.approx(vecs[1])
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, rel=1e-5)
    cl = meters["cl100k_base"]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(cl.count(t) for t in inputs)

    body = {"model": "text-embedding-3-small", "input": "hello world", "encoding_format": "float"}
    status, raw = await post(http, mock, "/v1/embeddings", body | {"dimensions": 4})
    assert status == 200
    assert raw["object"] == "list"
    assert raw["data"][0]["object"] == "embedding"
    assert len(raw["data"][0]["embedding"]) == 4
    _, raw8 = await post(http, mock, "/v1/embeddings", body)
    assert raw8["data"][0]["embedding"] == pytest.approx(vecs[0], rel=1e-6)


async def test_models(client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert ids == list(DEFAULT_MODELS)
    assert (await client.models.retrieve("qwen-plus")).id == "qwen-plus"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-9")


async def test_legacy_completions(client: openai.AsyncOpenAI, meters: dict[str, Meter]) -> None:
    cl = meters["cl100k_base"]
    prompt = "Once upon a time"
    r = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt=prompt)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    # OpenAI's legacy default is max_tokens=16.
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 16 == cl.count(r.choices[0].text)
    assert r.usage.prompt_tokens == cl.count(prompt)

    r = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=[prompt, "Hi"], max_tokens=50, n=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage is not None
    assert r.usage.prompt_tokens == cl.count(prompt) + cl.count("Hi")
    assert r.usage.completion_tokens == sum(cl.count(c.text) for c in r.choices) == 4 * 32
    assert {c.finish_reason for c in r.choices} == {"stop"}

    stream = await client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt=prompt,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=50,
    )
    parts: list[str] = []
    usage = None
    async for chunk in stream:
        assert chunk.object == "text_completion"
        parts.extend(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    whole = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=prompt, max_tokens=50
    )
    assert "".join(parts) == whole.choices[0].text
    assert usage == whole.usage


# -- the ledger -----------------------------------------------------------------------------------


async def test_ledger_totals_equal_the_usage_returned(
    client: openai.AsyncOpenAI, mock: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(url(mock, "/mock/reset")) as resp:
        assert resp.status == 200
    prompt = completion = 0
    ids = []
    r = await client.chat.completions.create(model=MODEL, messages=CHAT, n=2)
    assert r.usage is not None
    prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
    ids.append(r.id)
    r2 = await client.chat.completions.create(
        model="qwen-plus",
        messages=CHAT,
        max_tokens=7,
        extra_headers={"x-request-id": "gw-1"},
    )
    assert r2.usage is not None
    prompt, completion = prompt + r2.usage.prompt_tokens, completion + r2.usage.completion_tokens
    ids.append(r2.id)
    stream = await client.chat.completions.create(
        model="deepseek-chat",
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage:
            prompt += chunk.usage.prompt_tokens
            completion += chunk.usage.completion_tokens
            ids.append(chunk.id)
    t = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    assert t.usage is not None
    prompt, completion = prompt + t.usage.prompt_tokens, completion + t.usage.completion_tokens
    ids.append(t.id)
    e = await client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])
    prompt += e.usage.prompt_tokens
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            extra_headers={"x-mock-status": "429"},
        )

    led = await ledger(http, mock)
    totals = led["totals"]
    assert totals["requests"] == 6
    assert (totals["ok"], totals["errors"], totals["streams"]) == (5, 1, 1)
    assert totals["prompt_tokens"] == totals["reported_prompt_tokens"] == prompt
    assert totals["completion_tokens"] == totals["reported_completion_tokens"] == completion
    assert totals["total_tokens"] == prompt + completion
    entries = led["entries"]
    assert [x["id"] for x in entries[:4]] == ids
    assert entries[1]["client_request_id"] == "gw-1"
    assert entries[1]["completion_tokens"] == 7
    assert entries[2]["stream"] and entries[2]["usage_sent"]
    assert entries[5]["status"] == 429 and entries[5]["completion_tokens"] == 0
    assert led["by_model"]["qwen-plus"] == {
        "requests": 1,
        "prompt_tokens": r2.usage.prompt_tokens,
        "completion_tokens": 7,
        "cache_read_tokens": 0,  # only Anthropic's Messages API caches prompts
        "cache_creation_tokens": 0,
    }


async def test_ledger_is_bounded_but_totals_are_not(
    aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    server = await aiohttp_server(build_app(MockOptions(ledger_size=3)))
    for _ in range(5):
        await post(http, server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT})
    led = await ledger(http, server)
    assert len(led["entries"]) == 3
    assert led["dropped"] == 2
    assert led["totals"]["requests"] == 5
    assert led["totals"]["completion_tokens"] == 5 * 32


async def test_client_disconnect_mid_stream_is_recorded(
    served: Served, http: aiohttp.ClientSession, meters: dict[str, Meter]
) -> None:
    body = {
        "model": MODEL,
        "messages": CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"x-mock-tokens-per-second": "100", "x-mock-completion-tokens": "60"}
    received = ""
    resp = await http.post(url(served, "/v1/chat/completions"), json=body, headers=headers)
    rid = resp.headers["x-request-id"]
    deltas = 0
    async for line in resp.content:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            received += chunk["choices"][0]["delta"].get("content", "")
            deltas += 1
            if deltas == 5:  # the role chunk and four tokens
                break
    resp.close()  # drops the connection mid-stream

    entry = await wait_for_entry(http, served, rid)
    assert entry["stream"] and entry["disconnected"]
    assert not entry["usage_sent"]
    # What was written before the mock saw the disconnect: at least what the client read,
    # less than the whole reply, and an exact count of a prefix of the reply.
    assert 4 <= entry["completion_tokens"] < 60
    assert meters["cl100k_base"].count(received) == 4


async def test_stall_before_any_byte_until_the_client_gives_up(
    served: Served, http: aiohttp.ClientSession
) -> None:
    async with openai.AsyncOpenAI(
        base_url=url(served, "/v1"), api_key="sk-test", max_retries=0
    ) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model=MODEL,
                messages=CHAT,
                timeout=0.3,
                extra_headers={"x-mock-stall": "0"},
            )
    led = await ledger(http, served)
    for _ in range(50):
        if led["entries"]:
            break
        await asyncio.sleep(0.05)
        led = await ledger(http, served)
    (entry,) = led["entries"]
    assert entry["stalled"] and entry["disconnected"]
    assert entry["status"] == 0
    assert entry["completion_tokens"] == 0


async def test_stall_mid_stream(served: Served, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "messages": CHAT, "stream": True}
    headers = {"x-mock-stall": "3"}  # the role chunk and two tokens, then nothing
    events: list[bytes] = []
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    async with http.post(
        url(served, "/v1/chat/completions"), json=body, headers=headers, timeout=timeout
    ) as resp:
        rid = resp.headers["x-request-id"]
        with pytest.raises(asyncio.TimeoutError):
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line)
    assert len(events) == 3
    entry = await wait_for_entry(http, served, rid)
    assert entry["stalled"] and entry["disconnected"]
    assert entry["completion_tokens"] == 2

    # A JSON reply stalls after its headers: a status and a length, never the body.
    async with http.post(
        url(served, "/v1/chat/completions"),
        json={"model": MODEL, "messages": CHAT},
        headers={"x-mock-stall": "1"},
        timeout=timeout,
    ) as resp:
        assert resp.status == 200
        assert resp.content_length is not None and resp.content_length > 0
        rid = resp.headers["x-request-id"]
        with pytest.raises(asyncio.TimeoutError):
            await resp.read()
    entry = await wait_for_entry(http, served, rid)
    assert entry["stalled"] and entry["disconnected"]
    assert entry["completion_tokens"] == 0


async def test_latency_ttft_and_pace_delay_the_response(
    mock: TestServer, http: aiohttp.ClientSession
) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT}
    t0 = time.perf_counter()
    status, _ = await post(http, mock, "/v1/chat/completions", body, **{"x-mock-latency-ms": "150"})
    assert status == 200
    assert time.perf_counter() - t0 >= 0.15

    headers = {
        "x-mock-ttft-ms": "150",
        "x-mock-tokens-per-second": "200",
        "x-mock-completion-tokens": "20",
    }
    t0 = time.perf_counter()
    async with http.post(
        url(mock, "/v1/chat/completions"), json=body | {"stream": True}, headers=headers
    ) as resp:
        first = None
        async for line in resp.content:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    assert first is not None and first >= 0.15
    assert total >= 0.15 + 19 / 200  # 19 intervals between 20 tokens


# -- the sync SDK against a server in its own thread ----------------------------------------------


@pytest.fixture(scope="module")
def threaded_base_url() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(MockOptions()), access_log=None, shutdown_timeout=0.5)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/v1"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_sync_client(threaded_base_url: str, meters: dict[str, Meter]) -> None:
    cl = meters["cl100k_base"]
    with openai.OpenAI(base_url=threaded_base_url, api_key="sk-test", max_retries=0) as c:
        r = c.chat.completions.create(model=MODEL, messages=CHAT)
        assert r.usage is not None
        assert r.usage.prompt_tokens == cl.count_messages(CHAT)
        text = r.choices[0].message.content or ""
        assert r.usage.completion_tokens == cl.count(text)
        parts: list[str] = []
        for chunk in c.chat.completions.create(model=MODEL, messages=CHAT, stream=True):
            parts.extend(ch.delta.content or "" for ch in chunk.choices)
        assert "".join(parts) == text
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(
                model=MODEL,
                messages=CHAT,
                extra_headers={"x-mock-status": "429"},
            )


# -- options and the command line -----------------------------------------------------------------


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        build_app(MockOptions(vocab="nope"))
    with pytest.raises(ValueError, match="error_rate_429"):
        build_app(MockOptions(error_rate_429=2.0))


def test_cli_flags_map_to_options() -> None:
    parser = argparse.ArgumentParser(prog="tokenhub")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["mock-upstream", "--port", "0", "--stall", "--model", "m1=qwen", "--model", "m2",
         "--error-rate-429", "0.1", "--omit-usage", "--require-key", "k", "--seed", "3",
         "--tool-calls", "auto", "--min-cache-tokens", "10", "--cache-ttl-s", "1.5",
         "--cache-lookback-blocks", "0", "--stream-error-after", "4"]
    )  # fmt: skip
    opts = options_from_args(args)
    assert (opts.tool_calls, opts.min_cache_tokens, opts.cache_ttl_s) == ("auto", 10, 1.5)
    assert (opts.cache_lookback_blocks, opts.stream_error_after) == (0, 4)
    assert opts.models == {"m1": "qwen", "m2": ""}
    assert (opts.stall, opts.error_rate_429, opts.omit_usage, opts.seed) == (0, 0.1, True, 3)
    assert opts.require_key == "k"
    assert args.port == 0 and callable(args.func)
    defaults = options_from_args(parser.parse_args(["mock-upstream"]))
    assert defaults == MockOptions()


def test_cli_serves_until_interrupted() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "tokenhub.mock", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("tokenhub mock-upstream: listening on http://127.0.0.1:")
            base = line.split()[4]
            with openai.OpenAI(base_url=base, api_key="x", max_retries=0) as c:
                r = c.chat.completions.create(model=MODEL, messages=CHAT)
                assert r.usage is not None
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
