"""Is an upstream's usage block plausible for the request that was sent?

An upstream's `usage` is trusted for billing only within what the request allowed: the prompt
fits the deployment's context window, the output is at most n x the output cap the gateway sent
upstream (the deployment's `max_output_tokens` when none was sent), cache reads and cache writes
are parts of the input (together at most the prompt), every figure is a non-negative integer
below `tokenhub.usage.MAX_TOKENS`. A block that breaks one of these (an upstream bug, a hostile
or compromised provider, a proxy that mangled it) is not billed: the gateway bills its own
metered count instead, and the event says why (`usage_anomaly`), as do `/metrics`
(`tokenhub_usage_anomalies_total`) and the audit log.

The usage read here is in OpenAI's keys whatever the upstream's wire (`providers.base`
normalizes Anthropic's: `prompt_tokens` all prompt tokens, cache reads in
`prompt_tokens_details.cached_tokens`, cache writes in `.cache_write_tokens`, the key
OpenRouter-style OpenAI-compatible upstreams send too).

Under-reporting (an explicit zero, a prompt shorter than metered) is not flagged: a provider may
bill less than the meter counts (cache discounts, its own tokenizer), never more than allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenhub.usage import MAX_TOKENS

__all__ = ["KINDS", "MAX_TOKENS", "Anomaly", "Bounds", "Counts", "check"]

# The kinds of anomaly, as the metric labels them.
KINDS = ("not_integer", "negative", "cached_over_input", "over_context", "over_output", "huge")
# (cached_over_input: cache reads plus cache writes over the prompt)


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a request allowed: its deployment's context window (0: unknown) and the most
    output tokens it could produce over all its choices (`ParsedRequest.output_bound`)."""

    context_window: int
    output: int


@dataclass(frozen=True, slots=True)
class Counts:
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cache_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Anomaly:
    kind: str  # one of KINDS
    detail: str  # what the upstream said, and the bound it broke

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check(usage: Any, bounds: Bounds) -> Counts | Anomaly:
    """The counts of an upstream `usage` object when plausible for `bounds`, else why not.
    Missing counts are 0 (as the gateway always read them); cached input is
    `prompt_tokens_details.cached_tokens` or DeepSeek's `prompt_cache_hit_tokens`; cache writes
    `prompt_tokens_details.cache_write_tokens`."""
    if not isinstance(usage, dict):
        return Anomaly("not_integer", f"usage is {type(usage).__name__}, not an object")
    details = usage.get("prompt_tokens_details")
    cached: Any = None
    writes: Any = None
    if isinstance(details, dict):
        cached = details.get("cached_tokens")
        writes = details.get("cache_write_tokens")
    if not cached:
        cached = usage.get("prompt_cache_hit_tokens")
    figures = {
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "cached_tokens": cached or 0,
        "cache_write_tokens": writes or 0,
    }
    for name, v in figures.items():
        if v is None:
            figures[name] = 0
        elif not _int(v):
            return Anomaly("not_integer", f"{name} is {_show(v)}")
    for name, v in figures.items():
        if v < 0:
            return Anomaly("negative", f"{name} is {v}")
    for name, v in figures.items():
        if v > MAX_TOKENS:
            return Anomaly("huge", f"{name} is {v}, over the ceiling of {MAX_TOKENS}")
    p, c, o = figures["prompt_tokens"], figures["cached_tokens"], figures["completion_tokens"]
    w = figures["cache_write_tokens"]
    if c > p:
        return Anomaly("cached_over_input", f"cached_tokens {c} > prompt_tokens {p}")
    if c + w > p:
        return Anomaly(
            "cached_over_input",
            f"cached_tokens {c} + cache_write_tokens {w} > prompt_tokens {p}",
        )
    if bounds.context_window and p > bounds.context_window:
        return Anomaly(
            "over_context", f"prompt_tokens {p} > the context window {bounds.context_window}"
        )
    if o > bounds.output:
        return Anomaly("over_output", f"completion_tokens {o} > the {bounds.output} allowed")
    return Counts(p, c, o, w)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
