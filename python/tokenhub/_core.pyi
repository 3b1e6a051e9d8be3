"""Type stubs for the Rust extension (checked by mypy.stubtest)."""

from typing import final

__all__ = ["CoreMeter", "SseRelay", "StreamCounter", "VocabError", "__version__"]

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
    def __new__(cls, keep_usage: bool) -> SseRelay: ...
    def feed(self, data: bytes) -> bytes:
        """Takes one upstream read; returns the whole events to forward (possibly empty)."""
    def finish(self) -> bytes:
        """The upstream closed: the held-back rest as a last event, terminated (or empty)."""
    @property
    def done(self) -> bool:
        """The `[DONE]` event has been seen."""
    @property
    def first_token(self) -> bool:
        """A chunk with generated text (content, reasoning, tool call or legacy text) was seen."""
    @property
    def usage(self) -> bytes | None:
        """The data payload (JSON) of the last chunk that carried usage, if any."""
    def payloads(self) -> list[bytes]:
        """Every data payload so far, for metering a stream without usage (emptied by usage)."""
    @property
    def events(self) -> int:
        """Whole events seen so far."""
    @property
    def pending(self) -> int:
        """Bytes held back until their event's blank line arrives."""
