"""Routing: which deployment of a public model serves a request, and which tier a request needs.

A thin layer over :class:`tokenhub._core.Router` and :class:`tokenhub._core.TierScorer` (the
design, the policies and the figures are in ``rust/router/mod.rs`` and ``rust/router/tier.rs``).
The core never reads a clock: every call takes ``now_ms`` (a monotonic clock in the gateway, a
virtual one in the simulator), and with the same seed and calls it makes the same decisions::

    router = Router([DeploymentSpec(name="a", weight=5), DeploymentSpec(name="b")], policy="swrr")
    d = router.choose(now_ms, tokens=1200, affinity=session_id)
    for i in d.order:                          # first choice, then fallbacks
        router.on_start(i, now_ms, tokens)
        ...                                    # the upstream call
        if ok:
            router.on_success(i, now_ms, latency_ms, ttft_ms)
            break
        router.on_failure(i, now_ms)           # retry only if no byte reached the client

    scorer = TierScorer(keywords=("prove", "refactor"))
    tier = scorer.tier(scorer.score_text(prompt, depth=3, prompt_tokens=1800),
                       Contract(max_strong_share=0.3), holder="tenant-a")

``on_success`` and ``on_failure`` end the request (outstanding is decremented there);
``on_finish`` ends one without a verdict (a cancelled request). :class:`Decision` is the core's
own class, not a dataclass: ``choose`` is the hot path and a Python object per call would cost
more than the decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from tokenhub import _core
from tokenhub._core import Decision, Features

__all__ = [
    "POLICIES",
    "REASONS",
    "Contract",
    "Decision",
    "DeploymentSpec",
    "Features",
    "Router",
    "TierScorer",
]

POLICIES: tuple[str, ...] = ("swrr", "random", "p2c", "latency", "cheapest", "priority")
"""Routing policy names, as ``Router(policy=...)`` takes them."""

REASONS: tuple[str, ...] = ("policy", "affinity", "fallback", "probe", "degraded")
"""What ``Decision.reason`` can be."""

Tier = Literal["cheap", "strong"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentSpec:
    """One deployment of a public model: a provider endpoint with its own price and limits.

    Prices are integer nano-units per 1M tokens. A capacity of ``None`` is unlimited; a weight of
    0 is a standby deployment (weighted policies use it only when nothing else is eligible).
    """

    name: str
    weight: int = 1
    priority: int = 0
    input_per_1m: int = 0
    cached_input_per_1m: int = 0
    output_per_1m: int = 0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    def as_tuple(
        self,
    ) -> tuple[str, int, int, int, int, int, int | None, int | None, int | None]:
        """The core's constructor format."""
        return (
            self.name,
            self.weight,
            self.priority,
            self.input_per_1m,
            self.cached_input_per_1m,
            self.output_per_1m,
            self.rpm,
            self.tpm,
            self.max_concurrency,
        )


@dataclass(frozen=True, slots=True)
class Contract:
    """A tenant's terms for the strong tier: allowed at all, and at most what share of calls."""

    allow_strong: bool = True
    max_strong_share: float | None = None


