"""The scenario file: simulated deployments, the SLO, the load shape and the trace slice.

A scenario is one TOML file (`examples/routing/*.toml` are annotated examples). It is decoded
strictly: an unknown key, a wrong type or an out-of-range value is an error naming the file and
the field (`steady.toml: Expected `int`, got `str` - at `$.deployments[0].weight``).

Prices are money, so never floats: a decimal string in the currency's major unit
(`input_per_1m = "0.15"`, USD per 1M tokens) or an integer in its minor unit (`input_per_1m = 15`,
15 cents). Either becomes exact integer nanos per 1M tokens (see `tokenhub.money`).

```toml
name = "steady"
currency = "USD"                       # ISO 4217; prices are in this currency
[trace]                                # optional: which part of the trace to replay
limit = 5000                           # at most this many requests
start_s = 0.0                          # skip the trace's first seconds
duration_s = 600.0                     # then keep this many seconds
affinity_blocks = 2                    # Mooncake: the prefix block used as affinity key
[load]                                 # optional
speed = 1.0                            # time compression: 2.0 replays an hour in 30 minutes
burst = { start_s = 120, end_s = 180, factor = 3 }   # see `Burst`
[slo]
ttft_ms = 2000                         # time to first token, queueing included
e2e_ms = 30000                         # end to end
[router]                               # the Router's knobs (same names as its constructor)
max_attempts = 3
failures_to_trip = 3
cooldown_ms = 5000
max_cooldown_ms = 60000
share_limits = true                    # tell the Router the capacity (see RouterConfig)
[[deployments]]
name = "gpt-a"
weight = 3                             # share under weighted policies
priority = 0                           # lower is preferred by the priority policy
input_per_1m = "0.15"
cached_input_per_1m = "0.075"          # default: input_per_1m
output_per_1m = "0.60"
ttft_ms = 250                          # base time to first token
prefill_ms_per_1k = 15.0               # plus this per 1,000 uncached input tokens
output_tps = 80.0                      # decode speed, tokens per second
max_concurrency = 32                   # slots; omitted = unlimited
queue_limit = 64                       # waiting requests beyond the slots; more are rejected
rpm = 600                              # provider rate limits (sliding 60 s); omitted = none
tpm = 2000000
cache_blocks = 4096                    # prompt cache: LRU of 512-token prefix blocks; 0 = off
error_ms = 150                         # how long a failing attempt takes to fail (kind "error")
timeout_ms = 10000                     # and a timed-out one (kind "timeout")
failures = [{ start_s = 60, end_s = 120, kind = "error" }]
```
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Literal

import msgspec

from tokenhub.money import MoneyError, check_currency, minor_units, parse_price

__all__ = [
    "Burst",
    "Deployment",
    "FailureWindow",
    "Load",
    "RouterConfig",
    "Scenario",
    "ScenarioError",
    "Slo",
    "TraceSlice",
    "load_scenario",
    "parse_scenario",
]

Price = int | str


class ScenarioError(ValueError):
    """A scenario file is missing or invalid (one line, naming the file and the field)."""


class _Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class FailureWindow(_Strict, frozen=True):
    """The deployment fails every attempt dispatched in [start_s, end_s) of virtual time:
    `error` fails after the deployment's `error_ms`, `timeout` after its `timeout_ms`.
    Requests already running when a window opens finish normally."""

    start_s: float
    end_s: float
    kind: Literal["error", "timeout"] = "error"

    def __post_init__(self) -> None:
        _check(0 <= self.start_s < self.end_s, "a failure window needs 0 <= start_s < end_s")


class Deployment(_Strict, frozen=True):
    name: str
    weight: int = 1
    priority: int = 0
    input_per_1m: Price = 0
    cached_input_per_1m: Price | None = None
    output_per_1m: Price = 0
    ttft_ms: float = 200.0
    prefill_ms_per_1k: float = 0.0
    output_tps: float = 50.0
    max_concurrency: int | None = None
    queue_limit: int = 0
    rpm: int | None = None
    tpm: int | None = None
    cache_blocks: int = 0
    error_ms: float = 100.0
    timeout_ms: float = 30_000.0
    failures: tuple[FailureWindow, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "a deployment needs a non-empty name")
        _check(self.weight >= 0, f"{self.name}: weight must be >= 0")
        _check(self.ttft_ms >= 0 and self.prefill_ms_per_1k >= 0, f"{self.name}: negative time")
        _check(self.output_tps > 0, f"{self.name}: output_tps must be > 0")
        _check(self.error_ms >= 0 and self.timeout_ms >= 0, f"{self.name}: negative time")
        _check(
            self.max_concurrency is None or self.max_concurrency >= 1,
            f"{self.name}: max_concurrency must be >= 1 (omit it for unlimited)",
        )
        _check(self.queue_limit >= 0, f"{self.name}: queue_limit must be >= 0")
        _check(self.rpm is None or self.rpm >= 1, f"{self.name}: rpm must be >= 1")
        _check(self.tpm is None or self.tpm >= 1, f"{self.name}: tpm must be >= 1")
        _check(self.cache_blocks >= 0, f"{self.name}: cache_blocks must be >= 0")

    def failure_at(self, t_ms: float) -> FailureWindow | None:
        for w in self.failures:
            if w.start_s * 1000 <= t_ms < w.end_s * 1000:
                return w
        return None


class TraceSlice(_Strict, frozen=True):
    limit: int | None = None
    start_s: float = 0.0
    duration_s: float | None = None
    affinity_blocks: int = 2

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit >= 1, "trace.limit must be >= 1")
        _check(self.start_s >= 0, "trace.start_s must be >= 0")
        _check(self.duration_s is None or self.duration_s > 0, "trace.duration_s must be > 0")
        _check(self.affinity_blocks >= 1, "trace.affinity_blocks must be >= 1")


class Burst(_Strict, frozen=True):
    """Multiplies the load `factor` times between start_s and end_s (trace time, before
    `speed`) by replicating arrivals: each request in the window gets factor - 1 copies, spread
    evenly over the gap to the next request of the trace, so the burst keeps the trace's own
    shape and token mix (and every copy is a request the conservation check counts). Time
    compression would instead shift everything after the window."""

    start_s: float
    end_s: float
    factor: int = 3

    def __post_init__(self) -> None:
        _check(0 <= self.start_s < self.end_s, "load.burst needs 0 <= start_s < end_s")
        _check(self.factor >= 1, "load.burst.factor must be an integer >= 1")


class Load(_Strict, frozen=True):
    speed: float = 1.0
    burst: Burst | None = None

    def __post_init__(self) -> None:
        _check(self.speed > 0, "load.speed must be > 0")


class Slo(_Strict, frozen=True):
    ttft_ms: float | None = None
    e2e_ms: float | None = None


class RouterConfig(_Strict, frozen=True):
    """The Router's constructor knobs, and `share_limits`: whether the Router is configured
    with each deployment's capacity as a gateway operator would (its rpm, its tpm, and as
    max_concurrency the slots plus the queue, everything the provider accepts without a 429),
    or told nothing and left to learn from refusals through its circuit breaker."""

    share_limits: bool = True
    seed: int = 0
    max_attempts: int = 3
    failures_to_trip: int = 3
    cooldown_ms: int = 5_000
    max_cooldown_ms: int = 60_000

    def __post_init__(self) -> None:
        _check(self.max_attempts >= 1, "router.max_attempts must be >= 1")


class Scenario(_Strict, frozen=True):
    deployments: tuple[Deployment, ...]
    name: str = ""
    description: str = ""
    currency: str = "USD"
    trace: TraceSlice = TraceSlice()
    load: Load = Load()
    slo: Slo = Slo()
    router: RouterConfig = RouterConfig()

    def __post_init__(self) -> None:
        _check(len(self.deployments) >= 1, "at least one [[deployments]] is needed")
        names = [d.name for d in self.deployments]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, f"duplicate deployment name {', '.join(dup)}")
        try:
            check_currency(self.currency)
        except MoneyError as e:
            raise ValueError(str(e)) from None

    def prices(self, d: Deployment) -> tuple[int, int, int]:
        """(input, cached input, output) in nanos per 1M tokens."""
        inp = self._price(d.input_per_1m, f"{d.name}.input_per_1m")
        cached = (
            inp
            if d.cached_input_per_1m is None
            else self._price(d.cached_input_per_1m, f"{d.name}.cached_input_per_1m")
        )
        return inp, cached, self._price(d.output_per_1m, f"{d.name}.output_per_1m")

    def _price(self, value: Price, what: str) -> int:
        if isinstance(value, int):
            text: str | Decimal = Decimal(value).scaleb(-minor_units(self.currency))
        else:
            text = value
        try:
            return parse_price(text, what)
        except MoneyError as e:
            raise ValueError(str(e)) from None


def parse_scenario(text: str, name: str = "<scenario>") -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{name}: invalid TOML: {e}") from None
    _refuse_float_prices(raw, name)
    try:
        sc = msgspec.convert(raw, Scenario)
        for d in sc.deployments:
            sc.prices(d)
    except (msgspec.ValidationError, ValueError) as e:
        raise ScenarioError(f"{name}: {e}") from None
    return sc


def load_scenario(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_scenario(text, str(path))


_PRICE_KEYS = ("input_per_1m", "cached_input_per_1m", "output_per_1m")


def _refuse_float_prices(raw: dict[str, object], name: str) -> None:
    """msgspec would say `Expected int | str, got float`; say why instead."""
    deps = raw.get("deployments")
    if not isinstance(deps, list):
        return
    for i, d in enumerate(deps):
        if not isinstance(d, dict):
            continue
        for key in _PRICE_KEYS:
            if isinstance(d.get(key), float):
                raise ScenarioError(
                    f"{name}: deployments[{i}].{key} = {d[key]!r} is a float; write prices as a "
                    f'decimal string ("{d[key]}") or an integer in minor units (cents)'
                )
