"""The aiohttp application factory and its middleware."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from tokenhub.config import Config
from tokenhub.gateway.auth import KeyCache
from tokenhub.gateway.dialects import DIALECTS
from tokenhub.gateway.errors import ApiError, from_http_exception
from tokenhub.gateway.limits import LimitSync
from tokenhub.gateway.protocol import SERVER_NAME
from tokenhub.gateway.routes import setup_routes
from tokenhub.gateway.service import Gateway, Sink, new_request_id
from tokenhub.gateway.state import DIALECT, GATEWAY, METRICS, REQUEST_ID
from tokenhub.gateway.telemetry import Registry

log = logging.getLogger("tokenhub.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_middleware(max_body: int) -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Request ids, and every error in the client's dialect (the only place errors are
        rendered): the one the handler stored on the request (`DIALECT`), else OpenAI's."""
        t0 = time.perf_counter()
        rid = new_request_id()
        request[REQUEST_ID] = rid
        try:
            resp = await handler(request)
            if not resp.prepared:
                resp.headers.setdefault("x-request-id", rid)
            return resp
        except ApiError as e:
            err = e
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = from_http_exception(e, max_body)
        except Exception:
            # Never echo internals (or anything secret) to the client; the log has the trace.
            log.exception("request %s failed", rid)
            err = ApiError.internal()
        dialect = DIALECTS[request.get(DIALECT) or _dialect_of(request.path)]
        resp = web.Response(
            status=err.status,
            body=dialect.error_body(err),
            content_type="application/json",
            headers=err.headers,
        )
        if err.status == 413:
            resp.force_close()  # the client may still be sending the body: no keep-alive
        resp.headers["x-request-id"] = rid
        resp.headers.setdefault(
            "x-tokenhub-overhead-ms", f"{(time.perf_counter() - t0) * 1000:.3f}"
        )
        return resp

    return errors


def _dialect_of(path: str) -> str:
    """The dialect of an error no handler saw (aiohttp's 404, 405, 413): by the path, so that
    a Messages API client that used a wrong method or path still reads Anthropic's shape."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/responses"):
        return "responses"
    return "openai"


CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def create_app(
    config: Config,
    *,
    keys: KeyCache,
    sink: Sink,
    limits: LimitSync | None = None,
    extra_cleanup: list[CleanupCtx] | None = None,
) -> web.Application:
    """The gateway application. `keys`, `sink` and `limits` (None: no limits enforced) are
    owned by the caller, which starts and closes them (they outlive a single app in tests and
    in multi-worker set-ups)."""
    metrics = Registry()
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[_error_middleware(config.server.max_body_bytes)],
    )
    gateway = Gateway(config, keys, sink, metrics, limits)
    app[GATEWAY] = gateway
    app[METRICS] = metrics
    keys_gauge = metrics.gauge(
        "tokenhub_api_keys", "Active API keys in the gateway's table.", merge="self"
    )
    metrics.on_collect(lambda: keys_gauge.set(len(keys)))

    async def upstreams(app: web.Application) -> AsyncIterator[None]:
        await gateway.open()
        yield
        await gateway.close()

    app.cleanup_ctx.append(upstreams)

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_NAME  # aiohttp's default names its version

    app.on_response_prepare.append(server_header)
    for ctx in extra_cleanup or ():
        app.cleanup_ctx.append(ctx)
    setup_routes(app)
    return app
