"""The bulk-extraction guard's arithmetic (tokenhub.gateway.guard): velocity and baseline per key
from the shared table, the ceiling and jump rules, throttling; the gateway end is in
tests/server/test_limits.py."""

from __future__ import annotations

import pytest

from tokenhub.gateway.guard import (
    MIN_BASELINE_TPM,
    SAMPLE_S,
    THROTTLE_S,
    WARMUP_S,
    Guard,
    GuardConfig,
)
from tokenhub.quota import Quota


def steady(g: Guard, key: str, tpm: float, seconds: float, t0: float, tenant: str = "t") -> float:
    """Feeds `tpm` tokens per minute for `seconds`, sampling every SAMPLE_S; returns the time."""
    t = t0
    while t < t0 + seconds:
        g.record(tenant, key, int(tpm * SAMPLE_S / 60))
        t += SAMPLE_S
        g.sample(t)
    return t


def test_velocity_follows_the_rate_and_the_ceiling_trips() -> None:
    g = Guard(Quota.anonymous(accounts=64, reservations=16))
    g.configs["t"] = GuardConfig(ceiling_tpm=50_000, jump=None)
    t = steady(g, "k1", 30_000, 600, 1000.0)
    ((tenant, key, vel, base),) = g.velocities()
    assert 0 < base < vel  # the hour-long average is still catching up
    assert (tenant, key) == ("t", "k1")
    assert abs(vel - 30_000) < 300  # converged within 1%
    assert g.blocked_ms("k1", int(t * 1000)) == 0 and g.tripped == 0
    # Ten times the rate: tripped within a few samples (the average needs to pass 50k).
    trips: list[dict[str, object]] = []
    for _ in range(12):
        g.record("t", "k1", int(300_000 * SAMPLE_S / 60))
        t += SAMPLE_S
        trips += g.sample(t)
        if trips:
            break
    assert len(trips) == 1 and "above the ceiling of 50000" in str(trips[0]["reason"])
    assert 0 < g.blocked_ms("k1", int(t * 1000)) <= THROTTLE_S * 1000
    assert g.blocked_ms("k1", int((t + THROTTLE_S + 1) * 1000)) == 0
    # Another key of the tenant is not affected; a tenant without a config is never throttled.
    assert g.blocked_ms("k2", int(t * 1000)) == 0


def test_jump_over_the_baseline_after_warmup_only() -> None:
    g = Guard(Quota.anonymous(accounts=64, reservations=16))
    g.configs["t"] = GuardConfig(ceiling_tpm=None, jump=10)
    # Before the warm-up, a burst is not a jump (there is no baseline to jump from).
    t = steady(g, "new", 40 * MIN_BASELINE_TPM, 60, 0.0)
    assert g.tripped == 0
    # A key with 10 minutes at 2,000 tpm, then 30x that.
    t = steady(g, "old", 2_000, WARMUP_S + 300, t)
    base = dict(((k, b) for _, k, _, b in g.velocities()))["old"]
    assert 0 < base <= 2_000
    trips: list[dict[str, object]] = []
    while not trips:
        g.record("t", "old", int(60_000 * SAMPLE_S / 60))
        t += SAMPLE_S
        trips = g.sample(t)
    assert "above 10x its baseline" in str(trips[0]["reason"])
    at_trip = trips[0]["baseline_tpm"]
    assert isinstance(at_trip, int) and at_trip >= base
    # The baseline is frozen while the key is throttled: the burst does not teach it.
    t = steady(g, "old", 60_000, 50, t)
    assert abs(dict(((k, b) for _, k, _, b in g.velocities()))["old"] - at_trip) <= 1
    assert g.blocked_ms("old", int(t * 1000)) > 0 and g.tripped == 1


def test_only_velocity_accounts_are_sampled() -> None:
    q = Quota.anonymous(accounts=64, reservations=16)
    q.set_limits("tenant:t", tokens=100)
    q.charge("tenant:t", tokens=7)
    g = Guard(q)
    g.sample(10.0)
    assert q.state("tenant:t").tokens.used == 7
    assert g.velocities() == []


@pytest.mark.parametrize("tokens", [0, -5])
def test_nothing_recorded_for_no_tokens(tokens: int) -> None:
    g = Guard(Quota.anonymous(accounts=64, reservations=16))
    g.record("t", "k", tokens)
    assert g.quota.table.find_account("vel:t:k") is None
