"""Settling the gateway's usage events: read what is not settled yet, settle it in batches.

`settle_pending` is one pass (what `tokenhub billing settle` runs); `follow` repeats it every
few seconds; `run_daemon` is the settle daemon around it (signals, the money pots, the parent
watch, a last pass), which `python -m tokenhub.billing.settler` runs: `tokenhub serve` starts
it as a process of its own when `[billing] settle_interval_s` is set, as the demo does
(tokenhub.runtime.settler_proc), and `tokenhub billing settle --follow` runs the same loop in
the foreground.

Pending events are found through the partial index `usage_events_pending` (ts_ms, request_id)
WHERE settled_ms IS NULL, which holds only the unsettled ones, read in export order with a
keyset cursor: a pass costs what is pending, not the whole history (benches/
bench_settler_idle.py: flat from 10k to 10M recorded events). After a batch commits, its events
are marked (`settled_ms`), which takes them out of the index. An event that cannot be settled
(no price yet, no FX rate) stays unsettled, is recorded in `settlement_failures` with its reason
and attempt count, and is skipped by later passes until `retry_failed`. Settling is idempotent,
so two settlers running at once (two replicas) cannot double-bill: the second one's batch finds
the events settled and posts nothing; an event settled and not yet marked (a crash in between)
is read once more, found settled, and marked.

Locks: pending events are read in a read-only transaction (`Database.read`: on SQLite a WAL
snapshot without the write lock), and each write transaction is one batch: a settler that
stalls (SIGSTOP, a slow pass) between them holds no lock the gateway's usage writes wait for.

Quarantine: no event can block the settlement of another. An event whose settlement cannot
succeed as it is (counts out of bounds, an amount beyond the ledger's range, an unexpected
error: `tokenhub.billing.service.Quarantine`) is recorded in `settlement_failures` with
`quarantined` set and skipped even by `retry_failed`; `tokenhub billing check` names it, and
`tokenhub billing quarantine` lists, releases (settle it again) or voids it (never billed:
settled with no charge, recorded in the audit log).

Partitions (several hosts, one PostgreSQL): with `partitions` N, tenants fall into N partitions
(`partition_of`: the first 28 bits of md5(tenant) mod N, the same in SQL and Python) and a
settler settles only the events of the partitions it holds (`PartitionLocks`): session
advisory locks (`pg_try_advisory_lock`) on a connection of its own, so a settler that dies
(kill -9, its host gone) loses its session and its locks with it, and the others take its
partitions on their next pass. Each settler also holds a member lock, so that all can count
the live settlers and hold about N / settlers partitions each: one that holds more than its
share gives the extra ones back before a pass, one that holds fewer takes free ones. Every
settler must be given the same N. A partition briefly held twice (a lock connection lost
mid-pass) costs nothing: settling is idempotent. On SQLite there is one settler and
partitions change nothing.

The partition is a filter on the rows the pending index yields, not a new index: the pass
still walks `usage_events_pending` in (ts_ms, request_id) order, reading the tenant of each
pending event (the heap row is read anyway) and skipping the partitions held elsewhere. A
pass so reads at most what is pending, never the settled history; a partial index per
partition would fix N in the schema, and the pending set is what every settler is draining.

Cluster mode (`cluster=True`: hosts lease budget slices, tokenhub.billing.leases): in the
transaction that settles a batch, after its postings, the charges of the events it settled
(their holds "@<instance>|pot=amount;...") are added to the pots' `posted` and the caps of the
batch's tenants' pots are set from the ledger as that transaction leaves it, so a pot equals
the ledger at every commit. After each pass the pots of every tenant of the held partitions
are set from the ledger (what changed it outside settlement; new tenants and lots get their
pots, an expired lot's pot cap 0), and the settler holding partition 0 (or all of them)
expires the leases past their time and writes off the instances silent past the write-off
window. Lock order: the tenants' ledger locks, then the pots in pot order. A voided event's
charges are posted too (cluster or not): they are final, and the ledger charges nothing.

Low-balance alerts (tokenhub.billing.alerts): after each pass, `alerts.check` compares every
alert (of the held partitions' tenants) with its tenant's spendable balance, in one query (an
empty table when no tenant has one: nothing per event), and fires or re-arms it in a
transaction of its own; the daemon also runs the webhook outbox's `DeliveryWorker` as a task
beside `follow`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tokenhub.billing import alerts, rollups
from tokenhub.billing import leases as LS
from tokenhub.billing.ledger import lock_tenants
from tokenhub.billing.service import Billing, BillingError, SettleResult, _payload_hash
from tokenhub.db.database import Database, Tx
from tokenhub.usage import EVENT_FIELDS, UsageEvent

log = logging.getLogger("tokenhub.billing")

CONFLICT = "settled before with a different payload (conflict)"
_EVENT_COLS = ", ".join(f"e.{f}" for f in EVENT_FIELDS)
_STREAM = EVENT_FIELDS.index("stream")
# Called after each committed batch: (its events, the ids settled by it).
OnBatch = Callable[[Sequence[UsageEvent], Iterable[str]], Awaitable[None]]
MAX_PARTITIONS = 1024
# Advisory lock keys (two int4 each): (_PARTITION_LOCK, partition) and (_MEMBER_LOCK, pid).
_PARTITION_LOCK = 0x746B6801  # "tkh" 1
_MEMBER_LOCK = 0x746B6802
# The tenant's partition in SQL; `partition_of` is the same in Python.
_PARTITION_SQL = "mod(('x' || substr(md5(e.tenant), 1, 7))::bit(28)::int, {n})"


def partition_of(tenant: str, partitions: int) -> int:
    """The partition of `tenant` among `partitions` (what the pending query computes in SQL)."""
    return int(hashlib.md5(tenant.encode()).hexdigest()[:7], 16) % partitions


class PartitionLocks:
    """The tenant partitions this settler holds, as PostgreSQL session advisory locks on a
    connection of its own (see the module docstring). `acquire` before each pass: it
    (re)connects, counts the live settlers, gives back what is beyond this one's share and
    takes free partitions up to it; the held partitions, () when the database is out of
    reach (the pass then settles nothing, the next one tries again)."""

    def __init__(self, url: str, partitions: int) -> None:
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be from 1 to {MAX_PARTITIONS}")
        self.url = url
        self.partitions = partitions
        self.held: set[int] = set()
        self._conn: Any = None

    async def _connect(self) -> Any:
        import asyncpg  # type: ignore[import-untyped]

        from tokenhub.db.database import CONNECT_TIMEOUT_S, pg_session_settings, tune_pg_socket

        # Keepalives: a settler cut off by a partition loses its locks within about 25 s, and
        # the other settlers take its partitions over.
        settings = {**pg_session_settings(), "application_name": f"tokenhub-settler {os.getpid()}"}
        conn = await asyncpg.connect(self.url, server_settings=settings, timeout=CONNECT_TIMEOUT_S)
        tune_pg_socket(conn)
        await conn.execute(f"SELECT pg_advisory_lock({_MEMBER_LOCK}, pg_backend_pid())")
        return conn

    async def acquire(self) -> tuple[int, ...]:
        try:
            if self._conn is None or self._conn.is_closed():
                self.held.clear()
                self._conn = await self._connect()
            conn = self._conn
            members = await conn.fetchval(
                "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' "
                f"AND classid = {_MEMBER_LOCK} AND objsubid = 2 AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            share = -(-self.partitions // max(1, int(members)))
            for p in sorted(self.held, reverse=True)[: max(0, len(self.held) - share)]:
                await conn.execute(f"SELECT pg_advisory_unlock({_PARTITION_LOCK}, $1)", p)
                self.held.discard(p)
            for p in range(self.partitions):
                if len(self.held) >= share:
                    break
                if p not in self.held and await conn.fetchval(
                    f"SELECT pg_try_advisory_lock({_PARTITION_LOCK}, $1)", p
                ):
                    self.held.add(p)
        except Exception:
            log.exception("settler partitions: cannot take locks; retrying next pass")
            await self.close()
            return ()
        return tuple(sorted(self.held))

    async def close(self) -> None:
        """Gives every partition back (the session ends)."""
        conn, self._conn = self._conn, None
        self.held.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)


@dataclass
class SettleSummary:
    read: int = 0
    settled: int = 0
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)
    failed: int = 0
    quarantined: int = 0  # of the failed: set aside until released or voided
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    elapsed_s: float = 0.0
    # Cluster mode (tokenhub.billing.leases): hosts' charges posted to the pots, pot caps
    # written, leases expired, instances written off.
    posted: int = 0
    caps: int = 0
    expired: int = 0
    written_off: list[str] = field(default_factory=list)
    # Low-balance alerts (tokenhub.billing.alerts) after the pass: webhooks queued, re-armed.
    alerts_fired: int = 0
    alerts_rearmed: int = 0


def event_from_row(row: Sequence[Any]) -> UsageEvent:
    """A usage_events row (columns in EVENT_FIELDS order) as the UsageEvent the gateway wrote
    (SQLite returns 0/1 for a boolean). Settlement hashes every field, so an event read back
    hashes as the one written."""
    fields = dict(zip(EVENT_FIELDS, row, strict=True))
    fields["stream"] = bool(row[_STREAM])
    return UsageEvent(**fields)


def reason_kind(reason: str) -> str:
    """A failure reason without the event's own time, so that failures group by cause."""
    return re.sub(r" at -?\d+\b", "", reason)


