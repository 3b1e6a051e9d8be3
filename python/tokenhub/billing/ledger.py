"""The double-entry ledger: accounts, transactions of postings, and the rules they keep.

Every business event (purchase, top-up, usage settlement, refund, expiry, adjustment) is one
`Txn`: a group of `Posting`s written atomically, whose amounts sum to zero **per unit** (each
currency, TOKENS, POINTS). Amounts are debit-positive integers (nanos for money, see
`tokenhub.money`).

Accounts (ids are readable paths; `tenant` is '' for the operator's own):

| account | unit | side | meaning |
|---|---|---|---|
| `t:T:wallet:CUR` | CUR | credit, ceiling 0 | prepaid balance the operator owes tenant T |
| `t:T:receivable:CUR` | CUR | debit, ceiling = credit limit | what T owes (postpaid) |
| `t:T:overrun:CUR` | CUR | debit | usage no contract could pay (shown as debt) |
| `t:T:lot:ID` | TOKENS / POINTS | credit, ceiling 0 | tokens or points T holds in lot ID |
| `t:T:deferred:ID` | CUR | credit | a lot's price not yet earned |
| `op:cash:CUR` | CUR | debit | money received (top-ups, payments) |
| `op:revenue:CUR` | CUR | credit | platform fee revenue |
| `op:provider:P:CUR` | CUR | credit | compute fees payable to provider P |
| `op:channel:CUR` | CUR | credit | channel fees payable |
| `op:breakage:CUR` | CUR | credit | expired, unused lots |
| `op:fx:CUR` | CUR | either | currency position from conversions |
| `op:rounding:CUR` | CUR | either | invoice rounding to minor units |
| `op:promotions:CUR` | CUR | debit | value given by redemption codes |
| `op:issued:UNIT` | TOKENS / POINTS | debit | tokens/points issued and not yet used |

A tenant-facing balance is the negated balance of a credit-side account (a wallet at -100 CNY
holds 100 CNY). **Constrained accounts never go over their ceiling**: a wallet or a lot never
goes negative, a receivable never exceeds the credit limit. The check runs on the locked,
current balance inside the writing transaction (`Book`), and again in the UPDATE itself, so it
holds under any concurrency on SQLite and PostgreSQL.

Work happens in a `Book`: a transaction's working set of accounts, loaded once with row locks
(in id order, so concurrent settlements cannot deadlock), changed in memory as `Txn`s are
posted, and flushed with one UPDATE per touched account and bulk INSERTs of the transactions
and postings. Settling a batch of usage events costs a handful of statements, not a handful per
event.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tokenhub.db.database import Tx
from tokenhub.money import fmt_units


class LedgerError(Exception):
    """A ledger operation that cannot be done as asked (the message says why)."""


class InsufficientFunds(LedgerError):
    def __init__(self, account: str, unit: str, needed: int, available: int) -> None:
        super().__init__(
            f"{account} cannot cover {fmt_units(needed, unit)}: "
            f"{fmt_units(max(available, 0), unit)} available"
        )
        self.account = account
        self.needed = needed
        self.available = available


class Unbalanced(LedgerError):
    pass


class Posting(NamedTuple):
    account: str
    unit: str
    amount: int  # debit-positive


class AccountSpec(NamedTuple):
    tenant: str
    kind: str
    unit: str
    ceiling: int | None  # None: unconstrained


@dataclass
class Txn:
    kind: str  # purchase, topup, redeem, usage, refund, expiry, adjustment, invoice, payment
    tenant: str
    ts_ms: int
    ref: str = ""  # e.g. the usage event id, the lot id
    memo: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    postings: list[Posting] = field(default_factory=list)
    id: str = ""
    period: str = ""

    def add(self, account: str, unit: str, amount: int) -> None:
        if amount:
            self.postings.append(Posting(account, unit, amount))

    def move(self, debit: str, credit: str, unit: str, amount: int) -> None:
        """`amount` from `credit` to `debit` (both legs)."""
        if amount:
            self.postings.append(Posting(debit, unit, amount))
            self.postings.append(Posting(credit, unit, -amount))

    def check(self) -> None:
        sums: dict[str, int] = defaultdict(int)
        for p in self.postings:
            sums[p.unit] += p.amount
        bad = {u: s for u, s in sums.items() if s}
        if bad:
            raise Unbalanced(f"transaction {self.kind} {self.ref!r} does not balance: {bad}")


# -- account ids ------------------------------------------------------------------------------


def wallet(tenant: str, cur: str) -> str:
    return f"t:{tenant}:wallet:{cur}"


def receivable(tenant: str, cur: str) -> str:
    return f"t:{tenant}:receivable:{cur}"


def overrun(tenant: str, cur: str) -> str:
    return f"t:{tenant}:overrun:{cur}"


def lot_units(tenant: str, lot_id: str) -> str:
    return f"t:{tenant}:lot:{lot_id}"


def lot_deferred(tenant: str, lot_id: str) -> str:
    return f"t:{tenant}:deferred:{lot_id}"


def op(kind: str, unit: str, provider: str = "") -> str:
    return f"op:{kind}:{provider}:{unit}" if provider else f"op:{kind}:{unit}"


def spec_for(account: str, unit: str, *, credit_limit: int = 0) -> AccountSpec:
    """The kind, owner and constraint an account id implies."""
    parts = account.split(":")
    if parts[0] == "t":
        tenant, kind = parts[1], parts[2]
        ceiling = {"wallet": 0, "lot": 0, "receivable": credit_limit}.get(kind)
        return AccountSpec(tenant, kind, unit, ceiling)
    if parts[0] == "op":
        return AccountSpec("", parts[1], unit, None)
    raise LedgerError(f"not a ledger account id: {account!r}")


# -- ids and periods -------------------------------------------------------------------------


class _Ids:
    """Per-process state of `new_id`: a random 32-bit process tag and a counter."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tag = random.Random(os.urandom(16)).getrandbits(32)
        self.last_ms = 0
        self.counter = 0


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reset)


