"""Requests the gateway refuses itself, with a known key, leave a usage event (issue 11, item 13);
the models endpoints (`GET /v1/models/{id}`, x-request-id on every response); and what the
front of `Gateway.proxy` refuses at once: a body announced far over the limit (413 before
reading it) and JSON nested too deeply (400, not a RecursionError's 500)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from harness import IGNORE_REQUEST_KEY_WARNING, MAX_BODY_BYTES, Hub

pytestmark = IGNORE_REQUEST_KEY_WARNING

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


def post(hub: Hub, path: str, body: bytes, key: str | None = None) -> tuple[int, Any, Any]:
    """(status, JSON body, headers) of a raw POST."""
    req = urllib.request.Request(
        hub.base + path,
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {key or hub.secret}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def raw_exchange(hub: Hub, request: bytes, timeout: float) -> bytes:
    """Sends `request` and reads the response head and its Content-Length body (no more:
    the server may keep the connection open), failing on `timeout` seconds of silence."""
    with socket.create_connection(("127.0.0.1", hub.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk, data
            body += chunk
        return head + b"\r\n\r\n" + body


def status_and_error(response: bytes) -> tuple[int, dict[str, Any], str]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    rid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    return status, json.loads(body)["error"], rid


def check_refusal_event(hub: Hub, rid: str, status: int, code: str, model: str = "") -> None:
    ev = hub.event(rid)
    assert (ev.status, ev.error) == (status, code), ev
    assert (ev.tenant, ev.key_id, ev.model) == ("acme", hub.key_id, model), ev
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens) == (0, 0, 0), ev
    assert ev.source == "metered" and ev.endpoint == "chat.completions", ev
    assert ev.deployment == "" and ev.attempts == 0, ev


BAD_BODIES = [
    # (id, body, status, error code, model on the event)
    ("not-json", b"{nope", 400, "invalid_request_error", ""),
    ("not-an-object", b"[1, 2]", 400, "invalid_request_error", ""),
    ("no-model", json.dumps({"messages": HELLO}).encode(), 400, "invalid_request_error", ""),
    (
        "unknown-model",
        json.dumps({"model": "no-such-model", "messages": HELLO}).encode(),
        404,
        "model_not_found",
        "no-such-model",
    ),
    (
        "stream-not-bool",
        json.dumps({"model": "gpt-4o-mini", "messages": HELLO, "stream": "yes"}).encode(),
        400,
        "invalid_request_error",
        "gpt-4o-mini",
    ),
    (
        "no-messages",
        json.dumps({"model": "gpt-4o-mini", "messages": []}).encode(),
        400,
        "invalid_request_error",
        "gpt-4o-mini",
    ),
    ("nested-too-deep", b"[" * (MAX_BODY_BYTES - 1), 400, "invalid_request_error", ""),
    (
        "chunked-over-limit",  # no Content-Length to refuse early: read up to the limit
        b"x" * (MAX_BODY_BYTES + 1),
        413,
        "request_too_large",
        "",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "model"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_BODIES],
)
def test_refused_request_leaves_an_event(
    hub: Hub, body: bytes, status: int, code: str, model: str
) -> None:
    if status == 413:
        # Chunked, so that the server learns the size only by reading.
        req = urllib.request.Request(
            hub.base + CHAT,
            data=iter([body]),
            method="POST",
            headers={"Authorization": f"Bearer {hub.secret}", "Transfer-Encoding": "chunked"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        got, err, headers = info.value.code, json.loads(info.value.read()), info.value.headers
    else:
        got, err, headers = post(hub, CHAT, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert (err["error"]["code"] or err["error"]["type"]) == code
    check_refusal_event(hub, headers["x-request-id"], status, code, model)


def test_deeply_nested_json_is_a_400(hub: Hub) -> None:
    # The hub's body limit is 8 KiB; msgspec's depth limit is about a thousand.
    body = b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    status, err, _ = post(hub, CHAT, body)
    assert status == 400
    assert "nested too deeply" in err["error"]["message"]


def test_content_length_far_over_the_limit_is_refused_before_reading(hub: Hub) -> None:
    """1 TB announced and nothing sent: the 413 comes at once (the socket's 5 s timeout would
    fail the read if the server waited for the body), and it is recorded for the key."""
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hub.secret}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
    )
    response = raw_exchange(hub, head.encode(), timeout=5.0)
    status, err, rid = status_and_error(response)
    assert (status, err["code"]) == (413, "request_too_large")
    assert b"connection: close" in response.lower()
    check_refusal_event(hub, rid, 413, "request_too_large")


def test_unknown_key_leaves_no_event(hub: Hub) -> None:
    status, _, headers = post(hub, CHAT, b"{nope", key="th-" + "x" * 40)
    assert status == 401
    hub.settle()
    assert hub.find_event(headers["x-request-id"]) is None


def test_models_list_and_retrieve(hub: Hub, client: openai.OpenAI) -> None:
    listed = client.models.with_raw_response.list()
    assert listed.headers["x-request-id"].startswith("req_")
    assert listed.headers["server"] == "tokenhub"
    ids = [m.id for m in listed.parse().data]
    assert "gpt-4o-mini" in ids
    for model_id in ids:
        m = client.models.retrieve(model_id)
        assert (m.id, m.object, m.owned_by) == (model_id, "model", "tokenhub")
    raw = client.models.with_raw_response.retrieve("gpt-4o-mini")
    assert raw.headers["x-request-id"].startswith("req_")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"
    assert info.value.response.headers["x-request-id"].startswith("req_")
    with pytest.raises(openai.AuthenticationError):
        hub.client(api_key="th-" + "x" * 40).models.retrieve("gpt-4o-mini")


def test_every_response_has_a_request_id_and_no_version(hub: Hub) -> None:
    for path in ("/healthz", "/metrics", "/v1/models", "/no/such/path"):
        req = urllib.request.Request(hub.base + path, headers=hub.auth)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                headers = resp.headers
        except urllib.error.HTTPError as e:
            headers = e.headers
        assert headers["x-request-id"].startswith("req_"), path
        assert headers["server"] == "tokenhub", path
