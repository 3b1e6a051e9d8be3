"""The quota table's Python API: files, errors, refusals, expiry, and the `tokenhub.quota` wrapper.

The arithmetic is checked against a reference model in test_quota_model.py and under
concurrency in test_quota_stress.py; here each behaviour is shown once, with a fake clock.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from tokenhub._core import (
    QuotaError,
    QuotaFileError,
    QuotaFullError,
    QuotaRefusal,
    QuotaTable,
    ReservationError,
)
from tokenhub.quota import Quota, Refusal, Reservation, format_reset

U = QuotaTable.UNLIMITED
S = 1_000_000_000
MS = 1_000_000
T0 = 1_000 * S


def admitted(r: int | QuotaRefusal) -> int:
    assert isinstance(r, int), r
    return r


def refused(r: int | QuotaRefusal) -> QuotaRefusal:
    assert isinstance(r, QuotaRefusal), r
    return r


# -- the file ----------------------------------------------------------------------------------


def test_create_and_attach_share_one_table(tmp_path: Path) -> None:
    path = tmp_path / "quota"
    a = QuotaTable.create(path, accounts=8, reservations=16)
    b = QuotaTable.attach(str(path))
    assert (b.account_capacity, b.reservation_capacity, b.path) == (8, 16, str(path))
    k = a.account("key:1")
    assert b.find_account("key:1") == k and b.account_name(k) == "key:1"
    b.set_limit(k, "tokens", 100)
    rid = admitted(a.reserve(k, tokens=70, now_ns=T0))
    assert refused(b.reserve([k], tokens=70, now_ns=T0)).remaining == 30
    assert b.settle(rid, tokens=20, now_ns=T0) == (0, 0, False)
    assert a.snapshot(k)["tokens_used"] == 20
    # Re-creating replaces the file; the old mapping stays valid (and separate).
    c = QuotaTable.create(path, accounts=8, reservations=16)
    assert c.find_account("key:1") is None
    assert a.snapshot(k)["tokens_used"] == 20
    assert QuotaTable.attach(path).find_account("key:1") is None
    assert sorted(os.listdir(tmp_path)) == ["quota"]


def test_attach_refuses_what_is_not_a_table(tmp_path: Path) -> None:
    path = tmp_path / "t"
    with pytest.raises(QuotaFileError, match="cannot open"):
        QuotaTable.attach(path)
    path.write_bytes(b"\0" * 8192)
    with pytest.raises(QuotaFileError, match="bad magic"):
        QuotaTable.attach(path)
    path.write_bytes(b"tiny")
    with pytest.raises(QuotaFileError, match="shorter than"):
        QuotaTable.attach(path)
    QuotaTable.create(path, 4, 4)
    good = path.read_bytes()
    # Header words: magic, version, layout (slot sizes), capacities, total size.
    for offset, value, message in [
        (8, 2, "layout version 2"),
        (16, 0x80_0000_0140_0100, "slot sizes"),
        (24, 5, "need"),
    ]:
        path.write_bytes(good[:offset] + struct.pack("<Q", value) + good[offset + 8 :])
        with pytest.raises(QuotaFileError, match=message):
            QuotaTable.attach(path)
    path.write_bytes(good[:-128])
    with pytest.raises(QuotaFileError, match="need"):
        QuotaTable.attach(path)
    path.write_bytes(good)
    QuotaTable.attach(path)
    with pytest.raises(QuotaFileError, match="cannot create"):
        QuotaTable.create(tmp_path / "missing-dir" / "t")
    with pytest.raises(ValueError, match="capacity"):
        QuotaTable.create(tmp_path / "zero", accounts=0)
    assert issubclass(QuotaFileError, QuotaError) and issubclass(QuotaError, RuntimeError)


# -- errors ------------------------------------------------------------------------------------


def test_capacity_exhaustion_is_a_clear_error() -> None:
    t = QuotaTable.anonymous(accounts=2, reservations=2)
    a, b = t.account("a"), t.account("b")
    with pytest.raises(QuotaFullError, match="all 2 account slots"):
        t.account("c")
    assert t.find_account("c") is None
    r1 = admitted(t.reserve(a, tokens=1, now_ns=T0))
    admitted(t.reserve(b, tokens=1, now_ns=T0))
    with pytest.raises(QuotaFullError, match="all 2 reservation slots"):
        t.reserve(a, tokens=5, now_ns=T0)
    # Nothing of the failed reservation stays behind.
    assert t.snapshot(a)["tokens_held"] == 1 and t.snapshot(a)["inflight"] == 1
    t.cancel(r1)
    admitted(t.reserve(a, tokens=5, now_ns=T0))


def test_bad_arguments_are_value_errors() -> None:
    t = QuotaTable.anonymous(4, 4)
    k = t.account("k")
    with pytest.raises(ValueError, match="1 to 96 bytes"):
        t.account("x" * (QuotaTable.NAME_MAX + 1))
    with pytest.raises(ValueError, match="1 to 96 bytes"):
        t.account("")
    with pytest.raises(ValueError, match="unknown limit"):
        t.set_limit(k, "tokenz", 1)
    with pytest.raises(ValueError, match="no account with index 3"):
        t.reserve(3)
    with pytest.raises(ValueError, match="twice"):
        t.reserve((k, k))
    with pytest.raises(ValueError, match="1 to 4 accounts"):
        t.reserve((k, 1, 2, 3, 0))
    with pytest.raises(ValueError, match="not a budget"):
        t.add_budget(k, "rpm", 1)
    with pytest.raises(OverflowError):
        t.reserve(k, tokens=-1)
    with pytest.raises(ReservationError, match="unknown reservation"):
        t.settle(12345)


def test_ended_and_stale_reservations() -> None:
    t = QuotaTable.anonymous(4, 1)
    k = t.account("k")
    rid = admitted(t.reserve(k, tokens=10, now_ns=T0))
    t.settle(rid, tokens=5, now_ns=T0)
    with pytest.raises(ReservationError, match="already ended \\(settled\\)"):
        t.settle(rid, tokens=5)
    with pytest.raises(ReservationError, match="settled"):
        t.cancel(rid)
    assert t.reservation_state(rid) == "settled"
    # The slot is reused: the old id is now unknown, never confused with the new one.
    rid2 = admitted(t.reserve(k, tokens=10, now_ns=T0))
    assert rid2 != rid
    with pytest.raises(ReservationError, match="unknown"):
        t.reservation_state(rid)
    assert t.cancel(rid2) is True


# -- limits ------------------------------------------------------------------------------------


def test_budgets_overruns_and_periods() -> None:
    t = QuotaTable.anonymous(4, 16)
    k = t.account("k")
    t.set_limit(k, "tokens", 1_000)
    t.set_limit(k, "money", 10_000)
    rid = admitted(t.reserve(k, tokens=600, money=6_000, now_ns=T0))
    r = refused(t.reserve(k, tokens=500, now_ns=T0))
    assert (r.account, r.limit, r.code, r.limit_value, r.remaining) == (
        k,
        "tokens",
        "insufficient_quota",
        1_000,
        400,
    )
    assert (r.retry_after_ms, r.reset_ms) == (None, None)
    assert "remaining=400" in repr(r)
    # Actual above the reservation: recorded as overrun, never lost.
    assert t.settle(rid, tokens=700, money=5_000, now_ns=T0) == (100, 0, False)
    s = t.snapshot(k)
    assert (s["tokens_used"], s["tokens_held"], s["tokens_overrun"]) == (700, 0, 100)
    assert (s["money_used"], s["requests_used"], s["admitted"], s["refused"]) == (5_000, 1, 1, 1)
    assert t.add_budget(k, "tokens", 500) == 1_500
    assert t.get_limit(k, "tokens") == 1_500
    assert t.reset_used(k, "tokens") == 700
    assert t.snapshot(k)["tokens_overrun"] == 0
    assert t.add_budget(k, "requests", 5) == U


def test_key_and_tenant_all_or_nothing() -> None:
    t = QuotaTable.anonymous(4, 16)
    key, tenant = t.account("key"), t.account("tenant")
    t.set_limit(key, "concurrent", 1)
    t.set_limit(key, "rpm", 10)
    t.set_limit(tenant, "money", 50)
    before = t.snapshot(key, now_ns=T0)
    r = refused(t.reserve((key, tenant), tokens=10, money=60, now_ns=T0))
    assert (r.account, r.limit) == (tenant, "money")
    after = t.snapshot(key, now_ns=T0)
    assert after == before
    rid = admitted(t.reserve((key, tenant), tokens=10, money=50, now_ns=T0))
    r = refused(t.reserve((key, tenant), tokens=1, now_ns=T0))
    assert (r.account, r.limit, r.code) == (key, "concurrent", "rate_limit_exceeded")
    assert t.cancel(rid) is True
    assert t.snapshot(key, now_ns=T0) == {**before, "admitted": 1, "refused": 1}


def test_rate_limits_with_a_fake_clock() -> None:
    t = QuotaTable.anonymous(4, 64)
    k = t.account("k")
    t.set_limit(k, "rpm", 3)
    t.set_limit(k, "tpm", 1_200)
    ids = [admitted(t.reserve(k, tokens=100, now_ns=T0)) for _ in range(3)]
    r = refused(t.reserve(k, tokens=100, now_ns=T0))
    assert (r.limit, r.remaining, r.retry_after_ms, r.reset_ms) == ("rpm", 0, 20_000, 60_000)
    # GCRA: each request moves the rpm TAT by 20 s and the tpm TAT by tokens x 50 ms, and
    # admits while TAT - now <= 60 s.
    admitted(t.reserve(k, tokens=100, now_ns=T0 + 20 * S))  # tpm TAT: T0 + 25 s
    r = refused(t.reserve(k, tokens=1_200, requests=0, now_ns=T0 + 20 * S))
    assert (r.limit, r.remaining, r.retry_after_ms, r.reset_ms) == ("tpm", 1_100, 5_000, 5_000)
    for rid in ids:
        t.settle(rid, tokens=10, now_ns=T0 + 20 * S)
    # 3 x 90 tokens refunded: the tpm TAT falls behind now, so the bucket is full (never more).
    rl, rr, rreset, tl, tr, treset = t.rate_status(k, now_ns=T0 + 20 * S)
    assert (rl, rr, tl, tr, treset) == (3, 0, 1_200, 1_200, 0)
    assert rreset == 60_000


def test_expiry_and_late_settle() -> None:
    t = QuotaTable.anonymous(4, 16)
    k = t.account("k")
    t.set_limit(k, "tokens", 100)
    rid = admitted(t.reserve(k, tokens=100, ttl_ms=50, now_ns=T0))
    assert t.expire_due(now_ns=T0 + 49 * MS) == 0
    refused(t.reserve(k, tokens=1, now_ns=T0))
    assert t.expire_due(now_ns=T0 + 50 * MS) == 1
    assert t.reservation_state(rid) == "expired"
    assert t.snapshot(k)["tokens_held"] == 0 and t.snapshot(k)["inflight"] == 0
    assert t.cancel(rid) is False
    with pytest.raises(ReservationError, match="expired"):
        t.extend(rid, tokens=1)
    # The request finished after all: its usage counts, as overrun.
    assert t.settle(rid, tokens=40, now_ns=T0) == (40, 0, True)
    assert t.reservation_state(rid) == "settled after expiry"
    s = t.snapshot(k)
    assert (s["tokens_used"], s["tokens_overrun"]) == (40, 40)
    st = t.stats()
    assert (st["reserved"], st["expired"], st["late"], st["settled"], st["held"]) == (1, 1, 1, 0, 0)
    # A real-clock deadline: 1 ms.
    rid = admitted(t.reserve(k, tokens=1, ttl_ms=1))
    deadline = QuotaTable.clock_ns() + 50 * MS
    while t.expire_due() == 0:
        assert QuotaTable.clock_ns() < deadline
    assert t.reservation_state(rid) == "expired"


def test_extend_for_streams() -> None:
    t = QuotaTable.anonymous(4, 16)
    k = t.account("k")
    t.set_limit(k, "tokens", 300)
    rid = admitted(t.reserve(k, tokens=100, ttl_ms=1_000, now_ns=T0))
    assert t.extend(rid, tokens=100, ttl_ms=1_000, now_ns=T0 + 900 * MS) is None
    assert t.expire_due(now_ns=T0 + 1_500 * MS) == 0
    r = t.extend(rid, tokens=101, now_ns=T0)
    assert r is not None and (r.limit, r.remaining) == ("tokens", 100)
    assert t.settle(rid, tokens=180, now_ns=T0) == (0, 0, False)
    assert t.snapshot(k)["tokens_used"] == 180


def test_charge_records_unreserved_usage() -> None:
    t = QuotaTable.anonymous(4, 16)
    key, tenant = t.account("key"), t.account("tenant")
    t.set_limit(key, "tokens", 10)
    t.charge((key, tenant), tokens=25, money=7, requests=1)
    for i in (key, tenant):
        s = t.snapshot(i)
        assert (s["tokens_used"], s["tokens_overrun"], s["money_used"], s["requests_used"]) == (
            25,
            25,
            7,
            1,
        )
    refused(t.reserve(key, tokens=1))


# -- the wrapper -------------------------------------------------------------------------------


def test_wrapper_reserve_settle_by_name(tmp_path: Path) -> None:
    q = Quota.create(tmp_path / "q", accounts=8, reservations=8)
    q.set_limits("tenant:acme", tokens=1_000, money=None)
    q.set_limits("key:k1", rpm=2, concurrent=5)
    assert q.limits("key:k1") == {
        "tokens": None,
        "money": None,
        "requests": None,
        "concurrent": 5,
        "rpm": 2,
        "tpm": None,
    }
    r = q.reserve(("key:k1", "tenant:acme"), tokens=800, money=10)
    assert isinstance(r, Reservation)
    no = q.reserve(("key:k1", "tenant:acme"), tokens=300)
    assert isinstance(no, Refusal)
    assert (no.account, no.limit, no.code, no.remaining) == (
        "tenant:acme",
        "tokens",
        "insufficient_quota",
        200,
    )
    assert no.headers() == {} and "tokens quota" in no.message
    assert q.settle(r, tokens=500, money=9).overrun_tokens == 0
    with pytest.raises(ReservationError):
        q.settle(r, tokens=1)
    assert q.cancel(r) is False
    state = q.state("tenant:acme")
    assert (state.tokens.used, state.tokens.limit, state.money.limit) == (500, 1_000, None)
    q.reserve("key:k1", tokens=1)
    rl = q.reserve("key:k1", tokens=1)
    assert isinstance(rl, Refusal) and rl.limit == "rpm"
    h = rl.headers()
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "0"
    assert 29 <= int(h["retry-after"]) <= 30
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert "Rate limit reached for key:k1" in rl.message
    assert set(q.rate_headers("key:k1")) == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }
    assert q.rate_headers("tenant:acme") == {}
    st = q.stats()
    assert (st.reserved, st.settled, st.held) == (2, 1, 1)
    attached = Quota.attach(tmp_path / "q")
    assert attached.state("key:k1").admitted == 2


def test_wrapper_settle_after_expiry_and_reuse_still_charges() -> None:
    q = Quota.anonymous(accounts=4, reservations=1)
    q.set_limits("k", tokens=100)
    r = q.reserve("k", tokens=50, ttl_ms=1)
    assert isinstance(r, Reservation)
    q.table.expire_due(now_ns=QuotaTable.clock_ns() + 10 * MS)
    # The only slot is reused by another request; the first one's id is gone.
    r2 = q.reserve("k", tokens=10)
    assert isinstance(r2, Reservation)
    settled = q.settle(r, tokens=30)
    assert (settled.late, settled.overrun_tokens) == (True, 30)
    s = q.state("k")
    assert (s.tokens.used, s.tokens.overrun, s.tokens.held) == (30, 30, 10)
    assert q.cancel(r2) is True


def test_wrapper_extend_tracks_amounts() -> None:
    q = Quota.anonymous(accounts=4, reservations=4)
    q.set_limits("k", tokens=100)
    r = q.reserve("k", tokens=40)
    assert isinstance(r, Reservation)
    assert q.extend(r, tokens=40) is None and r.tokens == 80
    no = q.extend(r, tokens=40)
    assert isinstance(no, Refusal) and no.remaining == 20 and r.tokens == 80
    q.settle(r, tokens=80)
    assert q.expire_due() == 0


@pytest.mark.parametrize(
    ("ms", "text"), [(0, "0ms"), (20, "20ms"), (1_000, "1s"), (1_500, "1.5s"), (360_000, "6m0s")]
)
def test_format_reset(ms: int, text: str) -> None:
    assert format_reset(ms) == text
