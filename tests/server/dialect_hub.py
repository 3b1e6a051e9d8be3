"""A gateway in front of one mock upstream reached over both wires, for the dialect tests.

The issue-15 tests (test_sdk_anthropic.py, test_sdk_responses.py, test_coding_agent.py) need
what the session's `Hub` (harness.py) does not configure: the same mock upstream behind a
provider of `kind = "openai"` and one of `kind = "anthropic"`, so each client dialect is seen
both passed through and translated against the very same ledger, a body limit large enough
for a coding agent's 200k-token context, and billing on the hub's database (prices with a
cache-write line, the in-process settler, statements). `DialectHub` reuses the harness's
servers (its loop thread, the composition root `build_app`, the store, the ledger helpers)
and only replaces the configuration.

Models (every deployment meters with cl100k_base, the vocabulary the mock counts with):

- `gpt-wire`: provider `oai` (`kind = "openai"`), upstream model `gpt-4o-mini`;
- `claude-wire`: provider `ant` (`kind = "anthropic"`), upstream model `claude-sonnet-4-5`.

The mock serves any model id (`models = {"*": ""}`), so an Anthropic-named upstream model is
counted with the default vocabulary like the OpenAI-named one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from anthropic import Anthropic, AsyncAnthropic
from anthropic.types import Usage
from harness import TENANT, Hub, _serve

from tokenhub.billing.service import Billing
from tokenhub.billing.settler import SettleSummary, settle_pending
from tokenhub.billing.statements import tenant_statement
from tokenhub.config import from_mapping
from tokenhub.db.database import open_database
from tokenhub.mock import MockOptions
from tokenhub.mock import build_app as mock_app
from tokenhub.usage import UsageEvent, billed_lines

MOCK = "mock"  # the one mock upstream's name in Hub.mock_base (both providers reach it)
OPENAI_MODEL = "gpt-wire"
ANTHROPIC_MODEL = "claude-wire"
OPENAI_UPSTREAM = "gpt-4o-mini"
ANTHROPIC_UPSTREAM = "claude-sonnet-4-5"
VOCAB = "cl100k_base"
# The engines a module's hub runs on, as tests/server/conftest.py's ENGINES: SQLite, and a
# fresh PostgreSQL database of the test server (TOKENHUB_TEST_PG_DSN; skipped without one).
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
# model id -> (provider, upstream model, wire kind)
MODELS: dict[str, tuple[str, str, str]] = {
    OPENAI_MODEL: ("oai", OPENAI_UPSTREAM, "openai"),
    ANTHROPIC_MODEL: ("ant", ANTHROPIC_UPSTREAM, "anthropic"),
}


class DialectHub(Hub):
    """One mock upstream behind an openai-kind and an anthropic-kind provider, and a gateway.

    `mock`: the mock's options (default: any model id, cl100k_base); `max_body_bytes`: the
    gateway's request body limit; `database`: a PostgreSQL URL, else SQLite in `tmp`. Prices
    are set through `Billing` (`billing`), as an operator's `tokenhub prices set` would."""

    def __init__(
        self,
        tmp: Path,
        *,
        mock: MockOptions | None = None,
        max_body_bytes: int = 256 * 1024,
        database: str | None = None,
    ) -> None:
        self.mock_options = mock or MockOptions(models={"*": ""})
        self.max_body_bytes = max_body_bytes
        super().__init__(tmp, database=database)

    async def _start(self) -> None:
        runner, base = await _serve(mock_app(self.mock_options), handler_cancellation=False)
        self._runners.append(runner)
        self.mock_base[MOCK] = base
        providers = [
            {"name": provider, "base_url": base + "/v1", "kind": kind}
            for provider, _, kind in MODELS.values()
        ]
        models = []
        for model, (provider, upstream, _) in MODELS.items():
            dep: dict[str, Any] = {
                "provider": provider,
                "upstream_model": upstream,
                "vocab": VOCAB,
                "context_window": 400_000,
                "max_output_tokens": 4096,
            }
            models.append({"id": model, "deployments": [dep]})
        data = {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "database": self.database,
                "journal_dir": str(self.journal_dir),
                "max_body_bytes": self.max_body_bytes,
                "key_refresh_s": 0.2,
            },
            "providers": providers,
            "models": models,
        }
        self.config = from_mapping(data, "<tests/server dialect hub>")
        await self._start_gateway()

    # -- clients ---------------------------------------------------------------------------

    def anthropic(self, *, bearer: bool = False, api_key: str | None = None) -> Anthropic:
        """The official SDK pointed at the gateway as Claude Code is (ANTHROPIC_BASE_URL): the
        key as x-api-key (`api_key`, ANTHROPIC_API_KEY) or as a Bearer token (`auth_token`,
        ANTHROPIC_AUTH_TOKEN)."""
        key = api_key or self.secret
        if bearer:
            return Anthropic(base_url=self.base, auth_token=key, max_retries=0)
        return Anthropic(base_url=self.base, api_key=key, max_retries=0)

    def aanthropic(self, *, bearer: bool = False) -> AsyncAnthropic:
        if bearer:
            return AsyncAnthropic(base_url=self.base, auth_token=self.secret, max_retries=0)
        return AsyncAnthropic(base_url=self.base, api_key=self.secret, max_retries=0)

    # -- the mock's ledger and the gateway's events ----------------------------------------

    def entry(self, rid: str) -> dict[str, Any]:
        return self.ledger_entry(rid, MOCK)

    def totals(self) -> dict[str, Any]:
        return dict(self.ledger(MOCK)["totals"])

    def unbilled(self, rid: str, *, upstream_refuses: bool = False) -> None:
        """The request `rid` billed nothing: once the sink has drained, either no usage event
        or one whose billed lines are all zero; and the mock never saw it or, when the gateway
        passes the request through for the upstream to judge (`upstream_refuses`), refused
        it and served nothing."""
        self.settle()
        ev = self.find_event(rid)
        if ev is not None:
            assert all(x == 0 for x in billed_lines(ev)), ev
        entries = self.ledger_entries(rid, MOCK)
        if upstream_refuses:
            assert [(e["status"], e["prompt_tokens"], e["completion_tokens"]) for e in entries] \
                == [(400, 0, 0)], entries  # fmt: skip
        else:
            assert entries == [], entries

    # -- billing ---------------------------------------------------------------------------

    def billing(self, fn: Any) -> Any:
        """Runs `await fn(Billing)` on the hub's database (on the servers' loop thread)."""

        async def run() -> Any:
            db = await open_database(self.database)
            try:
                return await fn(Billing(db))
            finally:
                await db.close()

        return self._thread.call(run(), timeout=120)

    def settle_billing(self) -> SettleSummary:
        """The sink drained, then one pass of the in-process settler (`tokenhub billing
        settle` runs the same function)."""
        self.settle()

        async def run(b: Billing) -> SettleSummary:
            return await settle_pending(b)

        result: SettleSummary = self.billing(run)
        return result

    def statement(self, tenant: str, period: str, *, full: bool = False) -> dict[str, Any]:
        """The tenant's statement (`full`: computed from every posting, as a check)."""

        async def run(b: Billing) -> dict[str, Any]:
            st: dict[str, Any] = await b.db.transaction(
                lambda tx: tenant_statement(tx, tenant, period, full=full)
            )
            return st

        result: dict[str, Any] = self.billing(run)
        return result


