"""The gateway service: authenticate, decode, route, admit, forward; record one usage event.

Handlers in `routes.py` only call `Gateway.proxy` (or, for /v1/messages/count_tokens, which
generates nothing, `Gateway.count_tokens`); `proxy` runs a request through these steps:

1. The caller is authenticated from the in-memory key table (`auth.KeyCache`), by
   `Authorization: Bearer <key>` or `x-api-key: <key>` (Anthropic's clients send either).
2. The body is decoded and validated once, by the request class of the endpoint's client
   dialect (`dialects`: OpenAI's, Anthropic's Messages API, OpenAI's Responses API); from here
   on one `context.RequestContext` carries the request and is the only writer of its usage
   event. Errors are written in the client's dialect (the handler stores it on the request).
3. A tiered model picks its tier; the prompt is metered with the Rust meter (`metering`); the
   router orders the deployments (tokenhub.router).
4. Admission (`admission.admit`): guard -> limits -> money, one unwind path; the worst case is
   the prompt, the tool definitions and the output cap.
5. Forwarding (`forward`): attempts and fallback, the upstream's wire behind `providers`, a
   client dialect the wire does not speak translated (`translate`); streams through the SSE
   loop (`stream`).
6. Exactly one `UsageEvent` per request goes to the sink (journal + batched database writes,
   off the response path), written by `RequestContext.finish`.

Performance notes: a request allocates one ParsedRequest, one RequestContext and one
UsageEvent; per-request metrics are a few float additions on a tally folded at scrape time
(`fold_metrics`). benches/bench_gateway.py --baseline-tree compares a change with an older
tree in one run (README, "Gateway cost").
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Protocol

import msgspec
from aiohttp import web

from tokenhub.billing.pots import Contracts
from tokenhub.config import Config, Deployment, Model
from tokenhub.gateway import metering, usage_check
from tokenhub.gateway.admission import admit
from tokenhub.gateway.auth import KeyCache, Principal
from tokenhub.gateway.context import RequestContext, audit_anomaly
from tokenhub.gateway.dialects import DIALECTS
from tokenhub.gateway.dialects.messages import CountTokensRequest
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.forward import forward
from tokenhub.gateway.guard import Audit
from tokenhub.gateway.limits import LimitSync
from tokenhub.gateway.providers.http import ClientError
from tokenhub.gateway.request import COMPLETIONS, EMBEDDINGS, Endpoint, ParsedRequest
from tokenhub.gateway.state import DIALECT, REQUEST_ID
from tokenhub.gateway.telemetry import Registry
from tokenhub.gateway.upstream import Upstream, scrub
from tokenhub.meter import Meter
from tokenhub.money import NANOS
from tokenhub.router import Contract, DeploymentSpec, Router, TierScorer
from tokenhub.usage import UsageEvent

log = logging.getLogger("tokenhub.gateway")


class Sink(Protocol):
    """Where usage goes (tokenhub.runtime.sink.UsageSink); both calls are cheap and never raise.
    `begin` is False when the usage cannot be persisted (`unavailable` says why): the request
    must not go upstream."""

    def begin(self, event: UsageEvent) -> bool: ...
    def end(self, event: UsageEvent) -> None: ...
    @property
    def unavailable(self) -> str | None: ...


class Gateway:
    def __init__(
        self,
        config: Config,
        keys: KeyCache,
        sink: Sink,
        metrics: Registry,
        limits: LimitSync | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.sink = sink
        self.limits = limits
        # The audit log (blocking: called in a thread), for usage the gateway did not believe.
        self.audit: Audit | None = limits.guard.audit if limits is not None else None
        # Money admission (`[billing] admission`), set by the server once its pots are loaded.
        self.contracts: Contracts | None = None
        self.started_at = time.time()
        self.models: dict[str, Model] = {m.id: m for m in config.models}
        self.upstreams = {p.name: Upstream(p) for p in config.providers}
        self._meters: dict[str, Meter] = {}
        self.routers: dict[str, Router] = {}
        self.scorers: dict[str, TierScorer] = {}
        self.reset_routing()
        self._routes: dict[tuple[str, str, str], int] = {}  # folded at scrape, as tallies
        # Time spent admitting (reserving) and settling reservations: [seconds, requests].
        self._admission = [0.0, 0]
        # Per-request figures accumulate in one small list per (model, status, source) and
        # are folded into the metric families when /metrics is scraped: a request costs a dict
        # lookup and a few float additions, not one labelled-counter update per metric.
        self._tallies: dict[tuple[str, int, str], list[float]] = {}
        m = metrics
        self.m_requests = m.counter("tokenhub_requests_total", "Requests by model and status.")
        self.m_tokens = m.counter("tokenhub_tokens_total", "Tokens by model, kind and source.")
        self.m_attempts = m.counter(
            "tokenhub_upstream_failures_total", "Failed upstream attempts by deployment and kind."
        )
        self.m_latency = m.counter(
            "tokenhub_request_seconds_total", "Summed request latency by model (with _count)."
        )
        self.m_overhead = m.counter(
            "tokenhub_overhead_seconds_total", "Summed time spent in the gateway itself."
        )
        self.m_admission = m.counter(
            "tokenhub_admission_seconds_total",
            "Time spent reserving and settling requests' limits and contracts.",
        )
        self.m_admitted = m.counter(
            "tokenhub_admission_requests_total",
            "Requests admitted against limits or contracts (the count for the seconds above).",
        )
        self.m_routes = m.counter(
            "tokenhub_route_decisions_total",
            "Requests by model, the deployment that served them and the router's reason.",
        )
        self.m_anomalies = m.counter(
            "tokenhub_usage_anomalies_total",
            "Upstream usage blocks not believed (the meter's count billed instead), by model "
            "and kind (tokenhub.gateway.usage_check).",
        )
        m.on_collect(self.fold_metrics)
        if limits is not None:
            # From the shared quota table: every worker exports the same figures.
            self.m_velocity = m.gauge(
                "tokenhub_key_velocity_tpm",
                "Smoothed tokens per minute of each key under the bulk-extraction guard.",
                merge="self",
            )
            self.m_baseline = m.gauge(
                "tokenhub_key_baseline_tpm",
                "Each guarded key's long-run tokens per minute.",
                merge="self",
            )
            m.on_collect(self.collect_velocity)

    def tally(self, model: str, status: int, source: str) -> list[float]:
        """The running [requests, seconds, input tokens, output tokens, overhead seconds] of
        one (model, status, source), folded into the families by `fold_metrics`."""
        t = self._tallies.get((model, status, source))
        if t is None:
            t = self._tallies[(model, status, source)] = [0.0] * 5
        return t

    def fold_metrics(self) -> None:
        """Moves the tallies into the metric families (called before each scrape)."""
        for (model, status, source), t in self._tallies.items():
            if not t[0]:
                continue
            self.m_requests.inc(t[0], model=model, status=str(status))
            self.m_latency.inc(t[1], model=model)
            self.m_tokens.inc(t[2], model=model, kind="input", source=source)
            self.m_tokens.inc(t[3], model=model, kind="output", source=source)
            self.m_overhead.inc(t[4])
            t[:] = (0.0, 0.0, 0.0, 0.0, 0.0)
        if self._admission[1]:
            self.m_admission.inc(self._admission[0])
            self.m_admitted.inc(self._admission[1])
            self._admission = [0.0, 0]
        for (model, dep, reason), n in self._routes.items():
            if n:
                self.m_routes.inc(n, model=model, deployment=dep, reason=reason)
        self._routes = dict.fromkeys(self._routes, 0)

    def collect_velocity(self) -> None:
        assert self.limits is not None
        for tenant, key_id, velocity, baseline in self.limits.guard.velocities():
            self.m_velocity.set(velocity, tenant=tenant, key=key_id)
            self.m_baseline.set(baseline, tenant=tenant, key=key_id)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        # Load every vocabulary a deployment names now, not on the first request.
        for model in self.config.models:
            for d in model.deployments:
                self.meter(d.vocab)
        for u in self.upstreams.values():
            await u.open()

    async def close(self) -> None:
        for u in self.upstreams.values():
            await u.close()

    def meter(self, vocab: str) -> Meter:
        m = self._meters.get(vocab)
        if m is None:
            m = self._meters[vocab] = Meter.load(vocab)
        return m

    # -- routing (tokenhub.router) -------------------------------------------------------

    def reset_routing(self) -> None:
        """New routers and tier scorers from the config: one per model with deployments, one
        per tiered model (`auto`). Health, affinity, capacity windows and strong-tier shares
        start afresh (the seam for a config reload). Seeded per process, so that workers make
        independent (random, p2c) choices."""
        seed = int.from_bytes(os.urandom(8), "big")
        routers: dict[str, Router] = {}
        scorers: dict[str, TierScorer] = {}
        for m in self.config.models:
            if m.tiers is not None:
                t = m.tiers
                scorer = TierScorer(keywords=tuple(t.keywords))  # the default threshold
                if t.threshold is not None:
                    scorer = TierScorer(t.threshold, tuple(t.keywords))
                scorers[m.id] = scorer
            else:
                specs = [_spec(d) for d in m.deployments]
                routers[m.id] = Router(
                    specs, policy=m.policy, seed=seed, max_attempts=m.max_attempts
                )
        self.routers, self.scorers = routers, scorers

    def route(self, model: Model, tokens: int, affinity: str | None) -> tuple[list[int], str]:
        """The deployments to try (indexes into model.deployments, the router's first choice
        first, then its fallbacks) and the router's reason."""
        d = self.routers[model.id].choose(self.now_ms(), tokens, affinity)
        return list(d.order), d.reason

    @staticmethod
    def affinity(model: Model, request: web.Request, req: ParsedRequest) -> str | None:
        """The conversation a request belongs to, for the router's affinity: the client's
        x-session-id, else (affinity = "prefix") its opening, the system prompt and first user
        turn, which every later turn of the conversation repeats."""
        if model.affinity == "none":
            return None
        session = request.headers.get("x-session-id")
        if session:
            return "s:" + session[:256]
        if model.affinity != "prefix":
            return None
        opening = req.opening()
        return "p:" + opening if opening else None

    def tier(self, model: Model, ctx: RequestContext, who: Principal) -> tuple[Model, str]:
        """A tiered model's request goes to its cheap or its strong model, by the complexity
        score of the prompt and within the tenant's contract (limits: strong_share_pct)."""
        assert model.tiers is not None
        scorer = self.scorers[model.id]
        cheap = self.models[model.tiers.cheap]
        text, depth, tools = ctx.req.tier_input()
        tokens = ctx.prompt_tokens(cheap.deployments[0].vocab)
        score = scorer.score_text(text, depth=depth, tools=tools, prompt_tokens=tokens)
        pct = self.limits.strong_share.get(who.tenant) if self.limits is not None else None
        contract = (
            None if pct is None else Contract(allow_strong=pct > 0, max_strong_share=pct / 100)
        )
        tier = scorer.tier(score, contract, holder=who.tenant)
        return (self.models[model.tiers.strong] if tier == "strong" else cheap), tier

    def allowed_models(self, who: Principal) -> list[Model]:
        """Models this key may use (every configured model until contracts restrict them)."""
        return list(self.config.models)

    # -- the request path ---------------------------------------------------------------------

    def authenticate(self, request: web.Request) -> Principal:
        """The caller, by `Authorization: Bearer <key>` or else `x-api-key: <key>`; ApiError
        401 without a valid key."""
        authorization = request.headers.get("Authorization")
        if not authorization and (key := request.headers.get("x-api-key")):
            authorization = "Bearer " + key
        return self.keys.authenticate(authorization)

    async def _body(self, request: web.Request) -> bytes:
        max_body = self.config.server.max_body_bytes
        if (request.content_length or 0) > max_body:
            # Refused before reading: a client announcing 1 TB gets its answer at once.
            raise ApiError.too_large(max_body)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError.too_large(max_body) from None

    async def proxy(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        t0 = time.perf_counter()
        if endpoint.dialect != "openai":
            request[DIALECT] = endpoint.dialect
        who = self.authenticate(request)
        req = DIALECTS[endpoint.dialect].request_class(endpoint)
        ctx = RequestContext(self, request[REQUEST_ID], endpoint.name, who, req, t0)
        try:
            body = await self._body(request)
            model = req.parse(body, self.models)
            tier = ""
            if model.tiers is not None:
                model, tier = self.tier(model, ctx, who)
            prompt_tokens = ctx.prompt_tokens(model.deployments[0].vocab)
            order, reason = self.route(model, prompt_tokens, self.affinity(model, request, req))
            candidates = [model.deployments[i] for i in order]
            if endpoint is COMPLETIONS or endpoint is EMBEDDINGS:
                order, candidates = self._openai_only(model, endpoint, order, candidates)
            prompt_tokens = ctx.prompt_tokens(candidates[0].vocab)
            tools_tokens = ctx.tools_tokens(candidates[0].vocab)
        except ApiError as e:
            raise ctx.refuse(e) from None
        ctx.begin(model.id, prompt_tokens, reason, tier)
        try:
            default_cap = candidates[0].max_output_tokens
            waiting = admit(
                ctx,
                prompt_tokens + tools_tokens,
                req.max_output(default_cap),
                self._ttl_ms(candidates),
            )
            if waiting is not None:  # cluster mode: the host is leasing more budget
                await waiting
            # What admission reserved is the most the upstream is asked for (None: no
            # admission, the client's own caps).
            cap: int | None = None
            if endpoint is not EMBEDDINGS and ctx.admission is not None:
                cap = req.output_cap(default_cap)
            return await forward(self, ctx, request, model, order, candidates, prompt_tokens, cap)
        finally:
            ctx.finish()

    def _openai_only(
        self, model: Model, endpoint: Endpoint, order: list[int], candidates: list[Deployment]
    ) -> tuple[list[int], list[Deployment]]:
        """The candidates that can serve a legacy completion or an embedding: those on an
        OpenAI-wire provider (the Messages API has neither); a 400 when none is."""
        kept = [
            (i, d)
            for i, d in zip(order, candidates, strict=True)
            if self.upstreams[d.provider].wire.name == "openai"
        ]
        if not kept:
            raise ApiError.bad_request(
                f"The model `{model.id}` is served by the Anthropic Messages API, which has no "
                f"{endpoint.name} endpoint: use /v1/chat/completions or /v1/messages.",
                param="model",
            )
        return [i for i, _ in kept], [d for _, d in kept]

    async def count_tokens(self, request: web.Request) -> web.Response:
        """POST /v1/messages/count_tokens: `{"input_tokens": N}` for a Messages API body.
        Forwarded to the model's first deployment when it speaks the Messages API (the
        upstream counts with its own tokenizer); otherwise, or when that upstream fails, the
        meter's count of the prompt and the tool definitions. No usage event: nothing is
        generated, nothing billed."""
        request[DIALECT] = "anthropic"
        self.authenticate(request)
        req = CountTokensRequest()
        model = req.parse(await self._body(request), self.models)
        if model.tiers is not None:
            model = self.models[model.tiers.cheap]
        dep = model.deployments[0]
        upstream = self.upstreams[dep.provider]
        if upstream.wire.name == "anthropic" and upstream.pool is not None:
            payload = dict(req.payload)
            payload["model"] = dep.upstream_model
            headers = {"x-request-id": request[REQUEST_ID]}
            if beta := request.headers.get("anthropic-beta"):
                headers["anthropic-beta"] = beta
            try:
                resp = await upstream.pool.post(
                    upstream.path("/messages/count_tokens"), _encode(payload), headers
                )
                try:
                    data = await resp.read()
                finally:
                    resp.release()
            except (TimeoutError, ClientError):
                log.warning("count_tokens: %s failed; answered by the meter", dep.name)
            else:
                if resp.status < 500:
                    return web.Response(
                        status=resp.status,
                        body=scrub(data, upstream.secret),
                        content_type="application/json",
                    )
                log.warning(
                    "count_tokens: %s answered %d; answered by the meter", dep.name, resp.status
                )
        meter = self.meter(dep.vocab)
        n = metering.prompt_tokens(meter, req)
        if req.tools_text:
            n += meter.count(req.tools_text)
        return web.Response(body=_encode({"input_tokens": n}), content_type="application/json")

    def _ttl_ms(self, candidates: list[Deployment]) -> int:
        """Held until settled, at most until every candidate could have timed out."""
        ttl_s = sum(self.upstreams[d.provider].provider.total_timeout_s for d in candidates)
        return int(ttl_s * 1000)

    # -- what requests tally (folded into /metrics at scrape time) ------------------------------

    def count_request(self, event: UsageEvent, elapsed: float, overhead: float) -> None:
        t = self.tally(event.model, event.status, event.source)
        t[0] += 1
        t[1] += elapsed
        t[2] += event.input_tokens
        t[3] += event.output_tokens
        t[4] += overhead

    def count_admission(self, seconds: float, admitted: int = 0) -> None:
        """Time spent admitting (reserving) and settling; `admitted`: requests admitted."""
        self._admission[0] += seconds
        self._admission[1] += admitted

    def count_route(self, model: str, deployment: str, reason: str) -> None:
        key = (model, deployment, reason)
        self._routes[key] = self._routes.get(key, 0) + 1

    def usage_anomaly(self, event: UsageEvent, verdict: usage_check.Anomaly) -> None:
        """An upstream usage block not believed: counted, logged and audited."""
        self.m_anomalies.inc(model=event.model, kind=verdict.kind)
        log.warning(
            "request %s: usage from %s not believed (%s); the meter's count is billed",
            event.request_id,
            event.deployment,
            event.usage_anomaly,
        )
        audit_anomaly(self, event, verdict)

    @staticmethod
    def now_ms() -> int:
        """The router's clock: monotonic milliseconds."""
        return time.monotonic_ns() // 1_000_000


def _spec(d: Deployment) -> DeploymentSpec:
    """The router's view of a deployment (prices as nanos per 1M, for "cheapest")."""
    p = d.price
    if p is None:
        prices = [0, 0, 0]
    else:
        cached = p.cached_input_per_1m if p.cached_input_per_1m is not None else p.input_per_1m
        prices = [int(v * NANOS) for v in (p.input_per_1m, cached, p.output_per_1m)]
    return DeploymentSpec(
        name=d.name,
        weight=d.weight,
        priority=d.priority,
        input_per_1m=prices[0],
        cached_input_per_1m=prices[1],
        output_per_1m=prices[2],
        rpm=d.rpm,
        tpm=d.tpm,
        max_concurrency=d.max_concurrency,
    )


_encode = msgspec.json.Encoder().encode

# Request ids need uniqueness, not secrecy: a generator seeded from the OS once per process
# costs ~0.1 µs an id where os.urandom costs a system call.
_ids = random.Random(os.urandom(32))
# A forked worker must not repeat its parent's sequence.
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_request_id() -> str:
    """`req_` + milliseconds (hex) + 80 random bits: unique, and time-ordered so that ledger
    inserts append to the primary-key index instead of scattering across it."""
    return f"req_{time.time_ns() // 1_000_000:012x}{_ids.getrandbits(80):020x}"