async def _fetch(tx: Tx, *, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    return await tx.fetch(sql, *args)


async def _mark_settled(tx: Tx, *, ids: list[str], now: int) -> None:
    """Takes settled events out of the pending index."""
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join(f"${j + 2}" for j in range(len(chunk)))
        await tx.execute(
            f"UPDATE usage_events SET settled_ms = $1 WHERE request_id IN ({marks})", now, *chunk
        )


async def _record(
    tx: Tx,
    *,
    failed: list[tuple[str, str]],
    cleared: list[str],
    settled: Sequence[str] = (),
    quarantined: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Upserts this batch's failures (the `quarantined` ones set aside); forgets the earlier
    failures of events now settled; marks the settled events (`settled_ms`)."""
    now = int(time.time() * 1000)
    await _mark_settled(tx, ids=list(settled), now=now)
    if failed:
        await tx.executemany(
            "INSERT INTO settlement_failures (event_id, reason, attempts, last_ms, quarantined) "
            "VALUES ($1, $2, 1, $3, $4) ON CONFLICT (event_id) DO UPDATE SET "
            "reason = excluded.reason, attempts = settlement_failures.attempts + 1, "
            "last_ms = excluded.last_ms, quarantined = excluded.quarantined",
            [(eid, reason, now, eid in quarantined) for eid, reason in failed],
        )
    for i in range(0, len(cleared), 500):
        chunk = cleared[i : i + 500]
        marks = ",".join(f"${j + 1}" for j in range(len(chunk)))
        await tx.execute(f"DELETE FROM settlement_failures WHERE event_id IN ({marks})", *chunk)


async def settle_pending(
    billing: Billing,
    *,
    batch: int = 1000,
    retry_failed: bool = False,
    progress: Callable[[SettleSummary], None] | None = None,
    on_batch: OnBatch | None = None,
    partitions: tuple[int, Sequence[int]] | None = None,
    cluster: bool = False,
    write_off_ms: int = LS.WRITE_OFF_MS,
) -> SettleSummary:
    """One pass over the unsettled usage events (see the module docstring). `on_batch` runs
    after each committed batch with its events and the ids settled now (the gateway's
    admission gives back what they held: tokenhub.billing.pots). `partitions` (N, held): on
    PostgreSQL, only the events of tenants in the held partitions of N (none held: nothing);
    ignored on SQLite. `cluster`: also keep the lease coordinator's pots equal to the ledger
    (see "Cluster mode" in the module docstring), writing off instances silent for more than
    `write_off_ms`."""
    db = billing.db
    out = SettleSummary()
    held: list[int] | None = None
    if partitions is not None and db.dialect == "postgresql":
        held = sorted(set(partitions[1]))
        if not held:
            return out
        if len(held) >= partitions[0]:
            held = None  # every partition: no filter
    # Quarantined events wait for `tokenhub billing quarantine release` even under
    # retry_failed: retrying them as they are cannot succeed.
    skip_failed = (
        " AND NOT EXISTS (SELECT 1 FROM settlement_failures f WHERE f.event_id = e.request_id"
        f"{' AND f.quarantined' if retry_failed else ''})"
    )
    # `settled_ms IS NULL` word for word as the partial index's predicate, so that SQLite's
    # planner (which matches the terms) uses it.
    first = f"SELECT {_EVENT_COLS} FROM usage_events e WHERE e.settled_ms IS NULL{skip_failed}"
    after = f"{first} AND (e.ts_ms > $2 OR (e.ts_ms = $2 AND e.request_id > $3))"
    order = " ORDER BY e.ts_ms, e.request_id LIMIT $1"
    first_args: tuple[Any, ...] = ()
    after_args: tuple[Any, ...] = ()
    if held is not None and partitions is not None:
        # Applied to the rows the pending index yields (see the module docstring).
        part = _PARTITION_SQL.format(n=int(partitions[0]))
        first, after = (
            f"{first} AND {part} = ANY($2::int[])",
            f"{after} AND {part} = ANY($4::int[])",
        )
        first_args = after_args = (held,)
    also = partial(_post_cluster, out=out) if cluster else None
    cursor: tuple[int, str] | None = None
    started = time.monotonic()
    while True:
        if cursor is None:
            rows = await db.read(partial(_fetch, sql=first + order, args=(batch, *first_args)))
        else:
            rows = await db.read(
                partial(_fetch, sql=after + order, args=(batch, *cursor, *after_args))
            )
        if not rows:
            break
        events = [event_from_row(r) for r in rows]
        cursor = (events[-1].ts_ms, events[-1].request_id)
        res = await billing.settle(events, also=also)
        if on_batch is not None:
            await on_batch(events, res.txn_ids)
        out.read += len(events)
        out.settled += res.settled
        out.duplicates += res.duplicates
        out.conflicts += res.conflicts
        bad = res.failed + [(eid, CONFLICT) for eid in res.conflicts]
        out.failed += len(res.failed)
        out.quarantined += len(res.quarantined)
        out.reasons.update(reason_kind(r) for _, r in bad)
        cleared = list(res.txn_ids) if retry_failed else []
        unsettled = {eid for eid, _ in bad}
        settled = [e.request_id for e in events if e.request_id not in unsettled]
        if bad or cleared or settled:
            await db.transaction(
                partial(
                    _record,
                    failed=bad,
                    cleared=cleared,
                    settled=settled,
                    quarantined=res.quarantined,
                )
            )
        out.elapsed_s = time.monotonic() - started
        if progress is not None:
            progress(out)
        if len(rows) < batch:
            break
    if cluster:
        await _cluster_pass(db, out, partitions, held, write_off_ms)
    await _check_alerts(db, out, partitions, held)
    out.elapsed_s = time.monotonic() - started
    return out


async def _check_alerts(
    db: Database,
    out: SettleSummary,
    partitions: tuple[int, Sequence[int]] | None,
    held: list[int] | None,
) -> None:
    """After a pass: the low-balance alerts (tokenhub.billing.alerts; one query, nothing per
    event), of the held partitions' tenants. A failure is logged, never the pass's: the
    alerts are checked again after the next one."""
    mine = None
    if held is not None and partitions is not None:
        n, own = partitions[0], set(held)
        mine = lambda tenant: partition_of(tenant, n) in own  # noqa: E731
    try:
        res = await alerts.check(db, mine=mine)
    except Exception:
        log.exception("low-balance alerts: check failed; retrying after the next pass")
        return
    out.alerts_fired += res.fired
    out.alerts_rearmed += res.rearmed


# -- cluster mode: the lease coordinator's pots (tokenhub.billing.leases) ---------------------


async def _ledger_caps(tx: Tx, tenants: Sequence[str]) -> dict[str, tuple[str, str, int]]:
    """The caps of these tenants' pots from the ledger (pot -> (tenant, unit, cap)), as the
    gateway's money admission reads them (tokenhub.billing.pots)."""
    from tokenhub.billing.draw import pot_dim
    from tokenhub.billing.pots import _ledger_pots

    if not tenants:
        return {}
    avail = await _ledger_pots(tx, tenants)
    lot_tenant: dict[str, str] = {}
    if any(not pot.startswith("pot:m:") for pot in avail):
        marks = ",".join(f"${i + 1}" for i in range(len(tenants)))
        lot_tenant = dict(
            await tx.fetch(f"SELECT id, tenant FROM lots WHERE tenant IN ({marks})", *tenants)
        )
    caps: dict[str, tuple[str, str, int]] = {}
    for pot, cap in avail.items():
        tenant = pot[6:] if pot.startswith("pot:m:") else lot_tenant.get(pot[6:])
        if tenant is not None:
            caps[pot] = (tenant, pot_dim(pot), cap)
    return caps


async def _post_cluster(
    tx: Tx, events: list[UsageEvent], res: SettleResult, *, out: SettleSummary
) -> None:
    """In the transaction that settles `events`, after their postings: adds the cluster
    charges of the events it settled (their holds, "@<instance>|pot=amount;...", whatever
    their status: a hold charges what the request used, 0 for a failed one) to the pots'
    `posted`, and sets their tenants' pot caps from the ledger as it now stands. The
    settlement holds the tenants' ledger locks, so the caps read are the commit's."""
    charges: list[tuple[str, str, int]] = []
    tenants: set[str] = set()
    seen: set[str] = set()
    for ev in events:
        if ev.request_id not in res.txn_ids or ev.request_id in seen:
            continue  # not settled by this transaction (a duplicate, a failure), or a repeat
        seen.add(ev.request_id)
        tenants.add(ev.tenant)
        parsed = LS.parse_holds(ev.holds)
        if parsed is not None:
            instance, parts = parsed
            charges += [(pot, instance, amount) for pot, amount in parts]
    if not tenants:
        return
    caps = await _ledger_caps(tx, sorted(tenants))
    await LS.lock_pots(tx, {pot for pot, _, _ in charges} | caps.keys())
    out.posted += await LS.post(tx, charges)
    out.caps += await LS.set_caps(tx, caps)


_TENANTS_SQL = (
    "SELECT tenant FROM accounts WHERE kind IN ('wallet', 'receivable', 'lot') "
    "UNION SELECT tenant FROM billing_profiles UNION SELECT tenant FROM budget_pots"
)
_CAPS_CHUNK = 200  # tenants per transaction of the pass's cap sync


async def _sync_caps(
    tx: Tx, *, tenants: Sequence[str], pots: Sequence[tuple[str, str, str]]
) -> int:
    """Sets the pots of `tenants` from the ledger under their ledger locks (the order a
    settlement takes them in): what the ledger names, created if new; `pots` (pot, tenant,
    unit) it no longer names (an expired lot) get cap 0."""
    await lock_tenants(tx, tenants)
    caps = await _ledger_caps(tx, tenants)
    for pot, tenant, unit in pots:
        caps.setdefault(pot, (tenant, unit, 0))
    return await LS.set_caps(tx, caps)


async def _cluster_pass(
    db: Database,
    out: SettleSummary,
    partitions: tuple[int, Sequence[int]] | None,
    held: list[int] | None,
    write_off_ms: int,
) -> None:
    """After a pass in cluster mode: every pot of the tenants of the held partitions (all
    when unpartitioned) set from the ledger, which picks up what changed it outside
    settlement (top-ups, purchases, credit limits, expiries) and creates the pots of new
    tenants and lots; then, by the settler that holds partition 0 (or every partition),
    expiry of the leases past their time and the write-off of silent instances."""
    tenants = sorted(t for (t,) in await db.read(partial(_fetch, sql=_TENANTS_SQL, args=())))
    pots = await db.read(partial(_fetch, sql="SELECT pot, tenant, unit FROM budget_pots", args=()))
    if held is not None and partitions is not None:
        mine = set(held)
        tenants = [t for t in tenants if partition_of(t, partitions[0]) in mine]
    by_tenant: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    for pot, tenant, unit in pots:
        by_tenant[tenant].append((pot, tenant, unit))
    for i in range(0, len(tenants), _CAPS_CHUNK):
        chunk = tenants[i : i + _CAPS_CHUNK]
        out.caps += await db.transaction(
            partial(_sync_caps, tenants=chunk, pots=[p for t in chunk for p in by_tenant[t]])
        )
    if held is None or 0 in held:
        out.expired += await db.transaction(LS.expire)
        out.written_off += await db.transaction(lambda tx: LS.write_off(tx, write_off_ms))


async def follow(
    billing: Billing,
    *,
    interval_s: float,
    stop: asyncio.Event,
    batch: int = 1000,
    on_batch: OnBatch | None = None,
    after_pass: Callable[[], Awaitable[None]] | None = None,
    locks: PartitionLocks | None = None,
    cluster: bool = False,
    write_off_ms: int = LS.WRITE_OFF_MS,
) -> None:
    """`settle_pending` every `interval_s` until `stop` is set, then `after_pass`; errors are
    logged and the next pass tries again (nothing is lost: unsettled events stay in
    usage_events). With `locks`, each pass first takes its partitions and settles only
    theirs. `cluster` and `write_off_ms`: as for `settle_pending`."""
    reported: set[str] = set()
    while not stop.is_set():
        try:
            s = await settle_pending(
                billing,
                batch=batch,
                on_batch=on_batch,
                partitions=await _held(locks),
                cluster=cluster,
                write_off_ms=write_off_ms,
            )
            if after_pass is not None:
                await after_pass()
            for reason in s.reasons:
                if reason not in reported:  # once per cause, not once per event
                    reported.add(reason)
                    log.warning("usage not settled: %s", reason)
        except Exception:
            log.exception("settlement pass failed; retrying in %.1f s", interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def _held(locks: PartitionLocks | None) -> tuple[int, Sequence[int]] | None:
    return None if locks is None else (locks.partitions, await locks.acquire())


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A settler started by a server stops (after a last pass) once that server is gone."""
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop.set()


async def run_daemon(
    billing: Billing,
    *,
    interval_s: float,
    batch: int = 1000,
    quota_path: str | None = None,
    parent: int | None = None,
    started: Callable[[], None] | None = None,
    partitions: int = 0,
    host_id: str = "",
    shared_dir: str = "",
    workers: int = 0,
    lease_ttl_s: float = 30.0,
    write_off_ms: int = LS.WRITE_OFF_MS,
) -> None:
    """The settle daemon: `follow` until SIGINT/SIGTERM (or until process `parent` is no
    longer this one's parent), then a last pass, so that what was served before the stop is
    billed. With `quota_path` it also keeps that quota table's money pots equal to the ledger
    (tokenhub.billing.pots.PotSync): what is pending is settled, and the pots published,
    before the first interval, since a gateway's money admission waits for them.
    QuotaFileError if `quota_path` is not a quota table; `started` is called once it is
    attached. `partitions` N > 0 on PostgreSQL: this settler shares the work with the others
    by tenant partition (`PartitionLocks`; the last pass settles the partitions still held);
    on SQLite it changes nothing.

    Cluster mode (`host_id` and `quota_path` on PostgreSQL): the table's pots hold what the
    host leased, so no PotSync; the host's lease agent (tokenhub.billing.leasing.LeaseAgent:
    its want socket and leaser.json in `shared_dir`, the replay marks of `workers` workers,
    leases of `lease_ttl_s`) runs here from after the first pass until after the last, when it
    gives every lease back; settlement posts the hosts' charges to the coordinator and
    writes off instances silent for `write_off_ms`."""
    from tokenhub.billing.leasing import LeaseAgent
    from tokenhub.billing.pots import PotSync
    from tokenhub.quota import Quota

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    quota = Quota.attach(quota_path) if quota_path else None
    cluster = bool(host_id) and quota is not None and billing.db.dialect == "postgresql"
    pots = PotSync(quota, billing.db) if quota is not None and not cluster else None
    agent = None
    if cluster:
        assert quota is not None
        agent = LeaseAgent(
            quota,
            billing.db,
            host=host_id,
            shared_dir=shared_dir or None,
            ttl_s=lease_ttl_s,
            workers=workers,
        )
    if started is not None:
        started()
    on_batch = pots.after_batch if pots is not None else None
    watch = asyncio.create_task(_watch_parent(parent, stop)) if parent else None
    url = getattr(billing.db, "url", "")
    locks = (
        PartitionLocks(url, partitions)
        if partitions and billing.db.dialect == "postgresql"
        else None
    )
    settle = partial(
        settle_pending,
        billing,
        batch=batch,
        on_batch=on_batch,
        cluster=cluster,
        write_off_ms=write_off_ms,
    )
    # The low-balance webhooks' outbox, delivered beside settlement, never in its way.
    webhooks = alerts.DeliveryWorker(billing.db)
    delivering = asyncio.create_task(webhooks.run(stop), name="tokenhub-webhooks")
    try:
        if quota is not None:
            await settle(partitions=await _held(locks))
            if pots is not None:
                await pots.after_pass()
            if agent is not None:
                await agent.start()
        await follow(
            billing,
            interval_s=interval_s,
            stop=stop,
            batch=batch,
            on_batch=on_batch,
            after_pass=pots.after_pass if pots is not None else None,
            locks=locks,
            cluster=cluster,
            write_off_ms=write_off_ms,
        )
        held = None if locks is None else (locks.partitions, tuple(sorted(locks.held)))
        await settle(partitions=held)
    finally:
        # An in-flight delivery is cut off: its row stays claimed until its timeout passes,
        # then the next settler sends it again (at least once).
        delivering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivering
        await webhooks.close()
        if agent is not None:
            await agent.close()
        if locks is not None:
            await locks.close()
        if watch is not None:
            watch.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tokenhub.billing.settler --interval S [--batch N] [--quota PATH]
    [--parent PID] [--partitions N] [--host-id H --shared-dir DIR [--workers N]
    [--lease-ttl S] [--write-off S]]`: the settle daemon on the database in $TOKENHUB_DB (in
    the environment, not on the command line, which any local user can read: a PostgreSQL
    URL may carry a password). Exit status 0 once stopped, 1 when it failed, 2 when refused
    as given."""
    import argparse
    import os
    import sys

    from tokenhub.config import host_id_problem
    from tokenhub.db.database import DatabaseError, open_database
    from tokenhub.quota import QuotaFileError
    from tokenhub.store import ENV_DB

    prog = "python -m tokenhub.billing.settler"
    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("--interval", type=float, required=True, metavar="SECONDS")
    parser.add_argument("--batch", type=int, default=1000, metavar="N")
    parser.add_argument("--quota", metavar="PATH", help="the quota table's money pots to keep")
    parser.add_argument("--parent", type=int, metavar="PID", help="stop when PID is gone")
    parser.add_argument(
        "--partitions",
        type=int,
        default=0,
        metavar="N",
        help="on PostgreSQL: share the work with the other settlers given the same N, by "
        "tenant partition (advisory locks); no-op on SQLite",
    )
    parser.add_argument(
        "--host-id",
        default="",
        metavar="ID",
        help="cluster mode (with --quota, on PostgreSQL): run this host's lease agent",
    )
    parser.add_argument(
        "--shared-dir", default="", metavar="DIR", help="the server's dir for want.sock"
    )
    parser.add_argument(
        "--workers", type=int, default=0, metavar="N", help="workers whose replay to await"
    )
    parser.add_argument("--lease-ttl", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument(
        "--write-off", type=float, default=LS.WRITE_OFF_MS / 1000, metavar="SECONDS"
    )
    args = parser.parse_args(argv)  # exits 2 on a bad option
    url = os.environ.get(ENV_DB)
    if (
        not url
        or args.interval <= 0
        or not 1 <= args.batch <= 100_000
        or not 0 <= args.partitions <= MAX_PARTITIONS
        or not 0 <= args.workers <= 1024
        or not 1 <= args.lease_ttl <= 3600
        or args.write_off <= 0
        or (args.host_id and host_id_problem(args.host_id) is not None)
    ):
        print(f"{prog}: error: needs ${ENV_DB}, --interval > 0, --batch 1..100000, "
              f"--partitions 0..{MAX_PARTITIONS}, --workers 0..1024, --lease-ttl 1..3600, "
              "--write-off > 0 and a valid --host-id", file=sys.stderr)  # fmt: skip
        return 2

    async def run() -> None:
        db = await open_database(url)
        try:
            await run_daemon(
                Billing(db),
                interval_s=args.interval,
                batch=args.batch,
                quota_path=args.quota,
                parent=args.parent,
                partitions=args.partitions,
                host_id=args.host_id,
                shared_dir=args.shared_dir,
                workers=args.workers,
                lease_ttl_s=args.lease_ttl,
                write_off_ms=int(args.write_off * 1000),
            )
        finally:
            await db.close()

    try:
        asyncio.run(run())
    except QuotaFileError as e:
        print(f"{prog}: error: --quota: {e}", file=sys.stderr)
        return 2
    except DatabaseError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


# -- quarantine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Quarantined:
    event_id: str
    tenant: str  # "" when the event itself is gone
    model: str
    ts_ms: int
    reason: str
    attempts: int
    last_ms: int


async def quarantined(tx: Tx, ids: Sequence[str] = ()) -> list[Quarantined]:
    """The quarantined events (those of `ids`, when given), oldest failure first."""
    sql = (
        "SELECT f.event_id, e.tenant, e.model, e.ts_ms, f.reason, f.attempts, f.last_ms "
        "FROM settlement_failures f LEFT JOIN usage_events e ON e.request_id = f.event_id "
        "WHERE f.quarantined"
    )
    args: list[Any] = []
    if ids:
        sql += f" AND f.event_id IN ({','.join(f'${i + 1}' for i in range(len(ids)))})"
        args = list(ids)
    rows = await tx.fetch(sql + " ORDER BY f.last_ms, f.event_id", *args)
    return [
        Quarantined(r[0], r[1] or "", r[2] or "", int(r[3] or 0), r[4], int(r[5]), int(r[6]))
        for r in rows
    ]


async def _quarantined_ids(tx: Tx, ids: Sequence[str]) -> list[Quarantined]:
    found = await quarantined(tx, ids)
    missing = sorted(set(ids) - {q.event_id for q in found})
    if missing:
        raise BillingError(f"not quarantined: {', '.join(missing)}")
    return found


async def release(tx: Tx, ids: Sequence[str]) -> list[str]:
    """Takes events out of quarantine: the next settlement pass tries them again (after a fix,
    e.g. a price that makes their amounts fit). BillingError if one is not quarantined."""
    found = await _quarantined_ids(tx, ids)
    for q in found:
        await tx.execute("DELETE FROM settlement_failures WHERE event_id = $1", q.event_id)
    return [q.event_id for q in found]


async def void(tx: Tx, ids: Sequence[str], memo: str = "") -> list[str]:
    """Settles quarantined events with no charge (they are never billed; they count in the
    hourly rollups with cost 0) and records each in the audit log (kind `usage_voided`, with
    the quarantine's reason and `memo`). BillingError if one is not quarantined."""
    found = await _quarantined_ids(tx, ids)
    now = int(time.time() * 1000)
    voided: dict[str, str] = {}
    evs: list[UsageEvent] = []
    for q in found:
        row = await tx.fetchrow(
            f"SELECT {_EVENT_COLS} FROM usage_events e WHERE e.request_id = $1", q.event_id
        )
        key_id = ""
        if row is not None:
            ev = event_from_row(row)
            key_id = ev.key_id
            added = await tx.execute(
                "INSERT INTO settlements (event_id, payload_sha256, txn_id, settled_ms) "
                "VALUES ($1, $2, '', $3) ON CONFLICT (event_id) DO NOTHING",
                q.event_id,
                _payload_hash(ev),
                now,
            )
            if added:
                voided[q.event_id] = ""
                evs.append(ev)
            await _mark_settled(tx, ids=[q.event_id], now=now)
            parsed = LS.parse_holds(ev.holds)
            if parsed is not None:  # a host's charges, final: the ledger charges nothing
                await LS.post(tx, [(pot, parsed[0], amount) for pot, amount in parsed[1]])
        await tx.execute("DELETE FROM settlement_failures WHERE event_id = $1", q.event_id)
        details = {"event_id": q.event_id, "reason": q.reason, "memo": memo}
        await tx.execute(
            "INSERT INTO audit_log (id, ts_ms, kind, tenant, key_id, details) "
            "VALUES ($1, $2, 'usage_voided', $3, $4, $5)",
            f"aud_{now:012x}{secrets.token_hex(8)}",
            now,
            q.tenant,
            key_id,
            json.dumps(details, sort_keys=True),
        )
    # Settled with no charge: they count in the hourly rollups with cost 0.
    await rollups.apply_settled(tx, evs, voided)
    return [q.event_id for q in found]


if __name__ == "__main__":
    raise SystemExit(main())
