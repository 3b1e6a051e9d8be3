"""Money admission: a request goes upstream only if the tenant's contracts can pay for it.

The ledger (`tokenhub.billing`) is the bill; it settles usage after the fact, and what nothing
could pay for lands on the tenant's overrun account. This module keeps that account empty under
concurrency: before forwarding, the gateway prices the request's worst case and reserves it
against the tenant's contracts, in the tenant's draw order, in the shared quota table
(`tokenhub.quota`, one table for all workers), where each contract is a *pot*:

| pot (table account) | budget | holds | mirrors ledger account |
|---|---|---|---|
| `pot:t:<lot id>` | tokens | a package's tokens | `t:T:lot:<id>` (TOKENS) |
| `pot:p:<lot id>` | money | a point pack's nano-points | `t:T:lot:<id>` (POINTS) |
| `pot:m:<tenant>` | money | tenant currency nanos: wallet + credit headroom | wallet, receivable |

**Worst case.** The prompt (the Rust meter's count) as uncached input, or as prompt-cache writes
where the model's price makes those dearer (what of the prompt the provider reads from or writes to
its cache is known only from the reply; lines as `usage.billed_lines`: uncached input, cached input,
output, cache writes; `Contracts.admit`), plus the output the request may produce: n (or best_of)
choices x the output cap, the smallest of max_tokens, max_completion_tokens and the deployment's
output cap (the assumption when it sets neither). The gateway sends that cap upstream
(`gateway._send_cap`), so an upstream that honours only one of the two fields, or would write more
than the assumed cap, cannot outrun the reservation. Streams reserve their output in tranches
(`TRANCHE` tokens, or less when the cap is smaller) and extend as tokens flow (every kind of
generated text counts: content, reasoning, tool calls, legacy function calls); when the contracts
can pay for no more, the stream ends cleanly: a final SSE `error` event (insufficient_quota), then
`[DONE]`, and the event is billed exactly the tokens the client received (metered). A client that
leaves is not reserved for any more: the gateway drains the upstream (its cost, paid to the
provider) but the event, status 499, bills at most what was held when the client left. A failed
request bills nothing (`usage.billed_lines`), so its hold is given back whole.

**Draw order** is `tokenhub.billing.draw.draw`, the function settlement posts with: package
lots that cover the model (tokens), then on exhaustion the last lot's rule (overage priced in
its currency and converted, or auto top-up blocks, both paid from the money pot); point packs
at the model's points price; wallet and credit line at the model's price for the tenant
(discount and FX included). Admission reserves its draws when nothing in them is unpaid, i.e.
exactly when settlement, given the pots' balances, would post no overrun. Otherwise: 429
insufficient_quota, saying how much is needed and what is left.

**Keeping the pots equal to the ledger.** Each pot's limit is the ledger's available balance;
its `used` is what the gateway charged and the ledger has not posted yet. Only the server's
settler (`python -m tokenhub.billing.settler --quota`, a process that worker 1 starts when
`[billing] settle_interval_s` is set) writes pots, so the two never race:

- after each settled batch it sets the batch's tenants' pot limits from the ledger, *then*
  gives back (`release_used`) what those events had charged (their `UsageEvent.holds`); between
  the two steps a pot is conservative (it counts the events twice), never generous;
- after each pass it sets every pot from the ledger, which picks up top-ups, purchases, credit
  limit changes and expiries made elsewhere (the CLI) within one settle interval.

`holds` carries the table's epoch (a random id the server draws when it creates the table): a
table made by a restarted server never releases what an older one charged. On start, the
settler settles what is pending before it publishes the pots, and worker 1 waits for that before
it serves; other workers answer 503 until then. If the settler is replaced (it died, or its
worker did), the old one may settle a last batch while the new one starts: settlement is
idempotent, and a pot set from a stale read is corrected by the next pass.

**Cluster mode** (several hosts on one PostgreSQL, `[server] host_id`: issue 13): the pots hold
what this host LEASED from the coordinator (`tokenhub.billing.leasing`, whose agent runs in the
settler), not the ledger's balance, and nobody releases their `used`. Holds are tagged
`@<instance>|pot=amount;...` (instance "<host id>/<epoch>"), which the settler posts to the
coordinator and `PotSync.release` ignores. When `admit` finds the pool short, `acquire` sends the
agent a want and retries every POLL_S for up to `[cluster] acquire_wait_ms` (a stream's
`extend_wait` likewise); the single-host path is unchanged.

Bounds, stated: a purchase paid from the wallet by another process can be admitted against for
up to one settle interval (the ledger still posts the difference to overrun, never loses it);
prices, FX, lots and profiles are those of the last poll of their change marker
(`tokenhub.billing.terms`, every `refresh_s`); a stream's tranches are drawn one at a time, so
a stream's draws can differ from settlement's single draw of its total where a lot ends inside
it (the total is what the ledger posts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenhub.billing.draw import (
    LINES,
    NotPriced,
    Outcome,
    Rule,
    draw,
    four,
    lot_pot,
    money_pot,
    pot_dim,
    take_lines,
)
from tokenhub.billing.terms import (
    LOT_COLS,
    PROFILE_COLS,
    Profile,
    Terms,
    TermsCache,
    load_terms,
    lot_from_row,
    profile_from_row,
)
from tokenhub.db.database import Database, Tx
from tokenhub.money import fmt, fmt_units
from tokenhub.quota import UNLIMITED, Quota, Refusal, Reservation
from tokenhub.usage import UsageEvent

if TYPE_CHECKING:
    from tokenhub.billing.leasing import WantLink

log = logging.getLogger("tokenhub.contracts")

EPOCH_ACCOUNT = "meta:epoch"  # its requests limit: the table's epoch
READY_ACCOUNT = "meta:contracts"  # its requests limit: 1 once worker 1 has published the pots
TRANCHE = 1024  # output tokens a stream reserves at a time
POLL_S = 0.01  # cluster mode: how often a request waiting for a lease looks at the pool again
RESEND_S = 0.2  # cluster mode: how often it sends its want again (a full socket drops one)


@dataclass(slots=True)
class Draw:
    """What a hold reserved on one pot, priced by `rule` (for charging the actual usage)."""

    pot: str
    rule: Rule
    amount: int  # reserved, in the pot's unit
    res: Reservation | None = None


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why the contracts cannot pay: for the 429's message."""

    tenant: str
    needed: str  # what the uncovered part costs, or the tokens
    left: str  # what the pots have left

    @property
    def message(self) -> str:
        return (
            f"You exceeded your current quota: tenant {self.tenant}'s contracts cannot pay for "
            f"this request (it needs up to {self.needed} more; {self.left}). Top up the wallet, "
            "buy a package or lower max_tokens."
        )


