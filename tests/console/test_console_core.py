"""The console's framework (tokenhub.console.core, signin_pages, app): sign-in, sessions, roles,
CSRF, security headers, i18n, static files, the console-users command, and generic checks over
every page module's ROUTES (so each module's routes are covered as it lands)."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from console_kit import PASSWORD, USERS, World, csrf_of, flashes, sign_in

from tokenhub.console import core
from tokenhub.console.app import all_routes
from tokenhub.console.charts import bar_chart, line_chart, sparkline
from tokenhub.console.passwords import hash_password, verify_password

OPERATOR = ("read", "billing", "admin")
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
INLINE_STYLE = re.compile(r"<style\b|\sstyle=|\son[a-z]+=", re.I)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def _snapshot(db: str) -> str:
    """A digest of every table's rows (sessions aside: sign-ins make them)."""
    con = sqlite3.connect(db)
    try:
        h = hashlib.sha256()
        tables = [
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1")
            if r[0] != "console_sessions"
        ]
        for t in tables:
            for row in con.execute(f'SELECT * FROM "{t}" ORDER BY 1'):
                h.update(repr(row).encode())
        return h.hexdigest()
    finally:
        con.close()


def _sql(db: str, statement: str, *args: Any) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute(statement, args)
        con.commit()
    finally:
        con.close()


# -- sign-in -----------------------------------------------------------------------------------


