"""The OpenAI-compatible upstream simulator (upstream.py); `tokenhub mock-upstream` serves it
(tokenhub.cli.mock). It imports nothing of the gateway: it stands for a provider."""

from tokenhub.mock.upstream import (
    DEFAULT_MODELS,
    LEDGER,
    MOCK,
    Ledger,
    MockError,
    MockOptions,
    build_app,
)

__all__ = ["DEFAULT_MODELS", "LEDGER", "MOCK", "Ledger", "MockError", "MockOptions", "build_app"]
