"""The request path's seams: the request decoded and validated once (ParsedRequest), the OpenAI
wire behind the provider interface, and RequestContext as the only writer of the usage event.
End-to-end behaviour is tested through real servers elsewhere in tests/server."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tokenhub.config import Model
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.providers import WIRES
from tokenhub.gateway.providers.base import Provider
from tokenhub.gateway.request import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint, ParsedRequest
from tokenhub.meter import Meter
from tokenhub.usage import UsageEvent

GATEWAY = Path(__file__).resolve().parents[2] / "python" / "tokenhub" / "gateway"
MODELS = {"m": Model(id="m")}


def parse(body: object, endpoint: Endpoint = CHAT) -> ParsedRequest:
    req = ParsedRequest(endpoint)
    req.parse(json.dumps(body).encode(), MODELS)
    return req


def refusal(body: bytes, endpoint: Endpoint = CHAT) -> tuple[ApiError, ParsedRequest]:
    req = ParsedRequest(endpoint)
    with pytest.raises(ApiError) as e:
        req.parse(body, MODELS)
    return e.value, req


MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_fields_are_checked_in_order_and_a_refusal_keeps_what_was_named() -> None:
    assert refusal(b"{")[0].status == 400
    assert refusal(b"[1]")[0].message == "The request body must be a JSON object."
    err, req = refusal(b'{"model": "nope", "stream": "yes"}')
    assert (err.status, err.code, req.named_model(), req.stream) == (
        404,
        "model_not_found",
        "nope",
        False,
    )
    err, req = refusal(json.dumps({"model": "m", "stream": True}).encode(), EMBEDDINGS)
    assert (err.param, req.stream) == ("stream", True)
    err, _ = refusal(json.dumps({"model": "m", "messages": []}).encode())
    assert err.param == "messages"
    err, _ = refusal(json.dumps({"model": "m", "prompt": [1.5]}).encode(), COMPLETIONS)
    assert err.param == "prompt"
    body = {"model": "m", "messages": MSGS, "max_tokens": True}
    assert refusal(json.dumps(body).encode())[0].param == "max_tokens"
    body = {"model": "m", "messages": MSGS, "best_of": 129}
    assert refusal(json.dumps(body).encode())[0].param == "best_of"
    assert refusal(json.dumps({"model": "x" * 300}).encode())[1].named_model() == "x" * 256


def test_caps_choices_and_bounds() -> None:
    req = parse(
        {
            "model": "m",
            "messages": MSGS,
            "max_tokens": 100,
            "max_completion_tokens": 50,
            "n": 2,
            "best_of": 3,
        }
    )
    assert (req.output_cap(4096), req.max_output(4096), req.output_cap(30)) == (50, 150, 30)
    assert (
        req.output_bound(None, 4096) == 3 * 100
    )  # as sent: the larger cap (an upstream honours one)
    assert req.output_bound(40, 4096) == 3 * 40
    batch = parse({"model": "m", "prompt": ["a", "b"], "n": 2}, COMPLETIONS)
    assert batch.output_bound(None, 10) == 2 * 2 * 10
    emb = parse({"model": "m", "input": "x", "max_tokens": -1, "n": 0}, EMBEDDINGS)  # not read
    assert (emb.max_output(4096), emb.output_bound(None, 4096)) == (0, 0)


def test_tier_input_and_opening() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    turns = [*MSGS, {"role": "assistant", "content": "hello"}, {"role": "user", "content": parts}]
    req = parse({"model": "m", "messages": turns, "tools": [{"type": "function"}]})
    assert req.tier_input() == ("a b", 2, True)
    assert req.opening() == "be brief\x00hi"
    legacy = parse({"model": "m", "prompt": "once"}, COMPLETIONS)
    assert (legacy.tier_input(), legacy.opening()) == (("once", 0, False), None)


def test_the_openai_wire() -> None:
    wire: Provider = WIRES["openai"]
    req = parse({"model": "m", "messages": MSGS, "stream": True, "max_completion_tokens": 900})
    sent = json.loads(wire.request_body(req.payload, "up-model", 500, req.stream))
    assert sent["model"] == "up-model" and sent["max_completion_tokens"] == 500
    assert "max_tokens" not in sent and sent["stream_options"] == {"include_usage": True}
    opts = {"model": "m", "messages": MSGS, "stream_options": {"x": 1}}
    assert json.loads(wire.request_body(opts, "u", None, True))["stream_options"] == {
        "x": 1,
        "include_usage": True,
    }
    plain = parse({"model": "m", "messages": MSGS})
    assert json.loads(wire.request_body(plain.payload, "u", 7, False))["max_tokens"] == 7
    assert "max_tokens" not in json.loads(
        wire.request_body({"model": "m", "messages": MSGS}, "u", None, False)
    )
    assert wire.path(CHAT) == "/chat/completions" and wire.path(EMBEDDINGS) == "/embeddings"
    assert wire.not_a_completion(CHAT, b'{"choices": []}') is None
    assert wire.not_a_completion(CHAT, b'{"error": {"message": "x"}, "choices": []}')
    assert wire.not_a_completion(EMBEDDINGS, b'{"choices": []}')
    reply = wire.reply(
        b'{"choices": [{"message": {"content": "hi", "reasoning_content": "r", '
        b'"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}}, {"text": "t"}], '
        b'"usage": "garbled"}'
    )
    assert reply.output_texts() == ["r", "hi", "f", "{}", "t"] and reply.usage == "garbled"
    assert wire.reply(b"not json").output_texts() == []
    assert (
        wire.error_code(b'{"error": {"type": "invalid_request_error"}}') == "invalid_request_error"
    )
    assert wire.error_code(b"<html>") == ""
    scanner = wire.scanner(True, Meter.load("cl100k_base"))
    scanner.feed(
        b'data: {"id": "c1", "model": "up", '
        b'"choices": [{"index": 0, "delta": {"content": "hello"}}]}\n\n'
    )
    scanner.feed(b"data: [DONE]\n\n")
    assert scanner.done and scanner.held_done and scanner.output_tokens == 1
    event = UsageEvent(request_id="r", ts_ms=0, tenant="t", key_id="k", endpoint="chat.completions",
                       model="m", input_tokens=3, output_tokens=1, source="metered")  # fmt: skip
    tail = wire.usage_tail(scanner, event)
    chunk = json.loads(tail.split(b"\n\n")[0][len(b"data: ") :])
    assert (chunk["id"], chunk["model"], chunk["usage"]["total_tokens"]) == ("c1", "up", 4)
    assert tail.endswith(b"data: [DONE]\n\n")


def _event_writes(path: Path) -> list[str]:
    """Assignments to an attribute of a name called `event` (the usage event)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = [
                t
                for tgt in node.targets
                for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])
            ]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "event"
            ):
                found.append(f"{path.name}:{t.lineno} event.{t.attr}")
    return found


def test_only_the_request_context_writes_the_usage_event() -> None:
    writes = [
        w for p in sorted(GATEWAY.rglob("*.py")) if p.name != "context.py" for w in _event_writes(p)
    ]
    assert writes == []
    assert _event_writes(GATEWAY / "context.py")  # the scan does find writes where they are
