"""The money step: the request's worst case priced and reserved on its tenant's contracts
(`tokenhub.billing.pots.Contracts`, `[billing] admission`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenhub.billing.pots import TRANCHE, Contracts, NotPriced, NotReady, Shortfall
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
) -> None:
    """Reserves [prompt, 0 cached, max output] or refuses: 503 billing_not_ready before the
    pots are loaded, 403 model_not_priced, 429 insufficient_quota. A stream reserves its
    output a tranche at a time (`tokenhub.gateway.stream` takes more as tokens flow)."""
    if event.stream:
        max_output = min(max_output, TRANCHE)
    try:
        hold = contracts.admit(
            event.tenant, event.model, event.ts_ms, [prompt_tokens, 0, max_output], ttl_ms
        )
    except NotReady:
        raise ApiError(
            503,
            "The gateway is starting and has not loaded the billing balances yet; "
            "retry in a second.",
            type="api_error",
            code="billing_not_ready",
            headers={"retry-after": "1"},
        ) from None
    except NotPriced as e:
        raise ApiError(403, str(e), type="invalid_request_error", code="model_not_priced") from None
    if isinstance(hold, Shortfall):
        raise ApiError(429, hold.message, type="insufficient_quota", code="insufficient_quota")
    adm.hold = hold
