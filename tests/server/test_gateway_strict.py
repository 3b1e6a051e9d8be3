"""The gateway under the project's own test policy (filterwarnings = error): serving a request
must not raise a warning. The other modules ignore aiohttp's NotAppKeyWarning; this one does
not, so it shows whether the gateway still keys request storage by a plain string."""

from __future__ import annotations

import openai
from aiohttp.web_request import BaseRequest
from harness import Hub


def test_a_request_raises_no_warning(hub: Hub, client: openai.OpenAI) -> None:
    # aiohttp warns once per process and key; forget that it did, so the outcome does not
    # depend on which test made the first request.
    BaseRequest._seen_str_keys.discard("request_id")
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.status_code == 200
    assert hub.event(raw.headers["x-request-id"]).status == 200
