"""Rate limits and daily token budgets per API key and tenant, through the shared quota table.

The limits live in the store (`tokenhub keys limit`, `tokenhub tenants limit`); every worker
mirrors them into the one quota table its server created before forking (`tokenhub.quota`), so
`--workers N` admits one limit's worth, not N. The mirror polls the store's change marker, as the
key cache does, so a limit set on a running server applies within about `refresh_s`.

Accounts in the table: `key:<key id>` (rpm, tpm, concurrency) and `tenant:<name>` (the same,
plus `tokens_per_day` as the table's tokens budget). A request reserves only on those of its two
accounts that have a limit: with no limits configured nothing touches the table (no account is
created, no reservation made), so the request path costs what it did before limits existed. A
limit set while requests are in flight does not see those requests (they never reserved).

Daily reset: a tenant's tokens budget starts again at 00:00 UTC. Exactly one process per server
does it (the one that also runs the billing settler: worker 1, or the single process), and the
day it last reset is kept in the table itself (account `meta:utc-day`, in its `requests` limit),
so a restarted worker neither resets twice nor misses a day. The table lives as long as the
server; a restarted server's new table is charged each tenant's usage since 00:00 UTC from the
database (`carry_today`), so a restart does not grant a second day's budget.

Every process sweeps expired reservations (`expire_due`) about once a second; concurrent sweeps
are fine.

Cluster mode (`[server] host_id`): the table's rate limits (rpm, tpm, concurrent) and the
tenants' tokens budget hold this host's share of each limit, not the whole R or B
(tokenhub.runtime.shares). The mirror then writes them only through `rate_share(account, kind,
total)`: worker 1's ShareKeeper answers with the host's current share (a safe start for a new or
changed total), the other workers' hook answers None and they leave them to worker 1. A removed
limit is unset by every process. So a reload never overwrites a share with the whole; the
`rate_totals` (named for the rates they first held; the tokens budget is among them) are what
the keeper splits. At a new day worker 1 cuts each tokens budget to 0 before it resets it, then
writes what the keeper answers for the new period: no host starts a day with the last day's
share. A restarted server carries every host's usage since 00:00 (the database does not say
which host served what); `carried` tells the keeper how much, so its share counts only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from tokenhub.gateway.guard import SAMPLE_S, Audit, Guard, GuardConfig
from tokenhub.quota import Quota, Refusal, Reservation
from tokenhub.store import LimitRow

log = logging.getLogger("tokenhub.limits")

DAY_ACCOUNT = "meta:utc-day"
RATE_KINDS = ("rpm", "tpm", "concurrent")
SHARED_KINDS = (*RATE_KINDS, "tokens")  # split across hosts in cluster mode
_UNSET = {"rpm": None, "tpm": None, "concurrent": None, "tokens": None}


def _said(headers: dict[str, str]) -> int:
    """The rate kinds (1: requests, 2: tokens) these headers already state."""
    return ("x-ratelimit-limit-requests" in headers) | ("x-ratelimit-limit-tokens" in headers) << 1


def utc_day(now: float | None = None) -> int:
    """Days since the Unix epoch, in UTC."""
    return int((time.time() if now is None else now) // 86_400)


def _table_limits(row: LimitRow) -> dict[str, int | None]:
    lim = row.limits
    out = {"rpm": lim.rpm, "tpm": lim.tpm, "concurrent": lim.max_concurrency, "tokens": None}
    if row.scope == "tenant":
        out["tokens"] = lim.tokens_per_day
    return out


class LimitSync:
    """Mirrors the store's limits into the quota table, admits requests against them, and
    runs the table's housekeeping (expiry sweep, daily reset)."""

    def __init__(
        self,
        quota: Quota,
        load: Callable[[], Iterable[LimitRow]],
        marker: Callable[[], int],
        *,
        refresh_s: float = 0.5,
        daily_reset: bool = True,
        sweep_s: float = 1.0,
        audit: Audit | None = None,
        usage_since: Callable[[int], dict[str, int]] | None = None,
    ) -> None:
        """`load()` yields every limited key and tenant; `marker()` changes whenever one does.
        Both block and run in a worker thread. `daily_reset`: this process is the one that
        starts new days and samples the bulk-extraction guard (one per server); `audit`
        (blocking) records what the guard throttles; `usage_since(ms)` (blocking) gives each
        tenant's tokens since then, to carry today's usage into a new table."""
        self.quota = quota
        self._load = load
        self._marker = marker
        self._refresh_s = refresh_s
        self._sweep_s = sweep_s
        self.daily_reset = daily_reset
        self.limited: frozenset[str] = frozenset()  # accounts with at least one limit
        self._tenants: frozenset[str] = frozenset()
        self._seen_marker: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._usage_since = usage_since
        self._rates: dict[str, int] = {}
        # Tier routing contracts: tenant -> the most strong-tier share allowed, in percent.
        self.strong_share: dict[str, int] = {}
        self.guard = Guard(quota, audit)
        self._sampled = time.monotonic()
        # Cluster mode (see the module docstring): None mirrors R as it is.
        self.rate_share: Callable[[str, str, int], int | None] | None = None
        self.rate_totals: dict[str, dict[str, int]] = {}  # account -> {kind: R or B}
        # (day, {tenant account: tokens}) charged into a table this process started; None when
        # the table was already there (a restarted worker) or no day has been started.
        self.carried: tuple[int, dict[str, int]] | None = None

    # -- mirroring ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Blocking: reads every limit and writes the table (start-up, and on each change)."""
        marker = self._marker()
        rows = list(self._load())
        mirrored = {f"{r.scope}:{r.name}": _table_limits(r) for r in rows}
        # A tenant with only guard settings has nothing to reserve on.
        wanted = {n: lim for n, lim in mirrored.items() if any(v is not None for v in lim.values())}
        self.strong_share = {
            r.name: r.limits.strong_share_pct
            for r in rows
            if r.scope == "tenant" and r.limits.strong_share_pct is not None
        }
        self.guard.configs = {
            r.name: GuardConfig(r.limits.guard_tpm, r.limits.guard_jump)
            for r in rows
            if r.scope == "tenant" and (r.limits.guard_tpm or r.limits.guard_jump)
        }
        # Published before the writes: the share keeper never splits a total it missed.
        totals: dict[str, dict[str, int]] = {}
        for n, lim in wanted.items():
            rates = {k: v for k in SHARED_KINDS if (v := lim[k]) is not None}
            if rates:
                totals[n] = rates
        self.rate_totals = totals
        for name in self.limited - wanted.keys():
            self.quota.set_limits(name, **_UNSET)  # removed since: unlimited again
        for name, limits in wanted.items():
            if self.rate_share is not None:
                limits = self._shared(name, limits)
            self.quota.set_limits(name, **limits)
        self.limited = frozenset(wanted)
        # Which rate limits each account has (1: rpm, 2: tpm), for the response headers.
        self._rates = {
            n: (lim["rpm"] is not None) | (lim["tpm"] is not None) << 1 for n, lim in wanted.items()
        }
        self._tenants = frozenset(n for n in wanted if n.startswith("tenant:"))
        self._seen_marker = marker

    def _shared(self, name: str, limits: dict[str, int | None]) -> dict[str, int | None]:
        assert self.rate_share is not None
        out = dict(limits)
        for kind in SHARED_KINDS:
            total = limits[kind]
            if total is None:
                continue  # unset everywhere
            local = self.rate_share(name, kind, total)
            if local is None:
                del out[kind]  # worker 1 writes it
            else:
                out[kind] = local
        return out

    def start_day(self, day: int | None = None) -> bool:
        """Starts a new UTC day for every tenant's tokens budget if the table's day is older;
        a fresh table just records today. Returns whether budgets were reset."""
        today = utc_day() if day is None else day
        seen = self.quota.limits(DAY_ACCOUNT)["requests"]
        if seen is not None and seen >= today:
            return False
        shared: dict[str, int] = {}
        if seen is not None and self.rate_share is not None:
            shared = {n: k["tokens"] for n, k in self.rate_totals.items() if "tokens" in k}
        for name in shared:  # cluster mode: the old day's share must not spend the new day
            self.quota.set_limits(name, tokens=0)
        if seen is not None:
            for name in self._tenants:
                self.quota.reset_used(name, "tokens")
        self.quota.set_limits(DAY_ACCOUNT, requests=today)
        for name, total in shared.items():
            assert self.rate_share is not None
            local = self.rate_share(name, "tokens", total)  # the new period's start
            if local is not None:
                self.quota.set_limits(name, tokens=local)
        return seen is not None

    async def start(self) -> None:
        await asyncio.to_thread(self.reload)
        if self.daily_reset:
            fresh = self.quota.limits(DAY_ACCOUNT)["requests"] is None
            self.start_day()
            if fresh:
                self.carried = (utc_day(), {})  # this process's table, nothing carried (yet)
            if fresh and self._usage_since is not None and self._tenants:
                await self.carry_today()
        self._tasks = [
            asyncio.create_task(self._poll(), name="tokenhub-limits-refresh"),
            asyncio.create_task(self._sweep(), name="tokenhub-quota-sweep"),
        ]

    async def carry_today(self) -> int:
        """A new table (a restarted server) starts the day with what each tenant has used
        since 00:00 UTC by the database, so a restart does not hand out a second budget.
        Returns the tokens carried."""
        assert self._usage_since is not None
        day = utc_day()
        used = await asyncio.to_thread(self._usage_since, day * 86_400_000)
        carried = 0
        per: dict[str, int] = {}
        for name in self._tenants:
            tokens = max(0, used.get(name.removeprefix("tenant:"), 0))
            if tokens:
                self.quota.charge(name, tokens=tokens)
                carried += tokens
                per[name] = tokens
        self.carried = (day, per)
        if carried:
            log.info("carried %d tokens of today's usage into the new quota table", carried)
        return carried

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                marker = await asyncio.to_thread(self._marker)
                if marker != self._seen_marker:
                    await asyncio.to_thread(self.reload)
            except Exception:  # keep enforcing the last good set
                log.exception("refreshing limits failed; keeping the previous set")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            try:
                self.quota.expire_due()  # microseconds: not worth a thread
                if self.daily_reset:
                    self.start_day()
                    if time.monotonic() - self._sampled >= SAMPLE_S:
                        self._sampled = time.monotonic()
                        await self._sample_guard()
            except Exception:
                log.exception("quota housekeeping failed")

    async def _sample_guard(self) -> None:
        for entry in self.guard.sample():
            if self.guard.audit is not None:
                await asyncio.to_thread(
                    self.guard.audit, "guard_throttle", entry["tenant"], entry["key_id"], entry
                )

    # -- the request path ---------------------------------------------------------------------

    def accounts(self, key_id: str, tenant: str) -> tuple[str, ...]:
        """The caller's accounts that have a limit (key first), often none."""
        if not self.limited:
            return ()
        return tuple(a for a in (f"key:{key_id}", f"tenant:{tenant}") if a in self.limited)

    def reserve(
        self, accounts: Sequence[str], *, tokens: int, ttl_ms: int
    ) -> Reservation | Refusal:
        return self.quota.reserve(
            accounts, tokens=tokens, requests=1, concurrent=True, ttl_ms=ttl_ms
        )

    def rate_headers(self, accounts: Sequence[str]) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` for the caller: the key's limits, else its tenant's."""
        out: dict[str, str] = {}
        for name in accounts:  # the key first: a kind it limits is not the tenant's to say
            kinds = self._rates.get(name, 0)
            if kinds & ~_said(out):
                for h, v in self.quota.rate_headers(name).items():
                    out.setdefault(h, v)
        return out

    def settle(self, res: Reservation, tokens: int) -> None:
        """Never raises: a failure here must not lose the usage event (already recorded)."""
        try:
            s = self.quota.settle(res, tokens=tokens)
        except Exception:
            log.exception("settling quota reservation %#x failed", res.id)
            return
        if s.late:
            log.warning("quota reservation %#x expired before it was settled", res.id)
