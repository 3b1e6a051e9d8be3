"""Chat templates: how a `messages` list becomes tokens for each vocabulary family.

`render(family, messages)` returns the conversation as the model sees it: a list of text runs
and special tokens. Special tokens count one each; each text run is counted with the meter (runs
are cut at special tokens, so they are counted independently and cached per run).

Families and their per-message overhead:

- ``openai`` (cl100k_base): OpenAI's published rule for its chat models: 3 tokens per message
  (``<|start|>{role}<|message|>`` framing, ``<|end|>``), +1 when the message has a ``name``, and 3
  for the reply primer (``<|start|>assistant<|message|>``). The role, name and content are
  counted as separate runs.
- ``chatml`` (Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, and
  ``<|im_start|>assistant\\n`` for the reply: 2 special tokens per message plus the role line and
  the trailing newline (1 token each for the usual roles), and 1 special + ``assistant\\n`` for
  the reply. Exact against the vocabulary's own tokenizer on the rendered text.
- ``deepseek`` (DeepSeek V3/V4): ``<｜begin▁of▁sentence｜>{system}`` then ``<｜User｜>{content}``
  for users, ``<｜Assistant｜>{content}<｜end▁of▁sentence｜>`` for assistant turns, tool results
  inside ``<｜tool▁output▁begin｜>…<｜tool▁output▁end｜>``, and ``<｜Assistant｜>`` for the reply.
  Exact against the vocabulary's own tokenizer on the rendered text.

Content may be a string or a list of content parts; text parts are joined with no separator and
other parts (images, audio) count nothing here, since their cost is set by the provider. Tool
calls on assistant messages are rendered as the family renders them: ``openai`` counts each
call's name and arguments plus 3 framing tokens; ``chatml`` appends
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` (the tags are special tokens in
Qwen3.5+ vocabularies and count one each there); ``deepseek`` uses its
``<｜tool▁call▁begin｜>`` markers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]


class Special(str):
    """A special token in a rendered template (counts as one token)."""

    __slots__ = ()


Part = str | Special

FAMILIES = ("openai", "chatml", "deepseek")


def content_text(content: Any) -> str:
    """The text of a message's content: a string, a list of parts, or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                if part.get("type", "text") == "text":
                    text = part.get("text", "")
                    if not isinstance(text, str):
                        raise TypeError("a text content part's 'text' must be a str")
                    texts.append(text)
            else:
                raise TypeError(f"content parts must be objects, not {type(part).__name__}")
        return "".join(texts)
    raise TypeError(
        f"message content must be a str, a list of parts or None, not {type(content).__name__}"
    )


def _tool_calls(message: Message) -> list[tuple[str, str]]:
    calls = message.get("tool_calls") or []
    out = []
    for call in calls:
        if not isinstance(call, Mapping):
            raise TypeError("tool_calls entries must be objects")
        fn = call.get("function") or {}
        name, args = fn.get("name", ""), fn.get("arguments", "")
        if not isinstance(name, str) or not isinstance(args, str):
            raise TypeError("a tool call's function name and arguments must be strings")
        out.append((name, args))
    return out


def _check(messages: Iterable[Message]) -> list[Message]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Iterable):
        raise TypeError("messages must be a list of message objects")
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"each message must be a dict, not {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise TypeError("each message needs a string 'role'")
        out.append(m)
    return out


def render_openai(messages: Iterable[Message]) -> tuple[list[str], int]:
    """Runs to count and the fixed overhead, by OpenAI's rule (see module docstring)."""
    runs: list[str] = []
    overhead = 0
    for m in _check(messages):
        overhead += 3
        runs.append(m["role"])
        runs.append(content_text(m.get("content")))
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise TypeError("a message's 'name' must be a str")
            overhead += 1
            runs.append(name)
        for fn_name, args in _tool_calls(m):
            overhead += 3
            runs.extend((fn_name, args))
    return runs, overhead + 3


