"""The quota table against a plain-Python reference model (hypothesis state machine).

The model states the rules directly: a refusal restores the state exactly as it was (a deep
copy), budgets compare held + used with the limit, rate limits are GCRA with the same integer
arithmetic, a settle moves min(actual, reserved) to used and records the excess as overrun.
Time is a fake clock passed as ``now_ns`` and only moves forward. After every step every
account's counters, rate-limit figures and the table's reservation counts must match.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from tokenhub._core import QuotaRefusal, QuotaTable, ReservationError

U = QuotaTable.UNLIMITED
W = 60_000_000_000  # the rate-limit window, ns
T0 = 10**12
NAMES = ("key-1", "key-2", "tenant")
STEPS = ("concurrent", "rpm", "tpm", "tokens", "money", "requests")
BUDGETS = ("tokens", "money", "requests")

LIMIT_VALUES = {
    "tokens": st.sampled_from([0, 50, 100, 500, 2_000, U]),
    "money": st.sampled_from([0, 100, 1_000, U]),
    "requests": st.sampled_from([0, 1, 3, 10, U]),
    "concurrent": st.sampled_from([0, 1, 2, 5, U]),
    "rpm": st.sampled_from([0, 1, 3, 7, 60, U]),
    "tpm": st.sampled_from([0, 100, 333, 1_000, 100_000, U]),
}


def ceil_ms(ns: int) -> int:
    return -(-ns // 1_000_000)


@dataclass
class Budget:
    limit: int = U
    charged: int = 0
    used: int = 0
    overrun: int = 0


@dataclass
class Account:
    budgets: dict[str, Budget] = field(default_factory=lambda: {b: Budget() for b in BUDGETS})
    conc_limit: int = U
    inflight: int = 0
    rate_limit: dict[str, int] = field(default_factory=lambda: {"rpm": U, "tpm": U})
    tat: dict[str, int] = field(default_factory=lambda: {"rpm": 0, "tpm": 0})
    admitted: int = 0
    refused: int = 0


@dataclass
class Res:
    accounts: tuple[int, ...]
    tokens: int
    money: int
    requests: int
    concurrent: bool
    deadline_ms: int
    state: str = "held"


Refused = tuple[int, str, int, int, int | None, int | None]


def gcra_inc(limit: int, cost: int) -> int | None:
    if cost == 0 or limit in (0, U):
        return None
    return cost * W // limit


class Model:
    def __init__(self) -> None:
        self.accounts: list[Account] = [Account() for _ in NAMES]
        self.res: dict[int, Res] = {}
        self.reserved = self.settled = self.cancelled = self.expired = self.late = 0

    # -- one step on one account: None when it fits (and is applied) -------------------------
    def take(
        self, a: Account, step: str, amount: int, now: int
    ) -> tuple[int, int, int | None, int | None] | None:
        if step == "concurrent":
            if not amount:
                return None
            if a.conc_limit != U and a.inflight >= a.conc_limit:
                return (a.conc_limit, 0, None, None)
            a.inflight += 1
            return None
        if step in ("rpm", "tpm"):
            limit = a.rate_limit[step]
            if limit == 0 and amount:
                return (0, 0, None, None)
            inc = gcra_inc(limit, amount)
            if inc is None:
                return None
            base = max(a.tat[step], now)
            nxt = base + inc
            if nxt - now > W:
                remaining = min(limit, max(0, now + W - base) * limit // W)
                retry = nxt - now - W if inc <= W else None
                return (limit, remaining, retry, base - now)
            a.tat[step] = nxt
            return None
        b = a.budgets[step]
        if amount == 0:
            return None
        if b.limit != U and b.charged + amount > b.limit:
            return (b.limit, max(0, b.limit - b.charged), None, None)
        b.charged += amount
        return None

    def take_all(
        self, accounts: tuple[int, ...], amounts: dict[str, int], now: int
    ) -> Refused | None:
        saved = copy.deepcopy(self.accounts)
        for i in accounts:
            for step in STEPS:
                why = self.take(self.accounts[i], step, amounts[step], now)
                if why is not None:
                    self.accounts = saved
                    self.accounts[i].refused += 1
                    return (i, step, *why)
        return None

    def gcra_refund(self, a: Account, which: str, cost: int) -> None:
        inc = gcra_inc(a.rate_limit[which], cost)
        if inc is not None:
            a.tat[which] = max(0, a.tat[which] - inc)

    def gcra_add(self, a: Account, which: str, cost: int, now: int) -> None:
        inc = gcra_inc(a.rate_limit[which], cost)
        if inc is not None:
            # Debt beyond what was admitted is capped at one window (a minute's wait at most).
            a.tat[which] = min(U, max(a.tat[which], now) + inc, now + W)

    def gcra_adjust(self, a: Account, which: str, reserved: int, actual: int, now: int) -> None:
        if actual < reserved:
            self.gcra_refund(a, which, reserved - actual)
        elif actual > reserved:
            self.gcra_add(a, which, actual - reserved, now)

    # -- operations ------------------------------------------------------------------------
    def reserve(
        self, accounts: tuple[int, ...], t: int, m: int, r: int, conc: bool, ttl: int, now: int
    ) -> Res | Refused:
        amounts = {
            "concurrent": int(conc),
            "rpm": r,
            "tpm": t,
            "tokens": t,
            "money": m,
            "requests": r,
        }
        refused = self.take_all(accounts, amounts, now)
        if refused is not None:
            return refused
        for i in accounts:
            self.accounts[i].admitted += 1
        self.reserved += 1
        return Res(accounts, t, m, r, conc, now // 1_000_000 + ttl)

    def settle(
        self, res: Res, t: int, m: int, r: int | None, now: int
    ) -> tuple[int, int, bool] | str:
        if res.state not in ("held", "expired"):
            return "error"
        req = res.requests if r is None else r
        late = res.state == "expired"
        over_t = over_m = 0
        for i in res.accounts:
            a = self.accounts[i]
            for dim, held, actual in (
                ("tokens", res.tokens, t),
                ("money", res.money, m),
                ("requests", res.requests, req),
            ):
                b = a.budgets[dim]
                if late:
                    b.charged += actual
                    b.used += actual
                    b.overrun += actual
                else:
                    over = max(0, actual - held)
                    b.charged += actual - held
                    b.used += actual
                    b.overrun += over
            if late:
                over_t, over_m = t, m
            else:
                over_t, over_m = max(0, t - res.tokens), max(0, m - res.money)
                if res.concurrent:
                    a.inflight -= 1
            self.gcra_adjust(a, "tpm", res.tokens, t, now)
            self.gcra_adjust(a, "rpm", res.requests, req, now)
        if late:
            self.late += 1
            res.state = "settled after expiry"
        else:
            self.settled += 1
            res.state = "settled"
        return (over_t, over_m, late)

    def cancel(self, res: Res) -> bool | str:
        if res.state == "expired":
            return False
        if res.state != "held":
            return "error"
        for i in res.accounts:
            a = self.accounts[i]
            for dim, held in (
                ("tokens", res.tokens),
                ("money", res.money),
                ("requests", res.requests),
            ):
                a.budgets[dim].charged -= held
            if res.concurrent:
                a.inflight -= 1
            self.gcra_refund(a, "tpm", res.tokens)
            self.gcra_refund(a, "rpm", res.requests)
        self.cancelled += 1
        res.state = "cancelled"
        return True

    def extend(self, res: Res, t: int, m: int, ttl: int, now: int) -> Refused | str | None:
        if res.state != "held":
            return "error"
        amounts = {"concurrent": 0, "rpm": 0, "tpm": t, "tokens": t, "money": m, "requests": 0}
        refused = self.take_all(res.accounts, amounts, now)
        if refused is None:
            res.tokens += t
            res.money += m
        res.deadline_ms = max(res.deadline_ms, now // 1_000_000 + ttl)
        return refused

    def expire_due(self, now: int) -> int:
        n = 0
        for res in self.res.values():
            if res.state == "held" and res.deadline_ms <= now // 1_000_000:
                for i in res.accounts:
                    a = self.accounts[i]
                    for dim, held in (
                        ("tokens", res.tokens),
                        ("money", res.money),
                        ("requests", res.requests),
                    ):
                        a.budgets[dim].charged -= held
                    if res.concurrent:
                        a.inflight -= 1
                res.state = "expired"
                self.expired += 1
                n += 1
        return n

    def charge(self, accounts: tuple[int, ...], t: int, m: int, r: int, now: int) -> None:
        for i in accounts:
            a = self.accounts[i]
            for dim, amt in (("tokens", t), ("money", m), ("requests", r)):
                b = a.budgets[dim]
                b.charged += amt
                b.used += amt
                b.overrun += amt
            self.gcra_add(a, "tpm", t, now)
            self.gcra_add(a, "rpm", r, now)

    def snapshot(self, i: int, now: int) -> dict[str, int]:
        a = self.accounts[i]
        out: dict[str, int] = {}
        for dim, b in a.budgets.items():
            out[f"{dim}_limit"] = b.limit
            out[f"{dim}_used"] = b.used
            out[f"{dim}_held"] = max(0, b.charged - b.used)
            out[f"{dim}_overrun"] = b.overrun
        out["concurrent_limit"] = a.conc_limit
        out["inflight"] = a.inflight
        for which in ("rpm", "tpm"):
            limit = a.rate_limit[which]
            if limit == U:
                out[f"{which}_limit"], out[f"{which}_remaining"], out[f"{which}_reset_ms"] = U, U, 0
            else:
                base = max(a.tat[which], now)
                rem = min(limit, max(0, now + W - base) * limit // W)
                out[f"{which}_limit"] = limit
                out[f"{which}_remaining"] = rem
                out[f"{which}_reset_ms"] = ceil_ms(base - now)
        out["admitted"] = a.admitted
        out["refused"] = a.refused
        return out


accounts_st = st.lists(st.integers(0, len(NAMES) - 1), min_size=1, max_size=2, unique=True).map(
    tuple
)


def refusal_tuple(r: QuotaRefusal) -> tuple[int, str, int, int, int | None, int | None]:
    return (r.account, r.limit, r.limit_value, r.remaining, r.retry_after_ms, r.reset_ms)


def model_refusal(
    indexes: list[int], m: Refused
) -> tuple[int, str, int, int, int | None, int | None]:
    i, step, limit, remaining, retry, reset = m
    return (
        indexes[i],
        step,
        limit,
        remaining,
        None if retry is None else ceil_ms(retry),
        None if reset is None else ceil_ms(reset),
    )


class QuotaMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.table = QuotaTable.anonymous(8, 1024)
        self.idx = [self.table.account(n) for n in NAMES]
        self.model = Model()
        self.now = T0

    @rule(account=st.integers(0, len(NAMES) - 1), data=st.data())
    def set_limit(self, account: int, data: st.DataObject) -> None:
        limit = data.draw(st.sampled_from(list(LIMIT_VALUES)))
        value = data.draw(LIMIT_VALUES[limit])
        self.table.set_limit(self.idx[account], limit, value)
        a = self.model.accounts[account]
        if limit in BUDGETS:
            a.budgets[limit].limit = value
        elif limit == "concurrent":
            a.conc_limit = value
        else:
            a.rate_limit[limit] = value

    @rule(
        target=reservations,
        accounts=accounts_st,
        tokens=st.integers(0, 400),
        money=st.integers(0, 300),
        requests=st.integers(0, 2),
        concurrent=st.booleans(),
        ttl_ms=st.sampled_from([1, 500, 5_000, 600_000]),
    )
    def reserve(
        self,
        accounts: tuple[int, ...],
        tokens: int,
        money: int,
        requests: int,
        concurrent: bool,
        ttl_ms: int,
    ) -> object:
        got = self.table.reserve(
            tuple(self.idx[i] for i in accounts),
            tokens,
            money,
            requests,
            concurrent,
            ttl_ms,
            self.now,
        )
        want = self.model.reserve(accounts, tokens, money, requests, concurrent, ttl_ms, self.now)
        if isinstance(want, Res):
            assert isinstance(got, int), f"refused {got!r}, model admits"
            self.model.res[got] = want
            return got
        assert isinstance(got, QuotaRefusal), "admitted, model refuses"
        assert refusal_tuple(got) == model_refusal(self.idx, want)
        return multiple()

    @rule(
        res=consumes(reservations),
        tokens=st.integers(0, 500),
        money=st.integers(0, 400),
        requests=st.one_of(st.none(), st.integers(0, 3)),
    )
    def settle(self, res: int, tokens: int, money: int, requests: int | None) -> None:
        want = self.model.settle(self.model.res[res], tokens, money, requests, self.now)
        if want == "error":
            with pytest.raises(ReservationError):
                self.table.settle(res, tokens, money, requests, self.now)
        else:
            assert self.table.settle(res, tokens, money, requests, self.now) == want

    @rule(res=reservations)
    def settle_again_fails_or_late(self, res: int) -> None:
        # A reservation id that may have ended: ending it again is an error (or a late settle).
        m = self.model.res[res]
        if m.state in ("held", "expired"):
            return
        with pytest.raises(ReservationError):
            self.table.settle(res, 1, 0, None, self.now)
        with pytest.raises(ReservationError):
            self.table.cancel(res)

    @rule(res=consumes(reservations))
    def cancel(self, res: int) -> None:
        want = self.model.cancel(self.model.res[res])
        if want == "error":
            with pytest.raises(ReservationError):
                self.table.cancel(res)
        else:
            assert self.table.cancel(res) is want

    @rule(
        res=reservations,
        tokens=st.integers(0, 300),
        money=st.integers(0, 200),
        ttl_ms=st.sampled_from([0, 1_000, 60_000]),
    )
    def extend(self, res: int, tokens: int, money: int, ttl_ms: int) -> None:
        want = self.model.extend(self.model.res[res], tokens, money, ttl_ms, self.now)
        if want == "error":
            with pytest.raises(ReservationError):
                self.table.extend(res, tokens, money, ttl_ms, self.now)
            return
        got = self.table.extend(res, tokens, money, ttl_ms, self.now)
        if want is None:
            assert got is None
        else:
            assert got is not None and not isinstance(want, str)
            assert refusal_tuple(got) == model_refusal(self.idx, want)

    @rule(ms=st.integers(0, 90_000), ns=st.integers(0, 999_999))
    def tick(self, ms: int, ns: int) -> None:
        self.now += ms * 1_000_000 + ns

    @rule()
    def expire_due(self) -> None:
        assert self.table.expire_due(self.now) == self.model.expire_due(self.now)

    @rule(
        account=st.integers(0, len(NAMES) - 1),
        dim=st.sampled_from(BUDGETS),
        delta=st.integers(-200, 200),
    )
    def add_budget(self, account: int, dim: str, delta: int) -> None:
        b = self.model.accounts[account].budgets[dim]
        if b.limit != U:
            b.limit = max(0, b.limit + delta)
        assert self.table.add_budget(self.idx[account], dim, delta) == b.limit

    @rule(account=st.integers(0, len(NAMES) - 1), dim=st.sampled_from(BUDGETS))
    def reset_used(self, account: int, dim: str) -> None:
        b = self.model.accounts[account].budgets[dim]
        want = b.used
        b.charged -= b.used
        b.used = b.overrun = 0
        assert self.table.reset_used(self.idx[account], dim) == want

    @rule(
        accounts=accounts_st,
        tokens=st.integers(0, 300),
        money=st.integers(0, 300),
        requests=st.integers(0, 2),
    )
    def charge(self, accounts: tuple[int, ...], tokens: int, money: int, requests: int) -> None:
        self.table.charge(tuple(self.idx[i] for i in accounts), tokens, money, requests, self.now)
        self.model.charge(accounts, tokens, money, requests, self.now)

    @invariant()
    def accounts_match(self) -> None:
        for i, index in enumerate(self.idx):
            assert self.table.snapshot(index, self.now) == self.model.snapshot(i, self.now), NAMES[
                i
            ]

    @invariant()
    def reservations_match(self) -> None:
        s = self.table.stats()
        m = self.model
        held = sum(r.state == "held" for r in m.res.values())
        assert (s["reserved"], s["held"], s["busy"]) == (m.reserved, held, 0)
        assert (s["settled"], s["cancelled"], s["expired"], s["late"]) == (
            m.settled,
            m.cancelled,
            m.expired,
            m.late,
        )
        assert s["reserved"] == s["held"] + s["settled"] + s["cancelled"] + s["expired"]
        for rid, r in m.res.items():
            assert self.table.reservation_state(rid) == r.state


QuotaMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_quota_matches_model = QuotaMachine.TestCase
