"""The store on PostgreSQL (store/postgres.py): the same contract as on SQLite
(tests/test_store.py), through the one migration runner, on a fresh database per test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import asyncpg
import msgspec
import pytest
from factories import usage_event

from tokenhub.db.schema import LATEST_VERSION, MIGRATIONS
from tokenhub.store import AlreadyExists, InvalidEvents, NotFound, StoreError, open_store
from tokenhub.store.postgres import PgStore
from tokenhub.usage import MAX_TOKENS, UsageEvent


def event(i: int, **kw: object) -> UsageEvent:
    return usage_event(i, **{"output_tokens": 10 + i, "latency_ms": 12.5, **kw})


@pytest.fixture
def store(pg_database: str) -> Iterator[PgStore]:
    s = open_store(pg_database)
    assert isinstance(s, PgStore)
    s.migrate()
    yield s
    s.close()


def _sql(url: str, sql: str) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


# -- schema ------------------------------------------------------------------------------


def test_migrations_once_and_a_newer_schema_refused(pg_database: str) -> None:
    s = open_store(pg_database)
    try:
        assert s.migrate() == [m.version for m in MIGRATIONS]
        assert s.migrate() == []
    finally:
        s.close()
    rows = _sql(pg_database, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]
    # Money, times and token counts are 64-bit on PostgreSQL too.
    types = dict(
        (r[0], r[1])
        for r in _sql(
            pg_database,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'usage_events'",
        )
    )
    for col in ("ts_ms", "input_tokens", "cached_input_tokens", "output_tokens", "settled_ms"):
        assert types[col] == "bigint", (col, types[col])
    _sql(pg_database, "INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    s = open_store(pg_database)
    try:
        with pytest.raises(StoreError, match=f"schema version 99, newer .*\\({LATEST_VERSION}\\)"):
            s.migrate()
    finally:
        s.close()


def test_concurrent_migrations_apply_each_once(pg_database: str) -> None:
    """Stores opening a fresh database at once (forked workers, the settler, a CLI): the
    runner's advisory lock makes one apply everything and the others find it done."""
    results: list[list[int]] = []
    errors: list[BaseException] = []
    stores = [open_store(pg_database) for _ in range(6)]
    barrier = threading.Barrier(len(stores))

    def migrate(s: object) -> None:
        assert isinstance(s, PgStore)
        barrier.wait()
        try:
            results.append(s.migrate())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    assert errors == []
    assert sorted(map(len, results)) == [0] * 5 + [len(MIGRATIONS)]


def test_unmigrated_database_says_so(pg_database: str) -> None:
    s = open_store(pg_database)
    try:
        with pytest.raises(StoreError, match="no tokenhub schema: run migrate"):
            s.list_tenants()
    finally:
        s.close()


def test_closed_store(store: PgStore) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_tenants()
    store.close()  # twice is fine


def test_password_never_in_messages(pg_dsn: str) -> None:
    with pytest.raises(StoreError) as e:
        open_store("postgresql://who:hunter22@127.0.0.1:1/none")
    assert "hunter22" not in str(e.value) and "cannot connect to PostgreSQL" in str(e.value)


# -- tenants, keys, limits, audit ----------------------------------------------------------


def test_tenants_keys_and_the_change_marker(store: PgStore, pg_database: str) -> None:
    m0 = store.change_marker()
    t = store.create_tenant("acme")
    assert store.get_tenant("acme") == t and store.list_tenants() == [t]
    with pytest.raises(AlreadyExists):
        store.create_tenant("acme")
    with pytest.raises(StoreError, match="invalid tenant name"):
        store.create_tenant("bad name")
    key, secret = store.create_key("acme")
    with pytest.raises(NotFound):
        store.create_key("nope")
    with pytest.raises(AlreadyExists):
        store.create_key("acme", secret=secret)
    assert [k.id for k in store.list_keys("acme")] == [key.id]
    assert [a.key_id for a in store.active_keys()] == [key.id]
    # Another store (another process, say) sees every change through the marker.
    other = open_store(pg_database)
    try:
        m1 = other.change_marker()
        assert m1 > m0
        revoked = store.revoke_key(key.id)
        assert revoked.revoked_ms is not None
        assert other.change_marker() > m1 and other.active_keys() == []
        with pytest.raises(StoreError, match="already revoked"):
            other.revoke_key(key.id)
    finally:
        other.close()
    rows = _sql(pg_database, "SELECT sha256, prefix FROM api_keys")
    assert secret not in {r[0] for r in rows} | {r[1] for r in rows}


def test_limits_audit_and_daily_tokens(store: PgStore) -> None:
    store.create_tenant("acme")
    key, _ = store.create_key("acme")
    assert store.set_limits("key", key.id, rpm=5).rpm == 5
    limits = store.set_limits("tenant", "acme", tpm=10, tokens_per_day=2**63 - 1)
    assert (limits.tpm, limits.tokens_per_day) == (10, 2**63 - 1)
    assert store.set_limits("tenant", "acme", tpm=None).tpm is None
    assert [(r.scope, r.name) for r in store.all_limits()] == [("key", key.id), ("tenant", "acme")]
    with pytest.raises(StoreError, match="no limit"):
        store.set_limits("key", key.id, tokens_per_day=1)
    with pytest.raises(NotFound):
        store.set_limits("tenant", "nope", rpm=1)
    entry = store.add_audit("guard_throttle", "acme", key.id, {"tpm": 9000})
    [got] = store.audit_entries()
    assert (got.id, got.details) == (entry, {"tpm": 9000})
    # Out-of-bounds counts (written before they were checked) are clamped, never summed raw.
    store.insert_events([event(1), event(2, input_tokens=-5, output_tokens=2 * MAX_TOKENS)])
    assert store.tokens_since(0) == {"acme": 101 + 11 + 0 + MAX_TOKENS}
    assert store.tokens_since(event(2).ts_ms + 1) == {}


