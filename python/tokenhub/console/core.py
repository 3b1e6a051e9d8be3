"""The console's framework: sessions, roles, CSRF, rendering, flash messages, errors, i18n.

Every page module exports `ROUTES: list[PageRoute]`; tokenhub.console.app registers each
through `guarded`, which (in this order) finds the session from the cookie (one indexed read:
session row joined with its user; an expired session or a disabled user's is no session),
sends a visitor without one to the sign-in page (a GET with `?next=` its local path, to come
back to after signing in), refuses a wrong role
with the 403 page (operators rank read < billing < admin; tenant users reach only "tenant"
routes, operators never), refuses a POST whose `csrf` form field (or X-CSRF-Token header) is
not the session's token with the 403 page before the handler runs, then calls
`handler(request, session)`.

Errors a handler raises: on a POST, a service error (NotFound, AlreadyExists, StoreError,
MoneyError, LedgerError, any ValueError, ConsoleError) becomes a redirect back to the form's
page (the form's `_back` field, else the Referer when it is a local console path) with the
message as an error flash; on a GET, NotFound is the 404 page and the others a 400 page.

Flash messages and one-time values (a new key's secret) are held in this process, per
session, and taken by the next page that renders them: never in a URL or a cookie. The admin
listener is one process (worker 1), so the page after the redirect finds them.

The middleware (`console_middleware`, /console paths only) renders aiohttp's own 404/405 and
unexpected errors as console pages; `on_prepare` adds the security headers and
`Server-Timing: app;dur=<ms>` to every console response as its headers go out (streamed
responses too).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

import jinja2
import msgspec
from aiohttp import web
from markupsafe import Markup
from multidict import MultiDictProxy

from tokenhub.billing.ledger import LedgerError
from tokenhub.db.database import Database, DatabaseError
from tokenhub.money import MoneyError, fmt
from tokenhub.store import console as cstore
from tokenhub.store.base import NotFound, StoreError

log = logging.getLogger("tokenhub.console")

PREFIX = "/console"
SESSION_COOKIE = "th_session"
LANG_COOKIE = "th_lang"  # the language chosen before signing in
PRE_COOKIE = "th_pre"  # the signed-out CSRF token (double submit) of the sign-in form
SESSION_TTL_MS = 12 * 3600 * 1000
OPERATOR_RANK = {r: i for i, r in enumerate(cstore.OPERATOR_ROLES)}
LANGS = cstore.LANGS

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

HERE = Path(__file__).parent


class ConsoleError(Exception):
    """A refusal with a message for the user (a flash on a POST, a 400 page on a GET)."""


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who, with which role (tenant users: which tenant), its CSRF token
    and language. `digest` keys the session's row and its flash messages."""

    user: str
    role: str  # "admin" | "billing" | "read" | "tenant"
    tenant: str | None
    csrf: str
    lang: str
    digest: str = field(repr=False, default="")

    @property
    def is_operator(self) -> bool:
        return self.role in OPERATOR_RANK

    def can(self, role: str) -> bool:
        """Whether this operator session has at least `role` (read < billing < admin)."""
        return self.is_operator and OPERATOR_RANK[self.role] >= OPERATOR_RANK[role]

    @property
    def actor(self) -> str:
        """The admin audit log's actor for this session's writes."""
        return f"console:{self.user}"


Handler = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


class PageRoute(NamedTuple):
    method: str
    path: str
    role: str | None  # "read" | "billing" | "admin" | "tenant" | None (public)
    handler: Handler


# -- the console's state on the admin app -------------------------------------------------------