def new_id(prefix: str) -> str:
    """`prefix_` + ms (hex) + a counter within the ms + a random process tag: unique, and in
    creation order within a process (across processes, to the millisecond)."""
    ms = max(time.time_ns() // 1_000_000, _ids.last_ms)
    if ms == _ids.last_ms:
        _ids.counter += 1
    else:
        _ids.last_ms, _ids.counter = ms, 0
    return f"{prefix}_{ms:012x}{_ids.counter:06x}{_ids.tag:08x}"


def period_of(ts_ms: int) -> str:
    """The calendar month (UTC) of a time: '2026-11'."""
    d = dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC)
    return f"{d.year:04d}-{d.month:02d}"


def next_period(period: str) -> str:
    y, m = map(int, period.split("-"))
    return f"{y + (m == 12):04d}-{m % 12 + 1:02d}"


def period_bounds(period: str) -> tuple[int, int]:
    """[start, end) of a 'YYYY-MM' period in epoch ms (UTC)."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}", period):
            raise ValueError(period)
        y, m = map(int, period.split("-"))
        start = dt.datetime(y, m, 1, tzinfo=dt.UTC)
    except ValueError:
        raise LedgerError(f"period must look like 2026-11 (got {period!r})") from None
    y2, m2 = map(int, next_period(period).split("-"))
    end = dt.datetime(y2, m2, 1, tzinfo=dt.UTC)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


# -- the working set ---------------------------------------------------------------------------


class Book:
    """Accounts touched by one database transaction. See the module docstring."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self.balance: dict[str, int] = {}
        self.spec: dict[str, AccountSpec] = {}
        self._new: set[str] = set()
        self._locked: set[str] = set()
        self._dirty: set[str] = set()
        self._initial: dict[str, int] = {}
        self.txns: list[Txn] = []
        self._closed: dict[str, str] = {}  # tenant -> latest closed period ('' none)

    async def load(self, specs: dict[str, AccountSpec]) -> None:
        """Declares the accounts this work may post to. Constrained accounts are locked and
        read (created on flush when missing); unconstrained ones (the operator's) are never
        locked, so concurrent settlements do not queue on a shared revenue account: their
        balances are the sums of their postings."""
        for a, sp in specs.items():
            if a not in self.spec:
                self.spec[a] = sp
                self.balance[a] = 0
                self._initial[a] = 0
                if sp.ceiling is None:
                    self._new.add(a)  # ensured on flush (INSERT ... ON CONFLICT DO NOTHING)
        want = sorted(
            a for a, sp in specs.items() if sp.ceiling is not None and a not in self._locked
        )
        for chunk in range(0, len(want), 500):
            ids = want[chunk : chunk + 500]
            marks = ",".join(f"${i + 1}" for i in range(len(ids)))
            rows = await self.tx.fetch(
                f"SELECT id, tenant, kind, unit, balance, ceiling FROM accounts "
                f"WHERE id IN ({marks}) ORDER BY id{self.tx.for_update}",
                *ids,
            )
            found = set()
            for acc, tenant, kind, unit, bal, ceiling in rows:
                found.add(acc)
                self.balance[acc] = bal
                self._initial[acc] = bal
                self.spec[acc] = AccountSpec(tenant, kind, unit, ceiling)
            for a in ids:
                self._locked.add(a)
                if a not in found:
                    self._new.add(a)

    def available(self, account: str) -> int | None:
        """How much more this account can be debited (None: no limit)."""
        s = self.spec[account]
        return None if s.ceiling is None else s.ceiling - self.balance[account]

    def post(self, txn: Txn) -> Txn:
        """Applies a transaction to the working set (all its accounts must be loaded)."""
        txn.check()
        for p in txn.postings:
            if p.account not in self.balance:
                spec = spec_for(p.account, p.unit)
                if spec.ceiling is not None:
                    raise LedgerError(f"account {p.account} was not loaded")
                # An operator account (never constrained, never locked): declared on first use.
                self.spec[p.account] = spec
                self.balance[p.account] = self._initial[p.account] = 0
                self._new.add(p.account)
            if self.spec[p.account].unit != p.unit:
                raise LedgerError(f"{p.account} holds {self.spec[p.account].unit}, not {p.unit}")
        # All-or-nothing: check every constrained leg before changing anything.
        delta: dict[str, int] = defaultdict(int)
        for p in txn.postings:
            delta[p.account] += p.amount
        for acc, d in delta.items():
            ceiling = self.spec[acc].ceiling
            if d > 0 and ceiling is not None and self.balance[acc] + d > ceiling:
                raise InsufficientFunds(acc, self.spec[acc].unit, d, ceiling - self.balance[acc])
        for acc, d in delta.items():
            self.balance[acc] += d
            self._dirty.add(acc)
        txn.id = txn.id or new_id("txn")
        self.txns.append(txn)
        return txn

    async def period_for(self, tenant: str, ts_ms: int) -> str:
        """The period a posting dated `ts_ms` goes to: its month, or the first open month
        after the tenant's latest closed period (closed statements never change)."""
        if tenant not in self._closed:
            self._closed[tenant] = (
                await self.tx.fetchval(
                    "SELECT MAX(period) FROM closed_periods WHERE tenant = $1", tenant
                )
                or ""
            )
        p = period_of(ts_ms)
        closed = self._closed[tenant]
        return next_period(closed) if closed and p <= closed else p

    async def flush(self) -> None:
        tx = self.tx
        now = int(time.time() * 1000)
        for t in self.txns:
            t.period = t.period or await self.period_for(t.tenant, t.ts_ms)
        if self._new:
            # Unconstrained accounts keep balance 0 here: their balance is their postings' sum.
            await tx.executemany(
                "INSERT INTO accounts (id, tenant, kind, unit, balance, ceiling, created_ms) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                [
                    (a, s.tenant, s.kind, s.unit,
                     self.balance[a] if s.ceiling is not None else 0, s.ceiling, now)
                    for a in sorted(self._new)
                    for s in (self.spec[a],)
                ],
            )  # fmt: skip
        for a in sorted((self._dirty & self._locked) - self._new):
            d = self.balance[a] - self._initial[a]
            if not d:
                continue
            # The ceiling is checked again by the database itself: a second line of defence
            # against any writer that bypassed the lock. (CAST: PostgreSQL would otherwise
            # type $1 as int4 from `$1 <= 0` and refuse amounts over 2.1 units.)
            n = await tx.execute(
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2 AND "
                "(ceiling IS NULL OR $1 <= CAST(0 AS BIGINT) OR balance + $1 <= ceiling)",
                d,
                a,
            )
            if n != 1:
                raise InsufficientFunds(a, self.spec[a].unit, d, 0)
        if self.txns:
            await tx.insert_rows(
                "ledger_txns",
                ("id", "kind", "tenant", "ts_ms", "period", "ref", "memo", "details",
                 "created_ms"),
                [
                    (
                        t.id, t.kind, t.tenant, t.ts_ms, t.period, t.ref, t.memo,
                        json.dumps(t.details, sort_keys=True, separators=(",", ":")), now,
                    )
                    for t in self.txns
                ],
            )  # fmt: skip
            await tx.insert_rows(
                "postings",
                ("txn_id", "leg", "account", "unit", "amount"),
                [
                    (t.id, i, p.account, p.unit, p.amount)
                    for t in self.txns
                    for i, p in enumerate(t.postings)
                ],
            )
        self._initial.update({a: self.balance[a] for a in self._dirty})
        self._new.clear()
        self._dirty.clear()
        self.txns = []


