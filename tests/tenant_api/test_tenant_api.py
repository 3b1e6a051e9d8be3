"""The tenant API on the gateway's listener (tokenhub.tenant.routes), over real HTTP, on SQLite
and PostgreSQL: every route with the tenant's own key, 401 for a bad or revoked key, tenant
isolation, OpenAI's legacy billing shapes, and the official `openai` client on the same server."""

from __future__ import annotations

import datetime as dt
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from harness import wait_until
from tenant_kit import DAY_MS, World, day_ms

from tokenhub.billing.tenant_service import MAX_KEYS_PER_TENANT

GETS = [
    "/v1/tokenhub/balance",
    "/v1/tokenhub/usage",
    "/v1/tokenhub/keys",
    "/v1/tokenhub/alerts",
    "/v1/tokenhub/statements/2026-11",
    "/v1/tokenhub/limits",
    "/v1/dashboard/billing/subscription",
    "/v1/dashboard/billing/usage",
]
LEGACY = [p for p in GETS if p.startswith("/v1/dashboard/")]
POSTS = ["/v1/tokenhub/keys", "/v1/tokenhub/keys/key_x/revoke", "/v1/tokenhub/redeem"]
OTHERS = [("PUT", "/v1/tokenhub/alerts"), ("DELETE", "/v1/tokenhub/alerts")]


def _cny(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "CNY"}


def test_balance(world: World) -> None:
    r = world.call("GET", "/v1/tokenhub/balance", "acme")
    assert r.status == 200
    b = r.json
    assert b["tenant"] == "acme" and b["currency"] == "CNY"
    # 100 topped up - 10 for the package - 6 for 1M in + 500k out of gpt-4o-mini at 2/8 per 1M.
    assert b["wallet"] == _cny("84.00")
    assert b["credit_limit"] == _cny("50.00") and b["credit_available"] == _cny("50.00")
    assert b["credit_used"] == _cny("0.00") and b["overrun"] == _cny("0.00")
    assert b["spendable"] == _cny("134.00")  # what a low-balance alert compares
    [pkg] = b["packages"]
    assert pkg["id"] == world.lot_id and pkg["plan"] == "qwen-1k"
    assert (pkg["tokens_left"], pkg["tokens_total"]) == (1000 - 150, 1000)  # qwen-plus's 150
    assert isinstance(pkg["tokens_left"], int) and pkg["models"] == ["qwen-plus"]
    assert pkg["expires_ms"] > pkg["valid_from_ms"]
    assert b["points"] == {"left": "0", "packs": []}
    # Another tenant's figures are its own.
    other = world.call("GET", "/v1/tokenhub/balance", "bravo").json
    assert other["tenant"] == "bravo" and other["currency"] == "USD" and other["packages"] == []


def test_usage_grouped(world: World) -> None:
    since = day_ms(world.day0)
    q = f"since={since}&until={since + 2 * DAY_MS}"
    by_day = world.call("GET", f"/v1/tokenhub/usage?{q}&group_by=day", "acme").json
    d0, d1 = world.day0.isoformat(), (world.day0 + dt.timedelta(days=1)).isoformat()
    assert by_day["data"] == [
        {"day": d0, "requests": 1, "ok": 1, "input_tokens": 1_000_000,
         "cached_input_tokens": 0, "output_tokens": 500_000, "cost": [_cny("6.00")]},
        {"day": d1, "requests": 2, "ok": 1, "input_tokens": 100,
         "cached_input_tokens": 20, "output_tokens": 50, "cost": [_cny("1.50")]},
    ]  # fmt: skip
    assert by_day["truncated"] is False
    by_model = world.call("GET", f"/v1/tokenhub/usage?{q}&group_by=model", "acme").json
    assert [(g["model"], g["requests"]) for g in by_model["data"]] == [
        ("gpt-4o-mini", 1),
        ("qwen-plus", 2),
    ]
    by_key = world.call("GET", f"/v1/tokenhub/usage?{q}&group_by=key", "acme").json
    assert [g["key_id"] for g in by_key["data"]] == [world.key_ids["acme"]]  # never bravo's
    bravo = world.call("GET", f"/v1/tokenhub/usage?{q}&group_by=key", "bravo").json
    assert [(g["key_id"], g["input_tokens"]) for g in bravo["data"]] == [
        (world.key_ids["bravo"], 7)
    ]
    # Default window: the last 31 days, which hold the seeded events.
    default = world.call("GET", "/v1/tokenhub/usage", "acme").json
    assert default["group_by"] == "day"
    assert default["until_ms"] - default["since_ms"] == 31 * DAY_MS
    assert sum(g["requests"] for g in default["data"]) >= 3


