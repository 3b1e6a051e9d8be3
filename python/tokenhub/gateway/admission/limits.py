"""The rate-limit and budget step: the request's worst case on its limited accounts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.limits import LimitSync
from tokenhub.quota import Refusal

if TYPE_CHECKING:
    from tokenhub.gateway.admission import Admission
    from tokenhub.gateway.context import RequestContext


def reserve(
    limits: LimitSync, ctx: RequestContext, adm: Admission, tokens: int, ttl_ms: int
) -> None:
    """Reserves `tokens` (the prompt plus the most output the request may produce, an upper
    bound settled with the real counts) on the key's and tenant's limited accounts, or
    refuses (429: rate_limit_exceeded or insufficient_quota)."""
    event = ctx.event
    accounts = limits.accounts(event.key_id, event.tenant)
    if not accounts:
        return
    r = limits.reserve(accounts, tokens=tokens, ttl_ms=ttl_ms)
    if isinstance(r, Refusal):
        raise ApiError.quota_refused(r)
    adm.reservation = r
    adm.unreserve = limits.quota.cancel
    ctx.rate_headers = limits.rate_headers(accounts)
