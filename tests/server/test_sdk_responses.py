"""The official `openai` SDK's Responses API (`client.responses.create`, as Codex-style tools
call it with OPENAI_BASE_URL = the gateway) against the same mock upstream over both wires:
`gpt-wire` (an openai-kind provider: Responses translated to chat completions) and
`claude-wire` (an anthropic-kind provider: Responses -> chat -> Messages, composed). Non-streamed
and streamed, instructions, a function-call round trip; the usage the client saw equals the
gateway's event and the mock's ledger. The gateway is stateless: `previous_response_id` is a
400 that bills nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from dialect_hub import ANTHROPIC_MODEL, ENGINES, OPENAI_MODEL, VOCAB, DialectHub, check_event
from harness import IGNORE_REQUEST_KEY_WARNING
from openai.types.responses import FunctionToolParam, Response, ResponseUsage

from tokenhub import Meter

pytestmark = IGNORE_REQUEST_KEY_WARNING

WIRES = [OPENAI_MODEL, ANTHROPIC_MODEL]
INSTRUCTIONS = "You are a terse assistant for a billing team."
QUESTION = "Explain exact token metering in one paragraph."
WEATHER: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
    "strict": False,
}


@pytest.fixture(scope="module", params=ENGINES)
def hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DialectHub]:
    """The module's hub on SQLite, then on a fresh PostgreSQL database (when the test server
    is there: dialect_hub.ENGINES): every test runs on both engines."""
    tmp = tmp_path_factory.mktemp("sdk-responses")
    if request.param == "sqlite":
        h = DialectHub(tmp)
    else:
        with request.getfixturevalue("pg_databases")() as url:
            h = DialectHub(tmp, database=url)
            try:
                yield h
            finally:
                h.close()
            return
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def meter() -> Meter:
    return Meter.load(VOCAB)


@pytest.fixture
def client(hub: DialectHub) -> Iterator[openai.OpenAI]:
    with hub.client() as c:
        yield c


def check_three_way(
    hub: DialectHub, rid: str, usage: ResponseUsage | None, *, model: str, stream: bool
) -> dict[str, Any]:
    """The client's usage == the gateway's event == the mock's ledger entry; the entry.
    Responses' input_tokens are all prompt tokens, cached ones included."""
    assert usage is not None
    cached = usage.input_tokens_details.cached_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    ev = hub.event(rid)
    check_event(
        hub,
        ev,
        model=model,
        endpoint="responses",
        stream=stream,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=ev.cache_write_tokens,
    )
    entry = hub.entry(rid)
    assert entry["status"] == 200 and entry["stream"] is stream
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    assert (entry["cache_read_tokens"], entry["cache_creation_tokens"]) == (
        cached,
        ev.cache_write_tokens,
    )
    return entry


def function_calls(response: Response) -> list[Any]:
    return [o for o in response.output if o.type == "function_call"]


# -- non-streamed --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", WIRES)
def test_create(hub: DialectHub, client: openai.OpenAI, meter: Meter, model: str) -> None:
    raw = client.responses.with_raw_response.create(
        model=model, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=64
    )
    rid = raw.headers["x-request-id"]
    response = raw.parse()
    assert response.object == "response" and response.status == "completed"
    assert response.model == model
    # Stateless: nothing was kept, and the reply says so (the SDK keeps unknown fields).
    assert (response.model_extra or {}).get("store") is False
    text = response.output_text
    assert text and response.usage is not None
    assert response.usage.output_tokens == meter.count(text)
    check_three_way(hub, rid, response.usage, model=model, stream=False)