class NotReady(Exception):
    """Worker 1 has not published the pots yet (the server is starting)."""


# -- planning: the draw order (tokenhub.billing.draw) over the pots ---------------------------


def _avail(quota: Quota, pot: str) -> int:
    """What a published pot has free; an unpublished one (not synced yet) has nothing."""
    index = quota.table.find_account(pot)
    if index is None:
        return 0
    free = quota.table.available(index, pot_dim(pot))
    return 0 if free == UNLIMITED else free


def plan(
    terms: Terms,
    tenant: str,
    model: str,
    ts_ms: int,
    lines: Sequence[int],
    avail: Callable[[str], int],
) -> Outcome:
    """The draw order over the tenant's pots, each up to `avail(pot)`: the same function
    settlement posts with (`tokenhub.billing.draw.draw`)."""
    return draw(
        terms.profile(tenant),
        terms.lots.get(tenant, ()),
        terms.price(model, tenant, ts_ms),
        lambda b, q: terms.rate(b, q, ts_ms),
        model,
        ts_ms,
        lines,
        avail,
    )


def holds(outcome: Outcome) -> list[Draw]:
    """What admission reserves for a paid outcome: each pot's draws in order, one entry per
    (pot, rule). A top-up's block is held on the money pot at the lot's unit price; the tokens
    drawn from that block are not held on the lot (its pot does not have them yet)."""
    out: list[Draw] = []
    for d in outcome.draws:
        if not d.held or (not d.amount and d.source != "package"):
            continue
        mine = next((x for x in out if x.pot == d.pot and x.rule == d.rule), None)
        if mine is not None:
            mine.amount += d.amount
        else:
            out.append(Draw(d.pot, d.rule, d.amount))
    return out


