"""`tokenhub keys create/limit` and `tokenhub tenants limit`: limits in the store and listings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_admin import run

from tokenhub.store import Limits
from tokenhub.store.sqlite import SQLiteStore


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "limits.db")


def _marker(db: str) -> int:
    with SQLiteStore(db) as s:
        return s.change_marker()


def test_key_limits(capsys: pytest.CaptureFixture[str], db: str) -> None:
    run(capsys, "tenants", "create", "acme", "--db", db)
    code, out, _ = run(
        capsys, "keys", "create", "--tenant", "acme", "--rpm", "5", "--max-concurrency", "2",
        "--json", "--db", db,
    )  # fmt: skip
    assert code == 0
    created = json.loads(out)
    key_id = created["id"]
    assert created["limits"] == {"rpm": 5, "tpm": None, "max_concurrency": 2}

    before = _marker(db)
    code, out, _ = run(
        capsys, "keys", "limit", key_id, "--tpm", "1000", "--rpm", "none", "--db", db
    )
    assert (code, out) == (0, f"API key {key_id} limits: tpm=1000 max_concurrency=2\n")
    assert _marker(db) > before  # running gateways notice

    code, out, _ = run(capsys, "keys", "list", "--db", db)
    [row] = [line for line in out.splitlines() if line.startswith(key_id)]
    assert row.endswith("tpm=1000 max_concurrency=2")
    code, out, _ = run(capsys, "keys", "list", "--json", "--db", db)
    assert json.loads(out)[0]["limits"] == {"rpm": None, "tpm": 1000, "max_concurrency": 2}

    # Removing the last limit removes the row.
    run(capsys, "keys", "limit", key_id, "--tpm", "none", "--max-concurrency", "none", "--db", db)
    with SQLiteStore(db) as s:
        assert s.get_limits("key", key_id) == Limits() and s.all_limits() == []

    code, _, err = run(capsys, "keys", "limit", "key_ffffffffffff", "--rpm", "1", "--db", db)
    assert (code, err) == (2, "tokenhub: error: no API key 'key_ffffffffffff'\n")


def test_tenant_limits(capsys: pytest.CaptureFixture[str], db: str) -> None:
    run(capsys, "tenants", "create", "acme", "--db", db)
    code, out, _ = run(
        capsys, "tenants", "limit", "acme", "--tokens-per-day", "100000", "--rpm", "60",
        "--db", db,
    )  # fmt: skip
    assert (code, out) == (0, "tenant 'acme' limits: rpm=60 tokens_per_day=100000\n")
    code, out, _ = run(capsys, "tenants", "list", "--db", db)
    assert out.splitlines()[1].endswith("rpm=60 tokens_per_day=100000")
    code, out, _ = run(capsys, "tenants", "list", "--json", "--db", db)
    assert json.loads(out)[0]["limits"] == {
        "rpm": 60, "tpm": None, "max_concurrency": None, "tokens_per_day": 100000,
        "guard_tpm": None, "guard_jump": None, "strong_share_pct": None,
    }  # fmt: skip
    code, out, _ = run(capsys, "tenants", "limit", "acme", "--strong-share-pct", "30", "--db", db)
    assert (code, out) == (0, "tenant 'acme' limits: rpm=60 tokens_per_day=100000 "
                              "strong_share_pct=30\n")  # fmt: skip
    code, _, err = run(capsys, "tenants", "limit", "acme", "--strong-share-pct", "101", "--db", db)
    assert (code, err) == (2, "tokenhub: error: strong_share_pct is a percentage, 0 to 100 "
                              "(got 101)\n")  # fmt: skip
    code, _, err = run(capsys, "tenants", "limit", "nope", "--rpm", "1", "--db", db)
    assert (code, err) == (2, "tokenhub: error: no tenant 'nope'\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("tenants", "limit", "acme", "--rpm", "-1"), "--rpm must be a whole number >= 0"),
        (("tenants", "limit", "acme", "--tpm", "1.5"), "--tpm must be a whole number >= 0"),
        (
            ("tenants", "limit", "acme", "--rpm", "5", "--tokens-per-day", "lots"),
            "--tokens-per-day",
        ),
        (("tenants", "limit", "acme", "--max-concurrency", "9" * 30), "--max-concurrency"),
        (("tenants", "limit", "acme"), "give at least one of"),
        (("keys", "limit", "KEY", "--rpm", "x"), "--rpm must be a whole number >= 0"),
        (("keys", "create", "--tenant", "acme", "--rpm", "ten"), "--rpm must be"),
        (("keys", "create", "--tenant", "acme", "--rpm", "none"), "no limits to remove"),
    ],
)
def test_bad_values_exit_2_and_change_nothing(
    capsys: pytest.CaptureFixture[str], db: str, argv: tuple[str, ...], message: str
) -> None:
    run(capsys, "tenants", "create", "acme", "--db", db)
    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme", "--json", "--db", db)
    key_id = json.loads(out)["id"]
    argv = tuple(key_id if a == "KEY" else a for a in argv)
    before = _marker(db)
    code, out, err = run(capsys, *argv, "--db", db)
    assert code == 2 and out == ""
    assert err.startswith("tokenhub: error: ") and message in err and err.count("\n") == 1
    assert _marker(db) == before
    with SQLiteStore(db) as s:
        assert s.all_limits() == [] and len(s.list_keys()) == 1


def test_store_rejects_bad_fields(db: str) -> None:
    from tokenhub.store import StoreError

    with SQLiteStore(db) as s:
        s.migrate()
        s.create_tenant("acme")
        key, _ = s.create_key("acme")
        with pytest.raises(StoreError, match="has no limit 'tokens_per_day'"):
            s.set_limits("key", key.id, tokens_per_day=5)
        with pytest.raises(StoreError, match="whole number"):
            s.set_limits("tenant", "acme", rpm=-1)
        assert s.set_limits("tenant", "acme", tpm=7) == Limits(tpm=7)
        assert s.set_limits("tenant", "acme", rpm=1) == Limits(rpm=1, tpm=7)
        [row] = s.all_limits()
        assert (row.scope, row.name, row.limits) == ("tenant", "acme", Limits(rpm=1, tpm=7))


def test_guard_settings_and_the_audit_log(capsys: pytest.CaptureFixture[str], db: str) -> None:
    run(capsys, "tenants", "create", "acme", "--db", db)
    code, out, _ = run(capsys, "audit", "--db", db)
    assert code == 0 and out == ""
    before = _marker(db)
    code, out, _ = run(
        capsys, "tenants", "limit", "acme", "--guard-tpm", "200000", "--guard-jump", "20",
        "--db", db,
    )  # fmt: skip
    assert (code, out) == (0, "tenant 'acme' limits: guard_tpm=200000 guard_jump=20\n")
    assert _marker(db) > before  # running gateways pick it up
    with pytest.raises(SystemExit):  # a tenant setting: keys have no such option
        run(capsys, "keys", "limit", "KEY", "--guard-tpm", "5", "--db", db)
    assert "unrecognized arguments: --guard-tpm 5" in capsys.readouterr().err
    with SQLiteStore(db) as s:
        s.add_audit("guard_throttle", "acme", "key_1", {"reason": "velocity 9 tpm", "x": 1})
    code, out, _ = run(capsys, "audit", "--db", db)
    assert code == 0 and "guard_throttle  acme  key_1  reason=velocity 9 tpm x=1" in out
    code, out, _ = run(capsys, "audit", "--json", "--db", db)
    entry = json.loads(out)
    assert entry["kind"] == "guard_throttle"
    assert entry["details"] == {"reason": "velocity 9 tpm", "x": 1}
    code, _, err = run(capsys, "audit", "--limit", "0", "--db", db)
    assert (code, err) == (2, "tokenhub: error: --limit must be at least 1 (got 0)\n")
