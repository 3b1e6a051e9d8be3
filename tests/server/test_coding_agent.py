"""A coding agent's session replayed through /v1/messages with the official `anthropic` SDK,
billed with prompt-cache reads and writes at their own prices, and the tenant's statement
computed independently here.

The session: 40 turns, each a user message; most turns (TOOL_TURNS) are a Read tool call (the
model's tool_use, forced with tool_choice) and its result, a file's content as Claude Code's
Read tool shows it (numbered lines), built from the fixed corpus in tests/corpus/, then the
model's answer: 72 requests, streamed as Claude Code streams them (and once more as JSON
replies). The context grows to about 200k tokens. The request carries cache_control
breakpoints as Claude Code does: on the last tool definition, on the system prompt and on the
last user block. The upstream is anthropic-kind and the mock simulates the cache as the API
does (a breakpoint's prefix is written; a request reads the longest cached prefix ending at a
breakpoint or at one of the ~20 block boundaries before it), so every request after the first
reads the conversation so far from the cache and writes what it added.

Every request's usage is checked three ways (client, event, mock ledger). Then the usage is
settled by the in-process settler and the statement's amount for the model, and the wallet's
balance, must equal the sum computed here from the mock's ledger figures and the prices with
Decimal: per request and per line (uncached input, cache reads, cache writes, output), each
line rounded half to even to the nano, as the price book promises.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, TextBlockParam, ToolParam
from dialect_hub import ANTHROPIC_MODEL, DialectHub, cache_figures, check_three_way
from harness import IGNORE_REQUEST_KEY_WARNING, TENANT

from tokenhub.billing.service import Billing

pytestmark = IGNORE_REQUEST_KEY_WARNING

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
TURNS = 40
TOOL_TURNS = {i for i in range(TURNS) if i % 5 != 4}  # 32 of 40 turns call a tool
TARGET_CONTEXT = 200_000  # tokens of context the session grows to
FILE_LINES = 225  # lines per file read (~6k tokens: 32 reads make ~195k)
MAX_BODY = 4 * 1024 * 1024
NANOS = Decimal(10**9)
# USD per 1M tokens, all four distinct, with digits that make each line's rounding matter.
PRICES = {
    "input": "3.14159",
    "cached_input": "0.314159",
    "cache_write": "3.926987",
    "output": "15.70795",
}
TOPUP_USD = "1000"

SYSTEM_TEXT = (
    "You are an interactive CLI tool that helps users with software engineering tasks. "
    "Use the instructions below and the tools available to you to assist the user.\n\n"
    + (CORPUS / "english.txt").read_text()
    + (CORPUS / "mixed.txt").read_text()
)  # ~1.8k tokens: with the tools, above the 1024 tokens a cache breakpoint needs


def _schema(**props: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: {"type": kind} for name, kind in props.items()},
        "required": list(props),
    }


TOOLS: list[ToolParam] = [
    {
        "name": "Read",
        "description": "Reads a file from the local filesystem; lines are numbered from 1.",
        "input_schema": _schema(file_path="string", offset="integer", limit="integer"),
    },
    {
        "name": "Edit",
        "description": "Performs exact string replacements in files.",
        "input_schema": _schema(file_path="string", old_string="string", new_string="string"),
    },
    {
        "name": "Bash",
        "description": "Executes a bash command in a persistent shell session.",
        "input_schema": _schema(command="string", timeout="integer"),
    },
    {
        "name": "Grep",
        "description": "Searches file contents with regular expressions (ripgrep).",
        "input_schema": _schema(pattern="string", path="string"),
    },
]
CACHED_TOOLS: list[ToolParam] = [*TOOLS[:-1], {**TOOLS[-1], "cache_control": {"type": "ephemeral"}}]
SYSTEM: list[TextBlockParam] = [
    {"type": "text", "text": SYSTEM_TEXT, "cache_control": {"type": "ephemeral"}}
]


def corpus_lines() -> list[str]:
    lines: list[str] = []
    for name in ("code.py.txt", "english.txt", "data.json", "mixed.txt", "chinese.txt",
                 "japanese.txt"):  # fmt: skip
        lines += [ln for ln in (CORPUS / name).read_text().splitlines() if ln.strip()]
    return lines


LINES = corpus_lines()


def file_content(turn: int) -> str:
    """What Claude Code's Read tool returns for the turn's file: FILE_LINES numbered lines
    (cat -n style), a window of the corpus starting at a turn-dependent line."""
    start = turn * 37 % len(LINES)
    out = []
    for n in range(FILE_LINES):
        out.append(f"{n + 1:>6}\t{LINES[(start + n) % len(LINES)]}")
    return "\n".join(out)


def cost_nanos(tokens: int, usd_per_1m: str) -> int:
    """One line's charge in nanos, rounded half to even: computed here with Decimal."""
    exact = Decimal(tokens) * Decimal(usd_per_1m) * NANOS / Decimal(1_000_000)
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def with_breakpoints(messages: list[Any]) -> list[Any]:
    """The conversation as sent: cache_control on the last block of the last user message
    (a copy; the kept conversation has no markers)."""
    last = messages[-1]
    assert last["role"] == "user"
    blocks = [dict(b) for b in last["content"]]
    blocks[-1]["cache_control"] = {"type": "ephemeral"}
    return [*messages[:-1], {"role": "user", "content": blocks}]


