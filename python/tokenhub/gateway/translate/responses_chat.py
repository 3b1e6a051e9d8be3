"""OpenAI's Responses API over an upstream that speaks chat completions.

`ResponsesOverChat.request` turns a validated Responses body into a chat completions body:
the conversation through `dialects.responses.chat_messages` (the list the meter counted),
function tools and `tool_choice` into chat's, `max_output_tokens` into `max_tokens` (which the
wire then caps), `text.format` into `response_format`, `reasoning.effort` into
`reasoning_effort`. Over an Anthropic upstream it is composed with the chat -> Messages
translation (`translate.compose`), so this module is the only one that knows Responses.

The reply and the stream are written as OpenAI's Responses API writes them, checked against
the openai SDK's own models and stream accumulator (`client.responses.stream`): a `reasoning`
item for the upstream's `reasoning_content` (as summary text), a `message` item for the text,
a `function_call` item per tool call (its `call_id` the upstream's tool call id, which the
client sends back in `function_call_output`). A reply cut at the output cap is `incomplete`
(`incomplete_details.reason` "max_output_tokens", and `response.incomplete` ends its stream,
as OpenAI's does); a content filter likewise. Usage is the usage event's: input (all prompt
tokens), its cache reads and writes, output. Ids are derived from the gateway's request id
(`resp_<id>`, `msg_<id>`, `rs_<id>`, `fc_<id>_<n>`), so a client's response id finds its
usage event.

The Translation seam gives `reply` and `stream` the upstream's bytes and the usage event, not
the client's request, so the echo fields of the Response object (`tools`, `tool_choice`,
`parallel_tool_calls`, `temperature`, `instructions`, `text`, ...) are OpenAI's defaults, not
what the client sent; the SDK reads none of them back. `store` is always false: nothing is
kept.

Performance notes: a stream is translated a chunk at a time as the scanner forwards it. Each
chunk is decoded into a typed view of the few fields read (msgspec skips the rest; a chunk
whose fields have other types is read leniently from plain JSON instead), and each delta event
is spliced from its item's pre-encoded frame (`_frame`) and the delta's JSON string. Measured
on the shared 2-core dev box (python 3.11, where a Python call costs ~0.3 us): about 7 us per
text chunk and 9 us per tool-call arguments chunk, of which the typed decode is 1.6 us (a
plain-dict decode alone took 2.1 us); a non-streamed reply of 200 words translates in about
15 us. Each item's text is kept until its `.done` events, bounded by the reply's length.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from tokenhub.gateway.dialects.responses import (
    chat_messages,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
)

if TYPE_CHECKING:
    from tokenhub.usage import UsageEvent

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

# Fields copied to the chat body as they are (validated by ResponsesRequest where it matters).
_COPIED = (
    "temperature",
    "top_p",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
)

# An upstream error's message is kept up to this many characters (an HTML error page is not).
MESSAGE_CHARS = 2000

_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


# A chat completion chunk, as far as a Responses stream reads it (unknown fields skipped).
class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    index: int | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: Any = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_NO_FUNCTION = _Function()


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _opt(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _lenient(data: Any) -> _Chunk | None:
    """A chunk the typed view refused (a field of another type), read field by field: what
    has the expected type is kept, a content given as parts is their text."""
    if not isinstance(data, dict):
        return None
    choices: list[_Choice] = []
    raw = data.get("choices")
    for c in raw if isinstance(raw, list) else ():
        if not isinstance(c, dict):
            continue
        d = c.get("delta")
        d = d if isinstance(d, dict) else {}
        calls: list[_ToolCall] = []
        raw_calls = d.get("tool_calls")
        for t in raw_calls if isinstance(raw_calls, list) else ():
            if not isinstance(t, dict):
                continue
            f = t.get("function")
            f = f if isinstance(f, dict) else {}
            function = _Function(name=_opt(f.get("name")), arguments=_opt(f.get("arguments")))
            calls.append(
                _ToolCall(index=_int(t.get("index")), id=_opt(t.get("id")), function=function)
            )
        content = d.get("content")
        if isinstance(content, list):
            content = "".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        delta = _Delta(
            content=_opt(content),
            reasoning_content=_opt(d.get("reasoning_content")),
            reasoning=_opt(d.get("reasoning")),
            tool_calls=calls or None,
        )
        choices.append(
            _Choice(
                index=_int(c.get("index")), delta=delta, finish_reason=_opt(c.get("finish_reason"))
            )
        )
    return _Chunk(choices=choices, usage=data.get("usage"), error=data.get("error"))


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _ids(event: UsageEvent) -> str:
    rid = event.request_id
    return rid[4:] if rid.startswith("req_") else rid


def _usage(event: UsageEvent, reasoning: int) -> dict[str, Any]:
    """The event's counts in the Responses API's usage shape."""
    return {
        "input_tokens": event.input_tokens,
        "input_tokens_details": {
            "cached_tokens": event.cached_input_tokens,
            "cache_write_tokens": event.cache_write_tokens,
        },
        "output_tokens": event.output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": event.input_tokens + event.output_tokens,
    }


def _reasoning_tokens(usage: Any, event: UsageEvent) -> int:
    """The upstream's count of reasoning tokens when its usage was believed (bounded by the
    billed output), else 0."""
    if event.source != "upstream" or not isinstance(usage, dict):
        return 0
    details = usage.get("completion_tokens_details")
    n = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return 0
    return min(n, event.output_tokens)


def _response(
    event: UsageEvent,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """A Response object with OpenAI's defaults for the fields the request would echo."""
    created = event.ts_ms // 1000
    return {
        "id": f"resp_{_ids(event)}",
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": None,
        "max_output_tokens": None,
        "metadata": {},
        "model": event.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": None,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": text}] if text else [],
        "status": status,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": parts,
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class ResponsesOverChat:
    """The Responses API (client "responses") over chat completions (upstream "openai")."""

    client = "responses"
    upstream = "openai"

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": payload.get("model"), "messages": chat_messages(payload)}
        # Chat completions refuse an empty `tools`, and `tool_choice` or `parallel_tool_calls`
        # without tools, which the Responses API accepts: they go only with tools.
        choice = chat_tool_choice(payload)
        if tools := chat_tools(payload):
            body["tools"] = tools
            if choice is not None:
                body["tool_choice"] = choice
            if (parallel := payload.get("parallel_tool_calls")) is not None:
                body["parallel_tool_calls"] = parallel
        if (cap := payload.get("max_output_tokens")) is not None:
            body["max_tokens"] = cap
        if (fmt := chat_response_format(payload)) is not None:
            body["response_format"] = fmt
        text = payload.get("text")
        if isinstance(text, dict) and (verbosity := text.get("verbosity")) is not None:
            body["verbosity"] = verbosity
        reasoning = payload.get("reasoning")
        if isinstance(reasoning, dict) and (effort := reasoning.get("effort")) is not None:
            body["reasoning_effort"] = effort
        for key in _COPIED:
            if (value := payload.get(key)) is not None:
                body[key] = value
        if payload.get("stream"):
            body["stream"] = True
        return body

    def reply(self, body: bytes, event: UsageEvent) -> bytes:
        data = _decode(body)
        if not isinstance(data, dict):
            data = {}
        choices = data.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            choice = {}
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        rid = _ids(event)
        incomplete = _INCOMPLETE.get(choice.get("finish_reason"))  # type: ignore[arg-type]
        last = "incomplete" if incomplete else "completed"
        output: list[dict[str, Any]] = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            output.append(_reasoning_item(f"rs_{rid}", reasoning, "completed"))
        parts: list[dict[str, Any]] = []
        content = message.get("content")
        if isinstance(content, str) and content:
            parts.append(_text_part(content))
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            parts.append({"type": "refusal", "refusal": refusal})
        calls = message.get("tool_calls")
        calls = [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
        if parts or not calls:
            output.append(_message_item(f"msg_{rid}", parts or [_text_part("")], last))
        for n, call in enumerate(calls):
            function = call.get("function")
            if not isinstance(function, dict):
                function = {}
            output.append(
                _call_item(
                    f"fc_{rid}_{n}",
                    _str(call.get("id")) or f"call_{rid}_{n}",
                    _str(function.get("name")),
                    _str(function.get("arguments")),
                    last,
                )
            )
        usage = _usage(event, _reasoning_tokens(data.get("usage"), event))
        return _encode(
            _response(event, status=last, output=output, usage=usage, incomplete=incomplete)
        )

    def stream(self, event: UsageEvent, include_usage: bool) -> ResponsesStream:
        return ResponsesStream(event)

    def error(self, status: int, body: bytes) -> bytes:
        return error_body(status, body)


def error_body(status: int, body: bytes) -> bytes:
    """An upstream error (OpenAI's shape, Anthropic's, or any text) in OpenAI's shape, its
    message, type, param and code kept."""
    err: dict[str, Any] = {}
    try:
        data = _decode(body)
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
    elif isinstance(data, dict) and isinstance(data.get("message"), str):
        err = data
    message = err.get("message")
    if not isinstance(message, str) or not message:
        text = body.decode("utf-8", "replace").strip()
        message = text if text and data is not None else f"The upstream returned HTTP {status}."
    kind = err.get("type")
    if not isinstance(kind, str) or not kind:
        kind = "invalid_request_error" if status < 500 else "api_error"
    param, code = err.get("param"), err.get("code")
    return _encode(
        {
            "error": {
                "message": message[:MESSAGE_CHARS],
                "type": kind,
                "param": param if isinstance(param, str) else None,
                "code": code if isinstance(code, str) else None,
            }
        }
    )


# Each item kind's delta event, and what it carries beside the delta.
_DELTAS = {
    "reasoning": ("response.reasoning_summary_text.delta", b'"summary_index":0,'),
    "message": ("response.output_text.delta", b'"content_index":0,"logprobs":[],'),
    "function_call": ("response.function_call_arguments.delta", b""),
}


def _frame(kind: str, item_id: str, index: int) -> bytes:
    """The start of every delta event of one item, up to the delta's JSON string."""
    name, extra = _DELTAS[kind]
    return b'event: %s\ndata: {"type":"%s","item_id":%s,"output_index":%d,%s"delta":' % (
        name.encode(),
        name.encode(),
        _encode(item_id),
        index,
        extra,
    )


class ResponsesStream:
    """One chat completions stream as the Responses API's events.

    Items open as their deltas first arrive (reasoning, then text, then each tool call, in the
    order the upstream sends them) and close, with their `.done` events, when a delta of
    another item arrives or at `end`. Every event carries `sequence_number`, from 0."""

    def __init__(self, event: UsageEvent) -> None:
        self.event = event
        self.rid = _ids(event)
        self.seq = 0
        self.started = False
        self.output: list[dict[str, Any]] = []  # closed items, in output order
        self.kind: str | None = None  # the open item: reasoning, message, function_call
        self.key: int | None = None  # the open function call's tool index
        self.item_id = ""
        self.frame = b""  # the open item's delta events up to the delta (`_frame`)
        self.text: list[str] = []  # the open item's text (or arguments) so far
        self.call_id = ""
        self.name = ""
        self.calls = 0
        self.finish: str | None = None
        self.usage: Any = None  # the upstream's usage chunk's, for its reasoning tokens
        self.failed = False

    # -- writing events ------------------------------------------------------------------------

    def _emit(self, out: list[bytes], kind: str, fields: dict[str, Any]) -> None:
        fields["type"] = kind
        fields["sequence_number"] = self.seq
        self.seq += 1
        out.append(b"event: " + kind.encode() + b"\ndata: " + _encode(fields) + b"\n\n")

    def _start(self, out: list[bytes]) -> None:
        if self.started:
            return
        self.started = True
        head = _response(self.event, status="in_progress", output=[], usage=None)
        self._emit(out, "response.created", {"response": head})
        self._emit(out, "response.in_progress", {"response": head})

    def _open(self, out: list[bytes], kind: str, key: int | None = None) -> None:
        """Makes `kind` (and tool index `key`) the open item, closing another one first."""
        if self.kind == kind and self.key == key:
            return
        self._close(out, "completed")
        self.kind, self.key, self.text = kind, key, []
        index = len(self.output)
        if kind == "reasoning":
            self.item_id = f"rs_{self.rid}"
            if index:
                self.item_id += f"_{index}"
            item = _reasoning_item(self.item_id, "", "in_progress")
            self._emit(out, "response.output_item.added", {"output_index": index, "item": item})
            self._emit(
                out,
                "response.reasoning_summary_part.added",
                {
                    "item_id": self.item_id,
                    "output_index": index,
                    "summary_index": 0,
                    "part": {"type": "summary_text", "text": ""},
                },
            )
        elif kind == "message":
            self.item_id = f"msg_{self.rid}"
            if index:
                self.item_id += f"_{index}"
            item = _message_item(self.item_id, [], "in_progress")
            self._emit(out, "response.output_item.added", {"output_index": index, "item": item})
            self._emit(
                out,
                "response.content_part.added",
                {
                    "item_id": self.item_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": _text_part(""),
                },
            )
        else:
            self.item_id = f"fc_{self.rid}_{self.calls}"
            self.calls += 1
            item = _call_item(self.item_id, self.call_id, self.name, "", "in_progress")
            self._emit(out, "response.output_item.added", {"output_index": index, "item": item})
        self.frame = _frame(kind, self.item_id, index)

    def _close(self, out: list[bytes], status: str) -> None:
        """The open item's `.done` events; it joins the output."""
        kind = self.kind
        if kind is None:
            return
        index = len(self.output)
        text = "".join(self.text)
        item_id = self.item_id
        if kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            where = {"item_id": item_id, "output_index": index, "summary_index": 0}
            self._emit(out, "response.reasoning_summary_text.done", {**where, "text": text})
            self._emit(out, "response.reasoning_summary_part.done", {**where, "part": part})
            item = _reasoning_item(item_id, text, status)
        elif kind == "message":
            where = {"item_id": item_id, "output_index": index, "content_index": 0}
            self._emit(out, "response.output_text.done", {**where, "text": text, "logprobs": []})
            self._emit(out, "response.content_part.done", {**where, "part": _text_part(text)})
            item = _message_item(item_id, [_text_part(text)], status)
        else:
            self._emit(
                out,
                "response.function_call_arguments.done",
                {"item_id": item_id, "output_index": index, "name": self.name, "arguments": text},
            )
            item = _call_item(item_id, self.call_id, self.name, text, status)
        self._emit(out, "response.output_item.done", {"output_index": index, "item": item})
        self.output.append(item)
        self.kind, self.key, self.text = None, None, []

    # -- reading the upstream ------------------------------------------------------------------

    def feed(self, events: bytes) -> bytes:
        out: list[bytes] = []
        self._start(out)
        for block in events.split(b"\n\n"):
            if block.startswith(b"data: ") and b"\n" not in block:
                data = block[6:]  # the usual event: one data line
            else:
                data = b"\n".join(
                    line[5:].lstrip(b" ")
                    for line in block.splitlines()
                    if line.startswith(b"data:")
                )
            if not data or data == b"[DONE]":
                continue
            try:
                chunk: _Chunk | None = _decode_chunk(data)
            except msgspec.ValidationError:
                chunk = _lenient(_decode(data))
            except msgspec.DecodeError:
                continue
            if chunk is not None:
                self._chunk(out, chunk)
        return b"".join(out)

    def _chunk(self, out: list[bytes], chunk: _Chunk) -> None:
        err = chunk.error
        if isinstance(err, dict):
            self.failed = True
            message = err.get("message")
            self._emit(
                out,
                "error",
                {
                    "code": _opt(err.get("code")),
                    "message": message if isinstance(message, str) else "upstream error",
                    "param": _opt(err.get("param")),
                },
            )
            return
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices or ():
            if choice.index:  # only the first choice (index 0 or none): a Response has one
                continue
            if (delta := choice.delta) is not None:
                if reasoning := delta.reasoning_content or delta.reasoning:
                    self._delta(out, "reasoning", None, reasoning)
                if content := delta.content:
                    self._delta(out, "message", None, content)
                for call in delta.tool_calls or ():
                    self._call(out, call)
            if choice.finish_reason is not None:
                self.finish = choice.finish_reason

    def _delta(self, out: list[bytes], kind: str, key: int | None, delta: str) -> None:
        """One delta of `kind`'s item: the event spliced from the item's frame (the hot path:
        one per upstream chunk)."""
        self._open(out, kind, key)
        self.text.append(delta)
        seq = self.seq
        self.seq += 1
        out.append(self.frame + _encode(delta) + b',"sequence_number":%d}\n\n' % seq)

    def _call(self, out: list[bytes], call: _ToolCall) -> None:
        key = call.index or 0
        function = call.function or _NO_FUNCTION
        call_id, name = call.id, function.name
        # Another call: another index, or (upstreams that number every call 0) another id.
        if self.kind != "function_call" or self.key != key or (call_id and call_id != self.call_id):
            self._close(out, "completed")
            self.call_id = call_id or f"call_{self.rid}_{self.calls}"
            self.name = name or ""
            self._open(out, "function_call", key)
        elif not self.name and name:
            self.name = name  # a name sent after the call's first delta
        if function.arguments:
            self._delta(out, "function_call", key, function.arguments)

    def end(self, event: UsageEvent) -> bytes:
        out: list[bytes] = []
        self._start(out)
        if self.failed:
            return b"".join(out)
        incomplete = _INCOMPLETE.get(self.finish)  # type: ignore[arg-type]
        status = "incomplete" if incomplete else "completed"
        self._close(out, status)
        self.event = event
        final = _response(
            event,
            status=status,
            output=self.output,
            usage=_usage(event, _reasoning_tokens(self.usage, event)),
            incomplete=incomplete,
        )
        self._emit(out, f"response.{status}", {"response": final})
        return b"".join(out)
