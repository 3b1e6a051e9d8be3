"""Usage the gateway does not take on trust (issue 11, items 2 and 11), through a real gateway,
a scripted upstream and the official openai client.

- An upstream's usage block that the request could not have produced (2^63-1 prompt tokens,
  10^14 output tokens, negative or non-integer counts, cached above input) is replaced by the
  meter's count, flagged on the event (`usage_anomaly`), counted in /metrics and audited.
- A chunk carrying both `choices` and `usage` (LiteLLM's shape) reaches a client that did not
  ask for usage without its `usage`; a client that asked for usage and got none from the
  upstream gets one synthesized from the meter (marked metered) before `[DONE]`.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from harness import IGNORE_REQUEST_KEY_WARNING, Hub, _serve, wait_until

from tokenhub.config import from_mapping
from tokenhub.meter import Meter
from tokenhub.usage import UsageEvent

pytestmark = IGNORE_REQUEST_KEY_WARNING

TEXT = "Five words of scripted text."
CONTEXT = 4096
MAX_OUT = 256
# The upstream's usage block per model ("none": no usage at all).
USAGE: dict[str, Any] = {
    "honest": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    "huge-prompt": {"prompt_tokens": 2**63 - 1, "completion_tokens": 6},
    "huge-output": {"prompt_tokens": 12, "completion_tokens": 10**14},  # 60M USD at 0.6/1M
    "over-output": {"prompt_tokens": 12, "completion_tokens": MAX_OUT + 1},
    "over-context": {"prompt_tokens": CONTEXT + 1, "completion_tokens": 6},
    "negative": {"prompt_tokens": 12, "completion_tokens": -6},
    "float": {"prompt_tokens": 12.5, "completion_tokens": 6},
    "cached-over": {
        "prompt_tokens": 12,
        "completion_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 13},
    },
    "litellm": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    "none": None,
    "endless": None,  # one event that never ends: 5 MiB without its blank line
}


def scripted() -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        usage = USAGE[model]
        base = {"id": "chatcmpl-x", "created": 1_700_000_000, "model": model}
        if not body.get("stream"):
            reply: dict[str, Any] = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": TEXT},
                        "finish_reason": "stop",
                    }
                ],
            }
            if usage is not None:
                reply["usage"] = usage
            return web.json_response(reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if model == "endless":
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"')
            await resp.write_eof(b"x" * (5 << 20))
            return resp
        chunk = {**base, "object": "chat.completion.chunk"}
        words = TEXT.split(" ")
        for i, w in enumerate(words):
            delta: dict[str, Any] = {"index": 0, "delta": {"content": w + " "}}
            event = {**chunk, "choices": [delta]}
            if model == "litellm" and i == len(words) - 1:
                # LiteLLM's shape: the last chunk with choices also carries the usage.
                delta["finish_reason"] = "stop"
                event["usage"] = usage
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        if usage is not None and model != "litellm":
            last = {**chunk, "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(last)}\n\n".encode())
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


class UsageHub(Hub):
    """A gateway in front of the scripted upstream only, with an audit log."""

    async def _start(self) -> None:
        runner, base = await _serve(scripted())
        self._runners.append(runner)
        models = [
            {
                "id": m,
                "deployments": [
                    {
                        "provider": "scripted",
                        "upstream_model": m,
                        "vocab": "cl100k_base",
                        "context_window": CONTEXT,
                        "max_output_tokens": MAX_OUT,
                    }
                ],
            }
            for m in USAGE
        ]
        self.config = from_mapping(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "database": str(self.db_path),
                    "journal_dir": str(self.journal_dir),
                    "key_refresh_s": 0.2,
                },
                "providers": [{"name": "scripted", "base_url": base + "/v1"}],
                "models": models,
            },
            "<test_trust_usage>",
        )
        await self._start_gateway()
        self.gateway.audit = self.store.add_audit


@pytest.fixture(scope="module")
def uhub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UsageHub]:
    h = UsageHub(tmp_path_factory.mktemp("usagehub"))
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def uclient(uhub: UsageHub) -> Iterator[openai.OpenAI]:
    with uhub.client() as c:
        yield c


@pytest.fixture(scope="module")
def cl100k() -> Meter:
    return Meter.load("cl100k_base")


MESSAGES = [{"role": "user", "content": "Say five words."}]


def _metric(hub: Hub, name: str, **labels: str) -> float:
    with urllib.request.urlopen(hub.base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = line[len(name) + 1 : line.index("}")]
            if all(part in got.split(",") for part in want.split(",")):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _request(client: openai.OpenAI, model: str, stream: bool, **kw: Any) -> tuple[str, list[Any]]:
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, stream=True, **kw
        ) as resp:
            return resp.headers["x-request-id"], list(resp.parse())
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kw)
    return raw.headers["x-request-id"], [raw.parse()]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("huge-prompt", "huge"),
        ("huge-output", "huge"),
        ("over-output", "over_output"),
        ("over-context", "over_context"),
        ("negative", "negative"),
        ("float", "not_integer"),
        ("cached-over", "cached_over_input"),
    ],
)
def test_implausible_usage_is_replaced_by_the_meter_flagged_counted_and_audited(
    uhub: UsageHub, uclient: openai.OpenAI, cl100k: Meter, model: str, kind: str, stream: bool
) -> None:
    before = _metric(uhub, "tokenhub_usage_anomalies_total", model=model, kind=kind)
    rid, _ = _request(uclient, model, stream)
    ev: UsageEvent = uhub.event(rid)
    prompt = uhub.gateway.meter("cl100k_base").count_messages(MESSAGES)
    assert (ev.status, ev.source) == (200, "metered")
    assert (ev.input_tokens, ev.cached_input_tokens) == (prompt, 0)
    assert ev.output_tokens == cl100k.count(TEXT if not stream else TEXT + " ")
    assert ev.usage_anomaly.startswith(kind + ": "), ev.usage_anomaly
    assert _metric(uhub, "tokenhub_usage_anomalies_total", model=model, kind=kind) == before + 1
    entry = wait_until(
        lambda: [e for e in uhub.store.audit_entries() if e.details.get("request_id") == rid],
        what="the audit entry",
    )[0]
    assert (entry.kind, entry.key_id, entry.details["kind"]) == ("usage_anomaly", uhub.key_id, kind)


@pytest.mark.parametrize("stream", [False, True])
def test_plausible_usage_is_believed(uhub: UsageHub, uclient: openai.OpenAI, stream: bool) -> None:
    rid, _ = _request(uclient, "honest", stream)
    ev = uhub.event(rid)
    assert (ev.input_tokens, ev.output_tokens, ev.source, ev.usage_anomaly) == (
        12,
        6,
        "upstream",
        "",
    )


def test_output_may_be_n_times_the_cap(uhub: UsageHub, uclient: openai.OpenAI) -> None:
    """The bound is what the request allowed: 10^14 is absurd, 6 tokens for max_tokens=2 and
    n=3 (at most 6) is not; 6 for max_tokens=1 and n=3 is."""
    rid, _ = _request(uclient, "honest", False, max_tokens=2, n=3)
    assert uhub.event(rid).usage_anomaly == ""
    rid, _ = _request(uclient, "honest", False, max_tokens=1, n=3)
    assert uhub.event(rid).usage_anomaly.startswith("over_output: completion_tokens 6 > the 3")


def test_litellm_usage_beside_choices_is_stripped_for_a_client_that_did_not_ask(
    uhub: UsageHub, uclient: openai.OpenAI
) -> None:
    rid, chunks = _request(uclient, "litellm", True)
    assert all(c.usage is None for c in chunks)
    # The chunk that carried it still carries its text and finish reason.
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT + " "
    assert chunks[-1].choices[0].finish_reason == "stop"
    ev = uhub.event(rid)
    assert (ev.input_tokens, ev.output_tokens, ev.source) == (12, 6, "upstream")
    # A client that asked gets it as the upstream sent it.
    _, asked = _request(uclient, "litellm", True, stream_options={"include_usage": True})
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 6


def test_a_client_that_asked_for_usage_gets_it_when_the_upstream_sent_none(
    uhub: UsageHub, uclient: openai.OpenAI, cl100k: Meter
) -> None:
    rid, chunks = _request(uclient, "none", True, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    ev = uhub.event(rid)
    assert ev.source == "metered"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        ev.input_tokens,
        ev.output_tokens,
    )
    assert ev.output_tokens == cl100k.count(TEXT + " ")
    assert last.usage.total_tokens == ev.input_tokens + ev.output_tokens
    assert last.model_extra == {"tokenhub": {"usage_source": "metered"}}
    assert last.id == "chatcmpl-x" and last.model == "none"
    assert all(c.usage is None for c in chunks[:-1])
    # Not asked: no usage chunk at all.
    _, plain = _request(uclient, "none", True)
    assert all(c.usage is None and c.choices for c in plain)


def test_an_event_past_the_relays_bound_fails_the_stream_and_bills_nothing(
    uhub: UsageHub, uclient: openai.OpenAI
) -> None:
    """The relay holds at most 4 MiB of an unfinished event: beyond that the upstream is not
    sending a token stream, and the request fails as a broken upstream read does."""
    with pytest.raises(openai.APIStatusError) as e:
        _request(uclient, "endless", True)
    assert e.value.status_code == 502
    assert e.value.response.json()["error"]["code"] == "upstream_error"
    ev = uhub.event(e.value.response.headers["x-request-id"])
    assert (ev.status, ev.output_tokens) == (502, 0)


def test_tpm_after_an_absurd_overrun_waits_at_most_a_minute(tmp_path: Path) -> None:
    """The quota table saturates and caps a rate limit's debt at one window, whatever the
    overrun (the gateway no longer records one; an old event or another writer could)."""
    from tokenhub.quota import Quota, Refusal, Reservation

    q = Quota.anonymous()
    q.set_limits("key:k", tpm=6_000)
    q.set_limits("key:j", tpm=6_000, tokens=10**6)
    for key, absurd in (("key:k", 2**63 - 1), ("key:j", 10**24), ("key:j", -(10**24))):
        r = q.reserve((key,), tokens=100, concurrent=False)
        if isinstance(r, Reservation):
            q.settle(r, tokens=absurd)  # 10^24 does not fit 64 bits: saturated, not raised
        refused = q.reserve((key,), tokens=100)
        assert isinstance(refused, Refusal) and refused.limit in ("tpm", "tokens"), refused
        assert int(refused.headers().get("retry-after", "0")) <= 60


async def test_a_daily_budget_starts_despite_absurd_usage_in_the_database(tmp_path: Path) -> None:
    """A new quota table carries today's usage from the database: events written before the
    gateway checked usage (2^63-1 tokens, twice: a SUM that overflows; a negative count) must
    not stop the server from starting, nor wrap the tenant's budget back to "unused"."""
    import time

    from tokenhub.gateway.limits import LimitSync
    from tokenhub.quota import Quota
    from tokenhub.store import open_store

    store = open_store(str(tmp_path / "t.db"))
    store.migrate()
    store.create_tenant("acme")
    store.create_tenant("beta")
    store.set_limits("tenant", "acme", tokens_per_day=1_000_000)
    store.set_limits("tenant", "beta", tokens_per_day=1_000_000)
    now = int(time.time() * 1000)

    def ev(i: int, tenant: str, **kw: int) -> UsageEvent:
        return UsageEvent(request_id=f"req_{i}", ts_ms=now, tenant=tenant, key_id="k",
                          endpoint="chat.completions", model="m", **kw)  # fmt: skip

    store.insert_events(
        [
            ev(1, "acme", input_tokens=2**63 - 1),
            ev(2, "acme", input_tokens=2**63 - 1),
            ev(3, "beta", output_tokens=-(10**12)),
            ev(4, "beta", output_tokens=10),
        ]
    )
    quota = Quota.anonymous()
    limits = LimitSync(quota, store.all_limits, store.change_marker, usage_since=store.tokens_since)
    try:
        await limits.start()
        # acme's absurd day counts as spent (refused), beta's negative count does not hand
        # out budget: its 10 real tokens are used.
        assert quota.state("tenant:acme").tokens.used >= 1_000_000
        assert quota.state("tenant:beta").tokens.used == 10
    finally:
        await limits.close()
        store.close()
