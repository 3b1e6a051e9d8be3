"""The upstream simulator: OpenAI's wire (upstream.py) and Anthropic's Messages API
(anthropic.py) on one server and one ledger, with tool calls made up from schemas (tools.py);
`tokenhub mock-upstream` serves it (tokenhub.cli.mock). It imports nothing of the gateway: it
stands for a provider."""

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
