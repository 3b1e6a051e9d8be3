"""An upstream provider as the request path holds it: its wire format, its HTTP connection pool
and its credentials; and what forwarding and the SSE loop share (`Retry`, `scrub`).

The provider's `kind` picks its wire (`providers.WIRES`); the wire says how the credential is
sent (`Provider.auth`: OpenAI's bearer token, Anthropic's x-api-key, or a configured header such
as Azure OpenAI's `api-key`). The configured `query` (Azure's `api-version`) is appended to
every path here, once per path, so the wires know nothing of it.
"""

from __future__ import annotations

import os
from urllib.parse import urlencode

from tokenhub.config import Provider
from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.providers import WIRES
from tokenhub.gateway.providers.base import Provider as Wire
from tokenhub.gateway.providers.http import Pool

MIN_SECRET_CHARS = 8


class Retry(Exception):
    """This deployment failed before the client saw a byte: try the next one."""

    def __init__(self, error: ApiError, kind: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.kind = kind


def scrub(data: bytes, secret: bytes) -> bytes:
    """`data` without the provider's key (a memchr-speed scan when it is absent)."""
    return data.replace(secret, b"[redacted]") if secret and secret in data else data


class Upstream:
    """One provider: its wire format, HTTP connection pool (`providers.http.Pool`) and
    credentials."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        wire = WIRES.get(provider.kind)
        if wire is None:
            raise ValueError(
                f"provider {provider.name!r}: unknown kind {provider.kind!r} "
                f"(one of {', '.join(sorted(WIRES))})"
            )
        self.wire: Wire = wire
        key = os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""
        # Scrubbed from whatever the upstream sends back (error bodies, replies, stream events):
        # a provider may quote the credential it was sent. A key too short to be a real
        # credential is not looked for (it would mangle ordinary text).
        self.secret = key.encode() if len(key) >= MIN_SECRET_CHARS else b""
        # Never logged: the pool does not log request headers, and neither do we.
        self.headers = {"Content-Type": "application/json", **wire.auth(key, provider)}
        self._query = "?" + urlencode(provider.query) if provider.query else ""
        self._paths: dict[str, str] = {}
        self.pool: Pool | None = None

    def path(self, path: str) -> str:
        """`path` (the wire's, under base_url) with the provider's query parameters."""
        if not self._query:
            return path
        full = self._paths.get(path)
        if full is None:
            sep = "&" if "?" in path else "?"
            full = self._paths[path] = path + sep + self._query[1:]
        return full

    async def open(self) -> None:
        p = self.provider
        self.pool = Pool(
            p.base_url,
            headers=self.headers,
            limit=p.max_connections,
            connect_timeout=p.connect_timeout_s,
            read_timeout=p.read_timeout_s,
            total_timeout=p.total_timeout_s,
            ca_file=p.ca_file,
            proxy_url=p.proxy_url,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