@pytest.mark.parametrize(
    "query, param",
    [
        ("group_by=tenant", "group_by"),
        ("since=2026-01-01&until=2026-12-01", "since"),  # more than 92 days
        ("since=2026-02-01&until=2026-01-01", "until"),
        ("since=yesterday", "since"),
    ],
)
def test_usage_refuses_bad_queries(world: World, query: str, param: str) -> None:
    r = world.call("GET", f"/v1/tokenhub/usage?{query}", "acme")
    assert r.status == 400
    assert r.json["error"]["type"] == "invalid_request_error"
    assert r.json["error"]["param"] == param


def test_legacy_subscription_and_usage(world: World) -> None:
    """The shapes one-api serves and client apps read; USD at the terms' CNY/USD 0.14."""
    sub = world.call("GET", "/v1/dashboard/billing/subscription", "acme").json
    # The whole line: 84 in the wallet + 50 of credit + the 6 already used, in USD.
    assert sub == {
        "object": "billing_subscription",
        "has_payment_method": True,
        "soft_limit_usd": 19.6,
        "hard_limit_usd": 19.6,
        "system_hard_limit_usd": 19.6,
        "access_until": 0,
    }
    start, end = world.day0, world.day0 + dt.timedelta(days=2)
    usage = world.call(
        "GET", f"/v1/dashboard/billing/usage?start_date={start}&end_date={end}", "acme"
    ).json
    assert usage == {"object": "list", "total_usage": 84.0}  # 6 CNY = 0.84 USD, in cents
    # What a client shows as the balance: the wallet and the credit left, in USD.
    assert sub["hard_limit_usd"] - usage["total_usage"] / 100 == pytest.approx(134 * 0.14)
    before = world.call(
        "GET", f"/v1/dashboard/billing/usage?start_date={start}&end_date={start}", "acme"
    )
    assert before.status == 400 and before.json["error"]["param"] == "end_date"
    other = world.call(
        "GET", f"/v1/dashboard/billing/usage?start_date={start}&end_date={end}", "bravo"
    ).json
    assert other["object"] == "list" and 0 < other["total_usage"] < 1  # bravo's 10 tokens only


def test_legacy_endpoints_without_a_usd_rate(world: World) -> None:
    for path in LEGACY:
        r = world.call("GET", path, "charlie")
        assert r.status == 503, path
        assert r.json["error"]["code"] == "fx_rate_missing"
        assert "EUR" in r.json["error"]["message"]


@pytest.mark.parametrize("secret", [None, "th-not-a-key-at-all-0123456789abcdef", "x"])
def test_bad_key_is_401_on_every_route(world: World, secret: str | None) -> None:
    for method, paths in (("GET", GETS), ("POST", POSTS), *((m, [p]) for m, p in OTHERS)):
        for path in paths:
            r = world.call(method, path, secret=secret)
            assert r.status == 401, (method, path)
            assert r.json["error"]["code"] == "invalid_api_key"


def test_keys_secret_shown_once_and_revoke(world: World) -> None:
    made = world.call("POST", "/v1/tokenhub/keys", "acme")
    assert made.status == 201
    key = made.json
    secret = key["secret"]
    assert secret.startswith(key["prefix"]) and key["revoked_ms"] is None
    listed = world.call("GET", "/v1/tokenhub/keys", "acme")
    assert secret.encode() not in listed.raw and b"secret" not in listed.raw
    mine = {k["id"]: k for k in listed.json["data"]}
    assert set(mine) >= {key["id"], world.key_ids["acme"]}
    assert world.key_ids["bravo"] not in mine
    assert mine[key["id"]]["prefix"] == key["prefix"]
    # The new key works, on the tenant API and on completions.
    wait_until(lambda: world.hub.knows(secret), 5.0, what="the new key")
    assert world.call("GET", "/v1/tokenhub/balance", secret=secret).json["tenant"] == "acme"
    # Revoked with the tenant's other key; then it is refused everywhere.
    rv = world.call("POST", f"/v1/tokenhub/keys/{key['id']}/revoke", "acme")
    assert rv.status == 200 and rv.json["revoked_ms"] is not None
    assert "secret" not in rv.json
    wait_until(lambda: not world.hub.knows(secret), 5.0, what="the revocation")
    for path in GETS:
        assert world.call("GET", path, secret=secret).status == 401
    with world.hub.client(api_key=secret) as c, pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    again = world.call("POST", f"/v1/tokenhub/keys/{key['id']}/revoke", "acme")
    assert again.status == 400  # already revoked