def replay(draws: Sequence[Draw], lines: Sequence[int]) -> list[int]:
    """What each draw is charged for the actual `lines`: the draws fill in order, each up to
    what it reserved; usage beyond every reservation goes to the last draw (an overrun the
    table records, and the ledger posts as it finds it). `lines` as `draw.draw` takes them (3
    from an older peer: no cache writes)."""
    rest = four(lines)
    out = [0] * len(draws)
    for i, d in enumerate(draws):
        if not sum(rest):
            break
        n, out[i] = d.rule.afford(rest, d.amount)
        take_lines(rest, n)
    if sum(rest) and draws:
        last = len(draws) - 1
        out[last] += draws[last].rule.cost(rest)
    return out


# -- the request's hold ----------------------------------------------------------------------


class Hold:
    """One request's reservations on its tenant's pots (`Contracts.admit`)."""

    __slots__ = ("contracts", "draws", "lines", "model", "tenant", "ts_ms", "ttl_ms")

    def __init__(
        self,
        contracts: Contracts,
        tenant: str,
        model: str,
        ts_ms: int,
        lines: list[int],
        ttl_ms: int,
    ) -> None:
        self.contracts = contracts
        self.tenant = tenant
        self.model = model
        self.ts_ms = ts_ms
        self.lines = four(lines)  # reserved: [uncached input, cached input, output, writes]
        self.ttl_ms = ttl_ms
        self.draws: list[Draw] = []

    @property
    def output_reserved(self) -> int:
        return self.lines[2]

    def extend(self, tokens: int) -> bool:
        """Reserves `tokens` more output (a stream's next tranche), all or nothing as far as
        the client can tell: False when the contracts cannot pay for them. Parts taken before
        a refusal stay on the hold and are released when it settles."""
        c = self.contracts
        more = [0, 0, tokens, 0]
        outcome = plan(c.terms, self.tenant, self.model, self.ts_ms, more, c.available)
        if not outcome.paid:
            return False
        for d in holds(outcome):
            mine = next((x for x in self.draws if x.pot == d.pot and x.rule == d.rule), None)
            if mine is not None and mine.res is not None:
                extra = {pot_dim(d.pot): d.amount}
                if c.quota.extend(mine.res, **extra, ttl_ms=self.ttl_ms) is not None:
                    return False
                mine.amount += d.amount
            else:
                d.res = c.reserve(d.pot, d.amount, self.ttl_ms)
                if d.res is None:
                    return False
                self.draws.append(d)
        self.lines[2] += tokens
        return True

    async def extend_wait(self, tokens: int, need: int) -> bool:
        """Cluster mode: `extend(tokens)` or at least `extend(need)` once the host's agent has
        leased more, waiting up to `[cluster] acquire_wait_ms`; False on one host (nothing to
        wait for) or when no lease came."""
        link = self.contracts.cluster
        if link is None:
            return False
        return await _waiting(
            link,
            self.tenant,
            self.model,
            self.ts_ms,
            [0, 0, tokens, 0],
            lambda: self.extend(tokens) or self.extend(need),
        )

    def settle(self, lines: Sequence[int]) -> str:
        """Charges the actual usage and releases the rest; returns `UsageEvent.holds`."""
        charged = replay(self.draws, lines)
        parts: list[str] = []
        for d, amount in zip(self.draws, charged, strict=True):
            if d.res is None:
                continue
            try:
                if pot_dim(d.pot) == "tokens":
                    self.contracts.quota.settle(d.res, tokens=amount, requests=0)
                else:
                    self.contracts.quota.settle(d.res, tokens=0, money=amount, requests=0)
            except Exception:
                log.exception("settling pot %s failed", d.pot)
                continue
            if amount:
                parts.append(f"{d.pot}={amount}")
        return f"{self.contracts.tag}|{';'.join(parts)}" if parts else ""

    def cancel(self) -> None:
        for d in self.draws:
            if d.res is not None:
                self.contracts.quota.cancel(d.res)


