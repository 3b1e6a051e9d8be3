"""The tenant API's low-balance alert, statements and rate-limit headroom (tokenhub.tenant.routes),
over real HTTP on the seeded hub (conftest.py), on SQLite and PostgreSQL; each checked against
another tenant too."""

from __future__ import annotations

import pytest
from harness import wait_until
from tenant_kit import World, day_ms

from tokenhub.billing.ledger import period_of

HOOK = "https://hooks.example.com/tokenhub?token=t0k"


def _alert_body(amount: str = "100", currency: str = "CNY", url: str = HOOK) -> dict[str, object]:
    return {"threshold": {"amount": amount, "currency": currency}, "webhook_url": url}


def test_alert_set_read_rotate_delete(world: World) -> None:
    assert world.call("GET", "/v1/tokenhub/alerts", "acme").status == 404
    made = world.call("PUT", "/v1/tokenhub/alerts", "acme", body=_alert_body())
    assert made.status == 200, made.json
    a = made.json
    secret = a["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert a["threshold"] == {"amount": "100.00", "currency": "CNY"}
    assert a["webhook_url"] == HOOK and a["armed"] is True and a["fired_ms"] is None
    assert a["spendable"]["currency"] == "CNY"
    # Read back: never the secret.
    got = world.call("GET", "/v1/tokenhub/alerts", "acme")
    assert got.status == 200 and secret.encode() not in got.raw and "secret" not in got.json
    assert got.json["threshold"] == a["threshold"]
    # Changed without rotation: the same secret, not shown again; rotation shows a new one.
    again = world.call("PUT", "/v1/tokenhub/alerts", "acme", body=_alert_body("20"))
    assert again.status == 200 and "secret" not in again.json
    assert again.json["threshold"]["amount"] == "20.00"
    rotated = world.call(
        "PUT", "/v1/tokenhub/alerts", "acme", body=_alert_body("20") | {"rotate_secret": True}
    )
    assert rotated.json["secret"] not in (secret, None)

    # Another tenant sees none and cannot remove acme's.
    assert world.call("GET", "/v1/tokenhub/alerts", "bravo").status == 404
    assert world.call("DELETE", "/v1/tokenhub/alerts", "bravo").status == 404
    assert world.call("GET", "/v1/tokenhub/alerts", "acme").status == 200

    gone = world.call("DELETE", "/v1/tokenhub/alerts", "acme")
    assert gone.status == 200 and gone.json == {"object": "tokenhub.alert", "deleted": True}
    assert world.call("GET", "/v1/tokenhub/alerts", "acme").status == 404
    assert world.call("DELETE", "/v1/tokenhub/alerts", "acme").status == 404


@pytest.mark.parametrize(
    "body",
    [
        _alert_body(amount="0"),
        _alert_body(amount="-5"),
        _alert_body(amount="ten"),
        _alert_body(currency="USD"),  # acme settles in CNY
        _alert_body(url="http://hooks.example.com/x"),  # https only (no operator opt-in here)
        _alert_body(url="https://127.0.0.1:9/x"),
        _alert_body(url="https://192.168.1.5/x"),
        _alert_body(url="https://localhost/x"),
        _alert_body(url="https://u:p@hooks.example.com/x"),
        _alert_body(url="https://hooks.example.com/" + "x" * 2100),
        _alert_body(url="file:///etc/passwd"),
        {"threshold": {"amount": "5", "currency": "CNY"}},
        _alert_body() | {"extra": 1},
    ],
)
def test_alert_refused_values_change_nothing(world: World, body: dict[str, object]) -> None:
    r = world.call("PUT", "/v1/tokenhub/alerts", "bravo", body=body | _bravo(body))
    assert r.status == 400, r.json
    assert r.json["error"]["type"] == "invalid_request_error"
    assert world.call("GET", "/v1/tokenhub/alerts", "bravo").status == 404


def _bravo(body: dict[str, object]) -> dict[str, object]:
    """bravo settles in USD: the CNY of the bodies above becomes USD, except where the
    currency itself is the fault."""
    t = body.get("threshold")
    if isinstance(t, dict) and t.get("currency") == "CNY":
        return {"threshold": {**t, "currency": "USD"}}
    if isinstance(t, dict) and t.get("currency") == "USD":
        return {"threshold": {**t, "currency": "CNY"}}
    return {}


def test_statement_of_a_month(world: World) -> None:
    period = period_of(day_ms(world.day0) + 3_600_000)
    st = world.call("GET", f"/v1/tokenhub/statements/{period}", "acme")
    assert st.status == 200
    s = st.json
    assert s["object"] == "tokenhub.statement" and s["tenant"] == "acme"
    assert s["period"] == period
    assert {u["model"] for u in s["usage"]} >= {"gpt-4o-mini"}
    assert all(row["account"].startswith("t:acme:") for row in s["closing"])
    # bravo's statement of the same month is bravo's only.
    other = world.call("GET", f"/v1/tokenhub/statements/{period}", "bravo")
    assert other.status == 200 and other.json["tenant"] == "bravo"
    assert b"acme" not in other.raw and world.lot_id.encode() not in other.raw
    for bad in ("2026-13x", "202611", "last"):
        r = world.call("GET", f"/v1/tokenhub/statements/{bad}", "acme")
        assert r.status == 400 and r.json["error"]["type"] == "invalid_request_error"


def test_limits_configured_and_live(world: World) -> None:
    none = world.call("GET", "/v1/tokenhub/limits", "bravo").json
    assert none["object"] == "tokenhub.limits"
    assert none["key"] == {
        "id": world.key_ids["bravo"],
        "limits": {"rpm": None, "tpm": None, "max_concurrency": None},
        "live": None,
    }
    assert none["tenant"]["name"] == "bravo" and none["tenant"]["live"] is None
    assert set(none["tenant"]["limits"].values()) == {None}

    key = world.key_ids["charlie"]
    world.hub.store.set_limits("key", key, rpm=7, max_concurrency=3)
    world.hub.store.set_limits("tenant", "charlie", tokens_per_day=5000)
    wait_until(
        lambda: (
            f"key:{key}" in world.hub.limits.limited
            and "tenant:charlie" in world.hub.limits.limited
        ),
        5.0,
        what="the gateway's limits",
    )
    got = world.call("GET", "/v1/tokenhub/limits", "charlie").json
    assert got["key"]["id"] == key
    assert got["key"]["limits"] == {"rpm": 7, "tpm": None, "max_concurrency": 3}
    live = got["key"]["live"]
    assert live["requests_per_minute"]["limit"] == 7
    assert live["requests_per_minute"]["remaining"] == 7
    assert live["concurrent"] == {"limit": 3, "in_flight": 0}
    assert got["tenant"]["limits"]["tokens_per_day"] == 5000
    today = got["tenant"]["live"]["tokens_today"]
    assert today["limit"] == 5000 and today["remaining"] == 5000 - today["used"] - today["held"]
    # bravo still sees only its own (no limits), never charlie's.
    again = world.call("GET", "/v1/tokenhub/limits", "bravo")
    assert again.json == none and key.encode() not in again.raw
