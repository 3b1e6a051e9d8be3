"""Sign-in, sign-out and the language switch (public routes; core checks their CSRF tokens:
the sign-in form's is the pre-session cookie's, a double submit)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tokenhub.console import core
from tokenhub.console.core import PageRoute, Session
from tokenhub.console.passwords import dummy_verify, verify_password
from tokenhub.store import console as cstore

NAME_MAX = 64


def _home(role: str) -> str:
    return "/console/my/" if role == "tenant" else "/console/"


def _next_for(role: str, target: str | None) -> str:
    home = _home(role)
    path = core.local_path(target, home)
    is_tenant_path = path.startswith("/console/my/") or path == "/console/my"
    if path.startswith("/console/signin") or is_tenant_path != (role == "tenant"):
        return home
    return path


def _pre_token(request: web.Request) -> tuple[str, bool]:
    """The pre-session CSRF token: the cookie's, or a new one (True: set the cookie)."""
    have = request.cookies.get(core.PRE_COOKIE, "")
    if have and len(have) <= 100 and have.isascii():
        return have, False
    return core.new_secret(), True


def _signin_page(
    request: web.Request, *, error: str | None = None, name: str = "", status: int = 200
) -> web.Response:
    token, fresh = _pre_token(request)
    request[core.PRE_TOKEN] = token
    resp = core.render(
        request,
        None,
        "signin.html",
        http_status=status,
        error=error,
        name=name,
        next=core.local_path(request.query.get("next"), ""),
        bye="bye" in request.query,
    )
    if fresh:
        resp.set_cookie(
            core.PRE_COOKIE,
            token,
            path=core.PREFIX,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
    return resp


async def signin_form(request: web.Request, session: Session | None) -> web.StreamResponse:
    if session is not None:
        raise web.HTTPSeeOther(_home(session.role))
    return _signin_page(request)


async def signin(request: web.Request, session: Session | None) -> web.StreamResponse:
    posted = await core.form(request)
    name = str(posted.get("name", "")).strip()[:NAME_MAX]
    password = str(posted.get("password", ""))
    target = str(posted.get("next", ""))
    st = core.state(request)
    keys = [f"name:{name}", f"ip:{request.remote}"]
    if st.throttle.blocked(keys):
        return _signin_page(
            request,
            error=core.gettext(request, "Too many failed attempts. Wait a few minutes."),
            name=name,
            status=429,
        )
    db = await core.db(request)
    found = await db.read(lambda tx: cstore.password_hash_in(tx, name)) if name else None
    if found is None:
        await asyncio.to_thread(dummy_verify, password)
        ok = False
    else:
        ok = await asyncio.to_thread(verify_password, password, found[1])
        ok = ok and found[0].disabled_ms is None
    if not ok or found is None:
        st.throttle.fail(keys)
        return _signin_page(
            request,
            error=core.gettext(request, "Wrong name or password."),
            name=name,
            status=401,
        )
    user = found[0]
    st.throttle.clear(f"name:{name}")
    secret, csrf = core.new_secret(), core.new_secret()
    now = time.time_ns() // 1_000_000
    await db.transaction(
        lambda tx: cstore.create_session_in(
            tx, core.cookie_digest(secret), user.name, csrf, now + core.SESSION_TTL_MS, now=now
        )
    )
    resp = web.HTTPSeeOther(_next_for(user.role, target))
    resp.set_cookie(
        core.SESSION_COOKIE,
        secret,
        path=core.PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        max_age=core.SESSION_TTL_MS // 1000,
    )
    resp.del_cookie(core.PRE_COOKIE, path=core.PREFIX)
    raise resp


async def signout(request: web.Request, session: Session | None) -> web.StreamResponse:
    if session is not None:
        digest = session.digest
        await (await core.db(request)).transaction(lambda tx: cstore.delete_session_in(tx, digest))
        core.state(request).flashes.pop(digest, None)
        core.state(request).once.pop(digest, None)
    resp = web.HTTPSeeOther(f"{core.PREFIX}/signin?bye=1")
    resp.del_cookie(core.SESSION_COOKIE, path=core.PREFIX)
    raise resp


async def set_lang(request: web.Request, session: Session | None) -> web.StreamResponse:
    posted = await core.form(request)
    lang = str(posted.get("lang", ""))
    if lang not in core.LANGS:
        raise core.ConsoleError(f"unknown language: use one of {', '.join(core.LANGS)}")
    if session is not None:
        user = session.user
        await (await core.db(request)).transaction(lambda tx: cstore.set_lang_in(tx, user, lang))
    back = core.local_path(str(posted.get("_back", "")), "")
    if not back:
        back = _home(session.role) if session is not None else f"{core.PREFIX}/signin"
    resp = web.HTTPSeeOther(back)
    resp.set_cookie(
        core.LANG_COOKIE,
        lang,
        path=core.PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        max_age=365 * 86400,
    )
    raise resp


ROUTES: list[PageRoute] = [
    PageRoute("GET", "/console/signin", None, signin_form),
    PageRoute("POST", "/console/signin", None, signin),
    PageRoute("POST", "/console/signout", None, signout),
    PageRoute("POST", "/console/lang", None, set_lang),
]