class Contracts:
    """Admission against the tenants' contracts for one worker; the pot sync runs in the
    settling worker only (`PotSync`). The terms (prices, FX, lots, profiles) are a snapshot
    reloaded when their change marker moves (`tokenhub.billing.terms.TermsCache`)."""

    def __init__(
        self,
        quota: Quota,
        db: Database,
        *,
        refresh_s: float = 0.5,
        cluster: WantLink | None = None,
    ) -> None:
        self.quota = quota
        self.db = db
        self.refresh_s = refresh_s
        self.cache = TermsCache(db, refresh_s=refresh_s)
        self.cache.on_change(self._changed)
        self.epoch = quota.limits(EPOCH_ACCOUNT)["requests"] or 0
        # Cluster mode: the line to this host's lease agent; holds carry its instance.
        self.cluster = cluster
        self.tag = f"@{cluster.instance}" if cluster is not None else str(self.epoch)
        self._ready = False
        # The fast path's first pot per (tenant, model) under the current terms: (pot, rule,
        # until_ms), the pot the draw order reaches first, usable until its lot ends.
        self._first: dict[tuple[str, str], tuple[str, Rule, int | None]] = {}
        self._published: set[str] = set()

    def _changed(self, terms: Terms) -> None:
        self._first = {}

    @property
    def terms(self) -> Terms:
        return self.cache.terms

    @terms.setter
    def terms(self, terms: Terms) -> None:
        self.cache._set(terms)

    async def start(self) -> None:
        await self.cache.start()

    async def close(self) -> None:
        await self.cache.close()

    def available(self, pot: str) -> int:
        return _avail(self.quota, pot)

    def reserve(self, pot: str, amount: int, ttl_ms: int) -> Reservation | None:
        r = self.quota.reserve(
            pot, requests=0, concurrent=False, ttl_ms=ttl_ms, **{pot_dim(pot): amount}
        )
        return None if isinstance(r, Refusal) else r

    def ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.quota.limits(READY_ACCOUNT)["requests"])
        return self._ready

    def admit(
        self, tenant: str, model: str, ts_ms: int, lines: list[int], ttl_ms: int
    ) -> Hold | Shortfall:
        """Reserves `lines` (the worst case) on the tenant's pots, all or nothing: what the
        draw order takes from each pot when nothing overruns. Raises NotReady before the pots
        are published, NotPriced for usage only money can pay of a model without a price (or
        an FX rate)."""
        if not self.ready():
            raise NotReady
        given = four(lines)  # what the hold says it reserved (the 499 cap reads it)
        lines = self.worst(tenant, model, ts_ms, given)
        hold = self._admit_first(tenant, model, ts_ms, lines, given, ttl_ms)
        if hold is not None:
            return hold
        outcome = plan(self.terms, tenant, model, ts_ms, lines, self.available)
        for _ in range(3):  # a concurrent request can take a pot between plan and reserve
            if not outcome.paid:
                return self._shortfall(tenant, model, ts_ms, outcome)
            hold = Hold(self, tenant, model, ts_ms, list(given), ttl_ms)
            for d in holds(outcome):
                d.res = self.reserve(d.pot, d.amount, ttl_ms)
                if d.res is None:
                    hold.cancel()
                    break
                hold.draws.append(d)
            else:
                return hold
            outcome = plan(self.terms, tenant, model, ts_ms, lines, self.available)
        return self._shortfall(tenant, model, ts_ms, outcome)

    async def acquire(
        self, tenant: str, model: str, ts_ms: int, lines: list[int], ttl_ms: int
    ) -> Hold | Shortfall:
        """Cluster mode, after `admit` found the pool short: asks the host's lease agent for
        more and admits again every POLL_S until admitted, the agent could not lease enough,
        or `[cluster] acquire_wait_ms` passed (the last Shortfall). On one host: `admit`."""
        got: Hold | Shortfall | None = None

        def again() -> bool:
            nonlocal got
            got = self.admit(tenant, model, ts_ms, lines, ttl_ms)
            return isinstance(got, Hold)

        want = self.worst(tenant, model, ts_ms, lines)
        if self.cluster is None or not await _waiting(
            self.cluster, tenant, model, ts_ms, want, again
        ):
            return self.admit(tenant, model, ts_ms, lines, ttl_ms) if got is None else got
        assert isinstance(got, Hold)
        return got

    def worst(self, tenant: str, model: str, ts_ms: int, lines: Sequence[int]) -> list[int]:
        """`lines` with the uncached input moved to the cache-write line when the tenant's
        price of the model writes dearer than it inputs: the reservation then covers a prompt
        the provider writes to its cache whole (a prompt split over the input lines costs no
        more: `tokenhub.billing.draw.TAKE_ORDER`)."""
        out = four(lines)
        if out[0]:
            price = self.terms.price(model, tenant, ts_ms)
            if price is not None and price.write_per_1m > price.input_per_1m:
                out = [0, out[1], out[2], out[3] + out[0]]
        return out

    def _admit_first(
        self,
        tenant: str,
        model: str,
        ts_ms: int,
        lines: list[int],
        given: list[int],
        ttl_ms: int,
    ) -> Hold | None:
        """The usual case in one reservation: the first pot of the draw order pays for all of
        it (then the draw order takes it all from that pot). The reservation itself is the
        check (it is refused, with no side effect, when the pot cannot pay), so nothing is
        read first. None: not so, plan it in full."""
        key = (tenant, model)
        first = self._first.get(key)
        if first is None:
            # Every line priced, so a money rule carries its FX rate whatever the lines.
            probe = [1_000_000] * LINES
            try:
                outcome = plan(self.terms, tenant, model, ts_ms, probe, lambda pot: 1 << 62)
            except NotPriced:
                return None
            d = outcome.draws[0] if outcome.draws else None
            if d is None or d.source in ("overrun", "topup") or not d.held:
                return None
            lot_end = d.lot.end_ms if d.lot is not None and d.source != "overage" else None
            first = self._first[key] = (d.pot, d.rule, lot_end)
        pot, rule, until = first
        if until is not None and ts_ms >= until:
            return None
        if pot not in self._published:
            # An account the table does not have yet would be made, unlimited, by a reserve.
            if self.quota.table.find_account(pot) is None:
                return None
            self._published.add(pot)
        amount = rule.cost(lines)
        res = self.reserve(pot, amount, ttl_ms)
        if res is None:
            return None
        hold = Hold(self, tenant, model, ts_ms, list(given), ttl_ms)
        hold.draws.append(Draw(pot, rule, amount, res))
        return hold

    def _shortfall(self, tenant: str, model: str, ts_ms: int, outcome: Outcome) -> Shortfall:
        prof = self.terms.profile(tenant)
        unpaid = [d for d in outcome.draws if d.unpaid]
        tokens = sum(outcome.rest) + sum(sum(d.tokens) for d in unpaid)
        uncovered = f"{tokens:,} tokens"
        if unpaid:
            money = fmt(outcome.overrun, prof.currency, exact=True)
            uncovered = f"{money} ({tokens:,} tokens)"
        parts: list[str] = []
        lots = self.terms.lots.get(tenant, ())
        if any(x.kind == "package" for x in lots):
            pkg = sum(
                self.available(lot_pot(x))
                for x in lots
                if x.kind == "package" and x.covers(model, ts_ms)
            )
            parts.append(f"package tokens left {pkg:,}")
        pts = [x for x in lots if x.kind == "points"]
        if pts:
            left = sum(self.available(lot_pot(x)) for x in pts)
            parts.append(f"points left {fmt_units(left, 'POINTS')}")
        if any(s in ("wallet", "postpaid") for s in prof.draw_order):
            money_left = self.available(money_pot(tenant))
            parts.append(f"wallet and credit left {fmt(money_left, prof.currency, exact=True)}")
        if not parts:
            parts.append("no package, points, wallet or credit line")
        return Shortfall(tenant, uncovered, ", ".join(parts))


