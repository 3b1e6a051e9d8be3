"""The usage event: one per gateway request, the unit that metering, billing and audit share."""

from __future__ import annotations

from typing import Literal

import msgspec

# Where the token counts came from: the upstream's own `usage` block, or tokenhub's meter (an
# upstream that omitted usage, or a request interrupted before usage arrived).
Source = Literal["upstream", "metered"]


class UsageEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One request's usage. `request_id` is unique: writing the same event twice is a no-op."""

    request_id: str
    ts_ms: int  # when the request arrived, Unix epoch milliseconds
    tenant: str
    key_id: str
    # The API the client called, which names its dialect: "chat.completions", "completions",
    # "embeddings" (OpenAI), "messages" (Anthropic), "responses" (OpenAI's Responses API).
    endpoint: str
    model: str  # the public model id the client asked for
    deployment: str = ""  # the deployment that served it ("" when none was reached)
    provider: str = ""
    upstream_model: str = ""
    stream: bool = False
    input_tokens: int = 0
    cached_input_tokens: int = 0  # included in input_tokens, as OpenAI counts them
    output_tokens: int = 0
    source: Source = "upstream"
    # HTTP status returned to the client; 499 when the client went away first, 0 when the
    # gateway stopped before the request finished (replayed from the journal on restart).
    status: int = 200
    error: str = ""  # error code when status is not 2xx
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # time to first token (streams)
    attempts: int = 1  # deployments tried
    # Why the router chose `deployment`: policy, affinity, fallback, probe or degraded
    # (tokenhub.router); and, for a tiered model such as `auto`, the tier ("cheap" or
    # "strong") that chose `model`.
    route: str = ""
    tier: str = ""
    # Why the upstream's usage block was not believed ("<kind>: <what it said>"), when the
    # counts are the meter's instead (tokenhub.gateway.usage_check); "" when it was.
    usage_anomaly: str = ""
    # Prompt tokens written to the provider's prompt cache (Anthropic's
    # cache_creation_input_tokens), also included in input_tokens; billed at the cache-write
    # price. (input_tokens - cached_input_tokens - cache_write_tokens is the uncached rest.)
    cache_write_tokens: int = 0
    # What admission drew from the tenant's contracts in the gateway's quota table (its money
    # pots), "<table epoch>|<pot>=<amount>;...": the in-process settler gives it back to the
    # table once the ledger has posted the event (tokenhub.billing.pots). In cluster mode
    # "@<host id>/<epoch>|<pot>=<amount>;...": settlement posts it to the lease coordinator
    # (tokenhub.billing.leases). Not billing data: the settlement's payload hash leaves it out.
    holds: str = ""


# The most tokens one event may count on any line: far above any context window or output cap
# (n x cap) a provider offers, far below where rating could overflow the ledger's 64-bit amounts.
# The gateway's check of upstream usage, `events ingest` and settlement share it.
MAX_TOKENS = 10**9


def usage_problem(ev: UsageEvent) -> str | None:
    """Why an event's token counts cannot be billed (None: they can): a count that is not an
    integer, negative, above MAX_TOKENS, or cache reads and writes (both part of the input)
    above input."""
    for name in ("input_tokens", "cached_input_tokens", "output_tokens", "cache_write_tokens"):
        v = getattr(ev, name)
        if not isinstance(v, int) or isinstance(v, bool):
            return f"{name} is not an integer"
        if v < 0:
            return f"{name} is negative ({v})"
        if v > MAX_TOKENS:
            return f"{name} is {v}, above the ceiling of {MAX_TOKENS} tokens an event may count"
    if ev.cached_input_tokens > ev.input_tokens:
        return (
            f"cached_input_tokens ({ev.cached_input_tokens}) is more than input_tokens "
            f"({ev.input_tokens})"
        )
    if ev.cached_input_tokens + ev.cache_write_tokens > ev.input_tokens:
        return (
            f"cached_input_tokens + cache_write_tokens ({ev.cached_input_tokens} + "
            f"{ev.cache_write_tokens}) is more than input_tokens ({ev.input_tokens}): both are "
            "part of the input"
        )
    return None


EVENT_FIELDS = tuple(UsageEvent.__struct_fields__)
# What finance sees (exports, the settlement's payload hash): everything but the gateway's own
# admission bookkeeping, which comes last.
BILLED_FIELDS = EVENT_FIELDS[: EVENT_FIELDS.index("holds")]
# Billed fields added after events were first settled: the payload hash leaves them out while
# they hold their default, so that an event settled before they existed hashes as it did.
LATER_FIELDS = ("usage_anomaly", "cache_write_tokens")


# The billing rule, in one place (settlement, admission's release and statements use it): only
# what the upstream served is billed.
# - 200: the request was served: billed its counts (the upstream's usage, else the meter's).
# - 499: served to a client that left before the end: billed what the upstream reported (it
#   generated it, and charges the operator for it); under money admission the gateway caps the
#   event's counts at what was reserved when the client left.
# - anything else (an upstream 4xx/5xx, a connection refused, a timeout, a reply that was not a
#   completion, a refusal by tokenhub, a stream the upstream broke off) and 0 (`interrupted`:
#   replayed from the journal after the gateway died mid-request, so the client saw it cut):
#   nothing. Such events keep the meter's prompt count, for telemetry and for reconciling the
#   provider's invoice, but no line of them is billed.
BILLED_STATUSES = frozenset({200, 499})


def billed_lines(ev: UsageEvent) -> tuple[int, int, int, int]:
    """The tokens an event bills: (uncached input, cached input, output, cache writes); all 0
    unless the upstream served it (`BILLED_STATUSES`). Cache reads and writes are parts of
    `input_tokens`, so the uncached rest is input - reads - writes; counts out of order (which
    `usage_problem` refuses at settlement) are clamped so that the lines never exceed the
    input: reads first, then writes."""
    if ev.status not in BILLED_STATUSES:
        return 0, 0, 0, 0
    inp = max(0, ev.input_tokens)
    cached = max(0, min(ev.cached_input_tokens, inp))
    writes = max(0, min(ev.cache_write_tokens, inp - cached))
    return inp - cached - writes, cached, max(0, ev.output_tokens), writes


# -- export rows: `tokenhub events export` and GET /admin/v1/usage/events/export write the same --

_encode_event = msgspec.json.Encoder().encode


def event_jsonl(e: UsageEvent) -> bytes:
    """One JSON line with every field (defaults included, unlike the wire form)."""
    return _encode_event(msgspec.structs.asdict(e)) + b"\n"


def event_csv_row(e: UsageEvent) -> list[object]:
    """The CSV row under the header EVENT_FIELDS: None empty, booleans true/false."""
    return [
        "" if v is None else ("true" if v else "false") if isinstance(v, bool) else v
        for v in msgspec.structs.astuple(e)
    ]
