"""The SQLite store: schema, tenants, keys, change marker, usage events, threads, processes."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from factories import usage_event

from tokenhub.db.schema import MIGRATIONS
from tokenhub.store import (
    AlreadyExists,
    InvalidEvents,
    NotFound,
    StoreError,
    database_path,
    open_store,
)
from tokenhub.store.sqlite import SQLiteStore
from tokenhub.usage import UsageEvent


def event(i: int, **kw: object) -> UsageEvent:
    return usage_event(i, **{"output_tokens": 10 + i, "latency_ms": 12.5, **kw})


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "t.db")


@pytest.fixture
def store(db: str) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db)
    s.migrate()
    yield s
    s.close()


# -- opening and schema ------------------------------------------------------------------


def test_database_url_forms() -> None:
    assert database_path(None) == "tokenhub.db"
    assert database_path("") == "tokenhub.db"
    assert database_path("data/x.db") == "data/x.db"
    assert database_path("sqlite:///abs/path.db") == "/abs/path.db"
    assert database_path("SQLITE:///abs/path.db") == "/abs/path.db"
    with pytest.raises(StoreError, match="unsupported database URL scheme 'postgres'"):
        database_path("postgres://db/tokenhub")
    with pytest.raises(StoreError, match="sqlite:///ABSOLUTE/PATH"):
        database_path("sqlite://relative.db")
    with pytest.raises(StoreError, match="in-memory"):
        database_path(":memory:")


def test_open_url_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    with pytest.raises(StoreError, match="no database at"):
        open_store(str(path), create=False)
    assert not path.exists()
    s = open_store(f"sqlite://{path}")
    assert s.migrate() == [m.version for m in MIGRATIONS]
    s.close()
    assert path.exists()
    with pytest.raises(StoreError, match="cannot open database"):
        open_store(str(tmp_path / "no" / "such" / "dir.db"))


def test_migrate_is_numbered_and_idempotent(store: SQLiteStore, db: str) -> None:
    assert store.migrate() == []
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    assert [v for v, _ in rows] == [m.version for m in MIGRATIONS]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tenants", "api_keys", "usage_events", "change_marker", "schema_migrations"} <= tables
    # A database from a newer tokenhub is refused, not silently used.
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99, newer"):
        store.migrate()


def test_pragmas(store: SQLiteStore) -> None:
    c = store._conn()
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert c.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_unmigrated_database_says_so(db: str) -> None:
    s = SQLiteStore(db)
    with pytest.raises(StoreError, match="no tokenhub schema"):
        s.list_tenants()
    s.close()


def test_closed_store(store: SQLiteStore) -> None:
    store.close()
    with pytest.raises(StoreError, match="the store is closed"):
        store.list_tenants()
    store.close()  # twice is fine


# -- tenants -----------------------------------------------------------------------------


def test_tenants(store: SQLiteStore) -> None:
    t = store.create_tenant("acme")
    assert re.fullmatch(r"ten_[0-9a-f]{12}", t.id)
    assert t.created_ms == pytest.approx(time.time() * 1000, abs=5000)
    store.create_tenant("Beta.team_2-x")
    assert store.get_tenant("acme") == t
    assert [x.name for x in store.list_tenants()] == ["Beta.team_2-x", "acme"]
    with pytest.raises(AlreadyExists, match=r"^tenant 'acme' already exists$"):
        store.create_tenant("acme")
    with pytest.raises(NotFound, match=r"^no tenant 'nope'$"):
        store.get_tenant("nope")


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "a/b", "ünï", "x\ny", "a'b"])
def test_tenant_names_are_checked(store: SQLiteStore, name: str) -> None:
    with pytest.raises(StoreError, match="invalid tenant name") as e:
        store.create_tenant(name)
    assert "\n" not in str(e.value)


def test_tenant_name_limit(store: SQLiteStore) -> None:
    assert store.create_tenant("a" * 64).name == "a" * 64


# -- keys --------------------------------------------------------------------------------


def test_keys(store: SQLiteStore) -> None:
    store.create_tenant("acme")
    store.create_tenant("beta")
    k1, secret1 = store.create_key("acme")
    k2, _ = store.create_key("acme")
    k3, _ = store.create_key("beta")
    assert re.fullmatch(r"key_[0-9a-f]{12}", k1.id)
    assert re.fullmatch(r"th-[A-Za-z0-9_-]{43}", secret1)
    assert k1.prefix == secret1[:8] and k1.tenant == "acme" and k1.active
    assert k1.created_ms == k1.updated_ms and k1.revoked_ms is None
    listed = [k.id for k in store.list_keys()]  # by tenant, then creation (ms, then id)
    assert set(listed[:2]) == {k1.id, k2.id} and listed[2] == k3.id
    assert [k.id for k in store.list_keys("beta")] == [k3.id]
    with pytest.raises(NotFound, match="no tenant 'gamma'"):
        store.list_keys("gamma")
    with pytest.raises(NotFound, match="no tenant 'gamma'"):
        store.create_key("gamma")

    active = store.active_keys()
    assert {a.key_id for a in active} == {k1.id, k2.id, k3.id}
    digest = hashlib.sha256(secret1.encode()).hexdigest()
    assert (digest, k1.id, "acme") in active  # plain tuples, as auth.KeyCache unpacks them
    assert store.key_digests() == active

    revoked = store.revoke_key(k2.id)
    assert revoked.revoked_ms is not None and revoked.updated_ms == revoked.revoked_ms
    assert not revoked.active
    assert revoked in store.list_keys("acme")
    assert {a.key_id for a in store.active_keys()} == {k1.id, k3.id}
    with pytest.raises(StoreError, match=rf"^API key '{k2.id}' is already revoked$"):
        store.revoke_key(k2.id)
    with pytest.raises(NotFound, match=r"^no API key 'key_000000000000'$"):
        store.revoke_key("key_000000000000")


def test_listed_keys_hold_no_secret_or_hash(store: SQLiteStore) -> None:
    store.create_tenant("acme")
    _, secret = store.create_key("acme")
    dumped = msgspec.json.encode(store.list_keys()).decode()
    assert secret not in dumped
    assert hashlib.sha256(secret.encode()).hexdigest() not in dumped


def test_given_secret(store: SQLiteStore) -> None:
    store.create_tenant("demo")
    key, secret = store.create_key("demo", secret="sk-demo-0123456789abcdef")
    assert secret == "sk-demo-0123456789abcdef" and key.prefix == "sk-demo-"
    with pytest.raises(AlreadyExists, match="already exists"):
        store.create_key("demo", secret="sk-demo-0123456789abcdef")
    for bad in ["short", "has a space in it....", "x" * 600, "tab\tinside-the-secret"]:
        with pytest.raises(StoreError, match="API key must"):
            store.create_key("demo", secret=bad)


def test_secrets_never_reach_the_database_file(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    s = SQLiteStore(str(db))
    s.migrate()
    s.create_tenant("acme")
    secrets = [s.create_key("acme")[1] for _ in range(20)]
    secrets.append(s.create_key("acme", secret="th-caller-chosen-secret-value-123")[1])

    def file_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("k.db"))

    while_open = file_bytes()  # WAL and -shm included
    s.close()
    after = file_bytes()
    for data in (while_open, after):
        assert hashlib.sha256(secrets[0].encode()).hexdigest().encode() in data  # right file
        for secret in secrets:
            assert secret.encode() not in data
            assert secret[3:].encode() not in data  # not even without the th- prefix


# -- change marker -----------------------------------------------------------------------


def test_change_marker_moves_on_every_change(store: SQLiteStore) -> None:
    seen = [store.change_marker()]
    store.create_tenant("acme")
    seen.append(store.change_marker())
    key, _ = store.create_key("acme")
    seen.append(store.change_marker())
    store.revoke_key(key.id)
    seen.append(store.change_marker())
    assert len(set(seen)) == 4
    # Failed changes and usage writes leave it alone.
    with pytest.raises(StoreError):
        store.create_tenant("acme")
    with pytest.raises(StoreError):
        store.revoke_key(key.id)
    store.insert_events([event(1)])
    assert store.change_marker() == seen[-1]


def test_change_marker_is_stable_until_a_change(store: SQLiteStore) -> None:
    # Polled every 0.5 s by every gateway process (~5 µs a read here; speed itself belongs in
    # benches/): repeated reads agree, and any tenant or key change moves it.
    before = store.change_marker()
    assert [store.change_marker() for _ in range(100)] == [before] * 100
    store.create_tenant("acme")
    assert store.change_marker() > before


def test_change_marker_across_processes(store: SQLiteStore, db: str) -> None:
    store.create_tenant("acme")
    key, _ = store.create_key("acme")
    before = store.change_marker()
    assert key.id in {a.key_id for a in store.active_keys()}
    code = (
        "import sys; from tokenhub.store import open_store; s = open_store(sys.argv[1]); "
        "s.revoke_key(sys.argv[2]); s.close()"
    )
    subprocess.run([sys.executable, "-c", code, db, key.id], check=True, timeout=60)
    assert store.change_marker() != before
    assert key.id not in {a.key_id for a in store.active_keys()}


# -- usage events ------------------------------------------------------------------------


def test_insert_events_is_idempotent(store: SQLiteStore) -> None:
    batch = [event(i) for i in range(50)]
    assert store.insert_events(batch) == (50, 0, 0, ())
    assert store.insert_events(batch) == (0, 50, 0, ())
    assert list(store.iter_events()) == batch
    assert store.insert_events([]) == (0, 0, 0, ())


def test_conflicting_payload_keeps_the_original(store: SQLiteStore) -> None:
    original = event(1)
    store.insert_events([original])
    changed = event(1, output_tokens=999, status=0, error="interrupted")
    r = store.insert_events([event(2), original, changed])
    assert (r.inserted, r.duplicates, r.conflicts) == (1, 1, 1)
    assert r.conflict_ids == ("req_00000001",)
    assert list(store.iter_events()) == [original, event(2)]


def test_duplicate_within_one_batch(store: SQLiteStore) -> None:
    r = store.insert_events([event(1), event(1), event(1, output_tokens=5)])
    assert (r.inserted, r.duplicates, r.conflicts) == (1, 1, 1)
    assert list(store.iter_events()) == [event(1)]


def test_every_field_round_trips(store: SQLiteStore) -> None:
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
        input_tokens=2**40,
        cached_input_tokens=17,
        output_tokens=3,
        source="metered",
        status=499,
        error="client_closed",
        latency_ms=0.1 + 0.2,
        ttft_ms=1 / 3,
        attempts=2,
    )
    bare = UsageEvent(
        request_id="req_bare", ts_ms=0, tenant="t", key_id="k", endpoint="e", model="m"
    )
    store.insert_events([full, bare])
    assert list(store.iter_events()) == [bare, full]
    assert store.insert_events([full, bare]).duplicates == 2  # floats compare exactly


def test_iter_events_range_and_order(store: SQLiteStore) -> None:
    evs = [event(i, ts_ms=1000 + i // 2, request_id=f"r{9 - i}") for i in range(10)]
    store.insert_events(evs)
    got = list(store.iter_events())
    assert [(e.ts_ms, e.request_id) for e in got] == sorted((e.ts_ms, e.request_id) for e in evs)
    assert {e.ts_ms for e in store.iter_events(1001, 1003)} == {1001, 1002}  # [since, until)
    assert {e.ts_ms for e in store.iter_events(since_ms=1004)} == {1004}
    assert {e.ts_ms for e in store.iter_events(until_ms=1001)} == {1000}
    assert list(store.iter_events(5000)) == []


def test_invalid_events_are_named_and_nothing_is_written(store: SQLiteStore) -> None:
    store.insert_events([event(0)])
    bad_none = event(2, model=None)
    bad_big = event(3, input_tokens=2**70)
    with pytest.raises(InvalidEvents) as e:
        store.insert_events([event(1), bad_none, bad_big, event(4)])
    assert [ev.request_id for ev, _ in e.value.events] == ["req_00000002", "req_00000003"]
    assert "64-bit" in e.value.events[1][1]
    assert [x.request_id for x in store.iter_events()] == ["req_00000000"]  # all or nothing
    with pytest.raises(InvalidEvents, match="not a UsageEvent"):
        store.insert_events([{"request_id": "x"}])  # type: ignore[list-item]


# Batches go in multi-row INSERTs of 64, 32, ..., 1 rows: these sizes cross every boundary.
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 129, 1000])
def test_batches_of_every_size(store: SQLiteStore, n: int) -> None:
    batch = [event(i) for i in range(n)]
    assert store.insert_events(batch) == (n, 0, 0, ())
    assert store.insert_events(batch) == (0, n, 0, ())
    assert list(store.iter_events()) == batch


def test_replay_counts_across_statements(store: SQLiteStore) -> None:
    store.insert_events([event(i) for i in range(100)])
    replay = [event(i) for i in range(50, 250)]  # 50 stored, 150 new
    replay[30] = event(80, output_tokens=7)  # stored differently: a conflict
    replay.append(event(200))  # 150 rows after its first copy: another statement
    r = store.insert_events(replay)
    assert (r.inserted, r.duplicates, r.conflicts) == (150, 50, 1)
    assert r.conflict_ids == ("req_00000080",)
    assert list(store.iter_events()) == [event(i) for i in range(250)]


def test_unusual_values_round_trip(store: SQLiteStore) -> None:
    big, small = 2**63 - 1, -(2**63)
    odd = [
        event(1, tenant="租户-ü", model="模型 🚀 \u202e\u2028x", error="a\x00b\"c\\d\n\te'f"),
        event(2, error="x" * 1_000_000, deployment="y" * 70_000),
        event(3, input_tokens=big, cached_input_tokens=small, output_tokens=big, attempts=big),
        event(4, status=small, ts_ms=big - 10**9),
        event(5, latency_ms=5e-324, ttft_ms=1.7976931348623157e308),
        event(6, latency_ms=-0.0, ttft_ms=float("inf")),
        event(7, latency_ms=0.1 + 0.2, ttft_ms=None, stream=True),
        event(8, latency_ms=1 / 3, ttft_ms=-1e-300, stream=False, source="metered"),
    ]
    # Spread over a 64-row, a 4-row and a 1-row statement.
    batch = [event(100 + i) for i in range(61)] + odd[:4] + [event(200), event(201)] + odd[4:]
    assert store.insert_events(batch) == (len(batch), 0, 0, ())
    stored = {e.request_id: e for e in store.iter_events()}
    assert len(stored) == len(batch)
    for e in batch:
        assert msgspec.structs.asdict(stored[e.request_id]) == msgspec.structs.asdict(e)
    assert store.insert_events(batch) == (0, len(batch), 0, ())  # compared exactly


def test_invalid_event_in_a_later_statement_writes_nothing(store: SQLiteStore) -> None:
    batch = [event(i) for i in range(150)]  # statements of 64, 64, 16, 4 and 2 rows
    batch[140] = event(140, tenant=None)
    batch[149] = event(149, output_tokens=2**63)
    with pytest.raises(InvalidEvents) as e:
        store.insert_events(batch)
    assert [ev.request_id for ev, _ in e.value.events] == ["req_00000140", "req_00000149"]
    assert list(store.iter_events()) == []  # the first 128 rows were rolled back too
    assert not store._conn().in_transaction
    good = [ev for ev in batch if ev.request_id not in {"req_00000140", "req_00000149"}]
    assert store.insert_events(good) == (148, 0, 0, ())


def test_other_structs_go_row_by_row(store: SQLiteStore) -> None:
    class Tagged(UsageEvent):  # same fields, another type
        pass

    tagged = Tagged(**msgspec.structs.asdict(event(2)))
    assert store.insert_events([event(1), tagged, event(3)]) == (3, 0, 0, ())
    assert store.insert_events([tagged, event(1)]) == (0, 2, 0, ())
    assert list(store.iter_events()) == [event(1), event(2), event(3)]


def test_queries_use_indexes(store: SQLiteStore) -> None:
    """Nothing the gateway runs while serving scans a table (see ANCHORS: LiteLLM #35766)."""
    c = store._conn()

    def plan(sql: str, *params: object) -> str:
        return " | ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql, params))

    assert "USING INTEGER PRIMARY KEY" in plan("SELECT value FROM change_marker WHERE id = 1")
    p = plan(
        "SELECT * FROM usage_events WHERE ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms, request_id",
        1,
        2,
    )
    assert "usage_events_ts" in p and "TEMP B-TREE" not in p, p
    p = plan("SELECT * FROM usage_events ORDER BY ts_ms, request_id")
    assert "TEMP B-TREE" not in p, p
    p = plan("SELECT count(*) FROM usage_events WHERE tenant = ? AND ts_ms >= ?", "a", 1)
    assert "usage_events_tenant_ts" in p, p
    p = plan("SELECT * FROM usage_events WHERE request_id IN (?, ?)", "a", "b")
    assert "INDEX sqlite_autoindex_usage_events_1" in p, p
    assert "INDEX" in plan("SELECT id FROM tenants WHERE name = ?", "a")
    assert "INDEX" in plan("SELECT 1 FROM api_keys WHERE sha256 = ?", "a")


def test_sync_makes_commits_durable(store: SQLiteStore) -> None:
    store.insert_events([event(i) for i in range(100)])
    assert store.sync() is True


# -- concurrency -------------------------------------------------------------------------


def test_concurrent_writers_from_threads(db: str, store: SQLiteStore) -> None:
    """Threads sharing one store and threads with their own: no "database is locked", every
    event exactly once, key changes interleaved with usage writes."""
    store.create_tenant("acme")
    other = SQLiteStore(db)
    errors: list[BaseException] = []
    inserted: list[int] = []
    lock = threading.Lock()

    def writer(s: SQLiteStore, w: int) -> None:
        try:
            for b in range(20):
                # Overlapping ids across writers: each id must still land exactly once.
                base = (w % 4) * 1000 + b * 25
                r = s.insert_events([event(base + i) for i in range(50)])
                with lock:
                    inserted.append(r.inserted)
                if b % 5 == 0:
                    s.create_key("acme")
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=writer, args=(store if w % 2 else other, w)) for w in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert not errors, errors
    ids = [e.request_id for e in store.iter_events()]
    assert len(ids) == len(set(ids)) == sum(inserted)
    assert len(ids) == 4 * (19 * 25 + 50)
    assert len(store.list_keys()) == 8 * 4
