"""Type stubs for the Rust extension (checked by mypy.stubtest)."""

import os
from collections.abc import Iterable
from typing import Any, ClassVar, final

__all__ = [
    "POLICIES",
    "AnthropicRelay",
    "CoreMeter",
    "Decision",
    "Features",
    "QuotaError",
    "QuotaFileError",
    "QuotaFullError",
    "QuotaRefusal",
    "QuotaTable",
    "ReservationError",
    "Router",
    "SseRelay",
    "StreamCounter",
    "TierScorer",
    "VocabError",
    "__version__",
]

__version__: str

class VocabError(ValueError):
    """A vocabulary is missing, unreadable or malformed."""

@final
class CoreMeter:
    @staticmethod
    def from_tiktoken(
        path: str, pattern: str, special_tokens: dict[str, int] | None = None, nfc: bool = False
    ) -> CoreMeter: ...
    @staticmethod
    def from_tokenizer_json(path: str, force_fallback: bool = False) -> CoreMeter: ...
    def count(self, text: str) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def count_batch(self, texts: list[str]) -> list[int]: ...
    def count_cached_many(self, texts: list[str]) -> list[int]: ...
    def stream(self) -> StreamCounter: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def fallback_reason(self) -> str | None: ...
    @property
    def cache_len(self) -> int: ...

@final
class StreamCounter:
    def feed(self, delta: str) -> int:
        """Appends a delta and returns the running total."""
    @property
    def total(self) -> int:
        """Tokens in everything fed so far."""

@final
class SseRelay:
    def __new__(
        cls, keep_usage: bool, meter: CoreMeter | None = None, max_event: int = ...
    ) -> SseRelay:
        """With a meter, each choice's output is counted as events pass (payloads wait in
        batches of at most 32 KiB, decoded when the batch fills or a count is read). An event
        longer than `max_event` bytes (default 4 MiB) is refused (`feed` raises ValueError)."""
    def feed(self, data: bytes) -> bytes:
        """Takes one upstream read; returns the whole events to forward (possibly empty).
        Raises ValueError when an event grows past `max_event` bytes without ending."""
    def finish(self) -> bytes:
        """The upstream closed: the held-back rest as a last event, terminated (or empty)."""
    @property
    def done(self) -> bool:
        """The `[DONE]` event has been seen."""
    @property
    def first_token(self) -> bool:
        """A chunk with generated text (content, reasoning, tool call or legacy text) was seen."""
    @property
    def errored(self) -> bool:
        """A chunk with a top-level ``error`` object (a mid-stream failure) was seen."""
    @property
    def usage(self) -> bytes | None:
        """The data payload (JSON) of the last chunk that carried usage, if any."""
    @property
    def head(self) -> bytes | None:
        """A JSON object with the first chunk's id, object, created and model (those it has)."""
    @property
    def output_tokens(self) -> int:
        """Output tokens so far, all choices together (0 without a meter)."""
    def choice_tokens(self) -> dict[int, int]:
        """{choice index: output tokens so far} for each choice counted apart (at most 128;
        text of further indexes counts only towards `output_tokens`)."""
    @property
    def events(self) -> int:
        """Whole events seen so far."""
    @property
    def held_done(self) -> bool:
        """The client asked for usage, none came, and `[DONE]` was held back: the gateway sends a
        usage chunk of its own, then `[DONE]`."""
    @property
    def pending(self) -> int:
        """Bytes held back until their event's blank line arrives."""

@final
class AnthropicRelay:
    def __new__(cls, meter: CoreMeter | None = None, max_event: int = ...) -> AnthropicRelay:
        """An Anthropic Messages stream, scanned as it is relayed (events pass unchanged). With
        a meter, each content block's output is counted as events pass (text, thinking, a tool
        call's arguments JSON, and its name counted apart); content payloads wait in batches
        of at most 32 KiB. An event longer than `max_event` bytes (default 4 MiB) is refused
        (`feed` raises ValueError)."""
    def feed(self, data: bytes) -> bytes:
        """Takes one upstream read; returns the whole events in it, unchanged (possibly empty).
        Raises ValueError when an event grows past `max_event` bytes without ending."""
    def finish(self) -> bytes:
        """The upstream closed: the held-back rest as a last event, terminated (or empty)."""
    @property
    def done(self) -> bool:
        """`message_stop` has been seen."""
    @property
    def first_token(self) -> bool:
        """A content block delta with text, thinking or tool-call JSON was seen."""
    @property
    def errored(self) -> bool:
        """An ``error`` event (a mid-stream failure) was seen."""
    @property
    def usage(self) -> bytes | None:
        """The merged usage object (Anthropic's keys) as JSON: message_start's, each
        message_delta's non-null keys overriding; None before any usage."""
    @property
    def head(self) -> bytes | None:
        """A JSON object with `message_start`'s message id and model (those it has)."""
    @property
    def output_tokens(self) -> int:
        """Output tokens so far, all content blocks together (0 without a meter)."""
    def block_tokens(self) -> dict[int, int]:
        """{content block index: output tokens so far} for each block counted apart (at most
        128; text of further indexes counts only towards `output_tokens`)."""
    @property
    def events(self) -> int:
        """Whole events seen so far."""
    @property
    def held_done(self) -> bool:
        """Always False: an Anthropic stream carries its usage, nothing is held back."""
    @property
    def pending(self) -> int:
        """Bytes held back until their event's blank line arrives."""