class _Bounded(OrderedDict[str, Any]):
    """A dict that forgets its oldest entries past `cap` (memory stays bounded)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)


class Throttle:
    """Failed sign-ins per name and per client address: after `limit` failures within
    `window_s`, further attempts are refused until the window has passed (in memory)."""

    def __init__(self, limit: int = 5, window_s: float = 300.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._fails: _Bounded = _Bounded(10_000)

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._fails.get(key, []) if now - t < self.window_s]
        if times:
            self._fails[key] = times
        else:
            self._fails.pop(key, None)
        return times

    def blocked(self, keys: Iterable[str]) -> bool:
        now = time.monotonic()
        return any(len(self._recent(k, now)) >= self.limit for k in keys)

    def fail(self, keys: Iterable[str]) -> None:
        now = time.monotonic()
        for k in keys:
            self._fails.put(k, [*self._recent(k, now), now])

    def clear(self, key: str) -> None:
        self._fails.pop(key, None)


class State:
    """The console's per-app state: database opener, templates, catalogs, static files,
    flash messages and one-time values, the sign-in throttle, the routes' roles."""

    def __init__(self, opener: Callable[[], Awaitable[Database]]) -> None:
        self.opener = opener
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(HERE / "templates")),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["money"] = money_filter
        self.env.filters["ts"] = ts_filter
        self.env.filters["num"] = num_filter
        self.env.globals.update(
            csrf_token=lambda: _RENDERING.get().csrf,
            _=lambda text, **kw: _RENDERING.get().gettext(text, **kw),
            pager_query=lambda cursor: _RENDERING.get().pager_query(cursor),
            take_flashes=lambda: _RENDERING.get().take_flashes(),
        )
        self.catalogs: dict[str, dict[str, str]] = load_catalogs()
        self.static: dict[str, tuple[str, bytes, str]] = {}  # hashed name -> (name, body, type)
        self.static_names: dict[str, str] = {}  # name -> hashed name
        for name, ctype in (("console.css", "text/css"), ("console.js", "text/javascript")):
            body = (HERE / "static" / name).read_bytes()
            stem, _, ext = name.rpartition(".")
            hashed = f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}.{ext}"
            self.static[hashed] = (name, body, ctype)
            self.static_names[name] = hashed
        self.flashes: _Bounded = _Bounded(10_000)  # digest -> [(message, error)]
        self.once: _Bounded = _Bounded(10_000)  # digest -> {name: value}
        self.throttle = Throttle()
        self.get_paths: set[str] = set()  # every GET route's path (the nav shows only these)


STATE: web.AppKey[State] = web.AppKey("console_state", State)
SESSION = web.RequestKey("console_session", Session)
LANG = web.RequestKey("console_lang", str)
PRE_TOKEN = web.RequestKey("console_pre_token", str)  # the sign-in form's CSRF token


def state(request: web.Request) -> State:
    return request.app[STATE]


async def db(request: web.Request) -> Database:
    """The admin app's database (opened on first use)."""
    return await state(request).opener()


# -- i18n ---------------------------------------------------------------------------------------