def _chatml_call(name: str, args: str, specials: frozenset[str]) -> list[Part]:
    try:
        parsed: Any = json.loads(args) if args else {}
    except ValueError:
        parsed = args
    call = json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False)
    # Qwen3.5+ vocabularies have <tool_call> as a special token; older ones spell it as text.
    open_tag: Part = Special("<tool_call>") if "<tool_call>" in specials else "<tool_call>"
    close_tag: Part = Special("</tool_call>") if "</tool_call>" in specials else "</tool_call>"
    return [open_tag, f"\n{call}\n", close_tag]


def render_chatml(
    messages: Iterable[Message], specials: frozenset[str] = frozenset()
) -> list[Part]:
    """ChatML; `specials` are the vocabulary's special-token texts (they count one each)."""
    parts: list[Part] = []
    for m in _check(messages):
        body = content_text(m.get("content"))
        parts += [Special("<|im_start|>"), f"{m['role']}\n{body}"]
        for i, (name, args) in enumerate(_tool_calls(m)):
            if body or i:
                parts.append("\n")
            parts += _chatml_call(name, args, specials)
        parts += [Special("<|im_end|>"), "\n"]
    parts += [Special("<|im_start|>"), "assistant\n"]
    return parts


def render_deepseek(messages: Iterable[Message]) -> list[Part]:
    msgs = _check(messages)
    parts: list[Part] = [Special("<｜begin▁of▁sentence｜>")]
    system = "\n\n".join(content_text(m.get("content")) for m in msgs if m["role"] == "system")
    if system:
        parts.append(system)
    in_tools = False
    for m in msgs:
        role = m["role"]
        if role == "system":
            continue
        if role != "tool" and in_tools:
            parts.append(Special("<｜tool▁outputs▁end｜>"))
            in_tools = False
        text = content_text(m.get("content"))
        if role == "user":
            parts += [Special("<｜User｜>"), text]
        elif role == "assistant":
            parts += [Special("<｜Assistant｜>"), text]
            calls = _tool_calls(m)
            if calls:
                parts.append(Special("<｜tool▁calls▁begin｜>"))
                for name, args in calls:
                    parts += [
                        Special("<｜tool▁call▁begin｜>"),
                        f"function<｜tool▁sep｜>{name}\n```json\n{args}\n```",
                        Special("<｜tool▁call▁end｜>"),
                    ]
                parts.append(Special("<｜tool▁calls▁end｜>"))
            parts.append(Special("<｜end▁of▁sentence｜>"))
        elif role == "tool":
            if not in_tools:
                parts.append(Special("<｜tool▁outputs▁begin｜>"))
                in_tools = True
            parts += [Special("<｜tool▁output▁begin｜>"), text, Special("<｜tool▁output▁end｜>")]
        else:
            raise ValueError(f"the deepseek template has no role {role!r}")
    if in_tools:
        parts.append(Special("<｜tool▁outputs▁end｜>"))
    parts.append(Special("<｜Assistant｜>"))
    return parts


def runs_and_specials(parts: Sequence[Part]) -> tuple[list[str], int]:
    """Joins adjacent text parts into runs and counts the special tokens between them."""
    runs: list[str] = []
    specials = 0
    buf: list[str] = []
    for p in parts:
        if isinstance(p, Special):
            specials += 1
            if buf:
                runs.append("".join(buf))
                buf = []
        else:
            buf.append(p)
    if buf:
        runs.append("".join(buf))
    return [r for r in runs if r], specials


def plan(
    family: str, messages: Iterable[Message], specials: frozenset[str] = frozenset()
) -> tuple[list[str], int]:
    """(text runs to count, tokens of fixed overhead) for a messages list. `specials` are the
    vocabulary's special-token texts, for templates that use some of them when present."""
    if family == "openai":
        runs, overhead = render_openai(messages)
        return [r for r in runs if r], overhead
    if family == "chatml":
        return runs_and_specials(render_chatml(messages, specials))
    if family == "deepseek":
        return runs_and_specials(render_deepseek(messages))
    raise ValueError(f"unknown chat template family {family!r}; known: {', '.join(FAMILIES)}")


def render_text(parts: Sequence[Part]) -> str:
    """The rendered template as one string (for comparison against reference tokenizers)."""
    return "".join(parts)
