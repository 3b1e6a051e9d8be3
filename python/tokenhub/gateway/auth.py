"""API-key authentication against an in-memory copy of the active keys.

Keys are stored (and held here) only as SHA-256 digests: a key is 32 random bytes, so a fast
hash is as good as a slow one, and lookup costs one hash per request. The copy is refreshed
from the database whenever its change marker moves (polled every `refresh_s`), so new and
revoked keys take effect within about a second, with no database read on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable

import msgspec

from tokenhub.gateway.errors import ApiError

log = logging.getLogger("tokenhub.auth")


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the key's id and its tenant's name."""

    key_id: str
    tenant: str


_NOBODY = Principal("", "")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyCache:
    def __init__(
        self,
        load: Callable[[], Iterable[tuple[str, str, str]]],
        marker: Callable[[], int],
        *,
        refresh_s: float = 0.5,
    ) -> None:
        """`load()` yields (sha256 hex, key id, tenant) for every active key; `marker()`
        changes whenever keys change. Both are blocking and run in a worker thread."""
        self._load = load
        self._marker = marker
        self._refresh_s = refresh_s
        self._by_digest: dict[str, tuple[str, Principal]] = {}
        self._seen_marker: int | None = None
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._by_digest)

    def reload(self) -> None:
        """Blocking full reload (start-up, tests)."""
        marker = self._marker()
        table = {h: (h, Principal(key_id, tenant)) for h, key_id, tenant in self._load()}
        self._by_digest = table
        self._seen_marker = marker

    async def start(self) -> None:
        await asyncio.to_thread(self.reload)
        self._task = asyncio.create_task(self._poll(), name="tokenhub-key-refresh")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                marker = await asyncio.to_thread(self._marker)
                if marker != self._seen_marker:
                    await asyncio.to_thread(self.reload)
            except Exception:  # keep serving with the last good copy
                log.exception("refreshing API keys failed; keeping the previous set")

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller for an `Authorization` header value, or ApiError 401."""
        if not authorization:
            raise ApiError.invalid_key()
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        # Keys are printable ASCII (store.check_secret); anything else (bytes that are not
        # UTF-8 arrive as surrogates, which no hash can encode) is simply not a key.
        if scheme.lower() != "bearer" or not secret or not secret.isascii():
            raise ApiError.invalid_key()
        d = digest(secret)
        # The table is keyed by digest, never by the secret itself; the stored digest is then
        # compared in constant time, so timing reveals nothing about near-miss keys.
        stored, principal = self._by_digest.get(d, ("", _NOBODY))
        if not stored or not hmac.compare_digest(stored, d):
            raise ApiError.invalid_key()
        return principal