@pytest.fixture
def hub(tmp_path: Path, database: str) -> Iterator[DialectHub]:
    """A hub of its own on each engine (tests/server/conftest.py: database): SQLite, then a
    fresh PostgreSQL database when the test server is there."""
    h = DialectHub(tmp_path, max_body_bytes=MAX_BODY, database=database)
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "json"])
def test_coding_agent_session(hub: DialectHub, stream: bool) -> None:
    """Streamed, as Claude Code sends every request, and not."""

    async def book(b: Billing) -> None:
        await b.set_price(
            ANTHROPIC_MODEL,
            currency="USD",
            input_per_1m=PRICES["input"],
            cached_input_per_1m=PRICES["cached_input"],
            cache_write_per_1m=PRICES["cache_write"],
            output_per_1m=PRICES["output"],
            effective_ms=0,
        )
        await b.set_profile(TENANT, currency="USD")
        await b.topup(TENANT, TOPUP_USD, "USD")

    hub.billing(book)

    messages: list[Any] = []  # MessageParam dicts, blocks as the SDK returned them
    served: list[dict[str, Any]] = []  # the mock's ledger entry of every request, in order
    usages: list[tuple[int, int, int]] = []  # (prompt, read, write) the client saw

    def send(client: anthropic.Anthropic, **kw: Any) -> Message:
        kw |= {
            "model": ANTHROPIC_MODEL,
            "max_tokens": 512,
            "system": SYSTEM,
            "tools": CACHED_TOOLS,
            "messages": with_breakpoints(messages),
        }
        if stream:
            with client.messages.stream(**kw) as s:
                rid = s.response.headers["x-request-id"]
                message: Message = s.get_final_message()
        else:
            raw = client.messages.with_raw_response.create(**kw)
            rid, message = raw.headers["x-request-id"], raw.parse()
        served.append(check_three_way(hub, rid, message.usage, model=ANTHROPIC_MODEL,
                                      stream=stream))  # fmt: skip
        read, write = cache_figures(message.usage)
        usages.append((message.usage.input_tokens + read + write, read, write))
        return message

    with hub.anthropic(bearer=True) as client:
        for turn in range(TURNS):
            ask = f"Turn {turn}: look at module_{turn}.py and tell me what to change."
            messages.append({"role": "user", "content": [{"type": "text", "text": ask}]})
            if turn in TOOL_TURNS:
                call = send(client, tool_choice={"type": "tool", "name": "Read"})
                assert call.stop_reason == "tool_use", call
                use = next(b for b in call.content if b.type == "tool_use")
                assert use.name == "Read"
                messages.append({"role": "assistant", "content": call.content})
                result = {"type": "tool_result", "tool_use_id": use.id,
                          "content": file_content(turn)}  # fmt: skip
                messages.append({"role": "user", "content": [result]})
            answer = send(client)
            assert answer.stop_reason in ("end_turn", "max_tokens")
            assert not [b for b in answer.content if b.type == "tool_use"]
            messages.append({"role": "assistant", "content": answer.content})

    # The session is what a coding agent's is: ~200k tokens, mostly read from the cache.
    assert len(served) == len(TOOL_TURNS) * 2 + (TURNS - len(TOOL_TURNS))
    last_prompt = usages[-1][0]
    assert 0.9 * TARGET_CONTEXT <= last_prompt <= 1.2 * TARGET_CONTEXT, last_prompt
    reads = sum(u[1] for u in usages)
    writes = sum(u[2] for u in usages)
    prompts = sum(u[0] for u in usages)
    assert usages[0][1] == 0 and usages[0][2] > 0  # a cold cache: the first request writes
    assert all(u[1] > 0 for u in usages[1:]), "a request after the first read nothing"
    assert reads > 0.8 * prompts, (reads, prompts)  # the history comes from the cache
    assert writes > 0

    # Settle, then the statement against the figures computed here.
    summary = hub.settle_billing()
    assert summary.failed == 0 and summary.quarantined == 0, summary
    assert summary.settled == len(served), summary

    expected = 0
    lines = {"input": 0, "cached_input": 0, "cache_write": 0, "output": 0}
    for e in served:
        read, write = e["cache_read_tokens"], e["cache_creation_tokens"]
        tokens = {
            "input": e["prompt_tokens"] - read - write,
            "cached_input": read,
            "cache_write": write,
            "output": e["completion_tokens"],
        }
        for line, n in tokens.items():
            assert n >= 0
            lines[line] += n
            expected += cost_nanos(n, PRICES[line])
    # Per-line rounding is what the bill promises: the rounding of the sum would differ.
    whole = sum(
        Decimal(n) * Decimal(PRICES[line]) * NANOS / Decimal(1_000_000) for line, n in lines.items()
    )
    assert abs(Decimal(expected) - whole) <= len(served) * 4

    # One statement per month the session's events fall in (one, unless it ran over a
    # month's end); their usage summed, the wallet as the last one closes it.
    events = list(hub.store.iter_events())
    months = sorted(
        {dt.datetime.fromtimestamp(ev.ts_ms / 1000, dt.UTC).strftime("%Y-%m") for ev in events}
    )
    totals = {"USD": 0, "tokens": 0, "cache_write_tokens": 0}
    for period in months:
        st = hub.statement(TENANT, period)
        usage = {u["model"]: u for u in st["usage"]}
        assert set(usage) == {ANTHROPIC_MODEL}
        u = usage[ANTHROPIC_MODEL]
        assert set(u["amounts"]) == {"USD"}
        totals["USD"] += u["amounts"]["USD"]
        totals["tokens"] += u["tokens"]
        totals["cache_write_tokens"] += u["cache_write_tokens"]
        # The statement as read from the statement lines equals the one computed from every
        # posting and event.
        assert hub.statement(TENANT, period, full=True)["usage"] == st["usage"]
    assert totals == {
        "USD": expected,
        "tokens": sum(lines.values()),
        "cache_write_tokens": lines["cache_write"],
    }
    wallet = [b for b in st["closing"] if b["unit"] == "USD" and ":wallet" in b["account"]]
    assert len(wallet) == 1
    assert wallet[0]["balance"] == int(Decimal(TOPUP_USD) * NANOS) - expected

    # The events carry the same four lines the statement was computed from.
    assert sum(ev.cached_input_tokens for ev in events) == lines["cached_input"]
    assert sum(ev.cache_write_tokens for ev in events) == lines["cache_write"]
    assert sum(ev.output_tokens for ev in events) == lines["output"]
