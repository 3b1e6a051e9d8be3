"""The admin API's aiohttp app: `build_admin_app(database_url)`, its middlewares and listener.

Middlewares, outermost first: errors (every failure becomes the OpenAI error body, in
tokenhub.gateway.errors' one place: the store's NotFound is 404, AlreadyExists 409, a refused
value 400), then auth (`Authorization: Bearer <admin token>`: 401 without a valid, unrevoked
token, 403 when its scope is below the route's). Tokens are looked up in the database on every
request (one indexed read; admin traffic is light), so a revoked token is refused at once.

The database is opened on the first request that needs it, so a gateway whose admin API is
never called holds no extra connection.

`routing_state`: the gateway's live routing state (tokenhub.routing_state), given by
`tokenhub serve` (runtime/serve._start_admin), kept under ROUTING_STATE for the console's
routing page and overview alerts; without it those pages show the database's figures only.
A provider with a `close()` (LiveRouting's sampling timer) is closed with the app.

The web console (tokenhub.console) is mounted on the same app under /console: its own
middleware (sessions, CSRF, security headers, HTML error pages) handles those paths, which the
errors and auth middlewares pass through untouched.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from tokenhub.admin.routes import ACTOR, DB, ROUTES
from tokenhub.admin.web import DatabaseOpener
from tokenhub.billing.ledger import LedgerError
from tokenhub.console.app import setup_console
from tokenhub.db.database import DatabaseError
from tokenhub.gateway.errors import ApiError, from_http_exception
from tokenhub.money import MoneyError
from tokenhub.routing_state import ROUTING_STATE, RoutingProvider
from tokenhub.store import sql
from tokenhub.store.base import ADMIN_SCOPES, AlreadyExists, NotFound, StoreError

log = logging.getLogger("tokenhub.admin")

SCOPE: web.AppKey[dict[object, str | None]] = web.AppKey("admin_scopes")
MAX_BODY = web.AppKey("admin_max_body", int)
_RANK = {s: i for i, s in enumerate(ADMIN_SCOPES)}
CONSOLE_PREFIX = "/console"


def _unauthorized() -> ApiError:
    return ApiError(
        401,
        "Incorrect admin token provided. Pass a valid tokenhub admin token as "
        "'Authorization: Bearer <token>' (tokenhub admin-tokens create).",
        code="invalid_admin_token",
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith(CONSOLE_PREFIX):  # the console renders its own error pages
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return from_http_exception(e, request.app[MAX_BODY]).response()
    except NotFound as e:
        return ApiError(404, _one_line(str(e)), code="not_found").response()
    except AlreadyExists as e:
        return ApiError(409, _one_line(str(e)), code="already_exists").response()
    except (StoreError, MoneyError, LedgerError) as e:
        return ApiError.bad_request(_one_line(str(e))).response()
    except DatabaseError as e:
        log.error("admin API: database error: %s", e)
        return ApiError(
            503, "The database is unavailable.", type="server_error", code="database_error"
        ).response()
    except Exception:
        log.exception("admin API: internal error on %s %s", request.method, request.path)
        return ApiError.internal().response()


@web.middleware
async def auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    route_handler = getattr(request.match_info, "handler", None)
    scopes = request.app[SCOPE]
    if route_handler not in scopes:  # aiohttp's own 404/405: no route, nothing to guard
        return await handler(request)
    need = scopes[route_handler]
    if need is None:
        return await handler(request)
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or not secret.isascii():
        raise _unauthorized()
    digest = hashlib.sha256(secret.encode()).hexdigest()
    db = await request.app[DB]()
    token = await db.read(lambda tx: sql.admin_token_by_digest(tx, digest))
    if token is None:
        raise _unauthorized()
    if _RANK[token.scope] < _RANK[need]:
        raise ApiError(
            403,
            f"This admin token has scope '{token.scope}'; {request.method} {request.path} "
            f"needs '{need}' or higher.",
            type="permission_error",
            code="insufficient_scope",
        )
    request[ACTOR] = token
    return await handler(request)


def build_admin_app(
    database_url: str,
    *,
    max_body_bytes: int = 1024 * 1024,
    routing_state: RoutingProvider | None = None,
) -> web.Application:
    app = web.Application(middlewares=[errors, auth], client_max_size=max_body_bytes)
    lazy = DatabaseOpener(database_url)
    app[DB] = lazy
    if routing_state is not None:
        app[ROUTING_STATE] = routing_state
        close = getattr(routing_state, "close", None)
        if callable(close):

            async def close_provider(app: web.Application) -> None:
                close()

            app.on_cleanup.append(close_provider)
    app[MAX_BODY] = max_body_bytes
    scopes: dict[object, str | None] = {r.handler: r.scope for r in ROUTES}
    app[SCOPE] = scopes
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    app.on_cleanup.append(lazy.close)
    setup_console(app, lazy)
    return app


async def start_admin_listener(
    database_url: str,
    host: str,
    port: int,
    *,
    max_body_bytes: int = 1024 * 1024,
    routing_state: RoutingProvider | None = None,
) -> web.AppRunner | None:
    """Serves the admin API on host:port; None (and one line on stderr) when the address
    cannot be bound: the gateway serves on without it rather than not at all."""
    app = build_admin_app(database_url, max_body_bytes=max_body_bytes, routing_state=routing_state)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(
            f"tokenhub: warning: admin API not started: cannot listen on {host}:{port}: "
            f'{e.strerror or e} (set [admin] listen, or "" to turn it off)',
            file=sys.stderr,
            flush=True,
        )
        return None
    return runner
