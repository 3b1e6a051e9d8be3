"""The router in the gateway (tokenhub.router): every request is routed by the model's policy,
conversations stick to a deployment, failing deployments are cooled down, tiered models pick a
model by the prompt's complexity within the tenant's contract, and every choice is on the usage
event and in the metrics."""

from __future__ import annotations

import itertools
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from harness import IGNORE_REQUEST_KEY_WARNING, Hub, wait_until

from tokenhub.router import TierScorer

pytestmark = IGNORE_REQUEST_KEY_WARNING

HARD = (
    "Refactor this function and prove its complexity bound:\n```python\n"
    + "def f(xs):\n    return sorted(set(x * x for x in xs if x % 2 == 0))\n" * 20
    + "```\nSolve 3*x + 7 = 22, then integrate x^2 from 0 to 3 and explain each step."
)


def chat(hub: Hub, model: str, content: str, *, secret: str | None = None,
         session: str | None = None, system: str = "") -> tuple[str, Any]:  # fmt: skip
    headers = {"x-session-id": session} if session else {}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    with hub.client(api_key=secret, default_headers=headers) as c:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=8
        )
    return raw.headers["x-request-id"], raw.parse()


def metrics(hub: Hub) -> str:
    with urllib.request.urlopen(hub.base + "/metrics", timeout=5) as r:
        return r.read().decode()


def test_every_request_is_routed_and_the_choice_recorded(hub: Hub) -> None:
    rids = [chat(hub, "pair", f"question {i}", session=f"s{i}")[0] for i in range(20)]
    events = [hub.event(r) for r in rids]
    # Smooth weighted round robin over two equal deployments: an exact alternation for new
    # conversations (each session is new, so the policy decides).
    deps = [e.deployment for e in events]
    assert Counter(deps) == {"pair-a": 10, "pair-b": 10}
    assert all(a != b for a, b in itertools.pairwise(deps))
    assert {e.route for e in events} == {"policy"} and {e.tier for e in events} == {""}
    m = metrics(hub)
    for dep in ("pair-a", "pair-b"):
        line = f'tokenhub_route_decisions_total{{deployment="{dep}",model="pair",reason="policy"}}'
        assert line in m, m


def test_a_conversation_sticks_to_its_deployment(hub: Hub) -> None:
    first = hub.event(chat(hub, "pair", "hello", session="conv-1")[0])
    again = [hub.event(chat(hub, "pair", f"turn {i}", session="conv-1")[0]) for i in range(6)]
    assert {e.deployment for e in again} == {first.deployment}
    assert {e.route for e in again} == {"affinity"}
    # Without a session header, the opening of the conversation (system prompt and first user
    # turn) is the key: later turns repeat it.
    system = "You are a meticulous reviewer. " * 40
    opening = hub.event(chat(hub, "pair", "Review my essay.", system=system)[0])
    for _ in range(4):
        e = hub.event(chat(hub, "pair", "Review my essay.", system=system)[0])
        assert (e.deployment, e.route) == (opening.deployment, "affinity")


def test_a_failing_deployment_is_cooled_down(hub: Hub) -> None:
    """`failover-cb`: its first deployment answers 500. The first requests fail over (bounded by
    max_attempts); after three failures the circuit opens and requests go straight to the
    healthy one until the cooldown ends."""
    before = metrics(hub)
    events = [hub.event(chat(hub, "failover-cb", f"q{i}")[0]) for i in range(8)]
    assert [e.attempts for e in events[:3]] == [2, 2, 2]
    assert {e.route for e in events[:3]} == {"fallback"}
    assert all(e.status == 200 and e.deployment == "healthy/gpt-4o-mini" for e in events)
    assert [e.attempts for e in events[3:]] == [1] * 5, [e.attempts for e in events]
    assert "tokenhub_upstream_failures_total" in metrics(hub) != before


@pytest.mark.parametrize(("prompt", "tier"), [("hi, how are you?", "cheap"), (HARD, "strong")])
def test_a_tiered_model_routes_by_complexity(hub: Hub, prompt: str, tier: str) -> None:
    scorer = TierScorer(0.3, ("refactor",))
    tokens = len(prompt) // 4
    assert (scorer.score_text(prompt, prompt_tokens=tokens) >= 0.3) == (tier == "strong")
    rid, reply = chat(hub, "auto", prompt)
    e = hub.event(rid)
    assert e.tier == tier
    assert e.model == {"cheap": "gpt-4o-mini", "strong": "qwen-plus"}[tier]  # what is priced
    assert reply.model == e.model


def test_a_tenant_contract_caps_the_strong_tier(hub: Hub) -> None:
    tenant = f"tier-{time.monotonic_ns() % 10**9}"
    hub.store.create_tenant(tenant)
    _, secret = hub.store.create_key(tenant)
    hub.store.set_limits("tenant", tenant, strong_share_pct=0)
    wait_until(
        lambda: hub.limits.strong_share.get(tenant) == 0, 3.0, what="the contract in the gateway"
    )
    wait_until(lambda: hub.knows(secret), 3.0, what="the key")
    e = hub.event(chat(hub, "auto", HARD, secret=secret)[0])
    assert (e.tier, e.model) == ("cheap", "gpt-4o-mini")
    # A 50% cap: never more than half of the tenant's tiered requests go strong.
    hub.store.set_limits("tenant", tenant, strong_share_pct=50)
    wait_until(lambda: hub.limits.strong_share.get(tenant) == 50, 3.0, what="the new cap")
    tiers = [hub.event(chat(hub, "auto", HARD, secret=secret)[0]).tier for _ in range(8)]
    strong = tiers.count("strong")
    assert 0 < strong <= 4, tiers
    # Within the cap at every point, not only at the end.
    seen = 0
    for i, t in enumerate(tiers, start=1):
        seen += t == "strong"
        assert seen <= (i + 1) // 2 + 1
