"""Forwarding: attempts over the routed deployments, fallback, upstream error pass-through.

The request goes to the router's first choice; a connect error, a 5xx, a timeout or a reply
that is not a completion, before any byte reached the client, moves on to the next
(`_Retry`). A `begin` record goes to the usage journal before each attempt: usage that could
not be kept is not served (503 journal_unavailable). An upstream 4xx goes back to the client
as the upstream said it (429 included), less the provider's key. Non-streamed replies are
passed through as the upstream sent them, once checked to be completions; streams go to
`tokenhub.gateway.stream`.

A client whose dialect the upstream's wire does not speak is served through the pair's
translation (`tokenhub.gateway.translate.exchange`): its request body, the reply, the stream's
events and the upstream's error bodies are rewritten; metering reads the upstream's own reply,
before translation, so the event is the same whichever dialect the client spoke. Passthrough
(the dialect is the wire's) skips every translation call.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from tokenhub.config import Deployment, Model
from tokenhub.gateway import metering, usage_check
from tokenhub.gateway.context import RequestContext
from tokenhub.gateway.dialects import DIALECTS
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.providers.http import ClientError, Response, TLSError
from tokenhub.gateway.stream import relay_stream
from tokenhub.gateway.translate import Exchange, exchange
from tokenhub.gateway.upstream import Retry, Upstream, scrub

if TYPE_CHECKING:
    from tokenhub.gateway.service import Gateway

log = logging.getLogger("tokenhub.gateway")


async def forward(
    gw: Gateway,
    ctx: RequestContext,
    request: web.Request,
    model: Model,
    order: list[int],
    candidates: list[Deployment],
    prompt_tokens: int,
    cap: int | None,
) -> web.StreamResponse:
    """Tries the candidates in order until one answers; `cap`: the output cap per choice
    sent upstream (what admission reserved; None: the client's own)."""
    req, event = ctx.req, ctx.event
    last: Retry | None = None
    router = gw.routers[model.id]
    now_ms = gw.now_ms
    for attempt, (index, dep) in enumerate(zip(order, candidates, strict=True), start=1):
        ctx.attempt(attempt, dep)
        upstream = gw.upstreams[dep.provider]
        wire = upstream.wire
        try:
            ex = exchange(req.endpoint.dialect, wire.name)
            payload = req.payload if ex.passthrough else ex.request(req.payload)
        except ApiError as e:  # what this upstream's API cannot express: a 400
            raise ctx.refuse(e) from None
        sent_cap = None if cap is None else min(cap, dep.max_output_tokens)
        if sent_cap is None and not ex.passthrough:
            # A translated request always names its cap: the Messages API requires one, and
            # a Responses client without max_output_tokens gets the deployment's.
            sent_cap = req.output_cap(dep.max_output_tokens)
        if not gw.sink.begin(event):  # usage that could not be kept: not served
            err = ApiError.journal_unavailable()
            ctx.failed(err.status, "journal_unavailable")
            raise err
        body = wire.request_body(payload, dep.upstream_model, sent_cap, req.stream)
        # What the upstream's usage is checked against: what was just sent.
        ctx.bounds = usage_check.Bounds(
            dep.context_window, req.output_bound(sent_cap, dep.max_output_tokens)
        )
        t_try = time.perf_counter()
        router.on_start(index, now_ms(), prompt_tokens)
        try:
            resp = await _attempt(gw, ctx, request, upstream, dep, body, ex)
        except Retry as r:
            router.on_failure(index, now_ms())
            last = r
            gw.m_attempts.inc(deployment=dep.name, kind=r.kind)
            log.warning("request %s: deployment %s failed (%s)", event.request_id, dep.name, r.kind)
            continue
        except BaseException:
            router.on_finish(index)  # cancelled or broken here: no verdict on it
            raise
        if event.status == 429:  # the provider's own rate limit: a capacity signal
            router.on_failure(index, now_ms())
        else:
            took = (time.perf_counter() - t_try) * 1000
            router.on_success(index, now_ms(), took, event.ttft_ms or took)
        gw.count_route(model.id, dep.name, event.route)
        return resp
    assert last is not None
    ctx.failed(last.error.status, last.error.code or "upstream_error")
    raise last.error


async def _attempt(
    gw: Gateway,
    ctx: RequestContext,
    request: web.Request,
    upstream: Upstream,
    dep: Deployment,
    body: bytes,
    ex: Exchange,
) -> web.StreamResponse:
    req, wire = ctx.req, upstream.wire
    pool = upstream.pool
    assert pool is not None
    endpoint = ex.endpoint(req.endpoint)
    headers = {"x-request-id": ctx.event.request_id}
    if ex.passthrough and ex.client == "anthropic":
        # Anthropic's beta features (prompt caching's extended TTL, interleaved thinking...)
        # are opted into by header; only the native API knows them.
        beta = request.headers.get("anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
    t_up = time.perf_counter()
    try:
        resp = await pool.post(upstream.path(wire.path(endpoint)), body, headers)
    except TimeoutError:
        raise Retry(ApiError.upstream_timeout(), "timeout") from None
    except TLSError as e:
        # The reason (e.g. "certificate verify failed: self-signed certificate"), not the
        # host: that stays in the server's own configuration.
        raise Retry(ApiError.upstream_failed(f"TLS error: {e.reason}"), "tls") from None
    except ClientError as e:
        raise Retry(ApiError.upstream_failed(type(e).__name__), "connect") from None
    try:
        if resp.status >= 500:
            await _read_quietly(resp)
            raise Retry(ApiError.upstream_failed(f"status {resp.status}"), f"status_{resp.status}")
        if resp.status >= 400:
            return await _pass_error(ctx, upstream, resp, t_up, ex)
        if resp.status < 200 or resp.status >= 300:
            # A redirect (tokenhub follows none) or an interim reply: not a completion.
            await _read_quietly(resp)
            raise Retry(ApiError.upstream_failed(f"status {resp.status}"), f"status_{resp.status}")
        if req.stream and resp.headers.get("content-type", "").startswith("application/json"):
            # A JSON reply (an error, a whole completion) to a stream request.
            await _read_quietly(resp)
            raise Retry(
                ApiError.upstream_failed("it answered a stream request with JSON"), "not_sse"
            )
        if req.stream:
            return await relay_stream(gw, ctx, request, resp, upstream, dep, t_up, ex)
        try:
            data = await resp.read()
        except TimeoutError:
            raise Retry(ApiError.upstream_timeout(), "timeout") from None
        except ClientError as e:
            raise Retry(ApiError.upstream_failed(type(e).__name__), "read") from None
    finally:
        resp.release()
    if (problem := wire.not_a_completion(endpoint, data)) is not None:
        raise Retry(ApiError.upstream_failed(problem), "bad_reply")
    upstream_s = time.perf_counter() - t_up
    reply = wire.reply(data)
    if reply.usage is None or not ctx.upstream_usage(reply.usage):
        ctx.metered(metering.output_tokens(gw.meter(dep.vocab), reply.output_texts()))
    ctx.served(200)
    overhead = (time.perf_counter() - ctx.t0) - upstream_s
    ctx.overhead = overhead
    headers = {
        "x-request-id": ctx.event.request_id,
        "x-tokenhub-overhead-ms": f"{overhead * 1000:.3f}",
    }
    if ctx.rate_headers:
        headers.update(ctx.rate_headers)
    data = scrub(data, upstream.secret)
    if not ex.passthrough:
        try:
            data = ex.reply(data, ctx.event)
        except Exception as e:
            # A completion its translation cannot read (the upstream's shape, not the
            # client's fault): like any reply that is not one, the next deployment's turn.
            # A ValueError is the translation saying which field (no trace needed); anything
            # else is a bug in it, logged with its trace.
            if isinstance(e, ValueError):
                log.warning("request %s: the reply of %s could not be translated: %s",
                            ctx.event.request_id, dep.name, e)  # fmt: skip
            else:
                log.exception("request %s: the reply of %s could not be translated",
                              ctx.event.request_id, dep.name)  # fmt: skip
            raise Retry(
                ApiError.upstream_failed("its reply could not be translated"), "bad_reply"
            ) from None
    return web.Response(body=data, content_type="application/json", headers=headers)


async def _pass_error(
    ctx: RequestContext, upstream: Upstream, resp: Response, t_up: float, ex: Exchange
) -> web.Response:
    """An upstream 4xx goes back to the client as the upstream said it (429 included), less
    the provider's key: a provider may quote the credential it was sent (a 401). A client of
    another dialect gets it in its own error shape (`Translation.error`), its message kept."""
    data = scrub(await _read_quietly(resp), upstream.secret)
    code = upstream.wire.error_code(data)
    if not data or code == "":
        # Not in the wire's error shape: wrap it so clients always get their error shape.
        kind = "rate_limit_exceeded" if resp.status == 429 else "upstream_error"
        err = ApiError(resp.status, f"The upstream provider returned {resp.status}.", code=kind)
        data = DIALECTS[ex.client].error_body(err)
        code = kind
    elif not ex.passthrough:
        data = ex.error(resp.status, data)
    ctx.failed(resp.status, code)
    headers = {"x-request-id": ctx.event.request_id}
    overhead = (time.perf_counter() - ctx.t0) - (time.perf_counter() - t_up)
    headers["x-tokenhub-overhead-ms"] = f"{overhead * 1000:.3f}"
    for h in ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        if h in resp.headers:
            headers[h] = resp.headers[h]
    return web.Response(
        status=resp.status, body=data, content_type="application/json", headers=headers
    )


async def _read_quietly(resp: Response) -> bytes:
    try:
        return await resp.read()
    except (TimeoutError, ClientError):
        return b""
