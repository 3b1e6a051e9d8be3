"""Admission: `admit` runs guard -> limits -> money, in that order, with one unwind path.

Each step either passes, reserves (kept on the request's `Admission`, settled with the real
counts by `RequestContext.finish`) or refuses with an ApiError; a refusal gives back whatever the
earlier steps reserved (`Admission.unwind`) and is recorded as the request's usage event (no
tokens, never billed), so refusals show in exports.

- guard (`guard.py`): a key the bulk-extraction guard throttled is refused until its time is up;
- limits (`limits.py`): the key's and tenant's rate limits and budgets, the worst case reserved
  in the shared quota table;
- money (`money.py`): the worst case priced and reserved on the tenant's contracts
  (`tokenhub.billing.pots`), a stream's output a tranche at a time.

`admit` is synchronous (one host: nothing on it waits), except in cluster mode when the host's
leased pool is short: then it returns the wait for the host's lease agent, which the caller
awaits (it refuses, or admits, as `admit` would have).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tokenhub.gateway.admission import guard, limits, money
from tokenhub.gateway.errors import ApiError

if TYPE_CHECKING:
    from tokenhub.billing.pots import Hold
    from tokenhub.gateway.context import RequestContext
    from tokenhub.quota import Reservation

__all__ = ["Admission", "admit"]


class Admission:
    """What one request reserved: on its limited accounts, on its tenant's contracts."""

    __slots__ = ("hold", "reservation", "unreserve")

    def __init__(self) -> None:
        self.reservation: Reservation | None = None
        self.hold: Hold | None = None
        # Set by the limits step: gives its reservation back.
        self.unreserve: Callable[[Reservation], object] | None = None

    def unwind(self) -> None:
        """Gives back everything reserved, in reverse order (a later step refused)."""
        if self.hold is not None:
            self.hold.cancel()
            self.hold = None
        if self.reservation is not None and self.unreserve is not None:
            self.unreserve(self.reservation)
            self.reservation = None


def admit(
    ctx: RequestContext, prompt_tokens: int, max_output: int, ttl_ms: int
) -> Awaitable[None] | None:
    """Admits the request or raises the refusal's ApiError (recorded); in cluster mode it may
    return an awaitable that does so once the host's lease agent answered (see the module
    docstring). `max_output`: the most output it may produce, all choices together; `ttl_ms`:
    how long reservations are held before the table may reclaim them (every candidate's
    timeout)."""
    gw = ctx.gw
    lim, contracts = gw.limits, gw.contracts
    if lim is None and contracts is None:
        return None
    t0 = time.perf_counter()
    adm = Admission()
    try:
        if lim is not None:
            guard.check(lim, ctx.event)
            limits.reserve(lim, ctx, adm, prompt_tokens + max_output, ttl_ms)
        if contracts is not None:
            wait = money.reserve(contracts, ctx.event, adm, prompt_tokens, max_output, ttl_ms)
            if wait is not None:
                return _admit_later(ctx, adm, wait, t0)
    except ApiError as e:
        adm.unwind()
        raise ctx.refuse(e) from None
    _admitted(ctx, adm, t0)
    return None


def _admitted(ctx: RequestContext, adm: Admission, t0: float) -> None:
    if adm.reservation is not None or adm.hold is not None:
        ctx.admission = adm
        ctx.gw.count_admission(time.perf_counter() - t0, admitted=1)


async def _admit_later(
    ctx: RequestContext, adm: Admission, wait: Awaitable[None], t0: float
) -> None:
    """The money step waiting for a lease (cluster mode); the earlier steps' reservations
    are kept meanwhile, and given back on a refusal (or a cancelled request)."""
    try:
        await wait
    except ApiError as e:
        adm.unwind()
        raise ctx.refuse(e) from None
    except BaseException:
        adm.unwind()
        raise
    _admitted(ctx, adm, t0)
