"""What operators look at: /healthz, /metrics counters that move by exactly the tokens billed,
and totals that reconcile with the upstream's ledger after a mixed, concurrent run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections import Counter, defaultdict
from typing import Any

import openai
from harness import IGNORE_REQUEST_KEY_WARNING, Hub, wait_until

pytestmark = IGNORE_REQUEST_KEY_WARNING

MESSAGES = [{"role": "user", "content": "Count me, exactly."}]

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(hub: Hub) -> tuple[Series, str]:
    with urllib.request.urlopen(hub.base + "/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    series: Series = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        assert m, f"not Prometheus text: {line!r}"
        name = m.group(1)
        assert name in typed or name.removesuffix("_count") in typed, f"no # TYPE for {name}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        series[(name, labels)] = float(m.group(3))
    return series, text


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def test_healthz(hub: Hub) -> None:
    with urllib.request.urlopen(hub.base + "/healthz", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        body = json.loads(resp.read())
    assert body["status"] == "ok"
    assert body["models"] == len(hub.config.models)
    assert body["uptime_s"] >= 0


def test_metrics_move_by_the_tokens_billed(hub: Hub, client: openai.OpenAI) -> None:
    before, _ = scrape(hub)
    rids: list[str] = []
    for max_tokens in (5, 9):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=max_tokens,
        )
        rids.append(raw.headers["x-request-id"])
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
    ) as resp:
        rids.append(resp.headers["x-request-id"])
        resp.read()
    raw = client.chat.completions.with_raw_response.create(model="nousage", messages=MESSAGES)
    nousage = hub.event(raw.headers["x-request-id"])
    with contextlib.suppress(openai.RateLimitError):
        client.chat.completions.create(model="limited", messages=MESSAGES)
    events = [hub.event(r) for r in rids]
    after, text = scrape(hub)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tokenhub_requests_total", model="gpt-4o-mini", status="200") == 3
    assert delta("tokenhub_requests_total", model="nousage", status="200") == 1
    assert delta("tokenhub_requests_total", model="limited", status="429") == 1
    tokens = "tokenhub_tokens_total"
    up = {"model": "gpt-4o-mini", "source": "upstream"}
    assert delta(tokens, kind="output", **up) == sum(e.output_tokens for e in events) > 14
    assert delta(tokens, kind="input", **up) == sum(e.input_tokens for e in events) > 0
    assert delta(tokens, kind="output", model="nousage", source="metered") == (
        nousage.output_tokens
    )
    assert delta(tokens, kind="output", model="limited", source="upstream") == 0
    assert delta(tokens, kind="output", model="limited", source="metered") == 0
    assert value(after, "tokenhub_api_keys") == len(hub.store.active_keys())
    assert "# TYPE tokenhub_requests_total counter" in text


async def test_totals_reconcile_with_the_upstream_ledger(fresh_hub: Hub) -> None:
    """A concurrent mix of requests on a hub of its own: the events' tokens per model equal
    what the mock upstream served, and there is one event per request answered."""
    hub = fresh_hub
    answered: list[str] = []

    async def chat(c: openai.AsyncOpenAI, model: str, i: int) -> None:
        kind = i % 4
        kw: dict[str, Any] = {"max_tokens": 3 + 7 * i, "n": 2 if i == 5 else 1}
        if kind == 0:
            raw = await c.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, **kw
            )
            answered.append(raw.headers["x-request-id"])
            return
        if kind == 1:
            kw["stream_options"] = {"include_usage": True}
        async with c.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, stream=True, **kw
        ) as resp:
            await resp.read()
            answered.append(resp.headers["x-request-id"])

    async def legacy(c: openai.AsyncOpenAI, i: int) -> None:
        async with c.completions.with_streaming_response.create(
            model="gpt-3.5-turbo-instruct",
            prompt=f"prompt {i}",
            max_tokens=4 + i,
            stream=bool(i % 2),
        ) as resp:
            await resp.read()
            answered.append(resp.headers["x-request-id"])

    async def embed(c: openai.AsyncOpenAI, i: int) -> None:
        raw = await c.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["text"] * (i + 1)
        )
        answered.append(raw.headers["x-request-id"])

    async with hub.aclient() as c:
        jobs = [
            chat(c, m, i) for m in ("gpt-4o-mini", "qwen-plus", "deepseek-chat") for i in range(8)
        ]
        jobs += [legacy(c, i) for i in range(4)] + [embed(c, i) for i in range(3)]
        await asyncio.gather(*jobs)
    n = len(jobs)
    assert len(set(answered)) == n

    def all_events() -> dict[str, Any] | None:
        events = hub.events()
        return events if len(events) >= n else None

    events = await asyncio.to_thread(wait_until, all_events, 5.0, what=f"{n} events")
    stats = await hub.asettle()
    events = hub.events()
    assert set(events) == set(answered)
    assert stats["events_received"] == stats["events_written"] == n
    assert stats["duplicates"] == stats["conflicts"] == stats["rejected"] == 0

    ledger = hub.ledger()
    assert ledger["totals"]["requests"] == ledger["totals"]["ok"] == n
    assert {e["client_request_id"] for e in ledger["entries"]} == set(answered)
    by_model: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events.values():
        assert e.status == 200 and e.source == "upstream"
        assert 0 <= e.cached_input_tokens <= e.input_tokens and e.output_tokens >= 0
        totals = by_model[e.upstream_model]
        totals["requests"] += 1
        totals["prompt_tokens"] += e.input_tokens
        totals["completion_tokens"] += e.output_tokens
    # (The ledger also has the cache's figures, zero here: the mock's cache is cold.)
    keys = ("requests", "prompt_tokens", "completion_tokens")
    served = {m: {k: t.get(k, 0) for k in keys} for m, t in ledger["by_model"].items()}
    assert {m: dict(t) for m, t in by_model.items()} == served
