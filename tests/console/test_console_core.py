"""The console's framework: sign-in, sessions, roles, CSRF, headers, i18n, static files, and
the generic checks over every module's ROUTES."""

from __future__ import annotations

from typing import Any


async def test_signin_page_renders(console_client: Any) -> None:
    anon = await console_client(None)
    resp = await anon.get("/console/signin")
    assert resp.status == 200
    html = await resp.text()
    assert 'id="signin-form"' in html
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")


async def test_admin_signs_in(console_client: Any) -> None:
    admin = await console_client("admin")
    assert admin.csrf
