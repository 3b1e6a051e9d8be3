"""RequestContext: one request's state, and the only writer of its usage event.

Every outcome of a request is recorded through one of these methods, so "what is recorded for a
request" has one home:

- `refuse(err)`: refused before going upstream (a bad request, a limit, money): no tokens;
- `begin(...)`, `attempt(...)`: what was routed where;
- `upstream_usage(usage)` or `metered(output)`: the counts billed (the upstream's when plausible,
  else the meter's, flagged);
- `failed(status, code)`, `served(status, code)`, `cut(delivered)`: how it ended;
- `finish()`: exactly once, at the end of the request (earlier for a stream, just before its
  last event is written): caps a departed client's usage at its hold, settles admission
  (`tokenhub.gateway.admission`), hands the event to the sink and tallies it.

What is billed (`tokenhub.usage.billed_lines`): only what the upstream served, status 200 or
499. An upstream 4xx/5xx, a connection refused, a timeout, and a 2xx or 3xx that is not a
completion (a 502 here) keep the meter's prompt count on their event and bill nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from tokenhub.config import Deployment
from tokenhub.gateway import metering, usage_check
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import ParsedRequest
from tokenhub.usage import UsageEvent, billed_lines

if TYPE_CHECKING:
    from tokenhub.gateway.admission import Admission
    from tokenhub.gateway.auth import Principal
    from tokenhub.gateway.service import Gateway

log = logging.getLogger("tokenhub.gateway")

_NO_BOUNDS = usage_check.Bounds(0, usage_check.MAX_TOKENS)


class RequestContext:
    __slots__ = (
        "admission",
        "bounds",
        "done",
        "event",
        "gw",
        "overhead",
        "prompt_counts",
        "rate_headers",
        "req",
        "t0",
    )

    def __init__(
        self, gw: Gateway, rid: str, endpoint: str, who: Principal, req: ParsedRequest, t0: float
    ) -> None:
        self.gw = gw
        self.req = req
        self.t0 = t0
        self.event = UsageEvent(
            request_id=rid,
            ts_ms=int(time.time() * 1000),
            tenant=who.tenant,
            key_id=who.key_id,
            endpoint=endpoint,
            model="",
            attempts=0,
        )
        self.overhead = 0.0  # seconds spent in the gateway, set when the reply starts
        self.done = False
        self.admission: Admission | None = None  # what admission reserved (None: nothing)
        self.rate_headers: dict[str, str] = {}  # x-ratelimit-* for a success response
        # What the upstream's usage may claim (set before each attempt; usage_check).
        self.bounds = _NO_BOUNDS
        self.prompt_counts: dict[str, int] = {}

    def tools_tokens(self, vocab: str) -> int:
        """The tool definitions' tokens in `vocab` (0 without tools): what they add to the
        prompt in the worst case admission reserves."""
        text = self.req.tools_text
        return self.gw.meter(vocab).count(text) if text else 0

    def prompt_tokens(self, vocab: str) -> int:
        """The prompt's tokens in `vocab`, metered once however often asked."""
        n = self.prompt_counts.get(vocab)
        if n is None:
            n = self.prompt_counts[vocab] = metering.prompt_tokens(self.gw.meter(vocab), self.req)
        return n

    # -- what is recorded ---------------------------------------------------------------------

    def refuse(self, err: ApiError) -> ApiError:
        """Records a request refused before it went upstream: the status and code it got, no
        tokens (never billed), so refusals show in exports. Returns `err` (to raise). Before
        `begin`, the event has the model as the client named it."""
        event = self.event
        if not event.model:
            event.model = self.req.named_model()
            event.stream = self.req.stream
        event.status, event.error = err.status, err.code or err.type
        event.input_tokens = event.output_tokens = 0
        event.source = "metered"
        self.finish()
        return err

    def begin(self, model: str, prompt_tokens: int, route: str, tier: str) -> None:
        """The request is accepted as `model` (for a tiered model, the tier's model: what is
        priced), its prompt metered."""
        event = self.event
        event.model = model
        event.stream = self.req.stream
        event.input_tokens = prompt_tokens
        event.route = route
        event.tier = tier
        event.attempts = 1

    def attempt(self, attempt: int, dep: Deployment) -> None:
        event = self.event
        event.attempts = attempt
        event.deployment = dep.name
        event.provider = dep.provider
        event.upstream_model = dep.upstream_model
        if attempt > 1:
            event.route = "fallback"  # the earlier choices failed before any byte

    def first_token(self) -> None:
        if self.event.ttft_ms is None:
            self.event.ttft_ms = round((time.perf_counter() - self.t0) * 1000, 3)

    def failed(self, status: int, code: str) -> None:
        """The upstream failed (or the usage could not be kept): the input count stays the
        meter's estimate of the prompt, nothing is billed."""
        event = self.event
        event.status, event.error = status, code
        event.output_tokens = 0
        event.source = "metered"

    def served(self, status: int, code: str = "") -> None:
        self.event.status, self.event.error = status, code

    def upstream_usage(self, usage: Any) -> bool:
        """Records the upstream's usage when it is plausible for what the request allowed
        (tokenhub.gateway.usage_check). Else False: the event is flagged (`usage_anomaly`),
        counted in /metrics and written to the audit log, and the caller records the meter's
        count instead (`metered`)."""
        event = self.event
        verdict = usage_check.check(usage, self.bounds)
        if isinstance(verdict, usage_check.Counts):
            event.input_tokens = verdict.input_tokens
            event.cached_input_tokens = verdict.cached_input_tokens
            event.cache_write_tokens = verdict.cache_write_tokens
            event.output_tokens = verdict.output_tokens
            event.source = "upstream"
            return True
        event.usage_anomaly = str(verdict)[:300]
        # The meter cannot tell what was cached or written to the cache.
        event.cached_input_tokens = event.cache_write_tokens = 0
        self.gw.usage_anomaly(event, verdict)
        return False

    def metered(self, output_tokens: int) -> None:
        """The meter's count of the output is billed (no plausible upstream usage)."""
        self.event.output_tokens = output_tokens
        self.event.source = "metered"

    def cut(self, delivered: int) -> None:
        """The tenant's contracts can pay for no more: the stream ends, billed at what the
        client received (metered: the upstream's usage block never comes)."""
        event = self.event
        event.status, event.error = 200, "insufficient_quota"
        event.output_tokens, event.cached_input_tokens = delivered, 0
        event.cache_write_tokens = 0
        event.source = "metered"
        self.finish()

    def finish(self) -> None:
        """Records the usage event, once."""
        if self.done:
            return
        self.done = True
        event = self.event
        elapsed = time.perf_counter() - self.t0
        event.latency_ms = round(elapsed * 1000, 3)
        adm = self.admission
        spent = 0.0
        if adm is not None and adm.hold is not None:
            t_settle = time.perf_counter()
            if event.status == 499:
                # The client left: what the upstream generated while the gateway drained it
                # is the operator's cost; the tenant is billed no more than was reserved when
                # it left.
                # Holds carry [uncached, cached, output] or, with cache writes, a 4th line.
                reserved = adm.hold.lines
                held_input = reserved[0] + reserved[1] + (reserved[3] if len(reserved) > 3 else 0)
                event.input_tokens = min(event.input_tokens, held_input)
                event.cached_input_tokens = min(event.cached_input_tokens, event.input_tokens)
                event.cache_write_tokens = min(
                    event.cache_write_tokens, event.input_tokens - event.cached_input_tokens
                )
                event.output_tokens = min(event.output_tokens, reserved[2])
            lines = billed_lines(event)
            # Before the event is written: its `holds` say what the settler gives back.
            event.holds = adm.hold.settle(lines)
            spent = time.perf_counter() - t_settle
        else:
            # What the event bills, as settlement reads it: only what the upstream served.
            lines = billed_lines(event)
        gw = self.gw
        gw.sink.end(event)
        gw.count_request(event, elapsed, self.overhead)
        used = sum(lines)
        limits = gw.limits
        if limits is not None:
            if used and event.tenant in limits.guard.configs:
                limits.guard.record(event.tenant, event.key_id, used)
            if adm is not None and adm.reservation is not None:
                t_settle = time.perf_counter()
                limits.settle(adm.reservation, used)
                spent += time.perf_counter() - t_settle
        if adm is not None:
            gw.count_admission(spent)


def audit_anomaly(gw: Gateway, event: UsageEvent, verdict: usage_check.Anomaly) -> None:
    """Writes a usage anomaly to the audit log, off the event loop (blocking SQL)."""
    audit = gw.audit
    if audit is None:
        return
    entry = {
        "request_id": event.request_id,
        "model": event.model,
        "deployment": event.deployment,
        "kind": verdict.kind,
        "detail": verdict.detail,
    }

    def write() -> None:
        try:
            audit("usage_anomaly", event.tenant, event.key_id, entry)
        except Exception:
            log.exception("writing the usage anomaly of %s to the audit log failed",
                          event.request_id)  # fmt: skip

    asyncio.get_running_loop().run_in_executor(None, write)
