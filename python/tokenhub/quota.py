"""Shared quota: budgets, rate limits and concurrency per account, one table for all workers.

A thin layer over :class:`tokenhub._core.QuotaTable` (the design, the invariants and the figures
are in ``rust/quota/mod.rs``). The gateway's parent creates the table before it forks its workers;
each worker attaches it, so ``tokenhub serve --workers N`` enforces one limit, not N times it::

    quota = Quota.create("/dev/shm/tokenhub-quota")        # parent, before forking
    quota = Quota.attach("/dev/shm/tokenhub-quota")        # each worker
    quota.set_limits("tenant:acme", tokens=10_000_000, money=50 * 10**9, rpm=None)
    quota.set_limits("key:k1", rpm=600, tpm=200_000, concurrent=20)

    r = quota.reserve(("key:k1", "tenant:acme"), tokens=prompt + max_tokens, money=max_price)
    if isinstance(r, Refusal):
        ...  # 429 with r.code and r.headers()
    ...      # the upstream call
    quota.settle(r, tokens=usage.total_tokens, money=price)   # or quota.cancel(r)

Reservations are upper bounds (prompt tokens + max output, the price of that); the settle records
what was really used. A stream that runs past its reservation takes more with :meth:`Quota.extend`
(which also pushes the deadline out). A reservation that is never settled (a crashed request)
expires at its deadline: :meth:`Quota.expire_due` releases it, from any process, as often as
wanted (every second from one timer is plenty; ``reserve`` also sweeps when the table is full).

Names: an account is any name of at most ``QuotaTable.NAME_MAX`` bytes ("key:<id>",
"tenant:<id>", ...). Money is in integer nano-units. A limit of ``None`` is unlimited.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from tokenhub._core import (
    QuotaError,
    QuotaFileError,
    QuotaFullError,
    QuotaRefusal,
    QuotaTable,
    ReservationError,
)

__all__ = [
    "DEFAULT_TTL_MS",
    "LIMITS",
    "AccountState",
    "BudgetState",
    "Quota",
    "QuotaError",
    "QuotaFileError",
    "QuotaFullError",
    "QuotaTable",
    "RateState",
    "Refusal",
    "Reservation",
    "ReservationError",
    "Settled",
    "TableStats",
    "format_reset",
]

UNLIMITED = QuotaTable.UNLIMITED
LIMITS = ("tokens", "money", "requests", "concurrent", "rpm", "tpm")
BUDGETS = ("tokens", "money", "requests")
# Long enough for a slow non-streamed completion; streams extend their reservation as they go.
DEFAULT_TTL_MS = 300_000


def format_reset(ms: int) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it: 20ms, 1s, 6m0s."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _limit_or_none(v: int) -> int | None:
    return None if v == UNLIMITED else v


_MAX_AMOUNT = 2**63 - 1


def _amount(n: int) -> int:
    """A usage amount as the table takes it: never negative, never past 2^63-1 (the table
    saturates its counters; a Python int beyond 64 bits would not even cross into it)."""
    return min(max(n, 0), _MAX_AMOUNT)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Not admitted: which account and limit, and what the client should be told."""

    account: str
    limit: str  # tokens, money, requests (budgets), concurrent, rpm, tpm
    code: str  # OpenAI's: insufficient_quota (a budget) or rate_limit_exceeded
    limit_value: int
    remaining: int
    retry_after_ms: int | None  # rate limits: when this request would fit (None: never)
    reset_ms: int | None  # rate limits: when the limit is full again

    @property
    def message(self) -> str:
        if self.limit in BUDGETS:
            return f"{self.account} has exceeded its {self.limit} quota ({self.limit_value})"
        if self.limit == "concurrent":
            return f"{self.account} has {self.limit_value} requests in flight, its limit"
        return (
            f"Rate limit reached for {self.account}: {self.limit_value} "
            f"{'requests' if self.limit == 'rpm' else 'tokens'} per minute"
        )

    def headers(self) -> dict[str, str]:
        """``retry-after`` and, for a rate limit, its ``x-ratelimit-*`` headers."""
        out: dict[str, str] = {}
        if self.retry_after_ms is not None:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_ms / 1000)))
        if self.limit in ("rpm", "tpm"):
            kind = "requests" if self.limit == "rpm" else "tokens"
            out[f"x-ratelimit-limit-{kind}"] = str(self.limit_value)
            out[f"x-ratelimit-remaining-{kind}"] = str(self.remaining)
            out[f"x-ratelimit-reset-{kind}"] = format_reset(self.reset_ms or 0)
        return out


