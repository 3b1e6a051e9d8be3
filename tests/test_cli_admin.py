"""The admin commands, through a test-local parser and through a real process."""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tokenhub.cli import admin
from tokenhub.store import open_store
from tokenhub.usage import EVENT_FIELDS, UsageEvent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenhub")
    admin.add_cli(p.add_subparsers(dest="command", metavar="COMMAND"))
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def event(i: int, **kw: object) -> UsageEvent:
    fields: dict[str, object] = {
        "request_id": f"req_{i:04d}",
        "ts_ms": 1_735_689_600_000 + i * 3_600_000,  # 2025-01-01T00:00Z + i hours
        "tenant": "acme",
        "key_id": "key_0123456789ab",
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "input_tokens": 10 + i,
        "output_tokens": 5,
        "latency_ms": 1.25,
        "stream": i % 2 == 1,
        "ttft_ms": 0.5 if i % 2 else None,
    }
    fields.update(kw)
    return UsageEvent(**fields)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "admin.db")


def test_tenants(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, out, err = run(capsys, "tenants", "list", "--db", db)
    assert code == 2 and err == f"tokenhub: error: no database at '{db}'\n"
    code, out, _ = run(capsys, "tenants", "create", "acme", "--db", db)
    assert code == 0 and out.startswith("created tenant 'acme' (ten_")
    code, _, err = run(capsys, "tenants", "create", "acme", "--db", db)
    assert (code, err) == (2, "tokenhub: error: tenant 'acme' already exists\n")
    code, _, err = run(capsys, "tenants", "create", "bad name", "--db", db)
    assert code == 2 and err.startswith("tokenhub: error: invalid tenant name 'bad name'")
    assert err.count("\n") == 1
    run(capsys, "keys", "create", "--tenant", "acme", "--db", db)
    code, out, _ = run(capsys, "tenants", "list", "--db", db)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "ID", "CREATED", "ACTIVE", "KEYS", "LIMITS"]
    assert row.split()[0] == "acme" and row.split()[-2:] == ["1", "-"]
    code, out, _ = run(capsys, "tenants", "list", "--json", "--db", db)
    [t] = json.loads(out)
    assert t["name"] == "acme" and t["active_keys"] == 1


def test_keys(capsys: pytest.CaptureFixture[str], db: str) -> None:
    run(capsys, "tenants", "create", "acme", "--db", db)
    code, out, err = run(capsys, "keys", "create", "--tenant", "acme", "--db", db)
    assert code == 0
    lines = out.splitlines()
    key_id = lines[0].split()[3]
    secret = lines[2].split()[-1]
    assert lines[0] == f"created API key {key_id} for tenant 'acme'"
    assert lines[1] == f"  prefix: {secret[:8]}" and secret.startswith("th-")
    assert "cannot show it again" in err

    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme", "--json", "--db", db)
    created = json.loads(out)
    assert set(created) == {
        "id",
        "tenant",
        "prefix",
        "created_ms",
        "revoked_ms",
        "limits",
        "secret",
    }

    code, out, _ = run(capsys, "keys", "list", "--db", db)
    assert code == 0 and key_id in out and secret[:8] in out
    assert secret not in out and created["secret"] not in out  # listed, never revealed
    code, out, _ = run(capsys, "keys", "list", "--tenant", "acme", "--json", "--db", db)
    assert {k["id"] for k in json.loads(out)} == {key_id, created["id"]}
    code, _, err = run(capsys, "keys", "list", "--tenant", "nope", "--db", db)
    assert (code, err) == (2, "tokenhub: error: no tenant 'nope'\n")
    code, _, err = run(capsys, "keys", "create", "--tenant", "nope", "--db", db)
    assert (code, err) == (2, "tokenhub: error: no tenant 'nope'\n")

    code, out, _ = run(capsys, "keys", "revoke", key_id, "--db", db)
    assert code == 0 and out.startswith(f"revoked API key {key_id} (tenant 'acme'")
    code, _, err = run(capsys, "keys", "revoke", key_id, "--db", db)
    assert (code, err) == (2, f"tokenhub: error: API key '{key_id}' is already revoked\n")
    code, _, err = run(capsys, "keys", "revoke", "key_ffffffffffff", "--db", db)
    assert (code, err) == (2, "tokenhub: error: no API key 'key_ffffffffffff'\n")
    code, out, _ = run(capsys, "keys", "list", "--db", db)
    [row] = [line for line in out.splitlines() if line.startswith(key_id)]
    assert row.split()[-2].endswith("Z") and row.split()[-1] == "-"  # revoked, no limits

    db_bytes = b"".join(p.read_bytes() for p in Path(db).parent.iterdir())
    assert secret.encode() not in db_bytes and created["secret"].encode() not in db_bytes


