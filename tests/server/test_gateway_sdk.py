"""The official openai SDK, sync and async, through the gateway: every request's usage event
equals the usage the client saw and the mock upstream's own record of what it served. Every
test runs twice: on the session's hub (SQLite) and on a hub whose store is PostgreSQL."""

from __future__ import annotations

import openai
import pytest
from harness import IGNORE_REQUEST_KEY_WARNING, Hub, check_served, overhead_ms
from openai.types.chat import ChatCompletionMessageParam

from tokenhub import Meter

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Explain exact token metering in one paragraph, please."},
]
pytestmark = IGNORE_REQUEST_KEY_WARNING

CHAT_MODELS = {"gpt-4o-mini": "cl100k_base", "qwen-plus": "qwen", "deepseek-chat": "deepseek-v4"}


@pytest.fixture(scope="module")
def hub(engine_hub: Hub) -> Hub:
    """This module's tests run on both engines (tests/server/conftest.py: engine_hub)."""
    return engine_hub


@pytest.fixture(scope="module")
def meters() -> dict[str, Meter]:
    return {v: Meter.load(v) for v in CHAT_MODELS.values()}


def check_ledger(hub: Hub, rid: str, prompt: int, completion: int, stream: bool) -> None:
    """The mock upstream served exactly this request once, with these tokens."""
    entry = hub.ledger_entry(rid)
    assert entry["status"] == 200
    assert entry["stream"] is stream
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (prompt, completion)
    assert entry["disconnected"] is False


# -- sync ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(CHAT_MODELS))
def test_chat(hub: Hub, client: openai.OpenAI, meters: dict[str, Meter], model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    rid = raw.headers["x-request-id"]
    assert rid.startswith("req_")
    overhead_ms(raw.headers)
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    text = completion.choices[0].message.content or ""
    assert usage.completion_tokens == meters[CHAT_MODELS[model]].count(text) > 0

    check_served(
        hub,
        hub.event(rid),
        model=model,
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        cached_input_tokens=usage.prompt_tokens_details.cached_tokens or 0,
    )
    check_ledger(hub, rid, usage.prompt_tokens, usage.completion_tokens, stream=False)


@pytest.mark.parametrize("model", list(CHAT_MODELS))
def test_chat_stream_with_usage(
    hub: Hub, client: openai.OpenAI, meters: dict[str, Meter], model: str
) -> None:
    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        rid = resp.headers["x-request-id"]
        overhead_ms(resp.headers)
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = list(resp.parse())
    # The usage chunk comes last, with no choices, as OpenAI sends it.
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert usage.completion_tokens == meters[CHAT_MODELS[model]].count(text) > 0

    check_served(
        hub,
        hub.event(rid),
        model=model,
        stream=True,
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
    )
    check_ledger(hub, rid, usage.prompt_tokens, usage.completion_tokens, stream=True)


@pytest.mark.parametrize("model", list(CHAT_MODELS))
def test_chat_stream_without_usage(
    hub: Hub, client: openai.OpenAI, meters: dict[str, Meter], model: str
) -> None:
    """The gateway asks the upstream for usage anyway, and strips the usage chunk."""
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=MESSAGES, stream=True
    ) as resp:
        rid = resp.headers["x-request-id"]
        overhead_ms(resp.headers)
        chunks = list(resp.parse())
    assert chunks
    assert all(c.choices for c in chunks), "a chunk without choices reached the client"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)

    entry = hub.ledger_entry(rid)
    assert entry["completion_tokens"] == meters[CHAT_MODELS[model]].count(text) > 0
    check_served(
        hub,
        hub.event(rid),
        model=model,
        stream=True,
        input_tokens=entry["prompt_tokens"],
        output_tokens=entry["completion_tokens"],
    )
    check_ledger(hub, rid, entry["prompt_tokens"], entry["completion_tokens"], stream=True)


def test_chat_with_content_parts_and_n(hub: Hub, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Two answers, please."}]}],
        n=2,
        max_tokens=12,
    )
    rid = raw.headers["x-request-id"]
    completion = raw.parse()
    assert len(completion.choices) == 2
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 24
    check_served(
        hub,
        hub.event(rid),
        model="gpt-4o-mini",
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
    )
    check_ledger(hub, rid, usage.prompt_tokens, usage.completion_tokens, stream=False)


def test_legacy_completions(hub: Hub, client: openai.OpenAI) -> None:
    model = "gpt-3.5-turbo-instruct"
    raw = client.completions.with_raw_response.create(
        model=model, prompt="Say something about meters.", max_tokens=20
    )
    rid = raw.headers["x-request-id"]
    overhead_ms(raw.headers)
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 20
    check_served(
        hub,
        hub.event(rid),
        model=model,
        endpoint="completions",
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
    )
    check_ledger(hub, rid, usage.prompt_tokens, usage.completion_tokens, stream=False)