@dataclass(slots=True)
class Reservation:
    """An admitted reservation. Keep it until settle or cancel (or let it expire)."""

    id: int
    accounts: tuple[int, ...]
    tokens: int
    money: int
    requests: int
    ended: bool = False


@dataclass(frozen=True, slots=True)
class Settled:
    overrun_tokens: int  # used beyond the reservation (recorded, and counted as used)
    overrun_money: int
    late: bool  # the reservation had expired first: all of the usage is overrun


@dataclass(frozen=True, slots=True)
class BudgetState:
    limit: int | None
    used: int
    held: int
    overrun: int


@dataclass(frozen=True, slots=True)
class RateState:
    limit: int | None
    remaining: int | None
    reset_ms: int


@dataclass(frozen=True, slots=True)
class AccountState:
    name: str
    index: int
    tokens: BudgetState
    money: BudgetState
    requests: BudgetState
    concurrent_limit: int | None
    inflight: int
    rpm: RateState
    tpm: RateState
    admitted: int
    refused: int


@dataclass(frozen=True, slots=True)
class TableStats:
    account_capacity: int
    accounts: int
    reservation_capacity: int
    held: int  # live reservations
    busy: int  # slots mid-call
    free: int
    reserved: int  # ever
    settled: int
    cancelled: int
    expired: int
    late: int  # of the expired, settled afterwards


