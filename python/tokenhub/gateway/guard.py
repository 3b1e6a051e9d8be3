"""The bulk-extraction guard: per-key token velocity, throttling, and an audit trail.

A stolen or abused key shows as a key that suddenly moves far more tokens than it ever did. For
the tenants that enable it (`tokenhub tenants limit T --guard-tpm N --guard-jump X`), every
request of their keys adds its tokens to the key's velocity account in the shared quota table
(`vel:<tenant>:<key id>`), so all workers count into one place. One process per server (the one
that also starts new days, `LimitSync.daily_reset`) samples them every `SAMPLE_S` seconds:

- **velocity**: tokens per minute, an exponentially weighted moving average with a time constant
  of `FAST_TAU_S` (about a minute) - smooth enough that one large request does not trip it;
- **baseline**: the same with a time constant of `SLOW_TAU_S` (about an hour), frozen while the
  key is throttled (an abuser cannot train it upwards), trusted after `WARMUP_S` of history.

A key trips when its velocity passes the tenant's `guard_tpm` ceiling, or `guard_jump` times its
baseline (at least `MIN_BASELINE_TPM`). It is then refused for `THROTTLE_S` seconds (429
rate_limit_exceeded, with retry-after), the event goes to the audit log (`tokenhub audit`) and
the log, and the tripped count is exported. Velocity and baseline are published into the table
too (the account's money and requests limits), so whichever worker answers `/metrics` exports
every key's figures (`tokenhub_key_velocity_tpm`, `tokenhub_key_baseline_tpm`).

The baseline lives in the sampling process's memory: a restarted server learns it again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenhub.quota import UNLIMITED, Quota

log = logging.getLogger("tokenhub.guard")

VELOCITY = "vel:"
BLOCKED = "guard:"
SAMPLE_S = 5.0
FAST_TAU_S = 60.0
SLOW_TAU_S = 3600.0
WARMUP_S = 300.0
MIN_BASELINE_TPM = 1000
THROTTLE_S = 60.0


@dataclass(frozen=True, slots=True)
class GuardConfig:
    ceiling_tpm: int | None
    jump: int | None


@dataclass(slots=True)
class _Track:
    velocity: float = 0.0
    baseline: float = 0.0
    history_s: float = 0.0
    throttled_until_ms: int = 0


Audit = Callable[[str, str, str, dict[str, Any]], object]


class Guard:
    def __init__(self, quota: Quota, audit: Audit | None = None) -> None:
        self.quota = quota
        self.audit = audit  # blocking (a database write): the sampler runs it in a thread
        self.configs: dict[str, GuardConfig] = {}
        self.tripped = 0  # keys throttled by this process's sampler
        self._tracks: dict[str, _Track] = {}
        self._last: float | None = None

    # -- the request path (every worker) ----------------------------------------------------

    def record(self, tenant: str, key_id: str, tokens: int) -> None:
        if tokens > 0:
            self.quota.charge(f"{VELOCITY}{tenant}:{key_id}", tokens=tokens)

    def blocked_ms(self, key_id: str, now_ms: int | None = None) -> int:
        """How long the key stays throttled (0: it is not)."""
        index = self.quota.table.find_account(BLOCKED + key_id)
        if index is None:
            return 0
        until = self.quota.table.get_limit(index, "requests")
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return max(0, until - now) if until != UNLIMITED else 0

    # -- sampling (one process per server) --------------------------------------------------

    def sample(self, now: float | None = None) -> list[dict[str, Any]]:
        """Folds the tokens counted since the last sample into each key's velocity and
        baseline, throttles the keys that trip; returns their audit entries."""
        now = time.time() if now is None else now
        dt = SAMPLE_S if self._last is None else max(1e-3, now - self._last)
        self._last = now
        fast = 1 - math.exp(-dt / FAST_TAU_S)
        slow = 1 - math.exp(-dt / SLOW_TAU_S)
        trips: list[dict[str, Any]] = []
        table = self.quota.table
        for index, name in self._velocity_accounts():
            tenant, _, key_id = name[len(VELOCITY) :].partition(":")
            tokens = table.reset_used(index, "tokens")
            tpm = tokens * 60.0 / dt
            tr = self._tracks.setdefault(name, _Track())
            tr.velocity += fast * (tpm - tr.velocity)
            now_ms = int(now * 1000)
            throttled = tr.throttled_until_ms > now_ms
            if not throttled:
                tr.baseline += slow * (tpm - tr.baseline)
                tr.history_s += dt
            table.set_limit(index, "money", int(tr.velocity))
            table.set_limit(index, "requests", int(tr.baseline))
            cfg = self.configs.get(tenant)
            if cfg is None or throttled:
                continue
            why = self._why(cfg, tr)
            if why:
                tr.throttled_until_ms = now_ms + int(THROTTLE_S * 1000)
                self.quota.set_limits(BLOCKED + key_id, requests=tr.throttled_until_ms)
                self.tripped += 1
                entry = {
                    "tenant": tenant,
                    "key_id": key_id,
                    "reason": why,
                    "velocity_tpm": round(tr.velocity),
                    "baseline_tpm": round(tr.baseline),
                    "ceiling_tpm": cfg.ceiling_tpm,
                    "jump": cfg.jump,
                    "throttled_s": THROTTLE_S,
                }
                log.warning(
                    "bulk-extraction guard: key %s of %s throttled for %.0f s (%s)",
                    key_id, tenant, THROTTLE_S, why,
                )  # fmt: skip
                trips.append(entry)
        return trips

    @staticmethod
    def _why(cfg: GuardConfig, tr: _Track) -> str:
        if cfg.ceiling_tpm is not None and tr.velocity > cfg.ceiling_tpm:
            return f"velocity {tr.velocity:.0f} tpm above the ceiling of {cfg.ceiling_tpm}"
        if cfg.jump is not None and tr.history_s >= WARMUP_S:
            floor = max(tr.baseline, MIN_BASELINE_TPM)
            if tr.velocity > cfg.jump * floor:
                return (
                    f"velocity {tr.velocity:.0f} tpm above {cfg.jump}x its baseline "
                    f"of {tr.baseline:.0f}"
                )
        return ""

    def _velocity_accounts(self) -> list[tuple[int, str]]:
        """The table's velocity accounts (any worker may have made them): a scan of the
        account slots, ~1 ms for the gateway's 4,096, every SAMPLE_S."""
        table = self.quota.table
        out: list[tuple[int, str]] = []
        for index in range(table.account_capacity):
            try:
                name = table.account_name(index)
            except ValueError:
                continue  # a free slot
            if name.startswith(VELOCITY):
                out.append((index, name))
        return out

    # -- metrics (any worker) ---------------------------------------------------------------

    def velocities(self) -> list[tuple[str, str, int, int]]:
        """(tenant, key id, velocity tpm, baseline tpm) of every key counted so far."""
        out: list[tuple[str, str, int, int]] = []
        table = self.quota.table
        for index, name in self._velocity_accounts():
            tenant, _, key_id = name[len(VELOCITY) :].partition(":")
            vel = table.get_limit(index, "money")
            base = table.get_limit(index, "requests")
            if vel != UNLIMITED:  # sampled at least once
                out.append((tenant, key_id, vel, base if base != UNLIMITED else 0))
        return out