async def _waiting(
    link: WantLink,
    tenant: str,
    model: str,
    ts_ms: int,
    lines: Sequence[int],
    again: Callable[[], bool],
) -> bool:
    """Sends a want and calls `again` every POLL_S until it succeeds (True), the agent
    refused the want, or the wait is over (False). The want goes again every RESEND_S."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + link.wait_s
    first = want = link.send(tenant, model, ts_ms, lines)
    resend = start + RESEND_S
    while True:
        await asyncio.sleep(POLL_S)
        if again():
            return True
        now = loop.time()
        if now >= end or link.refused(tenant, want):
            return False
        if now >= resend:
            want = link.send(tenant, model, ts_ms, lines, first)
            resend = now + RESEND_S


# -- keeping the pots equal to the ledger (the settling worker) ------------------------------


def new_epoch(quota: Quota) -> int:
    """Draws the table's epoch (its creator does, once)."""
    epoch = int.from_bytes(os.urandom(6), "big") or 1
    quota.set_limits(EPOCH_ACCOUNT, requests=epoch)
    return epoch


async def _ledger_pots(tx: Tx, tenants: Sequence[str] | None) -> dict[str, int]:
    """Each pot's available balance in the ledger (for `tenants`, or every tenant with a
    profile or a balance)."""
    where: str = ""
    args: tuple[str, ...] = ()
    if tenants is not None:
        marks = ",".join(f"${i + 1}" for i in range(len(tenants)))
        where, args = f" AND tenant IN ({marks})", tuple(tenants)
    bal: dict[str, int] = {}
    names: set[str] = set(tenants or ())
    for acc, tenant, b in await tx.fetch(
        "SELECT id, tenant, balance FROM accounts "
        "WHERE kind IN ('wallet', 'receivable', 'lot')" + where,
        *args,
    ):
        bal[acc] = int(b)
        names.add(tenant)
    out: dict[str, int] = {}
    for r in await tx.fetch(f"SELECT {LOT_COLS} FROM lots WHERE status = 'active'{where}", *args):
        lot = lot_from_row(r)
        out[lot_pot(lot)] = max(0, -bal.get(f"t:{lot.tenant}:lot:{lot.id}", 0))
    profiles: dict[str, Profile] = {}
    for row in await tx.fetch(
        f"SELECT {PROFILE_COLS} FROM billing_profiles WHERE 1 = 1" + where, *args
    ):
        profiles[row[0]] = profile_from_row(row)
        names.add(row[0])
    for t in names:
        prof = profiles.get(t) or Profile(t)
        cur = prof.currency
        money = 0
        if "wallet" in prof.draw_order:
            money += max(0, -bal.get(f"t:{t}:wallet:{cur}", 0))
        if "postpaid" in prof.draw_order:
            money += max(0, prof.credit_limit - bal.get(f"t:{t}:receivable:{cur}", 0))
        out[money_pot(t)] = money
    return out