class Quota:
    """The gateway's view of the shared table: names instead of indexes, dataclass results."""

    __slots__ = ("_index", "table")

    def __init__(self, table: QuotaTable) -> None:
        self.table = table
        self._index: dict[str, int] = {}

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, accounts: int = 1024, reservations: int = 16384
    ) -> Quota:
        return cls(QuotaTable.create(path, accounts, reservations))

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> Quota:
        return cls(QuotaTable.attach(path))

    @classmethod
    def anonymous(cls, *, accounts: int = 1024, reservations: int = 16384) -> Quota:
        return cls(QuotaTable.anonymous(accounts, reservations))

    # -- accounts --------------------------------------------------------------------------

    def account(self, name: str) -> int:
        """The account's index (created, unlimited, if new); cached per process."""
        try:
            return self._index[name]
        except KeyError:
            index = self._index[name] = self.table.account(name)
            return index

    def _indexes(self, accounts: str | Sequence[str]) -> tuple[int, ...]:
        if isinstance(accounts, str):
            return (self.account(accounts),)
        return tuple(self.account(a) for a in accounts)

    def set_limits(self, name: str, **limits: int | None) -> None:
        """Sets the named limits (tokens, money, requests, concurrent, rpm, tpm); None = none."""
        index = self.account(name)
        for limit, value in limits.items():
            self.table.set_limit(index, limit, UNLIMITED if value is None else value)

    def limits(self, name: str) -> dict[str, int | None]:
        index = self.account(name)
        return {lim: _limit_or_none(self.table.get_limit(index, lim)) for lim in LIMITS}

    def add_budget(self, name: str, limit: str, delta: int) -> int | None:
        """Tops a budget up (or down); returns the new limit."""
        return _limit_or_none(self.table.add_budget(self.account(name), limit, delta))

    def release_used(self, name: str, limit: str, amount: int) -> int:
        """Gives back up to `amount` of a budget's used (usage accounted for elsewhere since,
        e.g. posted to the ledger); returns the amount released."""
        return self.table.release_used(self.account(name), limit, amount)

    def reset_used(self, name: str, limit: str) -> int:
        """Starts a new period for a budget; returns the usage cleared."""
        return self.table.reset_used(self.account(name), limit)

    # -- reservations ----------------------------------------------------------------------

    def reserve(
        self,
        accounts: str | Sequence[str],
        *,
        tokens: int = 0,
        money: int = 0,
        requests: int = 1,
        concurrent: bool = True,
        ttl_ms: int = DEFAULT_TTL_MS,
    ) -> Reservation | Refusal:
        """Takes the amounts from every account (key, tenant, ...), all or none."""
        idx = self._indexes(accounts)
        r = self.table.reserve(idx, tokens, money, requests, concurrent, ttl_ms)
        if isinstance(r, QuotaRefusal):
            return self._refusal(r)
        return Reservation(r, idx, tokens, money, requests)

    def _refusal(self, r: QuotaRefusal) -> Refusal:
        return Refusal(
            account=self.table.account_name(r.account),
            limit=r.limit,
            code=r.code,
            limit_value=r.limit_value,
            remaining=r.remaining,
            retry_after_ms=r.retry_after_ms,
            reset_ms=r.reset_ms,
        )

    def settle(
        self, res: Reservation, *, tokens: int, money: int = 0, requests: int | None = None
    ) -> Settled:
        """Records the real usage and releases the rest of the reservation.

        Usage is never lost: a reservation that expired first is still charged (as overrun),
        even once its slot has been reused.
        """
        if res.ended:
            raise ReservationError(f"reservation {res.id:#x} was already settled or cancelled")
        tokens, money = _amount(tokens), _amount(money)
        try:
            o_tokens, o_money, late = self.table.settle(res.id, tokens, money, requests)
        except ReservationError:
            try:
                state = self.table.reservation_state(res.id)
            except ReservationError:
                state = None  # expired, and its slot reused since
            if state is not None:
                raise
            self.table.charge(
                res.accounts, tokens, money, res.requests if requests is None else requests
            )
            o_tokens, o_money, late = tokens, money, True
        res.ended = True
        return Settled(o_tokens, o_money, late)

    def cancel(self, res: Reservation) -> bool:
        """Gives the whole reservation back (the request never reached an upstream)."""
        if res.ended:
            return False
        res.ended = True
        try:
            return self.table.cancel(res.id)
        except ReservationError:
            return False  # expired and reused: nothing is held any more

    def extend(
        self, res: Reservation, *, tokens: int = 0, money: int = 0, ttl_ms: int = DEFAULT_TTL_MS
    ) -> Refusal | None:
        """Reserves another tranche for a stream and pushes its deadline out."""
        r = self.table.extend(res.id, tokens, money, ttl_ms)
        if r is not None:
            return self._refusal(r)
        res.tokens += tokens
        res.money += money
        return None

    def charge(
        self, accounts: str | Sequence[str], *, tokens: int = 0, money: int = 0, requests: int = 0
    ) -> None:
        """Records usage that no reservation covered (all of it as overrun)."""
        self.table.charge(
            self._indexes(accounts), _amount(tokens), _amount(money), _amount(requests)
        )

    def expire_due(self) -> int:
        """Releases the reservations past their deadline; returns how many."""
        return self.table.expire_due()

    # -- reading ---------------------------------------------------------------------------

    def rate_headers(self, name: str) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for an account's rpm and tpm limits (those set)."""
        rl, rr, rreset, tl, tr, treset = self.table.rate_status(self.account(name))
        out: dict[str, str] = {}
        for kind, limit, remaining, reset in (
            ("requests", rl, rr, rreset),
            ("tokens", tl, tr, treset),
        ):
            if limit != UNLIMITED:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                out[f"x-ratelimit-reset-{kind}"] = format_reset(reset)
        return out

    def state(self, name: str) -> AccountState:
        index = self.account(name)
        s = self.table.snapshot(index)

        def budget(dim: str) -> BudgetState:
            return BudgetState(
                _limit_or_none(s[f"{dim}_limit"]),
                s[f"{dim}_used"],
                s[f"{dim}_held"],
                s[f"{dim}_overrun"],
            )

        def rate(dim: str) -> RateState:
            return RateState(
                _limit_or_none(s[f"{dim}_limit"]),
                _limit_or_none(s[f"{dim}_remaining"]),
                s[f"{dim}_reset_ms"],
            )

        return AccountState(
            name=name,
            index=index,
            tokens=budget("tokens"),
            money=budget("money"),
            requests=budget("requests"),
            concurrent_limit=_limit_or_none(s["concurrent_limit"]),
            inflight=s["inflight"],
            rpm=rate("rpm"),
            tpm=rate("tpm"),
            admitted=s["admitted"],
            refused=s["refused"],
        )

    def stats(self) -> TableStats:
        return TableStats(**self.table.stats())
