"""The Redis board where gateway hosts report their demand on a limit and read their share.

    host A ── report(key, R, demand) ──> one Lua script on Redis:
                 stamp A's demand with an expiry (Redis's own clock), drop expired hosts,
                 return every live host's demand
              <── fair_shares(R, demands)[A]   (tokenhub.gateway.shares, the same on every host)

Per limit key two Redis keys, hash-tagged to one slot: a sorted set of live hosts scored by the
time their report expires, and a hash of their demands. A report is keyed by host id and
overwrites the previous one, so a write retried by the client (redis-py retries on connection
errors) or replayed late is harmless: idempotent. A host that stops reporting leaves N when its
TTL has passed (its share goes back to the others at their next report); expiry is judged by the
Redis server's clock, so the hosts' clocks need not agree.

When Redis cannot be reached (refused, timed out, any Redis error) the host takes the static
share floor(R / hosts), `hosts` being the size of the cluster as configured: never the whole
limit, so N hosts stay within R (see `tokenhub.gateway.shares`). This runs beside the request
path (a periodic task), never in it: a Redis outage costs accuracy of the split, not requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tokenhub.gateway.shares import fair_shares, static_share

# KEYS: live hosts (zset, score = expiry in ms), demands (hash). ARGV: host, demand, ttl in ms.
# An empty host only reads. Returns [host, demand, host, demand, ...] for the live hosts.
_REPORT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
-- the keys outlive the longest report in them, then vanish with their last host
for _, k in ipairs(KEYS) do
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
local out = {}
for _, h in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = h
  out[#out + 1] = redis.call('HGET', KEYS[2], h) or '0'
end
return out
"""


@dataclass(frozen=True, slots=True)
class Share:
    """This host's share of one limit, and what it was computed from."""

    amount: int
    coordinated: bool
    """False: Redis could not be reached and `amount` is the static floor(R / hosts)."""
    demands: Mapping[str, int] = field(default_factory=dict)
    """The live hosts' reported demands (empty when not coordinated)."""


class ShareBoard:
    """One host's view of the shared board at `url` (redis://...).

    `hosts` is the cluster's configured size, used only for the static fallback: it must be at
    least the number of hosts that run, or the fallback shares could sum over the limit.
    `ttl` (seconds) is how long a report counts; report more often than that. `timeout` bounds
    each Redis call, connection included, and redis-py does not retry it: a slow coordinator
    means the static share, not a stalled tick.
    """

    def __init__(
        self,
        url: str,
        host_id: str,
        *,
        hosts: int,
        ttl: float = 5.0,
        timeout: float = 0.5,
        prefix: str = "tokenhub:shares",
    ) -> None:
        if not host_id:
            raise ValueError("host_id must not be empty")
        if hosts < 1:
            raise ValueError(f"hosts must be at least 1, got {hosts}")
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.host_id = host_id
        self.hosts = hosts
        self.ttl_ms = max(1, math.ceil(ttl * 1000))
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._script = self._redis.register_script(_REPORT)

    def _keys(self, key: str) -> list[str]:
        # The braces put both keys in one Redis Cluster slot, as a script needs.
        tag = f"{self.prefix}:{{{key}}}"
        return [f"{tag}:hosts", f"{tag}:demand"]

    async def report(self, key: str, limit: int, demand: int) -> Share:
        """Report this host's demand on limit `key` (of total `limit`) and return its share."""
        try:
            reply = await self._script(
                keys=self._keys(key), args=[self.host_id, max(int(demand), 0), self.ttl_ms]
            )
        except (RedisError, OSError, TimeoutError):
            return Share(static_share(limit, self.hosts), coordinated=False)
        demands = {reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)}
        # The script has just stamped this host, so it is among the live ones.
        return Share(fair_shares(limit, demands)[self.host_id], True, demands)

    async def close(self) -> None:
        await self._redis.aclose()