def test_tenant_cannot_touch_another_tenants_keys(world: World) -> None:
    bravo_key = world.key_ids["bravo"]
    missing = world.call("POST", "/v1/tokenhub/keys/key_doesnotexist/revoke", "acme")
    theirs = world.call("POST", f"/v1/tokenhub/keys/{bravo_key}/revoke", "acme")
    assert missing.status == theirs.status == 404  # not 403: no hint that the id exists
    assert theirs.json["error"]["code"] == "not_found"
    # Bravo's key still works and is still listed as active, for bravo only.
    listed = world.call("GET", "/v1/tokenhub/keys", "bravo").json["data"]
    assert [(k["id"], k["revoked_ms"]) for k in listed] == [(bravo_key, None)]
    assert world.hub.knows(world.secrets["bravo"])


def test_key_count_policy(world: World) -> None:
    active = len(world.call("GET", "/v1/tokenhub/keys", "delta").json["data"])
    for _ in range(MAX_KEYS_PER_TENANT - active):
        assert world.call("POST", "/v1/tokenhub/keys", "delta").status == 201
    refused = world.call("POST", "/v1/tokenhub/keys", "delta")
    assert refused.status == 403
    assert refused.json["error"]["code"] == "key_limit_reached"
    keys = world.call("GET", "/v1/tokenhub/keys", "delta").json["data"]
    assert len(keys) == MAX_KEYS_PER_TENANT


def test_redeem_is_idempotent(world: World) -> None:
    code = world.codes[0]
    idem = {"Idempotency-Key": f"redeem-{uuid.uuid4()}"}
    no_key = world.call("POST", "/v1/tokenhub/redeem", "bravo", body={"code": code})
    assert no_key.status == 400 and no_key.json["error"]["param"] == "Idempotency-Key"
    before = world.call("GET", "/v1/tokenhub/balance", "bravo").json["wallet"]
    first = world.call("POST", "/v1/tokenhub/redeem", "bravo", body={"code": code}, headers=idem)
    assert first.status == 201
    wallet = first.json["wallet"]
    assert wallet["currency"] == "USD"
    assert float(wallet["amount"]) == pytest.approx(float(before["amount"]) + 3)
    replay = world.call("POST", "/v1/tokenhub/redeem", "bravo", body={"code": code}, headers=idem)
    assert replay.status == 201 and replay.raw == first.raw
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert world.call("GET", "/v1/tokenhub/balance", "bravo").json["wallet"] == wallet
    other = world.call("POST", "/v1/tokenhub/redeem", "bravo", body={"code": "thc-x"}, headers=idem)
    assert other.status == 409
    # Used once: a fresh key cannot redeem it again, for bravo or anyone else.
    fresh = {"Idempotency-Key": f"redeem-{uuid.uuid4()}"}
    used = world.call("POST", "/v1/tokenhub/redeem", "acme", body={"code": code}, headers=fresh)
    assert used.status == 400 and "used" in used.json["error"]["message"]


def test_openai_client_on_the_same_server(world: World) -> None:
    with world.hub.client(api_key=world.secrets["acme"]) as c:
        reply = c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.choices[0].message.content
        assert "gpt-4o-mini" in {m.id for m in c.models.list()}
    assert world.call("GET", "/v1/tokenhub/balance", "acme").status == 200
    unknown = world.call("GET", "/v1/tokenhub/nothing", "acme")
    assert unknown.status == 404 and unknown.json["error"]["code"] == "unknown_url"


def test_key_count_policy_holds_under_concurrent_creates(world: World) -> None:
    """8 creations at once for a tenant one key below the limit: exactly one gets through."""
    world.hub.store.create_tenant("echo")
    _, secret = world.hub.store.create_key("echo")
    for _ in range(MAX_KEYS_PER_TENANT - 2):
        world.hub.store.create_key("echo")
    wait_until(lambda: world.hub.knows(secret), 5.0, what="echo's key")
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda _: world.call("POST", "/v1/tokenhub/keys", secret=secret), range(8))
        )
    assert sorted(r.status for r in replies) == [201] + [403] * 7
    keys = world.call("GET", "/v1/tokenhub/keys", secret=secret).json["data"]
    assert len(keys) == MAX_KEYS_PER_TENANT
