"""The money step: the request's worst case priced and reserved on its tenant's contracts
(`tokenhub.billing.pots.Contracts`, `[billing] admission`)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, NoReturn

from tokenhub.billing.pots import TRANCHE, Contracts, Hold, NotPriced, NotReady, Shortfall
from tokenhub.gateway.errors import ApiError
from tokenhub.usage import UsageEvent

if TYPE_CHECKING:
    from tokenhub.gateway.admission import Admission


def reserve(
    contracts: Contracts,
    event: UsageEvent,
    adm: Admission,
    prompt_tokens: int,
    max_output: int,
    ttl_ms: int,
) -> Awaitable[None] | None:
    """Reserves [prompt, 0 cached, max output, 0 cache writes] (the prompt moved to the
    cache-write line when that is dearer: `Contracts.admit`) or refuses: 503 billing_not_ready
    before the pots are loaded, 403 model_not_priced, 429 insufficient_quota. A stream reserves its
    output a tranche at a time (`tokenhub.gateway.stream` takes more as tokens flow). In cluster
    mode a short pool is not a refusal yet: this returns the wait for the host's lease agent
    (`Contracts.acquire`), to be awaited; otherwise None (reserved)."""
    if event.stream:
        max_output = min(max_output, TRANCHE)
    lines = [prompt_tokens, 0, max_output, 0]
    try:
        hold = contracts.admit(event.tenant, event.model, event.ts_ms, lines, ttl_ms)
    except (NotReady, NotPriced) as e:
        _refuse(e)
    if isinstance(hold, Shortfall):
        if contracts.cluster is not None:
            return _acquire(contracts, event, adm, lines, ttl_ms)
        raise ApiError(429, hold.message, type="insufficient_quota", code="insufficient_quota")
    adm.hold = hold
    return None


async def _acquire(
    contracts: Contracts, event: UsageEvent, adm: Admission, lines: list[int], ttl_ms: int
) -> None:
    try:
        hold = await contracts.acquire(event.tenant, event.model, event.ts_ms, lines, ttl_ms)
    except (NotReady, NotPriced) as e:
        _refuse(e)
    if not isinstance(hold, Hold):
        raise ApiError(429, hold.message, type="insufficient_quota", code="insufficient_quota")
    adm.hold = hold


def _refuse(e: NotReady | NotPriced) -> NoReturn:
    if isinstance(e, NotReady):
        raise ApiError(
            503,
            "The gateway is starting and has not loaded the billing balances yet; "
            "retry in a second.",
            type="api_error",
            code="billing_not_ready",
            headers={"retry-after": "1"},
        ) from None
    raise ApiError(403, str(e), type="invalid_request_error", code="model_not_priced") from None