async def test_signin_sets_a_strict_httponly_cookie_and_lands_home(console_client: Any) -> None:
    anon = await console_client(None)
    page = await anon.get("/console/signin")
    assert page.status == 200
    assert "th_pre=" in page.headers.get("Set-Cookie", "")
    pre = csrf_of(await page.text())
    resp = await anon.post(
        "/console/signin",
        data={"csrf": pre, "name": "root", "password": PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/"
    cookie = next(v for v in resp.headers.getall("Set-Cookie") if v.startswith("th_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http here; https gets Secure


async def test_wrong_password_unknown_user_and_disabled_user_are_refused(
    console_client: Any, world: World
) -> None:
    anon = await console_client(None)
    pre = csrf_of(await (await anon.get("/console/signin")).text())
    _sql(world.db, "UPDATE console_users SET disabled_ms = 1 WHERE name = 'viewer'")
    for name, pw in (("root", "wrong password"), ("nobody", PASSWORD), ("viewer", PASSWORD)):
        resp = await anon.post(
            "/console/signin",
            data={"csrf": pre, "name": name, "password": pw},
            allow_redirects=False,
        )
        assert resp.status == 401, name
        html = await resp.text()
        assert 'id="signin-error"' in html and "Wrong name or password." in html
        assert "th_session=" not in resp.headers.get("Set-Cookie", "")


async def test_disabling_a_user_ends_its_session_at_once(console_client: Any, world: World) -> None:
    viewer = await console_client("read")
    assert (await viewer.get("/console/signin", allow_redirects=False)).status == 303
    _sql(world.db, "UPDATE console_users SET disabled_ms = 1 WHERE name = 'viewer'")
    resp = await viewer.get("/console/tenants", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/console/signin?next=")


async def test_an_expired_session_is_no_session(console_client: Any, world: World) -> None:
    admin = await console_client("admin")
    _sql(world.db, "UPDATE console_sessions SET expires_ms = 1")
    resp = await admin.get("/console/keys", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/signin?next=/console/keys"


async def test_sign_in_throttle_after_five_failures(console_client: Any) -> None:
    anon = await console_client(None)
    pre = csrf_of(await (await anon.get("/console/signin")).text())
    for _ in range(5):
        resp = await anon.post(
            "/console/signin", data={"csrf": pre, "name": "cashier", "password": "nope-nope"}
        )
        assert resp.status == 401
    resp = await anon.post(
        "/console/signin",
        data={"csrf": pre, "name": "cashier", "password": PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 429
    assert "Too many failed attempts" in await resp.text()


async def test_signout_deletes_the_session(console_client: Any, world: World) -> None:
    admin = await console_client("admin")
    secret = next(c.value for c in admin.session.cookie_jar if c.key == "th_session")
    resp = await admin.post("/console/signout", data={"csrf": admin.csrf}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/console/signin?bye=1"
    con = sqlite3.connect(world.db)
    n = con.execute("SELECT COUNT(*) FROM console_sessions WHERE user_name = 'root'").fetchone()
    con.close()
    assert n == (0,)
    # The old cookie, replayed, is nobody's.
    replay = await console_client(None)
    replay.session.cookie_jar.update_cookies({"th_session": secret})
    resp = await replay.get("/console/keys", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/console/signin")


async def test_next_takes_only_local_paths(console_client: Any) -> None:
    for target, want in (
        ("/console/keys", "/console/keys"),
        ("https://evil.example/console/", "/console/"),
        ("//evil.example/console/", "/console/"),
        ("/console/my/", "/console/"),  # an operator's sign-in never lands on a tenant page
        ("/console/../admin/v1/tenants", "/console/"),
        ("/console/%2e%2e/admin/v1/tenants", "/console/"),
    ):
        anon = await console_client(None)
        pre = csrf_of(await (await anon.get("/console/signin")).text())
        resp = await anon.post(
            "/console/signin",
            data={"csrf": pre, "name": "root", "password": PASSWORD, "next": target},
            allow_redirects=False,
        )
        assert resp.headers["Location"] == want, target


async def test_not_signed_in_goes_to_sign_in_with_next(console_client: Any) -> None:
    anon = await console_client(None)
    resp = await anon.get("/console/keys?tenant=acme", allow_redirects=False)
    assert resp.status == 303
    loc = urlsplit(resp.headers["Location"])
    assert loc.path == "/console/signin"
    assert parse_qs(loc.query) == {"next": ["/console/keys?tenant=acme"]}


async def test_signin_without_the_pre_session_token_is_403(console_client: Any) -> None:
    anon = await console_client(None)
    await anon.get("/console/signin")
    resp = await anon.post(
        "/console/signin", data={"name": "root", "password": PASSWORD}, allow_redirects=False
    )
    assert resp.status == 403
    resp = await anon.post(
        "/console/signin",
        data={"csrf": "forged", "name": "root", "password": PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 403


# -- language ----------------------------------------------------------------------------------


async def test_accept_language_before_sign_in(console_client: Any) -> None:
    anon = await console_client(None)
    resp = await anon.get("/console/signin", headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    html = await resp.text()
    assert '<html lang="zh-CN">' in html and "登录" in html
    resp = await anon.get("/console/signin", headers={"Accept-Language": "en-US,en;q=0.8"})
    assert "登录" not in await resp.text()


async def test_lang_switch_is_kept_on_the_user(console_client: Any, world: World) -> None:
    admin = await console_client("admin")
    resp = await admin.post(
        "/console/lang",
        data={"csrf": admin.csrf, "lang": "zh-CN", "_back": "/console/keys"},
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == "/console/keys"
    html = await (await admin.get("/console/")).text()
    assert "退出" in html and '<html lang="zh-CN">' in html
    con = sqlite3.connect(world.db)
    assert con.execute("SELECT lang FROM console_users WHERE name = 'root'").fetchone() == (
        "zh-CN",
    )
    con.close()
    bad = await admin.post("/console/lang", data={"csrf": admin.csrf, "lang": "fr"})
    assert bad.status in (200, 400)


def test_pick_lang() -> None:
    assert core.pick_lang("zh-Hans-CN, en;q=0.5") == "zh-CN"
    assert core.pick_lang("en-GB,zh;q=0.1") == "en"
    assert core.pick_lang("fr, de") == "en"
    assert core.pick_lang("en;q=0.2, zh-TW;q=0.9") == "zh-CN"


def test_catalogs_translate_every_core_string() -> None:
    catalogs = core.load_catalogs()
    for text in ("Sign in", "Sign out", "Overview", "Tenants", "Keys", "Next page"):
        assert catalogs["zh-CN"].get(text), text


# -- headers, static files, errors -------------------------------------------------------------


async def test_security_headers_and_server_timing(console_client: Any) -> None:
    admin = await console_client("admin")
    for path in ("/console/", "/console/signin", "/console/no-such-page"):
        resp = await admin.get(path, allow_redirects=False)
        h = resp.headers
        assert h["Content-Security-Policy"] == core.CSP
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "same-origin"
        assert h["Cache-Control"] == "no-store"
        assert re.fullmatch(r"app;dur=\d+\.\d{3}", h["Server-Timing"]), h["Server-Timing"]
    resp = await admin.get("/console/no-such-page")
    assert resp.status == 404
    assert 'data-status="404"' in await resp.text()


async def test_static_files_have_hashed_names_and_long_cache(console_client: Any) -> None:
    anon = await console_client(None)
    html = await (await anon.get("/console/signin")).text()
    css = re.search(r'href="(/console/static/console\.[0-9a-f]{12}\.css)"', html)
    js = re.search(r'src="(/console/static/console\.[0-9a-f]{12}\.js)"', html)
    assert css and js
    for url, ctype in ((css.group(1), "text/css"), (js.group(1), "text/javascript")):
        resp = await anon.get(url)
        assert resp.status == 200
        assert resp.content_type == ctype
        assert "immutable" in resp.headers["Cache-Control"]
    body = await (await anon.get(css.group(1))).text()
    assert '"Noto Sans CJK SC"' in body and "@font-face" not in body and "url(" not in body
    assert (await anon.get("/console/static/console.css")).status == 404


async def test_admin_api_is_untouched_by_the_console(console_client: Any) -> None:
    anon = await console_client(None)
    resp = await anon.get("/admin/v1/tenants")
    assert resp.status == 401 and resp.content_type == "application/json"
    resp = await anon.get("/admin/v1/health")
    assert resp.status == 200


# -- generic checks over every module's routes ------------------------------------------------


def _routes(pred: Any) -> list[core.PageRoute]:
    return [r for r in all_routes() if pred(r)]


async def test_every_post_without_csrf_is_403_and_changes_nothing(
    console_client: Any, world: World
) -> None:
    clients = {
        "operator": await console_client("admin"),
        "tenant": await console_client("tenant", tenant="acme"),
        None: await console_client(None),
    }
    before = _snapshot(world.db)
    posts = _routes(lambda r: r.method == "POST")
    assert any(r.path == "/console/signin" for r in posts)
    for r in posts:
        who = None if r.role is None else "tenant" if r.role == "tenant" else "operator"
        client = clients[who]
        for data in ({}, {"csrf": "not-the-token"}):
            resp = await client.post(_concrete(r.path), data=data, allow_redirects=False)
            assert resp.status == 403, (r.path, data, resp.status)
    assert _snapshot(world.db) == before


async def test_every_operator_write_refuses_a_read_only_session(
    console_client: Any, world: World
) -> None:
    viewer = await console_client("read")
    cashier = await console_client("billing")
    before = _snapshot(world.db)
    for r in _routes(lambda r: r.method == "POST" and r.role in ("billing", "admin")):
        resp = await viewer.post(
            _concrete(r.path), data={"csrf": viewer.csrf}, allow_redirects=False
        )
        assert resp.status == 403, r.path
        if r.role == "admin":
            resp = await cashier.post(
                _concrete(r.path), data={"csrf": cashier.csrf}, allow_redirects=False
            )
            assert resp.status == 403, r.path
    assert _snapshot(world.db) == before


async def test_every_operator_route_refuses_a_tenant(console_client: Any, world: World) -> None:
    tenant = await console_client("tenant", tenant="acme")
    before = _snapshot(world.db)
    routes = _routes(lambda r: r.role in OPERATOR)
    assert routes
    for r in routes:
        data = {"csrf": tenant.csrf} if r.method == "POST" else None
        resp = await tenant.request(r.method, _concrete(r.path), data=data, allow_redirects=False)
        assert resp.status == 403, r.path
    assert _snapshot(world.db) == before


async def test_every_tenant_route_refuses_an_operator(console_client: Any, world: World) -> None:
    admin = await console_client("admin")
    before = _snapshot(world.db)
    for r in _routes(lambda r: r.role == "tenant"):
        data = {"csrf": admin.csrf} if r.method == "POST" else None
        resp = await admin.request(r.method, _concrete(r.path), data=data, allow_redirects=False)
        assert resp.status == 403, r.path
    assert _snapshot(world.db) == before


async def test_every_guarded_route_sends_a_visitor_to_sign_in(
    console_client: Any, world: World
) -> None:
    anon = await console_client(None)
    before = _snapshot(world.db)
    for r in _routes(lambda r: r.role is not None):
        resp = await anon.request(r.method, _concrete(r.path), allow_redirects=False)
        assert resp.status == 303, r.path
        want = "/console/signin?next=" if r.method == "GET" else "/console/signin"
        assert resp.headers["Location"].startswith(want), r.path
    assert _snapshot(world.db) == before


async def test_every_get_page_renders_for_its_role_without_inline_code(
    console_client: Any,
) -> None:
    clients = {
        "read": await console_client("read"),
        "billing": await console_client("billing"),
        "admin": await console_client("admin"),
        "tenant": await console_client("tenant", tenant="acme"),
        None: await console_client(None),
    }
    pages = _routes(lambda r: r.method == "GET" and "{" not in r.path)
    assert any(r.path == "/console/" for r in pages)
    for r in pages:
        resp = await clients[r.role].get(r.path, allow_redirects=False)
        assert resp.status == 200, (r.path, resp.status)
        assert resp.headers.get("Content-Security-Policy") == core.CSP, r.path
        if resp.content_type == "text/html":
            html = await resp.text()
            assert not INLINE_SCRIPT.search(html), r.path
            assert not INLINE_STYLE.search(html), (r.path, INLINE_STYLE.search(html))


# -- passwords, charts -------------------------------------------------------------------------


def test_password_hash_round_trip() -> None:
    stored = hash_password("s3cret-pass", n=2**10)
    assert stored.startswith("scrypt$1024$8$1$")
    assert verify_password("s3cret-pass", stored)
    assert not verify_password("s3cret-pasS", stored)
    assert not verify_password("s3cret-pass", "garbage")
    assert hash_password("same", n=2**10) != hash_password("same", n=2**10)  # salted


def test_charts_are_svg_with_tooltips() -> None:
    bars = str(bar_chart(["d1", "d2"], {"ok": [3, 4], "error": [1, 0]}, title="Requests"))
    assert bars.count("<rect") == 3 and "<title>d1 · error: 1</title>" in bars
    assert "<script" not in bars and "style=" not in bars
    lines = str(line_chart(["a", "b", "c"], {"in": [1, 5, 2]}))
    assert "<polyline" in lines and lines.count("<circle") == 3
    assert "<title>b · in: 5</title>" in lines
    assert "<polyline" in str(sparkline([1, 2, 3]))
    esc = str(bar_chart(["<b>"], {"x": [1]}))
    assert "<b>" not in esc and "&lt;b&gt;" in esc


# -- the console-users command -----------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, subprocess_: bool = False) -> Any:
    """`tokenhub console-users ARGS`: in this process (fast), or as a real command."""
    import contextlib
    import io
    import os
    from types import SimpleNamespace

    from tokenhub.cli import main

    e = {k: v for k, v in os.environ.items() if k != "TOKENHUB_CONSOLE_PASSWORD"}
    e.update(env or {})
    if subprocess_:
        return subprocess.run(
            [sys.executable, "-m", "tokenhub", "console-users", *args],
            capture_output=True, text=True, env=e, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(e)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["console-users", *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_console_users_cli(tmp_path: Path, world: World) -> None:
    db = world.db
    pw = tmp_path / "pw"
    pw.write_text("a fine password\n")
    r = _cli(
        "create", "ops2", "--role", "billing", "--password-file", str(pw), "--db", db,
        subprocess_=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "a fine password" not in r.stdout + r.stderr
    r = _cli("create", "t2", "--role", "tenant", "--tenant", "acme", "--db", db,
             env={"TOKENHUB_CONSOLE_PASSWORD": "env password"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    for bad, msg in (
        (["create", "t3", "--role", "tenant"], "needs its tenant"),
        (["create", "t3", "--role", "tenant", "--tenant", "nope"], "no tenant"),
        (["create", "ops2", "--role", "read"], "already exists"),
        (["create", "bad name", "--role", "read"], "invalid user name"),
    ):
        r = _cli(*bad, "--password-file", str(pw), "--db", db)
        assert r.returncode == 2 and msg in r.stderr, (bad, r.stderr)
        assert r.stderr.count("\n") == 1
    # No file, no variable, no terminal to ask on.
    r = _cli("create", "nopw", "--role", "read", "--db", db, subprocess_=True)
    assert r.returncode == 2 and "--password-file" in r.stderr
    short = tmp_path / "short"
    short.write_text("short\n")
    r = _cli("passwd", "ops2", "--password-file", str(short), "--db", db)
    assert r.returncode == 2 and "8 to 1024" in r.stderr
    r = _cli("list", "--json", "--db", db)
    assert r.returncode == 0
    assert '"name":"ops2"' in r.stdout and "password" not in r.stdout
    names = set(re.findall(r'"name":"([^"]+)"', r.stdout))
    assert names == {*USERS, "ops2", "t2"}
    assert _cli("disable", "ops2", "--db", db).returncode == 0
    r = _cli("disable", "ops2", "--db", db)
    assert r.returncode == 2 and "already disabled" in r.stderr
    r = _cli("passwd", "ops2", "--enable", "--password-file", str(pw), "--db", db)
    assert r.returncode == 0, r.stderr
    con = sqlite3.connect(db)
    row = con.execute(
        "SELECT role, tenant, disabled_ms, password_hash FROM console_users WHERE name = 'ops2'"
    ).fetchone()
    con.close()
    assert row[:3] == ("billing", None, None)
    assert verify_password("a fine password", row[3])


async def test_a_cli_made_user_signs_in(console_client: Any, world: World) -> None:
    _sql(
        world.db,
        "INSERT INTO console_users (name, password_hash, role, tenant, lang, created_ms) "
        "VALUES ('made', ?, 'read', NULL, 'en', 0)",
        hash_password("made password", n=2**10),
    )
    client = await console_client(None)
    assert await sign_in(client, "made", "made password")
    assert flashes("<p>none</p>") == []


@pytest.mark.parametrize("role", ["tenant"])
async def test_tenant_lands_on_its_own_home(console_client: Any, role: str) -> None:
    anon = await console_client(None)
    pre = csrf_of(await (await anon.get("/console/signin")).text())
    resp = await anon.post(
        "/console/signin",
        data={"csrf": pre, "name": "acme-user", "password": PASSWORD, "next": "/console/keys"},
        allow_redirects=False,
    )
    assert resp.headers["Location"] == "/console/my/"
    tenant = await console_client(role, tenant="acme")
    resp = await tenant.get("/console/keys", allow_redirects=False)
    assert resp.status == 403


# -- the demo's console logins -----------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_demo_prints_console_logins_that_work(tmp_path: Path) -> None:
    import asyncio
    import os
    import signal

    import aiohttp

    port, admin_port = _free_port(), _free_port()
    out = tmp_path / "demo.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHUB_")}
    with open(out, "wb") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "tokenhub", "serve", "--demo", "--port", str(port),
             "--admin-listen", f"127.0.0.1:{admin_port}"],
            cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "Stop:" not in out.read_text():
            assert p.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            await asyncio.sleep(0.05)
        text = out.read_text()
        m = re.search(
            r"^console: (http://\S+/console/)  operator login: (\S+) / (\S+)  "
            r"tenant login: (\S+) / (\S+)$",
            text,
            re.M,
        )
        assert m, text
        url, op, op_pw, tenant, tenant_pw = m.groups()
        assert url == f"http://127.0.0.1:{admin_port}/console/"
        assert (op, tenant) == ("admin", "demo") and op_pw != tenant_pw
        base = url.removesuffix("/console/")
        for name, pw, home in ((op, op_pw, "/console/"), (tenant, tenant_pw, "/console/my/")):
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(base, cookie_jar=jar) as http:
                page = await http.get("/console/signin")
                pre = csrf_of(await page.text())
                resp = await http.post(
                    "/console/signin",
                    data={"csrf": pre, "name": name, "password": pw},
                    allow_redirects=False,
                )
                assert resp.status == 303, (name, await resp.text())
                assert resp.headers["Location"] == home
                assert any(c.key == "th_session" for c in jar)
                if name == op:
                    overview = await http.get("/console/")
                    assert overview.status == 200 and 'id="stat-week"' in await overview.text()
                wrong = await http.post(
                    "/console/signin",
                    data={"csrf": pre, "name": name, "password": pw + "x"},
                    allow_redirects=False,
                )
                assert wrong.status in (401, 403)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)


# -- every visible string of the core's and operator pages has its zh-CN entry -----------------

H2_TEMPLATES = (
    "base.html", "_macros.html", "signin.html", "error.html", "overview.html", "tenants.html",
    "tenants_new.html", "tenants_detail.html", "keys.html", "keys_detail.html",
)  # fmt: skip
H2_MODULES = ("core.py", "signin_pages.py", "operator_pages.py")


def test_every_h2_string_has_a_chinese_entry() -> None:
    here = Path(core.__file__).parent
    found: set[str] = set()
    for name in H2_TEMPLATES:
        text = (here / "templates" / name).read_text(encoding="utf-8")
        found |= set(re.findall(r'_\(\s*"([^"]+)"', text))
        found |= set(re.findall(r"_\(\s*'([^']+)'", text))
    for name in H2_MODULES:
        text = (here / name).read_text(encoding="utf-8")
        found |= set(re.findall(r'gettext\(\s*request,\s*"([^"]+)"\s*\)', text))
        found |= {m for m in re.findall(r'msg = "([^"]+)"', text)}
    assert len(found) > 100
    zh = core.load_catalogs()["zh-CN"]
    assert sorted(s for s in found if s not in zh) == []


async def test_an_operator_in_chinese(console_client: Any, world: World) -> None:
    _sql(world.db, "UPDATE console_users SET lang = 'zh-CN' WHERE name = 'root'")
    admin = await console_client("admin")
    html = await (await admin.get("/console/")).text()
    assert "每日请求数（14 天）" in html and "主要租户（7 天）" in html
    html = await (await admin.get(f"/console/tenants/{world.tenant_ids['acme']}")).text()
    assert "钱包充值" in html and "合约" in html


# -- the same on PostgreSQL --------------------------------------------------------------------


@pytest.mark.postgres
async def test_console_on_postgresql(pg_database: str) -> None:
    """Sign-in, the overview and tenant pages, a key with its secret once, a top-up once, a
    disabled user's session ending: the console's SQL on PostgreSQL."""
    from aiohttp.test_utils import TestClient, TestServer
    from console_kit import seed

    from tokenhub.admin.app import build_admin_app

    world = await seed(pg_database)
    server = TestServer(build_admin_app(pg_database))
    await server.start_server()
    clients: list[TestClient[Any, Any]] = []
    try:

        async def client(name: str) -> TestClient[Any, Any]:
            c: TestClient[Any, Any] = TestClient(server)
            await c.start_server()
            clients.append(c)
            await sign_in(c, name)
            return c

        admin = await client("root")
        html = await (await admin.get("/console/")).text()
        assert re.search(r'id="stat-week">.*?data-value="4"', html, re.S)
        assert 'data-alert="none"' in html
        acme = f"/console/tenants/{world.tenant_ids['acme']}"
        html = await (await admin.get(acme)).text()
        assert 'data-wallet="84000000000"' in html and 'data-remaining="850"' in html
        idem = re.search(r'id="topup-form".*?name="idem" value="([^"]+)"', html, re.S)
        assert idem
        form = {"csrf": admin.csrf, "amount": "1.50", "currency": "CNY", "idem": idem.group(1)}
        for _ in range(2):
            resp = await admin.post(f"{acme}/topup", data=form, allow_redirects=False)
            assert resp.status == 303
        html = await (await admin.get(acme)).text()
        assert 'data-wallet="85500000000"' in html
        resp = await admin.post(
            "/console/keys", data={"csrf": admin.csrf, "tenant": "bravo"}, allow_redirects=False
        )
        page1 = await (await admin.get(resp.headers["Location"])).text()
        page2 = await (await admin.get(resp.headers["Location"])).text()
        assert 'id="secret"' in page1 and 'id="secret"' not in page2
        html = await (await admin.get("/console/tenants")).text()
        assert re.findall(r'class="tenant-row" data-tenant="([^"]+)"', html) == ["acme", "bravo"]
        viewer = await client("viewer")
        import asyncpg

        con = await asyncpg.connect(pg_database)
        try:
            await con.execute("UPDATE console_users SET disabled_ms = 1 WHERE name = 'viewer'")
        finally:
            await con.close()
        resp = await viewer.get("/console/", allow_redirects=False)
        assert resp.status == 303
    finally:
        for c in clients:
            await c._session.close()
        await server.close()


def test_chart_axis_labels_stay_short() -> None:
    from tokenhub.console.charts import compact

    assert [compact(v) for v in (950, 1500, 2_000_000, 1_234_567_890)] == [
        "950", "1.5k", "2M", "1.2G",
    ]  # fmt: skip
    svg = str(bar_chart([f"d{i}" for i in range(30)], {"tokens": [2_000_000] * 30}))
    assert ">2M<" in svg and "<title>d0: 2,000,000</title>" in svg
    labels = re.findall(r'text-anchor="middle">([^<]+)<', svg)
    assert labels[-1] == "d29" and len(labels) <= 8
    # The last x label, centred under its bar, fits inside the chart; a unit is written once.
    last_x = float(re.findall(r'x="([\d.]+)" y="\d+" text-anchor="middle">d29<', svg)[0])
    assert 640 - last_x >= 30
    svg = str(bar_chart(["a", "b"], {"tokens": [50_000, 1]}, unit=" tokens"))
    assert svg.count("tokens</text>") == 1 and ">50k<" in svg
