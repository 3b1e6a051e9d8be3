"""Key and tenant limits in the gateway: rpm, concurrency, tokens per day, applied live.

(The cross-worker case, one rpm limit for `--workers 2`, is in test_workers.py, beside the
fixtures that run real server processes.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from harness import IGNORE_REQUEST_KEY_WARNING, Hub, wait_until

from tokenhub.gateway.limits import DAY_ACCOUNT, LimitSync
from tokenhub.quota import Quota

pytestmark = IGNORE_REQUEST_KEY_WARNING

MESSAGES = [{"role": "user", "content": "hello"}]
_n = itertools.count()


def new_key(hub: Hub, **tenant_limits: int) -> tuple[str, str, str]:
    """A tenant of its own (so limits do not leak into other tests) and a key: (tenant, key
    id, secret), once the gateway has the key."""
    tenant = f"lim-{time.monotonic_ns() % 10**9}-{next(_n)}"
    hub.store.create_tenant(tenant)
    key, secret = hub.store.create_key(tenant)
    if tenant_limits:
        hub.store.set_limits("tenant", tenant, **tenant_limits)
    wait_until(
        lambda: hub.knows(secret) and hub_has(hub, tenant_limits, tenant),
        3.0,
        interval=0.05,
        what="the key and limits in the gateway",
    )
    return tenant, key.id, secret


def hub_has(hub: Hub, limits: dict[str, int], tenant: str) -> bool:
    return not limits or f"tenant:{tenant}" in hub.limits.limited


def post(hub: Hub, secret: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(
        hub.url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_rpm_limit_sdk_and_raw_http(hub: Hub) -> None:
    _, key_id, secret = new_key(hub)
    hub.store.set_limits("key", key_id, rpm=5)
    wait_until(lambda: f"key:{key_id}" in hub.limits.limited, 3.0, what="the limit")
    with hub.client(api_key=secret) as c:
        remaining = []
        for _ in range(5):
            raw = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "5"
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
            assert "x-ratelimit-limit-tokens" not in raw.headers  # no tpm limit set
        assert remaining == [4, 3, 2, 1, 0]
        with pytest.raises(openai.RateLimitError) as exc:
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    err = exc.value
    assert err.code == "rate_limit_exceeded"
    assert f"key:{key_id}" in err.message and "requests per minute" in err.message
    assert "Limit 5, Remaining 0" in err.message
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(err.response.headers["retry-after"]) <= 13  # one request refills in 12 s

    status, headers, body = post(hub, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "retry-after" in headers and "x-request-id" in headers
    # Recorded, never billable: a 429 with no tokens.
    event = hub.event(headers["x-request-id"])
    assert (event.status, event.error, event.key_id) == (429, "rate_limit_exceeded", key_id)
    assert (event.input_tokens, event.output_tokens) == (0, 0)

    # Removing the limit admits again.
    hub.store.set_limits("key", key_id, rpm=None)
    wait_until(lambda: f"key:{key_id}" not in hub.limits.limited, 3.0, what="the removal")
    status, headers, _ = post(hub, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert status == 200 and "x-ratelimit-limit-requests" not in headers


async def test_max_concurrency(hub: Hub) -> None:
    tenant, _, secret = await asyncio.to_thread(new_key, hub, max_concurrency=2)
    async with hub.aclient(api_key=secret) as c:

        async def slow() -> str:
            stream = await c.chat.completions.create(model="paced", messages=MESSAGES, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        first = [asyncio.create_task(slow()) for _ in range(2)]
        await asyncio.sleep(0.4)  # both in flight (a paced stream takes ~1.5 s)
        with pytest.raises(openai.RateLimitError) as exc:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert exc.value.code == "rate_limit_exceeded"
        assert f"tenant:{tenant}" in exc.value.message
        assert "Concurrency limit" in exc.value.message and "Limit 2" in exc.value.message
        assert all(await asyncio.gather(*first))
        # Both slots are given back when the streams end.
        r = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert r.usage is not None
    state = hub.quota.state(f"tenant:{tenant}")
    assert state.inflight == 0 and state.refused == 1


def test_tokens_per_day_exhausted(hub: Hub) -> None:
    tenant, _, secret = new_key(hub, tokens_per_day=200)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 40}
    statuses = []
    for _ in range(10):
        status, _, reply = post(hub, secret, body)
        statuses.append(status)
        if status != 200:
            break
    assert statuses[0] == 200 and statuses[-1] == 429
    assert reply["error"]["code"] == "insufficient_quota"
    assert reply["error"]["type"] == "insufficient_quota"
    assert f"tenant:{tenant}" in reply["error"]["message"]
    assert "tokens per day Limit 200" in reply["error"]["message"]
    st = hub.quota.state(f"tenant:{tenant}")
    # Settled to what was used, not what was reserved.
    assert st.tokens.held == 0 and 0 < st.tokens.used <= 200
    # A new UTC day gives the budget back (one process per server does it).
    assert isinstance(hub.limits, LimitSync)
    today = hub.quota.limits(DAY_ACCOUNT)["requests"]
    assert today is not None and hub.limits.start_day(today + 1)
    assert hub.quota.state(f"tenant:{tenant}").tokens.used == 0
    assert not hub.limits.start_day(today + 1)  # once a day
    hub.quota.set_limits(DAY_ACCOUNT, requests=today)
    assert post(hub, secret, body)[0] == 200


def test_a_new_table_starts_the_day_with_todays_usage(hub: Hub) -> None:
    """A restarted server (a new quota table) does not hand out a second daily budget."""
    tenant, _, secret = new_key(hub, tokens_per_day=10_000)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 40}
    for _ in range(3):
        assert post(hub, secret, body)[0] == 200
    used = hub.quota.state(f"tenant:{tenant}").tokens.used
    wait_until(lambda: hub.store.tokens_since(0).get(tenant) == used, 5.0, what="the events stored")
    fresh = Quota.anonymous(accounts=64, reservations=64)
    sync = LimitSync(
        fresh, hub.store.all_limits, hub.store.change_marker, usage_since=hub.store.tokens_since
    )
    hub._thread.call(sync.start())
    try:
        st = fresh.state(f"tenant:{tenant}")
        assert (st.tokens.limit, st.tokens.used) == (10_000, used)
        # Only a fresh table is charged: starting on an existing one carries nothing again.
        again = LimitSync(
            fresh, hub.store.all_limits, hub.store.change_marker,
            usage_since=hub.store.tokens_since,
        )  # fmt: skip
        hub._thread.call(again.start())
        hub._thread.call(again.close())
        assert fresh.state(f"tenant:{tenant}").tokens.used == used
    finally:
        hub._thread.call(sync.close())


def test_limit_set_on_running_server_applies_within_2s(hub: Hub) -> None:
    _, key_id, secret = new_key(hub)
    assert post(hub, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})[0] == 200
    hub.store.set_limits("key", key_id, rpm=1)
    t0 = time.monotonic()

    def refused() -> bool:
        return post(hub, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})[0] == 429

    wait_until(refused, 2.0, interval=0.05, what="the new limit to refuse")
    assert time.monotonic() - t0 < 2.0


def test_no_limits_no_reservations(hub: Hub) -> None:
    before = hub.quota.stats().reserved
    _, _, secret = new_key(hub)
    status, headers, _ = post(hub, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert status == 200 and not any(h.startswith("x-ratelimit") for h in headers)
    assert hub.quota.stats().reserved == before


def test_bulk_extraction_guard_throttles_a_key_and_audits_it(hub: Hub) -> None:
    tenant, key_id, secret = new_key(hub)
    _, other_id, other = new_key(hub)
    hub.store.set_limits("tenant", tenant, guard_tpm=50)
    wait_until(lambda: tenant in hub.limits.guard.configs, 3.0, what="the guard config")
    # Only guard settings: nothing to reserve on for this tenant.
    assert f"tenant:{tenant}" not in hub.limits.limited
    hub.limits.guard.audit = hub.store.add_audit
    for _ in range(3):
        assert post(hub, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})[0] == 200
        assert post(hub, other, {"model": "gpt-4o-mini", "messages": MESSAGES})[0] == 200
    # Sample now (as the server's sweeper does every few seconds): the velocity, smoothed over
    # about a minute, is about the ~120 tokens just sent, above 50 per minute.
    hub._thread.call(hub.limits._sample_guard())
    status, headers, body = post(hub, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "bulk-extraction guard" in body["error"]["message"]
    assert 1 <= int({k.lower(): v for k, v in headers.items()}["retry-after"]) <= 60
    # The other tenant's key has no guard and goes on.
    assert post(hub, other, {"model": "gpt-4o-mini", "messages": MESSAGES})[0] == 200
    (entry,) = [e for e in hub.store.audit_entries() if e.key_id == key_id]
    assert (entry.kind, entry.tenant) == ("guard_throttle", tenant)
    assert entry.details["velocity_tpm"] > 50 and entry.details["ceiling_tpm"] == 50
    # The refusal is recorded, unbilled; the velocity is exported.
    wait_until(
        lambda: any(
            e.key_id == key_id and e.status == 429 and e.error == "rate_limit_exceeded"
            for e in hub.store.iter_events()
        ),
        5.0,
        what="the refusal recorded",
    )
    with urllib.request.urlopen(hub.url.removesuffix("/v1") + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert f'tokenhub_key_velocity_tpm{{key="{key_id}",tenant="{tenant}"}}' in metrics
    assert other_id not in metrics.split("tokenhub_key_velocity_tpm", 1)[1].split("\n# ", 1)[0]
