"""The SSE loop: a stream relayed a read at a time, as whole events.

Each upstream read goes to the client in one write, as whole events: the provider's scanner
(for OpenAI, the Rust `SseRelay`) splits, inspects and filters them, and counts each choice's
output as it passes, keeping no payloads. Nothing is sent to the client before the upstream's
first event, so a failure until then can still go to another deployment. The usage event is
finished before the write that carries the end marker: once a client has the whole stream, its
usage is journaled. tokenhub always asks the upstream for a usage chunk (stripped when the
client did not ask); without a plausible one, the meter's count of what was streamed is billed.

Client disconnects mid-stream: tokenhub keeps reading the upstream to its end (bounded by
`server.drain_timeout_s`), so the event records what the upstream generated and will bill, with
status 499. Cancelling instead would save upstream tokens but leave the count unknowable.
Under money admission the hold is not extended once the client is gone, and the event is
capped at what was held when it left: the tenant pays at most that, the operator the rest. In
cluster mode a tranche the host's leased pool cannot pay waits for its lease agent (up to
`[cluster] acquire_wait_ms`) before the stream is cut.

A client of another dialect than the wire's gets the scanner's events through the pair's
`StreamOut` (`tokenhub.gateway.translate`): the scanner still splits, counts and keeps the
usage (never forwarding the usage chunk: it was made with keep_usage=False), the `StreamOut`
writes the client's events, and its `end` the closing ones with the settled event's usage.
The gateway's own errors (the cut, a broken stream) are written in the client's dialect.

An upstream that fails mid-stream says so in its own error event (OpenAI: a chunk with an
`error` object; Anthropic: `event: error`), then closes without its end marker. The scanner
notes it (`errored`); the event reaches the client as it came (passthrough) or in the client's
dialect (the pair's `StreamOut` turns it into the client's error event), and the gateway adds
no "broke off" error of its own: the client sees exactly one error event, the upstream's
message. The request is settled as a broken stream (502 upstream_stream_broken: nothing billed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from tokenhub.billing.pots import TRANCHE
from tokenhub.config import Deployment
from tokenhub.gateway.context import RequestContext
from tokenhub.gateway.dialects import DIALECTS
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.providers.http import ClientError, ClientPayloadError, Response
from tokenhub.gateway.upstream import Retry, Upstream, scrub

if TYPE_CHECKING:
    from tokenhub.gateway.service import Gateway
    from tokenhub.gateway.translate import Exchange, StreamOut

log = logging.getLogger("tokenhub.gateway")


async def relay_stream(
    gw: Gateway,
    ctx: RequestContext,
    request: web.Request,
    resp: Response,
    upstream: Upstream,
    dep: Deployment,
    t_up: float,
    ex: Exchange,
) -> web.StreamResponse:
    """Relays one upstream stream to the client (see the module's docstring)."""
    t0 = ctx.t0
    event = ctx.event
    wire = upstream.wire
    secret = upstream.secret
    dialect = DIALECTS[ex.client]
    include_usage = ctx.req.include_usage
    if ex.passthrough:
        relay = wire.scanner(include_usage, gw.meter(dep.vocab))
        translated = None
    else:
        relay = wire.scanner(False, gw.meter(dep.vocab))
        translated = ex.stream(event, include_usage)

    def closing() -> bytes:
        """What ends the client's stream once the event is settled."""
        if translated is not None:
            return translated.end(event)
        return wire.usage_tail(relay, event)

    out: web.StreamResponse | None = None
    client_gone = False
    eof_sent = False
    deadline: float | None = None
    loop = asyncio.get_running_loop()

    def settle() -> None:
        usage: Any = None
        if (data := relay.usage) is not None:
            usage = wire.stream_usage(data)
        if usage is None or not ctx.upstream_usage(usage):
            ctx.metered(relay.output_tokens)
        if client_gone:
            ctx.served(499, "client_disconnected")
        elif not relay.done:
            ctx.served(502, "upstream_stream_broken")
        else:
            ctx.served(200)

    hold = ctx.admission.hold if ctx.admission is not None else None
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

    async def pay_later() -> bool:
        """Cluster mode: the host's pool was short; waits for its lease agent to lease more
        (`Hold.extend_wait`). On one host: False at once."""
        nonlocal delivered
        assert hold is not None
        total = relay.output_tokens
        need = total - hold.output_reserved
        if need > 0 and not await hold.extend_wait(max(need, TRANCHE), need):
            return False
        delivered = total
        return True

    async def cut() -> None:
        """The tenant can pay for no more: end the stream cleanly and bill what the
        client received."""
        ctx.cut(delivered)
        err = ApiError(
            429,
            "You exceeded your current quota: the stream was ended because the "
            f"contracts of tenant {event.tenant} cannot pay for more output.",
            type="insufficient_quota",
            code="insufficient_quota",
        )
        await send(dialect.stream_error(err, end=True), last=True)

    def lost_client() -> None:
        nonlocal client_gone, deadline
        client_gone = True
        deadline = loop.time() + gw.config.server.drain_timeout_s

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
        data = scrub(data, secret)
        try:
            if out is None:
                overhead = t_up - t0
                ctx.overhead = overhead
                out = web.StreamResponse(
                    status=200,
                    headers={
                        "Content-Type": "text/event-stream; charset=utf-8",
                        "Cache-Control": "no-cache",
                        "x-request-id": event.request_id,
                        "x-tokenhub-overhead-ms": f"{overhead * 1000:.3f}",
                        **ctx.rate_headers,
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
        while not relay.done and not relay.errored:
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
                raise ClientPayloadError(str(e)) from None
            if translated is not None and events:
                # Scrubbed before translation, which may re-encode (and so escape) the key.
                events = _translate(translated, scrub(events, secret), event.request_id)
            if event.ttft_ms is None and relay.first_token:
                ctx.first_token()
            # A client that left is not sent more, so its hold is not extended either:
            # what the drain reads beyond the hold is the operator's cost (ctx.finish caps it).
            if (
                hold is not None
                and events
                and not client_left()
                and not (pay_for() or await pay_later())
            ):
                await cut()
                return out if out is not None else web.Response(status=499)
            if relay.done and not client_left():
                settle()
                ctx.finish()
                await send(events + closing(), last=True)
            elif events:
                await send(events)
    except TimeoutError:
        if out is None and not client_gone:
            raise Retry(ApiError.upstream_timeout(), "timeout") from None
        log.warning("request %s: upstream stream timed out", event.request_id)
    except ClientError as e:
        if out is None and not client_gone:
            raise Retry(ApiError.upstream_failed(type(e).__name__), "read") from None
        log.warning("request %s: upstream stream broke: %s", event.request_id, type(e).__name__)

    if out is None and not client_gone and not relay.done:
        raise Retry(ApiError.upstream_failed("the stream ended before any data"), "empty")
    if not eof_sent and (rest := relay.finish()):
        # The upstream closed without the blank line that ends its last event.
        if translated is not None:
            try:
                rest = _translate(translated, scrub(rest, secret), event.request_id)
            except ClientError:
                rest = b""
        if relay.done and not client_left():
            settle()
            ctx.finish()
            await send(rest + closing(), last=True)
        else:
            await send(rest)
    if not ctx.done:
        settle()
        if not relay.done and not relay.errored and not client_gone:
            # (An upstream error event was the client's last: it needs no second one.)
            await send(
                dialect.stream_error(ApiError.upstream_failed("the stream broke off"), end=False)
            )
        ctx.finish()
        if translated is None and relay.held_done and not client_left():
            await send(wire.usage_tail(relay, event), last=True)
    if out is not None and not client_gone and not eof_sent:
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await out.write_eof()
    return out if out is not None else web.Response(status=499)


def _translate(out: StreamOut, events: bytes, request_id: str) -> bytes:
    """The client's events for whole upstream events. Events the translation cannot read are
    the upstream's fault: a broken stream (ClientPayloadError), as a bad event is to the
    scanner."""
    try:
        return out.feed(events)
    except ValueError as e:  # the translation naming the field it could not read
        log.warning("request %s: an upstream event could not be translated: %s", request_id, e)
        raise ClientPayloadError("an event could not be translated") from None
    except Exception:  # a bug in the translation
        log.exception("request %s: an upstream event could not be translated", request_id)
        raise ClientPayloadError("an event could not be translated") from None
