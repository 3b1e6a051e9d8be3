"""The ledger check (`tokenhub billing check`, `GET /admin/v1/billing/check`): one function both
faces call, so they report the same problems."""

from __future__ import annotations

from typing import NamedTuple

from tokenhub.billing import leases as LS
from tokenhub.billing import ledger as L
from tokenhub.billing import settler as Q
from tokenhub.db.database import Tx


class CheckResult(NamedTuple):
    problems: list[str]  # empty: the books are sound
    transactions: int
    postings: int


async def ledger_check(tx: Tx) -> CheckResult:
    """Every transaction balances and every constrained account matches its postings within
    its limit (the ledger's invariants), every budget pot stays within its cap (the scale-out
    lease invariant), and no usage event sits in quarantine."""
    problems = await L.check_invariants(tx)
    problems += await LS.check(tx)
    # Usage that will not be billed until someone decides: as much a problem of the books as
    # a posting that does not balance.
    for q in await Q.quarantined(tx):
        problems.append(
            f"usage event {q.event_id} ({q.tenant or '?'}, {q.model or '?'}) is "
            f"quarantined, not settled: {q.reason} (tokenhub billing quarantine "
            "release|void)"
        )
    n_txns = await tx.fetchval("SELECT COUNT(*) FROM ledger_txns")
    n_postings = await tx.fetchval("SELECT COUNT(*) FROM postings")
    return CheckResult(problems, int(n_txns), int(n_postings))