def check_event(
    hub: DialectHub,
    ev: UsageEvent,
    *,
    model: str,
    endpoint: str,
    stream: bool,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> None:
    """A served request's usage event: who called, where it went, and its token figures."""
    provider, upstream, _ = MODELS[model]
    expected = {
        "tenant": TENANT,
        "key_id": hub.key_id,
        "endpoint": endpoint,
        "model": model,
        "provider": provider,
        "upstream_model": upstream,
        "stream": stream,
        "status": 200,
        "source": "upstream",
        "input_tokens": input_tokens,
        "cached_input_tokens": cached_input_tokens,
        "cache_write_tokens": cache_write_tokens,
        "output_tokens": output_tokens,
    }
    actual = {k: getattr(ev, k) for k in expected}
    assert actual == expected
    assert ev.latency_ms > 0


def cache_figures(usage: Usage) -> tuple[int, int]:
    return usage.cache_read_input_tokens or 0, usage.cache_creation_input_tokens or 0


def check_three_way(
    hub: DialectHub, rid: str, usage: Usage, *, model: str, stream: bool
) -> dict[str, Any]:
    """The client's usage == the gateway's event == the mock's ledger entry; the entry."""
    read, write = cache_figures(usage)
    prompt = usage.input_tokens + read + write
    check_event(
        hub,
        hub.event(rid),
        model=model,
        endpoint="messages",
        stream=stream,
        input_tokens=prompt,
        output_tokens=usage.output_tokens,
        cached_input_tokens=read,
        cache_write_tokens=write,
    )
    entry = hub.entry(rid)
    assert entry["status"] == 200 and entry["stream"] is stream
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (prompt, usage.output_tokens)
    assert (entry["cache_read_tokens"], entry["cache_creation_tokens"]) == (read, write)
    assert entry["disconnected"] is False
    return entry