def test_legacy_completions_stream(hub: Hub, client: openai.OpenAI) -> None:
    model = "gpt-3.5-turbo-instruct"
    with client.completions.with_streaming_response.create(
        model=model,
        prompt="Say something about meters.",
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 10
    check_served(
        hub,
        hub.event(rid),
        model=model,
        endpoint="completions",
        stream=True,
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
    )
    check_ledger(hub, rid, usage.prompt_tokens, usage.completion_tokens, stream=True)


def test_embeddings(hub: Hub, client: openai.OpenAI) -> None:
    model = "text-embedding-3-small"
    raw = client.embeddings.with_raw_response.create(
        model=model, input=["first text to embed", "and a second, longer text to embed"]
    )
    rid = raw.headers["x-request-id"]
    overhead_ms(raw.headers)
    result = raw.parse()
    assert len(result.data) == 2
    check_served(
        hub,
        hub.event(rid),
        model=model,
        endpoint="embeddings",
        input_tokens=result.usage.prompt_tokens,
        output_tokens=0,
    )
    check_ledger(hub, rid, result.usage.prompt_tokens, 0, stream=False)


@pytest.mark.parametrize(
    ("endpoint", "kw"),
    [
        ("embeddings", {"input": [[1, 2, 3], [4, 5, 6, 7]]}),
        ("completions", {"prompt": [[1, 2, 3], [4, 5, 6, 7]], "max_tokens": 5}),
    ],
)
def test_token_array_inputs(
    hub: Hub, client: openai.OpenAI, endpoint: str, kw: dict[str, object]
) -> None:
    """OpenAI's API (and the SDK's types) accept arrays of token arrays as `input` and
    `prompt`; the gateway must pass them on and meter them like any other request."""
    if endpoint == "embeddings":
        model = "text-embedding-3-small"
        raw = client.embeddings.with_raw_response.create(model=model, **kw)
    else:
        model = "gpt-3.5-turbo-instruct"
        raw = client.completions.with_raw_response.create(model=model, **kw)
    rid = raw.headers["x-request-id"]
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens == 7
    check_served(
        hub,
        hub.event(rid),
        model=model,
        endpoint=endpoint,
        input_tokens=7,
        output_tokens=getattr(usage, "completion_tokens", 0),
    )


def test_models_list(hub: Hub, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [m.id for m in hub.config.models]
    assert all(m.object == "model" and m.owned_by for m in models.data)


def test_request_ids_are_unique(client: openai.OpenAI) -> None:
    ids = {
        client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=1
        ).headers["x-request-id"]
        for _ in range(5)
    }
    assert len(ids) == 5


# -- async --------------------------------------------------------------------------------------


async def test_async_chat(hub: Hub, aclient: openai.AsyncOpenAI) -> None:
    raw = await aclient.chat.completions.with_raw_response.create(
        model="qwen-plus", messages=MESSAGES
    )
    rid = raw.headers["x-request-id"]
    overhead_ms(raw.headers)
    usage = raw.parse().usage
    assert usage is not None
    check_served(
        hub,
        await hub.aevent(rid),
        model="qwen-plus",
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
    )
    entry = await hub.aledger_entry(rid)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


@pytest.mark.parametrize("include_usage", [True, False])
async def test_async_chat_stream(
    hub: Hub, aclient: openai.AsyncOpenAI, meters: dict[str, Meter], include_usage: bool
) -> None:
    model = "deepseek-chat"
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with aclient.chat.completions.with_streaming_response.create(
        model=model, messages=MESSAGES, stream=True, **extra
    ) as resp:
        rid = resp.headers["x-request-id"]
        overhead_ms(resp.headers)
        chunks = [c async for c in await resp.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entry = await hub.aledger_entry(rid)
    assert entry["completion_tokens"] == meters["deepseek-v4"].count(text) > 0
    if include_usage:
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        )
    else:
        assert all(c.choices and c.usage is None for c in chunks)
    check_served(
        hub,
        await hub.aevent(rid),
        model=model,
        stream=True,
        input_tokens=entry["prompt_tokens"],
        output_tokens=entry["completion_tokens"],
    )


async def test_async_completions_and_embeddings(hub: Hub, aclient: openai.AsyncOpenAI) -> None:
    raw = await aclient.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt=["one prompt", "two prompts"], max_tokens=4
    )
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 8
    check_served(
        hub,
        await hub.aevent(raw.headers["x-request-id"]),
        model="gpt-3.5-turbo-instruct",
        endpoint="completions",
        input_tokens=usage.prompt_tokens,
        output_tokens=8,
    )

    emb = await aclient.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="one text"
    )
    result = emb.parse()
    check_served(
        hub,
        await hub.aevent(emb.headers["x-request-id"]),
        model="text-embedding-3-small",
        endpoint="embeddings",
        input_tokens=result.usage.prompt_tokens,
        output_tokens=0,
    )


async def test_async_models_list(hub: Hub, aclient: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in aclient.models.list()]
    assert ids == [m.id for m in hub.config.models]