class Router:
    """The router of one public model (see ``rust/router/mod.rs``).

    Raises ValueError for a bad policy name, no deployments, an all-zero weight under a
    weighted policy (swrr, random, priority) or a negative or out-of-range number.
    """

    __slots__ = ("_core", "specs")

    def __init__(
        self,
        deployments: Sequence[DeploymentSpec],
        *,
        policy: str = "swrr",
        seed: int = 0,
        max_attempts: int = 3,
        failures_to_trip: int = 3,
        cooldown_ms: int = 5_000,
        max_cooldown_ms: int = 60_000,
        affinity_slots: int = 4096,
    ) -> None:
        self.specs: tuple[DeploymentSpec, ...] = tuple(deployments)
        self._core = _core.Router(
            [s.as_tuple() for s in self.specs],
            policy=policy,
            seed=seed,
            max_attempts=max_attempts,
            failures_to_trip=failures_to_trip,
            cooldown_ms=cooldown_ms,
            max_cooldown_ms=max_cooldown_ms,
            affinity_slots=affinity_slots,
        )

    def choose(self, now_ms: int, tokens: int = 0, affinity: int | str | None = None) -> Decision:
        """The attempt list for one request of ``tokens`` (estimated, for tpm) at ``now_ms``.

        ``affinity`` is a conversation's key (a session id, or a hash of the shared prompt
        prefix; a str is hashed in Rust): its requests stick to one deployment while it is
        eligible.
        """
        return self._core.choose(now_ms, tokens, affinity)

    def on_start(self, index: int, now_ms: int, tokens: int = 0) -> None:
        """A request goes to deployment ``index``: outstanding + 1, charged to rpm and tpm."""
        self._core.on_start(index, now_ms, tokens)

    def on_success(
        self, index: int, now_ms: int, latency_ms: float = 0.0, ttft_ms: float = 0.0
    ) -> None:
        """The request succeeded and ended (``ttft_ms`` 0: not measured); a probe's success
        closes the circuit."""
        self._core.on_success(index, now_ms, latency_ms, ttft_ms)

    def on_failure(self, index: int, now_ms: int) -> None:
        """The request failed and ended; consecutive failures open the circuit."""
        self._core.on_failure(index, now_ms)

    def on_finish(self, index: int) -> None:
        """The request ended without a verdict (cancelled): outstanding - 1, any probe released."""
        self._core.on_finish(index)

    def state(self, index: int, now_ms: int | None = None) -> dict[str, Any]:
        """Deployment ``index`` at ``now_ms`` (default: the latest time any call passed):
        outstanding, latency/ttft EWMAs, circuit, cooldown_until, rpm/tpm used, counters."""
        return self._core.state(index, now_ms)

    def affinity_target(self, key: int | str) -> int | None:
        """The deployment ``key`` sticks to, if its affinity slot still holds it."""
        return self._core.affinity_target(key)

    @property
    def names(self) -> tuple[str, ...]:
        return self._core.names

    @property
    def policy(self) -> str:
        return self._core.policy

    @property
    def max_attempts(self) -> int:
        return self._core.max_attempts

    def __len__(self) -> int:
        return len(self._core)

    def __repr__(self) -> str:
        return f"Router(policy={self.policy!r}, names={self.names!r})"


class TierScorer:
    """Cheap/strong tier by a complexity score in [0, 1] (see ``rust/router/tier.rs``).

    ``weights`` overrides some of the default term weights by name (prompt_tokens, words,
    commas, depth, tools, code, math, keywords). The defaults and the default threshold (0.48:
    a quarter of the calibration prompts go strong) were fitted on RouteLLM's GSM8K and MMLU
    outcomes (``benches/calibrate_tier.py``). The strong share of a capped contract is tracked
    per holder by the scorer itself.
    """

    __slots__ = ("_core",)

    def __init__(
        self,
        threshold: float = 0.48,
        keywords: Sequence[str] = (),
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self._core = _core.TierScorer(
            threshold, list(keywords), None if weights is None else dict(weights)
        )

    def features(
        self, text: str, depth: int = 0, tools: bool = False, prompt_tokens: int = 0
    ) -> Features:
        """What the score is computed from (one scan of ``text``)."""
        return self._core.features(text, depth, tools, prompt_tokens)

    def score(self, features: Features) -> float:
        return self._core.score(features)

    def score_text(
        self, text: str, depth: int = 0, tools: bool = False, prompt_tokens: int = 0
    ) -> float:
        """``score(features(...))`` in one call."""
        return self._core.score_text(text, depth, tools, prompt_tokens)

    def tier(
        self, score: float, contract: Contract | None = None, holder: str | None = None
    ) -> Tier:
        """Cheap or strong: strong when ``score >= threshold`` and the contract allows it
        (a capped contract counts this decision against ``holder``'s share)."""
        c = contract or _OPEN
        return cast(Tier, self._core.tier(score, c.allow_strong, c.max_strong_share, holder))

    def share(self, holder: str | None = None) -> tuple[int, int]:
        """(strong, total) capped decisions counted for ``holder``."""
        return self._core.share(holder)

    @property
    def threshold(self) -> float:
        return self._core.threshold

    @property
    def keywords(self) -> tuple[str, ...]:
        return self._core.keywords

    @property
    def weights(self) -> dict[str, float]:
        return self._core.weights


_OPEN = Contract()
