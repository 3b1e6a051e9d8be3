"""What the browser tests share (their fixtures are in conftest.py): a real
`tokenhub serve --demo` (a subprocess on free ports, its own SQLite database in a temp dir)
started and stopped, what it printed, sign-in through the form, bounded polling, and the
record of a browser context's requests (all must stay on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

TOKENHUB = str(Path(sys.executable).with_name("tokenhub"))
REQUIRE = os.environ.get("TOKENHUB_REQUIRE_BROWSER") == "1"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
VIEWPORT = {"width": 1280, "height": 800}
START_TIMEOUT_S = 60.0


def unavailable(reason: str) -> None:
    """Skip, or fail where the browser is required (CI)."""
    if REQUIRE:
        pytest.fail(f"{reason} (TOKENHUB_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str, check: Callable[[], Any], timeout: float = 15.0, every: float = 0.1
) -> Any:
    """Polls `check` until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@dataclass
class Demo:
    """A running `tokenhub serve --demo` and what it printed."""

    api: str  # http://127.0.0.1:PORT/v1
    base: str  # the admin listener: http://127.0.0.1:PORT
    console: str  # BASE/console/
    operator: tuple[str, str]  # (name, password) as printed
    tenant: tuple[str, str]
    key: str  # the demo tenant's API key
    db: Path
    out: Path
    err: Path
    popen: subprocess.Popen[bytes] = field(repr=False)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`tokenhub ARGS` on the demo's database."""
        r = subprocess.run(
            [TOKENHUB, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TOKENHUB_DB": str(self.db)},
        )
        if check and r.returncode != 0:
            raise AssertionError(f"tokenhub {' '.join(args)}: {r.returncode}\n{r.stderr}")
        return r

    def cli_bytes(self, *args: str) -> bytes:
        """`tokenhub ARGS` on the demo's database: its stdout as written (no newline mapping)."""
        r = subprocess.run(
            [TOKENHUB, *args],
            capture_output=True,
            timeout=60,
            env={**os.environ, "TOKENHUB_DB": str(self.db)},
        )
        assert r.returncode == 0, f"tokenhub {' '.join(args)}: {r.returncode}\n{r.stderr!r}"
        return r.stdout

    def url(self, path: str) -> str:
        """An absolute URL on the admin listener for `path` (/console/...)."""
        return self.base + path


_CONSOLE_LINE = re.compile(
    r"console:\s+(?P<url>http://\S+/console/)\s+operator login:\s+(?P<op>\S+)\s*/\s*(?P<oppw>\S+)"
    r"\s+tenant login:\s+(?P<ten>\S+)\s*/\s*(?P<tenpw>\S+)"
)


def start_demo(tmp: Path, password: str, key: str) -> Demo:
    """`tokenhub serve --demo` on free ports with its own database, the demo key and the
    console password from the environment (never argv), until the gateway answers."""
    port, admin_port = free_port(), free_port()
    db = tmp / "demo.db"
    out, err = tmp / "serve.out", tmp / "serve.err"
    env = {
        **os.environ,
        "TOKENHUB_LOG_LEVEL": "WARNING",
        "TOKENHUB_DEMO_KEY": key,
        "TOKENHUB_DEMO_PASSWORD": password,
        # the tenant test's webhook receiver listens on 127.0.0.1 (tokenhub.billing.alerts)
        "TOKENHUB_WEBHOOKS_ALLOW_PRIVATE": "1",
    }
    env.pop("TOKENHUB_DB", None)
    cmd = [TOKENHUB, "serve", "--demo", "--db", str(db), "--port", str(port)]
    cmd += ["--admin-listen", f"127.0.0.1:{admin_port}"]
    with open(out, "wb") as o, open(err, "wb") as e:
        popen = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=tmp, start_new_session=True)

    def printed() -> re.Match[str] | None:
        if popen.poll() is not None:
            raise AssertionError(
                f"serve --demo exited {popen.returncode}:\n{err.read_text(errors='replace')}"
            )
        text = out.read_text(errors="replace")
        return _CONSOLE_LINE.search(text) if "serving on" in text else None

    try:
        found = wait_until("serve --demo to print the console line", printed, START_TIMEOUT_S)
        api = re.search(r"serving on (http://\S+/v1)", out.read_text())
        assert api is not None
        console = found.group("url")
        demo = Demo(
            api=api.group(1),
            base=console[: -len("/console/")],
            console=console,
            operator=(found.group("op"), found.group("oppw")),
            tenant=(found.group("ten"), found.group("tenpw")),
            key=key,
            db=db,
            out=out,
            err=err,
            popen=popen,
        )
        assert urlsplit(demo.base).port == admin_port, f"console on {demo.base}, not :{admin_port}"

        def answers() -> bool:
            try:
                urllib.request.urlopen(f"{demo.console}signin", timeout=5).close()
            except (urllib.error.URLError, OSError):
                return False
            return True

        wait_until("the console to answer", answers, START_TIMEOUT_S)
    except BaseException:
        stop_demo(popen)
        raise
    return demo


