"""Helpers for the billing tests: times, usage events, and reads of the books."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from tokenhub.billing import ledger as L
from tokenhub.billing import statements
from tokenhub.billing.service import Billing
from tokenhub.db.database import Database, Tx
from tokenhub.usage import UsageEvent

_seq = itertools.count()


def ms(year: int, month: int, day: int = 1, hour: int = 0, minute: int = 0) -> int:
    """Epoch milliseconds of a UTC time."""
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp() * 1000)


def usage(
    tenant: str,
    model: str,
    ts_ms: int,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    provider: str = "dashscope",
    request_id: str | None = None,
) -> UsageEvent:
    return UsageEvent(
        request_id=request_id or f"req_{next(_seq):08d}",
        ts_ms=ts_ms,
        tenant=tenant,
        key_id="key_test",
        endpoint="chat.completions",
        model=model,
        provider=provider,
        input_tokens=input_tokens,
        cached_input_tokens=cached_input_tokens,
        output_tokens=output_tokens,
    )


def per_1m(tokens: int, price_nanos_per_1m: int) -> int:
    """An amount that must come out exact: tokens x price / 1M (asserts no rounding)."""
    amount, rest = divmod(tokens * price_nanos_per_1m, 1_000_000)
    assert rest == 0, "choose test inputs whose charge is exact"
    return amount


async def tx(db: Database, fn: Any, *args: Any) -> Any:
    async def run(t: Tx) -> Any:
        return await fn(t, *args)

    return await db.transaction(run)


async def statement(db: Database, tenant: str, period: str) -> dict[str, Any]:
    st: dict[str, Any] = await tx(db, statements.tenant_statement, tenant, period)
    return st


async def postings_sum(db: Database, account: str) -> int:
    v = await tx(
        db,
        lambda t: t.fetchval(
            "SELECT COALESCE(SUM(amount), 0) FROM postings WHERE account = $1", account
        ),
    )
    return int(v)


async def stored_balance(db: Database, account: str) -> int | None:
    """The `accounts.balance` column (constrained accounts keep it up to date)."""
    v = await tx(db, lambda t: t.fetchval("SELECT balance FROM accounts WHERE id = $1", account))
    return None if v is None else int(v)


async def balance(db: Database, account: str) -> int:
    """Debit-positive balance from postings, checked against the stored column when the
    account keeps one."""
    total = await postings_sum(db, account)
    ceiling = await tx(
        db, lambda t: t.fetchval("SELECT ceiling FROM accounts WHERE id = $1", account)
    )
    if ceiling is not None:
        assert await stored_balance(db, account) == total
    return total


async def wallet_held(db: Database, tenant: str, cur: str) -> int:
    """What the tenant holds in its wallet (the negated credit balance)."""
    return -await balance(db, L.wallet(tenant, cur))


async def posting_count(db: Database) -> int:
    return int(await tx(db, lambda t: t.fetchval("SELECT COUNT(*) FROM postings")))


async def txn_legs(db: Database, txn_id: str) -> list[tuple[str, str, int]]:
    rows = await tx(
        db,
        lambda t: t.fetch(
            "SELECT account, unit, amount FROM postings WHERE txn_id = $1 ORDER BY leg", txn_id
        ),
    )
    return [(a, u, int(x)) for a, u, x in rows]


async def txn_details(db: Database, txn_id: str) -> dict[str, Any]:
    import json

    raw = await tx(
        db, lambda t: t.fetchval("SELECT details FROM ledger_txns WHERE id = $1", txn_id)
    )
    out: dict[str, Any] = json.loads(raw)
    return out


def closing(st: dict[str, Any]) -> dict[str, int]:
    return {r["account"]: r["balance"] for r in st["closing"]}


def opening(st: dict[str, Any]) -> dict[str, int]:
    return {r["account"]: r["balance"] for r in st["opening"]}


async def assert_sound(billing: Billing) -> None:
    assert await billing.invariants() == []