def test_instructions_are_the_system_message(
    hub: DialectHub, client: openai.OpenAI, meter: Meter
) -> None:
    """Over the openai wire the mock counts chat messages with the vocabulary's template: the
    prompt it served is exactly the instructions as a system message, then the input."""
    raw = client.responses.with_raw_response.create(
        model=OPENAI_MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=16
    )
    expected = meter.count_messages(
        [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    )
    entry = check_three_way(
        hub, raw.headers["x-request-id"], raw.parse().usage, model=OPENAI_MODEL, stream=False
    )
    assert entry["prompt_tokens"] == expected
    bare = client.responses.create(model=OPENAI_MODEL, input=QUESTION, max_output_tokens=16)
    assert bare.usage is not None
    assert bare.usage.input_tokens == meter.count_messages([{"role": "user", "content": QUESTION}])


@pytest.mark.parametrize("model", WIRES)
def test_max_output_tokens_caps(
    hub: DialectHub, client: openai.OpenAI, meter: Meter, model: str
) -> None:
    raw = client.responses.with_raw_response.create(
        model=model, input=QUESTION, max_output_tokens=5
    )
    response = raw.parse()
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert meter.count(response.output_text) == 5
    check_three_way(hub, raw.headers["x-request-id"], response.usage, model=model, stream=False)


# -- streamed --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", WIRES)
def test_stream(hub: DialectHub, client: openai.OpenAI, meter: Meter, model: str) -> None:
    with client.responses.with_streaming_response.create(
        model=model, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=64,
        stream=True,
    ) as resp:  # fmt: skip
        rid = resp.headers["x-request-id"]
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(resp.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    seqs = [e.sequence_number for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == text
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == text
    usage = completed.response.usage
    assert usage is not None and usage.output_tokens == meter.count(text) > 0
    check_three_way(hub, rid, usage, model=model, stream=True)


@pytest.mark.parametrize("model", WIRES)
async def test_async_stream_matches_json(hub: DialectHub, model: str) -> None:
    """The same request streamed and not: the same text and usage (the mock is deterministic)."""
    async with hub.aclient() as client:
        plain = await client.responses.create(model=model, input=QUESTION, max_output_tokens=40)
        stream = await client.responses.create(
            model=model, input=QUESTION, max_output_tokens=40, stream=True
        )
        events = [e async for e in stream]
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == plain.output_text
    assert plain.usage is not None and completed.response.usage is not None
    assert completed.response.usage.input_tokens == plain.usage.input_tokens
    assert completed.response.usage.output_tokens == plain.usage.output_tokens


# -- function calls ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", WIRES)
def test_function_call_round_trip(
    hub: DialectHub, client: openai.OpenAI, meter: Meter, model: str, stream: bool
) -> None:
    first: list[Any] = [{"role": "user", "content": "Weather in Lisbon for 3 days, please."}]
    kw: dict[str, Any] = {"model": model, "tools": [WEATHER], "tool_choice": "required"}
    if stream:
        with client.responses.with_streaming_response.create(
            input=first, stream=True, **kw
        ) as resp:
            rid = resp.headers["x-request-id"]
            events = list(resp.parse())
        completed = events[-1]
        assert completed.type == "response.completed"
        response = completed.response
        deltas = "".join(
            e.delta for e in events if e.type == "response.function_call_arguments.delta"
        )
        assert json.loads(deltas) == json.loads(function_calls(response)[0].arguments)
    else:
        raw = client.responses.with_raw_response.create(input=first, **kw)
        rid = raw.headers["x-request-id"]
        response = raw.parse()
    calls = function_calls(response)
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    args = json.loads(call.arguments)
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    assert response.usage is not None
    assert response.usage.output_tokens == meter.count(call.name) + meter.count(call.arguments)
    check_three_way(hub, rid, response.usage, model=model, stream=stream)

    second = [
        *first,
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id,
         "output": json.dumps({"sky": "sunny", "celsius": 24})},
    ]  # fmt: skip
    raw2 = client.responses.with_raw_response.create(
        model=model, input=second, tools=[WEATHER], max_output_tokens=64
    )
    answer = raw2.parse()
    assert answer.output_text and not function_calls(answer)
    assert answer.usage is not None and answer.usage.input_tokens > response.usage.input_tokens
    check_three_way(hub, raw2.headers["x-request-id"], answer.usage, model=model, stream=False)


def test_stream_helper(hub: DialectHub, client: openai.OpenAI, meter: Meter) -> None:
    """The SDK's `responses.stream` helper accumulates the same response the events carry."""
    with client.responses.stream(
        model=ANTHROPIC_MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=32
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text and final.usage is not None
    assert final.usage.output_tokens == meter.count(text) > 0
    assert final.id.startswith("resp_")


# -- statelessness and errors ----------------------------------------------------------------


def check_unbilled(hub: DialectHub, e: openai.APIStatusError, before: dict[str, Any]) -> None:
    body = e.body
    assert isinstance(body, dict) and isinstance(body.get("message"), str), body
    rid = e.response.headers.get("x-request-id")
    if rid:
        hub.unbilled(rid)
    else:
        hub.settle()
    assert hub.totals() == before


@pytest.mark.parametrize("model", WIRES)
def test_previous_response_id_is_refused(
    hub: DialectHub, client: openai.OpenAI, model: str
) -> None:
    before = hub.totals()
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(
            model=model, input="And then?", previous_response_id="resp_0123456789abcdef"
        )
    assert exc.value.status_code == 400
    assert "previous_response_id" in exc.value.message
    check_unbilled(hub, exc.value, before)


def test_unknown_model(hub: DialectHub, client: openai.OpenAI) -> None:
    before = hub.totals()
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="gpt-nonesuch", input=QUESTION)
    assert "gpt-nonesuch" in exc.value.message
    check_unbilled(hub, exc.value, before)


def test_bad_key(hub: DialectHub) -> None:
    before = hub.totals()
    with (
        hub.client(api_key="sk-th-" + "0" * 40) as c,
        pytest.raises(openai.AuthenticationError) as exc,
    ):
        c.responses.create(model=OPENAI_MODEL, input=QUESTION)
    check_unbilled(hub, exc.value, before)