def stop_demo(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(10)


@dataclass
class Recorder:
    """What the test's browser contexts asked for, and what the browser complained about."""

    requests: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)

    def foreign(self) -> list[str]:
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "about", "blob"):
                continue  # never leaves the browser
            if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
                out.append(url)
        return out


def sign_in(page: Any, demo: Demo, user: str, password: str) -> None:
    """Through the sign-in form, as a person would; lands on the page after it."""
    page.goto(demo.url("/console/signin"))
    form = page.locator("form", has=page.locator("input[type=password]"))
    form.locator(
        "input:not([type=hidden]):not([type=password]):not([type=submit]):not([type=checkbox])"
    ).first.fill(user)
    form.locator("input[type=password]").fill(password)
    with page.expect_navigation():
        form.locator("button[type=submit], input[type=submit], button:not([type])").first.click()
    assert "/console/signin" not in page.url, f"sign-in as {user} failed: {page.url}"


def http_json(url: str, *, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """A JSON request with a bearer token (the gateway's tenant API)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# A key's secret: "th-" and 43 URL-safe characters; a listing shows 8 characters at most.
SECRET = re.compile(r"\bth-[A-Za-z0-9_-]{40,}")
CJK = re.compile(r"[\u4e00-\u9fff]")
# gpt-4o-mini in the demo's price book: USD 0.15 / 0.075 / 0.60 per 1M tokens, in nanos/token.
NANOS_IN, NANOS_CACHED, NANOS_OUT = 150, 75, 600
SETTLE_WAIT_S = 20.0  # the demo settles every second; generous for a busy CI machine


def submit(
    page: Any, action: str, values: dict[str, str] | None = None, *, method: str = "post"
) -> dict[str, str]:
    """Fills the form that sends `method` to `action` (inputs and selects by name) and submits
    it as a person would, waiting for the page after it. Returns every field the form sent."""
    form = _form(page, action, method)
    for name, value in (values or {}).items():
        field = form.locator(f'[name="{name}"]').first
        radio = form.locator(f'input[type=radio][name="{name}"][value="{value}"]')
        if radio.count():
            radio.check()
        elif form.locator(f'select[name="{name}"]').count():
            field.select_option(value)
        else:
            field.fill(value)
    sent = form_fields(page, action, method=method)
    with page.expect_navigation():
        form.locator("button[type=submit], input[type=submit], button:not([type])").first.click()
    return sent


def _form(page: Any, action: str, method: str) -> Any:
    return page.locator(f'form[action="{action}"][method="{method}" i]').first


def form_fields(page: Any, action: str, *, method: str = "post") -> dict[str, str]:
    """The named inputs and selects of the form sending `method` to `action`, with their
    values (what submitting it would send, radio buttons and checkboxes left out)."""
    form = _form(page, action, method)
    out: dict[str, str] = {}
    for el in form.locator("input[name], select[name], textarea[name]").all():
        name = el.get_attribute("name")
        if name and el.get_attribute("type") not in ("checkbox", "radio", "submit"):
            out[name] = el.input_value()
    return out


def flash(page: Any) -> str:
    return " ".join(page.locator("[data-flash]").all_inner_texts())


def money(m: dict[str, str]) -> Decimal:
    return Decimal(m["amount"])


def chat(demo: Demo, key: str, text: str) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=demo.api, api_key=key, max_retries=0, timeout=30)
    try:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )
    finally:
        client.close()


def events(demo: Demo, tenant: str) -> list[dict[str, Any]]:
    out = demo.cli("events", "export", "--format", "jsonl").stdout
    return [e for e in map(json.loads, out.splitlines()) if e["tenant"] == tenant]


def cost_nanos(ev: dict[str, Any]) -> int:
    """What the price book charges for an event's tokens (gpt-4o-mini, USD)."""
    cached = min(ev["cached_input_tokens"], ev["input_tokens"])
    return (
        (ev["input_tokens"] - cached) * NANOS_IN
        + cached * NANOS_CACHED
        + ev["output_tokens"] * NANOS_OUT
    )


def unsettled(demo: Demo) -> int:
    """Usage events of the demo's database that are not settled yet (a small database)."""
    with contextlib.closing(
        sqlite3.connect(f"file:{demo.db}?mode=ro", uri=True, timeout=10)
    ) as conn:
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM usage_events e "
            "LEFT JOIN settlements s ON s.event_id = e.request_id WHERE s.event_id IS NULL"
        ).fetchone()
    return int(n)