# -- usage events ------------------------------------------------------------------------


def test_insert_is_idempotent_and_keeps_the_original(store: PgStore) -> None:
    batch = [event(i) for i in range(50)]
    assert store.insert_events(batch) == (50, 0, 0, ())
    assert store.insert_events(batch) == (0, 50, 0, ())
    changed = event(1, output_tokens=999, status=0, error="interrupted")
    r = store.insert_events([event(60), event(1), changed])
    assert (r.inserted, r.duplicates, r.conflicts, r.conflict_ids) == (1, 1, 1, ("req_00000001",))
    r = store.insert_events([event(70), event(70), event(70, output_tokens=5)])
    assert (r.inserted, r.duplicates, r.conflicts) == (1, 1, 1)
    assert list(store.iter_events()) == [*batch, event(60), event(70)]
    assert store.insert_events([]) == (0, 0, 0, ())
    assert store.sync() is True


def test_every_field_round_trips_and_export_pages(store: PgStore) -> None:
    full = UsageEvent(
        request_id="req_full",
        ts_ms=1_700_000_000_123,
        tenant="acme",
        key_id="key_0123456789ab",
        endpoint="completions",
        model="qwen-plus",
        deployment="qwen-plus@mock-b",
        provider="mock-b",
        upstream_model="qwen-plus-latest",
        stream=True,
        input_tokens=2**62,
        cached_input_tokens=7,
        output_tokens=0,
        source="metered",
        status=499,
        error="client_disconnected",
        latency_ms=0.1 + 0.2,
        ttft_ms=1e-9,
        attempts=3,
        route="affinity",
        tier="strong",
        usage_anomaly="upstream_usage_implausible",
        holds="q:acme:tpm=5",
    )
    store.insert_events([full])
    assert list(store.iter_events()) == [full]
    # More than a page (1000 rows), with equal timestamps across the page boundary.
    many = [event(i, ts_ms=1_800_000_000_000 + i // 7) for i in range(2500)]
    for i in range(0, 2500, 1000):
        store.insert_events(many[i : i + 1000])
    assert list(store.iter_events(since_ms=1_800_000_000_000)) == many
    assert list(store.iter_events(1_800_000_000_000 + 10, 1_800_000_000_000 + 12)) == many[70:84]
    assert store.count_events() == 2501


def test_what_postgresql_refuses_is_named_and_nothing_written(store: PgStore) -> None:
    bad = [
        event(2, status=2**40),
        event(3, error="nul\x00byte"),
    ]
    with pytest.raises(InvalidEvents) as e:
        store.insert_events([event(1), *bad])
    assert [ev.request_id for ev, _ in e.value.events] == ["req_00000002", "req_00000003"]
    assert "32-bit" in e.value.events[0][1] and "NUL" in e.value.events[1][1]
    assert store.count_events() == 0
    with pytest.raises(InvalidEvents):
        store.insert_events([msgspec.structs.replace(event(4), input_tokens=2**64)])
    assert store.insert_events([event(1)]).inserted == 1


def test_a_session_idle_in_a_transaction_is_ended_and_frees_its_locks(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops talking in the middle of a transaction (a silent partition) must not
    hold its row locks until TCP keepalive notices: PostgreSQL ends its session after
    IDLE_IN_TRANSACTION_MS (shortened here) and another client takes the lock."""
    from tokenhub.db import database
    from tokenhub.db.database import DatabaseError, PgDatabase

    monkeypatch.setattr(database, "IDLE_IN_TRANSACTION_MS", 300)

    async def run() -> float:
        stuck = await PgDatabase.connect(pg_database, max_size=1)
        other = await asyncpg.connect(pg_database)
        try:
            await other.execute("CREATE TABLE t (id INT PRIMARY KEY, v INT)")
            await other.execute("INSERT INTO t VALUES (1, 0)")
            locked = asyncio.Event()

            async def hold(tx: database.Tx) -> None:
                await tx.fetchrow("SELECT v FROM t WHERE id = 1 FOR UPDATE")
                locked.set()
                await asyncio.sleep(3)  # silent, as a partitioned client is
                await tx.execute("UPDATE t SET v = 1 WHERE id = 1")

            task = asyncio.create_task(stuck.transaction(hold))
            await locked.wait()
            t0 = asyncio.get_running_loop().time()
            await other.execute("SET lock_timeout = '2s'")  # without the fix: 3 s, refused
            await other.execute("UPDATE t SET v = 2 WHERE id = 1")
            waited = asyncio.get_running_loop().time() - t0
            with pytest.raises(DatabaseError):
                await task
            assert await other.fetchval("SELECT v FROM t WHERE id = 1") == 2
            return waited
        finally:
            await other.close()
            await stuck.close()

    assert asyncio.run(run()) < 2


def test_sessions_run_without_jit(pg_database: str) -> None:
    """tokenhub's sessions turn JIT off: a short summing query with a large planned cost was
    compiled for 170 ms to run in 0.5 ms (the console's overruns page with 1M postings)."""
    from tokenhub.db.database import PgDatabase

    async def run() -> tuple[str, str]:
        db = await PgDatabase.connect(pg_database, max_size=1)
        plain = await asyncpg.connect(pg_database)
        try:
            ours = await db.read(lambda tx: tx.fetchval("SHOW jit"))
            return str(ours), str(await plain.fetchval("SHOW jit"))
        finally:
            await plain.close()
            await db.close()

    ours, default = asyncio.run(run())
    assert ours == "off"
    assert default == "on"  # the server's default, which the session setting overrides
