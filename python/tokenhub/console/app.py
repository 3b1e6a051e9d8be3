"""Mounts the console on the admin app: `setup_console(app, opener)`.

Collects every page module's ROUTES (core's sign-in pages, operator_pages, usage_pages,
billing_pages, ops_pages, tenant_pages), wraps each in core.guarded and registers it, serves
the hashed static files (long cache), and adds core.console_middleware for /console paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from tokenhub.console import (
    billing_pages,
    core,
    operator_pages,
    ops_pages,
    signin_pages,
    tenant_pages,
    usage_pages,
)
from tokenhub.db.database import Database

MODULES = (signin_pages, operator_pages, usage_pages, billing_pages, ops_pages, tenant_pages)


def all_routes() -> list[core.PageRoute]:
    """Every page route of every console module."""
    return [r for m in MODULES for r in m.ROUTES]


async def static_file(request: web.Request) -> web.Response:
    found = core.state(request).static.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    _, body, ctype = found
    return web.Response(
        body=body,
        content_type=ctype,
        charset="utf-8",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


async def to_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(core.PREFIX + "/")


def setup_console(app: web.Application, opener: Callable[[], Awaitable[Database]]) -> None:
    """Adds /console to `app` (call before the app starts)."""
    st = core.State(opener)
    app[core.STATE] = st
    app.middlewares.append(core.console_middleware)
    app.on_response_prepare.append(core.on_prepare)
    app.router.add_get(core.PREFIX, to_slash)
    app.router.add_get(core.PREFIX + "/static/{name}", static_file)
    for r in all_routes():
        app.router.add_route(r.method, r.path, core.guarded(r))
        if r.method == "GET":
            st.get_paths.add(r.path)
