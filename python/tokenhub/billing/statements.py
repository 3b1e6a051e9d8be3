"""Statements: what finance reads. Everything here is computed from postings, so a statement's
totals always equal the sum of the postings behind them.

- `tenant_statement(tx, tenant, period)`: opening balances, purchases, top-ups, usage by model
  (tokens, of them the prompt-cache writes, and amount), overage, breakage, refunds and adjustments,
  closing balances. Once a period is closed (`close_period`) its statement is stored and returned as
  stored: postings dated in a closed period go to the next open one (`Book.period_for`), so a closed
  statement never changes.
- `provider_settlement(tx, provider, period)`: what the operator owes a provider, by currency
  and model.

Only what the upstream served is billed (`tokenhub.usage.billed_lines`): the requests of the
period that billed nothing (an upstream error, a timeout, a refusal, interrupted by a crash)
are listed apart, under `not_billed`, by status, with the prompt tokens the meter counted.

Performance notes: an open period's statement reads its usage as the period's statement lines
(usage_statement_lines: per model, the usage transactions' postings summed per account, their
tokens and overage, kept by the settling transaction: tokenhub.billing.rollups), the period's
other transactions through an index that leaves usage out, the stored closing balances of the
tenant's latest closed period before it plus the sums of the postings dated between them
(opening balances: postings never go into a closed period, so a closed statement's closing is
the sum of everything up to it), and `not_billed` from the daily usage totals (by HTTP status)
plus the unsettled events of the month, through the index of pending events. It used to read
the tenant's whole posting history and scan the month's events: 2.2 s for the busiest
tenant's page (1M events settled over 30 days, 49k usage transactions in the month;
benches/bench_console_pages.py; 4.7 s for tenant_statement alone), 0.4 ms now (the same
statement, compared). A period up to the latest one settled
before migration 17 reads its own postings instead, until `tokenhub billing rollups rebuild`.
`tenant_statement(..., full=True)` computes it the old way, from every posting and event (the
tests compare the two).

Balances are shown from the tenant's side: a wallet holding 100 CNY shows 100, a receivable
shows what the tenant owes, token lots the tokens left.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

from tokenhub.billing.ledger import LedgerError, lock_tenants, period_bounds
from tokenhub.billing.rollups import LINES_TABLE, TOTALS_DAILY, lines_from
from tokenhub.db.database import Tx
from tokenhub.money import TOKENS, fmt, fmt_units
from tokenhub.usage import BILLED_STATUSES

_TENANT_SIDE = {"wallet": -1, "lot": -1, "deferred": -1, "receivable": 1, "overrun": 1}


def _kind(account: str) -> str:
    return account.split(":")[2] if account.startswith("t:") else account.split(":")[1]


def _shown(tenant: str, account: str, amount: int) -> int | None:
    """A posting on the tenant's side (None: not the tenant's, or a lot's deferred side)."""
    if not account.startswith(f"t:{tenant}:"):
        return None
    k = _kind(account)
    if k == "deferred":
        return None  # the operator's side of a lot: shown as the lot's tokens
    return amount * _TENANT_SIDE.get(k, 1)


async def _opening(tx: Tx, tenant: str, period: str, mark: str) -> dict[tuple[str, str], int]:
    """Balances before `period`: the closing balances stored with the tenant's latest closed
    period before it, plus what was posted in the periods after that one and before
    `period`: the usage as the statement lines (postings themselves for the periods up to
    `mark`, lines_from) and the other transactions through their index, summed in SQL.
    Postings dated in a closed period go to the next open one, so the stored closing
    already holds every posting up to its period."""
    opening: dict[tuple[str, str], int] = defaultdict(int)
    last = await tx.fetchrow(
        "SELECT period, statement FROM closed_periods WHERE tenant = $1 AND period < $2 "
        "ORDER BY period DESC LIMIT 1",
        tenant,
        period,
    )
    after = ""
    if last is not None:
        after = last[0]
        for b in json.loads(last[1])["closing"]:
            opening[(b["account"], b["unit"])] += int(b["balance"])
    sums = (
        "SELECT p.account, p.unit, SUM(p.amount) FROM ledger_txns t "
        "JOIN postings p ON p.txn_id = t.id"
    )
    span = "t.tenant = $1 AND t.period > $2 AND t.period < $3"
    # `kind <> 'usage'` word for word as the index's predicate.
    rows = await tx.fetch(
        f"{sums} WHERE {span} AND t.kind <> 'usage' GROUP BY p.account, p.unit",
        tenant,
        after,
        period,
    )
    rows += await tx.fetch(
        f"SELECT account, unit, SUM(value) FROM {LINES_TABLE} WHERE tenant = $1 "
        "AND period > $2 AND period < $3 AND line = 'posting' GROUP BY account, unit",
        tenant,
        max(after, mark),
        period,
    )
    if mark > after:  # usage settled before migration 17: in its postings only
        rows += await tx.fetch(
            f"{sums} WHERE {span} AND t.kind = 'usage' AND t.period <= $4 "
            "GROUP BY p.account, p.unit",
            tenant,
            after,
            period,
            mark,
        )
    for acc, unit, amt in rows:
        shown = _shown(tenant, acc, int(amt))
        if shown is not None:
            opening[(acc, unit)] += shown
    return opening