async def lock_tenants(tx: Tx, tenants: Iterable[str]) -> None:
    """Serializes billing work per tenant on PostgreSQL (transaction-scoped advisory locks,
    taken in name order so two transactions can never wait on each other in a cycle). SQLite
    runs one writing transaction at a time already."""
    if tx.dialect != "postgresql":
        return
    for t in sorted(set(tenants)):
        await tx.fetchval("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", t)


async def balances(tx: Tx, *, tenant: str | None = None, prefix: str = "") -> dict[str, int]:
    """Account balances (debit-positive) from their postings, by tenant ('' for the
    operator's accounts) and/or id prefix."""
    sql = (
        "SELECT a.id, COALESCE(SUM(p.amount), 0) FROM accounts a "
        "LEFT JOIN postings p ON p.account = a.id"
    )
    args: list[Any] = []
    if tenant is not None:
        sql += " WHERE a.tenant = $1"
        args.append(tenant)
    rows = await tx.fetch(sql + " GROUP BY a.id", *args)
    return {a: int(b) for a, b in rows if a.startswith(prefix)}


async def check_invariants(tx: Tx) -> list[str]:
    """Problems found (empty when the books are sound): every transaction balances per unit,
    each constrained account's balance equals the sum of its postings and is within its
    ceiling."""
    problems: list[str] = []
    for txn_id, unit, s in await tx.fetch(
        "SELECT txn_id, unit, SUM(amount) FROM postings GROUP BY txn_id, unit "
        "HAVING SUM(amount) <> 0"
    ):
        problems.append(f"transaction {txn_id} sums to {s} {unit}")
    for acc, bal, total in await tx.fetch(
        "SELECT a.id, a.balance, COALESCE(SUM(p.amount), 0) FROM accounts a "
        "LEFT JOIN postings p ON p.account = a.id WHERE a.ceiling IS NOT NULL "
        "GROUP BY a.id, a.balance"
    ):
        if int(bal) != int(total):
            problems.append(f"account {acc} balance {bal} != postings {total}")
    for acc, bal, ceiling in await tx.fetch(
        "SELECT id, balance, ceiling FROM accounts WHERE ceiling IS NOT NULL AND balance > ceiling"
    ):
        problems.append(f"account {acc} balance {bal} is over its ceiling {ceiling}")
    return problems
