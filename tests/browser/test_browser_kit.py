"""The browser tests' own checks, without a browser: what counts as a request that left
127.0.0.1, and the bounded wait."""

from __future__ import annotations

import pytest
from browser_kit import Recorder, wait_until


def test_only_loopback_requests_pass() -> None:
    rec = Recorder(
        requests=[
            "http://127.0.0.1:8081/console/",
            "http://localhost:9/x.css",
            "http://[::1]:8081/console/static/console.0a1b.js",
            "data:image/svg+xml,<svg/>",
            "about:blank",
            "https://cdn.example.com/htmx.js",
            "http://127.0.0.2/x",
            "https://fonts.googleapis.com/css?family=Noto",
            "ws://127.0.0.1:8081/live",
        ]
    )
    assert rec.foreign() == [
        "https://cdn.example.com/htmx.js",
        "http://127.0.0.2/x",
        "https://fonts.googleapis.com/css?family=Noto",
        "ws://127.0.0.1:8081/live",  # not http(s): not a console request
    ]


def test_wait_until_is_bounded() -> None:
    calls = []
    assert wait_until("a value", lambda: calls.append(1) or len(calls) >= 3, 5, 0.01) is True
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for nothing"):
        wait_until("nothing", lambda: None, 0.05, 0.01)
