"""The gateway service: authenticate, choose a deployment, forward, meter, record.

Handlers in `routes.py` only call `Gateway.proxy`. Everything a request touches lives here:

1. The caller is authenticated from the in-memory key table (`auth.KeyCache`).
2. The body is decoded once (msgspec) and checked; the prompt is metered with the Rust meter.
3. A `begin` record goes to the usage journal, then the request goes to the first deployment;
   a connect error, 5xx or timeout before any byte reached the client moves on to the next.
4. Non-streamed replies are passed through as the upstream sent them, once checked to be
   completions (a JSON object with `choices`, or `data` for embeddings, and no `error`).
   Streams are relayed a read at a time, as whole SSE events (split, inspected and metered
   per choice as they pass, in Rust: `tokenhub._core.SseRelay`, which keeps no payloads);
   tokenhub always asks the upstream for a usage chunk and strips it when the client did not
   ask for one. Without upstream usage the meter's count of what was streamed is billed
   (`metered`).
5. Exactly one `UsageEvent` per request goes to the sink (journal + batched database writes,
   off the response path).

Client disconnects mid-stream: tokenhub keeps reading the upstream to its end (bounded by
`server.drain_timeout_s`), so the event records what the upstream generated and will bill, with
status 499. Cancelling instead would save upstream tokens but leave the count unknowable.
Under money admission the hold is not extended once the client is gone, and the event is
capped at what was held when it left: the tenant pays at most that, the operator the rest.

What is billed (`tokenhub.usage.billed_lines`): only what the upstream served, status 200 or
499. An upstream 4xx/5xx, a connection refused, a timeout, and a 2xx or 3xx that is not a
completion (a 502 here) keep the meter's prompt count on their event and bill nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import msgspec
from aiohttp import web

from tokenhub._core import SseRelay
from tokenhub.billing.pots import TRANCHE, Contracts, Hold, NotPriced, NotReady, Shortfall
from tokenhub.config import Config, Deployment, Model, Provider
from tokenhub.gateway import usage_check
from tokenhub.gateway.auth import KeyCache, Principal
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.guard import Audit
from tokenhub.gateway.limits import LimitSync
from tokenhub.gateway.providers.http import ClientError, Pool, Response, TLSError
from tokenhub.gateway.state import REQUEST_ID
from tokenhub.gateway.telemetry import Registry
from tokenhub.meter import Meter
from tokenhub.money import NANOS
from tokenhub.quota import Refusal, Reservation, format_reset
from tokenhub.router import Contract, DeploymentSpec, Router, TierScorer
from tokenhub.usage import UsageEvent, billed_lines

log = logging.getLogger("tokenhub.gateway")


class Sink(Protocol):
    """Where usage goes (tokenhub.runtime.sink.UsageSink); both calls are cheap and never raise.
    `begin` is False when the usage cannot be persisted (`unavailable` says why): the request
    must not go upstream."""

    def begin(self, event: UsageEvent) -> bool: ...
    def end(self, event: UsageEvent) -> None: ...
    @property
    def unavailable(self) -> str | None: ...


# -- upstream reply shapes (lenient: only what metering needs) ---------------------------------


class FunctionDelta(msgspec.Struct, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True):
    function: FunctionDelta | None = None


class Message(msgspec.Struct, kw_only=True):
    content: str | None = None
    reasoning_content: str | None = None  # DeepSeek's (and others') reasoning tokens
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionDelta | None = None  # the legacy (pre-tools) function call


class Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: Message | None = None  # chat, non-streamed
    delta: Message | None = None  # chat, streamed
    text: str | None = None  # legacy completions


class Reply(msgspec.Struct, kw_only=True):
    choices: list[Choice] = []
    # As the upstream sent it (any JSON): a malformed usage block must not cost the choices
    # their decoding; `usage_check` judges it.
    usage: Any = None


_decode_reply = msgspec.json.Decoder(Reply).decode


_NULL = msgspec.Raw(b"null")


class _Envelope(msgspec.Struct):
    """The top level of a non-streamed reply, undecoded: what says whether it is one."""

    choices: msgspec.Raw = _NULL
    data: msgspec.Raw = _NULL
    error: msgspec.Raw = _NULL


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


def _not_a_completion(endpoint: Endpoint, data: bytes) -> str | None:
    """Why a 2xx reply is not what the endpoint returns (None: it is): not a JSON object, an
    `error` object, no `choices` (`data` for embeddings). Such a reply is a 502, never billed.
    The upstream's own words are not repeated to the client: they may quote credentials."""
    try:
        env = _decode_envelope(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "its reply was not a JSON object"
    if bytes(env.error).strip() != b"null":
        return "it answered 200 with an error object"
    field = env.data if endpoint is EMBEDDINGS else env.choices
    if not bytes(field).lstrip().startswith(b"["):
        return f"its reply had no {'data' if endpoint is EMBEDDINGS else 'choices'}"
    return None


_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _choice_texts(choice: Choice, part: Message | None) -> Iterator[str]:
    if choice.text:
        yield choice.text
    if part is not None:
        if part.reasoning_content:
            yield part.reasoning_content
        if part.content:
            yield part.content
        functions = [c.function for c in part.tool_calls or () if c.function]
        if part.function_call is not None:
            functions.append(part.function_call)
        for f in functions:
            if f.name:
                yield f.name
            if f.arguments:
                yield f.arguments


# -- endpoints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    name: str  # as recorded on usage events
    path: str  # appended to the provider's base_url
    streams: bool


CHAT = Endpoint("chat.completions", "/chat/completions", True)
COMPLETIONS = Endpoint("completions", "/completions", True)
EMBEDDINGS = Endpoint("embeddings", "/embeddings", False)


class _Retry(Exception):
    """This deployment failed before the client saw a byte: try the next one."""

    def __init__(self, error: ApiError, kind: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.kind = kind


MIN_SECRET_CHARS = 8


def _scrub(data: bytes, secret: bytes) -> bytes:
    """`data` without the provider's key (a memchr-speed scan when it is absent)."""
    return data.replace(secret, b"[redacted]") if secret and secret in data else data


class Upstream:
    """One provider: its HTTP connection pool (`upstream_http.Pool`) and credentials."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        key = os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""
        # Scrubbed from whatever the upstream sends back (error bodies, replies, stream events):
        # a provider may quote the credential it was sent. A key too short to be a real
        # credential is not looked for (it would mangle ordinary text).
        self.secret = key.encode() if len(key) >= MIN_SECRET_CHARS else b""
        # Never logged: the pool does not log request headers, and neither do we.
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.pool: Pool | None = None

    async def open(self) -> None:
        p = self.provider
        self.pool = Pool(
            p.base_url,
            headers=self.headers,
            limit=p.max_connections,
            connect_timeout=p.connect_timeout_s,
            read_timeout=p.read_timeout_s,
            total_timeout=p.total_timeout_s,
            ca_file=p.ca_file,
            proxy_url=p.proxy_url,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


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
        d = self.routers[model.id].choose(_now_ms(), tokens, affinity)
        return list(d.order), d.reason

    def tier(
        self,
        model: Model,
        endpoint: Endpoint,
        payload: dict[str, Any],
        who: Principal,
        count: Callable[[str], int],
    ) -> tuple[Model, str]:
        """A tiered model's request goes to its cheap or its strong model, by the complexity
        score of the prompt and within the tenant's contract (limits: strong_share_pct).
        `count(vocab)` is the prompt's token count in a vocabulary (metered once per request)."""
        assert model.tiers is not None
        scorer = self.scorers[model.id]
        cheap = self.models[model.tiers.cheap]
        text, depth, tools = _tier_input(endpoint, payload)
        tokens = count(cheap.deployments[0].vocab)
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

    async def proxy(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = request[REQUEST_ID]
        who = self.keys.authenticate(request.headers.get("Authorization"))
        # Everything up to the usage event: a refusal here (a body that is not JSON, too large,
        # no such model, a bad field) still leaves an event for the key (_refused_early).
        model_id: object = None
        stream: object = False
        try:
            if (request.content_length or 0) > self.config.server.max_body_bytes:
                # Refused before reading: a client announcing 1 TB gets its answer at once.
                raise ApiError.too_large(self.config.server.max_body_bytes)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise ApiError.too_large(self.config.server.max_body_bytes) from None
            try:
                payload = _decode_any(body)
            except RecursionError:
                raise ApiError.bad_request(
                    "The JSON body of your request is nested too deeply."
                ) from None
            except msgspec.DecodeError:
                raise ApiError.bad_request(
                    "We could not parse the JSON body of your request. The body must be valid JSON."
                ) from None
            if not isinstance(payload, dict):
                raise ApiError.bad_request("The request body must be a JSON object.")
            model_id = payload.get("model")
            if not isinstance(model_id, str) or not model_id:
                raise ApiError.bad_request("You must provide a model parameter.", param="model")
            model = self.models.get(model_id)
            if model is None:
                raise ApiError.model_not_found(model_id)
            stream = payload.get("stream", False)
            if not isinstance(stream, bool):
                raise ApiError.bad_request("'stream' must be a boolean.", param="stream")
            if stream and not endpoint.streams:
                raise ApiError.bad_request("This endpoint does not stream.", param="stream")
            options = payload.get("stream_options")
            if options is not None and not isinstance(options, dict):
                raise ApiError.bad_request(
                    "'stream_options' must be an object.", param="stream_options"
                )
            client_wants_usage = bool(stream and options and options.get("include_usage"))
            metered: dict[str, int] = {}

            def count(vocab: str) -> int:
                """The prompt's tokens in `vocab`, metered once however often asked."""
                n = metered.get(vocab)
                if n is None:
                    n = metered[vocab] = self._meter_prompt(endpoint, payload, vocab)
                return n

            tier = ""
            if model.tiers is not None:
                model, tier = self.tier(model, endpoint, payload, who, count)
            prompt_tokens = count(model.deployments[0].vocab)
            order, reason = self.route(model, prompt_tokens, _affinity(model, request, payload))
            candidates = [model.deployments[i] for i in order]
            prompt_tokens = count(candidates[0].vocab)
            # max_tokens, n: checked here (a 400); what admission reserves per choice.
            out_cap = _output_cap(endpoint, payload, candidates)[0]
        except ApiError as e:
            self._refused_early(rid, who, endpoint, model_id, stream, e, t0)
            raise

        event = UsageEvent(
            request_id=rid,
            ts_ms=int(time.time() * 1000),
            tenant=who.tenant,
            key_id=who.key_id,
            endpoint=endpoint.name,
            model=model.id,  # for a tiered model, the tier's model (what is priced)
            stream=stream,
            input_tokens=prompt_tokens,
            route=reason,
            tier=tier,
        )
        finish = _Finish(self, event, t0)
        t_admit = time.perf_counter()
        if self.limits is not None and who.tenant in self.limits.guard.configs:
            self._check_guard(who, finish)
        if self.limits is not None and (accounts := self.limits.accounts(who.key_id, who.tenant)):
            self._admit(accounts, endpoint, payload, candidates, prompt_tokens, finish)
        if self.contracts is not None:
            self._admit_money(endpoint, payload, candidates, prompt_tokens, finish)
        if finish.reservation is not None or finish.hold is not None:
            self._admission[0] += time.perf_counter() - t_admit
            self._admission[1] += 1
        # What admission reserved is the most the upstream is asked for (None: no admission).
        cap: int | None = None
        if endpoint is not EMBEDDINGS and (
            finish.reservation is not None or finish.hold is not None
        ):
            cap = out_cap
        if stream:
            payload["stream_options"] = {**(options or {}), "include_usage": True}
        last: _Retry | None = None
        router = self.routers[model.id]
        try:
            for attempt, (index, dep) in enumerate(zip(order, candidates, strict=True), start=1):
                event.attempts = attempt
                event.deployment = dep.name
                event.provider = dep.provider
                event.upstream_model = dep.upstream_model
                if attempt > 1:
                    event.route = "fallback"  # the earlier choices failed before any byte
                if not self.sink.begin(event):  # usage that could not be kept: not served
                    event.status, event.error, event.source = 503, "journal_unavailable", "metered"
                    raise ApiError.journal_unavailable()
                payload["model"] = dep.upstream_model
                if cap is not None:
                    _send_cap(payload, min(cap, dep.max_output_tokens))
                # What the upstream's usage is checked against: what was just sent.
                finish.bounds = usage_check.Bounds(
                    dep.context_window,
                    usage_check.output_bound(
                        payload, dep.max_output_tokens, embeddings=endpoint is EMBEDDINGS
                    ),
                )
                t_try = time.perf_counter()
                router.on_start(index, _now_ms(), prompt_tokens)
                try:
                    resp = await self._attempt(
                        request, endpoint, dep, payload, event, finish, stream, client_wants_usage
                    )
                except _Retry as r:
                    router.on_failure(index, _now_ms())
                    last = r
                    self.m_attempts.inc(deployment=dep.name, kind=r.kind)
                    log.warning("request %s: deployment %s failed (%s)", rid, dep.name, r.kind)
                    continue
                except BaseException:
                    router.on_finish(index)  # cancelled or broken here: no verdict on it
                    raise
                if event.status == 429:  # the provider's own rate limit: a capacity signal
                    router.on_failure(index, _now_ms())
                else:
                    took = (time.perf_counter() - t_try) * 1000
                    router.on_success(index, _now_ms(), took, event.ttft_ms or took)
                key = (model.id, dep.name, event.route)
                self._routes[key] = self._routes.get(key, 0) + 1
                return resp
            assert last is not None
            event.status = last.error.status
            event.error = last.error.code or "upstream_error"
            event.output_tokens = 0
            event.source = "metered"
            raise last.error
        finally:
            finish()

    def _refused_early(
        self,
        rid: str,
        who: Principal,
        endpoint: Endpoint,
        model_id: object,
        stream: object,
        err: ApiError,
        t0: float,
    ) -> None:
        """The usage event of a request refused before it had one: the status and code it got,
        no tokens (never billed), the model as the client named it (when it named one)."""
        event = UsageEvent(
            request_id=rid,
            ts_ms=int(time.time() * 1000),
            tenant=who.tenant,
            key_id=who.key_id,
            endpoint=endpoint.name,
            model=model_id[:MODEL_ID_CHARS] if isinstance(model_id, str) else "",
            stream=stream is True,
            attempts=0,
        )
        _refused(_Finish(self, event, t0), err.code or err.type, err.status)

    def _admit(
        self,
        accounts: tuple[str, ...],
        endpoint: Endpoint,
        payload: dict[str, Any],
        candidates: list[Deployment],
        prompt_tokens: int,
        finish: _Finish,
    ) -> None:
        """Reserves the request on its limited accounts (key, tenant) or answers 429.

        The reservation is an upper bound: the prompt plus the output the request may produce
        (its max_tokens, capped at the deployment's max_output_tokens, which is also the
        assumption when it sets none); _Finish settles it with the real counts. A refused
        request is recorded as a usage event with status 429 and no tokens (it is never billed),
        so refusals show in exports."""
        assert self.limits is not None
        max_out = _max_output(endpoint, payload, candidates)
        r = self.limits.reserve(
            accounts, tokens=prompt_tokens + max_out, ttl_ms=self._ttl_ms(candidates)
        )
        if isinstance(r, Refusal):
            _refused(finish, r.code)
            raise ApiError.quota_refused(r)
        finish.reservation = r
        finish.rate_headers = self.limits.rate_headers(accounts)

    def _check_guard(self, who: Principal, finish: _Finish) -> None:
        """A key the bulk-extraction guard has throttled is refused until its time is up."""
        assert self.limits is not None
        wait_ms = self.limits.guard.blocked_ms(who.key_id)
        if wait_ms:
            _refused(finish, "rate_limit_exceeded")
            raise ApiError(
                429,
                f"This API key is temporarily throttled: its token velocity tripped the "
                f"bulk-extraction guard. Please try again in {format_reset(wait_ms)}.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"retry-after": str(max(1, -(-wait_ms // 1000)))},
            )

    def _ttl_ms(self, candidates: list[Deployment]) -> int:
        """Held until settled, at most until every candidate could have timed out."""
        ttl_s = sum(self.upstreams[d.provider].provider.total_timeout_s for d in candidates)
        return int(ttl_s * 1000)

    def _admit_money(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        candidates: list[Deployment],
        prompt_tokens: int,
        finish: _Finish,
    ) -> None:
        """Reserves the request's worst case on its tenant's contracts (tokenhub.gateway.
        contracts) or answers 429 insufficient_quota. A stream reserves its output a tranche
        at a time (`_relay_stream` takes more as tokens flow)."""
        assert self.contracts is not None
        event = finish.event
        max_out = _max_output(endpoint, payload, candidates)
        if event.stream:
            max_out = min(max_out, TRANCHE)
        try:
            hold = self.contracts.admit(
                event.tenant,
                event.model,
                event.ts_ms,
                [prompt_tokens, 0, max_out],
                self._ttl_ms(candidates),
            )
        except NotReady:
            self._unreserve(finish)
            _refused(finish, "billing_not_ready", 503)
            raise ApiError(
                503,
                "The gateway is starting and has not loaded the billing balances yet; "
                "retry in a second.",
                type="api_error",
                code="billing_not_ready",
                headers={"retry-after": "1"},
            ) from None
        except NotPriced as e:
            self._unreserve(finish)
            _refused(finish, "model_not_priced", 403)
            raise ApiError(
                403, str(e), type="invalid_request_error", code="model_not_priced"
            ) from None
        if isinstance(hold, Shortfall):
            self._unreserve(finish)
            _refused(finish, "insufficient_quota")
            raise ApiError(429, hold.message, type="insufficient_quota", code="insufficient_quota")
        finish.hold = hold

    def _unreserve(self, finish: _Finish) -> None:
        """Gives back the rate-limit reservation of a request refused after it was taken."""
        if finish.reservation is not None and self.limits is not None:
            self.limits.quota.cancel(finish.reservation)
            finish.reservation = None

    def _meter_prompt(self, endpoint: Endpoint, payload: dict[str, Any], vocab: str) -> int:
        meter = self.meter(vocab)
        try:
            if endpoint is CHAT:
                messages = payload.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise ApiError.bad_request(
                        "'messages' must be a non-empty array of message objects.", param="messages"
                    )
                return meter.count_messages(messages)
            key = "prompt" if endpoint is COMPLETIONS else "input"
            value = payload.get(key)
            if isinstance(value, str):
                return meter.count(value)
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                return sum(meter.count_batch(value))
            if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                return len(value)  # already token ids
            if (
                isinstance(value, list)
                and value
                and all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value)
            ):
                return sum(len(v) for v in value)  # a batch of token-id arrays
            raise ApiError.bad_request(
                f"'{key}' must be a string or an array of strings.", param=key
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ApiError):
                raise
            raise ApiError.bad_request(f"Invalid messages: {e}", param="messages") from None

    async def _attempt(
        self,
        request: web.Request,
        endpoint: Endpoint,
        dep: Deployment,
        payload: dict[str, Any],
        event: UsageEvent,
        finish: _Finish,
        stream: bool,
        client_wants_usage: bool,
    ) -> web.StreamResponse:
        t0 = finish.t0
        pool = self.upstreams[dep.provider].pool
        assert pool is not None
        t_up = time.perf_counter()
        try:
            resp = await pool.post(
                endpoint.path, _encode(payload), {"x-request-id": event.request_id}
            )
        except TimeoutError:
            raise _Retry(ApiError.upstream_timeout(), "timeout") from None
        except TLSError as e:
            # The reason (e.g. "certificate verify failed: self-signed certificate"), not the
            # host: that stays in the server's own configuration.
            raise _Retry(ApiError.upstream_failed(f"TLS error: {e.reason}"), "tls") from None
        except ClientError as e:
            raise _Retry(ApiError.upstream_failed(type(e).__name__), "connect") from None
        try:
            if resp.status >= 500:
                await _read_quietly(resp)
                raise _Retry(
                    ApiError.upstream_failed(f"status {resp.status}"), f"status_{resp.status}"
                )
            if resp.status >= 400:
                return await self._pass_error(resp, event, t0, t_up)
            if resp.status < 200 or resp.status >= 300:
                # A redirect (tokenhub follows none) or an interim reply: not a completion.
                await _read_quietly(resp)
                raise _Retry(
                    ApiError.upstream_failed(f"status {resp.status}"), f"status_{resp.status}"
                )
            if stream and resp.headers.get("content-type", "").startswith("application/json"):
                # A JSON reply (an error, a whole completion) to a stream request.
                await _read_quietly(resp)
                raise _Retry(
                    ApiError.upstream_failed("it answered a stream request with JSON"), "not_sse"
                )
            if stream:
                return await self._relay_stream(
                    request, resp, dep, event, finish, t_up, client_wants_usage
                )
            try:
                data = await resp.read()
            except TimeoutError:
                raise _Retry(ApiError.upstream_timeout(), "timeout") from None
            except ClientError as e:
                raise _Retry(ApiError.upstream_failed(type(e).__name__), "read") from None
        finally:
            resp.release()
        if (problem := _not_a_completion(endpoint, data)) is not None:
            raise _Retry(ApiError.upstream_failed(problem), "bad_reply")
        upstream_s = time.perf_counter() - t_up
        self._record_reply(data, dep, event, finish.bounds)
        event.status = 200
        overhead = (time.perf_counter() - t0) - upstream_s
        finish.overhead = overhead
        headers = {
            "x-request-id": event.request_id,
            "x-tokenhub-overhead-ms": f"{overhead * 1000:.3f}",
        }
        if finish.rate_headers:
            headers.update(finish.rate_headers)
        data = _scrub(data, self.upstreams[dep.provider].secret)
        return web.Response(body=data, content_type="application/json", headers=headers)

    def _record_reply(
        self, data: bytes, dep: Deployment, event: UsageEvent, bounds: usage_check.Bounds | None
    ) -> None:
        try:
            reply = _decode_reply(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            reply = Reply()
        if reply.usage is None or not self._take_usage(reply.usage, event, bounds):
            meter = self.meter(dep.vocab)
            texts = [t for c in reply.choices for t in _choice_texts(c, c.message)]
            event.output_tokens = sum(meter.count_batch(texts)) if texts else 0
            event.source = "metered"

    def _take_usage(self, usage: Any, event: UsageEvent, bounds: usage_check.Bounds | None) -> bool:
        """Records the upstream's usage on the event when it is plausible for what the request
        allowed (tokenhub.gateway.usage_check). Else False: the event is flagged
        (`usage_anomaly`), counted in /metrics and written to the audit log, and the caller
        records the meter's count instead."""
        verdict = usage_check.check(usage, bounds or usage_check.Bounds(0, usage_check.MAX_TOKENS))
        if isinstance(verdict, usage_check.Counts):
            event.input_tokens = verdict.input_tokens
            event.cached_input_tokens = verdict.cached_input_tokens
            event.output_tokens = verdict.output_tokens
            event.source = "upstream"
            return True
        event.usage_anomaly = str(verdict)[:300]
        event.cached_input_tokens = 0  # the meter cannot tell what was cached
        self.m_anomalies.inc(model=event.model, kind=verdict.kind)
        log.warning(
            "request %s: usage from %s not believed (%s); the meter's count is billed",
            event.request_id,
            event.deployment,
            event.usage_anomaly,
        )
        if self.audit is not None:
            entry = {
                "request_id": event.request_id,
                "model": event.model,
                "deployment": event.deployment,
                "kind": verdict.kind,
                "detail": verdict.detail,
            }
            audit = self.audit

            def write() -> None:
                try:
                    audit("usage_anomaly", event.tenant, event.key_id, entry)
                except Exception:
                    log.exception("writing the usage anomaly of %s to the audit log failed",
                                  event.request_id)  # fmt: skip

            asyncio.get_running_loop().run_in_executor(None, write)
        return False

    async def _pass_error(
        self, resp: Response, event: UsageEvent, t0: float, t_up: float
    ) -> web.Response:
        """An upstream 4xx goes back to the client as the upstream said it (429 included),
        less the provider's key: a provider may quote the credential it was sent (a 401)."""
        data = await _read_quietly(resp)
        upstream = self.upstreams.get(event.provider)
        if upstream is not None:
            data = _scrub(data, upstream.secret)
        try:
            err = _decode_any(data).get("error", {})
            code = err.get("code") or err.get("type") or ""
        except Exception:
            code = ""
        if not data or code == "":
            # Not OpenAI-shaped: wrap it so clients always get the same error shape.
            kind = "rate_limit_exceeded" if resp.status == 429 else "upstream_error"
            data = ApiError(
                resp.status, f"The upstream provider returned {resp.status}.", code=kind
            ).body()
            code = kind
        event.status = resp.status
        event.error = str(code)
        event.output_tokens = 0
        event.source = "metered"  # the input count is the meter's estimate of the prompt
        headers = {"x-request-id": event.request_id}
        overhead = (time.perf_counter() - t0) - (time.perf_counter() - t_up)
        headers["x-tokenhub-overhead-ms"] = f"{overhead * 1000:.3f}"
        for h in ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            if h in resp.headers:
                headers[h] = resp.headers[h]
        return web.Response(
            status=resp.status, body=data, content_type="application/json", headers=headers
        )

    async def _relay_stream(
        self,
        request: web.Request,
        resp: Response,
        dep: Deployment,
        event: UsageEvent,
        finish: _Finish,
        t_up: float,
        client_wants_usage: bool,
    ) -> web.StreamResponse:
        """Relays SSE events as the upstream sends them: each upstream read goes to the client
        in one write, as whole events (the Rust `SseRelay` splits, inspects and filters them,
        and counts each choice's output as it passes).
        Nothing is sent to the client before the upstream's first event, so a failure until
        then can still go to another deployment. The usage event is finished before the write
        that carries `[DONE]`: once a client has the whole stream, its usage is journaled."""
        t0 = finish.t0
        secret = self.upstreams[dep.provider].secret
        relay = SseRelay(client_wants_usage, self.meter(dep.vocab)._core)
        out: web.StreamResponse | None = None
        client_gone = False
        eof_sent = False
        deadline: float | None = None
        loop = asyncio.get_running_loop()

        def settle() -> None:
            usage: Any = None
            if (data := relay.usage) is not None:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    usage = _decode_reply(data).usage
            if usage is None or not self._take_usage(usage, event, finish.bounds):
                event.output_tokens = relay.output_tokens
                event.source = "metered"
            if client_gone:
                event.status, event.error = 499, "client_disconnected"
            elif not relay.done:
                event.status, event.error = 502, "upstream_stream_broken"
            else:
                event.status, event.error = 200, ""

        hold = finish.hold
        delivered = 0  # output tokens in what the client has been sent (money admission)

        def pay_for() -> bool:
            """Extends the hold when the output relayed so far runs past it: a tranche, or at
            least what it needs. False: the contracts cannot pay."""
            nonlocal delivered
            assert hold is not None
            total = relay.output_tokens
            need = total - hold.output_reserved
            if need > 0 and not hold.extend(max(need, TRANCHE)) and not hold.extend(need):
                return False
            delivered = total
            return True

        async def cut() -> None:
            """The tenant can pay for no more: end the stream cleanly and bill what the
            client received (metered: the upstream's usage block never comes)."""
            event.status, event.error = 200, "insufficient_quota"
            event.output_tokens, event.cached_input_tokens = delivered, 0
            event.source = "metered"
            finish()
            err = ApiError(
                429,
                "You exceeded your current quota: the stream was ended because the "
                f"contracts of tenant {event.tenant} cannot pay for more output.",
                type="insufficient_quota",
                code="insufficient_quota",
            )
            await send(b"data: " + err.body() + b"\n\ndata: [DONE]\n\n", last=True)

        def lost_client() -> None:
            nonlocal client_gone, deadline
            client_gone = True
            deadline = loop.time() + self.config.server.drain_timeout_s

        def client_left() -> bool:
            """The client's connection is closed or closing (what a write would find out)."""
            if not client_gone:
                transport = request.transport
                if transport is None or transport.is_closing():
                    lost_client()
            return client_gone

        async def send(data: bytes, last: bool = False) -> None:
            """Writes to the client, starting the response first; a client that went away
            switches the relay to draining (bounded by drain_timeout_s)."""
            nonlocal out, eof_sent
            if client_gone:
                return
            # Whole events (the relay never splits one), so a quoted key is never cut in two.
            data = _scrub(data, secret)
            try:
                if out is None:
                    overhead = t_up - t0
                    finish.overhead = overhead
                    out = web.StreamResponse(
                        status=200,
                        headers={
                            "Content-Type": "text/event-stream; charset=utf-8",
                            "Cache-Control": "no-cache",
                            "x-request-id": event.request_id,
                            "x-tokenhub-overhead-ms": f"{overhead * 1000:.3f}",
                            **finish.rate_headers,
                        },
                    )
                    await out.prepare(request)
                if last:
                    eof_sent = True
                    await out.write_eof(data)
                elif data:
                    await out.write(data)
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                lost_client()

        try:
            while not relay.done:
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    data = await asyncio.wait_for(resp.readany(), remaining)
                else:
                    data = await resp.readany()
                if not data:
                    break  # upstream closed
                try:
                    events = relay.feed(data)
                except ValueError as e:  # an event past the relay's bound: not a token stream
                    raise aiohttp.ClientPayloadError(str(e)) from None
                if event.ttft_ms is None and relay.first_token:
                    event.ttft_ms = round((time.perf_counter() - t0) * 1000, 3)
                # A client that left is not sent more, so its hold is not extended either:
                # what the drain reads beyond the hold is the operator's cost (_Finish caps it).
                if hold is not None and events and not client_left() and not pay_for():
                    await cut()
                    return out if out is not None else web.Response(status=499)
                if relay.done and not client_left():
                    settle()
                    finish()
                    await send(events + _usage_tail(relay, event), last=True)
                elif events:
                    await send(events)
        except TimeoutError:
            if out is None and not client_gone:
                raise _Retry(ApiError.upstream_timeout(), "timeout") from None
            log.warning("request %s: upstream stream timed out", event.request_id)
        except ClientError as e:
            if out is None and not client_gone:
                raise _Retry(ApiError.upstream_failed(type(e).__name__), "read") from None
            log.warning("request %s: upstream stream broke: %s", event.request_id, type(e).__name__)

        if out is None and not client_gone and not relay.done:
            raise _Retry(ApiError.upstream_failed("the stream ended before any data"), "empty")
        if not eof_sent and (rest := relay.finish()):
            # The upstream closed without the blank line that ends its last event.
            if relay.done and not client_left():
                settle()
                finish()
                await send(rest + _usage_tail(relay, event), last=True)
            else:
                await send(rest)
        if not finish.done:
            settle()
            if not relay.done and not client_gone:
                await send(
                    b"data: " + ApiError.upstream_failed("the stream broke off").body() + b"\n\n"
                )
            finish()
            if relay.held_done and not client_left():
                await send(_usage_tail(relay, event), last=True)
        if out is not None and not client_gone and not eof_sent:
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                await out.write_eof()
        return out if out is not None else web.Response(status=499)


class _Finish:
    """Records a request's usage event exactly once: at the end of the request, or earlier for
    a stream (just before its last event is written)."""

    __slots__ = (
        "bounds",
        "done",
        "event",
        "gw",
        "hold",
        "overhead",
        "rate_headers",
        "reservation",
        "t0",
    )

    def __init__(self, gw: Gateway, event: UsageEvent, t0: float) -> None:
        self.gw = gw
        self.event = event
        self.t0 = t0
        self.overhead = 0.0  # seconds spent in the gateway, set when the reply starts
        self.done = False
        self.reservation: Reservation | None = None  # when the caller has limits
        self.hold: Hold | None = None  # on the tenant's contracts (money admission)
        self.rate_headers: dict[str, str] = {}  # x-ratelimit-* for a success response
        # What the upstream's usage may claim (set before each attempt; usage_check).
        self.bounds: usage_check.Bounds | None = None

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        gw, event = self.gw, self.event
        elapsed = time.perf_counter() - self.t0
        event.latency_ms = round(elapsed * 1000, 3)
        t_settle = time.perf_counter()
        if self.hold is not None and event.status == 499:
            # The client left: what the upstream generated while the gateway drained it is
            # the operator's cost; the tenant is billed no more than was reserved when it left.
            reserved = self.hold.lines
            event.input_tokens = min(event.input_tokens, reserved[0] + reserved[1])
            event.cached_input_tokens = min(event.cached_input_tokens, event.input_tokens)
            event.output_tokens = min(event.output_tokens, reserved[2])
        # What the event bills (tokenhub.usage.billed_lines, as settlement reads it): only
        # what the upstream served; a failed request, an upstream 4xx, bills nothing.
        lines = billed_lines(event)
        used = sum(lines)
        if self.hold is not None:
            # Before the event is written: its `holds` say what the settler gives back.
            event.holds = self.hold.settle(lines)
        spent = time.perf_counter() - t_settle
        gw.sink.end(event)
        t = gw.tally(event.model, event.status, event.source)
        t[0] += 1
        t[1] += elapsed
        t[2] += event.input_tokens
        t[3] += event.output_tokens
        t[4] += self.overhead
        if gw.limits is not None and used and event.tenant in gw.limits.guard.configs:
            gw.limits.guard.record(event.tenant, event.key_id, used)
        if self.reservation is not None and gw.limits is not None:
            t_settle = time.perf_counter()
            gw.limits.settle(self.reservation, used)
            spent += time.perf_counter() - t_settle
        if self.reservation is not None or self.hold is not None:
            gw._admission[0] += spent


def _now_ms() -> int:
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


MODEL_ID_CHARS = 256  # of an unknown model's name, as recorded on its refusal's event
PREFIX_CHARS = 4096  # of the opening messages that identify a conversation


def _affinity(model: Model, request: web.Request, payload: dict[str, Any]) -> str | None:
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
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    parts: list[str] = []
    for m in messages[:2]:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
    opening = "\x00".join(parts)
    return "p:" + opening[:PREFIX_CHARS] if opening else None


def _tier_input(endpoint: Endpoint, payload: dict[str, Any]) -> tuple[str, int, bool]:
    """What the tier scorer reads: the latest user turn's text, the prior turns, tool use."""
    tools = bool(payload.get("tools") or payload.get("functions"))
    if endpoint is not CHAT:
        prompt = payload.get("prompt", payload.get("input"))
        return (prompt if isinstance(prompt, str) else ""), 0, tools
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return "", 0, tools
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
    text = ""
    for m in reversed(turns):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                text = c
            elif isinstance(c, list):
                text = " ".join(
                    p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"
                )
            break
    return text, max(0, len(turns) - 1), tools


def _usage_tail(relay: SseRelay, event: UsageEvent) -> bytes:
    """What ends a stream whose client asked for usage and got none from the upstream (the
    relay held its `[DONE]` back): a usage chunk of the gateway's own, in OpenAI's shape
    (`choices: []`), with the event's metered counts and marked so (`tokenhub.usage_source`),
    then `[DONE]`. Empty when the relay held nothing back."""
    if not relay.held_done:
        return b""
    chunk: dict[str, Any] = {"id": event.request_id, "object": "chat.completion.chunk"}
    if (head := relay.head) is not None:
        chunk |= _decode_any(head)  # the first chunk's id, object, created and model
    chunk.setdefault("created", event.ts_ms // 1000)
    chunk.setdefault("model", event.upstream_model)
    chunk["choices"] = []
    chunk["usage"] = {
        "prompt_tokens": event.input_tokens,
        "completion_tokens": event.output_tokens,
        "total_tokens": event.input_tokens + event.output_tokens,
    }
    chunk["tokenhub"] = {"usage_source": event.source}
    return b"data: " + _encode(chunk) + b"\n\ndata: [DONE]\n\n"


MAX_CHOICES = 128  # OpenAI's bound on n (and best_of)


def _output_cap(
    endpoint: Endpoint, payload: dict[str, Any], candidates: list[Deployment]
) -> tuple[int, int]:
    """(the most output tokens one choice may produce, how many choices the upstream
    generates). The cap is the smallest of max_tokens, max_completion_tokens and the first
    deployment's max_output_tokens (the assumption when the request sets neither); the gateway
    sends it upstream (`_send_cap`), so no upstream is asked for more than was reserved,
    whichever of the two fields it honours. The choices are n, or best_of when larger (the
    upstream generates, and bills, all of them). Embeddings produce none."""
    if endpoint is EMBEDDINGS:
        return 0, 0
    cap = candidates[0].max_output_tokens
    for key in ("max_tokens", "max_completion_tokens"):
        asked = payload.get(key)
        if asked is None:
            continue
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 0:
            raise ApiError.bad_request(f"'{key}' must be a non-negative integer.", param=key)
        cap = min(cap, asked)
    choices = 1
    for key in ("n", "best_of"):
        asked = payload.get(key)
        if asked is None:
            continue
        if not isinstance(asked, int) or isinstance(asked, bool) or not 1 <= asked <= MAX_CHOICES:
            raise ApiError.bad_request(
                f"'{key}' must be an integer from 1 to {MAX_CHOICES}.", param=key
            )
        choices = max(choices, asked)
    return cap, choices


def _max_output(endpoint: Endpoint, payload: dict[str, Any], candidates: list[Deployment]) -> int:
    """The most output a request may produce, all choices together (the worst case that
    admission reserves)."""
    cap, choices = _output_cap(endpoint, payload, candidates)
    return cap * choices


def _send_cap(payload: dict[str, Any], cap: int) -> None:
    """Sets the output cap in the payload going upstream: in each of max_tokens and
    max_completion_tokens the client sent, else in max_tokens (the field every
    OpenAI-compatible server knows)."""
    keys = [k for k in ("max_tokens", "max_completion_tokens") if payload.get(k) is not None]
    for key in keys or ("max_tokens",):
        payload[key] = cap


def _refused(finish: _Finish, code: str, status: int = 429) -> None:
    """Records a refused request: a usage event with no tokens (never billed), so refusals
    show in exports."""
    event = finish.event
    event.status, event.error = status, code
    event.input_tokens = event.output_tokens = 0
    event.source = "metered"
    finish()


async def _read_quietly(resp: Response) -> bytes:
    try:
        return await resp.read()
    except (TimeoutError, ClientError):
        return b""


# Request ids need uniqueness, not secrecy: a generator seeded from the OS once per process
# costs ~0.1 µs an id where os.urandom costs a system call.
_ids = random.Random(os.urandom(32))
# A forked worker must not repeat its parent's sequence.
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_request_id() -> str:
    """`req_` + milliseconds (hex) + 80 random bits: unique, and time-ordered so that ledger
    inserts append to the primary-key index instead of scattering across it."""
    return f"req_{time.time_ns() // 1_000_000:012x}{_ids.getrandbits(80):020x}"