class PotSync:
    """Sets the pots from the ledger and gives back what settled events charged. One per
    server, in the process that settles (see the module docstring for the order of steps)."""

    def __init__(self, quota: Quota, db: Database) -> None:
        self.quota = quota
        self.db = db
        self.epoch = quota.limits(EPOCH_ACCOUNT)["requests"] or 0
        self._known: set[str] = set()  # pots published by this process

    async def publish(self, tenants: Sequence[str] | None = None) -> int:
        """Sets pot limits from the ledger (for `tenants`, or every pot); returns how many."""
        pots = await self.db.transaction(lambda tx: _ledger_pots(tx, tenants))
        if tenants is None:
            for gone in self._known - pots.keys():  # expired lots, deleted tenants
                pots[gone] = 0
        for pot, avail in pots.items():
            self.quota.set_limits(pot, **{pot_dim(pot): avail})
        self._known |= pots.keys()
        return len(pots)

    def release(self, events: Iterable[UsageEvent]) -> int:
        """Gives back what these (now posted) events charged; returns how much."""
        total = 0
        prefix = f"{self.epoch}|"
        for ev in events:
            if not ev.holds.startswith(prefix):
                continue  # nothing held, or held in an older table
            for part in ev.holds[len(prefix) :].split(";"):
                pot, _, amount = part.rpartition("=")
                if pot and amount.isdigit():
                    total += self.quota.release_used(pot, pot_dim(pot), int(amount))
        return total

    async def after_batch(self, events: Sequence[UsageEvent], settled: Iterable[str]) -> None:
        done = set(settled)
        posted = [e for e in events if e.request_id in done]
        if not posted:
            return
        await self.publish(sorted({e.tenant for e in posted}))
        self.release(posted)

    async def after_pass(self) -> None:
        await self.publish()
        self.quota.set_limits(READY_ACCOUNT, requests=1)


def now_ms() -> int:
    return int(time.time() * 1000)


__all__ = [
    "TRANCHE",
    "Contracts",
    "Draw",
    "Hold",
    "NotPriced",
    "NotReady",
    "PotSync",
    "Rule",
    "Shortfall",
    "Terms",
    "holds",
    "load_terms",
    "new_epoch",
    "plan",
    "replay",
]
