"""The bulk-extraction guard's admission step (the guard itself: tokenhub.gateway.guard)."""

from __future__ import annotations

from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.limits import LimitSync
from tokenhub.quota import format_reset
from tokenhub.usage import UsageEvent


def check(limits: LimitSync, event: UsageEvent) -> None:
    """A key the guard has throttled is refused (429) until its time is up."""
    if event.tenant not in limits.guard.configs:
        return
    wait_ms = limits.guard.blocked_ms(event.key_id)
    if wait_ms:
        raise ApiError(
            429,
            f"This API key is temporarily throttled: its token velocity tripped the "
            f"bulk-extraction guard. Please try again in {format_reset(wait_ms)}.",
            type="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": str(max(1, -(-wait_ms // 1000)))},
        )