def load_catalogs() -> dict[str, dict[str, str]]:
    """{lang: {English: translation}}: every locale/<lang>/*.json merged (file order: name)."""
    out: dict[str, dict[str, str]] = {"en": {}}
    for lang in LANGS:
        if lang == "en":
            continue
        merged: dict[str, str] = {}
        for path in sorted((HERE / "locale" / lang).glob("*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            merged.update({str(k): str(v) for k, v in data.items() if v})
        out[lang] = merged
    return out


def pick_lang(accept: str) -> str:
    """The best of en / zh-CN for an Accept-Language header (zh, zh-CN, zh-Hans... -> zh-CN)."""
    best, best_q = "en", 0.0
    for part in accept.split(","):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        lang = "zh-CN" if tag.startswith("zh") else "en" if tag.startswith("en") else None
        if lang is not None and q > best_q:
            best, best_q = lang, q
    return best


def request_lang(request: web.Request) -> str:
    if LANG in request:
        return request[LANG]
    chosen = request.cookies.get(LANG_COOKIE)
    if chosen in LANGS:
        return chosen
    return pick_lang(request.headers.get("Accept-Language", ""))


def gettext(request: web.Request, text: str) -> str:
    """`text` in the request's language (English when the catalog has no entry)."""
    return state(request).catalogs.get(request_lang(request), {}).get(text, text)


# -- formatting helpers for templates -----------------------------------------------------------


def money_filter(nanos: int | None, currency: str, exact: bool = False) -> str:
    return "" if nanos is None else fmt(nanos, currency, exact=exact)


def ts_filter(ms: int | None, with_time: bool = True) -> str:
    if ms is None:
        return ""
    t = time.gmtime(ms / 1000)
    return time.strftime("%Y-%m-%d %H:%M UTC" if with_time else "%Y-%m-%d", t)


def num_filter(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


# -- flash messages and one-time values ---------------------------------------------------------


def flash(request: web.Request, message: str, *, error: bool = False) -> None:
    """Queues a message for the session's next rendered page (no session: dropped)."""
    session = request.get(SESSION)
    if session is None:
        return
    st = state(request)
    items = st.flashes.get(session.digest, [])
    st.flashes.put(session.digest, [*items[-9:], (message, error)])


def show_once(request: web.Request, name: str, value: str) -> None:
    """Holds `value` (e.g. a new key's secret) for this session's next `take_once(name)`:
    in memory only, taken once, never in a URL."""
    session = request[SESSION]
    st = state(request)
    held = dict(st.once.get(session.digest, {}))
    held[name] = value
    st.once.put(session.digest, held)


def take_once(request: web.Request, name: str) -> str | None:
    session = request.get(SESSION)
    if session is None:
        return None
    held = state(request).once.get(session.digest)
    return None if not held else held.pop(name, None)


def _take_flashes(request: web.Request, session: Session | None) -> list[tuple[str, bool]]:
    if session is None:
        return []
    items: list[tuple[str, bool]] = state(request).flashes.pop(session.digest, [])
    return items


# -- rendering ----------------------------------------------------------------------------------

OPERATOR_NAV = (
    ("/console/", "Overview"),
    ("/console/usage", "Usage"),
    ("/console/tenants", "Tenants"),
    ("/console/keys", "Keys"),
    ("/console/billing/prices", "Billing"),
    ("/console/routing", "Routing"),
    ("/console/audit", "Audit"),
)
TENANT_NAV = (
    ("/console/my/", "Balance"),
    ("/console/my/usage", "Usage"),
    ("/console/my/requests", "Requests"),
    ("/console/my/keys", "Keys"),
    ("/console/my/redeem", "Redeem"),
    ("/console/my/statements", "Statements"),
    ("/console/my/limits", "Limits"),
)


def nav(request: web.Request, session: Session | None) -> list[dict[str, Any]]:
    """The session's menu: its role's pages that are registered, the current one marked."""
    if session is None:
        return []
    items = TENANT_NAV if session.role == "tenant" else OPERATOR_NAV
    paths = state(request).get_paths
    here = request.path
    out = []
    for href, label in items:
        if href not in paths:
            continue
        top = href.rstrip("/")
        current = (
            here == href
            or (top not in ("/console", "/console/my") and here.startswith(top))
            or (top == "/console/billing/prices" and here.startswith("/console/billing"))
        )
        out.append({"href": href, "label": gettext(request, label), "current": current})
    return out


@dataclass
class _Page:
    """The page being rendered, for the templates' globals (macros imported without context)."""

    request: web.Request
    csrf: str
    catalog: dict[str, str]
    flashes: list[tuple[str, bool]]

    def gettext(self, text: str, **kw: Any) -> str:
        out = self.catalog.get(text, text)
        return out.format(**kw) if kw else out

    def pager_query(self, cursor: str) -> str:
        """This page's path and query with `cursor` set (the next page's link)."""
        items = [(k, v) for k, v in self.request.query.items() if k != "cursor"]
        return f"{self.request.path}?{urlencode([*items, ('cursor', cursor)])}"

    def take_flashes(self) -> list[tuple[str, bool]]:
        out, self.flashes = self.flashes, []
        return out


_RENDERING: ContextVar[_Page] = ContextVar("console_rendering")


def render(
    request: web.Request,
    session: Session | None,
    template: str,
    *,
    http_status: int = 200,
    **ctx: Any,
) -> web.Response:
    """The page `template` with `ctx`, plus: session, csrf, `_` (translate; keyword arguments
    fill {placeholders}), nav, lang, `static(name)`, request, path; the session's flash
    messages show at the top (base.html calls m.flash())."""
    st = state(request)
    lang = request_lang(request)
    csrf = session.csrf if session is not None else (request.get(PRE_TOKEN) or "")
    # console.js's live refresh re-reads the page for a few elements: flashes stay queued.
    refresh = request.headers.get("X-Refresh") == "1"
    flashes = [] if refresh else _take_flashes(request, session)
    page = _Page(request, csrf, st.catalogs.get(lang, {}), flashes)
    token = _RENDERING.set(page)
    try:
        html = st.env.get_template(template).render(
            request=request,
            path=request.path,
            session=session,
            csrf=csrf,
            _=page.gettext,
            nav=nav(request, session),
            lang=lang,
            static=lambda name: f"{PREFIX}/static/{st.static_names[name]}",
            **ctx,
        )
    finally:
        _RENDERING.reset(token)
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=http_status)


async def form(request: web.Request) -> MultiDictProxy[Any]:
    """The POST's form (urlencoded or multipart); the CSRF token was checked already."""
    return await request.post()


def local_path(target: str | None, default: str) -> str:
    """`target` when it is a path on this console (no scheme, host or `//`), else `default`."""
    if not target or not target.startswith(PREFIX) or target.startswith("//"):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or any(ord(c) < 32 for c in target):
        return default
    if ".." in parts.path.split("/") or "%" in parts.path:  # no way out of /console/
        return default
    return target


def redirect(
    request: web.Request, location: str, *, flash: str | None = None, error: bool = False
) -> web.HTTPSeeOther:
    """POST-redirect-GET: raise the result; `flash` shows on the next page."""
    if flash is not None:
        _flash(request, flash, error=error)
    return web.HTTPSeeOther(local_path(location, PREFIX + "/"))


_flash = flash


def _back(request: web.Request, posted: MultiDictProxy[Any] | None, session: Session) -> str:
    home = "/console/my/" if session.role == "tenant" else "/console/"
    if posted is not None:
        back = posted.get("_back")
        if isinstance(back, str) and local_path(back, "") == back:
            return back
    ref = request.headers.get("Referer", "")
    if ref:
        parts = urlsplit(ref)
        if parts.netloc == request.host:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            return local_path(path, home)
    return home


# -- the guard around every page handler ---------------------------------------------------------


def cookie_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def load_session(request: web.Request) -> Session | None:
    secret = request.cookies.get(SESSION_COOKIE, "")
    if not secret or len(secret) > 200 or not secret.isascii():
        return None
    digest = cookie_digest(secret)
    now = time.time_ns() // 1_000_000
    database = await db(request)
    row = await database.read(lambda tx: cstore.session_in(tx, digest, now))
    if row is None:
        return None
    return Session(
        user=row.user, role=row.role, tenant=row.tenant, csrf=row.csrf, lang=row.lang, digest=digest
    )


def error_page(
    request: web.Request, session: Session | None, status: int, message: str
) -> web.Response:
    titles = {
        400: "Bad request",
        403: "Forbidden",
        404: "Not found",
        405: "Method not allowed",
        429: "Too many attempts",
        500: "Something went wrong",
        503: "Unavailable",
    }
    return render(
        request,
        session,
        "404.html" if status == 404 else "error.html",
        http_status=status,
        status=status,
        heading=titles.get(status, "Error"),
        message=message,
    )


async def _csrf_ok(request: web.Request, expected: str) -> bool:
    given = request.headers.get("X-CSRF-Token", "")
    if not given:
        posted = await request.post()
        value = posted.get("csrf", "")
        given = value if isinstance(value, str) else ""
    return bool(given) and bool(expected) and hmac.compare_digest(given, expected)


SERVICE_ERRORS = (StoreError, MoneyError, LedgerError, ValueError, ConsoleError)


def _message(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def guarded(route: PageRoute) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler for a page route: session, role, CSRF, errors (module docstring)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        session = await load_session(request)
        if session is not None:
            request[SESSION] = session
            request[LANG] = session.lang
        if route.role is not None:
            if session is None:
                if request.method != "GET":  # a form's target is no page to come back to
                    raise web.HTTPSeeOther(f"{PREFIX}/signin")
                raise web.HTTPSeeOther(f"{PREFIX}/signin?next={quote(request.path_qs, safe='/')}")
            allowed = (
                session.role == "tenant"
                if route.role == "tenant"
                else session.is_operator and session.can(route.role)
            )
            if not allowed:
                return error_page(
                    request, session, 403, gettext(request, "Your role cannot open this page.")
                )
        if request.method == "POST":
            if session is not None:
                ok = await _csrf_ok(request, session.csrf)
            else:  # public POSTs (sign-in): the pre-session cookie, double submit
                ok = await _csrf_ok(request, request.cookies.get(PRE_COOKIE, ""))
            if not ok:
                return error_page(
                    request,
                    session,
                    403,
                    gettext(
                        request,
                        "The form expired or did not come from this console. "
                        "Reload the page and try again.",
                    ),
                )
        try:
            return await route.handler(request, session)
        except web.HTTPException:
            raise
        except NotFound as e:
            if request.method == "POST" and session is not None:
                raise redirect(
                    request,
                    _back(request, await request.post(), session),
                    flash=_message(e),
                    error=True,
                ) from None
            return error_page(request, session, 404, _message(e))
        except SERVICE_ERRORS as e:
            if request.method == "POST" and session is not None:
                raise redirect(
                    request,
                    _back(request, await request.post(), session),
                    flash=_message(e),
                    error=True,
                ) from None
            return error_page(request, session, 400, _message(e))

    handle.__name__ = getattr(route.handler, "__name__", "page")
    return handle


# -- the middleware for /console paths ----------------------------------------------------------


T0 = web.RequestKey("console_t0", float)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Security headers and `Server-Timing: app;dur=<ms>` (from the middleware's start to the
    headers going out: handler and rendering) on every /console response, streamed ones and
    redirects too (aiohttp's on_response_prepare)."""
    if T0 not in request:
        return
    response.headers.update(SECURITY_HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - request[T0]) * 1000:.3f}"


@web.middleware
async def console_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Console error pages for /console paths (on_prepare adds the headers)."""
    if request.path != PREFIX and not request.path.startswith(PREFIX + "/"):
        return await handler(request)
    request[T0] = time.perf_counter()
    if PRE_COOKIE in request.cookies:
        request[PRE_TOKEN] = request.cookies[PRE_COOKIE]
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        session = request.get(SESSION)
        if session is None and e.status in (404, 405):  # no route ran: the menu still shows
            try:
                session = await load_session(request)
            except Exception:
                session = None
            if session is not None:
                request[SESSION] = session
                request[LANG] = session.lang
        return error_page(request, session, e.status, gettext(request, e.reason))
    except DatabaseError as e:
        log.error("console: database error: %s", e)
        message = gettext(request, "The database is unavailable.")
        return error_page(request, request.get(SESSION), 503, message)
    except Exception:
        log.exception("console: internal error on %s %s", request.method, request.path)
        message = gettext(request, "Internal error: the log has the details.")
        return error_page(request, request.get(SESSION), 500, message)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def markup(html: str) -> Markup:
    return Markup(html)


# -- keyset cursors --------------------------------------------------------------------------


def encode_cursor(ts_ms: int, request_id: str) -> str:
    """An opaque `cursor` for a page of usage events: the last row's (ts_ms, request_id)."""
    raw = msgspec.json.encode([ts_ms, request_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(request: web.Request) -> tuple[int, str] | None:
    """The `cursor` query parameter's (ts_ms, request_id), None when absent; ConsoleError when
    it is not one encode_cursor made."""
    raw = request.query.get("cursor", "")
    if not raw:
        return None
    try:
        pos = msgspec.json.decode(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        pos = None
    if isinstance(pos, list) and len(pos) == 2 and type(pos[0]) is int and isinstance(pos[1], str):
        return pos[0], pos[1]
    raise ConsoleError(gettext(request, "Invalid cursor: follow the page links as given."))