class QuotaError(RuntimeError):
    """A quota table operation failed (the subclasses say how)."""

class QuotaFileError(QuotaError):
    """The quota table file cannot be created or opened, or is not a table this build can use."""

class QuotaFullError(QuotaError):
    """Every account slot, or every reservation slot, of the quota table is taken."""

class ReservationError(QuotaError):
    """The reservation id is unknown (or its slot was reused), or the reservation already ended."""

@final
class QuotaRefusal:
    """Why a reservation or extension was not admitted."""

    @property
    def account(self) -> int:
        """Index of the account that refused."""
    @property
    def limit(self) -> str:
        """tokens, money, requests, concurrent, rpm or tpm."""
    @property
    def code(self) -> str:
        """OpenAI's error code: insufficient_quota (a budget) or rate_limit_exceeded."""
    @property
    def limit_value(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def retry_after_ms(self) -> int | None:
        """Rate limits: ms until this request would fit (None: never, or not a rate limit)."""
    @property
    def reset_ms(self) -> int | None:
        """Rate limits: ms until the limit is full again (None: not a rate limit)."""

_Accounts = int | tuple[int, ...] | list[int] | Iterable[int]

@final
class QuotaTable:
    """The shared quota table: budgets, rate limits and concurrency per account."""

    UNLIMITED: ClassVar[int]
    NAME_MAX: ClassVar[int]
    @staticmethod
    def create(
        path: str | os.PathLike[str], accounts: int = 1024, reservations: int = 16384
    ) -> QuotaTable:
        """Creates a fresh table at `path` (replacing the file atomically)."""
    @staticmethod
    def attach(path: str | os.PathLike[str]) -> QuotaTable:
        """Maps a table another process created."""
    @staticmethod
    def anonymous(accounts: int = 1024, reservations: int = 16384) -> QuotaTable:
        """A table in anonymous shared memory: this process's threads and the children it forks."""
    @staticmethod
    def clock_ns() -> int:
        """CLOCK_MONOTONIC in ns: the clock of deadlines and rate limits, in every process."""
    @property
    def path(self) -> str | None: ...
    @property
    def account_capacity(self) -> int: ...
    @property
    def reservation_capacity(self) -> int: ...
    def account(self, name: str) -> int:
        """The index of the account `name`, created with every limit unlimited if new."""
    def find_account(self, name: str) -> int | None: ...
    def account_name(self, index: int) -> str: ...
    def set_limit(self, index: int, limit: str, value: int) -> None: ...
    def get_limit(self, index: int, limit: str) -> int: ...
    def add_budget(self, index: int, limit: str, delta: int) -> int:
        """Raises (or lowers) a budget's limit by `delta`; returns the new limit."""
    def reset_used(self, index: int, limit: str) -> int:
        """Starts a new period for a budget; returns the usage cleared."""
    def available(self, index: int, limit: str) -> int:
        """What a budget can still take (limit - held - used), or UNLIMITED."""
    def release_used(self, index: int, limit: str, amount: int) -> int:
        """Gives back up to `amount` of a budget's used; returns the amount released."""
    def reserve(
        self,
        accounts: _Accounts,
        tokens: int = 0,
        money: int = 0,
        requests: int = 1,
        concurrent: bool = True,
        ttl_ms: int = 300000,
        now_ns: int | None = None,
    ) -> int | QuotaRefusal:
        """Reserves on every account (all or none): the reservation id, or a QuotaRefusal."""
    def settle(
        self,
        reservation: int,
        tokens: int = 0,
        money: int = 0,
        requests: int | None = None,
        now_ns: int | None = None,
    ) -> tuple[int, int, bool]:
        """Ends a reservation with its real usage: (overrun_tokens, overrun_money, late)."""
    def cancel(self, reservation: int) -> bool:
        """Gives everything back; False if the reservation had already expired."""
    def extend(
        self,
        reservation: int,
        tokens: int = 0,
        money: int = 0,
        ttl_ms: int = 300000,
        now_ns: int | None = None,
    ) -> QuotaRefusal | None:
        """Reserves more on a live reservation and pushes its deadline; None or a QuotaRefusal."""
    def charge(
        self,
        accounts: _Accounts,
        tokens: int = 0,
        money: int = 0,
        requests: int = 0,
        now_ns: int | None = None,
    ) -> None:
        """Records usage no reservation covers (all of it as overrun)."""
    def expire_due(self, now_ns: int | None = None) -> int:
        """Expires the held reservations past their deadline; returns how many."""
    def reservation_state(self, reservation: int) -> str:
        """held, settled, cancelled, expired or "settled after expiry"."""
    def rate_status(
        self, index: int, now_ns: int | None = None
    ) -> tuple[int, int, int, int, int, int]:
        """(rpm limit, rpm remaining, rpm reset ms, tpm limit, tpm remaining, tpm reset ms)."""
    def snapshot(self, index: int, now_ns: int | None = None) -> dict[str, int]:
        """One account's limits and counters, as a dict of ints."""
    def stats(self) -> dict[str, int]:
        """Counts over the whole table (one pass over every slot, without the GIL)."""

# -- routing (rust/router) --------------------------------------------------------------------

POLICIES: tuple[str, ...]

_SpecTuple = tuple[str, int, int, int, int, int, int | None, int | None, int | None]

@final
class Decision:
    """One routing decision: the attempt order and why its first choice is what it is."""

    @property
    def order(self) -> tuple[int, ...]:
        """Deployment indexes to try, first choice first (never empty, no repeats)."""
    @property
    def first(self) -> int:
        """The first choice."""
    @property
    def reason(self) -> str:
        """policy, affinity, fallback, probe or degraded."""
    def __len__(self) -> int: ...
    def __eq__(self, value: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class Router:
    def __new__(
        cls,
        deployments: list[_SpecTuple],
        policy: str = "swrr",
        seed: int = 0,
        max_attempts: int = 3,
        failures_to_trip: int = 3,
        cooldown_ms: int = 5000,
        max_cooldown_ms: int = 60000,
        affinity_slots: int = 4096,
    ) -> Router: ...
    def choose(self, now_ms: int, tokens: int = 0, affinity: int | str | None = None) -> Decision:
        """The attempt list for one request (see `rust/router`)."""
    def on_start(self, index: int, now_ms: int, tokens: int = 0) -> None:
        """A request goes to deployment `index` (outstanding + 1; charged to rpm and tpm)."""
    def on_success(
        self, index: int, now_ms: int, latency_ms: float = 0.0, ttft_ms: float = 0.0
    ) -> None:
        """The request succeeded and ended (a ttft_ms of 0: not measured)."""
    def on_failure(self, index: int, now_ms: int) -> None:
        """The request failed and ended."""
    def on_finish(self, index: int) -> None:
        """The request ended without a verdict (cancelled): outstanding - 1, any probe released."""
    def affinity_target(self, key: int | str) -> int | None:
        """The deployment a key sticks to, if its affinity slot still holds it."""
    @property
    def names(self) -> tuple[str, ...]: ...
    @property
    def policy(self) -> str: ...
    @property
    def max_attempts(self) -> int: ...
    def __len__(self) -> int: ...
    def state(self, index: int, now_ms: int | None = None) -> dict[str, Any]:
        """One deployment's live state at `now_ms` (default: the latest time any call passed)."""

@final
class Features:
    """What the tier scorer read from one request."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def words(self) -> int: ...
    @property
    def commas(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def tools(self) -> bool: ...
    @property
    def code_markers(self) -> int: ...
    @property
    def symbols(self) -> int: ...
    @property
    def math_markers(self) -> int: ...
    @property
    def keyword_hits(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    def __eq__(self, value: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class TierScorer:
    """Cheap/strong tier assignment by a complexity score (see `rust/router/tier.rs`)."""

    def __new__(
        cls,
        threshold: float = 0.48,
        keywords: list[str] = ...,
        weights: dict[str, float] | None = None,
    ) -> TierScorer: ...
    def features(
        self, text: str, depth: int = 0, tools: bool = False, prompt_tokens: int = 0
    ) -> Features: ...
    def score(self, features: Features) -> float: ...
    def score_text(
        self, text: str, depth: int = 0, tools: bool = False, prompt_tokens: int = 0
    ) -> float: ...
    def tier(
        self,
        score: float,
        allow_strong: bool = True,
        max_strong_share: float | None = None,
        holder: str | None = None,
    ) -> str:
        """cheap or strong; a capped contract counts the decision against `holder`'s share."""
    def share(self, holder: str | None = None) -> tuple[int, int]:
        """(strong, total) capped decisions counted for `holder`."""
    @property
    def threshold(self) -> float: ...
    @property
    def keywords(self) -> tuple[str, ...]: ...
    @property
    def weights(self) -> dict[str, float]: ...