def test_db_defaults_to_env_then_cwd(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKENHUB_DB", raising=False)
    assert run(capsys, "tenants", "create", "here")[0] == 0
    assert (tmp_path / "tokenhub.db").exists()
    monkeypatch.setenv("TOKENHUB_DB", f"sqlite://{tmp_path}/env.db")
    assert run(capsys, "tenants", "create", "there")[0] == 0
    assert (tmp_path / "env.db").exists()
    code, out, _ = run(capsys, "tenants", "list", "--db", "tokenhub.db")
    assert code == 0 and "here" in out and "there" not in out


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def filled(request: pytest.FixtureRequest, db: str) -> str:
    """A database with 48 events: the SQLite file `db`, or a fresh PostgreSQL database."""
    url = db if request.param == "sqlite" else request.getfixturevalue("pg_database")
    s = open_store(url)
    s.migrate()
    s.insert_events([event(i) for i in range(48)])  # two days, one per hour
    s.close()
    return url


def test_export_jsonl(capsysbinary: pytest.CaptureFixture[bytes], filled: str) -> None:
    args = parser().parse_args(["events", "export", "--format", "jsonl", "--db", filled])
    assert args.func(args) == 0
    out, err = capsysbinary.readouterr()
    lines = out.splitlines()
    assert len(lines) == 48 and err == b"exported 48 usage events\n"
    first = json.loads(lines[0])
    assert list(first) == list(EVENT_FIELDS)  # every field, defaults included
    assert [msgspec.json.decode(x, type=UsageEvent) for x in lines] == [event(i) for i in range(48)]


def test_export_csv_with_range(capsys: pytest.CaptureFixture[str], filled: str) -> None:
    code, out, _ = run(
        capsys,
        "events",
        "export",
        "--format",
        "csv",
        "--since",
        "2025-01-01T10:00:00Z",
        "--until",
        "2025-01-02",
        "--db",
        filled,
    )
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert tuple(rows[0]) == EVENT_FIELDS
    assert [r[0] for r in rows[1:]] == [f"req_{i:04d}" for i in range(10, 24)]
    rec = dict(zip(EVENT_FIELDS, rows[1], strict=True))
    assert (rec["stream"], rec["ttft_ms"], rec["latency_ms"]) == ("false", "", "1.25")
    rec = dict(zip(EVENT_FIELDS, rows[2], strict=True))
    assert (rec["stream"], rec["ttft_ms"]) == ("true", "0.5")


def test_export_time_forms(capsys: pytest.CaptureFixture[str], filled: str) -> None:
    def ids(*extra: str) -> list[str]:
        code, out, err = run(
            capsys, "events", "export", "--format", "jsonl", "--db", filled, *extra
        )
        assert code == 0, err
        return [json.loads(x)["request_id"] for x in out.splitlines()]

    assert ids("--since", str(1_735_689_600_000 + 46 * 3_600_000)) == ["req_0046", "req_0047"]
    assert ids("--until", "2025-01-01T03:30+02:00") == ["req_0000", "req_0001"]
    assert ids("--since", "2025-01-02T22:00") == ["req_0046", "req_0047"]  # naive: UTC
    code, _, err = run(capsys, "events", "export", "--format", "csv", "--since", "yesterday")
    assert code == 2 and err.startswith("tokenhub: error: bad time 'yesterday'")
    code, _, err = run(
        capsys, "events", "export", "--format", "csv", "--since", "2", "--until", "1"
    )
    assert (code, err) == (2, "tokenhub: error: --until must be later than --since\n")


def test_export_to_file(capsys: pytest.CaptureFixture[str], filled: str, tmp_path: Path) -> None:
    out_file = tmp_path / "out.csv"
    code, out, _ = run(
        capsys, "events", "export", "--format", "csv", "-o", str(out_file), "--db", filled
    )
    assert code == 0 and out == ""
    assert len(out_file.read_text().splitlines()) == 49
    code, _, err = run(
        capsys, "events", "export", "--format", "csv", "-o", "/no/such/dir/x", "--db", filled
    )
    assert code == 1 and err.startswith("tokenhub: error: /no/such/dir/x: ")


def test_export_streams() -> None:
    """Rows are written as they come: nothing waits for the whole result."""
    written = io.BytesIO()

    def events() -> Iterator[UsageEvent]:
        yield event(0)
        yield event(1)
        assert written.getvalue().count(b"\n") == 2  # both rows are out already
        yield event(2)

    assert admin.write_jsonl(events(), written) == 3


def test_group_commands_show_help(capsys: pytest.CaptureFixture[str]) -> None:
    for group in ("tenants", "keys", "events"):
        code, _, err = run(capsys, group)
        assert code == 2 and err.startswith(f"usage: tokenhub {group}")


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    p = parser()
    with pytest.raises(SystemExit) as e:
        p.parse_args(["keys", "create", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "cannot be shown again" in out and "--tenant NAME" in out and "TOKENHUB_DB" in out
    with pytest.raises(SystemExit):
        p.parse_args(["events", "export", "--help"])
    out = capsys.readouterr().out
    assert "inclusive" in out and "Unix time in milliseconds" in out


def test_real_process(tmp_path: Path) -> None:
    """The commands as a user runs them (a separate process, exit codes, stderr)."""
    db = str(tmp_path / "p.db")

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; from tokenhub.cli.admin import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
        )

    assert cli("tenants", "create", "acme", "--db", db).returncode == 0
    r = cli("keys", "create", "--tenant", "acme", "--json", "--db", db)
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)
    r = cli("keys", "revoke", key["id"], "--db", db)
    assert r.returncode == 0 and key["secret"] not in r.stdout + r.stderr
    r = cli("keys", "revoke", key["id"], "--db", db)
    assert r.returncode == 2
    assert r.stderr == f"tokenhub: error: API key '{key['id']}' is already revoked\n"
    r = cli("events", "export", "--format", "csv", "--db", db)
    assert (r.returncode, r.stdout) == (0, ",".join(EVENT_FIELDS) + "\n")


def test_tenants_keys_limits_and_audit_on_postgresql(
    capsys: pytest.CaptureFixture[str], pg_database: str
) -> None:
    """The admin commands on a PostgreSQL URL: the same outputs and errors as on SQLite."""
    db = pg_database
    code, out, _ = run(capsys, "tenants", "create", "acme", "--db", db)
    assert code == 0 and out.startswith("created tenant 'acme' (ten_")
    code, _, err = run(capsys, "tenants", "create", "acme", "--db", db)
    assert (code, err) == (2, "tokenhub: error: tenant 'acme' already exists\n")
    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme", "--json", "--db", db)
    key = json.loads(out)
    assert code == 0 and key["secret"].startswith("th-")
    code, out, _ = run(capsys, "keys", "limit", key["id"], "--rpm", "5", "--db", db)
    assert code == 0, out
    code, out, _ = run(capsys, "tenants", "limit", "acme", "--tpm", "1000", "--db", db)
    assert code == 0, out
    code, out, _ = run(capsys, "keys", "list", "--json", "--db", db)
    [listed] = json.loads(out)
    assert (listed["id"], listed["limits"]["rpm"]) == (key["id"], 5)
    assert key["secret"] not in out
    code, out, _ = run(capsys, "tenants", "list", "--json", "--db", db)
    [t] = json.loads(out)
    assert (t["name"], t["active_keys"], t["limits"]["tpm"]) == ("acme", 1, 1000)
    code, out, _ = run(capsys, "keys", "revoke", key["id"], "--db", db)
    assert code == 0 and out.startswith(f"revoked API key {key['id']} (tenant 'acme'")
    code, _, err = run(capsys, "keys", "revoke", key["id"], "--db", db)
    assert (code, err) == (2, f"tokenhub: error: API key '{key['id']}' is already revoked\n")

    s = open_store(db)
    s.add_audit("guard_throttle", "acme", key["id"], {"tpm": 9000})
    s.close()
    code, out, err = run(capsys, "audit", "--json", "--db", db)
    assert code == 0, err
    [entry] = [json.loads(line) for line in out.splitlines()]
    assert (entry["kind"], entry["key_id"], entry["details"]) == (
        "guard_throttle", key["id"], {"tpm": 9000})  # fmt: skip


def test_a_postgresql_server_that_does_not_answer(capsys: pytest.CaptureFixture[str]) -> None:
    """One line, exit 2, and never the password of the URL."""
    url = "postgresql://someone:s3cret@127.0.0.1:1/nothing"
    code, _, err = run(capsys, "tenants", "list", "--db", url)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("tokenhub: error: ") and "cannot connect to PostgreSQL" in err, err
    assert "s3cret" not in err
