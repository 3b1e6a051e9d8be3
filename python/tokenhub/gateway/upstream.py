"""An upstream provider as the request path holds it: its wire format, its HTTP connection pool
and its credentials; and what forwarding and the SSE loop share (`Retry`, `scrub`)."""

from __future__ import annotations

import os

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
        self.wire: Wire = WIRES["openai"]  # every configured provider speaks OpenAI's API
        key = os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""
        # Scrubbed from whatever the upstream sends back (error bodies, replies, stream events):
        # a provider may quote the credential it was sent. A key too short to be a real
        # credential is not looked for (it would mangle ordinary text).
        self.secret = key.encode() if len(key) >= MIN_SECRET_CHARS else b""
        # Never logged: the pool does not log request headers, and neither do we.
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.pool: Pool | None = None

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