def _usage_row() -> dict[str, Any]:
    """A model's usage in a statement: its billed tokens (every line: uncached and cached
    input, output, prompt-cache writes), the tokens packages paid, the amounts charged per
    unit; and `cache_write_tokens`, the part of `tokens` written to a prompt cache, only where
    there were some (a statement stored before them, or of a model without, has no such key;
    `_finish` drops a zero)."""
    return {"tokens": 0, "cache_write_tokens": 0, "package_tokens": 0, "amounts": {}}


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    if not row.get("cache_write_tokens"):
        row.pop("cache_write_tokens", None)
    return row


async def tenant_statement(
    tx: Tx, tenant: str, period: str, *, full: bool = False
) -> dict[str, Any]:
    """The tenant's statement for `period` (stored once closed). `full`: computed from every
    posting up to the period and the month's raw events instead (what the fast way must
    equal; for tests)."""
    period_bounds(period)  # validates the format
    stored = await tx.fetchval(
        "SELECT statement FROM closed_periods WHERE tenant = $1 AND period = $2",
        tenant,
        period,
    )
    if stored is not None:
        out: dict[str, Any] = json.loads(stored)
        return out
    cols = "t.id, t.kind, t.period, t.memo, t.details, p.account, p.unit, p.amount"
    join = "FROM ledger_txns t JOIN postings p ON p.txn_id = t.id"
    lines: list[Any] = []
    mark = "" if full else await lines_from(tx)
    if not full and period > mark:
        # The usage transactions as their statement lines; the others through the index of
        # the transactions that are not usage (`kind <> 'usage'` word for word as its
        # predicate).
        rows = await tx.fetch(
            f"SELECT {cols} {join} WHERE t.tenant = $1 AND t.period = $2 "
            "AND t.kind <> 'usage' ORDER BY t.id, p.leg",
            tenant,
            period,
        )
        lines = await tx.fetch(
            f"SELECT model, line, account, unit, value FROM {LINES_TABLE} "
            "WHERE tenant = $1 AND period = $2",
            tenant,
            period,
        )
    else:
        rows = await tx.fetch(
            f"SELECT {cols} {join} "
            f"WHERE t.tenant = $1 AND t.period {'<=' if full else '='} $2 ORDER BY t.id, p.leg",
            tenant,
            period,
        )
    opening: dict[tuple[str, str], int] = defaultdict(int)
    if not full:
        opening = await _opening(tx, tenant, period, mark)
    closing: dict[tuple[str, str], int] = defaultdict(int, opening)
    purchases: list[dict[str, Any]] = []
    usage: dict[str, dict[str, Any]] = {}
    sections: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seen: dict[str, dict[str, Any]] = {}
    for tid, kind, per, memo, details, acc, unit, amt in rows:
        shown = _shown(tenant, acc, amt)
        if shown is None:
            continue
        k = _kind(acc)
        key = (acc, unit)
        closing[key] += shown
        if per < period:
            opening[key] += shown
            continue
        # In the period: classify by transaction kind.
        if kind == "usage":
            u = usage.setdefault(memo, _usage_row())
            if tid not in seen:
                seen[tid] = json.loads(details)
                counts = seen[tid].get("tokens", {})
                u["tokens"] += sum(counts.values())
                u["cache_write_tokens"] += counts.get("cache_write", 0)
            if unit == TOKENS:
                u["package_tokens"] += -shown
            else:
                charged = -shown if k in ("wallet", "lot") else shown  # points used: positive
                u["amounts"][unit] = u["amounts"].get(unit, 0) + charged
        elif kind == "purchase":
            if tid not in seen:
                seen[tid] = json.loads(details)
                purchases.append({"txn": tid, "memo": memo} | seen[tid])
        else:
            sections[kind][unit] += shown
    overage: dict[str, int] = defaultdict(int)
    for model, line, acc, unit, value in lines:
        value = int(value)
        if line == "overage":
            overage[unit] += value
            continue
        u = usage.setdefault(model, _usage_row())
        if line == "tokens":
            u["tokens"] += value
            continue
        if line == "cache_write":
            u["cache_write_tokens"] += value
            continue
        k = _kind(acc)
        shown = value * _TENANT_SIDE.get(k, 1)
        closing[(acc, unit)] += shown
        if unit == TOKENS:
            u["package_tokens"] += -shown
        else:
            charged = -shown if k in ("wallet", "lot") else shown
            u["amounts"][unit] = u["amounts"].get(unit, 0) + charged
    for det in seen.values():
        for draw in det.get("draws", []):
            if draw.get("from") == "overage":
                cur = draw.get("tenant_currency", draw["currency"])
                overage[cur] += draw.get("converted", draw["amount"])
    breakage = await _breakage(tx, tenant, period)
    not_billed = await (_not_billed_events if full else _not_billed)(tx, tenant, period)

    def bal(d: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
        return [
            {"account": a, "unit": u, "balance": v, "text": fmt_units(v, u)}
            for (a, u), v in sorted(d.items())
        ]

    return {
        "tenant": tenant,
        "period": period,
        "closed": False,
        "opening": bal(opening),
        "purchases": purchases,
        "usage": [{"model": m} | _finish(v) for m, v in sorted(usage.items())],
        "overage": dict(overage),
        "breakage": breakage,
        "not_billed": not_billed,
        "other": {k: dict(v) for k, v in sections.items()},
        "closing": bal(closing),
    }


async def _breakage(tx: Tx, tenant: str, period: str) -> list[dict[str, Any]]:
    # `kind <> 'usage'`: the index of the transactions that are not usage (not every
    # transaction of the period).
    rows = await tx.fetch(
        "SELECT t.ref, p.unit, p.amount FROM ledger_txns t JOIN postings p ON p.txn_id = t.id "
        "WHERE t.tenant = $1 AND t.period = $2 AND t.kind = 'expiry' AND t.kind <> 'usage' "
        "AND p.account LIKE 'op:%'",
        tenant,
        period,
    )
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for lot, unit, amt in rows:
        # expiry credits op:breakage (money) and debits op:issued (units returned)
        out[lot][unit] = out[lot].get(unit, 0) + abs(amt)
    return [{"lot": lot} | v for lot, v in sorted(out.items())]


async def _not_billed(tx: Tx, tenant: str, period: str) -> list[dict[str, int]]:
    """The period's requests that the billing rule bills nothing, by status: how many, and
    the prompt tokens the meter counted (what the provider may still invoice the operator).
    The settled ones from the daily usage totals (a month is whole UTC days), the others
    (pending, failing, quarantined) from the events the pending index holds that have no
    settlement: together, every usage event of the month, as `_not_billed_events` counts."""
    start, end = period_bounds(period)
    billed = sorted(BILLED_STATUSES)
    marks = ", ".join(f"${i + 4}" for i in range(len(billed)))
    found: dict[int, list[int]] = {}
    settled = await tx.fetch(
        f"SELECT status, SUM(requests), SUM(input_tokens) FROM {TOTALS_DAILY} "
        f"WHERE tenant = $1 AND hour_ms >= $2 AND hour_ms < $3 AND status NOT IN ({marks}) "
        "GROUP BY status",
        tenant,
        start,
        end,
        *billed,
    )
    # `settled_ms IS NULL` word for word as the pending index's predicate, and the tenant
    # as an expression, so that SQLite's planner takes the (small) pending index rather than
    # the tenant's whole month on (tenant, ts_ms).
    pending = await tx.fetch(
        "SELECT e.status, COUNT(*), COALESCE(SUM(e.input_tokens), 0) FROM usage_events e "
        "WHERE e.settled_ms IS NULL AND e.ts_ms >= $2 AND e.ts_ms < $3 "
        f"AND e.tenant || '' = $1 AND e.status NOT IN ({marks}) "
        "AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.event_id = e.request_id) "
        "GROUP BY e.status",
        tenant,
        start,
        end,
        *billed,
    )
    for st, n, tokens in [*settled, *pending]:
        got = found.setdefault(int(st), [0, 0])
        got[0] += int(n)
        got[1] += int(tokens)
    return [
        {"status": st, "requests": n, "prompt_tokens": tokens}
        for st, (n, tokens) in sorted(found.items())
        if n
    ]


async def _not_billed_events(tx: Tx, tenant: str, period: str) -> list[dict[str, int]]:
    """`_not_billed` from the month's raw events (the tenant's every event of the month)."""
    start, end = period_bounds(period)
    billed = sorted(BILLED_STATUSES)
    marks = ", ".join(f"${i + 4}" for i in range(len(billed)))
    rows = await tx.fetch(
        "SELECT status, COUNT(*), COALESCE(SUM(input_tokens), 0) FROM usage_events "
        f"WHERE tenant = $1 AND ts_ms >= $2 AND ts_ms < $3 AND status NOT IN ({marks}) "
        "GROUP BY status ORDER BY status",
        tenant,
        start,
        end,
        *billed,
    )
    return [
        {"status": int(st), "requests": int(n), "prompt_tokens": int(tokens)}
        for st, n, tokens in rows
    ]


async def close_period(tx: Tx, tenant: str, period: str) -> dict[str, Any]:
    """Freezes a tenant's statement for a period (and every earlier one must be closed or
    empty); later postings dated in it go to the next open period."""
    if await tx.fetchval(
        "SELECT 1 FROM closed_periods WHERE tenant = $1 AND period = $2", tenant, period
    ):
        raise LedgerError(f"{tenant} {period} is already closed")
    # Serialized with settlements (PostgreSQL): none may post into the period being closed.
    await lock_tenants(tx, [tenant])
    latest = await tx.fetchval("SELECT MAX(period) FROM closed_periods WHERE tenant = $1", tenant)
    if latest and latest > period:
        raise LedgerError(f"{tenant}: {latest} is closed already; periods close in order")
    st = await tenant_statement(tx, tenant, period)
    st["closed"] = True
    await tx.execute(
        "INSERT INTO closed_periods (tenant, period, closed_ms, statement) VALUES ($1, $2, $3, $4)",
        tenant,
        period,
        int(time.time() * 1000),
        json.dumps(st, sort_keys=True),
    )
    return st


async def provider_settlement(tx: Tx, provider: str, period: str) -> dict[str, Any]:
    period_bounds(period)
    rows = await tx.fetch(
        "SELECT CASE WHEN t.kind = 'usage' THEN t.memo ELSE '(' || t.kind || 's)' END AS what, "
        "p.unit, SUM(p.amount), COUNT(*) FROM ledger_txns t "
        "JOIN postings p ON p.txn_id = t.id "
        "WHERE t.period = $1 AND p.account LIKE $2 GROUP BY what, p.unit ORDER BY what",
        period,
        f"op:provider:{provider}:%",
    )
    by_cur: dict[str, int] = defaultdict(int)
    lines = []
    for model, unit, total, n in rows:
        owed = -int(total)
        by_cur[unit] += owed
        lines.append({"model": model, "currency": unit, "owed": owed, "postings": int(n),
                      "text": fmt(owed, unit, exact=True)})  # fmt: skip
    return {
        "provider": provider,
        "period": period,
        "lines": lines,
        "totals": {c: {"owed": v, "text": fmt(v, c, exact=True)} for c, v in by_cur.items()},
    }


def render_statement(st: dict[str, Any]) -> str:
    """The text form of `tenant_statement`."""
    out = [f"Statement for {st['tenant']}, {st['period']}{' (closed)' if st['closed'] else ''}"]

    def section(title: str, rows: list[dict[str, Any]]) -> None:
        out.append(f"\n{title}")
        if not rows:
            out.append("  (none)")
        for r in rows:
            out.append(f"  {r['account']:<48} {r['text']:>28}")

    section("Opening balances", st["opening"])
    out.append("\nPurchases")
    for p in st["purchases"] or [{}]:
        if p:
            out.append(f"  {p.get('memo', ''):<48} {fmt(p['price'], p['currency']):>28}")
        else:
            out.append("  (none)")
    out.append("\nUsage by model")
    if not st["usage"]:
        out.append("  (none)")
    for u in st["usage"]:
        amount = ", ".join(fmt(v, c, exact=True) for c, v in sorted(u["amounts"].items()))
        pkg = f"{u['package_tokens']:,} from packages" if u["package_tokens"] else ""
        out.append(f"  {u['model']:<20} {u['tokens']:>14,} tokens {pkg:>28} {amount:>16}")
        if u.get("cache_write_tokens"):
            out.append(f"  {'':<20} {u['cache_write_tokens']:>14,} of them cache writes")
    if st["overage"]:
        out.append("\nOverage (included above)")
        for cur, v in st["overage"].items():
            out.append(f"  {'overage':<48} {fmt(v, cur, exact=True):>28}")
    if st["breakage"]:
        out.append("\nBreakage (expired, unused)")
        for b in st["breakage"]:
            parts = ", ".join(fmt_units(v, k) for k, v in b.items() if k != "lot")
            out.append(f"  {b['lot']:<48} {parts:>28}")
    if st.get("not_billed"):
        out.append("\nNot billed (the upstream did not serve them)")
        for nb in st["not_billed"]:
            what = "interrupted" if nb["status"] == 0 else f"status {nb['status']}"
            text = f"{nb['requests']:,} requests, {nb['prompt_tokens']:,} prompt tokens"
            out.append(f"  {what:<48} {text:>28}")
    for kind, units in st["other"].items():
        out.append(f"\n{kind.capitalize()}")
        for unit, v in units.items():
            out.append(f"  {kind:<48} {fmt_units(v, unit):>28}")
    section("Closing balances", st["closing"])
    return "\n".join(out)
