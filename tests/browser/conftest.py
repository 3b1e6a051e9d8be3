"""Fixtures of the browser tests (helpers in browser_kit.py): one `tokenhub serve --demo` for
the session, chromium through Playwright, and browser contexts that record their requests.

Without chromium (or Playwright) the tests skip, saying why; with TOKENHUB_REQUIRE_BROWSER=1
(.ci/run sets it; `make test` installs chromium as root) they fail instead. Playwright's sync
API is used from plain (non-async) tests: pytest-asyncio runs no event loop in their thread.

Every browser context a test opens records each request it makes; at the end of the test
every one must have gone to 127.0.0.1 or localhost (no CDN, no web font, no analytics), and
the browser must have reported no Content-Security-Policy violation (inline script or style).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from browser_kit import VIEWPORT, Demo, Recorder, start_demo, stop_demo, unavailable


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        unavailable("no chromium on PATH: apt-get install --no-install-recommends chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("Playwright is not installed (pip install -r requirements-dev.txt)")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def demo(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One demo server per module, stopped after it: the tests make their own tenants and
    keys in it."""
    tmp = tmp_path_factory.mktemp("demo")
    server = start_demo(
        tmp, "demo-pw-" + secrets.token_urlsafe(12), "th-" + secrets.token_urlsafe(32)
    )
    try:
        yield server
    finally:
        stop_demo(server.popen)


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def new_context(browser: Any) -> Iterator[Callable[..., Any]]:
    """A factory of browser contexts (1280x800; keyword arguments go to new_context, e.g.
    java_script_enabled=False), each recording its requests; checked when the test ends."""
    rec = Recorder()
    contexts: list[Any] = []

    def make(**kwargs: Any) -> Any:
        ctx = browser.new_context(viewport=VIEWPORT, **kwargs)
        ctx.set_default_timeout(15_000)
        ctx.on("request", lambda r: rec.requests.append(r.url))

        def on_page(page: Any) -> None:
            def on_console(msg: Any) -> None:
                if "Content Security Policy" in msg.text:
                    rec.csp.append(f"{page.url}: {msg.text}")

            page.on("console", on_console)

        ctx.on("page", on_page)
        contexts.append(ctx)
        return ctx

    yield make
    for ctx in contexts:
        with contextlib.suppress(Exception):
            ctx.close()
    assert rec.requests, "the test made no request through the browser"
    assert rec.foreign() == [], f"requests that left 127.0.0.1: {rec.foreign()}"
    assert rec.csp == [], f"Content-Security-Policy violations: {rec.csp}"


@pytest.fixture
def page(new_context: Callable[..., Any]) -> Any:
    return new_context().new_page()
