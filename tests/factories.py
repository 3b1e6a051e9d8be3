"""Shared test data builders."""

from __future__ import annotations

from tokenhub.usage import UsageEvent


def usage_event(i: int, **kw: object) -> UsageEvent:
    """Event number `i` of tenant 'acme' (request id and time follow `i`); `kw` overrides."""
    fields: dict[str, object] = {
        "request_id": f"req_{i:08d}",
        "ts_ms": 1_700_000_000_000 + i,
        "tenant": "acme",
        "key_id": "key_0123456789ab",
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "deployment": "gpt-4o-mini@mock-a",
        "provider": "mock-a",
        "upstream_model": "gpt-4o-mini",
        "input_tokens": 100 + i,
    }
    fields.update(kw)
    return UsageEvent(**fields)  # type: ignore[arg-type]
